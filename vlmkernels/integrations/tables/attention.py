"""The attention family's table of the transformers integration: IDEFICS's gated
cross-attention layer (``IdeficsGatedCrossAttentionLayer``), IDEFICS's perceiver resampler
attention (``IdeficsPerceiverAttention``: the latents attend to [context, latents], part
``perceiver_attention``) and the BLIP-2 / InstructBLIP / InstructBLIP-Video
Q-Former's attention (``Blip2QFormerMultiHeadAttention``,
``InstructBlipQFormerMultiHeadAttention``; InstructBLIP-Video's classes are InstructBLIP's
code under its own names), anywhere in a module tree, run their attention on the attention
family's kernels.

Part ``qformer`` (the fused Q-Former): the encoder (``Blip2QFormerEncoder``,
``InstructBlipQFormerEncoder``) projects the image features to K and V for every
cross-attention layer in one GEMM (the layers' key / value weights concatenated: (B N x E)
@ (E x 2 L H D), concatenated per call, in the graph with gradients) and hands each patched
cross-attention module its slices (keyword ``vlmkernels_qformer_kv``, with the features
they came from: a module handed other features by a hook, or the same ones changed in
place since (outside inference mode), projects those); a layer that is
checkpointed, wrapped (``CheckpointWrapper``, FSDP2's ``fully_shard``) or given backward
hooks projects its own K and V (:func:`_stackable`). The output blocks
(``...QFormerSelfOutput``, ``...QFormerOutput``: LayerNorm(dense(h) + residual)) run the
dense bias, the residual and the LayerNorm in one kernel (fp32 statistics). Outputs and
gradients (image features, every weight) match transformers. CUDA graphs at batch 1:
patch, run the model once outside the capture (Triton compiles and configs load then;
the graph re-stacks the live weights on each replay), then capture
``model(query_embeds=q, encoder_hidden_states=x)`` with static inputs and no gradients
(``tests/test_qformer_gpu.py``); the masks transformers builds there have one row per
batch, which the patched modules never read on the host (nor a mask with a row per
query, whose rows are checked to agree on the device).

Part ``qformer_attention``: every Q-Former attention module (self- and cross-attention)
gets an instance ``forward`` with transformers' projections and the family's attention
(fp32, the Q-Former's default dtype, is computed with 3xTF32 dots on GPUs). Its masks
(B, 1, 1 or T, N) become the kernels' per-key bias (additive masks, added to the logits as
transformers adds them to the scores) or key padding (bool masks), without reading them on
the host (:func:`key_mask`); refused, naming why: a mask that differs between query rows
(checked on the device: RuntimeError on the CPU, a device-side assert on CUDA). Attention
dropout (``attention_probs_dropout_prob``, 0.1 by default)
runs in the kernel in training mode (``cross_attention(dropout_p=...)``: a counter-based
mask drawn from the device's torch generator, regenerated in the backward), so a patched
Q-Former trains with its dropout; its masks are not transformers' (a different RNG), so
outputs match transformers only in eval mode or with the dropout at 0. With
``output_attentions=True`` (transformers records the modules' attention weights) the
modules run transformers' forward for that call, with a
:class:`~vlmkernels.integrations.patching.PatchFallbackWarning`: the kernels keep no
weights. A query row whose keys are all padding gets 0 (transformers: a uniform average).

Part ``gated_cross_attention`` (a keyword of :func:`vlmkernels.patch`): every
``IdeficsGatedCrossAttentionLayer`` gets an instance ``forward`` computing what
transformers' does (RMSNorm, the q / k / v projections of ``cross_attn`` with its optional
q / k RMSNorms, attention, ``o_proj``, the zeroed rows of ``cross_attention_gate``, the tanh
gates ``alpha_cross_attn`` / ``alpha_dense`` (float or vector), the MLP and the hidden
dropouts) with the same parameters, so outputs and gradients match; under gradient
checkpointing (``gradient_checkpointing_enable()``) it is checkpointed as the class's
forward is (:func:`_checkpointed`). The attention is the family's core: the image
attention mask (IDEFICS's additive (B, 1, T, N) mask, 0 where a text token may attend an
image token) becomes one key range [lo, hi) per token, so each query block visits only the
image tokens its tokens see (no dense mask in the kernel).

Attention dropout in training mode runs in the kernel (as the Q-Former's). Refused at call
time, with an error naming the reason: a mask whose allowed image tokens are not one
interval per text token (never the case for IDEFICS's image-by-image masks), an additive
mask value other than 0 (allowed) and masked (at most -1e4: finfo.min, -inf; a soft bias or
a 1 / 0 keep mask, which transformers adds to the scores), a cache. Tokens that
see no image token get 0 from the kernel, where transformers averages every image token
uniformly (its mask adds finfo.min to every score); ``cross_attention_gate`` zeroes those
rows in both, so the layer's outputs agree whenever the gate marks them, as IDEFICS's
model does. The mask check reads the mask on the host (a device synchronisation) once per
mask: transformers hands every gated layer the same mask, and the last one checked is kept
with its ranges and version counter (an in-place change is read again).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import numbers
import sys
import threading
import weakref

import torch
from torch.nn import functional as F

from ...core.runtime import tracing
from ...ops.attention import cross_attention, draw_dropout_seed
from ...ops.attention.ops import attention_core
from ...ops.attention.qformer import add_layernorm_unchecked, stacked_kv
from ..patching import (
    Architecture,
    Patcher,
    SetMethod,
    UnsupportedLayoutError,
    changed_part,
    class_forward,
    exact_layer,
    fused_forward,
    is_patched,
    not_plain,
    register,
)

__all__ = ["IDEFICS_ARCHITECTURES", "IDEFICS_PATCHER", "PERCEIVER_ARCHITECTURES",
           "PERCEIVER_PATCHER", "QFORMER_ARCHITECTURES", "QFORMER_KV", "QFORMER_PATCHER",
           "TESTED_VERSIONS",
           "key_mask", "mask_ranges"]  # fmt: skip

# test_attention_patch passes on each (CPU, Triton interpreter)
TESTED_VERSIONS = ("5.16.1", "5.17.0", "5.18.0", "5.19.0", "5.20.2", "5.21.1", "5.22.2", "5.23.0",
                   "5.24.0", "5.25.0")  # fmt: skip

PERCEIVER_ARCHITECTURES = (
    Architecture(
        key="idefics_perceiver",
        module="transformers.models.idefics.perceiver",
        classes={"perceiver_attention": "IdeficsPerceiverAttention"},
        roots={"IdeficsPerceiverResampler": ("perceiver_attention",),
               "IdeficsPerceiverAttention": ("perceiver_attention",)},
        anywhere=True,
    ),
)  # fmt: skip
_QFORMER_ROOTS = ("QFormerModel", "Model", "ForConditionalGeneration")
QFORMER_ARCHITECTURES = tuple(
    Architecture(
        key=key,
        module=f"transformers.models.{key}.modeling_{key}",
        classes={
            "qformer_attention": f"{prefix}QFormerMultiHeadAttention",
            "qformer_encoder": f"{prefix}QFormerEncoder",
            "qformer_self_output": f"{prefix}QFormerSelfOutput",
            "qformer_output": f"{prefix}QFormerOutput",
        },
        roots={f"{prefix}{root}": ("qformer_attention", "qformer") for root in _QFORMER_ROOTS},
        anywhere=True,
    )
    for key, prefix in (
        ("blip_2", "Blip2"),
        ("instructblip", "InstructBlip"),
        ("instructblipvideo", "InstructBlipVideo"),
    )
)
IDEFICS_ARCHITECTURES = (
    Architecture(
        key="idefics",
        module="transformers.models.idefics.modeling_idefics",
        classes={"gated_cross_attention": "IdeficsGatedCrossAttentionLayer"},
        roots={
            "IdeficsForVisionText2Text": ("gated_cross_attention",),
            "IdeficsModel": ("gated_cross_attention",),
            "IdeficsGatedCrossAttentionLayer": ("gated_cross_attention",),
        },
        anywhere=True,
    ),
)

_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj", "num_heads", "head_dim", "scaling",
              "qk_layer_norms", "dropout")  # fmt: skip
_LAYER = ("input_layernorm", "post_attention_layernorm", "mlp", "cross_attn",
          "act_cross_attn", "act_dense", "alpha_cross_attn", "alpha_dense")  # fmt: skip


@dataclasses.dataclass
class _CheckedMask:
    """The last mask :func:`mask_ranges` read in a thread: IDEFICS passes one image
    attention mask to every gated layer of a forward, and the check reads the mask on the
    host (a device wait). ``mask`` is a weak reference, so no user tensor is kept alive,
    and a mask freed since never matches a new one (its reference is dead, whatever the
    new one's address or id)."""

    mask: weakref.ref
    key: tuple  # the mask's version counter, batch, tokens, keys, inference mode
    ranges: tuple[torch.Tensor, torch.Tensor]
    readers: set[int]  # ids of the gated layers that got these ranges


# per thread (``.mask``): threads serving one model, each with its own masks, would
# otherwise evict each other's entry at every layer, each eviction a host read of the mask
_LAST_CHECKED = threading.local()


def mask_ranges(mask: torch.Tensor, batch: int, tokens: int, keys: int, reader=None):
    """(lo, hi): int32 (B, T) key ranges of an IDEFICS image attention mask ((B or 1, 1,
    T or 1, N), one row being every token's as transformers broadcasts it; additive, 0 =
    allowed, at most -1e4 = masked (finfo.min, -inf), or bool, True = allowed); rows
    allowing nothing get lo = hi = 0. Raises ValueError when a row's allowed keys are not
    one interval, or for an additive value between (a bias, or a 1 / 0 keep mask:
    transformers adds it to the scores, which key ranges cannot).

    The ranges are computed once per forward: the same mask object, unchanged since (its
    version counter), gets the ranges computed last time, unless ``reader`` (the gated
    layer asking) already read them, which starts a new forward and reads the mask again.
    So a change made through ``mask.data`` (which bumps no version counter) shows from the
    next forward on. An inference tensor has no version counter and is read every time.
    While torch.compile traces, the mask is not read on the host: a row whose keys are not
    one interval gets lo = 1 > hi = 0 instead, a NaN row (no error can be raised there); so
    too on the meta device (a shape pass over a model built there), and for a row holding
    an additive value between 0 and masked."""
    if tracing() or mask.is_meta:
        return _mask_ranges(mask, batch, tokens, keys, traced=True)
    if mask.is_inference():
        return _mask_ranges(mask, batch, tokens, keys)
    # ranges made under inference mode are inference tensors, which autograd cannot save:
    # not handed to a forward outside it (a teacher run under inference mode, then a student)
    key = (mask._version, batch, tokens, keys, torch.is_inference_mode_enabled())
    last = getattr(_LAST_CHECKED, "mask", None)
    fresh = last is not None and last.mask() is mask and last.key == key
    if fresh and id(reader) not in last.readers:
        if reader is not None:
            last.readers.add(id(reader))
        return last.ranges
    ranges = _mask_ranges(mask, batch, tokens, keys)
    readers = set() if reader is None else {id(reader)}
    _LAST_CHECKED.mask = _CheckedMask(weakref.ref(mask), key, ranges, readers)
    return ranges


# the largest additive mask value taken as "masked": exp(-1e4) is 0 in every float dtype,
# so transformers' softmax gives such a key no weight, as the kernel does (BERT's -10000)
_MASKED = -1e4


def _mask_ranges(mask: torch.Tensor, batch: int, tokens: int, keys: int, traced=False):
    rows = mask.shape[2] if mask.dim() == 4 else None  # one: every token's
    if mask.dim() != 4 or mask.shape[1] != 1 or rows not in (1, tokens) or mask.shape[3] != keys:
        raise ValueError(f"vlmkernels (IDEFICS cross-attention): image_attention_mask must be "
                         f"(B, 1, 1 or {tokens}, {keys}), got {tuple(mask.shape)}")  # fmt: skip
    allowed = mask[:, 0] if mask.dtype == torch.bool else mask[:, 0] == 0
    # an additive value the kernel cannot drop as transformers' softmax does: a bias
    soft = None if mask.dtype == torch.bool else ~allowed & (mask[:, 0] > _MASKED)
    allowed = allowed.expand(batch, tokens, keys)
    count = allowed.sum(-1, dtype=torch.int32)
    first = allowed.to(torch.int8).argmax(-1) if keys else count  # no image tokens: none
    lo = torch.where(count > 0, first.to(torch.int32), 0)
    hi = lo + count
    j = torch.arange(keys, device=mask.device)
    interval = (j >= lo[..., None]) & (j < hi[..., None])
    if traced:
        gaps = (allowed != interval).any(-1)
        if soft is not None:
            gaps = gaps | soft.expand(batch, tokens, keys).any(-1)
        return torch.where(gaps, 1, lo).contiguous(), torch.where(gaps, 0, hi).contiguous()
    # both checks in one host read (a device synchronisation on CUDA)
    biased = soft.any() if soft is not None else allowed.new_zeros(())
    biased, gaps = torch.stack([biased, (allowed != interval).any()]).tolist()
    if biased:
        raise ValueError(f"vlmkernels (IDEFICS cross-attention): image_attention_mask holds "
                         f"values other than 0 (allowed) and masked ones (at most {_MASKED:g}: "
                         "-inf, finfo.min); transformers adds them to the scores as a bias, "
                         "the kernel takes the allowed keys only")  # fmt: skip
    if gaps:
        raise ValueError("vlmkernels (IDEFICS cross-attention): image_attention_mask allows "
                         "image tokens that are not one interval per text token")  # fmt: skip
    return lo.contiguous(), hi.contiguous()


def _check_layer(layer) -> None:
    missing = [n for n in _LAYER if not hasattr(layer, n)]
    missing += [f"cross_attn.{n}" for n in _ATTENTION if not hasattr(layer.cross_attn, n)]
    if missing:
        raise UnsupportedLayoutError(f"{type(layer).__qualname__} has no {', '.join(missing)}")
    if not isinstance(layer.config, numbers.Real):  # the layer keeps its dropout there
        what = type(layer.config).__name__
        raise UnsupportedLayoutError(
            f"{type(layer).__qualname__}.config is not the hidden dropout probability: {what}"
        )


def _gated_forward(layer, arch: Architecture):
    """The instance ``forward`` of one ``IdeficsGatedCrossAttentionLayer``."""
    _check_layer(layer)

    # fmt: off
    def forward(self, hidden_states, attention_mask=None, image_hidden_states=None,
                image_attention_mask=None, cross_attention_gate=None, cache=None, **kwargs):
        # fmt: on
        cache = kwargs.pop("past_key_values", cache)
        if image_hidden_states is None:
            raise ValueError("`image_hidden_states` is required for Idefics cross attention")
        if cross_attention_gate is None:
            raise ValueError("`cross_attention_gate` is required for Idefics cross attention")
        if cache is not None:
            raise NotImplementedError("Past key value states are not implemented for Idefics "
                                      "cross attention module.")  # fmt: skip
        a = self.cross_attn
        drop = float(a.dropout) if a.training else 0.0  # cross_attn's mode, as transformers
        residual = hidden_states
        x = self.input_layernorm(hidden_states)
        b, t, _ = x.shape
        n = image_hidden_states.shape[1]
        h, d = a.num_heads, a.head_dim
        q = a.q_proj(x).view(b, t, h, d).transpose(1, 2)
        k = a.k_proj(image_hidden_states).view(b, n, h, d).transpose(1, 2)
        v = a.v_proj(image_hidden_states).view(b, n, h, d).transpose(1, 2)
        if a.qk_layer_norms:
            q, k = a.q_layer_norm(q), a.k_layer_norm(k)
        if image_attention_mask is None:
            out = cross_attention(q, k, v, scale=a.scaling, dropout_p=drop)
        else:
            lo, hi = mask_ranges(image_attention_mask, b, t, n, reader=self)
            if not 0 <= drop < 1:
                raise ValueError(f"vlmkernels (IDEFICS cross-attention): attention dropout "
                                 f"must be in [0, 1), got {drop}")  # fmt: skip
            seed = draw_dropout_seed(q.device) if drop > 0 else None
            out = attention_core(q, k, v, None, None, t, n, None, lo, hi, False,
                                 float(a.scaling), 0, None, None, drop, seed)[0]  # fmt: skip
        out = a.o_proj(out.transpose(1, 2).reshape(b, t, h * d))
        out = F.dropout(out, p=self.config, training=self.training)
        out = out.masked_fill((cross_attention_gate == 0)[:, :, None], 0.0)
        hidden_states = residual + self.act_cross_attn(self.alpha_cross_attn) * out
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        hidden_states = F.dropout(hidden_states, p=self.config, training=self.training)
        return residual + self.act_dense(self.alpha_dense) * hidden_states

    forward.__name__ = forward.__qualname__ = "forward"
    forward.__doc__ = "vlmkernels' IdeficsGatedCrossAttentionLayer.forward (segment attention)."
    # it reads cross_attn's layers instead of calling it: a cross_attn replaced or hooked
    # after patching runs the class's forward (which checkpoints itself)
    return fused_forward(layer, ("cross_attn",), _checkpointed(forward))


def _checkpointed(forward):
    """``forward`` (an instance forward of a transformers ``GradientCheckpointingLayer``)
    checkpointed as the class's is: transformers after 5.17 (5.25 does) wraps the class's
    ``forward`` (not ``__call__``, as 5.16-5.17 do) in ``self._gradient_checkpointing_func``
    while ``gradient_checkpointing`` is set in training with gradients enabled, so an
    instance forward would silently drop the checkpoint (every activation kept). A cache
    is dropped there as transformers drops it."""

    @functools.wraps(forward)
    def checkpointed(self, *args, **kwargs):
        if (getattr(self, "gradient_checkpointing", False) and self.training
                and torch.is_grad_enabled()
                and type(self).__call__ is torch.nn.Module.__call__):  # fmt: skip
            if kwargs.get("cache") is not None:
                kwargs["cache"] = None
            return self._gradient_checkpointing_func(functools.partial(forward, self, **kwargs),
                                                     *args)  # fmt: skip
        return forward(self, *args, **kwargs)

    return checkpointed


def key_mask(mask, batch: int, tokens: int, keys: int, where: str):
    """(key padding, key bias) of a transformers attention mask ((B or 1, 1, 1 or T, N)),
    one of them None, or (None, None) without a mask; ``where`` names the patched module in
    errors.

    A bool mask (True: visible) becomes the (B, N) key padding (True: ignored); an additive
    one (0 visible, very negative padded, or any other per-key bias) becomes the (B, N) key
    bias the kernels add to the logits, as transformers adds the mask to the scores. Neither
    reads the mask on the host: a CUDA mask costs no synchronisation. A mask with a row per
    query (T rows, as transformers' mask helpers build them) is checked to hold the same
    row for every query by ``torch._assert_async``, also not on the host (a host read here
    was a synchronisation per attention layer and call): RuntimeError at once on the CPU,
    a device-side assert on CUDA, and under torch.compile without breaking the graph."""
    if mask is None:
        return None, None
    rows = mask.shape[2] if mask.dim() == 4 else None  # one, or one per query
    if mask.dim() != 4 or mask.shape[1] != 1 or rows not in (1, tokens) or mask.shape[3] != keys:
        raise ValueError(f"{where}: attention mask must be (B, 1, 1 or {tokens}, {keys}), got "
                         f"{tuple(mask.shape)}")  # fmt: skip
    if mask.shape[2] != 1 and not mask.is_meta:
        message = (f"{where}: the attention mask differs between query rows; the kernel "
                   "takes one mask row per batch")  # fmt: skip
        torch._assert_async((mask == mask[:, :, :1]).all(), message)
    row = mask[:, 0, 0].expand(batch, keys)
    if mask.dtype == torch.bool:
        return ~row, None
    return None, row


_QFORMER = ("query", "key", "value", "attention_head_size", "scaling", "attention_dropout")
_WEIGHTS = ("attentions", "cross_attentions")


def weights_recorded() -> bool:
    """Whether transformers is recording attention weights for the forward that runs
    (``output_attentions=True``): its output recorder (``transformers.utils.
    output_capturing``, 5.x) collects them from the attention modules' outputs, which
    the kernels do not have. Read where the recorder is loaded, without importing it."""
    capturing = sys.modules.get("transformers.utils.output_capturing")
    collector = getattr(capturing, "_active_collector", None)
    collected = collector.get() if collector is not None else None
    return bool(collected) and any(key in collected for key in _WEIGHTS)


def _qformer_forward(module, arch: Architecture):
    """The instance ``forward`` of one Q-Former attention module."""
    missing = [n for n in _QFORMER if not hasattr(module, n)]
    if missing:
        raise UnsupportedLayoutError(f"{type(module).__qualname__} has no {', '.join(missing)}")

    # fmt: off
    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, **kwargs):
        # fmt: on
        if weights_recorded():
            kwargs.pop(QFORMER_KV, None)
            return class_forward(self, "output_attentions=True (the kernels keep no attention "
                                 "weights)", hidden_states, attention_mask, encoder_hidden_states,
                                 encoder_attention_mask, **kwargs)  # fmt: skip
        drop = float(self.attention_dropout) if self.training else 0.0
        cross = encoder_hidden_states is not None
        states = encoder_hidden_states if cross else hidden_states
        mask = encoder_attention_mask if cross else attention_mask
        b, t = hidden_states.shape[:2]
        n, d = states.shape[1], self.attention_head_size
        q = self.query(hidden_states).view(b, t, -1, d).transpose(1, 2)
        # part qformer: K / V from the encoder's one GEMM, if projected from these very
        # states, unchanged since (a hook between the encoder and this module may have
        # replaced them, or changed them in place)
        stacked = kwargs.get(QFORMER_KV) if cross else None
        fresh = stacked is not None and stacked[0] is states and stacked[1] == _version(states)
        kv = stacked[2].get(self) if fresh else None
        if kv is None:
            kv = self.key(states), self.value(states)
        k, v = (x.view(states.shape[0], n, -1, d).transpose(1, 2) for x in kv)
        # transformers' matmul broadcasts a batch of 1 either way: one set of queries for
        # every image, or one image for every set of queries
        if b == 1 and k.shape[0] > 1:
            b = k.shape[0]
            q = q.expand(b, -1, -1, -1)
        elif k.shape[0] == 1 and b > 1:
            k, v = k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)
        pad, bias = key_mask(mask, b, t, n, "vlmkernels (Q-Former attention)")
        out = cross_attention(q, k, v, key_padding_mask=pad, key_bias=bias,
                              scale=float(self.scaling), dropout_p=drop)  # fmt: skip
        return out.transpose(1, 2).reshape(b, t, -1), None

    forward.__name__ = forward.__qualname__ = "forward"
    forward.__doc__ = "vlmkernels' Q-Former attention forward (the attention family's kernels)."
    return forward


_PERCEIVER = ("context_layer_norm", "latents_layer_norm", "q_proj", "k_proj", "v_proj",
              "output_proj", "n_heads", "head_dim", "qk_scale", "qk_layer_norms")  # fmt: skip


def _perceiver_forward(module, arch: Architecture):
    """The instance ``forward`` of one ``IdeficsPerceiverAttention``: latents attend to
    [context, latents], one few-query cross-attention."""
    missing = [n for n in _PERCEIVER if not hasattr(module, n)]
    if missing:
        raise UnsupportedLayoutError(f"{type(module).__qualname__} has no {', '.join(missing)}")

    def forward(self, context, latents):
        context = self.context_layer_norm(context)
        latents = self.latents_layer_norm(latents)
        b, h, d = context.shape[0], self.n_heads, self.head_dim
        both = torch.cat([context, latents], dim=-2)
        projected = (self.q_proj(latents), self.k_proj(both), self.v_proj(both))
        q, k, v = (x.reshape(b, x.shape[1], h, d).transpose(1, 2) for x in projected)
        if self.qk_layer_norms:
            q, k = self.q_layer_norm(q), self.k_layer_norm(k)
        out = cross_attention(q, k, v, scale=float(self.qk_scale))
        return self.output_proj(out.transpose(1, 2).flatten(-2))

    forward.__name__ = forward.__qualname__ = "forward"
    forward.__doc__ = "vlmkernels' IdeficsPerceiverAttention.forward (few-query attention)."
    return forward


def _forward_takes(*expected: str, exact: bool = False):
    """A class check of a replacement: ``cls.forward``'s parameters are ``expected``
    (``exact``) or start with them; otherwise UnsupportedLayoutError names both."""
    expected = list(expected)

    def check(cls, arch: Architecture) -> str:
        names = list(inspect.signature(cls.forward).parameters)
        if (names if exact else names[: len(expected)]) != expected:
            raise UnsupportedLayoutError(f"{cls.__qualname__}.forward takes {names}, expected "
                                         f"{expected}{'' if exact else ' first'}")  # fmt: skip
        return "ok"

    return check


_QFORMER_ARGS = ("self", "hidden_states", "attention_mask", "encoder_hidden_states",
                 "encoder_attention_mask")  # fmt: skip
_check_perceiver_class = _forward_takes("self", "context", "latents", exact=True)
_check_qformer_class = _forward_takes(*_QFORMER_ARGS)
_check_output_class = _forward_takes("self", "hidden_states", "input_tensor", exact=True)
_check_encoder_class = _forward_takes(*_QFORMER_ARGS, "query_length")
_check_idefics2_perceiver_class = _forward_takes("self", "latents", "context", "attention_mask")


def _check_class(cls, arch: Architecture) -> str:
    names = list(inspect.signature(cls.forward).parameters)
    expected = ["self", "hidden_states", "attention_mask", "image_hidden_states",
                "image_attention_mask", "cross_attention_gate"]  # fmt: skip
    if names[: len(expected)] != expected:
        raise UnsupportedLayoutError(f"{cls.__qualname__}.forward takes {names}, expected "
                                     f"{expected} first")  # fmt: skip
    return "ok"


IDEFICS_REPLACEMENTS = (
    SetMethod("gated_cross_attention", "gated_cross_attention", "forward", _gated_forward,
              _check_class),
)  # fmt: skip
# the encoder's keyword to its layers: (the states projected, their version counter (see
# _version), {cross module: (K, V)})
QFORMER_KV = "vlmkernels_qformer_kv"


def _version(states: torch.Tensor) -> int | None:
    """The version counter of the image features the encoder projected (an in-place change
    since, by a hook between the layers, makes the stacked K / V stale); None while
    torch.compile traces and for an inference tensor, which have none to read."""
    return None if tracing() or states.is_inference() else states._version


# what stacked_kv reads (a Linear without bias: zeros in its place)
_KV_PARTS = {"key": (torch.nn.Linear, None), "value": (torch.nn.Linear, None)}


def _stackable(layer, module: str):
    """The cross-attention module of Q-Former ``layer`` whose K / V the encoder may project
    in its one GEMM, or None where the layer must project its own: the layer and its
    ``crossattention`` block are still the library's classes (not a ``CheckpointWrapper``,
    whose reentrant recompute would back-propagate through K / V projected outside it a
    second time, nor FSDP2's ``fully_shard`` subclass, whose weights are sharded until its
    own pre-forward hook gathers them) with no forward of their own; the attention runs
    patched; none of the three has backward hooks (a full backward hook reports the
    gradient of the features the module was handed, which the stacked K / V bypass);
    its key / value layers are unchanged nn.Linear with plain weights. Forward hooks leave
    the stacked K / V usable (transformers' output recorders hook every layer for good once
    ``output_hidden_states`` is asked for): features a pre-hook replaces are not the ones
    the K / V were projected from, and the attention then projects its own."""
    if not layer.has_cross_attention:
        return None
    block = layer._modules.get("crossattention")
    attention = block._modules.get("attention") if block is not None else None
    for m in (layer, block, attention):  # a wrapper holds no crossattention: None fails here
        if type(m).__module__ != module or m._backward_hooks or m._backward_pre_hooks:
            return None
    if "forward" in layer.__dict__ or "forward" in block.__dict__:
        return None
    if not is_patched(attention.__dict__.get("forward")):
        return None
    if changed_part(attention, _KV_PARTS) is not None:
        return None
    tensors = (attention.key.weight, attention.key.bias, attention.value.weight,
               attention.value.bias)  # fmt: skip
    if any(not_plain("key / value", t) for t in tensors):
        return None
    return attention


def _qformer_encoder_forward(module, arch: Architecture):
    """The instance ``forward`` of a Q-Former encoder (part ``qformer``): the K / V
    projections of the image features for every cross-attention layer whose attention
    runs patched, from one GEMM (:func:`stacked_kv`), handed to the layers through their
    keyword arguments; then the class's own forward."""
    layers = getattr(module, "layer", None)
    if layers is None or not all(hasattr(layer, "has_cross_attention") for layer in layers):
        raise UnsupportedLayoutError(f"{type(module).__qualname__} has no layer list with "
                                     "has_cross_attention")  # fmt: skip

    # fmt: off
    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, query_length=0, **kwargs):
        # fmt: on
        # under gradient checkpointing each layer projects its own K / V inside its
        # checkpoint: stacked outside, they would stay alive across every layer (the memory
        # checkpointing saves) and a reentrant recompute would back-propagate through them
        # twice (transformers sets gradient_checkpointing on the encoder or its layers)
        checkpointed = torch.is_grad_enabled() and any(
            m.training and getattr(m, "gradient_checkpointing", False)
            for m in (self, *self.layer))  # fmt: skip
        if encoder_hidden_states is not None and query_length > 0 and not checkpointed:
            cross = [_stackable(layer, arch.module) for layer in self.layer]
            cross = [a for a in cross if a is not None]
            linears = [lin for a in cross for lin in (a.key, a.value)]
            width = encoder_hidden_states.shape[-1]
            # (features of another width: each layer projects its own, for transformers' error)
            if cross and all(lin.weight.shape[-1] == width for lin in linears):
                out = stacked_kv(encoder_hidden_states, linears)
                kv = {a: (out[2 * i], out[2 * i + 1]) for i, a in enumerate(cross)}
                kwargs[QFORMER_KV] = (encoder_hidden_states, _version(encoder_hidden_states), kv)
        return type(self).forward(self, hidden_states, attention_mask, encoder_hidden_states,
                                  encoder_attention_mask, query_length, **kwargs)  # fmt: skip

    forward.__name__ = forward.__qualname__ = "forward"
    forward.__doc__ = "vlmkernels' Q-Former encoder forward (one K/V GEMM for every layer)."
    return forward


def _qformer_output_forward(module, arch: Architecture):
    """The instance ``forward`` of a Q-Former output block (``SelfOutput`` / ``Output``):
    LayerNorm(dense(h) + residual) with the dense bias, the residual and the LayerNorm in
    one kernel (:func:`add_layernorm_unchecked`: a Linear's output, its residual and a
    LayerNorm's parameters need no checks); with hidden dropout in training mode, the bias is
    added before the dropout as transformers does, and a module other than ``nn.Dropout``
    in the dropout's place is called as it is."""
    where = type(module).__qualname__
    exact_layer(getattr(module, "dense", None), torch.nn.Linear, f"{where}.dense")
    norm = exact_layer(getattr(module, "LayerNorm", None), torch.nn.LayerNorm,
                       f"{where}.LayerNorm")  # fmt: skip
    if norm.weight is None or norm.bias is None or len(norm.normalized_shape) != 1:
        raise UnsupportedLayoutError(f"{where}.LayerNorm is not an affine LayerNorm over "
                                     "the last dim")  # fmt: skip

    def forward(self, hidden_states, input_tensor):
        dense, norm, drop = self.dense, self.LayerNorm, self.dropout
        if type(drop) is torch.nn.Dropout and not (drop.training and drop.p > 0):
            x, bias = F.linear(hidden_states, dense.weight), dense.bias  # dropout: identity
        else:  # active (in the nn.Dropout's own mode), or another module the model put there
            x, bias = drop(dense(hidden_states)), None
        if input_tensor.dtype != x.dtype:  # autocast: the sum promotes, as in transformers
            kind = torch.promote_types(x.dtype, input_tensor.dtype)
            x, input_tensor = x.to(kind), input_tensor.to(kind)
        if input_tensor.shape != x.shape:  # queries of batch 1 for every image: broadcast
            input_tensor = input_tensor.expand(x.shape)
        return add_layernorm_unchecked(x, input_tensor, norm.weight, norm.bias, bias, norm.eps)

    forward.__name__ = forward.__qualname__ = "forward"
    forward.__doc__ = "vlmkernels' Q-Former output block (fused bias + residual + LayerNorm)."
    # dropout: an identity the fused forward skips (a hook on it, or another module put in
    # after patching, runs the class's forward)
    return fused_forward(module, ("dense", "LayerNorm", "dropout"), forward)


QFORMER_REPLACEMENTS = (
    SetMethod("qformer_attention", "qformer_attention", "forward", _qformer_forward,
              _check_qformer_class),
    SetMethod("qformer", "qformer_encoder", "forward", _qformer_encoder_forward,
              _check_encoder_class),
    SetMethod("qformer", "qformer_self_output", "forward", _qformer_output_forward,
              _check_output_class),
    SetMethod("qformer", "qformer_output", "forward", _qformer_output_forward,
              _check_output_class),
)  # fmt: skip

# one patcher per group: a patcher applies all its parts to any architecture it matches
IDEFICS_PATCHER = register(
    Patcher("transformers", TESTED_VERSIONS, IDEFICS_ARCHITECTURES, IDEFICS_REPLACEMENTS)
)
PERCEIVER_REPLACEMENTS = (
    SetMethod("perceiver_attention", "perceiver_attention", "forward", _perceiver_forward,
              _check_perceiver_class),
)  # fmt: skip
PERCEIVER_PATCHER = register(
    Patcher("transformers", TESTED_VERSIONS, PERCEIVER_ARCHITECTURES, PERCEIVER_REPLACEMENTS)
)
# tests/test_qformer.py and test_attention_patch's Q-Former tests pass on the same releases
QFORMER_TESTED = TESTED_VERSIONS
QFORMER_PATCHER = register(
    Patcher("transformers", QFORMER_TESTED, QFORMER_ARCHITECTURES, QFORMER_REPLACEMENTS)
)

# Idefics2's perceiver resampler attention (part ``perceiver_attention`` too): the latents
# attend to [context, latents] with grouped-query heads (num_key_value_heads < heads), the
# resampler's padding mask as key padding, attention dropout in the kernel in training;
# refused: a cache.
IDEFICS2_PERCEIVER_ARCHITECTURES = (
    Architecture(
        key="idefics2_perceiver",
        module="transformers.models.idefics2.modeling_idefics2",
        classes={"idefics2_perceiver_attention": "Idefics2PerceiverAttention"},
        roots={"Idefics2PerceiverResampler": ("perceiver_attention",),
               "Idefics2PerceiverAttention": ("perceiver_attention",)},
        anywhere=True,
    ),
)  # fmt: skip
_IDEFICS2 = ("q_proj", "k_proj", "v_proj", "o_proj", "num_heads", "num_key_value_heads",
             "head_dim", "scaling", "attention_dropout")  # fmt: skip


def _idefics2_perceiver_forward(module, arch: Architecture):
    """The instance ``forward`` of one ``Idefics2PerceiverAttention``: one few-query
    grouped-query cross-attention of the latents over [context, latents]."""
    missing = [n for n in _IDEFICS2 if not hasattr(module, n)]
    if missing:
        raise UnsupportedLayoutError(f"{type(module).__qualname__} has no {', '.join(missing)}")

    # fmt: off
    def forward(self, latents, context, attention_mask=None, position_ids=None, cache=None,
                **kwargs):
        # fmt: on
        where = "vlmkernels (Idefics2 perceiver attention)"
        cache = getattr(self, "cache", cache)
        if cache is not None or kwargs.get("past_key_values") is not None:
            raise RuntimeError(f"{where}: a key/value cache is not supported; undo the patch")
        drop = float(self.attention_dropout) if self.training else 0.0
        b, t = latents.shape[:2]
        both = torch.cat([context, latents], dim=-2)
        n, d = both.shape[1], self.head_dim
        q = self.q_proj(latents).view(b, t, self.num_heads, d).transpose(1, 2)
        k, v = (p(both).view(b, n, self.num_key_value_heads, d).transpose(1, 2)
                for p in (self.k_proj, self.v_proj))  # fmt: skip
        pad, bias = key_mask(attention_mask, b, t, n, where)
        out = cross_attention(q, k, v, key_padding_mask=pad, key_bias=bias,
                              scale=float(self.scaling), dropout_p=drop)  # fmt: skip
        # the width named: reshape cannot infer it for an empty batch (transformers names it)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * d)), None

    forward.__name__ = forward.__qualname__ = "forward"
    forward.__doc__ = "vlmkernels' Idefics2PerceiverAttention.forward (grouped-query attention)."
    return forward


IDEFICS2_PERCEIVER_PATCHER = register(
    Patcher("transformers", TESTED_VERSIONS, IDEFICS2_PERCEIVER_ARCHITECTURES,
            (SetMethod("perceiver_attention", "idefics2_perceiver_attention", "forward",
                       _idefics2_perceiver_forward, _check_idefics2_perceiver_class),))
)  # fmt: skip

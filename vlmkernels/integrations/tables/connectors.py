"""The connector family's tables of the transformers integration: the vision-to-language
connectors run on :mod:`vlmkernels.ops.connectors`, recognised anywhere in a module tree,
with their own parameters (same state_dict keys; outputs and gradients match).

Part ``connector`` (a keyword of :func:`vlmkernels.patch`), every module of these classes
gets an instance ``forward``:

- ``LlavaMultiModalProjector``, ``LlavaNextMultiModalProjector``,
  ``LlavaOnevisionMultiModalProjector``, and the same code as LLaVA-NeXT-Video's,
  Video-LLaVA's, FastVLM's projectors and Inkling2's ``Inkling2VisionMerger``:
  :func:`~vlmkernels.ops.connectors.mlp_projector` (Linear + exact GELU + Linear);
- ``Idefics3Connector``, ``SmolVLMConnector``: pixel shuffle + Linear (no bias) as one
  :func:`~vlmkernels.ops.connectors.merger` (layout "grid": the shuffled copy is never made);
- ``PerceptionLMMultiModalProjector``: :func:`~vlmkernels.ops.connectors.mlp_projector`,
  with its 2 x 2 adaptive mean (``projector_pooling_ratio=2``) pooled before the second
  linear (``pool="avg2x2"``; without pooling, the projector alone; other ratios and odd
  grids run the class's forward);
- ``VipLlavaMultiModalProjector``, ``GraniteDoclingDeepStackMerger``: LayerNorm + Linear +
  GELU + Linear over VipLLaVA's concatenated feature layers, Granite-Docling's shuffled
  DeepStack features, in one merger;
- ``Lfm2VlMultiModalProjector``: its pixel unshuffle, optional LayerNorm, Linear + GELU +
  Linear as one merger (layout "grid": the unshuffled copy is never made);
- ``Lfm3VlMultiModalProjector``, ``Kimi_K25MultimodalProjection``: LayerNorm on each
  token, s^2 consecutive tokens one row (2 x 2 in the released configs; a count that is
  not a square is refused), Linear + GELU + Linear: the Qwen2-VL merger under other names,
  one merger;
- ``InternVLMultiModalProjector``: LayerNorm + Linear + GELU + Linear in one merger; and
  ``InternVLModel``'s ``get_image_features`` / ``pixel_shuffle``: inside the former, the
  latter hands the (B, S, S, C) features on unshuffled (a view; InternVL's own shuffle makes
  two permuted copies) and the projector's first GEMM reads them through the pixel-shuffle
  addressing, the LayerNorm of each shuffled row in its prologue (layout "grid"); a direct
  ``pixel_shuffle`` call is InternVL's own. Qianfan-OCR's projector (InternVL's code; its
  model shuffles the features itself) runs the same merger on the shuffled features;
- ``MiniCPMV4_6Merger`` (and MiniCPM-V 4.7's, MiniCPM-o OCR's ``MiniCPMOcrMerger``): each
  round's 2 x 2 space-to-depth, LayerNorm, Linear, GELU, Linear as one merger on the
  (H, W) grid of each image (images of one size in one batch), varlen ``target_sizes``;
- ``PatchMerger`` (Qwen2-VL, LayerNorm per patch), ``Qwen2_5_VLPatchMerger`` (RMSNorm per
  patch), ``Qwen3VLVisionPatchMerger`` (LayerNorm per patch, or per merged row with
  ``use_postshuffle_norm``; Qwen3-VL-MoE's too, and Qwen3.5's and Qwen3.5-MoE's
  ``Qwen3_5VisionPatchMerger`` / ``Qwen3_5MoeVisionPatchMerger``, the same code), and the
  same code under other names (EXAONE 4.5's and Qwen2.5-Omni's, Qwen2.5-VL's;
  dots3.note's, Qwen2-VL's; LLaVA-OneVision-1.5's, Cohere Compass's and Qwen4-Exp's,
  Qwen3-VL's; Cosmos3-Edge's and Qwen3-Omni-MoE's, the same forward): the merger with the
  norm in the GEMM's prologue (or, post-shuffle, on each merged row).

Part ``deepstack``: ``Qwen3VLTextModel._deepstack_process`` (and the MoE one's, and the
same method of Cohere Compass's, Granite-Docling's and the Qwen3-Omni-MoE thinker's text
models) runs :func:`~vlmkernels.ops.connectors.deepstack_add` (one pass, no clone).

An activation other than exact GELU, or a module whose layers are not the expected
``nn.Linear`` / norms, is refused at patch time (:class:`UnsupportedLayoutError`). The fused
forwards read those layers' parameters; a layer replaced or hooked after patching (a PEFT
LoRA wrapper, say) makes the module run its class's forward, with a
:class:`~vlmkernels.integrations.patching.PatchFallbackWarning`.

Roots: the LLaVA, PerceptionLM, VipLLaVA, LFM2-VL, LFM3-VL, Kimi-K2.5, Idefics3, SmolVLM,
InternVL and MiniCPM-V models (``...ForConditionalGeneration``, ``...Model``) and the
connector modules themselves; for the Qwen-VL models (whose roots the rotary table owns,
Qwen3.5's and Qwen3.5-MoE's too) any model holding their merger modules (or Qwen3-VL's text
model): the full models, the vision towers, the mergers themselves, a foreign model.
"""

from __future__ import annotations

import inspect
import sys
import threading
import weakref

import torch
from torch import nn
from torch.nn import functional as F

from ...core.checks import isqrt
from ...ops.connectors import deepstack_add, merger, mlp_projector
from ..patching import (
    Architecture,
    Patcher,
    SetMethod,
    UnsupportedLayoutError,
    changed_part,
    class_forward,
    exact_layer,
    fused_forward,
    has_hooks,
    promoted_norm,
    register,
)
from .connector_layouts import shuffle_view_problem

__all__ = ["DEEPSTACK_PATCHER", "INTERNVL_PATCHER", "INTERNVL_SHUFFLE_PATCHER", "LFM2_VL_PATCHER",
           "LLAVA_PATCHER", "MINICPM_MERGER_PATCHER", "NORM_MLP_PATCHERS",
           "PERCEPTION_LM_PATCHER", "QWEN_MERGER_PATCHER", "SHUFFLE_PATCHER", "TESTED_VERSIONS",
           "TOKEN_MERGE_PATCHERS"]  # fmt: skip

# MiniCPM-V 4.7 is in transformers from 5.18, MiniCPM-OCR from 5.21 (absent: skipped, reported)
TESTED_VERSIONS = ("5.16.1", "5.17.0", "5.18.0", "5.19.0", "5.20.2", "5.21.1", "5.22.2", "5.23.0",
                   "5.24.0", "5.25.0")  # fmt: skip


def _module(key: str) -> str:
    return f"transformers.models.{key}.modeling_{key}"


def _arch(key, prefix, role, cls, part="connector", models=True, data=None, roots=()):
    """The architecture of one connector class; ``roots``: more root classes than the
    module's ``...ForConditionalGeneration`` and ``...Model`` (with ``models``)."""
    found = {name: (part,) for name in (cls, *roots)}
    if models:
        found |= {f"{prefix}ForConditionalGeneration": (part,), f"{prefix}Model": (part,)}
    return Architecture(key=f"{key}.{part}", module=_module(key), classes={role: cls},
                        roots=found, anywhere=True, data=data or {})  # fmt: skip


def _linear(module, name: str, where: str) -> nn.Linear:
    return exact_layer(getattr(module, name, None), nn.Linear, f"{where}.{name}")


def _exact_gelu(act, where: str) -> None:
    if isinstance(act, nn.GELU) and act.approximate == "none":
        return
    inner = getattr(act, "act", None)
    if type(act).__name__ == "GELUActivation" and (
        inner is F.gelu or getattr(inner, "__func__", None) is type(act)._gelu_python
    ):
        return
    raise UnsupportedLayoutError(f"{where}: the activation {act!r} is not exact GELU")


def _where(module) -> str:
    return type(module).__qualname__


def _one_input(module, fused):
    """``fused(self, x)`` as a forward that takes ``x`` positionally or by the name the
    class's forward gives it (VipLLaVA's and Kimi-K2.5's ``hidden_states``, Granite-Docling's
    and LFM3-VL's ``image_features``, Qwen3-Omni-MoE's ``hidden``), with that signature;
    any other call runs the class's forward, which raises as transformers does. (Named
    ``forward``: a pickle of the patched method holds the module's attribute of its name.)"""
    cls = type(module)
    params = list(inspect.signature(cls.forward).parameters)  # (self, the input's name)
    name = params[1] if len(params) > 1 else None

    def forward(self, *args, **kwargs):
        if len(args) == 1 and not kwargs:
            return fused(self, args[0])
        if not args and len(kwargs) == 1 and name in kwargs:
            return fused(self, kwargs[name])
        return cls.forward(self, *args, **kwargs)

    return forward


def _check_mlp(module, fc1="linear_1", act="act", fc2="linear_2", where=None) -> None:
    """``module.<fc1>`` and ``module.<fc2>`` ``nn.Linear``, ``module.<act>`` exact GELU: the
    Linear + GELU + Linear the fused forwards compute (``where``: the label of the refusals,
    by default the module's class)."""
    where = where or _where(module)
    _linear(module, fc1, where), _linear(module, fc2, where)
    _exact_gelu(getattr(module, act), where)


# --------------------------------------------------------------------------------------
# LLaVA projectors
# --------------------------------------------------------------------------------------


def _llava_forward(module, arch):
    _check_mlp(module)

    def forward(self, image_features):
        l1, l2 = self.linear_1, self.linear_2
        return mlp_projector(image_features, l1.weight, l1.bias, l2.weight, l2.bias)

    return fused_forward(module, ("linear_1", "act", "linear_2"), forward)


# (model key, prefix of its model classes, projector class); after the first three, LLaVA's
# projector under other names (FastVLM's and Inkling2's with their layers sized from other
# config fields)
_LLAVA = (("llava", "Llava", "LlavaMultiModalProjector"),
          ("llava_next", "LlavaNext", "LlavaNextMultiModalProjector"),
          ("llava_onevision", "LlavaOnevision", "LlavaOnevisionMultiModalProjector"),
          ("llava_next_video", "LlavaNextVideo", "LlavaNextVideoMultiModalProjector"),
          ("video_llava", "VideoLlava", "VideoLlavaMultiModalProjector"),
          ("fast_vlm", "FastVlm", "FastVlmMultiModalProjector"),
          ("inkling2", "Inkling2", "Inkling2VisionMerger"))  # fmt: skip

LLAVA_PATCHER = register(
    Patcher(
        "transformers",
        TESTED_VERSIONS,
        tuple(_arch(key, prefix, "projector", cls) for key, prefix, cls in _LLAVA),
        (SetMethod("connector", "projector", "forward", _llava_forward),),
    )
)


def _perception_lm_forward(module, arch):
    """PerceptionLM's projector: Linear + GELU + Linear, then its ``pooling`` (an
    ``nn.Identity``, or the adaptive 2-D mean of each sample's square token grid to
    (h / r, h / r)): one :func:`mlp_projector`, pooled before the second linear where the
    pooling is a 2 x 2 mean (r = 2, h even); any other grid or ratio runs the class's
    forward (the adaptive mean of uneven bins is not one of the fused poolings)."""
    where = _where(module)
    _check_mlp(module, act="gelu")
    pooling_cls = Patcher.cls(sys.modules[arch.module], "PerceptionLMAdaptiveAvgPooling")
    if type(module.pooling) not in (nn.Identity, pooling_cls):
        raise UnsupportedLayoutError(f"{where}.pooling is {type(module.pooling).__qualname__}")

    def forward(self, features):
        l1, l2, pooling = self.linear_1, self.linear_2, self.pooling
        ratio = 1 if isinstance(pooling, nn.Identity) else pooling.pooling_ratio
        if ratio == 1 or features.dim() != 3:
            y = mlp_projector(features, l1.weight, l1.bias, l2.weight, l2.bias)
            return y if ratio == 1 else pooling(y)
        n = features.shape[1]
        h = isqrt(n)
        if h * h != n:
            raise ValueError(f"num_tokens {n} is expected to be a square number")
        if ratio != 2 or h % 2:
            why = f"pooling ratio {ratio} of a {h} x {h} grid is not a 2 x 2 mean"
            return class_forward(self, why, features)
        return mlp_projector(features, l1.weight, l1.bias, l2.weight, l2.bias, pool="avg2x2",
                             grid=(h, h))  # fmt: skip

    return fused_forward(module, ("linear_1", "gelu", "linear_2", "pooling"), forward)


PERCEPTION_LM_PATCHER = register(
    Patcher(
        "transformers",
        TESTED_VERSIONS,
        (_arch("perception_lm", "PerceptionLM", "projector", "PerceptionLMMultiModalProjector"),),
        (SetMethod("connector", "projector", "forward", _perception_lm_forward),),
    )
)


# --------------------------------------------------------------------------------------
# Pixel-shuffle connectors (Idefics3, SmolVLM) and InternVL's projector
# --------------------------------------------------------------------------------------


def _shuffle_forward(module, arch):
    where = _where(module)
    _linear(module.modality_projection, "proj", f"{where}.modality_projection")
    scale = module.scale_factor
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise UnsupportedLayoutError(f"{where}.scale_factor is {scale!r}, not an int >= 1")

    def forward(self, image_hidden_states):
        if image_hidden_states.dim() != 3:  # (B, S * S, C); the class's pixel_shuffle raises
            why = f"{image_hidden_states.dim()}-D features, not (B, S * S, C)"
            return class_forward(self, why, image_hidden_states)
        if why := shuffle_view_problem(image_hidden_states, self.scale_factor):
            return class_forward(self, why, image_hidden_states)
        proj = self.modality_projection.proj
        return merger(image_hidden_states, proj.weight, proj.bias,
                      merge_size=self.scale_factor, layout="grid")  # fmt: skip

    return fused_forward(module, ("modality_projection", "modality_projection.proj"), forward)


SHUFFLE_PATCHER = register(
    Patcher(
        "transformers",
        TESTED_VERSIONS,
        (
            _arch("idefics3", "Idefics3", "shuffle_connector", "Idefics3Connector"),
            _arch("smolvlm", "SmolVLM", "shuffle_connector", "SmolVLMConnector"),
        ),
        (
            SetMethod(
                "connector",
                "shuffle_connector",
                "forward",
                _shuffle_forward,
                bypasses=("pixel_shuffle",),
            ),
        ),  # fmt: skip
    )
)


def _check_layer_norm(module, name: str, where: str) -> None:
    """``module.<name>`` an ``nn.LayerNorm`` with a 1-D weight (the merger's LayerNorm takes
    a weight: one made without elementwise affine is refused)."""
    norm = exact_layer(getattr(module, name, None), nn.LayerNorm, f"{where}.{name}")
    if len(norm.normalized_shape) != 1 or norm.weight is None:
        raise UnsupportedLayoutError(f"{where}.{name}: a LayerNorm without a 1-D weight")


def _check_norm_mlp(module, norm_name: str) -> None:
    """``module.<norm_name>`` a 1-D ``nn.LayerNorm``, ``linear_1`` / ``linear_2``
    ``nn.Linear`` and ``act`` exact GELU: LayerNorm + Linear + GELU + Linear."""
    _check_mlp(module)
    _check_layer_norm(module, norm_name, _where(module))


def _norm_mlp_rows(x, ln, l1, l2):
    """LayerNorm + Linear + GELU + Linear over the last axis of ``x`` (..., C): one merger
    of merge size 1 on its rows."""
    y = merger(x.reshape(-1, x.shape[-1]), l1.weight, l1.bias, l2.weight, l2.bias,
               merge_size=1, norm="layernorm", norm_weight=ln.weight, norm_bias=ln.bias,
               eps=ln.eps)  # fmt: skip
    return y.view(*x.shape[:-1], y.shape[-1])


def _lfm2_vl_forward(module, arch):
    """LFM2-VL's projector: its ``pixel_unshuffle`` of the (B, W, H, C) features by
    ``factor``, the optional LayerNorm of each merged row, Linear + GELU + Linear: one
    merger of layout "grid" (the unshuffled copy is never made)."""
    where = _where(module)
    f = module.factor
    if isinstance(f, bool) or not isinstance(f, int) or f < 1:
        raise UnsupportedLayoutError(f"{where}.factor is {f!r}, not an int >= 1")
    norm = "layer_norm" if module.use_layer_norm else None
    if norm is not None:
        _check_norm_mlp(module, norm)
    else:
        _check_mlp(module)

    def forward(self, image_features):
        if bool(self.use_layer_norm) != (norm is not None):  # the flag flipped since patching
            why = f"use_layer_norm is now {self.use_layer_norm!r}, patched with {norm is not None}"
            return class_forward(self, why, image_features)
        # (a layer_norm the flag leaves off is not read, as the class's forward does not)
        ln, l1, l2 = self.layer_norm if norm else None, self.linear_1, self.linear_2
        return merger(image_features, l1.weight, l1.bias, l2.weight, l2.bias,
                      merge_size=(self.factor, self.factor), layout="grid",
                      norm=norm and "layernorm", norm_weight=ln and ln.weight,
                      norm_bias=ln and ln.bias, eps=ln.eps if ln else 1e-6,
                      norm_before_merge=False)  # fmt: skip

    return fused_forward(module, (*(norm,) * (norm is not None), "linear_1", "act", "linear_2"),
                         forward)  # fmt: skip


LFM2_VL_PATCHER = register(
    Patcher(
        "transformers",
        TESTED_VERSIONS,
        (_arch("lfm2_vl", "Lfm2Vl", "projector", "Lfm2VlMultiModalProjector"),),
        (SetMethod("connector", "projector", "forward", _lfm2_vl_forward,
                   bypasses=("pixel_unshuffle",)),),
    )
)  # fmt: skip


def _internvl_forward(module, arch):
    _check_norm_mlp(module, "layer_norm")

    def forward(self, image_features):
        ln, l1, l2 = self.layer_norm, self.linear_1, self.linear_2
        scale = _deferred_scale(image_features, ln.normalized_shape[0])
        if scale is not None:  # the unshuffled (B, S * S, C) grid: the shuffle is addressing
            return merger(image_features, l1.weight, l1.bias, l2.weight, l2.bias,
                          merge_size=scale, layout="grid", norm="layernorm",
                          norm_weight=ln.weight, norm_bias=ln.bias, eps=ln.eps,
                          norm_before_merge=False)  # fmt: skip
        return _norm_mlp_rows(image_features, ln, l1, l2)

    forward.takes_unshuffled = True
    # (a changed layer: the class's forward, to which pixel_shuffle hands shuffled features)
    return fused_forward(module, ("layer_norm", "linear_1", "act", "linear_2"), forward)


def _norm_mlp_forward(norm_name: str):
    """The forward builder of a module whose forward is ``norm_name`` (a 1-D LayerNorm),
    ``linear_1``, ``act`` (exact GELU), ``linear_2`` on the last axis: one merger."""

    def build(module, arch):
        _check_norm_mlp(module, norm_name)

        def forward(self, x):
            ln, l1, l2 = self.get_submodule(norm_name), self.linear_1, self.linear_2
            return _norm_mlp_rows(x, ln, l1, l2)

        return fused_forward(module, (norm_name, "linear_1", "act", "linear_2"),
                             _one_input(module, forward))  # fmt: skip

    return build


# VipLLaVA's projector on its feature layers side by side (five by default);
# Granite-Docling's DeepStack mergers on the features its connector shuffled
NORM_MLP_PATCHERS = tuple(
    register(Patcher("transformers", TESTED_VERSIONS, (_arch(key, prefix, "projector", cls),),
                     (SetMethod("connector", "projector", "forward", _norm_mlp_forward(norm)),)))
    for key, prefix, cls, norm in (
        ("vipllava", "VipLlava", "VipLlavaMultiModalProjector", "projector_layernorm"),
        ("granite_docling", "GraniteDocling", "GraniteDoclingDeepStackMerger", "layer_norm"),
    )
)  # fmt: skip


def _deferred_scale(features, k: int) -> int | None:
    """s where ``features`` is an unshuffled (B, S * S, C) grid with s^2 C = k (what the
    patched ``InternVLModel.pixel_shuffle`` hands on), else None (already shuffled)."""
    c = features.shape[-1]
    if features.dim() != 3 or c == k or c == 0 or k % c:
        return None
    s, side = isqrt(k // c), isqrt(features.shape[1])
    if s < 2 or s * s * c != k or side * side != features.shape[1] or side % s:
        return None
    return s


INTERNVL_PATCHER = register(
    Patcher(
        "transformers",
        TESTED_VERSIONS,
        (
            _arch("internvl", "InternVL", "internvl_projector", "InternVLMultiModalProjector"),
            # InternVL's projector; the model shuffles the features itself
            _arch(
                "qianfan_ocr", "QianfanOCR", "internvl_projector", "QianfanOCRMultiModalProjector"
            ),
        ),  # fmt: skip
        (SetMethod("connector", "internvl_projector", "forward", _internvl_forward),),
    )
)


# the calls of get_image_features in progress, per patched InternVLModel and thread (a
# thread-local depth: threads sharing a model do not see each other's calls): built with
# its get_image_features, taken by its pixel_shuffle (the two slots of one module share it)
_SCOPES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _check_internvl_model(module, where: str) -> None:
    cls = type(module)
    for method in ("get_image_features", "pixel_shuffle"):
        if not callable(getattr(cls, method, None)):
            raise UnsupportedLayoutError(f"{where} has no {method}")
    projector = getattr(module, "multi_modal_projector", None)
    if not isinstance(projector, nn.Module):
        raise UnsupportedLayoutError(f"{where} has no multi_modal_projector module")


def _internvl_get_image_features(module, arch):
    """``InternVLModel.get_image_features`` (the class's, decorators and all) run inside a
    scope in which the patched :func:`_internvl_pixel_shuffle` defers the shuffle."""
    _check_internvl_model(module, _where(module))
    cls = type(module)
    scope = _SCOPES[module] = threading.local()

    def get_image_features(self, *args, **kwargs):
        scope.depth = getattr(scope, "depth", 0) + 1
        try:
            return cls.get_image_features(self, *args, **kwargs)
        finally:
            scope.depth -= 1

    return get_image_features


def _internvl_pixel_shuffle(module, arch):
    """``InternVLModel.pixel_shuffle``: inside ``get_image_features`` and with the patched
    projector, the (B, S, S, C) features are handed on as they are (no copy; the caller's
    reshape to (B, S * S, C) is a view) and the projector reads them through the pixel-
    shuffle addressing of its GEMM, the LayerNorm of each shuffled row in the prologue: the
    shuffled copy (InternVL's shuffle makes two permuted copies) is never made. Anywhere
    else (a direct call, a scale that is not 1 / s, an unpatched projector) the original."""
    where = _where(module)
    _check_internvl_model(module, where)
    scope = _SCOPES.get(module)
    if scope is None:
        raise UnsupportedLayoutError(f"{where}: pixel_shuffle is patched with get_image_features")
    cls = type(module)

    def pixel_shuffle(self, vision_features, scale_factor=0.5):
        s = _integer_inverse(scale_factor)
        projector = self.multi_modal_projector
        forward = projector.forward
        if (getattr(scope, "depth", 0) and s is not None and s >= 2 and vision_features.dim() == 4
                and vision_features.shape[1] == vision_features.shape[2]
                and vision_features.shape[1] % s == 0
                and getattr(forward, "takes_unshuffled", False)
                and not has_hooks(projector)  # they must see the shuffled input
                and changed_part(projector, forward.parts) is None):  # fmt: skip
            return vision_features
        return cls.pixel_shuffle(self, vision_features, scale_factor)

    return pixel_shuffle


def _integer_inverse(scale_factor) -> int | None:
    """s where ``scale_factor`` is 1 / s for an int s, else None."""
    try:
        s = round(1.0 / float(scale_factor))
    except (TypeError, ValueError, ZeroDivisionError, OverflowError):
        return None
    return s if s >= 1 and abs(s * float(scale_factor) - 1.0) < 1e-9 else None


INTERNVL_SHUFFLE_PATCHER = register(
    Patcher(
        "transformers",
        TESTED_VERSIONS,
        (
            Architecture(
                key="internvl.connector_shuffle",
                module=_module("internvl"),
                classes={"internvl_model": "InternVLModel"},
                roots={
                    "InternVLForConditionalGeneration": ("connector",),
                    "InternVLModel": ("connector",),
                },
                anywhere=True,
            ),
        ),  # fmt: skip
        (
            SetMethod(
                "connector", "internvl_model", "get_image_features", _internvl_get_image_features
            ),
            SetMethod("connector", "internvl_model", "pixel_shuffle", _internvl_pixel_shuffle),
        ),  # fmt: skip
    )
)


# --------------------------------------------------------------------------------------
# Qwen-VL patch mergers
# --------------------------------------------------------------------------------------


def _norm_kind(norm, where: str) -> str:
    """The kind of a merger's norm module, "layernorm" or "rmsnorm" (its class, which the
    fused forward's guard keeps; eps and bias are read on every call)."""
    if isinstance(norm, nn.LayerNorm):
        exact_layer(norm, nn.LayerNorm, where)
        if len(norm.normalized_shape) != 1 or norm.weight is None:
            raise UnsupportedLayoutError(f"{where}: a LayerNorm without a 1-D weight")
        return "layernorm"
    if type(norm).__name__.endswith("RMSNorm") and hasattr(norm, "variance_epsilon"):
        return "rmsnorm"
    raise UnsupportedLayoutError(f"{where}: unknown norm {type(norm).__name__}")


def _norm_bias_eps(norm, kind: str):
    """(bias or None, eps) of a merger's norm as it is now."""
    if kind == "layernorm":
        return norm.bias, norm.eps
    return None, norm.variance_epsilon


def _qwen_merger_forward(module, arch):
    where = _where(module)
    if hasattr(module, "ln_q"):  # Qwen2-VL, Qwen2.5-VL: mlp = [Linear, GELU, Linear]
        # (Qwen3-Omni-MoE's: a ModuleList, and the norm per merged row with
        # use_postshuffle_norm)
        norm_name = "ln_q"
        mlp = module.mlp
        if type(mlp) not in (nn.Sequential, nn.ModuleList) or len(mlp) != 3:
            raise UnsupportedLayoutError(f"{where}.mlp is not [Linear, GELU, Linear]")
        fc1, act, fc2 = ("mlp.0", "mlp.1", "mlp.2")
        calls = ("mlp",)  # the class forward calls the Sequential: its hooks count too
        _linear(mlp, "0", f"{where}.mlp"), _linear(mlp, "2", f"{where}.mlp")
        _exact_gelu(mlp[1], where)
    elif hasattr(module, "linear_fc1"):  # Qwen3-VL
        norm_name = "norm"
        fc1, act, fc2 = "linear_fc1", "act_fn", "linear_fc2"
        calls = ()
        _check_mlp(module, fc1, act, fc2)
    else:
        raise UnsupportedLayoutError(f"{where}: neither ln_q + mlp nor norm + linear_fc1/2")
    kind = _norm_kind(getattr(module, norm_name), where)
    flagged = hasattr(module, "use_postshuffle_norm")  # (Qwen2-VL's forward has no flag)
    if module.get_submodule(fc1).in_features != module.hidden_size:
        raise UnsupportedLayoutError(f"{where}: {fc1} does not take {module.hidden_size} features")

    def forward(self, x):
        norm = self.get_submodule(norm_name)
        l1, l2 = self.get_submodule(fc1), self.get_submodule(fc2)
        hidden = self.hidden_size
        # the flag as it is now (flipped after patching, with a norm of the new width put in)
        before = not (flagged and self.use_postshuffle_norm)
        c = norm.weight.shape[0] if before else x.shape[-1]
        if before and x.shape[-1] != c:  # the class's norm raises (Cosmos3-Edge's reshapes)
            return class_forward(self, f"{x.shape[-1]} features, a norm of {c}", x)
        s = isqrt(hidden // c) if c else 0
        if not before and s * s * c != hidden:
            # transformers views the features as (-1, hidden) rows whatever their width
            c, s = hidden, 1
        if s * s * c != hidden:
            raise ValueError(f"{where}: {hidden} merged features are not s^2 x {c}")
        if kind == "rmsnorm" and (why := promoted_norm(x, norm.weight, "RMSNorm")):
            return class_forward(self, why, x)
        norm_bias, eps = _norm_bias_eps(norm, kind)
        return merger(x.reshape(-1, c), l1.weight, l1.bias, l2.weight, l2.bias, merge_size=s,
                      norm=kind, norm_weight=norm.weight, norm_bias=norm_bias, eps=eps,
                      norm_before_merge=before)  # fmt: skip

    return fused_forward(module, (norm_name, *calls, fc1, act, fc2), _one_input(module, forward))


_QWEN = (("qwen2_vl", "PatchMerger"), ("qwen2_5_vl", "Qwen2_5_VLPatchMerger"),
         ("qwen3_vl", "Qwen3VLVisionPatchMerger"),
         ("qwen3_vl_moe", "Qwen3VLMoeVisionPatchMerger"),
         ("qwen3_5", "Qwen3_5VisionPatchMerger"),
         ("qwen3_5_moe", "Qwen3_5MoeVisionPatchMerger"),
         # the same code under other names: Qwen2.5-VL's (RMSNorm)
         ("exaone4_5", "Exaone4_5_PatchMerger"), ("qwen2_5_omni", "Qwen2_5OmniPatchMerger"),
         # Qwen2-VL's
         ("dots3_note", "Dots3NoteVisionMerger"),
         # Qwen3-VL's
         ("llava_onevision1_5", "LlavaOnevision15VisionPatchMerger"),
         ("cohere_compass", "CohereCompassVisionPatchMerger"),
         ("qwen4_exp", "Qwen4ExpVisionPatchMerger"),
         # the same forward: Cosmos3-Edge's (Qwen3-VL's, reshaped first), Qwen3-Omni-MoE's
         # (Qwen2-VL's names, a ModuleList MLP, Qwen3-VL's use_postshuffle_norm)
         ("cosmos3_edge", "Cosmos3EdgePatchMerger"),
         ("qwen3_omni_moe", "Qwen3OmniMoeVisionPatchMerger"))  # fmt: skip

QWEN_MERGER_PATCHER = register(
    Patcher(
        "transformers",
        TESTED_VERSIONS,
        tuple(_arch(key, "", "merger", cls, models=False) for key, cls in _QWEN),
        (SetMethod("connector", "merger", "forward", _qwen_merger_forward),),
    )
)


# --------------------------------------------------------------------------------------
# Token-merging projectors (LFM3-VL, Kimi-K2.5): the Qwen-VL merger under other names
# --------------------------------------------------------------------------------------


def _token_merge_forward(norm_name, fc1, fc2, merged_attr, batch_major):
    """The forward builder of a projector whose forward is ``norm`` on each token, groups of
    ``getattr(module, merged_attr) / C`` (= s^2) consecutive tokens viewed as one row, then
    ``fc1``, ``act`` (exact GELU), ``fc2``: Qwen2-VL's merger, one merger op. The result is
    (rows, N2), or (B, rows / B, N2) with ``batch_major`` (x (B, ..., C) viewed as
    (B, -1, s^2 C), Kimi-K2.5's)."""

    def build(module, arch):
        _check_mlp(module, fc1, "act", fc2)
        where = _where(module)
        norm = getattr(module, norm_name)
        if _norm_kind(norm, f"{where}.{norm_name}") != "layernorm":
            raise UnsupportedLayoutError(f"{where}.{norm_name} is not an nn.LayerNorm")
        merged, c = getattr(module, merged_attr), norm.normalized_shape[0]
        s = isqrt(merged // c)
        if s * s * c != merged or module.get_submodule(fc1).in_features != merged:
            raise UnsupportedLayoutError(
                f"{where}: {merged} merged features are not s^2 x {c} {fc1} inputs"
            )

        def forward(self, x):
            ln, l1, l2 = (
                self.get_submodule(norm_name),
                self.get_submodule(fc1),
                self.get_submodule(fc2),
            )
            y = merger(x.reshape(-1, x.shape[-1]), l1.weight, l1.bias, l2.weight, l2.bias,
                       merge_size=s, norm="layernorm", norm_weight=ln.weight, norm_bias=ln.bias,
                       eps=ln.eps)  # fmt: skip
            return y.view(x.shape[0], -1, y.shape[-1]) if batch_major else y

        return fused_forward(module, (norm_name, fc1, "act", fc2), _one_input(module, forward))

    return build


TOKEN_MERGE_PATCHERS = tuple(
    register(Patcher("transformers", TESTED_VERSIONS, (_arch(key, prefix, "projector", cls),),
                     (SetMethod("connector", "projector", "forward", build),)))
    for key, prefix, cls, build in (
        ("lfm3_vl", "Lfm3Vl", "Lfm3VlMultiModalProjector",
         _token_merge_forward("layer_norm", "linear_1", "linear_2", "merged_hidden_size",
                              batch_major=False)),
        ("kimi_k25", "Kimi_K25", "Kimi_K25MultimodalProjection",
         _token_merge_forward("pre_norm", "in_proj", "out_proj", "hidden_size",
                              batch_major=True)),
    )
)  # fmt: skip


# --------------------------------------------------------------------------------------
# MiniCPM-V 4.6 (and 4.7, MiniCPM-o OCR) merger
# --------------------------------------------------------------------------------------


def _minicpm_merger_forward(module, arch):
    where = _where(module)
    kernel = tuple(getattr(module, "merge_kernel_size", ()))
    if len(kernel) != 2 or not all(isinstance(k, int) and k >= 1 for k in kernel):
        raise UnsupportedLayoutError(f"{where}.merge_kernel_size is {kernel!r}, not (MH, MW)")
    mlps = getattr(module, "mlp", None)
    if not isinstance(mlps, nn.ModuleList) or len(mlps) != module.merger_times:
        raise UnsupportedLayoutError(f"{where}.mlp is not a ModuleList of merger_times MLPs")
    for i, mlp in enumerate(mlps):
        inner = f"{where}.mlp.{i}"
        _check_mlp(mlp, where=inner)
        _check_layer_norm(mlp, "pre_norm", inner)

    def forward(self, hidden_states, target_sizes):
        if self.merger_times != len(self.mlp):  # transformers runs merger_times rounds
            why = f"merger_times is {self.merger_times!r}, with {len(self.mlp)} MLPs"
            return class_forward(self, why, hidden_states, target_sizes)
        mh, mw = self.merge_kernel_size
        # (a tensor, as typed, or the list of (h, w) pairs transformers' loop also takes)
        rows = target_sizes.tolist() if isinstance(target_sizes, torch.Tensor) else target_sizes
        sizes = [tuple(int(v) for v in hw) for hw in rows]
        features, start, i = [], 0, 0
        while i < len(sizes):  # a run of images of one size is one batch
            j = i
            while j < len(sizes) and sizes[j] == sizes[i]:
                j += 1
            height, width = sizes[i]
            n = height * width
            x = hidden_states[0, start : start + (j - i) * n].unflatten(0, (j - i, height, width))
            for r, mlp in enumerate(self.mlp):
                if height % mh or width % mw:
                    raise ValueError(
                        f"Patch grid ({height}, {width}) must be divisible by merge kernel size "
                        f"{self.merge_kernel_size} at merge round {r}"
                    )
                ln, l1, l2 = mlp.pre_norm, mlp.linear_1, mlp.linear_2
                x = merger(x, l1.weight, l1.bias, l2.weight, l2.bias, merge_size=(mh, mw),
                           layout="grid", norm="layernorm", norm_weight=ln.weight,
                           norm_bias=ln.bias, eps=ln.eps, norm_before_merge=False)  # fmt: skip
                height, width = height // mh, width // mw
            features += [y.reshape(-1, y.shape[-1]) for y in x.unbind(0)]
            start += (j - i) * n
            i = j
        return features

    layers = (".pre_norm", ".linear_1", ".act", ".linear_2")
    # "mlp" too: transformers runs merger_times rounds, the fused forward every MLP held
    reads = ["mlp", *(f"mlp.{i}{part}" for i in range(len(mlps)) for part in ("", *layers))]
    return fused_forward(module, reads, forward)


MINICPM_MERGER_PATCHER = register(
    Patcher(
        "transformers",
        TESTED_VERSIONS,
        tuple(
            _arch(key, prefix, "minicpm_merger", f"{prefix}Merger")
            for key, prefix in (
                ("minicpmv4_6", "MiniCPMV4_6"),
                ("minicpmv4_7", "MiniCPMV4_7"),
                ("minicpm_ocr", "MiniCPMOcr"),
            )
        ),  # fmt: skip
        (SetMethod("connector", "minicpm_merger", "forward", _minicpm_merger_forward),),
    )
)


# --------------------------------------------------------------------------------------
# Qwen3-VL DeepStack
# --------------------------------------------------------------------------------------


def _deepstack_method(module, arch):
    def _deepstack_process(self, hidden_states, visual_pos_masks, visual_embeds):
        return deepstack_add(hidden_states, visual_pos_masks, visual_embeds)

    return _deepstack_process


def _check_deepstack(cls, arch):
    if not callable(getattr(cls, "_deepstack_process", None)):
        raise UnsupportedLayoutError(f"{cls.__qualname__} has no _deepstack_process")


DEEPSTACK_PATCHER = register(
    Patcher(
        "transformers",
        TESTED_VERSIONS,
        tuple(
            _arch(key, "", "text_model", cls, part="deepstack", models=False)
            for key, cls in (
                ("qwen3_vl", "Qwen3VLTextModel"),
                ("qwen3_vl_moe", "Qwen3VLMoeTextModel"),
                # the same method: Cohere Compass's, Granite-Docling's, Qwen3-Omni-MoE's
                # thinker's (its talker's is never handed DeepStack features: not patched)
                ("cohere_compass", "CohereCompassTextModel"),
                ("granite_docling", "GraniteDoclingTextModel"),
                ("qwen3_omni_moe", "Qwen3OmniMoeThinkerTextModel"),
            )
        ),  # fmt: skip
        (
            SetMethod(
                "deepstack",
                "text_model",
                "_deepstack_process",
                _deepstack_method,
                check=_check_deepstack,
            ),
        ),  # fmt: skip
    )
)

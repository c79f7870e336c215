r"""Flamingo's gated cross-attention block, compatible with open_flamingo's
(``open_flamingo/src/helpers.py``: ``GatedCrossAttentionBlock``, ``MaskedCrossAttention``):
the same constructor arguments, submodules, parameter names and ``state_dict`` keys
(``attn.norm``, ``attn.to_q``, ``attn.to_kv``, ``attn.to_out``, ``attn_gate``, ``ff.0``,
``ff.1``, ``ff.3``, ``ff_gate``), so a checkpoint loads into either, and the same forward:

    a = to_out(attention(to_q(LN(x)), to_kv(media)))        (heads of dim_head, scale
                                                             dim_head^-1/2, no biases)
    x = x + tanh(attn_gate) a                               (the gate applied in the
                                                             attention kernel's epilogue:
                                                             to_out is linear, no bias;
                                                             after to_out, as open_flamingo,
                                                             where hooks would see it, a
                                                             16-bit x would round the
                                                             residual, or fp16 underflow)
    x = x + tanh(ff_gate) W_2 GELU(W_1 LN'(x))

where the attention is :func:`vlmkernels.media_cross_attention` when ``media_locations``
is given (text_time = cumsum(media_locations); a token sees the latents of media text_time,
or of media 1..text_time without ``only_attend_immediate_media``), else plain
cross-attention over every latent of every media item. With ``use_cached_media=True``
(open_flamingo's decoding with a KV cache) every token of x comes after the whole prompt:
text_time is the number of media tokens in ``media_locations`` (B, T_prompt), the same for
every token, and the other media's keys are masked (``key_padding_mask``). Q, K and V are
strided views of the projections (no copies); on the Triton path the attention is
computed by segment and never builds the (T, T_img n) mask (the PyTorch path, a reference
for CPUs, does).

Where the results differ from open_flamingo's (rows its masked softmax answers with a
uniform average over every latent, an artefact of its -finfo.max fill): tokens before the
first media item get 0 in both modes (open_flamingo zeroes them only with immediate media);
with immediate media, tokens after more media tokens than there are media items get NaN.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.checks import check_bool, check_int, check_real
from ..core.hooks import global_hooks, has_hooks
from ..core.runtime import autocast_dtype
from ..ops.attention import cross_attention, media_cross_attention
from ..ops.attention.launchers import MAX_HEAD_DIM

__all__ = ["GatedCrossAttentionBlock", "MaskedCrossAttention"]


class MaskedCrossAttention(nn.Module):
    """open_flamingo's ``MaskedCrossAttention`` (see the module docstring).

    ``forward(x, media, media_locations=None, use_cached_media=False, *, gate=None)``: x
    (B, T, dim) text features, media (B, T_img, n, dim_visual) latents, media_locations
    (B, T) bool ((B, T_prompt) with ``use_cached_media``), gate an optional one-element tanh
    gate (the result is to_out(tanh(gate) attention) = tanh(gate) to_out(attention), the
    gate applied in the attention kernel's epilogue); returns (B, T, dim).
    """

    def __init__(self, *, dim, dim_visual, dim_head=64, heads=8,
                 only_attend_immediate_media=True):  # fmt: skip
        super().__init__()
        _check_sizes("MaskedCrossAttention", dim=dim, dim_visual=dim_visual,
                     dim_head=dim_head, heads=heads)  # fmt: skip
        check_bool("MaskedCrossAttention", "only_attend_immediate_media",
                   only_attend_immediate_media)  # fmt: skip
        self.scale = dim_head**-0.5
        self.heads = heads
        inner = dim_head * heads
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim_visual, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.only_attend_immediate_media = only_attend_immediate_media

    def forward(self, x: torch.Tensor, media: torch.Tensor, media_locations=None,
                use_cached_media: bool = False, *, gate=None):  # fmt: skip
        if gate is not None and not isinstance(gate, torch.Tensor):
            raise TypeError(f"MaskedCrossAttention: gate must be a one-element tensor, got "
                            f"{type(gate).__name__}")  # fmt: skip
        if gate is not None and gate.numel() != 1:
            raise ValueError(f"MaskedCrossAttention: gate must have one element (to_out mixes "
                             f"the channels), got shape {tuple(gate.shape)}")  # fmt: skip
        _check_input("x", x, 3, getattr(self.to_q, "in_features", None), "(B, T, dim={})")
        _check_input("media", media, 4, getattr(self.to_kv, "in_features", None),
                     "(B, T_img, n, dim_visual={})")  # fmt: skip
        b, t = x.shape[:2]
        if media.shape[0] != b:
            raise ValueError(f"MaskedCrossAttention: media's batch must be x's ({b}), got "
                             f"media of shape {tuple(media.shape)}")  # fmt: skip
        latents = media.shape[2]
        h = self.heads
        q = self.to_q(self.norm(x))
        kv = self.to_kv(media.flatten(1, 2))  # (B, T_img n, dim_visual), B = 0 included
        d = q.shape[-1] // h
        q = q.view(b, t, h, d).transpose(1, 2)
        kv = kv.view(b, kv.shape[1], 2, h, d)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
        if media_locations is None:
            out = cross_attention(q, k, v, scale=self.scale, gate=gate)
        elif check_bool("MaskedCrossAttention", "use_cached_media", use_cached_media):
            out = self._after_prompt(q, k, v, media_locations, media.shape[1], latents, gate)
        else:
            out = media_cross_attention(
                q, k, v, media_locations, latents,
                only_immediate=self.only_attend_immediate_media, scale=self.scale, gate=gate,
            )  # fmt: skip
        return self.to_out(out.transpose(1, 2).reshape(b, t, h * d))

    def _after_prompt(self, q, k, v, media_locations, t_img, latents, gate):
        """Every query after the prompt's c = count(media_locations) media tokens: it sees
        media c (or media 1..c), the other keys masked; 0 where c = 0, and NaN where c >
        T_img with immediate media (no media c, as :func:`media_cross_attention`)."""
        b = q.shape[0]
        m = media_locations
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool or m.dim() != 2 \
                or m.shape[0] != b:  # fmt: skip
            # a wrong type is a TypeError, as media_cross_attention's on the other path
            bad_type = not isinstance(m, torch.Tensor) or m.dtype != torch.bool
            raise (TypeError if bad_type else ValueError)(
                f"MaskedCrossAttention: media_locations must be a (B, T_prompt) bool tensor "
                f"with B = {b}, got {getattr(m, 'dtype', type(m).__name__)} "
                f"{tuple(getattr(m, 'shape', ()))}"
            )
        if m.device != q.device:
            raise ValueError(f"MaskedCrossAttention: media_locations must be on x's device "
                             f"{q.device}, got {m.device}")  # fmt: skip
        count = m.sum(1, keepdim=True)  # (B, 1): the text time of every query
        media_time = torch.arange(1, t_img + 1, device=q.device).repeat_interleave(latents)
        immediate = self.only_attend_immediate_media
        hidden = media_time != count if immediate else media_time > count  # (B, T_img n)
        out = cross_attention(q, k, v, key_padding_mask=hidden, scale=self.scale, gate=gate)
        if immediate:
            out = out.masked_fill((count > t_img).view(b, 1, 1, 1), float("nan"))
        return out


def _check_input(name: str, t, rank: int, width: int | None, layout: str) -> None:
    """``t`` a tensor of ``rank`` dims whose last is ``width`` (``layout`` formats it; None:
    a projection that does not say, such as a wrapper module, checks it when called)."""
    what = f"MaskedCrossAttention: {name} must be a {layout.format(width)} tensor, got"
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} {type(t).__name__}")
    if t.dim() != rank or (width is not None and t.shape[-1] != width):
        raise ValueError(f"{what} {tuple(t.shape)}")


def _check_sizes(op: str, **sizes) -> None:
    """Every size a positive int; ``dim_head`` at most the attention ops' largest head."""
    for name, value in sizes.items():
        check_int(op, name, value, 1)
    if sizes["dim_head"] > MAX_HEAD_DIM:
        raise ValueError(f"{op}: dim_head must be at most {MAX_HEAD_DIM} (the attention "
                         f"kernels' largest head), got {sizes['dim_head']}")  # fmt: skip


def _feed_forward(dim: int, mult: int) -> nn.Sequential:
    inner = int(dim * mult)
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, inner, bias=False),
        nn.GELU(),
        nn.Linear(inner, dim, bias=False),
    )


class GatedCrossAttentionBlock(nn.Module):
    """open_flamingo's ``GatedCrossAttentionBlock`` (see the module docstring): scalar
    gates ``attn_gate`` and ``ff_gate`` (shape (1,), initialised to 0).

    ``reset_parameters()`` sets the gates back to 0: the block's own parameters only, as
    ``nn.Linear``'s (the submodules have their own), the contract of deferred
    initialisation (a block built on the meta device, then ``to_empty`` and
    ``reset_parameters`` module by module, as FSDP's default ``param_init_fn`` does).

    ``forward(x, media, media_locations=None, use_cached_media=False)``: x (B, T, dim),
    media (B, T_img, n, dim_visual), media_locations (B, T) bool ((B, T_prompt) with
    ``use_cached_media``: x comes after the prompt); returns (B, T, dim).
    """

    def __init__(self, *, dim, dim_visual, dim_head=64, heads=8, ff_mult=4,
                 only_attend_immediate_media=True):  # fmt: skip
        super().__init__()
        self.attn = MaskedCrossAttention(
            dim=dim, dim_visual=dim_visual, dim_head=dim_head, heads=heads,
            only_attend_immediate_media=only_attend_immediate_media,
        )  # fmt: skip
        self.attn_gate = nn.Parameter(torch.tensor([0.0]))
        check_real("GatedCrossAttentionBlock", "ff_mult", ff_mult, 0, 2.0**20)
        if int(dim * ff_mult) < 1:
            raise ValueError(
                f"GatedCrossAttentionBlock: ff_mult must give the feed-forward "
                f"at least one channel, int(dim * ff_mult) >= 1, got {ff_mult}"
            )
        self.ff = _feed_forward(dim, ff_mult)
        self.ff_gate = nn.Parameter(torch.tensor([0.0]))

    def reset_parameters(self) -> None:
        """The gates back to 0 (closed); the submodules' parameters are theirs to reset."""
        nn.init.zeros_(self.attn_gate)
        nn.init.zeros_(self.ff_gate)

    def forward(self, x: torch.Tensor, media: torch.Tensor, media_locations=None,
                use_cached_media: bool = False):  # fmt: skip
        kw = dict(media_locations=media_locations, use_cached_media=use_cached_media)
        if self._gate_fuses(x):
            x = self.attn(x, media, **kw, gate=self.attn_gate) + x
        else:
            x = self.attn(x, media, **kw) * self.attn_gate.tanh() + x
        return self.ff(x) * self.ff_gate.tanh() + x

    def _gate_fuses(self, x: torch.Tensor) -> bool:
        """Whether the attention gate can run in the attention kernel's epilogue with
        open_flamingo's results: ``attn`` is this package's (takes ``gate``) and no hook
        reads its output or ``to_out``'s input (which would see the gated values); the
        residual keeps x's dtype as open_flamingo's promotion would (x in the gate's
        dtype); and the attention does not run in fp16, where tanh(gate) times the
        attention, rounded to fp16 before ``to_out``, would underflow for the small gates
        of the first training steps (open_flamingo multiplies after ``to_out``)."""
        attn = self.attn
        if type(attn) is not MaskedCrossAttention:
            return False
        if not isinstance(x, torch.Tensor):  # attn's checks name what is wrong
            return True
        if x.dtype != self.attn_gate.dtype:
            return False
        compute = autocast_dtype(x) or x.dtype
        if compute == torch.float16:
            return False
        return not (has_hooks(attn) or has_hooks(attn.to_out) or global_hooks())

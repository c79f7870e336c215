r"""Weight absorption for cross-attention with learned (input-independent) queries: the
Q-Former's first cross-attention, perceiver resamplers, MiniCPM-V's resampler.

For head h with queries Q_h (Lq, d) (already projected: fixed parameters), key and value
projections W_k, W_v ((H d, C) nn.Linear weights, rows h d .. (h + 1) d) with biases
b_k, b_v, and image features X (N, C):

    softmax(s Q_h (X W_k,h^T + b_k,h)^T) (X W_v,h^T + b_v,h)
      = softmax(s (Q_h W_k,h) X^T) X W_v,h^T + b_v,h

since Q_h b_k,h is one constant per query row (softmax ignores it) and each row of the
softmax sums to 1. With Q~_h = Q_h W_k,h (Lq, C), computed once per weight update, the
attention runs on the raw features: K and V are never materialised, and the value
projection is applied to the Lq attended rows instead of the N image tokens.

Where it pays (multiply-adds per image and head, Dh = d): standard = 2 N C d (K and V
projections) + 2 Lq N d (attention); absorbed = 2 Lq N C (scores and A X) + Lq C d (the
value projection of the attended rows). The ratio is about Lq / d when N >> Lq: 0.5 for
BLIP-2's Q-Former (32 queries, d 64) and for MiniCPM-V (64 queries, d 128), a loss when
Lq > d. It applies to the layers whose
queries do not depend on the input (the Q-Former's layer 0; a resampler's first layer),
and needs the bias-free score path exactly as above (no LayerNorm between X and W_k that
depends on the keys' own statistics: MiniCPM's ``ln_kv`` must be applied to X first).

Computed with torch matmuls in the inputs' dtype (fp32 accumulation on GPUs), differentiable
in every argument; the scores (B, H, Lq, N) are materialised, which is small for few queries.
"""

from __future__ import annotations

import torch

from ...core.checks import FLOAT_DTYPES
from .functional import _scale

__all__ = ["absorb_queries", "absorbed_cross_attention"]


def _check(op, queries, w_k) -> tuple[int, int, int]:
    """(heads, Lq, d) of checked queries and key weight."""
    for name, t in (("queries", queries), ("w_k", w_k)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} must be a floating tensor, got {t.dtype}")
    heads = queries.shape[0] if queries.dim() else 0
    if queries.dim() != 3:
        raise ValueError(f"{op}: queries must be (heads, Lq, d) = ({heads}, Lq, d), got shape "
                         f"{tuple(queries.shape)}")  # fmt: skip
    heads, lq, d = queries.shape
    if w_k.dim() != 2 or w_k.shape[0] != heads * d:
        raise ValueError(f"{op}: w_k must be (heads * d, C) = ({heads * d}, C), got shape "
                         f"{tuple(w_k.shape)}")  # fmt: skip
    return heads, lq, d


def absorb_queries(queries: torch.Tensor, w_k: torch.Tensor) -> torch.Tensor:
    """Q~ = Q_h W_k,h per head: (H, Lq, d) queries and a (H d, C) key weight -> (H, Lq, C)."""
    heads, _, d = _check("absorb_queries", queries, w_k)
    return torch.matmul(queries, w_k.view(heads, d, w_k.shape[1]))


def absorbed_cross_attention(queries, x, w_k, w_v, b_v=None, *, scale=None, absorbed=None):
    r"""Cross-attention of fixed per-head queries to image features, with the key and value
    projections folded in (see the module docstring).

    Args:
        queries: (H, Lq, d) projected queries (the same for every image).
        x: (B, N, C) image features.
        w_k, w_v: (H d, C) key and value projection weights (the key bias cancels).
        b_v: (H d,) value bias or None.
        scale: the logit scale (default 1 / sqrt(d)).
        absorbed: Q~ from :func:`absorb_queries` (computed here when None). queries and
            w_k then reach the result only through it: where either requires grad (grad
            mode on), absorbed must too (computed from them with grad), else this raises
            rather than leave their gradients None.

    Returns:
        (B, H, Lq, d): what softmax(scale Q K^T) V gives with K = x W_k^T + b_k and
        V = x W_v^T + b_v, up to rounding.
    """
    op = "absorbed_cross_attention"
    heads, lq, d = _check(op, queries, w_k)
    # None is refused naming a required one, not by an attribute error below
    for name, t, required in (("x", x, True), ("w_v", w_v, True), ("b_v", b_v, False),
                              ("absorbed", absorbed, False)):  # fmt: skip
        if not isinstance(t, torch.Tensor) and (required or t is not None):
            optional = "" if required else " or None"
            raise TypeError(f"{op}: {name} must be a torch.Tensor{optional}, got "
                            f"{type(t).__name__}")  # fmt: skip
    if x.dim() != 3 or x.shape[2] != w_k.shape[1]:
        raise ValueError(f"{op}: x must be (B, N, C) with C = {w_k.shape[1]}, got shape "
                         f"{tuple(x.shape)}")  # fmt: skip
    if w_v.shape != w_k.shape:
        raise ValueError(f"{op}: w_v must have w_k's shape {tuple(w_k.shape)}, got "
                         f"{tuple(w_v.shape)}")  # fmt: skip
    if b_v is not None and tuple(b_v.shape) != (heads * d,):
        raise ValueError(f"{op}: b_v must be (heads * d,) = ({heads * d},), got shape "
                         f"{tuple(b_v.shape)}")  # fmt: skip
    if absorbed is not None and tuple(absorbed.shape) != (heads, lq, w_k.shape[1]):
        raise ValueError(f"{op}: absorbed must be absorb_queries(queries, w_k), (heads, Lq, C) "
                         f"= {(heads, lq, w_k.shape[1])}, got shape "
                         f"{tuple(absorbed.shape)}")  # fmt: skip
    named = {"queries": queries, "x": x, "w_k": w_k, "w_v": w_v, "b_v": b_v,
             "absorbed": absorbed}  # fmt: skip
    for name, t in named.items():
        if t is not None and (t.dtype != queries.dtype or t.device != queries.device):
            raise TypeError(f"{op}: {name} must have queries' dtype and device "
                            f"({queries.dtype}, {queries.device}), got ({t.dtype}, "
                            f"{t.device})")  # fmt: skip
    if (absorbed is not None and torch.is_grad_enabled() and not absorbed.requires_grad
            and (queries.requires_grad or w_k.requires_grad)):  # fmt: skip
        # queries and w_k reach the result only through absorbed: their gradients would
        # be None, silently
        raise ValueError(
            f"{op}: absorbed carries no gradient, but "
            f"{'queries' if queries.requires_grad else 'w_k'} requires grad (they reach the "
            "result only through absorbed); compute absorbed with absorb_queries(queries, "
            "w_k) with grad enabled, pass absorbed=None, or pass queries and w_k detached"
        )
    # finite, as every attention op's scale (an infinite one made every output NaN)
    s = _scale(op, scale, d)
    qt = absorb_queries(queries, w_k) if absorbed is None else absorbed  # (H, Lq, C)
    scores = torch.matmul(qt[None], x[:, None].transpose(-1, -2)) * s  # (B, H, Lq, N)
    attended = torch.matmul(torch.softmax(scores, dim=-1), x[:, None])  # (B, H, Lq, C)
    wv = w_v.view(heads, d, w_v.shape[1])
    out = torch.matmul(attended, wv.transpose(-1, -2)[None])  # (B, H, Lq, d)
    if b_v is not None:
        bias = b_v.view(1, heads, 1, d)
        if not x.shape[1]:
            # no keys (N = 0): the softmax rows are empty and sum to 0, so no bias passes
            # (the result is 0, as unfolded); b_v stays in the graph with a zero gradient
            bias = torch.where(torch.zeros_like(bias, dtype=torch.bool), bias, 0.0)
        out = out + bias
    return out

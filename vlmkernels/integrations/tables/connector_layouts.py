"""Feature layouts shared by the connector tables (no patcher of its own): the square
pixel-shuffle grid check, a channel-major weight put in the merger's patch-major column
order, and one merger per image of a batch of images of different sizes."""

from __future__ import annotations

import torch

from ...core.checks import isqrt
from ...ops.connectors import merger

__all__ = ["merge_per_image", "patch_major", "shuffle_view_problem", "square_grid_problem"]


def square_grid_problem(features, s: int) -> str | None:
    """Why ``features`` are not (B, S * S, C) with ``s`` dividing S, or None (the pixel
    shuffle's layout)."""
    if getattr(features, "dim", lambda: 0)() != 3:
        return "the features are not (B, S * S, C)"
    n = features.shape[1]
    side = isqrt(n)
    if side * side != n or side % s:
        return f"{n} tokens are not a square grid of a side divisible by {s}"
    return None


def shuffle_view_problem(features, s: int) -> str | None:
    """Why Idefics3's pixel shuffle (``view`` (B, S, S / s, s C) of the (B, S * S, C)
    features, :func:`square_grid_problem`'s layout) refuses the strides of ``features``, or
    None: merging a token's s neighbours with its channels is a view only where each token
    row follows the last (the token stride C times the channel stride). The fused merger
    reads any strides; transformers raises its view's RuntimeError."""
    b, n, c = features.shape
    if s > 1 and c > 1 and n > 1 and features.stride(1) != c * features.stride(2):
        return f"the features' strides {features.stride()} are not a view of (B, S, S / s, s C)"
    return None


def patch_major(weight: torch.Tensor, channels: int, s: int) -> torch.Tensor:
    """(N, s^2 C): the columns of a Linear or s x s convolution weight over channel-major
    windows (``weight`` (N, C s^2) or (N, C, s, s), column c s^2 + dr s + dc: ``unfold``'s
    and Conv2d's order) put in the merger's patch-major order, (dr s + dc) C + c. One copy,
    in the autograd graph."""
    n = weight.shape[0]
    return weight.reshape(n, channels, s * s).transpose(1, 2).reshape(n, s * s * channels)


def merge_per_image(features: torch.Tensor, grids, w1, b1=None, w2=None, b2=None, **merger_kw):
    """(sum of t h w / (MH MW), N): one :func:`~vlmkernels.ops.connectors.merger` of layout
    "grid" per image of ``features`` (P, C), whose patches are the (t, h, w) ``grids`` in
    turn, row-major; the merged rows of every image one after another (no concatenation
    for one image)."""
    rows, start = [], 0
    for t, h, w in grids:
        x = features[start : start + t * h * w].unflatten(0, (t, h, w))
        start += t * h * w
        y = merger(x, w1, b1, w2, b2, layout="grid", **merger_kw)
        rows.append(y.reshape(-1, y.shape[-1]))
    return rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)

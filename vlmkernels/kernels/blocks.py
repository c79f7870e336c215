"""Triton building blocks of the GEMM-shaped kernels: logit tiles, block ranges, padding
and numerically safe helpers.

The contrastive family builds its kernels from these; the attention and GEMM families are
meant to as well. Each is a ``@triton.jit`` function inlined into the kernels that call it
(a change here changes their source hash, :mod:`vlmkernels.core.tuning`, so tuned config
files of those kernels are re-tuned).

Tile addressing. :func:`logits_tile` adds 32-bit offsets inside a tile to a 64-bit base
per tile and k step; :func:`tile_addressable` is the host-side guarantee that they fit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
NEG_INF = tl.constexpr(float("-inf"))
TILE_ROWS_MAX = 256  # the largest BM or BN of any config using logits_tile

even_k = triton.heuristics({"EVEN_K": lambda args: args["D"] % args["BK"] == 0})
"""Heuristic setting ``EVEN_K`` (every k step is a full BK) from the arguments D and BK."""


# fmt: off
@triton.jit
def logits_tile(
    x_ptr, y_ptr, row_start, col_start, row_mask, col_mask, D,
    stride_xn, stride_xd, stride_yn, stride_yd,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """acc[m, n] = sum_k x[row_start + m, k] * y[col_start + n, k], accumulated in fp32.

    Addresses are a 64-bit base per tile and k step plus 32-bit offsets inside the tile
    (the launcher guarantees they fit), which keeps pointer tensors out of the registers.
    """
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    ks = tl.arange(0, BK)
    x_offs = tl.arange(0, BM)[:, None] * stride_xn + ks[None, :] * stride_xd
    y_offs = tl.arange(0, BN)[:, None] * stride_yn + ks[None, :] * stride_yd
    x_base = x_ptr + tl.cast(row_start, tl.int64) * stride_xn
    y_base = y_ptr + tl.cast(col_start, tl.int64) * stride_yn
    for k0 in range(0, D, BK):
        x_k = x_base + tl.cast(k0, tl.int64) * stride_xd
        y_k = y_base + tl.cast(k0, tl.int64) * stride_yd
        if EVEN_K:
            x = tl.load(x_k + x_offs, mask=row_mask[:, None], other=0.0)
            y = tl.load(y_k + y_offs, mask=col_mask[:, None], other=0.0)
        else:
            k_mask = (k0 + ks) < D
            x = tl.load(x_k + x_offs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            y = tl.load(y_k + y_offs, mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        if DOT_FP32:
            x = x.to(tl.float32)
            y = y.to(tl.float32)
        acc = tl.dot(x, tl.trans(y), acc, input_precision=INPUT_PRECISION)
    return acc
# fmt: on


@triton.jit
def scale_and_bias(scale_ptr, bias_ptr, HAS_BIAS: tl.constexpr):
    """The logit scale s and bias b (0 without one) as fp32 scalars."""
    scale = tl.load(scale_ptr).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr).to(tl.float32)
    else:
        bias = 0.0
    return scale, bias


@triton.jit
def block_range(part, num_parts, n, BLOCK: tl.constexpr):
    """[lo, hi): the blocks of size BLOCK over n items that part ``part`` of ``num_parts``
    (contiguous, equal shares, the last ones possibly empty) covers."""
    n_blocks = tl.cdiv(n, BLOCK)
    per_part = tl.cdiv(n_blocks, num_parts)
    lo = part * per_part
    return lo, tl.minimum(lo + per_part, n_blocks)


@triton.jit
def log1p(e):
    """log(1 + e) for e in [0, 1], accurate where 1 + e rounds (Goldberg's correction)."""
    u = 1.0 + e
    rounded = u - 1.0
    exact = rounded == 0.0
    return tl.where(exact, e, tl.log(u) * (e / tl.where(exact, 1.0, rounded)))


@triton.jit
def pad(mask):
    """0 where ``mask`` holds, -inf elsewhere: added to logits, it removes padding rows or
    columns from every exp and max without a tile-sized mask."""
    return tl.where(mask, 0.0, NEG_INF)


@triton.jit
def diagonal_tile(row_start, col_start, BM: tl.constexpr, BN: tl.constexpr):
    """Whether the BM x BN tile at (row_start, col_start) holds diagonal elements."""
    return (row_start < col_start + BN) & (col_start < row_start + BM)


def tile_addressable(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a contiguous copy where offsets inside a tile (up to ``TILE_ROWS_MAX`` rows
    or columns of its strides) would not fit in 32 bits, as :func:`logits_tile` assumes."""
    return t if TILE_ROWS_MAX * max(t.stride()) < 2**31 else t.contiguous()

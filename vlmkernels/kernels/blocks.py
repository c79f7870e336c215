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

from ..core.runtime import INTERPRETED

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
NEG_INF = tl.constexpr(float("-inf"))
POS_INF = tl.constexpr(float("inf"))
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


# Minimax coefficients of log2(1 + e) / e on [0, 1], degree 8, fitted for this module (relative
# error, then the fp32 roundings of c0..c2 nudged): relative error 3e-8 in exact arithmetic,
# 1.4e-7 evaluated in fp32 (Horner with FMAs).
_LOG2_1P_C = (1.4426950216293335, -0.7213402986526489, 0.4806930422782898,
              -0.35840848088264465, 0.27564141154289246, -0.19711895287036896,
              0.11285616457462311, -0.042567044496536255, 0.00754917785525322)  # fmt: skip
LOG2_1P_C0, LOG2_1P_C1, LOG2_1P_C2 = (tl.constexpr(c) for c in _LOG2_1P_C[:3])
LOG2_1P_C3, LOG2_1P_C4, LOG2_1P_C5 = (tl.constexpr(c) for c in _LOG2_1P_C[3:6])
LOG2_1P_C6, LOG2_1P_C7, LOG2_1P_C8 = (tl.constexpr(c) for c in _LOG2_1P_C[6:])
# On the GPU the MUFU approximations through inline PTX; the interpreter has no inline PTX
FAST_MATH = tl.constexpr(not INTERPRETED)


@triton.jit
def exp2_approx(t):
    """2^t: one MUFU.EX2 on the GPU (ex2.approx.ftz, 2 ulp; results under 2^-126 flush to
    0); numpy's exp2 under the interpreter."""
    if FAST_MATH:
        r = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [t],
                                      dtype=tl.float32, is_pure=True, pack=1)  # fmt: skip
    else:
        r = tl.exp2(t)
    return r


@triton.jit
def exp2_neg_abs(t):
    """2^-|t|: as :func:`exp2_approx` of -|t|, the sign taken inside the inline PTX, where
    ptxas makes it one instruction per element (``exp2_approx(-tl.abs(t))`` cost 64 more
    per 128 x 128 tile of siglip_grad on sm_90a)."""
    if FAST_MATH:
        r = tl.inline_asm_elementwise(
            "{ .reg .f32 a; abs.f32 a, $1; neg.f32 a, a; ex2.approx.ftz.f32 $0, a; }",
            "=r,r", [t], dtype=tl.float32, is_pure=True, pack=1)  # fmt: skip
    else:
        r = tl.exp2(-tl.abs(t))
    return r


@triton.jit
def rcp_approx(u):
    """1 / u: one MUFU.RCP on the GPU (rcp.approx.ftz, 1 ulp), no division."""
    if FAST_MATH:
        r = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [u],
                                      dtype=tl.float32, is_pure=True, pack=1)  # fmt: skip
    else:
        r = 1.0 / u
    return r


@triton.jit
def log2_1p_unit(e):
    """log2(1 + e) for e in [0, 1]: e q(e), q a degree-8 minimax polynomial (1.4e-7
    relative in fp32, no logarithm)."""
    q = LOG2_1P_C8
    q = q * e + LOG2_1P_C7
    q = q * e + LOG2_1P_C6
    q = q * e + LOG2_1P_C5
    q = q * e + LOG2_1P_C4
    q = q * e + LOG2_1P_C3
    q = q * e + LOG2_1P_C2
    q = q * e + LOG2_1P_C1
    q = q * e + LOG2_1P_C0
    return e * q


@triton.jit
def softplus2_sigmoid(t):
    """(log2(1 + 2^t), 1 / (1 + 2^-t)) for fp32 t: softplus in base 2 (ln 2 times it is
    softplus(z), z = t ln 2) and sigmoid(z), from one exponential e = 2^-|t|:
    log2(1 + 2^t) = max(t, 0) + log2(1 + e), sigmoid = 1 / (1 + e) for t >= 0 and
    e / (1 + e) below; no logarithm and no division.

    Working in base 2 spares the kernels the conversion of their logits to natural units and
    the rounding correction of exp(-|z|) that a natural-unit z needs (t = S log2(e) comes
    from the same FMA as S, with S's own rounding error). About 2e-7 relative to the
    exact values for this t on the GPU (MUFU ex2 and rcp, 2 and 1 ulp; numpy's under the
    interpreter). A huge finite negative t (-1e30: padding) gives exactly (0, 0)."""
    e = exp2_neg_abs(t)
    r = rcp_approx(1.0 + e)
    return tl.maximum(t, 0.0) + log2_1p_unit(e), tl.where(t >= 0, r, e * r)


@triton.jit
def to_bf16_rne(v):
    """fp32 ``v`` to bfloat16, rounded to nearest, ties to even (NaN kept): the GPU's
    conversion, which Triton's interpreter replaces by truncation. The rounding is done on
    the bits, so the final conversion is exact on both."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16) << 16
    return tl.where(v == v, bits.to(tl.float32, bitcast=True), v).to(tl.bfloat16)


@triton.jit
def to_dtype_rne(v, dtype: tl.constexpr):
    """fp32 ``v`` rounded to nearest-even in ``dtype``, under the interpreter as on the GPU
    (bf16 through :func:`to_bf16_rne`; the interpreter's other conversions already round)."""
    if dtype == tl.bfloat16:
        return to_bf16_rne(v)
    return v.to(dtype)


@triton.jit
def pad(mask):
    """0 where ``mask`` holds, -inf elsewhere: added to logits, it removes padding rows or
    columns from every exp and max without a tile-sized mask."""
    return tl.where(mask, 0.0, NEG_INF)


@triton.jit
def tile_offsets(rows, cols, s_row, s_col):
    """Offsets of the (rows, cols) tile of a view with strides (s_row, s_col), the row term
    in 64 bits: for kernels whose rows span a whole sequence, not one tile (a row of a
    (L, H, D) layout times its stride H D passes 2^31 from 2^19 rows on at H D = 4096)."""
    return tl.cast(rows, tl.int64)[:, None] * s_row + cols[None, :] * s_col


@triton.jit
def diagonal_tile(row_start, col_start, BM: tl.constexpr, BN: tl.constexpr):
    """Whether the BM x BN tile at (row_start, col_start) holds diagonal elements."""
    return (row_start < col_start + BN) & (col_start < row_start + BM)


def tile_addressable(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a contiguous copy where offsets inside a tile (up to ``TILE_ROWS_MAX`` rows
    or columns of its strides) would not fit in 32 bits, as :func:`logits_tile` assumes."""
    return t if TILE_ROWS_MAX * max(t.stride()) < 2**31 else t.contiguous()

r"""Fused contrastive losses: CLIP (symmetric InfoNCE) and SigLIP (pairwise sigmoid).

For image features X (N, d), text features Y (N, d), a logit scale s and a bias b, the logits
are S = s X Y^T + b (N x N). Neither loss writes S to memory: tiles of S are computed in
registers with ``tl.dot`` (bf16/fp16 on tensor cores, fp32 accumulation) and consumed there.

CLIP. Row and column log-sum-exp r_i = lse_j S_ij, c_j = lse_i S_ij come from one pass over
the tiles; the per-sample losses are l^{i2t}_i = r_i - S_ii and l^{t2i}_j = c_j - S_jj, and
the loss is (mean(l^{i2t}) + mean(l^{t2i})) / 2. With upstream weights u_i, v_j on the two
per-sample losses the logit gradient is

    dS_ij = u_i exp(S_ij - r_i) + v_j exp(S_ij - c_j) - delta_ij (u_i + v_j),

which the backward pass recomputes tile by tile, in chunks of rows, and feeds to two matrix
products: dX = s dS Y, dY = s dS^T X; ds = sum dS * (XY^T), db = sum dS. Saved for
backward: the inputs and r, c (O(N) fp32). About 4 N^2 d matrix FLOPs per forward+backward.

SigLIP. With z_ij = +1 on the diagonal and -1 elsewhere, the loss of image i is
l_i = -sum_j logsigmoid(z_ij S_ij) and the loss is sum_i l_i / N (open_clip's normalisation).
The logit gradient dS_ij = -w_i z_ij sigmoid(-z_ij S_ij) needs no statistic, so when a
scalar loss needs gradients the forward pass produces them too (3 N^2 d matrix FLOPs), and
the backward pass only scales them.

Memory: the inputs, their gradients, an fp32 accumulator for dY and one dS chunk of
(chunk_size x N) elements; never N x N. No atomics: the results are deterministic.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import triton
import triton.language as tl

from .._backend import resolve_backend
from .._checks import (
    check_chunk_size,
    check_feature_pair,
    check_reduction,
    scalar_tensor,
)
from ._common import INTERPRETED, autotune_configs, dot_precision, next_pow2_bucket, sm_count

_LOG2E = tl.constexpr(1.4426950408889634)
_NEG_INF = tl.constexpr(float("-inf"))
_LN2 = tl.constexpr(0.6931471805599453)
LN2 = math.log(2.0)
LOG2E = 1.0 / LN2

# --------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------

_GPU_CONFIGS = [
    triton.Config({"BM": 128, "BN": 128, "BK": 64}, num_warps=8, num_stages=3),
    triton.Config({"BM": 128, "BN": 128, "BK": 64}, num_warps=8, num_stages=4),
    triton.Config({"BM": 128, "BN": 128, "BK": 32}, num_warps=8, num_stages=4),
    triton.Config({"BM": 128, "BN": 64, "BK": 64}, num_warps=4, num_stages=4),
    triton.Config({"BM": 64, "BN": 128, "BK": 64}, num_warps=4, num_stages=4),
]
# Small tiles keep the interpreter's per-op cost low; 32 is not a multiple of the test
# sizes, so masking is exercised.
_INTERPRETER_CONFIG = triton.Config({"BM": 32, "BN": 32, "BK": 32}, num_warps=4, num_stages=1)
_CONFIGS = autotune_configs(_GPU_CONFIGS, _INTERPRETER_CONFIG)
# What the launchers assume before autotuning picks a config: the smallest BM of any
# config (partial buffers sized with it are never too small) and the usual tile (grids).
_MIN_BLOCK = 32 if INTERPRETED else 64
_NOMINAL_BLOCK = 32 if INTERPRETED else 128

_even_k = triton.heuristics({"EVEN_K": lambda args: args["D"] % args["BK"] == 0})


# fmt: off
@triton.jit
def _logits_tile(
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
def _scale_and_bias(scale_ptr, bias_ptr, HAS_BIAS: tl.constexpr):
    """The logit scale s and bias b (0 without one) as fp32 scalars."""
    scale = tl.load(scale_ptr).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr).to(tl.float32)
    else:
        bias = 0.0
    return scale, bias


@triton.jit
def _block_range(part, num_parts, n, BLOCK: tl.constexpr):
    """[lo, hi): the blocks of size BLOCK over n items that part ``part`` of ``num_parts``
    (contiguous, equal shares, the last ones possibly empty) covers."""
    n_blocks = tl.cdiv(n, BLOCK)
    per_part = tl.cdiv(n_blocks, num_parts)
    lo = part * per_part
    return lo, tl.minimum(lo + per_part, n_blocks)


@triton.jit
def _log1p(e):
    """log(1 + e) for e in [0, 1], accurate where 1 + e rounds (Goldberg's correction)."""
    u = 1.0 + e
    rounded = u - 1.0
    exact = rounded == 0.0
    return tl.where(exact, e, tl.log(u) * (e / tl.where(exact, 1.0, rounded)))


@triton.jit
def _pad(mask):
    """0 where ``mask`` holds, -inf elsewhere: added to logits, it removes padding rows or
    columns from every exp and max without a tile-sized mask."""
    return tl.where(mask, 0.0, _NEG_INF)


@triton.jit
def _diagonal_tile(row_start, col_start, BM: tl.constexpr, BN: tl.constexpr):
    """Whether the BM x BN tile at (row_start, col_start) holds diagonal elements."""
    return (row_start < col_start + BN) & (col_start < row_start + BM)


# fmt: off
@triton.autotune(configs=_CONFIGS, key=["D", "n_bucket"])
@_even_k
@triton.jit
def _clip_stats_kernel(
    x_ptr, y_ptr, scale_ptr, bias_ptr,
    row_max_ptr, row_sum_ptr, col_max_ptr, col_sum_ptr, diag_ptr,
    N, D, stride_xn, stride_xd, stride_yn, stride_yd, num_row_groups, n_bucket,
    HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr,
):
    """One pass over the logit tiles for the row and column log-sum-exp, and the diagonal.

    Program (g, k) owns a rectangle of tiles: the row blocks of group g times the column
    blocks of split k. It keeps the row statistics of the current row block in registers
    and the column statistics of its rectangle in its own slot g of the column partials
    (read back, updated and written per tile; no other program touches that slot). Both
    are (max, sum of 2^(t - max)) pairs in base 2, t = S log2(e); the host merges the
    num_col_splits row partials and the num_row_groups column partials.
    """
    pid = tl.program_id(0)
    num_col_splits = tl.num_programs(0) // num_row_groups
    g = pid % num_row_groups  # consecutive programs share column tiles in L2
    k = pid // num_row_groups
    i_lo, i_hi = _block_range(g, num_row_groups, N, BM)
    j_lo, j_hi = _block_range(k, num_col_splits, N, BN)
    scale, bias = _scale_and_bias(scale_ptr, bias_ptr, HAS_BIAS)
    scale2 = scale * _LOG2E
    row_max_ptr += k.to(tl.int64) * N
    row_sum_ptr += k.to(tl.int64) * N
    col_max_ptr += g.to(tl.int64) * N
    col_sum_ptr += g.to(tl.int64) * N

    for i in range(i_lo, i_hi):
        rows = i * BM + tl.arange(0, BM)
        row_mask = rows < N
        row_offset = bias * _LOG2E + _pad(row_mask)
        m_row = tl.full((BM,), _NEG_INF, tl.float32)
        l_row = tl.zeros((BM,), tl.float32)
        for j in range(j_lo, j_hi):
            cols = j * BN + tl.arange(0, BN)
            col_mask = cols < N
            acc = _logits_tile(x_ptr, y_ptr, i * BM, j * BN, row_mask, col_mask, D,
                               stride_xn, stride_xd, stride_yn, stride_yd,
                               BM, BN, BK, EVEN_K, DOT_FP32, INPUT_PRECISION)
            # t = S log2(e), -inf on padding rows and columns
            t = acc * scale2 + row_offset[:, None] + _pad(col_mask)[None, :]

            if _diagonal_tile(i * BM, j * BN, BM, BN):
                t_ii = tl.sum(tl.where(rows[:, None] == cols[None, :], t, 0.0), 1)
                here = (rows >= j * BN) & (rows < (j + 1) * BN) & row_mask
                tl.store(diag_ptr + rows, t_ii * _LN2, mask=here)

            # rows of padding stay at -inf: shift them by 0 instead of -inf (no NaN)
            m_new = tl.maximum(m_row, tl.max(t, 1))
            m_use = tl.where(m_new == _NEG_INF, 0.0, m_new)
            l_row = l_row * tl.exp2(m_row - m_use) + tl.sum(tl.exp2(t - m_use[:, None]), 1)
            m_row = m_new

            # nothing to read back on the group's first row block
            seen = col_mask & ((cols * 0 + i) > i_lo)
            m_col = tl.load(col_max_ptr + cols, mask=seen, other=_NEG_INF)
            l_col = tl.load(col_sum_ptr + cols, mask=seen, other=0.0)
            m_col_new = tl.maximum(m_col, tl.max(t, 0))
            m_use = tl.where(m_col_new == _NEG_INF, 0.0, m_col_new)
            l_col = l_col * tl.exp2(m_col - m_use) + tl.sum(tl.exp2(t - m_use[None, :]), 0)
            tl.store(col_max_ptr + cols, m_col_new, mask=col_mask)
            tl.store(col_sum_ptr + cols, l_col, mask=col_mask)
            # the next read of these columns may come from other threads of this program
            tl.debug_barrier()
        tl.store(row_max_ptr + rows, m_row, mask=row_mask)
        tl.store(row_sum_ptr + rows, l_row, mask=row_mask)


@triton.autotune(configs=_CONFIGS, key=["D", "n_bucket"])
@_even_k
@triton.jit
def _clip_grad_kernel(
    x_ptr, y_ptr, scale_ptr, bias_ptr, lse_row_ptr, lse_col_ptr, w_row_ptr, w_col_ptr,
    grad_ptr, stride_gm, partial_ptr, partial_stride,
    row0, n_rows, N, D, stride_xn, stride_xd, stride_yn, stride_yd, n_bucket,
    HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr,
):
    """Rows row0 .. row0 + n_rows of the CLIP logit gradient, written to ``grad`` (a chunk).

    grad_ij = u_i exp(S_ij - r_i) + v_j exp(S_ij - c_j) - delta_ij (u_i + v_j), with u, v
    the (normalised) upstream weights. Program (m, k) covers row block m of the chunk and
    the column blocks of split k, and writes sum(grad * s log2(e) XY^T) and sum(grad)
    (the scale and bias gradients' shares) to partial[0, pid] and partial[1, pid]. The
    exponents carry -inf on padding columns (row side) and padding rows (column side),
    and u, v are 0 there: the gradient is exactly 0 outside the matrix, with no tile-sized
    mask.
    """
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    j_lo, j_hi = _block_range(split, num_splits, N, BN)
    local = pid_m * BM + tl.arange(0, BM)
    row_mask = local < n_rows
    rows = row0 + local
    scale, bias = _scale_and_bias(scale_ptr, bias_ptr, HAS_BIAS)
    scale2 = scale * _LOG2E
    bias2 = bias * _LOG2E
    lse_r = tl.load(lse_row_ptr + rows, mask=row_mask, other=0.0)
    row_shift = bias2 - lse_r * _LOG2E
    row_pad = _pad(row_mask)
    w_r = tl.load(w_row_ptr + rows, mask=row_mask, other=0.0)
    grad_rows = grad_ptr + local.to(tl.int64)[:, None] * stride_gm

    dscale_acc = tl.zeros((BM,), tl.float32)
    dbias_acc = tl.zeros((BM,), tl.float32)
    for j in range(j_lo, j_hi):
        cols = j * BN + tl.arange(0, BN)
        col_mask = cols < N
        lse_c = tl.load(lse_col_ptr + cols, mask=col_mask, other=0.0)
        col_shift = bias2 - lse_c * _LOG2E
        w_c = tl.load(w_col_ptr + cols, mask=col_mask, other=0.0)
        acc = _logits_tile(x_ptr, y_ptr, row0 + pid_m * BM, j * BN, row_mask, col_mask, D,
                           stride_xn, stride_xd, stride_yn, stride_yd,
                           BM, BN, BK, EVEN_K, DOT_FP32, INPUT_PRECISION)
        a = acc * scale2
        grad = (w_r[:, None] * tl.exp2(a + row_shift[:, None] + _pad(col_mask)[None, :])
                + w_c[None, :] * tl.exp2(a + col_shift[None, :] + row_pad[:, None]))
        if _diagonal_tile(row0 + pid_m * BM, j * BN, BM, BN):
            # rows past the chunk are padding here even where they are rows of the matrix
            on_diag = (rows[:, None] == cols[None, :]) & row_mask[:, None]
            grad = tl.where(on_diag, grad - (w_r[:, None] + w_c[None, :]), grad)
        dscale_acc += tl.sum(grad * a, 1)
        dbias_acc += tl.sum(grad, 1)
        tl.store(grad_rows + cols[None, :], grad.to(grad_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & col_mask[None, :])
    pid = pid_m * num_splits + split
    tl.store(partial_ptr + pid, tl.sum(dscale_acc, 0))
    tl.store(partial_ptr + partial_stride + pid, tl.sum(dbias_acc, 0))


@triton.autotune(configs=_CONFIGS, key=["D", "n_bucket", "WRITE_GRAD"])
@_even_k
@triton.jit
def _siglip_kernel(
    x_ptr, y_ptr, scale_ptr, bias_ptr, w_row_ptr,
    loss_ptr, grad_ptr, stride_gm, partial_ptr, partial_stride,
    row0, n_rows, N, D, stride_xn, stride_xd, stride_yn, stride_yd, n_bucket,
    HAS_BIAS: tl.constexpr, WRITE_GRAD: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr,
):
    """SigLIP over rows row0 .. row0 + n_rows: per-row loss partials, and optionally the
    logit gradient grad_ij = -w_i z_ij sigmoid(-z_ij S_ij).

    With the margin m = z S: loss l = softplus(-m) = -logsigmoid(m), and
    sigmoid(-m) = exp(-m - l), which reuses l instead of a division. Program (m, k) covers
    row block m and the column blocks of split k; its row losses go to loss[k, rows] (the
    host sums over k), sum(grad * S) and sum(grad) to partial[0, pid] and partial[1, pid]
    (grad * S = -w sigmoid(-m) m: no sign needed). Padding columns are weighted 0; padding
    rows have w = 0 and their losses are not stored.
    """
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    j_lo, j_hi = _block_range(split, num_splits, N, BN)
    local = pid_m * BM + tl.arange(0, BM)
    row_mask = local < n_rows
    rows = row0 + local
    scale, bias = _scale_and_bias(scale_ptr, bias_ptr, HAS_BIAS)
    if WRITE_GRAD:
        w_r = tl.load(w_row_ptr + rows, mask=row_mask, other=0.0)
    grad_rows = grad_ptr + local.to(tl.int64)[:, None] * stride_gm

    loss_acc = tl.zeros((BM,), tl.float32)
    dscale_acc = tl.zeros((BM,), tl.float32)
    dbias_acc = tl.zeros((BM,), tl.float32)
    for j in range(j_lo, j_hi):
        cols = j * BN + tl.arange(0, BN)
        col_mask = cols < N
        keep = col_mask.to(tl.float32)
        acc = _logits_tile(x_ptr, y_ptr, row0 + pid_m * BM, j * BN, row_mask, col_mask, D,
                           stride_xn, stride_xd, stride_yn, stride_yd,
                           BM, BN, BK, EVEN_K, DOT_FP32, INPUT_PRECISION)
        logits = acc * scale + bias
        margin = tl.where(rows[:, None] == cols[None, :], logits, -logits)
        loss = tl.maximum(-margin, 0.0) + _log1p(tl.exp2(-tl.abs(margin) * _LOG2E))
        loss_acc += tl.sum(loss * keep[None, :], 1)
        if WRITE_GRAD:
            h = tl.exp2((-margin - loss) * _LOG2E) * (w_r[:, None] * keep[None, :])
            grad = tl.where(rows[:, None] == cols[None, :], -h, h)
            tl.store(grad_rows + cols[None, :], grad.to(grad_ptr.dtype.element_ty),
                     mask=row_mask[:, None] & col_mask[None, :])
            dscale_acc -= tl.sum(h * margin, 1)
            dbias_acc += tl.sum(grad, 1)
    tl.store(loss_ptr + split.to(tl.int64) * N + rows, loss_acc, mask=row_mask)
    if WRITE_GRAD:
        pid = pid_m * num_splits + split
        tl.store(partial_ptr + pid, tl.sum(dscale_acc, 0))
        tl.store(partial_ptr + partial_stride + pid, tl.sum(dbias_acc, 0))
# fmt: on


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _stat_grid(N: int) -> tuple[int, int]:
    """(row groups, column splits) of the statistics pass: 16 x 16 rectangles at most,
    enough programs to fill an H100 twice while keeping the partials at 32 N x 8 bytes."""
    blocks = triton.cdiv(N, _NOMINAL_BLOCK)
    n = min(16, blocks)
    return n, n


def _col_splits(n_rows: int, N: int, device: torch.device) -> int:
    """Column splits for a chunk of n_rows rows: about 4 programs per SM in all."""
    row_blocks = triton.cdiv(n_rows, _NOMINAL_BLOCK)
    col_blocks = triton.cdiv(N, _NOMINAL_BLOCK)
    return max(1, min(col_blocks, triton.cdiv(4 * sm_count(device), row_blocks)))


def _max_programs(n_rows: int, splits: int) -> int:
    return triton.cdiv(n_rows, _MIN_BLOCK) * splits


def default_chunk_rows(n: int, elem_size: int, budget_bytes: int = 128 << 20) -> int:
    """Rows per dS chunk: a (rows x n) chunk of ``budget_bytes`` at most, in multiples of
    256 rows (at least 256) so that the chunk products stay efficient."""
    rows = budget_bytes // (n * elem_size)
    rows = max(256, rows // 256 * 256)
    return min(n, rows)


def _merge_lse2(m2: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Natural log-sum-exp over dim 0 of base-2 (max, sum) partials; NaN stays NaN."""
    top = m2.amax(0)
    return (top + torch.log2((l * torch.exp2(m2 - top)).sum(0))) * LN2


@functools.cache
def _mixed_precision_mm(device_type: str) -> bool:
    """Whether 16-bit matrix products can write and accumulate fp32 outputs here
    (``aten::mm.dtype`` / ``aten::addmm.dtype_out``: CUDA in torch >= 2.8)."""
    if device_type != "cuda":
        return False
    try:
        a = torch.ones((16, 16), dtype=torch.bfloat16, device=device_type)
        acc = torch.zeros((16, 16), dtype=torch.float32, device=device_type)
        torch.ops.aten.mm.dtype(a, a, torch.float32)
        torch.ops.aten.addmm.dtype_out(acc, a, a, torch.float32, out=acc)
    except (RuntimeError, NotImplementedError, AttributeError, TypeError):
        return False
    return True


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with fp32 accumulation and an fp32 (or fp64) result."""
    if a.dtype in (torch.float32, torch.float64):
        return torch.mm(a, b)
    if _mixed_precision_mm(a.device.type):
        return torch.ops.aten.mm.dtype(a, b, torch.float32)
    return torch.mm(a.float(), b.float())


def _addmm_f32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b in place, acc fp32 (or fp64)."""
    if a.dtype in (torch.float32, torch.float64):
        acc.addmm_(a, b)
    elif _mixed_precision_mm(a.device.type):
        torch.ops.aten.addmm.dtype_out(acc, a, b, torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float())


def _feature_grads(x, y, coef, chunk_rows, fill):
    """dx = coef * G y, dy = coef * G^T x and sum(G * (x y^T)) for a logit gradient G made
    chunk by chunk.

    ``fill(buf, chunk, row0, n)`` writes rows row0 .. row0 + n of G into buf[:n]. The chunk
    is stored in the input dtype (a GEMM operand); dx is written per chunk, dy accumulates
    in fp32 across chunks. The scale gradient's sum comes from the dx product for free:
    sum_ij G_ij x_i . y_j = sum_i x_i . (G y)_i. Returns (dx, dy) in the input dtype and
    that sum (fp32, before ``coef``).
    """
    n, d = x.shape
    buf = torch.empty((chunk_rows, n), dtype=x.dtype, device=x.device)
    dx = torch.empty((n, d), dtype=x.dtype, device=x.device)
    dy = torch.zeros((n, d), dtype=torch.float32, device=x.device)
    g_dot_xy = torch.zeros((), dtype=dy.dtype, device=x.device)
    for c, row0 in enumerate(range(0, n, chunk_rows)):
        rows = min(chunk_rows, n - row0)
        fill(buf, c, row0, rows)
        g = buf[:rows]
        x_rows = x[row0 : row0 + rows]
        gy = _mm_f32(g, y)
        g_dot_xy += (gy * x_rows).sum()
        dx[row0 : row0 + rows] = gy.mul_(coef)
        _addmm_f32_(dy, g.t(), x_rows)
    del buf, g  # the rounded dy below can reuse the chunk's memory
    return dx, dy.mul_(coef).to(y.dtype), g_dot_xy


def _tile_addressable(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a contiguous copy where offsets inside a tile (up to 256 rows or columns
    of its strides) would not fit in 32 bits, as :func:`_logits_tile` assumes."""
    return t if 256 * max(t.stride()) < 2**31 else t.contiguous()


def _kernel_args(x, y, scale, bias):
    """The arguments every kernel shares: (bias pointer, (N, D, strides), constexpr flags).
    Without a bias the scale pointer stands in (never read). ``x`` and ``y`` must have
    passed through :func:`_tile_addressable`."""
    dot_fp32, precision = dot_precision(x.dtype)
    flags = dict(HAS_BIAS=bias is not None, DOT_FP32=dot_fp32, INPUT_PRECISION=precision)
    shape = (*x.shape, x.stride(0), x.stride(1), y.stride(0), y.stride(1))
    return (bias if bias is not None else scale), shape, flags


def _normalise(*weights: torch.Tensor):
    """Weights divided by their largest magnitude, and that magnitude (1 if all are 0):
    the logit-gradient chunk then holds values of order 1, which fp16 represents."""
    kappa = torch.stack([w.abs().amax() for w in weights]).amax()
    kappa = torch.where(kappa > 0, kappa, torch.ones_like(kappa))
    return [(w / kappa).contiguous() for w in weights], kappa


def _clip_forward_triton(x, y, scale, bias):
    x, y = _tile_addressable(x), _tile_addressable(y)
    n = x.shape[0]
    groups, splits = _stat_grid(n)
    f32 = dict(dtype=torch.float32, device=x.device)
    row_max = torch.empty((splits, n), **f32)
    row_sum = torch.empty((splits, n), **f32)
    col_max = torch.full((groups, n), float("-inf"), **f32)  # groups without rows keep these
    col_sum = torch.zeros((groups, n), **f32)
    diag = torch.empty((n,), **f32)
    bias_arg, shape, flags = _kernel_args(x, y, scale, bias)
    with _device_guard(x):
        _clip_stats_kernel[(groups * splits,)](
            x, y, scale, bias_arg, row_max, row_sum, col_max, col_sum, diag,
            *shape, groups, next_pow2_bucket(n), **flags,
        )  # fmt: skip
    lse_row = _merge_lse2(row_max, row_sum)
    lse_col = _merge_lse2(col_max, col_sum)
    return torch.stack((lse_row - diag, lse_col - diag)), lse_row, lse_col


def _chunked_grads(x, y, scale, weights, chunk_rows, launch, factor, logit_bias=None):
    """Feature, scale and bias gradients from a logit-gradient kernel run chunk by chunk.

    ``weights`` are the upstream per-row (and per-column) weights; they are normalised
    (see :func:`_normalise`) and ``launch(grid, weights, buf, partials, stride, row0, rows)``
    runs the kernel for rows row0 .. row0 + rows into ``buf``, with per-program sums of
    grad * logits and of grad in partials[0] and partials[1] (``stride`` apart), the
    kernel's logits being f (s XY^T + b'), b' = ``logit_bias`` or 0. The scale gradient,
    sum(grad * XY^T), is then (sum(grad * logits) / f - b' sum(grad)) / s, from values the
    kernel holds anyway. At s = 0 that quotient is undefined and the sum comes from the
    dx product instead (exact up to the rounding of the stored chunk). Returns dx, dy,
    dscale, dbias.
    """
    n = x.shape[0]
    weights, kappa = _normalise(*weights)
    splits = _col_splits(min(chunk_rows, n), n, x.device)
    max_prog = _max_programs(chunk_rows, splits)
    n_chunks = triton.cdiv(n, chunk_rows)
    partials = torch.zeros((n_chunks, 2, max_prog), dtype=torch.float32, device=x.device)

    def fill(buf, c, row0, rows):
        grid = lambda meta: (triton.cdiv(rows, meta["BM"]), splits)  # noqa: E731
        launch(grid, weights, buf, partials[c], max_prog, row0, rows)

    s = scale.float()
    with _device_guard(x):
        dx, dy, g_dot_xy = _feature_grads(x, y, s * kappa, chunk_rows, fill)
    g_dot_logits, g_sum = partials[:, 0].sum(), partials[:, 1].sum()
    if logit_bias is not None:
        g_dot_logits = g_dot_logits - factor * logit_bias.float() * g_sum
    dscale = torch.where(s != 0, g_dot_logits / (factor * s), g_dot_xy)
    return dx, dy, dscale * kappa, g_sum * kappa


def _clip_backward_triton(x, y, scale, bias, lse_row, lse_col, grad_losses, chunk_rows):
    x, y = _tile_addressable(x), _tile_addressable(y)
    n = x.shape[0]
    bias_arg, shape, flags = _kernel_args(x, y, scale, bias)

    def launch(grid, weights, buf, partials, stride, row0, rows):
        w_row, w_col = weights
        _clip_grad_kernel[grid](
            x, y, scale, bias_arg, lse_row, lse_col, w_row, w_col,
            buf, buf.stride(0), partials, stride,
            row0, rows, *shape, next_pow2_bucket(n), **flags,
        )  # fmt: skip

    weights = (grad_losses[0].float(), grad_losses[1].float())
    # the kernel's logit term is a = s log2(e) XY^T, without the bias
    return _chunked_grads(x, y, scale, weights, chunk_rows, launch, LOG2E)


def _siglip_rows_triton(x, y, scale, bias):
    x, y = _tile_addressable(x), _tile_addressable(y)
    n = x.shape[0]
    splits = _col_splits(n, n, x.device)
    loss = torch.empty((splits, n), dtype=torch.float32, device=x.device)
    bias_arg, shape, flags = _kernel_args(x, y, scale, bias)
    grid = lambda meta: (triton.cdiv(n, meta["BM"]), splits)  # noqa: E731
    with _device_guard(x):
        # loss stands in for the gradient pointers, which this variant never touches
        _siglip_kernel[grid](
            x, y, scale, bias_arg, loss, loss, loss, 0, loss, 0,
            0, n, *shape, next_pow2_bucket(n), WRITE_GRAD=False, **flags,
        )  # fmt: skip
    return loss.sum(0)


def _siglip_grads_triton(x, y, scale, bias, w_rows, chunk_rows):
    """(dx, dy, dscale, dbias, per-row losses) of sum_i w_rows[i] * l_i."""
    x, y = _tile_addressable(x), _tile_addressable(y)
    n = x.shape[0]
    splits = _col_splits(min(chunk_rows, n), n, x.device)
    loss = torch.empty((splits, n), dtype=torch.float32, device=x.device)
    bias_arg, shape, flags = _kernel_args(x, y, scale, bias)

    def launch(grid, weights, buf, partials, stride, row0, rows):
        (w,) = weights
        _siglip_kernel[grid](
            x, y, scale, bias_arg, w, loss, buf, buf.stride(0), partials, stride,
            row0, rows, *shape, next_pow2_bucket(n), WRITE_GRAD=True, **flags,
        )  # fmt: skip

    # the kernel's logit term is S = s XY^T + b itself
    dx, dy, dscale, dbias = _chunked_grads(
        x, y, scale, (w_rows.float(),), chunk_rows, launch, 1.0, bias
    )
    return dx, dy, dscale, dbias, loss.sum(0)


# --------------------------------------------------------------------------------------
# PyTorch reference (chunked: memory O(chunk x N), never N x N)
# --------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _torch_chunk_rows(n: int, chunk_rows: int) -> int:
    return chunk_rows if chunk_rows > 0 else min(n, max(1, (1 << 24) // n))


def _upcast(x, y, scale, bias):
    ct = _compute_dtype(x.dtype)
    return x.to(ct), y.to(ct), scale.to(ct), (bias.to(ct) if bias is not None else None)


def _clip_forward_torch(x, y, scale, bias, chunk_rows):
    xf, yf, s, b = _upcast(x, y, scale, bias)
    n = x.shape[0]
    c = _torch_chunk_rows(n, chunk_rows)
    lse_row = torch.empty(n, dtype=xf.dtype, device=x.device)
    diag = torch.empty(n, dtype=xf.dtype, device=x.device)
    lse_col = torch.full((n,), float("-inf"), dtype=xf.dtype, device=x.device)
    for r0 in range(0, n, c):
        logits = s * (xf[r0 : r0 + c] @ yf.T)
        if b is not None:
            logits = logits + b
        lse_row[r0 : r0 + c] = torch.logsumexp(logits, 1)
        diag[r0 : r0 + c] = logits.diagonal(offset=r0)
        lse_col = torch.logaddexp(lse_col, torch.logsumexp(logits, 0))
    return torch.stack((lse_row - diag, lse_col - diag)), lse_row, lse_col


def _clip_backward_torch(x, y, scale, bias, lse_row, lse_col, grad_losses, chunk_rows):
    xf, yf, s, b = _upcast(x, y, scale, bias)
    n = x.shape[0]
    c = _torch_chunk_rows(n, chunk_rows)
    u, v = grad_losses[0].to(xf.dtype), grad_losses[1].to(xf.dtype)
    lse_row, lse_col = lse_row.to(xf.dtype), lse_col.to(xf.dtype)
    dx = torch.empty_like(xf)
    dy = torch.zeros_like(yf)
    dscale = torch.zeros((), dtype=xf.dtype, device=x.device)
    dbias = torch.zeros((), dtype=xf.dtype, device=x.device)
    for r0 in range(0, n, c):
        dots = xf[r0 : r0 + c] @ yf.T
        logits = s * dots if b is None else s * dots + b
        rows = slice(r0, r0 + logits.shape[0])
        g = u[rows, None] * torch.exp(logits - lse_row[rows, None]) + v[None, :] * torch.exp(
            logits - lse_col[None, :]
        )
        g.diagonal(offset=r0).sub_(u[rows] + v[rows])
        dx[rows] = s * (g @ yf)
        dy.add_(s * (g.T @ xf[rows]))
        dscale += (g * dots).sum()
        dbias += g.sum()
    return dx.to(x.dtype), dy.to(y.dtype), dscale, dbias


def _siglip_chunk(xf, yf, s, b, r0, c):
    """(dots, margins) for rows r0 .. r0 + c: dots = X Y^T, margins = z * S with z = +1 on
    the diagonal and -1 elsewhere (no z matrix is built)."""
    dots = xf[r0 : r0 + c] @ yf.T
    margins = -s * dots if b is None else (-s) * dots - b
    margins.diagonal(offset=r0).neg_()
    return dots, margins


def _siglip_rows_torch(x, y, scale, bias, chunk_rows):
    xf, yf, s, b = _upcast(x, y, scale, bias)
    n = x.shape[0]
    c = _torch_chunk_rows(n, chunk_rows)
    out = torch.empty(n, dtype=xf.dtype, device=x.device)
    for r0 in range(0, n, c):
        _, margins = _siglip_chunk(xf, yf, s, b, r0, c)
        out[r0 : r0 + c] = torch.nn.functional.softplus(margins.neg_()).sum(1)
    return out


def _siglip_grads_torch(x, y, scale, bias, w_rows, chunk_rows):
    xf, yf, s, b = _upcast(x, y, scale, bias)
    n = x.shape[0]
    c = _torch_chunk_rows(n, chunk_rows)
    w = w_rows.to(xf.dtype)
    dx = torch.empty_like(xf)
    dy = torch.zeros_like(yf)
    rows_loss = torch.empty(n, dtype=xf.dtype, device=x.device)
    dscale = torch.zeros((), dtype=xf.dtype, device=x.device)
    dbias = torch.zeros((), dtype=xf.dtype, device=x.device)
    for r0 in range(0, n, c):
        dots, margins = _siglip_chunk(xf, yf, s, b, r0, c)
        rows = slice(r0, r0 + margins.shape[0])
        neg = margins.neg_()  # -z S
        rows_loss[rows] = torch.nn.functional.softplus(neg).sum(1)  # -logsigmoid(z S)
        g = neg.sigmoid_().mul_(w[rows, None])  # -z sigmoid(-z S) w, before the sign flip
        g.diagonal(offset=r0).neg_()
        dx[rows] = s * (g @ yf)
        dy.add_(s * (g.T @ xf[rows]))
        dscale += (g * dots).sum()
        dbias += g.sum()
    return dx.to(x.dtype), dy.to(y.dtype), dscale, dbias, rows_loss


# --------------------------------------------------------------------------------------
# Op registration
# --------------------------------------------------------------------------------------


def _triton_chunk_rows(x: torch.Tensor, chunk_size: int) -> int:
    n = x.shape[0]
    return min(n, chunk_size) if chunk_size > 0 else default_chunk_rows(n, x.element_size())


def _scalar_grads(ds, db, scale, bias):
    """Scale and bias gradients in their parameters' dtypes (fp32 stand-in for no bias)."""
    return ds.to(scale.dtype), db.to(bias.dtype if bias is not None else torch.float32)


@torch.library.custom_op("vlmkernels::clip_loss_forward", mutates_args=())
def _clip_loss_forward(
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-sample losses (2, N) [image-to-text; text-to-image], row lse (N), column lse (N)),
    fp32 (fp64 for fp64 inputs)."""
    if resolve_backend("clip_loss", x) == "triton":
        return _clip_forward_triton(x, y, scale, bias)
    return _clip_forward_torch(x, y, scale, bias, chunk_size)


@_clip_loss_forward.register_fake
def _(x, y, scale, bias, chunk_size):
    n, ct = x.shape[0], _compute_dtype(x.dtype)
    return x.new_empty((2, n), dtype=ct), x.new_empty((n,), dtype=ct), x.new_empty((n,), dtype=ct)


@torch.library.custom_op("vlmkernels::clip_loss_backward", mutates_args=())
def _clip_loss_backward(
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    lse_row: torch.Tensor,
    lse_col: torch.Tensor,
    grad_losses: torch.Tensor,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dy, dscale, dbias) for upstream gradients ``grad_losses`` (2, N) of the losses."""
    if resolve_backend("clip_loss", x) == "triton":
        dx, dy, ds, db = _clip_backward_triton(
            x, y, scale, bias, lse_row, lse_col, grad_losses, _triton_chunk_rows(x, chunk_size)
        )
    else:
        dx, dy, ds, db = _clip_backward_torch(
            x, y, scale, bias, lse_row, lse_col, grad_losses, chunk_size
        )
    return dx, dy, *_scalar_grads(ds, db, scale, bias)


def _requested(ctx, grads, has_bias: bool, n_non_tensor_args: int):
    """(dx, dy, dscale, dbias) where autograd asked for them, None elsewhere, then None
    for the trailing non-tensor arguments of the op."""
    dx, dy, ds, db = grads
    wanted = (dx, dy, ds, db if has_bias else None)
    need = ctx.needs_input_grad[:4]
    picked = (g if n else None for g, n in zip(wanted, need, strict=True))
    return (*picked, *([None] * n_non_tensor_args))


def _fake_grads(x, y, scale, bias):
    db_dtype = bias.dtype if bias is not None else torch.float32
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        torch.empty_like(y, memory_format=torch.contiguous_format),
        scale.new_empty(()),
        scale.new_empty((), dtype=db_dtype),
    )


@_clip_loss_backward.register_fake
def _(x, y, scale, bias, lse_row, lse_col, grad_losses, chunk_size):
    return _fake_grads(x, y, scale, bias)


def _clip_setup_context(ctx, inputs, output):
    x, y, scale, bias, chunk_size = inputs
    _, lse_row, lse_col = output
    ctx.save_for_backward(x, y, scale, bias, lse_row, lse_col)
    ctx.chunk_size = chunk_size
    ctx.mark_non_differentiable(lse_row, lse_col)


def _clip_backward(ctx, grad_losses, _grad_lse_row, _grad_lse_col):
    x, y, scale, bias, lse_row, lse_col = ctx.saved_tensors
    dx, dy, ds, db = torch.ops.vlmkernels.clip_loss_backward(
        x, y, scale, bias, lse_row, lse_col, grad_losses, ctx.chunk_size
    )
    return _requested(ctx, (dx, dy, ds, db), bias is not None, 1)


_clip_loss_forward.register_autograd(_clip_backward, setup_context=_clip_setup_context)


@torch.library.custom_op("vlmkernels::siglip_loss_forward", mutates_args=())
def _siglip_loss_forward(
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    chunk_size: int,
) -> torch.Tensor:
    """Per-image losses l_i = -sum_j logsigmoid(z_ij S_ij), (N,) fp32 (fp64 for fp64)."""
    if resolve_backend("siglip_loss", x) == "triton":
        return _siglip_rows_triton(x, y, scale, bias)
    return _siglip_rows_torch(x, y, scale, bias, chunk_size)


@_siglip_loss_forward.register_fake
def _(x, y, scale, bias, chunk_size):
    return x.new_empty((x.shape[0],), dtype=_compute_dtype(x.dtype))


@torch.library.custom_op("vlmkernels::siglip_loss_backward", mutates_args=())
def _siglip_loss_backward(
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    grad_rows: torch.Tensor,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dy, dscale, dbias) of sum_i grad_rows[i] * l_i."""
    if resolve_backend("siglip_loss", x) == "triton":
        dx, dy, ds, db, _ = _siglip_grads_triton(
            x, y, scale, bias, grad_rows, _triton_chunk_rows(x, chunk_size)
        )
    else:
        dx, dy, ds, db, _ = _siglip_grads_torch(x, y, scale, bias, grad_rows, chunk_size)
    return dx, dy, *_scalar_grads(ds, db, scale, bias)


@_siglip_loss_backward.register_fake
def _(x, y, scale, bias, grad_rows, chunk_size):
    return _fake_grads(x, y, scale, bias)


def _siglip_setup_context(ctx, inputs, output):
    x, y, scale, bias, chunk_size = inputs
    ctx.save_for_backward(x, y, scale, bias)
    ctx.chunk_size = chunk_size


def _siglip_backward(ctx, grad_rows):
    x, y, scale, bias = ctx.saved_tensors
    dx, dy, ds, db = torch.ops.vlmkernels.siglip_loss_backward(
        x, y, scale, bias, grad_rows, ctx.chunk_size
    )
    return _requested(ctx, (dx, dy, ds, db), bias is not None, 1)


_siglip_loss_forward.register_autograd(_siglip_backward, setup_context=_siglip_setup_context)


@torch.library.custom_op("vlmkernels::siglip_loss_fused", mutates_args=())
def _siglip_loss_fused(
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    row_weight: float,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, dx, dy, dscale, dbias) of loss = row_weight * sum_i l_i, in one pass: the
    gradients are computed with the loss and only scaled in backward."""
    w = torch.full((x.shape[0],), row_weight, dtype=_compute_dtype(x.dtype), device=x.device)
    if resolve_backend("siglip_loss", x) == "triton":
        dx, dy, ds, db, rows = _siglip_grads_triton(
            x, y, scale, bias, w, _triton_chunk_rows(x, chunk_size)
        )
    else:
        dx, dy, ds, db, rows = _siglip_grads_torch(x, y, scale, bias, w, chunk_size)
    return rows.sum() * row_weight, dx, dy, *_scalar_grads(ds, db, scale, bias)


@_siglip_loss_fused.register_fake
def _(x, y, scale, bias, row_weight, chunk_size):
    return (x.new_empty((), dtype=_compute_dtype(x.dtype)), *_fake_grads(x, y, scale, bias))


def _fused_setup_context(ctx, inputs, output):
    _, dx, dy, ds, db = output
    ctx.save_for_backward(dx, dy, ds, db)
    ctx.has_bias = inputs[3] is not None


def _fused_backward(ctx, grad_loss, *_unused):
    grads = tuple(grad_loss * g for g in ctx.saved_tensors)
    return _requested(ctx, grads, ctx.has_bias, 2)


_siglip_loss_fused.register_autograd(_fused_backward, setup_context=_fused_setup_context)


# --------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------


def _prepare(op, image_features, text_features, logit_scale, logit_bias, reduction, chunk_size):
    """Checked arguments: (x, y, scale, bias, chunk_size, dtype of the result).

    Under autocast, fp32 features are cast to the autocast dtype and the loss is returned
    in fp32, as open_clip's matmul (autocast to 16 bits) and cross-entropy (to fp32) do.
    """
    check_feature_pair(op, image_features, text_features)
    check_reduction(op, reduction)
    chunk = check_chunk_size(op, chunk_size)
    device = image_features.device
    scale = scalar_tensor(op, "logit_scale", logit_scale, device)
    bias = scalar_tensor(op, "logit_bias", logit_bias, device, optional=True)
    out_dtype = image_features.dtype
    if device.type in ("cuda", "cpu") and torch.is_autocast_enabled(device.type):
        out_dtype = torch.float32
        if image_features.dtype == torch.float32:
            low = torch.get_autocast_dtype(device.type)
            image_features, text_features = image_features.to(low), text_features.to(low)
    return image_features, text_features, scale, bias, chunk, out_dtype


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale,
    logit_bias=None,
    *,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> torch.Tensor:
    r"""Symmetric InfoNCE (CLIP) loss without the N x N logits in memory.

    ``(CE(s I T^T + b, arange) + CE(s T I^T + b, arange)) / 2``, as open_clip's ``ClipLoss``.

    Args:
        image_features: (N, d) float16, bfloat16, float32 (or float64 on the torch backend).
        text_features: (N, d), same dtype and device.
        logit_scale: the multiplier s itself (open_clip passes ``logit_scale.exp()``): a float
            or a 0-d tensor, which receives a gradient when it requires one.
        logit_bias: optional additive bias b, float or 0-d tensor.
        reduction: ``"mean"`` (the CLIP loss), ``"sum"`` (N times the mean: the two
            directions' summed cross-entropies, halved) or ``"none"``: a (2, N) tensor whose
            rows are the per-sample image-to-text and text-to-image losses.
        chunk_size: rows of logit gradient materialised at once in the backward pass
            (memory ``chunk_size * N`` elements); None picks a 128 MiB chunk.

    Returns:
        The loss in the features' dtype (computed in fp32); under autocast, fp32 features
        are cast to the autocast dtype and the loss is fp32, as open_clip's would be.
    """
    x, y, scale, bias, chunk, out_dtype = _prepare(
        "clip_loss", image_features, text_features, logit_scale, logit_bias, reduction, chunk_size
    )
    losses, _, _ = torch.ops.vlmkernels.clip_loss_forward(x, y, scale, bias, chunk)
    if reduction == "mean":
        out = losses.mean()
    elif reduction == "sum":
        out = losses.sum() * 0.5
    else:
        out = losses
    return out.to(out_dtype)


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale,
    logit_bias,
    *,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> torch.Tensor:
    r"""Pairwise sigmoid (SigLIP) loss without the N x N logits in memory.

    ``-sum_ij logsigmoid(z_ij (s I_i . T_j + b)) / N`` with z = +1 on the diagonal and -1
    elsewhere, as open_clip's ``SigLipLoss`` on one device.

    Args:
        image_features, text_features: (N, d), as in :func:`clip_loss`.
        logit_scale: the multiplier s (open_clip passes ``logit_scale.exp()``).
        logit_bias: the bias b (float, 0-d tensor, or None for no bias).
        reduction: ``"mean"`` (sum over all pairs / N, open_clip's normalisation), ``"sum"``
            or ``"none"``: the (N,) per-image losses ``-sum_j logsigmoid(z_ij S_ij)``.
        chunk_size: rows of logit gradient materialised at once; None picks 128 MiB.

    When a scalar loss needs gradients, they are computed in the forward pass (no
    recomputation of the logits) and the backward pass scales them by the upstream gradient.
    """
    x, y, scale, bias, chunk, out_dtype = _prepare(
        "siglip_loss",
        image_features,
        text_features,
        logit_scale,
        logit_bias,
        reduction,
        chunk_size,
    )
    n = x.shape[0]
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, y, scale, bias)
    )
    if reduction != "none" and wants_grad:
        weight = 1.0 / n if reduction == "mean" else 1.0
        loss = torch.ops.vlmkernels.siglip_loss_fused(x, y, scale, bias, weight, chunk)[0]
        return loss.to(out_dtype)
    rows = torch.ops.vlmkernels.siglip_loss_forward(x, y, scale, bias, chunk)
    if reduction == "mean":
        out = rows.sum() / n
    elif reduction == "sum":
        out = rows.sum()
    else:
        out = rows
    return out.to(out_dtype)

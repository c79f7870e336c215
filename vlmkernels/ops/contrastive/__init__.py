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
(chunk_size x N) elements; never N x N. No atomics: the results are deterministic. With
``chunk_size=None`` the chunk temporaries stay within ``CHUNK_BUDGET_BYTES`` (128 MiB): the
Triton path's one chunk in the input dtype (at least 256 rows); on the PyTorch path (CPU)
all of its (chunk x N) buffers together: two fp32 ones (three with a teacher, plus a bool
one with ids). With an explicit ``chunk_size`` the PyTorch path's temporaries are at most
3.25 x chunk_size x N fp32 elements (fp64 for fp64 inputs); 16-bit inputs add their fp32
copies (O(N d)) there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math

import torch
import triton
import triton.language as tl

from ...core.backend import in_forward_backend, remember_backend, resolve_backend
from ...core.checks import (
    check_bool,
    check_chunk_size,
    check_compatible,
    check_feature_pair,
    check_features,
    check_int,
    check_real,
    check_reduction,
    scalar_tensor,
)
from ...core.runtime import INTERPRETED, autotune_configs, dot_precision, next_pow2_bucket, sm_count
from ...core.tuning import tuned

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


@triton.jit
def _hard_mask(rows, cols, rid, cid, valid, offset, IDS: tl.constexpr):
    """Positive pairs of a tile: equal ids, or column = row + offset."""
    if IDS:
        hard = (rid[:, None] == cid[None, :]) & valid
    else:
        hard = (rows[:, None] + offset == cols[None, :]) & valid
    return hard


# fmt: off
_STATS_KEY = ["D", "n_bucket", "ROWS", "COLS", "IDS", "SMOOTH", "TEACHER"]


@tuned("clip_stats", configs=_CONFIGS, key=_STATS_KEY, sizes=["D", "n_bucket"])
@_even_k
@triton.jit
def _clip_stats_kernel(
    x_ptr, y_ptr, scale_ptr, bias_ptr,
    row_ids_ptr, col_ids_ptr, xt_ptr, yt_ptr, tscale_ptr, t_lse_row_ptr, t_lse_col_ptr,
    row_max_ptr, row_sum_ptr, col_max_ptr, col_sum_ptr, row_acc_ptr, col_acc_ptr,
    M, N, D, offset, stride_xn, stride_xd, stride_yn, stride_yd,
    stride_txn, stride_txd, stride_tyn, stride_tyd, num_row_groups, n_bucket,
    ROWS: tl.constexpr, COLS: tl.constexpr, IDS: tl.constexpr, SMOOTH: tl.constexpr,
    TEACHER: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr,
):
    """One pass over the tiles of the M x N logits S = s X Y^T + b for the statistics of
    its rows (``ROWS``) and of its columns (``COLS``).

    Per row and per column: the log-sum-exp as a base-2 (max, sum of 2^(t - max)) pair,
    t = S log2(e), and additive sums over the other side: of S on positive pairs (slot 0;
    positives are ``col = row + offset``, or equal ids with ``IDS``), of positive pairs
    (slot 1, ``IDS``), of S (slot 2, label smoothing) and of softmax(T) S for teacher logits
    T = s_t X_t Y_t^T (slot 3, ``TEACHER``, given the teacher's log-sum-exp).

    Program (g, k) owns a rectangle of tiles: the row blocks of group g times the column
    blocks of split k. It keeps the statistics of its current row block in registers and
    those of its columns in its own slot g of the column partials (read back, updated and
    written per tile; no other program touches that slot). The host merges the
    num_col_splits row partials and the num_row_groups column partials.
    """
    pid = tl.program_id(0)
    num_col_splits = tl.num_programs(0) // num_row_groups
    g = pid % num_row_groups  # consecutive programs share column tiles in L2
    k = pid // num_row_groups
    i_lo, i_hi = _block_range(g, num_row_groups, M, BM)
    j_lo, j_hi = _block_range(k, num_col_splits, N, BN)
    scale, bias = _scale_and_bias(scale_ptr, bias_ptr, HAS_BIAS)
    scale2 = scale * _LOG2E
    if TEACHER:
        tscale2 = tl.load(tscale_ptr).to(tl.float32) * _LOG2E
    row_slot = tl.cast(num_col_splits, tl.int64) * M
    col_slot = tl.cast(num_row_groups, tl.int64) * N
    row_max_ptr += k.to(tl.int64) * M
    row_sum_ptr += k.to(tl.int64) * M
    row_acc_ptr += k.to(tl.int64) * M
    col_max_ptr += g.to(tl.int64) * N
    col_sum_ptr += g.to(tl.int64) * N
    col_acc_ptr += g.to(tl.int64) * N

    for i in range(i_lo, i_hi):
        rows = i * BM + tl.arange(0, BM)
        row_mask = rows < M
        keep_r = row_mask.to(tl.float32)
        row_offset = bias * _LOG2E + _pad(row_mask)
        rid = rows
        if IDS:
            rid = tl.load(row_ids_ptr + rows, mask=row_mask, other=0)
        if TEACHER:
            t_lse_r = tl.load(t_lse_row_ptr + rows, mask=row_mask, other=0.0) * _LOG2E
        m_row = tl.full((BM,), _NEG_INF, tl.float32)
        l_row = tl.zeros((BM,), tl.float32)
        hard_dot_r = tl.zeros((BM,), tl.float32)
        hard_cnt_r = tl.zeros((BM,), tl.float32)
        logit_sum_r = tl.zeros((BM,), tl.float32)
        teacher_dot_r = tl.zeros((BM,), tl.float32)
        for j in range(j_lo, j_hi):
            cols = j * BN + tl.arange(0, BN)
            col_mask = cols < N
            keep_c = col_mask.to(tl.float32)
            valid = row_mask[:, None] & col_mask[None, :]
            acc = _logits_tile(x_ptr, y_ptr, i * BM, j * BN, row_mask, col_mask, D,
                               stride_xn, stride_xd, stride_yn, stride_yd,
                               BM, BN, BK, EVEN_K, DOT_FP32, INPUT_PRECISION)
            # t = S log2(e), -inf on padding rows and columns
            t = acc * scale2 + row_offset[:, None] + _pad(col_mask)[None, :]
            logits = acc * scale + bias
            cid = cols
            if IDS:
                cid = tl.load(col_ids_ptr + cols, mask=col_mask, other=0)
            # nothing to read back on the group's first row block
            seen = col_mask & ((cols * 0 + i) > i_lo)

            if IDS:
                hard = _hard_mask(rows, cols, rid, cid, valid, offset, IDS)
                hard_dot_r += tl.sum(tl.where(hard, logits, 0.0), 1)
                hard_cnt_r += tl.sum(hard.to(tl.float32), 1)
                if COLS:
                    dot_c = tl.load(col_acc_ptr + cols, mask=seen, other=0.0)
                    cnt_c = tl.load(col_acc_ptr + col_slot + cols, mask=seen, other=0.0)
                    dot_c += tl.sum(tl.where(hard, logits, 0.0), 0)
                    cnt_c += tl.sum(hard.to(tl.float32), 0)
                    tl.store(col_acc_ptr + cols, dot_c, mask=col_mask)
                    tl.store(col_acc_ptr + col_slot + cols, cnt_c, mask=col_mask)
            elif _diagonal_tile(i * BM + offset, j * BN, BM, BN):
                hard = _hard_mask(rows, cols, rid, cid, valid, offset, IDS)
                hard_dot_r += tl.sum(tl.where(hard, logits, 0.0), 1)
            if SMOOTH:
                logit_sum_r += tl.sum(logits * keep_c[None, :], 1)
                if COLS:
                    sum_c = tl.load(col_acc_ptr + 2 * col_slot + cols, mask=seen, other=0.0)
                    sum_c += tl.sum(logits * keep_r[:, None], 0)
                    tl.store(col_acc_ptr + 2 * col_slot + cols, sum_c, mask=col_mask)
            if TEACHER:
                teacher = _logits_tile(xt_ptr, yt_ptr, i * BM, j * BN, row_mask, col_mask, D,
                                       stride_txn, stride_txd, stride_tyn, stride_tyd,
                                       BM, BN, BK, EVEN_K, DOT_FP32, INPUT_PRECISION)
                tt = teacher * tscale2 + _pad(row_mask)[:, None] + _pad(col_mask)[None, :]
                if ROWS:
                    p_row = tl.exp2(tt - t_lse_r[:, None])
                    teacher_dot_r += tl.sum(p_row * logits, 1)
                if COLS:
                    t_lse_c = tl.load(t_lse_col_ptr + cols, mask=col_mask, other=0.0) * _LOG2E
                    p_col = tl.exp2(tt - t_lse_c[None, :])
                    tdot_c = tl.load(col_acc_ptr + 3 * col_slot + cols, mask=seen, other=0.0)
                    tdot_c += tl.sum(p_col * logits, 0)
                    tl.store(col_acc_ptr + 3 * col_slot + cols, tdot_c, mask=col_mask)

            if ROWS:
                # rows of padding stay at -inf: shift them by 0 instead of -inf (no NaN)
                m_new = tl.maximum(m_row, tl.max(t, 1))
                m_use = tl.where(m_new == _NEG_INF, 0.0, m_new)
                l_row = l_row * tl.exp2(m_row - m_use) + tl.sum(tl.exp2(t - m_use[:, None]), 1)
                m_row = m_new
            if COLS:
                m_col = tl.load(col_max_ptr + cols, mask=seen, other=_NEG_INF)
                l_col = tl.load(col_sum_ptr + cols, mask=seen, other=0.0)
                m_col_new = tl.maximum(m_col, tl.max(t, 0))
                m_use = tl.where(m_col_new == _NEG_INF, 0.0, m_col_new)
                l_col = l_col * tl.exp2(m_col - m_use) + tl.sum(tl.exp2(t - m_use[None, :]), 0)
                tl.store(col_max_ptr + cols, m_col_new, mask=col_mask)
                tl.store(col_sum_ptr + cols, l_col, mask=col_mask)
            # the next read of these columns may come from other threads of this program
            tl.debug_barrier()
        if ROWS:
            tl.store(row_max_ptr + rows, m_row, mask=row_mask)
            tl.store(row_sum_ptr + rows, l_row, mask=row_mask)
        tl.store(row_acc_ptr + rows, hard_dot_r, mask=row_mask)
        if IDS:
            tl.store(row_acc_ptr + row_slot + rows, hard_cnt_r, mask=row_mask)
        if SMOOTH:
            tl.store(row_acc_ptr + 2 * row_slot + rows, logit_sum_r, mask=row_mask)
        if TEACHER:
            tl.store(row_acc_ptr + 3 * row_slot + rows, teacher_dot_r, mask=row_mask)


_GRAD_KEY = ["D", "n_bucket", "ROWS", "COLS", "IDS", "SMOOTH", "TEACHER"]


@tuned("clip_grad", configs=_CONFIGS, key=_GRAD_KEY, sizes=["D", "n_bucket"])
@_even_k
@triton.jit
def _clip_grad_kernel(
    x_ptr, y_ptr, scale_ptr, bias_ptr, row_ids_ptr, col_ids_ptr,
    xt_ptr, yt_ptr, tscale_ptr, row_coef_ptr, col_coef_ptr,
    grad_ptr, stride_gm, partial_ptr, partial_stride,
    row0, n_rows, N, D, offset, stride_xn, stride_xd, stride_yn, stride_yd,
    stride_txn, stride_txd, stride_tyn, stride_tyd, coef_stride_r, coef_stride_c, n_bucket,
    ROWS: tl.constexpr, COLS: tl.constexpr, IDS: tl.constexpr, SMOOTH: tl.constexpr,
    TEACHER: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr,
):
    """Rows row0 .. row0 + n_rows of the logit gradient of a block, written to ``grad``.

    With, per row i (``ROWS``) and per column j (``COLS``), the log-sum-exp r_i / c_j, the
    upstream weight u_i / v_j and the target coefficients h (positives), e (smoothing) and
    a (teacher), stored as coef[0..5] = (lse, u, h, e, a, teacher lse):

        grad_ij = u_i exp(S_ij - r_i) - h_i P_ij - e_i - a_i exp(T_ij - rt_i)      (rows)
                + v_j exp(S_ij - c_j) - h'_j P_ij - e'_j - a'_j exp(T_ij - ct_j)   (columns)

    P the positive pairs. Program (m, k) covers row block m of the chunk and the column
    blocks of split k, and writes sum(grad * s log2(e) XY^T) and sum(grad) (the scale and
    bias gradients' shares) to partial[0, pid] and partial[1, pid]. Padding rows and
    columns contribute exactly 0: their exponents carry -inf and their weights are 0.
    """
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    j_lo, j_hi = _block_range(split, num_splits, N, BN)
    local = pid_m * BM + tl.arange(0, BM)
    row_mask = local < n_rows
    rows = row0 + local
    keep_r = row_mask.to(tl.float32)
    scale, bias = _scale_and_bias(scale_ptr, bias_ptr, HAS_BIAS)
    scale2 = scale * _LOG2E
    bias2 = bias * _LOG2E
    row_pad = _pad(row_mask)
    if ROWS:
        row_shift = bias2 - tl.load(row_coef_ptr + rows, mask=row_mask, other=0.0) * _LOG2E
        w_r = tl.load(row_coef_ptr + coef_stride_r + rows, mask=row_mask, other=0.0)
        h_r = tl.load(row_coef_ptr + 2 * coef_stride_r + rows, mask=row_mask, other=0.0)
        if SMOOTH:
            e_r = tl.load(row_coef_ptr + 3 * coef_stride_r + rows, mask=row_mask, other=0.0)
        if TEACHER:
            a_r = tl.load(row_coef_ptr + 4 * coef_stride_r + rows, mask=row_mask, other=0.0)
            t_shift_r = -tl.load(row_coef_ptr + 5 * coef_stride_r + rows, mask=row_mask,
                                 other=0.0) * _LOG2E
    else:
        h_r = keep_r * 0.0
    if TEACHER:
        tscale2 = tl.load(tscale_ptr).to(tl.float32) * _LOG2E
    rid = rows
    if IDS:
        rid = tl.load(row_ids_ptr + rows, mask=row_mask, other=0)
    grad_rows = grad_ptr + local.to(tl.int64)[:, None] * stride_gm

    dscale_acc = tl.zeros((BM,), tl.float32)
    dbias_acc = tl.zeros((BM,), tl.float32)
    for j in range(j_lo, j_hi):
        cols = j * BN + tl.arange(0, BN)
        col_mask = cols < N
        col_pad = _pad(col_mask)
        valid = row_mask[:, None] & col_mask[None, :]
        acc = _logits_tile(x_ptr, y_ptr, row0 + pid_m * BM, j * BN, row_mask, col_mask, D,
                           stride_xn, stride_xd, stride_yn, stride_yd,
                           BM, BN, BK, EVEN_K, DOT_FP32, INPUT_PRECISION)
        a = acc * scale2
        grad = tl.zeros((BM, BN), tl.float32)
        if ROWS:
            grad += w_r[:, None] * tl.exp2(a + row_shift[:, None] + col_pad[None, :])
        if COLS:
            col_shift = bias2 - tl.load(col_coef_ptr + cols, mask=col_mask, other=0.0) * _LOG2E
            w_c = tl.load(col_coef_ptr + coef_stride_c + cols, mask=col_mask, other=0.0)
            h_c = tl.load(col_coef_ptr + 2 * coef_stride_c + cols, mask=col_mask, other=0.0)
            grad += w_c[None, :] * tl.exp2(a + col_shift[None, :] + row_pad[:, None])
        else:
            h_c = col_mask.to(tl.float32) * 0.0
        if IDS:
            cid = tl.load(col_ids_ptr + cols, mask=col_mask, other=0)
            hard = _hard_mask(rows, cols, rid, cid, valid, offset, IDS)
            grad = tl.where(hard, grad - (h_r[:, None] + h_c[None, :]), grad)
        elif _diagonal_tile(row0 + pid_m * BM + offset, j * BN, BM, BN):
            # rows past the chunk are padding here even where they are rows of the matrix
            hard = _hard_mask(rows, cols, rows, cols, valid, offset, IDS)
            grad = tl.where(hard, grad - (h_r[:, None] + h_c[None, :]), grad)
        if SMOOTH:
            keep_c = col_mask.to(tl.float32)
            if ROWS:
                grad -= e_r[:, None] * keep_c[None, :]
            if COLS:
                e_c = tl.load(col_coef_ptr + 3 * coef_stride_c + cols, mask=col_mask, other=0.0)
                grad -= e_c[None, :] * keep_r[:, None]
        if TEACHER:
            teacher = _logits_tile(xt_ptr, yt_ptr, row0 + pid_m * BM, j * BN, row_mask,
                                   col_mask, D, stride_txn, stride_txd, stride_tyn, stride_tyd,
                                   BM, BN, BK, EVEN_K, DOT_FP32, INPUT_PRECISION)
            tt = teacher * tscale2
            if ROWS:
                grad -= a_r[:, None] * tl.exp2(tt + t_shift_r[:, None] + col_pad[None, :])
            if COLS:
                a_c = tl.load(col_coef_ptr + 4 * coef_stride_c + cols, mask=col_mask, other=0.0)
                t_lse_c = tl.load(col_coef_ptr + 5 * coef_stride_c + cols, mask=col_mask,
                                  other=0.0)
                grad -= a_c[None, :] * tl.exp2(tt - t_lse_c[None, :] * _LOG2E + row_pad[:, None])
        dscale_acc += tl.sum(grad * a, 1)
        dbias_acc += tl.sum(grad, 1)
        tl.store(grad_rows + cols[None, :], grad.to(grad_ptr.dtype.element_ty), mask=valid)
    pid = pid_m * num_splits + split
    tl.store(partial_ptr + pid, tl.sum(dscale_acc, 0))
    tl.store(partial_ptr + partial_stride + pid, tl.sum(dbias_acc, 0))


@tuned("siglip", configs=_CONFIGS, key=["D", "n_bucket", "WRITE_GRAD"], sizes=["D", "n_bucket"])
@_even_k
@triton.jit
def _siglip_kernel(
    x_ptr, y_ptr, scale_ptr, bias_ptr, w_row_ptr,
    loss_ptr, loss_stride, grad_ptr, stride_gm, partial_ptr, partial_stride,
    row0, n_rows, N, D, offset, stride_xn, stride_xd, stride_yn, stride_yd, n_bucket,
    HAS_BIAS: tl.constexpr, WRITE_GRAD: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr,
):
    """SigLIP over rows row0 .. row0 + n_rows of an M x N block: per-row loss partials, and
    optionally the logit gradient grad_ij = -w_i z_ij sigmoid(-z_ij S_ij), z = +1 on the
    positive pairs col = row + offset (none when that is out of the block), -1 elsewhere.

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
        margin = tl.where(rows[:, None] + offset == cols[None, :], logits, -logits)
        loss = tl.maximum(-margin, 0.0) + _log1p(tl.exp2(-tl.abs(margin) * _LOG2E))
        loss_acc += tl.sum(loss * keep[None, :], 1)
        if WRITE_GRAD:
            h = tl.exp2((-margin - loss) * _LOG2E) * (w_r[:, None] * keep[None, :])
            grad = tl.where(rows[:, None] + offset == cols[None, :], -h, h)
            tl.store(grad_rows + cols[None, :], grad.to(grad_ptr.dtype.element_ty),
                     mask=row_mask[:, None] & col_mask[None, :])
            dscale_acc -= tl.sum(h * margin, 1)
            dbias_acc += tl.sum(grad, 1)
    tl.store(loss_ptr + split.to(tl.int64) * loss_stride + rows, loss_acc, mask=row_mask)
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


CHUNK_BUDGET_BYTES = 128 << 20
"""Memory for the (chunk x N) temporaries when ``chunk_size`` is None: the Triton path's one
logit-gradient chunk (at least 256 rows), the PyTorch path's two or three chunk buffers
together."""


def default_chunk_rows(n: int, elem_size: int, budget_bytes: int = CHUNK_BUDGET_BYTES) -> int:
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


def _feature_grads(x, y, coef, chunk_rows, fill, dx_acc=None, dy_acc=None):
    """dx = coef * G y, dy = coef * G^T x and sum(G * (x y^T)) for the logit gradient G
    (M x N) of rows x (M, d) and columns y (N, d), made chunk by chunk.

    ``fill(buf, chunk, row0, n)`` writes rows row0 .. row0 + n of G into buf[:n]. The chunk
    is stored in the input dtype (a GEMM operand). Without accumulators dx is written per
    chunk in the input dtype and dy accumulated in fp32 then rounded; with fp32
    ``dx_acc`` / ``dy_acc`` both are added into them (ring steps). The scale gradient's sum
    comes from the dx product for free: sum_ij G_ij x_i . y_j = sum_i x_i . (G y)_i.
    Returns (dx, dy, that sum (fp32, before ``coef``)).
    """
    m, d = x.shape
    n = y.shape[0]
    buf = torch.empty((min(chunk_rows, m), n), dtype=x.dtype, device=x.device)
    dx = dx_acc if dx_acc is not None else torch.empty((m, d), dtype=x.dtype, device=x.device)
    dy = dy_acc if dy_acc is not None else torch.zeros((n, d), dtype=torch.float32,
                                                       device=x.device)  # fmt: skip
    g_dot_xy = torch.zeros((), dtype=torch.float32, device=x.device)
    for c, row0 in enumerate(range(0, m, chunk_rows)):
        rows = min(chunk_rows, m - row0)
        fill(buf, c, row0, rows)
        g = buf[:rows]
        x_rows = x[row0 : row0 + rows]
        gy = _mm_f32(g, y)
        g_dot_xy += (gy * x_rows).sum()
        if dx_acc is not None:
            dx[row0 : row0 + rows] += gy.mul_(coef)
        else:
            dx[row0 : row0 + rows] = gy.mul_(coef)
        if dy_acc is not None:  # other calls add with other coefficients: scale now
            dy.add_(_mm_f32(g.t(), x_rows).mul_(coef))
        else:
            _addmm_f32_(dy, g.t(), x_rows)
    del buf, g  # the rounded dy below can reuse the chunk's memory
    if dy_acc is not None:
        return dx, dy, g_dot_xy
    return dx, dy.mul_(coef).to(y.dtype), g_dot_xy


def _tile_addressable(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a contiguous copy where offsets inside a tile (up to 256 rows or columns
    of its strides) would not fit in 32 bits, as :func:`_logits_tile` assumes."""
    return t if 256 * max(t.stride()) < 2**31 else t.contiguous()


def _normalise(*weights: torch.Tensor):
    """Weights divided by their largest magnitude, and that magnitude (1 if all are 0):
    the logit-gradient chunk then holds values of order 1, which fp16 represents."""
    kappa = torch.stack([w.abs().amax() for w in weights]).amax()
    kappa = torch.where(kappa > 0, kappa, torch.ones_like(kappa))
    return [(w / kappa).contiguous() for w in weights], kappa


@dataclasses.dataclass(frozen=True)
class Targets:
    r"""Cross-entropy targets of a block of logits S (M x N), per direction.

    Positive pairs ("hard"): equal ids (``row_ids`` (M,), ``col_ids`` (N,)) if given, else
    col = row + ``offset``. For a row i with c_i positives among n classes, and teacher
    logits T = s_t X_t Y_t^T (``teacher`` = (X_t, Y_t, s_t), same shapes as X, Y):

        t_ij = (1 - alpha) ((1 - smoothing) hard_ij / c_i + smoothing / n)
               + alpha softmax_j(T_i.)

    and likewise for columns. The cross-entropy is lse_j(S_i.) - sum_j t_ij S_ij.
    """

    offset: int = 0
    row_ids: torch.Tensor | None = None
    col_ids: torch.Tensor | None = None
    smoothing: float = 0.0
    alpha: float = 0.0
    teacher: tuple | None = None

    @property
    def ids(self) -> bool:
        return self.row_ids is not None


@dataclasses.dataclass
class SideStats:
    """Statistics of the rows (or the columns) of a logit block over the other side:
    fp32 (L,) tensors, additive across blocks of the other side (``merge``)."""

    lse: torch.Tensor
    hard_dot: torch.Tensor  # sum of S over positive pairs
    hard_cnt: torch.Tensor  # number of positive pairs
    logit_sum: torch.Tensor | None = None  # sum of S (label smoothing)
    teacher_dot: torch.Tensor | None = None  # sum of softmax(T) S (distillation)

    def merge(self, other: SideStats) -> SideStats:
        def add(a, b):
            return None if a is None else a + b

        return SideStats(
            torch.logaddexp(self.lse, other.lse),
            self.hard_dot + other.hard_dot,
            self.hard_cnt + other.hard_cnt,
            add(self.logit_sum, other.logit_sum),
            add(self.teacher_dot, other.teacher_dot),
        )

    def losses(self, targets: Targets, n_classes: int) -> torch.Tensor:
        """Per-sample cross-entropy lse - sum_j t_ij S_ij once the stats are complete; NaN
        for a sample without positives whose targets need one (alpha < 1)."""
        hard = self.hard_dot / self.hard_cnt.clamp_min(1)
        hard = torch.where(_without_target(self.hard_cnt, targets), math.nan, hard)
        dot = (1 - targets.smoothing) * hard
        if targets.smoothing:
            dot = dot + targets.smoothing / n_classes * self.logit_sum
        dot = (1 - targets.alpha) * dot
        if targets.alpha:
            dot = dot + targets.alpha * self.teacher_dot
        return self.lse - dot

    def coefficients(self, targets: Targets, n_classes: int, weights: torch.Tensor,
                     teacher_lse: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
        """(6, L), in the dtype of the stats, for the gradient kernel: (lse, u, h, e, a,
        teacher lse) with u the upstream weights, h = u (1 - alpha)(1 - smoothing) / c,
        e = u (1 - alpha) smoothing / n, a = u alpha. u is NaN for a sample whose loss is
        NaN (no target) and whose upstream weight is not 0, so that every gradient its loss
        reaches is NaN too."""
        u = weights.to(self.lse.dtype)
        u = torch.where(_without_target(self.hard_cnt, targets) & (u != 0), math.nan, u)
        keep = 1 - targets.alpha
        h = torch.where(self.hard_cnt > 0, u * keep * (1 - targets.smoothing)
                        / self.hard_cnt.clamp_min(1), 0.0)  # fmt: skip
        e = u * keep * targets.smoothing / n_classes
        a = u * targets.alpha
        t_lse = teacher_lse if teacher_lse is not None else torch.zeros_like(u)
        return torch.stack((self.lse, u, h, e, a, t_lse.to(u.dtype)))


def _without_target(hard_cnt: torch.Tensor, targets: Targets) -> torch.Tensor:
    """Samples whose targets are undefined: no positive pair, and a hard part that needs
    one ((1 - alpha) > 0)."""
    return (hard_cnt == 0) & (targets.alpha < 1)


def _onehot_counts(m: int, n: int, offset: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive counts of rows and columns for positives at col = row + offset."""
    rows = torch.arange(m, device=device) + offset
    cols = torch.arange(n, device=device) - offset
    return ((rows >= 0) & (rows < n)).float(), ((cols >= 0) & (cols < m)).float()


def _onehot_col_dot(row_dot: torch.Tensor, n: int, offset: int) -> torch.Tensor:
    """Column sums of S over positives from the rows' (the same pairs, col = row + offset)."""
    j = torch.arange(n, device=row_dot.device) - offset
    inside = (j >= 0) & (j < row_dot.shape[0])
    return torch.where(inside, row_dot[j.clamp(0, max(row_dot.shape[0] - 1, 0))], 0.0)


def _teacher_args(targets: Targets, x, y):
    if targets.teacher is None:
        return x, y, x.new_ones((), dtype=torch.float32), (0, 0, 0, 0)
    xt, yt, st = targets.teacher
    xt, yt = _tile_addressable(xt), _tile_addressable(yt)
    return xt, yt, st, (xt.stride(0), xt.stride(1), yt.stride(0), yt.stride(1))


def _flags(x, bias, targets: Targets, rows: bool, cols: bool) -> dict:
    dot_fp32, precision = dot_precision(x.dtype)
    return dict(
        ROWS=rows, COLS=cols, IDS=targets.ids, SMOOTH=bool(targets.smoothing),
        TEACHER=targets.teacher is not None, HAS_BIAS=bias is not None, DOT_FP32=dot_fp32,
        INPUT_PRECISION=precision,
    )  # fmt: skip


def _block_stats_triton(x, y, scale, bias, targets: Targets, rows=True, cols=True,
                        teacher_lse=(None, None)):  # fmt: skip
    """(row SideStats or None, column SideStats or None) of the block S = s x y^T + b."""
    x, y = _tile_addressable(x), _tile_addressable(y)
    m, d = x.shape
    n = y.shape[0]
    groups = min(16, triton.cdiv(m, _NOMINAL_BLOCK))
    splits = min(16, triton.cdiv(n, _NOMINAL_BLOCK))
    f32 = dict(dtype=torch.float32, device=x.device)
    row_max = torch.empty((splits, m), **f32)
    row_sum = torch.empty((splits, m), **f32)
    col_max = torch.full((groups, n), float("-inf"), **f32)  # groups without rows keep these
    col_sum = torch.zeros((groups, n), **f32)
    row_acc = torch.zeros((4, splits, m), **f32)
    col_acc = torch.zeros((4, groups, n), **f32)
    xt, yt, st, t_strides = _teacher_args(targets, x, y)
    t_row, t_col = (t if t is not None else row_max for t in teacher_lse)
    ids_r = targets.row_ids if targets.ids else row_max
    ids_c = targets.col_ids if targets.ids else row_max
    with _device_guard(x):
        _clip_stats_kernel[(groups * splits,)](
            x, y, scale, bias if bias is not None else scale,
            ids_r, ids_c, xt, yt, st, t_row, t_col,
            row_max, row_sum, col_max, col_sum, row_acc, col_acc,
            m, n, d, targets.offset, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
            *t_strides, groups, next_pow2_bucket(max(m, n)),
            **_flags(x, bias, targets, rows, cols),
        )  # fmt: skip
    row_acc, col_acc = row_acc.sum(1), col_acc.sum(1)
    smooth, teach = bool(targets.smoothing), targets.teacher is not None
    row_cnt, col_cnt = _onehot_counts(m, n, targets.offset, x.device)
    row_stats = col_stats = None
    if rows:
        row_stats = SideStats(
            _merge_lse2(row_max, row_sum), row_acc[0],
            row_acc[1] if targets.ids else row_cnt,
            row_acc[2] if smooth else None, row_acc[3] if teach else None,
        )  # fmt: skip
    if cols:
        col_stats = SideStats(
            _merge_lse2(col_max, col_sum),
            col_acc[0] if targets.ids else _onehot_col_dot(row_acc[0], n, targets.offset),
            col_acc[1] if targets.ids else col_cnt,
            col_acc[2] if smooth else None, col_acc[3] if teach else None,
        )  # fmt: skip
    return row_stats, col_stats


def _block_grads_triton(x, y, scale, bias, targets: Targets, row_coef, col_coef, chunk_rows,
                        dx_acc=None, dy_acc=None):  # fmt: skip
    """Gradients of sum_i u_i l^row_i + sum_j v_j l^col_j for a block, from (6, M) / (6, N)
    coefficients (:meth:`SideStats.coefficients`; None for a direction not in the loss).

    Returns (dx, dy, dscale, dbias); with fp32 accumulators, dx and dy are added into them.
    """
    x, y = _tile_addressable(x), _tile_addressable(y)
    m, d = x.shape
    n = y.shape[0]
    rows, cols = row_coef is not None, col_coef is not None
    weights = [c[1] for c in (row_coef, col_coef) if c is not None]
    _, kappa = _normalise(*weights)
    scaled = [torch.cat((c[:1], c[1:5] / kappa, c[5:])).contiguous() if c is not None else None
              for c in (row_coef, col_coef)]  # fmt: skip
    r_coef = scaled[0] if rows else x.new_zeros((6, 1), dtype=torch.float32)
    c_coef = scaled[1] if cols else x.new_zeros((6, 1), dtype=torch.float32)
    xt, yt, st, t_strides = _teacher_args(targets, x, y)
    ids_r = targets.row_ids if targets.ids else r_coef
    ids_c = targets.col_ids if targets.ids else r_coef
    chunk_rows = min(chunk_rows, m)
    splits = _col_splits(chunk_rows, n, x.device)
    max_prog = _max_programs(chunk_rows, splits)
    partials = torch.zeros((triton.cdiv(m, chunk_rows), 2, max_prog), dtype=torch.float32,
                           device=x.device)  # fmt: skip
    flags = _flags(x, bias, targets, rows, cols)

    def fill(buf, c, row0, n_rows):
        grid = lambda meta: (triton.cdiv(n_rows, meta["BM"]), splits)  # noqa: E731
        _clip_grad_kernel[grid](
            x, y, scale, bias if bias is not None else scale, ids_r, ids_c, xt, yt, st,
            r_coef, c_coef, buf, buf.stride(0), partials[c], max_prog,
            row0, n_rows, n, d, targets.offset,
            x.stride(0), x.stride(1), y.stride(0), y.stride(1), *t_strides,
            r_coef.stride(0), c_coef.stride(0), next_pow2_bucket(max(m, n)), **flags,
        )  # fmt: skip

    s = scale.float()
    with _device_guard(x):
        dx, dy, g_dot_xy = _feature_grads(x, y, s * kappa, chunk_rows, fill, dx_acc, dy_acc)
    # the kernel's logit term is a = s log2(e) XY^T (no bias): sum(grad a) / (s log2 e)
    g_dot_logits, g_sum = partials[:, 0].sum(), partials[:, 1].sum()
    dscale = torch.where(s != 0, g_dot_logits / (LOG2E * s), g_dot_xy)
    return dx, dy, dscale * kappa, g_sum * kappa


def _siglip_rows_triton(x, y, scale, bias, offset=0):
    x, y = _tile_addressable(x), _tile_addressable(y)
    m, d = x.shape
    n = y.shape[0]
    splits = _col_splits(m, n, x.device)
    loss = torch.empty((splits, m), dtype=torch.float32, device=x.device)
    dot_fp32, precision = dot_precision(x.dtype)
    grid = lambda meta: (triton.cdiv(m, meta["BM"]), splits)  # noqa: E731
    with _device_guard(x):
        # loss stands in for the gradient pointers, which this variant never touches
        _siglip_kernel[grid](
            x, y, scale, bias if bias is not None else scale, loss, loss, m, loss, 0, loss, 0,
            0, m, n, d, offset, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
            next_pow2_bucket(max(m, n)), HAS_BIAS=bias is not None, WRITE_GRAD=False,
            DOT_FP32=dot_fp32, INPUT_PRECISION=precision,
        )  # fmt: skip
    return loss.sum(0)


def _siglip_grads_triton(x, y, scale, bias, w_rows, chunk_rows, offset=0, dx_acc=None,
                         dy_acc=None):  # fmt: skip
    """(dx, dy, dscale, dbias, per-row losses) of sum_i w_rows[i] * l_i over an M x N
    block with positives at col = row + offset."""
    x, y = _tile_addressable(x), _tile_addressable(y)
    m, d = x.shape
    n = y.shape[0]
    chunk_rows = min(chunk_rows, m)
    splits = _col_splits(chunk_rows, n, x.device)
    max_prog = _max_programs(chunk_rows, splits)
    loss = torch.empty((splits, m), dtype=torch.float32, device=x.device)
    partials = torch.zeros((triton.cdiv(m, chunk_rows), 2, max_prog), dtype=torch.float32,
                           device=x.device)  # fmt: skip
    (w,), kappa = _normalise(w_rows.float())
    dot_fp32, precision = dot_precision(x.dtype)

    def fill(buf, c, row0, n_rows):
        grid = lambda meta: (triton.cdiv(n_rows, meta["BM"]), splits)  # noqa: E731
        _siglip_kernel[grid](
            x, y, scale, bias if bias is not None else scale, w, loss, m, buf, buf.stride(0),
            partials[c], max_prog, row0, n_rows, n, d, offset,
            x.stride(0), x.stride(1), y.stride(0), y.stride(1), next_pow2_bucket(max(m, n)),
            HAS_BIAS=bias is not None, WRITE_GRAD=True, DOT_FP32=dot_fp32,
            INPUT_PRECISION=precision,
        )  # fmt: skip

    s = scale.float()
    with _device_guard(x):
        dx, dy, g_dot_xy = _feature_grads(x, y, s * kappa, chunk_rows, fill, dx_acc, dy_acc)
    # the kernel's logit term is S = s XY^T + b itself. sum(g S) - b sum(g) cancels when |b|
    # is large (SigLIP's b = -10): about 1e-6 relative error on dscale in fp32, against
    # 2e-8 for an in-kernel sum of g s XY^T, which costs the kernel a live tile (spills
    # from 72 to 176 B per thread at 128 x 128 on sm_90)
    g_dot_logits, g_sum = partials[:, 0].sum(), partials[:, 1].sum()
    if bias is not None:
        g_dot_logits = g_dot_logits - bias.float() * g_sum
    dscale = torch.where(s != 0, g_dot_logits / s, g_dot_xy)
    return dx, dy, dscale * kappa, g_sum * kappa, loss.sum(0)


# --------------------------------------------------------------------------------------
# PyTorch reference (chunked: memory O(chunk x N), never N x N)
# --------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _torch_chunk_rows(m: int, n: int, chunk_rows: int, dtype: torch.dtype, buffers: int,
                      mask: bool = False) -> int:  # fmt: skip
    """Rows per chunk of the PyTorch path over an M x N block: ``chunk_rows`` if given,
    else as many as keep its ``buffers`` (rows x N) temporaries in the compute ``dtype``
    and, with ``mask``, a (rows x N) bool mask within :data:`CHUNK_BUDGET_BYTES` together."""
    if chunk_rows > 0:
        return min(m, chunk_rows)
    row_bytes = n * (buffers * dtype.itemsize + (1 if mask else 0))
    return max(1, min(m, CHUNK_BUDGET_BYTES // row_bytes))


def _upcast(x, y, scale, bias):
    ct = _compute_dtype(x.dtype)
    return x.to(ct), y.to(ct), scale.to(ct), (bias.to(ct) if bias is not None else None)


def _logits_into(out, xf, yf, s, b):
    """out = s xf yf^T + b, in place (out: (rows of xf) x (rows of yf))."""
    torch.mm(xf, yf.T, out=out).mul_(s)
    return out if b is None else out.add_(b)


def _logsumexp(t, dim: int, tmp):
    """torch.logsumexp(t, dim) with ``tmp`` (shaped like t) as its only temporary."""
    top = t.amax(dim, keepdim=True)
    top = torch.where(top.abs() == math.inf, 0.0, top)  # as torch.logsumexp: no inf - inf
    torch.sub(t, top, out=tmp).exp_()
    return tmp.sum(dim).log_().add_(top.squeeze(dim))


def _diagonal_rows(r0: int, c: int, n: int, offset: int) -> tuple[int, int, int]:
    """(lo, hi, k): rows lo .. hi of the chunk of rows r0 .. r0 + c of an M x N block have
    their positive (col = row + offset) inside it, on the chunk's diagonal k."""
    k = r0 + offset
    return max(0, -k), max(max(0, -k), min(c, n - k)), k


def _ids_mask(targets: Targets, rs: slice, mask: torch.Tensor, out: torch.Tensor):
    """``out`` = 1 on the positive pairs (equal ids) of the rows ``rs``, 0 elsewhere.

    Through the bool buffer ``mask``: a comparison into a float ``out``, a product with a
    bool tensor or a sum over one each allocate a converted copy of the chunk."""
    torch.eq(targets.row_ids[rs, None], targets.col_ids[None, :], out=mask)
    return out.copy_(mask)


def _block_stats_torch(x, y, scale, bias, targets: Targets, rows=True, cols=True,
                       teacher_lse=(None, None), chunk_rows=0):  # fmt: skip
    """PyTorch version of :func:`_block_stats_triton`, in row chunks; temporaries: two
    (three with a teacher) (chunk x N) buffers and, with ids, a bool one."""
    xf, yf, s, b = _upcast(x, y, scale, bias)
    m, n = x.shape[0], y.shape[0]
    teach = targets.teacher is not None
    c = _torch_chunk_rows(m, n, chunk_rows, xf.dtype, 2 + teach, targets.ids)
    ct = dict(dtype=xf.dtype, device=x.device)
    if teach:
        xt, yt, st = targets.teacher
        xt, yt, st = xt.to(xf.dtype), yt.to(xf.dtype), st.to(xf.dtype)
        t_row, t_col = (t.to(xf.dtype) if t is not None else None for t in teacher_lse)
    r = dict(lse=torch.empty(m, **ct), dot=torch.zeros(m, **ct), sum=torch.zeros(m, **ct),
             tdot=torch.zeros(m, **ct))  # fmt: skip
    k = dict(lse=torch.full((n,), float("-inf"), **ct), dot=torch.zeros(n, **ct),
             sum=torch.zeros(n, **ct), tdot=torch.zeros(n, **ct))  # fmt: skip
    if targets.ids:
        r["cnt"], k["cnt"] = torch.zeros(m, **ct), torch.zeros(n, **ct)
    else:
        r["cnt"], k["cnt"] = (t.to(xf.dtype) for t in _onehot_counts(m, n, targets.offset,
                                                                      x.device))  # fmt: skip
    buf = torch.empty((min(c, m), n), **ct)
    tmp = torch.empty_like(buf)
    t_buf = torch.empty_like(buf) if teach else None
    mask = torch.empty(buf.shape, dtype=torch.bool, device=x.device) if targets.ids else None
    for r0 in range(0, m, c):
        rs = slice(r0, min(m, r0 + c))
        rows_c = rs.stop - r0
        logits = _logits_into(buf[:rows_c], xf[rs], yf, s, b)
        tmp_c = tmp[:rows_c]
        if targets.ids:
            hard = _ids_mask(targets, rs, mask[:rows_c], tmp_c)
            r["cnt"][rs] = hard.sum(1)
            k["cnt"] += hard.sum(0)
            on_hard = hard.mul_(logits)
            r["dot"][rs] = on_hard.sum(1)
            k["dot"] += on_hard.sum(0)
        else:
            lo, hi, kd = _diagonal_rows(r0, rows_c, n, targets.offset)
            diag = logits.diagonal(kd)
            r["dot"][r0 + lo : r0 + hi] = diag
            k["dot"][lo + kd : hi + kd] += diag
        if rows:
            r["lse"][rs] = _logsumexp(logits, 1, tmp_c)
            if targets.smoothing:
                r["sum"][rs] = logits.sum(1)
        if cols:
            k["lse"] = torch.logaddexp(k["lse"], _logsumexp(logits, 0, tmp_c))
            if targets.smoothing:
                k["sum"] += logits.sum(0)
        if teach:
            teacher = _logits_into(t_buf[:rows_c], xt[rs], yt, st, None)
            if rows:
                torch.sub(teacher, t_row[rs, None], out=tmp_c).exp_().mul_(logits)
                r["tdot"][rs] = tmp_c.sum(1)
            if cols:
                torch.sub(teacher, t_col[None, :], out=tmp_c).exp_().mul_(logits)
                k["tdot"] += tmp_c.sum(0)
    smooth = bool(targets.smoothing)

    def side(d):
        return SideStats(d["lse"], d["dot"], d["cnt"], d["sum"] if smooth else None,
                         d["tdot"] if teach else None)  # fmt: skip

    return (side(r) if rows else None), (side(k) if cols else None)


def _block_grads_torch(x, y, scale, bias, targets: Targets, row_coef, col_coef, chunk_rows=0):
    """PyTorch version of :func:`_block_grads_triton` (without accumulators); temporaries:
    two (three with a teacher) (chunk x N) buffers and, with ids, a bool one."""
    xf, yf, s, b = _upcast(x, y, scale, bias)
    m, n = x.shape[0], y.shape[0]
    teach = targets.teacher is not None
    c = _torch_chunk_rows(m, n, chunk_rows, xf.dtype, 2 + teach, targets.ids)
    ct = dict(dtype=xf.dtype, device=x.device)
    if teach:
        xt, yt, st = (t.to(xf.dtype) for t in targets.teacher)
    # (6, L) rows: lse, u, h, e, a, teacher lse (SideStats.coefficients); zeros stand in
    # for a direction not in the loss where its positives' h is needed
    rc = row_coef.to(xf.dtype) if row_coef is not None else None
    cc = col_coef.to(xf.dtype) if col_coef is not None else None
    h_r = rc[2] if rc is not None else torch.zeros(m, **ct)
    h_c = cc[2] if cc is not None else torch.zeros(n, **ct)
    dx = torch.empty_like(xf)
    dy = torch.zeros_like(yf)
    g_dot_xy = torch.zeros((), **ct)
    dbias = torch.zeros((), **ct)
    buf = torch.empty((min(c, m), n), **ct)
    grad = torch.empty_like(buf)
    t_buf = torch.empty_like(buf) if teach else None
    mask = torch.empty(buf.shape, dtype=torch.bool, device=x.device) if targets.ids else None
    for r0 in range(0, m, c):
        rs = slice(r0, min(m, r0 + c))
        rows_c = rs.stop - r0
        logits = _logits_into(buf[:rows_c], xf[rs], yf, s, b)
        g = grad[:rows_c]
        if rc is not None:
            lse, u, _, e, _, _ = (v[rs, None] for v in rc)
            torch.sub(logits, lse, out=g).exp_().mul_(u)
            if targets.smoothing:
                g.sub_(e)
        else:
            g.zero_()
        if cc is not None:  # the last use of the logits: buf becomes scratch
            lse, v, _, e, _, _ = (w[None, :] for w in cc)
            g.add_(logits.sub_(lse).exp_().mul_(v))
            if targets.smoothing:
                g.sub_(e)
        if targets.ids:
            hard = _ids_mask(targets, rs, mask[:rows_c], buf[:rows_c])
            g.addcmul_(hard, h_r[rs, None], value=-1).addcmul_(hard, h_c[None, :], value=-1)
        else:
            lo, hi, kd = _diagonal_rows(r0, rows_c, n, targets.offset)
            g.diagonal(kd).sub_(h_r[r0 + lo : r0 + hi] + h_c[lo + kd : hi + kd])
        if teach:
            teacher = _logits_into(t_buf[:rows_c], xt[rs], yt, st, None)
            if rc is not None:
                a, t_lse = rc[4][rs, None], rc[5][rs, None]
                g.sub_(torch.sub(teacher, t_lse, out=buf[:rows_c]).exp_().mul_(a))
            if cc is not None:
                g.sub_(teacher.sub_(cc[5][None, :]).exp_().mul_(cc[4][None, :]))
        gy = g @ yf
        g_dot_xy += (gy * xf[rs]).sum()
        dx[rs] = gy.mul_(s)
        dy.addmm_(g.T, xf[rs])
        dbias += g.sum()
    return dx, dy.mul_(s), g_dot_xy, dbias


def _siglip_neg_margins(out, xf, yf, s, b, r0: int, offset: int):
    """-z S for the rows of ``xf`` (rows r0 .. of the block), written to ``out``: S off the
    positive pairs col = row + offset, -S on them."""
    neg = _logits_into(out, xf, yf, s, b)
    neg.diagonal(r0 + offset).neg_()
    return neg


def _siglip_rows_torch(x, y, scale, bias, chunk_rows, offset=0):
    """(M,) SigLIP row losses; temporaries: two (chunk x N) buffers."""
    xf, yf, s, b = _upcast(x, y, scale, bias)
    m, n = x.shape[0], y.shape[0]
    c = _torch_chunk_rows(m, n, chunk_rows, xf.dtype, 2)
    out = torch.empty(m, dtype=xf.dtype, device=x.device)
    buf = torch.empty((min(c, m), n), dtype=xf.dtype, device=x.device)
    for r0 in range(0, m, c):
        rs = slice(r0, min(m, r0 + c))
        neg = _siglip_neg_margins(buf[: rs.stop - r0], xf[rs], yf, s, b, r0, offset)
        out[rs] = torch.nn.functional.softplus(neg).sum(1)  # -logsigmoid(z S)
    return out


def _siglip_grads_torch(x, y, scale, bias, w_rows, chunk_rows, offset=0):
    """(dx, dy, dscale, dbias, row losses) of sum_i w_i l_i; temporaries: two
    (chunk x N) buffers."""
    xf, yf, s, b = _upcast(x, y, scale, bias)
    m, n = x.shape[0], y.shape[0]
    c = _torch_chunk_rows(m, n, chunk_rows, xf.dtype, 2)
    w = w_rows.to(xf.dtype)
    dx = torch.empty_like(xf)
    dy = torch.zeros_like(yf)
    rows_loss = torch.empty(m, dtype=xf.dtype, device=x.device)
    g_dot_xy = torch.zeros((), dtype=xf.dtype, device=x.device)
    dbias = torch.zeros((), dtype=xf.dtype, device=x.device)
    buf = torch.empty((min(c, m), n), dtype=xf.dtype, device=x.device)
    for r0 in range(0, m, c):
        rs = slice(r0, min(m, r0 + c))
        neg = _siglip_neg_margins(buf[: rs.stop - r0], xf[rs], yf, s, b, r0, offset)
        rows_loss[rs] = torch.nn.functional.softplus(neg).sum(1)  # -logsigmoid(z S)
        g = neg.sigmoid_().mul_(w[rs, None])  # -z sigmoid(-z S) w, before the sign flip
        g.diagonal(r0 + offset).neg_()
        gy = g @ yf
        g_dot_xy += (gy * xf[rs]).sum()
        dx[rs] = gy.mul_(s)
        dy.addmm_(g.T, xf[rs])
        dbias += g.sum()
    return dx.to(x.dtype), dy.mul_(s).to(y.dtype), g_dot_xy, dbias, rows_loss


# --------------------------------------------------------------------------------------
# Op registration
# --------------------------------------------------------------------------------------


def _triton_chunk_rows(x: torch.Tensor, chunk_size: int) -> int:
    n = x.shape[0]
    return min(n, chunk_size) if chunk_size > 0 else default_chunk_rows(n, x.element_size())


def _scalar_grads(ds, db, scale, bias):
    """Scale and bias gradients in their parameters' dtypes (fp32 stand-in for no bias)."""
    return ds.to(scale.dtype), db.to(bias.dtype if bias is not None else torch.float32)


def _targets(offset, row_ids, col_ids, smoothing, alpha, teacher_x, teacher_y, teacher_scale):
    teacher = (teacher_x, teacher_y, teacher_scale) if teacher_x is not None else None
    return Targets(offset, row_ids, col_ids, smoothing, alpha, teacher)


def block_stats(x, y, scale, bias, targets, rows, cols, chunk_size=0, teacher_lse=(None, None)):
    """(row :class:`SideStats` or None, column :class:`SideStats` or None) of the logit
    block S = s x y^T + b (M x N) with :class:`Targets`, on the backend for x. Stats of
    blocks that share rows (or columns) combine with :meth:`SideStats.merge`."""
    if resolve_backend("clip_loss", x) == "triton":
        return _block_stats_triton(x, y, scale, bias, targets, rows, cols, teacher_lse)
    return _block_stats_torch(x, y, scale, bias, targets, rows, cols, teacher_lse, chunk_size)


def block_grads(x, y, scale, bias, targets, row_coef, col_coef, chunk_size=0, dx_acc=None,
                dy_acc=None):  # fmt: skip
    """(dx, dy, dscale, dbias) of sum_i u_i l^row_i + sum_j v_j l^col_j over one block,
    from :meth:`SideStats.coefficients` of the complete (merged) stats (None for a
    direction not in the loss). With fp32 ``dx_acc`` (M, d) / ``dy_acc`` (N, d) the
    feature gradients are added into them (and returned); otherwise they are new tensors
    in the input dtype. dscale / dbias are fp32 0-d tensors."""
    if resolve_backend("clip_loss", x) == "triton":
        chunk = _triton_chunk_rows(x, chunk_size)
        if dx_acc is None:
            dx, dy, ds, db = _block_grads_triton(x, y, scale, bias, targets, row_coef, col_coef,
                                                 chunk)  # fmt: skip
            return dx, dy, ds, db
        return _block_grads_triton(x, y, scale, bias, targets, row_coef, col_coef, chunk,
                                   dx_acc, dy_acc)  # fmt: skip
    dx, dy, ds, db = _block_grads_torch(x, y, scale, bias, targets, row_coef, col_coef,
                                        chunk_size)  # fmt: skip
    if dx_acc is None:
        return dx.to(x.dtype), dy.to(y.dtype), ds, db
    return dx_acc.add_(dx), dy_acc.add_(dy), ds, db


def siglip_block_rows(x, y, scale, bias, offset=0, chunk_size=0):
    """(M,) SigLIP row losses of the block x y^T with positives at col = row + offset."""
    if resolve_backend("siglip_loss", x) == "triton":
        return _siglip_rows_triton(x, y, scale, bias, offset)
    return _siglip_rows_torch(x, y, scale, bias, chunk_size, offset)


def siglip_block_grads(x, y, scale, bias, w_rows, offset=0, chunk_size=0, dx_acc=None,
                       dy_acc=None):  # fmt: skip
    """(dx, dy, dscale, dbias, row losses) of sum_i w_i l_i over one SigLIP block; with fp32
    accumulators the feature gradients are added into them, as in :func:`block_grads`."""
    if resolve_backend("siglip_loss", x) == "triton":
        return _siglip_grads_triton(x, y, scale, bias, w_rows, _triton_chunk_rows(x, chunk_size),
                                    offset, dx_acc, dy_acc)  # fmt: skip
    dx, dy, ds, db, rows = _siglip_grads_torch(x, y, scale, bias, w_rows, chunk_size, offset)
    if dx_acc is None:
        return dx, dy, ds, db, rows
    return dx_acc.add_(dx), dy_acc.add_(dy), ds, db, rows


def _coefficients(state, targets: Targets, n_classes: int, weights):
    """(6, L) gradient coefficients from a saved (3, L) state (lse, count, teacher lse)."""
    side = SideStats(state[0], state[0], state[1])
    return side.coefficients(targets, n_classes, weights.to(state.dtype), state[2])


@torch.library.custom_op("vlmkernels::contrastive_ce_forward", mutates_args=())
def _ce_forward(
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    row_ids: torch.Tensor | None,
    col_ids: torch.Tensor | None,
    teacher_x: torch.Tensor | None,
    teacher_y: torch.Tensor | None,
    teacher_scale: torch.Tensor | None,
    offset: int,
    smoothing: float,
    alpha: float,
    rows: bool,
    cols: bool,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-entropies of the rows (M,) and of the columns (N,) of S = s x y^T + b with
    :class:`Targets`, and the (3, M) / (3, N) states backward needs (lse, positives,
    teacher lse); empty for a direction not asked for. fp32 (fp64 for fp64 inputs)."""
    targets = _targets(offset, row_ids, col_ids, smoothing, alpha, teacher_x, teacher_y,
                       teacher_scale)  # fmt: skip
    m, n = x.shape[0], y.shape[0]
    ct = _compute_dtype(x.dtype)
    teacher_lse = (None, None)
    if targets.teacher is not None:
        t_rows, t_cols = block_stats(teacher_x, teacher_y, teacher_scale, None, Targets(),
                                      rows, cols, chunk_size)  # fmt: skip
        teacher_lse = (t_rows.lse if rows else None, t_cols.lse if cols else None)
    row_stats, col_stats = block_stats(x, y, scale, bias, targets, rows, cols, chunk_size,
                                        teacher_lse)  # fmt: skip
    outputs = []
    sides = ((row_stats, teacher_lse[0], n), (col_stats, teacher_lse[1], m))
    for stats, t_lse, n_classes in sides:
        if stats is None:
            outputs.append((x.new_empty((0,), dtype=ct), x.new_empty((3, 0), dtype=ct)))
            continue
        t_lse = t_lse if t_lse is not None else torch.zeros_like(stats.lse)
        state = torch.stack(
            (stats.lse, stats.hard_cnt.to(stats.lse.dtype), t_lse.to(stats.lse.dtype))
        )
        outputs.append((stats.losses(targets, n_classes).to(ct), state.to(ct)))
    (row_losses, row_state), (col_losses, col_state) = outputs
    return row_losses, col_losses, row_state, col_state


@_ce_forward.register_fake
def _(x, y, scale, bias, row_ids, col_ids, teacher_x, teacher_y, teacher_scale, offset,
      smoothing, alpha, rows, cols, chunk_size):  # fmt: skip
    ct = _compute_dtype(x.dtype)
    m = x.shape[0] if rows else 0
    n = y.shape[0] if cols else 0
    return (x.new_empty((m,), dtype=ct), x.new_empty((n,), dtype=ct),
            x.new_empty((3, m), dtype=ct), x.new_empty((3, n), dtype=ct))  # fmt: skip


@torch.library.custom_op("vlmkernels::contrastive_ce_backward", mutates_args=())
def _ce_backward(
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    row_ids: torch.Tensor | None,
    col_ids: torch.Tensor | None,
    teacher_x: torch.Tensor | None,
    teacher_y: torch.Tensor | None,
    teacher_scale: torch.Tensor | None,
    offset: int,
    smoothing: float,
    alpha: float,
    rows: bool,
    cols: bool,
    chunk_size: int,
    row_state: torch.Tensor,
    col_state: torch.Tensor,
    grad_rows: torch.Tensor,
    grad_cols: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dy, dscale, dbias) of sum_i grad_rows_i l^row_i + sum_j grad_cols_j l^col_j."""
    targets = _targets(offset, row_ids, col_ids, smoothing, alpha, teacher_x, teacher_y,
                       teacher_scale)  # fmt: skip
    m, n = x.shape[0], y.shape[0]
    row_coef = _coefficients(row_state, targets, n, grad_rows) if rows else None
    col_coef = _coefficients(col_state, targets, m, grad_cols) if cols else None
    if resolve_backend("clip_loss", x) == "triton":
        dx, dy, ds, db = _block_grads_triton(x, y, scale, bias, targets, row_coef, col_coef,
                                             _triton_chunk_rows(x, chunk_size))  # fmt: skip
    else:
        dx, dy, ds, db = _block_grads_torch(x, y, scale, bias, targets, row_coef, col_coef,
                                            chunk_size)  # fmt: skip
    return dx.to(x.dtype), dy.to(y.dtype), *_scalar_grads(ds, db, scale, bias)


class _SecondOrderNotImplemented(torch.autograd.Function):
    """Returns its first ``n`` tensor arguments (first-order gradients); the others are
    what they depend on, so that differentiating them reaches this node, which raises."""

    @staticmethod
    def forward(ctx, message, n, *tensors):
        ctx.message = message
        return tensors[:n]

    @staticmethod
    def backward(ctx, *_):
        raise NotImplementedError(ctx.message)


def first_order_only(op: str):
    """Decorates an autograd ``backward(ctx, *grads)`` whose gradients are not themselves
    differentiable (fused kernels, gradients saved by the forward pass, collectives).

    Under ``create_graph=True`` the gradients it returns hang from a node that depends on
    the saved tensors and the upstream gradients and raises NotImplementedError naming
    ``op`` when anything differentiates them: a second-order gradient raises at the second
    backward instead of coming out silently 0 or partial (as from a backward whose saved
    gradients are constants to autograd). Without ``create_graph`` nothing changes.
    """
    message = (
        f"{op}: second-order gradients (differentiating a gradient obtained with "
        "create_graph=True) are not implemented by vlmkernels' fused kernels; compute such "
        "terms with a differentiable formula instead"
    )

    def decorate(backward):
        @functools.wraps(backward)
        def wrapped(ctx, *grads):
            with torch.no_grad():
                out = backward(ctx, *grads)
            if not torch.is_grad_enabled():
                return out
            single = not isinstance(out, tuple)
            out = [out] if single else list(out)
            where = [i for i, g in enumerate(out) if isinstance(g, torch.Tensor)]
            sources = [t for t in (*ctx.saved_tensors, *grads)
                       if isinstance(t, torch.Tensor) and t.requires_grad]  # fmt: skip
            tied = _SecondOrderNotImplemented.apply(
                message, len(where), *(out[i].detach() for i in where), *sources
            )
            for i, g in zip(where, tied, strict=True):
                out[i] = g
            return out[0] if single else tuple(out)

        return wrapped

    return decorate


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


@_ce_backward.register_fake
def _(x, y, scale, bias, *args):
    return _fake_grads(x, y, scale, bias)


def _ce_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:9], output[2], output[3])
    ctx.options = inputs[9:]
    remember_backend(ctx)


@first_order_only("clip_loss / contrastive_cross_entropy")
@in_forward_backend
def _ce_backward_autograd(ctx, grad_rows, grad_cols, _grad_row_state, _grad_col_state):
    *tensors, row_state, col_state = ctx.saved_tensors
    dx, dy, ds, db = torch.ops.vlmkernels.contrastive_ce_backward(
        *tensors, *ctx.options, row_state, col_state, grad_rows, grad_cols
    )
    return _requested(ctx, (dx, dy, ds, db), tensors[3] is not None, 11)


_ce_forward.register_autograd(_ce_backward_autograd, setup_context=_ce_setup_context)


@torch.library.custom_op("vlmkernels::siglip_loss_forward", mutates_args=())
def _siglip_loss_forward(
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    chunk_size: int,
    offset: int,
) -> torch.Tensor:
    """Per-image losses l_i = -sum_j logsigmoid(z_ij S_ij), (M,) fp32 (fp64 for fp64), with
    z = +1 on the pairs col = row + offset."""
    if resolve_backend("siglip_loss", x) == "triton":
        return _siglip_rows_triton(x, y, scale, bias, offset)
    return _siglip_rows_torch(x, y, scale, bias, chunk_size, offset)


@_siglip_loss_forward.register_fake
def _(x, y, scale, bias, chunk_size, offset):
    return x.new_empty((x.shape[0],), dtype=_compute_dtype(x.dtype))


@torch.library.custom_op("vlmkernels::siglip_loss_backward", mutates_args=())
def _siglip_loss_backward(
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    grad_rows: torch.Tensor,
    chunk_size: int,
    offset: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dy, dscale, dbias) of sum_i grad_rows[i] * l_i."""
    if resolve_backend("siglip_loss", x) == "triton":
        dx, dy, ds, db, _ = _siglip_grads_triton(
            x, y, scale, bias, grad_rows, _triton_chunk_rows(x, chunk_size), offset
        )
    else:
        dx, dy, ds, db, _ = _siglip_grads_torch(x, y, scale, bias, grad_rows, chunk_size, offset)
    return dx, dy, *_scalar_grads(ds, db, scale, bias)


@_siglip_loss_backward.register_fake
def _(x, y, scale, bias, grad_rows, chunk_size, offset):
    return _fake_grads(x, y, scale, bias)


def _siglip_setup_context(ctx, inputs, output):
    x, y, scale, bias, chunk_size, offset = inputs
    ctx.save_for_backward(x, y, scale, bias)
    ctx.chunk_size, ctx.offset = chunk_size, offset
    remember_backend(ctx)


@first_order_only("siglip_loss")
@in_forward_backend
def _siglip_backward(ctx, grad_rows):
    x, y, scale, bias = ctx.saved_tensors
    dx, dy, ds, db = torch.ops.vlmkernels.siglip_loss_backward(
        x, y, scale, bias, grad_rows, ctx.chunk_size, ctx.offset
    )
    return _requested(ctx, (dx, dy, ds, db), bias is not None, 2)


_siglip_loss_forward.register_autograd(_siglip_backward, setup_context=_siglip_setup_context)


@torch.library.custom_op("vlmkernels::siglip_loss_fused", mutates_args=())
def _siglip_loss_fused(
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    row_weight: float,
    chunk_size: int,
    offset: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, dx, dy, dscale, dbias) of loss = row_weight * sum_i l_i, in one pass: the
    gradients are computed with the loss and only scaled in backward."""
    w = torch.full((x.shape[0],), row_weight, dtype=_compute_dtype(x.dtype), device=x.device)
    if resolve_backend("siglip_loss", x) == "triton":
        dx, dy, ds, db, rows = _siglip_grads_triton(
            x, y, scale, bias, w, _triton_chunk_rows(x, chunk_size), offset
        )
    else:
        dx, dy, ds, db, rows = _siglip_grads_torch(x, y, scale, bias, w, chunk_size, offset)
    return rows.sum() * row_weight, dx, dy, *_scalar_grads(ds, db, scale, bias)


@_siglip_loss_fused.register_fake
def _(x, y, scale, bias, row_weight, chunk_size, offset):
    return (x.new_empty((), dtype=_compute_dtype(x.dtype)), *_fake_grads(x, y, scale, bias))


def _fused_setup_context(ctx, inputs, output):
    _, dx, dy, ds, db = output
    ctx.save_for_backward(dx, dy, ds, db)
    ctx.has_bias = inputs[3] is not None


@first_order_only("siglip_loss")
def _fused_backward(ctx, grad_loss, *_unused):
    grads = tuple(grad_loss * g for g in ctx.saved_tensors)
    return _requested(ctx, grads, ctx.has_bias, 3)


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


def _check_targets(op, n, device, ids=None, label_smoothing=0.0, alpha=0.0, teacher=None,
                   like=None, names=("ids", "teacher[0]", "teacher[1]")):  # fmt: skip
    """Checks the extra-target arguments; returns (ids as int64 or None, teacher detached).
    ``names``: what the ids and the two teacher tensors are called in the caller."""
    if ids is not None:
        got = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex():
            raise TypeError(f"{op}: {names[0]} must be an integer tensor, got {got}")
        if ids.shape != (n,):
            raise ValueError(f"{op}: {names[0]} must have shape ({n},), got {tuple(ids.shape)}")
        ids = ids.to(device=device, dtype=torch.int64)
    check_real(op, "label_smoothing", label_smoothing, 0.0, 1.0, high_open=True)
    alpha = check_real(op, "alpha", alpha, 0.0, 1.0)
    if teacher is not None:
        if not isinstance(teacher, (tuple, list)) or len(teacher) != 2:
            raise TypeError(f"{op}: teacher must be a pair (image, text) of feature tensors, "
                            f"got {type(teacher).__name__}")  # fmt: skip
        for t, ref, name in zip(teacher, like, names[1:], strict=True):
            want = f"({tuple(ref.shape)}, {ref.dtype})"
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{op}: {name} must be a tensor shaped like the features "
                                f"{want}, got {type(t).__name__}")  # fmt: skip
            if t.shape != ref.shape or t.dtype != ref.dtype:
                raise ValueError(f"{op}: {name} must be a tensor shaped like the features "
                                 f"{want}, got ({tuple(t.shape)}, {t.dtype})")  # fmt: skip
            if t.device != device:
                raise ValueError(f"{op}: {name} must be on {device}, got {t.device}")
        teacher = tuple(t.detach() for t in teacher)
    elif alpha:
        raise ValueError(f"{op}: alpha > 0 needs teacher features")
    return ids, teacher


def _raise_on_every_rank(op, process_group, features, exc):
    """Re-raises a local argument error; with a process group, the other ranks (waiting in
    the ring's consistency exchange) are told, so they raise instead of hanging."""
    if process_group is None:
        raise exc
    from ...distributed.ring import report_local_error

    report_local_error(op, process_group, features, exc)


def _reduce(losses, reduction, halve_sum):
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum() * (0.5 if halve_sum else 1.0)
    return losses


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale,
    logit_bias=None,
    *,
    reduction: str = "mean",
    chunk_size: int | None = None,
    ids: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    teacher: tuple[torch.Tensor, torch.Tensor] | None = None,
    teacher_logit_scale=None,
    alpha: float = 0.0,
    process_group=None,
) -> torch.Tensor:
    r"""Symmetric InfoNCE (CLIP) loss without the N x N logits in memory.

    ``(CE(s I T^T + b, targets) + CE(s T I^T + b, targets^T)) / 2``; with the default
    targets (``arange``) this is open_clip's ``ClipLoss``.

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
            (memory ``chunk_size * N`` elements, up to 3.25 times that on the PyTorch
            path); None keeps the chunk temporaries within 128 MiB (``CHUNK_BUDGET_BYTES``,
            see the module docstring).
        ids: (N,) integers: every pair with equal ids is a positive, each row's target
            spread evenly over its positives (BLIP's ``idx``).
        label_smoothing: eps: targets (1 - eps) hard + eps / N.
        teacher: (image, text) features of a teacher (momentum) model, no gradient: targets
            alpha softmax(s_t I_t T_t^T) + (1 - alpha) hard (ALBEF's distillation), with
            ``teacher_logit_scale`` s_t (default: ``logit_scale``, detached).
        process_group: a torch.distributed group: the features are this rank's shard of the
            global batch, the loss and gradients those of the global batch
            (:mod:`vlmkernels.distributed`).

    Returns:
        The loss in the features' dtype (computed in fp32); under autocast, fp32 features
        are cast to the autocast dtype and the loss is fp32, as open_clip's would be.

    Second-order gradients are not implemented: a backward with ``create_graph=True``
    gives the first-order gradients, and differentiating those raises NotImplementedError.
    """
    op = "clip_loss"
    try:
        x, y, scale, bias, chunk, out_dtype = _prepare(
            op, image_features, text_features, logit_scale, logit_bias, reduction, chunk_size
        )
        ids, teacher = _check_targets(op, x.shape[0], x.device, ids, label_smoothing, alpha,
                                      teacher, (x, y))  # fmt: skip
        if process_group is not None and teacher is not None:
            raise NotImplementedError(
                f"{op}: teacher targets are not supported with a process_group"
            )
    except Exception as exc:
        _raise_on_every_rank(op, process_group, image_features, exc)
    if process_group is not None:
        from ...distributed.ring import clip_loss_ring

        loss = clip_loss_ring(x, y, scale, bias, process_group, chunk, reduction, ids=ids,
                              label_smoothing=float(label_smoothing))  # fmt: skip
        return loss.to(out_dtype)
    if teacher is not None:
        t_scale = teacher_logit_scale if teacher_logit_scale is not None else scale.detach()
        t_scale = scalar_tensor(op, "teacher_logit_scale", t_scale, x.device).detach()
        teacher = (teacher[0].to(x.dtype), teacher[1].to(x.dtype), t_scale)
    else:
        teacher = (None, None, None)
    row_losses, col_losses, _, _ = torch.ops.vlmkernels.contrastive_ce_forward(
        x, y, scale, bias, ids, ids, *teacher, 0, float(label_smoothing), float(alpha),
        True, True, chunk,
    )  # fmt: skip
    losses = torch.stack((row_losses, col_losses))
    return _reduce(losses, reduction, True).to(out_dtype)


def contrastive_cross_entropy(
    queries: torch.Tensor,
    keys: torch.Tensor,
    logit_scale,
    logit_bias=None,
    *,
    offset: int = 0,
    query_ids: torch.Tensor | None = None,
    key_ids: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    teacher_queries: torch.Tensor | None = None,
    teacher_keys: torch.Tensor | None = None,
    teacher_logit_scale=None,
    alpha: float = 0.0,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> torch.Tensor:
    r"""One direction of a contrastive loss: the cross-entropy of each query (row) over all
    keys (columns) of S = s Q K^T + b (M x N), without S in memory.

    The building block of ALBEF / BLIP's image-text contrastive losses: keys may be a
    concatenation of in-batch (momentum) features and a no-grad queue, e.g. b x (b + 65536).

    Targets of row i: positives where ``key_ids == query_ids[i]`` (BLIP's ``idx`` with its
    ``idx_queue``) or, without ids, key ``i + offset``; spread evenly over the positives,
    smoothed by ``label_smoothing`` over the N keys and mixed as
    ``alpha softmax(s_t Q_t K_t^T) + (1 - alpha) hard`` with teacher (momentum) features
    ``teacher_queries`` (and ``teacher_keys``, default ``keys``): ALBEF's distillation.

    Returns the mean (default), the sum, or the (M,) per-query losses (``"none"``).
    Gradients flow to queries, keys (where they require grad), scale and bias; first order
    only, as :func:`clip_loss`.

    A query with no positive key (no ``key_ids`` equal to its id, or ``i + offset`` outside
    0 .. N - 1) has no target unless ``alpha = 1``: its loss is NaN, and so are the mean,
    the sum and every gradient its loss reaches (no host synchronisation checks for it).
    To leave such queries out, mask the ``"none"`` losses, e.g.
    ``torch.where(valid, losses, 0).sum()``: a zero upstream gradient keeps them out of the
    gradients too.
    """
    op = "contrastive_cross_entropy"
    check_features(op, queries, "queries")
    check_features(op, keys, "keys")
    check_compatible(op, queries, keys, ("queries", "keys"))
    check_reduction(op, reduction)
    chunk = check_chunk_size(op, chunk_size)
    offset = check_int(op, "offset", offset)
    device = queries.device
    scale = scalar_tensor(op, "logit_scale", logit_scale, device)
    bias = scalar_tensor(op, "logit_bias", logit_bias, device, optional=True)
    if (query_ids is None) != (key_ids is None):
        raise ValueError(f"{op}: query_ids and key_ids go together")
    q_ids, _ = _check_targets(op, queries.shape[0], device, query_ids, label_smoothing,
                              names=("query_ids",))  # fmt: skip
    alpha = check_real(op, "alpha", alpha, 0.0, 1.0)
    k_ids, _ = _check_targets(op, keys.shape[0], device, key_ids, names=("key_ids",))
    teacher = (None, None, None)
    if alpha and teacher_queries is None:
        raise ValueError(f"{op}: alpha > 0 needs teacher_queries")
    if teacher_queries is not None:
        teacher_keys = keys if teacher_keys is None else teacher_keys
        _, (tq, tk) = _check_targets(op, 0, device, teacher=(teacher_queries, teacher_keys),
                                     like=(queries, keys),
                                     names=(None, "teacher_queries", "teacher_keys"))  # fmt: skip
        t_scale = teacher_logit_scale if teacher_logit_scale is not None else scale.detach()
        teacher = (tq, tk, scalar_tensor(op, "teacher_logit_scale", t_scale, device).detach())
    row_losses, _, _, _ = torch.ops.vlmkernels.contrastive_ce_forward(
        queries, keys, scale, bias, q_ids, k_ids, *teacher, offset,
        float(label_smoothing), float(alpha), True, False, chunk,
    )  # fmt: skip
    return _reduce(row_losses, reduction, False).to(queries.dtype)


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale,
    logit_bias,
    *,
    reduction: str = "mean",
    chunk_size: int | None = None,
    negative_only: bool = False,
    process_group=None,
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
        chunk_size: rows of logit gradient materialised at once; None keeps the chunk
            temporaries within 128 MiB, as in :func:`clip_loss`.
        negative_only: every pair is a negative (z = -1): the blocks of other ranks' texts
            in open_clip's distributed SigLIP.
        process_group: a torch.distributed group: the loss of the global batch, computed
            on a ring (:mod:`vlmkernels.distributed`).

    When a scalar loss needs gradients, they are computed in the forward pass (no
    recomputation of the logits) and the backward pass scales them by the upstream gradient.
    Second-order gradients are not implemented: differentiating the gradients of a backward
    with ``create_graph=True`` raises NotImplementedError (it never gives 0).
    """
    try:
        x, y, scale, bias, chunk, out_dtype = _prepare(
            "siglip_loss", image_features, text_features, logit_scale, logit_bias, reduction,
            chunk_size,
        )  # fmt: skip
        check_bool("siglip_loss", "negative_only", negative_only)
        if process_group is not None and negative_only:
            raise ValueError("siglip_loss: negative_only does not apply with a process_group")
    except Exception as exc:
        _raise_on_every_rank("siglip_loss", process_group, image_features, exc)
    n = x.shape[0]
    if process_group is not None:
        from ...distributed.ring import siglip_loss_ring

        return siglip_loss_ring(x, y, scale, bias, process_group, chunk, reduction).to(out_dtype)
    offset = n if negative_only else 0  # col = row + n: no positive pair
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, y, scale, bias)
    )
    if reduction != "none" and wants_grad:
        weight = 1.0 / n if reduction == "mean" else 1.0
        loss = torch.ops.vlmkernels.siglip_loss_fused(x, y, scale, bias, weight, chunk, offset)[0]
        return loss.to(out_dtype)
    rows = torch.ops.vlmkernels.siglip_loss_forward(x, y, scale, bias, chunk, offset)
    if reduction == "mean":
        out = rows.sum() / n
    elif reduction == "sum":
        out = rows.sum()
    else:
        out = rows
    return out.to(out_dtype)


def clip_loss_with_grads(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale,
    logit_bias=None,
    *,
    reduction: str = "mean",
    chunk_size: int | None = None,
    ids: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
):
    """(loss, d image_features, d text_features, d logit_scale, d logit_bias) of
    :func:`clip_loss` without building an autograd graph (GradCache: the features are
    detached representations; the gradients are then pushed through the encoders).

    ``d logit_bias`` is None without a bias. Scalar reductions only.
    """
    op = "clip_loss_with_grads"
    if reduction == "none":
        raise ValueError(f"{op}: reduction must be 'mean' or 'sum'")
    x, y, scale, bias, chunk, _ = _prepare(op, image_features, text_features, logit_scale,
                                           logit_bias, reduction, chunk_size)  # fmt: skip
    ids, _ = _check_targets(op, x.shape[0], x.device, ids, label_smoothing)
    n = x.shape[0]
    options = (0, float(label_smoothing), 0.0, True, True, chunk)
    with torch.no_grad():
        x, y, scale = x.detach(), y.detach(), scale.detach()
        bias = bias.detach() if bias is not None else None
        tensors = (x, y, scale, bias, ids, ids, None, None, None)
        row_losses, col_losses, row_state, col_state = torch.ops.vlmkernels.contrastive_ce_forward(
            *tensors, *options
        )
        weight = 1.0 / (2 * n) if reduction == "mean" else 0.5
        grad_rows = torch.full_like(row_losses, weight)
        dx, dy, ds, db = torch.ops.vlmkernels.contrastive_ce_backward(
            *tensors, *options, row_state, col_state, grad_rows, grad_rows
        )
        loss = (row_losses.sum() + col_losses.sum()) * weight
    return loss, dx, dy, ds, (db if bias is not None else None)


def siglip_loss_with_grads(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale,
    logit_bias,
    *,
    reduction: str = "mean",
    chunk_size: int | None = None,
):
    """(loss, d image_features, d text_features, d logit_scale, d logit_bias) of
    :func:`siglip_loss` without building an autograd graph (GradCache); one pass over the
    logits. ``d logit_bias`` is None without a bias. Scalar reductions only."""
    op = "siglip_loss_with_grads"
    if reduction == "none":
        raise ValueError(f"{op}: reduction must be 'mean' or 'sum'")
    x, y, scale, bias, chunk, _ = _prepare(op, image_features, text_features, logit_scale,
                                           logit_bias, reduction, chunk_size)  # fmt: skip
    weight = 1.0 / x.shape[0] if reduction == "mean" else 1.0
    with torch.no_grad():
        bias = bias.detach() if bias is not None else None
        loss, dx, dy, ds, db = torch.ops.vlmkernels.siglip_loss_fused(
            x.detach(), y.detach(), scale.detach(), bias, weight, chunk, 0
        )
    return loss, dx, dy, ds, (db if bias is not None else None)

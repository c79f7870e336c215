"""The contrastive family's Triton kernels and their config spaces.

See :mod:`vlmkernels.ops.contrastive` for the math. Three kernels over tiles of the logits
S = s X Y^T + b, built from :mod:`vlmkernels.kernels.blocks`:

- ``_clip_stats_kernel``: one pass for the log-sum-exp and target sums of rows and columns;
- ``_clip_grad_kernel``: a chunk of rows of the CLIP logit gradient, with the scale and
  bias gradients' partial sums;
- ``_siglip_kernel``: SigLIP row losses and, optionally, a chunk of its logit gradient.

Their launchers are in :mod:`.launchers`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ...core.runtime import INTERPRETED, autotune_configs
from ...core.tuning import tuned
from ...kernels.blocks import (
    LN2,
    LOG2E,
    NEG_INF,
    POS_INF,
    block_range,
    diagonal_tile,
    even_k,
    logits_tile,
    pad,
    scale_and_bias,
    softplus2_sigmoid,
)

# Every config fits sm_90's 227 KB of shared memory per block for fp32 inputs too (the
# largest, 64 x 128 x 64 with 4 stages, takes 208 KB); 128 x 128 x 64 with 4 stages took
# 256 KB for fp32 and was removed.
_GPU_CONFIGS = [
    triton.Config({"BM": 128, "BN": 128, "BK": 64}, num_warps=8, num_stages=3),
    triton.Config({"BM": 128, "BN": 128, "BK": 32}, num_warps=8, num_stages=4),
    triton.Config({"BM": 128, "BN": 64, "BK": 64}, num_warps=4, num_stages=4),
    triton.Config({"BM": 64, "BN": 128, "BK": 64}, num_warps=4, num_stages=4),
    triton.Config({"BM": 128, "BN": 64, "BK": 32}, num_warps=8, num_stages=4),
    triton.Config({"BM": 64, "BN": 128, "BK": 32}, num_warps=8, num_stages=4),
]
# Small tiles keep the interpreter's per-op cost low; 32 is not a multiple of the test
# sizes, so masking is exercised.
_INTERPRETER_CONFIG = triton.Config({"BM": 32, "BN": 32, "BK": 32}, num_warps=4, num_stages=1)
_CONFIGS = autotune_configs(_GPU_CONFIGS, _INTERPRETER_CONFIG)
# The untuned default for fp32 inputs (3xTF32 dots): 128 x 128 x 32 with 4 stages, in 128
# KB of shared memory; at BK 64 sm_90a spilled 108 B per thread in clip_stats and 64 in
# SigLIP's loss pass, none at BK 32. `vlmkernels tune` replaces it.
_FP32_DEFAULT = {"fp32": _GPU_CONFIGS[1]}
# clip_grad's: at BK 64 its 16-bit default spilled 20 B per thread (two values kept
# through the tile loop for the positive pairs' pass after it), none at BK 32, with fewer
# instructions per tile (1,665 against 1,737); fp32 as SigLIP's gradient pass
# (:func:`_fp32_gradient_default`).
_GRAD_DEFAULT = {"bf16": _GPU_CONFIGS[1], "fp16": _GPU_CONFIGS[1], "fp32": _GPU_CONFIGS[4]}


def _fp32_gradient_default(variant):
    """fp32 inputs of the kernels that write a logit gradient tile (clip_grad's fp32
    default, SigLIP's gradient pass): 128 x 64 tiles with 8 warps. At 128 x 128 the tf32x3
    operand splits (a high and a low TF32 part of each operand) and the gradient tile exceed
    255 registers: sm_90a spilled 72 B per thread in clip_grad and 52 B in SigLIP's (288 /
    272 at BK 64); at 128 x 64 x 32 neither spills (232 / 208 registers), at 6% / 9% more
    static instructions per logit (1,174 per 8,192 against 2,207 per 16,384; 1,393 against
    2,545). Which is faster waits for a GPU (``vlmkernels tune`` records it)."""
    if variant.get("dtype") == "fp32" and variant.get("WRITE_GRAD", True):
        return _GPU_CONFIGS[4]
    return None


def _targets_default(variant):
    """The untuned default of the CLIP kernels' variants with targets (ids, label smoothing
    or a teacher), both dtypes: 128 x 64 tiles with 8 warps. At 128 x 128 their column
    vectors (BN / 4 values per thread each: ids, the teacher's log-sum-exp, the column
    statistics) and the teacher's second logits tile exceed 255 registers (sm_90a spilled
    424 / 968 B per thread in clip_stats for bf16 / fp32, 32 / 396 in clip_grad); at
    128 x 64 x 32 none spill, at about as many instructions per logit (81.5 against 85.5 in
    clip_stats, 50.9 against 50.4 in clip_grad, bf16) and their epilogue, not the tensor
    cores, bounds them."""
    if variant.get("IDS") or variant.get("SMOOTH") or variant.get("TEACHER"):
        return _GPU_CONFIGS[4]
    return None


def _stats_targets_default(variant):
    """clip_stats' variants with targets: as :func:`_targets_default`, except 16-bit inputs
    take 64 x 128 x 32 tiles with 8 warps. With Triton 3.6 (not 3.9) the 128 x 64 tile of
    bf16 inputs with every target sat at 255 registers and spilled 20 B per thread; the
    64 x 128 one uses 221 (220 with 3.9), no spill on either, at as many logits per tile
    and 4% more (3.6) or 3.5% fewer (3.9) static instructions. Its fp32 form spills (tf32x3
    operand splits for 128 columns), so fp32 keeps 128 x 64."""
    config = _targets_default(variant)
    if config is not None and variant.get("dtype") != "fp32":
        return _GPU_CONFIGS[5]
    return config


# What the launchers assume before the config is chosen: the smallest BM of any config
# (partial buffers sized with it are never too small) and the usual tile (grids).
MIN_BLOCK = 32 if INTERPRETED else 64
NOMINAL_BLOCK = 32 if INTERPRETED else 128
# SigLIP's logit for padding columns: softplus and sigmoid of it are exactly 0
PAD_LOGIT = tl.constexpr(-1e30)


@triton.jit
def _hard_mask(rows, cols, rid, cid, valid, offset, IDS: tl.constexpr):
    """Positive pairs of a tile: equal ids, or column = row + offset."""
    if IDS:
        hard = (rid[:, None] == cid[None, :]) & valid
    else:
        hard = (rows[:, None] + offset == cols[None, :]) & valid
    return hard


@triton.jit
def _col_hard_weight(col_coef_ptr, coef_stride_c, cols, col_mask, COLS: tl.constexpr):
    """The columns' positive-pair weights h' (coef[2]), 0 without the column direction."""
    if COLS:
        h_c = tl.load(col_coef_ptr + 2 * coef_stride_c + cols, mask=col_mask, other=0.0)
    else:
        h_c = col_mask.to(tl.float32) * 0.0
    return h_c


@triton.jit
def _col_coefs(col_coef_ptr, coef_stride_c, cols, col_mask, bias2, COLS: tl.constexpr,
               SMOOTH: tl.constexpr):  # fmt: skip
    """The column coefficients of a tile (see ``_clip_grad_kernel``): the exponent shift
    b log2(e) - c_j log2(e), the weight v_j and the smoothing weight e'_j; zeros for what
    the variant does not use."""
    zero = col_mask.to(tl.float32) * 0.0
    col_shift, w_c, e_c = zero, zero, zero
    if COLS:
        # a padding lane's log-sum-exp reads +inf, its shift -inf: exp2(b log2 e) of a
        # zero lse overflows for b > 88.7, and inf times its zero weight is NaN in the
        # scale and bias sums (and, fused, in dX / dY)
        col_shift = bias2 - tl.load(col_coef_ptr + cols, mask=col_mask, other=POS_INF) * LOG2E
        w_c = tl.load(col_coef_ptr + coef_stride_c + cols, mask=col_mask, other=0.0)
        if SMOOTH:
            e_c = tl.load(col_coef_ptr + 3 * coef_stride_c + cols, mask=col_mask, other=0.0)
    return col_shift, w_c, e_c


# fmt: off
@triton.jit
def _pair_logits(x_ptr, y_ptr, rows, cols, mask, D, stride_xn, stride_xd, stride_yn,
                 stride_yd, BK: tl.constexpr):
    """x[rows[m]] . y[cols[m]] per m in fp32 (0 where ``mask`` is false): the logits of one
    pair per row, outside the tiles."""
    ks = tl.arange(0, BK)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xn
    y_rows = y_ptr + cols.to(tl.int64)[:, None] * stride_yn
    dot = mask.to(tl.float32) * 0.0
    for k0 in range(0, D, BK):
        kk = k0 + ks
        m = mask[:, None] & (kk < D)[None, :]
        xv = tl.load(x_rows + kk[None, :] * stride_xd, mask=m, other=0.0).to(tl.float32)
        yv = tl.load(y_rows + kk[None, :] * stride_yd, mask=m, other=0.0).to(tl.float32)
        dot += tl.sum(xv * yv, 1)
    return dot


_STATS_KEY = ["D", "n_bucket", "ROWS", "COLS", "IDS", "SMOOTH", "TEACHER"]


@tuned("clip_stats", configs=_CONFIGS, key=_STATS_KEY, sizes=["D", "n_bucket"],
       defaults=_FP32_DEFAULT, variant_default=_stats_targets_default)
@even_k
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
    positives are ``col = row + offset``, or equal ids with ``IDS``), of S (slot 2, label
    smoothing) and of softmax(T) S for teacher logits T = s_t X_t Y_t^T (slot 3,
    ``TEACHER``, given the teacher's log-sum-exp). Slot 1 is unused: the positive counts
    do not depend on S (the host counts equal ids, :func:`.algebra.ids_count`).

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
    i_lo, i_hi = block_range(g, num_row_groups, M, BM)
    j_lo, j_hi = block_range(k, num_col_splits, N, BN)
    scale, bias = scale_and_bias(scale_ptr, bias_ptr, HAS_BIAS)
    scale2 = scale * LOG2E
    if TEACHER:
        tscale2 = tl.load(tscale_ptr).to(tl.float32) * LOG2E
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
        row_offset = bias * LOG2E + tl.where(row_mask, 0.0, PAD_LOGIT)
        rid = rows
        if IDS:
            rid = tl.load(row_ids_ptr + rows, mask=row_mask, other=0)
        if TEACHER:
            t_lse_r = tl.load(t_lse_row_ptr + rows, mask=row_mask, other=0.0) * LOG2E
        m_row = tl.full((BM,), NEG_INF, tl.float32)
        l_row = tl.zeros((BM,), tl.float32)
        hard_dot_r = tl.zeros((BM,), tl.float32)
        logit_sum_r = tl.zeros((BM,), tl.float32)
        teacher_dot_r = tl.zeros((BM,), tl.float32)
        for j in range(j_lo, j_hi):
            cols = j * BN + tl.arange(0, BN)
            col_mask = cols < N
            keep_c = col_mask.to(tl.float32)
            valid = row_mask[:, None] & col_mask[None, :]
            # nothing to read back on the group's first row block
            seen = col_mask & ((cols * 0 + i) > i_lo)
            if COLS and not (IDS or SMOOTH or TEACHER or INPUT_PRECISION == "tf32x3"):
                # the columns' running statistics, read before the k-loop: their latency
                # hides under it (with targets or fp32's three-product tiles, too many
                # registers through the loop)
                m_col = tl.load(col_max_ptr + cols, mask=seen, other=NEG_INF)
                l_col = tl.load(col_sum_ptr + cols, mask=seen, other=0.0)
            acc = logits_tile(x_ptr, y_ptr, i * BM, j * BN, row_mask, col_mask, D,
                              stride_xn, stride_xd, stride_yn, stride_yd,
                              BM, BN, BK, EVEN_K, DOT_FP32, INPUT_PRECISION)
            # t = S log2(e), -inf on padding rows and columns
            # t = S log2(e), -1e30 on padding: finite, so that t * 0 = 0 in the sums below
            # (kept in log2 units; one tile fewer in registers than a separate S)
            col_offset = tl.where(col_mask, 0.0, PAD_LOGIT)
            t = acc * scale2 + row_offset[:, None] + col_offset[None, :]
            cid = cols
            if IDS:
                cid = tl.load(col_ids_ptr + cols, mask=col_mask, other=0)

            if IDS:
                hard = _hard_mask(rows, cols, rid, cid, valid, offset, IDS)
                hard_dot_r += tl.sum(tl.where(hard, t, 0.0), 1)
                if COLS:
                    dot_c = tl.load(col_acc_ptr + cols, mask=seen, other=0.0)
                    dot_c += tl.sum(tl.where(hard, t, 0.0), 0) * LN2
                    tl.store(col_acc_ptr + cols, dot_c, mask=col_mask)
            if SMOOTH:
                logit_sum_r += tl.sum(t * keep_c[None, :], 1)
                if COLS:
                    sum_c = tl.load(col_acc_ptr + 2 * col_slot + cols, mask=seen, other=0.0)
                    sum_c += tl.sum(t * keep_r[:, None], 0) * LN2
                    tl.store(col_acc_ptr + 2 * col_slot + cols, sum_c, mask=col_mask)
            if TEACHER:
                teacher = logits_tile(xt_ptr, yt_ptr, i * BM, j * BN, row_mask, col_mask, D,
                                      stride_txn, stride_txd, stride_tyn, stride_tyd,
                                      BM, BN, BK, EVEN_K, DOT_FP32, INPUT_PRECISION)
                tt = teacher * tscale2 + pad(row_mask)[:, None] + pad(col_mask)[None, :]
                if ROWS:
                    p_row = tl.exp2(tt - t_lse_r[:, None])
                    teacher_dot_r += tl.sum(p_row * t, 1)
                if COLS:
                    t_lse_c = tl.load(t_lse_col_ptr + cols, mask=col_mask, other=0.0) * LOG2E
                    p_col = tl.exp2(tt - t_lse_c[None, :])
                    tdot_c = tl.load(col_acc_ptr + 3 * col_slot + cols, mask=seen, other=0.0)
                    tdot_c += tl.sum(p_col * t, 0) * LN2
                    tl.store(col_acc_ptr + 3 * col_slot + cols, tdot_c, mask=col_mask)

            if ROWS:
                # before the first tile the maximum is -inf: shift by 0 there (no NaN)
                m_new = tl.maximum(m_row, tl.max(t, 1))
                m_use = tl.where(m_new == NEG_INF, 0.0, m_new)
                l_row = l_row * tl.exp2(m_row - m_use) + tl.sum(tl.exp2(t - m_use[:, None]), 1)
                m_row = m_new
            if COLS:
                if IDS or SMOOTH or TEACHER or INPUT_PRECISION == "tf32x3":
                    m_col = tl.load(col_max_ptr + cols, mask=seen, other=NEG_INF)
                    l_col = tl.load(col_sum_ptr + cols, mask=seen, other=0.0)
                m_col_new = tl.maximum(m_col, tl.max(t, 0))
                m_use = tl.where(m_col_new == NEG_INF, 0.0, m_col_new)
                l_col = l_col * tl.exp2(m_col - m_use) + tl.sum(tl.exp2(t - m_use[None, :]), 0)
                tl.store(col_max_ptr + cols, m_col_new, mask=col_mask)
                tl.store(col_sum_ptr + cols, l_col, mask=col_mask)
            # the next read of these columns may come from other threads of this program
            tl.debug_barrier()
        if ROWS:
            tl.store(row_max_ptr + rows, m_row, mask=row_mask)
            tl.store(row_sum_ptr + rows, l_row, mask=row_mask)
        first = i * BM + offset
        if not IDS and (first < j_hi * BN) and (j_lo * BN < first + BM):
            # row i's positive, column i + offset, in this program's columns: its logit,
            # outside the tiles (no per-element test in the tile loop)
            pos = rows + offset
            on = row_mask & (pos >= j_lo * BN) & (pos < tl.minimum(j_hi * BN, N))
            s_pos = _pair_logits(x_ptr, y_ptr, rows, pos, on, D, stride_xn, stride_xd,
                                 stride_yn, stride_yd, BK)
            hard_dot_r = tl.where(on, s_pos * scale2 + bias * LOG2E, 0.0)
        tl.store(row_acc_ptr + rows, hard_dot_r * LN2, mask=row_mask)
        if SMOOTH:
            tl.store(row_acc_ptr + 2 * row_slot + rows, logit_sum_r * LN2, mask=row_mask)
        if TEACHER:
            tl.store(row_acc_ptr + 3 * row_slot + rows, teacher_dot_r * LN2, mask=row_mask)


_GRAD_KEY = ["D", "n_bucket", "ROWS", "COLS", "IDS", "SMOOTH", "TEACHER"]


@tuned("clip_grad", configs=_CONFIGS, key=_GRAD_KEY, sizes=["D", "n_bucket"],
       defaults=_GRAD_DEFAULT, variant_default=_targets_default)
@even_k
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

    P the positive pairs. Without ids they are (i, i + offset): the tile loop only takes
    their logits (on diagonal tiles) and leaves out -(h_i + h'_j); a pass after it writes
    their gradient again and corrects the sums. Program (m, k) covers row block m of the
    chunk and the column blocks of split k, and writes sum(grad * s log2(e) XY^T) and
    sum(grad) (the scale and bias gradients' shares) to partial[0, pid] and partial[1, pid].
    Padding rows and columns contribute exactly 0: their exponents carry -inf and their
    weights are 0.
    """
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    j_lo, j_hi = block_range(split, num_splits, N, BN)
    local = pid_m * BM + tl.arange(0, BM)
    row_mask = local < n_rows
    rows = row0 + local
    keep_r = row_mask.to(tl.float32)
    scale, bias = scale_and_bias(scale_ptr, bias_ptr, HAS_BIAS)
    scale2 = scale * LOG2E
    bias2 = bias * LOG2E
    row_pad = pad(row_mask)
    if ROWS:
        row_shift = bias2 - tl.load(row_coef_ptr + rows, mask=row_mask, other=POS_INF) * LOG2E
        w_r = tl.load(row_coef_ptr + coef_stride_r + rows, mask=row_mask, other=0.0)
        h_r = tl.load(row_coef_ptr + 2 * coef_stride_r + rows, mask=row_mask, other=0.0)
        if SMOOTH:
            e_r = tl.load(row_coef_ptr + 3 * coef_stride_r + rows, mask=row_mask, other=0.0)
        if TEACHER:
            a_r = tl.load(row_coef_ptr + 4 * coef_stride_r + rows, mask=row_mask, other=0.0)
            t_shift_r = -tl.load(row_coef_ptr + 5 * coef_stride_r + rows, mask=row_mask,
                                 other=0.0) * LOG2E
    else:
        h_r = keep_r * 0.0
    if TEACHER:
        tscale2 = tl.load(tscale_ptr).to(tl.float32) * LOG2E
    rid = rows
    if IDS:
        rid = tl.load(row_ids_ptr + rows, mask=row_mask, other=0)
    grad_rows = grad_ptr + local.to(tl.int64)[:, None] * stride_gm

    dscale_acc = tl.zeros((BM,), tl.float32)
    dbias_acc = tl.zeros((BM,), tl.float32)
    # the positive pairs' logits (one per row) as the tiles compute them
    diag_row = row0 + pid_m * BM + offset
    a_pos = tl.zeros((BM,), tl.float32)
    tt_pos = tl.zeros((BM,), tl.float32)
    for j in range(j_lo, j_hi):
        cols = j * BN + tl.arange(0, BN)
        col_mask = cols < N
        col_pad = pad(col_mask)
        valid = row_mask[:, None] & col_mask[None, :]
        if not (IDS or SMOOTH or TEACHER or INPUT_PRECISION == "tf32x3"):
            # loaded before the k-loop, their latency hidden under it; with targets (or
            # fp32's three-product tiles) too many registers to keep through the loop
            col_shift, w_c, e_c = _col_coefs(col_coef_ptr, coef_stride_c, cols, col_mask,
                                             bias2, COLS, SMOOTH)
        grad = tl.zeros((BM, BN), tl.float32)
        if TEACHER:
            # the teacher's terms first: only they are live during the student's k-loop
            tt = logits_tile(xt_ptr, yt_ptr, row0 + pid_m * BM, j * BN, row_mask, col_mask, D,
                             stride_txn, stride_txd, stride_tyn, stride_tyd,
                             BM, BN, BK, EVEN_K, DOT_FP32, INPUT_PRECISION) * tscale2
            if not IDS:
                if diagonal_tile(diag_row, j * BN, BM, BN):
                    hard = _hard_mask(rows, cols, rows, cols, valid, offset, IDS)
                    tt_pos += tl.sum(tl.where(hard, tt, 0.0), 1)
            if ROWS:
                grad -= a_r[:, None] * tl.exp2(tt + t_shift_r[:, None] + col_pad[None, :])
            if COLS:
                a_c = tl.load(col_coef_ptr + 4 * coef_stride_c + cols, mask=col_mask, other=0.0)
                t_lse_c = tl.load(col_coef_ptr + 5 * coef_stride_c + cols, mask=col_mask,
                                  other=0.0)
                grad -= a_c[None, :] * tl.exp2(tt - t_lse_c[None, :] * LOG2E + row_pad[:, None])
        acc = logits_tile(x_ptr, y_ptr, row0 + pid_m * BM, j * BN, row_mask, col_mask, D,
                          stride_xn, stride_xd, stride_yn, stride_yd,
                          BM, BN, BK, EVEN_K, DOT_FP32, INPUT_PRECISION)
        if IDS or SMOOTH or TEACHER or INPUT_PRECISION == "tf32x3":
            col_shift, w_c, e_c = _col_coefs(col_coef_ptr, coef_stride_c, cols, col_mask,
                                             bias2, COLS, SMOOTH)
        a = acc * scale2
        if not IDS:
            if diagonal_tile(diag_row, j * BN, BM, BN):
                # rows past the chunk are padding here even where they are rows of the matrix
                hard = _hard_mask(rows, cols, rows, cols, valid, offset, IDS)
                a_pos += tl.sum(tl.where(hard, a, 0.0), 1)
        if ROWS:
            grad += w_r[:, None] * tl.exp2(a + row_shift[:, None] + col_pad[None, :])
        if COLS:
            grad += w_c[None, :] * tl.exp2(a + col_shift[None, :] + row_pad[:, None])
        if IDS:
            cid = tl.load(col_ids_ptr + cols, mask=col_mask, other=0)
            h_c = _col_hard_weight(col_coef_ptr, coef_stride_c, cols, col_mask, COLS)
            hard = _hard_mask(rows, cols, rid, cid, valid, offset, IDS)
            grad = tl.where(hard, grad - (h_r[:, None] + h_c[None, :]), grad)
        if SMOOTH:
            keep_c = col_mask.to(tl.float32)
            if ROWS:
                grad -= e_r[:, None] * keep_c[None, :]
            if COLS:
                grad -= e_c[None, :] * keep_r[:, None]
        dscale_acc += tl.sum(grad * a, 1)
        dbias_acc += tl.sum(grad, 1)
        tl.store(grad_rows + cols[None, :], grad.to(grad_ptr.dtype.element_ty), mask=valid)
    dscale = tl.sum(dscale_acc, 0)
    dbias = tl.sum(dbias_acc, 0)
    if not IDS and (diag_row < j_hi * BN) and (j_lo * BN < diag_row + BM):
        # Row i's positive, column c = i + offset, in this program's columns: the tiles
        # left out its term -(h_i + h'_c) (they only took its logits, a_pos and tt_pos);
        # its gradient is written again here and the sums corrected. The row coefficients
        # are those of the tiles; logits recomputed here would differ by a rounding, which
        # the cancellation in u p - h magnifies where p is near 1.
        pos = rows + offset
        on = row_mask & (pos >= j_lo * BN) & (pos < tl.minimum(j_hi * BN, N))
        a_pos = tl.where(on, a_pos, 0.0)
        h_pos = tl.where(on, h_r, 0.0) + _col_hard_weight(col_coef_ptr, coef_stride_c, pos,
                                                          on, COLS)
        p_shift, w_p, e_p = _col_coefs(col_coef_ptr, coef_stride_c, pos, on, bias2, COLS,
                                       SMOOTH)
        g = -h_pos
        if ROWS:
            g += w_r * tl.exp2(a_pos + row_shift)
            if SMOOTH:
                g -= e_r
        if COLS:
            g += w_p * tl.exp2(a_pos + p_shift) - e_p
        if TEACHER:
            if ROWS:
                g -= a_r * tl.exp2(tt_pos + t_shift_r)
            if COLS:
                a_p = tl.load(col_coef_ptr + 4 * coef_stride_c + pos, mask=on, other=0.0)
                t_lse_p = tl.load(col_coef_ptr + 5 * coef_stride_c + pos, mask=on, other=0.0)
                g -= a_p * tl.exp2(tt_pos - t_lse_p * LOG2E)
        dscale -= tl.sum(h_pos * a_pos, 0)
        dbias -= tl.sum(h_pos, 0)
        tl.debug_barrier()  # after every thread's tile stores of these elements
        tl.store(grad_ptr + local.to(tl.int64) * stride_gm + pos,
                 g.to(grad_ptr.dtype.element_ty), mask=on)
    pid = pid_m * num_splits + split
    tl.store(partial_ptr + pid, dscale)
    tl.store(partial_ptr + partial_stride + pid, dbias)


@tuned("siglip", configs=_CONFIGS, key=["D", "n_bucket", "WRITE_GRAD"], sizes=["D", "n_bucket"],
       defaults=_FP32_DEFAULT, variant_default=_fp32_gradient_default)
@even_k
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

    With u = -z S (S on negatives, -S on positives): loss l = softplus(u) and
    grad = z' w sigmoid(u) (z' = +1 on negatives, -1 on positives), both from one
    exponential of t = u log2(e), which one FMA gives from the accumulator
    (:func:`~vlmkernels.kernels.blocks.softplus2_sigmoid`: softplus in base 2; the sums are
    converted to natural units once per program); the sign flips only on the tiles that
    hold positives. Program (m, k) covers row block m and the column
    blocks of split k; its row losses go to loss[k, rows] (the host sums over k),
    sum(grad * S) = sum(w sigmoid(u) u) and sum(grad) to partial[0, pid] and
    partial[1, pid]. Padding columns get u = -1e30 (loss and gradient exactly 0); padding
    rows have w = 0 and their losses are not stored.
    """
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    j_lo, j_hi = block_range(split, num_splits, N, BN)
    local = pid_m * BM + tl.arange(0, BM)
    row_mask = local < n_rows
    rows = row0 + local
    scale, bias = scale_and_bias(scale_ptr, bias_ptr, HAS_BIAS)
    scale2 = scale * LOG2E
    bias2 = bias * LOG2E
    if WRITE_GRAD:
        w_r = tl.load(w_row_ptr + rows, mask=row_mask, other=0.0)
    grad_rows = grad_ptr + local.to(tl.int64)[:, None] * stride_gm
    diag_row = row0 + pid_m * BM + offset

    # sums in base-2 units (t = u log2(e)), converted once per program
    loss_acc = tl.zeros((BM,), tl.float32)
    dscale_acc = tl.zeros((BM,), tl.float32)
    dbias_acc = tl.zeros((BM,), tl.float32)
    for j in range(j_lo, j_hi):
        cols = j * BN + tl.arange(0, BN)
        col_mask = cols < N
        acc = logits_tile(x_ptr, y_ptr, row0 + pid_m * BM, j * BN, row_mask, col_mask, D,
                          stride_xn, stride_xd, stride_yn, stride_yd,
                          BM, BN, BK, EVEN_K, DOT_FP32, INPUT_PRECISION)
        t = acc * scale2 + tl.where(col_mask, bias2, PAD_LOGIT)[None, :]
        on_diagonal = diagonal_tile(diag_row, j * BN, BM, BN)
        if on_diagonal:
            hard = (rows[:, None] + offset == cols[None, :]) & col_mask[None, :]
            t = tl.where(hard, -t, t)
        loss2, sig = softplus2_sigmoid(t)
        loss_acc += tl.sum(loss2, 1)
        if WRITE_GRAD:
            grad = sig * w_r[:, None]
            dscale_acc += tl.sum(grad * t, 1)
            if on_diagonal:
                hard = (rows[:, None] + offset == cols[None, :]) & col_mask[None, :]
                grad = tl.where(hard, -grad, grad)
            dbias_acc += tl.sum(grad, 1)
            tl.store(grad_rows + cols[None, :], grad.to(grad_ptr.dtype.element_ty),
                     mask=row_mask[:, None] & col_mask[None, :])
    tl.store(loss_ptr + split.to(tl.int64) * loss_stride + rows, loss_acc * LN2, mask=row_mask)
    if WRITE_GRAD:
        pid = pid_m * num_splits + split
        tl.store(partial_ptr + pid, tl.sum(dscale_acc, 0) * LN2)
        tl.store(partial_ptr + partial_stride + pid, tl.sum(dbias_acc, 0))
# fmt: on

"""The finishing kernels of the whole-loss path (:mod:`.whole_loss`, :mod:`.whole_targets`):
what the host used to do with a dozen small torch ops after the main kernels, in one or
two launches.

- ``_ce_target_parts_kernel``: merges the CLIP statistics kernel's partials into the row
  (and column) log-sum-exp, writes the loss and the backward's (6, M) coefficients per
  side: directly when it runs as one program, else as per-program partials that
  ``_sum_parts_kernel`` adds. For targets with ids, ``_ids_count_kernel`` counts each
  row's positives first; with a teacher, ``_lse_merge_kernel`` gives the teacher's
  log-sum-exp, which the student's statistics read.
- ``_grads_finalize_kernel``: scales the fp32 products G Y and G^T X of a logit gradient
  G into dX and dY (in the features' dtype), and reduces the scale and bias gradients
  (and SigLIP's loss) from the partial sums of the kernel that wrote G; with more than one
  program, ``_grad_scalars_kernel`` finishes the scalars.

Block sizes are fixed per machine kind (not tuned): the host sizes the partial buffers
from them; only the warps are tuned.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...core.runtime import INTERPRETED, autotune_configs
from ...core.tuning import tuned
from ...kernels.blocks import LN2, LOG2E, NEG_INF, block_range

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
"""The logit-gradient chunk G's rounding per dtype (``G_EPS`` of the finishing kernels)."""
FP32_EPS = tl.constexpr(UNIT_ROUNDOFF[torch.float32])

# Samples per program of the parts kernel, rows per program of the gradient finishing
# kernel, partials summed per step: small under the interpreter so that the tests run
# several programs.
PARTS_BLOCK = 32 if INTERPRETED else 1024
FINAL_ROWS = 8 if INTERPRETED else 32
SUM_BLOCK = 32 if INTERPRETED else 1024
FINAL_COLUMNS = 32 if INTERPRETED else 128
# the ids' positive counts: tiles of rows x ids (the ids are int64)
COUNT_ROWS = 32 if INTERPRETED else 64
COUNT_COLUMNS = 32 if INTERPRETED else 64


def _warps(*warps: int):
    return autotune_configs([triton.Config({}, num_warps=w) for w in warps],
                            triton.Config({}, num_warps=4))  # fmt: skip


@triton.jit
def _merge_lse(max_ptr, sum_ptr, stride, parts, offs, mask):
    """ln(sum_k l_k 2^m_k) over ``parts`` base-2 (max m, sum l) partials at
    ``max_ptr + k * stride + offs``; NaN stays NaN."""
    m = tl.full(offs.shape, NEG_INF, tl.float32)
    l = tl.zeros(offs.shape, tl.float32)  # noqa: E741
    for k in range(parts):
        mk = tl.load(max_ptr + k * stride + offs, mask=mask, other=NEG_INF).to(tl.float32)
        lk = tl.load(sum_ptr + k * stride + offs, mask=mask, other=0.0).to(tl.float32)
        m_new = tl.maximum(m, mk)
        m_use = tl.where(m_new == NEG_INF, 0.0, m_new)
        l = l * tl.exp2(m - m_use) + lk * tl.exp2(mk - m_use)  # noqa: E741
        m = m_new
    return (m + tl.log2(tl.where(mask, l, 1.0))) * LN2


# fmt: off
@tuned("sum_parts", configs=_warps(4), key=["n"], sizes=["n"])
@triton.jit
def _sum_parts_kernel(part_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """out = sum(part[:n]), one program (the per-program partials of another kernel)."""
    acc = tl.zeros((BLOCK,), tl.float32)
    for i in range(0, n, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        acc += tl.load(part_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr, tl.sum(acc, 0))


@triton.jit
def _sum_range(ptr, n, BLOCK: tl.constexpr):
    """sum(ptr[:n]) in fp32, in BLOCK-wide steps."""
    acc = tl.zeros((BLOCK,), tl.float32)
    for i in range(0, n, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        acc += tl.load(ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    return tl.sum(acc, 0)


@triton.jit
def _scalar_grads(partial_ptr, n_partials, dot, loss_part_ptr, n_loss, scale_ptr, bias_ptr,
                  grad_ptr, ds_ptr, db_ptr, loss_ptr, kappa,
                  SIGLIP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GRAD: tl.constexpr,
                  HAS_LOSS: tl.constexpr, BLOCK: tl.constexpr, G_EPS: tl.constexpr):
    """The scale and bias gradients from the gradient kernel's partials (sum(G * a) and
    sum(G) per program) and dot = sum(G * XY^T) (used where s = 0, where a carries no
    information), times g = kappa * upstream gradient; SigLIP's loss kappa * sum(losses).

    CLIP's a is s log2(e) XY^T: ds = sum(G a) / (s log2 e). SigLIP's is S = s XY^T + b:
    ds = (sum(G S) - b sum(G)) / s, or dot where that difference cancels (|b| dominating the
    logits) so much that its fp32 rounding exceeds dot's, that of G's dtype (``G_EPS``,
    the unit roundoff; :func:`siglip_scale_grad` on the host)."""
    p0 = _sum_range(partial_ptr, n_partials, BLOCK)
    p1 = _sum_range(partial_ptr + n_partials, n_partials, BLOCK)
    s = tl.load(scale_ptr).to(tl.float32)
    g = kappa
    if HAS_GRAD:
        g = tl.load(grad_ptr).to(tl.float32) * kappa
    use = s != 0
    if SIGLIP:
        if HAS_BIAS:
            bp1 = tl.load(bias_ptr).to(tl.float32) * p1
            spread = tl.abs(p0) + tl.abs(bp1)
            p0 = p0 - bp1
            use = use & (spread * FP32_EPS <= G_EPS * tl.abs(p0))
        by_scale = p0 / tl.where(s != 0, s, 1.0)
    else:
        by_scale = p0 / tl.where(s != 0, s * LOG2E, 1.0)
    tl.store(ds_ptr, tl.where(use, by_scale, dot) * g)
    tl.store(db_ptr, p1 * g)
    if HAS_LOSS:
        tl.store(loss_ptr, _sum_range(loss_part_ptr, n_loss, BLOCK) * kappa)


_FINAL_KEY = ["D", "SIGLIP", "HAS_BIAS", "HAS_GRAD", "HAS_LOSS"]


# 8 warps, not 4: a ROWS x BD tile of 4 warps holds 32 fp32 values per thread of each of
# dot, G Y, X and G^T X, which the ptxas Triton 3.6-3.8 use for sm_90 (CUDA 12.8/12.9;
# Triton 3.9's 13.x allocates 100) fits in 96 registers only by spilling 8 B per thread
# in the 16-bit CLIP variant (Triton 3.7 and 3.8). 8 warps: 50-76 registers, no spill
# with either ptxas, and twice the warps per SM (3-4 CTAs of 8, not 3-5 of 4).
@tuned("grads_finalize", configs=_warps(8), key=_FINAL_KEY, sizes=["D"])
@triton.jit
def _grads_finalize_kernel(
    x_ptr, gy_ptr, gtx_ptr, dx_ptr, dy_ptr, scale_ptr, bias_ptr, grad_ptr,
    partial_ptr, loss_part_ptr, ds_ptr, db_ptr, loss_ptr,
    M, N, D, stride_xm, stride_xd, n_partials, n_loss, kappa,
    SIGLIP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GRAD: tl.constexpr,
    HAS_LOSS: tl.constexpr, ROWS: tl.constexpr, BD: tl.constexpr, BLOCK: tl.constexpr,
    G_EPS: tl.constexpr,
):
    """dX = c G Y (M, D) and dY = c G^T X (N, D) from the fp32 products ``gy`` and ``gtx``
    (contiguous), c = s kappa (times the upstream gradient with ``HAS_GRAD``), written in
    the dtype of ``dx`` / ``dy`` (which may be gy / gtx themselves: in place). Program p
    takes rows p ROWS .. p ROWS + ROWS of both and writes its share of sum(G * XY^T) =
    sum_i x_i . (G Y)_i to partial[2 n_partials + p], after the gradient kernel's partial
    sums of G a and G (n_partials each); one program also finishes the scalars
    (:func:`_scalar_grads`), more leave that to ``_grad_scalars_kernel``."""
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    rows64 = rows.to(tl.int64)
    s = tl.load(scale_ptr).to(tl.float32)
    c = s * kappa
    if HAS_GRAD:
        c = c * tl.load(grad_ptr).to(tl.float32)
    in_x = rows < M
    in_y = rows < N
    dot = tl.zeros((ROWS, BD), tl.float32)  # reduced once, after the loop
    for k0 in range(0, D, BD):
        ks = k0 + tl.arange(0, BD)
        k_ok = ks < D
        mx = in_x[:, None] & k_ok[None, :]
        my = in_y[:, None] & k_ok[None, :]
        at = rows64[:, None] * D + ks[None, :]
        gy = tl.load(gy_ptr + at, mask=mx, other=0.0)
        x = tl.load(x_ptr + rows64[:, None] * stride_xm + ks[None, :] * stride_xd, mask=mx,
                    other=0.0).to(tl.float32)
        dot += gy * x
        tl.store(dx_ptr + at, (gy * c).to(dx_ptr.dtype.element_ty), mask=mx)
        gtx = tl.load(gtx_ptr + at, mask=my, other=0.0)
        tl.store(dy_ptr + at, (gtx * c).to(dy_ptr.dtype.element_ty), mask=my)
    total = tl.sum(tl.sum(dot, 1), 0)
    tl.store(partial_ptr + 2 * n_partials + pid, total)
    if tl.num_programs(0) == 1:
        _scalar_grads(partial_ptr, n_partials, total, loss_part_ptr, n_loss, scale_ptr,
                      bias_ptr, grad_ptr, ds_ptr, db_ptr, loss_ptr, kappa,
                      SIGLIP, HAS_BIAS, HAS_GRAD, HAS_LOSS, BLOCK, G_EPS)


@tuned("grad_scalars", configs=_warps(4), key=_FINAL_KEY[1:], sizes=[])
@triton.jit
def _grad_scalars_kernel(
    partial_ptr, loss_part_ptr, scale_ptr, bias_ptr, grad_ptr, ds_ptr, db_ptr, loss_ptr,
    n_partials, n_dot, n_loss, kappa,
    SIGLIP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GRAD: tl.constexpr,
    HAS_LOSS: tl.constexpr, BLOCK: tl.constexpr, G_EPS: tl.constexpr,
):
    """The scalars of ``_grads_finalize_kernel`` when it ran as several programs."""
    dot = _sum_range(partial_ptr + 2 * n_partials, n_dot, BLOCK)
    _scalar_grads(partial_ptr, n_partials, dot, loss_part_ptr, n_loss, scale_ptr, bias_ptr,
                  grad_ptr, ds_ptr, db_ptr, loss_ptr, kappa,
                  SIGLIP, HAS_BIAS, HAS_GRAD, HAS_LOSS, BLOCK, G_EPS)
# fmt: on


# ------------------------------------------------------- targets: ids, smoothing, teacher
# fmt: off
@tuned("ids_count", configs=_warps(4), key=["N"], sizes=["N"])
@triton.jit
def _ids_count_kernel(row_ids_ptr, col_ids_ptr, count_ptr, M, N,
                      BM: tl.constexpr, BN: tl.constexpr):
    """Positive counts of the rows of a block with ids: program (m, k) writes
    count[k, i] = #{j in the column blocks of split k: col_ids[j] == row_ids[i]} for the
    rows i of block m (0 for a split without columns); the sum over the splits is the count
    (exact in fp32 up to 2^24)."""
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    j_lo, j_hi = block_range(split, tl.num_programs(1), N, BN)
    rows = pid_m * BM + tl.arange(0, BM)
    row_mask = rows < M
    rid = tl.load(row_ids_ptr + rows, mask=row_mask, other=0)
    count = tl.zeros((BM,), tl.float32)
    for j in range(j_lo, j_hi):
        cols = j * BN + tl.arange(0, BN)
        col_mask = cols < N
        cid = tl.load(col_ids_ptr + cols, mask=col_mask, other=0)
        hit = (rid[:, None] == cid[None, :]) & col_mask[None, :]
        count += tl.sum(hit.to(tl.float32), 1)
    tl.store(count_ptr + split.to(tl.int64) * M + rows, count, mask=row_mask)


@tuned("lse_merge", configs=_warps(4), key=["M", "COLS"], sizes=["M"])
@triton.jit
def _lse_merge_kernel(row_max_ptr, row_sum_ptr, col_max_ptr, col_sum_ptr, lse_r_ptr, lse_c_ptr,
                      M, splits, groups, COLS: tl.constexpr, BLOCK: tl.constexpr):
    """The natural log-sum-exp of the M rows (and, with ``COLS``, of the M columns of a
    square block) from the statistics kernel's base-2 partials, ``splits`` x M (rows) and
    ``groups`` x M (columns): the teacher's, which its student's statistics read."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    tl.store(lse_r_ptr + offs, _merge_lse(row_max_ptr, row_sum_ptr, M, splits, offs, mask),
             mask=mask)
    if COLS:
        tl.store(lse_c_ptr + offs, _merge_lse(col_max_ptr, col_sum_ptr, M, groups, offs, mask),
                 mask=mask)


@triton.jit
def _sum_parts(ptr, stride, parts, offs, mask):
    """sum_k ptr[k * stride + offs] over ``parts`` partials (fp32)."""
    acc = tl.zeros(offs.shape, tl.float32)
    for k in range(parts):
        acc += tl.load(ptr + k * stride + offs, mask=mask, other=0.0)
    return acc


@triton.jit
def _target_side(lse, hard, count, logit_sum, teacher_dot, t_lse, coef_ptr, M, offs, mask,
                 n_classes, smoothing, alpha, SMOOTH: tl.constexpr, TEACHER: tl.constexpr):
    """The cross-entropies of one side (rows or columns) from its complete statistics, as
    :meth:`.algebra.SideStats.losses`, and its (6, M) backward coefficients at coef_ptr, as
    :meth:`.algebra.SideStats.coefficients` with unit upstream weights: (lse, u, h, e, a,
    teacher lse) with u = 1 (NaN for a sample without a target: no positive and
    alpha < 1), h = u (1 - alpha)(1 - smoothing) / count, e = u (1 - alpha) smoothing / n,
    a = u alpha. Returns the losses, NaN for the samples without a target."""
    keep = 1.0 - alpha
    none = (count == 0) & (count * 0.0 + keep > 0)  # (a tensor: the interpreter's &)
    per = tl.maximum(count, 1.0)
    dot = tl.where(none, float("nan"), hard / per)
    if SMOOTH:
        dot = (1.0 - smoothing) * dot + (smoothing / n_classes) * logit_sum
    if TEACHER:
        dot = keep * dot + alpha * teacher_dot
    u = tl.where(none, float("nan"), 1.0)
    h = tl.where(count > 0, u * (keep * (1.0 - smoothing)) / per, 0.0)
    tl.store(coef_ptr + offs, lse, mask=mask)
    tl.store(coef_ptr + M + offs, u, mask=mask)
    tl.store(coef_ptr + 2 * M + offs, h, mask=mask)
    tl.store(coef_ptr + 3 * M + offs, u * (keep * smoothing / n_classes), mask=mask)
    tl.store(coef_ptr + 4 * M + offs, u * alpha, mask=mask)
    tl.store(coef_ptr + 5 * M + offs, t_lse, mask=mask)
    return lse - dot


_TARGET_PARTS_KEY = ["M", "COLS", "IDS", "SMOOTH", "TEACHER"]  # not ALPHA_PTR: one load


@tuned("ce_target_parts", configs=_warps(4), key=_TARGET_PARTS_KEY, sizes=["M"])
@triton.jit
def _ce_target_parts_kernel(
    row_max_ptr, row_sum_ptr, row_acc_ptr, col_max_ptr, col_sum_ptr, col_acc_ptr, count_ptr,
    t_lse_r_ptr, t_lse_c_ptr, coef_ptr, part_ptr, loss_ptr,
    M, N, offset, splits, groups, count_splits, row_slot, col_slot, weight, smoothing, alpha,
    COLS: tl.constexpr, IDS: tl.constexpr, SMOOTH: tl.constexpr, TEACHER: tl.constexpr,
    ALPHA_PTR: tl.constexpr, BLOCK: tl.constexpr,
):
    """The cross-entropy losses of a logit block and their coefficients, for one positive
    per row at col = row + offset (no flag) or targets with ids (``IDS``), label smoothing
    (``SMOOTH``) and / or a teacher (``TEACHER``, alpha > 0): the cross-entropy of the M
    rows over the N columns of a logit block (and, with ``COLS``, of its columns: then the
    block is square, offset 0 and the ids are the same on both sides, so that the columns'
    positive counts are the rows'), with t = (1 - alpha)((1 - smoothing) hard / count +
    smoothing / n) + alpha softmax(T). With ``ALPHA_PTR`` alpha is a pointer to it (a 0-d
    fp32 tensor, what the ops get under torch.compile), loaded once.

    Reads the statistics kernel's partials (the used ``splits`` of the rows, ``groups`` of
    the columns; accumulator slot s of the rows at row_acc + s row_slot, of the columns at
    col_acc + s col_slot: 0 the sum of S on positives, 2 the sum of S, 3 the teacher sum),
    the ids' positive counts (``count_splits`` x M, ``_ids_count_kernel``; without ids
    one positive where col = row + offset is a column, else none) and the teacher's lse
    (``_lse_merge_kernel``). Writes coef (1 + COLS, 6, M) (:func:`_target_side`), part[pid],
    this program's share of ``weight * sum(losses)``, and as one program the loss."""
    pid = tl.program_id(0)
    if ALPHA_PTR:
        alpha = tl.load(alpha).to(tl.float32)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    zero = tl.zeros((BLOCK,), tl.float32)
    lse_r = _merge_lse(row_max_ptr, row_sum_ptr, M, splits, offs, mask)
    hard = _sum_parts(row_acc_ptr, M, splits, offs, mask)
    if IDS:
        count = _sum_parts(count_ptr, M, count_splits, offs, mask)
    else:
        pos = offs + offset
        count = ((pos >= 0) & (pos < N)).to(tl.float32)
    logit_sum, teacher_dot, t_lse = zero, zero, zero
    if SMOOTH:
        logit_sum = _sum_parts(row_acc_ptr + 2 * row_slot, M, splits, offs, mask)
    if TEACHER:
        teacher_dot = _sum_parts(row_acc_ptr + 3 * row_slot, M, splits, offs, mask)
        t_lse = tl.load(t_lse_r_ptr + offs, mask=mask, other=0.0)
    losses = _target_side(lse_r, hard, count, logit_sum, teacher_dot, t_lse, coef_ptr, M, offs,
                          mask, N, smoothing, alpha, SMOOTH, TEACHER)
    if COLS:
        lse_c = _merge_lse(col_max_ptr, col_sum_ptr, M, groups, offs, mask)
        if IDS:
            hard = _sum_parts(col_acc_ptr, M, groups, offs, mask)
        if SMOOTH:
            logit_sum = _sum_parts(col_acc_ptr + 2 * col_slot, M, groups, offs, mask)
        if TEACHER:
            teacher_dot = _sum_parts(col_acc_ptr + 3 * col_slot, M, groups, offs, mask)
            t_lse = tl.load(t_lse_c_ptr + offs, mask=mask, other=0.0)
        losses += _target_side(lse_c, hard, count, logit_sum, teacher_dot, t_lse,
                               coef_ptr + 6 * M, M, offs, mask, M, smoothing, alpha, SMOOTH,
                               TEACHER)
    part = tl.sum(tl.where(mask, losses, 0.0), 0) * weight
    tl.store(part_ptr + pid, part)
    if tl.num_programs(0) == 1:
        tl.store(loss_ptr, part)
# fmt: on


def siglip_scale_grad(g_dot_logits, g_sum, g_dot_xy, s, bias, dtype):
    """SigLIP's d scale (before the weights' factor) as :func:`_scalar_grads` chooses it,
    on the host (the chunked launcher): (sum(G S) - b sum(G)) / s from the kernel's fp32
    partials, or sum(G * XY^T) (``g_dot_xy``, G rounded to ``dtype``) where s = 0 or the
    difference cancels beyond what G's rounding costs."""
    use = s != 0
    if bias is not None:
        b_sum = bias.float() * g_sum
        spread = g_dot_logits.abs() + b_sum.abs()
        g_dot_logits = g_dot_logits - b_sum
        use = use & (spread * FP32_EPS.value <= UNIT_ROUNDOFF[dtype] * g_dot_logits.abs())
    return torch.where(use, g_dot_logits / torch.where(s != 0, s, 1.0), g_dot_xy)

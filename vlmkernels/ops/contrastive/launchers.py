"""Launchers of the contrastive family's Triton kernels (:mod:`.kernels`): the statistics
and gradients of one block of logits S = s x y^T + b, CLIP and SigLIP.

Each launcher sizes the partial buffers and grids, launches, and merges the partials on
the host; the gradient launchers drive the chunked products of :mod:`.chunked`. Results
are :class:`~.algebra.SideStats` (statistics) or fp32 sums; the reference
(:mod:`.reference`) returns the same for the PyTorch path.
"""

from __future__ import annotations

import math

import torch
import triton

from ...core.runtime import device_guard, dot_precision, next_pow2_bucket, sm_count
from ...kernels.blocks import tile_addressable
from .algebra import SideStats, Targets, onehot_col_dot, onehot_counts
from .chunked import feature_grads, normalise
from .kernels import MIN_BLOCK, NOMINAL_BLOCK, _clip_grad_kernel, _clip_stats_kernel, _siglip_kernel

__all__ = ["block_grads_triton", "block_stats_triton", "siglip_grads_triton", "siglip_rows_triton"]

LN2 = math.log(2.0)
LOG2E = 1.0 / LN2


def _col_splits(n_rows: int, N: int, device: torch.device) -> int:
    """Column splits for a chunk of n_rows rows: about 4 programs per SM in all."""
    row_blocks = triton.cdiv(n_rows, NOMINAL_BLOCK)
    col_blocks = triton.cdiv(N, NOMINAL_BLOCK)
    return max(1, min(col_blocks, triton.cdiv(4 * sm_count(device), row_blocks)))


def _max_programs(n_rows: int, splits: int) -> int:
    return triton.cdiv(n_rows, MIN_BLOCK) * splits


def _merge_lse2(m2: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Natural log-sum-exp over dim 0 of base-2 (max, sum) partials; NaN stays NaN."""
    top = m2.amax(0)
    return (top + torch.log2((l * torch.exp2(m2 - top)).sum(0))) * LN2


def _teacher_args(targets: Targets, x, y):
    if targets.teacher is None:
        return x, y, x.new_ones((), dtype=torch.float32), (0, 0, 0, 0)
    xt, yt, st = targets.teacher
    xt, yt = tile_addressable(xt), tile_addressable(yt)
    return xt, yt, st, (xt.stride(0), xt.stride(1), yt.stride(0), yt.stride(1))


def _flags(x, bias, targets: Targets, rows: bool, cols: bool) -> dict:
    dot_fp32, precision = dot_precision(x.dtype)
    return dict(
        ROWS=rows, COLS=cols, IDS=targets.ids, SMOOTH=bool(targets.smoothing),
        TEACHER=targets.teacher is not None, HAS_BIAS=bias is not None, DOT_FP32=dot_fp32,
        INPUT_PRECISION=precision,
    )  # fmt: skip


def block_stats_triton(x, y, scale, bias, targets: Targets, rows=True, cols=True,
                       teacher_lse=(None, None)):  # fmt: skip
    """(row SideStats or None, column SideStats or None) of the block S = s x y^T + b."""
    x, y = tile_addressable(x), tile_addressable(y)
    m, d = x.shape
    n = y.shape[0]
    groups = min(16, triton.cdiv(m, NOMINAL_BLOCK))
    splits = min(16, triton.cdiv(n, NOMINAL_BLOCK))
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
    with device_guard(x):
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
    row_cnt, col_cnt = onehot_counts(m, n, targets.offset, x.device)
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
            col_acc[0] if targets.ids else onehot_col_dot(row_acc[0], n, targets.offset),
            col_acc[1] if targets.ids else col_cnt,
            col_acc[2] if smooth else None, col_acc[3] if teach else None,
        )  # fmt: skip
    return row_stats, col_stats


def block_grads_triton(x, y, scale, bias, targets: Targets, row_coef, col_coef, chunk_rows,
                       dx_acc=None, dy_acc=None):  # fmt: skip
    """Gradients of sum_i u_i l^row_i + sum_j v_j l^col_j for a block, from (6, M) / (6, N)
    coefficients (:meth:`SideStats.coefficients`; None for a direction not in the loss).

    Returns (dx, dy, dscale, dbias); with fp32 accumulators, dx and dy are added into them.
    """
    x, y = tile_addressable(x), tile_addressable(y)
    m, d = x.shape
    n = y.shape[0]
    rows, cols = row_coef is not None, col_coef is not None
    weights = [c[1] for c in (row_coef, col_coef) if c is not None]
    _, kappa = normalise(*weights)
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
    with device_guard(x):
        dx, dy, g_dot_xy = feature_grads(x, y, s * kappa, chunk_rows, fill, dx_acc, dy_acc)
    # the kernel's logit term is a = s log2(e) XY^T (no bias): sum(grad a) / (s log2 e)
    g_dot_logits, g_sum = partials[:, 0].sum(), partials[:, 1].sum()
    dscale = torch.where(s != 0, g_dot_logits / (LOG2E * s), g_dot_xy)
    return dx, dy, dscale * kappa, g_sum * kappa


def siglip_rows_triton(x, y, scale, bias, offset=0):
    x, y = tile_addressable(x), tile_addressable(y)
    m, d = x.shape
    n = y.shape[0]
    splits = _col_splits(m, n, x.device)
    loss = torch.empty((splits, m), dtype=torch.float32, device=x.device)
    dot_fp32, precision = dot_precision(x.dtype)
    grid = lambda meta: (triton.cdiv(m, meta["BM"]), splits)  # noqa: E731
    with device_guard(x):
        # loss stands in for the gradient pointers, which this variant never touches
        _siglip_kernel[grid](
            x, y, scale, bias if bias is not None else scale, loss, loss, m, loss, 0, loss, 0,
            0, m, n, d, offset, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
            next_pow2_bucket(max(m, n)), HAS_BIAS=bias is not None, WRITE_GRAD=False,
            DOT_FP32=dot_fp32, INPUT_PRECISION=precision,
        )  # fmt: skip
    return loss.sum(0)


def siglip_grads_triton(x, y, scale, bias, w_rows, chunk_rows, offset=0, dx_acc=None,
                        dy_acc=None):  # fmt: skip
    """(dx, dy, dscale, dbias, per-row losses) of sum_i w_rows[i] * l_i over an M x N
    block with positives at col = row + offset."""
    x, y = tile_addressable(x), tile_addressable(y)
    m, d = x.shape
    n = y.shape[0]
    chunk_rows = min(chunk_rows, m)
    splits = _col_splits(chunk_rows, n, x.device)
    max_prog = _max_programs(chunk_rows, splits)
    loss = torch.empty((splits, m), dtype=torch.float32, device=x.device)
    partials = torch.zeros((triton.cdiv(m, chunk_rows), 2, max_prog), dtype=torch.float32,
                           device=x.device)  # fmt: skip
    (w,), kappa = normalise(w_rows.float())
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
    with device_guard(x):
        dx, dy, g_dot_xy = feature_grads(x, y, s * kappa, chunk_rows, fill, dx_acc, dy_acc)
    # the kernel's logit term is S = s XY^T + b itself. sum(g S) - b sum(g) cancels when |b|
    # is large (SigLIP's b = -10): about 1e-6 relative error on dscale in fp32, against
    # 2e-8 for an in-kernel sum of g s XY^T, which costs the kernel a live tile (spills
    # from 72 to 176 B per thread at 128 x 128 on sm_90)
    g_dot_logits, g_sum = partials[:, 0].sum(), partials[:, 1].sum()
    if bias is not None:
        g_dot_logits = g_dot_logits - bias.float() * g_sum
    dscale = torch.where(s != 0, g_dot_logits / s, g_dot_xy)
    return dx, dy, dscale * kappa, g_sum * kappa, loss.sum(0)

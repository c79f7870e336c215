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

from ...core.runtime import cdiv, device_guard, dot_precision, next_pow2, sm_count
from ...kernels.blocks import tile_addressable
from .algebra import SideStats, Targets, ids_count, onehot_col_dot, onehot_count
from .chunked import NORMALISED_DTYPES, feature_grads, normalise
from .finalize import siglip_scale_grad
from .fused_backward import clip_backward_design, fused_block_grads, fused_covers
from .kernels import MIN_BLOCK, NOMINAL_BLOCK, _clip_grad_kernel, _clip_stats_kernel, _siglip_kernel

__all__ = ["block_grads_triton", "block_stats_triton", "siglip_grads_triton", "siglip_rows_triton"]

LN2 = math.log(2.0)
LOG2E = 1.0 / LN2


def _col_splits(n_rows: int, N: int, device: torch.device) -> int:
    """Column splits for a chunk of n_rows rows: about 4 programs per SM in all."""
    row_blocks = cdiv(n_rows, NOMINAL_BLOCK)
    col_blocks = cdiv(N, NOMINAL_BLOCK)
    return max(1, min(col_blocks, cdiv(4 * sm_count(device), row_blocks)))


def _stats_grid(m: int, n: int, device: torch.device) -> tuple[int, int]:
    """(row groups, column splits) of the statistics kernel for an m x n block: about 2
    programs per SM (at 255 registers a 256-thread program has an SM to itself), each a
    rectangle of about square shape in tiles, so that its row and column partials
    ((splits + groups) x (m + n) values in all) stay small. ALBEF's 256 x 65792 block on
    132 SMs: 1 x 264 programs (it was 2 x 16 under the old 16 x 16 cap)."""
    row_blocks, col_blocks = cdiv(m, NOMINAL_BLOCK), cdiv(n, NOMINAL_BLOCK)
    target = 2 * sm_count(device)
    groups = max(1, min(row_blocks, round(math.sqrt(target * row_blocks / col_blocks))))
    return groups, max(1, min(col_blocks, cdiv(target, groups)))


def _max_programs(n_rows: int, splits: int) -> int:
    return cdiv(n_rows, MIN_BLOCK) * splits


def _merge_lse2(m2: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Natural log-sum-exp over dim 0 of base-2 (max, sum) partials, ln(sum_k l_k 2^m2_k);
    NaN stays NaN."""
    if m2.shape[0] == 1:
        return torch.log(l).add_(m2, alpha=LN2).view(-1)
    top = m2.amax(0)
    return (m2 - top).exp2_().mul_(l).sum(0).log_().add_(top, alpha=LN2)


def _teacher_args(targets: Targets, x, y, scale):
    """(teacher x, teacher y, teacher scale, their strides); without a teacher, stand-ins
    the kernel never reads."""
    if targets.teacher is None:
        return x, y, scale, (0, 0, 0, 0)
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


def _acc_slots(targets: Targets) -> int:
    """Accumulator slots of the statistics kernel: 0, the sum of S on positives; 1, unused
    (the positive counts with ids come from :func:`~.algebra.ids_count`); 2, the sum of S
    (smoothing); 3, the teacher sum."""
    if targets.teacher is not None:
        return 4
    return 3 if targets.smoothing else (2 if targets.ids else 1)


def block_stats_triton(x, y, scale, bias, targets: Targets, rows=True, cols=True,
                       teacher_lse=(None, None)):  # fmt: skip
    """(row SideStats or None, column SideStats or None) of the block S = s x y^T + b."""
    x, y = tile_addressable(x), tile_addressable(y)
    m, d = x.shape
    n = y.shape[0]
    groups, splits = _stats_grid(m, n, x.device)
    slots = _acc_slots(targets)
    f32 = dict(dtype=torch.float32, device=x.device)
    # every (split, row) of the row partials is written by one program: no initial values
    row_parts = torch.empty((2 + slots, splits, m), **f32)
    row_max, row_sum, row_acc = row_parts.unbind(0)[:3]
    col_max = torch.full((groups, n), float("-inf"), **f32)  # groups without rows keep these
    col_sum = torch.zeros((groups, n), **f32)
    # the column slots are read back and updated per tile; without ids, smoothing or a
    # teacher the kernel does not touch them
    col_acc = torch.zeros((slots, groups, n), **f32) if cols and slots > 1 else col_sum
    xt, yt, st, t_strides = _teacher_args(targets, x, y, scale)
    t_row, t_col = (t if t is not None else row_max for t in teacher_lse)
    ids_r = targets.row_ids if targets.ids else row_max
    ids_c = targets.col_ids if targets.ids else row_max
    with device_guard(x):
        _clip_stats_kernel[(groups * splits,)](
            x, y, scale, bias if bias is not None else scale,
            ids_r, ids_c, xt, yt, st, t_row, t_col,
            row_max, row_sum, col_max, col_sum, row_acc, col_acc,
            m, n, d, targets.offset, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
            *t_strides, groups, next_pow2(max(m, n)),
            **_flags(x, bias, targets, rows, cols),
        )  # fmt: skip
    r_acc = row_parts[2:].sum(1)  # slots the kernel did not write are not read
    c_acc = col_acc.sum(1) if col_acc is not col_sum else None
    smooth, teach = bool(targets.smoothing), targets.teacher is not None
    single_r, single_c = targets.single_positives(m, n)
    if targets.ids:
        row_cnt = ids_count(targets.row_ids, targets.col_ids)
        col_cnt = ids_count(targets.col_ids, targets.row_ids) if cols else None
    else:
        row_cnt = onehot_count(m, n, targets.offset, x.device)
        square = m == n and targets.offset == 0  # the same counts on both sides
        col_cnt = row_cnt if square else onehot_count(n, m, -targets.offset, x.device)
    row_stats = col_stats = None
    if rows:
        row_stats = SideStats(_merge_lse2(row_max, row_sum), r_acc[0], row_cnt,
                              r_acc[2] if smooth else None, r_acc[3] if teach else None,
                              single_r)  # fmt: skip
    if cols:
        col_stats = SideStats(
            _merge_lse2(col_max, col_sum),
            c_acc[0] if targets.ids else onehot_col_dot(r_acc[0], n, targets.offset), col_cnt,
            c_acc[2] if smooth else None, c_acc[3] if teach else None, single_c,
        )  # fmt: skip
    return row_stats, col_stats


def _normalised(x, coefs):
    """(coefficients, their weight scale kappa or None): the (6, L) coefficients with the
    weight rows u, h, e, a divided by their largest weight where the chunk's dtype needs
    it (:data:`~.chunked.NORMALISED_DTYPES`), else as they are."""
    if x.dtype not in NORMALISED_DTYPES:
        return coefs, None
    _, kappa = normalise(*(c[1] for c in coefs if c is not None))
    return [torch.cat((c[:1], c[1:5] / kappa, c[5:])).contiguous() if c is not None else None
            for c in coefs], kappa  # fmt: skip


def block_grads_triton(x, y, scale, bias, targets: Targets, row_coef, col_coef, chunk_rows,
                       dx_acc=None, dy_acc=None, design=None, y_grad=True):  # fmt: skip
    """Gradients of sum_i u_i l^row_i + sum_j v_j l^col_j for a block, from (6, M) / (6, N)
    coefficients (:meth:`SideStats.coefficients`; None for a direction not in the loss).

    ``design``: "chunked" (dS chunks of ``chunk_rows`` rows and two matrix products each),
    "fused" or "fused_deterministic" (:mod:`.fused_backward`: one kernel, no dS; targets
    with ids or a teacher fall back to "chunked"); None: $VLMKERNELS_CLIP_BACKWARD, else the
    design ``vlmkernels tune`` recorded for the GPU, else "chunked". Returns (dx, dy,
    dscale, dbias); with fp32 accumulators, dx and dy are added into them. Without
    ``y_grad`` (and no ``dy_acc``) both designs skip dy's product and return None for it.
    """
    design = clip_backward_design(design, x.device)
    x, y = tile_addressable(x), tile_addressable(y)
    m, d = x.shape
    n = y.shape[0]
    rows, cols = row_coef is not None, col_coef is not None
    (r_coef, c_coef), kappa = _normalised(x, (row_coef, col_coef))
    # a direction not in the loss: the kernel reads none of its coefficients
    unused = r_coef if rows else c_coef if cols else x.new_zeros((6, 1), dtype=torch.float32)
    r_coef = r_coef.contiguous() if rows else unused
    c_coef = c_coef.contiguous() if cols else unused
    if design != "chunked" and fused_covers(targets):
        deterministic = design == "fused_deterministic"
        return fused_block_grads(x, y, scale, bias, targets, r_coef, c_coef, rows, cols, kappa,
                                 dx_acc, dy_acc, deterministic=deterministic,
                                 y_grad=y_grad)  # fmt: skip
    xt, yt, st, t_strides = _teacher_args(targets, x, y, scale)
    ids_r = targets.row_ids if targets.ids else r_coef
    ids_c = targets.col_ids if targets.ids else r_coef
    chunk_rows = min(chunk_rows, m)
    splits = _col_splits(chunk_rows, n, x.device)
    max_prog = _max_programs(chunk_rows, splits)
    partials = torch.zeros((cdiv(m, chunk_rows), 2, max_prog), dtype=torch.float32,
                           device=x.device)  # fmt: skip
    flags = _flags(x, bias, targets, rows, cols)

    def fill(buf, c, row0, n_rows):
        grid = lambda meta: (cdiv(n_rows, meta["BM"]), splits)  # noqa: E731
        _clip_grad_kernel[grid](
            x, y, scale, bias if bias is not None else scale, ids_r, ids_c, xt, yt, st,
            r_coef, c_coef, buf, buf.stride(0), partials[c], max_prog,
            row0, n_rows, n, d, targets.offset,
            x.stride(0), x.stride(1), y.stride(0), y.stride(1), *t_strides,
            r_coef.stride(0), c_coef.stride(0), next_pow2(max(m, n)), **flags,
        )  # fmt: skip

    s = scale.float()
    with device_guard(x):
        coef = s if kappa is None else s * kappa
        dx, dy, g_dot_xy = feature_grads(x, y, coef, chunk_rows, fill, dx_acc, dy_acc, y_grad)
    # the kernel's logit term is a = s log2(e) XY^T (no bias): sum(grad a) / (s log2 e)
    g_dot_logits, g_sum = partials[:, 0].sum(), partials[:, 1].sum()  # new tensors: outputs
    dscale = torch.where(s != 0, g_dot_logits / (LOG2E * s), g_dot_xy)
    if kappa is None:
        return dx, dy, dscale, g_sum
    return dx, dy, dscale * kappa, g_sum * kappa


def siglip_rows_triton(x, y, scale, bias, offset=0):
    x, y = tile_addressable(x), tile_addressable(y)
    m, d = x.shape
    n = y.shape[0]
    splits = _col_splits(m, n, x.device)
    loss = torch.empty((splits, m), dtype=torch.float32, device=x.device)
    dot_fp32, precision = dot_precision(x.dtype)
    grid = lambda meta: (cdiv(m, meta["BM"]), splits)  # noqa: E731
    with device_guard(x):
        # loss stands in for the gradient pointers, which this variant never touches
        _siglip_kernel[grid](
            x, y, scale, bias if bias is not None else scale, loss, loss, m, loss, 0, loss, 0,
            0, m, n, d, offset, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
            next_pow2(max(m, n)), HAS_BIAS=bias is not None, WRITE_GRAD=False,
            DOT_FP32=dot_fp32, INPUT_PRECISION=precision,
        )  # fmt: skip
    return loss.sum(0)


def _row_weights(x, w_rows):
    """(fp32 (M,) weights for the kernel, their scale kappa or None) from per-row weights,
    normalised where the chunk's dtype needs it, or from one weight (a number) for every
    row, always normalised to +-1 (free: kappa is a number; the fused SigLIP loss has
    always run so, and its scale gradient, a difference that SigLIP's bias makes cancel,
    is tested against open_clip at that rounding)."""
    if not isinstance(w_rows, torch.Tensor):
        kappa = abs(w_rows) or None
        w = w_rows / kappa if kappa is not None else 0.0
        return torch.full((x.shape[0],), w, dtype=torch.float32, device=x.device), kappa
    if x.dtype in NORMALISED_DTYPES:
        (w,), kappa = normalise(w_rows.float())
        return w, kappa
    return w_rows.float().contiguous(), None


def siglip_grads_triton(x, y, scale, bias, w_rows, chunk_rows, offset=0, dx_acc=None,
                        dy_acc=None, y_grad=True, grads_dtype=None):  # fmt: skip
    """(dx, dy, dscale, dbias, per-row losses) of sum_i w_rows[i] * l_i over an M x N
    block with positives at col = row + offset (``w_rows``: (M,) weights, or a float, the
    weight of every row); dy None without ``y_grad`` (and no ``dy_acc``); dx and dy in
    ``grads_dtype`` (default: the features')."""
    x, y = tile_addressable(x), tile_addressable(y)
    m, d = x.shape
    n = y.shape[0]
    chunk_rows = min(chunk_rows, m)
    splits = _col_splits(chunk_rows, n, x.device)
    max_prog = _max_programs(chunk_rows, splits)
    loss = torch.empty((splits, m), dtype=torch.float32, device=x.device)
    partials = torch.zeros((cdiv(m, chunk_rows), 2, max_prog), dtype=torch.float32,
                           device=x.device)  # fmt: skip
    w, kappa = _row_weights(x, w_rows)
    dot_fp32, precision = dot_precision(x.dtype)

    def fill(buf, c, row0, n_rows):
        grid = lambda meta: (cdiv(n_rows, meta["BM"]), splits)  # noqa: E731
        _siglip_kernel[grid](
            x, y, scale, bias if bias is not None else scale, w, loss, m, buf, buf.stride(0),
            partials[c], max_prog, row0, n_rows, n, d, offset,
            x.stride(0), x.stride(1), y.stride(0), y.stride(1), next_pow2(max(m, n)),
            HAS_BIAS=bias is not None, WRITE_GRAD=True, DOT_FP32=dot_fp32,
            INPUT_PRECISION=precision,
        )  # fmt: skip

    s = scale.float()
    with device_guard(x):
        coef = s if kappa is None else s * kappa
        dx, dy, g_dot_xy = feature_grads(x, y, coef, chunk_rows, fill, dx_acc, dy_acc, y_grad,
                                         grads_dtype)  # fmt: skip
    # the kernel's logit term is S = s XY^T + b itself: sum(g S) - b sum(g) cancels when |b|
    # dominates the logits, where g_dot_xy (from G in the features' dtype) is the better
    # estimate; an in-kernel sum of g s XY^T would cost the kernel a live tile (spills from
    # 72 to 176 B per thread at 128 x 128 on sm_90)
    g_dot_logits, g_sum = partials[:, 0].sum(), partials[:, 1].sum()  # new tensors: outputs
    dscale = siglip_scale_grad(g_dot_logits, g_sum, g_dot_xy, s, bias, x.dtype)
    if kappa is None:
        return dx, dy, dscale, g_sum, loss.sum(0)
    return dx, dy, dscale * kappa, g_sum * kappa, loss.sum(0)

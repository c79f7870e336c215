"""The whole-loss path (:mod:`.whole_loss`) of the contrastive cross-entropy: a mean or sum
loss over the rows (and, symmetric, the columns) of S = s x y^T + b (M x N) with any
:class:`~.algebra.Targets`: one positive per row at col = row + offset (CLIP's default
targets, ALBEF's without distillation), ids (several positives per row, or none), label
smoothing and ALBEF's distillation by a teacher (alpha in (0, 1], or a 0-d tensor alpha in
[0, 1] that the loss kernel reads: torch.compile's).

Forward, prepared launches only (no torch arithmetic on the host):

1. with a teacher, the statistics kernel over the teacher's logits T = s_t x_t y_t^T (no
   targets), then ``_lse_merge_kernel``: the teacher's row (and column) log-sum-exp;
2. with ids, ``_ids_count_kernel``: each row's positive count (with columns the block is
   square and the ids the same on both sides: the columns' counts are the rows');
3. the statistics kernel with the targets' variant (IDS, SMOOTH, TEACHER; none of them
   for one positive per row);
4. ``_ce_target_parts_kernel``: the losses (NaN for a row without a target: no positive
   and alpha < 1), their weighted sum and the backward's (1 + cols, 6, M) coefficients
   (lse, u, h, e, a, teacher lse) normalised to unit upstream weight (u = 1, or NaN for
   a row without a target); ``_sum_parts_kernel`` with more than one program.

Backward: the gradient kernel with the same variant writes G from those coefficients, and
:func:`.whole_loss._finish` scales G Y and G^T X by s * weight * upstream gradient and
reduces the scale and bias gradients.

Every buffer of a call is one fp32 allocation split into views, one per role the
variant uses (a role it does not use gets a stand-in pointer). A call returns None where
the path does not apply (more than one chunk of rows, a tuner recording launches,
``VLMKERNELS_AUTOTUNE=1``, a fused backward design for the targets that design covers:
one positive per row, with or without label smoothing): the caller then takes the
general launchers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from operator import itemgetter

import torch

from ...core.runtime import cdiv, device_guard, next_pow2, scalar_like
from ...core.tuning import PER_CALL
from ...kernels.blocks import tile_addressable
from .chunked import triton_chunk_rows
from .finalize import (
    COUNT_COLUMNS,
    COUNT_ROWS,
    PARTS_BLOCK,
    SUM_BLOCK,
    _ce_target_parts_kernel,
    _ids_count_kernel,
    _lse_merge_kernel,
    _sum_parts_kernel,
)
from .fused_backward import clip_backward_design
from .kernels import _clip_grad_kernel, _clip_stats_kernel
from .launchers import _col_splits, _stats_grid
from .whole_loss import _F32, _PLANS, _Finish, _finish, _finish_plan, _flags, _prepared

__all__ = ["ce_targets_backward", "ce_targets_forward"]


def _used(items: int, parts: int, block: int) -> int:
    """How many of ``parts`` (:func:`~vlmkernels.kernels.blocks.block_range` shares of the
    blocks of ``block`` over ``items``) are not empty."""
    blocks = cdiv(items, block)
    return cdiv(blocks, cdiv(blocks, parts))


def _ce_flags(x, bias, cols, ids=False, smooth=False, teacher=False):
    """The CLIP kernels' constexprs: both directions or rows only, and the targets' variant
    (ids, label smoothing, a teacher; none for one positive per row)."""
    return dict(ROWS=True, COLS=cols, IDS=ids, SMOOTH=smooth, TEACHER=teacher,
                **_flags(x, bias))  # fmt: skip


def _slots(ids, smooth, teacher) -> int:
    """Accumulator slots the statistics kernel writes (see ``launchers._acc_slots``)."""
    return 4 if teacher else 3 if smooth else 2 if ids else 1


def _key(kind, x, y, bias, row_ids, teacher, *options):
    t_layout = None if teacher is None else (teacher[0].stride(), teacher[1].stride())
    return (kind, x.shape, x.stride(), y.shape, y.stride(), x.dtype, x.device,
            bias is not None, row_ids is not None, t_layout, *options)  # fmt: skip


def _addressable(x, y, teacher):
    """((x, y, teacher) with :func:`tile_addressable` features, teacher features too),
    whether any was copied. The plans are keyed on the callers' layouts and record the
    answer: a call copies only where its layout needs it."""
    xa, ya = tile_addressable(x), tile_addressable(y)
    copied = xa is not x or ya is not y
    if teacher is not None:
        tx, ty = tile_addressable(teacher[0]), tile_addressable(teacher[1])
        copied = copied or tx is not teacher[0] or ty is not teacher[1]
        teacher = (tx, ty, teacher[2])
    return (xa, ya, teacher), copied


def _stats_args(x, y, scale, bias, teacher, offset, groups, ws):
    """The statistics kernel's arguments with stand-ins for the pointers (only the scalars
    count: the prepared launch takes the pointers per call)."""
    m, d = x.shape
    n = y.shape[0]
    xt, yt, _ = teacher if teacher is not None else (x, y, scale)
    t_strides = (xt.stride(0), xt.stride(1), yt.stride(0), yt.stride(1))
    b = bias if bias is not None else scale
    return (x, y, scale, b, ws, ws, xt, yt, scale, ws, ws, ws, ws, ws, ws, ws, ws,
            m, n, d, offset, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
            *t_strides, groups, next_pow2(max(m, n)))  # fmt: skip


# ------------------------------------------------------------------------------- forward


@dataclasses.dataclass(frozen=True)
class _Forward:
    teacher_stats: object  # None without a teacher, as teacher_lse
    teacher_lse: object
    count: object  # None without ids
    stats: object
    parts: object
    sum: object  # None with one parts program
    sizes: tuple  # of the views of the call's one fp32 buffer: the roles the variant uses
    total: int  # their sum
    roles: Callable  # the views -> one per role of _VIEWS (an unused role: row_max's)
    copy: bool = False  # whether the layout it was made for needs tile_addressable copies


_VIEWS = ("row_max", "row_sum", "row_acc", "col_max", "col_sum", "col_acc", "count",
          "t_row_max", "t_row_sum", "t_col_max", "t_col_sum", "t_lse_r",
          "t_lse_c", "parts")  # fmt: skip


def _forward_plan(x, y, scale, bias, ids, teacher, weight, offset, smoothing, alpha, cols):
    m, n = x.shape[0], y.shape[0]
    smooth, has_teacher = smoothing > 0, teacher is not None
    groups, splits = _stats_grid(m, n, x.device)
    slots = _slots(ids, smooth, has_teacher)
    ws = torch.empty((8,), dtype=_F32, device=x.device)  # stand-ins: only pointers
    kwargs = _ce_flags(x, bias, cols, ids, smooth, has_teacher)
    args = _stats_args(x, y, scale, bias, teacher, offset, groups, ws)
    stats = _prepared(_clip_stats_kernel, (groups * splits,), args, kwargs)
    if stats is None:
        return None
    cfg = stats[1].all_kwargs()
    used_groups, used_splits = _used(m, groups, cfg["BM"]), _used(n, splits, cfg["BN"])
    t_stats = t_lse = count = None
    t_size = {}
    if has_teacher:
        xt, yt, ts = teacher
        t_args = _stats_args(xt, yt, ts, None, None, 0, groups, ws)
        t_kwargs = _ce_flags(x, None, cols)
        t_stats = _prepared(_clip_stats_kernel, (groups * splits,), t_args, t_kwargs)
        if t_stats is None:
            return None
        t_cfg = t_stats[1].all_kwargs()
        t_groups, t_splits = _used(m, groups, t_cfg["BM"]), _used(n, splits, t_cfg["BN"])
        t_lse = _prepared(_lse_merge_kernel, (cdiv(m, PARTS_BLOCK),),
                          (ws, ws, ws, ws, ws, ws, m, t_splits, t_groups),
                          dict(COLS=cols, BLOCK=PARTS_BLOCK))  # fmt: skip
        t_size = dict(t_row_max=splits * m, t_row_sum=splits * m, t_lse_r=m)
        if cols:
            t_size.update(t_col_max=groups * n, t_col_sum=groups * n, t_lse_c=n)
        t_stats = t_stats[0]
    count_splits = 1
    if ids:
        count_splits = _col_splits(m, n, x.device)
        count = _prepared(_ids_count_kernel, (cdiv(m, COUNT_ROWS), count_splits),
                          (ws, ws, ws, m, n), dict(BM=COUNT_ROWS, BN=COUNT_COLUMNS))  # fmt: skip
    programs = cdiv(m, PARTS_BLOCK)
    # alpha comes per call, after the pointers (last in the signature): a tensor's pointer
    # or the float
    alpha_ptr = isinstance(alpha, torch.Tensor)
    parts_args = (*(ws,) * 12, m, n, offset, used_splits, used_groups, count_splits, splits * m,
                  groups * n, weight, smoothing, ws if alpha_ptr else PER_CALL)  # fmt: skip
    parts = _prepared(_ce_target_parts_kernel, (programs,), parts_args,
                      dict(COLS=cols, IDS=ids, SMOOTH=smooth, TEACHER=has_teacher,
                           ALPHA_PTR=alpha_ptr, BLOCK=PARTS_BLOCK))  # fmt: skip
    total = None
    if programs > 1:
        total = _prepared(_sum_parts_kernel, (1,), (ws, ws, programs), dict(BLOCK=SUM_BLOCK))
    if (parts is None or (programs > 1 and total is None) or (ids and count is None)
            or (has_teacher and t_lse is None)):  # fmt: skip
        return None
    size = dict(row_max=splits * m, row_sum=splits * m, row_acc=slots * splits * m, **t_size,
                parts=programs)  # fmt: skip
    if cols:
        size.update(col_max=groups * n, col_sum=groups * n)
        if slots > 1:
            size.update(col_acc=slots * groups * n)
    if ids:
        size.update(count=count_splits * m)
    used = [v for v in _VIEWS if v in size]
    return _Forward(t_stats, t_lse and t_lse[0], count and count[0], stats[0], parts[0],
                    total and total[0], tuple(size[v] for v in used), sum(size.values()),
                    itemgetter(*(used.index(v) if v in size else 0 for v in _VIEWS)))  # fmt: skip


def ce_targets_forward(x, y, scale, bias, row_ids, col_ids, teacher, weight: float,
                       offset: int, smoothing: float, alpha: float, cols: bool):  # fmt: skip
    """(loss, coef) of ``weight * sum_i (l^row_i (+ l^col_i with cols))``, the
    cross-entropies of the rows (and columns) of S = s x y^T + b (M x N) with
    :class:`~.algebra.Targets` (offset, row_ids, col_ids, smoothing, alpha, teacher; alpha
    a float, or a 0-d fp32 tensor the kernel reads, one plan for all its values):
    the loss a 0-d fp32 tensor (NaN if a row has no target), coef (1 + cols, 6, M) fp32,
    per side (lse, u, h, e, a, teacher lse) for unit upstream weights (u = 1, NaN for a
    row without a target), for :func:`ce_targets_backward`.

    The caller checks: ``teacher`` (x_t, y_t, s_t) only with alpha > 0 or a tensor alpha,
    None otherwise;
    without ids, 0 <= offset <= N - M; cols only for M = N, offset 0 and the same ids on
    both sides (or none). None where the path does not apply (and for cols with two
    different ids tensors: the columns' counts would not be the rows')."""
    if cols and row_ids is not col_ids:
        return None
    # alpha in the key by its kind, one plan for every value (the launch takes a float per
    # call, a tensor as a pointer the kernel reads), as ALBEF and BLIP ramp it
    key = _key("ce_targets_fwd", x, y, bias, row_ids, teacher, weight, offset, smoothing,
               "tensor" if isinstance(alpha, torch.Tensor) else "float", cols)  # fmt: skip
    plan = _PLANS.get(key)
    if plan is None:
        (xa, ya, ta), copy = _addressable(x, y, teacher)
        plan = _forward_plan(xa, ya, scale, bias, row_ids is not None, ta, weight, offset,
                             smoothing, alpha, cols)  # fmt: skip
        if plan is None:
            return None
        plan = _PLANS[key] = dataclasses.replace(plan, copy=copy)
    if plan.copy:
        (x, y, teacher), _ = _addressable(x, y, teacher)
    m = x.shape[0]
    # sizes as int arguments, not tuples (about 0.3 us less each); split_with_sizes:
    # Tensor.split's Python layer costs about 1.3 us more per call
    v = torch.empty(plan.total, dtype=_F32, device=x.device).split_with_sizes(plan.sizes)
    v = plan.roles(v)
    (row_max, row_sum, row_acc, col_max, col_sum, col_acc, count, t_row_max, t_row_sum,
     t_col_max, t_col_sum, t_lse_r, t_lse_c, parts) = v  # fmt: skip
    coef = torch.empty(1 + cols, 6, m, dtype=_F32, device=x.device)
    loss = scalar_like(scale, _F32)
    b = bias if bias is not None else scale
    xt, yt, ts = teacher if teacher is not None else (x, y, scale)
    ids_r = row_ids if row_ids is not None else row_max
    ids_c = col_ids if col_ids is not None else row_max
    with device_guard(x):
        if teacher is not None:
            # the teacher's positive logits (row_acc slot 0) are not used: they go where the
            # student's statistics overwrite them (col_acc: not written without targets)
            plan.teacher_stats(xt, yt, ts, ts, row_max, row_max, xt, yt, ts, row_max, row_max,
                               t_row_max, t_row_sum, t_col_max, t_col_sum, row_acc,
                               t_col_sum)  # fmt: skip
            plan.teacher_lse(t_row_max, t_row_sum, t_col_max, t_col_sum, t_lse_r, t_lse_c)
        if plan.count is not None:
            plan.count(row_ids, col_ids, count)
        plan.stats(x, y, scale, b, ids_r, ids_c, xt, yt, ts, t_lse_r, t_lse_c, row_max,
                   row_sum, col_max, col_sum, row_acc, col_acc)  # fmt: skip
        plan.parts(row_max, row_sum, row_acc, col_max, col_sum, col_acc, count, t_lse_r,
                   t_lse_c, coef, parts, loss, alpha)  # fmt: skip
        if plan.sum is not None:
            plan.sum(parts, loss)
    return loss, coef


# ------------------------------------------------------------------------------ backward


@dataclasses.dataclass(frozen=True)
class _CeBackward:
    grad: object
    finish: _Finish
    copy: bool = False  # as _Forward.copy


def _ce_backward_plan(x, y, scale, bias, kappa, offset, kwargs, teacher=None, y_grad=True):
    """The gradient kernel's prepared launch for the variant ``kwargs``
    (:func:`_ce_flags`), with the teacher's (x_t, y_t, s_t) layout where it has one, and
    its finishing launches (for dy too with ``y_grad``); None where launches cannot be
    prepared."""
    m, d = x.shape
    n = y.shape[0]
    splits = _col_splits(m, n, x.device)
    t = torch.empty((1,), dtype=_F32, device=x.device)
    b = bias if bias is not None else scale
    xt, yt, ts = teacher if teacher is not None else (x, y, scale)
    t_strides = (xt.stride(0), xt.stride(1), yt.stride(0), yt.stride(1)) if teacher else (0,) * 4
    args = (x, y, scale, b, t, t, xt, yt, ts, t, t, x, n, t, 0, 0, m, n, d, offset,
            x.stride(0), x.stride(1), y.stride(0), y.stride(1), *t_strides, m, m,
            next_pow2(max(m, n)))  # fmt: skip
    config = _clip_grad_kernel.config(args, kwargs).all_kwargs()
    programs = cdiv(m, config["BM"]) * splits
    args = (*args[:14], programs, *args[15:])
    grad = _prepared(_clip_grad_kernel, (cdiv(m, config["BM"]), splits), args, kwargs)
    finish = _finish_plan(x, n if y_grad else 0, programs, 0, kappa, False, bias is not None,
                          True)  # fmt: skip
    if grad is None or finish is None:
        return None
    return _CeBackward(grad[0], finish)


def ce_targets_backward(x, y, scale, bias, row_ids, col_ids, teacher, coef, grad,
                        weight: float, offset: int, smoothing: float, chunk_size: int,
                        y_grad: bool = True):  # fmt: skip
    """(dx, dy, dscale, dbias) of ``grad * loss`` for :func:`ce_targets_forward`'s loss and
    coef (the same targets), dy None without ``y_grad`` (no G^T x then); None where the
    path does not apply (more than one chunk, a
    fused backward design for targets it covers: label smoothing alone; with ids or a
    teacher the general path would take the chunked design too)."""
    m = x.shape[0]
    if m > triton_chunk_rows(x, chunk_size):
        return None
    if row_ids is None and teacher is None and clip_backward_design(None, x.device) != "chunked":
        return None  # the fused design covers these targets (one positive, smoothed or not)
    cols = coef.shape[0] == 2
    key = _key("ce_targets_bwd", x, y, bias, row_ids, teacher, weight, offset, smoothing > 0,
               cols, scale.dtype, y_grad)  # fmt: skip
    plan = _PLANS.get(key)
    if plan is None:
        (xa, ya, ta), copy = _addressable(x, y, teacher)
        kwargs = _ce_flags(xa, bias, cols, row_ids is not None, smoothing > 0,
                           teacher is not None)  # fmt: skip
        plan = _ce_backward_plan(xa, ya, scale, bias, weight, offset, kwargs, ta, y_grad)
        if plan is None:
            return None
        plan = _PLANS[key] = dataclasses.replace(plan, copy=copy)
    if plan.copy:
        (x, y, teacher), _ = _addressable(x, y, teacher)
    g = torch.empty(m, y.shape[0], dtype=x.dtype, device=x.device)
    partials = torch.empty(plan.finish.size, dtype=_F32, device=x.device)
    b = bias if bias is not None else scale
    xt, yt, ts = teacher if teacher is not None else (x, y, scale)
    # coef's base is the rows' (6, M) coefficients (its pointer stands in for the ids'
    # without ids and, in one direction, for the columns')
    ids_r = row_ids if row_ids is not None else coef
    ids_c = col_ids if col_ids is not None else coef
    with device_guard(x):
        plan.grad(x, y, scale, b, ids_r, ids_c, xt, yt, ts, coef, coef[1] if cols else coef,
                  g, partials)  # fmt: skip
        return _finish(plan.finish, x, y, g, scale, bias, grad, partials, None, None, y_grad)

"""The whole-loss path of the Triton backend: a mean or sum contrastive cross-entropy whose
every row has one positive (CLIP's symmetric loss with the default targets, or one
direction over an M x N block with positives at col = row + offset, ALBEF's without
distillation), or the fused SigLIP loss, and its gradients, with the launches prepared
once per layout and the host's finishing arithmetic done by :mod:`.finalize`'s kernels.

Cross-entropy forward: the statistics kernel, then ``_ce_loss_parts_kernel`` (the loss
and the backward's coefficients); backward: the gradient kernel writes G (M x N, one chunk), two
matrix products give G Y and G^T X in fp32, and ``_grads_finalize_kernel`` scales them and
reduces the scale and bias gradients. SigLIP (fused): its gradient kernel, the two products
and the same finishing kernel, which also sums the loss. Each allocation is one buffer per
role; no torch op does arithmetic on the host side.

The coefficients are normalised (u = h = 1) and the loss weight travels as kappa, the
factor of every gradient: G then holds values of order 1 in every dtype (fp16 too, see
:data:`.chunked.NORMALISED_DTYPES`).

A call returns None where the path does not apply (more than one chunk of rows, a tuner
recording launches, ``VLMKERNELS_AUTOTUNE=1``, a fused backward design): the caller then
takes the general launchers (:mod:`.launchers`).
"""

from __future__ import annotations

import dataclasses

import torch

from ...core.runtime import device_guard, dot_precision, next_pow2_bucket
from ...core.tuning import prepared_cache
from ...kernels.blocks import tile_addressable
from .chunked import mm_f32, triton_chunk_rows
from .finalize import (
    FINAL_COLUMNS,
    FINAL_ROWS,
    PARTS_BLOCK,
    SUM_BLOCK,
    _ce_loss_parts_kernel,
    _grad_scalars_kernel,
    _grads_finalize_kernel,
    _sum_parts_kernel,
)
from .fused_backward import clip_backward_design
from .kernels import _clip_grad_kernel, _clip_stats_kernel, _siglip_kernel
from .launchers import _cdiv, _col_splits, _stats_grid

__all__ = ["ce_backward", "ce_forward", "siglip_fused"]

_PLANS = prepared_cache()  # (kind, layout) -> plan, or None where the path does not apply
_F32 = torch.float32


def _used(items: int, parts: int, block: int) -> int:
    """How many of ``parts`` (:func:`~vlmkernels.kernels.blocks.block_range` shares of the
    blocks of ``block`` over ``items``) are not empty."""
    blocks = _cdiv(items, block)
    return _cdiv(blocks, _cdiv(blocks, parts))


def _layout(kind, x, y, bias, extra=()):
    return (kind, x.shape, x.stride(), y.shape, y.stride(), x.dtype, x.device,
            bias is not None, *extra)  # fmt: skip


def _flags(x, bias):
    dot_fp32, precision = dot_precision(x.dtype)
    return dict(HAS_BIAS=bias is not None, DOT_FP32=dot_fp32, INPUT_PRECISION=precision)


def _ce_flags(x, bias, cols, ids=False, smooth=False, teacher=False):
    """The CLIP kernels' constexprs: both directions or rows only, and the targets' variant
    (ids, label smoothing, a teacher; none for one positive per row)."""
    return dict(ROWS=True, COLS=cols, IDS=ids, SMOOTH=smooth, TEACHER=teacher,
                **_flags(x, bias))  # fmt: skip


def _prepared(kernel, grid, args, kwargs):
    """(launch, config) or None while launches cannot be prepared (the tuner records them,
    or the autotuner picks the config): the general path runs then, and nothing is cached."""
    run = kernel.prepare(grid, args, kwargs)
    return None if run is None else (run, kernel.config(args, kwargs))


# ------------------------------------------------------------------ cross-entropy forward


@dataclasses.dataclass(frozen=True)
class _CeForward:
    stats: object
    parts: object
    sum: object  # None with one parts program
    width: int  # floats per workspace row


def _ce_forward_plan(x, y, scale, bias, weight, offset, cols):
    m, d = x.shape
    n = y.shape[0]
    groups, splits = _stats_grid(m, n, x.device)
    width = max(groups, splits) * max(m, n)
    ws = torch.empty((6, 1), dtype=_F32, device=x.device)  # stand-ins: only pointers
    b = bias if bias is not None else scale
    stats_args = (x, y, scale, b, ws, ws, x, y, scale, ws, ws, ws, ws, ws, ws, ws, ws,
                  m, n, d, offset, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
                  0, 0, 0, 0, groups, next_pow2_bucket(max(m, n)))  # fmt: skip
    stats_kw = _ce_flags(x, bias, cols)
    stats = _prepared(_clip_stats_kernel, (groups * splits,), stats_args, stats_kw)
    if stats is None:
        return None
    cfg = stats[1].all_kwargs()
    used_groups, used_splits = _used(m, groups, cfg["BM"]), _used(n, splits, cfg["BN"])
    programs = _cdiv(m, PARTS_BLOCK)
    parts_args = (ws, ws, ws, ws, m, width, used_splits, used_groups, weight)
    parts = _prepared(_ce_loss_parts_kernel, (programs,), parts_args,
                      dict(COLS=cols, BLOCK=PARTS_BLOCK))  # fmt: skip
    total = None
    if programs > 1:
        total = _prepared(_sum_parts_kernel, (1,), (ws, ws, programs), dict(BLOCK=SUM_BLOCK))
    if parts is None or (programs > 1 and total is None):
        return None
    return _CeForward(stats[0], parts[0], total and total[0], width)


def ce_forward(x, y, scale, bias, weight: float, offset: int, cols: bool):
    """(loss, coef) of ``weight * sum_i (l^row_i (+ l^col_i with cols))``, the cross-entropies
    of the rows (and columns) of S = s x y^T + b (M x N) whose positives are at
    col = row + offset, every row (and column) having exactly one (the caller checks it:
    0 <= offset, M + offset <= N; cols only for M = N, offset 0): the loss a 0-d fp32
    tensor, coef (1 + cols, 3, M) fp32 (per side: lse, 1, 1) for :func:`ce_backward`; None
    where the path does not apply."""
    x, y = tile_addressable(x), tile_addressable(y)
    key = _layout("ce_fwd", x, y, bias, (weight, offset, cols))
    plan = _PLANS.get(key)
    if plan is None:
        plan = _ce_forward_plan(x, y, scale, bias, weight, offset, cols)
        if plan is None:
            return None
        _PLANS[key] = plan
    m = x.shape[0]
    ws = torch.empty((6, plan.width), dtype=_F32, device=x.device)
    row_max, row_sum, row_acc, col_max, col_sum, parts = ws.unbind(0)
    coef = torch.empty((1 + cols, 3, m), dtype=_F32, device=x.device)
    loss = torch.empty((), dtype=_F32, device=x.device)
    b = bias if bias is not None else scale
    with device_guard(x):
        plan.stats(x, y, scale, b, row_max, row_max, x, y, scale, row_max, row_max,
                   row_max, row_sum, col_max, col_sum, row_acc, col_sum)  # fmt: skip
        plan.parts(ws, coef, parts, loss)
        if plan.sum is not None:
            plan.sum(parts, loss)
    return loss, coef


# ------------------------------------------------------------------- gradients from G


@dataclasses.dataclass(frozen=True)
class _Finish:
    """The finishing launches of a gradient: scaling (rows of dX, dY) and the scalars."""

    final: object
    scalars: object  # None with one finishing program
    n_partials: int  # partial sums per kind the gradient kernel writes
    size: int  # floats of the partials buffer: 2 n_partials + finishing programs


def _finish_plan(x, n, n_partials, n_loss, kappa, siglip, has_bias, has_grad):
    m, d = x.shape
    programs = _cdiv(max(m, n), FINAL_ROWS)
    t = torch.empty((1,), dtype=_F32, device=x.device)  # stand-ins: only pointers
    flags = dict(SIGLIP=siglip, HAS_BIAS=has_bias, HAS_GRAD=has_grad, HAS_LOSS=siglip)
    args = (x, t, t, x, x, t, t, t, t, t, t, t, t, m, n, d, x.stride(0), x.stride(1),
            n_partials, n_loss, kappa)  # fmt: skip
    final = _prepared(_grads_finalize_kernel, (programs,), args,
                      dict(flags, ROWS=FINAL_ROWS, BD=FINAL_COLUMNS, BLOCK=SUM_BLOCK))  # fmt: skip
    scalars = None
    if programs > 1:
        scalars = _prepared(_grad_scalars_kernel, (1,),
                            (t, t, t, t, t, t, t, t, n_partials, programs, n_loss, kappa),
                            dict(flags, BLOCK=SUM_BLOCK))  # fmt: skip
    if final is None or (programs > 1 and scalars is None):
        return None
    return _Finish(final[0], scalars and scalars[0], n_partials, 2 * n_partials + programs)


def _finish(plan: _Finish, x, y, g, scale, bias, grad, partials, loss_parts, loss):
    """(dx, dy, dscale, dbias) from the logit gradient g (M x N, the features' dtype) and
    the partials its kernel wrote; ``loss`` (SigLIP) is written too."""
    gy = mm_f32(g, y)
    gtx = mm_f32(g.t(), x)
    if x.dtype == _F32:  # scaled in place
        dx, dy = gy, gtx
    else:
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        dy = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    ds = torch.empty((), dtype=scale.dtype, device=x.device)
    db = torch.empty((), dtype=bias.dtype if bias is not None else _F32, device=x.device)
    b = bias if bias is not None else scale
    grad = grad if grad is not None else scale
    loss_parts = loss_parts if loss_parts is not None else partials
    loss = loss if loss is not None else ds
    plan.final(x, gy, gtx, dx, dy, scale, b, grad, partials, loss_parts, ds, db, loss)
    if plan.scalars is not None:
        plan.scalars(partials, loss_parts, scale, b, grad, ds, db, loss)
    return dx, dy, ds, db


# ----------------------------------------------------------------- cross-entropy backward


@dataclasses.dataclass(frozen=True)
class _CeBackward:
    grad: object
    finish: _Finish


def _ce_backward_plan(x, y, scale, bias, kappa, offset, kwargs, teacher=None):
    """The gradient kernel's prepared launch for the variant ``kwargs``
    (:func:`_ce_flags`), with the teacher's (x_t, y_t, s_t) layout where it has one, and
    its finishing launches; None where launches cannot be prepared."""
    m, d = x.shape
    n = y.shape[0]
    splits = _col_splits(m, n, x.device)
    t = torch.empty((1,), dtype=_F32, device=x.device)
    b = bias if bias is not None else scale
    xt, yt, ts = teacher if teacher is not None else (x, y, scale)
    t_strides = (xt.stride(0), xt.stride(1), yt.stride(0), yt.stride(1)) if teacher else (0,) * 4
    args = (x, y, scale, b, t, t, xt, yt, ts, t, t, x, n, t, 0, 0, m, n, d, offset,
            x.stride(0), x.stride(1), y.stride(0), y.stride(1), *t_strides, m, m,
            next_pow2_bucket(max(m, n)))  # fmt: skip
    config = _clip_grad_kernel.config(args, kwargs).all_kwargs()
    programs = _cdiv(m, config["BM"]) * splits
    args = (*args[:14], programs, *args[15:])
    grad = _prepared(_clip_grad_kernel, (_cdiv(m, config["BM"]), splits), args, kwargs)
    finish = _finish_plan(x, n, programs, 0, kappa, False, bias is not None, True)
    if grad is None or finish is None:
        return None
    return _CeBackward(grad[0], finish)


def ce_backward(x, y, scale, bias, coef, grad, weight: float, offset: int, chunk_size: int):
    """(dx, dy, dscale, dbias) of ``grad * loss`` for :func:`ce_forward`'s loss and coef;
    None where the path does not apply (more than one chunk, a fused backward design)."""
    m = x.shape[0]
    if m > triton_chunk_rows(x, chunk_size) or clip_backward_design(None, x.device) != "chunked":
        return None
    cols = coef.shape[0] == 2
    x, y = tile_addressable(x), tile_addressable(y)
    key = _layout("ce_bwd", x, y, bias, (weight, offset, cols, scale.dtype))
    plan = _PLANS.get(key)
    if plan is None:
        plan = _ce_backward_plan(x, y, scale, bias, weight, offset, _ce_flags(x, bias, cols))
        if plan is None:
            return None
        _PLANS[key] = plan
    g = torch.empty((m, y.shape[0]), dtype=x.dtype, device=x.device)
    partials = torch.empty((plan.finish.size,), dtype=_F32, device=x.device)
    b = bias if bias is not None else scale
    with device_guard(x):
        # coef's base is the rows' (3, M) coefficients (their pointer stands in for the
        # ids' and, in one direction, for the columns')
        plan.grad(x, y, scale, b, coef, coef, x, y, scale, coef, coef[1] if cols else coef, g,
                  partials)  # fmt: skip
        return _finish(plan.finish, x, y, g, scale, bias, grad, partials, None, None)


# ------------------------------------------------------------------------------ SigLIP


@dataclasses.dataclass(frozen=True)
class _Siglip:
    kernel: object
    finish: _Finish
    ones: torch.Tensor  # the normalised row weights, read-only
    splits: int


def _siglip_plan(x, y, scale, bias, offset, weight):
    m, d = x.shape
    n = y.shape[0]
    splits = _col_splits(m, n, x.device)
    ones = torch.ones((m,), dtype=_F32, device=x.device)
    b = bias if bias is not None else scale
    t = torch.empty((1,), dtype=_F32, device=x.device)
    args = (
        x,
        y,
        scale,
        b,
        ones,
        t,
        m,
        x,
        n,
        t,
        0,
        0,
        m,
        n,
        d,
        offset,
        x.stride(0),
        x.stride(1),
        y.stride(0),
        y.stride(1),
        next_pow2_bucket(max(m, n)),
    )
    kwargs = dict(WRITE_GRAD=True, **_flags(x, bias))
    config = _siglip_kernel.config(args, kwargs).all_kwargs()
    programs = _cdiv(m, config["BM"]) * splits
    args = (*args[:10], programs, *args[11:])
    kernel = _prepared(_siglip_kernel, (_cdiv(m, config["BM"]), splits), args, kwargs)
    finish = _finish_plan(x, n, programs, splits * m, weight, True, bias is not None, False)
    if kernel is None or finish is None:
        return None
    return _Siglip(kernel[0], finish, ones, splits)


def siglip_fused(x, y, scale, bias, weight: float, chunk_size: int, offset: int):
    """(loss, dx, dy, dscale, dbias) of loss = weight * sum_i l_i (SigLIP row losses, positives
    at col = row + offset), weight > 0, in one pass; None where the path does not apply."""
    m = x.shape[0]
    if m > triton_chunk_rows(x, chunk_size) or weight <= 0:
        return None
    x, y = tile_addressable(x), tile_addressable(y)
    key = _layout("siglip", x, y, bias, (weight, offset, scale.dtype))
    plan = _PLANS.get(key)
    if plan is None:
        plan = _siglip_plan(x, y, scale, bias, offset, weight)
        if plan is None:
            return None
        _PLANS[key] = plan
    work = torch.empty((plan.splits * m + plan.finish.size,), dtype=_F32, device=x.device)
    g = torch.empty((m, y.shape[0]), dtype=x.dtype, device=x.device)
    loss = torch.empty((), dtype=_F32, device=x.device)
    b = bias if bias is not None else scale
    loss_parts, partials = work.split((plan.splits * m, plan.finish.size))
    with device_guard(x):
        plan.kernel(x, y, scale, b, plan.ones, loss_parts, g, partials)
        return (loss, *_finish(plan.finish, x, y, g, scale, bias, None, partials, loss_parts,
                               loss))  # fmt: skip

"""The whole-loss path of the Triton backend: a mean or sum loss over one chunk of rows and
its gradients, with the launches prepared once per layout and the host's finishing
arithmetic done by :mod:`.finalize`'s kernels. This module holds what its losses share,
the prepared launches and the gradient finishing, and the fused SigLIP loss; the
cross-entropy losses (CLIP, ALBEF / BLIP, every target) are in :mod:`.whole_targets`.

Gradients from the logit gradient G (M x N, one chunk, written by a loss's gradient
kernel): two matrix products give G Y and G^T X in fp32, and ``_grads_finalize_kernel``
scales them and reduces the scale and bias gradients. SigLIP (fused): its gradient
kernel, the two products and the same finishing kernel, which also sums the loss. Each
allocation is one buffer per role; no torch op does arithmetic on the host side.

The loss weight travels as kappa, the factor of every gradient: G then holds values of
order 1 in every dtype (fp16 too, see :data:`.chunked.NORMALISED_DTYPES`).

A call returns None where the path does not apply (more than one chunk of rows, a tuner
recording launches, ``VLMKERNELS_AUTOTUNE=1``): the caller then takes the general
launchers (:mod:`.launchers`).
"""

from __future__ import annotations

import dataclasses

import torch

from ...core.runtime import cdiv, device_guard, dot_precision, next_pow2, scalar_like
from ...core.tuning import prepared_cache
from ...kernels.blocks import tile_addressable
from .chunked import forward_grad_dtype, mm_f32, triton_chunk_rows
from .finalize import (
    FINAL_COLUMNS,
    FINAL_ROWS,
    SUM_BLOCK,
    UNIT_ROUNDOFF,
    _grad_scalars_kernel,
    _grads_finalize_kernel,
)
from .kernels import _siglip_kernel
from .launchers import _col_splits

__all__ = ["siglip_fused"]

_PLANS = prepared_cache()  # (kind, layout) -> plan, or None where the path does not apply
_F32 = torch.float32


def _layout(kind, x, y, bias, extra=()):
    return (kind, x.shape, x.stride(), y.shape, y.stride(), x.dtype, x.device,
            bias is not None, *extra)  # fmt: skip


def _flags(x, bias):
    dot_fp32, precision = dot_precision(x.dtype)
    return dict(HAS_BIAS=bias is not None, DOT_FP32=dot_fp32, INPUT_PRECISION=precision)


def _prepared(kernel, grid, args, kwargs):
    """(launch, config) or None while launches cannot be prepared (the tuner records them,
    or the autotuner picks the config): the general path runs then, and nothing is cached.
    The config is the launch's own (asked again, another thread's clear_cache in between
    could answer another, and the caller sizes its buffers by it)."""
    run = kernel.prepare(grid, args, kwargs)
    return None if run is None else (run, run.config)


# ------------------------------------------------------------------- gradients from G


@dataclasses.dataclass(frozen=True)
class _Finish:
    """The finishing launches of a gradient: scaling (rows of dX, dY) and the scalars."""

    final: object
    scalars: object  # None with one finishing program
    n_partials: int  # partial sums per kind the gradient kernel writes
    size: int  # floats of the partials buffer: 2 n_partials + finishing programs
    grads_dtype: torch.dtype  # of dX and dY, which the finishing launch was prepared for


def _finish_plan(x, n, n_partials, n_loss, kappa, siglip, has_bias, has_grad,
                 grads_dtype=None):  # fmt: skip
    m, d = x.shape
    programs = cdiv(max(m, n), FINAL_ROWS)
    grads_dtype = grads_dtype or x.dtype
    t = torch.empty((1,), dtype=_F32, device=x.device)  # stand-ins: only pointers
    g = x if grads_dtype == x.dtype else t.to(grads_dtype)
    flags = dict(SIGLIP=siglip, HAS_BIAS=has_bias, HAS_GRAD=has_grad, HAS_LOSS=siglip,
                 G_EPS=UNIT_ROUNDOFF[x.dtype])  # fmt: skip
    args = (x, t, t, g, g, t, t, t, t, t, t, t, t, m, n, d, x.stride(0), x.stride(1),
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
    return _Finish(final[0], scalars and scalars[0], n_partials, 2 * n_partials + programs,
                   grads_dtype)  # fmt: skip


def _finish(plan: _Finish, x, y, g, scale, bias, grad, partials, loss_parts, loss, y_grad=True):
    """(dx, dy, dscale, dbias) from the logit gradient g (M x N, the features' dtype) and
    the partials its kernel wrote; ``loss`` (SigLIP) is written too. Without ``y_grad`` dy
    is None and G^T x is not computed (``plan`` was made for N = 0 then: the kernel
    touches no row of dy). dx and dy are in the plan's ``grads_dtype``."""
    gy = mm_f32(g, y)
    gtx = mm_f32(g.mT, x) if y_grad else None
    if plan.grads_dtype == _F32:  # scaled in place
        dx, dy = gy, gtx
    else:
        dx = torch.empty(x.shape, dtype=plan.grads_dtype, device=x.device)
        dy = torch.empty(y.shape, dtype=plan.grads_dtype, device=y.device) if y_grad else None
    ds = scalar_like(scale)
    db = scalar_like(bias) if bias is not None else scalar_like(scale, _F32)
    b = bias if bias is not None else scale
    grad = grad if grad is not None else scale
    loss_parts = loss_parts if loss_parts is not None else partials
    loss = loss if loss is not None else ds
    plan.final(x, gy, gtx if y_grad else gy, dx, dy if y_grad else dx, scale, b, grad,
               partials, loss_parts, ds, db, loss)  # fmt: skip
    if plan.scalars is not None:
        plan.scalars(partials, loss_parts, scale, b, grad, ds, db, loss)
    return dx, dy, ds, db


# ------------------------------------------------------------------------------ SigLIP


@dataclasses.dataclass(frozen=True)
class _Siglip:
    kernel: object
    finish: _Finish
    ones: torch.Tensor  # the normalised row weights, read-only
    splits: int
    copy: bool = False  # whether the layout it was made for needs tile_addressable copies


def _siglip_plan(x, y, scale, bias, offset, weight, y_grad=True):
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
        next_pow2(max(m, n)),
    )
    kwargs = dict(WRITE_GRAD=True, **_flags(x, bias))
    config = _siglip_kernel.config(args, kwargs).all_kwargs()
    programs = cdiv(m, config["BM"]) * splits
    args = (*args[:10], programs, *args[11:])
    kernel = _prepared(_siglip_kernel, (cdiv(m, config["BM"]), splits), args, kwargs)
    finish = _finish_plan(x, n if y_grad else 0, programs, splits * m, weight, True,
                          bias is not None, False, forward_grad_dtype(x.dtype))  # fmt: skip
    if kernel is None or finish is None:
        return None
    return _Siglip(kernel[0], finish, ones, splits)


def siglip_fused(x, y, scale, bias, weight: float, chunk_size: int, offset: int,
                 y_grad: bool = True):  # fmt: skip
    """(loss, dx, dy, dscale, dbias) of loss = weight * sum_i l_i (SigLIP row losses, positives
    at col = row + offset), weight > 0, in one pass, dy None without ``y_grad`` (no G^T x
    then), dx and dy in :func:`.chunked.forward_grad_dtype`; None where the path does not
    apply."""
    m = x.shape[0]
    if m > triton_chunk_rows(x, chunk_size) or weight <= 0:
        return None
    key = _layout("siglip", x, y, bias, (weight, offset, scale.dtype, y_grad))
    plan = _PLANS.get(key)
    if plan is None:
        xa, ya = tile_addressable(x), tile_addressable(y)
        plan = _siglip_plan(xa, ya, scale, bias, offset, weight, y_grad)
        if plan is None:
            return None
        plan = _PLANS[key] = dataclasses.replace(plan, copy=xa is not x or ya is not y)
    if plan.copy:
        x, y = tile_addressable(x), tile_addressable(y)
    work = torch.empty(plan.splits * m + plan.finish.size, dtype=_F32, device=x.device)
    g = torch.empty(m, y.shape[0], dtype=x.dtype, device=x.device)
    loss = scalar_like(scale, _F32)
    b = bias if bias is not None else scale
    loss_parts, partials = work.split_with_sizes((plan.splits * m, plan.finish.size))
    with device_guard(x):
        plan.kernel(x, y, scale, b, plan.ones, loss_parts, g, partials)
        return (loss, *_finish(plan.finish, x, y, g, scale, bias, None, partials, loss_parts,
                               loss, y_grad))  # fmt: skip

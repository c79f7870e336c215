"""The contrastive ops, ``torch.ops.vlmkernels.contrastive_ce_forward`` / ``_backward`` and
``siglip_loss_forward`` / ``_backward`` / ``_fused``: one declaration each
(:class:`vlmkernels.core.op.Op`) with the Triton and PyTorch implementations, the fake and
the backward; and the block primitives the ring mode of :mod:`vlmkernels.distributed`
builds on (:func:`block_stats`, :func:`block_grads`, :func:`siglip_block_rows`,
:func:`siglip_block_grads`), the same implementations without the op boundary.

Every op starts with the features and the logit parameters, ``(Tensor x, Tensor y, Tensor
scale, Tensor? bias, ...)``, the only arguments with gradients. Results are fp32 (fp64 for
fp64 inputs) except the feature gradients, in the features' dtype.
"""

from __future__ import annotations

import collections
import functools

import torch

from ...core.backend import in_forward_backend, remember_backend, resolve_backend
from ...core.op import Op, as_saved, first_order_only
from ...core.runtime import cast
from .algebra import Targets, coefficients_from_state
from .chunked import forward_grad_dtype, triton_chunk_rows
from .launchers import block_grads_triton as _block_grads_triton
from .launchers import block_stats_triton as _block_stats_triton
from .launchers import siglip_grads_triton as _siglip_grads_triton
from .launchers import siglip_rows_triton as _siglip_rows_triton
from .reference import block_grads_torch as _block_grads_torch
from .reference import block_stats_torch as _block_stats_torch
from .reference import compute_dtype
from .reference import siglip_grads_torch as _siglip_grads_torch
from .reference import siglip_rows_torch as _siglip_rows_torch
from .whole_loss import siglip_fused as _siglip_fused_whole
from .whole_targets import ce_targets_backward as _ce_targets_backward_whole
from .whole_targets import ce_targets_forward as _ce_targets_forward_whole

__all__ = [
    "FAMILY",
    "block_grads",
    "block_stats",
    "contrastive_ce_backward",
    "contrastive_ce_forward",
    "contrastive_ce_reduced",
    "contrastive_ce_reduced_backward",
    "contrastive_ce_targets_reduced",
    "contrastive_ce_targets_reduced_backward",
    "first_order_only",
    "siglip_block_grads",
    "siglip_block_rows",
    "siglip_loss_backward",
    "siglip_loss_forward",
    "siglip_loss_fused",
]

FAMILY = "contrastive"

# The arguments every op starts with: the only ones with gradients (_input_grads).
_FEATURES = "Tensor x, Tensor y, Tensor scale, Tensor? bias"
# The cross-entropy ops' arguments: the block and its Targets, which directions, the chunk.
# alpha_tensor: a 0-d tensor (fp32, fp64 for fp64 features) that, given, stands for the
# float alpha (which is then ignored), only with a teacher: the public functions pass it
# under torch.compile, where a float argument is a constant of the graph (a changing alpha,
# as ALBEF's warm-up ramps it, would recompile per value) and a tensor is not.
_CE_ARGS = (
    f"{_FEATURES}, Tensor? row_ids, Tensor? col_ids, Tensor? teacher_x, Tensor? teacher_y, "
    "Tensor? teacher_scale, Tensor? alpha_tensor, SymInt offset, float smoothing, float alpha, "
    "bool rows, bool cols, SymInt chunk_size"
)
_CE_BACKWARD_ARGS = (
    f"{_CE_ARGS}, Tensor row_state, Tensor col_state, Tensor grad_rows, Tensor grad_cols, "
    "bool y_grad"
)
# dx, dy, dscale, dbias of the backward ops: dy only where y_grad (keys of a queue, a frozen
# tower: no G^T x)
_GRADS_DY_OPTIONAL = "(Tensor, Tensor?, Tensor, Tensor)"


def _arguments(name: str, args: str):
    """A namedtuple class over the argument names of a schema's argument list."""
    return collections.namedtuple(name, [a.split()[-1] for a in args.split(",")])


_CeArgs = _arguments("_CeArgs", _CE_ARGS)
_CeBackwardArgs = _arguments("_CeBackwardArgs", _CE_BACKWARD_ARGS)
# the cross-entropy arguments that are tensors (saved for backward), the others options
_CE_TENSORS = tuple(a.split()[-1] for a in _CE_ARGS.split(",") if a.split()[0].startswith("Tensor"))

contrastive_ce_forward = Op(
    "contrastive_ce_forward", f"({_CE_ARGS}) -> (Tensor, Tensor, Tensor, Tensor)", family=FAMILY
)
contrastive_ce_backward = Op(
    "contrastive_ce_backward", f"({_CE_BACKWARD_ARGS}) -> {_GRADS_DY_OPTIONAL}", family=FAMILY
)
contrastive_ce_reduced = Op(
    "contrastive_ce_reduced",
    f"({_FEATURES}, float weight, SymInt offset, bool cols, SymInt chunk_size) -> (Tensor, Tensor)",
    family=FAMILY,
)
contrastive_ce_reduced_backward = Op(
    "contrastive_ce_reduced_backward",
    f"({_FEATURES}, Tensor coef, Tensor grad, float weight, SymInt offset, SymInt chunk_size, "
    f"bool y_grad) -> {_GRADS_DY_OPTIONAL}",
    family=FAMILY,
)
# the reduced op with targets: ids, teacher features and scale, alpha as a tensor (as in
# _CE_ARGS), then the options
_TARGETS = "Tensor? row_ids, Tensor? col_ids, Tensor? teacher_x, Tensor? teacher_y, " \
    "Tensor? teacher_scale, Tensor? alpha_tensor"  # fmt: skip
contrastive_ce_targets_reduced = Op(
    "contrastive_ce_targets_reduced",
    f"({_FEATURES}, {_TARGETS}, float weight, SymInt offset, float smoothing, float alpha, "
    "bool cols, SymInt chunk_size) -> (Tensor, Tensor)",
    family=FAMILY,
)
contrastive_ce_targets_reduced_backward = Op(
    "contrastive_ce_targets_reduced_backward",
    f"({_FEATURES}, {_TARGETS}, Tensor coef, Tensor grad, float weight, SymInt offset, "
    f"float smoothing, float alpha, SymInt chunk_size, bool y_grad) -> {_GRADS_DY_OPTIONAL}",
    family=FAMILY,
)
siglip_loss_forward = Op(
    "siglip_loss_forward", f"({_FEATURES}, SymInt chunk_size, SymInt offset) -> Tensor",
    family=FAMILY,
)  # fmt: skip
siglip_loss_backward = Op(
    "siglip_loss_backward",
    f"({_FEATURES}, Tensor grad_rows, SymInt chunk_size, SymInt offset, bool y_grad) -> "
    f"{_GRADS_DY_OPTIONAL}",
    family=FAMILY,
)
siglip_loss_fused = Op(
    "siglip_loss_fused",
    f"({_FEATURES}, float row_weight, SymInt chunk_size, SymInt offset, bool y_grad) -> "
    "(Tensor, Tensor, Tensor?, Tensor, Tensor)",
    family=FAMILY,
)


# ------------------------------------------------------------------------ block primitives


def block_stats(x, y, scale, bias, targets, rows, cols, chunk_size=0, teacher_lse=(None, None),
                backend=None):  # fmt: skip
    """(row :class:`SideStats` or None, column :class:`SideStats` or None) of the logit
    block S = s x y^T + b (M x N) with :class:`Targets`, on ``backend`` (default: the one
    for x). Stats of blocks that share rows (or columns) combine with
    :meth:`SideStats.merge`."""
    if (backend or resolve_backend(FAMILY, x)) == "triton":
        return _block_stats_triton(x, y, scale, bias, targets, rows, cols, teacher_lse)
    return _block_stats_torch(x, y, scale, bias, targets, rows, cols, teacher_lse, chunk_size)


def block_grads(x, y, scale, bias, targets, row_coef, col_coef, chunk_size=0, dx_acc=None,
                dy_acc=None):  # fmt: skip
    """(dx, dy, dscale, dbias) of sum_i u_i l^row_i + sum_j v_j l^col_j over one block,
    from :meth:`SideStats.coefficients` of the complete (merged) stats (None for a
    direction not in the loss). With fp32 ``dx_acc`` (M, d) / ``dy_acc`` (N, d) the
    feature gradients are added into them (and returned); otherwise they are new tensors
    in the input dtype. dscale / dbias are fp32 0-d tensors."""
    if resolve_backend(FAMILY, x) == "triton":
        chunk = triton_chunk_rows(x, chunk_size)
        return _block_grads_triton(x, y, scale, bias, targets, row_coef, col_coef, chunk,
                                   dx_acc, dy_acc)  # fmt: skip
    dx, dy, ds, db = _block_grads_torch(x, y, scale, bias, targets, row_coef, col_coef,
                                        chunk_size)  # fmt: skip
    if dx_acc is None:
        return cast(dx, x.dtype), cast(dy, y.dtype), ds, db
    return dx_acc.add_(dx), dy_acc.add_(dy), ds, db


def siglip_block_rows(x, y, scale, bias, offset=0, chunk_size=0):
    """(M,) SigLIP row losses of the block x y^T with positives at col = row + offset."""
    if resolve_backend(FAMILY, x) == "triton":
        return _siglip_rows_triton(x, y, scale, bias, offset)
    return _siglip_rows_torch(x, y, scale, bias, chunk_size, offset)


def siglip_block_grads(x, y, scale, bias, w_rows, offset=0, chunk_size=0, dx_acc=None,
                       dy_acc=None):  # fmt: skip
    """(dx, dy, dscale, dbias, row losses) of sum_i w_i l_i over one SigLIP block; with fp32
    accumulators the feature gradients are added into them, as in :func:`block_grads`."""
    if resolve_backend(FAMILY, x) == "triton":
        return _siglip_grads_triton(x, y, scale, bias, w_rows, triton_chunk_rows(x, chunk_size),
                                    offset, dx_acc, dy_acc)  # fmt: skip
    acc_dtype = dx_acc.dtype if dx_acc is not None else None  # added before rounding
    dx, dy, ds, db, rows = _siglip_grads_torch(x, y, scale, bias, w_rows, chunk_size, offset,
                                               grads_dtype=acc_dtype)  # fmt: skip
    if dx_acc is None:
        return dx, dy, ds, db, rows
    return dx_acc.add_(dx), dy_acc.add_(dy), ds, db, rows


# ----------------------------------------------------------------------- shared by the ops


def _input_grads(ctx, dx, dy, dscale, dbias):
    """One gradient per input of the op: those of x, y, scale and bias (``_FEATURES``)
    where autograd asked for them, None for the rest."""
    need = ctx.needs_input_grad
    return (dx if need[0] else None, dy if need[1] else None, dscale if need[2] else None,
            dbias if need[3] else None, *(None,) * (len(need) - 4))  # fmt: skip


def _scalar_grads(ds, db, scale, bias):
    """Scale and bias gradients in their parameters' dtypes (fp32 stand-in for no bias)."""
    return cast(ds, scale.dtype), cast(db, bias.dtype if bias is not None else torch.float32)


def _fake_grads(x, y, scale, bias, y_grad=True, grads_dtype=None):
    db_dtype = bias.dtype if bias is not None else torch.float32
    like = dict(memory_format=torch.contiguous_format, dtype=grads_dtype)
    return (
        torch.empty_like(x, **like),
        torch.empty_like(y, **like) if y_grad else None,
        scale.new_empty(()),
        scale.new_empty((), dtype=db_dtype),
    )


def _alpha(alpha: float, alpha_tensor, teacher):
    """The teacher's share as the ops use it: the 0-d ``alpha_tensor`` where given (only
    with a ``teacher``), else the float."""
    if alpha_tensor is None:
        return alpha
    if teacher is None:
        raise ValueError("vlmkernels contrastive ops: alpha_tensor given without a teacher")
    return alpha_tensor


def _targets(a) -> Targets:
    teacher = (a.teacher_x, a.teacher_y, a.teacher_scale) if a.teacher_x is not None else None
    alpha = _alpha(a.alpha, a.alpha_tensor, teacher)
    return Targets(a.offset, a.row_ids, a.col_ids, a.smoothing, alpha, teacher)


# ------------------------------------------------------------------ contrastive_ce_forward


def _ce_forward(backend, *args):
    """Cross-entropies of the rows (M,) and of the columns (N,) of S = s x y^T + b with
    :class:`Targets`, and the (3, M) / (3, N) states backward needs (lse, positives,
    teacher lse); empty for a direction not asked for."""
    a = _CeArgs(*args)
    x, y, rows, cols = a.x, a.y, a.rows, a.cols
    targets = _targets(a)
    m, n = x.shape[0], y.shape[0]
    ct = compute_dtype(x.dtype)
    teacher_lse = (None, None)
    if targets.teacher is not None:
        t_rows, t_cols = block_stats(a.teacher_x, a.teacher_y, a.teacher_scale, None, Targets(),
                                     rows, cols, a.chunk_size, backend=backend)  # fmt: skip
        teacher_lse = (t_rows.lse if rows else None, t_cols.lse if cols else None)
    row_stats, col_stats = block_stats(x, y, a.scale, a.bias, targets, rows, cols, a.chunk_size,
                                       teacher_lse, backend)  # fmt: skip
    outputs, zeros = [], None
    sides = ((row_stats, teacher_lse[0], n), (col_stats, teacher_lse[1], m))
    for stats, t_lse, n_classes in sides:
        if stats is None:
            outputs.append((x.new_empty((0,), dtype=ct), x.new_empty((3, 0), dtype=ct)))
            continue
        if t_lse is None:  # the teacher lse row of the state: zeros without a teacher
            if zeros is None or zeros.shape != stats.lse.shape:
                zeros = torch.zeros_like(stats.lse)
            t_lse = zeros
        state = torch.stack(
            (stats.lse, cast(stats.hard_cnt, stats.lse.dtype), cast(t_lse, stats.lse.dtype))
        )
        outputs.append((cast(stats.losses(targets, n_classes), ct), cast(state, ct)))
    (row_losses, row_state), (col_losses, col_state) = outputs
    return row_losses, col_losses, row_state, col_state


contrastive_ce_forward.impl("triton")(functools.partial(_ce_forward, "triton"))
contrastive_ce_forward.impl("torch")(functools.partial(_ce_forward, "torch"))


@contrastive_ce_forward.fake
def _(*args):
    a = _CeArgs(*args)
    ct = compute_dtype(a.x.dtype)
    m = a.x.shape[0] if a.rows else 0
    n = a.y.shape[0] if a.cols else 0
    new = a.x.new_empty
    return new((m,), dtype=ct), new((n,), dtype=ct), new((3, m), dtype=ct), new((3, n), dtype=ct)


@contrastive_ce_forward.autograd
class _:
    def setup_context(ctx, inputs, output):
        a = _CeArgs(*inputs)
        ctx.save_for_backward(*(getattr(a, name) for name in _CE_TENSORS), output[2], output[3])
        ctx.options = a._replace(**dict.fromkeys(_CE_TENSORS))
        ctx.mark_non_differentiable(output[2], output[3])  # the states: the backward's
        ctx.set_materialize_grads(False)  # no zeros made for the states' (absent) gradients
        remember_backend(ctx)

    @first_order_only("clip_loss / contrastive_cross_entropy")
    @in_forward_backend
    def backward(ctx, grad_rows, grad_cols, _grad_row_state, _grad_col_state):
        if grad_rows is None and grad_cols is None:
            return _input_grads(ctx, None, None, None, None)
        *tensors, row_state, col_state = ctx.saved_tensors
        row_state, col_state = as_saved(row_state, col_state)
        a = ctx.options._replace(**dict(zip(_CE_TENSORS, tensors, strict=True)))
        # a direction whose losses got no gradient has weights 0
        grad_rows = grad_rows if grad_rows is not None else row_state.new_zeros(row_state.shape[1])
        grad_cols = grad_cols if grad_cols is not None else col_state.new_zeros(col_state.shape[1])
        grads = contrastive_ce_backward(*a, row_state, col_state, grad_rows, grad_cols,
                                        ctx.needs_input_grad[1])  # fmt: skip
        return _input_grads(ctx, *grads)


# ----------------------------------------------------------------- contrastive_ce_backward


def _ce_backward(backend, *args):
    """(dx, dy, dscale, dbias) of sum_i grad_rows_i l^row_i + sum_j grad_cols_j l^col_j (dy
    None unless ``y_grad``)."""
    a = _CeBackwardArgs(*args)
    x, y, scale, bias = a.x, a.y, a.scale, a.bias
    targets = _targets(a)
    m, n = x.shape[0], y.shape[0]
    single_r, single_c = targets.single_positives(m, n)
    row_coef = col_coef = None
    if a.rows:
        row_coef = coefficients_from_state(a.row_state, targets, n, a.grad_rows, single_r)
    if a.cols:
        col_coef = coefficients_from_state(a.col_state, targets, m, a.grad_cols, single_c)
    if backend == "triton":
        dx, dy, ds, db = _block_grads_triton(x, y, scale, bias, targets, row_coef, col_coef,
                                             triton_chunk_rows(x, a.chunk_size),
                                             y_grad=a.y_grad)  # fmt: skip
    else:
        dx, dy, ds, db = _block_grads_torch(x, y, scale, bias, targets, row_coef, col_coef,
                                            a.chunk_size, y_grad=a.y_grad)  # fmt: skip
    dy = cast(dy, y.dtype) if dy is not None else None
    return cast(dx, x.dtype), dy, *_scalar_grads(ds, db, scale, bias)


contrastive_ce_backward.impl("triton")(functools.partial(_ce_backward, "triton"))
contrastive_ce_backward.impl("torch")(functools.partial(_ce_backward, "torch"))


@contrastive_ce_backward.fake
def _(x, y, scale, bias, *args):
    return _fake_grads(x, y, scale, bias, y_grad=args[-1])


# ----------------------------------------------------------- contrastive_ce_targets_reduced


# (the two reduced ops below build the teacher triple inline and call _alpha only for a
# tensor alpha: host time per call)


def _ce_targets_reduced(backend, x, y, scale, bias, row_ids, col_ids, tx, ty, ts, alpha_tensor,
                        weight, offset, smoothing, alpha, cols, chunk_size):  # fmt: skip
    """(loss, coef): ``weight * sum_i (l^row_i (+ l^col_i))``, the cross-entropies of the
    rows (and columns) of S = s x y^T + b with :class:`Targets` (offset, row_ids, col_ids,
    smoothing, alpha, teacher (teacher_x, teacher_y, teacher_scale): given with alpha > 0,
    or with ``alpha_tensor``, which then stands for alpha); NaN where a row has no target.
    coef (1 + cols, 6, M): per side the backward's coefficients (lse, u, h, e, a, teacher
    lse) for unit upstream weights (:meth:`SideStats.coefficients`). The caller checks:
    without ids 0 <= offset <= N - M; cols only for M = N, offset 0, row_ids = col_ids.

    A row without a target makes the loss and every gradient it reaches NaN whatever the
    upstream gradient, 0 included, as autograd through a NaN loss does (the per-sample
    op, ``contrastive_ce_forward``, leaves such a row out of the gradients where its own
    upstream weight is 0: the documented way to mask it)."""
    teacher = (tx, ty, ts) if tx is not None else None
    if alpha_tensor is not None:
        alpha = _alpha(alpha, alpha_tensor, teacher)
    if backend == "triton":
        whole = _ce_targets_forward_whole(x, y, scale, bias, row_ids, col_ids, teacher, weight,
                                          offset, smoothing, alpha, cols)  # fmt: skip
        if whole is not None:
            return whole
    targets = Targets(offset, row_ids, col_ids, smoothing, alpha, teacher)
    m, n = x.shape[0], y.shape[0]
    teacher_lse = (None, None)
    if teacher is not None:
        t_rows, t_cols = block_stats(tx, ty, ts, None, Targets(), True, cols, chunk_size,
                                     backend=backend)  # fmt: skip
        teacher_lse = (t_rows.lse, t_cols.lse if cols else None)
    row, col = block_stats(x, y, scale, bias, targets, True, cols, chunk_size, teacher_lse,
                           backend)  # fmt: skip
    ct = compute_dtype(x.dtype) if backend == "torch" else torch.float32
    loss = row.losses(targets, n).sum()
    sides = [row.coefficients(targets, n, torch.ones_like(row.lse), teacher_lse[0])]
    if cols:
        loss = loss + col.losses(targets, m).sum()
        sides.append(col.coefficients(targets, m, torch.ones_like(col.lse), teacher_lse[1]))
    return cast(loss * weight, ct), cast(torch.stack(sides), ct)


contrastive_ce_targets_reduced.impl("triton")(functools.partial(_ce_targets_reduced, "triton"))
contrastive_ce_targets_reduced.impl("torch")(functools.partial(_ce_targets_reduced, "torch"))


@contrastive_ce_targets_reduced.fake
def _(x, y, scale, bias, *args):
    ct = compute_dtype(x.dtype)
    cols = args[-2]
    return x.new_empty((), dtype=ct), x.new_empty((1 + cols, 6, x.shape[0]), dtype=ct)


def _reduced_autograd(op: Op, backward_op: Op, n_tensors: int) -> None:
    """Registers the autograd of a reduced cross-entropy op: inputs ``n_tensors`` tensors,
    then options ending with ``cols, chunk_size``; outputs (loss, coef). Its backward is
    ``backward_op(*tensors, coef, grad_loss, *options but cols, y_grad)``, y_grad: whether
    autograd asks for the second features' gradient."""

    @op.autograd
    class _:
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(*inputs[:n_tensors], output[1])
            ctx.options = (*inputs[n_tensors:-2], inputs[-1])  # cols: coef's shape says it
            ctx.mark_non_differentiable(output[1])  # coef: the backward's, not a result
            ctx.set_materialize_grads(False)  # no zeros made for coef's (absent) gradient
            remember_backend(ctx)

        @first_order_only("clip_loss / contrastive_cross_entropy")
        @in_forward_backend
        def backward(ctx, grad_loss, _grad_coef):
            if grad_loss is None:
                return _input_grads(ctx, None, None, None, None)
            *tensors, coef = ctx.saved_tensors
            grads = backward_op(*tensors, *as_saved(coef), grad_loss, *ctx.options,
                                ctx.needs_input_grad[1])  # fmt: skip
            return _input_grads(ctx, *grads)


_reduced_autograd(contrastive_ce_targets_reduced, contrastive_ce_targets_reduced_backward, 10)


def _ce_targets_reduced_backward(backend, x, y, scale, bias, row_ids, col_ids, tx, ty, ts,
                                 alpha_tensor, coef, grad, weight, offset, smoothing, alpha,
                                 chunk_size, y_grad):  # fmt: skip
    """(dx, dy, dscale, dbias) of grad * loss for :data:`contrastive_ce_targets_reduced`'s
    loss, from its coef (the weights u, h, e, a times grad * weight, alpha in them: the
    gradient kernels do not read it); dy None unless ``y_grad``."""
    teacher = (tx, ty, ts) if tx is not None else None
    if backend == "triton":
        whole = _ce_targets_backward_whole(x, y, scale, bias, row_ids, col_ids, teacher, coef,
                                           grad, weight, offset, smoothing, chunk_size,
                                           y_grad)  # fmt: skip
        if whole is not None:
            return whole
    targets = Targets(offset, row_ids, col_ids, smoothing, _alpha(alpha, alpha_tensor, teacher),
                      teacher)  # fmt: skip
    u = (grad * weight).to(coef.dtype)
    full = torch.cat((coef[:, :1], coef[:, 1:5] * u, coef[:, 5:]), 1)
    row_coef, col_coef = full[0], (full[1] if full.shape[0] > 1 else None)
    if backend == "triton":
        dx, dy, ds, db = _block_grads_triton(x, y, scale, bias, targets, row_coef, col_coef,
                                             triton_chunk_rows(x, chunk_size),
                                             y_grad=y_grad)  # fmt: skip
    else:
        dx, dy, ds, db = _block_grads_torch(x, y, scale, bias, targets, row_coef, col_coef,
                                            chunk_size, y_grad=y_grad)  # fmt: skip
    dy = cast(dy, y.dtype) if dy is not None else None
    return cast(dx, x.dtype), dy, *_scalar_grads(ds, db, scale, bias)


contrastive_ce_targets_reduced_backward.impl("triton")(
    functools.partial(_ce_targets_reduced_backward, "triton")
)
contrastive_ce_targets_reduced_backward.impl("torch")(
    functools.partial(_ce_targets_reduced_backward, "torch")
)


@contrastive_ce_targets_reduced_backward.fake
def _(x, y, scale, bias, *args):
    return _fake_grads(x, y, scale, bias, y_grad=args[-1])


# ------------------------------------------------------------------- contrastive_ce_reduced
# The targets op with one positive per row (CLIP's default targets, ALBEF's without
# distillation), under a schema without the optional targets: the same implementations,
# for half the arguments in the eager call (host time, see benchmarks/host.py).


def _ce_reduced(backend, x, y, scale, bias, weight, offset, cols, chunk_size):
    """(loss, coef): ``weight * sum_i (l^row_i (+ l^col_i))``, the cross-entropies of the
    rows (and columns) of S = s x y^T + b with one positive per row at col = row + offset
    (and per column: then M = N, offset 0; the caller checks both), and the backward's
    (1 + cols, 6, M) coefficients: :data:`contrastive_ce_targets_reduced` without its
    optional targets, which it runs."""
    return _ce_targets_reduced(backend, x, y, scale, bias, *(None,) * 6, weight, offset, 0.0,
                               0.0, cols, chunk_size)  # fmt: skip


contrastive_ce_reduced.impl("triton")(functools.partial(_ce_reduced, "triton"))
contrastive_ce_reduced.impl("torch")(functools.partial(_ce_reduced, "torch"))


@contrastive_ce_reduced.fake
def _(x, y, scale, bias, weight, offset, cols, chunk_size):
    ct = compute_dtype(x.dtype)
    return x.new_empty((), dtype=ct), x.new_empty((1 + cols, 6, x.shape[0]), dtype=ct)


_reduced_autograd(contrastive_ce_reduced, contrastive_ce_reduced_backward, 4)


def _ce_reduced_backward(backend, x, y, scale, bias, coef, grad, weight, offset, chunk_size,
                         y_grad):  # fmt: skip
    """(dx, dy, dscale, dbias) of grad * loss for :data:`contrastive_ce_reduced`'s loss (dy
    None unless ``y_grad``)."""
    no_targets = (None,) * 6
    return _ce_targets_reduced_backward(backend, x, y, scale, bias, *no_targets, coef, grad,
                                        weight, offset, 0.0, 0.0, chunk_size, y_grad)  # fmt: skip


contrastive_ce_reduced_backward.impl("triton")(functools.partial(_ce_reduced_backward, "triton"))
contrastive_ce_reduced_backward.impl("torch")(functools.partial(_ce_reduced_backward, "torch"))


@contrastive_ce_reduced_backward.fake
def _(x, y, scale, bias, *args):
    return _fake_grads(x, y, scale, bias, y_grad=args[-1])


# -------------------------------------------------------------------- siglip_loss_forward


@siglip_loss_forward.impl("triton")
def _(x, y, scale, bias, chunk_size, offset):
    """Per-image losses l_i = -sum_j logsigmoid(z_ij S_ij), (M,), with z = +1 on the pairs
    col = row + offset."""
    return _siglip_rows_triton(x, y, scale, bias, offset)


@siglip_loss_forward.impl("torch")
def _(x, y, scale, bias, chunk_size, offset):
    return _siglip_rows_torch(x, y, scale, bias, chunk_size, offset)


@siglip_loss_forward.fake
def _(x, y, scale, bias, chunk_size, offset):
    return x.new_empty((x.shape[0],), dtype=compute_dtype(x.dtype))


@siglip_loss_forward.autograd
class _:
    def setup_context(ctx, inputs, output):
        x, y, scale, bias, chunk_size, offset = inputs
        ctx.save_for_backward(x, y, scale, bias)
        ctx.chunk_size, ctx.offset = chunk_size, offset
        remember_backend(ctx)

    @first_order_only("siglip_loss")
    @in_forward_backend
    def backward(ctx, grad_rows):
        x, y, scale, bias = ctx.saved_tensors
        grads = siglip_loss_backward(x, y, scale, bias, grad_rows, ctx.chunk_size, ctx.offset,
                                     ctx.needs_input_grad[1])  # fmt: skip
        return _input_grads(ctx, *grads)


# ------------------------------------------------------------------- siglip_loss_backward


@siglip_loss_backward.impl("triton")
def _(x, y, scale, bias, grad_rows, chunk_size, offset, y_grad):
    """(dx, dy, dscale, dbias) of sum_i grad_rows[i] * l_i (dy None unless ``y_grad``)."""
    dx, dy, ds, db, _ = _siglip_grads_triton(x, y, scale, bias, grad_rows,
                                             triton_chunk_rows(x, chunk_size), offset,
                                             y_grad=y_grad)  # fmt: skip
    return dx, dy, *_scalar_grads(ds, db, scale, bias)


@siglip_loss_backward.impl("torch")
def _(x, y, scale, bias, grad_rows, chunk_size, offset, y_grad):
    dx, dy, ds, db, _ = _siglip_grads_torch(x, y, scale, bias, grad_rows, chunk_size, offset,
                                            y_grad=y_grad)  # fmt: skip
    return dx, dy, *_scalar_grads(ds, db, scale, bias)


@siglip_loss_backward.fake
def _(x, y, scale, bias, grad_rows, chunk_size, offset, y_grad):
    return _fake_grads(x, y, scale, bias, y_grad=y_grad)


# ---------------------------------------------------------------------- siglip_loss_fused


def _siglip_fused(backend, x, y, scale, bias, row_weight, chunk_size, offset, y_grad):
    """(loss, dx, dy, dscale, dbias) of loss = row_weight * sum_i l_i, in one pass: the
    gradients are computed with the loss and only scaled in backward; dy None unless
    ``y_grad``; dx and dy in :func:`.chunked.forward_grad_dtype` of the features'."""
    grads_dtype = forward_grad_dtype(x.dtype)
    if backend == "triton":
        whole = _siglip_fused_whole(x, y, scale, bias, row_weight, chunk_size, offset, y_grad)
        if whole is not None:
            return whole
        chunk = triton_chunk_rows(x, chunk_size)
        dx, dy, ds, db, rows = _siglip_grads_triton(x, y, scale, bias, row_weight, chunk, offset,
                                                    y_grad=y_grad,
                                                    grads_dtype=grads_dtype)  # fmt: skip
    else:
        w = torch.full((x.shape[0],), row_weight, dtype=compute_dtype(x.dtype), device=x.device)
        dx, dy, ds, db, rows = _siglip_grads_torch(x, y, scale, bias, w, chunk_size, offset,
                                                   y_grad=y_grad,
                                                   grads_dtype=grads_dtype)  # fmt: skip
    return rows.sum() * row_weight, dx, dy, *_scalar_grads(ds, db, scale, bias)


siglip_loss_fused.impl("triton")(functools.partial(_siglip_fused, "triton"))
siglip_loss_fused.impl("torch")(functools.partial(_siglip_fused, "torch"))


@siglip_loss_fused.fake
def _(x, y, scale, bias, row_weight, chunk_size, offset, y_grad):
    loss = x.new_empty((), dtype=compute_dtype(x.dtype))
    return loss, *_fake_grads(x, y, scale, bias, y_grad=y_grad,
                              grads_dtype=forward_grad_dtype(x.dtype))  # fmt: skip


@siglip_loss_fused.autograd
class _:
    def setup_context(ctx, inputs, output):
        # the gradients of the inputs that need one, scaled in backward; the other outputs
        # (the gradients themselves) get no gradient, which is not materialised as zeros.
        # They stay differentiable outputs: saved, they are what ties the backward's
        # results to first_order_only's error under create_graph=True.
        if ctx.needs_input_grad[1] and output[2] is None:
            # y_grad is the caller's trace-time answer: a program exported with one side of
            # the features frozen, then run with both trainable, would leave one without
            # its gradient, silently
            raise RuntimeError(
                "siglip_loss: a graph traced (torch.export) with one side of the features "
                "needing no gradient was called with both needing one; export it with both "
                "sides requiring grad, as they will be run"
            )
        needed = zip(output[1:], ctx.needs_input_grad[:4], strict=True)
        ctx.save_for_backward(*[g if need else None for g, need in needed])  # (one call)
        x = inputs[0]  # fp32 gradients of fp16 features are rounded after scaling
        ctx.features_dtype = x.dtype if forward_grad_dtype(x.dtype) != x.dtype else None
        ctx.set_materialize_grads(False)

    @first_order_only("siglip_loss")
    def backward(ctx, grad_loss, *_unused):
        if grad_loss is None:
            return _input_grads(ctx, None, None, None, None)
        grads = [grad_loss * g if g is not None else None for g in ctx.saved_tensors]
        if ctx.features_dtype is not None:
            grads[:2] = [cast(g, ctx.features_dtype) if g is not None else None
                         for g in grads[:2]]  # fmt: skip
        return _input_grads(ctx, *grads)

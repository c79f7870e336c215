"""The connector ops, ``torch.ops.vlmkernels.connector`` / ``connector_backward`` /
``pooled_projector`` / ``pooled_projector_backward`` / ``merge_tokens`` /
``unmerge_tokens`` / ``deepstack_add``: one declaration each
(:class:`vlmkernels.core.op.Op`) with the Triton and PyTorch implementations, the fake and
the backward.

``x`` is always the (B, H, W, C) grid view of the features and ``merge`` the (MH, MW)
merge (:mod:`.launchers`); outputs are 2-D (M, N) and the public functions
(:mod:`.functional`) give them their shapes.
"""

from __future__ import annotations

import torch

from ...core.backend import in_forward_backend, remember_backend
from ...core.op import Op, as_saved, first_order_only
from . import launchers, reference
from .kernels import ACT_GELU

__all__ = [
    "connector",
    "connector_backward",
    "deepstack_add",
    "merge_tokens",
    "pooled_projector",
    "pooled_projector_backward",
    "unmerge_tokens",
]

FAMILY = "connectors"

_ARGS = (
    "Tensor x, Tensor w1, Tensor? b1, Tensor? w2, Tensor? b2, Tensor? norm_weight, "
    "Tensor? norm_bias, Tensor? residual, int[] merge, int norm, bool per_patch, float eps, "
    "int activation, bool save"
)
connector = Op("connector", f"({_ARGS}) -> (Tensor, Tensor, Tensor, Tensor)", family=FAMILY)
connector_backward = Op(
    "connector_backward",
    "(Tensor grad, Tensor x, Tensor w1, Tensor? b1, Tensor? w2, Tensor? b2, "
    "Tensor? norm_weight, Tensor? norm_bias, Tensor saved, Tensor mean, Tensor rstd, "
    "int[] merge, int norm, bool per_patch, float eps, int activation, bool[] needs) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    family=FAMILY,
)
merge_tokens = Op("merge_tokens", "(Tensor x, int[] merge) -> Tensor", family=FAMILY)
unmerge_tokens = Op(
    "unmerge_tokens", "(Tensor grad, SymInt[] shape, int[] merge) -> Tensor", family=FAMILY
)
deepstack_add = Op(
    "deepstack_add", "(Tensor hidden, Tensor mask, Tensor embeds) -> Tensor", family=FAMILY
)


def _sizes(x, merge, w1, w2):
    b, h, w, c = x.shape
    m = b * (h // merge[0]) * (w // merge[1])
    return m, (w2 if w2 is not None else w1).shape[0]


def _stat_rows(x, merge, norm, per_patch):
    if norm == 0:
        return 0
    b, h, w, _ = x.shape
    return b * h * w if per_patch else b * (h // merge[0]) * (w // merge[1])


# ---------------------------------------------------------------------------- connector


@connector.impl("triton")
def _(x, w1, b1, w2, b2, norm_weight, norm_bias, residual, merge, norm, per_patch, eps,
      activation, save):  # fmt: skip
    return launchers.forward(x, merge, w1, b1, w2, b2, norm_weight, norm_bias, residual, norm,
                             per_patch, eps, activation, save)  # fmt: skip


@connector.impl("torch")
def _(x, w1, b1, w2, b2, norm_weight, norm_bias, residual, merge, norm, per_patch, eps,
      activation, save):  # fmt: skip
    return reference.forward(x, merge, w1, b1, w2, b2, norm_weight, norm_bias, residual, norm,
                             per_patch, eps, activation, save)  # fmt: skip


@connector.fake
def _(x, w1, b1, w2, b2, norm_weight, norm_bias, residual, merge, norm, per_patch, eps,
      activation, save):  # fmt: skip
    m, n = _sizes(x, merge, w1, w2)
    saved = (m, w1.shape[0]) if save and w2 is not None else (0,)
    stats = _stat_rows(x, merge, norm, per_patch)
    sd = reference.stat_dtype(x.dtype)
    return (x.new_empty((m, n)), x.new_empty(saved), x.new_empty(stats, dtype=sd),
            x.new_empty(stats, dtype=sd))  # fmt: skip


_GRAD_POSITIONS = (0, 1, 2, 3, 4, 5, 6)  # x, w1, b1, w2, b2, norm_weight, norm_bias


@connector.autograd
class _:
    def setup_context(ctx, inputs, output):
        x, w1, b1, w2, b2, nw, nb, residual, merge, norm, per_patch, eps, act, save = inputs
        _, saved, mean, rstd = output
        ctx.save_for_backward(x, w1, b1, w2, b2, nw, nb, saved, mean, rstd)
        ctx.options = (list(merge), norm, per_patch, eps, act)
        ctx.has_residual = residual is not None
        ctx.mark_non_differentiable(saved, mean, rstd)  # what the backward reads
        ctx.set_materialize_grads(False)
        remember_backend(ctx)

    @first_order_only("the connector ops (mlp_projector, merger)")
    @in_forward_backend
    def backward(ctx, grad, _g_saved, _g_mean, _g_rstd):
        need = ctx.needs_input_grad
        none = (None,) * 14
        if grad is None:
            return none
        x, w1, b1, w2, b2, nw, nb, saved, mean, rstd = ctx.saved_tensors
        saved, mean, rstd = as_saved(saved, mean, rstd)
        needs = [bool(need[i]) for i in _GRAD_POSITIONS]
        grads = [None] * 7
        if any(needs):
            out = connector_backward(grad, x, w1, b1, w2, b2, nw, nb, saved, mean, rstd,
                                     *ctx.options, needs)  # fmt: skip
            grads = [g if n else None for g, n in zip(out, needs, strict=True)]
        dres = None
        if ctx.has_residual and need[7]:
            dres = grad
        return (*grads, dres, None, None, None, None, None, None)


def _backward_impl(backend):
    def run(grad, x, w1, b1, w2, b2, nw, nb, saved, mean, rstd, merge, norm, per_patch, eps,
            act, needs):  # fmt: skip
        if backend == "triton":
            grads = launchers.backward(grad, x, merge, w1, b1, w2, nw, nb, saved, mean, rstd,
                                       norm, per_patch, act, needs)  # fmt: skip
        else:
            grads = reference.backward(grad, x, merge, w1, b1, w2, b2, nw, nb, norm, per_patch,
                                       eps, act, needs)  # fmt: skip
        return tuple(g if g is not None else x.new_empty(0) for g in grads)

    return run


connector_backward.impl("triton")(_backward_impl("triton"))
connector_backward.impl("torch")(_backward_impl("torch"))


@connector_backward.fake
def _(grad, x, w1, b1, w2, b2, nw, nb, saved, mean, rstd, merge, norm, per_patch, eps, act,
      needs):  # fmt: skip
    shapes = [(x, needs[0]), (w1, needs[1]), (b1, needs[2]), (w2, needs[3]), (b2, needs[4]),
              (nw, needs[5]), (nb, needs[6])]  # fmt: skip
    return tuple(t.new_empty(t.shape) if t is not None and n else x.new_empty(0)
                 for t, n in shapes)  # fmt: skip


# --------------------------------------------------------------------- pooled projector

pooled_projector = Op(
    "pooled_projector",
    "(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, SymInt[] size, int mode, "
    "bool save) -> (Tensor, Tensor)",
    family=FAMILY,
)
pooled_projector_backward = Op(
    "pooled_projector_backward",
    "(Tensor grad, Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor saved, SymInt[] size, "
    "int mode, bool[] needs) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    family=FAMILY,
)


@pooled_projector.impl("triton")
def _(x, w1, b1, w2, b2, size, mode, save):
    return launchers.pooled_forward(x, w1, b1, w2, b2, size, mode, save)


@pooled_projector.impl("torch")
def _(x, w1, b1, w2, b2, size, mode, save):
    return reference.pooled_forward(x, w1, b1, w2, b2, size, mode, save)


@pooled_projector.fake
def _(x, w1, b1, w2, b2, size, mode, save):
    b, h, w, _ = x.shape
    saved = (b * h * w, w1.shape[0]) if save else (0,)
    return x.new_empty((b * size[0] * size[1], w2.shape[0])), x.new_empty(saved)


@pooled_projector.autograd
class _:
    def setup_context(ctx, inputs, output):
        x, w1, b1, w2, b2, size, mode, _save = inputs
        ctx.save_for_backward(x, w1, b1, w2, output[1])
        ctx.options = (list(size), mode)
        ctx.mark_non_differentiable(output[1])  # the saved activation, the backward's
        ctx.set_materialize_grads(False)
        remember_backend(ctx)

    @first_order_only("mlp_projector with pool")
    @in_forward_backend
    def backward(ctx, grad, _g_saved):
        if grad is None:
            return (None,) * 8
        x, w1, b1, w2, saved = ctx.saved_tensors
        (saved,) = as_saved(saved)
        needs = [bool(n) for n in ctx.needs_input_grad[:5]]
        grads = [None] * 5
        if any(needs):
            out = pooled_projector_backward(grad, x, w1, b1, w2, saved, *ctx.options, needs)
            grads = [g if n else None for g, n in zip(out, needs, strict=True)]
        return (*grads, None, None, None)


def _pooled_backward_impl(backend):
    def run(grad, x, w1, b1, w2, saved, size, mode, needs):
        if backend == "triton":
            grads = launchers.pooled_backward(grad, x, w1, b1, w2, saved, size, mode, needs)
        else:
            grads = reference.pooled_backward(grad, x, w1, b1, w2, size, mode, needs)
        return tuple(g if g is not None else x.new_empty(0) for g in grads)

    return run


pooled_projector_backward.impl("triton")(_pooled_backward_impl("triton"))
pooled_projector_backward.impl("torch")(_pooled_backward_impl("torch"))


@pooled_projector_backward.fake
def _(grad, x, w1, b1, w2, saved, size, mode, needs):
    refs = (x, w1, b1, w2, w2[:, 0])
    return tuple(t.new_empty(t.shape) if t is not None and n else x.new_empty(0)
                 for t, n in zip(refs, needs, strict=True))  # fmt: skip


# ------------------------------------------------------------------- merge / unmerge


@merge_tokens.impl("triton")
def _(x, merge):
    return launchers.shuffle(x, merge)


def _new(t: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``t`` as a tensor of its own, contiguous: the reshapes of :mod:`.reference` return a
    view of ``src`` where the permutation moves nothing (scale 1, one merged row or column,
    no rows), and a custom op's output may not alias its input."""
    if t.is_contiguous() and t.untyped_storage().data_ptr() != src.untyped_storage().data_ptr():
        return t
    return t.clone(memory_format=torch.contiguous_format)


@merge_tokens.impl("torch")
def _(x, merge):
    return _new(reference.merge(x, *merge), x)


@merge_tokens.fake
def _(x, merge):
    b, h, w, c = x.shape
    return x.new_empty((b * (h // merge[0]) * (w // merge[1]), merge[0] * merge[1] * c))


@merge_tokens.autograd
class _:
    def setup_context(ctx, inputs, output):
        ctx.shape, ctx.merge = list(inputs[0].shape), list(inputs[1])
        remember_backend(ctx)

    @in_forward_backend
    def backward(ctx, grad):
        return unmerge_tokens(grad, ctx.shape, ctx.merge), None


@unmerge_tokens.impl("triton")
def _(grad, shape, merge):
    return launchers.shuffle(grad.new_empty(shape), merge, grad)


@unmerge_tokens.impl("torch")
def _(grad, shape, merge):
    return _new(reference.unmerge(grad, shape, *merge), grad)


@unmerge_tokens.fake
def _(grad, shape, merge):
    return grad.new_empty(shape)


@unmerge_tokens.autograd
class _:
    def setup_context(ctx, inputs, output):
        ctx.merge = list(inputs[2])
        remember_backend(ctx)

    @in_forward_backend
    def backward(ctx, grad):
        return merge_tokens(grad, ctx.merge), None, None


# ---------------------------------------------------------------------------- deepstack


def _check_count(mask: torch.Tensor, embeds: torch.Tensor) -> None:
    """The mask's True entries are as many as ``embeds``' rows, checked on the device
    (``torch._assert_async``: raises at once on the CPU, and on a GPU is a device-side
    assert ordered before the kernels), not read on the host: a read (``int(mask.sum())``)
    waited for the GPU queue on every call, a synchronisation per DeepStack layer."""
    torch._assert_async(
        mask.sum() == embeds.shape[0],
        "deepstack_add: visual_pos_mask must have as many True entries as visual_embeds has rows",
    )


@deepstack_add.impl("triton")
def _(hidden, mask, embeds):
    _check_count(mask, embeds)
    if hidden.numel() == 0:  # no rows, or rows of width 0 (reshape(-1, 0) is ambiguous)
        return torch.empty_like(hidden, memory_format=torch.contiguous_format)
    flat = mask.reshape(-1)
    index = torch.where(flat, flat.cumsum(0) - 1, -1)
    rows = hidden.reshape(-1, hidden.shape[-1])
    # allocated in hidden's shape: a view made here, coming out of the autograd Function,
    # would refuse in-place changes
    return launchers.deepstack(rows, index, embeds, shape=hidden.shape)


@deepstack_add.impl("torch")
def _(hidden, mask, embeds):
    _check_count(mask, embeds)
    out = hidden.clone(memory_format=torch.contiguous_format)
    out[mask] = hidden[mask] + embeds.to(hidden.dtype)
    return out


@deepstack_add.fake
def _(hidden, mask, embeds):
    return torch.empty_like(hidden, memory_format=torch.contiguous_format)


@deepstack_add.autograd
class _:
    def setup_context(ctx, inputs, output):
        hidden, mask, embeds = inputs
        ctx.save_for_backward(mask)
        ctx.embeds_dtype, ctx.embeds_rows = embeds.dtype, embeds.shape[0]

    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        d_embeds = None
        if ctx.needs_input_grad[2]:
            # the rows of the mask's True entries, as many as embeds has rows (the forward
            # checked it): a static shape, so the backward traces under torch.compile,
            # where mask indexing (nonzero) stops the backend
            rows = torch.nonzero_static(mask.reshape(-1), size=ctx.embeds_rows).view(-1)
            d_embeds = grad.reshape(mask.numel(), grad.shape[-1]).index_select(0, rows)
            d_embeds = d_embeds.to(ctx.embeds_dtype)
        return grad, None, d_embeds


deepstack_add_ = Op(
    "deepstack_add_",
    "(Tensor(a!) hidden, Tensor mask, Tensor embeds) -> ()",
    family=FAMILY,
    mutates=("hidden",),
)


@deepstack_add_.impl("triton")
def _(hidden, mask, embeds):
    _check_count(mask, embeds)
    if not embeds.numel():  # no visual rows, or rows of width 0: nothing to add
        return
    # the True entries' rows, as many as embeds has rows (checked above): a static size, so
    # no host synchronisation (nonzero reads the count on the host)
    index = torch.nonzero_static(mask.reshape(-1), size=embeds.shape[0]).view(-1)
    try:
        rows = hidden.view(-1, hidden.shape[-1])
    except RuntimeError:  # leading dims no view flattens (a transposed batch): via a copy
        rows = hidden.reshape(-1, hidden.shape[-1])
        launchers.deepstack(rows, index, embeds, out=rows)
        hidden.copy_(rows.view(hidden.shape))
        return
    launchers.deepstack(rows, index, embeds, out=rows)


@deepstack_add_.impl("torch")
def _(hidden, mask, embeds):
    _check_count(mask, embeds)
    hidden[mask] = hidden[mask] + embeds.to(hidden.dtype)


@deepstack_add_.fake
def _(hidden, mask, embeds):
    return None


__all__ += ["ACT_GELU", "FAMILY", "deepstack_add_"]

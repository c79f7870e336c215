"""The token ops, ``torch.ops.vlmkernels.tokens_*``: one declaration each
(:class:`vlmkernels.core.op.Op`) with the PyTorch and Triton implementations, the fake and
the backward.

- ``tokens_select_rows(x, index, inverse)``: out[b, k] = x[b, index[b, k]] (B, K, C);
  ``inverse`` (B, N) holds k where index[b, k] = n and -1 elsewhere. Its backward is the
  same op with the roles of the maps swapped (a gather through the inverse map: rows of
  zeros for the tokens not selected), so it is twice differentiable.
- ``tokens_tome_match(metric, class_token)``: (best, arg) of ToMe's bipartite matching (no
  gradient: the matching is piecewise constant).
- ``tokens_tome_plan(best, arg, n, r, class_token)``: (source, members, offsets) of the
  merge: the r A tokens of highest best score (stable), every token's output row and the
  rows' CSR member lists (int64, no gradient); one Triton program per sample.
- ``tokens_tome_merge(x, size, source, members, offsets)``: the size-weighted mean per
  output row and the summed sizes; ``source`` (B, N) is each token's output row, ``members``
  and ``offsets`` the same map as CSR lists (members of row r: ``members[b, offsets[b, r] :
  offsets[b, r + 1]]``). Backward: ``tokens_tome_unmerge``.
- ``tokens_pool(x, grid, size, mode)``: block average or bilinear resize of a token grid;
  its backward ``tokens_pool_backward`` is the adjoint, whose backward is ``tokens_pool``.
"""

from __future__ import annotations

import torch

from ...core.backend import in_forward_backend, remember_backend
from ...core.op import Op, as_saved
from . import kernels, reference
from .kernels import AVG

FAMILY = "tokens"

select_rows = Op(
    "tokens_select_rows", "(Tensor x, Tensor index, Tensor inverse) -> Tensor", family=FAMILY
)
tome_match = Op(
    "tokens_tome_match", "(Tensor metric, bool class_token) -> (Tensor, Tensor)", family=FAMILY
)
tome_plan = Op(
    "tokens_tome_plan",
    "(Tensor best, Tensor arg, SymInt n, SymInt r, bool class_token) -> (Tensor, Tensor, Tensor)",
    family=FAMILY,
)
tome_merge = Op(
    "tokens_tome_merge",
    "(Tensor x, Tensor? size, Tensor source, Tensor members, Tensor offsets) -> (Tensor, Tensor)",
    family=FAMILY,
)
tome_unmerge = Op(
    "tokens_tome_unmerge",
    "(Tensor grad, Tensor grad_size, Tensor? x, Tensor? size, Tensor? out, Tensor out_size, "
    "Tensor source, bool size_grad) -> (Tensor, Tensor)",
    family=FAMILY,
)
pool = Op(
    "tokens_pool", "(Tensor x, SymInt[] grid, SymInt[] size, int mode) -> Tensor", family=FAMILY
)
pool_backward = Op(
    "tokens_pool_backward",
    "(Tensor grad, SymInt[] grid, SymInt[] size, int mode) -> Tensor",
    family=FAMILY,
)

# ------------------------------------------------------------------------------ select_rows


def inverse_rows(index: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n) int64: the rank of row j among the (B, K) sorted ``index`` rows, -1 for the
    rows not selected (what the backward of a selection gathers by)."""
    b, keep = index.shape
    ranks = torch.arange(keep, device=index.device).expand(b, keep)
    return torch.full((b, n), -1, dtype=torch.int64, device=index.device).scatter(1, index, ranks)


@select_rows.impl("triton")
def _(x, index, inverse):
    return kernels.gather_rows(x, index)


@select_rows.impl("torch")
def _(x, index, inverse):
    return reference.gather_rows(x, index)


@select_rows.fake
def _(x, index, inverse):
    return x.new_empty((x.shape[0], index.shape[-1], x.shape[2]))


@select_rows.autograd
class _:
    def setup_context(ctx, inputs, output):
        x, index, inverse = inputs
        if inverse is index:  # select_tokens' call: the inverse map made here, when needed
            inverse = inverse_rows(index, x.shape[1])
        ctx.save_for_backward(index, inverse)
        remember_backend(ctx)

    @in_forward_backend
    def backward(ctx, grad):
        index, inverse = as_saved(*ctx.saved_tensors)
        return select_rows(grad, inverse, index), None, None


# ------------------------------------------------------------------------------- tome_match


@tome_match.impl("triton")
def _(metric, class_token):
    return kernels.tome_match(metric, class_token)


@tome_match.impl("torch")
def _(metric, class_token):
    return reference.tome_match(metric, class_token)


@tome_match.fake
def _(metric, class_token):
    B, N, _ = metric.shape
    dtype = torch.float64 if metric.dtype == torch.float64 else torch.float32
    na = (N + 1) // 2
    return metric.new_empty((B, na), dtype=dtype), metric.new_empty((B, na), dtype=torch.int64)


# -------------------------------------------------------------------------------- tome_plan


@tome_plan.impl("triton")
def _(best, arg, n, r, class_token):
    return kernels.tome_plan(best, arg, n, r, class_token)


@tome_plan.impl("torch")
def _(best, arg, n, r, class_token):
    return reference.tome_plan(best, arg, n, r, class_token)


@tome_plan.fake
def _(best, arg, n, r, class_token):
    B = best.shape[0]
    new = lambda *shape: best.new_empty(shape, dtype=torch.int64)  # noqa: E731
    return new(B, n), new(B, n), new(B, n - r + 1)


# ------------------------------------------------------------------------------- tome_merge


def _size_dtype(x, size):
    return size.dtype if size is not None else x.dtype


@tome_merge.impl("triton")
def _(x, size, source, members, offsets):
    return kernels.tome_merge_rows(x, size, members, offsets, _size_dtype(x, size))


@tome_merge.impl("torch")
def _(x, size, source, members, offsets):
    nout = offsets.shape[1] - 1
    return reference.tome_merge_rows(x, size, source, nout, _size_dtype(x, size))


@tome_merge.fake
def _(x, size, source, members, offsets):
    B, _, C = x.shape
    nout = offsets.shape[1] - 1
    return x.new_empty((B, nout, C)), x.new_empty((B, nout, 1), dtype=_size_dtype(x, size))


@tome_merge.autograd
class _:
    def setup_context(ctx, inputs, output):
        x, size, source, members, offsets = inputs
        out, out_size = output
        # x and the output are read only for the sizes' gradient
        ctx.size_grad = size is not None and size.requires_grad
        keep = ctx.size_grad
        ctx.save_for_backward(x if keep else None, size, source, out if keep else None, out_size)
        remember_backend(ctx)

    @in_forward_backend
    def backward(ctx, grad, grad_size):
        x, size, source, out, out_size = ctx.saved_tensors
        source, out, out_size = as_saved(source, out, out_size)
        size_grad = ctx.size_grad and ctx.needs_input_grad[1]
        dx, ds = tome_unmerge(grad, grad_size, x, size, out, out_size, source, size_grad)
        return dx, (ds if size_grad else None), None, None, None


@tome_unmerge.impl("triton")
def _(grad, grad_size, x, size, out, out_size, source, size_grad):
    dx, ds = kernels.tome_unmerge_rows(grad, grad_size, x, size, out, out_size, source,
                                       size_grad)  # fmt: skip
    return dx, (ds if size_grad else grad.new_empty((0,)))


@tome_unmerge.impl("torch")
def _(grad, grad_size, x, size, out, out_size, source, size_grad):
    dx, ds = reference.tome_unmerge_rows(grad, grad_size, x, size, out, out_size, source,
                                         size_grad)  # fmt: skip
    return dx, (ds if size_grad else grad.new_empty((0,)))


@tome_unmerge.fake
def _(grad, grad_size, x, size, out, out_size, source, size_grad):
    B, N = source.shape
    ds = grad.new_empty((B, N, 1), dtype=size.dtype) if size_grad else grad.new_empty((0,))
    return grad.new_empty((B, N, grad.shape[2])), ds


@tome_unmerge.autograd
class _:
    """Second derivatives of the merge are not implemented: backpropagating through its
    backward (``create_graph=True``) raises instead of dropping those terms."""

    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise NotImplementedError(
            "tome_merge: second derivatives are not implemented (vlmkernels::"
            "tokens_tome_unmerge, the merge's backward, has no derivative)"
        )


# ------------------------------------------------------------------------------------ pool


def _avg_backward_index(grid, size, device):
    """(H W,) int64: the output token each input token of the block average feeds."""
    (H, W), (h, w) = grid, size
    ys = torch.arange(H, device=device) // (H // h)
    xs = torch.arange(W, device=device) // (W // w)
    return (ys[:, None] * w + xs[None, :]).reshape(-1)


@pool.impl("triton")
def _(x, grid, size, mode):
    return kernels.pool(x, tuple(grid), tuple(size), mode)


@pool.impl("torch")
def _(x, grid, size, mode):
    return reference.pool(x, grid, size, mode)


@pool.fake
def _(x, grid, size, mode):
    return x.new_empty((x.shape[0], size[0] * size[1], x.shape[2]))


@pool.autograd
class _:
    def setup_context(ctx, inputs, output):
        _, grid, size, mode = inputs
        ctx.options = (grid, size, mode)
        remember_backend(ctx)

    @in_forward_backend
    def backward(ctx, grad):
        return pool_backward(grad, *ctx.options), None, None, None


@pool_backward.impl("triton")
def _(grad, grid, size, mode):
    if mode == AVG:
        scale = 1.0 / ((grid[0] // size[0]) * (grid[1] // size[1]))
        return kernels.gather_rows(grad, _avg_backward_index(grid, size, grad.device), scale)
    return kernels.pool_backward(grad, tuple(grid), tuple(size))


@pool_backward.impl("torch")
def _(grad, grid, size, mode):
    return reference.pool_backward(grad, grid, size, mode)


@pool_backward.fake
def _(grad, grid, size, mode):
    return grad.new_empty((grad.shape[0], grid[0] * grid[1], grad.shape[2]))


@pool_backward.autograd
class _:
    def setup_context(ctx, inputs, output):
        _, grid, size, mode = inputs
        ctx.options = (grid, size, mode)
        remember_backend(ctx)

    @in_forward_backend
    def backward(ctx, grad):
        return pool(grad, *ctx.options), None, None, None

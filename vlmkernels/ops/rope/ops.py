"""The rotary ops, ``torch.ops.vlmkernels.rope_table`` / ``rope_table_`` / ``rope_positions``:
one declaration each (:class:`vlmkernels.core.op.Op`) with the PyTorch, Triton and CUDA C++
implementations, the fake and the backward.

q and k come in the caller's layout with ``head_axis`` naming their heads axis
(:mod:`.layout`); tables have q's shape without the heads axis (with a leading axis of 3
for M-RoPE when ``leading``); positions are (3, B, S) or (3, T) integers with an (R / 2,)
``inv_freq``. Outputs have q's and k's shapes. ``backward=True`` applies the transposed
rotation, which is also each op's backward.
"""

from __future__ import annotations

import torch

from ...core.backend import get_backend, in_forward_backend, remember_backend
from ...core.op import Op
from . import cuda, kernels, reference
from .layout import check_arguments, positions_view, table_view, to_bshd

rope_table = Op(
    "rope_table",
    "(Tensor q, Tensor k, Tensor cos, Tensor sin, int head_axis, bool leading, int lane_rule, "
    "int[] sections, bool backward) -> (Tensor, Tensor)",
    family="rope",
)
rope_table_ = Op(
    "rope_table_",
    "(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin, int head_axis, bool leading, "
    "int lane_rule, int[] sections) -> ()",
    family="rope",
    mutates=("q", "k"),
)
rope_positions = Op(
    "rope_positions",
    "(Tensor q, Tensor k, Tensor positions, Tensor inv_freq, int head_axis, int lane_rule, "
    "int[] sections, float scaling, bool backward) -> (Tensor, Tensor)",
    family="rope",
)


def _canonical(fn):
    """An implementation on canonical (B, S, H, D) views (the PyTorch and CUDA C++ paths):
    ``fn(q, k, qo, ko, **angles)`` writes qo, ko; the outputs are allocated in q's and k's
    layouts (or are q and k for the in-place op)."""

    def run(q, k, head_axis, inplace, **angles):
        out_q, out_k = (q, k) if inplace else (torch.empty_like(q), torch.empty_like(k))
        views = [to_bshd(t, head_axis) for t in (q, k, out_q, out_k)]
        fn(*views, **angles)
        return out_q, out_k

    return run


def _torch_launch(q, k, qo, ko, *, table=None, positions=None, inv_freq=None, mode=0,
                  sections=(0, 0, 0), scaling=1.0, backward=False):  # fmt: skip
    """The PyTorch reference with the launchers' signature (canonical views)."""
    if table is not None:
        lanes = [reference.table_lanes(t, mode, sections) for t in table]
    else:
        lanes = reference.position_lanes(positions, inv_freq, mode, sections, scaling)
    qo.copy_(reference.rotate(q, *lanes, backward, mode))
    ko.copy_(reference.rotate(k, *lanes, backward, mode))


def _cuda_or_triton(q, k, qo, ko, **angles):
    """The CUDA C++ launcher (looked up at each call, so tests can replace it), or, where
    its kernels refuse the call (:func:`.cuda.fits`: e.g. a float64 k beside a 16-bit q, an
    fp8 table, a rotary dim past their lanes) and the 'cuda' backend was not forced but is
    the recorded default, the Triton launcher, which takes it: a default must not turn a
    call the package runs into an error."""
    if get_backend() != "cuda" and not cuda.fits(q, k, qo, ko, **angles):
        kernels.launch(q, k, qo, ko, **angles)
    else:
        cuda.rope_launch(q, k, qo, ko, **angles)


_TORCH = _canonical(_torch_launch)
_CUDA = _canonical(_cuda_or_triton)


# ------------------------------------------------------------------------------- rope_table


@rope_table.impl("triton")
def _(q, k, cos, sin, head_axis, leading, lane_rule, sections, backward):
    out_q, out_k = torch.empty_like(q), torch.empty_like(k)
    kernels.launch(q, k, out_q, out_k, head_axis=head_axis, table=(cos, sin), leading=leading,
                   mode=lane_rule, sections=sections, backward=backward)  # fmt: skip
    return out_q, out_k


def _tables(q, cos, sin, head_axis, leading):
    return tuple(table_view(t, q, head_axis, leading) for t in (cos, sin))


@rope_table.impl("torch")
def _(q, k, cos, sin, head_axis, leading, lane_rule, sections, backward):
    check_arguments(q, k, head_axis, table=(cos, sin), leading=leading, mode=lane_rule,
                    sections=sections)  # fmt: skip
    return _TORCH(q, k, head_axis, False, table=_tables(q, cos, sin, head_axis, leading),
                  mode=lane_rule, sections=sections, backward=backward)  # fmt: skip


@rope_table.impl("cuda")
def _(q, k, cos, sin, head_axis, leading, lane_rule, sections, backward):
    return _CUDA(q, k, head_axis, False, table=_tables(q, cos, sin, head_axis, leading),
                 mode=lane_rule, sections=sections, backward=backward)  # fmt: skip


@rope_table.fake
def _(q, k, cos, sin, head_axis, leading, lane_rule, sections, backward):
    return torch.empty_like(q), torch.empty_like(k)


@rope_table.autograd
class _:
    def setup_context(ctx, inputs, output):
        q, k, cos, sin, head_axis, leading, lane_rule, sections, backward = inputs
        _mark_constant_outputs(ctx, output, (q, k), cos.requires_grad or sin.requires_grad)
        ctx.options = (head_axis, leading, lane_rule, sections)
        ctx.backward = backward
        remember_backend(ctx)
        tables_need_grad = cos.requires_grad or sin.requires_grad
        ctx.save_for_backward(cos, sin, *((q, k) if tables_need_grad else (None, None)))

    @in_forward_backend
    def backward(ctx, grad_q, grad_k):
        cos, sin, q, k = ctx.saved_tensors
        head_axis, leading, mode, sections = ctx.options
        dq, dk = rope_table(grad_q, grad_k, cos, sin, *ctx.options, not ctx.backward)
        dcos = dsin = None
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            dcos, dsin = _table_grads(q, k, grad_q, grad_k, cos, head_axis, leading, mode,
                                      sections, ctx.backward)  # fmt: skip
        return dq, dk, dcos, dsin, None, None, None, None, None


def _mark_constant_outputs(ctx, output, qk, tables_need_grad: bool) -> None:
    """The rotated q (or k) of a q (or k) and tables that need no gradient is a constant,
    as transformers' ``k * cos + rotate_half(k) * sin`` is: it does not require grad when
    only the other one does (its gradient in backward is then zeros)."""
    q, k = qk
    if not tables_need_grad and q.requires_grad != k.requires_grad:
        ctx.mark_non_differentiable(output[1] if q.requires_grad else output[0])


def _table_grads(q, k, grad_q, grad_k, cos, head_axis, leading, mode, sections, backward):
    """Gradients of the tables, in their own shapes (summed over broadcast axes)."""
    views = [to_bshd(t, head_axis) for t in (q, k, grad_q, grad_k)]
    absr = table_view(cos, q, head_axis, leading)
    dcos, dsin = reference.table_grads(*views, mode, sections, absr.shape, backward)
    return tuple(_to_table(g, cos, q, head_axis, leading) for g in (dcos, dsin))


def _to_table(grad, table, q, head_axis, leading):
    """An (A, B, S, R) gradient summed and laid out as ``table`` (a size-1 axis of the table
    broadcast over q's: its gradient is the sum)."""
    b, s = grad.shape[1], grad.shape[2]
    grad = grad if leading else grad[0]
    off = 1 if leading else 0
    shaped = grad.reshape(*grad.shape[:off], *([b, s] if q.dim() == 4 else [s]), grad.shape[-1])
    for i, size in enumerate(table.shape[off:-1]):
        if size == 1 and shaped.shape[off + i] != 1:
            shaped = shaped.sum(off + i, keepdim=True)
    return shaped.reshape(table.shape).to(table.dtype)


# ------------------------------------------------------------------------------ rope_table_


@rope_table_.impl("triton")
def _(q, k, cos, sin, head_axis, leading, lane_rule, sections):
    kernels.launch(q, k, q, k, head_axis=head_axis, table=(cos, sin), leading=leading,
                   mode=lane_rule, sections=sections)  # fmt: skip


@rope_table_.impl("torch")
def _(q, k, cos, sin, head_axis, leading, lane_rule, sections):
    check_arguments(q, k, head_axis, table=(cos, sin), leading=leading, mode=lane_rule,
                    sections=sections)  # fmt: skip
    _TORCH(q, k, head_axis, True, table=_tables(q, cos, sin, head_axis, leading),
           mode=lane_rule, sections=sections)  # fmt: skip


@rope_table_.impl("cuda")
def _(q, k, cos, sin, head_axis, leading, lane_rule, sections):
    _CUDA(q, k, head_axis, True, table=_tables(q, cos, sin, head_axis, leading),
          mode=lane_rule, sections=sections)  # fmt: skip


@rope_table_.fake
def _(q, k, cos, sin, head_axis, leading, lane_rule, sections):
    return None


# --------------------------------------------------------------------------- rope_positions


def _kernel_freq(inv_freq):
    """inv_freq as both kernels read it: contiguous float32. The Triton kernel reads it with
    a unit stride (a strided view gave other frequencies) and the CUDA C++ kernel takes
    float32 only; the values are the same (the reference computes angles with
    ``inv_freq.float()``). :func:`.functional.mrope_from_positions` already passes such a
    vector; a direct ``torch.ops.vlmkernels.rope_positions`` call may not."""
    if inv_freq.dtype != torch.float32 or inv_freq.stride(0) != 1:
        inv_freq = inv_freq.to(torch.float32).contiguous()
    return inv_freq


@rope_positions.impl("triton")
def _(q, k, positions, inv_freq, head_axis, lane_rule, sections, scaling, backward):
    out_q, out_k = torch.empty_like(q), torch.empty_like(k)
    kernels.launch(q, k, out_q, out_k, head_axis=head_axis, positions=positions,
                   inv_freq=_kernel_freq(inv_freq), mode=lane_rule, sections=sections,
                   scaling=scaling, backward=backward)  # fmt: skip
    return out_q, out_k


@rope_positions.impl("torch")
def _(q, k, positions, inv_freq, head_axis, lane_rule, sections, scaling, backward):
    check_arguments(q, k, head_axis, positions=positions, inv_freq=inv_freq, mode=lane_rule,
                    sections=sections)  # fmt: skip
    return _TORCH(q, k, head_axis, False, positions=positions_view(positions),
                  inv_freq=inv_freq, mode=lane_rule, sections=sections, scaling=scaling,
                  backward=backward)  # fmt: skip


@rope_positions.impl("cuda")
def _(q, k, positions, inv_freq, head_axis, lane_rule, sections, scaling, backward):
    return _CUDA(q, k, head_axis, False, positions=positions_view(positions),
                 inv_freq=_kernel_freq(inv_freq), mode=lane_rule, sections=sections,
                 scaling=scaling, backward=backward)  # fmt: skip


@rope_positions.fake
def _(q, k, positions, inv_freq, head_axis, lane_rule, sections, scaling, backward):
    return torch.empty_like(q), torch.empty_like(k)


@rope_positions.autograd
class _:
    def setup_context(ctx, inputs, output):
        q, k, positions, inv_freq, *options, backward = inputs
        _mark_constant_outputs(ctx, output, (q, k), False)
        ctx.save_for_backward(positions, inv_freq)
        ctx.options, ctx.backward = options, backward
        remember_backend(ctx)

    @in_forward_backend
    def backward(ctx, grad_q, grad_k):
        positions, inv_freq = ctx.saved_tensors
        dq, dk = rope_positions(grad_q, grad_k, positions, inv_freq, *ctx.options,
                                not ctx.backward)  # fmt: skip
        return dq, dk, None, None, None, None, None, None, None

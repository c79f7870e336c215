"""The rotary ops, ``torch.ops.vlmkernels.rope_table`` / ``rope_table_`` / ``rope_positions``:
one declaration each (:class:`vlmkernels.core.op.Op`) with the PyTorch, Triton and CUDA C++
implementations, the fake and the backward.

All take canonical (B, S, H, D) views of q and k. Tables are (A, B, S, R) with A = 1 (plain
RoPE) or 3 (M-RoPE, one per position axis); positions are (3, B, S) integers with an
(R / 2,) ``inv_freq``. ``backward=True`` applies the transposed rotation, which is also
each op's backward.
"""

from __future__ import annotations

import torch

from ...core.backend import in_forward_backend, remember_backend
from ...core.op import Op
from . import cuda, kernels, reference

rope_table = Op(
    "rope_table",
    "(Tensor q, Tensor k, Tensor cos, Tensor sin, int lane_rule, int[] sections, "
    "bool backward) -> (Tensor, Tensor)",
    family="rope",
)
rope_table_ = Op(
    "rope_table_",
    "(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin, int lane_rule, int[] sections) -> ()",
    family="rope",
    mutates=("q", "k"),
)
rope_positions = Op(
    "rope_positions",
    "(Tensor q, Tensor k, Tensor positions, Tensor inv_freq, int lane_rule, int[] sections, "
    "float scaling, bool backward) -> (Tensor, Tensor)",
    family="rope",
)


# ------------------------------------------------------------------------------- rope_table


# The launchers are looked up at each call (``module.attribute``), so tests can replace one.
_TRITON, _CUDA = (kernels, "launch"), (cuda, "rope_launch")


def _table_kernel(launcher):
    def run(q, k, cos, sin, lane_rule, sections, backward):
        out_q, out_k = torch.empty_like(q), torch.empty_like(k)
        getattr(*launcher)(q, k, out_q, out_k, table=(cos, sin), mode=lane_rule,
                           sections=sections, backward=backward)  # fmt: skip
        return out_q, out_k

    return run


rope_table.impl("triton")(_table_kernel(_TRITON))
rope_table.impl("cuda")(_table_kernel(_CUDA))


@rope_table.impl("torch")
def _(q, k, cos, sin, lane_rule, sections, backward):
    cos_lanes = reference.table_lanes(cos, lane_rule, sections)
    sin_lanes = reference.table_lanes(sin, lane_rule, sections)
    return reference.rope_torch(q, k, cos_lanes, sin_lanes, backward)


@rope_table.fake
def _(q, k, cos, sin, lane_rule, sections, backward):
    return torch.empty_like(q), torch.empty_like(k)


@rope_table.autograd
class _:
    def setup_context(ctx, inputs, output):
        q, k, cos, sin, lane_rule, sections, backward = inputs
        ctx.mode, ctx.sections, ctx.backward = lane_rule, sections, backward
        remember_backend(ctx)
        tables_need_grad = cos.requires_grad or sin.requires_grad
        ctx.save_for_backward(cos, sin, *((q, k) if tables_need_grad else (None, None)))

    @in_forward_backend
    def backward(ctx, grad_q, grad_k):
        cos, sin, q, k = ctx.saved_tensors
        dq, dk = rope_table(grad_q, grad_k, cos, sin, ctx.mode, ctx.sections, not ctx.backward)
        dcos = dsin = None
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            dcos, dsin = reference.table_grads(
                q, k, grad_q, grad_k, ctx.mode, ctx.sections, cos.shape, ctx.backward
            )
            dcos, dsin = dcos.to(cos.dtype), dsin.to(sin.dtype)
        return dq, dk, dcos, dsin, None, None, None


# ------------------------------------------------------------------------------ rope_table_


def _table_kernel_inplace(launcher):
    def run(q, k, cos, sin, lane_rule, sections):
        getattr(*launcher)(q, k, q, k, table=(cos, sin), mode=lane_rule, sections=sections)

    return run


rope_table_.impl("triton")(_table_kernel_inplace(_TRITON))
rope_table_.impl("cuda")(_table_kernel_inplace(_CUDA))


@rope_table_.impl("torch")
def _(q, k, cos, sin, lane_rule, sections):
    lanes = (reference.table_lanes(cos, lane_rule, sections),
             reference.table_lanes(sin, lane_rule, sections))  # fmt: skip
    q.copy_(reference.rotate(q, *lanes, False))
    k.copy_(reference.rotate(k, *lanes, False))


@rope_table_.fake
def _(q, k, cos, sin, lane_rule, sections):
    return None


# --------------------------------------------------------------------------- rope_positions


def _positions_kernel(launcher):
    def run(q, k, positions, inv_freq, lane_rule, sections, scaling, backward):
        out_q, out_k = torch.empty_like(q), torch.empty_like(k)
        getattr(*launcher)(q, k, out_q, out_k, positions=positions, inv_freq=inv_freq,
                           mode=lane_rule, sections=sections, scaling=scaling,
                           backward=backward)  # fmt: skip
        return out_q, out_k

    return run


rope_positions.impl("triton")(_positions_kernel(_TRITON))
rope_positions.impl("cuda")(_positions_kernel(_CUDA))


@rope_positions.impl("torch")
def _(q, k, positions, inv_freq, lane_rule, sections, scaling, backward):
    lanes = reference.position_lanes(positions, inv_freq, lane_rule, sections, scaling)
    return reference.rope_torch(q, k, *lanes, backward)


@rope_positions.fake
def _(q, k, positions, inv_freq, lane_rule, sections, scaling, backward):
    return torch.empty_like(q), torch.empty_like(k)


@rope_positions.autograd
class _:
    def setup_context(ctx, inputs, output):
        q, k, positions, inv_freq, lane_rule, sections, scaling, backward = inputs
        ctx.save_for_backward(positions, inv_freq)
        ctx.mode, ctx.sections, ctx.scaling = lane_rule, sections, scaling
        ctx.backward = backward
        remember_backend(ctx)

    @in_forward_backend
    def backward(ctx, grad_q, grad_k):
        positions, inv_freq = ctx.saved_tensors
        dq, dk = rope_positions(
            grad_q, grad_k, positions, inv_freq, ctx.mode, ctx.sections, ctx.scaling,
            not ctx.backward,
        )  # fmt: skip
        return dq, dk, None, None, None, None, None, None

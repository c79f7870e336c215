"""The attention ops: ``torch.ops.vlmkernels.attention_core`` (forward, differentiable in
q, k, v, through both outputs), ``attention_core_backward`` (its gradients),
``attention_delta`` (the backward's row term rowsum(dO O) - dlse, not differentiable: only
backward formulas call it), ``attention_key_mass`` (not differentiable) and
``attention_row_mass`` (the dense forward with one query row's key mass, differentiable as
attention_core through out and lse), one :class:`vlmkernels.core.op.Op` each with the
PyTorch and Triton implementations and the fake.

Arguments (the layouts of :mod:`.launchers`): q, k, v dense (B, H, L, D) or packed
(T, H, D) with int32 ``cu_seqlens_q`` / ``cu_seqlens_k``; ``key_keep`` an optional (B, Lk)
uint8 row (nonzero: visible); ``key_lo`` / ``key_hi`` optional (B, Lq) int32 key ranges
per query row; ``causal`` (bottom-right aligned; ignored with ranges); ``num_splits``
the forward's key splits (0: the heuristic :func:`.launchers.choose_splits`);
``key_bias`` an optional additive logit bias per key, dense (B, H, Lk) or (B, 1, Lk),
packed (H, Tk) or (1, Tk), differentiable. k and v may have fewer heads than q
(grouped-query attention: H a multiple of theirs). ``gate`` an optional tanh gate, one
element or (H, D): out = tanh(gate) * attention, in the forward kernel's epilogue; its
backward runs the ungated backward kernels on (c / sigma) V with upstream sigma dO, c =
tanh(g) and sigma a power of two near max |c| (dP = c dO V^T, as the gated forward's), and
gets dV and d gate from dV_s = sigma P^T dO: dV = (c / sigma) dV_s, d gate = (1 - c^2)
sum V dV_s / sigma (summed over what the gate broadcasts). In fp16, dq and dk at gates
below about 1e-4 carry the rounding of the gated output (subnormal there), from which
the backward's rowsum(dO * O) is taken. ``dropout_p`` in [0, 1): attention
dropout P' = P M / (1 - p) with the mask drawn in the kernels from ``dropout_seed`` (a
one-element int64 tensor, required when dropout_p > 0; see :mod:`.kernels`), regenerated
in the backward; dropout_p = 0 runs the kernels without dropout. Outputs:
out like q, lse fp32 (float64 for float64 inputs), (B, H, Lq) dense or (H, T) packed.
"""

from __future__ import annotations

import torch

from ...core.backend import in_forward_backend, remember_backend
from ...core.op import Op, as_saved, first_order_only
from . import launchers, reference

_ARGS = (
    "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, "
    "Tensor? key_keep, Tensor? key_lo, Tensor? key_hi, bool causal, float scale"
)

# the backward kernels' gradients are not differentiable themselves
_FIRST_ORDER = "attention / cross_attention / media_cross_attention (the attention kernels)"

attention_core = Op(
    "attention_core",
    f"(Tensor q, Tensor k, Tensor v, {_ARGS}, SymInt num_splits, Tensor? key_bias, Tensor? gate, "
    "float dropout_p, Tensor? dropout_seed) -> (Tensor, Tensor)",
    family="attention",
)
attention_core_backward = Op(
    "attention_core_backward",
    f"(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor lse, Tensor delta, {_ARGS}, "
    "Tensor? key_bias, float dropout_p, Tensor? dropout_seed) -> (Tensor, Tensor, Tensor, Tensor)",
    family="attention",
)
attention_delta = Op(
    "attention_delta",
    "(Tensor out, Tensor? grad_out, Tensor lse, Tensor? grad_lse) -> Tensor",
    family="attention",
)
attention_key_mass = Op(
    "attention_key_mass",
    "(Tensor q, Tensor k, Tensor lse, bool causal, float scale, SymInt row_first, "
    "SymInt row_last, float weight, Tensor? key_bias) -> Tensor",
    family="attention",
)
attention_row_mass = Op(
    "attention_row_mass",
    "(Tensor q, Tensor k, Tensor v, bool causal, float scale, Tensor? key_bias, SymInt row, "
    "float weight) -> (Tensor, Tensor, Tensor)",
    family="attention",
)


def _lse_shape(q, cu_q):
    if cu_q is not None:
        return (q.shape[1], q.shape[0])
    return (q.shape[0], q.shape[1], q.shape[2])


# ------------------------------------------------------------------------ attention_core


def _check_dropout(dropout_p, seed):
    if dropout_p and seed is None:
        raise ValueError(f"attention_core: dropout_p = {dropout_p} needs a dropout_seed")


@attention_core.impl("triton")
def _(q, k, v, cu_q, cu_k, max_lq, max_lk, keep, lo, hi, causal, scale, num_splits, bias,
      gate, dropout_p, seed):  # fmt: skip
    _check_dropout(dropout_p, seed)
    return launchers.forward(q, k, v, cu_q, cu_k, max_lq, max_lk, keep, lo, hi, causal, scale,
                             num_splits or None, bias, gate, dropout_p, seed)  # fmt: skip


@attention_core.impl("torch")
def _(q, k, v, cu_q, cu_k, max_lq, max_lk, keep, lo, hi, causal, scale, num_splits, bias,
      gate, dropout_p, seed):  # fmt: skip
    _check_dropout(dropout_p, seed)
    out, lse = reference.forward(q, k, v, cu_q, cu_k, max_lq, max_lk, keep, lo, hi, causal,
                                 scale, bias, gate, dropout_p, seed)  # fmt: skip
    return out.contiguous(), lse  # as the Triton implementation's and the fake's


@attention_core.fake
def _(q, k, v, cu_q, cu_k, max_lq, max_lk, keep, lo, hi, causal, scale, num_splits, bias,
      gate, dropout_p, seed):  # fmt: skip
    lse_dtype = reference.compute_dtype(q.dtype)
    # both implementations return a new contiguous output, whatever q's strides
    return q.new_empty(q.shape), q.new_empty(_lse_shape(q, cu_q), dtype=lse_dtype)


@attention_core.autograd
class _:
    def setup_context(ctx, inputs, output):
        (q, k, v, cu_q, cu_k, max_lq, max_lk, keep, lo, hi, causal, scale, _, bias, gate,
         dropout_p, seed) = inputs  # fmt: skip
        out, lse = output
        ctx.set_materialize_grads(False)
        ctx.options = (max_lq, max_lk, causal, scale, dropout_p)
        remember_backend(ctx)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, keep, lo, hi, bias, gate, seed)

    @first_order_only(_FIRST_ORDER)
    @in_forward_backend
    def backward(ctx, grad_out, grad_lse):
        return _core_backward(ctx, grad_out, grad_lse, ctx.needs_input_grad)


def _core_backward(ctx, grad_out, grad_lse, needs):
    """The gradients of attention_core's 17 arguments from those of (out, lse), with what
    its setup_context saved; ``needs`` says which of them are wanted, in its order
    (attention_row_mass saves the same and maps its own)."""
    q, k, v, out, lse, cu_q, cu_k, keep, lo, hi, bias, gate, seed = ctx.saved_tensors
    lse, cu_q, cu_k, keep, lo, hi = as_saved(lse, cu_q, cu_k, keep, lo, hi)
    if bias is not None and bias.stride(-1) != 1:  # as the forward took it (see as_saved)
        bias = bias.contiguous()
    max_lq, max_lk, causal, scale, dropout_p = ctx.options
    none = (None,) * 10
    if grad_out is None and grad_lse is None:
        return None, None, None, *none, None, None, None, None
    # rows without a visible key (lse -inf) or without an answer (NaN) add nothing
    delta = attention_delta(out, grad_out, lse, grad_lse)
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    args = (lse, delta, cu_q, cu_k, max_lq, max_lk, keep, lo, hi, causal, scale, bias,
            dropout_p, seed)  # fmt: skip
    dgate = None
    if gate is None:
        dq, dk, dv, db = attention_core_backward(grad_out, q, k, v, *args)
    else:
        dq, dk, dv, db, dgate = _gated_backward(grad_out, q, k, v, gate, args, needs[14])
    return (dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None,
            *none, db if bias is not None and needs[13] else None, dgate, None,
            None)  # fmt: skip


def _gated_backward(grad_out, q, k, v, gate, args, gate_grad):
    """(dq, dk, dv, dbias, dgate) of c * attention, c = tanh(gate), from the ungated backward
    on (c / sigma) V with upstream sigma dO (see the module docstring): the same dP = c dO V^T
    and delta, and dV_s = sigma P^T dO, so dV = (c / sigma) dV_s and the gate's sum(dO * PV)
    = sum(V * dV_s) / sigma. sigma is the power of two with |c| / sigma in [1, 2) (max |c|
    of a per-channel gate; 1 where c = 0): in 16 bits neither c V (a small gate, as
    Flamingo's at 0) nor P^T dO (c times eager's P^T (c dO)) leaves the normal range where
    eager's do not. A per-channel gate with grouped heads runs on k, v repeated per query
    head."""
    packed = args[2] is not None
    ct = args[0].dtype
    h, hk = q.shape[1], k.shape[1]
    vec = gate.numel() != 1
    ke, ve = (k, v) if not vec or hk == h else (reference._heads(k, h), reference._heads(v, h))
    c = reference.gate_factor(gate, packed, ct)
    mantissa, exponent = torch.frexp(c.abs().amax())
    sigma = torch.where(mantissa == 0, 1.0, torch.ldexp(torch.ones_like(mantissa), exponent - 1))
    ratio = c / sigma
    dq, dk, dvs, db = attention_core_backward(
        (grad_out.to(ct) * sigma).to(grad_out.dtype), q, ke, (ve.to(ct) * ratio).to(v.dtype),
        *args,
    )  # fmt: skip
    dvs = dvs.to(ct)
    dv = torch.where(c == 0, 0.0, dvs * ratio)  # 0, not 0 * inf, at a closed gate
    dk, dv = reference._group_sum(dk, k.shape[1]), reference._group_sum(dv, k.shape[1])
    dgate = None
    if gate_grad:
        prod = ve.to(ct) * (dvs / sigma)
        if vec:
            total = prod.sum(0) if packed else prod.sum((0, 2))
        else:
            total = prod.sum()
        tc = torch.tanh(gate.to(ct))
        dgate = ((1 - tc * tc) * total.reshape(gate.shape)).to(gate.dtype)
    return dq, dk.to(k.dtype), dv.to(v.dtype), db, dgate


# ---------------------------------------------------------------- attention_core_backward


def _bias_grad(db, bias, q):
    if bias is None:
        return q.new_empty(0)
    return reference.reduce_bias_grad(db, bias)


@attention_core_backward.impl("triton")
def _(do, q, k, v, lse, delta, cu_q, cu_k, max_lq, max_lk, keep, lo, hi, causal, scale, bias,
      dropout_p, seed):  # fmt: skip
    _check_dropout(dropout_p, seed)
    dq, dk, dv, db = launchers.backward(do, q, k, v, lse, delta, cu_q, cu_k, max_lq, max_lk,
                                        keep, lo, hi, causal, scale, bias, dropout_p,
                                        seed)  # fmt: skip
    return dq, dk, dv, _bias_grad(db, bias, q)


@attention_core_backward.impl("torch")
def _(do, q, k, v, lse, delta, cu_q, cu_k, max_lq, max_lk, keep, lo, hi, causal, scale, bias,
      dropout_p, seed):  # fmt: skip
    _check_dropout(dropout_p, seed)
    dq, dk, dv, db = reference.backward(do, q, k, v, lse, delta, cu_q, cu_k, max_lq, max_lk,
                                        keep, lo, hi, causal, scale, bias, dropout_p,
                                        seed)  # fmt: skip
    # contiguous, as the Triton implementation's and the fake's
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), _bias_grad(db, bias, q)


@attention_core_backward.fake
def _(do, q, k, v, lse, delta, cu_q, cu_k, max_lq, max_lk, keep, lo, hi, causal, scale, bias,
      dropout_p, seed):  # fmt: skip
    db = q.new_empty(0) if bias is None else torch.empty_like(bias)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), db


# ------------------------------------------------------------------------ attention_delta


@attention_delta.impl("triton")
def _(out, grad_out, lse, grad_lse):
    """rowsum(dO * O) - dlse per query row, laid out as lse, 0 where lse is not finite."""
    return launchers.delta(out, grad_out, lse, grad_lse)


@attention_delta.impl("torch")
def _(out, grad_out, lse, grad_lse):
    return reference.delta(out, grad_out, lse, grad_lse)


@attention_delta.fake
def _(out, grad_out, lse, grad_lse):
    return lse.new_empty(lse.shape)


# --------------------------------------------------------------------- attention_key_mass


@attention_key_mass.impl("triton")
def _(q, k, lse, causal, scale, row_first, row_last, weight, bias):
    return launchers.key_mass(q, k, lse, causal, scale, row_first, row_last, weight, bias)


@attention_key_mass.impl("torch")
def _(q, k, lse, causal, scale, row_first, row_last, weight, bias):
    return reference.key_mass(q, k, lse, causal, scale, row_first, row_last, weight, bias)


@attention_key_mass.fake
def _(q, k, lse, causal, scale, row_first, row_last, weight, bias):
    dtype = reference.compute_dtype(q.dtype)
    return q.new_empty((q.shape[0], q.shape[1], k.shape[2]), dtype=dtype)


# --------------------------------------------------------------------- attention_row_mass


@attention_row_mass.impl("triton")
def _(q, k, v, causal, scale, bias, row, weight):
    return launchers.forward_row_mass(q, k, v, causal, scale, row, weight, bias)


@attention_row_mass.impl("torch")
def _(q, k, v, causal, scale, bias, row, weight):
    lq, lk = q.shape[2], k.shape[2]
    out, lse = reference.forward(q, k, v, None, None, lq, lk, None, None, None, causal, scale,
                                 bias)  # fmt: skip
    mass = reference.key_mass(q, k, lse, causal, scale, row, row + 1, weight, bias).sum(1)
    return out.contiguous(), lse, mass


@attention_row_mass.fake
def _(q, k, v, causal, scale, bias, row, weight):
    dtype = reference.compute_dtype(q.dtype)
    return (q.new_empty(q.shape), q.new_empty(_lse_shape(q, None), dtype=dtype),
            q.new_empty((q.shape[0], k.shape[2]), dtype=dtype))  # fmt: skip


@attention_row_mass.autograd
class _:
    """Differentiable through out and lse as attention_core (the same saved tensors and
    backward); the mass is marked non-differentiable (it never requires grad, so nothing
    can send it a gradient to drop)."""

    def setup_context(ctx, inputs, output):
        q, k, v, causal, scale, bias, _, _ = inputs
        out, lse, mass = output
        ctx.mark_non_differentiable(mass)
        ctx.set_materialize_grads(False)
        ctx.options = (q.shape[2], k.shape[2], causal, scale, 0.0)
        remember_backend(ctx)
        ctx.save_for_backward(q, k, v, out, lse, None, None, None, None, None, bias, None, None)

    @first_order_only(_FIRST_ORDER)
    @in_forward_backend
    def backward(ctx, grad_out, grad_lse, _grad_mass):
        nq, nk, nv, _, _, nb, _, _ = ctx.needs_input_grad
        needs = (nq, nk, nv, *(False,) * 10, nb, False, False, False)
        grads = _core_backward(ctx, grad_out, grad_lse, needs)
        return grads[0], grads[1], grads[2], None, None, grads[13], None, None

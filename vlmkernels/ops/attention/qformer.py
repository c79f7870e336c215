r"""The fused pieces of BLIP-2's Q-Former (and InstructBLIP's): one GEMM for the image
features' K / V projections of every cross-attention layer, and bias + residual + LayerNorm
for its output blocks (BERT's ``SelfOutput`` / ``Output``: LayerNorm(dense(h) + residual)).

Batched K / V (:func:`stacked_kv`): for image features X (B, N, E) and the cross layers
l = 1..L with key / value projections (W_k^l, b_k^l), (W_v^l, b_v^l) (each (H D, E)):

    KV = X [W_k^1; W_v^1; ...; W_k^L; W_v^L]^T + [b_k^1; b_v^1; ...]     (B, N, 2 L H D)

one (B N x E) @ (E x 2 L H D) GEMM instead of 2 L. Layer l's K and V are strided views
(B, H, N, D) of KV. The stacked weight is a ``torch.cat`` of the layers' parameters, so
autograd hands every layer its own weight and bias gradients (dW = dKV^T X, split by
rows) and X gets one dX = dKV W. It is built on every call, with or without gradients: a
cached copy would miss in-place updates PyTorch does not count (through ``.data``).

Bias + residual + LayerNorm (:func:`add_layernorm`), rows of N features, fp32 statistics:

    z = x + c + r,  y = (z - mean(z)) / sqrt(var(z) + eps) * w + b

(x the dense output without its bias c, r the residual; y in x's dtype). Backward:
dz = rstd (g - mean(g) - zhat mean(g zhat)) with g = dy w, dx = dr = dz, dc = sum_rows dz,
dw = sum_rows dy zhat, db = sum_rows dy. Op ``vlmkernels::qformer_add_layernorm`` takes
the (..., N) tensors and flattens their rows inside (views made before it would reach
autograd, and would give two leaves one .grad buffer; see the backward). Triton kernels
in :mod:`.layernorm_kernels`; the PyTorch path computes in fp32, float64 in float64.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from ...core.backend import in_forward_backend, remember_backend
from ...core.checks import check_real
from ...core.op import Op, as_saved, first_order_only
from . import layernorm_kernels

__all__ = ["add_layernorm", "add_layernorm_unchecked", "qformer_add_layernorm",
           "stacked_kv"]  # fmt: skip

FAMILY = "attention"

qformer_add_layernorm = Op(
    "qformer_add_layernorm",
    "(Tensor x, Tensor? x_bias, Tensor residual, Tensor weight, Tensor bias, float eps) "
    "-> (Tensor, Tensor, Tensor)",
    family=FAMILY,
)
qformer_add_layernorm_backward = Op(
    "qformer_add_layernorm_backward",
    "(Tensor grad, Tensor x, Tensor? x_bias, Tensor residual, Tensor weight, Tensor mean, "
    "Tensor rstd) -> (Tensor, Tensor, Tensor)",
    family=FAMILY,
)


def _rows(t):
    """(M, N) rows of a (..., N) tensor (a view where its strides allow)."""
    return t.reshape(-1, t.shape[-1])


def _z(x, c, r):
    x, r = _rows(x), _rows(r)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    z = x.to(compute) + r.to(compute)
    return z + c.to(compute) if c is not None else z


@qformer_add_layernorm.impl("torch")
def _(x, c, r, w, b, eps):
    z = _z(x, c, r)
    y, mean, rstd = torch.native_layer_norm(z, [z.shape[1]], w.to(z.dtype), b.to(z.dtype), eps)
    return y.to(x.dtype).view(x.shape), mean.view(-1), rstd.view(-1)  # fp32 (f64 for f64)


@qformer_add_layernorm.impl("triton")
def _(x, c, r, w, b, eps):
    y, mean, rstd = layernorm_kernels.add_layernorm_forward(_rows(x), c, _rows(r), w, b, eps)
    return y.view(x.shape), mean, rstd


def _stat_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@qformer_add_layernorm.fake
def _(x, c, r, w, b, eps):
    m, stat = math.prod(x.shape[:-1]), _stat_dtype(x)
    return x.new_empty(x.shape), x.new_empty(m, dtype=stat), x.new_empty(m, dtype=stat)


@qformer_add_layernorm_backward.impl("torch")
def _(grad, x, c, r, w, mean, rstd):
    z = _z(x, c, r)
    stats = (mean.to(z.dtype)[:, None], rstd.to(z.dtype)[:, None])
    dz, dw, db = torch.ops.aten.native_layer_norm_backward(
        _rows(grad).to(z.dtype), z, [z.shape[1]], *stats, w.to(z.dtype), w.to(z.dtype),
        [True, True, True],
    )  # fmt: skip
    return dz.to(x.dtype).view(x.shape), dw, db


@qformer_add_layernorm_backward.impl("triton")
def _(grad, x, c, r, w, mean, rstd):
    dz, dw, db = layernorm_kernels.add_layernorm_backward(_rows(grad), _rows(x), c, _rows(r), w,
                                                          mean, rstd)  # fmt: skip
    return dz.view(x.shape), dw, db


@qformer_add_layernorm_backward.fake
def _(grad, x, c, r, w, mean, rstd):
    stat, n = _stat_dtype(x), x.shape[-1]
    return x.new_empty(x.shape), x.new_empty(n, dtype=stat), x.new_empty(n, dtype=stat)


@qformer_add_layernorm.autograd
class _:
    def setup_context(ctx, inputs, output):
        x, c, r, w, b, eps = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, c, r, w, mean, rstd)
        ctx.dtypes = (w.dtype, b.dtype, None if c is None else c.dtype)
        ctx.mark_non_differentiable(mean, rstd)  # the backward's statistics
        ctx.set_materialize_grads(False)
        remember_backend(ctx)

    @first_order_only("qformer_add_layernorm (the Q-Former's bias + residual + LayerNorm)")
    @in_forward_backend
    def backward(ctx, grad, _g_mean, _g_rstd):
        if grad is None:
            return (None,) * 6
        x, c, r, w, mean, rstd = ctx.saved_tensors
        mean, rstd = as_saved(mean, rstd)
        need = ctx.needs_input_grad
        dz, dw, db = qformer_add_layernorm_backward(grad, x, c, r, w, mean, rstd)
        wd, bd, cd = ctx.dtypes
        dc = _rows(dz).sum(0, dtype=_stat_dtype(dz)).to(cd) if need[1] else None
        # the same tensor for x and the residual, as an addition's backward returns:
        # where both are leaves autograd copies it for one of them (views of it, one per
        # input, would each become a leaf's .grad, one buffer, and a later accumulation
        # into one would reach the other)
        return (dz if need[0] else None, dc, dz if need[2] else None,
                dw.to(wd) if need[3] else None, db.to(bd) if need[4] else None, None)  # fmt: skip


_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _describe(t) -> str:
    return f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}"


def add_layernorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor, *, x_bias: torch.Tensor | None = None,
                  eps: float = 1e-12) -> torch.Tensor:  # fmt: skip
    """LayerNorm(x + x_bias + residual) over the last dim, fp32 statistics.

    Args:
        x: (..., N) the dense output without its bias; float16 / bfloat16 / float32 /
            float64, any strides.
        residual: same shape and dtype as ``x``.
        weight, bias: (N,) the LayerNorm's affine parameters (any float dtype).
        x_bias: optional (N,) bias added to ``x`` (the dense layer's).
        eps: added to the variance.

    Returns:
        (..., N) in ``x``'s dtype. Differentiable in every tensor argument.
    """
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOATS or x.dim() < 1:
        raise TypeError(f"add_layernorm: x must be a floating tensor (..., N), got {_describe(x)}")
    n = x.shape[-1]
    if not isinstance(residual, torch.Tensor) or residual.shape != x.shape:
        raise ValueError(f"add_layernorm: residual must have x's shape {tuple(x.shape)}, got "
                         f"{tuple(getattr(residual, 'shape', ()))}")  # fmt: skip
    if residual.dtype != x.dtype:
        raise TypeError(f"add_layernorm: residual must have x's dtype {x.dtype}, got "
                        f"{residual.dtype}")  # fmt: skip
    for name, t in (("weight", weight), ("bias", bias), ("x_bias", x_bias)):
        if t is None and name == "x_bias":
            continue
        if not isinstance(t, torch.Tensor) or t.shape != (n,) or t.dtype not in _FLOATS:
            raise ValueError(
                f"add_layernorm: {name} must be a floating ({n},) tensor, got {_describe(t)}"
            )
    for name, t in (("residual", residual), ("weight", weight), ("bias", bias),
                    ("x_bias", x_bias)):  # fmt: skip
        if t is not None and t.device != x.device:
            raise ValueError(f"add_layernorm: {name} is on {t.device}, x on {x.device}")
    eps = check_real("add_layernorm", "eps", eps, 0.0, math.inf)
    return add_layernorm_unchecked(x, residual, weight, bias, x_bias, eps)


def add_layernorm_unchecked(x, residual, weight, bias, x_bias, eps: float) -> torch.Tensor:
    """:func:`add_layernorm` without its argument checks (about 15 us of host time), for
    callers whose arguments are valid by construction (the patched Q-Former's output
    blocks: a Linear's output, its residual, a LayerNorm's parameters)."""
    return qformer_add_layernorm(x, x_bias, residual, weight, bias, eps)[0]


def stacked_kv(states: torch.Tensor, linears) -> list:
    """The outputs of ``linears`` (each (F_i x E) ``nn.Linear``) on ``states`` (..., E) from
    one GEMM: the list of (..., F_i) column slices of ``states @ cat(W_i)^T + cat(b_i)``.

    The weights are concatenated on every call (in the graph where a gradient is needed:
    each linear gets its own). A stack kept between calls would miss in-place updates that
    PyTorch does not count (through ``.data``, as momentum and EMA code does) and replay
    stale weights; the copy costs twice the weights' bytes, small next to the GEMM.
    A linear without a bias adds zeros where the others add theirs.
    """
    linears = list(linears)
    if not linears:
        return []
    e = states.shape[-1]
    for i, lin in enumerate(linears):
        if lin.weight.dim() != 2 or lin.weight.shape[1] != e:
            raise ValueError(f"stacked_kv: linears[{i}] takes {lin.weight.shape[-1]} features,"
                             f" states have {e}")  # fmt: skip
    w = torch.cat([lin.weight for lin in linears])
    b = None
    if any(lin.bias is not None for lin in linears):  # zeros for a linear without one
        b = torch.cat([lin.bias if lin.bias is not None else lin.weight.new_zeros(len(lin.weight))
                       for lin in linears])  # fmt: skip
    out = F.linear(states, w, b)
    return list(out.split_with_sizes([lin.weight.shape[0] for lin in linears], -1))

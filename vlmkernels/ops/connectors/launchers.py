"""Launchers of the connector family's Triton kernels (:mod:`.kernels`): the merge
addressing of x, the generic GEMM launch, and the connector's forward and backward passes
built from them.

A connector here is, for features x viewed as a (B, H, W, C) grid and a merge (MH, MW):

    X = merge(x)                       (M, K) = (B H W / (MH MW), MH MW C), never stored
    Xn = norm(X)                       LayerNorm / RMSNorm of X's rows, or of each patch
    h = Xn W1^T + b1
    y = act(h) W2^T + b2 + residual    (or y = h + residual with one linear)
"""

from __future__ import annotations

import dataclasses

import torch

from ...core.runtime import (
    cdiv,
    contiguous_vectors,
    device_guard,
    dot_precision,
    next_pow2,
    sm_count,
)
from . import kernels as K
from . import reference
from .kernels import (
    ACT_GELU,
    ACT_GELU_GRAD,
    ACT_NONE,
    ACT_SWIGLU,
    ACT_SWIGLU_GRAD,
    NO_NORM,
    RMS_NORM,
    X_A,
)

__all__ = [
    "Addressing",
    "XOperand",
    "backward",
    "bias_grad",
    "deepstack",
    "first_linear",
    "fold_norm",
    "forward",
    "gemm",
    "norm_stats",
    "normalize",
    "pooled_backward",
    "pooled_forward",
    "shuffle",
    "stat_rows",
]


@dataclasses.dataclass(frozen=True)
class Addressing:
    """X = merge(x) for x (B, H, W, C) with any strides and the merge (MH, MW): the kernel
    arguments (HWo, Wo, H, W, C, MH, MW, sb, sh, sw, sc) and whether the plain path
    (``gather`` False: X[m, k] at m * sb + k * sc) applies."""

    B: int
    H: int
    W: int
    C: int
    MH: int
    MW: int
    strides: tuple[int, int, int, int]
    gather: bool

    @classmethod
    def of(cls, x: torch.Tensor, merge=(1, 1)) -> Addressing:
        b, h, w, c = x.shape
        mh, mw = merge
        sb, sh, sw, sc = x.stride()
        if mh == 1 and mw == 1:
            # rows (b, h, w) with one stride: the plain path
            row = _row_stride((b, h, w), (sb, sh, sw))
            if row is not None:
                return cls(b * h * w, 1, 1, c, 1, 1, (row, 0, 0, sc), False)
        return cls(b, h, w, c, mh, mw, (sb, sh, sw, sc), True)

    @property
    def M(self) -> int:
        return self.B * (self.H // self.MH) * (self.W // self.MW)

    @property
    def K(self) -> int:
        return self.MH * self.MW * self.C

    def args(self, strides=None) -> tuple:
        ho, wo = self.H // self.MH, self.W // self.MW
        return (ho * wo, wo, self.H, self.W, self.C, self.MH, self.MW,
                *(self.strides if strides is None else strides))  # fmt: skip

    def strides_of(self, t: torch.Tensor) -> tuple[int, int, int, int]:
        """The strides of ``t`` (x's shape, other strides) in this addressing's form."""
        if self.gather:
            return tuple(t.stride())
        return (_row_stride(t.shape[:3], t.stride()[:3]), 0, 0, t.stride(3))

    def like(self, t: torch.Tensor) -> Addressing:
        """This addressing over ``t`` (x's shape) instead of x."""
        return dataclasses.replace(self, strides=self.strides_of(t))

    def patches(self) -> Addressing:
        """The source patches as X's rows: the (1, 1) merge of the same grid."""
        return dataclasses.replace(self, MH=1, MW=1)


def _row_stride(sizes, strides):
    """The single stride of the rows (b, h, w), or None where they have none."""
    step = None
    for size, stride in zip(reversed(sizes), reversed(strides), strict=True):
        if size == 1:
            continue
        if step is None:
            step, reach = stride, stride * size
        elif stride != reach:
            return None
        else:
            reach = stride * size
    return 0 if step is None else step


def stat_rows(grid: Addressing, per_patch: bool) -> int:
    """Rows of the norm statistics: source patches (B H W), or X's rows (M)."""
    return grid.B * grid.H * grid.W if per_patch else grid.M


def norm_stats(x, grid: Addressing, norm: int, per_patch: bool, eps: float):
    """(mean, rstd), fp32, per source patch or per row of X."""
    rows = stat_rows(grid, per_patch)
    mean = torch.empty(rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    if per_patch:
        if grid.gather:
            g = grid.patches()
            args, gather, length = g.args(), True, g.C
        else:  # already plain rows
            args, gather, length = grid.args(), False, grid.C
    else:
        args, gather, length = grid.args(), grid.gather, grid.K
    with device_guard(x):
        K._norm_stats_kernel[lambda meta: (cdiv(rows, meta["BR"]),)](
            x, mean, rstd, rows, length, float(eps), *args,
            GATHER=gather, RMS=norm == RMS_NORM,
        )  # fmt: skip
    return mean, rstd


@dataclasses.dataclass
class XOperand:
    """X as a GEMM operand: x, its addressing, and the norm prologue."""

    x: torch.Tensor
    grid: Addressing
    norm: int = NO_NORM
    per_patch: bool = False
    mean: torch.Tensor | None = None
    rstd: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None


def gemm(out, M, N, Kdim, *, a=None, a_strides=(0, 0), b=None, b_strides=(0, 0),
         xop: XOperand | None = None, side=0, bias=None, act=ACT_NONE, aux=None,
         aux2=None, residual=None, scatter: Addressing | None = None,
         colsum=None):  # fmt: skip
    """out (M, N) = epilogue(A @ B) (see :func:`.kernels._gemm_kernel`) for A ``a`` (strides
    (m, k)), or ``xop`` where ``side`` is X_A, and B ``b`` (strides (k, n)). With
    ``colsum`` (A = X with a norm), B is the norm-folded weight of :func:`fold_norm`."""
    first = xop.x if side == X_A else a
    dot_fp32, precision = dot_precision(first.dtype)
    if xop is None:
        xop = XOperand(out, Addressing(M, 1, 1, N, 1, 1, (0, 0, 0, 0), False))
    grid = scatter if scatter is not None else xop.grid
    scatter_strides = scatter.strides if scatter is not None else (0, 0, 0, 0)
    stand_in = out
    aux_strides = aux.stride() if aux is not None else (0, 0)
    res_strides = residual.stride() if residual is not None else (0, 0)
    out_strides = out.stride() if scatter is None else (0, 0)
    kernel = K._gemm_dh_kernel if act in (ACT_GELU_GRAD, ACT_SWIGLU_GRAD) else K._gemm_kernel
    with device_guard(out):
        kernel[lambda meta: (cdiv(M, meta["BM"]) * cdiv(N, meta["BN"]),)](
            a if a is not None else stand_in, b if b is not None else stand_in, out,
            xop.x, _or(xop.mean, stand_in), _or(xop.rstd, stand_in), _or(xop.weight, stand_in),
            _or(xop.bias, stand_in), _or(bias, stand_in), _or(aux, stand_in),
            _or(aux2, stand_in), _or(residual, stand_in), _or(colsum, stand_in),
            M, N, Kdim, next_pow2(M),
            *a_strides, *b_strides, *out_strides, *aux_strides, *res_strides,
            *grid.args(), *scatter_strides,
            XSIDE=side, GATHER=grid.gather, NORM=xop.norm if side else NO_NORM,
            PER_PATCH=xop.per_patch, NORM_BIAS=xop.bias is not None, FOLD=colsum is not None,
            SCATTER=scatter is not None,
            BIAS=bias is not None, ACT=act,
            STORE_AUX=act in (ACT_GELU, ACT_SWIGLU) and aux is not None,
            STORE_AUX2=aux2 is not None, RESIDUAL=residual is not None,
            DOT_FP32=dot_fp32, INPUT_PRECISION=precision,
        )  # fmt: skip
    return out


def fold_norm(w, b, xop: XOperand):
    """(Wf (N, K) in w's dtype, colsum (N, S) fp32, bias (N,) fp32 or None): the linear
    ``w``, ``b`` with ``xop``'s norm weight and bias folded in (:func:`.kernels.
    _norm_fold_kernel`), S the norm's segments per row of X (MH MW per patch, else 1)."""
    n, k = w.shape
    segments = xop.grid.MH * xop.grid.MW if xop.per_patch else 1
    wf = torch.empty((n, k), dtype=w.dtype, device=w.device)
    colsum = torch.empty((n, segments), dtype=torch.float32, device=w.device)
    has_bias = b is not None or xop.bias is not None
    bias = torch.empty(n, dtype=torch.float32, device=w.device) if has_bias else colsum
    ones = xop.weight if xop.weight is not None else w.new_ones(k // segments)
    with device_guard(w):
        K._norm_fold_kernel[lambda meta: (cdiv(n, meta["BR"]),)](
            w, ones, _or(xop.bias, w), _or(b, w), wf, colsum, bias, n, k, segments,
            *w.stride(), NORM_BIAS=xop.bias is not None, BIAS=b is not None,
        )  # fmt: skip
    return wf, colsum, bias if has_bias else None


def first_linear(out, xop: XOperand, w, b, act=ACT_NONE, aux=None, residual=None):
    """out (M, N) = act(norm(X) W^T + b) (+ residual), the pre-activation into ``aux``
    (SwiGLU: out (M, N / 2), :func:`.kernels._gemm_kernel`).
    With 16-bit inputs and a norm, the norm is folded into the GEMM (:func:`fold_norm`:
    raw X is read, the statistics scale the accumulator); fp32 inputs normalise X in the
    GEMM's prologue, which keeps fp32 accuracy (the fold's P - mu colsum cancels)."""
    M, Kdim = xop.grid.M, xop.grid.K
    if xop.norm != NO_NORM and xop.x.dtype != torch.float32:
        wf, colsum, bias = fold_norm(w, b, xop)
        return gemm(out, M, w.shape[0], Kdim, b=wf, b_strides=(1, Kdim), xop=xop, side=X_A,
                    bias=bias, act=act, aux=aux, residual=residual, colsum=colsum)  # fmt: skip
    return gemm(out, M, w.shape[0], Kdim, b=w, b_strides=(w.stride(1), w.stride(0)), xop=xop,
                side=X_A, bias=b, act=act, aux=aux, residual=residual)  # fmt: skip


def bias_grad(grad: torch.Tensor) -> torch.Tensor:
    """sum_m grad[m, n] in fp32, a pass of its own: as a row sum of the weight gradient's A
    operand it cost 51 of 146 instructions per k-step of that GEMM (sm_90a, bf16, 128 x 128
    x 32), where the pass reads grad once (~13 us for the Qwen2.5-VL merger's 5476 x 5120
    on an H200's 4.3 TB/s)."""
    return grad.sum(0, dtype=torch.float32)


def _or(t, default):
    return t if t is not None else default


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0)


def forward(x, merge, w1, b1, w2, b2, norm_weight, norm_bias, residual, norm: int,
            per_patch: bool, eps: float, act: int, save: bool):  # fmt: skip
    """(y (M, N_out), saved pre-activation (M, N1) or empty, mean, rstd) of the connector
    on x (B, H, W, C)."""
    b1, b2, norm_weight, norm_bias = contiguous_vectors(b1, b2, norm_weight, norm_bias)
    grid = Addressing.of(x, merge)
    M = grid.M
    if norm != NO_NORM:
        mean, rstd = norm_stats(x, grid, norm, per_patch, eps)
    else:
        mean, rstd = (x.new_empty(0, dtype=torch.float32) for _ in range(2))
    xop = XOperand(x, grid, norm, per_patch, mean, rstd, norm_weight, norm_bias)
    n1 = w1.shape[0]
    two = w2 is not None
    gated = two and act == ACT_SWIGLU
    out1 = torch.empty((M, n1 // 2 if gated else n1), dtype=x.dtype, device=x.device)
    keep_pre = save and two and act in (ACT_GELU, ACT_SWIGLU)
    pre = torch.empty((M, n1), dtype=x.dtype, device=x.device) if keep_pre else None
    first_linear(
        out1,
        xop,
        w1,
        b1,
        act=act if two else ACT_NONE,
        aux=pre,
        residual=None if two else _rows(residual, M),
    )
    if not two:
        return out1, _empty(x), mean, rstd
    n2 = w2.shape[0]
    y = torch.empty((M, n2), dtype=x.dtype, device=x.device)
    gemm(y, M, n2, out1.shape[1], a=out1, a_strides=out1.stride(), b=w2,
         b_strides=(w2.stride(1), w2.stride(0)), bias=b2, residual=_rows(residual, M))  # fmt: skip
    saved = pre if keep_pre else (out1 if save else _empty(x))
    return y, saved, mean, rstd


def _rows(t, M):
    return None if t is None else t.reshape(M, t.shape[-1])


def backward(grad, x, merge, w1, b1, w2, norm_weight, norm_bias, saved, mean, rstd,
             norm: int, per_patch: bool, act: int, needs):  # fmt: skip
    """(dx, dw1, db1, dw2, db2, dnorm_weight, dnorm_bias); an entry whose ``needs`` is
    False is None. ``saved`` is the forward's pre-activation h = norm(X) W1^T + b1, or empty
    when the forward did not keep it (it is then recomputed here)."""
    need_x, need_w1, need_b1, need_w2, need_b2, need_nw, need_nb = needs
    b1, norm_weight, norm_bias = contiguous_vectors(b1, norm_weight, norm_bias)
    grid = Addressing.of(x, merge)
    M, Kdim = grid.M, grid.K
    dev, dt = x.device, x.dtype
    grad = grad.reshape(M, grad.shape[-1])
    xop = XOperand(x, grid, norm, per_patch, mean, rstd, norm_weight, norm_bias)
    dw2 = db2 = None
    if w2 is not None and saved.numel() == 0:
        # the forward kept only its inputs: recompute the first linear's output
        saved = torch.empty((M, w1.shape[0]), dtype=dt, device=dev)
        first_linear(saved, xop, w1, b1)
    if w2 is not None:
        n2, n_in = w2.shape  # n_in: w1's outputs, half of them with SwiGLU
        dh = torch.empty((M, w1.shape[0]), dtype=dt, device=dev)
        activation = None
        if act in (ACT_GELU, ACT_SWIGLU):
            grad_act = ACT_GELU_GRAD if act == ACT_GELU else ACT_SWIGLU_GRAD
            activation = torch.empty((M, n_in), dtype=dt, device=dev) if need_w2 else None
            gemm(dh, M, n_in, n2, a=grad, a_strides=grad.stride(), b=w2, b_strides=w2.stride(),
                 act=grad_act, aux=saved, aux2=activation)  # fmt: skip
        else:
            gemm(dh, M, n_in, n2, a=grad, a_strides=grad.stride(), b=w2, b_strides=w2.stride())
            activation = saved
        if need_w2:
            dw2 = torch.empty_like(w2)
            gemm(dw2, n2, n_in, M, a=grad, a_strides=(grad.stride(1), grad.stride(0)),
                 b=activation, b_strides=activation.stride())  # fmt: skip
        db2 = bias_grad(grad) if need_b2 else None
        g1 = dh
    else:
        g1 = grad
    n1 = w1.shape[0]
    dw1 = db1 = None
    if need_w1:
        dw1 = torch.empty_like(w1)
        # X stored once, then a plain GEMM: as the GEMM's B, the merge addressing and the
        # norm would cost a row division and per-element statistics every k-step (sm_90a:
        # 545 instructions per k-step with the per-patch LayerNorm, 146 plain)
        if norm != NO_NORM:
            xb = normalize(xop)
        elif grid.gather:
            xb = shuffle(x, merge)
        else:
            xb = x.as_strided((M, Kdim), (grid.strides[0], grid.strides[3]))
        gemm(dw1, n1, Kdim, M, a=g1, a_strides=(g1.stride(1), g1.stride(0)), b=xb,
             b_strides=xb.stride())  # fmt: skip
        del xb
    db1 = bias_grad(g1) if need_b1 else None
    dx = dnw = dnb = None
    if need_x or need_nw or need_nb:
        dx = torch.empty(x.shape, dtype=dt, device=dev)
        if norm == NO_NORM:
            gemm(
                dx,
                M,
                Kdim,
                n1,
                a=g1,
                a_strides=g1.stride(),
                b=w1,
                b_strides=w1.stride(),
                scatter=grid.like(dx),
            )
        else:
            gx = torch.empty((M, Kdim), dtype=dt, device=dev)
            gemm(gx, M, Kdim, n1, a=g1, a_strides=g1.stride(), b=w1, b_strides=w1.stride())
            dnw, dnb = _norm_backward(gx, x, dx, grid, mean, rstd, norm_weight, norm, per_patch,
                                      need_nw or need_nb, need_nb)  # fmt: skip
    cast = [None if t is None else t.to(ref.dtype) if ref is not None else t
            for t, ref in ((db1, b1), (db2, w2), (dnw, norm_weight), (dnb, norm_bias))]  # fmt: skip
    db1, db2, dnw, dnb = cast
    return dx, dw1, db1, dw2, db2, dnw, dnb


def _pooled_first_linear(x, w1, b1, act, pre=None):
    """(M, N1): act(x W1^T + b1) for x (B, H, W, K) (the pre-activation into ``pre``)."""
    grid = Addressing.of(x)
    out = torch.empty((grid.M, w1.shape[0]), dtype=x.dtype, device=x.device)
    return first_linear(out, XOperand(x, grid), w1, b1, act=act, aux=pre)


def pooled_forward(x, w1, b1, w2, b2, size, mode: int, save: bool):
    """(y (B h w, N2), pre-activation (B H W, N1) or empty) of the pooled projector
    y = pool(GELU(x W1^T + b1)) W2^T + b2 on x (B, H, W, K): the first GEMM with its GELU
    epilogue, the pooling (:func:`.reference.pool`), the second GEMM on the pooled rows."""
    b1, b2 = contiguous_vectors(b1, b2)
    b, h, w, _ = x.shape
    n1 = w1.shape[0]
    pre = torch.empty((b * h * w, n1), dtype=x.dtype, device=x.device) if save else None
    a = _pooled_first_linear(x, w1, b1, ACT_GELU, pre)
    p = reference.pool(a.view(b, h, w, n1), size, mode).view(-1, n1)
    y = torch.empty((p.shape[0], w2.shape[0]), dtype=x.dtype, device=x.device)
    gemm(y, p.shape[0], w2.shape[0], n1, a=p, a_strides=p.stride(), b=w2,
         b_strides=(w2.stride(1), w2.stride(0)), bias=b2)  # fmt: skip
    return y, pre if save else _empty(x)


def pooled_backward(grad, x, w1, b1, w2, saved, size, mode: int, needs):
    """(dx, dw1, db1, dw2, db2) of :func:`pooled_forward` (None where ``needs`` is False):
    h (and GELU(h)) from ``saved`` or recomputed by one GEMM, dW2 = g^T pool(GELU(h)),
    db2 = sum_m g (:func:`bias_grad`), dp = g W2 on the pooled rows, dh = pool^T(dp)
    GELU'(h) (aten's pooling adjoint and gelu_backward: two passes over the M x N1 rows,
    16-bit inputs rounded after each), then the first linear's backward (:func:`backward`
    with no second linear)."""
    need_x, need_w1, need_b1, need_w2, need_b2 = needs
    (b1,) = contiguous_vectors(b1)
    b, h, w, _ = x.shape
    n2, n1 = w2.shape
    grad = grad.reshape(-1, n2)
    mp = grad.shape[0]
    if saved.numel() == 0 and need_w2:
        saved = torch.empty((b * h * w, n1), dtype=x.dtype, device=x.device)
        a = _pooled_first_linear(x, w1, b1, ACT_GELU, saved)
    elif saved.numel() == 0:
        saved = _pooled_first_linear(x, w1, b1, ACT_NONE)
    elif need_w2:
        a = torch.nn.functional.gelu(saved)  # stored h: GELU(h) for pool(a) only
    dw2 = db2 = None
    if need_w2:
        p = reference.pool(a.view(b, h, w, n1), size, mode).view(-1, n1)
        dw2 = torch.empty_like(w2)
        gemm(dw2, n2, n1, mp, a=grad, a_strides=(grad.stride(1), grad.stride(0)), b=p,
             b_strides=p.stride())  # fmt: skip
    db2 = bias_grad(grad) if need_b2 else None
    dx = dw1 = db1 = None
    if need_x or need_w1 or need_b1:
        dp = torch.empty((mp, n1), dtype=x.dtype, device=x.device)
        gemm(dp, mp, n1, n2, a=grad, a_strides=grad.stride(), b=w2, b_strides=w2.stride())
        da = reference.pool_adjoint(dp.view(b, size[0], size[1], n1), (h, w), mode)
        dh = reference.gelu_backward(da, saved.view(b, h, w, n1)).reshape(-1, n1)
        empty = x.new_empty(0, dtype=torch.float32)
        first = (need_x, need_w1, need_b1, False, False, False, False)
        dx, dw1, db1 = backward(dh, x, (1, 1), w1, b1, None, None, None, empty, empty, empty,
                                NO_NORM, False, ACT_NONE, first)[:3]  # fmt: skip
    return dx, dw1, db1, dw2, None if db2 is None else db2.to(w2.dtype)


def _norm_backward(gx, x, dx, grid: Addressing, mean, rstd, weight, norm, per_patch,
                   weight_grad: bool, bias_grad: bool):  # fmt: skip
    rows = stat_rows(grid, per_patch)
    length = grid.C if per_patch else grid.K
    programs = max(1, min(cdiv(rows, 8), 4 * sm_count(x.device)))
    f32 = dict(dtype=torch.float32, device=x.device)
    part_w = torch.zeros((programs, length), **f32) if weight_grad else mean
    # a LayerNorm's kernel adds sum(g) into part_b whenever it accumulates part_w: its own
    # buffer even where the bias gradient is not wanted (not part_w's)
    layer_norm_sums = weight_grad and norm == K.LAYER_NORM
    part_b = torch.zeros((programs, length), **f32) if layer_norm_sums else part_w
    with device_guard(x):
        K._norm_grad_kernel[(programs,)](
            gx, x, mean, rstd, weight, dx, part_w, part_b, rows, length, grid.K, programs,
            *grid.args(), *grid.strides_of(dx),
            GATHER=grid.gather, NORM=norm, PER_PATCH=per_patch and grid.gather,
            WEIGHT_GRAD=weight_grad,
        )  # fmt: skip
    dnw = part_w.sum(0) if weight_grad else None
    dnb = part_b.sum(0) if bias_grad else None
    return dnw, dnb


def normalize(xop: XOperand) -> torch.Tensor:
    """norm(X) (M, K) in x's dtype, stored (:func:`.kernels._normalize_kernel`)."""
    grid = xop.grid
    M, Kdim = grid.M, grid.K
    out = torch.empty((M, Kdim), dtype=xop.x.dtype, device=xop.x.device)
    with device_guard(out):
        K._normalize_kernel[lambda meta: (cdiv(M, meta["BR"]), cdiv(Kdim, meta["BL"]))](
            xop.x, xop.mean, xop.rstd, _or(xop.weight, out), _or(xop.bias, out), out, M, Kdim,
            *grid.args(), *out.stride(), GATHER=grid.gather, NORM=xop.norm,
            PER_PATCH=xop.per_patch, NORM_BIAS=xop.bias is not None,
        )  # fmt: skip
    return out


def shuffle(x, merge, grad=None):
    """The merge (not (1, 1)) as a copy, X (M, K) from x (B, H, W, C); with ``grad``
    (M, K), its inverse permutation into a new tensor of x's shape (the copy's gradient)."""
    grid = Addressing.of(x, merge)
    M, Kdim = grid.M, grid.K
    if grad is None:
        target = torch.empty((M, Kdim), dtype=x.dtype, device=x.device)
        grid_t, other = x, target
    else:
        target = torch.empty(x.shape, dtype=grad.dtype, device=x.device)
        grid, grid_t, other = grid.like(target), target, grad
    with device_guard(x):
        K._shuffle_kernel[lambda meta: (cdiv(M, meta["BR"]), cdiv(Kdim, meta["BL"]))](
            grid_t, other, M, Kdim, *grid.args(), *other.stride(), BACKWARD=grad is not None,
        )  # fmt: skip
    return target


def deepstack(hidden, index, embeds, out=None, shape=None):
    """Out of place (``out`` None): a new tensor of ``shape`` (default: hidden's, (R, D)),
    contiguous, whose rows r are hidden[r] + embeds[index[r]] (index -1: hidden[r]). In
    place (``out`` is hidden): hidden[index[v]] += embeds[v]."""
    inplace = out is not None
    rows = index.shape[0]
    result = out
    if out is None:
        result = torch.empty(shape or hidden.shape, dtype=hidden.dtype, device=hidden.device)
        out = result.view(hidden.shape)
    with device_guard(hidden):
        K._deepstack_kernel[lambda meta: (cdiv(rows, meta["BR"]),)](
            hidden, embeds, index, out, rows, hidden.shape[1], *hidden.stride(),
            *embeds.stride(), *out.stride(), INPLACE=inplace,
        )  # fmt: skip
    return result

"""The connector family in PyTorch: the CPU path (and float64's), and the recomputing
backward of that path. The same formulas as the transformers modules, with the norm computed
in fp32 (float64 for float64 inputs) and rounded once to the input dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kernels import ACT_GELU, ACT_SWIGLU, LAYER_NORM, NO_NORM

__all__ = [
    "AVG2X2",
    "BILINEAR",
    "backward",
    "forward",
    "gelu_backward",
    "merge",
    "pool",
    "pool_adjoint",
    "pooled_backward",
    "pooled_forward",
    "stat_dtype",
    "unmerge",
]

# the token-grid poolings of the pooled projector (the tokens family's codes)
AVG2X2, BILINEAR = 0, 1


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the norm statistics for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def merge(x: torch.Tensor, mh: int, mw: int) -> torch.Tensor:
    """X (M, K) from x (B, H, W, C): X[(b, i, j), (dr * mw + dc) * C + c] =
    x[b, i * mh + dr, j * mw + dc, c] (Idefics3's and InternVL's pixel shuffle)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // mh, mh, w // mw, mw, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b * (h // mh) * (w // mw), mh * mw * c)


def unmerge(X: torch.Tensor, shape, mh: int, mw: int) -> torch.Tensor:
    """The inverse of :func:`merge`: a tensor of ``shape`` (B, H, W, C) from X (M, K)."""
    b, h, w, c = shape
    X = X.reshape(b, h // mh, w // mw, mh, mw, c).permute(0, 1, 3, 2, 4, 5)
    return X.reshape(b, h, w, c)


def _stats(v: torch.Tensor, norm: int, eps: float):
    v = v.to(stat_dtype(v.dtype))
    if norm == LAYER_NORM:
        mean = v.mean(-1)
        var = (v - mean[..., None]).square().mean(-1)
    else:
        mean = torch.zeros_like(v[..., 0])
        var = v.square().mean(-1)
    return mean, torch.rsqrt(var + eps)


def _normalise(v, mean, rstd, weight, bias):
    out = (v.to(mean.dtype) - mean[..., None]) * rstd[..., None] * weight.to(mean.dtype)
    if bias is not None:
        out = out + bias.to(mean.dtype)
    return out.to(v.dtype)


def _normed(x, merge_hw, norm, per_patch, eps, weight, bias):
    """(normalised X, mean, rstd)."""
    mh, mw = merge_hw
    if norm == NO_NORM:
        mean, rstd = (x.new_empty(0, dtype=stat_dtype(x.dtype)) for _ in range(2))
        return merge(x, mh, mw), mean, rstd
    if per_patch:
        mean, rstd = _stats(x, norm, eps)
        X = merge(_normalise(x, mean, rstd, weight, bias), mh, mw)
        return X, mean.reshape(-1), rstd.reshape(-1)
    X = merge(x, mh, mw)
    mean, rstd = _stats(X, norm, eps)
    return _normalise(X, mean, rstd, weight, bias), mean, rstd


def _forward(x, merge_hw, w1, b1, w2, b2, norm_weight, norm_bias, residual, norm, per_patch,
             eps, act):  # fmt: skip
    X, mean, rstd = _normed(x, merge_hw, norm, per_patch, eps, norm_weight, norm_bias)
    h = F.linear(X, w1, b1)
    y = h if w2 is None else F.linear(_activation(h, act), w2, b2)
    if residual is not None:
        y = y + residual.reshape(y.shape)
    return y, h, mean, rstd


def _activation(h: torch.Tensor, act: int) -> torch.Tensor:
    """GELU(h), v SiLU(g) for the halves (v, g) of h (SwiGLU), or h."""
    if act == ACT_GELU:
        return F.gelu(h)
    if act == ACT_SWIGLU:
        v, g = h.chunk(2, dim=-1)
        return F.silu(g) * v
    return h


def _activation_backward(g: torch.Tensor, h: torch.Tensor, act: int) -> torch.Tensor:
    """The gradient of h for the gradient g of :func:`_activation` (h): g GELU'(h), or
    (g SiLU(gate), g v s (1 + gate (1 - s))) side by side, s = sigmoid(gate) (SwiGLU)."""
    if act == ACT_GELU:
        return g * _gelu_grad(h)
    if act == ACT_SWIGLU:
        v, gate = h.chunk(2, dim=-1)
        s = torch.sigmoid(gate)
        return torch.cat([g * gate * s, g * v * s * (1 + gate * (1 - s))], dim=-1)
    return g


def forward(x, merge_hw, w1, b1, w2, b2, norm_weight, norm_bias, residual, norm: int,
            per_patch: bool, eps: float, act: int, save: bool):  # fmt: skip
    """What :func:`.launchers.forward` returns, computed with PyTorch ops."""
    y, h, mean, rstd = _forward(x, merge_hw, w1, b1, w2, b2, norm_weight, norm_bias, residual,
                                norm, per_patch, eps, act)  # fmt: skip
    saved = h if save and w2 is not None else h.new_empty(0)
    return y, saved, mean, rstd


def _gelu_grad(h: torch.Tensor) -> torch.Tensor:
    """GELU'(h) = Phi(h) + h phi(h)."""
    cdf = 0.5 * (1.0 + torch.erf(h * 0.7071067811865476))
    return cdf + h * torch.exp(-0.5 * h * h) * 0.3989422804014327


def _norm_backward(g, v, mean, rstd, weight, norm):
    """(dv, dweight, dbias) of the norm over the last dim of v, for its output gradient g,
    in g's dtype: dv = rstd (gw - mean(gw) - xh mean(gw xh)) (RMSNorm without mean(gw))."""
    v = v.to(g.dtype)
    xh = (v - mean[..., None]) * rstd[..., None]
    gw = g * weight.to(g.dtype)
    dv = gw - xh * (gw * xh).mean(-1, keepdim=True)
    if norm == LAYER_NORM:
        dv = dv - gw.mean(-1, keepdim=True)
    dv = dv * rstd[..., None]
    return dv, (g * xh).reshape(-1, g.shape[-1]).sum(0), g.reshape(-1, g.shape[-1]).sum(0)


def backward(grad, x, merge_hw, w1, b1, w2, b2, norm_weight, norm_bias, norm: int,
             per_patch: bool, eps: float, act: int, needs):  # fmt: skip
    """The gradients of (x, w1, b1, w2, b2, norm_weight, norm_bias), None where ``needs``
    is False: the forward recomputed, then the formulas of the package docstring, in fp32
    (float64 for float64 inputs), each result rounded once to its input's dtype."""
    need_x, need_w1, need_b1, need_w2, need_b2, need_nw, need_nb = needs
    mh, mw = merge_hw
    f = stat_dtype(x.dtype)
    X, mean, rstd = _normed(x, merge_hw, norm, per_patch, eps, norm_weight, norm_bias)
    X = X.to(f)
    g = grad.reshape(X.shape[0], (w1 if w2 is None else w2).shape[0]).to(f)  # also 0 rows
    h = F.linear(X, w1.to(f), None if b1 is None else b1.to(f))
    dw2 = db2 = None
    if w2 is not None:
        a = _activation(h, act)
        dw2 = g.t() @ a if need_w2 else None
        db2 = g.sum(0) if need_b2 else None
        g = _activation_backward(g @ w2.to(f), h, act)
    dw1 = g.t() @ X if need_w1 else None
    db1 = g.sum(0) if need_b1 else None
    dx = dnw = dnb = None
    if need_x or need_nw or need_nb:
        gX = g @ w1.to(f)
        if norm == NO_NORM:
            dx = unmerge(gX, x.shape, mh, mw)
        elif per_patch:
            gx = unmerge(gX, x.shape, mh, mw)
            dx, dnw, dnb = _norm_backward(gx, x, mean.view(x.shape[:-1]),
                                          rstd.view(x.shape[:-1]), norm_weight, norm)  # fmt: skip
        else:
            dX, dnw, dnb = _norm_backward(gX, merge(x, mh, mw), mean, rstd, norm_weight, norm)
            dx = unmerge(dX, x.shape, mh, mw)
    out = []
    for t, ref, need in ((dx, x, need_x), (dw1, w1, need_w1), (db1, b1, need_b1),
                         (dw2, w2, need_w2), (db2, b2, need_b2), (dnw, norm_weight, need_nw),
                         (dnb, norm_bias, need_nb)):  # fmt: skip
        out.append(t.to(ref.dtype).contiguous() if need and t is not None else None)
    return tuple(out)


# ------------------------------------------------------------------- pooled projector


def pool(a: torch.Tensor, size, mode: int) -> torch.Tensor:
    """(B, h, w, N) from a (B, H, W, N): the 2 x 2 mean (``mode`` AVG2X2) or the bilinear
    resize to ``size`` (align_corners=False, ``F.interpolate``), by aten's pooling kernels
    on a's channels-last view (16-bit inputs accumulate in fp32, one rounding)."""
    g = a.permute(0, 3, 1, 2)
    if mode == AVG2X2:
        p = F.avg_pool2d(g, 2)
    else:
        p = F.interpolate(g, size=tuple(size), mode="bilinear", align_corners=False)
    return p.permute(0, 2, 3, 1).contiguous()


def pool_adjoint(g: torch.Tensor, grid, mode: int) -> torch.Tensor:
    """(B, H, W, N) from g (B, h, w, N): the adjoint of :func:`pool` on the (H, W) grid."""
    b, h, w, n = g.shape
    if mode == AVG2X2:
        return (g * 0.25)[:, :, None, :, None].expand(b, h, 2, w, 2, n).reshape(b, 2 * h, 2 * w, n)
    a = torch.ops.aten.upsample_bilinear2d_backward(
        g.permute(0, 3, 1, 2), [h, w], [b, n, grid[0], grid[1]], False, None, None
    )
    return a.permute(0, 2, 3, 1)


def gelu_backward(grad: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """grad * GELU'(h), exact GELU, one kernel (aten's; 16-bit in fp32, one rounding)."""
    return torch.ops.aten.gelu_backward(grad, h, approximate="none")


def pooled_forward(x, w1, b1, w2, b2, size, mode: int, save: bool):
    """(y (B h w, N2), the pre-activation h (B H W, N1) if ``save`` else empty) of
    y = pool(GELU(x W1^T + b1)) W2^T + b2 for x (B, H, W, K)."""
    # on rows, so both results are tensors of their own: a view of an intermediate, coming
    # out of an autograd Function, refuses in-place changes
    h = F.linear(x.reshape(-1, x.shape[-1]), w1, b1)
    pooled = pool(F.gelu(h).view(*x.shape[:-1], h.shape[-1]), size, mode)
    y = F.linear(pooled.reshape(-1, pooled.shape[-1]), w2, b2)
    return y, (h if save else h.new_empty(0))


def pooled_backward(grad, x, w1, b1, w2, size, mode: int, needs):
    """The gradients of (x, w1, b1, w2, b2) of :func:`pooled_forward` (None where ``needs``
    is False), the forward recomputed in fp32 (float64 for float64), for the output gradient
    ``grad`` (B h w, N2): with a = GELU(h), p = pool(a),

        dW2 = g^T p, db2 = sum g, dp = g W2, dh = pool^T(dp) * GELU'(h),
        dW1 = dh^T x, db1 = sum dh, dx = dh W1."""
    need_x, need_w1, need_b1, need_w2, need_b2 = needs
    f = stat_dtype(x.dtype)
    X = x.to(f)
    h = F.linear(X, w1.to(f), None if b1 is None else b1.to(f))
    b = x.shape[0]
    g = grad.reshape(b, size[0], size[1], w2.shape[0]).to(f)  # also 0 rows
    dw2 = db2 = None
    if need_w2:
        p = pool(F.gelu(h), size, mode)
        dw2 = g.reshape(-1, g.shape[-1]).t() @ p.reshape(-1, p.shape[-1])
    if need_b2:
        db2 = g.reshape(-1, g.shape[-1]).sum(0)
    dx = dw1 = db1 = None
    if need_x or need_w1 or need_b1:
        dh = gelu_backward(pool_adjoint(g @ w2.to(f), x.shape[1:3], mode), h)
        rows = dh.reshape(-1, dh.shape[-1])
        dw1 = rows.t() @ X.reshape(-1, X.shape[-1]) if need_w1 else None
        db1 = rows.sum(0) if need_b1 else None
        dx = dh @ w1.to(f) if need_x else None
    refs = (x, w1, b1, w2, w2)
    return tuple(None if t is None else t.to(r.dtype).contiguous()
                 for t, r in zip((dx, dw1, db1, dw2, db2), refs, strict=True))  # fmt: skip

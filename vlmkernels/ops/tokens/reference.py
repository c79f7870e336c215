"""The PyTorch implementations of the token ops (the CPU path, and float64).

Same contracts as the launchers in :mod:`.kernels`; the arithmetic is done in fp32 for 16-bit
inputs (float64 stays float64) and rounded once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kernels import AVG


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def gather_rows(x: torch.Tensor, index: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """(B, K, C): ``scale * x[b, index[b, k]]``, zeros where the index is -1; ``index`` (B, K)
    or (K,) shared by the batch."""
    B, _, C = x.shape
    index = index.expand(B, index.shape[-1]) if index.dim() == 1 else index
    rows = x.gather(1, index.clamp_min(0)[..., None].expand(-1, -1, C)).to(_acc(x))
    rows = torch.where((index >= 0)[..., None], rows * scale, 0.0)
    return rows.to(x.dtype)


def tome_match(metric: torch.Tensor, class_token: bool):
    """(best (B, NA) fp32 / fp64, arg (B, NA) int64): cosine scores of the A tokens (even
    positions) against the B tokens (odd positions), their max and the lowest argmax; a
    score involving a metric row of norm 0 (or not finite) is -inf."""
    m = metric.to(_acc(metric))
    norm = m.norm(dim=-1, keepdim=True)
    valid = (norm > 0) & torch.isfinite(norm)
    m = m / torch.where(valid, norm, 1.0)
    scores = m[:, ::2] @ m[:, 1::2].transpose(1, 2)
    # a zero (or non-finite) metric row has no cosine: its scores are -inf
    scores = scores.masked_fill(~(valid[:, ::2] & valid[:, 1::2].transpose(1, 2)), float("-inf"))
    if class_token:
        scores[:, 0, :] = float("-inf")
    best = scores.amax(dim=-1)
    nb = scores.shape[-1]
    cols = torch.arange(nb, device=metric.device)
    # the lowest column attaining the max (torch.max does not promise which one)
    arg = torch.where(scores == best[..., None], cols, nb).amin(dim=-1)
    if class_token:
        arg[:, 0] = 0
    return best, arg.clamp_max(max(nb - 1, 0))


def tome_plan(best: torch.Tensor, arg: torch.Tensor, n: int, r: int, class_token: bool):
    """(source (B, N), members (B, N), offsets (B, N - r + 1)), int64: the output row of
    every token, and the rows' members as CSR lists (members of row q: ``members[b,
    offsets[b, q] : offsets[b, q + 1]]``, in position order). The A tokens ranked by
    decreasing best score (stable; with a class token, A token 0 ranks last); the first r
    merge into row (NA - r) + arg, the others take rows 0 .. NA - r - 1 in rank order
    (position order with a class token); B token j is row (NA - r) + j."""
    B, na = best.shape
    nb = n // 2
    n_unm = na - r
    if class_token:  # the class token ranks last, even among other -inf scores
        order = torch.sort(best[:, 1:], dim=1, descending=True, stable=True).indices + 1
        order = torch.cat((order, order.new_zeros((B, 1))), dim=1)
    else:
        order = torch.sort(best, dim=1, descending=True, stable=True).indices
    src, unm = order[:, :r], order[:, r:]
    if class_token:
        unm = unm.sort(dim=1).values
    dest_a = torch.empty_like(order)
    dest_a = dest_a.scatter(1, unm, torch.arange(n_unm, device=best.device).expand(B, n_unm))
    dest_a = dest_a.scatter(1, src, arg.gather(1, src) + n_unm)
    dest_b = (torch.arange(nb, device=best.device) + n_unm).expand(B, nb)
    pairs = torch.stack((dest_a[:, :nb], dest_b), dim=2).reshape(B, 2 * nb)
    source = torch.cat((pairs, dest_a[:, nb:]), dim=1) if na > nb else pairs
    members = torch.sort(source, dim=1, stable=True).indices
    rows = torch.arange(n - r + 1, device=best.device).expand(B, n - r + 1).contiguous()
    offsets = torch.searchsorted(source.gather(1, members), rows)
    return source, members, offsets


def tome_merge_rows(x, size, source, nout, size_dtype):
    """(merged (B, NOUT, C), sizes (B, NOUT, 1)): output row r is the size-weighted mean of
    the tokens i with ``source[b, i] == r``."""
    B, N, C = x.shape
    acc = _acc(x)
    s = size.to(acc) if size is not None else torch.ones(B, N, 1, dtype=acc, device=x.device)
    total = torch.zeros(B, nout, 1, dtype=acc, device=x.device).scatter_add_(
        1, source[..., None], s
    )
    weighted = torch.zeros(B, nout, C, dtype=acc, device=x.device)
    weighted.scatter_add_(1, source[..., None].expand(-1, -1, C), x.to(acc) * s)
    return (weighted / total).to(x.dtype), total.to(size_dtype)


def tome_unmerge_rows(grad, grad_size, x, size, out, out_size, source, size_grad):
    """(dx (B, N, C), dsize (B, N, 1) or None) of :func:`tome_merge_rows`: with r = the output
    row of token i and S its size, dx_i = s_i / S g_r and dsize_i = <g_r, x_i - out_r> / S +
    gsize_r. x and ``out`` are read only with ``size_grad``."""
    B, N = source.shape
    C = grad.shape[2]
    acc = _acc(grad)
    idx = source[..., None]
    total = out_size.to(acc).gather(1, idx)
    s = size.to(acc) if size is not None else torch.ones(B, N, 1, dtype=acc, device=grad.device)
    g = grad.to(acc).gather(1, idx.expand(-1, -1, C))
    dx = (s / total * g).to(grad.dtype)
    if not size_grad:
        return dx, None
    o = out.to(acc).gather(1, idx.expand(-1, -1, C))
    ds = (g * (x.to(acc) - o)).sum(-1, keepdim=True) / total
    if grad_size is not None:
        ds = ds + grad_size.to(acc).gather(1, idx)
    return dx, ds.to(size.dtype)


def _grid(x: torch.Tensor, grid) -> torch.Tensor:
    B, _, C = x.shape
    return x.reshape(B, grid[0], grid[1], C).permute(0, 3, 1, 2)


def _tokens(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The (B, C, h, w) grid ``y`` as (B, h w, C) tokens in a tensor of their own (one copy,
    cast to ``dtype``): a result that is a view of an intermediate refuses in-place changes
    when it comes out of an autograd Function."""
    B, C, h, w = y.shape
    out = torch.empty(B, h * w, C, dtype=dtype, device=y.device)
    out.view(B, h, w, C).copy_(y.permute(0, 2, 3, 1))
    return out


def pool(x: torch.Tensor, grid, size, mode: int) -> torch.Tensor:
    """(B, h w, C): the average of (H / h) x (H / w) blocks (``mode`` AVG) or the bilinear
    resize (align_corners=False, as ``F.interpolate``) of the (H, W) token grid of x."""
    g = _grid(x.to(_acc(x)), grid)
    if mode == AVG:
        y = F.avg_pool2d(g, (grid[0] // size[0], grid[1] // size[1]))
    else:
        y = F.interpolate(g, size=tuple(size), mode="bilinear", align_corners=False)
    return _tokens(y, x.dtype)


def pool_backward(grad: torch.Tensor, grid, size, mode: int) -> torch.Tensor:
    """(B, H W, C): the adjoint of :func:`pool` applied to ``grad`` (B, h w, C)."""
    B, _, C = grad.shape
    g = _grid(grad.to(_acc(grad)), size)
    if mode == AVG:
        kh, kw = grid[0] // size[0], grid[1] // size[1]
        dx = g.repeat_interleave(kh, dim=2).repeat_interleave(kw, dim=3) / (kh * kw)
    else:
        dx = torch.ops.aten.upsample_bilinear2d_backward(
            g, list(size), [B, C, grid[0], grid[1]], False, None, None
        )
    return _tokens(dx, grad.dtype)

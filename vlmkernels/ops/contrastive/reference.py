"""The PyTorch path of the contrastive family: the same block statistics and gradients as
the Triton launchers (:mod:`.launchers`), in chunks of rows, so memory is O(chunk x N),
never N x N. It runs on CPU tensors without Triton's interpreter, for float64, and under
``use_backend("torch")``; computed in fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

import math

import torch

from .algebra import SideStats, Targets, onehot_count
from .chunked import CHUNK_BUDGET_BYTES

__all__ = [
    "block_grads_torch",
    "block_stats_torch",
    "compute_dtype",
    "siglip_grads_torch",
    "siglip_rows_torch",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _torch_chunk_rows(m: int, n: int, chunk_rows: int, dtype: torch.dtype, buffers: int,
                      mask: bool = False) -> int:  # fmt: skip
    """Rows per chunk of the PyTorch path over an M x N block: ``chunk_rows`` if given,
    else as many as keep its ``buffers`` (rows x N) temporaries in the compute ``dtype``
    and, with ``mask``, a (rows x N) bool mask within :data:`CHUNK_BUDGET_BYTES` together."""
    if chunk_rows > 0:
        return min(m, chunk_rows)
    row_bytes = n * (buffers * dtype.itemsize + (1 if mask else 0))
    return max(1, min(m, CHUNK_BUDGET_BYTES // row_bytes))


def _upcast(x, y, scale, bias):
    ct = compute_dtype(x.dtype)
    return x.to(ct), y.to(ct), scale.to(ct), (bias.to(ct) if bias is not None else None)


def _logits_into(out, xf, yf, s, b):
    """out = s xf yf^T + b, in place (out: (rows of xf) x (rows of yf))."""
    torch.mm(xf, yf.T, out=out).mul_(s)
    return out if b is None else out.add_(b)


def _logsumexp(t, dim: int, tmp):
    """torch.logsumexp(t, dim) with ``tmp`` (shaped like t) as its only temporary."""
    top = t.amax(dim, keepdim=True)
    top = torch.where(top.abs() == math.inf, 0.0, top)  # as torch.logsumexp: no inf - inf
    torch.sub(t, top, out=tmp).exp_()
    return tmp.sum(dim).log_().add_(top.squeeze(dim))


def _diagonal_rows(r0: int, c: int, n: int, offset: int) -> tuple[int, int, int]:
    """(lo, hi, k): rows lo .. hi of the chunk of rows r0 .. r0 + c of an M x N block have
    their positive (col = row + offset) inside it, on the chunk's diagonal k."""
    k = r0 + offset
    return max(0, -k), max(max(0, -k), min(c, n - k)), k


def _ids_mask(targets: Targets, rs: slice, mask: torch.Tensor, out: torch.Tensor):
    """``out`` = 1 on the positive pairs (equal ids) of the rows ``rs``, 0 elsewhere.

    Through the bool buffer ``mask``: a comparison into a float ``out``, a product with a
    bool tensor or a sum over one each allocate a converted copy of the chunk."""
    torch.eq(targets.row_ids[rs, None], targets.col_ids[None, :], out=mask)
    return out.copy_(mask)


def block_stats_torch(x, y, scale, bias, targets: Targets, rows=True, cols=True,
                      teacher_lse=(None, None), chunk_rows=0):  # fmt: skip
    """PyTorch version of :func:`.launchers.block_stats_triton`, in row chunks; temporaries: two
    (three with a teacher) (chunk x N) buffers and, with ids, a bool one."""
    xf, yf, s, b = _upcast(x, y, scale, bias)
    m, n = x.shape[0], y.shape[0]
    teach = targets.teacher is not None
    c = _torch_chunk_rows(m, n, chunk_rows, xf.dtype, 2 + teach, targets.ids)
    ct = dict(dtype=xf.dtype, device=x.device)
    if teach:
        xt, yt, st = targets.teacher
        xt, yt, st = xt.to(xf.dtype), yt.to(xf.dtype), st.to(xf.dtype)
        t_row, t_col = (t.to(xf.dtype) if t is not None else None for t in teacher_lse)
    r = dict(lse=torch.empty(m, **ct), dot=torch.zeros(m, **ct), sum=torch.zeros(m, **ct),
             tdot=torch.zeros(m, **ct))  # fmt: skip
    k = dict(lse=torch.full((n,), float("-inf"), **ct), dot=torch.zeros(n, **ct),
             sum=torch.zeros(n, **ct), tdot=torch.zeros(n, **ct))  # fmt: skip
    if targets.ids:
        r["cnt"], k["cnt"] = torch.zeros(m, **ct), torch.zeros(n, **ct)
    else:
        r["cnt"] = onehot_count(m, n, targets.offset, x.device, xf.dtype)
        k["cnt"] = onehot_count(n, m, -targets.offset, x.device, xf.dtype)
    buf = torch.empty((min(c, m), n), **ct)
    tmp = torch.empty_like(buf)
    t_buf = torch.empty_like(buf) if teach else None
    mask = torch.empty(buf.shape, dtype=torch.bool, device=x.device) if targets.ids else None
    for r0 in range(0, m, c):
        rs = slice(r0, min(m, r0 + c))
        rows_c = rs.stop - r0
        logits = _logits_into(buf[:rows_c], xf[rs], yf, s, b)
        tmp_c = tmp[:rows_c]
        if targets.ids:
            hard = _ids_mask(targets, rs, mask[:rows_c], tmp_c)
            r["cnt"][rs] = hard.sum(1)
            k["cnt"] += hard.sum(0)
            on_hard = hard.mul_(logits)
            r["dot"][rs] = on_hard.sum(1)
            k["dot"] += on_hard.sum(0)
        else:
            lo, hi, kd = _diagonal_rows(r0, rows_c, n, targets.offset)
            diag = logits.diagonal(kd)
            r["dot"][r0 + lo : r0 + hi] = diag
            k["dot"][lo + kd : hi + kd] += diag
        if rows:
            r["lse"][rs] = _logsumexp(logits, 1, tmp_c)
            if targets.smoothing:
                r["sum"][rs] = logits.sum(1)
        if cols:
            k["lse"] = torch.logaddexp(k["lse"], _logsumexp(logits, 0, tmp_c))
            if targets.smoothing:
                k["sum"] += logits.sum(0)
        if teach:
            teacher = _logits_into(t_buf[:rows_c], xt[rs], yt, st, None)
            if rows:
                torch.sub(teacher, t_row[rs, None], out=tmp_c).exp_().mul_(logits)
                r["tdot"][rs] = tmp_c.sum(1)
            if cols:
                torch.sub(teacher, t_col[None, :], out=tmp_c).exp_().mul_(logits)
                k["tdot"] += tmp_c.sum(0)
    smooth = bool(targets.smoothing)
    single_r, single_c = targets.single_positives(m, n)

    def side(d, single):
        return SideStats(d["lse"], d["dot"], d["cnt"], d["sum"] if smooth else None,
                         d["tdot"] if teach else None, single)  # fmt: skip

    return (side(r, single_r) if rows else None), (side(k, single_c) if cols else None)


def block_grads_torch(x, y, scale, bias, targets: Targets, row_coef, col_coef, chunk_rows=0,
                      y_grad=True):  # fmt: skip
    """PyTorch version of :func:`.launchers.block_grads_triton` (without accumulators; dy None
    without ``y_grad``); temporaries: two (three with a teacher) (chunk x N) buffers and,
    with ids, a bool one."""
    xf, yf, s, b = _upcast(x, y, scale, bias)
    m, n = x.shape[0], y.shape[0]
    teach = targets.teacher is not None
    c = _torch_chunk_rows(m, n, chunk_rows, xf.dtype, 2 + teach, targets.ids)
    ct = dict(dtype=xf.dtype, device=x.device)
    if teach:
        xt, yt, st = (t.to(xf.dtype) for t in targets.teacher)
    # (6, L) rows: lse, u, h, e, a, teacher lse (SideStats.coefficients); zeros stand in
    # for a direction not in the loss where its positives' h is needed
    rc = row_coef.to(xf.dtype) if row_coef is not None else None
    cc = col_coef.to(xf.dtype) if col_coef is not None else None
    h_r = rc[2] if rc is not None else torch.zeros(m, **ct)
    h_c = cc[2] if cc is not None else torch.zeros(n, **ct)
    dx = torch.empty_like(xf)
    dy = torch.zeros_like(yf) if y_grad else None
    g_dot_xy = torch.zeros((), **ct)
    dbias = torch.zeros((), **ct)
    buf = torch.empty((min(c, m), n), **ct)
    grad = torch.empty_like(buf)
    t_buf = torch.empty_like(buf) if teach else None
    mask = torch.empty(buf.shape, dtype=torch.bool, device=x.device) if targets.ids else None
    for r0 in range(0, m, c):
        rs = slice(r0, min(m, r0 + c))
        rows_c = rs.stop - r0
        logits = _logits_into(buf[:rows_c], xf[rs], yf, s, b)
        g = grad[:rows_c]
        if rc is not None:
            lse, u, _, e, _, _ = (v[rs, None] for v in rc)
            torch.sub(logits, lse, out=g).exp_().mul_(u)
            if targets.smoothing:
                g.sub_(e)
        else:
            g.zero_()
        if cc is not None:  # the last use of the logits: buf becomes scratch
            lse, v, _, e, _, _ = (w[None, :] for w in cc)
            g.add_(logits.sub_(lse).exp_().mul_(v))
            if targets.smoothing:
                g.sub_(e)
        if targets.ids:
            hard = _ids_mask(targets, rs, mask[:rows_c], buf[:rows_c])
            g.addcmul_(hard, h_r[rs, None], value=-1).addcmul_(hard, h_c[None, :], value=-1)
        else:
            lo, hi, kd = _diagonal_rows(r0, rows_c, n, targets.offset)
            g.diagonal(kd).sub_(h_r[r0 + lo : r0 + hi] + h_c[lo + kd : hi + kd])
        if teach:
            teacher = _logits_into(t_buf[:rows_c], xt[rs], yt, st, None)
            if rc is not None:
                a, t_lse = rc[4][rs, None], rc[5][rs, None]
                g.sub_(torch.sub(teacher, t_lse, out=buf[:rows_c]).exp_().mul_(a))
            if cc is not None:
                g.sub_(teacher.sub_(cc[5][None, :]).exp_().mul_(cc[4][None, :]))
        gy = g @ yf
        g_dot_xy += (gy * xf[rs]).sum()
        dx[rs] = gy.mul_(s)
        if y_grad:
            dy.addmm_(g.T, xf[rs])
        dbias += g.sum()
    return dx, dy.mul_(s) if y_grad else None, g_dot_xy, dbias


def _siglip_neg_margins(out, xf, yf, s, b, r0: int, offset: int):
    """-z S for the rows of ``xf`` (rows r0 .. of the block), written to ``out``: S off the
    positive pairs col = row + offset, -S on them."""
    neg = _logits_into(out, xf, yf, s, b)
    neg.diagonal(r0 + offset).neg_()
    return neg


def siglip_rows_torch(x, y, scale, bias, chunk_rows, offset=0):
    """(M,) SigLIP row losses; temporaries: two (chunk x N) buffers."""
    xf, yf, s, b = _upcast(x, y, scale, bias)
    m, n = x.shape[0], y.shape[0]
    c = _torch_chunk_rows(m, n, chunk_rows, xf.dtype, 2)
    out = torch.empty(m, dtype=xf.dtype, device=x.device)
    buf = torch.empty((min(c, m), n), dtype=xf.dtype, device=x.device)
    for r0 in range(0, m, c):
        rs = slice(r0, min(m, r0 + c))
        neg = _siglip_neg_margins(buf[: rs.stop - r0], xf[rs], yf, s, b, r0, offset)
        out[rs] = torch.nn.functional.softplus(neg).sum(1)  # -logsigmoid(z S)
    return out


def siglip_grads_torch(x, y, scale, bias, w_rows, chunk_rows, offset=0, y_grad=True,
                       grads_dtype=None):  # fmt: skip
    """(dx, dy, dscale, dbias, row losses) of sum_i w_i l_i (dy None without ``y_grad``;
    dx and dy in ``grads_dtype``, default the features'); temporaries: two (chunk x N)
    buffers."""
    xf, yf, s, b = _upcast(x, y, scale, bias)
    m, n = x.shape[0], y.shape[0]
    c = _torch_chunk_rows(m, n, chunk_rows, xf.dtype, 2)
    w = w_rows.to(xf.dtype)
    dx = torch.empty_like(xf)
    dy = torch.zeros_like(yf) if y_grad else None
    rows_loss = torch.empty(m, dtype=xf.dtype, device=x.device)
    g_dot_xy = torch.zeros((), dtype=xf.dtype, device=x.device)
    dbias = torch.zeros((), dtype=xf.dtype, device=x.device)
    buf = torch.empty((min(c, m), n), dtype=xf.dtype, device=x.device)
    for r0 in range(0, m, c):
        rs = slice(r0, min(m, r0 + c))
        neg = _siglip_neg_margins(buf[: rs.stop - r0], xf[rs], yf, s, b, r0, offset)
        rows_loss[rs] = torch.nn.functional.softplus(neg).sum(1)  # -logsigmoid(z S)
        g = neg.sigmoid_().mul_(w[rs, None])  # -z sigmoid(-z S) w, before the sign flip
        g.diagonal(r0 + offset).neg_()
        gy = g @ yf
        g_dot_xy += (gy * xf[rs]).sum()
        dx[rs] = gy.mul_(s)
        if y_grad:
            dy.addmm_(g.T, xf[rs])
        dbias += g.sum()
    dy = dy.mul_(s).to(grads_dtype or y.dtype) if y_grad else None
    return dx.to(grads_dtype or x.dtype), dy, g_dot_xy, dbias, rows_loss

"""The PyTorch implementation of the attention core (the CPU path and the float64 path),
with the same arguments, layouts and conventions as the Triton kernels (see
:mod:`.kernels`): scores in fp32 (float64 for float64 inputs), rows without a visible key
give 0 and lse -inf, rows with lo > hi give NaN.
"""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def visible(lq, lk, keep, lo, hi, causal, device, b=None):
    """(B or 1, 1, Lq, Lk) bool: whether query row i sees key j (one segment's rows when
    ``b`` is given)."""
    i = torch.arange(lq, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    if lo is not None:
        lo_, hi_ = (lo, hi) if b is None else (lo[b : b + 1], hi[b : b + 1])
        ok = (j[None] >= lo_[:, :lq, None]) & (j[None] < hi_[:, :lq, None])
    elif causal:
        ok = (j <= i + (lk - lq))[None]
    else:
        ok = torch.ones(1, lq, lk, dtype=torch.bool, device=device)
    if keep is not None:
        keep_ = keep if b is None else keep[b : b + 1]
        ok = ok & (keep_[:, None, :lk] != 0)
    return ok[:, None]


def _bad_rows(lo, hi, lq, b=None):
    """(B or 1, 1, Lq) bool: rows with lo > hi (no answer: NaN)."""
    if lo is None:
        return None
    lo_, hi_ = (lo, hi) if b is None else (lo[b : b + 1], hi[b : b + 1])
    return (lo_[:, :lq] > hi_[:, :lq])[:, None]


def _dense_forward(q, k, v, ok, bad, scale):
    ct = compute_dtype(q.dtype)
    s = torch.matmul(q.to(ct), k.to(ct).transpose(-1, -2)) * scale
    s = s.masked_fill(~ok, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None]).masked_fill(~ok, 0.0)
    out = torch.matmul(p, v.to(ct))
    if bad is not None:
        out = out.masked_fill(bad[..., None], float("nan"))
        lse = lse.masked_fill(bad, float("nan"))
    return out.to(q.dtype), lse.to(ct)


def _dense_backward(do, q, k, v, lse, delta, ok, scale):
    ct = compute_dtype(q.dtype)
    qc, kc, vc, doc = q.to(ct), k.to(ct), v.to(ct), do.to(ct)
    s = torch.matmul(qc, kc.transpose(-1, -2)) * scale
    p = torch.exp(s - lse.to(ct)[..., None]).masked_fill(~ok, 0.0)
    dv = torch.matmul(p.transpose(-1, -2), doc)
    dp = torch.matmul(doc, vc.transpose(-1, -2))
    ds = p * (dp - delta.to(ct)[..., None])
    dq = torch.matmul(ds, kc) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qc) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _segments(cu):
    bounds = cu.tolist()
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _seg(t, a, b):
    """Rows a..b of a packed (T, H, D) tensor as (1, H, L, D)."""
    return t[a:b].transpose(0, 1)[None]


def forward(q, k, v, cu_q, cu_k, max_lq, max_lk, keep, lo, hi, causal, scale):
    """(out, lse): the attention of :mod:`.kernels` (dense or packed)."""
    if cu_q is None:
        ok = visible(q.shape[2], k.shape[2], keep, lo, hi, causal, q.device)
        return _dense_forward(q, k, v, ok, _bad_rows(lo, hi, q.shape[2]), scale)
    ct = compute_dtype(q.dtype)
    out = torch.zeros_like(q)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=ct, device=q.device)
    for b, ((qa, qb), (ka, kb)) in enumerate(zip(_segments(cu_q), _segments(cu_k), strict=True)):
        if qb == qa or kb == ka:
            continue
        ok = visible(qb - qa, kb - ka, keep, lo, hi, causal, q.device, b)
        o, s = _dense_forward(_seg(q, qa, qb), _seg(k, ka, kb), _seg(v, ka, kb), ok,
                              _bad_rows(lo, hi, qb - qa, b), scale)  # fmt: skip
        out[qa:qb] = o[0].transpose(0, 1)
        lse[:, qa:qb] = s[0]
    return out, lse


def backward(do, q, k, v, lse, delta, cu_q, cu_k, max_lq, max_lk, keep, lo, hi, causal, scale):
    """(dq, dk, dv) with ``delta`` = rowsum(dO * O) - dlse, laid out as lse."""
    if cu_q is None:
        ok = visible(q.shape[2], k.shape[2], keep, lo, hi, causal, q.device)
        return _dense_backward(do, q, k, v, lse, delta, ok, scale)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for b, ((qa, qb), (ka, kb)) in enumerate(zip(_segments(cu_q), _segments(cu_k), strict=True)):
        if qb == qa or kb == ka:
            continue
        ok = visible(qb - qa, kb - ka, keep, lo, hi, causal, q.device, b)
        g = _dense_backward(_seg(do, qa, qb), _seg(q, qa, qb), _seg(k, ka, kb),
                            _seg(v, ka, kb), lse[None, :, qa:qb], delta[None, :, qa:qb], ok,
                            scale)  # fmt: skip
        dq[qa:qb] = g[0][0].transpose(0, 1)
        dk[ka:kb] = g[1][0].transpose(0, 1)
        dv[ka:kb] = g[2][0].transpose(0, 1)
    return dq, dk, dv


def key_mass(q, k, lse, causal, scale, row_first, row_last, weight):
    """(B, H, Lk): ``weight`` x sum over rows row_first <= i < row_last of P[b, h, i, :]."""
    ct = compute_dtype(q.dtype)
    lq, lk = q.shape[2], k.shape[2]
    qs = q[:, :, row_first:row_last].to(ct)
    s = torch.matmul(qs, k.to(ct).transpose(-1, -2)) * scale
    ls = lse[:, :, row_first:row_last].to(ct)
    ok = visible(lq, lk, None, None, None, causal, q.device)[:, :, row_first:row_last]
    ok = ok & torch.isfinite(ls)[..., None]
    p = torch.exp(s - ls[..., None]).masked_fill(~ok, 0.0)
    return (p.sum(dim=2) * weight).to(ct)

"""The PyTorch implementation of the attention core (the CPU path and the float64 path),
with the same arguments, layouts and conventions as the Triton kernels (see
:mod:`.kernels`): scores in fp32 (float64 for float64 inputs), rows without a visible key
give 0 and lse -inf, rows with lo > hi give NaN. Grouped-query k, v (fewer heads) are
repeated per query head (dK, dV summed back over the group); the optional per-key bias
(dense (B, H or 1, Lk), packed (H or 1, Tk)) is added to the scaled logits; the optional
tanh gate (one element or (H, D)) multiplies the output. Attention dropout draws the
kernels' mask bit for bit (:func:`dropout_keep`: Philox4x32-10 in int64 arithmetic).
"""

from __future__ import annotations

import functools
import math

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


def dropout_threshold(p: float) -> tuple[int, float]:
    """(drop_thr, drop_scale) of dropout probability ``p``: an element is kept when 31
    random bits are >= drop_thr = round(p 2^31) (probability 1 - drop_thr / 2^31), kept
    values are scaled by 1 / (1 - p)."""
    p = float(p)
    return min(round(p * 2**31), 2**31 - 1), 1.0 / (1.0 - p)


_M32 = 0xFFFFFFFF
_PHILOX_ROUND = (0xD2511F53, 0xCD9E8D57)
_PHILOX_KEY = (0x9E3779B9, 0xBB67AE85)


def _mulhilo(a: int, x: torch.Tensor):
    """(hi, lo) 32-bit halves of a x (a, x < 2^32) without int64 overflow."""
    t = a * (x & 0xFFFF)
    u = a * (x >> 16) + (t >> 16)
    return u >> 16, ((u & 0xFFFF) << 16) | (t & 0xFFFF)


def dropout_keep(seed, b, h, i, j, dropout_p):
    """Whether dropout keeps element (b, h, i, j) (int64 tensors that broadcast), as the
    kernels' ``_dropout_keep``: Philox4x32-10 with key ``seed`` (a one-element int64
    tensor) and counters (j // 4, i, h, b), output j % 4 the draw of key j; kept when its
    top 31 bits are >= round(p 2^31)."""
    thr, _ = dropout_threshold(dropout_p)
    seed = seed.reshape(()).to(torch.int64)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    zero = torch.zeros((), dtype=torch.int64, device=seed.device) + b * 0 + h * 0 + i * 0 + j * 0
    c0, c1, c2, c3 = (zero + x for x in (j // 4, i, h, b))
    for _ in range(10):
        hi0, lo0 = _mulhilo(_PHILOX_ROUND[0], c0)
        hi2, lo2 = _mulhilo(_PHILOX_ROUND[1], c2)
        c0, c1, c2, c3 = hi2 ^ c1 ^ k0, lo2, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _PHILOX_KEY[0]) & _M32, (k1 + _PHILOX_KEY[1]) & _M32
    draw = torch.where(j % 4 < 2, torch.where(j % 2 == 0, c0, c1), torch.where(j % 2 == 0, c2, c3))
    return (draw >> 1) >= thr


def _dropout(seed, dropout_p, batches, h, lq, lk, device, dtype):
    """(len(batches), H, Lq, Lk): M / (1 - p) of the batches (segments) ``batches``, in
    ``dtype``; None without dropout."""
    if not dropout_p:
        return None
    ar = functools.partial(torch.arange, device=device)
    b = torch.as_tensor(list(batches), dtype=torch.int64, device=device)
    keep = dropout_keep(seed, b[:, None, None, None], ar(h)[None, :, None, None],
                        ar(lq)[:, None], ar(lk)[None, :], dropout_p)  # fmt: skip
    return keep.to(dtype) / (1.0 - float(dropout_p))


def _heads(t, h):
    """t with its head dim (1) repeated to h heads (grouped-query attention)."""
    return t if t.shape[1] == h else t.repeat_interleave(h // t.shape[1], dim=1)


def _group_sum(t, hk):
    """(B, H, L, D) or (T, H, D) summed over the groups of H / hk heads to hk heads."""
    if t.shape[1] == hk:
        return t
    shape = (*t.shape[:1], hk, t.shape[1] // hk, *t.shape[2:])
    return t.reshape(shape).sum(2)


def reduce_bias_grad(db, bias):
    """The gradient of ``bias`` from the per-query-head ``db`` (summed over the broadcast
    dims), in the bias's dtype."""
    dims = [i for i in range(bias.dim()) if bias.shape[i] == 1 and db.shape[i] != 1]
    if dims:
        db = db.sum(dims, keepdim=True)
    return db.to(bias.dtype)


def _logits(q, k, scale, bias):
    ct = compute_dtype(q.dtype)
    s = torch.matmul(q.to(ct), _heads(k, q.shape[1]).to(ct).transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.to(ct)[:, :, None, :]
    return s


_LOG2E = math.log2(math.e)


def bias_keeps(bias):
    """Where ``bias`` leaves its key visible: a key whose bias in base 2 (bias * log2(e),
    fp32) is at most -2^24 counts as masked, as in the kernels: -inf, finfo.min, -1e9 or
    -1e30 masks (below -1.16e7). Such a key's probability is 0 next to any visible key,
    and fp32 cannot resolve a row whose every logit is that low (log2 of the row's sum is
    absorbed into its lse: the backward's exp(s - lse) would give 1 per key): a row whose
    every key is masked gives 0 and no gradient, as a fully padded one. A NaN bias keeps
    its key (and makes the row NaN, as eager attention does)."""
    return ~(bias.float() * _LOG2E <= -(2.0**24))


def _visible_with_bias(ok, bias):
    return ok if bias is None else ok & bias_keeps(bias)[:, :, None, :]


def _softmax(s, ok):
    """(P, lse): the softmax of the logits ``s`` over the visible keys (``ok``; 0 elsewhere
    and on rows without one, whose lse is -inf), normalised by the sum after the row's
    maximum is subtracted (exp(s - lse) loses log(L) where every logit is large)."""
    s = s.masked_fill(~ok, float("-inf"))
    if s.shape[-1] == 0:
        return s, s.new_full(s.shape[:-1], float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)  # rows without a key
    e = torch.exp(s - m)
    total = e.sum(-1, keepdim=True)
    p = torch.where(total == 0, torch.zeros_like(e), e / total)  # NaN logits stay NaN
    return p, m.squeeze(-1) + torch.log(total.squeeze(-1))  # a tensor of its own, not a view


def gate_factor(gate, packed: bool, dtype):
    """tanh(gate) shaped to multiply a (B, H, L, D) output ((T, H, D) when ``packed``)."""
    c = torch.tanh(gate.to(dtype))
    if c.numel() == 1:
        return c.reshape(())
    return c.reshape(1, c.shape[0], c.shape[1]) if packed else c.reshape(1, c.shape[0], 1, -1)


def _dense_forward(q, k, v, ok, bad, scale, bias=None, gate=None, drop=None):
    """(out, lse); ``drop`` the dropout factor M / (1 - p) of :func:`_dropout` or None."""
    ct = compute_dtype(q.dtype)
    ok = _visible_with_bias(ok, bias)
    p, lse = _softmax(_logits(q, k, scale, bias), ok)
    if drop is not None:
        p = p * drop
    out = torch.matmul(p, _heads(v, q.shape[1]).to(ct))
    if gate is not None:
        out = out * gate_factor(gate, False, ct)
    if bad is not None:
        out = out.masked_fill(bad[..., None], float("nan"))
        lse = lse.masked_fill(bad, float("nan"))
    return out.to(q.dtype), lse.to(ct)


def _dense_backward(do, q, k, v, delta, ok, scale, bias=None, drop=None):
    """(dq, dk, dv, db): db the per-query-head bias gradient sum_i dS (None without bias);
    with dropout (``drop`` = M / (1 - p)) dV = P'^T dO and dP = (dO V^T) M / (1 - p)."""
    ct = compute_dtype(q.dtype)
    h, hk = q.shape[1], k.shape[1]
    qc, doc = q.to(ct), do.to(ct)
    kc, vc = _heads(k, h).to(ct), _heads(v, h).to(ct)
    # P recomputed from the logits (not exp(s - lse): see _softmax)
    p = _softmax(_logits(q, k, scale, bias), _visible_with_bias(ok, bias))[0]
    dv = torch.matmul((p if drop is None else p * drop).transpose(-1, -2), doc)
    dp = torch.matmul(doc, vc.transpose(-1, -2))
    if drop is not None:
        dp = dp * drop
    ds = p * (dp - delta.to(ct)[..., None])
    dq = torch.matmul(ds, kc) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qc) * scale
    db = ds.sum(2) if bias is not None else None
    return (dq.to(q.dtype), _group_sum(dk, hk).to(k.dtype), _group_sum(dv, hk).to(v.dtype),
            db)  # fmt: skip


def _segments(cu):
    bounds = cu.tolist()
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _seg(t, a, b):
    """Rows a..b of a packed (T, H, D) tensor as (1, H, L, D)."""
    return t[a:b].transpose(0, 1)[None]


def _seg_bias(bias, a, b):
    """Keys a..b of a packed (H or 1, Tk) bias as (1, H or 1, L)."""
    return None if bias is None else bias[None, :, a:b]


def forward(q, k, v, cu_q, cu_k, max_lq, max_lk, keep, lo, hi, causal, scale, bias=None,
            gate=None, dropout_p=0.0, seed=None):  # fmt: skip
    """(out, lse): the attention of :mod:`.kernels` (dense or packed)."""
    ct = compute_dtype(q.dtype)
    h = q.shape[1]
    if cu_q is None:
        lq, lk = q.shape[2], k.shape[2]
        ok = visible(lq, lk, keep, lo, hi, causal, q.device)
        drop = _dropout(seed, dropout_p, range(q.shape[0]), h, lq, lk, q.device, ct)
        return _dense_forward(q, k, v, ok, _bad_rows(lo, hi, lq), scale, bias, gate, drop)
    out = torch.zeros_like(q)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=ct, device=q.device)
    for b, ((qa, qb), (ka, kb)) in enumerate(zip(_segments(cu_q), _segments(cu_k), strict=True)):
        if qb == qa or kb == ka:
            continue
        ok = visible(qb - qa, kb - ka, keep, lo, hi, causal, q.device, b)
        drop = _dropout(seed, dropout_p, [b], h, qb - qa, kb - ka, q.device, ct)
        o, s = _dense_forward(_seg(q, qa, qb), _seg(k, ka, kb), _seg(v, ka, kb), ok,
                              _bad_rows(lo, hi, qb - qa, b), scale,
                              _seg_bias(bias, ka, kb), gate, drop)  # fmt: skip
        out[qa:qb] = o[0].transpose(0, 1)
        lse[:, qa:qb] = s[0]
    return out, lse


def delta(out, grad_out, lse, grad_lse):
    """rowsum(dO * O) - dlse per query row in lse's dtype and layout, 0 where lse is not
    finite (:func:`.launchers.delta` without a kernel); None stands for a zero gradient."""
    ct = lse.dtype
    if grad_out is None:
        d = torch.zeros_like(lse)
    else:
        d = (grad_out.to(ct) * out.to(ct)).sum(-1)
        d = d.transpose(0, 1) if out.dim() == 3 else d
    if grad_lse is not None:
        d = d - grad_lse
    return torch.where(torch.isfinite(lse), d, 0.0).contiguous()


def backward(do, q, k, v, lse, delta, cu_q, cu_k, max_lq, max_lk, keep, lo, hi, causal, scale,
             bias=None, dropout_p=0.0, seed=None):  # fmt: skip
    """(dq, dk, dv, db) with ``delta`` = rowsum(dO * O) - dlse, laid out as lse; db the
    per-query-head bias gradient ((B, H, Lk) dense, (H, Tk) packed; None without bias).
    ``lse`` (the op's argument) is not read: P is recomputed from the logits (_softmax)."""
    ct = compute_dtype(q.dtype)
    h = q.shape[1]
    if cu_q is None:
        lq, lk = q.shape[2], k.shape[2]
        ok = visible(lq, lk, keep, lo, hi, causal, q.device)
        drop = _dropout(seed, dropout_p, range(q.shape[0]), h, lq, lk, q.device, ct)
        return _dense_backward(do, q, k, v, delta, ok, scale, bias, drop)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    db = None if bias is None else q.new_zeros((q.shape[1], k.shape[0]), dtype=ct)
    for b, ((qa, qb), (ka, kb)) in enumerate(zip(_segments(cu_q), _segments(cu_k), strict=True)):
        if qb == qa or kb == ka:
            continue
        ok = visible(qb - qa, kb - ka, keep, lo, hi, causal, q.device, b)
        g = _dense_backward(_seg(do, qa, qb), _seg(q, qa, qb), _seg(k, ka, kb),
                            _seg(v, ka, kb), delta[None, :, qa:qb], ok,
                            scale, _seg_bias(bias, ka, kb),
                            _dropout(seed, dropout_p, [b], h, qb - qa, kb - ka, q.device,
                                     ct))  # fmt: skip
        dq[qa:qb] = g[0][0].transpose(0, 1)
        dk[ka:kb] = g[1][0].transpose(0, 1)
        dv[ka:kb] = g[2][0].transpose(0, 1)
        if db is not None:
            db[:, ka:kb] = g[3][0]
    return dq, dk, dv, db


def key_mass(q, k, lse, causal, scale, row_first, row_last, weight, bias=None):
    """(B, H, Lk): ``weight`` x sum over rows row_first <= i < row_last of P[b, h, i, :]."""
    ct = compute_dtype(q.dtype)
    lq, lk = q.shape[2], k.shape[2]
    s = _logits(q[:, :, row_first:row_last], k, scale, bias)
    ls = lse[:, :, row_first:row_last].to(ct)
    ok = visible(lq, lk, None, None, None, causal, q.device)[:, :, row_first:row_last]
    ok = _visible_with_bias(ok & (ls != float("-inf"))[..., None], bias)  # a NaN row stays NaN
    p = _softmax(s, ok)[0]
    return (p.sum(dim=2) * weight).to(ct)

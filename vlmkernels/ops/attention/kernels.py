"""The attention family's Triton kernels: one flash-style core (forward, split-K combine,
backward) and the per-key attention mass.

Every kernel sees the same problem: batch b, head h, query rows i < Lq_b and keys
j < Lk_b of segment b (dense inputs: every segment has Lq and Lk rows; packed inputs: the
rows cu_seqlens[b] .. cu_seqlens[b + 1] of a (T, H, D) tensor). Query row i sees the keys
lo_i <= j < hi_i that the optional key-keep row of b allows, where

- plain: lo = 0, hi = Lk_b;
- causal (aligned to the bottom-right, as flash-attention): lo = 0, hi = i + Lk_b - Lq_b + 1
  (clamped to [0, Lk_b]);
- ranges (media-masked attention): lo, hi loaded from (B, Lq) int32 rows; a row with
  lo > hi has no answer and gives NaN.

Grouped-query attention: q has H heads, k and v H / G (G the group); query head h reads
key/value head h // G. A per-key additive bias (``BIAS``: bias[b, h, j], fp32 after the
load, a zero head stride when shared by the heads) is added to the scaled logits.

Tanh gate (``GATE``, Flamingo): the output is tanh(gate) * out, the gate a scalar or one
value per (head, channel) (strides sgh, sgd; 0 for a scalar), applied in the forward's
epilogue (the combine's under split-K); lse is not gated.

All scores, the online softmax and the accumulators are fp32; scores are kept in base 2
(s * scale * log2(e)) so the exponentials are ``exp2``. A row with no visible key gives an
output of 0 and a log-sum-exp of -inf.

Split-K: with SPLIT the key blocks of a query block are shared between ``n_splits``
programs, each writing its normalised partial output and log-sum-exp to fp32 workspaces,
which :func:`_attn_combine` merges (lse = log sum_s exp(lse_s), out = sum_s exp(lse_s -
lse) out_s).

Backward (flash-attention 2): with delta_i = sum_d dO_id O_id - dlse_i and
P = exp(S - lse) recomputed from the saved lse,
dV = P^T dO, dS = P * (dO V^T - delta), dQ = scale dS K, dK = scale dS^T Q,
dbias[b, h, j] = sum_i dS_ij; with grouped queries dK and dV sum over the G query heads
of a key/value head, which the key block's one program visits in turn (deterministic).

Attention dropout (``DROPOUT``, training): P' = P * M / (1 - p), M[b, h, i, j] a Bernoulli
(1 - p) draw regenerated wherever it is needed, never stored (:func:`_dropout_keep`):
Philox4x32-10 keyed by a 64-bit seed loaded from ``seed_ptr`` (one draw from the device's
torch generator per call), its four 32-bit counters (j // 4, i, h, b) (segment-local key
group and row, query head, batch or segment: no index arithmetic that can overflow), its
four outputs the draws of keys 4 (j // 4) + 0 .. 3; an element is kept when the top 31
bits of its draw are >= ``drop_thr`` = round(p 2^31). The
forward accumulates P' V over the undropped normaliser (each split the same, so split-K
and its combine are unchanged); the backward uses dV = P'^T dO, dP = (dO V^T) M / (1 - p),
dS = P * (dP - delta) with delta = rowsum(dO * O) - dlse of the dropped output O.
:func:`_attn_bwd_kv` runs one program per key block and key/value head (looping over the
group's heads and the query blocks; dbias per query head),
:func:`_attn_bwd_q` one per query block (looping over key blocks), so nothing is atomic.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ...core.tuning import tuned
from .spaces import (
    _BWD32_BIAS_GQA_CONFIGS,
    _BWD32_CONFIGS,
    _BWD_BIAS_CONFIGS,
    _BWD_CONFIGS,
    _BWD_GQA_CONFIGS,
    _COMBINE_CONFIGS,
    _FWD32_CONFIGS,
    _FWD32_DROPOUT_CONFIGS,
    _FWD_CONFIGS,
    _KEY,
    _SIZES,
)

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# a key whose bias in base 2 is at most this is masked (its logit -inf): -inf, finfo.min,
# -1e9, -1e30 masks. fp32 cannot resolve a row whose every logit is that low (log2 of its
# sum is lost in its lse), so such a row is treated as a fully padded one: 0, no gradient
MASKED_BIAS = tl.constexpr(-16777216.0)  # -2^24


# fmt: off
@triton.jit
def _at(ptr, b, h, r, sb, sh, sr):
    """ptr + b sb + h sh + r sr in 64-bit arithmetic."""
    off = tl.cast(b, tl.int64) * sb + tl.cast(h, tl.int64) * sh
    return ptr + off + tl.cast(r, tl.int64) * sr


@triton.jit
def _grid_bh():
    """The (batch, head) index of this program: grid y, plus grid z times the y extent
    when batch x heads passes CUDA's y limit of 65,535 (the launchers fold the rest into
    z; programs past batch x heads exit)."""
    return tl.program_id(1) + tl.program_id(2) * tl.num_programs(1)


@triton.jit
def _segment(cu_q_ptr, cu_k_ptr, b, max_lq, max_lk, VARLEN: tl.constexpr):
    """(first query row, Lq_b, first key row, Lk_b) of segment b."""
    if VARLEN:
        q0 = tl.load(cu_q_ptr + b)
        lq = tl.load(cu_q_ptr + b + 1) - q0
        k0 = tl.load(cu_k_ptr + b)
        lk = tl.load(cu_k_ptr + b + 1) - k0
    else:
        q0 = 0
        lq = max_lq
        k0 = 0
        lk = max_lk
    return q0, lq, k0, lk


@triton.jit
def _row_ranges(lo_ptr, hi_ptr, b, srow, rows, row_ok, lq, lk,
                CAUSAL: tl.constexpr, RANGES: tl.constexpr):
    """[lo, hi): the keys each query row of ``rows`` sees (see the module docstring)."""
    if RANGES:
        base = tl.cast(b, tl.int64) * srow
        lo = tl.load(lo_ptr + base + rows, mask=row_ok, other=0)
        hi = tl.load(hi_ptr + base + rows, mask=row_ok, other=0)
    elif CAUSAL:
        lo = rows * 0
        hi = tl.minimum(tl.maximum(rows + (lk - lq) + 1, 0), lk)
    else:
        lo = rows * 0
        hi = rows * 0 + lk
    return lo, hi


@triton.jit
def _block_span(lo, hi, row_ok, lk, BN: tl.constexpr):
    """[first, last): the key blocks that the rows' ranges touch."""
    live = row_ok & (hi > lo)
    lo_min = tl.min(tl.where(live, lo, lk), axis=0)
    hi_max = tl.max(tl.where(live, hi, 0), axis=0)
    first = lo_min // BN
    last = tl.maximum(tl.cdiv(hi_max, BN), first)
    return first, last


@triton.jit
def _dim_mask(d, D, EVEN_D: tl.constexpr):
    """Lanes of the head dim inside D: a constant True when D == BLOCK_D, which keeps
    loads vectorised (16-bit tiles are then loaded asynchronously, pipelined)."""
    if EVEN_D:
        ok = tl.full(d.shape, 1, tl.int1)
    else:
        ok = d < D
    return ok


@triton.jit
def _load_tile(ptr, rows, row_ok, d, d_ok, srow, sd, DOT_FP32: tl.constexpr):
    """A (rows, BLOCK_D) tile, zero outside; fp32 when DOT_FP32."""
    x = tl.load(ptr + rows[:, None] * srow + d[None, :] * sd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_FP32:
        x = x.to(tl.float32)
    return x


@triton.jit
def _visible(rows, row_ok, cols, col_ok, lo, hi, keep_ptr, keep_base, KEEP: tl.constexpr):
    """(BM, BN): whether query row i sees key j."""
    ok = row_ok[:, None] & col_ok[None, :]
    ok = ok & (cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None])
    if KEEP:
        keep = tl.load(keep_ptr + keep_base + cols, mask=col_ok, other=0)
        ok = ok & (keep != 0)[None, :]
    return ok


@triton.jit
def _lse_shift(lse):
    """The rows' lse in base 2, +inf where it is -inf (a row without a visible key: every
    key padded or masked by its bias), so that exp2(s - shift) is 0 there, not NaN."""
    return tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)


@triton.jit
def _bias_row(bias_ptr, bias_base, cols, col_ok, BIAS: tl.constexpr):
    """(BN,) the keys' bias in base 2 (bias * log2(e)), fp32, -inf where it masks its key
    (at most :data:`MASKED_BIAS`; a NaN bias stays NaN, as in eager attention); 0 without
    BIAS."""
    if BIAS:
        bias = tl.load(bias_ptr + bias_base + cols, mask=col_ok, other=0.0).to(tl.float32)
        bias = bias * LOG2E
        bias = tl.where(bias <= MASKED_BIAS, float("-inf"), bias)
    else:
        bias = tl.zeros(cols.shape, tl.float32)
    return bias


@triton.jit
def _tanh_gate(gate_ptr, h, d, d_ok, sgh, sgd):
    """(BLOCK_D,) tanh(gate[h, d]) in fp32: an odd series below |x| = 0.1 (no cancellation
    near the gates' initial 0), else 1 - 2 / (e^(2|x|) + 1) with the sign."""
    x = tl.load(gate_ptr + tl.cast(h, tl.int64) * sgh + d * sgd, mask=d_ok, other=0.0)
    x = x.to(tl.float32)
    a = tl.abs(x)
    x2 = x * x
    series = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0))))
    # NaN must stay NaN: tl.minimum drops it by default (fminf), which made tanh(NaN) = 1
    big = 1.0 - 2.0 / (tl.math.exp2(tl.minimum(a, 30.0, propagate_nan=tl.PropagateNan.ALL)
                                    * (2.0 * LOG2E)) + 1.0)
    return tl.where(a < 0.1, series, tl.where(x < 0, -big, big))


@triton.jit
def _dropout_keep(seed, b, h, rows, col0, drop_thr, BN: tl.constexpr):
    """(BM, BN) bool: whether dropout keeps P[b, h, i, j] for the ``rows`` i and the keys
    j = col0 + 0 .. BN - 1 (col0 a multiple of 4; see the module docstring): one
    Philox4x32-10 call (key ``seed``, counters (j // 4, i, h, b)) gives the 31-bit draws of
    keys 4 (j // 4) + 0 .. 3, its four outputs in order."""
    zero = tl.zeros((rows.shape[0], BN // 4), tl.uint32)
    c0 = zero + (col0 // 4 + tl.arange(0, BN // 4)).to(tl.uint32)[None, :]
    c1 = zero + rows.to(tl.uint32)[:, None]
    c2 = zero + tl.cast(h, tl.uint32)
    c3 = zero + tl.cast(b, tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c3)
    # [i, g, y, x] = r_(2 y + x): key 4 g + 2 y + x once reshaped
    r = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (rows.shape[0], BN))
    return (r >> 1).to(tl.int32, bitcast=True) >= drop_thr


@triton.jit
def _dropout_mask_kernel(seed_ptr, mask_ptr, H, lq, lk, drop_thr, smb, smh, smm,
                         BM: tl.constexpr, BN: tl.constexpr):
    """mask[b, h, i, j] = :func:`_dropout_keep` (uint8) for one (BM, BN) tile: the mask the
    attention kernels regenerate, materialised for tests and debugging."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    bh = tl.program_id(2)
    b = bh // H
    h = bh % H
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    keep = _dropout_keep(tl.load(seed_ptr), b, h, rows, pid_n * BN, drop_thr, BN)
    base = mask_ptr + tl.cast(b, tl.int64) * smb + tl.cast(h, tl.int64) * smh
    tl.store(base + tl.cast(rows, tl.int64)[:, None] * smm + cols[None, :], keep.to(tl.uint8),
             mask=(rows < lq)[:, None] & (cols < lk)[None, :])


@triton.jit
def _inner_blocks(lo, hi, row_ok, first, last, lk, KEEP: tl.constexpr, RANGES: tl.constexpr,
                  BN: tl.constexpr):
    """[inner, outer) within [first, last): the key blocks whose every key every row of
    ``rows`` (inside Lq) sees, so no mask applies. Empty where none is, with a key padding
    mask (KEEP), or where a row sees no key: then inner = outer = last with per-row ranges
    (RANGES: masked blocks may come before them too), else = first (every row sees from
    key 0, so the whole range starts at first and only blocks after it are masked)."""
    lo_max = tl.max(tl.where(row_ok, lo, 0), axis=0)
    hi_min = tl.min(tl.where(row_ok, tl.minimum(hi, lk), lk), axis=0)
    inner = tl.maximum(tl.cdiv(lo_max, BN), first)
    outer = tl.minimum(hi_min // BN, last)
    if KEEP:
        outer = inner
    if RANGES:
        inner = tl.where(outer > inner, inner, last)
        outer = tl.where(outer > inner, outer, last)
    else:
        outer = tl.where(outer > inner, outer, first)
        inner = first
    return inner, outer


@triton.jit
def _block_logits(q, k_base, v_base, kb, lk, d, d_ok, skn, skd, svn, svd, bias_ptr, bias_base,
                  qk_scale, MASK: tl.constexpr, BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
                  INPUT_PRECISION: tl.constexpr, BN: tl.constexpr):
    """(cols, col_ok, K, V, S) of key block ``kb`` for the query tile q: S = q K^T scale
    log2(e) (+ the keys' bias); without MASK the block is whole (col_ok a constant)."""
    cols = kb * BN + tl.arange(0, BN)
    if MASK:
        col_ok = cols < lk
    else:
        col_ok = tl.full((BN,), 1, tl.int1)
    k = _load_tile(k_base, cols, col_ok, d, d_ok, skn, skd, DOT_FP32)
    v = _load_tile(v_base, cols, col_ok, d, d_ok, svn, svd, DOT_FP32)
    s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
    if BIAS:
        s += _bias_row(bias_ptr, bias_base, cols, col_ok, BIAS)[None, :]
    return cols, col_ok, k, v, s


@triton.jit
def _fwd_step(q, k_base, v_base, rows, row_ok, d, d_ok, skn, skd, svn, svd, kb, lk, lo, hi,
              keep_ptr, keep_base, bias_ptr, bias_base, qk_scale, seed, b, h, drop_thr,
              drop_scale, row_base, mass_row, m_i, l_i, acc, MASK: tl.constexpr,
              KEEP: tl.constexpr, BIAS: tl.constexpr, DROPOUT: tl.constexpr, ROW: tl.constexpr,
              DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr, BN: tl.constexpr):
    """(m, l, acc) of the online softmax updated with key block ``kb``; without MASK the
    block is whole and visible to every row (:func:`_inner_blocks`): no mask is built.
    ``ROW``: row ``mass_row``'s logits (base 2, masked ones -inf) are stored at row_base."""
    cols, col_ok, k, v, s = _block_logits(q, k_base, v_base, kb, lk, d, d_ok, skn, skd, svn,
                                          svd, bias_ptr, bias_base, qk_scale, MASK, BIAS,
                                          DOT_FP32, INPUT_PRECISION, BN)
    if MASK:
        ok = _visible(rows, row_ok, cols, col_ok, lo, hi, keep_ptr, keep_base, KEEP)
        s = tl.where(ok, s, float("-inf"))
    if ROW:  # a masked store of the tile: no cross-thread reduction, no barrier in the loop
        tl.store(row_base + cols[None, :] + rows[:, None] * 0, s,
                 mask=(rows == mass_row)[:, None] & col_ok[None, :])
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if DROPOUT:  # the normaliser keeps every key; the values see P' = P M / (1 - p)
        keep = _dropout_keep(seed, b, h, rows, kb * BN, drop_thr, BN)
        p = tl.where(keep, p * drop_scale, 0.0)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=INPUT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _fwd(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, cu_q_ptr, cu_k_ptr, keep_ptr, lo_ptr, hi_ptr,
    bias_ptr, gate_ptr, seed_ptr, row_ptr, max_lq, max_lk, H, G, D, sm_scale, n_splits,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sob, soh, som, sod, sos, slb, slh, slm, sls, skeep, srow, sbb, sbh, sgh, sgd,
    drop_thr, drop_scale, mass_row, srb, srh, BH,
    VARLEN: tl.constexpr, CAUSAL: tl.constexpr, KEEP: tl.constexpr, RANGES: tl.constexpr,
    BIAS: tl.constexpr, GATE: tl.constexpr, SPLIT: tl.constexpr, DROPOUT: tl.constexpr,
    ROW: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr,
):
    """One (query block, batch x head, split) program: out, lse of its rows (or, with
    SPLIT, the partial out and lse over its share of the key blocks); ``ROW`` (dense):
    also the logits of query row ``mass_row`` over the program's key blocks, into
    row_ptr[b, h, :] (strides srb, srh; keys no block visits keep what is there)."""
    pid_m = tl.program_id(0)
    # BH = batch x heads; past the grid's y limit the rest go to z (:func:`_grid_bh`), which
    # with SPLIT also holds the split: z = (bh // y extent) n_splits + split
    if SPLIT:
        split = tl.program_id(2) % n_splits
        bh = tl.program_id(1) + tl.program_id(2) // n_splits * tl.num_programs(1)
    else:
        split = 0
        bh = _grid_bh()
    if bh >= BH:
        return
    b = bh // H
    h = bh % H
    q0, lq, k0, lk = _segment(cu_q_ptr, cu_k_ptr, b, max_lq, max_lk, VARLEN)
    if pid_m * BM >= lq:
        return
    rows = pid_m * BM + tl.arange(0, BM)
    row_ok = rows < lq
    d = tl.arange(0, BLOCK_D)
    d_ok = _dim_mask(d, D, EVEN_D)
    q_base = _at(q_ptr, b, h, q0, sqb, sqh, sqm)
    k_base = _at(k_ptr, b, h // G, k0, skb, skh, skn)
    v_base = _at(v_ptr, b, h // G, k0, svb, svh, svn)
    keep_base = tl.cast(b, tl.int64) * skeep
    bias_base = tl.cast(b, tl.int64) * sbb + tl.cast(h, tl.int64) * sbh + k0
    row_base = row_ptr + (tl.cast(b, tl.int64) * srb + tl.cast(h, tl.int64) * srh)
    q = _load_tile(q_base, rows, row_ok, d, d_ok, sqm, sqd, DOT_FP32)
    lo, hi = _row_ranges(lo_ptr, hi_ptr, b, srow, rows, row_ok, lq, lk, CAUSAL, RANGES)
    first, last = _block_span(lo, hi, row_ok, lk, BN)
    if SPLIT:
        per = tl.cdiv(last - first, n_splits)
        first = first + split * per
        last = tl.minimum(first + per, last)
    qk_scale = sm_scale * LOG2E
    seed = 0
    if DROPOUT:
        seed = tl.load(seed_ptr)
    m_i = tl.full((BM,), float("-inf"), tl.float32)
    l_i = tl.zeros((BM,), tl.float32)
    acc = tl.zeros((BM, BLOCK_D), tl.float32)
    # [inner, outer): key blocks every row of the block sees whole, run without a mask;
    # only per-row ranges (RANGES) can leave masked blocks before them. fp32 inputs keep
    # one masked loop: with their tf32x3 tiles a second loop's state spilled (sm_90a).
    inner, outer = first, first
    if INPUT_PRECISION != "tf32x3":
        inner, outer = _inner_blocks(lo, hi, row_ok, first, last, lk, KEEP, RANGES, BN)
        if RANGES:
            for kb in range(first, inner):
                m_i, l_i, acc = _fwd_step(q, k_base, v_base, rows, row_ok, d, d_ok, skn, skd,
                                          svn, svd, kb, lk, lo, hi, keep_ptr, keep_base,
                                          bias_ptr, bias_base, qk_scale, seed, b, h, drop_thr,
                                          drop_scale, row_base, mass_row, m_i, l_i, acc, True,
                                          KEEP, BIAS, DROPOUT, ROW, DOT_FP32, INPUT_PRECISION,
                                          BN)
        for kb in range(inner, outer):
            m_i, l_i, acc = _fwd_step(q, k_base, v_base, rows, row_ok, d, d_ok, skn, skd, svn,
                                      svd, kb, lk, lo, hi, keep_ptr, keep_base, bias_ptr,
                                      bias_base, qk_scale, seed, b, h, drop_thr, drop_scale,
                                      row_base, mass_row, m_i, l_i, acc, False, KEEP, BIAS,
                                      DROPOUT, ROW, DOT_FP32, INPUT_PRECISION, BN)
    for kb in range(outer, last):
        m_i, l_i, acc = _fwd_step(q, k_base, v_base, rows, row_ok, d, d_ok, skn, skd, svn,
                                  svd, kb, lk, lo, hi, keep_ptr, keep_base, bias_ptr,
                                  bias_base, qk_scale, seed, b, h, drop_thr, drop_scale,
                                  row_base, mass_row, m_i, l_i, acc, True, KEEP, BIAS, DROPOUT,
                                  ROW, DOT_FP32, INPUT_PRECISION, BN)
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    if RANGES:
        bad = lo > hi
        out = tl.where(bad[:, None], float("nan"), out)
        lse = tl.where(bad, float("nan"), lse)
    if GATE and not SPLIT:  # split partials are gated by the combine
        out = out * _tanh_gate(gate_ptr, h, d, d_ok, sgh, sgd)[None, :]
    o_base = _at(o_ptr, b, h, q0, sob, soh, som)
    l_base = _at(lse_ptr, b, h, q0, slb, slh, slm)
    if SPLIT:
        o_base += tl.cast(split, tl.int64) * sos
        l_base += tl.cast(split, tl.int64) * sls
    tl.store(o_base + rows[:, None] * som + d[None, :] * sod, out.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(l_base + rows * slm, lse, mask=row_ok)


@tuned("attention_combine", configs=_COMBINE_CONFIGS, key=["max_lq", "BLOCK_D"],
       sizes=["max_lq"])
@triton.jit
def _attn_combine(
    ws_ptr, wl_ptr, o_ptr, lse_ptr, cu_q_ptr, gate_ptr, max_lq, H, D, n_splits,
    swb, swh, swm, swd, sws, swlb, swlh, swlm, swls,
    sob, soh, som, sod, slb, slh, slm, sgh, sgd, BH,
    VARLEN: tl.constexpr, GATE: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    BM: tl.constexpr,
):
    """Merges the split partials of :func:`_attn_fwd`: out (times tanh(gate) with GATE),
    lse of one query block."""
    pid_m = tl.program_id(0)
    bh = _grid_bh()
    if bh >= BH:
        return
    b = bh // H
    h = bh % H
    q0, lq, k0, lk = _segment(cu_q_ptr, cu_q_ptr, b, max_lq, 0, VARLEN)
    if pid_m * BM >= lq:
        return
    rows = pid_m * BM + tl.arange(0, BM)
    row_ok = rows < lq
    d = tl.arange(0, BLOCK_D)
    mask = row_ok[:, None] & _dim_mask(d, D, EVEN_D)[None, :]
    w_base = _at(ws_ptr, b, h, q0, swb, swh, swm)
    wl_base = _at(wl_ptr, b, h, q0, swlb, swlh, swlm)
    m = tl.full((BM,), float("-inf"), tl.float32)
    total = tl.zeros((BM,), tl.float32)
    acc = tl.zeros((BM, BLOCK_D), tl.float32)
    for s in range(0, n_splits):
        # split s's partials at s sws, sws q's element count: 64-bit (the i32 product wrapped
        # from (splits - 1) sws = 2^31 on; a pointer or offset stepped by sws spilled)
        s64 = tl.cast(s, tl.int64)
        part = tl.load(wl_base + s64 * swls + rows * swlm, mask=row_ok, other=float("-inf"))
        o_s = tl.load(w_base + s64 * sws + rows[:, None] * swm + d[None, :] * swd, mask=mask,
                      other=0.0)
        m_new = tl.maximum(m, part)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        w = tl.exp(part - m_safe)
        total = total * alpha + w
        acc = acc * alpha[:, None] + w[:, None] * o_s
        m = m_new
    empty = total == 0.0
    t_safe = tl.where(empty, 1.0, total)
    out = acc / t_safe[:, None]
    if GATE:
        out = out * _tanh_gate(gate_ptr, h, d, _dim_mask(d, D, EVEN_D), sgh, sgd)[None, :]
    lse = tl.where(empty, float("-inf"), m + tl.log(t_safe))
    o_base = _at(o_ptr, b, h, q0, sob, soh, som)
    tl.store(o_base + rows[:, None] * som + d[None, :] * sod, out.to(o_ptr.dtype.element_ty),
             mask=mask)
    l_base = _at(lse_ptr, b, h, q0, slb, slh, slm)
    tl.store(l_base + rows * slm, lse, mask=row_ok)


@triton.jit
def _kv_step(q_base, do_base, l_base, dl_base, rows, row_ok, d, d_ok,
             sqm, sqd, sdom, sdod, slm, sdm, k, v, cols, col_ok, lo, hi,
             keep_ptr, keep_base, qk_scale, dk, dv, bias_ptr, bias_base, db,
             seed, b, h, col0, drop_thr, drop_scale, KEEP: tl.constexpr,
             BIAS: tl.constexpr, DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr,
             INPUT_PRECISION: tl.constexpr, BN: tl.constexpr, MASK: tl.constexpr = True):
    """dK, dV (and the bias's column sums of dS) of one key block updated with one query
    block (without MASK: one inside Lq whose every row sees the whole key block)."""
    q = _load_tile(q_base, rows, row_ok, d, d_ok, sqm, sqd, DOT_FP32)
    do = _load_tile(do_base, rows, row_ok, d, d_ok, sdom, sdod, DOT_FP32)
    # rows past Lq: lse +inf (P = 0), dO and delta 0, so they add nothing unmasked too
    lse = tl.load(l_base + rows * slm, mask=row_ok, other=float("inf"))
    delta = tl.load(dl_base + rows * sdm, mask=row_ok, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
    if BIAS:  # reloaded per step (cached): holding it through the loop spilled
        s += _bias_row(bias_ptr, bias_base, cols, col_ok, BIAS)[None, :]
        shift = _lse_shift(lse)  # every key of a row may be masked by its bias
    else:
        shift = lse * LOG2E
    p = tl.math.exp2(s - shift[:, None])
    if MASK:
        ok = _visible(rows, row_ok, cols, col_ok, lo, hi, keep_ptr, keep_base, KEEP)
        p = tl.where(ok, p, 0.0)
    if DROPOUT:  # dV = P'^T dO, dP = (dO V^T) M / (1 - p)
        keep = _dropout_keep(seed, b, h, rows, col0, drop_thr, BN)
        p_drop = tl.where(keep, p * drop_scale, 0.0)
        dv = tl.dot(tl.trans(p_drop.to(do.dtype)), do, dv, input_precision=INPUT_PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
        dp = tl.where(keep, dp * drop_scale, 0.0)
    else:
        dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=INPUT_PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
    ds = p * (dp - delta[:, None])
    dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=INPUT_PRECISION)
    if BIAS:
        db += tl.sum(ds, axis=0)
    return dk, dv, db


@triton.jit
def _inner_rows(pid_n, m_first, lq, lk, CAUSAL: tl.constexpr, KEEP: tl.constexpr,
                RANGES: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """The first query block (on the grid m_first + j BM) from which every row sees all of
    key block ``pid_n`` (with causality, the rows from its last key on); the blocks from
    there run without a mask (rows past Lq and keys past Lk add nothing: their lse reads
    as +inf, their dO and delta as 0, and their dK / dV rows are not stored). Lq (none) with
    a key padding mask (KEEP) or per-row ranges (RANGES)."""
    inner = m_first
    if CAUSAL:
        seen = tl.maximum(pid_n * BN + BN - 1 - (lk - lq) - m_first, 0)
        inner = m_first + tl.cdiv(seen, BM) * BM
    if KEEP or RANGES:
        inner = lq
    return tl.minimum(inner, lq)


@triton.jit
def _kv_block(m0, q_base, do_base, l_base, dl_base, lo_ptr, hi_ptr, b, srow, lq, lk, pid_n, d,
              d_ok, sqm, sqd, sdom, sdod, slm, sdm, k, v, cols, col_ok, keep_ptr, keep_base,
              qk_scale, dk, dv, bias_ptr, bias_base, db, seed, h, drop_thr, drop_scale,
              MASK: tl.constexpr, CAUSAL: tl.constexpr, RANGES: tl.constexpr,
              KEEP: tl.constexpr, BIAS: tl.constexpr, DROPOUT: tl.constexpr,
              DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr, BM: tl.constexpr,
              BN: tl.constexpr):
    """:func:`_kv_step` for the query block m0 .. m0 + BM; with RANGES only where one of
    its rows sees this key block."""
    rows = m0 + tl.arange(0, BM)
    row_ok = rows < lq
    lo, hi = _row_ranges(lo_ptr, hi_ptr, b, srow, rows, row_ok, lq, lk, CAUSAL, RANGES)
    if RANGES:  # arbitrary ranges: visit only the query blocks that see this block
        first, last = _block_span(lo, hi, row_ok, lk, BN)
        if (first <= pid_n) & (pid_n < last):
            dk, dv, db = _kv_step(q_base, do_base, l_base, dl_base, rows, row_ok, d, d_ok,
                                  sqm, sqd, sdom, sdod, slm, sdm, k, v, cols, col_ok, lo, hi,
                                  keep_ptr, keep_base, qk_scale, dk, dv, bias_ptr, bias_base,
                                  db, seed, b, h, pid_n * BN, drop_thr, drop_scale, KEEP,
                                  BIAS, DROPOUT, DOT_FP32, INPUT_PRECISION, BN, MASK)
    else:
        dk, dv, db = _kv_step(q_base, do_base, l_base, dl_base, rows, row_ok, d, d_ok, sqm,
                              sqd, sdom, sdod, slm, sdm, k, v, cols, col_ok, lo, hi, keep_ptr,
                              keep_base, qk_scale, dk, dv, bias_ptr, bias_base, db, seed, b,
                              h, pid_n * BN, drop_thr, drop_scale, KEEP, BIAS, DROPOUT,
                              DOT_FP32, INPUT_PRECISION, BN, MASK)
    return dk, dv, db


@triton.jit
def _bwd_kv(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    cu_q_ptr, cu_k_ptr, keep_ptr, lo_ptr, hi_ptr, bias_ptr, db_ptr, seed_ptr,
    max_lq, max_lk, H, G, D, sm_scale,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sdob, sdoh, sdom, sdod, slb, slh, slm, sdb, sdh, sdm,
    sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd, skeep, srow, sbb, sbh, sdbb, sdbh,
    drop_thr, drop_scale, BH,
    VARLEN: tl.constexpr, CAUSAL: tl.constexpr, KEEP: tl.constexpr, RANGES: tl.constexpr,
    BIAS: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr,
):
    """dK, dV of one key block of key/value head hk, over the G query heads hk G + g and
    the query blocks that see it; with BIAS, dbias[b, h, j] of each of those heads."""
    pid_n = tl.program_id(0)
    bh = _grid_bh()  # BH = batch x key heads here
    if bh >= BH:
        return
    HK = H // G
    b = bh // HK
    hk = bh % HK
    q0, lq, k0, lk = _segment(cu_q_ptr, cu_k_ptr, b, max_lq, max_lk, VARLEN)
    if pid_n * BN >= lk:
        return
    cols = pid_n * BN + tl.arange(0, BN)
    col_ok = cols < lk
    d = tl.arange(0, BLOCK_D)
    d_ok = _dim_mask(d, D, EVEN_D)
    bb = tl.cast(b, tl.int64)
    qq = tl.cast(q0, tl.int64)
    kk = tl.cast(k0, tl.int64)
    k = _load_tile(_at(k_ptr, b, hk, k0, skb, skh, skn), cols, col_ok, d, d_ok, skn, skd,
                   DOT_FP32)
    v = _load_tile(_at(v_ptr, b, hk, k0, svb, svh, svn), cols, col_ok, d, d_ok, svn, svd,
                   DOT_FP32)
    keep_base = bb * skeep
    qk_scale = sm_scale * LOG2E
    seed = 0
    if DROPOUT:
        seed = tl.load(seed_ptr)
    dk = tl.zeros((BN, BLOCK_D), tl.float32)
    dv = tl.zeros((BN, BLOCK_D), tl.float32)
    m_first = 0
    if CAUSAL:
        m_first = tl.maximum(pid_n * BN - (lk - lq), 0) // BM * BM
    for g in range(0, G):
        hh = tl.cast(hk * G + g, tl.int64)
        q_base = q_ptr + bb * sqb + hh * sqh + qq * sqm
        do_base = do_ptr + bb * sdob + hh * sdoh + qq * sdom
        l_base = lse_ptr + bb * slb + hh * slh + qq * slm
        dl_base = delta_ptr + bb * sdb + hh * sdh + qq * sdm
        bias_base = bb * sbb + hh * sbh + kk
        db = tl.zeros((BN,), tl.float32)
        # from inner on the query blocks see this key block whole and run without a mask
        # (no branch in the loops: the loads are pipelined)
        inner = _inner_rows(pid_n, m_first, lq, lk, CAUSAL, KEEP, RANGES, BM, BN)
        for m0 in range(inner, lq, BM):
            dk, dv, db = _kv_block(m0, q_base, do_base, l_base, dl_base, lo_ptr, hi_ptr, b,
                                   srow, lq, lk, pid_n, d, d_ok, sqm, sqd, sdom, sdod, slm,
                                   sdm, k, v, cols, col_ok, keep_ptr, keep_base, qk_scale, dk,
                                   dv, bias_ptr, bias_base, db, seed, hk * G + g, drop_thr,
                                   drop_scale, False, CAUSAL, RANGES, KEEP, BIAS, DROPOUT,
                                   DOT_FP32, INPUT_PRECISION, BM, BN)
        for m0 in range(m_first, inner, BM):
            dk, dv, db = _kv_block(m0, q_base, do_base, l_base, dl_base, lo_ptr, hi_ptr, b,
                                   srow, lq, lk, pid_n, d, d_ok, sqm, sqd, sdom, sdod, slm,
                                   sdm, k, v, cols, col_ok, keep_ptr, keep_base, qk_scale, dk,
                                   dv, bias_ptr, bias_base, db, seed, hk * G + g, drop_thr,
                                   drop_scale, True, CAUSAL, RANGES, KEEP, BIAS, DROPOUT,
                                   DOT_FP32, INPUT_PRECISION, BM, BN)
        if BIAS:
            tl.store(db_ptr + bb * sdbb + hh * sdbh + kk + cols, db, mask=col_ok)
    dk = dk * sm_scale
    mask = col_ok[:, None] & d_ok[None, :]
    hkk = tl.cast(hk, tl.int64)
    dk_base = dk_ptr + bb * sdkb + hkk * sdkh + kk * sdkn
    dv_base = dv_ptr + bb * sdvb + hkk * sdvh + kk * sdvn
    tl.store(dk_base + cols[:, None] * sdkn + d[None, :] * sdkd,
             dk.to(dk_ptr.dtype.element_ty), mask=mask)
    tl.store(dv_base + cols[:, None] * sdvn + d[None, :] * sdvd,
             dv.to(dv_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _q_step(q, do, lse2, delta, rows, row_ok, d, d_ok, k_base, v_base, skn, skd, svn, svd, kb,
            lk, lo, hi, keep_ptr, keep_base, bias_ptr, bias_base, qk_scale, seed, b, h,
            drop_thr, drop_scale, dq, MASK: tl.constexpr, KEEP: tl.constexpr,
            BIAS: tl.constexpr, DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr,
            INPUT_PRECISION: tl.constexpr, BN: tl.constexpr):
    """dQ of one query block updated with key block ``kb`` (without MASK: a block every row
    sees whole, :func:`_inner_blocks`)."""
    cols, col_ok, k, v, s = _block_logits(q, k_base, v_base, kb, lk, d, d_ok, skn, skd, svn,
                                          svd, bias_ptr, bias_base, qk_scale, MASK, BIAS,
                                          DOT_FP32, INPUT_PRECISION, BN)
    p = tl.math.exp2(s - lse2[:, None])
    if MASK:
        ok = _visible(rows, row_ok, cols, col_ok, lo, hi, keep_ptr, keep_base, KEEP)
        p = tl.where(ok, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
    if DROPOUT:
        keep = _dropout_keep(seed, b, h, rows, kb * BN, drop_thr, BN)
        dp = tl.where(keep, dp * drop_scale, 0.0)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=INPUT_PRECISION)


@triton.jit
def _bwd_q(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    cu_q_ptr, cu_k_ptr, keep_ptr, lo_ptr, hi_ptr, bias_ptr, seed_ptr,
    max_lq, max_lk, H, G, D, sm_scale,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sdob, sdoh, sdom, sdod, slb, slh, slm, sdb, sdh, sdm,
    sdqb, sdqh, sdqm, sdqd, skeep, srow, sbb, sbh, drop_thr, drop_scale, BH,
    VARLEN: tl.constexpr, CAUSAL: tl.constexpr, KEEP: tl.constexpr, RANGES: tl.constexpr,
    BIAS: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr,
):
    """dQ of one query block, over the key blocks it sees."""
    pid_m = tl.program_id(0)
    bh = _grid_bh()
    if bh >= BH:
        return
    b = bh // H
    h = bh % H
    q0, lq, k0, lk = _segment(cu_q_ptr, cu_k_ptr, b, max_lq, max_lk, VARLEN)
    if pid_m * BM >= lq:
        return
    rows = pid_m * BM + tl.arange(0, BM)
    row_ok = rows < lq
    d = tl.arange(0, BLOCK_D)
    d_ok = _dim_mask(d, D, EVEN_D)
    bb = tl.cast(b, tl.int64)
    hh = tl.cast(h, tl.int64)
    qq = tl.cast(q0, tl.int64)
    kk = tl.cast(k0, tl.int64)
    q = _load_tile(_at(q_ptr, b, h, q0, sqb, sqh, sqm), rows, row_ok, d, d_ok, sqm, sqd,
                   DOT_FP32)
    do = _load_tile(_at(do_ptr, b, h, q0, sdob, sdoh, sdom), rows, row_ok, d, d_ok, sdom,
                    sdod, DOT_FP32)
    lse = tl.load(_at(lse_ptr, b, h, q0, slb, slh, slm) + rows * slm, mask=row_ok, other=0.0)
    delta = tl.load(_at(delta_ptr, b, h, q0, sdb, sdh, sdm) + rows * sdm, mask=row_ok,
                    other=0.0)
    if BIAS:  # every key of a row may be masked by its bias
        lse2 = _lse_shift(lse)
    else:
        lse2 = lse * LOG2E
    hkk = tl.cast(h // G, tl.int64)
    k_base = k_ptr + bb * skb + hkk * skh + kk * skn
    v_base = v_ptr + bb * svb + hkk * svh + kk * svn
    keep_base = bb * skeep
    bias_base = bb * sbb + hh * sbh + kk
    lo, hi = _row_ranges(lo_ptr, hi_ptr, b, srow, rows, row_ok, lq, lk, CAUSAL, RANGES)
    first, last = _block_span(lo, hi, row_ok, lk, BN)
    qk_scale = sm_scale * LOG2E
    seed = 0
    if DROPOUT:
        seed = tl.load(seed_ptr)
    dq = tl.zeros((BM, BLOCK_D), tl.float32)
    # [inner, outer): as in the forward pass (:func:`_fwd`); with dropout one masked loop
    # (a second loop's state spilled 40 B per thread on sm_90a beside the Philox draws)
    inner, outer = first, first
    if not DROPOUT:
        inner, outer = _inner_blocks(lo, hi, row_ok, first, last, lk, KEEP, RANGES, BN)
        if RANGES:
            for kb in range(first, inner):
                dq = _q_step(q, do, lse2, delta, rows, row_ok, d, d_ok, k_base, v_base, skn,
                             skd, svn, svd, kb, lk, lo, hi, keep_ptr, keep_base, bias_ptr,
                             bias_base, qk_scale, seed, b, h, drop_thr, drop_scale, dq, True,
                             KEEP, BIAS, DROPOUT, DOT_FP32, INPUT_PRECISION, BN)
        for kb in range(inner, outer):
            dq = _q_step(q, do, lse2, delta, rows, row_ok, d, d_ok, k_base, v_base, skn, skd,
                         svn, svd, kb, lk, lo, hi, keep_ptr, keep_base, bias_ptr, bias_base,
                         qk_scale, seed, b, h, drop_thr, drop_scale, dq, False, KEEP, BIAS,
                         DROPOUT, DOT_FP32, INPUT_PRECISION, BN)
    for kb in range(outer, last):
        dq = _q_step(q, do, lse2, delta, rows, row_ok, d, d_ok, k_base, v_base, skn, skd,
                     svn, svd, kb, lk, lo, hi, keep_ptr, keep_base, bias_ptr, bias_base,
                     qk_scale, seed, b, h, drop_thr, drop_scale, dq, True, KEEP, BIAS,
                     DROPOUT, DOT_FP32, INPUT_PRECISION, BN)
    dq = dq * sm_scale
    dq_base = dq_ptr + bb * sdqb + hh * sdqh + qq * sdqm
    tl.store(dq_base + rows[:, None] * sdqm + d[None, :] * sdqd, dq.to(dq_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


# fmt: on


_attn_fwd = tuned("attention_fwd", configs=_FWD_CONFIGS, key=_KEY, sizes=_SIZES)(_fwd)
_attn_fwd32 = tuned("attention_fwd_fp32", configs=_FWD32_CONFIGS, key=_KEY, sizes=_SIZES)(_fwd)
_attn_fwd32_dropout = tuned("attention_fwd_fp32_dropout", configs=_FWD32_DROPOUT_CONFIGS,
                            key=_KEY, sizes=_SIZES)(_fwd)  # fmt: skip
_attn_bwd_kv = tuned("attention_bwd_kv", configs=_BWD_CONFIGS, key=_KEY, sizes=_SIZES)(_bwd_kv)
_attn_bwd_kv32 = tuned("attention_bwd_kv_fp32", configs=_BWD32_CONFIGS, key=_KEY,
                       sizes=_SIZES)(_bwd_kv)  # fmt: skip
_attn_bwd_kv_bias = tuned("attention_bwd_kv_bias", configs=_BWD_BIAS_CONFIGS, key=_KEY,
                          sizes=_SIZES)(_bwd_kv)  # fmt: skip
_attn_bwd_kv_gqa = tuned("attention_bwd_kv_gqa", configs=_BWD_GQA_CONFIGS, key=_KEY,
                         sizes=_SIZES)(_bwd_kv)  # fmt: skip
_attn_bwd_kv32_bias_gqa = tuned("attention_bwd_kv_fp32_bias_gqa",
                                configs=_BWD32_BIAS_GQA_CONFIGS, key=_KEY,
                                sizes=_SIZES)(_bwd_kv)  # fmt: skip
_attn_bwd_q = tuned("attention_bwd_q", configs=_BWD_CONFIGS, key=_KEY, sizes=_SIZES)(_bwd_q)
_attn_bwd_q32 = tuned("attention_bwd_q_fp32", configs=_BWD32_CONFIGS, key=_KEY,
                      sizes=_SIZES)(_bwd_q)  # fmt: skip

# (16-bit inputs, fp32 inputs) kernels of each core pass
FWD = (_attn_fwd, _attn_fwd32)
BWD_Q = (_attn_bwd_q, _attn_bwd_q32)
KERNELS = (*FWD, _attn_fwd32_dropout, _attn_combine, _attn_bwd_kv, _attn_bwd_kv32,
           _attn_bwd_kv_bias, _attn_bwd_kv_gqa, _attn_bwd_kv32_bias_gqa, *BWD_Q)  # fmt: skip


def bwd_kv_kernel(fp32: bool, bias: bool, grouped: bool):
    """The dK/dV kernel of a launch: one compiled function, tuned apart (each with its own
    untuned default) for fp32 inputs, a key bias, grouped-query heads (G > 1)."""
    if fp32:
        return _attn_bwd_kv32_bias_gqa if bias or grouped else _attn_bwd_kv32
    if bias:
        return _attn_bwd_kv_bias
    return _attn_bwd_kv_gqa if grouped else _attn_bwd_kv

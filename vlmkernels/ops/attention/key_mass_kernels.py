"""The key mass pass of :func:`vlmkernels.attention` (``key_mass=``): the attention
probability each key receives, summed over a range of query rows, from the saved lse.

mass[b, h, j] = weight * sum_{row_first <= i < row_last} P[b, h, i, j], P recomputed as
2^(s_ij log2(e) - lse_i log2(e)) (the forward's lse is needed first: each row's P is only
known once its normaliser is). One program per (key block, batch x head) loops over the
query blocks; the launcher (:func:`.launchers.key_mass`) averages over heads.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ...core.runtime import autotune_configs
from ...core.tuning import tuned
from .kernels import LOG2E, _bias_row, _dim_mask, _grid_bh, _load_tile, _lse_shift
from .spaces import _C, _INTERP, _KEY, _SIZES

__all__ = ["KERNELS", "_attn_key_mass", "_attn_row_mass"]

_MASS_CONFIGS = autotune_configs(
    [
        _C({"BM": 64, "BN": 64}, num_warps=4, num_stages=2),
        _C({"BM": 16, "BN": 128}, num_warps=4, num_stages=2),
        _C({"BM": 128, "BN": 64}, num_warps=8, num_stages=2),
    ],
    _INTERP,
)


# fmt: off
@triton.jit
def _mass_rows(acc, q_base, l_base, k, bias, m0, row_last, cols, lk, lq, d, d_ok, sqm, sqd, slm,
               qk_scale, MASK: tl.constexpr, BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
               INPUT_PRECISION: tl.constexpr, BM: tl.constexpr):
    """acc + P[rows, cols] for the query rows m0 .. m0 + BM (P = 0 past row_last, whose lse
    reads as -inf; with MASK, 0 where causality hides a key)."""
    rows = m0 + tl.arange(0, BM)
    row_ok = rows < row_last
    q = _load_tile(q_base, rows, row_ok, d, d_ok, sqm, sqd, DOT_FP32)
    lse = tl.load(l_base + rows * slm, mask=row_ok, other=float("-inf"))
    lse2 = _lse_shift(lse)
    s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
    if BIAS:
        s += bias[None, :]
    p = tl.math.exp2(s - lse2[:, None])
    if MASK:
        p = tl.where(cols[None, :] <= rows[:, None] + (lk - lq), p, 0.0)
    return acc + p


@tuned("attention_key_mass", configs=_MASS_CONFIGS, key=_KEY, sizes=_SIZES)
@triton.jit
def _attn_key_mass(
    q_ptr, k_ptr, lse_ptr, bias_ptr, mass_ptr, max_lq, max_lk, H, G, D, sm_scale, row_first,
    row_last, weight, sqb, sqh, sqm, sqd, skb, skh, skn, skd, slb, slh, slm, sbb, sbh,
    smb, smh, BH,
    CAUSAL: tl.constexpr, BIAS: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr,
):
    """mass[b, h, j] = weight * sum_{row_first <= i < row_last} P[b, h, i, j] for one key
    block, P recomputed from the saved lse (rows with lse = -inf contribute nothing).

    P is summed into a (BM, BN) accumulator, reduced over the rows once at the end. Columns
    past lk are computed but never stored. Causal: the query blocks that see none of this
    key block are skipped, and only those the diagonal crosses are masked."""
    pid_n = tl.program_id(0)
    bh = _grid_bh()
    if bh >= BH:
        return
    b = bh // H
    h = bh % H
    lq = max_lq
    lk = max_lk
    cols = pid_n * BN + tl.arange(0, BN)
    col_ok = cols < lk
    d = tl.arange(0, BLOCK_D)
    d_ok = _dim_mask(d, D, EVEN_D)
    bb = tl.cast(b, tl.int64)
    hh = tl.cast(h, tl.int64)
    k = _load_tile(k_ptr + bb * skb + tl.cast(h // G, tl.int64) * skh, cols, col_ok, d, d_ok,
                   skn, skd, DOT_FP32)
    bias = _bias_row(bias_ptr, bb * sbb + hh * sbh, cols, col_ok, BIAS)
    q_base = q_ptr + bb * sqb + hh * sqh
    l_base = lse_ptr + bb * slb + hh * slh
    qk_scale = sm_scale * LOG2E
    acc = tl.zeros((BM, BN), tl.float32)
    first = row_first
    if CAUSAL:
        # row i sees key j where j <= i + lk - lq: rows before the block's first key see
        # none of it, rows from its last key on see all of it
        first = tl.maximum(row_first, pid_n * BN - (lk - lq))
        seen = tl.maximum(pid_n * BN + BN - 1 - (lk - lq) - first, 0)
        full = tl.minimum(first + tl.cdiv(seen, BM) * BM, row_last)
        for m0 in range(first, full, BM):
            acc = _mass_rows(acc, q_base, l_base, k, bias, m0, row_last, cols, lk, lq, d, d_ok,
                             sqm, sqd, slm, qk_scale, True, BIAS, DOT_FP32, INPUT_PRECISION, BM)
        first = tl.maximum(full, first)
    for m0 in range(first, row_last, BM):
        acc = _mass_rows(acc, q_base, l_base, k, bias, m0, row_last, cols, lk, lq, d, d_ok,
                         sqm, sqd, slm, qk_scale, False, BIAS, DOT_FP32, INPUT_PRECISION, BM)
    total = tl.sum(acc, axis=0)
    tl.store(mass_ptr + bb * smb + hh * smh + cols, total * weight, mask=col_ok)
# fmt: on


_ROW_MASS_CONFIGS = autotune_configs(
    [_C({"BN": 1024}, num_warps=4), _C({"BN": 512}, num_warps=4)], _C({"BN": 32}, num_warps=1)
)


# fmt: off
@tuned("attention_row_mass", configs=_ROW_MASS_CONFIGS, key=["H", "max_lk"], sizes=["max_lk"])
@triton.jit
def _attn_row_mass(row_ptr, lse_ptr, mass_ptr, H, max_lk, mass_row, weight, srb, srh, slb, slh,
                   slm, smb, BN: tl.constexpr):
    """mass[b, j] = weight * sum_h 2^(s[b, h, j] - lse[b, h, i] log2(e)) for the row logits
    s of query row i = ``mass_row`` stored by the forward (:func:`.kernels._fwd` with ROW);
    a row whose lse is -inf (no visible key) adds nothing. One program per (key block,
    batch): the key mass of one row without a second pass over K."""
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    b = tl.cast(tl.program_id(1), tl.int64)
    col_ok = cols < max_lk
    total = tl.zeros((BN,), tl.float32)
    for h in range(0, H):
        lse = tl.load(lse_ptr + b * slb + h * slh + mass_row * slm)
        # a row without a visible key (lse -inf) adds 0; a NaN row stays NaN
        shift = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
        s = tl.load(row_ptr + b * srb + h * srh + cols, mask=col_ok, other=float("-inf"))
        total += tl.math.exp2(s - shift)
    tl.store(mass_ptr + b * smb + cols, total * weight, mask=col_ok)
# fmt: on


KERNELS = (_attn_key_mass, _attn_row_mass)

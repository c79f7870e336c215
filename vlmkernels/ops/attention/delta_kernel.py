"""The backward's row term of the attention family, in one pass.

delta_i = sum_d dO_id O_id - dlse_i for each query row i (the log-sum-exp's gradient dlse
where the caller asks for lse's), and 0 where the row's lse is not finite (a row that
sees no key: lse = -inf; a NaN row). The dQ and dK/dV passes read it
(dS = P (dP - delta)). Written out with torch ops it is a cast of dO and of O to fp32, their
product, a sum, a subtraction and a select: six launches and about 30 bytes moved per
element of O for 16-bit inputs; here 4 bytes (dO and O read once) and one launch.

Rows are laid out as lse: dense (B, H, Lq), packed (H, T) read as (1, H, T); O and dO are
addressed through their (batch, head, row, dim) strides (:func:`.launchers._strides`).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ...core.runtime import autotune_configs
from ...core.tuning import tuned
from .spaces import _C

__all__ = ["KERNELS", "_attn_delta"]

# BR rows x 64 channels of O and dO per step; the default holds 16 of each per thread.
# BR = 64 with 4 warps (32 per thread) took 168 registers and spilled 4 B with fp32 inputs
# on Triton 3.6 (the per-element 64-bit addresses), so it is not in the space.
_DELTA_CONFIGS = autotune_configs(
    [
        _C({"BR": 64}, num_warps=8),
        _C({"BR": 32}, num_warps=4),
        _C({"BR": 128}, num_warps=8),
    ],
    _C({"BR": 16}, num_warps=1),
)


# fmt: off
@tuned("attention_delta", configs=_DELTA_CONFIGS, key=["D", "HAS_DO", "HAS_DLSE"], sizes=["D"])
@triton.jit
def _attn_delta(
    o_ptr, do_ptr, lse_ptr, dlse_ptr, delta_ptr, R, NH, NL, D,
    sob, soh, som, sod, sdob, sdoh, sdom, sdod, slb, slh, slm, sgb, sgh, sgm,
    HAS_DO: tl.constexpr, HAS_DLSE: tl.constexpr, BLOCK_D: tl.constexpr, BR: tl.constexpr,
):
    """delta[r] for BR of the R = NB NH NL rows (lse's layout, row r = (b, h, m) with m the
    fastest); without HAS_DO, dO is zero (no gradient reached out), without HAS_DLSE, dlse."""
    r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    ok = r < R
    m = r % NL
    bh = r // NL
    h = bh % NH
    b = bh // NH
    acc = tl.zeros((BR,), tl.float32)
    if HAS_DO:
        o_row = b * sob + h * soh + m * som
        do_row = b * sdob + h * sdoh + m * sdom
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            mask = ok[:, None] & (d < D)[None, :]
            o = tl.load(o_ptr + o_row[:, None] + d[None, :] * sod, mask=mask, other=0.0)
            g = tl.load(do_ptr + do_row[:, None] + d[None, :] * sdod, mask=mask, other=0.0)
            acc += tl.sum(o.to(tl.float32) * g.to(tl.float32), axis=1)
    if HAS_DLSE:
        acc -= tl.load(dlse_ptr + b * sgb + h * sgh + m * sgm, mask=ok, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + b * slb + h * slh + m * slm, mask=ok, other=0.0).to(tl.float32)
    acc = tl.where(tl.abs(lse) < float("inf"), acc, 0.0)  # -inf, +inf and NaN rows: 0
    tl.store(delta_ptr + r, acc, mask=ok)
# fmt: on


KERNELS = (_attn_delta,)

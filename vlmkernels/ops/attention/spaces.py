"""The config spaces of the core attention kernels (:mod:`.kernels`), and the tuning key
and config shorthands they share with :mod:`.key_mass_kernels` (which keeps its two spaces
beside its kernels): a kernel's first config is its untuned default, chosen to compile for
sm_90a without spills (Triton 3.6 and 3.9) for the launches that kernel serves; the comments
say what the others spilled."""

from __future__ import annotations

import triton

from ...core.runtime import autotune_configs

# Two config spaces per core kernel: fp32 inputs (3xTF32 dots) need about three times the
# registers of 16-bit ones, so each first config (the default) compiles for sm_90a without
# spills for its own input dtypes; the launchers pick the kernel by dtype (the dK/dV pass
# also by key bias and grouped heads, :func:`.kernels.bwd_kv_kernel`).
_C = triton.Config
_INTERP = _C({"BM": 16, "BN": 16}, num_warps=1)
_FWD_CONFIGS = autotune_configs(
    [
        _C({"BM": 64, "BN": 64}, num_warps=4, num_stages=3),
        _C({"BM": 64, "BN": 64}, num_warps=8, num_stages=2),
        _C({"BM": 128, "BN": 64}, num_warps=8, num_stages=3),
        _C({"BM": 64, "BN": 128}, num_warps=4, num_stages=2),
        _C({"BM": 32, "BN": 64}, num_warps=4, num_stages=3),
        _C({"BM": 16, "BN": 128}, num_warps=4, num_stages=3),
    ],
    _INTERP,
)
_FWD32_CONFIGS = autotune_configs(
    [
        _C({"BM": 64, "BN": 32}, num_warps=4, num_stages=2),
        _C({"BM": 32, "BN": 32}, num_warps=4, num_stages=2),
        _C({"BM": 16, "BN": 64}, num_warps=4, num_stages=2),
    ],
    _INTERP,
)
# fp32 inputs with dropout: the Philox draws spilled 108 B at BM = 64, BN = 32, 4 warps
# (the first config: 188 registers, no spill; the Q-Former's 32 queries fill BM = 32)
_FWD32_DROPOUT_CONFIGS = autotune_configs(
    [
        _C({"BM": 32, "BN": 32}, num_warps=4, num_stages=2),
        _C({"BM": 64, "BN": 32}, num_warps=8, num_stages=2),
        _C({"BM": 16, "BN": 64}, num_warps=4, num_stages=2),
    ],
    _INTERP,
)
_BWD_CONFIGS = autotune_configs(
    [
        _C({"BM": 64, "BN": 64}, num_warps=4, num_stages=2),
        _C({"BM": 64, "BN": 64}, num_warps=8, num_stages=1),
        _C({"BM": 32, "BN": 64}, num_warps=4, num_stages=2),
        _C({"BM": 64, "BN": 32}, num_warps=4, num_stages=2),
        _C({"BM": 32, "BN": 32}, num_warps=4, num_stages=1),
    ],
    _INTERP,
)
_BWD32_CONFIGS = autotune_configs(
    [
        _C({"BM": 16, "BN": 32}, num_warps=4, num_stages=1),
        _C({"BM": 32, "BN": 32}, num_warps=8, num_stages=1),
        _C({"BM": 16, "BN": 64}, num_warps=4, num_stages=1),
    ],
    _INTERP,
)
# the dK/dV pass with a bias (its column sums of dS) spilled 32 B at BM = BN = 64, 4 warps
_BWD_BIAS_CONFIGS = autotune_configs(
    [
        _C({"BM": 32, "BN": 64}, num_warps=4, num_stages=2),
        _C({"BM": 64, "BN": 64}, num_warps=8, num_stages=1),
        _C({"BM": 64, "BN": 32}, num_warps=4, num_stages=2),
    ],
    _INTERP,
)
# grouped-query heads (G > 1, a runtime loop over the group): with Triton 3.6 the dK/dV
# pass spilled 36 B at BM = BN = 64, 4 warps, 2 stages (255 registers); BM = 32 keeps the
# 64-key block and its pipelined asynchronous loads at 220 registers (204 with 3.9)
_BWD_GQA_CONFIGS = autotune_configs(
    [_BWD_CONFIGS.space[2], *_BWD_CONFIGS.space[:2], *_BWD_CONFIGS.space[3:]], _INTERP
)
# fp32 inputs with a bias or grouped heads: BM = 16, BN = 32, 4 warps spilled 8-24 B (the
# bias's column sums of dS, the group loop; Triton 3.6 and 3.9); 32 x 32 with 8 warps
# uses 172-191 registers without a spill
_BWD32_BIAS_GQA_CONFIGS = autotune_configs(
    [
        _C({"BM": 32, "BN": 32}, num_warps=8, num_stages=1),
        _C({"BM": 16, "BN": 32}, num_warps=4, num_stages=1),
        _C({"BM": 16, "BN": 64}, num_warps=4, num_stages=1),
    ],
    _INTERP,
)
_COMBINE_CONFIGS = autotune_configs(
    [_C({"BM": 32}, num_warps=4), _C({"BM": 64}, num_warps=4)], _C({"BM": 16}, num_warps=1)
)
_KEY = ["max_lq", "max_lk", "BLOCK_D"]
_SIZES = ["max_lq", "max_lk"]

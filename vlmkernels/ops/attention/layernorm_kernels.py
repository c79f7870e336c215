r"""Triton kernels of the Q-Former's output blocks: bias + residual + LayerNorm, forward and
backward, fp32 statistics and arithmetic whatever the storage dtype.

Rows of N features (M rows, any row / column strides), with ``x`` the dense output without
its bias, ``c`` that bias (optional, (N,)) and ``r`` the residual:

    z      = x + c + r
    mean   = sum_j z_j / N,   rstd = 1 / sqrt(sum_j (z_j - mean)^2 / N + eps)
    zhat   = (z - mean) rstd,  y = zhat w + b

Backward, g = dy w:  dz = rstd (g - mean_j(g) - zhat mean_j(g zhat)),
dw = sum_rows dy zhat, db = sum_rows dy (per program partial sums, reduced on the host);
dx = dr = dz and dc = sum_rows dz.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...core.runtime import (
    INTERPRETED,
    autotune_configs,
    cdiv,
    contiguous_vectors,
    device_guard,
    next_pow2,
    sm_count,
)
from ...core.tuning import prepared_cache, tuned
from ...kernels.blocks import tile_offsets

__all__ = ["KERNELS", "add_layernorm_backward", "add_layernorm_forward"]

# BLOCK_N (the whole row, a power of two) is the launcher's; a config picks the rows per
# program. The first is the default: 4 rows of BERT's 768 (1024 lanes) per 8 warps, two
# warps per row (sm_90a backward, bf16 / fp32: 122 / 99 registers with Triton 3.9, 216 / 173
# with 3.6, the GPU machine's; no spill). 8 rows per 8 warps, the earlier default, spills
# 8 B in the 16-bit backward with Triton 3.6 at 255 registers since the rows' offsets are
# 64-bit, and 4 rows per 4 warps spills 24-48 B there; 16 rows per 8 or 16 warps spill with
# both. Static instructions per row and CTA
# are within 7% of each other across the space.
_CONFIGS = autotune_configs(
    [
        triton.Config({"BLOCK_M": 4}, num_warps=8),
        triton.Config({"BLOCK_M": 8}, num_warps=8),
        triton.Config({"BLOCK_M": 4}, num_warps=4),
        triton.Config({"BLOCK_M": 2}, num_warps=4),
        triton.Config({"BLOCK_M": 1}, num_warps=4),
    ],
    triton.Config({"BLOCK_M": 8}, num_warps=4),
)


@triton.jit
def _load_z(x_ptr, c_ptr, r_ptr, rows, cols, mask, sxm, sxn, srm, srn, HAS_C: tl.constexpr):
    """z = x + c + r of a (BLOCK_M, BLOCK_N) tile, in fp32 (0 outside ``mask``); ``cols``
    clamped into [0, N)."""
    x = tl.load(x_ptr + tile_offsets(rows, cols, sxm, sxn), mask=mask, other=0.0)
    r = tl.load(r_ptr + tile_offsets(rows, cols, srm, srn), mask=mask, other=0.0)
    z = x.to(tl.float32) + r.to(tl.float32)
    if HAS_C:
        c = tl.load(c_ptr + cols)  # cols are clamped into [0, N)
        z += tl.where(mask, c.to(tl.float32)[None, :], 0.0)
    return z


@tuned("qformer_add_ln_fwd", configs=_CONFIGS, key=["N", "HAS_C"], sizes=["N"])
@triton.jit
def _add_ln_fwd_kernel(
    x_ptr, c_ptr, r_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr,
    M, N, sxm, sxn, srm, srn, eps,
    HAS_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """y = LayerNorm(x + c + r) of BLOCK_M rows; mean and rstd saved (fp32)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    mask = (rows < M)[:, None] & col_ok[None, :]
    z = _load_z(x_ptr, c_ptr, r_ptr, rows, tl.where(col_ok, cols, 0), mask, sxm, sxn, srm,
                srn, HAS_C)  # fmt: skip
    mean = tl.sum(z, axis=1) / N
    zc = tl.where(mask, z - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(zc * zc, axis=1) / N + eps)
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = zc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(y_ptr + tile_offsets(rows, cols, N, 1), y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + rows, mean, mask=rows < M)
    tl.store(rstd_ptr + rows, rstd, mask=rows < M)


@tuned("qformer_add_ln_bwd", configs=_CONFIGS, key=["N", "HAS_C"], sizes=["N"])
@triton.jit
def _add_ln_bwd_kernel(
    g_ptr, x_ptr, c_ptr, r_ptr, w_ptr, mean_ptr, rstd_ptr, dz_ptr, dw_ptr, db_ptr,
    M, N, sgm, sgn, sxm, sxn, srm, srn,
    HAS_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dz of the row blocks pid, pid + P, ... (P programs); this program's partial sums of
    dw and db over them in row pid of the (P, N) fp32 buffers."""
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK_M
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    safe = tl.where(col_ok, cols, 0)
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(pid * BLOCK_M, M, step):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]
        z = _load_z(x_ptr, c_ptr, r_ptr, rows, safe, mask, sxm, sxn, srm, srn, HAS_C)
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        zhat = tl.where(mask, (z - mean[:, None]) * rstd[:, None], 0.0)
        dy = tl.load(g_ptr + tile_offsets(rows, cols, sgm, sgn), mask=mask, other=0.0)
        dy = dy.to(tl.float32)
        g = dy * w[None, :]
        mg = tl.sum(g, axis=1) / N
        mgz = tl.sum(g * zhat, axis=1) / N
        dz = rstd[:, None] * (g - mg[:, None] - zhat * mgz[:, None])
        tl.store(dz_ptr + tile_offsets(rows, cols, N, 1), dz.to(dz_ptr.dtype.element_ty),
                 mask=mask)  # fmt: skip
        dw += tl.sum(dy * zhat, axis=0)
        db += tl.sum(dy, axis=0)
    tl.store(dw_ptr + pid * N + cols, dw, mask=col_ok)
    tl.store(db_ptr + pid * N + cols, db, mask=col_ok)


KERNELS = (_add_ln_fwd_kernel, _add_ln_bwd_kernel)


_FORWARD_LAUNCHES = prepared_cache()  # (layout of a forward call) -> prepared launch


def add_layernorm_forward(x, c, r, w, b, eps: float):
    """(y (M, N) in x's dtype, mean (M,) fp32, rstd (M,) fp32) for 2-D x, r (any strides)
    and the (N,) vectors c, w, b (read through contiguous copies). The launch is prepared
    once per layout; a call passes the pointers."""
    c, w, b = contiguous_vectors(c, w, b)
    m, n = x.shape
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    mean = torch.empty(m, device=x.device, dtype=torch.float32)
    rstd = torch.empty(m, device=x.device, dtype=torch.float32)
    if m == 0:
        return y, mean, rstd
    key = (x.shape, x.stride(), r.stride(), x.dtype, x.device, c is not None, float(eps))
    run = _FORWARD_LAUNCHES.get(key)
    args = (x, c if c is not None else x, r, w, b, y, mean, rstd)
    if run is None:
        scalars = (m, n, x.stride(0), x.stride(1), r.stride(0), r.stride(1), float(eps))
        run, prepared = _add_ln_fwd_kernel.launcher(
            lambda meta: (cdiv(m, meta["BLOCK_M"]),), (*args, *scalars),
            dict(HAS_C=c is not None, BLOCK_N=next_pow2(n)),
        )  # fmt: skip
        if prepared:
            _FORWARD_LAUNCHES[key] = run
    with device_guard(x):
        run(*args)
    return y, mean, rstd


_BACKWARD_LAUNCHES = prepared_cache()  # (layout of a backward call) -> (launch, programs, ...)


def add_layernorm_backward(grad, x, c, r, w, mean, rstd):
    """(dz (M, N) in x's dtype, dw (N,) fp32, db (N,) fp32): at most 2 programs per SM
    (8 under the interpreter), each looping over its row blocks and writing its partial
    sums of dw and db (every program writes its row: no zeroing). The launch is prepared
    once per layout."""
    c, w = contiguous_vectors(c, w)
    m, n = x.shape
    dz = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0:
        return dz, torch.zeros(n, device=x.device), torch.zeros(n, device=x.device)
    key = (x.shape, x.stride(), r.stride(), grad.stride(), x.dtype, x.device, c is not None)
    plan = _BACKWARD_LAUNCHES.get(key)
    args = (grad, x, c if c is not None else x, r, w, mean, rstd, dz)
    if plan is None:
        plan, prepared = _backward_plan(args, m, n, grad, x, r, c is not None)
        if prepared:
            _BACKWARD_LAUNCHES[key] = plan
    run, programs = plan
    dw = torch.empty((programs, n), device=x.device, dtype=torch.float32)
    db = torch.empty((programs, n), device=x.device, dtype=torch.float32)
    with device_guard(x):
        run(*args, dw, db)
    return dz, dw.sum(0), db.sum(0)


def _backward_plan(args, m, n, grad, x, r, has_c):
    """((launch, programs), prepared?) of a layout (:meth:`TunedKernel.launcher`)."""
    most = 8 if INTERPRETED or x.device.type != "cuda" else 2 * sm_count(x.device)
    scalars = (m, n, grad.stride(0), grad.stride(1), x.stride(0), x.stride(1), r.stride(0),
               r.stride(1))  # fmt: skip
    options = dict(HAS_C=has_c, BLOCK_N=next_pow2(n))
    full = (*args, x, x, *scalars)  # x stands in for dw and db: only pointers
    block_m = _add_ln_bwd_kernel.config(full, options).all_kwargs()["BLOCK_M"]
    programs = min(most, cdiv(m, block_m))
    run, prepared = _add_ln_bwd_kernel.launcher(lambda meta: (programs,), full, options)
    return (run, programs), prepared

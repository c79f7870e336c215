"""The token-compression Triton kernels and their launchers.

- ``_gather_rows_kernel``: out[b, k] = scale * x[b, index[b, k]] (a row of zeros where the
  index is -1): the token selection, its backward (the scatter, as a gather through the
  inverse map) and the block average's backward;
- ``_tome_match_kernel``: ToMe's best match per A token, a GEMM tile of cosine scores per
  (A block, B block) reduced to a running row max and argmax, so the (N/2, N/2) score
  matrix never reaches memory;
- ``_tome_plan_kernel``: ToMe's bookkeeping in one program per sample: the ranking of the
  A tokens by best score, the r merged, every token's output row and the CSR member lists
  of the rows (the stable sorts, scatters and searchsorted of the PyTorch path);
- ``_tome_merge_kernel``: the size-weighted segment mean of the merge (each output row
  reads its members through a CSR list, deterministic, no atomics);
- ``_tome_unmerge_kernel``: the merge's backward per input token (and the sizes' gradient);
- ``_pool_kernel``: the block average (``nn.AvgPool2d`` with stride = kernel, the 2 x 2
  mean among them) and the bilinear resize (align_corners=False) of a token grid, one
  output token per program; ``_pool_bwd_kernel``: the bilinear resize's
  adjoint as a gather, one input token per program (deterministic, no atomics).

Every loaded value is converted to fp32 right after the load; results are rounded once.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ...core.runtime import (
    autotune_configs,
    cdiv,
    device_guard,
    dot_precision,
    grid_fits,
    next_pow2,
)
from ...core.tuning import tuned

# --------------------------------------------------------------------------------------
# Row gather
# --------------------------------------------------------------------------------------

_ROW_CONFIGS = autotune_configs(
    [
        triton.Config({"BLOCK_C": 256}, num_warps=2),
        triton.Config({"BLOCK_C": 512}, num_warps=4),
        triton.Config({"BLOCK_C": 1024}, num_warps=4),
        triton.Config({"BLOCK_C": 128}, num_warps=1),
    ],
    triton.Config({"BLOCK_C": 32}, num_warps=1),
)


@tuned("tokens_gather", configs=_ROW_CONFIGS, key=["K", "C"], sizes=["K", "C"])
@triton.jit
def _gather_rows_kernel(
    x_ptr, idx_ptr, o_ptr, K, C, scale,
    sxb, sxn, sxc, sib, sik, sob, sok,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    """One output row (b, k) per program: o[b, k, :] = scale * x[b, idx[b, k], :], or 0
    where idx[b, k] < 0."""
    t = tl.program_id(0)
    b = t // K
    k = t % K
    src = tl.load(idx_ptr + tl.cast(b, tl.int64) * sib + tl.cast(k, tl.int64) * sik)
    c_valid = tl.where(src >= 0, C, 0)  # a dropped row loads nothing
    x_row = x_ptr + tl.cast(b, tl.int64) * sxb + tl.maximum(src, 0).to(tl.int64) * sxn
    o_row = o_ptr + tl.cast(b, tl.int64) * sob + tl.cast(k, tl.int64) * sok
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        m = c < C
        v = tl.load(x_row + c.to(tl.int64) * sxc, mask=c < c_valid, other=0.0).to(tl.float32)
        tl.store(o_row + c, (v * scale).to(o_ptr.dtype.element_ty), mask=m)


def gather_rows(x: torch.Tensor, index: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """(B, K, C) rows ``scale * x[b, index[b, k]]`` of x (B, N, C), zeros where the index is
    -1; ``index`` (B, K) or (K,) (shared by the batch) int64. Output contiguous."""
    B, _, C = x.shape
    K = index.shape[-1]
    out = torch.empty((B, K, C), dtype=x.dtype, device=x.device)
    if B * K == 0 or C == 0:
        return out
    sib = index.stride(0) if index.dim() == 2 else 0
    with device_guard(x):
        _gather_rows_kernel[(B * K,)](
            x, index, out, K, C, float(scale), *x.stride(), sib, index.stride(-1),
            out.stride(0), out.stride(1),
        )  # fmt: skip
    return out


# --------------------------------------------------------------------------------------
# ToMe: best match per A token
# --------------------------------------------------------------------------------------

_MATCH_CONFIGS = autotune_configs(
    [
        # the default first: no spills with fp32 inputs (tf32x3) either
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    ],
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=1),
)


@tuned("tome_match", configs=_MATCH_CONFIGS, key=["NA", "C", "CLASS_TOKEN"], sizes=["NA", "C"])
@triton.jit
def _tome_match_kernel(
    m_ptr, best_ptr, arg_ptr, NA, NB, C,
    smb, smn, smc,
    CLASS_TOKEN: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """A rows i (tokens 2i) of block ``program_id(0)``, batch ``program_id(1)``:
    best[b, i] = max_j cos(m[2i], m[2j + 1]), arg[b, i] = the lowest j attaining it;
    row 0 gets -inf (and 0) when CLASS_TOKEN; a score involving a metric row of norm 0 (or
    not finite) is -inf."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    base = m_ptr + tl.cast(b, tl.int64) * smb
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < NA
    a_ptrs = base + (2 * rows).to(tl.int64)[:, None] * smn
    kk = tl.arange(0, BLOCK_K)
    # the A rows' norms
    a_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        k = k0 + kk
        a = tl.load(a_ptrs + k[None, :] * smc, mask=row_mask[:, None] & (k < C)[None, :],
                    other=0.0).to(tl.float32)  # fmt: skip
        a_sq += tl.sum(a * a, axis=1)
    # a zero (or non-finite) metric row has no cosine: its scores are -inf
    valid_a = (a_sq > 0.0) & (a_sq < float("inf"))
    inv_a = 1.0 / tl.sqrt(tl.where(valid_a, a_sq, 1.0))
    best = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    arg = tl.zeros((BLOCK_M,), dtype=tl.int32)
    cols0 = tl.arange(0, BLOCK_N)
    for n0 in range(0, NB, BLOCK_N):
        cols = n0 + cols0
        col_mask = cols < NB
        b_ptrs = base + (2 * cols + 1).to(tl.int64)[None, :] * smn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        b_sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, C, BLOCK_K):
            k = k0 + kk
            k_mask = k < C
            a = tl.load(a_ptrs + k[None, :] * smc, mask=row_mask[:, None] & k_mask[None, :],
                        other=0.0)  # fmt: skip
            bt = tl.load(b_ptrs + k[:, None] * smc, mask=k_mask[:, None] & col_mask[None, :],
                         other=0.0)  # fmt: skip
            bf = bt.to(tl.float32)
            b_sq += tl.sum(bf * bf, axis=0)
            if UPCAST:
                acc += tl.dot(a.to(tl.float32), bf, input_precision=PRECISION)
            else:
                acc += tl.dot(a, bt, input_precision=PRECISION)
        valid_b = col_mask & (b_sq > 0.0) & (b_sq < float("inf"))
        s = acc * inv_a[:, None] * (1.0 / tl.sqrt(tl.where(valid_b, b_sq, 1.0)))[None, :]
        s = tl.where(valid_a[:, None] & valid_b[None, :], s, float("-inf"))
        blk_best = tl.max(s, axis=1)
        blk_arg = tl.argmax(s, axis=1).to(tl.int32) + n0  # the lowest column on ties
        better = blk_best > best  # strict: an earlier block keeps its (lower) column on ties
        arg = tl.where(better, blk_arg, arg)
        best = tl.where(better, blk_best, best)
    if CLASS_TOKEN:
        best = tl.where(rows == 0, float("-inf"), best)
        arg = tl.where(rows == 0, 0, arg)
    out = tl.cast(b, tl.int64) * NA + rows
    tl.store(best_ptr + out, best, mask=row_mask)
    tl.store(arg_ptr + out, arg.to(tl.int64), mask=row_mask)


def tome_match(metric: torch.Tensor, class_token: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(best (B, NA) fp32, arg (B, NA) int64) of metric (B, N, C), NA = ceil(N / 2), NB =
    floor(N / 2): each A token's (even positions) best cosine score over the B tokens (odd
    positions) and the B index attaining it (the lowest on ties)."""
    B, N, C = metric.shape
    NA, NB = (N + 1) // 2, N // 2
    best = torch.empty((B, NA), dtype=torch.float32, device=metric.device)
    arg = torch.empty((B, NA), dtype=torch.int64, device=metric.device)
    if B * NA == 0:
        return best, arg
    grid_fits(B, "tome_match", "batch")  # grid y
    upcast, precision = dot_precision(metric.dtype)
    grid = lambda meta: (cdiv(NA, meta["BLOCK_M"]), B)  # noqa: E731
    with device_guard(metric):
        _tome_match_kernel[grid](
            metric, best, arg, NA, NB, C, *metric.stride(),
            CLASS_TOKEN=bool(class_token), UPCAST=upcast, PRECISION=precision,
        )  # fmt: skip
    return best, arg


# --------------------------------------------------------------------------------------
# ToMe: the merge plan (ranking, destinations, CSR lists) in one program per sample
# --------------------------------------------------------------------------------------

_PLAN_CONFIGS = autotune_configs(
    [triton.Config({"BLOCK": 64}, num_warps=4), triton.Config({"BLOCK": 128}, num_warps=8)],
    triton.Config({"BLOCK": 16}, num_warps=1),
)


@tuned("tome_plan", configs=_PLAN_CONFIGS, key=["NA", "CLASS_TOKEN"], sizes=["NA"])
@triton.jit
def _tome_plan_kernel(
    best_ptr, arg_ptr, src_ptr, mem_ptr, off_ptr, N, NA, NB, R,
    CLASS_TOKEN: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Sample b per program; best, arg (B, NA) contiguous; R >= 1. With rank(a) = #{a' :
    best[a'] > best[a] or (best[a'] == best[a] and a' < a)} (a stable descending sort;
    with CLASS_TOKEN, A token 0 ranks last and the others' ranks do not count it),
    the A tokens of rank < R merge into row NA - R + arg[a]; the others take row rank - R
    (by position among themselves with CLASS_TOKEN); B token j takes row NA - R + j. Writes
    src (B, N): each token's row; off (B, N - R + 1) and mem (B, N): the CSR lists of the
    rows, members in position order (those of ``torch.sort(src, stable=True)``). The
    merged set is {a : (best[a], -a) >= (T, -a_T)} (less A token 0 with CLASS_TOKEN), a_T
    the token of rank R - 1, T its score, so the later passes test membership per token;
    every count is an (A block x A block) comparison tile: O(NA^2) per sample, no sort, no
    atomics, deterministic."""
    b64 = tl.cast(tl.program_id(0), tl.int64)
    best_b = best_ptr + b64 * NA
    arg_b = arg_ptr + b64 * NA
    src_b = src_ptr + b64 * N
    mem_b = mem_ptr + b64 * N
    off_b = off_ptr + b64 * (N - R + 1)
    n_unm = NA - R
    lane = tl.arange(0, BLOCK)
    # pass 1: ranks; merged tokens' rows; without CLASS_TOKEN the unmerged rows too
    a_t = -1
    for i0 in range(0, NA, BLOCK):
        rows = i0 + lane
        rmask = rows < NA
        bi = tl.load(best_b + rows, mask=rmask, other=0.0)
        rank = tl.zeros((BLOCK,), dtype=tl.int32)
        for k0 in range(0, NA, BLOCK):
            cols = k0 + lane
            cmask = cols < NA
            bk = tl.load(best_b + cols, mask=cmask, other=0.0)
            ahead = (bk[None, :] > bi[:, None]) | (
                (bk[None, :] == bi[:, None]) & (cols[None, :] < rows[:, None])
            )
            if CLASS_TOKEN:  # A token 0 ranks last: behind every other, ahead of none
                ahead = (ahead & (cols[None, :] != 0)) | (
                    (rows[:, None] == 0) & (cols[None, :] != 0)
                )
            rank += tl.sum((ahead & cmask[None, :]).to(tl.int32), axis=1)
        a_t = tl.maximum(a_t, tl.max(tl.where(rmask & (rank == R - 1), rows, -1), axis=0))
        merged = rank < R
        ai = tl.load(arg_b + rows, mask=rmask, other=0)
        tl.store(src_b + 2 * rows, n_unm + ai, mask=rmask & merged)
        if not CLASS_TOKEN:
            tl.store(src_b + 2 * rows, (rank - R).to(tl.int64), mask=rmask & ~merged)
            tl.store(mem_b + (rank - R), (2 * rows).to(tl.int64), mask=rmask & ~merged)
    t = tl.load(best_b + tl.maximum(a_t, 0))  # a_t >= 0 unless best holds NaN
    # the unmerged rows hold one member each
    for i0 in range(0, n_unm, BLOCK):
        rows = i0 + lane
        tl.store(off_b + rows, rows.to(tl.int64), mask=rows < n_unm)
    tl.store(off_b + (N - R), tl.cast(N, tl.int64))
    # pass 2: A tokens' member slots (and the unmerged rows, by position, with CLASS_TOKEN)
    carry = 0
    for i0 in range(0, NA, BLOCK):
        rows = i0 + lane
        rmask = rows < NA
        bi = tl.load(best_b + rows, mask=rmask, other=0.0)
        ai = tl.load(arg_b + rows, mask=rmask, other=0)
        mi = rmask & ((bi > t) | ((bi == t) & (rows <= a_t))) & ((rows != 0) | (not CLASS_TOKEN))
        if CLASS_TOKEN:
            um = (rmask & ~mi).to(tl.int32)
            pos = carry + tl.cumsum(um, axis=0) - 1
            carry += tl.sum(um, axis=0)
            tl.store(src_b + 2 * rows, pos.to(tl.int64), mask=rmask & ~mi)
            tl.store(mem_b + pos, (2 * rows).to(tl.int64), mask=rmask & ~mi)
        before = tl.zeros((BLOCK,), dtype=tl.int32)
        for k0 in range(0, NA, BLOCK):
            cols = k0 + lane
            cmask = cols < NA
            bk = tl.load(best_b + cols, mask=cmask, other=0.0)
            ak = tl.load(arg_b + cols, mask=cmask, other=0)
            mk = (
                cmask & ((bk > t) | ((bk == t) & (cols <= a_t))) & ((cols != 0) | (not CLASS_TOKEN))
            )
            hit = (ak[None, :] < ai[:, None]) | (
                (ak[None, :] == ai[:, None]) & (cols[None, :] < rows[:, None])
            )
            before += tl.sum((hit & mk[None, :]).to(tl.int32), axis=1)
        slot = n_unm + ai + before + (rows > ai).to(tl.int64)
        tl.store(mem_b + slot, (2 * rows).to(tl.int64), mask=mi)
    # pass 3: B tokens: their rows, the rows' offsets and the B tokens' member slots
    for j0 in range(0, NB, BLOCK):
        js = j0 + lane
        jmask = js < NB
        lower = tl.zeros((BLOCK,), dtype=tl.int32)
        first = tl.zeros((BLOCK,), dtype=tl.int32)
        for k0 in range(0, NA, BLOCK):
            cols = k0 + lane
            cmask = cols < NA
            bk = tl.load(best_b + cols, mask=cmask, other=0.0)
            ak = tl.load(arg_b + cols, mask=cmask, other=0)
            mk = (
                cmask & ((bk > t) | ((bk == t) & (cols <= a_t))) & ((cols != 0) | (not CLASS_TOKEN))
            )
            mk = mk[None, :]
            lower += tl.sum(((ak[None, :] < js[:, None]) & mk).to(tl.int32), axis=1)
            same = (ak[None, :] == js[:, None]) & (cols[None, :] <= js[:, None])
            first += tl.sum((same & mk).to(tl.int32), axis=1)
        start = (n_unm + js + lower).to(tl.int64)
        tl.store(off_b + n_unm + js, start, mask=jmask)
        tl.store(mem_b + start + first, (2 * js + 1).to(tl.int64), mask=jmask)
        tl.store(src_b + 2 * js + 1, (n_unm + js).to(tl.int64), mask=jmask)


def tome_plan(best: torch.Tensor, arg: torch.Tensor, n: int, r: int, class_token: bool):
    """(source (B, N) int64, members (B, N) int64, offsets (B, N - r + 1) int64) of
    :func:`vlmkernels.ops.tokens.reference.tome_plan` (same values, bitwise) in one launch;
    best, arg (B, NA) from :func:`tome_match` (no NaN: it gives -inf for rows without a
    cosine), 1 <= r <= NA - class_token."""
    B, na = best.shape
    dev = best.device
    source = torch.empty((B, n), dtype=torch.int64, device=dev)
    members = torch.empty((B, n), dtype=torch.int64, device=dev)
    offsets = torch.empty((B, n - r + 1), dtype=torch.int64, device=dev)
    if B == 0:
        return source, members, offsets
    best, arg = best.contiguous(), arg.contiguous()
    with device_guard(best):
        _tome_plan_kernel[(B,)](
            best, arg, source, members, offsets, n, na, n // 2, r, CLASS_TOKEN=bool(class_token)
        )
    return source, members, offsets


# --------------------------------------------------------------------------------------
# ToMe: size-weighted merge and its backward
# --------------------------------------------------------------------------------------


# Several output rows per program: with one row each (1-3 members, 1,024 channels) the
# program's fixed cost (its offsets, members and sizes) outweighed its loads, about 480
# static instructions against 87 per member and channel block (sm_90a, bf16).
_MERGE_CONFIGS = autotune_configs(
    [
        triton.Config({"BLOCK_R": 8, "BLOCK_C": 256}, num_warps=4),
        triton.Config({"BLOCK_R": 4, "BLOCK_C": 512}, num_warps=4),
        triton.Config({"BLOCK_R": 16, "BLOCK_C": 128}, num_warps=4),
        triton.Config({"BLOCK_R": 1, "BLOCK_C": 256}, num_warps=2),
    ],
    triton.Config({"BLOCK_R": 4, "BLOCK_C": 32}, num_warps=1),
)


@tuned(
    "tome_merge_rows", configs=_MERGE_CONFIGS, key=["NOUT", "C", "HAS_SIZE"], sizes=["NOUT", "C"]
)
@triton.jit
def _tome_merge_kernel(
    x_ptr, s_ptr, mem_ptr, off_ptr, o_ptr, os_ptr, N, NOUT, C,
    sxb, sxn, sxc, ssb, ssn, smb, sob,
    HAS_SIZE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Output rows r of batch b per program (BLOCK_R of them), each over its members
    i = mem[b, off[b, r] : off[b, r + 1]] in order (rows with fewer members than the
    block's most are masked): o[b, r] = sum_i s_i x[b, i] / S,  os[b, r] = S = sum_i s_i
    (s_i = 1 without sizes)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    b = tl.cast(tl.program_id(1), tl.int64)
    r_ok = r < NOUT
    off = off_ptr + b * sob + r
    start = tl.load(off, mask=r_ok, other=0)
    count = tl.load(off + 1, mask=r_ok, other=0) - start
    most = tl.max(count, axis=0)
    mem = mem_ptr + b * smb + start
    x_b = x_ptr + b * sxb
    s_b = s_ptr + b * ssb
    total = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for t in range(0, most):
        ok = t < count
        if HAS_SIZE:
            i = tl.load(mem + t, mask=ok, other=0)
            total += tl.load(s_b + i * ssn, mask=ok, other=0.0).to(tl.float32)
        else:
            total += tl.where(ok, 1.0, 0.0)
    o_rows = o_ptr + (b * NOUT + r) * C
    norm = tl.where(r_ok, total, 1.0)  # rows past NOUT are not stored
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        m = c < C
        c64 = c.to(tl.int64)
        acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        for t in range(0, most):
            ok = t < count
            i = tl.load(mem + t, mask=ok, other=0)
            v = tl.load(
                x_b + i[:, None] * sxn + c64[None, :] * sxc,
                mask=ok[:, None] & m[None, :],
                other=0.0,
            ).to(tl.float32)
            if HAS_SIZE:
                v = v * tl.load(s_b + i * ssn, mask=ok, other=0.0).to(tl.float32)[:, None]
            acc += v
        tl.store(
            o_rows[:, None] + c[None, :],
            (acc / norm[:, None]).to(o_ptr.dtype.element_ty),
            mask=r_ok[:, None] & m[None, :],
        )
    tl.store(os_ptr + b * NOUT + r, total.to(os_ptr.dtype.element_ty), mask=r_ok)


def tome_merge_rows(x, size, members, offsets, size_dtype):
    """(merged (B, NOUT, C), sizes (B, NOUT, 1)) of x (B, N, C) with sizes ``size`` (B, N, 1)
    or None (all 1), the members of output row r being ``members[b, offsets[b, r] :
    offsets[b, r + 1]]`` (offsets (B, NOUT + 1), members (B, N), contiguous int64)."""
    B, N, C = x.shape
    nout = offsets.shape[1] - 1
    out = torch.empty((B, nout, C), dtype=x.dtype, device=x.device)
    out_size = torch.empty((B, nout, 1), dtype=size_dtype, device=x.device)
    if B * nout == 0:
        return out, out_size
    grid_fits(B, "tome_merge_rows", "batch")  # grid y
    s = size if size is not None else x
    ssb, ssn = (size.stride(0), size.stride(1)) if size is not None else (0, 0)
    with device_guard(x):
        _tome_merge_kernel[lambda meta: (cdiv(nout, meta["BLOCK_R"]), B)](
            x, s, members, offsets, out, out_size, N, nout, C, *x.stride(), ssb, ssn,
            members.stride(0), offsets.stride(0), HAS_SIZE=size is not None,
        )  # fmt: skip
    return out, out_size


@tuned("tome_unmerge_rows", configs=_ROW_CONFIGS, key=["N", "C", "SIZE_GRAD"], sizes=["N", "C"])
@triton.jit
def _tome_unmerge_kernel(
    g_ptr, gs_ptr, x_ptr, s_ptr, o_ptr, os_ptr, src_ptr, dx_ptr, ds_ptr, N, NOUT, C,
    sgb, sgn, sgc, sgsb, sgsn, sxb, sxn, sxc, ssb, ssn, sob, son, soc, srb,
    HAS_SIZE: tl.constexpr, SIZE_GRAD: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Input token (b, i) per program, r = src[b, i], S = os[b, r]:
    dx[b, i] = s_i / S g[b, r]; with SIZE_GRAD also
    ds[b, i] = <g[b, r], x[b, i] - o[b, r]> / S + gs[b, r]."""
    t = tl.program_id(0)
    b = t // N
    i = t % N
    b64 = tl.cast(b, tl.int64)
    r = tl.load(src_ptr + b64 * srb + i)
    total = tl.load(os_ptr + b64 * NOUT + r).to(tl.float32)
    if HAS_SIZE:
        s_i = tl.load(s_ptr + b64 * ssb + tl.cast(i, tl.int64) * ssn).to(tl.float32)
    else:
        s_i = 1.0
    w = s_i / total
    g_row = g_ptr + b64 * sgb + r * sgn
    x_row = x_ptr + b64 * sxb + tl.cast(i, tl.int64) * sxn
    o_row = o_ptr + b64 * sob + r * son
    dx_row = dx_ptr + (b64 * N + i) * C
    dot = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        m = c < C
        c64 = c.to(tl.int64)
        g = tl.load(g_row + c64 * sgc, mask=m, other=0.0).to(tl.float32)
        tl.store(dx_row + c, (w * g).to(dx_ptr.dtype.element_ty), mask=m)
        if SIZE_GRAD:
            xv = tl.load(x_row + c64 * sxc, mask=m, other=0.0).to(tl.float32)
            ov = tl.load(o_row + c64 * soc, mask=m, other=0.0).to(tl.float32)
            dot += g * (xv - ov)
    if SIZE_GRAD:
        gs = tl.load(gs_ptr + b64 * sgsb + r * sgsn).to(tl.float32)
        ds = tl.sum(dot, axis=0) / total + gs
        tl.store(ds_ptr + b64 * N + i, ds.to(ds_ptr.dtype.element_ty))


def tome_unmerge_rows(grad, grad_size, x, size, out, out_size, source, size_grad):
    """(dx (B, N, C), dsize (B, N, 1) or None) of the merge (see the kernel); x (B, N, C)
    and the merged rows ``out`` are read only with ``size_grad`` (None otherwise)."""
    B, N = source.shape
    nout, C = grad.shape[1], grad.shape[2]
    dx = torch.empty((B, N, C), dtype=grad.dtype, device=grad.device)
    ds = torch.empty((B, N, 1), dtype=size.dtype, device=grad.device) if size_grad else None
    if B * N == 0:
        return dx, ds
    s = size if size is not None else grad
    ssb, ssn = (size.stride(0), size.stride(1)) if size is not None else (0, 0)
    gs = grad_size if grad_size is not None else out_size
    out_size = out_size.contiguous()
    x, out = (x, out) if size_grad else (grad, grad)  # not read without SIZE_GRAD
    with device_guard(grad):
        _tome_unmerge_kernel[(B * N,)](
            grad, gs, x, s, out, out_size, source, dx, ds if size_grad else dx, N, nout, C,
            *grad.stride(), gs.stride(0), gs.stride(1), *x.stride(), ssb, ssn, *out.stride(),
            source.stride(0), HAS_SIZE=size is not None, SIZE_GRAD=bool(size_grad),
        )  # fmt: skip
    return dx, ds


# --------------------------------------------------------------------------------------
# Token-grid pooling
# --------------------------------------------------------------------------------------

AVG, BILINEAR = 0, 1
AVG2X2 = AVG  # the 2 x 2 mean is AVG on a grid of even sides


# _ROW_CONFIGS with 1,024 channels on 8 warps, not 4: the unrolled 4 x 4 block holds 16
# loads of 8 bf16 lanes per thread in flight there and spills on Triton 3.6 (sm_90a)
_POOL_CONFIGS = autotune_configs(
    [
        triton.Config({"BLOCK_C": 256}, num_warps=2),
        triton.Config({"BLOCK_C": 512}, num_warps=4),
        triton.Config({"BLOCK_C": 1024}, num_warps=8),
        triton.Config({"BLOCK_C": 128}, num_warps=1),
    ],
    triton.Config({"BLOCK_C": 32}, num_warps=1),
)


@tuned("tokens_pool", configs=_POOL_CONFIGS, key=["C", "MODE", "KH", "KW"], sizes=["C"])
@triton.jit
def _pool_kernel(
    x_ptr, o_ptr, H, W, h, w, C, scale_h, scale_w,
    sxb, sxn, sxc,
    MODE: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Output token (b, oy, ox) per program, from the (H, W) grid of x (B, H W, C).
    MODE 0: the mean of the KH x KW block at (KH oy, KW ox), summed row by row in fp32 in
    ``nn.AvgPool2d``'s order (every load of the unrolled block in flight at once), then
    divided (correctly rounded) by KH KW. MODE 1: bilinear, align_corners=False:
    sy = max((oy + 0.5) scale_h - 0.5, 0), y0 = floor(sy), y1 = min(y0 + 1, H - 1),
    ly = sy - y0 (x likewise), out = (1 - ly) ((1 - lx) x[y0, x0] + lx x[y0, x1]) +
    ly ((1 - lx) x[y1, x0] + lx x[y1, x1])."""
    t = tl.program_id(0)
    b = t // (h * w)
    p = t % (h * w)
    oy = p // w
    ox = p % w
    x_b = x_ptr + tl.cast(b, tl.int64) * sxb
    o_row = o_ptr + tl.cast(t, tl.int64) * C
    if MODE == 0:
        corner = x_b + ((KH * oy) * W + KW * ox).to(tl.int64) * sxn
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            m = c < C
            cc = c.to(tl.int64) * sxc
            v = tl.zeros((BLOCK_C,), dtype=tl.float32)
            for dy in tl.static_range(KH):
                for dx in tl.static_range(KW):
                    v += tl.load(
                        corner + (dy * W + dx).to(tl.int64) * sxn + cc, mask=m, other=0.0
                    ).to(tl.float32)
            if (KH * KW) & (KH * KW - 1) == 0:  # a power of two: its reciprocal is exact
                v = v * (1.0 / (KH * KW))
            else:
                v = tl.math.div_rn(v, tl.full((BLOCK_C,), KH * KW, tl.float32))
            tl.store(o_row + c, v.to(o_ptr.dtype.element_ty), mask=m)
    else:
        sy = tl.maximum((oy.to(tl.float32) + 0.5) * scale_h - 0.5, 0.0)
        sx = tl.maximum((ox.to(tl.float32) + 0.5) * scale_w - 0.5, 0.0)
        y0 = sy.to(tl.int32)
        x0 = sx.to(tl.int32)
        y1 = tl.minimum(y0 + 1, H - 1)
        x1 = tl.minimum(x0 + 1, W - 1)
        ly = sy - y0.to(tl.float32)
        lx = sx - x0.to(tl.float32)
        r00 = x_b + (y0 * W + x0).to(tl.int64) * sxn
        r01 = x_b + (y0 * W + x1).to(tl.int64) * sxn
        r10 = x_b + (y1 * W + x0).to(tl.int64) * sxn
        r11 = x_b + (y1 * W + x1).to(tl.int64) * sxn
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            m = c < C
            cc = c.to(tl.int64) * sxc
            v00 = tl.load(r00 + cc, mask=m, other=0.0).to(tl.float32)
            v01 = tl.load(r01 + cc, mask=m, other=0.0).to(tl.float32)
            v10 = tl.load(r10 + cc, mask=m, other=0.0).to(tl.float32)
            v11 = tl.load(r11 + cc, mask=m, other=0.0).to(tl.float32)
            v = (1.0 - ly) * ((1.0 - lx) * v00 + lx * v01) + ly * ((1.0 - lx) * v10 + lx * v11)
            tl.store(o_row + c, v.to(o_ptr.dtype.element_ty), mask=m)


def pool(x: torch.Tensor, grid: tuple[int, int], size: tuple[int, int], mode: int):
    """(B, h w, C) pooled tokens of x (B, H W, C) on the grid (H, W), to (h, w) (``mode``
    AVG: blocks of (H / h, W / w), h and w dividing H and W)."""
    B, _, C = x.shape
    (H, W), (h, w) = grid, size
    out = torch.empty((B, h * w, C), dtype=x.dtype, device=x.device)
    if B * h * w == 0 or C == 0:
        return out
    kh, kw = (H // h, W // w) if mode == AVG else (1, 1)
    with device_guard(x):
        _pool_kernel[(B * h * w,)](
            x, out, H, W, h, w, C, float(H) / h, float(W) / w, *x.stride(), MODE=mode, KH=kh,
            KW=kw,
        )  # fmt: skip
    return out


@triton.jit
def _bilinear_source(o, scale, size):
    """(i0, i1, lambda) of output index ``o`` (align_corners=False, as ``_pool_kernel``)."""
    src = tl.maximum((o.to(tl.float32) + 0.5) * scale - 0.5, 0.0)
    i0 = src.to(tl.int32)
    return i0, tl.minimum(i0 + 1, size - 1), src - i0.to(tl.float32)


# a (WIN_W, BLOCK_C) tile per window row: narrower channel blocks per warp than _ROW_CONFIGS
_POOL_BWD_CONFIGS = autotune_configs(
    [
        triton.Config({"BLOCK_C": 128}, num_warps=4),
        triton.Config({"BLOCK_C": 256}, num_warps=8),
        triton.Config({"BLOCK_C": 64}, num_warps=2),
        triton.Config({"BLOCK_C": 32}, num_warps=1),
    ],
    triton.Config({"BLOCK_C": 32}, num_warps=1),
)


@tuned("tokens_pool_bwd", configs=_POOL_BWD_CONFIGS, key=["C", "WIN_H", "WIN_W"], sizes=["C"])
@triton.jit
def _pool_bwd_kernel(
    g_ptr, dx_ptr, H, W, h, w, C, scale_h, scale_w,
    sgb, sgn, sgc,
    WIN_H: tl.constexpr, WIN_W: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Input token (b, y, x) per program: dx[b, y, x] = sum over output tokens (oy, ox) of
    wy(oy, y) wx(ox, x) g[b, oy, ox], wy(oy, y) = (1 - ly) [y0 = y] + ly [y1 = y] with the
    forward's (y0, y1, ly) of oy (x likewise). Only oy in a window of WIN_H rows from
    floor((y - 0.5) / scale_h - 0.5) - 1 can reach y (sy(oy) in [y - 1, y + 1))."""
    t = tl.program_id(0)
    b = t // (H * W)
    p = t % (H * W)
    y = p // W
    x = p % W
    oy_lo = tl.maximum(((y.to(tl.float32) - 0.5) / scale_h - 0.5).to(tl.int32) - 1, 0)
    ox_lo = tl.maximum(((x.to(tl.float32) - 0.5) / scale_w - 0.5).to(tl.int32) - 1, 0)
    ox = ox_lo + tl.arange(0, WIN_W)
    x0, x1, lx = _bilinear_source(ox, scale_w, W)
    wx = tl.where(x0 == x, 1.0 - lx, 0.0) + tl.where(x1 == x, lx, 0.0)
    wx = tl.where(ox < w, wx, 0.0)
    g_b = g_ptr + tl.cast(b, tl.int64) * sgb
    dx_row = dx_ptr + tl.cast(t, tl.int64) * C
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cm = c < C
        acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for i in range(WIN_H):
            oy = oy_lo + i
            y0, y1, ly = _bilinear_source(oy, scale_h, H)
            wy = tl.where(y0 == y, 1.0 - ly, 0.0) + tl.where(y1 == y, ly, 0.0)
            wy = tl.where(oy < h, wy, 0.0)
            wgt = wy * wx  # (WIN_W,)
            rows = (oy * w + ox).to(tl.int64) * sgn
            m = (wgt != 0.0)[:, None] & cm[None, :]
            v = tl.load(g_b + rows[:, None] + c.to(tl.int64)[None, :] * sgc, mask=m, other=0.0)
            acc += tl.sum(v.to(tl.float32) * wgt[:, None], axis=0)
        tl.store(dx_row + c, acc.to(dx_ptr.dtype.element_ty), mask=cm)


def _window(scale: float) -> int:
    """Output indices that can reach one input index: sy spans [i - 1, i + 1), 2 / scale
    outputs, plus the margin of the window's start (rounded down, minus 1) and the clamp."""
    return next_pow2(math.ceil(2.0 / scale) + 3)


def pool_backward(grad: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]):
    """(B, H W, C): the bilinear resize's adjoint applied to ``grad`` (B, h w, C)."""
    B, _, C = grad.shape
    (H, W), (h, w) = grid, size
    dx = torch.empty((B, H * W, C), dtype=grad.dtype, device=grad.device)
    if B * H * W == 0 or C == 0:
        return dx
    scale_h, scale_w = float(H) / h, float(W) / w
    with device_guard(grad):
        _pool_bwd_kernel[(B * H * W,)](
            grad, dx, H, W, h, w, C, scale_h, scale_w, *grad.stride(),
            WIN_H=_window(scale_h), WIN_W=_window(scale_w),
        )  # fmt: skip
    return dx

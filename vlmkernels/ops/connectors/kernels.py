"""The connector family's Triton kernels: one GEMM core with a prologue and an epilogue, the
row statistics of the norms, the norm backward, and the pixel-shuffle copy.

See :mod:`vlmkernels.ops.connectors` for the math. The X operand of a connector (the vision
features as the first linear sees them) is never materialised: the kernels read it from the
features x, viewed as a (B, H, W, C) grid, through the merge addressing

    X[m, k] = x[b, i * MH + k // C // MW, j * MW + k // C % MW, k % C]
    with m = (b * Ho + i) * Wo + j, Ho = H / MH, Wo = W / MW,

which is Idefics3's / InternVL's pixel shuffle for MH = MW = s, Qwen-VL's merge of MH MW
consecutive patches for (H, W) = (1, MH MW), and a plain (M, C) matrix for MH = MW = 1 (the
``GATHER=False`` fast path). Row and column parts of every address are computed on the 1-D
index vectors of a tile (the addressing is separable), so the per-element cost is one add.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ...core.runtime import autotune_configs
from ...core.tuning import tuned
from ...kernels.blocks import to_dtype_rne

# the norms of the prologue
NO_NORM, LAYER_NORM, RMS_NORM = 0, 1, 2
# the activation of the epilogue: none, exact GELU (forward), GELU's derivative (backward),
# SwiGLU (forward: value and gate halves of the first linear) and its derivative (backward)
ACT_NONE, ACT_GELU, ACT_GELU_GRAD, ACT_SWIGLU, ACT_SWIGLU_GRAD = 0, 1, 2, 3, 4
# whether A of the GEMM is the (gathered, normalised) X
X_NONE, X_A = 0, 1

# The default (first) config serves 16-bit and fp32 inputs: with BK 64, fp32 tiles and the
# merged-norm prologue overflow the 227 KB of shared memory and spill. 128 x 256 tiles and
# four warps on 128 x 128 spill (sm_90a, triton 3.9); four stages overflow shared memory
# with the merged-LayerNorm prologue: not in the space.
_GPU_CONFIGS = [
    triton.Config({"BM": 128, "BN": 128, "BK": 32, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BM": 128, "BN": 128, "BK": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BM": 64, "BN": 128, "BK": 64, "GROUP_M": 8}, num_warps=4, num_stages=3),
    triton.Config({"BM": 128, "BN": 64, "BK": 64, "GROUP_M": 8}, num_warps=4, num_stages=3),
    triton.Config({"BM": 64, "BN": 64, "BK": 64, "GROUP_M": 8}, num_warps=4, num_stages=3),
]
# Small tiles keep the interpreter's per-op cost low; 16 is not a multiple of the test
# sizes, so masking is exercised.
_CONFIGS = autotune_configs(
    _GPU_CONFIGS, triton.Config({"BM": 16, "BN": 16, "BK": 16, "GROUP_M": 2}, num_warps=4)
)
_ROW_CONFIGS = autotune_configs(
    [
        triton.Config({"BR": 4, "BL": 1024}, num_warps=4),
        triton.Config({"BR": 8, "BL": 512}, num_warps=4),
        triton.Config({"BR": 16, "BL": 256}, num_warps=8),
    ],
    triton.Config({"BR": 8, "BL": 32}, num_warps=4),
)
_COPY_CONFIGS = autotune_configs(
    [
        triton.Config({"BR": 32, "BL": 128}, num_warps=4),
        triton.Config({"BR": 16, "BL": 256}, num_warps=4),
        triton.Config({"BR": 64, "BL": 64}, num_warps=4),
    ],
    triton.Config({"BR": 16, "BL": 32}, num_warps=4),
)


# fmt: off
@triton.jit
def x_rows(m, HWo, Wo, H, W, MH, MW, sxb, sxh, sxw, GATHER: tl.constexpr):
    """For logical rows ``m`` (1-D): the row part of X's addresses (int64) and the row part
    of the index of their source patches (b * H * W + i * MH * W + j * MW)."""
    m64 = m.to(tl.int64)
    if GATHER:
        b = m64 // HWo
        rem = m64 % HWo
        i = rem // Wo
        j = rem % Wo
        offset = b * sxb + (i * MH) * sxh + (j * MW) * sxw
        patch = b * (H * W) + (i * MH) * W + j * MW
    else:
        offset = m64 * sxb
        patch = m64
    return offset, patch


@triton.jit
def x_cols(k, C, W, MW, sxh, sxw, sxc, GATHER: tl.constexpr):
    """For logical columns ``k`` (1-D): the column part of X's addresses (int64), of the
    source patch index (dr * W + dc), and the channel k % C."""
    k64 = k.to(tl.int64)
    if GATHER:
        g = k64 // C
        c = k64 % C
        dr = g // MW
        dc = g % MW
        offset = dr * sxh + dc * sxw + c * sxc
        patch = dr * W + dc
    else:
        c = k64
        offset = k64 * sxc
        patch = k64 * 0
    return offset, patch, c


@triton.jit
def x_tile(
    x_ptr, mean_ptr, rstd_ptr, nw_ptr, nb_ptr, m, k, m_mask, k_mask,
    HWo, Wo, H, W, C, MH, MW, sxb, sxh, sxw, sxc,
    GATHER: tl.constexpr, NORM: tl.constexpr, PER_PATCH: tl.constexpr, NORM_BIAS: tl.constexpr,
):
    """The fp32 tile X[m, k] (rows ``m`` on axis 0), normalised when ``NORM``: LayerNorm
    (x - mean) * rstd * w + b or RMSNorm x * rstd * w with the statistics of each row of X
    (w, b of length K) or, ``PER_PATCH``, of each source patch (w, b of length C). Zero
    outside the masks."""
    row_off, row_patch = x_rows(m, HWo, Wo, H, W, MH, MW, sxb, sxh, sxw, GATHER)
    col_off, col_patch, c = x_cols(k, C, W, MW, sxh, sxw, sxc, GATHER)
    mask = m_mask[:, None] & k_mask[None, :]
    v = tl.load(x_ptr + (row_off[:, None] + col_off[None, :]), mask=mask, other=0.0)
    v = v.to(tl.float32)
    if NORM != 0:
        if PER_PATCH:
            patch = row_patch[:, None] + col_patch[None, :]
            rstd = tl.load(rstd_ptr + patch, mask=mask, other=0.0)
            if NORM == 1:
                v = (v - tl.load(mean_ptr + patch, mask=mask, other=0.0)) * rstd
            else:
                v = v * rstd
            widx = c
        else:
            rstd = tl.load(rstd_ptr + m, mask=m_mask, other=0.0)
            if NORM == 1:
                v = (v - tl.load(mean_ptr + m, mask=m_mask, other=0.0)[:, None]) * rstd[:, None]
            else:
                v = v * rstd[:, None]
            widx = k
        v = v * tl.load(nw_ptr + widx, mask=k_mask, other=0.0).to(tl.float32)[None, :]
        if NORM_BIAS:
            v = v + tl.load(nb_ptr + widx, mask=k_mask, other=0.0).to(tl.float32)[None, :]
        v = tl.where(mask, v, 0.0)
    return v


@triton.jit
def gelu(h):
    """Exact GELU, 0.5 h (1 + erf(h / sqrt 2))."""
    return 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))


@triton.jit
def gelu_grad(h):
    """GELU'(h) = Phi(h) + h phi(h)."""
    cdf = 0.5 * (1.0 + tl.erf(h * 0.7071067811865476))
    return cdf + h * tl.exp(-0.5 * h * h) * 0.3989422804014327


@triton.jit
def folded_norm_dot(
    acc, x_ptr, b_ptr, mean_ptr, rstd_ptr, colsum_ptr, rm, rn, m_mask, n_mask, b_cols, K, sbk,
    HWo, Wo, H, W, C, MH, MW, sxb, sxh, sxw, sxc,
    GATHER: tl.constexpr, NORM: tl.constexpr, PER_PATCH: tl.constexpr, DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
):
    """acc + norm(X) W^T without a normalised X: B holds Wf[k, n] = w[k] W[n, k] (the norm
    weight folded in, :func:`_norm_fold_kernel`), A is X as stored, and the statistics are
    applied to the accumulator. With rstd r and mean mu of a row (``PER_PATCH``: of each of
    its C-wide source-patch segments s) and colsum[n, s] = sum over s of Wf[k, n],

        sum_k norm(X)[m, k] Wf[k, n] = sum_s r_s (P_s - mu_s colsum[n, s]),
        P_s = sum over s of X[m, k] Wf[k, n]

    (the norm bias and the linear's bias go into the epilogue's bias). The k-loop runs per
    segment on raw loads (no prologue); between segments the accumulator is rescaled by
    r_{s-1} / r_s and multiplied by the last r at the end, so one accumulator suffices."""
    row_off, row_patch = x_rows(rm, HWo, Wo, H, W, MH, MW, sxb, sxh, sxw, GATHER)
    rk = tl.arange(0, BK)
    segments = K // C
    prev = tl.full((BM,), 1.0, dtype=tl.float32)
    for g in range(0, segments):
        lo = g * C
        # the segment's first column (channel 0 of patch g): offsets built from the strides
        # alone keep their alignment visible to the compiler (16-byte loads of A)
        if GATHER:
            dr = g // MW
            dc = g % MW
            seg_off = dr.to(tl.int64) * sxh + dc.to(tl.int64) * sxw
            seg_patch = dr * W + dc
        else:
            seg_off = lo.to(tl.int64) * sxc
            seg_patch = 0
        if PER_PATCH:
            stat = row_patch + seg_patch
            rstd = tl.load(rstd_ptr + stat, mask=m_mask, other=1.0)
            acc = acc * (prev / rstd)[:, None]
        a_rows = x_ptr + (row_off + seg_off)
        b_rows = b_ptr + lo.to(tl.int64) * sbk
        for k0 in range(0, C, BK):
            c = k0 + rk
            k_mask = c < C
            c64 = c.to(tl.int64)
            a = tl.load(a_rows[:, None] + c64[None, :] * sxc,
                        mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(b_rows + c64[:, None] * sbk + b_cols[None, :],
                        mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            if DOT_FP32:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        if PER_PATCH:
            if NORM == 1:
                mean = tl.load(mean_ptr + stat, mask=m_mask, other=0.0)
                colsum = tl.load(colsum_ptr + rn.to(tl.int64) * segments + g, mask=n_mask,
                                 other=0.0)
                acc -= mean[:, None] * colsum[None, :]
            prev = rstd
    if not PER_PATCH:
        prev = tl.load(rstd_ptr + rm, mask=m_mask, other=1.0)
        if NORM == 1:
            mean = tl.load(mean_ptr + rm, mask=m_mask, other=0.0)
            acc -= mean[:, None] * tl.load(colsum_ptr + rn, mask=n_mask, other=0.0)[None, :]
    return acc * prev[:, None]


_GEMM_KEY = ["M_bucket", "N", "K", "XSIDE", "GATHER", "NORM", "FOLD", "ACT", "SCATTER"]


def _gemm_fits(config, variant) -> bool:
    """Whether the tuner may pick ``config`` for this variant: with fp32 inputs and the norm
    prologue, only BK 32 or 64 x 64 tiles. Their fp32 operand tiles plus the prologue's
    buffers take 256-385 KB of shared memory at 128 x 128 x 64 and 257-321 KB at
    64 x 128 / 128 x 64 with BK 64 for the LayerNorm (over the 227 KB of an sm_90 block:
    they cannot launch), and those that fit spill 92-1,016 B per thread (sm_90a,
    triton 3.9). Without the norm, fp32 inputs still leave out 64 x 128 and 128 x 64
    tiles at BK 64 on four warps: the plain first and second linears, the weight
    gradient and the scattered dx spill 40-784 B per thread there (sm_90a, triton 3.9)."""
    if variant.get("dtype") != "fp32":
        return True
    kw = config.kwargs
    if variant.get("NORM"):
        return kw["BK"] <= 32 or (kw["BM"] <= 64 and kw["BN"] <= 64)
    return not (config.num_warps == 4 and kw["BK"] == 64 and kw["BM"] * kw["BN"] == 8192)


@tuned("connector_gemm", configs=_CONFIGS, key=_GEMM_KEY, sizes=["M_bucket", "N", "K"],
       fits=_gemm_fits)
@triton.jit
def _gemm_kernel(
    a_ptr, b_ptr, c_ptr, x_ptr, mean_ptr, rstd_ptr, nw_ptr, nb_ptr,
    bias_ptr, aux_ptr, aux2_ptr, res_ptr, colsum_ptr,
    M, N, K, M_bucket,
    sam, sak, sbk, sbn, scm, scn, saux_m, saux_n, sres_m, sres_n,
    HWo, Wo, H, W, C, MH, MW, sxb, sxh, sxw, sxc, scb, sch, scw, scc,
    XSIDE: tl.constexpr, GATHER: tl.constexpr, NORM: tl.constexpr, PER_PATCH: tl.constexpr,
    NORM_BIAS: tl.constexpr, FOLD: tl.constexpr, SCATTER: tl.constexpr, BIAS: tl.constexpr,
    ACT: tl.constexpr, STORE_AUX: tl.constexpr, STORE_AUX2: tl.constexpr, RESIDUAL: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out[m, n] = epilogue(sum_k A[m, k] B[k, n]), fp32 accumulation.

    Operands: A (M, K) and B (K, N) are strided matrices; with ``XSIDE`` A is X, read
    through the merge addressing and the norm prologue (:func:`x_tile`). (The weight
    gradient dW = dY^T X reads X as a plain B, stored by :func:`_normalize_kernel` or
    :func:`_shuffle_kernel` where X is normalised or gathered.) ``FOLD`` (A = X with a
    norm, 16-bit): B is the norm-folded weight and the statistics are applied to the
    accumulator (:func:`folded_norm_dot`). Epilogue, in order: + bias[n] (``BIAS``);
    ``ACT`` = GELU:
    the pre-activation is stored to aux (``STORE_AUX``), the output is GELU(acc);
    ``ACT`` = GELU_GRAD: acc * GELU'(aux[m, n]), and GELU(aux) is stored to aux2
    (``STORE_AUX2``); + res[m, n] (``RESIDUAL``). The output is stored at [m, n], or, with
    ``SCATTER``, where X[m, n] lives in a tensor of x's shape (strides sc*): the input
    gradient of the merge, a permutation, written in place of the transposed gather.

    ``ACT`` = SWIGLU (N = 2 I, B's columns the value half v = [0, I) and the gate half
    g = [I, 2 I)): out (M, I) = v SiLU(g). A tile's accumulator columns interleave the two
    halves, column 2 o + t reading B's column o + t I (only addresses change: B is read in
    place), so each output column's v and g land side by side in the accumulator and one
    GEMM of N = 2 I gives out[m, o] = acc[m, 2 o] SiLU(acc[m, 2 o + 1]); the pre-activation
    goes to aux (M, 2 I) in its own column order. ``ACT`` = SWIGLU_GRAD (N = I, aux the
    pre-activation (M, 2 I)): with s = sigmoid(g), out (M, 2 I) gets dv = acc SiLU(g) in
    columns [0, I) and dg = acc v s (1 + g (1 - s)) in [I, 2 I), and v SiLU(g) is stored to
    aux2 (M, I) contiguous (``STORE_AUX2``).
    """
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    width = GROUP_M * num_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m

    rm = pid_m * BM + tl.arange(0, BM)
    m_mask = rm < M
    if ACT == 3:
        j = tl.arange(0, BN)
        ro = pid_n * (BN // 2) + j // 2
        rn = ro + (j % 2) * (N // 2)
        n_mask = ro < N // 2
    else:
        rn = pid_n * BN + tl.arange(0, BN)
        n_mask = rn < N
    rk = tl.arange(0, BK)
    a_rows = rm.to(tl.int64) * sam
    b_cols = rn.to(tl.int64) * sbn
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if FOLD:
        acc = folded_norm_dot(acc, x_ptr, b_ptr, mean_ptr, rstd_ptr, colsum_ptr, rm, rn, m_mask,
                              n_mask, b_cols, K, sbk, HWo, Wo, H, W, C, MH, MW, sxb, sxh, sxw,
                              sxc, GATHER, NORM, PER_PATCH, DOT_FP32, INPUT_PRECISION, BM, BK)
    else:
        for k0 in range(0, K, BK):
            ks = k0 + rk
            k_mask = ks < K
            if XSIDE == 1:
                a = x_tile(x_ptr, mean_ptr, rstd_ptr, nw_ptr, nb_ptr, rm, ks, m_mask, k_mask,
                           HWo, Wo, H, W, C, MH, MW, sxb, sxh, sxw, sxc,
                           GATHER, NORM, PER_PATCH, NORM_BIAS)
                if not DOT_FP32:
                    a = a.to(x_ptr.dtype.element_ty)
            else:
                a = tl.load(a_ptr + (a_rows[:, None] + ks.to(tl.int64)[None, :] * sak),
                            mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                if DOT_FP32:
                    a = a.to(tl.float32)
            b = tl.load(b_ptr + (ks.to(tl.int64)[:, None] * sbk + b_cols[None, :]),
                        mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            if DOT_FP32:
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    mask = m_mask[:, None] & n_mask[None, :]
    if BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    aux_offs = rm.to(tl.int64)[:, None] * saux_m + rn.to(tl.int64)[None, :] * saux_n
    if ACT == 1:
        if STORE_AUX:
            tl.store(aux_ptr + aux_offs, acc.to(aux_ptr.dtype.element_ty), mask=mask)
        acc = gelu(acc)
    elif ACT == 2:
        h = tl.load(aux_ptr + aux_offs, mask=mask, other=0.0).to(tl.float32)
        cdf = 0.5 * (1.0 + tl.erf(h * 0.7071067811865476))
        if STORE_AUX2:
            tl.store(aux2_ptr + aux_offs, (h * cdf).to(aux2_ptr.dtype.element_ty), mask=mask)
        acc = acc * (cdf + h * tl.exp(-0.5 * h * h) * 0.3989422804014327)
    elif ACT == 3:
        # the split is free (each thread holds column pairs); the halves are stored apart,
        # each contiguous along n (the interleaved tile's columns are I apart)
        v, g = tl.split(tl.reshape(acc, (BM, BN // 2, 2)))
        rn = pid_n * (BN // 2) + tl.arange(0, BN // 2)
        n_mask = rn < N // 2
        mask = m_mask[:, None] & n_mask[None, :]
        if STORE_AUX:
            v_offs = rm.to(tl.int64)[:, None] * saux_m + rn.to(tl.int64)[None, :] * saux_n
            g_offs = v_offs + (N // 2) * saux_n
            tl.store(aux_ptr + v_offs, v.to(aux_ptr.dtype.element_ty), mask=mask)
            tl.store(aux_ptr + g_offs, g.to(aux_ptr.dtype.element_ty), mask=mask)
        acc = v * g * tl.sigmoid(g)
    elif ACT == 4:
        v = tl.load(aux_ptr + aux_offs, mask=mask, other=0.0).to(tl.float32)
        g_offs = rm.to(tl.int64)[:, None] * saux_m + (rn + N).to(tl.int64)[None, :] * saux_n
        g = tl.load(aux_ptr + g_offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.sigmoid(g)
        silu = g * s
        if STORE_AUX2:
            p_offs = rm.to(tl.int64)[:, None] * N + rn[None, :]
            tl.store(aux2_ptr + p_offs, (v * silu).to(aux2_ptr.dtype.element_ty), mask=mask)
        dv_offs = rm.to(tl.int64)[:, None] * scm + rn.to(tl.int64)[None, :] * scn
        tl.store(c_ptr + dv_offs, (acc * silu).to(c_ptr.dtype.element_ty), mask=mask)
        acc = acc * v * (s + silu * (1.0 - s))
        rn += N  # dg: the gate half's columns
    if RESIDUAL:
        res_offs = rm.to(tl.int64)[:, None] * sres_m + rn.to(tl.int64)[None, :] * sres_n
        acc += tl.load(res_ptr + res_offs, mask=mask, other=0.0).to(tl.float32)
    if SCATTER:
        row_off, _ = x_rows(rm, HWo, Wo, H, W, MH, MW, scb, sch, scw, GATHER)
        col_off, _, _ = x_cols(rn, C, W, MW, sch, scw, scc, GATHER)
        out_offs = row_off[:, None] + col_off[None, :]
    else:
        out_offs = rm.to(tl.int64)[:, None] * scm + rn.to(tl.int64)[None, :] * scn
    tl.store(c_ptr + out_offs, acc.to(c_ptr.dtype.element_ty), mask=mask)


# The GELU' epilogue (dh = (dY W2) * GELU'(h), GELU(h) stored for dW2) holds the loaded h
# tile beside the accumulator: at 64 accumulator elements per thread (128 x 128 on 8 warps,
# 128 x 64 on 4) it reaches the 255-register cap and spills (12 B bf16, 32 B fp32; sm_90a,
# triton 3.9), so this variant has its own kernel (the same code) and space, all at 32
# elements per thread. Default 128 x 64 x 64 on 8 warps: 128 registers (bf16, 2 CTAs per
# SM: as many accumulator tiles in flight as one 128 x 128 CTA) and 186 (fp32), no spill.
# 16 warps on 128 x 128 spill with fp32 inputs (128-register cap): not in the space.
_DH_GPU_CONFIGS = [
    triton.Config({"BM": 128, "BN": 64, "BK": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BM": 64, "BN": 128, "BK": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BM": 128, "BN": 64, "BK": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
    triton.Config({"BM": 128, "BN": 64, "BK": 32, "GROUP_M": 8}, num_warps=8, num_stages=4),
    triton.Config({"BM": 64, "BN": 64, "BK": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
]
_DH_CONFIGS = autotune_configs(
    _DH_GPU_CONFIGS, triton.Config({"BM": 16, "BN": 16, "BK": 16, "GROUP_M": 2}, num_warps=4)
)
_gemm_dh_kernel = tuned("connector_gemm_dh", configs=_DH_CONFIGS, key=_GEMM_KEY,
                        sizes=["M_bucket", "N", "K"])(_gemm_kernel.fn)  # fmt: skip


@tuned("connector_norm_stats", configs=_ROW_CONFIGS, key=["L", "GATHER", "RMS"], sizes=["L"])
@triton.jit
def _norm_stats_kernel(
    x_ptr, mean_ptr, rstd_ptr, R, L, eps,
    HWo, Wo, H, W, C, MH, MW, sxb, sxh, sxw, sxc,
    GATHER: tl.constexpr, RMS: tl.constexpr, BR: tl.constexpr, BL: tl.constexpr,
):
    """mean and rstd = 1 / sqrt(var + eps) (RMS: mean 0, rstd = 1 / sqrt(mean(x^2) + eps))
    of R rows of length L of X (fp32, two passes: the mean, then the centred squares)."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    r_mask = rows < R
    row_off, row_patch = x_rows(rows, HWo, Wo, H, W, MH, MW, sxb, sxh, sxw, GATHER)
    total = tl.zeros((BR,), dtype=tl.float32)
    for l0 in range(0, L, BL):
        cols = l0 + tl.arange(0, BL)
        col_off, col_patch, chan = x_cols(cols, C, W, MW, sxh, sxw, sxc, GATHER)
        mask = r_mask[:, None] & (cols < L)[None, :]
        v = tl.load(x_ptr + (row_off[:, None] + col_off[None, :]), mask=mask, other=0.0)
        v = v.to(tl.float32)
        if RMS:
            total += tl.sum(v * v, 1)
        else:
            total += tl.sum(v, 1)
    if RMS:
        mean = tl.zeros((BR,), dtype=tl.float32)
        var = total / L
    else:
        mean = total / L
        var = tl.zeros((BR,), dtype=tl.float32)
        for l0 in range(0, L, BL):
            cols = l0 + tl.arange(0, BL)
            col_off, col_patch, chan = x_cols(cols, C, W, MW, sxh, sxw, sxc, GATHER)
            mask = r_mask[:, None] & (cols < L)[None, :]
            v = tl.load(x_ptr + (row_off[:, None] + col_off[None, :]), mask=mask, other=0.0)
            d = tl.where(mask, v.to(tl.float32) - mean[:, None], 0.0)
            var += tl.sum(d * d, 1)
        var = var / L
    tl.store(mean_ptr + rows, mean, mask=r_mask)
    tl.store(rstd_ptr + rows, 1.0 / tl.sqrt(var + eps), mask=r_mask)


@tuned("connector_norm_fold", configs=_ROW_CONFIGS, key=["K", "S", "NORM_BIAS"], sizes=["K"])
@triton.jit
def _norm_fold_kernel(
    w_ptr, nw_ptr, nb_ptr, b_ptr, wf_ptr, colsum_ptr, bias_ptr, N, K, S, swn, swk,
    NORM_BIAS: tl.constexpr, BIAS: tl.constexpr, BR: tl.constexpr, BL: tl.constexpr,
):
    """The norm folded into the linear after it, for W (N, K) whose K columns are S
    segments of the norm's length L = K / S (the norm of each source patch, or S = 1):

        Wf[n, k] = nw[k % L] W[n, k]        (rounded to Wf's dtype, stored (N, K) contiguous)
        colsum[n, s] = sum over segment s of Wf[n, k]   (fp32, of the rounded Wf)
        bias[n] = b[n] + sum_k nb[k % L] W[n, k]         (fp32; ``BIAS``, ``NORM_BIAS``)"""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    r_mask = rows < N
    rows64 = rows.to(tl.int64)
    length = K // S
    folded_bias = tl.zeros((BR,), dtype=tl.float32)
    for s in range(0, S):
        total = tl.zeros((BR,), dtype=tl.float32)
        for l0 in range(0, length, BL):
            cols = l0 + tl.arange(0, BL)
            c_mask = cols < length
            mask = r_mask[:, None] & c_mask[None, :]
            k = (s * length + cols).to(tl.int64)
            w = tl.load(w_ptr + (rows64[:, None] * swn + k[None, :] * swk), mask=mask, other=0.0)
            w = w.to(tl.float32)
            gamma = tl.load(nw_ptr + cols, mask=c_mask, other=0.0).to(tl.float32)
            wf = to_dtype_rne(w * gamma[None, :], wf_ptr.dtype.element_ty)
            tl.store(wf_ptr + (rows64[:, None] * K + k[None, :]), wf, mask=mask)
            total += tl.sum(tl.where(mask, wf.to(tl.float32), 0.0), 1)
            if NORM_BIAS:
                beta = tl.load(nb_ptr + cols, mask=c_mask, other=0.0).to(tl.float32)
                folded_bias += tl.sum(w * beta[None, :], 1)
        tl.store(colsum_ptr + rows64 * S + s, total, mask=r_mask)
    if BIAS:
        folded_bias += tl.load(b_ptr + rows, mask=r_mask, other=0.0).to(tl.float32)
    if BIAS or NORM_BIAS:  # else bias_ptr is a stand-in (the launcher passes colsum)
        tl.store(bias_ptr + rows, folded_bias, mask=r_mask)


@triton.jit
def _grad_rows(r, HWo, Wo, H, W, MH, MW, K, C, PER_PATCH: tl.constexpr):
    """Offsets (int64) in the logical (M, K) gradient of X of norm rows ``r``: row m for a
    norm over X's rows, or the C columns of source patch r within its merged row."""
    r64 = r.to(tl.int64)
    if PER_PATCH:
        b = r64 // (H * W)
        h = (r64 // W) % H
        w = r64 % W
        m = b * HWo + (h // MH) * Wo + w // MW
        g = (h % MH) * MW + w % MW
        offset = m * K + g * C
    else:
        offset = r64 * K
    return offset


@triton.jit
def _norm_rows(r, l, HWo, Wo, H, W, C, MH, MW, sb, sh, sw, sc,
               GATHER: tl.constexpr, PER_PATCH: tl.constexpr):
    """Row and column offsets (int64) of norm rows ``r`` and columns ``l`` in a tensor of
    x's shape with strides (sb, sh, sw, sc): X's rows through the merge addressing, or the
    source patches (b, h, w) of the (B, H, W, C) grid."""
    if PER_PATCH:
        r64 = r.to(tl.int64)
        row_off = (r64 // (H * W)) * sb + ((r64 // W) % H) * sh + (r64 % W) * sw
        col_off = l.to(tl.int64) * sc
    else:
        row_off, _ = x_rows(r, HWo, Wo, H, W, MH, MW, sb, sh, sw, GATHER)
        col_off, _, _ = x_cols(l, C, W, MW, sh, sw, sc, GATHER)
    return row_off, col_off


@triton.jit
def _norm_grad_tile(g_ptr, x_ptr, nw_ptr, rows, r_mask, g_off, mean, rstd, l0, L,
                    HWo, Wo, H, W, C, MH, MW, sxb, sxh, sxw, sxc,
                    GATHER: tl.constexpr, PER_PATCH: tl.constexpr, BL: tl.constexpr):
    """One (BR, BL) tile of the norm's backward at columns l0 + [0, BL): (cols, column mask,
    tile mask, xh = (x - mean) rstd, g, gh = g * w), all fp32."""
    cols = l0 + tl.arange(0, BL)
    c_mask = cols < L
    mask = r_mask[:, None] & c_mask[None, :]
    x_row, x_col = _norm_rows(rows, cols, HWo, Wo, H, W, C, MH, MW, sxb, sxh, sxw, sxc,
                              GATHER, PER_PATCH)
    xv = tl.load(x_ptr + (x_row[:, None] + x_col[None, :]), mask=mask, other=0.0)
    xh = (xv.to(tl.float32) - mean[:, None]) * rstd[:, None]
    g = tl.load(g_ptr + (g_off[:, None] + cols.to(tl.int64)[None, :]), mask=mask,
                other=0.0).to(tl.float32)
    gh = g * tl.load(nw_ptr + cols, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    return cols, c_mask, mask, xh, g, gh


@tuned("connector_norm_grad", configs=_ROW_CONFIGS, key=["L", "GATHER", "NORM", "PER_PATCH"],
       sizes=["L"], restore_value=["part_w_ptr", "part_b_ptr"])  # it adds into them
@triton.jit
def _norm_grad_kernel(
    g_ptr, x_ptr, mean_ptr, rstd_ptr, nw_ptr, dx_ptr, part_w_ptr, part_b_ptr,
    R, L, K, num_programs,
    HWo, Wo, H, W, C, MH, MW, sxb, sxh, sxw, sxc, sdb, sdh, sdw, sdc,
    GATHER: tl.constexpr, NORM: tl.constexpr, PER_PATCH: tl.constexpr,
    WEIGHT_GRAD: tl.constexpr, BR: tl.constexpr, BL: tl.constexpr,
):
    """The norm's backward over R norm rows of length L: with xh the normalised row and
    gh = g * w (g the gradient of the norm's output, read from the logical (M, K) matrix),

        LayerNorm: dx = rstd (gh - mean(gh) - xh mean(gh xh));  RMSNorm: the same without
        mean(gh),

    written where x lives (strides sd*; x's own strides sx*). Norm rows are X's rows
    (M rows of length K, x read through the merge addressing) or, ``PER_PATCH``, the source
    patches (B H W rows of length C). Programs are persistent (row blocks pid,
    pid + num_programs, ...) and accumulate their share of the weight and bias gradients,
    sum g xh and sum g, in part_w[pid] and part_b[pid] (``WEIGHT_GRAD``)."""
    pid = tl.program_id(0)
    for start in range(pid * BR, R, num_programs * BR):
        rows = start + tl.arange(0, BR)
        r_mask = rows < R
        g_off = _grad_rows(rows, HWo, Wo, H, W, MH, MW, K, C, PER_PATCH)
        rstd = tl.load(rstd_ptr + rows, mask=r_mask, other=0.0)
        mean = tl.load(mean_ptr + rows, mask=r_mask, other=0.0)
        sum_g = tl.zeros((BR,), dtype=tl.float32)
        sum_gx = tl.zeros((BR,), dtype=tl.float32)
        for l0 in range(0, L, BL):
            cols, c_mask, mask, xh, g, gh = _norm_grad_tile(
                g_ptr, x_ptr, nw_ptr, rows, r_mask, g_off, mean, rstd, l0, L, HWo, Wo, H, W, C,
                MH, MW, sxb, sxh, sxw, sxc, GATHER, PER_PATCH, BL)
            sum_g += tl.sum(gh, 1)
            sum_gx += tl.sum(gh * xh, 1)
        mean_g = sum_g / L
        mean_gx = sum_gx / L
        for l0 in range(0, L, BL):
            cols, c_mask, mask, xh, g, gh = _norm_grad_tile(
                g_ptr, x_ptr, nw_ptr, rows, r_mask, g_off, mean, rstd, l0, L, HWo, Wo, H, W, C,
                MH, MW, sxb, sxh, sxw, sxc, GATHER, PER_PATCH, BL)
            if NORM == 1:
                dx = (gh - mean_g[:, None] - xh * mean_gx[:, None]) * rstd[:, None]
            else:
                dx = (gh - xh * mean_gx[:, None]) * rstd[:, None]
            d_row, d_col = _norm_rows(rows, cols, HWo, Wo, H, W, C, MH, MW, sdb, sdh, sdw,
                                      sdc, GATHER, PER_PATCH)
            tl.store(dx_ptr + (d_row[:, None] + d_col[None, :]),
                     dx.to(dx_ptr.dtype.element_ty), mask=mask)
            if WEIGHT_GRAD:
                part = pid.to(tl.int64) * L + cols
                pw = tl.load(part_w_ptr + part, mask=c_mask, other=0.0)
                tl.store(part_w_ptr + part, pw + tl.sum(tl.where(mask, g * xh, 0.0), 0),
                         mask=c_mask)
                if NORM == 1:
                    pb = tl.load(part_b_ptr + part, mask=c_mask, other=0.0)
                    tl.store(part_b_ptr + part, pb + tl.sum(g, 0), mask=c_mask)


@tuned("connector_shuffle", configs=_COPY_CONFIGS, key=["K", "BACKWARD"], sizes=["K"])
@triton.jit
def _shuffle_kernel(
    x_ptr, out_ptr, M, K,
    HWo, Wo, H, W, C, MH, MW, sxb, sxh, sxw, sxc, som, sok,
    BACKWARD: tl.constexpr, BR: tl.constexpr, BL: tl.constexpr,
):
    """out[m, k] = X[m, k] (the pixel shuffle, a gather), or with ``BACKWARD`` the inverse
    permutation: X's storage [m, k] = out[m, k] (x_ptr is then the destination)."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BL + tl.arange(0, BL)
    mask = (rows < M)[:, None] & (cols < K)[None, :]
    row_off, _ = x_rows(rows, HWo, Wo, H, W, MH, MW, sxb, sxh, sxw, True)
    col_off, _, _ = x_cols(cols, C, W, MW, sxh, sxw, sxc, True)
    x_offs = row_off[:, None] + col_off[None, :]
    o_offs = rows.to(tl.int64)[:, None] * som + cols.to(tl.int64)[None, :] * sok
    if BACKWARD:
        tl.store(x_ptr + x_offs, tl.load(out_ptr + o_offs, mask=mask), mask=mask)
    else:
        tl.store(out_ptr + o_offs, tl.load(x_ptr + x_offs, mask=mask), mask=mask)


@tuned("connector_normalize", configs=_COPY_CONFIGS, key=["K", "GATHER", "NORM", "PER_PATCH"],
       sizes=["K"])
@triton.jit
def _normalize_kernel(
    x_ptr, mean_ptr, rstd_ptr, nw_ptr, nb_ptr, out_ptr, M, K,
    HWo, Wo, H, W, C, MH, MW, sxb, sxh, sxw, sxc, som, sok,
    GATHER: tl.constexpr, NORM: tl.constexpr, PER_PATCH: tl.constexpr,
    NORM_BIAS: tl.constexpr, BR: tl.constexpr, BL: tl.constexpr,
):
    """out[m, k] = norm(X)[m, k] (:func:`x_tile`), rounded to out's dtype (bf16: to nearest
    even on the bits, as the GPU would)."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BL + tl.arange(0, BL)
    r_mask = rows < M
    c_mask = cols < K
    v = x_tile(x_ptr, mean_ptr, rstd_ptr, nw_ptr, nb_ptr, rows, cols, r_mask, c_mask,
               HWo, Wo, H, W, C, MH, MW, sxb, sxh, sxw, sxc, GATHER, NORM, PER_PATCH, NORM_BIAS)
    v = to_dtype_rne(v, out_ptr.dtype.element_ty)
    offs = rows.to(tl.int64)[:, None] * som + cols.to(tl.int64)[None, :] * sok
    tl.store(out_ptr + offs, v, mask=r_mask[:, None] & c_mask[None, :])


_DEEPSTACK_CONFIGS = autotune_configs(
    [triton.Config({"BR": 4, "BD": 1024}, num_warps=4),
     triton.Config({"BR": 8, "BD": 512}, num_warps=4)],
    triton.Config({"BR": 8, "BD": 32}, num_warps=4),
)


@tuned("connector_deepstack", configs=_DEEPSTACK_CONFIGS, key=["D", "INPLACE"], sizes=["D"],
       restore_value=["h_ptr"])  # in place: h += e
@triton.jit
def _deepstack_kernel(
    h_ptr, e_ptr, idx_ptr, out_ptr, R, D, shr, shd, ser, sed, sor, sod,
    INPLACE: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr,
):
    """DeepStack's masked add over R rows. Out of place: out[r] = h[r] + e[idx[r]] for
    every row r of the hidden states (idx[r] = -1: no visual row, a copy). ``INPLACE``: R is
    the number of visual rows and out = h is written at rows idx[v] only, with
    h[idx[v]] + e[v]. The sum is taken in fp32 and rounded once. Rows without a visual row
    add -0.0, the identity of addition (0.0 would turn -0.0 into +0.0)."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    r_mask = rows < R
    idx = tl.load(idx_ptr + rows, mask=r_mask, other=-1).to(tl.int64)
    if INPLACE:
        h_rows = idx
        e_rows = rows.to(tl.int64)
    else:
        h_rows = rows.to(tl.int64)
        e_rows = idx
    e_mask = r_mask & (e_rows >= 0)
    # -0.0 by its bits: Triton 3.6 makes any float constant equal to 0 +0.0 (3.9 does not)
    neg_zero = tl.full((), 0x80000000, tl.uint32).to(tl.float32, bitcast=True)
    for d0 in range(0, D, BD):
        cols = (d0 + tl.arange(0, BD)).to(tl.int64)
        c_mask = cols < D
        mask = r_mask[:, None] & c_mask[None, :]
        h = tl.load(h_ptr + h_rows[:, None] * shr + cols[None, :] * shd, mask=mask, other=0.0)
        e = tl.load(e_ptr + e_rows[:, None] * ser + cols[None, :] * sed,
                    mask=e_mask[:, None] & c_mask[None, :], other=neg_zero)
        total = h.to(tl.float32) + e.to(tl.float32)
        tl.store(out_ptr + h_rows[:, None] * sor + cols[None, :] * sod,
                 total.to(out_ptr.dtype.element_ty), mask=mask)
# fmt: on

"""The rotary Triton kernel: one program per token rotates every head of q and k.

See :mod:`vlmkernels.ops.rope` for the math. The kernel reads the token's per-lane cos/sin
once (from a table, or computed in fp32 from integer positions and ``inv_freq``), then
rotates its heads BLOCK_H at a time; lanes past the rotary dim pass through.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ...core.runtime import autotune_configs, device_guard, next_pow2
from ...core.tuning import prepared_cache, tuned
from .layout import (  # noqa: F401 (the lane rules: re-exported)
    CHUNKED,
    INTERLEAVED,
    PAIRS,
    PLAIN,
    check_arguments,
    positions_strides,
    qk_layout,
    table_layout,
)

TABLE, POSITIONS = 0, 1  # where the angles come from

# --------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------

_GPU_CONFIGS = [
    triton.Config({"BLOCK_H": 4}, num_warps=2),
    triton.Config({"BLOCK_H": 8}, num_warps=4),
    triton.Config({"BLOCK_H": 16}, num_warps=4),
    triton.Config({"BLOCK_H": 32}, num_warps=8),
]
_CONFIGS = autotune_configs(_GPU_CONFIGS, triton.Config({"BLOCK_H": 4}, num_warps=1))


@triton.jit
def _lane_axis(j, MODE: tl.constexpr, SEC_T: tl.constexpr, SEC_H: tl.constexpr,
               SEC_W: tl.constexpr):  # fmt: skip
    """Position axis (0 = T, 1 = H, 2 = W) of frequency lanes ``j``."""
    if MODE == 1:
        axis = tl.where(j < SEC_T, 0, tl.where(j < SEC_T + SEC_H, 1, 2))
    elif MODE == 2:
        axis = tl.where(
            (j % 3 == 1) & (j < 3 * SEC_H), 1, tl.where((j % 3 == 2) & (j < 3 * SEC_W), 2, 0)
        )
    else:
        axis = j * 0
    return axis


@triton.jit
def _lanes(j, half, PAIRS: tl.constexpr):
    """The lanes of each rotated pair of frequency ``j``: (j, j + half) (rotate-half), or
    (2j, 2j + 1) with PAIRS."""
    if PAIRS:
        return 2 * j, 2 * j + 1
    else:
        return j, j + half


# fmt: off
@triton.jit
def _rotate_heads(
    x_ptr, o_ptr, b, s, n_heads, half: tl.constexpr, D,
    sxb, sxs, sxh, sxd, sob, sos, soh, sod,
    c1, c2, s1, s2, j, lane_mask,
    BACKWARD: tl.constexpr, COPY_PASS: tl.constexpr, PAIRS: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
):
    """Rotate the ``n_heads`` head vectors of token (b, s) of x into o, BLOCK_H at a time.
    With PAIRS the rotated lanes are one contiguous (BLOCK_H, 2 BLOCK_HALF) access, split
    into the pairs' (2j, 2j + 1) lanes and joined back for the store (one 128-bit access
    per 8 bf16 lanes on sm_90a)."""
    x_tok = x_ptr + tl.cast(b, tl.int64) * sxb + tl.cast(s, tl.int64) * sxs
    o_tok = o_ptr + tl.cast(b, tl.int64) * sob + tl.cast(s, tl.int64) * sos
    rot = 2 * half
    for h0 in range(0, n_heads, BLOCK_H):
        heads = h0 + tl.arange(0, BLOCK_H)
        m = (heads < n_heads)[:, None] & lane_mask[None, :]
        x_rows = x_tok + heads[:, None].to(tl.int64) * sxh
        o_rows = o_tok + heads[:, None].to(tl.int64) * soh
        if PAIRS:
            pair = tl.arange(0, 2 * BLOCK_HALF)
            pm = (heads < n_heads)[:, None] & (pair < rot)[None, :]
            x = tl.load(x_rows + pair[None, :] * sxd, mask=pm, other=0.0).to(tl.float32)
            x1, x2 = tl.split(tl.reshape(x, (BLOCK_H, BLOCK_HALF, 2)))
        else:
            x1 = tl.load(x_rows + j[None, :] * sxd, mask=m, other=0.0).to(tl.float32)
            x2 = tl.load(x_rows + (j + half)[None, :] * sxd, mask=m, other=0.0).to(tl.float32)
        if BACKWARD:
            o1 = x1 * c1[None, :] + x2 * s2[None, :]
            o2 = x2 * c2[None, :] - x1 * s1[None, :]
        else:
            o1 = x1 * c1[None, :] - x2 * s1[None, :]
            o2 = x2 * c2[None, :] + x1 * s2[None, :]
        if PAIRS:
            o = tl.reshape(tl.join(o1, o2), (BLOCK_H, 2 * BLOCK_HALF))
            tl.store(o_rows + pair[None, :] * sod, o.to(o_ptr.dtype.element_ty), mask=pm)
        else:
            tl.store(o_rows + j[None, :] * sod, o1.to(o_ptr.dtype.element_ty), mask=m)
            tl.store(o_rows + (j + half)[None, :] * sod, o2.to(o_ptr.dtype.element_ty), mask=m)
        if COPY_PASS:  # lanes past the rotary dim pass through unchanged
            for p0 in range(rot, D, BLOCK_PASS):
                lanes = p0 + tl.arange(0, BLOCK_PASS)
                pm = (heads < n_heads)[:, None] & (lanes < D)[None, :]
                v = tl.load(x_rows + lanes[None, :] * sxd, mask=pm, other=0.0)
                tl.store(o_rows + lanes[None, :] * sod, v, mask=pm)


@tuned("rope", configs=_CONFIGS, key=["HQ", "HK", "D", "half", "SOURCE", "PAIRS"],
       sizes=["HQ", "HK", "D", "half"], restore_value=["qo_ptr", "ko_ptr"])
@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr, pos_ptr, freq_ptr,
    S, HQ, HK, half: tl.constexpr, D, scaling,
    sqb, sqs, sqh, sqd, skb, sks, skh, skd,
    sqob, sqos, sqoh, sqod, skob, skos, skoh, skod,
    sta, stb, sts, std, spa, spb, sps,
    SOURCE: tl.constexpr, MODE: tl.constexpr,
    SEC_T: tl.constexpr, SEC_H: tl.constexpr, SEC_W: tl.constexpr,
    BACKWARD: tl.constexpr, COPY_PASS: tl.constexpr, PAIRS: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
):
    """One token (b, s) per program: its per-lane cos/sin (from the table or from the
    positions) once, then every head of q and of k."""
    t = tl.program_id(0)
    b = t // S
    s = t % S
    j = tl.arange(0, BLOCK_HALF)
    lane_mask = j < half
    axis = _lane_axis(j, MODE, SEC_T, SEC_H, SEC_W)
    if SOURCE == 0:
        row = tl.cast(b, tl.int64) * stb + tl.cast(s, tl.int64) * sts + axis.to(tl.int64) * sta
        l1, l2 = _lanes(j, half, PAIRS)
        c1 = tl.load(cos_ptr + row + l1 * std, mask=lane_mask, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + row + l2 * std, mask=lane_mask, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + row + l1 * std, mask=lane_mask, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + row + l2 * std, mask=lane_mask, other=0.0).to(tl.float32)
    else:
        pos_row = tl.cast(b, tl.int64) * spb + tl.cast(s, tl.int64) * sps
        pos = tl.load(pos_ptr + pos_row + axis.to(tl.int64) * spa, mask=lane_mask, other=0)
        freq = tl.load(freq_ptr + j, mask=lane_mask, other=0.0).to(tl.float32)
        angle = pos.to(tl.float32) * freq
        c1 = tl.cos(angle) * scaling
        s1 = tl.sin(angle) * scaling
        c2 = c1
        s2 = s1
    _rotate_heads(q_ptr, qo_ptr, b, s, HQ, half, D, sqb, sqs, sqh, sqd, sqob, sqos, sqoh, sqod,
                  c1, c2, s1, s2, j, lane_mask, BACKWARD, COPY_PASS, PAIRS,
                  BLOCK_H, BLOCK_HALF, BLOCK_PASS)
    _rotate_heads(k_ptr, ko_ptr, b, s, HK, half, D, skb, sks, skh, skd, skob, skos, skoh, skod,
                  c1, c2, s1, s2, j, lane_mask, BACKWARD, COPY_PASS, PAIRS,
                  BLOCK_H, BLOCK_HALF, BLOCK_PASS)
# fmt: on


_LAUNCHES = prepared_cache()  # (layout of the call) -> (prepared launch, grid)


def launch(q, k, qo, ko, *, head_axis=2, table=None, leading=True, positions=None,
           inv_freq=None, mode=PLAIN, sections=(0, 0, 0), scaling=1.0, backward=False):  # fmt: skip
    """Rotate q, k into qo, ko (which may be q, k: in place), in any layout
    :mod:`.layout` reads (default: canonical (B, S, H, D), heads on axis 2).

    ``table`` is (cos, sin): q's shape without the heads axis, last dim R, with a leading
    axis of 3 (M-RoPE) or 1 when ``leading`` (canonical (A, B, S, R) tables), none otherwise;
    else ``positions`` ((3, B, S) or (3, T) integers) and ``inv_freq`` (R / 2,) give the
    angles. Strides are computed from the tensors' sizes and strides (no views), once per
    layout: the prepared launch is cached by everything but the data pointers.
    """
    # the key holds all that check_arguments (in _prepare, once per key) looks at
    if table is not None:
        cos, sin = table
        angles = (cos.shape, sin.shape, cos.stride(), sin.stride(), cos.dtype, sin.dtype,
                  cos.device, sin.device, leading)  # fmt: skip
        pos, freq = q, q
    else:
        cos = sin = q
        angles = (positions.shape, positions.stride(), positions.dtype, positions.device,
                  inv_freq.shape, inv_freq.dtype, inv_freq.device)  # fmt: skip
        pos, freq = positions, inv_freq
    key = (q.shape, q.stride(), k.shape, k.stride(), qo.stride(), ko.stride(), q.dtype,
           q.device, k.device, head_axis, angles, mode, tuple(sections), scaling, backward,
           qo.data_ptr() == q.data_ptr())  # fmt: skip
    prepared = _LAUNCHES.get(key)
    if prepared is None:
        prepared = _prepare(q, k, qo, ko, head_axis, table, leading, positions, inv_freq, mode,
                            sections, scaling, backward)  # fmt: skip
        if prepared is None:
            return
        if prepared[0] is not None:
            _LAUNCHES[key] = prepared
    run, grid, args, kwargs, cos_sin = prepared
    if cos_sin:  # the tables had different strides: the kernel takes contiguous copies
        cos, sin = cos.contiguous(), sin.contiguous()
    with device_guard(q):
        if run is None:  # the tuner records this launch, or autotuning is on
            _rope_kernel[grid](q, k, qo, ko, cos, sin, pos, freq, *args, **kwargs)
        else:
            run(q, k, qo, ko, cos, sin, pos, freq)


def _prepare(q, k, qo, ko, head_axis, table, leading, positions, inv_freq, mode, sections,
             scaling, backward):  # fmt: skip
    """(prepared launch or None, grid, scalar arguments, constexprs, copy the tables?) of a
    layout, or None when there is nothing to rotate; the arguments checked first."""
    check_arguments(q, k, head_axis, table=table, leading=leading, positions=positions,
                    inv_freq=inv_freq, mode=mode, sections=sections)  # fmt: skip
    b, s, hq, d, q_strides = qk_layout(q, head_axis)
    hk, k_strides = k.shape[head_axis], qk_layout(k, head_axis)[4]
    if b * s == 0 or (hq == 0 and hk == 0):
        return None
    copy_tables = False
    if table is not None:
        cos, sin = table
        _, rot, t_strides = table_layout(cos, q.dim(), head_axis, leading)
        if table_layout(sin, q.dim(), head_axis, leading)[2] != t_strides:
            copy_tables = True  # the kernel takes one set of table strides
            _, rot, t_strides = table_layout(cos.contiguous(), q.dim(), head_axis, leading)
        source, p_strides = TABLE, (0, 0, 0)
    else:
        rot = 2 * inv_freq.numel()
        source, t_strides = POSITIONS, (0, 0, 0, 0)
        p_strides = positions_strides(positions)
    half = rot // 2
    in_place = qo.data_ptr() == q.data_ptr()
    out_strides = (*qk_layout(qo, head_axis)[4], *qk_layout(ko, head_axis)[4])
    args = (s, hq, hk, half, d, float(scaling), *q_strides, *k_strides, *out_strides,
            *t_strides, *p_strides)  # fmt: skip
    kwargs = dict(
        SOURCE=source, MODE=mode & ~PAIRS, PAIRS=bool(mode & PAIRS),
        SEC_T=sections[0], SEC_H=sections[1], SEC_W=sections[2],
        BACKWARD=backward, COPY_PASS=rot < d and not in_place,
        BLOCK_HALF=next_pow2(half), BLOCK_PASS=min(64, next_pow2(max(d - rot, 1))),
    )  # fmt: skip
    grid = (b * s,)
    run = _rope_kernel.prepare(grid, (q, k, qo, ko, q, q, q, q, *args), kwargs)
    return run, grid, args, kwargs, copy_tables

"""Host side of the attention kernels: strides, grids, the split-K choice.

Layouts. Dense inputs are (B, H, L, D) with any strides; packed inputs are (T, H, D) with
int32 ``cu_q`` / ``cu_k`` of B + 1 offsets. Offsets inside one segment are 32-bit (the
batch, head and segment start 64-bit): :func:`addressable` copies or refuses the rest.
The log-sum-exp is fp32, (B, H, Lq) dense and (H, T) packed (flash-attention's varlen
layout). ``keep`` is an optional (B, Lk) uint8 row (nonzero: the key is visible; rows
contiguous), ``lo`` / ``hi`` optional (B, Lq) int32 key ranges.
Grouped-query attention: k and v may have H / G heads for q's H. ``bias`` is an optional
additive per-key logit bias: dense (B, H, Lk) or (B, 1, Lk), packed (H, Tk) or (1, Tk),
any dtype (read as fp32); the backward returns its gradient per query head, fp32, (B, H, Lk)
dense or (H, Tk) packed (the caller sums the broadcast heads). ``gate`` is an optional
tanh gate of the forward's output (out * tanh(gate)): one element, or (H, D).
Attention dropout: ``dropout_p`` in [0, 1) and ``seed`` a one-element int64 tensor on the
inputs' device (read by the kernels, so launches need no host sync and CUDA graphs and
``torch.compile`` see a tensor); p = 0 launches the kernels without dropout code.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from ...core import runtime
from ...core.runtime import (
    cdiv,
    device_guard,
    dot_precision,
    grid_fits,
    launch_lock,
    next_pow2,
    sm_count,
)
from ...core.tuning import prepared_cache
from .delta_kernel import _attn_delta
from .kernels import (
    BWD_Q,
    FWD,
    _attn_combine,
    _attn_fwd32_dropout,
    _dropout_mask_kernel,
    bwd_kv_kernel,
)
from .key_mass_kernels import _attn_key_mass, _attn_row_mass
from .reference import dropout_threshold

MAX_SPLITS = 32
MAX_HEAD_DIM = 256


def block_d(d: int) -> int:
    return max(16, next_pow2(d))


def choose_splits(batch_heads: int, max_lq: int, max_lk: int, device: torch.device) -> int:
    """Key splits per query block: 1 when batch x heads x query blocks (of 64) fill half of
    the multiprocessors twice over; else enough splits to reach two waves, at least 256
    keys per split, at most :data:`MAX_SPLITS`."""
    work = batch_heads * cdiv(max(max_lq, 1), 64)
    sms = sm_count(device)
    if work >= sms:
        return 1
    return max(1, min(cdiv(2 * sms, work), cdiv(max_lk, 256), MAX_SPLITS))


def _problem(q, k, cu_q, max_lq, max_lk):
    """(B, H, D, varlen)."""
    varlen = cu_q is not None
    if varlen:
        return cu_q.numel() - 1, q.shape[1], q.shape[2], True
    return q.shape[0], q.shape[1], q.shape[3], False


def group(q, k) -> int:
    """G: query heads per key/value head (head dim 1 of dense and packed layouts)."""
    return q.shape[1] // max(k.shape[1], 1)


def _bias_strides(bias, varlen: bool) -> tuple[int, int]:
    """(batch, head) strides of the bias, 0 along broadcast dims (the key stride is 1)."""
    if bias is None:
        return 0, 0
    if bias.stride(-1) != 1 and bias.shape[-1] > 1:
        raise ValueError("attention bias: the key dim must be contiguous")
    if varlen:
        return 0, bias.stride(0) if bias.shape[0] > 1 else 0
    return (bias.stride(0) if bias.shape[0] > 1 else 0,
            bias.stride(1) if bias.shape[1] > 1 else 0)  # fmt: skip


def _strides(t, varlen: bool) -> tuple[int, int, int, int]:
    """(batch, head, row, dim) strides of a (B, H, L, D) or packed (T, H, D) tensor (or of
    its strides, a tuple)."""
    st = t if isinstance(t, tuple) else t.stride()
    return (0, st[1], st[0], st[2]) if varlen else st


OFFSET_LIMIT = 2**31


def addressable(t, rows: int, varlen: bool, name: str):
    """``t``, or a contiguous copy, whose offsets inside a segment of up to ``rows`` rows
    fit in 32 bits: the kernels add 32-bit row and dim offsets (inside their inner loops)
    to a 64-bit base per batch, head and segment start. A transposed (B, L, H, D) view at
    H D = 4096 needs the copy from 2^19 rows on; a shape whose contiguous form needs more
    (a packed segment of 2^31 / (H D) rows, a dense one of 2^31 / D) is refused, whatever
    ``t``'s own strides: the outputs and gradients of its shape (out, dq, dk, dv, the split
    partials) are contiguous and written with the same 32-bit offsets (a packed q stored
    heads-major, (H, T, D) transposed, has rows D apart, out H D apart)."""

    def span(strides):
        _, _, s_row, s_dim = _strides(strides, varlen)
        return (max(rows, 1) - 1) * s_row + (t.shape[-1] - 1) * s_dim

    if span(_contiguous_strides(t.shape)) >= OFFSET_LIMIT:
        layout = "packed (T, H, D)" if varlen else "(B, H, L, D)"
        raise ValueError(
            f"attention: {name} {layout} {tuple(t.shape)} has segments of up to {rows} rows: "
            f"offsets inside one segment reach 2^31 elements, past the kernels' 32-bit "
            "in-segment addressing; split the segment"
        )
    return t if span(t.stride()) < OFFSET_LIMIT else t.contiguous()


def grid_bh(batch_heads: int, what: str = "attention") -> tuple[int, int]:
    """(grid y, grid z) of ``batch_heads`` programs along the kernels' batch x heads axis:
    y at most ``runtime.GRID_YZ_LIMIT`` (CUDA's 65,535), the rest folded into z (the
    kernels read :func:`.kernels._grid_bh` and exit past batch x heads). Below the limit z
    is 1: the grid and the programs' order are those of one y axis."""
    limit = runtime.GRID_YZ_LIMIT
    y = max(1, min(batch_heads, limit))
    z = cdiv(batch_heads, y)
    grid_fits(z, what, f"batch x heads / {limit}")
    return y, z


def _lse_strides(t, varlen: bool) -> tuple[int, int, int]:
    """(batch, head, row) strides of a (B, H, Lq) or packed (H, T) row statistic (or of its
    strides, a tuple)."""
    st = t if isinstance(t, tuple) else t.stride()
    return (0, st[0], st[1]) if varlen else st


def _options(q, keep, lo, causal):
    dot_fp32, precision = dot_precision(q.dtype)
    ranges = lo is not None
    return dict(
        CAUSAL=bool(causal) and not ranges, KEEP=keep is not None, RANGES=ranges,
        DOT_FP32=dot_fp32, INPUT_PRECISION=precision,
    )  # fmt: skip


def _dummy(q):
    return q.new_empty(0, dtype=torch.int32)


def _check_seed(dropout_p, seed) -> None:
    if dropout_p and seed is None:
        raise ValueError("attention: dropout_p > 0 needs a seed tensor")


def dropout_mask(seed: torch.Tensor, shape, dropout_p: float) -> torch.Tensor:
    """(B, H, Lq, Lk) bool: the keep mask M the attention kernels draw for ``seed`` (a
    one-element int64 tensor) and ``dropout_p``, from the same Philox function
    (:func:`.kernels._dropout_keep`) in a small kernel of its own; for tests and debugging.
    Packed segments use their own rows: segment b's mask is ``[b, :, :Lq_b, :Lk_b]``."""
    b, h, lq, lk = (int(n) for n in shape)
    mask = torch.empty((b, h, lq, lk), dtype=torch.uint8, device=seed.device)
    if mask.numel() == 0:
        return mask.bool()
    thr, _ = dropout_threshold(dropout_p)
    grid_fits(b * h, "dropout_mask", "batch x heads")  # grid z
    grid_fits(cdiv(lk, 64), "dropout_mask", "key blocks of 64")  # grid y
    with device_guard(seed), launch_lock():
        _dropout_mask_kernel[(cdiv(lq, 32), cdiv(lk, 64), b * h)](
            seed, mask, h, lq, lk, thr, *mask.stride()[:3], BM=32, BN=64,
            **runtime.fp_fusion(),
        )  # fmt: skip
    return mask.bool()


def _gate_strides(gate) -> tuple[int, int]:
    """(head, channel) strides of a one-element or (H, D) gate."""
    if gate is None or gate.numel() == 1:
        return 0, 0
    return gate.stride(0), gate.stride(1)


@dataclasses.dataclass(frozen=True)
class _ForwardPlan:
    """A forward's launches for one layout: ``kernel(*pointers)`` (the 14 pointers of
    :func:`forward`'s kernel) and, with more than one split, ``combine(ws, wl, out, lse,
    cu_q, gate)``; prepared launches where they can be (then the plan is cached), else
    closures over ``kernel[grid](...)``."""

    kernel: Callable
    combine: Callable | None
    splits: int
    dummy: torch.Tensor  # the stand-in pointer of an absent optional tensor (no elements)
    cached: bool


_FORWARD_PLANS = prepared_cache()  # (layout of a forward call) -> _ForwardPlan


def _layout(t):
    return None if t is None else (t.shape, t.stride())


def forward(q, k, v, cu_q, cu_k, max_lq, max_lk, keep, lo, hi, causal, scale, num_splits=None,
            bias=None, gate=None, dropout_p=0.0, seed=None, row_logits=None,
            mass_row=-1):  # fmt: skip
    """(out, lse): out like q (contiguous), lse fp32 (see the module docstring); with
    dropout, split-K runs as without (each split's partial is dropped, its normaliser not).
    ``row_logits`` (dense inputs; (B, H, Lk) fp32): also query row ``mass_row``'s logits
    in base 2 (scale log2(e) q k^T + log2(e) bias, -inf where masked; keys no program
    visits are left as they are).

    The launches are prepared once per layout (shapes, strides, dtype, device, options):
    a call then allocates its outputs and passes the pointers."""
    b, h, d, varlen = _problem(q, k, cu_q, max_lq, max_lk)
    q = addressable(q, max_lq, varlen, "q")
    k, v = addressable(k, max_lk, varlen, "k"), addressable(v, max_lk, varlen, "v")
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse_shape = (h, q.shape[0]) if varlen else (b, h, q.shape[2])
    lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device)
    if b * h == 0 or max_lq == 0 or out.numel() == 0:
        return out, lse
    if max_lk == 0:  # no keys: every row is empty, or has no answer (media ranges lo > hi)
        out.zero_(), lse.fill_(float("-inf"))
        if lo is not None and not varlen:
            out.masked_fill_((lo > hi)[:, None, :, None], float("nan"))
        return out, lse
    _check_seed(dropout_p, seed)
    key = (q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), q.dtype, q.device, b,
           max_lq, max_lk, bool(causal), float(scale), num_splits, float(dropout_p),
           int(mass_row), _layout(keep), _layout(lo), _layout(hi), _layout(bias),
           _layout(gate), _layout(row_logits))  # fmt: skip
    plan = _FORWARD_PLANS.get(key)
    if plan is None:
        plan = _forward_plan(q, k, v, b, h, d, varlen, max_lq, max_lk, keep, lo, causal, scale,
                             num_splits, bias, gate, dropout_p, row_logits, mass_row)  # fmt: skip
        if plan.cached:
            _FORWARD_PLANS[key] = plan
    dummy = plan.dummy
    target, target_lse = out, lse
    if plan.splits > 1:  # partials: (splits, *q.shape) and (splits, *lse.shape), fp32
        target = torch.empty((plan.splits, *q.shape), dtype=torch.float32, device=q.device)
        target_lse = torch.empty((plan.splits, *lse_shape), dtype=torch.float32,
                                 device=q.device)  # fmt: skip
    cu_q, cu_k = (cu_q, cu_k) if varlen else (dummy, dummy)
    gate = gate if gate is not None else dummy
    with device_guard(q):
        plan.kernel(q, k, v, target, target_lse, cu_q, cu_k,
                    keep if keep is not None else dummy, lo if lo is not None else dummy,
                    hi if hi is not None else dummy, bias if bias is not None else dummy, gate,
                    seed if dropout_p else dummy,
                    row_logits if row_logits is not None else dummy)  # fmt: skip
        if plan.splits > 1:
            plan.combine(target, target_lse, out, lse, cu_q, gate)
    return out, lse


def _contiguous_strides(shape) -> tuple[int, ...]:
    strides, n = [], 1
    for size in reversed(shape):
        strides.append(n)
        n *= max(int(size), 1)
    return tuple(reversed(strides))


def _forward_plan(q, k, v, b, h, d, varlen, max_lq, max_lk, keep, lo, causal, scale,
                  num_splits, bias, gate, dropout_p, row_logits, mass_row):  # fmt: skip
    """The launches of :func:`forward` for the layout of these arguments."""
    dummy = _dummy(q)
    splits = num_splits or choose_splits(b * h, max_lq, max_lk, q.device)
    splits = max(1, min(int(splits), MAX_SPLITS))
    thr, drop_scale = dropout_threshold(dropout_p) if dropout_p else (0, 1.0)
    options = dict(
        _options(q, keep, lo, causal),
        VARLEN=varlen,
        BLOCK_D=block_d(d),
        EVEN_D=block_d(d) == d,
        BIAS=bias is not None,
        GATE=gate is not None,
        DROPOUT=bool(dropout_p),
        SPLIT=splits > 1,
        ROW=row_logits is not None,
    )
    # the outputs and the split partials are contiguous: (splits,) + q's and lse's shapes
    lse_shape = (h, q.shape[0]) if varlen else (b, h, q.shape[2])
    out_strides = _strides(_contiguous_strides(q.shape), varlen)
    lse_strides = _lse_strides(_contiguous_strides(lse_shape), varlen)
    split_strides = (math.prod(q.shape), math.prod(lse_shape)) if splits > 1 else (0, 0)
    scalars = (max_lq, max_lk, h, group(q, k), d, float(scale), splits, *_strides(q, varlen),
               *_strides(k, varlen), *_strides(v, varlen), *out_strides, split_strides[0],
               *lse_strides, split_strides[1], keep.stride(0) if keep is not None else 0,
               lo.stride(0) if lo is not None else 0, *_bias_strides(bias, varlen),
               *_gate_strides(gate), thr, drop_scale, int(mass_row),
               *(row_logits.stride()[:2] if row_logits is not None else (0, 0)),
               b * h)  # fmt: skip
    kernel = FWD[q.dtype == torch.float32]
    if dropout_p and q.dtype == torch.float32:
        kernel = _attn_fwd32_dropout
    stand_ins = (q, k, v, *(dummy,) * 11)  # only their positions count, and q's dtype
    grid_y, grid_z = grid_bh(b * h)
    grid_fits(grid_z * splits, "attention", "key splits x grid z")
    grid = lambda meta: (cdiv(max_lq, meta["BM"]), grid_y, grid_z * splits)  # noqa: E731
    kernel_run = kernel.launcher(grid, (*stand_ins, *scalars), options)
    combine_run = None
    if splits > 1:
        c_scalars = (max_lq, h, d, splits, *out_strides, split_strides[0], *lse_strides,
                     split_strides[1], *out_strides, *lse_strides,
                     *_gate_strides(gate), b * h)  # fmt: skip
        c_options = dict(VARLEN=varlen, GATE=gate is not None, BLOCK_D=block_d(d),
                         EVEN_D=block_d(d) == d)  # fmt: skip
        grid = lambda meta: (cdiv(max_lq, meta["BM"]), grid_y, grid_z)  # noqa: E731
        combine_run = _attn_combine.launcher(grid, (q, *(dummy,) * 5, *c_scalars), c_options)
    cached = kernel_run[1] and (combine_run is None or combine_run[1])
    return _ForwardPlan(kernel_run[0], combine_run and combine_run[0], splits, dummy, cached)


def delta(out, grad_out, lse, grad_lse):
    """lse's shape, fp32: rowsum(dO * O) - dlse per query row, 0 where lse is not finite
    (:mod:`.delta_kernel`); ``grad_out`` and ``grad_lse`` may be None (zero). Dense out
    (B, H, Lq, D) with lse (B, H, Lq), or packed (T, H, D) with (H, T); any strides."""
    varlen = out.dim() == 3
    nh, nl = lse.shape[-2:]
    d = out.shape[-1]
    res = torch.empty(lse.shape, dtype=torch.float32, device=lse.device)
    if res.numel() == 0:
        return res
    g = grad_out if grad_out is not None else out
    gl = grad_lse if grad_lse is not None else lse
    with device_guard(lse):
        _attn_delta[lambda meta: (cdiv(res.numel(), meta["BR"]),)](
            out, g, lse, gl, res, res.numel(), nh, nl, d, *_strides(out, varlen),
            *_strides(g, varlen), *_lse_strides(lse, varlen), *_lse_strides(gl, varlen),
            HAS_DO=grad_out is not None, HAS_DLSE=grad_lse is not None,
            BLOCK_D=min(block_d(d), 64),
        )  # fmt: skip
    return res


def backward(do, q, k, v, lse, delta, cu_q, cu_k, max_lq, max_lk, keep, lo, hi, causal, scale,
             bias=None, dropout_p=0.0, seed=None):  # fmt: skip
    """(dq, dk, dv, dbias) for ``delta`` = rowsum(dO * O) - dlse (O the dropped output),
    laid out as lse; dbias None without a bias, else fp32 per query head (see the module
    docstring); the forward's ``dropout_p`` and ``seed``."""
    b, h, d, varlen = _problem(q, k, cu_q, max_lq, max_lk)
    q, do = addressable(q, max_lq, varlen, "q"), addressable(do, max_lq, varlen, "grad_out")
    k, v = addressable(k, max_lk, varlen, "k"), addressable(v, max_lk, varlen, "v")
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    db = None
    if bias is not None:
        db_shape = (h, k.shape[0]) if varlen else (b, h, k.shape[2])
        db = torch.zeros(db_shape, dtype=torch.float32, device=q.device)
    if b * h == 0 or max_lq == 0 or max_lk == 0:  # nothing attends: every gradient is 0
        return dq.zero_(), dk.zero_(), dv.zero_(), db
    _check_seed(dropout_p, seed)
    key = (q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), do.stride(),
           lse.stride(), delta.stride(), q.dtype, q.device, b, max_lq, max_lk, bool(causal),
           float(scale), float(dropout_p), _layout(keep), _layout(lo), _layout(hi),
           _layout(bias))  # fmt: skip
    plan = _BACKWARD_PLANS.get(key)
    if plan is None:
        plan = _backward_plan(do, q, k, v, lse, delta, b, h, d, varlen, max_lq, max_lk, keep,
                              lo, causal, scale, bias, dropout_p)  # fmt: skip
        if plan.cached:
            _BACKWARD_PLANS[key] = plan
    dummy = plan.dummy
    pointers = (cu_q if varlen else dummy, cu_k if varlen else dummy,
                keep if keep is not None else dummy, lo if lo is not None else dummy,
                hi if hi is not None else dummy, bias if bias is not None else dummy)  # fmt: skip
    seed_ptr = seed if dropout_p else dummy
    with device_guard(q):
        plan.kv(q, k, v, do, lse, delta, dk, dv, *pointers, db if db is not None else dummy,
                seed_ptr)  # fmt: skip
        plan.q(q, k, v, do, lse, delta, dq, *pointers, seed_ptr)
    return dq, dk, dv, db


@dataclasses.dataclass(frozen=True)
class _BackwardPlan:
    """A backward's launches for one layout: ``kv`` (the dK/dV pass) and ``q`` (the dQ
    pass), each taking its pointers (see :class:`_ForwardPlan`)."""

    kv: Callable
    q: Callable
    dummy: torch.Tensor
    cached: bool


_BACKWARD_PLANS = prepared_cache()  # (layout of a backward call) -> _BackwardPlan


def _backward_plan(do, q, k, v, lse, delta, b, h, d, varlen, max_lq, max_lk, keep, lo, causal,
                   scale, bias, dropout_p):  # fmt: skip
    """The launches of :func:`backward` for the layout of these arguments (dQ, dK, dV and
    dbias contiguous)."""
    dummy = _dummy(q)
    g = group(q, k)
    thr, drop_scale = dropout_threshold(dropout_p) if dropout_p else (0, 1.0)
    options = dict(
        _options(q, keep, lo, causal),
        VARLEN=varlen,
        BLOCK_D=block_d(d),
        EVEN_D=block_d(d) == d,
        BIAS=bias is not None,
        DROPOUT=bool(dropout_p),
    )
    common = (max_lq, max_lk, h, g, d, float(scale), *_strides(q, varlen), *_strides(k, varlen),
              *_strides(v, varlen), *_strides(do, varlen), *_lse_strides(lse, varlen),
              *_lse_strides(delta, varlen))  # fmt: skip
    tail = (keep.stride(0) if keep is not None else 0, lo.stride(0) if lo is not None else 0,
            *_bias_strides(bias, varlen))  # fmt: skip
    db_shape = (h, k.shape[0]) if varlen else (b, h, k.shape[2])
    db_strides = (0, 0) if bias is None else _lse_strides(_contiguous_strides(db_shape),
                                                          varlen)[:2]  # fmt: skip
    kv_strides = _strides(_contiguous_strides(k.shape), varlen)
    fp32 = q.dtype == torch.float32
    kv_y, kv_z = grid_bh(b * (h // g))
    q_y, q_z = grid_bh(b * h)
    kv = bwd_kv_kernel(fp32, bias is not None, g > 1).launcher(
        lambda meta: (cdiv(max_lk, meta["BN"]), kv_y, kv_z),
        (q, k, v, *(dummy,) * 13, *common, *kv_strides, *kv_strides, *tail, *db_strides, thr,
         drop_scale, b * (h // g)), options,
    )  # fmt: skip
    dq = BWD_Q[fp32].launcher(
        lambda meta: (cdiv(max_lq, meta["BM"]), q_y, q_z),
        (q, k, v, *(dummy,) * 11, *common, *_strides(_contiguous_strides(q.shape), varlen),
         *tail, thr, drop_scale, b * h), options,
    )  # fmt: skip
    return _BackwardPlan(kv[0], dq[0], dummy, kv[1] and dq[1])


def forward_row_mass(q, k, v, causal, scale, row, weight, bias=None):
    """(out, lse, mass): the dense forward with ``mass`` (B, Lk) fp32 = ``weight`` x the
    attention each key receives from query row ``row``, summed over heads. The forward
    stores that row's logits (B H Lk fp32) and a small pass turns them into probabilities
    with the row's lse: K is read once, where :func:`key_mass` reads it again."""
    b, h, lq, _ = q.shape
    lk = k.shape[2]
    f32 = dict(dtype=torch.float32, device=q.device)
    # causal: the key blocks past the row's query block are never visited, their logits -inf
    logits = (
        torch.full((b, h, lk), float("-inf"), **f32) if causal else torch.empty(b, h, lk, **f32)
    )
    out, lse = forward(q, k, v, None, None, lq, lk, None, None, None, causal, scale, None, bias,
                       row_logits=logits, mass_row=row)  # fmt: skip
    if b * h == 0 or lq == 0 or lk == 0:  # no head or no key: nothing received
        return out, lse, torch.zeros((b, lk), **f32)
    mass = torch.empty((b, lk), **f32)
    grid_fits(b, "attention_row_mass", "batch")
    with device_guard(q):
        _attn_row_mass[lambda meta: (cdiv(lk, meta["BN"]), b)](
            logits, lse, mass, h, lk, int(row), float(weight), *logits.stride()[:2],
            *lse.stride(), mass.stride(0),
        )  # fmt: skip
    return out, lse, mass


def key_mass(q, k, lse, causal, scale, row_first, row_last, weight, bias=None):
    """(B, H, Lk) fp32: ``weight`` x the attention each key receives from query rows
    row_first <= i < row_last, per query head (dense inputs)."""
    b, h, lq, d = q.shape
    lk = k.shape[2]
    q, k = addressable(q, lq, False, "q"), addressable(k, lk, False, "k")
    mass = torch.empty((b, h, lk), dtype=torch.float32, device=q.device)
    if mass.numel() == 0:
        return mass
    grid_y, grid_z = grid_bh(b * h, "attention_key_mass")
    dot_fp32, precision = dot_precision(q.dtype)
    with device_guard(q):
        _attn_key_mass[lambda meta: (cdiv(lk, meta["BN"]), grid_y, grid_z)](
            q, k, lse, bias if bias is not None else _dummy(q), mass, lq, lk, h, group(q, k), d,
            float(scale), int(row_first), int(row_last), float(weight), *q.stride(),
            *k.stride(), *lse.stride(), *_bias_strides(bias, False), mass.stride(0),
            mass.stride(1), b * h, CAUSAL=bool(causal), BIAS=bias is not None, BLOCK_D=block_d(d),
            EVEN_D=block_d(d) == d, DOT_FP32=dot_fp32, INPUT_PRECISION=precision,
        )  # fmt: skip
    return mass

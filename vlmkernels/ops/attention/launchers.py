"""Host side of the attention kernels: strides, grids, the split-K choice.

Layouts. Dense inputs are (B, H, L, D) with any strides; packed inputs are (T, H, D) with
int32 ``cu_q`` / ``cu_k`` of B + 1 offsets. The log-sum-exp is fp32, (B, H, Lq) dense and
(H, T) packed (flash-attention's varlen layout). ``keep`` is an optional (B, Lk) uint8 row
(nonzero: the key is visible), ``lo`` / ``hi`` optional (B, Lq) int32 key ranges.
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

import torch

from ...core.runtime import cdiv, device_guard, dot_precision, next_pow2, sm_count
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


def _strides(t: torch.Tensor, varlen: bool) -> tuple[int, int, int, int]:
    """(batch, head, row, dim) strides of a (B, H, L, D) or packed (T, H, D) tensor."""
    if varlen:
        return 0, t.stride(1), t.stride(0), t.stride(2)
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def _lse_strides(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, head, row) strides of a (B, H, Lq) or packed (H, T) row statistic."""
    if varlen:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


def _options(q, keep, lo, causal):
    dot_fp32, precision = dot_precision(q.dtype)
    ranges = lo is not None
    return dict(
        CAUSAL=bool(causal) and not ranges, KEEP=keep is not None, RANGES=ranges,
        DOT_FP32=dot_fp32, INPUT_PRECISION=precision,
    )  # fmt: skip


def _dummy(q):
    return q.new_empty(0, dtype=torch.int32)


def _dropout_args(q, dropout_p, seed):
    """(seed pointer, drop_thr, drop_scale, DROPOUT) of a launch."""
    if not dropout_p:
        return _dummy(q), 0, 1.0, False
    if seed is None:
        raise ValueError("attention: dropout_p > 0 needs a seed tensor")
    return (seed, *dropout_threshold(dropout_p), True)


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
    with device_guard(seed):
        _dropout_mask_kernel[(cdiv(lq, 32), cdiv(lk, 64), b * h)](
            seed, mask, h, lq, lk, thr, *mask.stride()[:3], BM=32, BN=64,
        )  # fmt: skip
    return mask.bool()


def _gate_strides(gate) -> tuple[int, int]:
    """(head, channel) strides of a one-element or (H, D) gate."""
    if gate is None or gate.numel() == 1:
        return 0, 0
    return gate.stride(0), gate.stride(1)


def forward(q, k, v, cu_q, cu_k, max_lq, max_lk, keep, lo, hi, causal, scale, num_splits=None,
            bias=None, gate=None, dropout_p=0.0, seed=None, row_logits=None,
            mass_row=-1):  # fmt: skip
    """(out, lse): out like q (contiguous), lse fp32 (see the module docstring); with
    dropout, split-K runs as without (each split's partial is dropped, its normaliser not).
    ``row_logits`` (dense inputs; (B, H, Lk) fp32): also query row ``mass_row``'s logits
    in base 2 (scale log2(e) q k^T + log2(e) bias, -inf where masked; keys no program
    visits are left as they are)."""
    b, h, d, varlen = _problem(q, k, cu_q, max_lq, max_lk)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse_shape = (h, q.shape[0]) if varlen else (b, h, q.shape[2])
    lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device)
    if b * h == 0 or max_lq == 0 or out.numel() == 0:
        return out, lse
    if max_lk == 0:  # no keys: every row is empty
        return out.zero_(), lse.fill_(float("-inf"))
    splits = num_splits or choose_splits(b * h, max_lq, max_lk, q.device)
    splits = max(1, min(int(splits), MAX_SPLITS))
    dummy = _dummy(q)
    seed_ptr, thr, drop_scale, dropout = _dropout_args(q, dropout_p, seed)
    options = dict(
        _options(q, keep, lo, causal),
        VARLEN=varlen,
        BLOCK_D=block_d(d),
        EVEN_D=block_d(d) == d,
        BIAS=bias is not None,
        GATE=gate is not None,
        DROPOUT=dropout,
    )
    if splits > 1:
        # partials: (splits, B, H, Lq, D) dense or (splits, T, H, D) packed, fp32
        ws_shape = (splits, *q.shape)
        ws = torch.empty(ws_shape, dtype=torch.float32, device=q.device)
        wl = torch.empty((splits, *lse_shape), dtype=torch.float32, device=q.device)
        target, target_lse = ws[0], wl[0]
        split_strides = (ws.stride(0), wl.stride(0))
    else:
        target, target_lse, split_strides = out, lse, (0, 0)
    scalars = (max_lq, max_lk, h, group(q, k), d, float(scale), splits,
               *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen),
               *_strides(target, varlen), split_strides[0], *_lse_strides(target_lse, varlen),
               split_strides[1], keep.stride(0) if keep is not None else 0,
               lo.stride(0) if lo is not None else 0,
               *_bias_strides(bias, varlen), *_gate_strides(gate), thr, drop_scale,
               int(mass_row),
               *(row_logits.stride()[:2] if row_logits is not None else (0, 0)))  # fmt: skip

    def grid(meta):
        return (cdiv(max_lq, meta["BM"]), b * h, splits)

    with device_guard(q):
        kernel = FWD[q.dtype == torch.float32]
        if dropout and q.dtype == torch.float32:
            kernel = _attn_fwd32_dropout
        kernel[grid](
            q, k, v, target, target_lse,
            cu_q if varlen else dummy, cu_k if varlen else dummy,
            keep if keep is not None else dummy, lo if lo is not None else dummy,
            hi if hi is not None else dummy, bias if bias is not None else dummy,
            gate if gate is not None else dummy, seed_ptr,
            row_logits if row_logits is not None else dummy, *scalars, SPLIT=splits > 1,
            ROW=row_logits is not None, **options,
        )  # fmt: skip
        if splits > 1:
            _attn_combine[lambda meta: (cdiv(max_lq, meta["BM"]), b * h)](
                ws, wl, out, lse, cu_q if varlen else dummy,
                gate if gate is not None else dummy, max_lq, h, d, splits,
                *_strides(ws[0], varlen), ws.stride(0), *_lse_strides(wl[0], varlen),
                wl.stride(0), *_strides(out, varlen), *_lse_strides(lse, varlen),
                *_gate_strides(gate), VARLEN=varlen, GATE=gate is not None, BLOCK_D=block_d(d),
                EVEN_D=block_d(d) == d,
            )  # fmt: skip
    return out, lse


def backward(do, q, k, v, lse, delta, cu_q, cu_k, max_lq, max_lk, keep, lo, hi, causal, scale,
             bias=None, dropout_p=0.0, seed=None):  # fmt: skip
    """(dq, dk, dv, dbias) for ``delta`` = rowsum(dO * O) - dlse (O the dropped output),
    laid out as lse; dbias None without a bias, else fp32 per query head (see the module
    docstring); the forward's ``dropout_p`` and ``seed``."""
    b, h, d, varlen = _problem(q, k, cu_q, max_lq, max_lk)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    db = None
    if bias is not None:
        db_shape = (h, k.shape[0]) if varlen else (b, h, k.shape[2])
        db = torch.zeros(db_shape, dtype=torch.float32, device=q.device)
    if b * h == 0 or max_lq == 0 or max_lk == 0:  # nothing attends: every gradient is 0
        return dq.zero_(), dk.zero_(), dv.zero_(), db
    dummy = _dummy(q)
    g = group(q, k)
    seed_ptr, thr, drop_scale, dropout = _dropout_args(q, dropout_p, seed)
    options = dict(
        _options(q, keep, lo, causal),
        VARLEN=varlen,
        BLOCK_D=block_d(d),
        EVEN_D=block_d(d) == d,
        BIAS=bias is not None,
        DROPOUT=dropout,
    )
    common = (max_lq, max_lk, h, g, d, float(scale), *_strides(q, varlen), *_strides(k, varlen),
              *_strides(v, varlen), *_strides(do, varlen), *_lse_strides(lse, varlen),
              *_lse_strides(delta, varlen))  # fmt: skip
    tail = (keep.stride(0) if keep is not None else 0, lo.stride(0) if lo is not None else 0,
            *_bias_strides(bias, varlen))  # fmt: skip
    db_strides = (0, 0) if db is None else _lse_strides(db, varlen)[:2]
    pointers = (cu_q if varlen else dummy, cu_k if varlen else dummy,
                keep if keep is not None else dummy, lo if lo is not None else dummy,
                hi if hi is not None else dummy, bias if bias is not None else dummy)  # fmt: skip
    with device_guard(q):
        fp32 = q.dtype == torch.float32
        kv_pass = bwd_kv_kernel(fp32, bias is not None, g > 1)
        kv_pass[lambda meta: (cdiv(max_lk, meta["BN"]), b * (h // g))](
            q, k, v, do, lse, delta, dk, dv, *pointers, db if db is not None else dummy,
            seed_ptr, *common, *_strides(dk, varlen), *_strides(dv, varlen), *tail,
            *db_strides, thr, drop_scale, **options,
        )  # fmt: skip
        BWD_Q[fp32][lambda meta: (cdiv(max_lq, meta["BM"]), b * h)](
            q, k, v, do, lse, delta, dq, *pointers, seed_ptr, *common, *_strides(dq, varlen),
            *tail, thr, drop_scale, **options,
        )  # fmt: skip
    return dq, dk, dv, db


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
    mass = torch.empty((b, h, lk), dtype=torch.float32, device=q.device)
    if mass.numel() == 0:
        return mass
    dot_fp32, precision = dot_precision(q.dtype)
    with device_guard(q):
        _attn_key_mass[lambda meta: (cdiv(lk, meta["BN"]), b * h)](
            q, k, lse, bias if bias is not None else _dummy(q), mass, lq, lk, h, group(q, k), d,
            float(scale), int(row_first), int(row_last), float(weight), *q.stride(),
            *k.stride(), *lse.stride(), *_bias_strides(bias, False), mass.stride(0),
            mass.stride(1), CAUSAL=bool(causal), BIAS=bias is not None, BLOCK_D=block_d(d),
            EVEN_D=block_d(d) == d, DOT_FP32=dot_fp32, INPUT_PRECISION=precision,
        )  # fmt: skip
    return mass

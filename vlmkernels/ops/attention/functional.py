"""The attention family's public functions: argument checks that name the argument at
fault, raised before any launch, then the ops of :mod:`.ops`."""

from __future__ import annotations

import functools
import math
import numbers

import torch

from ...core.backend import resolve_backend
from ...core.checks import check_bool, check_int
from ...core.runtime import autocast_operands, divided, mean_weight, tracing
from . import launchers, reference
from .launchers import MAX_HEAD_DIM
from .ops import attention_core, attention_key_mass, attention_row_mass

__all__ = ["attention", "cross_attention", "draw_dropout_seed", "dropout_mask",
           "media_cross_attention"]  # fmt: skip

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_qkv(op, q, k, v, dims):
    """q, k, v: tensors of ``dims`` dimensions, one floating dtype, one device, one head
    dim (0 < D <= 256), k and v of one length, batch and head count, which divides q's
    (grouped-query attention; q without heads takes any count, SDPA's empty output)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _DTYPES:
            names = ", ".join(str(d).removeprefix("torch.") for d in _DTYPES)
            raise TypeError(f"{op}: {name} must be a floating tensor ({names}), got {t.dtype}")
        if t.dim() != dims:
            layout = "(B, H, L, D)" if dims == 4 else "packed (T, H, D)"
            raise ValueError(f"{op}: {name} must be {dims}-D {layout}, got shape "
                             f"{tuple(t.shape)}")  # fmt: skip
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{op}: {name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{op}: {name} must be on q's device {q.device}, got {t.device}")
    d = q.shape[-1]
    if not 0 < d <= MAX_HEAD_DIM:
        raise ValueError(f"{op}: q's head dim must be in [1, {MAX_HEAD_DIM}], got {d}")
    for name, t in (("k", k), ("v", v)):
        if t.shape[-1] != d:
            raise ValueError(f"{op}: {name} must have q's head dim {d}, got {t.shape[-1]}")
        hq, hk = q.shape[1], t.shape[1]
        if hq and (hk == 0 or hq % hk):  # no query heads: SDPA's empty output
            raise ValueError(f"{op}: {name}'s number of heads must divide q's {hq} "
                             f"(grouped-query attention), got shape "
                             f"{tuple(t.shape)}")  # fmt: skip
    if v.shape[:-1] != k.shape[:-1]:
        raise ValueError(f"{op}: v must have k's batch, heads and length {tuple(k.shape[:-1])}, "
                         f"got {tuple(v.shape[:-1])}")  # fmt: skip
    if dims == 4 and k.shape[0] != q.shape[0]:
        raise ValueError(f"{op}: k must have q's batch size {q.shape[0]}, got {k.shape[0]}")


def _key_bias(op, bias, q, k, packed):
    """The checked ``key_bias`` in the core's layout: dense (B, Lk) or (B, H, Lk) to
    (B, 1 or H, Lk); packed (Tk,) or (H, Tk) to (1 or H, Tk); keys contiguous."""
    if bias is None:
        return None
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"{op}: key_bias must be a tensor, got {type(bias).__name__}")
    if bias.dtype not in _DTYPES:
        raise TypeError(f"{op}: key_bias must be a floating tensor, got {bias.dtype}")
    if bias.device != q.device:
        raise ValueError(f"{op}: key_bias must be on q's device {q.device}, got {bias.device}")
    h = q.shape[1]
    if packed:
        tk = k.shape[0]
        shapes = ((tk,), (h, tk))
        names = f"(Tk,) = {(tk,)} or (H, Tk) = {(h, tk)}"
    else:
        b, lk = q.shape[0], k.shape[2]
        shapes = ((b, lk), (b, h, lk))
        names = f"(B, Lk) = {(b, lk)} or (B, H, Lk) = {(b, h, lk)}"
    shape = tuple(bias.shape)  # compared one by one: see _gate
    if not (shape == shapes[0] or shape == shapes[1]):
        raise ValueError(f"{op}: key_bias must have shape {names}, got {tuple(bias.shape)}")
    if bias.dim() == len(shapes[0]):
        bias = bias.unsqueeze(-2)
    return bias if bias.stride(-1) == 1 else bias.contiguous()


def _gate(op, gate, q):
    """The checked tanh ``gate``: one element, or one value per output channel ((H, D) or
    (H D,), viewed as (H, D))."""
    if gate is None:
        return None
    if not isinstance(gate, torch.Tensor):
        raise TypeError(f"{op}: gate must be a tensor, got {type(gate).__name__}")
    if gate.dtype not in _DTYPES:
        raise TypeError(f"{op}: gate must be a floating tensor, got {gate.dtype}")
    if gate.device != q.device:
        raise ValueError(f"{op}: gate must be on q's device {q.device}, got {gate.device}")
    h, d = q.shape[1], q.shape[-1]
    if gate.numel() == 1:
        return gate
    # compared one by one: dynamo's tuple containment misjudges a constant size against an
    # equal symbolic one (torch.compile(dynamic=True) refused a valid (H, D) gate)
    shape = tuple(gate.shape)
    if not (shape == (h * d,) or shape == (h, d)):
        raise ValueError(f"{op}: gate must have one element or shape (H, D) = {(h, d)} or "
                         f"(H D,) = {(h * d,)}, got {tuple(gate.shape)}")  # fmt: skip
    return gate.reshape(h, d)


def _scale(op, scale, d):
    if scale is None:
        return 1.0 / math.sqrt(d)
    # comparisons, not math.isfinite: a compiled graph traces them for a symbolic float
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{op}: scale must be a finite float or None, got {scale!r}")
    if not -math.inf < float(scale) < math.inf:  # {float(x)}: see core.checks.check_real
        raise TypeError(f"{op}: scale must be a finite float or None, got {float(scale)}")
    return float(scale)


def _check_dropout_p(op, dropout_p) -> None:
    """``dropout_p`` a real number (not a bool) in [0, 1)."""
    message = f"{op}: dropout_p must be a float in [0, 1), got "
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise ValueError(message + repr(dropout_p))
    if not 0 <= dropout_p < 1:  # {float(x)}: see core.checks.check_real
        raise ValueError(f"{message}{float(dropout_p)}")


def draw_dropout_seed(device) -> torch.Tensor:
    """A (1,) int64 dropout seed in [0, 2^62): one ``torch.randint`` draw from the torch
    generator of ``device`` (as SDPA's dropout draws its Philox seed and offset), so
    ``torch.manual_seed`` makes the masks reproducible, and each call draws a new one."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


def dropout_mask(seed: torch.Tensor, shape, dropout_p: float) -> torch.Tensor:
    """(B, H, Lq, Lk) bool: the keep mask M the attention kernels draw for ``seed`` (a
    one-element int64 tensor) and ``dropout_p``, from the same Philox function (a small
    kernel of its own on the Triton backend; the PyTorch path's copy of the function
    elsewhere); for tests and debugging. Packed segments use their own rows: segment b's
    mask is ``[b, :, :Lq_b, :Lk_b]``."""
    op = "dropout_mask"
    if not isinstance(seed, torch.Tensor) or seed.dtype != torch.int64 or seed.numel() != 1:
        raise TypeError(f"{op}: seed must be a one-element int64 tensor, got "
                        f"{getattr(seed, 'dtype', type(seed).__name__)} "
                        f"{tuple(getattr(seed, 'shape', ()))}")  # fmt: skip
    if (not isinstance(shape, (tuple, list, torch.Size)) or len(shape) != 4
            or any(isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0
                   for n in shape)):  # fmt: skip
        raise ValueError(f"{op}: shape must be four ints >= 0 (B, H, Lq, Lk), got {shape!r}")
    _check_dropout_p(op, dropout_p)
    b, h, lq, lk = (int(n) for n in shape)
    if resolve_backend("attention", seed) != "torch":
        return launchers.dropout_mask(seed, (b, h, lq, lk), float(dropout_p))
    ar = functools.partial(torch.arange, dtype=torch.int64, device=seed.device)
    return reference.dropout_keep(seed, ar(b)[:, None, None, None], ar(h)[:, None, None],
                                  ar(lq)[:, None], ar(lk), float(dropout_p))  # fmt: skip


def _dropout(op, dropout_p, dropout_seed, q):
    """(p, seed) for the core: p a float in [0, 1), the seed a (1,) int64 tensor on q's
    device (``dropout_seed`` or one drawn by :func:`draw_dropout_seed`) when p > 0, else
    None (nothing drawn)."""
    _check_dropout_p(op, dropout_p)
    if dropout_seed is not None:
        t = dropout_seed
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.numel() != 1:
            raise TypeError(f"{op}: dropout_seed must be a one-element int64 tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)} "
                            f"{tuple(getattr(t, 'shape', ()))}")  # fmt: skip
        if t.device != q.device:
            raise ValueError(f"{op}: dropout_seed must be on q's device {q.device}, got "
                             f"{t.device}")  # fmt: skip
    if not dropout_p:
        return 0.0, None
    seed = draw_dropout_seed(q.device) if dropout_seed is None else dropout_seed.reshape(1)
    return float(dropout_p), seed


def _check_cu(op, name, cu, total, device, on_device=False):
    """The longest segment of the offsets ``cu``, read on the host and checked there; None
    where they are checked on the device instead: while tracing (they cannot be read), and
    with ``on_device`` (the caller gave both max_seqlen: a host read would wait for the
    device on every call)."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{op}: {name} must be an int32 tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{op}: {name} must be int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{op}: {name} must be 1-D (batch + 1,), got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{op}: {name} must be on q's device {device}, got {cu.device}")
    if cu.is_meta:
        raise ValueError(f"{op}: {name} is a meta tensor: eager calls read the offsets on the "
                         "host (trace with fake tensors or torch.compile instead)")  # fmt: skip
    traced = tracing()
    if not traced and torch._C._functorch.is_batchedtensor(cu):
        raise ValueError(f"{op}: {name} differs per sample under torch.func.vmap, which the "
                         "packed layout cannot take (its offsets are read on the host); pass "
                         "one for every sample (in_dims=None) or call per sample")  # fmt: skip
    if traced or on_device:
        # not read on the host: checked on the device (offsets past the packed length would
        # make the kernels read and write out of bounds), before the kernels run
        ok = (cu[0] == 0) & (cu[-1] == total) & (cu[1:] >= cu[:-1]).all()
        torch._assert_async(ok, f"{op}: {name} must start at 0, be non-decreasing and end at "
                                f"the packed length")  # fmt: skip
        return None
    values = cu.tolist()
    if values[0] != 0:
        raise ValueError(f"{op}: {name} must start at 0, got {values[0]}")
    lengths = [b - a for a, b in zip(values[:-1], values[1:], strict=True)]
    if any(n < 0 for n in lengths):
        raise ValueError(f"{op}: {name} must be non-decreasing, got {values}")
    if values[-1] != total:
        raise ValueError(f"{op}: {name} must end at the packed length {total}, got {values[-1]}")
    return max(lengths, default=0)


def _max_seqlen(op, name, value, longest, cu, total):
    """The longest segment the kernels plan for: ``value`` (an upper bound, as in
    flash-attention), checked against the segments, and no more than the ``total`` packed
    rows (a loose bound is harmless; a huge one sized the grid and tripped the 2^31 offset
    check of one segment on the Triton path only)."""
    if value is None:
        if longest is None:
            raise ValueError(f"{op}: {name} must be given under torch.compile")
        return longest
    value = check_int(op, name, value, 0)
    if longest is None:  # the offsets are checked on the device (in the graph if traced)
        # at most the packed length, which also keeps it in the offsets' int32 (sym_min
        # for a symbolic one under torch.compile(dynamic=True), not specialised there;
        # Dynamo before torch 2.13 cannot trace it on two ints)
        symbolic = isinstance(value, torch.SymInt) or isinstance(total, torch.SymInt)
        bound = torch.sym_min(value, total) if symbolic else min(value, total)
        fits = (cu[1:] - cu[:-1] <= bound).all()
        # the message names no value: formatting a symbolic one (a length read from a
        # shape, or .item()) would fix it in the graph (a compilation per length)
        torch._assert_async(fits, f"{op}: {name} is smaller than a segment")
        return bound
    if value < longest:
        raise ValueError(f"{op}: {name} ({value}) is smaller than the longest segment "
                         f"({longest})")  # fmt: skip
    return min(value, total)


# fmt: off
def cross_attention(q, k, v, *, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
                    max_seqlen_k=None, key_padding_mask=None, key_bias=None, scale=None,
                    return_lse=False, gate=None, dropout_p=0.0, dropout_seed=None):
    # fmt: on
    r"""softmax(scale q k^T + key_bias) v over each segment, without a mask between queries.

    Args:
        q, k, v: dense (B, H, Lq, D), (B, Hk, Lk, D), (B, Hk, Lk, D), or packed (Tq, H, D),
            (Tk, Hk, D), (Tk, Hk, D) with ``cu_seqlens_q`` / ``cu_seqlens_k``; float16,
            bfloat16, float32 (computed with fp32 accuracy) or float64 (PyTorch path);
            under ``torch.autocast`` cast to its dtype first (float64 excepted), as
            ``F.scaled_dot_product_attention`` is; head dim D <= 256, any strides. Hk
            divides H (grouped-query attention: query head h reads key/value head
            h // (H / Hk); dK, dV sum over the group).
        cu_seqlens_q, cu_seqlens_k: int32 (B + 1,) offsets of the packed segments (both or
            neither): segment b is rows cu[b] .. cu[b + 1]; empty segments allowed. In
            eager mode the offsets are read on the host and checked (start at 0,
            non-decreasing, end at the packed length) before any launch, which waits for
            the device, unless both max_seqlen are given; under ``torch.compile`` they are
            not read on the host.
        max_seqlen_q, max_seqlen_k: the longest segments (default: from the offsets read
            for the check; required under ``torch.compile``). Given both (eager or
            compiled), the offsets are not read on the host (no synchronisation, CUDA
            graphs can capture the call): they and the bounds are checked on the device
            with ``torch._assert_async`` (RuntimeError at once on the CPU, a device-side
            assert on a GPU).
        key_padding_mask: dense inputs only, (B, Lk) bool, True at keys to ignore
            (``torch.nn.MultiheadAttention``'s convention).
        key_bias: an additive logit bias per key, dense (B, Lk) or (B, H, Lk), packed (Tk,)
            or (H, Tk), any floating dtype; differentiable (d key_bias[b, j] = sum over
            heads and queries of dS, dS = P (dP - rowsum(dO O))). ToMe's proportional
            attention: key_bias = log(size). A bias at most -2^24 / log2(e) (about
            -1.16e7: -inf, finfo.min, -1e9 masks) masks its key: a row whose every key is
            masked gives 0 and no gradient, as a fully padded row.
        scale: the logit scale (default 1 / sqrt(D)).
        gate: an optional tanh gate (Flamingo's): out = tanh(gate) * attention, applied in
            the kernel's epilogue; one element or one per output channel ((H, D) or
            (H D,)); differentiable (lse is not gated).
        return_lse: also return the log-sum-exp of the scaled logits per query row, fp32
            (float64 for float64 inputs), (B, H, Lq) dense or (H, Tq) packed; it is
            differentiable.
        dropout_p: attention dropout probability p in [0, 1) (pass 0 in eval mode):
            out = (P * M / (1 - p)) v, M[b, h, i, j] ~ Bernoulli(1 - p) drawn in the kernel
            (Philox, counter-based) and regenerated in the backward, never stored; lse is
            that of the undropped P. 0 runs the kernels without dropout (bitwise the same).
        dropout_seed: a one-element int64 tensor on q's device keying the mask (packed
            segment b draws as dense batch b over its own rows); default: one draw of
            ``torch.randint`` from the device's generator per call
            (:func:`draw_dropout_seed`), so ``torch.manual_seed`` reproduces the masks.

    Returns:
        out like q (and lse). A query row that sees no key (an empty key segment, every key
        padded) gets out = 0 and lse = -inf, and no gradient.
    """
    op = "cross_attention"
    q, k, v = autocast_operands(q, k, v)
    packed = cu_seqlens_q is not None or cu_seqlens_k is not None
    _check_qkv(op, q, k, v, 3 if packed else 4)
    check_bool(op, "return_lse", return_lse)
    s = _scale(op, scale, q.shape[-1])
    bias = _key_bias(op, key_bias, q, k, packed)
    gate = _gate(op, gate, q)
    keep = None
    if packed:
        if cu_seqlens_q is None or cu_seqlens_k is None:
            raise ValueError(f"{op}: cu_seqlens_q and cu_seqlens_k must be given together")
        if key_padding_mask is not None:
            raise ValueError(f"{op}: key_padding_mask is for dense inputs; packed segments "
                             "carry their lengths in cu_seqlens_k")  # fmt: skip
        # both bounds given: the offsets are checked on the device, not read on the host
        given = max_seqlen_q is not None and max_seqlen_k is not None
        longest_q = _check_cu(op, "cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device, given)
        longest_k = _check_cu(op, "cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device, given)
        if cu_seqlens_k.numel() != cu_seqlens_q.numel():
            raise ValueError(f"{op}: cu_seqlens_k must have cu_seqlens_q's length "
                             f"{cu_seqlens_q.numel()}, got {cu_seqlens_k.numel()}")  # fmt: skip
        lq = _max_seqlen(op, "max_seqlen_q", max_seqlen_q, longest_q, cu_seqlens_q, q.shape[0])
        lk = _max_seqlen(op, "max_seqlen_k", max_seqlen_k, longest_k, cu_seqlens_k, k.shape[0])
        # the kernels read offset b at cu + b (columns of one offsets table are strided)
        cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    else:
        if max_seqlen_q is not None or max_seqlen_k is not None:
            raise ValueError(f"{op}: max_seqlen_q / max_seqlen_k go with cu_seqlens_q / "
                             "cu_seqlens_k (packed inputs)")  # fmt: skip
        lq, lk = q.shape[2], k.shape[2]
        if key_padding_mask is not None:
            m = key_padding_mask
            if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
                raise TypeError(f"{op}: key_padding_mask must be a bool tensor, got "
                                f"{getattr(m, 'dtype', type(m).__name__)}")  # fmt: skip
            if tuple(m.shape) != (q.shape[0], lk):
                raise ValueError(f"{op}: key_padding_mask must have shape (B, Lk) = "
                                 f"{(q.shape[0], lk)}, got {tuple(m.shape)}")  # fmt: skip
            if m.device != q.device:
                raise ValueError(f"{op}: key_padding_mask must be on q's device {q.device}, "
                                 f"got {m.device}")  # fmt: skip
            keep = (~m).to(torch.uint8).contiguous()  # the kernels read key j at row + j
    p, seed = _dropout(op, dropout_p, dropout_seed, q)  # last: a seed drawn only for a call
    out, lse = attention_core(q, k, v, cu_seqlens_q, cu_seqlens_k, lq, lk, keep, None, None,
                              False, s, 0, bias, gate, p, seed)  # fmt: skip
    return (out, lse) if return_lse else out


def attention(q, k, v, *, causal=False, scale=None, key_mass=None, key_bias=None):
    r"""softmax(scale q k^T + key_bias + mask) v, self- or cross-attention, optionally with
    the attention each key receives.

    Args:
        q: (B, H, Lq, D); k, v: (B, Hk, Lk, D), Hk dividing H (grouped-query attention);
            float16, bfloat16, float32 or float64 (under ``torch.autocast`` cast as by
            :func:`cross_attention`).
        causal: query i sees keys j <= i + Lk - Lq (aligned to the bottom-right, as
            flash-attention); a query that sees no key (Lq > Lk) gets 0.
        scale: the logit scale (default 1 / sqrt(D)).
        key_mass: None; "mean": also return mass[b, j] = 1/(H Lq) sum_h sum_i P[b, h, i, j];
            an int i (negative counts from the end): mass[b, j] = 1/H sum_h P[b, h, i, j]
            (FastV: -1, VisionZip: 0). A mean over no rows (Lq = 0) or no heads (H = 0: an
            empty output, as SDPA's) is NaN, as eager's.
        key_bias: (B, Lk) or (B, H, Lk) additive logit bias per key, differentiable (ToMe's
            proportional attention: log(size)); the mass includes it.

    Returns:
        out (B, H, Lq, D), or (out, mass) with mass (B, Lk) float32 (float64 for float64
        inputs). ``out`` is bitwise the same as without ``key_mass`` (the same kernels);
        mass is not differentiable (detached). An int row's comes from that row's logits,
        which the forward stores as it goes, and its log-sum-exp (K is read once); "mean"
        recomputes every row's probabilities from the saved log-sum-exp in a second pass.
    """
    op = "attention"
    q, k, v = autocast_operands(q, k, v)
    _check_qkv(op, q, k, v, 4)
    check_bool(op, "causal", causal)
    s = _scale(op, scale, q.shape[-1])
    bias = _key_bias(op, key_bias, q, k, False)
    b, h, lq, _ = q.shape
    rows = None
    if key_mass is not None:
        if isinstance(key_mass, str):
            if key_mass != "mean":
                raise ValueError(f'{op}: key_mass must be None, "mean" or an int row, got '
                                 f"{key_mass!r}")  # fmt: skip
            weight, per = mean_weight(1.0 / h, lq) if h * lq else (0.0, 1)  # NaN below
            rows = (0, lq, weight)
        elif isinstance(key_mass, bool) or not isinstance(key_mass, numbers.Integral):
            raise TypeError(f'{op}: key_mass must be None, "mean" or an int row, got '
                            f"{key_mass!r}")  # fmt: skip
        else:
            i = int(key_mass)
            if not -lq <= i < lq:
                raise ValueError(f"{op}: key_mass row {i} is out of range for Lq = {lq}")
            # one row: its logits come out of the forward, K is read once
            out, _, mass = attention_row_mass(q, k, v, causal, s, bias, i % lq,
                                              1.0 / h if h else 0.0)  # fmt: skip
            return out, _no_mean(mass.detach(), h)
    out, lse = attention_core(q, k, v, None, None, lq, k.shape[2], None, None, None, causal,
                              s, 0, bias, None, 0.0, None)  # fmt: skip
    if rows is None:
        return out
    per_head = attention_key_mass(q.detach(), k.detach(), lse.detach(), causal, s, *rows,
                                  None if bias is None else bias.detach())  # fmt: skip
    return out, _no_mean(divided(per_head.sum(dim=1), per), h * lq)


def _no_mean(mass: torch.Tensor, count: int) -> torch.Tensor:
    """``mass``, or NaN where it is a mean over no heads or rows (0 / 0, as the eager
    ``mean`` over an empty dimension): a pruning rule then sees no plausible zero mass."""
    return mass if count else torch.full_like(mass, float("nan"))


def media_ranges(media_locations, latents_per_media, num_keys, only_immediate):
    """(lo, hi): int32 (B, T) key ranges of open_flamingo's media mask. text_time =
    cumsum(media_locations); key j belongs to media j // L + 1; with ``only_immediate`` a
    token sees media text_time only (lo = (t - 1) L, hi = t L), else media 1..text_time
    (lo = 0, hi = min(t, M) L). text_time 0 sees nothing (lo = hi = 0); with
    ``only_immediate``, text_time > M (more media tokens than media) has no answer:
    lo = 1 > hi = 0 (NaN rows)."""
    n_media = num_keys // latents_per_media
    t = torch.cumsum(media_locations.to(torch.int32), dim=-1, dtype=torch.int32)
    if only_immediate:
        inside = (t >= 1) & (t <= n_media)
        lo = torch.where(inside, (t - 1) * latents_per_media, (t > n_media).to(torch.int32))
        hi = torch.where(inside, t * latents_per_media, 0)
    else:
        lo = torch.zeros_like(t)
        hi = torch.clamp(t, max=n_media) * latents_per_media
    return lo.to(torch.int32).contiguous(), hi.to(torch.int32).contiguous()


def media_cross_attention(q, k, v, media_locations, latents_per_media, *, only_immediate=True,
                          scale=None, gate=None, dropout_p=0.0, dropout_seed=None):  # fmt: skip
    r"""Flamingo's media-masked cross-attention (open_flamingo's ``MaskedCrossAttention``
    attention step), computed by segment: each query block visits only the key blocks of
    the media its tokens see.

    Args:
        q: (B, H, T, D) text queries; k, v: (B, H, M L, D), the latents of M media items,
            L = ``latents_per_media`` each (key j belongs to media j // L + 1); under
            ``torch.autocast`` cast as by :func:`cross_attention`.
        media_locations: (B, T) bool, True at the token where each media item appears.
        latents_per_media: L, a positive int dividing the key count.
        only_immediate: token t sees the latents of media number text_time[t] =
            cumsum(media_locations)[t] only; False: of every media item up to it.
        scale: the logit scale (default 1 / sqrt(D), open_flamingo's).
        gate: an optional tanh gate: tanh(gate) * the attention, in the kernel's epilogue;
            one element (open_flamingo's ``attn_gate``: the block's to_out is linear
            without bias, so gating before it is the same) or one per output channel
            ((H, D) or (H D,)); differentiable.
        dropout_p, dropout_seed: attention dropout in the kernel, as
            :func:`cross_attention`'s.

    Returns:
        (B, H, T, D): tanh(gate) softmax(scale q k^T) v over the visible keys.
        Tokens before the first media item (text_time 0) get exactly 0 (and no gradient);
        with ``only_immediate``, tokens whose text_time exceeds M get NaN (open_flamingo
        would let them attend to every latent uniformly).
    """
    op = "media_cross_attention"
    q, k, v = autocast_operands(q, k, v)
    _check_qkv(op, q, k, v, 4)
    check_bool(op, "only_immediate", only_immediate)
    n = check_int(op, "latents_per_media", latents_per_media, 1)
    if k.shape[2] % n:
        raise ValueError(f"{op}: k's length {k.shape[2]} is not a multiple of "
                         f"latents_per_media = {n}")  # fmt: skip
    m = media_locations
    if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
        raise TypeError(f"{op}: media_locations must be a bool tensor, got "
                        f"{getattr(m, 'dtype', type(m).__name__)}")  # fmt: skip
    if tuple(m.shape) != (q.shape[0], q.shape[2]):
        raise ValueError(f"{op}: media_locations must have shape (B, T) = "
                         f"{(q.shape[0], q.shape[2])}, got {tuple(m.shape)}")  # fmt: skip
    if m.device != q.device:
        raise ValueError(f"{op}: media_locations must be on q's device {q.device}, got "
                         f"{m.device}")  # fmt: skip
    gate = _gate(op, gate, q)
    s = _scale(op, scale, q.shape[-1])
    lo, hi = media_ranges(m, n, k.shape[2], only_immediate)
    p, seed = _dropout(op, dropout_p, dropout_seed, q)  # last: a seed drawn only for a call
    out, _ = attention_core(q, k, v, None, None, q.shape[2], k.shape[2], None, lo, hi, False,
                            s, 0, None, gate, p, seed)  # fmt: skip
    return out

"""Where the elements of q, k, the tables and the positions are, in the kernels' canonical
order: q and k as (B, S, H, D), tables as (A, B, S, R), positions as (3, B, S).

q and k come as (B, H, S, D) (heads on axis 1), (B, S, H, D) (axis 2) or token-major
(T, H, D) (axis 1; B = 1, S = T), any strides. The token axes are q's axes other than the
heads and the head dim, in order. A table has q's shape without the heads axis (and a
leading axis of 3 for M-RoPE); its size-1 axes broadcast (stride 0). The Triton launcher
takes the strides computed here from sizes and strides alone, so a call makes no views; the
PyTorch and CUDA C++ paths take the equivalent views (:func:`to_bshd`, :func:`table_view`).
"""

from __future__ import annotations

import torch

__all__ = ["CHUNKED", "INTERLEAVED", "PAIRS", "PLAIN", "check_arguments", "from_bshd",
           "positions_strides", "qk_layout", "table_layout", "table_view", "to_bshd",
           "token_axes"]  # fmt: skip

# The lane rules (the ops' ``lane_rule``): which position axis each lane uses, and the flag
# for lanes rotating in pairs (2j, 2j + 1) (GPT-J / GLM-4V) rather than (j, j + R / 2)
PLAIN, CHUNKED, INTERLEAVED = 0, 1, 2
PAIRS = 4


_TOKEN_AXES = {(4, 0): (1, 2), (4, 1): (0, 2), (4, 2): (0, 1), (3, 0): (1,), (3, 1): (0,)}


def token_axes(ndim: int, head_axis: int) -> tuple[int, ...]:
    """q's token axes: (B, S) of a 4-D q, (T,) of a 3-D one."""
    return _TOKEN_AXES[ndim, head_axis]


def qk_layout(x: torch.Tensor, head_axis: int):
    """(B, S, H, D, (stride_b, stride_s, stride_h, stride_d)) of a q-like tensor."""
    shape, stride = x.shape, x.stride()
    if x.dim() == 4:
        a, b = token_axes(4, head_axis)
        return (shape[a], shape[b], shape[head_axis], shape[3],
                (stride[a], stride[b], stride[head_axis], stride[3]))  # fmt: skip
    t = 1 - head_axis
    return 1, shape[t], shape[head_axis], shape[2], (0, stride[t], stride[head_axis], stride[2])


def table_layout(table: torch.Tensor, ndim: int, head_axis: int, leading: bool):
    """(A, R, (stride_a, stride_b, stride_s, stride_r)) of a cos/sin table of a q with
    ``ndim`` dims; broadcast (size-1) axes get stride 0."""
    shape, stride = table.shape, table.stride()
    off = 1 if leading else 0
    strides = []
    for axis in token_axes(ndim, head_axis):
        t = (axis if axis < head_axis else axis - 1) + off
        strides.append(0 if shape[t] == 1 else stride[t])
    if ndim == 3:
        strides.insert(0, 0)
    a = shape[0] if leading else 1
    return a, shape[-1], (stride[0] if a > 1 else 0, *strides, stride[-1])


def positions_strides(positions: torch.Tensor) -> tuple[int, int, int]:
    """(stride_axis, stride_b, stride_s) of (3, B, S) positions, or of (3, T) ones (B = 1)."""
    stride = positions.stride()
    if positions.dim() == 2:
        return stride[0], 0, stride[1]
    return stride[0], stride[1], stride[2]


def to_bshd(x: torch.Tensor, head_axis: int) -> torch.Tensor:
    """A (B, S, H, D) view of x (B = 1 for token-major 3-D x)."""
    view = x.permute(*token_axes(x.dim(), head_axis), head_axis, x.dim() - 1)
    return view if x.dim() == 4 else view.unsqueeze(0)


def from_bshd(view: torch.Tensor, like: torch.Tensor, head_axis: int) -> torch.Tensor:
    """The inverse of :func:`to_bshd` for a tensor shaped like ``like``."""
    if like.dim() == 3:
        view = view.squeeze(0)
    order = [*token_axes(like.dim(), head_axis), head_axis, like.dim() - 1]
    return view.permute([order.index(a) for a in range(like.dim())])


def table_view(table: torch.Tensor, q: torch.Tensor, head_axis: int, leading: bool):
    """An (A, B, S, R) view of a table (broadcast axes expanded, A = 1 without ``leading``)."""
    b, s, _, _, _ = qk_layout(q, head_axis)
    a, r, strides = table_layout(table, q.dim(), head_axis, leading)
    offset = table.storage_offset()
    return table.as_strided((a, b, s, r), strides, offset)


def positions_view(positions: torch.Tensor) -> torch.Tensor:
    """(3, B, S) positions ((3, T) becomes (3, 1, T))."""
    return positions.unsqueeze(1) if positions.dim() == 2 else positions


def check_arguments(q, k, head_axis, *, table=None, leading=True, positions=None,
                    inv_freq=None, mode=0, sections=(0, 0, 0)) -> None:  # fmt: skip
    """The rotary ops' own checks, for direct ``torch.ops.vlmkernels.rope_*`` calls (the
    public functions check their arguments first, in their own terms): what the kernels
    would otherwise read out of bounds or misread, refused as the CUDA C++ binding refuses
    it. q and k share their token axes and head dim and a device; a table (``(cos, sin)``,
    floating) has q's token axes (size 1 broadcasts), with a leading axis of 1 or 3 when
    ``leading``, and R even in (0, D]; positions are int32 or int64, (3, B, S) with q's B
    and S, or (3, S) for q with B = 1 (token-major (T, H, D) q: (3, T)), with a 1-D
    floating ``inv_freq`` of R / 2 frequencies; chunked sections sum to R / 2."""
    op = "torch.ops.vlmkernels.rope_" + ("table" if table is not None else "positions")
    if q.dim() not in (3, 4) or (q.dim(), head_axis) not in _TOKEN_AXES:
        raise ValueError(f"{op}: q must be 4-D or token-major 3-D with head_axis among its "
                         f"token axes' neighbours; got q {tuple(q.shape)}, head_axis "
                         f"{head_axis}")  # fmt: skip
    b, s, _, d, _ = qk_layout(q, head_axis)
    if k.dim() != q.dim() or qk_layout(k, head_axis)[:2] + (k.shape[-1],) != (b, s, d):
        raise ValueError(f"{op}: k {tuple(k.shape)} must share q's {tuple(q.shape)} token "
                         f"axes and head dim (heads on axis {head_axis})")  # fmt: skip
    _same_device(op, "k", k, q)
    if not isinstance(mode, int) or not PLAIN <= mode & ~PAIRS <= INTERLEAVED:
        raise ValueError(f"{op}: lane_rule must be 0 (plain), 1 (chunked) or 2 "
                         f"(interleaved), plus 4 for paired lanes, got {mode}")  # fmt: skip
    if len(sections) != 3 or any(n < 0 for n in sections):
        raise ValueError(f"{op}: sections must be 3 non-negative ints, got {list(sections)}")
    if table is not None:
        rot = _check_tables(op, q, head_axis, leading, *table)
    else:
        rot = _check_positions(op, q, b, s, positions, inv_freq)
    if rot <= 0 or rot % 2 or rot > d:
        raise ValueError(f"{op}: the rotary dim must be even, positive and at most the head "
                         f"dim {d}, got {rot}")  # fmt: skip
    if mode & ~PAIRS == CHUNKED and sum(sections) != rot // 2:
        raise ValueError(f"{op}: chunked sections {list(sections)} must sum to R / 2 = "
                         f"{rot // 2}")  # fmt: skip


def _same_device(op, name, t, q):
    if t.device != q.device:
        raise ValueError(f"{op}: {name} is on {t.device}, q on {q.device}")


def _check_tables(op, q, head_axis, leading, cos, sin) -> int:
    tokens = [q.shape[a] for a in token_axes(q.dim(), head_axis)]
    for name, t in (("cos", cos), ("sin", sin)):
        _same_device(op, name, t, q)
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating tensor, got {t.dtype}")
    shape = list(cos.shape)
    want = f"({'A, ' if leading else ''}{', '.join(map(str, tokens))}, R)"
    if (
        list(sin.shape) != shape
        or len(shape) != len(tokens) + 1 + leading
        or (leading and shape[0] not in (1, 3))
        or any(n != 1 and n != t for n, t in zip(shape[leading:-1], tokens, strict=True))
    ):
        raise ValueError(f"{op}: cos and sin must be {want} of one shape (A 1 or 3; size-1 "
                         f"token axes broadcast), got {tuple(cos.shape)} and "
                         f"{tuple(sin.shape)}")  # fmt: skip
    return shape[-1]


def _check_positions(op, q, b, s, positions, inv_freq) -> int:
    _same_device(op, "positions", positions, q)
    _same_device(op, "inv_freq", inv_freq, q)
    if positions.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: positions must be int32 or int64, got {positions.dtype}")
    shape = tuple(positions.shape)
    if shape != (3, b, s) and not (b == 1 and shape == (3, s)):
        want = f"(3, {b}, {s})" + (f" or (3, {s})" if b == 1 else "")
        raise ValueError(f"{op}: positions must be {want} for q {tuple(q.shape)}, got {shape}")
    if inv_freq.dim() != 1 or not inv_freq.is_floating_point():
        raise ValueError(f"{op}: inv_freq must be a 1-D floating tensor, got "
                         f"{tuple(inv_freq.shape)} {inv_freq.dtype}")  # fmt: skip
    return 2 * inv_freq.shape[0]

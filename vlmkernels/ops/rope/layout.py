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

__all__ = ["from_bshd", "positions_strides", "qk_layout", "table_layout", "table_view",
           "to_bshd", "token_axes"]  # fmt: skip


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

"""The PyTorch reference of the rotary ops (also their CPU path): per-lane cos/sin from the
tables or the positions, the rotation and its transpose, the tables' gradients. Arithmetic
in fp32, or fp64 for float64 inputs (as transformers computes a float64 model: its angles
in fp32, the rotation in the model's dtype)."""

from __future__ import annotations

import torch

from .kernels import CHUNKED, INTERLEAVED, PAIRS


def lane_axes(half: int, mode: int, sections, device=None) -> torch.Tensor:
    """(half,) long: the position axis (0 T, 1 H, 2 W) of each frequency lane."""
    mode &= ~PAIRS
    j = torch.arange(half, device=device)
    sec_t, sec_h, sec_w = sections
    if mode == CHUNKED:
        return torch.where(j < sec_t, 0, torch.where(j < sec_t + sec_h, 1, 2))
    if mode == INTERLEAVED:
        h_lane = (j % 3 == 1) & (j < 3 * sec_h)
        w_lane = (j % 3 == 2) & (j < 3 * sec_w)
        return torch.where(h_lane, 1, torch.where(w_lane, 2, 0))
    return torch.zeros_like(j)


def _wide(dtype: torch.dtype) -> torch.dtype:
    """The arithmetic dtype for ``dtype``: fp32, or fp64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _memory_order(axes: torch.Tensor, mode: int) -> torch.Tensor:
    """Per-frequency values laid out over the R lanes: [f | f] (rotate-half), or each
    repeated in place with PAIRS ([f0 f0 f1 f1 ...])."""
    return axes.repeat_interleave(2, -1) if mode & PAIRS else torch.cat((axes, axes), -1)


def _pair_lanes(rot: int, mode: int) -> tuple[slice, slice]:
    """The lanes of the rotated pairs, as strided views: (2j, 2j + 1) with PAIRS, else
    (j, j + R / 2)."""
    return (
        (slice(0, rot, 2), slice(1, rot, 2))
        if mode & PAIRS
        else (slice(0, rot // 2), slice(rot // 2, rot))
    )


def _join(first: torch.Tensor, second: torch.Tensor, mode: int) -> torch.Tensor:
    """The inverse of :func:`_pair_lanes`: per-pair values back in lane order."""
    return (
        torch.stack((first, second), -1).flatten(-2)
        if mode & PAIRS
        else torch.cat((first, second), -1)
    )


def table_lanes(table: torch.Tensor, mode: int, sections) -> torch.Tensor:
    """(B, S, R) fp32 (fp64 for a float64 table) cos or sin per lane from an (A, B, S, R)
    table."""
    a, b, s, rot = table.shape
    axes = _memory_order(lane_axes(rot // 2, mode, sections, table.device), mode)
    wide = table.to(_wide(table.dtype))
    if a == 1:
        return wide[0]
    index = axes.view(1, 1, 1, rot).expand(1, b, s, rot)
    return wide.gather(0, index)[0]


def position_lanes(positions, inv_freq, mode, sections, scaling):
    """(B, S, R) fp32 cos and sin from (3, B, S) positions, as the transformers rotary
    classes compute them (fp32 angle = position * inv_freq)."""
    half = inv_freq.numel()
    _, b, s = positions.shape
    axes = lane_axes(half, mode, sections, positions.device)
    index = axes.view(1, 1, 1, half).expand(1, b, s, half)
    pos = positions.unsqueeze(-1).expand(3, b, s, half).gather(0, index)[0]
    angle = pos.float() * inv_freq.float()
    cos, sin = angle.cos() * scaling, angle.sin() * scaling
    return _memory_order(cos, mode), _memory_order(sin, mode)


def rotate(x, cos, sin, backward, mode: int = 0):
    """The rotation (or its transpose) of canonical (B, S, H, D) x with (B, S, R) lanes
    (paired lanes with ``mode & PAIRS``)."""
    rot = cos.shape[-1]
    xf = x.to(_wide(x.dtype))
    cos, sin = cos.to(xf.dtype), sin.to(xf.dtype)
    first, second = _pair_lanes(rot, mode)
    x1, x2 = xf[..., first], xf[..., second]
    c1, c2 = cos[..., first].unsqueeze(2), cos[..., second].unsqueeze(2)
    s1, s2 = sin[..., first].unsqueeze(2), sin[..., second].unsqueeze(2)
    if backward:
        o1, o2 = x1 * c1 + x2 * s2, x2 * c2 - x1 * s1
    else:
        o1, o2 = x1 * c1 - x2 * s1, x2 * c2 + x1 * s2
    return torch.cat((_join(o1, o2, mode), xf[..., rot:]), -1).to(x.dtype)


def table_grads(q, k, gq, gk, mode, sections, table_shape, backward):
    """Gradients of the (A, B, S, R) cos and sin tables (rarely needed: tables usually
    come from no-grad rotary modules), summed over heads and scattered to each lane's
    axis."""
    rot = table_shape[-1]
    first, second = _pair_lanes(rot, mode)
    wide = _wide(q.dtype)
    dc = torch.zeros(table_shape[1:], dtype=wide, device=q.device)
    ds = torch.zeros_like(dc)
    for x, g in ((q, gq), (k, gk)):
        xf, gf = x.to(wide), g.to(wide)
        x1, x2, g1, g2 = xf[..., first], xf[..., second], gf[..., first], gf[..., second]
        dc += _join((g1 * x1).sum(2), (g2 * x2).sum(2), mode)
        if backward:
            ds += _join(-(g2 * x1).sum(2), (g1 * x2).sum(2), mode)
        else:
            ds += _join(-(g1 * x2).sum(2), (g2 * x1).sum(2), mode)
    a = table_shape[0]
    if a == 1:
        return dc.unsqueeze(0), ds.unsqueeze(0)
    axes = _memory_order(lane_axes(rot // 2, mode, sections, q.device), mode)
    onehot = torch.nn.functional.one_hot(axes, a).T.to(dc.dtype)  # (A, R)
    return onehot[:, None, None, :] * dc, onehot[:, None, None, :] * ds

r"""Rotary position embeddings for the Qwen-VL family: plain RoPE, M-RoPE (chunked and
interleaved), M-RoPE with the angles computed in the kernel from positions, and the
vision 2-D RoPE.

For a head vector x of dimension D, a rotary dimension R <= D (even) and h = R / 2, with
per-lane cosines c and sines s of length R (rotate-half, "NeoX" pairing):

    out[j]     = x[j]     c[j]     - x[j + h] s[j]          j < h
    out[j + h] = x[j + h] c[j + h] + x[j]     s[j + h]
    out[j]     = x[j]                                        R <= j < D   (partial rotary)

and the backward pass is its transpose (the rotation with the sign of sin flipped when the
two halves of c and s agree, as they do in every model):

    dx[j]     = g[j]     c[j]     + g[j + h] s[j + h]
    dx[j + h] = g[j + h] c[j + h] - g[j]     s[j]

M-RoPE gives each frequency lane j < h the angle of one of three position axes
(temporal, height, width), lane j + h sharing lane j's axis:

- chunked (Qwen2-VL, Qwen2.5-VL; section [t, h, w]): T for j < t, H for j < t + h, else W;
- interleaved (Qwen3-VL): H where j % 3 == 1 and j < 3 h, W where j % 3 == 2 and j < 3 w,
  else T.

The tables c, s either come from memory, (3, B, S, R) for M-RoPE as transformers' rotary
classes (<= 5.16) produce them, or are computed in the kernel in fp32 from integer
positions: angle = position[axis(j)] * inv_freq[j], c = cos(angle) * scaling. All
arithmetic is fp32; results are rounded once to the input dtype.

Layouts: q and k are (B, H, S, D) (``unsqueeze_dim=1``, including the transposed views
attention code makes), (B, S, H, D) (``unsqueeze_dim=2``) or token-major (T, H, D), any
strides, with their own head counts. They are viewed as (B, S, H, D) without copies.
"""

from __future__ import annotations

import contextlib
import numbers

import torch
import triton
import triton.language as tl

from .._backend import in_forward_backend, remember_backend, resolve_backend
from .._overlap import check_no_overlap
from ._common import autotune_configs
from ._tuning import tuned

TABLE, POSITIONS = 0, 1  # where the angles come from
PLAIN, CHUNKED, INTERLEAVED = 0, 1, 2  # which position axis each lane uses

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


# fmt: off
@triton.jit
def _rotate_heads(
    x_ptr, o_ptr, b, s, n_heads, half, D,
    sxb, sxs, sxh, sxd, sob, sos, soh, sod,
    c1, c2, s1, s2, j, lane_mask,
    BACKWARD: tl.constexpr, COPY_PASS: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
):
    """Rotate the ``n_heads`` head vectors of token (b, s) of x into o, BLOCK_H at a time."""
    x_tok = x_ptr + tl.cast(b, tl.int64) * sxb + tl.cast(s, tl.int64) * sxs
    o_tok = o_ptr + tl.cast(b, tl.int64) * sob + tl.cast(s, tl.int64) * sos
    rot = 2 * half
    for h0 in range(0, n_heads, BLOCK_H):
        heads = h0 + tl.arange(0, BLOCK_H)
        m = (heads < n_heads)[:, None] & lane_mask[None, :]
        x_rows = x_tok + heads[:, None].to(tl.int64) * sxh
        o_rows = o_tok + heads[:, None].to(tl.int64) * soh
        x1 = tl.load(x_rows + j[None, :] * sxd, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(x_rows + (j + half)[None, :] * sxd, mask=m, other=0.0).to(tl.float32)
        if BACKWARD:
            o1 = x1 * c1[None, :] + x2 * s2[None, :]
            o2 = x2 * c2[None, :] - x1 * s1[None, :]
        else:
            o1 = x1 * c1[None, :] - x2 * s1[None, :]
            o2 = x2 * c2[None, :] + x1 * s2[None, :]
        tl.store(o_rows + j[None, :] * sod, o1.to(o_ptr.dtype.element_ty), mask=m)
        tl.store(o_rows + (j + half)[None, :] * sod, o2.to(o_ptr.dtype.element_ty), mask=m)
        if COPY_PASS:  # lanes past the rotary dim pass through unchanged
            for p0 in range(rot, D, BLOCK_PASS):
                lanes = p0 + tl.arange(0, BLOCK_PASS)
                pm = (heads < n_heads)[:, None] & (lanes < D)[None, :]
                v = tl.load(x_rows + lanes[None, :] * sxd, mask=pm, other=0.0)
                tl.store(o_rows + lanes[None, :] * sod, v, mask=pm)


@tuned("rope", configs=_CONFIGS, key=["HQ", "HK", "D", "half", "SOURCE"],
       sizes=["HQ", "HK", "D", "half"], restore_value=["qo_ptr", "ko_ptr"])
@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr, pos_ptr, freq_ptr,
    S, HQ, HK, half, D, scaling,
    sqb, sqs, sqh, sqd, skb, sks, skh, skd,
    sqob, sqos, sqoh, sqod, skob, skos, skoh, skod,
    sta, stb, sts, std, spa, spb, sps,
    SOURCE: tl.constexpr, MODE: tl.constexpr,
    SEC_T: tl.constexpr, SEC_H: tl.constexpr, SEC_W: tl.constexpr,
    BACKWARD: tl.constexpr, COPY_PASS: tl.constexpr,
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
        c1 = tl.load(cos_ptr + row + j * std, mask=lane_mask, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + row + (j + half) * std, mask=lane_mask, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + row + j * std, mask=lane_mask, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + row + (j + half) * std, mask=lane_mask, other=0.0).to(tl.float32)
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
                  c1, c2, s1, s2, j, lane_mask, BACKWARD, COPY_PASS,
                  BLOCK_H, BLOCK_HALF, BLOCK_PASS)
    _rotate_heads(k_ptr, ko_ptr, b, s, HK, half, D, skb, sks, skh, skd, skob, skos, skoh, skod,
                  c1, c2, s1, s2, j, lane_mask, BACKWARD, COPY_PASS,
                  BLOCK_H, BLOCK_HALF, BLOCK_PASS)
# fmt: on


# --------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _launch(q, k, qo, ko, *, table=None, positions=None, inv_freq=None, mode=PLAIN,
            sections=(0, 0, 0), scaling=1.0, backward=False):  # fmt: skip
    """Rotate canonical (B, S, H, D) views q, k into qo, ko (which may be q, k: in place).

    ``table`` is (cos, sin), each (A, B, S, R) with A = 1 or 3; otherwise ``positions``
    (3, B, S) integers and ``inv_freq`` (R / 2,) give the angles.
    """
    b, s, hq, d = q.shape
    hk = k.shape[2]
    if b * s == 0 or (hq == 0 and hk == 0):
        return
    if table is not None:
        cos, sin = table
        rot = cos.shape[-1]
        source, pos, freq = TABLE, q, q
        if sin.stride() != cos.stride():  # the kernel takes one set of table strides
            cos, sin = cos.contiguous(), sin.contiguous()
        t_strides = cos.stride()
        p_strides = (0, 0, 0)
    else:
        rot = 2 * inv_freq.numel()
        source, cos, sin, pos, freq = POSITIONS, q, q, positions, inv_freq
        t_strides = (0, 0, 0, 0)
        p_strides = positions.stride()
    half = rot // 2
    in_place = qo.data_ptr() == q.data_ptr()
    copy_pass = rot < d and not in_place
    with _device_guard(q):
        _rope_kernel[(b * s,)](
            q, k, qo, ko, cos, sin, pos, freq,
            s, hq, hk, half, d, float(scaling),
            *q.stride(), *k.stride(), *qo.stride(), *ko.stride(), *t_strides, *p_strides,
            SOURCE=source, MODE=mode, SEC_T=sections[0], SEC_H=sections[1], SEC_W=sections[2],
            BACKWARD=backward, COPY_PASS=copy_pass,
            BLOCK_HALF=triton.next_power_of_2(half),
            BLOCK_PASS=min(64, triton.next_power_of_2(max(d - rot, 1))),
        )  # fmt: skip


# --------------------------------------------------------------------------------------
# PyTorch reference (also the CPU path)
# --------------------------------------------------------------------------------------


def lane_axes(half: int, mode: int, sections, device=None) -> torch.Tensor:
    """(half,) long: the position axis (0 T, 1 H, 2 W) of each frequency lane."""
    j = torch.arange(half, device=device)
    sec_t, sec_h, sec_w = sections
    if mode == CHUNKED:
        return torch.where(j < sec_t, 0, torch.where(j < sec_t + sec_h, 1, 2))
    if mode == INTERLEAVED:
        h_lane = (j % 3 == 1) & (j < 3 * sec_h)
        w_lane = (j % 3 == 2) & (j < 3 * sec_w)
        return torch.where(h_lane, 1, torch.where(w_lane, 2, 0))
    return torch.zeros_like(j)


def _table_lanes(table: torch.Tensor, mode: int, sections) -> torch.Tensor:
    """(B, S, R) fp32 cos or sin per lane from an (A, B, S, R) table."""
    a, b, s, rot = table.shape
    axes = lane_axes(rot // 2, mode, sections, table.device).repeat(2)
    if a == 1:
        return table[0].float()
    index = axes.view(1, 1, 1, rot).expand(1, b, s, rot)
    return table.float().gather(0, index)[0]


def _position_lanes(positions, inv_freq, mode, sections, scaling):
    """(B, S, R) fp32 cos and sin from (3, B, S) positions, as the transformers rotary
    classes compute them (fp32 angle = position * inv_freq)."""
    half = inv_freq.numel()
    _, b, s = positions.shape
    axes = lane_axes(half, mode, sections, positions.device)
    index = axes.view(1, 1, 1, half).expand(1, b, s, half)
    pos = positions.unsqueeze(-1).expand(3, b, s, half).gather(0, index)[0]
    angle = pos.float() * inv_freq.float()
    cos, sin = angle.cos() * scaling, angle.sin() * scaling
    return torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)


def _rotate_torch(x, cos, sin, backward):
    """The rotation (or its transpose) of canonical (B, S, H, D) x with (B, S, R) lanes."""
    rot = cos.shape[-1]
    h = rot // 2
    xf = x.float()
    x1, x2 = xf[..., :h], xf[..., h:rot]
    c1, c2 = cos[..., :h].unsqueeze(2), cos[..., h:].unsqueeze(2)
    s1, s2 = sin[..., :h].unsqueeze(2), sin[..., h:].unsqueeze(2)
    if backward:
        o1, o2 = x1 * c1 + x2 * s2, x2 * c2 - x1 * s1
    else:
        o1, o2 = x1 * c1 - x2 * s1, x2 * c2 + x1 * s2
    return torch.cat((o1, o2, xf[..., rot:]), -1).to(x.dtype)


def _rope_torch(q, k, cos, sin, backward):
    out_q = torch.empty_like(q)
    out_k = torch.empty_like(k)
    out_q.copy_(_rotate_torch(q, cos, sin, backward))
    out_k.copy_(_rotate_torch(k, cos, sin, backward))
    return out_q, out_k


def _table_grads(q, k, gq, gk, mode, sections, table_shape, backward):
    """Gradients of the (A, B, S, R) cos and sin tables (rarely needed: tables usually
    come from no-grad rotary modules), summed over heads and scattered to each lane's
    axis."""
    rot = table_shape[-1]
    h = rot // 2
    dc = torch.zeros(table_shape[1:], dtype=torch.float32, device=q.device)
    ds = torch.zeros_like(dc)
    for x, g in ((q, gq), (k, gk)):
        xf, gf = x.float()[..., :rot], g.float()[..., :rot]
        x1, x2, g1, g2 = xf[..., :h], xf[..., h:], gf[..., :h], gf[..., h:]
        dc += torch.cat(((g1 * x1).sum(2), (g2 * x2).sum(2)), -1)
        if backward:
            ds += torch.cat((-(g2 * x1).sum(2), (g1 * x2).sum(2)), -1)
        else:
            ds += torch.cat((-(g1 * x2).sum(2), (g2 * x1).sum(2)), -1)
    a = table_shape[0]
    if a == 1:
        return dc.unsqueeze(0), ds.unsqueeze(0)
    axes = lane_axes(h, mode, sections, q.device).repeat(2)
    onehot = torch.nn.functional.one_hot(axes, a).T.to(dc.dtype)  # (A, R)
    return onehot[:, None, None, :] * dc, onehot[:, None, None, :] * ds


# --------------------------------------------------------------------------------------
# Op registration
# --------------------------------------------------------------------------------------


def _kernel_launcher(q: torch.Tensor):
    """The kernel launcher of the backend chosen for q (Triton or the CUDA C++ extension,
    both with :func:`_launch`'s signature), or None for the PyTorch path."""
    backend = resolve_backend("rope", q)
    if backend == "triton":
        return _launch
    if backend == "cuda":
        from ._cuda import rope_launch

        return rope_launch
    return None


@torch.library.custom_op("vlmkernels::rope_table", mutates_args=())
def _rope_table(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    lane_rule: int,
    sections: list[int],
    backward: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated (B, S, H, D) q and k from (A, B, S, R) cos/sin tables (or the transpose
    rotation when ``backward``)."""
    launch = _kernel_launcher(q)
    if launch is not None:
        out_q, out_k = torch.empty_like(q), torch.empty_like(k)
        launch(q, k, out_q, out_k, table=(cos, sin), mode=lane_rule, sections=sections,
                backward=backward)  # fmt: skip
        return out_q, out_k
    lanes = (_table_lanes(cos, lane_rule, sections), _table_lanes(sin, lane_rule, sections))
    return _rope_torch(q, k, *lanes, backward)


@_rope_table.register_fake
def _(q, k, cos, sin, lane_rule, sections, backward):
    return torch.empty_like(q), torch.empty_like(k)


def _rope_table_setup(ctx, inputs, output):
    q, k, cos, sin, lane_rule, sections, backward = inputs
    ctx.mode, ctx.sections, ctx.backward = lane_rule, sections, backward
    remember_backend(ctx)
    tables_need_grad = cos.requires_grad or sin.requires_grad
    ctx.save_for_backward(cos, sin, *((q, k) if tables_need_grad else (None, None)))


@in_forward_backend
def _rope_table_backward(ctx, grad_q, grad_k):
    cos, sin, q, k = ctx.saved_tensors
    dq, dk = torch.ops.vlmkernels.rope_table(
        grad_q, grad_k, cos, sin, ctx.mode, ctx.sections, not ctx.backward
    )
    dcos = dsin = None
    if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
        dcos, dsin = _table_grads(
            q, k, grad_q, grad_k, ctx.mode, ctx.sections, cos.shape, ctx.backward
        )
        dcos, dsin = dcos.to(cos.dtype), dsin.to(sin.dtype)
    return dq, dk, dcos, dsin, None, None, None


_rope_table.register_autograd(_rope_table_backward, setup_context=_rope_table_setup)


@torch.library.custom_op("vlmkernels::rope_table_", mutates_args=("q", "k"))
def _rope_table_inplace(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    lane_rule: int,
    sections: list[int],
) -> None:
    """In-place :func:`_rope_table` (forward only)."""
    launch = _kernel_launcher(q)
    if launch is not None:
        launch(q, k, q, k, table=(cos, sin), mode=lane_rule, sections=sections)
        return
    lanes = (_table_lanes(cos, lane_rule, sections), _table_lanes(sin, lane_rule, sections))
    q.copy_(_rotate_torch(q, *lanes, False))
    k.copy_(_rotate_torch(k, *lanes, False))


@_rope_table_inplace.register_fake
def _(q, k, cos, sin, lane_rule, sections):
    return None


@torch.library.custom_op("vlmkernels::rope_positions", mutates_args=())
def _rope_positions(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    lane_rule: int,
    sections: list[int],
    scaling: float,
    backward: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated (B, S, H, D) q and k with angles positions[axis(j)] * inv_freq[j] from
    (3, B, S) integer positions, computed in fp32 in the kernel."""
    launch = _kernel_launcher(q)
    if launch is not None:
        out_q, out_k = torch.empty_like(q), torch.empty_like(k)
        launch(q, k, out_q, out_k, positions=positions, inv_freq=inv_freq, mode=lane_rule,
                sections=sections, scaling=scaling, backward=backward)  # fmt: skip
        return out_q, out_k
    lanes = _position_lanes(positions, inv_freq, lane_rule, sections, scaling)
    return _rope_torch(q, k, *lanes, backward)


@_rope_positions.register_fake
def _(q, k, positions, inv_freq, lane_rule, sections, scaling, backward):
    return torch.empty_like(q), torch.empty_like(k)


def _rope_positions_setup(ctx, inputs, output):
    q, k, positions, inv_freq, lane_rule, sections, scaling, backward = inputs
    ctx.save_for_backward(positions, inv_freq)
    ctx.mode, ctx.sections, ctx.scaling, ctx.backward = lane_rule, sections, scaling, backward
    remember_backend(ctx)


@in_forward_backend
def _rope_positions_backward(ctx, grad_q, grad_k):
    positions, inv_freq = ctx.saved_tensors
    dq, dk = torch.ops.vlmkernels.rope_positions(
        grad_q, grad_k, positions, inv_freq, ctx.mode, ctx.sections, ctx.scaling,
        not ctx.backward,
    )  # fmt: skip
    return dq, dk, None, None, None, None, None, None


_rope_positions.register_autograd(_rope_positions_backward, setup_context=_rope_positions_setup)


# --------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_qk(op: str, q, k, unsqueeze_dim: int) -> int:
    """Checks q and k; returns the head axis (``unsqueeze_dim`` made non-negative)."""
    for t, name in ((q, "q"), (k, "k")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOATS:
            raise TypeError(f"{op}: {name} must be a floating tensor, got {t.dtype}")
        if t.dim() not in (3, 4):
            raise ValueError(
                f"{op}: {name} must be 4-D (batch, heads, seq, head_dim) / (batch, seq, heads, "
                f"head_dim) or 3-D (tokens, heads, head_dim), got shape {tuple(t.shape)}"
            )
    if k.dim() != q.dim():
        raise ValueError(
            f"{op}: q and k must have the same number of dims, got {q.dim()} and {k.dim()}"
        )
    if q.device != k.device:
        raise ValueError(f"{op}: q and k must be on the same device, got {q.device} and {k.device}")
    if isinstance(unsqueeze_dim, bool) or not isinstance(unsqueeze_dim, numbers.Integral):
        raise TypeError(
            f"{op}: unsqueeze_dim must be an int (the heads axis of q and k), got {unsqueeze_dim!r}"
        )
    unsqueeze_dim = int(unsqueeze_dim)
    if not -q.dim() <= unsqueeze_dim < q.dim() - 1 and unsqueeze_dim != q.dim() - 1:
        raise ValueError(f"{op}: unsqueeze_dim={unsqueeze_dim} is out of range for {q.dim()}-D q")
    head_axis = unsqueeze_dim % q.dim()
    if head_axis == q.dim() - 1:
        raise ValueError(f"{op}: unsqueeze_dim must name the heads axis, not the head dim")
    d = q.shape[-1]
    if k.shape[-1] != d:
        raise ValueError(f"{op}: q and k must have the same head dim, got {d} and {k.shape[-1]}")
    if d % 2:
        raise ValueError(f"{op}: the head dim must be even for rotate-half RoPE, got {d}")
    q_tokens = [n for i, n in enumerate(q.shape[:-1]) if i != head_axis]
    k_tokens = [n for i, n in enumerate(k.shape[:-1]) if i != head_axis]
    if q_tokens != k_tokens:
        raise ValueError(
            f"{op}: q and k must have the same batch and sequence sizes, got {tuple(q.shape)} "
            f"and {tuple(k.shape)} with heads on dim {head_axis}"
        )
    return head_axis


def _token_order(ndim: int, head_axis: int) -> list[int]:
    """Permutation of a q-like tensor's dims to (tokens..., heads, head_dim)."""
    if ndim == 4:
        return [a for a in (0, 1, 2) if a != head_axis] + [head_axis, 3]
    return [1 - head_axis, head_axis, 2]


def _to_bshd(x: torch.Tensor, head_axis: int) -> torch.Tensor:
    """A (B, S, H, D) view of x (B = 1 for token-major 3-D x)."""
    view = x.permute(_token_order(x.dim(), head_axis))
    return view if x.dim() == 4 else view.unsqueeze(0)


def _from_bshd(view: torch.Tensor, like: torch.Tensor, head_axis: int) -> torch.Tensor:
    """The inverse of :func:`_to_bshd` for a tensor shaped like ``like``."""
    if like.dim() == 3:
        view = view.squeeze(0)
    order = _token_order(like.dim(), head_axis)
    return view.permute([order.index(a) for a in range(like.dim())])


def _table_to_absr(op, name, table, q, head_axis, leading: bool) -> torch.Tensor:
    """An (A, B, S, R) view of a cos/sin table that broadcasts against q once its heads
    axis is added (A = 3 with a ``leading`` M-RoPE axis, else 1)."""
    if not isinstance(table, torch.Tensor) or not table.dtype.is_floating_point:
        raise TypeError(f"{op}: {name} must be a floating tensor")
    want = q.dim() - 1 + (1 if leading else 0)
    if table.dim() != want or (leading and table.shape[0] != 3):
        lead = "(3, " if leading else "("
        raise ValueError(
            f"{op}: {name} must have shape {lead}<q's shape without the heads axis>), got "
            f"{tuple(table.shape)} for q of shape {tuple(q.shape)}"
        )
    off = 1 if leading else 0
    rot = table.shape[-1]
    target = tuple(table.shape[:1] if leading else ()) + tuple(q.shape[:-1]) + (rot,)
    try:
        expanded = table.unsqueeze(head_axis + off).expand(target)
    except RuntimeError as exc:
        raise ValueError(
            f"{op}: {name} of shape {tuple(table.shape)} does not broadcast against q of "
            f"shape {tuple(q.shape)}"
        ) from exc
    order = _token_order(q.dim(), head_axis)[:-1]
    perm = ([0] if leading else []) + [o + off for o in order] + [expanded.dim() - 1]
    view = expanded.permute(perm).select(-2, 0)  # drop the (broadcast) heads axis
    if q.dim() == 3:
        view = view.unsqueeze(off)
    return view if leading else view.unsqueeze(0)


def _check_rotary_dim(op, rot: int, d: int, what: str) -> None:
    if rot % 2 or rot <= 0 or rot > d:
        raise ValueError(
            f"{op}: the rotary dim ({what}) must be even, positive and at most the head dim "
            f"{d}, got {rot}"
        )


def _check_sections(op, sections, half: int) -> list[int]:
    if isinstance(sections, torch.Tensor):
        sections = sections.tolist()
    try:
        values = list(sections)
    except TypeError as exc:
        raise TypeError(
            f"{op}: mrope_section must be a sequence of 3 ints, got {sections!r}"
        ) from exc
    if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in values):
        raise TypeError(f"{op}: mrope_section must be a sequence of 3 ints, got {sections!r}")
    sections = [int(v) for v in values]
    if len(sections) != 3 or min(sections) < 0:
        raise ValueError(f"{op}: mrope_section must be 3 non-negative ints, got {sections}")
    if sum(sections) != half:
        raise ValueError(
            f"{op}: mrope_section {sections} sums to {sum(sections)}, but the rotary dim "
            f"{2 * half} has {half} frequencies"
        )
    return sections


def _table_op(op, q, k, cos, sin, head_axis, mode, sections, leading, inplace):
    cos_v = _table_to_absr(op, "cos", cos, q, head_axis, leading)
    sin_v = _table_to_absr(op, "sin", sin, q, head_axis, leading)
    if cos_v.shape != sin_v.shape:
        raise ValueError(f"{op}: cos and sin must have the same shape")
    if cos.device != q.device or sin.device != q.device:
        raise ValueError(f"{op}: cos and sin must be on q's device {q.device}")
    q_v, k_v = _to_bshd(q, head_axis), _to_bshd(k, head_axis)
    if inplace:
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, cos, sin)):
            raise RuntimeError(
                f"{op}: inplace=True is forward-only; use inplace=False when gradients are needed"
            )
        check_no_overlap(op, {"q": q, "k": k}, read={"cos": cos, "sin": sin})
        torch.ops.vlmkernels.rope_table_(q_v, k_v, cos_v, sin_v, mode, sections)
        return q, k
    out_q, out_k = torch.ops.vlmkernels.rope_table(q_v, k_v, cos_v, sin_v, mode, sections, False)
    return _from_bshd(out_q, q, head_axis), _from_bshd(out_k, k, head_axis)


def rope(q, k, cos, sin, unsqueeze_dim: int = 1, *, inplace: bool = False):
    """``apply_rotary_pos_emb``: ``q * cos + rotate_half(q) * sin`` (and the same for k).

    Args:
        q, k: (B, H, S, D) with ``unsqueeze_dim=1``, (B, S, H, D) with ``unsqueeze_dim=2``, or
            token-major (T, H, D) with ``unsqueeze_dim=1``; any strides, own head counts.
        cos, sin: q's shape without the heads axis, last dim R <= D (R < D: partial rotary,
            lanes R..D pass through); broadcasting dims of size 1 allowed.
        inplace: rotate q and k in place (forward only) and return them.

    Returns:
        (q_rotated, k_rotated), new tensors in q's and k's layouts, computed in fp32.
    """
    op = "rope"
    head_axis = _check_qk(op, q, k, unsqueeze_dim)
    rot = cos.shape[-1] if isinstance(cos, torch.Tensor) else 0
    _check_rotary_dim(op, rot, q.shape[-1], "cos.shape[-1]")
    return _table_op(op, q, k, cos, sin, head_axis, PLAIN, [0, 0, 0], False, inplace)


def mrope(q, k, cos, sin, mrope_section, unsqueeze_dim: int = 1, *, interleaved: bool = False,
          inplace: bool = False):  # fmt: skip
    """``apply_multimodal_rotary_pos_emb`` (transformers <= 5.16) from (3, ...) tables.

    Args:
        q, k: as in :func:`rope`.
        cos, sin: (3, <q's shape without heads>) with last dim R: the temporal, height and
            width tables, as the Qwen-VL rotary classes produced them before 5.17.
        mrope_section: [t, h, w] frequencies per axis, summing to R / 2.
        interleaved: Qwen3-VL's lane rule (H on j % 3 == 1, W on j % 3 == 2) instead of
            contiguous T | H | W chunks.
        inplace: rotate q and k in place (forward only) and return them.
    """
    op = "mrope"
    head_axis = _check_qk(op, q, k, unsqueeze_dim)
    rot = cos.shape[-1] if isinstance(cos, torch.Tensor) else 0
    _check_rotary_dim(op, rot, q.shape[-1], "cos.shape[-1]")
    sections = _check_sections(op, mrope_section, rot // 2)
    mode = INTERLEAVED if interleaved else CHUNKED
    return _table_op(op, q, k, cos, sin, head_axis, mode, sections, True, inplace)


def _positions_to_3bs(op, position_ids, q, head_axis) -> torch.Tensor:
    if (
        not isinstance(position_ids, torch.Tensor)
        or position_ids.is_floating_point()
        or (position_ids.dtype == torch.bool or position_ids.is_complex())
    ):
        raise TypeError(f"{op}: position_ids must be an integer tensor")
    tokens = [n for i, n in enumerate(q.shape[:-1]) if i != head_axis]
    if list(position_ids.shape) == tokens:
        position_ids = position_ids.unsqueeze(0).expand(3, *tokens)  # text only: T = H = W
    if list(position_ids.shape) != [3, *tokens]:
        raise ValueError(
            f"{op}: position_ids must have shape (3, {', '.join(map(str, tokens))}) (or "
            f"without the leading 3 for text), got {tuple(position_ids.shape)}"
        )
    if position_ids.device != q.device:
        raise ValueError(f"{op}: position_ids must be on q's device {q.device}")
    return position_ids if q.dim() == 4 else position_ids.unsqueeze(1)


def mrope_from_positions(
    q,
    k,
    position_ids,
    inv_freq,
    mrope_section,
    *,
    interleaved: bool = False,
    attention_scaling: float = 1.0,
    rotary_dim: int | None = None,
):
    """M-RoPE with the angles computed in the kernel (fp32) from integer positions.

    Equivalent to a Qwen-VL rotary class (cos/sin of ``position * inv_freq`` times
    ``attention_scaling``, sections merged) followed by :func:`rope`, without cos/sin in
    memory and without rounding them to the input dtype.

    Args:
        q, k: (B, H, S, D) or token-major (T, H, D) (heads on dim 1).
        position_ids: (3, B, S) or (3, T) integers ((B, S) / (T,) for text: T = H = W).
        inv_freq: (R / 2,) inverse frequencies (the rotary class's ``inv_freq``).
        mrope_section: [t, h, w], summing to R / 2.
        rotary_dim: R, if given (must equal 2 * len(inv_freq)); lanes R..D pass through
            (Qwen3.5's partial rotary).
    """
    op = "mrope_from_positions"
    head_axis = _check_qk(op, q, k, 1)
    if not isinstance(inv_freq, torch.Tensor) or not inv_freq.dtype.is_floating_point:
        raise TypeError(f"{op}: inv_freq must be a floating tensor")
    if inv_freq.dim() != 1:
        raise ValueError(f"{op}: inv_freq must be 1-D, got shape {tuple(inv_freq.shape)}")
    rot = 2 * inv_freq.numel()
    if rotary_dim is not None and rotary_dim != rot:
        raise ValueError(
            f"{op}: rotary_dim={rotary_dim} does not match inv_freq's {inv_freq.numel()} "
            f"frequencies (rotary dim {rot})"
        )
    _check_rotary_dim(op, rot, q.shape[-1], "2 * len(inv_freq)")
    sections = _check_sections(op, mrope_section, rot // 2)
    if inv_freq.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{op}: inv_freq must not require grad (no gradient is computed for it)")
    positions = _positions_to_3bs(op, position_ids, q, head_axis)
    freq = inv_freq.to(device=q.device, dtype=torch.float32).contiguous()  # read at stride 1
    mode = INTERLEAVED if interleaved else CHUNKED
    q_v, k_v = _to_bshd(q, head_axis), _to_bshd(k, head_axis)
    out_q, out_k = torch.ops.vlmkernels.rope_positions(
        q_v, k_v, positions, freq, mode, sections, float(attention_scaling), False
    )
    return _from_bshd(out_q, q, head_axis), _from_bshd(out_k, k, head_axis)


def vision_rope(q, k, cos, sin):
    """``apply_rotary_pos_emb_vision``: the vision tower's 2-D RoPE in fp32.

    Args:
        q, k: (N, H, hd) (e.g. strided views of a packed qkv projection), hd 72 or 80 in
            the Qwen-VL towers (any even hd works).
        cos, sin: (N, hd) fp32 tables ``[h f | w f | h f | w f]``.

    Returns:
        (q_rotated, k_rotated) in q's and k's dtypes, computed in fp32.
    """
    return rope(q, k, cos, sin, unsqueeze_dim=1)

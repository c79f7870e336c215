"""The rotary ops' public functions: argument checks, layouts, then the ops.

Each error names the argument at fault and is raised before any kernel launch. Layouts: q
and k are (B, H, S, D) (``unsqueeze_dim=1``), (B, S, H, D) (``unsqueeze_dim=2``) or
token-major (T, H, D), any strides, with their own head counts; they are viewed as
(B, S, H, D) without copies, and the tables as (A, B, S, R).
"""

from __future__ import annotations

import numbers

import torch

from ...core.overlap import check_no_overlap
from . import ops
from .kernels import CHUNKED, INTERLEAVED, PLAIN

__all__ = ["mrope", "mrope_from_positions", "rope", "vision_rope"]

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
        ops.rope_table_(q_v, k_v, cos_v, sin_v, mode, sections)
        return q, k
    out_q, out_k = ops.rope_table(q_v, k_v, cos_v, sin_v, mode, sections, False)
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
    out_q, out_k = ops.rope_positions(
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

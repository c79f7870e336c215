"""The rotary ops' public functions: argument checks, layouts, then the ops.

Each error names the argument at fault and is raised before any kernel launch. Layouts: q
and k are (B, H, S, D) (``unsqueeze_dim=1``), (B, S, H, D) (``unsqueeze_dim=2``) or
token-major (T, H, D), any strides, with their own head counts; they are viewed as
(B, S, H, D) without copies, and the tables as (A, B, S, R).
"""

from __future__ import annotations

import math
import numbers

import torch

from ...core.checks import FLOAT_DTYPES, check_bool, check_int, check_real, saveable, to_device
from ...core.overlap import check_no_overlap
from ...core.runtime import tracing
from . import ops
from .kernels import CHUNKED, INTERLEAVED, PAIRS, PLAIN
from .layout import token_axes

__all__ = ["mrope", "mrope_from_positions", "rope", "vision_rope"]

_FLOATS = frozenset(FLOAT_DTYPES)
_SECTIONS: dict[tuple, list[int]] = {}  # checked mrope_section values, by (values, R / 2)


def _check_qk(op: str, q, k, unsqueeze_dim) -> int:
    """Checks q and k; returns the head axis (``unsqueeze_dim`` made non-negative)."""
    for t, name in ((q, "q"), (k, "k")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOATS:
            raise TypeError(f"{op}: {name} must be a floating tensor, got {t.dtype}")
    ndim = q.dim()
    if ndim not in (3, 4):
        raise ValueError(
            f"{op}: q must be 4-D (batch, heads, seq, head_dim) / (batch, seq, heads, "
            f"head_dim) or 3-D (tokens, heads, head_dim), got shape {tuple(q.shape)}"
        )
    if k.dim() != ndim:
        raise ValueError(
            f"{op}: q and k must have the same number of dims, got {ndim} and {k.dim()}"
        )
    if q.device != k.device:
        raise ValueError(f"{op}: q and k must be on the same device, got {q.device} and {k.device}")
    if type(unsqueeze_dim) is not int:
        if isinstance(unsqueeze_dim, bool) or not isinstance(unsqueeze_dim, numbers.Integral):
            raise TypeError(
                f"{op}: unsqueeze_dim must be an int (the heads axis of q and k), got "
                f"{unsqueeze_dim!r}"
            )
        unsqueeze_dim = int(unsqueeze_dim)
    if not -ndim <= unsqueeze_dim < ndim:
        raise ValueError(f"{op}: unsqueeze_dim={unsqueeze_dim} is out of range for {ndim}-D q")
    head_axis = unsqueeze_dim % ndim
    if head_axis == ndim - 1:
        raise ValueError(f"{op}: unsqueeze_dim must name the heads axis, not the head dim")
    q_shape, k_shape = q.shape, k.shape
    d = q_shape[-1]
    if k_shape[-1] != d:
        raise ValueError(f"{op}: q and k must have the same head dim, got {d} and {k_shape[-1]}")
    if d % 2:
        raise ValueError(f"{op}: the head dim must be even for rotate-half RoPE, got {d}")
    for axis in token_axes(ndim, head_axis):
        if q_shape[axis] != k_shape[axis]:
            raise ValueError(
                f"{op}: q and k must have the same batch and sequence sizes, got "
                f"{tuple(q_shape)} and {tuple(k_shape)} with heads on dim {head_axis}"
            )
    return head_axis


def _check_table(op, name, table, q, head_axis, leading: bool) -> None:
    """A cos/sin table (a floating tensor: :func:`_check_table_type`, called first): q's
    shape without the heads axis (size-1 axes broadcast), with a leading axis of 3 for
    M-RoPE."""
    off = 1 if leading else 0
    shape = table.shape
    if len(shape) != q.dim() - 1 + off or (leading and shape[0] != 3):
        lead = "(3, " if leading else "("
        raise ValueError(
            f"{op}: {name} must have shape {lead}<q's shape without the heads axis>), got "
            f"{tuple(shape)} for q of shape {tuple(q.shape)}"
        )
    q_shape = q.shape
    for axis in token_axes(q.dim(), head_axis):
        size = shape[(axis if axis < head_axis else axis - 1) + off]
        if size != q_shape[axis] and size != 1:
            raise ValueError(
                f"{op}: {name} of shape {tuple(shape)} does not broadcast against q of "
                f"shape {tuple(q_shape)}"
            )
    if table.device != q.device:
        raise ValueError(f"{op}: {name} must be on q's device {q.device}")


def _check_rotary_dim(op, rot: int, d: int, what: str) -> None:
    if rot % 2 or rot <= 0 or rot > d:
        raise ValueError(
            f"{op}: the rotary dim ({what}) must be even, positive and at most the head dim "
            f"{d}, got {rot}"
        )


def _check_sections(op, sections, half: int, interleaved: bool = False) -> list[int]:
    """[t, h, w] as ints. Chunked sections must fill the ``half`` frequencies; interleaved
    ones need not (Qwen3-VL's rule: H on lanes j % 3 == 1 below 3 h, W on j % 3 == 2 below
    3 w, T on the others, whatever the sum, as transformers' slices do)."""
    # 2.0 == 2: only exact ints are cached (a symbolic half, under export, is not hashable).
    # Not while torch.compile traces: the graph would guard on the cache's contents, and
    # the entry the traced call adds would fail that guard at the next call (a recompile)
    exact = (type(half) is int and isinstance(sections, list | tuple)
             and all(type(v) is int for v in sections)
             and not tracing())  # fmt: skip
    key = (tuple(sections), half, interleaved) if exact else None
    if key is not None and key in _SECTIONS:
        return _SECTIONS[key]
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
    checked = [int(v) for v in values]
    if len(checked) != 3 or min(checked) < 0:
        raise ValueError(f"{op}: mrope_section must be 3 non-negative ints, got {checked}")
    if not interleaved and sum(checked) != half:
        raise ValueError(
            f"{op}: mrope_section {checked} sums to {sum(checked)}, but the rotary dim "
            f"{2 * half} has {half} frequencies"
        )
    if key is not None and len(_SECTIONS) < 256:
        _SECTIONS[key] = checked
    return checked


def _table_op(op, q, k, cos, sin, head_axis, mode, sections, leading, inplace):
    check_bool(op, "inplace", inplace)
    _check_table(op, "cos", cos, q, head_axis, leading)
    _check_table(op, "sin", sin, q, head_axis, leading)
    if cos.shape != sin.shape:
        raise ValueError(f"{op}: cos and sin must have the same shape")
    if inplace:
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, cos, sin)):
            raise RuntimeError(
                f"{op}: inplace=True is forward-only; use inplace=False when gradients are needed"
            )
        check_no_overlap(op, {"q": q, "k": k}, read={"cos": cos, "sin": sin})
        ops.rope_table_(q, k, cos, sin, head_axis, leading, mode, sections)
        return q, k
    return ops.rope_table(q, k, cos, sin, head_axis, leading, mode, sections, False)


def _lane_rule(op, mode: int, pairs) -> int:
    """The ops' lane rule: ``mode`` with the PAIRS flag when ``pairs``."""
    if pairs is False:  # the default, without a check (host time)
        return mode
    return mode | PAIRS if check_bool(op, "pairs", pairs) else mode


def rope(q, k, cos, sin, unsqueeze_dim: int = 1, *, inplace: bool = False, pairs: bool = False):
    """``apply_rotary_pos_emb``: ``q * cos + rotate_half(q) * sin`` (and the same for k).

    Args:
        q, k: (B, H, S, D) with ``unsqueeze_dim=1``, (B, S, H, D) with ``unsqueeze_dim=2``, or
            token-major (T, H, D) with ``unsqueeze_dim=1``; any strides, own head counts.
        cos, sin: q's shape without the heads axis, last dim R <= D (R < D: partial rotary,
            lanes R..D pass through); axes of size 1, missing leading axes and cos and sin
            of different shapes broadcast as transformers' ``cos.unsqueeze(unsqueeze_dim)``
            does (the heads axis is where the unsqueezed table's new axis lands).
        inplace: rotate q and k in place (forward only) and return them.
        pairs: rotate adjacent lanes (2j, 2j + 1) together, with cos and sin in the same
            order (each frequency's value twice in a row): GPT-J's pairing, GLM-4V's
            ``rotate_half_llm``. Default: lanes j and j + R / 2 (rotate-half, NeoX).

    Returns:
        (q_rotated, k_rotated), new tensors (q and k with ``inplace``) in q's and k's layouts
        and dtypes, computed in fp32 (float64 q and k in fp64, on the PyTorch path) and
        rounded once.
    """
    return _rope("rope", q, k, cos, sin, unsqueeze_dim, inplace, pairs)


def _right_aligned(q, cos, sin, unsqueeze_dim, off: int):
    """transformers' ``cos.unsqueeze(unsqueeze_dim)`` and ``sin.unsqueeze(unsqueeze_dim)``
    broadcast against q from the right, each on its own (``off``: the leading axis of
    M-RoPE tables): (cos, sin, heads axis of q) with a table's missing leading token axes
    added as size 1, e.g. (S, D) tables for (B, H, S, D) q with ``unsqueeze_dim`` -3 or 0,
    and cos and sin of different shapes broadcast to one. Anything else comes back
    unchanged, for the checks to name."""
    try:
        if cos.dim() >= q.dim() - 1 + off and cos.shape == sin.shape:
            return cos, sin, unsqueeze_dim  # the usual case, first (host time): nothing to do
    except AttributeError:
        return cos, sin, unsqueeze_dim
    if not all(isinstance(t, torch.Tensor) for t in (q, cos, sin)):
        return cos, sin, unsqueeze_dim
    if type(unsqueeze_dim) is not int:
        return cos, sin, unsqueeze_dim
    want = q.dim() - 1 + off
    heads, tables = set(), []
    for t in (cos, sin):
        n = t.dim() - off + 1  # dims of the unsqueezed table, the leading axis left out
        if not 2 <= n <= q.dim() or not -n <= unsqueeze_dim < n or (off and t.shape[0] != 3):
            return cos, sin, unsqueeze_dim  # (an M-RoPE table without its leading 3 too)
        heads.add(q.dim() - n + unsqueeze_dim % n)
        tables.append(t.reshape(t.shape[:off] + (1,) * (want - t.dim()) + t.shape[off:]))
    if len(heads) != 1:
        return cos, sin, unsqueeze_dim
    if tables[0].shape != tables[1].shape:
        try:
            tables = torch.broadcast_tensors(*tables)
        except RuntimeError:
            return cos, sin, unsqueeze_dim
    return *tables, heads.pop()


def _rope(op, q, k, cos, sin, unsqueeze_dim, inplace, pairs=False):
    """:func:`rope` with errors naming ``op``."""
    cos, sin, unsqueeze_dim = _right_aligned(q, cos, sin, unsqueeze_dim, 0)
    head_axis = _check_qk(op, q, k, unsqueeze_dim)
    _check_table_type(op, cos, sin)
    _check_rotary_dim(op, cos.shape[-1], q.shape[-1], "cos.shape[-1]")
    mode = _lane_rule(op, PLAIN, pairs)
    return _table_op(op, q, k, cos, sin, head_axis, mode, [0, 0, 0], False, inplace)


def _check_table_type(op, cos, sin, leading: bool = False) -> None:
    """cos and sin floating tensors with at least one dim (checked before their shapes are
    read: the rotary dim is the last one)."""
    for name, table in (("cos", cos), ("sin", sin)):
        if not isinstance(table, torch.Tensor) or not table.dtype.is_floating_point:
            raise TypeError(f"{op}: {name} must be a floating tensor, got "
                            f"{getattr(table, 'dtype', type(table).__name__)}")  # fmt: skip
    for name, table in (("cos", cos), ("sin", sin)):
        if table.dim() == 0:  # as _check_table words it
            lead = "(3, " if leading else "("
            raise ValueError(f"{op}: {name} must have shape {lead}<q's shape without the "
                             "heads axis>), got a 0-d tensor")  # fmt: skip


def mrope(q, k, cos, sin, mrope_section, unsqueeze_dim: int = 1, *, interleaved: bool = False,
          inplace: bool = False, pairs: bool = False):  # fmt: skip
    """``apply_multimodal_rotary_pos_emb`` (transformers <= 5.16) from (3, ...) tables.

    Args:
        q, k: as in :func:`rope`.
        cos, sin: (3, <q's shape without heads>) with last dim R: the temporal, height and
            width tables, as the Qwen-VL rotary classes produced them before 5.17.
        mrope_section: [t, h, w] frequencies per axis, summing to R / 2 (chunked; the
            interleaved rule takes any sum).
        interleaved: Qwen3-VL's lane rule (H on j % 3 == 1 below 3 h, W on j % 3 == 2
            below 3 w, T elsewhere) instead of contiguous T | H | W chunks.
        inplace: rotate q and k in place (forward only) and return them.
        pairs: paired lanes (2j, 2j + 1), as :func:`rope`'s; frequency j's axis is the
            same.
    """
    op = "mrope"
    cos, sin, unsqueeze_dim = _right_aligned(q, cos, sin, unsqueeze_dim, 1)
    head_axis = _check_qk(op, q, k, unsqueeze_dim)
    _check_table_type(op, cos, sin, leading=True)
    if cos.dim() != q.dim() or sin.dim() != q.dim():
        # a table of the wrong rank (e.g. merged (B, S, R), without the leading 3) is named
        # for its shape here, before its last dim is read as the rotary dim for the sections
        _check_table(op, "cos", cos, q, head_axis, True)
        _check_table(op, "sin", sin, q, head_axis, True)
    rot = cos.shape[-1]
    _check_rotary_dim(op, rot, q.shape[-1], "cos.shape[-1]")
    interleaved = check_bool(op, "interleaved", interleaved)
    sections = _check_sections(op, mrope_section, rot // 2, interleaved)
    mode = _lane_rule(op, INTERLEAVED if interleaved else CHUNKED, pairs)
    return _table_op(op, q, k, cos, sin, head_axis, mode, sections, True, inplace)


def _check_positions(op, position_ids, q, head_axis) -> torch.Tensor:
    """(3, <q's token axes>) integer positions (the token axes alone for text: T = H = W)."""
    if (
        not isinstance(position_ids, torch.Tensor)
        or position_ids.is_floating_point()
        or (position_ids.dtype == torch.bool or position_ids.is_complex())
    ):
        raise TypeError(f"{op}: position_ids must be an integer tensor")
    tokens = [q.shape[a] for a in token_axes(q.dim(), head_axis)]
    if list(position_ids.shape) == [3, *tokens]:  # the common case, first (host time)
        return _on_q_device(op, position_ids, q)
    if position_ids.dim() == len(tokens):
        position_ids = position_ids.unsqueeze(0)  # text only: T = H = W
    shape = list(position_ids.shape)
    # != rather than `not in (1, t)`: dynamo's containment test misjudges a constant size
    # against an equal symbolic one (torch.compile(dynamic=True) refused valid positions);
    # the message formats the sizes as a tuple (dynamo cannot trace str of a symbolic size)
    if (len(shape) != len(tokens) + 1 or (shape[0] != 1 and shape[0] != 3)
            or any(n != 1 and n != t for n, t in zip(shape[1:], tokens, strict=True))):  # fmt: skip
        layout = "(B, H, S, D)" if q.dim() == 4 else "(T, H, D)"
        raise ValueError(
            f"{op}: position_ids must have shape {(3, *tokens)} (or "
            f"without the leading 3 for text; size-1 axes broadcast) for q as {layout}, "
            f"heads on dim 1; got {tuple(position_ids.shape)}"
        )
    return _on_q_device(op, position_ids.expand(3, *tokens), q)


def _on_q_device(op, position_ids, q) -> torch.Tensor:
    if position_ids.device != q.device:
        raise ValueError(f"{op}: position_ids must be on q's device {q.device}")
    return position_ids


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
    pairs: bool = False,
):
    """M-RoPE with the angles computed in the kernel (fp32) from integer positions.

    Equivalent to a Qwen-VL rotary class (cos/sin of ``position * inv_freq`` times
    ``attention_scaling``, sections merged) followed by :func:`rope`, without cos/sin in
    memory and without rounding them to the input dtype.

    Args:
        q, k: (B, H, S, D) or token-major (T, H, D) (heads on dim 1).
        position_ids: (3, B, S) or (3, T) integers ((B, S) / (T,) for text: T = H = W).
        inv_freq: (R / 2,) inverse frequencies (the rotary class's ``inv_freq``).
        mrope_section: [t, h, w], summing to R / 2 (chunked; the interleaved rule takes
            any sum, as :func:`mrope`).
        rotary_dim: R, if given (must equal 2 * len(inv_freq)); lanes R..D pass through
            (Qwen3.5's and GLM-4V's partial rotary).
        interleaved: Qwen3-VL's lane layout (T, H, W lanes interleaved) instead of the
            chunked sections of Qwen2-VL / Qwen2.5-VL.
        attention_scaling: the factor of cos and sin (the rotary class's
            ``attention_scaling``; 1 except for YaRN-style rope types).
        pairs: paired lanes (2j, 2j + 1), as :func:`rope`'s (GLM-4V: chunked sections
            over the frequencies, each frequency on two adjacent lanes).
    """
    op = "mrope_from_positions"
    head_axis = _check_qk(op, q, k, 1)
    if not isinstance(inv_freq, torch.Tensor) or not inv_freq.dtype.is_floating_point:
        raise TypeError(f"{op}: inv_freq must be a floating tensor")
    if inv_freq.dim() != 1:
        raise ValueError(f"{op}: inv_freq must be 1-D, got shape {tuple(inv_freq.shape)}")
    rot = 2 * inv_freq.numel()
    if rotary_dim is not None and check_int(op, "rotary_dim", rotary_dim) != rot:
        raise ValueError(
            f"{op}: rotary_dim={rotary_dim} does not match inv_freq's {inv_freq.numel()} "
            f"frequencies (rotary dim {rot})"
        )
    _check_rotary_dim(op, rot, q.shape[-1], "2 * len(inv_freq)")
    interleaved = check_bool(op, "interleaved", interleaved)
    sections = _check_sections(op, mrope_section, rot // 2, interleaved)
    if inv_freq.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{op}: inv_freq must not require grad (no gradient is computed for it)")
    positions = saveable(_check_positions(op, position_ids, q, head_axis))
    freq = inv_freq
    if freq.dtype != torch.float32 or freq.device != q.device or freq.stride(0) != 1:
        freq = to_device(op, "inv_freq", freq, q.device, dtype=torch.float32).contiguous()
    freq = saveable(freq)  # a buffer a rotary update recomputed under inference_mode
    mode = _lane_rule(op, INTERLEAVED if interleaved else CHUNKED, pairs)
    scaling = check_real(op, "attention_scaling", attention_scaling, -math.inf, math.inf)
    return ops.rope_positions(q, k, positions, freq, head_axis, mode, sections, scaling, False)


def vision_rope(q, k, cos, sin, *, pairs: bool = False):
    """``apply_rotary_pos_emb_vision``: the vision tower's 2-D RoPE in fp32.

    Args:
        q, k: (N, H, hd) (e.g. strided views of a packed qkv projection), hd 72 or 80 in
            the Qwen-VL towers (any even hd works), or (B, N, H, hd) (Kimi-K2.5's, MLCD's
            towers): the heads are the second-to-last axis.
        cos, sin: fp32 tables ``[h f | w f | h f | w f]`` of q's shape without the heads
            axis, (N, hd) or (B, N, hd); missing leading axes and axes of size 1 broadcast,
            as transformers' ``cos.unsqueeze(-2)`` broadcasts them.
        pairs: lanes (2j, 2j + 1) rotate together, the tables in that order (Inkling2's
            ``rotate_pairwise``), as :func:`rope`'s.

    Returns:
        (q_rotated, k_rotated) in q's and k's dtypes, computed in fp32 (float64 inputs too,
        rounded to fp32 first, as transformers does).
    """
    if (isinstance(q, torch.Tensor) and isinstance(cos, torch.Tensor) and q.dim() in (3, 4)
            and cos.dim() and cos.shape[-1] != q.shape[-1]):  # fmt: skip
        # the tower rotates whole heads; a narrower table (cos of the (N, hd / 2) freqs, before
        # transformers' cat((freqs, freqs), -1)) is refused as transformers refuses it (a q
        # of another rank, e.g. (N, H hd) not viewed into heads, is named by _check_qk)
        raise ValueError(f"vision_rope: cos and sin must be (N, head_dim) = (N, {q.shape[-1]}), "
                         f"got cos of shape {tuple(cos.shape)}")  # fmt: skip
    wide = [isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in (q, k)]
    if any(wide):  # transformers' q.float(): the rounding is part of the result
        q, k = (t.float() if w else t for t, w in zip((q, k), wide, strict=True))
        out = _rope("vision_rope", q, k, cos, sin, -2, False, pairs)
        return tuple(t.double() if w else t for t, w in zip(out, wide, strict=True))
    return _rope("vision_rope", q, k, cos, sin, -2, False, pairs)

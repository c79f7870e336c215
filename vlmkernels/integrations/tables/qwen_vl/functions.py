"""The functions the rotary table patches in, with transformers' signatures and names:
the text rotary functions of the Qwen-VL family and of the models whose code transformers
adapted from it (rotate-half, partial, lane pairs, in fp32, k optional), the vision ones
(Qwen2-VL's, and its lane-pair and partial variants; Llama 4's complex one, Gemma 4's
per-axis one),
the text rotary module's forward that hands positions on (``angles="positions"``), and the
``Rebind.only`` guards that probe which function an installed model has."""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable

import torch

from ....ops.rope import mrope, mrope_from_positions, rope, vision_rope
from ...fallback import class_forward
from ...patching import Architecture, UnsupportedLayoutError, global_loads, unwrap


@dataclasses.dataclass(frozen=True, eq=False)
class PositionAngles:
    """What the patched text rotary module returns in place of ``sin`` with
    ``angles="positions"`` (``cos`` is then the (3, B, S) position ids)."""

    inv_freq: torch.Tensor
    attention_scaling: float
    mrope_section: tuple[int, int, int]
    interleaved: bool
    dtype: torch.dtype  # the dtype transformers would have cast cos/sin to
    pairs: bool = False  # lanes (2j, 2j + 1) rotate together (GLM-4V)


def _eager_dtype(x: torch.Tensor, *table_dtypes: torch.dtype) -> torch.Tensor:
    """``x`` in the dtype of transformers' ``x * cos + rotate_half(x) * sin`` (type
    promotion of x, cos and sin), before the rotation: a bf16 q with fp32 tables (autocast)
    gives an fp32 result there, computed from the exact products, not the bf16-rounded
    rotation cast up afterwards."""
    dtype = x.dtype
    for table_dtype in table_dtypes:
        dtype = torch.promote_types(dtype, table_dtype)
    return x if x.dtype == dtype else x.to(dtype)


def _check_width(q, rot: int, partial: bool) -> None:
    """transformers' ``q * cos + rotate_half(q) * sin`` needs tables as wide as the head:
    the Qwen2/2.5/3-VL functions replaced here have no partial rotary (vlmkernels.rope
    does), so a narrower one (a rope type honouring ``partial_rotary_factor``) is refused
    as transformers refuses it, not rotated partially. ``partial`` (Qwen3.5's function):
    narrower tables rotate the head's first lanes, as there."""
    if rot > q.shape[-1] or (rot < q.shape[-1] and not partial):
        raise ValueError(
            f"vlmkernels.patch: the rotary tables are {rot} wide for a head dim of "
            f"{q.shape[-1]}; transformers' rotary function needs them "
            f"{'at most as wide' if partial else 'equal'} (its q * cos does not broadcast"
            f"{'' if partial else '; a partial_rotary_factor with this rope type?'})"
        )


def _from_positions(q, k, positions, angles: PositionAngles, section, unsqueeze_dim,
                    partial=False):  # fmt: skip
    _check_width(q, 2 * angles.inv_freq.shape[-1], partial)
    if unsqueeze_dim != 1:
        raise ValueError(
            f"vlmkernels.patch: angles='positions' needs q and k as (B, H, S, D) "
            f"(unsqueeze_dim=1), got unsqueeze_dim={unsqueeze_dim}"
        )
    positions = positions.to(q.device).expand(3, q.shape[0], q.shape[2])
    q, k = _eager_dtype(q, angles.dtype), _eager_dtype(k, angles.dtype)
    return mrope_from_positions(
        q, k, positions, angles.inv_freq, section, interleaved=angles.interleaved,
        attention_scaling=angles.attention_scaling, pairs=angles.pairs,
    )  # fmt: skip


def _text_function(partial: bool, pairs: bool = False):
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if isinstance(sin, PositionAngles):
            return _from_positions(q, k, cos, sin, sin.mrope_section, unsqueeze_dim, partial)
        _check_width(q, cos.shape[-1], partial)
        q, k = (_eager_dtype(x, cos.dtype, sin.dtype) for x in (q, k))
        return rope(q, k, cos, sin, unsqueeze_dim, pairs=pairs)

    return apply_rotary_pos_emb


def _bool(*tensors) -> str | None:
    """Why transformers' rotation refuses one of ``tensors``: its ``rotate_half`` negates
    them, which torch refuses for a bool tensor (the fused ops would rotate it as 0 / 1)."""
    if any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in tensors):
        return "a bool q or k (transformers' -x refuses it)"
    return None


def _text_route(q, k, cos, sin, unsqueeze_dim=1):
    """``route`` of the text functions (see :func:`...fallback.original_function`)."""
    return _bool(q, k)


def _routed(function, route=_text_route, fused_only=PositionAngles):
    """``function`` with what a patched forward's guard reads (``route``, and
    ``fused_only``: by default the positions of ``angles="positions"``, which transformers'
    function cannot take; see :func:`...fallback.original_function`)."""
    function.route, function.fused_only = route, fused_only
    return function


apply_rotary_pos_emb = _text_function(partial=False)
apply_rotary_pos_emb.__qualname__ = "apply_rotary_pos_emb"
_routed(apply_rotary_pos_emb)
apply_rotary_pos_emb.__doc__ = """transformers' ``apply_rotary_pos_emb`` (Qwen2/2.5/3-VL: tables
as wide as the head) on :func:`vlmkernels.rope` (or :func:`vlmkernels.mrope_from_positions`
when ``sin`` is a :class:`PositionAngles`)."""

# Qwen3.5's function of the same name: the first cos.shape[-1] lanes rotate, the rest pass
apply_partial_rotary_pos_emb = _text_function(partial=True)
apply_partial_rotary_pos_emb.__qualname__ = "apply_partial_rotary_pos_emb"
_routed(apply_partial_rotary_pos_emb)
apply_partial_rotary_pos_emb.__doc__ = """Qwen3.5's and GLM-4V-MoE's ``apply_rotary_pos_emb``
(partial rotary: lanes past ``cos.shape[-1]`` pass through) on :func:`vlmkernels.rope` (or
:func:`vlmkernels.mrope_from_positions`). Its ``__name__`` is transformers'."""

# GLM-4V's: partial rotary in pairs (its rotate_half_llm; tables repeat_interleave(2))
apply_paired_rotary_pos_emb = _text_function(partial=True, pairs=True)
apply_paired_rotary_pos_emb.__qualname__ = "apply_paired_rotary_pos_emb"
_routed(apply_paired_rotary_pos_emb)
apply_paired_rotary_pos_emb.__doc__ = """GLM-4V's ``apply_rotary_pos_emb`` (transformers >=
5.17: partial rotary, lanes (2j, 2j + 1) rotating together, as its ``rotate_half_llm``, the
tables in that order) on :func:`vlmkernels.rope` with ``pairs=True`` (or
:func:`vlmkernels.mrope_from_positions`). Its ``__name__`` is transformers'."""


def apply_partial_rotary_pos_emb_optional_k(q, k=None, cos=None, sin=None, unsqueeze_dim=1):
    """Qwen4-Exp's ``apply_rotary_pos_emb``: Qwen3.5's partial rotary, k optional (q alone
    returned when k is None, as its sparse-attention indexer calls it), on
    :func:`vlmkernels.rope` (a k of no heads stands in for the missing one). Its
    ``__name__`` is transformers'."""
    if k is None:  # the heads axis of q that transformers' cos.unsqueeze(unsqueeze_dim) names
        n = cos.dim() + 1
        empty = q.narrow(q.dim() - n + unsqueeze_dim % n, 0, 0)
        return apply_partial_rotary_pos_emb(q, empty, cos, sin, unsqueeze_dim)[0]
    return apply_partial_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)


apply_partial_rotary_pos_emb_optional_k.__name__ = "apply_rotary_pos_emb"


def _optional_k_route(q, k=None, cos=None, sin=None, unsqueeze_dim=1):
    return _bool(q, k)


_routed(apply_partial_rotary_pos_emb_optional_k, _optional_k_route)


def apply_paired_rotary_pos_emb_from_halves(q, k, cos, sin, unsqueeze_dim=1):
    """GLM-4V's ``apply_rotary_pos_emb`` of transformers 5.16: its rotary class gives
    ``[f | f]`` tables, which the function reorders (``cos[..., :R / 2]
    .repeat_interleave(2)``, a copy of the small table, here too) before rotating pairs."""
    if isinstance(sin, PositionAngles):  # the angles are the same
        return apply_paired_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)
    half = cos.shape[-1] // 2
    cos, sin = (t[..., :half].repeat_interleave(2, -1) for t in (cos, sin))
    return apply_paired_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)


apply_paired_rotary_pos_emb_from_halves.__name__ = "apply_rotary_pos_emb"
_routed(apply_paired_rotary_pos_emb_from_halves)


def _fp32_function(pairs: bool):
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        _check_width(q, cos.shape[-1], partial=False)
        if k.dtype != q.dtype and k.dtype in (torch.float16, torch.bfloat16):
            k = k.float()  # transformers rotates k.float() and rounds once, to q's dtype
        out_q, out_k = rope(q, k, cos, sin, unsqueeze_dim, pairs=pairs)
        return out_q, out_k if out_k.dtype == q.dtype else out_k.to(q.dtype)

    return apply_rotary_pos_emb


# HunYuan-VL's: rotate-half over the whole head, computed in fp32, cast back to q's dtype
apply_fp32_rotary_pos_emb = _fp32_function(pairs=False)
apply_fp32_rotary_pos_emb.__qualname__ = "apply_fp32_rotary_pos_emb"
_routed(apply_fp32_rotary_pos_emb)
apply_fp32_rotary_pos_emb.__doc__ = """HunYuan-VL's ``apply_rotary_pos_emb`` (transformers >=
5.17: rotate-half over the whole head, computed in fp32 and cast back to q's dtype) on
:func:`vlmkernels.rope`, which computes in fp32 (fp64 for float64 q) and rounds once. Its
``__name__`` is transformers'."""

# ERNIE-4.5-VL's: the same in lane pairs (its rotate_half_text; tables repeat_interleave(2))
apply_fp32_paired_rotary_pos_emb = _fp32_function(pairs=True)
apply_fp32_paired_rotary_pos_emb.__qualname__ = "apply_fp32_paired_rotary_pos_emb"
_routed(apply_fp32_paired_rotary_pos_emb)
apply_fp32_paired_rotary_pos_emb.__doc__ = """ERNIE-4.5-VL's ``apply_rotary_pos_emb`` (the
whole head's lanes (2j, 2j + 1) rotating together, the tables in that order, computed in
fp32 and cast back to q's dtype) on :func:`vlmkernels.rope` with ``pairs=True``. Its
``__name__`` is transformers'."""


def paired_table_order(function) -> str | None:
    """The cos/sin order a GLM-4V-style ``apply_rotary_pos_emb(q, k, cos, sin)`` (lanes
    rotating in pairs) takes: "pairs" (each frequency twice in a row: transformers >= 5.17,
    whose rotary class does the repeat_interleave) or "halves" ([f | f]: 5.16, whose function
    reorders its tables itself); None for neither. Recognised from what it does to a 4-lane
    table [1, 2, 3, 4] with zero sines, not from the version number; raises what the call
    raises."""
    with torch.device("cpu"), torch.no_grad():
        x = torch.ones(1, 1, 1, 4)
        cos, sin = torch.arange(1.0, 5.0).view(1, 1, 4), torch.zeros(1, 1, 4)
        out = tuple(function(x, x, cos, sin)[0].flatten().tolist())
    return {(1.0, 2.0, 3.0, 4.0): "pairs", (1.0, 1.0, 2.0, 2.0): "halves"}.get(out)


_TABLE_ORDER: dict[Callable, str | None] = {}  # GLM-4V function -> the table order it takes


def _table_order(arch: Architecture) -> str | None:
    """:func:`paired_table_order` of the installed GLM-4V ``apply_rotary_pos_emb``; None when
    the function is missing or does neither. What a function returned is remembered per
    function; a call that raised is not (it may have raised for the caller's context, e.g.
    a FakeTensorMode, not for the function)."""
    function = getattr(importlib.import_module(arch.module), "apply_rotary_pos_emb", None)
    if function not in _TABLE_ORDER:
        try:
            _TABLE_ORDER[function] = paired_table_order(function)
        except Exception:  # missing, another signature, or no values here: neither
            return None
    return _TABLE_ORDER[function]


def _paired(order: str) -> Callable[[Architecture], bool]:
    """``Rebind.only`` for GLM-4V's function taking tables in ``order``; another function
    of that name is refused, not left unpatched."""

    def only(arch: Architecture) -> bool:
        if arch.data["rotation"] != "pairs":
            return False
        found = _table_order(arch)
        if found is None:
            raise UnsupportedLayoutError(
                f"{arch.module}.apply_rotary_pos_emb does not rotate lane pairs with its "
                f"cos/sin in an order vlmkernels knows (each frequency twice in a row, "
                f"transformers >= 5.17; [f | f], 5.16)"
            )
        return found == order

    return only


def apply_multimodal_rotary_pos_emb(q, k, cos, sin, mrope_section, unsqueeze_dim=1):
    """transformers <= 5.16's ``apply_multimodal_rotary_pos_emb`` (chunked sections) on
    :func:`vlmkernels.mrope` (or :func:`vlmkernels.mrope_from_positions`)."""
    if isinstance(sin, PositionAngles):
        return _from_positions(q, k, cos, sin, mrope_section, unsqueeze_dim)
    _check_width(q, cos.shape[-1], partial=False)
    q, k = (_eager_dtype(x, cos.dtype, sin.dtype) for x in (q, k))
    return mrope(q, k, cos, sin, mrope_section, unsqueeze_dim)


def _multimodal_route(q, k, cos, sin, mrope_section, unsqueeze_dim=1):
    return _bool(q, k)


_routed(apply_multimodal_rotary_pos_emb, _multimodal_route)


def apply_rotary_pos_emb_vision(q, k, cos, sin):
    """transformers' ``apply_rotary_pos_emb_vision`` on :func:`vlmkernels.vision_rope`."""
    return vision_rope(q, k, cos, sin)


def _empty(*tensors) -> str | None:
    """Why transformers' lane-pair view (``x.view(..., -1, 2)``, a complex view) refuses one
    of ``tensors``: torch cannot infer the -1 of a tensor without elements."""
    if any(isinstance(t, torch.Tensor) and t.numel() == 0 for t in tensors):
        return "an empty q or k (transformers' view(..., -1, 2) refuses it)"
    return None


def _vision_pairs_route(q, k, cos, sin):
    return _empty(q, k)


def apply_paired_rotary_pos_emb_vision(q, k, cos, sin):
    """Inkling2's ``apply_rotary_pos_emb_vision`` (lanes (2j, 2j + 1) rotating together, in
    fp32, each result in its input's dtype) on :func:`vlmkernels.vision_rope` with
    ``pairs=True``. Its ``__name__`` is transformers'."""
    return vision_rope(q, k, cos, sin, pairs=True)


apply_paired_rotary_pos_emb_vision.__name__ = "apply_rotary_pos_emb_vision"
_routed(apply_paired_rotary_pos_emb_vision, _vision_pairs_route, None)


def apply_partial_rotary_pos_emb_vision(q, k, cos, sin):
    """MiniMax-M3-VL's ``apply_rotary_pos_emb_vision``: rotate-half on the first
    ``cos.shape[-1]`` lanes of each head (the rest pass), the tables broadcast at the
    heads axis (-2), in the dtype of ``q * cos`` (no fp32 upcast), on
    :func:`vlmkernels.rope`: Qwen3.5's function with the heads on axis -2, where (N, R)
    tables broadcast from the right. Its ``__name__`` is transformers'."""
    return apply_partial_rotary_pos_emb(q, k, cos, sin, -2)


apply_partial_rotary_pos_emb_vision.__name__ = "apply_rotary_pos_emb_vision"


def _vision_partial_route(q, k, cos, sin):
    """MiniMax-M3-VL's function indexes its tables ``cos[:, None, :]`` (5.16:
    ``cos[None, :, None]``): the same broadcast as the heads axis -2 for the (N, R) tables
    its attention passes, another one (or an IndexError) for tables of another rank."""
    if isinstance(cos, torch.Tensor) and cos.dim() != 2:
        return f"{cos.dim()}-D tables (transformers indexes (N, R) ones)"
    return _bool(q, k)


_routed(apply_partial_rotary_pos_emb_vision, _vision_partial_route, None)


def apply_multidimensional_rope(x, cos, sin, position_ids, unsqueeze_dim=2):
    """Gemma 4's vision rotary of one tensor: the head of (B, N, H, hd) ``x`` split into
    ``position_ids.shape[-1]`` equal parts (height, width), each part rotated as its own
    rotate-half RoPE with that part of the (B, N, hd) tables (transformers' arithmetic:
    the dtype of ``x * cos``). On :func:`vlmkernels.rope`: the parts become the sequence
    axis of a (B N, parts, H, hd / parts) view, no copy; another layout (another
    ``unsqueeze_dim`` or rank, tables not of x's (B, N)) runs transformers' formula."""
    parts = position_ids.shape[-1]
    d = x.shape[-1]
    size = 2 * (d // (2 * parts))
    if size <= 0 or size * parts != d:
        raise ValueError(
            f"apply_multidimensional_rope: the head dim {d} does not split into "
            f"{parts} even parts (one per position axis)"
        )
    if (
        x.dim() != 4
        or unsqueeze_dim not in (2, -2)
        or not cos.shape == sin.shape == (*x.shape[:2], d)
    ):
        return _multidimensional_rope_eager(x, cos, sin, parts, size, unsqueeze_dim)
    b, n, h = x.shape[:3]
    view = x.reshape(b * n, h, parts, size).transpose(1, 2)
    tables = (t.reshape(b * n, parts, size) for t in (cos, sin))
    no_k = view.narrow(2, 0, 0)
    out = apply_rotary_pos_emb(view, no_k, *tables, unsqueeze_dim=2)[0]
    return out.transpose(1, 2).reshape(b, n, h, d)


def _multidimensional_route(x, cos, sin, position_ids, unsqueeze_dim=2):
    """transformers splits x, cos and sin into the same parts: tables of another width than
    the head raise there (the parts are cut from x's width)."""
    if any(isinstance(t, torch.Tensor) and isinstance(x, torch.Tensor) and t.dim()
           and t.shape[-1] != x.shape[-1] for t in (cos, sin)):  # fmt: skip
        return "tables of another width than the head (transformers' split refuses them)"
    return _bool(x)


_routed(apply_multidimensional_rope, _multidimensional_route, None)


def _multidimensional_rope_eager(x, cos, sin, parts, size, unsqueeze_dim):
    """transformers' ``apply_multidimensional_rope`` formula in PyTorch."""
    out = []
    for i in range(parts):
        lanes = slice(i * size, (i + 1) * size)
        xi = x[..., lanes]
        c, s = (t[..., lanes].unsqueeze(unsqueeze_dim) for t in (cos, sin))
        rotated = torch.cat((-xi[..., size // 2 :], xi[..., : size // 2]), dim=-1)
        out.append(xi * c + rotated * s)
    return torch.cat(out, dim=-1)


def vision_apply_rotary_emb(query, key, freqs_ci):
    """Llama 4's ``vision_apply_rotary_emb``: lanes (2j, 2j + 1) of (B, N, H, hd) ``query``
    and ``key`` rotate as complex numbers multiplied by ``freqs_ci`` (cos + i sin, N x hd / 2
    complex, shaped (N, 1, hd / 2) by its rotary class), in fp32, each result in its input's
    dtype; on :func:`vlmkernels.vision_rope` with ``pairs=True`` and each angle's cos and
    sin repeated for the two lanes of its pair."""
    if not isinstance(freqs_ci, torch.Tensor) or not freqs_ci.is_complex():
        raise TypeError(
            "vision_apply_rotary_emb: freqs_ci must be a complex tensor (cos + i sin), got "
            f"{getattr(freqs_ci, 'dtype', type(freqs_ci).__name__)}"
        )
    # transformers views freqs_ci as (1, N, 1, hd / 2) against the complex query
    table = torch.view_as_real(freqs_ci.reshape(query.shape[1], -1).to(query.device))
    cos, sin = (table[..., i].repeat_interleave(2, -1) for i in (0, 1))
    return vision_rope(query, key, cos, sin, pairs=True)


def _vision_complex_route(query, key, freqs_ci):
    return _empty(query, key)


_routed(vision_apply_rotary_emb, _vision_complex_route, None)


def _positions_problem(x, position_ids) -> str | None:
    """Why the kernel's angles from ``position_ids`` would not be what transformers' rotary
    class makes of them for hidden states ``x``, or None: positions not of int32 / int64
    (transformers multiplies any tensor's ``.float()``: fractional, bool, int16), on another
    device than ``x`` (transformers raises), not (B, S) or (1 | 3, B, S) for x's (B, S) (size-1
    axes broadcast; transformers raises or broadcasts otherwise, the positions' expand to
    q's (3, B, S) would raise its own error)."""
    if not isinstance(position_ids, torch.Tensor) or not isinstance(x, torch.Tensor):
        return "the positions or the hidden states are not tensors"
    if position_ids.dtype not in (torch.int32, torch.int64):
        return f"position_ids of {position_ids.dtype}"
    if position_ids.device != x.device:
        return f"position_ids on {position_ids.device}, hidden states on {x.device}"
    shape = position_ids.shape
    if position_ids.dim() not in (2, 3) or (position_ids.dim() == 3 and shape[0] not in (1, 3)):
        return f"position_ids of shape {tuple(shape)}"
    sizes = zip(shape[-2:], x.shape[:2], strict=True)
    if x.dim() == 3 and any(n != 1 and n != t for n, t in sizes):
        return f"position_ids of shape {tuple(shape)} for hidden states {tuple(x.shape)}"
    return None


def _positions_rotary_forward(section: tuple[int, int, int], interleaved: bool,
                              pairs: bool = False):  # fmt: skip
    """A text rotary ``forward`` for ``angles="positions"``: no tables, the positions and
    what the kernel needs to compute the angles. The module's ``mrope_section`` is read at
    each call, as transformers reads it (``section``: the config's, for the modules without
    one)."""

    def forward(self, x, position_ids):
        why = _positions_problem(x, position_ids)
        if why is not None:  # transformers' tables (the table path) or its error
            return class_forward(self, why, x, position_ids)
        if position_ids.dim() == 2:
            position_ids = position_ids[None]
        own = getattr(self, "mrope_section", None)
        live = section if own is None else tuple(own)
        angles = PositionAngles(self.inv_freq, float(self.attention_scaling), live,
                                interleaved, x.dtype, pairs)  # fmt: skip
        return position_ids.expand(3, -1, -1), angles

    return forward


def _rotation(kind: str):
    """``Rebind.only`` for the architectures whose text rotary function is ``kind``."""
    return lambda arch: arch.data["rotation"] == kind


def _vision_rotation(kind: str):
    """``Rebind.only`` for the architectures whose vision rotary function is ``kind``
    ("full", Qwen2-VL's, where the table says nothing; "pairs", "partial", "llama",
    "complex", "multidimensional")."""
    return lambda arch: arch.data.get("vision_rotation", "full") == kind


def _calls(cls, name: str) -> bool:
    """Whether ``cls.forward`` (through its decorators) loads the global ``name``; True
    where that cannot be read (the probe then decides)."""
    try:
        return name in global_loads(unwrap(cls.forward, cls.__qualname__)[-1].__code__)
    except Exception:  # noqa: BLE001 - no class, a forward that is not plain Python
        return True


def _in_fp32(kind: str, pairs: bool) -> Callable[[Architecture], bool]:
    """``Rebind.only`` for the architectures of rotation ``kind`` (HunYuan-VL's,
    ERNIE-4.5-VL's), checked on the installed ``apply_rotary_pos_emb``: for bf16 q = [1, 2,
    3, 4] and fp32 tables, it returns bf16 q * cos with cos = [1, 2, 3, 4], sin = 0 (the
    tables in lane order) and the rotated lanes with cos = 0, sin = 1 (pairs: [-2, 1, -4,
    3]; halves: [-3, -4, 1, 2]). Another function of that name is refused, not misread."""
    want = ((1.0, 4.0, 9.0, 16.0), (-2.0, 1.0, -4.0, 3.0) if pairs else (-3.0, -4.0, 1.0, 2.0))

    def only(arch: Architecture) -> bool:
        if arch.data["rotation"] != kind:
            return False
        module = importlib.import_module(arch.module)
        if not _calls(getattr(module, arch.classes["text_attention"], None),
                      "apply_rotary_pos_emb"):  # fmt: skip
            return True  # the forward calls another function, which plan_forward names
        function = getattr(module, "apply_rotary_pos_emb", None)
        try:
            with torch.device("cpu"), torch.no_grad():
                x = torch.arange(1.0, 5.0, dtype=torch.bfloat16).view(1, 1, 1, 4)
                tables = ((torch.arange(1.0, 5.0), torch.zeros(4)), (torch.zeros(4), torch.ones(4)))
                outs = [function(x, x, c.view(1, 1, 4), s.view(1, 1, 4))[0] for c, s in tables]
            found = tuple(tuple(o.float().flatten().tolist()) for o in outs)
            dtypes = {o.dtype for o in outs}
        except Exception:  # missing, another signature: not the function described
            found, dtypes = None, None
        if found != want or dtypes != {torch.bfloat16}:
            raise UnsupportedLayoutError(
                f"{arch.module}.apply_rotary_pos_emb does not rotate "
                f"{'lane pairs' if pairs else 'half the head'} in fp32 and return q's dtype, "
                f"as vlmkernels expects of {arch.key} (found {found}, {dtypes})"
            )
        return True

    return only

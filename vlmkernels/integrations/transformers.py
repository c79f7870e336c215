"""Swap the rotary path of one transformers Qwen-VL model instance for the vlmkernels ops.

>>> handle = vlmkernels.integrations.transformers.patch(model)  # Qwen2/2.5/3-VL
>>> ...                                                          # train / generate
>>> handle.undo()                                                # or: with patch(model): ...

What is swapped, per part (each a keyword of :func:`patch`):

- ``rope``: the text attention's call to transformers' rotary function runs
  :func:`vlmkernels.rope` (``apply_rotary_pos_emb``, cos/sin already merged by the rotary
  class) or :func:`vlmkernels.mrope` (``apply_multimodal_rotary_pos_emb``, (3, B, S, D)
  tables, Qwen2/2.5-VL up to transformers 5.16).
- ``vision``: the vision attention's ``apply_rotary_pos_emb_vision`` runs
  :func:`vlmkernels.vision_rope`.
- ``rope_index``: ``get_rope_index`` of the ``...Model`` instance is
  ``vlmkernels.ops.rope_index.rope_index_method(model)``.
- ``angles="positions"`` (with ``rope``): the text rotary module no longer builds cos/sin
  tables; it hands the (3, B, S) position ids on, and the attention calls
  :func:`vlmkernels.mrope_from_positions` with the module's ``inv_freq``,
  ``attention_scaling`` and M-RoPE section (chunked for Qwen2/2.5-VL, interleaved for
  Qwen3-VL). The rotary module then returns ``(position_ids, PositionAngles(...))`` in place
  of ``(cos, sin)``: only the patched attention understands that pair, and anything else
  that unpacked it as tensors would fail loudly rather than compute wrong values. Refused
  for rope types that update ``inv_freq`` during the forward pass (``dynamic``,
  ``longrope``). The angles stay in fp32 (the table path rounds cos/sin to the activations'
  dtype first, as transformers does), so in bf16 the two paths differ by that rounding.

Outputs have the dtypes transformers' functions return (type promotion of q and cos for
the text functions, q's and k's dtypes for the vision one); the ops compute in fp32.

Mechanism. The attention classes call the rotary function by its module-global name, so
for each patched attention module the class's ``forward`` function is rebuilt with
``types.FunctionType`` on the same code object and closure, over a copy of its module's
globals in which that one name is bound to the vlmkernels-backed function, and set as the
instance attribute ``forward`` (bound with ``types.MethodType``); ``nn.Module.__call__``
finds it before the class's. Before anything is installed, the forward's bytecode must load
the expected name as a global, the function in the modeling module must have the
signature the replacement takes, and the forward must not be decorated; otherwise
:class:`UnsupportedLayoutError` is raised and nothing changes.

Why this is per instance and exactly undoable: nothing is assigned to a module or a class
of torch or transformers. Only the patched instances' ``__dict__`` gain entries
(``forward``, or ``_old_forward`` where accelerate's hooks already own ``forward``, and
``get_rope_index``), and :meth:`PatchHandle.undo` puts back exactly what each slot held
before (deleting the entry where there was none). Another instance of the same class,
patched or not, is untouched. The copied globals are a snapshot: module globals rebound
after ``patch`` do not reach the patched instances. Undo before pickling the whole model
object (the rebuilt functions do not pickle by reference) or deep-copying it (the copy
would carry the patch without a handle to undo it).

Version matrix (the rotary call each attention's ``forward`` makes):

=============  ===============================  ===================================
transformers   Qwen2-VL, Qwen2.5-VL text        Qwen3-VL text
=============  ===============================  ===================================
<= 5.16        ``apply_multimodal_rotary_       ``apply_rotary_pos_emb`` (the rotary
               pos_emb`` on (3, B, S, D)        class merges the interleaved
               tables -> ``mrope``              sections) -> ``rope``
>= 5.17        ``apply_rotary_pos_emb`` (the    ``apply_rotary_pos_emb`` -> ``rope``
               rotary class merges) -> ``rope``
=============  ===============================  ===================================

All versions: vision attention ``apply_rotary_pos_emb_vision`` -> ``vision_rope``;
``get_rope_index(input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw,
[second_per_grid_ts,] attention_mask, **kwargs)`` -> ``rope_index_method``. The layout is
recognised from the code, not from the version number, so a release that moves the call
again is refused instead of silently left unpatched. Checked with transformers 5.16.1,
5.17.0 and 5.23.0 (tests/test_patch_transformers.py passes on each).

Models: ``Qwen2VL`` / ``Qwen2_5_VL`` / ``Qwen3VL`` ``...ForConditionalGeneration`` and
``...Model`` (all three parts), ``...TextModel`` (``rope`` only: it has no vision tower and
no ``get_rope_index``) and the vision towers (``vision`` only).
"""

from __future__ import annotations

import dataclasses
import dis
import inspect
import re
import sys
import types

import torch

from ..ops.rope import mrope, mrope_from_positions, rope, vision_rope
from ..ops.rope_index import rope_index_method

__all__ = [
    "AlreadyPatchedError",
    "PatchHandle",
    "PositionAngles",
    "UnsupportedLayoutError",
    "UnsupportedModelError",
    "patch",
]


class UnsupportedModelError(TypeError):
    """The object is not a model architecture :func:`patch` knows."""


class UnsupportedLayoutError(RuntimeError):
    """The installed transformers lays the model out in a way :func:`patch` does not know."""


class AlreadyPatchedError(RuntimeError):
    """The instance (or part of it) is already patched by vlmkernels."""


# --------------------------------------------------------------------------------------
# Architectures
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Arch:
    """Class names in ``transformers.models.<key>.modeling_<key>`` (stable from 5.16 to
    5.23) and the M-RoPE lane rule of the text rotary class."""

    full: tuple[str, ...]  # roots with every part: the ...ForConditionalGeneration, ...Model
    text_model: str
    vision_model: str
    model: str  # owns get_rope_index
    text_attention: str
    vision_attention: str
    text_rotary: str
    interleaved: bool


_ARCHS = {
    "qwen2_vl": _Arch(
        full=("Qwen2VLForConditionalGeneration", "Qwen2VLModel"),
        text_model="Qwen2VLTextModel",
        vision_model="Qwen2VisionTransformerPretrainedModel",
        model="Qwen2VLModel",
        text_attention="Qwen2VLAttention",
        vision_attention="VisionAttention",
        text_rotary="Qwen2VLRotaryEmbedding",
        interleaved=False,
    ),
    "qwen2_5_vl": _Arch(
        full=("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel"),
        text_model="Qwen2_5_VLTextModel",
        vision_model="Qwen2_5_VisionTransformerPretrainedModel",
        model="Qwen2_5_VLModel",
        text_attention="Qwen2_5_VLAttention",
        vision_attention="Qwen2_5_VLVisionAttention",
        text_rotary="Qwen2_5_VLRotaryEmbedding",
        interleaved=False,
    ),
    "qwen3_vl": _Arch(
        full=("Qwen3VLForConditionalGeneration", "Qwen3VLModel"),
        text_model="Qwen3VLTextModel",
        vision_model="Qwen3VLVisionModel",
        model="Qwen3VLModel",
        text_attention="Qwen3VLTextAttention",
        vision_attention="Qwen3VLVisionAttention",
        text_rotary="Qwen3VLTextRotaryEmbedding",
        interleaved=True,
    ),
}

_MODELING = re.compile(r"(?:^|\.)models\.(\w+)\.modeling_(\w+)$")


def _find_arch(model) -> tuple[_Arch, types.ModuleType]:
    """The architecture of ``model`` and its transformers modeling module."""
    for cls in type(model).__mro__:
        match = _MODELING.search(getattr(cls, "__module__", "") or "")
        if match and match.group(1) == match.group(2) and match.group(1) in _ARCHS:
            return _ARCHS[match.group(1)], sys.modules[cls.__module__]
    raise UnsupportedModelError(
        f"vlmkernels.patch supports transformers Qwen2-VL, Qwen2.5-VL and Qwen3-VL models "
        f"(...ForConditionalGeneration, ...Model, ...TextModel, vision tower); got "
        f"{type(model).__module__}.{type(model).__qualname__}"
    )


def _class(modeling: types.ModuleType, name: str) -> type:
    cls = getattr(modeling, name, None)
    if not isinstance(cls, type):
        raise UnsupportedLayoutError(
            f"{modeling.__name__} has no class {name}: this transformers layout is not "
            f"supported by vlmkernels.patch"
        )
    return cls


# --------------------------------------------------------------------------------------
# The functions patched in (same signatures as transformers')
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class PositionAngles:
    """What the patched text rotary module returns in place of ``sin`` with
    ``angles="positions"`` (``cos`` is then the (3, B, S) position ids)."""

    inv_freq: torch.Tensor
    attention_scaling: float
    mrope_section: tuple[int, int, int]
    interleaved: bool
    dtype: torch.dtype  # the dtype transformers would have cast cos/sin to


def _eager_dtype(out: torch.Tensor, x: torch.Tensor, table_dtype: torch.dtype) -> torch.Tensor:
    """``out`` in the dtype of transformers' ``x * cos`` (type promotion of x and cos)."""
    dtype = torch.promote_types(x.dtype, table_dtype)
    return out if out.dtype == dtype else out.to(dtype)


def _from_positions(q, k, positions, angles: PositionAngles, section, unsqueeze_dim):
    if unsqueeze_dim != 1:
        raise ValueError(
            f"vlmkernels.patch: angles='positions' needs q and k as (B, H, S, D) "
            f"(unsqueeze_dim=1), got unsqueeze_dim={unsqueeze_dim}"
        )
    positions = positions.to(q.device).expand(3, q.shape[0], q.shape[2])
    out_q, out_k = mrope_from_positions(
        q, k, positions, angles.inv_freq, section,
        interleaved=angles.interleaved, attention_scaling=angles.attention_scaling,
    )  # fmt: skip
    return _eager_dtype(out_q, q, angles.dtype), _eager_dtype(out_k, k, angles.dtype)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    """transformers' ``apply_rotary_pos_emb`` on :func:`vlmkernels.rope` (or
    :func:`vlmkernels.mrope_from_positions` when ``sin`` is a :class:`PositionAngles`)."""
    if isinstance(sin, PositionAngles):
        return _from_positions(q, k, cos, sin, sin.mrope_section, unsqueeze_dim)
    out_q, out_k = rope(q, k, cos, sin, unsqueeze_dim)
    return _eager_dtype(out_q, q, cos.dtype), _eager_dtype(out_k, k, cos.dtype)


def apply_multimodal_rotary_pos_emb(q, k, cos, sin, mrope_section, unsqueeze_dim=1):
    """transformers <= 5.16's ``apply_multimodal_rotary_pos_emb`` (chunked sections) on
    :func:`vlmkernels.mrope` (or :func:`vlmkernels.mrope_from_positions`)."""
    if isinstance(sin, PositionAngles):
        return _from_positions(q, k, cos, sin, mrope_section, unsqueeze_dim)
    out_q, out_k = mrope(q, k, cos, sin, mrope_section, unsqueeze_dim)
    return _eager_dtype(out_q, q, cos.dtype), _eager_dtype(out_k, k, cos.dtype)


def apply_rotary_pos_emb_vision(q, k, cos, sin):
    """transformers' ``apply_rotary_pos_emb_vision`` on :func:`vlmkernels.vision_rope`."""
    return vision_rope(q, k, cos, sin)


_MARK = "__vlmkernels_patched__"  # on every function patch installs

_TEXT_FUNCTIONS = (apply_rotary_pos_emb, apply_multimodal_rotary_pos_emb)
_VISION_FUNCTIONS = (apply_rotary_pos_emb_vision,)


def _positions_rotary_forward(section: tuple[int, int, int], interleaved: bool):
    """A text rotary ``forward`` for ``angles="positions"``: no tables, the positions and
    what the kernel needs to compute the angles."""

    def forward(self, x, position_ids):
        if position_ids.dim() == 2:
            position_ids = position_ids[None]
        angles = PositionAngles(self.inv_freq, float(self.attention_scaling), section,
                                interleaved, x.dtype)  # fmt: skip
        return position_ids.expand(3, -1, -1), angles

    setattr(forward, _MARK, True)
    return forward


# --------------------------------------------------------------------------------------
# Rebuilding a forward with one global rebound
# --------------------------------------------------------------------------------------


def _global_loads(code: types.CodeType) -> set[str]:
    """Names ``code`` (and the code nested in it) loads as globals."""
    names = {
        ins.argval
        for ins in dis.get_instructions(code)
        if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME")
    }
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_loads(const)
    return names


def _params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def _plan_forward(cls: type, candidates) -> tuple[types.FunctionType, object]:
    """The forward of ``cls`` and the replacement for the one rotary function it calls."""
    where = f"{cls.__module__}.{cls.__qualname__}.forward"
    fn = cls.forward
    if not isinstance(fn, types.FunctionType):
        raise UnsupportedLayoutError(f"{where} is not a plain Python function")
    if hasattr(fn, "__wrapped__"):
        raise UnsupportedLayoutError(f"{where} is decorated; vlmkernels.patch cannot rebuild it")
    names = [f.__name__ for f in candidates]
    called = [f for f in candidates if f.__name__ in _global_loads(fn.__code__)]
    if len(called) != 1:
        raise UnsupportedLayoutError(
            f"{where} calls {'none' if not called else 'more than one'} of {', '.join(names)}: "
            f"this transformers layout is not supported by vlmkernels.patch"
        )
    replacement = called[0]
    original = fn.__globals__.get(replacement.__name__)
    if not callable(original) or _params(original) != _params(replacement):
        raise UnsupportedLayoutError(
            f"{where} calls {replacement.__name__}, but {fn.__module__}.{replacement.__name__} "
            f"is not a function with parameters {_params(replacement)}"
        )
    return fn, replacement


def _rebuild(fn: types.FunctionType, replacement) -> types.FunctionType:
    """``fn`` over a copy of its globals in which ``replacement``'s name is bound to it."""
    scope = dict(fn.__globals__)
    scope[replacement.__name__] = replacement
    new = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__ = dict(fn.__kwdefaults__) if fn.__kwdefaults__ else None
    new.__dict__.update(fn.__dict__)
    for attr in ("__qualname__", "__doc__", "__annotations__"):
        setattr(new, attr, getattr(fn, attr))
    setattr(new, _MARK, True)
    return new


# --------------------------------------------------------------------------------------
# Slots: instance attributes set by patch, put back by undo
# --------------------------------------------------------------------------------------

_MISSING = object()


@dataclasses.dataclass
class _Slot:
    owner: object
    name: str
    new: object
    old: object = _MISSING
    label: str = ""

    def install(self) -> None:
        self.old = self.owner.__dict__.get(self.name, _MISSING)
        self.owner.__dict__[self.name] = self.new

    def intact(self) -> bool:
        return self.owner.__dict__.get(self.name, _MISSING) is self.new

    def restore(self) -> None:
        if self.old is _MISSING:
            del self.owner.__dict__[self.name]
        else:
            self.owner.__dict__[self.name] = self.old


def _forward_slot_name(module, label: str) -> str:
    """``forward``, or ``_old_forward`` where accelerate's hooks own ``forward`` (their
    wrapper calls ``module._old_forward``)."""
    own = module.__dict__
    if getattr(own.get("forward"), _MARK, False) or getattr(own.get("_old_forward"), _MARK, False):
        raise AlreadyPatchedError(
            f"{label} is already patched by vlmkernels.patch: undo that handle first"
        )
    if "forward" not in own:
        return "forward"
    old = own.get("_old_forward")
    if "_hf_hook" in own and getattr(old, "__func__", None) is type(module).forward:
        return "_old_forward"
    raise UnsupportedLayoutError(
        f"{label} already has an instance-level forward ({own['forward']!r}) that "
        f"vlmkernels.patch does not know how to wrap"
    )


def _forward_slots(root, cls: type, replacement_for, label: str) -> list[_Slot]:
    """One slot per instance of ``cls`` in ``root``, its forward rebuilt once per class."""
    rebuilt: dict[type, types.FunctionType] = {}
    slots = []
    for name, module in root.named_modules():
        if not isinstance(module, cls):
            continue
        where = f"{label} module {name or '<root>'} ({type(module).__qualname__})"
        slot_name = _forward_slot_name(module, where)
        kind = type(module)
        if kind not in rebuilt:
            rebuilt[kind] = _rebuild(*_plan_forward(kind, replacement_for))
        method = types.MethodType(rebuilt[kind], module)
        slots.append(_Slot(module, slot_name, method, label=f"{name or '<root>'}.{slot_name}"))
    return slots


def _rope_type(rotary) -> str:
    rope_type = getattr(rotary, "rope_type", None)
    if not isinstance(rope_type, str):
        raise UnsupportedLayoutError(
            f"{type(rotary).__qualname__} has no string rope_type ({rope_type!r}); "
            f"angles='positions' cannot tell whether its inv_freq is static"
        )
    return rope_type


def _mrope_section(rotary) -> tuple[int, int, int]:
    """The rotary module's section: its own attribute (>= 5.17, and Qwen3-VL), else its
    config's (Qwen2/2.5-VL <= 5.16, whose attention passes the config's to the function)."""
    section = getattr(rotary, "mrope_section", None)
    if section is None:
        parameters = getattr(getattr(rotary, "config", None), "rope_parameters", None) or {}
        section = parameters.get("mrope_section")
    if section is None or len(section) != 3:
        raise UnsupportedLayoutError(
            f"{type(rotary).__qualname__} has no 3-part mrope_section ({section!r})"
        )
    return tuple(int(s) for s in section)


def _rotary_slots(root, arch: _Arch, modeling) -> list[_Slot]:
    """``angles="positions"``: each text rotary module hands positions on, no tables."""
    cls = _class(modeling, arch.text_rotary)
    slots = []
    for name, module in root.named_modules():
        if not isinstance(module, cls):
            continue
        rope_type = _rope_type(module)
        if "dynamic" in rope_type or rope_type == "longrope":
            raise UnsupportedLayoutError(
                f"angles='positions' is not supported with rope_type={rope_type!r}: its "
                f"inv_freq changes during the forward pass; use angles='table'"
            )
        if not isinstance(getattr(module, "inv_freq", None), torch.Tensor):
            raise UnsupportedLayoutError(f"{name} ({cls.__qualname__}) has no inv_freq buffer")
        if _params(type(module).forward) != ["self", "x", "position_ids"]:
            raise UnsupportedLayoutError(
                f"{type(module).__qualname__}.forward does not take (x, position_ids)"
            )
        section = _mrope_section(module)
        where = f"text rotary module {name} ({type(module).__qualname__})"
        slot_name = _forward_slot_name(module, where)
        forward = _positions_rotary_forward(section, arch.interleaved)
        slots.append(_Slot(module, slot_name, types.MethodType(forward, module),
                           label=f"{name}.{slot_name}"))  # fmt: skip
    if not slots:
        raise UnsupportedLayoutError(f"no {cls.__qualname__} found for angles='positions'")
    return slots


def _rope_index_slots(root, arch: _Arch, modeling) -> list[_Slot]:
    cls = _class(modeling, arch.model)
    slots = []
    for name, module in root.named_modules():
        if not isinstance(module, cls):
            continue
        if "get_rope_index" in module.__dict__:
            raise AlreadyPatchedError(
                f"{name or '<root>'}.get_rope_index is already set on the instance (by an "
                f"earlier vlmkernels.patch?)"
            )
        try:
            method = rope_index_method(module)
        except TypeError as exc:  # an overridden or re-signed get_rope_index
            raise UnsupportedLayoutError(f"{name or '<root>'}.get_rope_index: {exc}") from exc
        slots.append(_Slot(module, "get_rope_index", method,
                           label=f"{name or '<root>'}.get_rope_index"))  # fmt: skip
    return slots


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


class PatchHandle:
    """What :func:`patch` returns: :meth:`undo` restores the instance exactly; also a
    context manager (undo on exit)."""

    def __init__(self, model, slots: list[_Slot]):
        self.model = model
        self._slots = slots
        self.active = True

    @property
    def targets(self) -> tuple[str, ...]:
        """``<submodule>.<attribute>`` of each instance attribute set by the patch."""
        return tuple(s.label for s in self._slots)

    def undo(self) -> None:
        """Put back every instance attribute as it was before :func:`patch` (a second call
        does nothing). Raises, changing nothing, if one was overwritten in between."""
        if not self.active:
            return
        changed = [s.label for s in self._slots if not s.intact()]
        if changed:
            raise RuntimeError(
                f"vlmkernels.patch: cannot undo, these attributes were changed after patching: "
                f"{', '.join(changed)}"
            )
        for slot in reversed(self._slots):
            slot.restore()
        self.active = False

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.undo()

    def __repr__(self) -> str:
        state = "active" if self.active else "undone"
        return f"<PatchHandle {type(self.model).__qualname__} {state}: {len(self._slots)} slots>"


def _parts(root, arch: _Arch, modeling, rope: bool, vision: bool, rope_index: bool):
    """Which of the requested parts apply to ``root``'s kind (full model, text model,
    vision tower)."""
    if isinstance(root, tuple(_class(modeling, n) for n in arch.full)):
        return rope, vision, rope_index
    if isinstance(root, _class(modeling, arch.text_model)):
        return rope, False, False
    if isinstance(root, _class(modeling, arch.vision_model)):
        return False, vision, False
    raise UnsupportedModelError(
        f"vlmkernels.patch takes a {', '.join(arch.full)}, {arch.text_model} or "
        f"{arch.vision_model}; got {type(root).__qualname__}"
    )


def patch(model, *, rope: bool = True, vision: bool = True, rope_index: bool = True,
          angles: str = "table") -> PatchHandle:  # fmt: skip
    """Run the rotary path of this transformers Qwen2-VL / Qwen2.5-VL / Qwen3-VL model
    instance on the vlmkernels ops (see the module docstring for what and how).

    Args:
        model: a ``...ForConditionalGeneration`` or ``...Model`` (text, vision and
            ``get_rope_index``), a ``...TextModel`` (text only) or a vision tower.
        rope: text attention rotary -> :func:`vlmkernels.rope` / :func:`vlmkernels.mrope`.
        vision: vision attention rotary -> :func:`vlmkernels.vision_rope`.
        rope_index: ``get_rope_index`` -> ``vlmkernels.ops.rope_index.rope_index_method``.
        angles: ``"table"`` (transformers' cos/sin) or ``"positions"`` (angles computed in
            the kernel from the position ids, no cos/sin tables; needs ``rope``).

    Returns:
        A :class:`PatchHandle`; ``handle.undo()`` restores the instance exactly.

    Raises:
        UnsupportedModelError: not one of the supported model classes.
        UnsupportedLayoutError: the installed transformers does not lay the model out as
            expected (nothing is changed).
        AlreadyPatchedError: the instance is already patched (undo the first handle).
    """
    if angles not in ("table", "positions"):
        raise ValueError(f"angles must be 'table' or 'positions', got {angles!r}")
    if angles == "positions" and not rope:
        raise ValueError("angles='positions' applies to the text rotary path: it needs rope=True")
    arch, modeling = _find_arch(model)
    do_rope, do_vision, do_index = _parts(model, arch, modeling, rope, vision, rope_index)
    slots: list[_Slot] = []
    for wanted, cls_name, functions, label in (
        (do_rope, arch.text_attention, _TEXT_FUNCTIONS, "text attention"),
        (do_vision, arch.vision_attention, _VISION_FUNCTIONS, "vision attention"),
    ):
        if not wanted:
            continue
        found = _forward_slots(model, _class(modeling, cls_name), functions, label)
        if not found:
            raise UnsupportedLayoutError(
                f"no {cls_name} module found in {type(model).__qualname__}"
            )
        slots += found
    if do_rope and angles == "positions":
        slots += _rotary_slots(model, arch, modeling)
    if do_index:
        slots += _rope_index_slots(model, arch, modeling)
    if not slots:
        raise ValueError("vlmkernels.patch: nothing to patch (every part is switched off)")
    for slot in slots:
        slot.install()
    return PatchHandle(model, slots)

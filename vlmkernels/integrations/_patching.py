"""Per-instance patching, independent of any model library.

A patch is a list of :class:`Slot`\\ s: instance attributes (``forward``, ``_old_forward``,
``get_rope_index``...) that :func:`install` sets in the instances' ``__dict__`` and
:meth:`PatchHandle.undo` puts back exactly. Nothing is assigned to a module or a class.

The usual slot value is a method rebuilt by :func:`rebind_global`: the class's own
``forward`` function, on the same code object and closure, over a copy of its module's
globals in which one name (the function it calls, such as ``apply_rotary_pos_emb``) is bound
to a replacement. Decorated functions are followed through ``__wrapped__`` (what
``functools.wraps`` records) down to the function that holds the code; each wrapper is then
rebuilt around the rebuilt function it holds in its closure, so the decorators keep running
(deprecation warnings, renamed keyword arguments, hub-kernel hooks). A wrapper that keeps the
function it wraps anywhere else cannot be rebuilt and raises :class:`UnsupportedLayoutError`.

A rebuilt method is bound with ``types.MethodType`` to its module, so ``copy.deepcopy`` of a
patched model rebinds it to the copy: the copy runs the patched code on its own weights and
holds no reference to the original.
"""

from __future__ import annotations

import dataclasses
import dis
import inspect
import types
from collections.abc import Callable, Iterable

__all__ = [
    "AlreadyPatchedError",
    "MARK",
    "PatchHandle",
    "Slot",
    "UnsupportedLayoutError",
    "UnsupportedModelError",
    "adapt_signature",
    "global_loads",
    "install",
    "is_patched",
    "rebind_global",
    "unwrap",
]

MARK = "__vlmkernels_patched__"  # set on every function a patch installs


class UnsupportedModelError(TypeError):
    """The object is not a model architecture the patch knows."""


class UnsupportedLayoutError(RuntimeError):
    """The installed library lays the model out in a way the patch does not know."""


class AlreadyPatchedError(RuntimeError):
    """The instance (or part of it) is already patched by vlmkernels."""


def is_patched(obj) -> bool:
    """Whether ``obj`` (a function or bound method) was installed by a vlmkernels patch."""
    return bool(getattr(obj, MARK, False))


# --------------------------------------------------------------------------------------
# Reading and rebuilding functions
# --------------------------------------------------------------------------------------


def global_loads(code: types.CodeType) -> set[str]:
    """Names ``code`` (and the code nested in it) loads as globals."""
    names = {
        ins.argval
        for ins in dis.get_instructions(code)
        if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME")
    }
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= global_loads(const)
    return names


def unwrap(fn, where: str) -> list[types.FunctionType]:
    """``[fn, fn.__wrapped__, ...]`` down to the undecorated function; each must be a plain
    Python function."""
    chain = [fn]
    while True:
        if not isinstance(chain[-1], types.FunctionType):
            raise UnsupportedLayoutError(
                f"{where} is {'decorated into ' if len(chain) > 1 else ''}"
                f"{type(chain[-1]).__name__} {chain[-1]!r}, not a plain Python function"
            )
        inner = chain[-1].__dict__.get("__wrapped__")
        if inner is None:
            return chain
        if any(inner is f for f in chain) or len(chain) > 32:
            raise UnsupportedLayoutError(f"{where}: its __wrapped__ chain does not end")
        chain.append(inner)


def _copy_function(fn: types.FunctionType, scope: dict, closure) -> types.FunctionType:
    new = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, closure)
    new.__kwdefaults__ = dict(fn.__kwdefaults__) if fn.__kwdefaults__ else None
    new.__dict__.update(fn.__dict__)
    for attr in ("__qualname__", "__doc__", "__annotations__", "__module__"):
        setattr(new, attr, getattr(fn, attr))
    return new


def _rewrap(wrapper: types.FunctionType, old, new, where: str) -> types.FunctionType:
    """``wrapper`` rebuilt with every closure cell that held ``old`` holding ``new``."""
    cells = wrapper.__closure__ or ()
    hits = [i for i, cell in enumerate(cells) if _cell_holds(cell, old)]
    if not hits:
        raise UnsupportedLayoutError(
            f"{where} is decorated by {wrapper.__module__}.{wrapper.__qualname__}, which does "
            f"not keep the function it wraps in its closure: vlmkernels cannot rebuild it"
        )
    closure = tuple(types.CellType(new) if i in hits else c for i, c in enumerate(cells))
    rebuilt = _copy_function(wrapper, wrapper.__globals__, closure)
    rebuilt.__wrapped__ = new
    return rebuilt


def _cell_holds(cell, value) -> bool:
    try:
        return cell.cell_contents is value
    except ValueError:  # an empty cell
        return False


def rebind_global(fn, name: str, replacement, where: str) -> types.FunctionType:
    """``fn`` (decorators included) running its undecorated code over a copy of its globals
    in which ``name`` is bound to ``replacement``; marked with :data:`MARK`."""
    chain = unwrap(fn, where)
    inner = chain[-1]
    scope = dict(inner.__globals__)
    scope[name] = replacement
    rebuilt = _copy_function(inner, scope, inner.__closure__)
    for wrapper, old in zip(reversed(chain[:-1]), reversed(chain[1:]), strict=True):
        rebuilt = _rewrap(wrapper, old, rebuilt, where)
    setattr(rebuilt, MARK, True)
    return rebuilt


def signature_of(fn) -> inspect.Signature:
    """The call signature of a function, or of an ``nn.Module`` used as one (transformers'
    hub-kernel decorator turns a function into a module instance whose ``forward`` it is)."""
    forward = getattr(fn, "forward", None)
    if not isinstance(fn, types.FunctionType) and callable(forward):
        fn = forward
    return inspect.signature(fn)


def adapt_signature(replacement: Callable, original, where: str) -> Callable:
    """``replacement`` callable as ``original`` is: the same parameters by position; where
    the original names them differently (a renamed argument), keyword calls are renamed.

    Raises :class:`UnsupportedLayoutError` unless both take the same number of
    positional-or-keyword parameters with defaults in the same places.
    """
    try:
        theirs = list(signature_of(original).parameters.values())
    except (TypeError, ValueError) as exc:
        raise UnsupportedLayoutError(f"{where}: {original!r} has no readable signature") from exc
    ours = list(inspect.signature(replacement).parameters.values())
    plain = inspect.Parameter.POSITIONAL_OR_KEYWORD

    def shape(params):
        return [(p.kind, p.default is inspect.Parameter.empty) for p in params]

    if shape(theirs) != shape(ours) or any(p.kind != plain for p in ours):
        raise UnsupportedLayoutError(
            f"{where} is {original!r} with parameters {[p.name for p in theirs]}; the "
            f"vlmkernels replacement takes {[p.name for p in ours]}"
        )
    renamed = {t.name: o.name for t, o in zip(theirs, ours, strict=True) if t.name != o.name}
    if not renamed:
        return replacement

    def adapter(*args, **kwargs):
        if kwargs:
            kwargs = {renamed.get(k, k): v for k, v in kwargs.items()}
        return replacement(*args, **kwargs)

    adapter.__name__ = adapter.__qualname__ = replacement.__name__
    adapter.__doc__ = replacement.__doc__
    adapter.__signature__ = signature_of(original)
    return adapter


# --------------------------------------------------------------------------------------
# Slots and the handle
# --------------------------------------------------------------------------------------

_MISSING = object()


@dataclasses.dataclass
class Slot:
    """One instance attribute: ``owner.__dict__[name]`` set to ``new`` by :func:`install`,
    put back to what it held (or deleted) by :meth:`restore`."""

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


def method_slot(module, name: str, function, label: str) -> Slot:
    """A slot binding ``function`` to ``module`` as its instance attribute ``name``."""
    return Slot(module, name, types.MethodType(function, module), label=label)


class PatchHandle:
    """What a patch returns: :meth:`undo` restores the instance exactly; also a context
    manager (undo on exit)."""

    def __init__(self, model, slots: list[Slot]):
        self.model = model
        self._slots = slots
        self.active = True

    @property
    def targets(self) -> tuple[str, ...]:
        """``<submodule>.<attribute>`` of each instance attribute set by the patch."""
        return tuple(s.label for s in self._slots)

    def undo(self) -> None:
        """Put back every instance attribute as it was before the patch (a second call does
        nothing). Raises, changing nothing, if one was overwritten in between."""
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

    def __deepcopy__(self, memo):
        raise TypeError("a PatchHandle cannot be copied: it undoes the patch of one model instance")

    def __repr__(self) -> str:
        state = "active" if self.active else "undone"
        return f"<PatchHandle {type(self.model).__qualname__} {state}: {len(self._slots)} slots>"


def install(model, slots: Iterable[Slot]) -> PatchHandle:
    slots = list(slots)
    for slot in slots:
        slot.install()
    return PatchHandle(model, slots)

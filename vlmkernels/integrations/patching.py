"""Per-instance patching, independent of any model library: the mechanism, and the engine
(:class:`Patcher`) that applies a table of replacements to a table of architectures.

An integration (``integrations/transformers.py``) is data: :class:`Architecture` entries
(which classes play which role in a model) and replacements (:class:`Rebind`: a function a
forward calls runs a vlmkernels op; :class:`SetMethod`: an instance method built per module).
A new op family adds rows to those tables, not code here.

A patch is a list of :class:`Slot`\\ s: instance attributes (``forward``, ``_old_forward``,
``get_rope_index``...) that :func:`install` sets in the instances' ``__dict__`` and
:meth:`PatchHandle.undo` puts back exactly. Nothing is assigned to a module or a class.

The usual slot value is a method rebuilt by :func:`.rebuild.rebind_global` (see there).

A rebuilt method is bound to its module by a :class:`PatchedMethod`, which behaves as a
bound method but holds its module by a weak reference: a module's ``__dict__`` holding a
method bound to the module itself would be a reference cycle, so ``del model`` would leave
the weights to the cyclic garbage collector instead of freeing them at once, as it does for
an unpatched model. ``copy.deepcopy`` of a patched model rebinds each method to the copy:
the copy runs the patched code on its own weights and holds no reference to the original.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import sys
import threading
import types
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from ..core.runtime import warn
from .bound import MARK, PatchedMethod
from .errors import (
    AlreadyPatchedError,
    UnsupportedLayoutError,
    UnsupportedModelError,
    WrappedLayerError,
)
from .fallback import (
    PatchFallbackWarning,
    changed_part,
    class_forward,
    distinct_names,
    fused_forward,
    global_hooks,
    has_hooks,
    layer_norm_dtypes,
    linear_chain_problem,
    mixed_dtypes,
    not_plain,
    other_device,
    parts_of,
    promoted_norm,
)
from .rebuild import adapt_guarded, adapt_signature, global_loads, rebind_global, unwrap

__all__ = [
    "AlreadyPatchedError",
    "Architecture",
    "MARK",
    "PatchFallbackWarning",
    "PatchHandle",
    "PatchedMethod",
    "Patcher",
    "Rebind",
    "SetMethod",
    "Slot",
    "UnsupportedLayoutError",
    "UnsupportedModelError",
    "WrappedLayerError",
    "adapt_signature",
    "changed_part",
    "class_forward",
    "exact_layer",
    "foreign_source",
    "fused_forward",
    "global_hooks",
    "global_loads",
    "has_hooks",
    "install",
    "is_patched",
    "layer_norm_dtypes",
    "linear_chain_problem",
    "marked",
    "mixed_dtypes",
    "not_plain",
    "other_device",
    "parts_of",
    "patchers",
    "promoted_norm",
    "rebind_global",
    "register",
    "unpatch",
    "unwrap",
]


def exact_layer(layer, cls: type, where: str):
    """``layer`` if it is exactly a ``cls``; else :class:`WrappedLayerError` when it wraps
    or stands in for one (a subclass; a module holding a ``cls``: PEFT's ``base_layer``,
    ``torch.compile``'s ``_orig_mod``, a checkpoint wrapper; a class of the same name from
    another module: a quantised ``Linear``), else :class:`UnsupportedLayoutError`."""
    if type(layer) is cls:
        return layer
    kind, name = distinct_names(type(layer), cls)
    what = f"{where} is {kind}, not {name}"
    holds = isinstance(layer, torch.nn.Module) and any(isinstance(m, cls) for m in layer.modules())
    if holds or isinstance(layer, cls) or type(layer).__name__ == cls.__name__:
        raise WrappedLayerError(f"{what} (a wrapped or replaced layer)")
    raise UnsupportedLayoutError(what)


def is_patched(obj) -> bool:
    """Whether ``obj`` (a function or bound method) was installed by a vlmkernels patch."""
    return bool(getattr(obj, MARK, False))


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

    def restored(self) -> bool:
        """Whether the attribute is back to what it was, or to its equivalent (absent, or
        the class's method bound to the owner): after :func:`unpatch`."""
        current = self.owner.__dict__.get(self.name, _MISSING)
        if current is self.old or current is _MISSING or _inert(self.owner, self.name):
            return True
        return self.name == "_old_forward" and (
            getattr(current, "__func__", None) is type(self.owner).forward
        )

    def restore(self) -> None:
        if self.old is _MISSING:
            del self.owner.__dict__[self.name]
        else:
            self.owner.__dict__[self.name] = self.old

    def moved(self) -> str | None:
        """Where accelerate moved the installed method, if it did: ``_old_forward`` for a
        ``forward`` slot (its ``add_hook_to_module`` after patching keeps the module's
        forward there) or ``forward`` for an ``_old_forward`` slot (its
        ``remove_hook_from_module`` puts ``_old_forward`` back as ``forward`` and deletes
        it); else None."""
        other = _ACCELERATE_PAIR.get(self.name)
        own = self.owner.__dict__
        if other is None or self.intact() or own.get(other) is not self.new:
            return None
        if self.name == "_old_forward" and "_old_forward" in own:
            return None
        return other

    def restore_moved(self, other: str) -> None:
        """Puts back what accelerate would hold in ``other`` had the module not been
        patched: the forward this slot replaced (the class's, bound, where there was none
        in the instance)."""
        if self.old is not _MISSING:
            self.owner.__dict__[other] = self.old
        elif other == "_old_forward":  # accelerate keeps the bound forward it wraps
            self.owner.__dict__[other] = types.MethodType(type(self.owner).forward, self.owner)
        else:
            del self.owner.__dict__[other]


# accelerate moves a module's forward between these two attributes (add / remove its hook)
_ACCELERATE_PAIR = {"forward": "_old_forward", "_old_forward": "forward"}


def _signed_like(function, original):
    """``function`` with ``original``'s signature where it takes only ``(self, *args,
    **kwargs)`` and passes them on: callers that read the method's parameters (transformers'
    ``generate`` looks for ``pixel_values`` in ``get_image_features``) see the real ones."""
    params = list(inspect.signature(function).parameters.values())[1:]
    passes_on = [p.kind for p in params] == [inspect.Parameter.VAR_POSITIONAL,
                                             inspect.Parameter.VAR_KEYWORD]  # fmt: skip
    if passes_on and callable(original):
        try:
            function.__signature__ = inspect.signature(original)
        except (TypeError, ValueError):
            pass  # no readable signature: the caller sees (*args, **kwargs), as before
    return function


def method_slot(module, name: str, function, label: str) -> Slot:
    """A slot binding ``function`` to ``module`` as its instance attribute ``name``."""
    return Slot(module, name, PatchedMethod(function, module), label=label)


class PatchHandle:
    """What a patch returns: :meth:`undo` restores the instance exactly; also a context
    manager (undo on exit)."""

    def __init__(self, model, slots: list[Slot]):
        self.model = model
        self._slots = slots
        self.active = True
        with _ACTIVE_LOCK:
            _ACTIVE.add(self)

    @property
    def targets(self) -> tuple[str, ...]:
        """``<submodule>.<attribute>`` of each instance attribute the patch replaces (not
        the replication that comes with them, :func:`_replicate_patched`)."""
        return tuple(s.label for s in self._slots
                     if getattr(s.new, "__func__", None) is not _replicate_patched)  # fmt: skip

    def undo(self) -> None:
        """Put back every instance attribute as it was before the patch (a second call does
        nothing). Raises, changing nothing, if one was overwritten in between."""
        if not self.active:
            return
        moved = {id(s): s.moved() for s in self._slots}
        changed = [s.label for s in self._slots
                   if not s.intact() and not moved[id(s)] and not s.restored()]  # fmt: skip
        if changed:
            raise RuntimeError(
                f"vlmkernels.patch: cannot undo, these attributes were changed after patching: "
                f"{', '.join(changed)}"
            )
        for slot in reversed(self._slots):
            if slot.intact():  # the others were put back by unpatch()
                slot.restore()
            elif moved[id(slot)]:  # accelerate's hook added or removed since patching
                slot.restore_moved(moved[id(slot)])
        self.active = False
        with _ACTIVE_LOCK:
            _ACTIVE.discard(self)
        self._warn_about_copies()

    def _warn_about_copies(self) -> None:
        """Warns about patched methods left in the model that no active handle installed:
        copies of patched modules made inside it after patching (PEFT's
        ``modules_to_save``, an EMA submodule) carry the patch, which this handle does not
        undo."""
        if not isinstance(self.model, torch.nn.Module):
            return
        with _ACTIVE_LOCK:  # another thread's patch or undo would change the set under us
            owned = {(id(s.owner), s.name) for h in _ACTIVE for s in h._slots}
        left = [f"{where or '<root>'}.{name}"
                for where, module in self.model.named_modules()
                for name, value in vars(module).items()
                if isinstance(value, PatchedMethod) and is_patched(value)
                and (id(module), name) not in owned
                and name != "_replicate_for_data_parallel"]  # fmt: skip
        if left:
            warn(
                f"vlmkernels: undone, but {', '.join(left)} still run patched code: copies of "
                "patched modules made after patching; vlmkernels.unpatch(model) removes them",
                UserWarning,
            )

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.undo()

    def __deepcopy__(self, memo):
        raise TypeError("a PatchHandle cannot be copied: it undoes the patch of one model instance")

    def __repr__(self) -> str:
        state = "active" if self.active else "undone"
        return f"<PatchHandle {type(self.model).__qualname__} {state}: {len(self._slots)} slots>"


# handles not yet undone (whose slots a handle's undo leaves alone); a patch or an undo in
# one thread changes the set while another's undo iterates it ("Set changed size during
# iteration"): both take the lock (patching is not on any per-call path)
_ACTIVE: weakref.WeakSet[PatchHandle] = weakref.WeakSet()
_ACTIVE_LOCK = threading.Lock()


def unpatch(model) -> int:
    """Removes every vlmkernels patch from ``model``'s module tree, with no handle: for a
    deep copy of a patched model (it holds the patched methods bound to itself; the handle
    undoes only its own instance), an unpickled copy (it holds the classes' methods bound
    per instance in their place, which a later change to a class would not reach) and a
    model whose handle is lost. Each such instance method is deleted, so the class's runs
    again (``_old_forward``, which accelerate's hook calls, gets the class's ``forward``
    bound back). Returns the number of attributes restored; 0 on an unpatched model. A
    handle of the same instance then has nothing left to undo."""
    if not isinstance(model, torch.nn.Module) and not hasattr(model, "__dict__"):
        raise TypeError(f"unpatch: model must be an nn.Module, got {type(model).__name__}")
    restored = 0
    for module in model.modules() if isinstance(model, torch.nn.Module) else (model,):
        own = module.__dict__
        for name, value in list(own.items()):
            if isinstance(value, PatchedMethod) and is_patched(value):
                if name == "_old_forward":
                    own[name] = types.MethodType(type(module).forward, module)
                else:
                    del own[name]
            elif name != "_old_forward" and _inert(module, name):
                del own[name]
            else:
                continue
            restored += 1
    return restored


def install(model, slots: Iterable[Slot]) -> PatchHandle:
    """Installs ``slots`` (and, on each module given a method, the replication of
    :func:`_replicate_patched`); the handle undoes them."""
    slots = list(slots)
    owners = {id(s.owner): s for s in slots if isinstance(s.new, PatchedMethod)}
    for first in owners.values():
        module = first.owner
        if isinstance(module, torch.nn.Module):
            name = "_replicate_for_data_parallel"
            label = f"{first.label.rpartition('.')[0]}.{name}"
            slots.append(method_slot(module, name, _replicate_patched, label))
    for slot in slots:
        slot.install()
    return PatchHandle(model, slots)


# --------------------------------------------------------------------------------------
# Patching as data: architectures, replacements, and the engine over them
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Architecture:
    """A model architecture of a library, by the class names in one module.

    Attributes:
        key: its name ("qwen2_vl").
        module: the module holding its classes.
        classes: role -> class name ({"text_attention": "Qwen2VLAttention", ...}).
        roots: class name of a model the patch accepts -> the parts that apply to it (a full
            model gets every part, a vision tower only the vision ones).
        anywhere: the patch also applies to any model whose module tree holds one of
            ``classes`` (every part then applies), e.g. a Q-Former inside a larger model,
            including other classes of the same library module (a Qwen-VL model holding
            its merger) that are not among ``roots``.
        data: architecture facts the replacements read ({"interleaved": True, ...}).
    """

    key: str
    module: str
    classes: Mapping[str, str]
    roots: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    anywhere: bool = False
    data: Mapping[str, Any] = dataclasses.field(default_factory=dict)


# An architecture found in a model: (architecture, its module, the parts that apply)
Match = tuple[Architecture, types.ModuleType, tuple[str, ...]]


@dataclasses.dataclass(frozen=True)
class Rebind:
    """Part ``part``: in every module of the role's class, the forward's call to one of
    ``functions`` (matched by name among the module globals its code loads) runs that
    vlmkernels function instead. ``only(arch)``, if given, limits the replacement to the
    architectures it accepts (one function name with two meanings: Qwen3.5's
    ``apply_rotary_pos_emb`` rotates part of the head, Qwen3-VL's all of it); it raises
    :class:`UnsupportedLayoutError` where it cannot tell."""

    part: str
    role: str
    functions: tuple[Callable, ...]
    only: Callable[[Architecture], bool] | None = None


@dataclasses.dataclass(frozen=True)
class SetMethod:
    """Part ``part``: every module of the role's class gets the instance method ``name``,
    ``build(module, arch)`` (a function taking ``self``; it raises
    :class:`UnsupportedLayoutError` for a module it cannot serve). ``check(cls, arch)``
    validates the class alone for :meth:`Patcher.support` (a string result is reported).
    ``bypasses``: other methods of the class that the original ``name`` calls and the
    replacement computes itself (Idefics3's ``pixel_shuffle``): one overridden in a
    subclass or set on the instance would be dropped, so the module is refused."""

    part: str
    role: str
    name: str
    build: Callable[[Any, Architecture], Callable]
    check: Callable[[type, Architecture], Any] | None = None
    bypasses: tuple[str, ...] = ()


def _serves(replacement, arch: Architecture) -> bool:
    only = getattr(replacement, "only", None)
    return only is None or only(arch)


def plan_forward(cls: type, candidates, library: str) -> types.FunctionType:
    """The forward of ``cls`` (decorators included) calling the vlmkernels replacement of
    the one function of ``candidates`` its code calls, which must be ``library``'s own."""
    where = f"{cls.__module__}.{cls.__qualname__}.forward"
    chain = unwrap(cls.forward, where)
    names = [f.__name__ for f in candidates]
    loads = global_loads(chain[-1].__code__)
    called = [f for f in candidates if f.__name__ in loads]
    if len(called) != 1:
        raise UnsupportedLayoutError(
            f"{where} calls {'none' if not called else 'more than one'} of {', '.join(names)}"
        )
    name = called[0].__name__
    original = chain[-1].__globals__.get(name)
    if not callable(original):
        raise UnsupportedLayoutError(f"{chain[-1].__module__}.{name} is not callable")
    _check_shipped_with(original, chain[-1].__module__, name, library)
    replacement = adapt_guarded(called[0], original, f"{chain[-1].__module__}.{name}")
    return rebind_global(cls.forward, name, replacement, where)


def foreign_source(fn, library: str) -> str | None:
    """The module that defines ``fn`` (a function, through its decorators, or a callable
    object such as transformers' hub-kernel wrapper) when it is not ``library``'s; None
    when it is."""
    target = inspect.unwrap(fn) if isinstance(fn, types.FunctionType) else fn
    source = getattr(target, "__module__", None) or "?"
    return None if source.split(".")[0] == library else source


def _check_shipped_with(original, module: str, name: str, library: str) -> None:
    """Refuses a global ``module.name`` that is not ``library``'s function (a research
    variant, another kernel library's patch put in the library's module, or a function of
    the user's own in a subclass's module): the replacement computes what the library's
    function does, so installing it would silently drop the other one. The library's
    function, decorated or wrapped as a hub-kernel module (whose class takes the module's
    name), passes, and so does a user's subclass calling it."""
    source = foreign_source(original, library)
    if source is not None:
        target = inspect.unwrap(original) if isinstance(original, types.FunctionType) else original
        label = getattr(target, "__qualname__", None) or type(target).__qualname__
        raise UnsupportedLayoutError(
            f"{module}.{name} is {source}.{label}, not the {library} function: the patch "
            "would replace it by the library's semantics; restore the original function or "
            "leave this part out"
        )


def _inert(module, name: str) -> bool:
    """Whether ``module.__dict__[name]`` is the class's own method bound to ``module``, as
    unpickling a patched model leaves each patched method: it behaves as if absent."""
    value = module.__dict__.get(name)
    return (isinstance(value, types.MethodType) and value.__self__ is module
            and value.__func__ is getattr(type(module), name, None))  # fmt: skip


def _set_on_instance(module, methods: tuple[str, ...]) -> str | None:
    """The first of ``methods`` set on ``module`` itself (not the class's, bound), or None."""
    own = module.__dict__
    return next((m for m in methods if m in own and not _inert(module, m)), None)


def _minding(forward, bypasses: tuple[str, ...]):
    """``forward`` (a fused forward computing the methods ``bypasses`` itself) running the
    class's forward instead, with a :class:`PatchFallbackWarning`, while one of them is set
    on the instance (after patching: one set before is refused), as the fused forward would
    drop it silently."""

    @functools.wraps(forward)
    def minding(self, *args, **kwargs):
        method = _set_on_instance(self, bypasses)
        if method is not None:
            return class_forward(self, f"{method} is set on the instance", *args, **kwargs)
        return forward(self, *args, **kwargs)

    return minding


def _slot_name(module, name: str, label: str) -> str:
    """``name``; for ``forward``, ``_old_forward`` where accelerate's hooks own ``forward``
    (their wrapper calls ``module._old_forward``)."""
    own = module.__dict__
    if name != "forward":
        if name in own and not _inert(module, name):
            raise AlreadyPatchedError(
                f"{label}.{name} is already set on the instance (by an earlier patch?)"
            )
        return name
    if is_patched(own.get("forward")) or is_patched(own.get("_old_forward")):
        raise AlreadyPatchedError(
            f"{label} is already patched by vlmkernels: undo that first (handle.undo(), or "
            "vlmkernels.unpatch(model) for a copy of a patched model)"
        )
    if "forward" not in own or _inert(module, "forward"):
        return "forward"
    old = own.get("_old_forward")
    if "_hf_hook" in own and getattr(old, "__func__", None) is type(module).forward:
        return "_old_forward"
    raise UnsupportedLayoutError(
        f"{label} already has an instance-level forward ({own['forward']!r}) that "
        f"vlmkernels does not know how to wrap"
    )


def marked(fn):
    """``fn`` with :data:`MARK` set: a function a patch installs."""
    setattr(fn, MARK, True)
    return fn


@marked
def _replicate_patched(self):
    """``nn.Module._replicate_for_data_parallel`` of a patched module (what
    ``nn.DataParallel`` calls on each module for each device): the class's replica, whose
    copied ``__dict__`` holds the patched methods bound to the original module, gets them
    bound to itself, so each replica runs on its own parameters."""
    replica = type(self)._replicate_for_data_parallel(self)
    for name, value in self.__dict__.items():
        if isinstance(value, PatchedMethod) and value.__self__ is self and is_patched(value):
            replica.__dict__[name] = PatchedMethod(value.__func__, replica)
    return replica


# a bound method pickles as getattr(module, its function's name): the attribute it fills
_replicate_patched.__name__ = _replicate_patched.__qualname__ = "_replicate_for_data_parallel"


class Patcher:
    """Per-instance patches of one library's models from a table of architectures and a
    table of replacements (:class:`Rebind`, :class:`SetMethod`); see :meth:`patch`.

    Args:
        library: its import name ("transformers"), for messages.
        tested: the releases the tests passed on, for messages and reports.
        architectures: the :class:`Architecture` table.
        replacements: what each part replaces, in the order parts are planned.
    """

    def __init__(self, library: str, tested: tuple[str, ...],
                 architectures: tuple[Architecture, ...],
                 replacements: tuple[Rebind | SetMethod, ...]):  # fmt: skip
        self.library = library
        self.tested = tested
        self.architectures = {a.key: a for a in architectures}
        self._by_module = {a.module: a for a in architectures}  # (one per module)
        self.replacements = replacements
        self.parts = tuple(dict.fromkeys(r.part for r in replacements))

    def version(self) -> str:
        module = sys.modules.get(self.library)
        return getattr(module, "__version__", "not installed")

    def match(self, model) -> list[Match] | None:
        """Like :meth:`find`, None where no architecture of this patcher applies."""
        try:
            return self.find(model)
        except UnsupportedModelError:
            return None

    def _anywhere(self, model) -> list[Match]:
        for arch in self.architectures.values():
            module = sys.modules.get(arch.module) if arch.anywhere else None
            if module is None:
                continue
            classes = tuple(c for c in (getattr(module, n, None) for n in arch.classes.values())
                            if isinstance(c, type))  # fmt: skip
            if classes and any(isinstance(sub, classes) for sub in model.modules()):
                return [(arch, module, self.parts)]
        return []

    def _roots_of(self, kind: type) -> list[Match]:
        """The architectures one of whose roots ``kind`` is (by its MRO), with that root's
        parts."""
        found = []
        for cls in kind.__mro__:
            arch = self._by_module.get(getattr(cls, "__module__", None))
            module = sys.modules.get(arch.module) if arch is not None else None
            if module is None:
                continue
            for root, parts in arch.roots.items():
                if getattr(module, root, None) is cls:
                    found.append((arch, module, parts))
        return found

    def _held(self, model) -> list[Match]:
        """Every architecture with a root in ``model``'s tree (``model`` included), each
        with the parts of all its roots there: a wrapper (``peft``'s ``PeftModel``, a
        LightningModule, a task head) gets its models' parts, and one holding a vision
        tower and a text model side by side (GLM-4.6V's ``Glm46VModel``, which builds
        GLM-4V's towers) gets both towers' parts. Else :meth:`_anywhere`'s answer."""
        parts: dict[str, dict[str, None]] = {}
        modules: dict[str, types.ModuleType] = {}
        seen: dict[type, list[Match]] = {}
        for sub in model.modules():
            kind = type(sub)
            if kind not in seen:
                seen[kind] = self._roots_of(kind)
            for arch, module, root_parts in seen[kind]:
                modules[arch.key] = module
                parts.setdefault(arch.key, {}).update(dict.fromkeys(root_parts))
        if not parts:
            return self._anywhere(model)
        return [(self.architectures[key], modules[key], tuple(p for p in self.parts if p in ps))
                for key, ps in parts.items()]  # fmt: skip

    def root(self, model) -> Match | None:
        """(architecture, module, parts) where ``model`` is one of an architecture's roots;
        None where its classes come from no architecture's module (or from one whose
        classes may be held anywhere), or where it is another class of that module holding
        one of its roots (a task head: Qwen3.5's ``ForSequenceClassification`` holds a
        ``Qwen3_5Model``; :meth:`_held` finds it). Raises :class:`UnsupportedModelError`
        for another class of a known architecture's module holding none (a Qwen-VL decoder
        layer, not the model)."""
        for cls in type(model).__mro__:
            arch = self._by_module.get(getattr(cls, "__module__", None))
            if arch is None:
                continue
            module = sys.modules[arch.module]
            for root, parts in arch.roots.items():
                # (a root class the installed transformers lacks is no match, as in _roots_of)
                found = getattr(module, root, None)
                if isinstance(found, type) and isinstance(model, found):
                    return arch, module, parts
            if arch.anywhere:  # another class of that module: the model may hold its classes
                return None
            roots = tuple(c for c in (getattr(module, n, None) for n in arch.roots)
                          if isinstance(c, type))  # fmt: skip
            if hasattr(model, "modules") and any(isinstance(s, roots) for s in model.modules()):
                return None  # a task head of the architecture: its parts are the held root's
            raise UnsupportedModelError(
                f"vlmkernels.patch takes a {', '.join(arch.roots)}; got {type(model).__qualname__}"
            )
        return None

    def find(self, model) -> list[Match]:
        """The architectures of ``model``, each with its module and the parts that apply:
        those of the roots (``Architecture.roots``) it is or holds (:meth:`_held`)."""
        found = self.root(model)
        held = self._held(model) if hasattr(model, "modules") else []
        if found is not None and not any(arch is found[0] for arch, _, _ in held):
            held.insert(0, found)
        if held:
            return held
        names = ", ".join(self.architectures)
        raise UnsupportedModelError(
            f"vlmkernels.patch supports {self.library} models of the architectures {names}; "
            f"got {type(model).__module__}.{type(model).__qualname__}"
        )

    @staticmethod
    def cls(module: types.ModuleType, name: str) -> type:
        found = getattr(module, name, None)
        if not isinstance(found, type):
            raise UnsupportedLayoutError(f"{module.__name__} has no class {name}")
        return found

    def _slots(self, root, arch, module, replacement) -> list[Slot]:
        cls = self.cls(module, arch.classes[replacement.role])
        rebuilt: dict[type, types.FunctionType] = {}
        slots = []
        for name, sub in root.named_modules():
            if not isinstance(sub, cls):
                continue
            label = f"{name or '<root>'} ({type(sub).__qualname__})"
            if isinstance(replacement, Rebind):
                slot = _slot_name(sub, "forward", label)
                kind = type(sub)
                if kind not in rebuilt:
                    rebuilt[kind] = plan_forward(kind, replacement.functions, self.library)
                function = rebuilt[kind]
            else:
                # a subclass's own method would be dropped, not served
                for method in (replacement.name, *replacement.bypasses):
                    if getattr(type(sub), method, None) is not getattr(cls, method, None):
                        raise UnsupportedLayoutError(
                            f"{type(sub).__qualname__} overrides {cls.__qualname__}."
                            f"{method}, which the patch would "
                            f"{'replace' if method == replacement.name else 'bypass'}"
                        )
                method = _set_on_instance(sub, replacement.bypasses)
                if method is not None:
                    raise UnsupportedLayoutError(
                        f"{label}.{method} is set on the instance; the patched "
                        f"{replacement.name} would bypass it"
                    )
                slot = _slot_name(sub, replacement.name, label)
                function = replacement.build(sub, arch)
                if replacement.bypasses and replacement.name == "forward":
                    function = _minding(function, replacement.bypasses)
                function = marked(_signed_like(function, getattr(type(sub), replacement.name)))
            slots.append(method_slot(sub, slot, function, f"{name or '<root>'}.{slot}"))
        if not slots:
            where = type(root).__qualname__
            raise UnsupportedLayoutError(f"no {cls.__qualname__} module in {where}")
        return slots

    def plan(self, model, wanted: set[str],
             found: list[Match]) -> tuple[list, dict[str, Exception], list]:  # fmt: skip
        """(slots, {part: why it cannot be patched}, parts that can) for the parts of
        ``wanted`` that apply to ``model``, over every architecture :meth:`find` found in
        it (``found``; a part that fails for one of them fails); nothing is installed."""
        slots, failures, working = [], {}, []
        for arch, module, applicable in found:
            for part in self.parts:
                if part not in wanted or part not in applicable or part in failures:
                    continue
                try:
                    part_slots = []
                    for replacement in self.replacements:
                        if replacement.part == part and _serves(replacement, arch):
                            part_slots += self._slots(model, arch, module, replacement)
                    slots += part_slots
                    working.append(part)
                except UnsupportedLayoutError as exc:
                    failures[part] = exc
        working = [part for part in dict.fromkeys(working) if part not in failures]
        return slots, failures, working

    def layout_error(self, failures: dict[str, Exception], hint: str) -> UnsupportedLayoutError:
        lines = [f"  {part}: {exc}" for part, exc in failures.items()]
        if all(isinstance(exc, WrappedLayerError) for exc in failures.values()):
            return WrappedLayerError(
                "vlmkernels.patch: layers of this model were wrapped or replaced after it was "
                "built (FSDP's fully_shard on a layer, tensor parallelism, PEFT, "
                "quantisation), and the fused forwards would bypass them:\n"
                + "\n".join(lines)
                + f"\nNothing was changed; {hint}. Wrap whole blocks (or the model) instead "
                "of these layers, or patch before wrapping them: a layer wrapped after "
                "patching runs its own forward (PatchFallbackWarning)."
            )
        return UnsupportedLayoutError(
            f"vlmkernels.patch does not recognise this {self.library} layout "
            f"({self.library} {self.version()}; tested with {', '.join(self.tested)}):\n"
            + "\n".join(lines)
            + f"\nNothing was changed; {hint}."
        )

    def support(self) -> dict[str, dict[str, str]]:
        """What patches with the installed library, from the classes alone: ``{arch: {part:
        "ok" (or what the check reports) or why it is refused}}``."""
        report = {}
        for arch in self.architectures.values():
            try:
                module = importlib.import_module(arch.module)
            except ImportError as exc:
                report[arch.key] = {"import": f"not importable: {exc}"}
                continue
            parts = {}
            offered = {part for parts_of_root in arch.roots.values() for part in parts_of_root}
            for replacement in self.replacements:
                if not arch.anywhere and replacement.part not in offered:
                    continue  # no root of the architecture takes this part
                try:
                    if not _serves(replacement, arch):
                        continue
                    cls = self.cls(module, arch.classes[replacement.role])
                    if isinstance(replacement, Rebind):
                        result = plan_forward(cls, replacement.functions, self.library)
                    else:
                        result = replacement.check(cls, arch) if replacement.check else None
                    text = result if isinstance(result, str) else "ok"
                except (UnsupportedLayoutError, TypeError) as exc:
                    text = str(exc)
                if not parts.get(replacement.part, "ok").startswith("ok"):
                    continue  # the part's first refusal stands
                parts[replacement.part] = text
            report[arch.key] = parts
        return report


_PATCHERS: list[Patcher] = []


def register(patcher: Patcher) -> Patcher:
    """Adds a table module's :class:`Patcher` to those :func:`patchers` returns (the public
    ``patch`` applies every registered one that matches the model)."""
    _PATCHERS[:] = [p for p in _PATCHERS if p.architectures.keys() != patcher.architectures.keys()]
    _PATCHERS.append(patcher)
    return patcher


def patchers() -> tuple[Patcher, ...]:
    return tuple(_PATCHERS)

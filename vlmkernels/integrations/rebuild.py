"""Reading and rebuilding the functions a patch replaces.

The usual slot value is a method rebuilt by :func:`rebind_global`: the class's own
``forward`` function, on the same code object and closure, over a copy of its module's
globals in which one name (the function it calls, such as ``apply_rotary_pos_emb``) is bound
to a replacement. Decorated functions are followed through ``__wrapped__`` (what
``functools.wraps`` records) down to the function that holds the code; each wrapper is then
rebuilt around the rebuilt function it holds in its closure, so the decorators keep running
(deprecation warnings, renamed keyword arguments, hub-kernel hooks). A wrapper that keeps the
function it wraps anywhere else cannot be rebuilt and raises :class:`UnsupportedLayoutError`.
"""

from __future__ import annotations

import dis
import inspect
import types
from collections.abc import Callable

from .bound import MARK
from .errors import UnsupportedLayoutError
from .fallback import original_function

__all__ = [
    "adapt_guarded",
    "adapt_signature",
    "global_loads",
    "rebind_global",
    "signature_of",
    "unwrap",
]


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
    # without a module name: torch.compile then guards the globals through this dict, not
    # through the module that name imports (whose ``name`` is the original; guarding that
    # one crashed where it is transformers' hub-kernel Func). Relative imports inside the
    # function still resolve through __package__ / __spec__.
    scope.pop("__name__", None)
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
            f"{where} takes the parameters {[p.name for p in theirs]}; the vlmkernels "
            f"replacement takes {[p.name for p in ours]}"
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


def adapt_guarded(replacement: Callable, original, where: str) -> Callable:
    """:func:`adapt_signature` of ``replacement``, guarded by
    :func:`.fallback.original_function`: the calls the fused path does not answer as
    ``original`` does run ``original``. Its ``route`` and ``fused_only`` are
    ``replacement``'s attributes of those names (if set); ``route`` takes the
    replacement's parameters and is adapted alike."""

    def adapt(function):
        return None if function is None else adapt_signature(function, original, where)

    return original_function(adapt(replacement), original, where,
                             adapt(getattr(replacement, "route", None)),
                             getattr(replacement, "fused_only", None))  # fmt: skip

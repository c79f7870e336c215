"""The bound method a patch installs: :class:`PatchedMethod`, and :data:`MARK`, which
flags every function a patch installs."""

from __future__ import annotations

import copy
import inspect
import types
import weakref

MARK = "__vlmkernels_patched__"  # set on every function a patch installs

# (__code__ as a bound method gives it: torch.export's non-strict trace reads
# module.forward.__code__ for its shape environment)
_FUNCTION_DUNDERS = frozenset(
    {MARK, "__name__", "__qualname__", "__doc__", "__module__", "__wrapped__", "__code__"}
)


class PatchedMethod:
    """``function`` bound to ``module`` as ``types.MethodType`` binds it (``__func__``,
    ``__self__``, the function's attributes and signature less its first parameter), but
    holding the module by a weak reference, so that the module's ``__dict__`` does not make
    a reference cycle through it. ``copy.deepcopy`` binds the copy to the module's copy; a
    pickle holds the class's method in its place, as a pickled bound method does."""

    __slots__ = ("__func__", "_module", "__weakref__")

    def __new__(cls, function, module):
        # of a subclass per patched module class: see _bound_class
        return object.__new__(_bound_class(type(module)) if cls is PatchedMethod else cls)

    def __init__(self, function, module):
        self.__func__ = function
        self._module = weakref.ref(module)

    @property
    def __self__(self):
        return self._module()

    def __call__(self, *args, **kwargs):
        module = self._module()
        if module is None:  # kept past its module's lifetime (a bound method would keep it)
            raise ReferenceError(
                f"vlmkernels: {self.__func__.__qualname__} was patched into a module that no "
                "longer exists; call the method through a live module"
            )
        return self.__func__(module, *args, **kwargs)

    def __getattr__(self, name: str):
        # the function's attributes (its name, MARK, ...), not the protocol's dunders
        if name in PatchedMethod.__slots__ or (
            name.startswith("__") and name not in _FUNCTION_DUNDERS
        ):
            raise AttributeError(name)
        return getattr(self.__func__, name)

    @property
    def __signature__(self) -> inspect.Signature:
        signature = inspect.signature(self.__func__)
        return signature.replace(parameters=list(signature.parameters.values())[1:])

    def __deepcopy__(self, memo):
        return PatchedMethod(self.__func__, copy.deepcopy(self.__self__, memo))

    def __reduce__(self):
        return getattr, (self.__self__, self.__func__.__name__)

    def __repr__(self) -> str:
        return f"<vlmkernels patched method {self.__func__.__qualname__} of {self.__self__!r}>"


# module class -> its PatchedMethod subclass
_BOUND_CLASSES: weakref.WeakKeyDictionary[type, type] = weakref.WeakKeyDictionary()


def _bound_class(kind: type) -> type:
    """The :class:`PatchedMethod` subclass for modules of class ``kind``: its ``__call__`` is
    ``PatchedMethod.__call__`` on a code object of its own. ``torch.compile`` of a patched
    module starts at that frame and keeps its compiled entries on the frame's code object:
    one shared code object put every patched class's entries in one cache, and a process
    compiling more than ``recompile_limit`` (8) patched modules of different classes
    separately failed (``fullgraph=True``) or silently ran the rest eagerly."""
    found = _BOUND_CLASSES.get(kind)
    if found is None:
        call = PatchedMethod.__call__
        code = call.__code__.replace(co_qualname=f"PatchedMethod.__call__[{kind.__qualname__}]")
        own_call = types.FunctionType(code, call.__globals__, "__call__")
        own_call.__qualname__ = call.__qualname__
        found = type("PatchedMethod", (PatchedMethod,), {"__slots__": (), "__call__": own_call,
                                                         "__module__": __name__})  # fmt: skip
        _BOUND_CLASSES[kind] = found
    return found

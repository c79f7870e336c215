"""The bound method a patch installs: :class:`PatchedMethod`, and :data:`MARK`, which
flags every function a patch installs."""

from __future__ import annotations

import copy
import inspect
import weakref

MARK = "__vlmkernels_patched__"  # set on every function a patch installs

_FUNCTION_DUNDERS = frozenset(
    {MARK, "__name__", "__qualname__", "__doc__", "__module__", "__wrapped__"}
)


class PatchedMethod:
    """``function`` bound to ``module`` as ``types.MethodType`` binds it (``__func__``,
    ``__self__``, the function's attributes and signature less its first parameter), but
    holding the module by a weak reference, so that the module's ``__dict__`` does not make
    a reference cycle through it. ``copy.deepcopy`` binds the copy to the module's copy; a
    pickle holds the class's method in its place, as a pickled bound method does."""

    __slots__ = ("__func__", "_module", "__weakref__")

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

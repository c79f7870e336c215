"""What a fused forward checks on every call, and what it does when a check fails.

A patched module whose forward reads the parameters of its submodules instead of calling
them (a fused attention block, a fused connector) would silently bypass anything done to
those submodules after patching: a PEFT LoRA wrapper or a quantised linear put in their
place, a hook of their own, a hook registered for every module. :func:`fused_forward`
guards such a forward: where :func:`changed_part` finds a difference, the module runs its
class's own forward (:func:`class_forward`) with a :class:`PatchFallbackWarning`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Mapping

import torch
from torch._subclasses.fake_tensor import FakeTensor

from ..core.hooks import global_hooks, has_hooks
from ..core.runtime import autocast_dtype, tracing, warn

__all__ = [
    "PatchFallbackWarning",
    "changed_part",
    "class_forward",
    "distinct_names",
    "fused_forward",
    "global_hooks",
    "has_hooks",
    "layer_norm_dtypes",
    "linear_chain_problem",
    "mixed_dtypes",
    "not_plain",
    "original_function",
    "other_device",
    "parts_of",
    "promoted_norm",
    "settings",
]


class PatchFallbackWarning(UserWarning):
    """A patched module ran its class's own forward: a layer its fused forward reads the
    parameters of was replaced or hooked after patching (see :func:`changed_part`)."""


def distinct_names(a: type, b: type) -> tuple[str, str]:
    """The names of classes ``a`` and ``b`` in messages (``nn.Linear`` for torch's), each
    with its module where the two would read the same (PEFT's ``lora.Linear`` in place
    of an ``nn.Linear``)."""

    def name(c: type, full: bool) -> str:
        if c.__module__.startswith("torch.nn.modules."):
            return f"{'torch.nn' if full else 'nn'}.{c.__qualname__}"
        return f"{c.__module__}.{c.__qualname__}" if full else c.__qualname__

    full = a.__qualname__ == b.__qualname__
    return name(a, full), name(b, full)


def settings(layer) -> tuple:
    """What a fused forward takes as given about a layer besides its class, as one tuple:
    which of its parameters exist (a LayerNorm made without bias or affine, a Linear
    without bias: the same class), a GELU's approximation and the names of its submodules
    (an nn.Sequential grown or shrunk: the same class). Cheap: it runs on every
    call of a guarded forward."""
    present = tuple(n for n, p in _parameters(layer).items() if p is not None)
    # its submodules by name: a container the fused forward reads (a merger's nn.Sequential
    # MLP) grown after patching holds layers the fused forward would silently skip
    return present, layer.__dict__.get("approximate"), tuple(layer._modules)


# the dtypes autocast casts a matmul's operands from (not float64, not integers)
_AUTOCAST_FROM = frozenset({torch.float32, torch.float16, torch.bfloat16})
_HALF = (torch.float16, torch.bfloat16)


def mixed_dtypes(x: torch.Tensor, weight: torch.Tensor, what: str) -> str | None:
    """Why transformers' matmul (or norm) of features ``x`` with ``weight`` (named ``what``)
    raises on their types, or None: ``x`` not a tensor, two dtypes outside autocast, or
    under it two it does not cast to one (float64, integers). A fused forward runs the
    class's forward then, so the error is transformers' own (the fused ops would raise
    theirs)."""
    if not isinstance(x, torch.Tensor):
        return f"the features are a {type(x).__name__}, not a tensor"
    a, b = x.dtype, weight.dtype
    if a == b or (autocast_dtype(x) is not None and {a, b} <= _AUTOCAST_FROM):
        return None
    return f"the features are {a} and {what} {b}"


def layer_norm_dtypes(x: torch.Tensor, norm, what: str) -> str | None:
    """Why torch's ``layer_norm`` of features ``x`` with the parameters of ``norm`` (named
    ``what``) raises on their dtypes, or None. It takes parameters of x's dtype, or fp32
    ones with 16-bit features; CUDA's autocast runs it in fp32 (float64 is not cast), CPU's
    leaves it as it is. The fused norm prologue reads parameters of any float dtype, so a
    fused forward runs the class's forward then, for torch's error."""
    autocast = x.is_cuda and autocast_dtype(x) is not None
    for p in (norm.weight, getattr(norm, "bias", None)):
        if p is None or p.dtype == x.dtype:
            continue
        if autocast:
            accepted = torch.float64 not in (x.dtype, p.dtype)
        else:
            accepted = x.dtype in _HALF and p.dtype == torch.float32
        if not accepted:
            return f"the features are {x.dtype} and {what}'s parameters {p.dtype}"
    return None


def promoted_norm(x: torch.Tensor, weight: torch.Tensor, what: str) -> str | None:
    """Why the result of a Llama-style RMSNorm (``weight * x.to(input_dtype)``) of features
    ``x`` with ``weight`` (named ``what``) is not in x's dtype, or None: outside autocast
    the product promotes (an fp32 norm in a bf16 module gives fp32, which the next linear
    refuses; a bf16 norm on fp32 features keeps fp32, as the fused norm does). Under
    autocast the next matmul casts the result back. A fused forward runs the class's
    forward then, for transformers' result or error."""
    if autocast_dtype(x) is not None or torch.promote_types(x.dtype, weight.dtype) == x.dtype:
        return None
    return f"{x.dtype} features and a {weight.dtype} {what} (its result is promoted)"


def other_device(x: torch.Tensor, weight: torch.Tensor, what: str) -> str | None:
    """Why features ``x`` and ``weight`` (named ``what``) are on two devices, or None:
    transformers' layer raises its RuntimeError (a model on the GPU, features left on the
    CPU), the fused ops their TypeError or ValueError. A fused forward runs the class's
    forward then."""
    if isinstance(x, torch.Tensor) and x.device != weight.device:
        return f"the features are on {x.device} and {what} on {weight.device}"
    return None


def linear_chain_problem(width: int, layers) -> str | None:
    """Why the linear layers ``layers``, ``(name, weight, bias)`` in turn, which a fused
    forward reads on features of ``width`` channels, are not the chain of shapes
    transformers' own Linear calls compute as the fused ops do, or None: a weight that is
    not (N, ``width``) (each layer taking the last one's N) or a bias that is not (N,)
    (transformers raises its own error, or broadcasts a bias of one element). A fused
    forward runs the class's forward then, for transformers' result or error. (Their
    devices and dtypes: the guard's, :func:`fused_forward`.)"""
    for name, weight, bias in layers:
        if (weight.dim() != 2 or weight.shape[1] != width
                or (bias is not None and tuple(bias.shape) != (weight.shape[0],))):  # fmt: skip
            bias_shape = None if bias is None else tuple(bias.shape)
            return (f"{name}'s weight {tuple(weight.shape)} and bias {bias_shape} do not take "
                    f"{width} features")  # fmt: skip
        width = weight.shape[0]
    return None


def parts_of(module, names: Iterable[str]) -> dict[str, tuple[type, tuple]]:
    """{dotted name: (class, :func:`settings`)} of the submodules whose parameters a fused
    forward reads instead of calling them: what :func:`changed_part` checks on every call."""
    return {name: (type(layer), settings(layer))
            for name, layer in ((n, module.get_submodule(n)) for n in names)}  # fmt: skip


def changed_part(module, parts: Mapping[str, tuple[type, tuple | None]]) -> str | None:
    """None while each submodule of ``parts`` (:func:`parts_of`) is still of the class the
    patch checked, with the same :func:`settings` (unless those are None: not checked), and
    has no hooks of its own, and no module hook is registered for every module
    (:func:`global_hooks`); else the first difference, in words. A fused forward reads those
    layers' parameters: a layer replaced after patching (a PEFT LoRA wrapper, a quantised
    linear, whose ``weight`` may still be the base one, or a GELU made tanh, a LayerNorm
    made without bias: the same class) or hooked would be bypassed or misread silently,
    so the forward runs the class's own instead (:func:`class_forward`)."""
    if (hooked := global_hooks()) is not None:
        return hooked
    for name, (cls, was) in parts.items():
        sub = _submodule(module, name)
        if type(sub) is not cls:
            now, was = distinct_names(type(sub), cls)
            return f"{name} is now {now}, not {was}"
        if has_hooks(sub):
            return f"{name} has hooks of its own"
        if "forward" in sub.__dict__:
            return f"{name} has a forward of its own"
        if was is not None and (now := settings(sub)) != was:
            return f"{name} changed since patching: {_difference(now, was)}"
        for key, p in _parameters(sub).items():
            if (why := not_plain(f"{name}.{key}", p)) is not None:
                return why
    return None


def _submodule(module, name: str):
    """``module.get_submodule(name)``, or None where it has no such submodule, by dict
    lookups (this runs on every call of a fused forward; ``get_submodule`` costs several
    microseconds a name)."""
    for key in name.split("."):
        module = module._modules.get(key)
        if module is None:
            return None
    return module


def not_plain(name: str, weight) -> str | None:
    """Why ``weight`` (named ``name``), which a fused forward reads, is not a plain tensor,
    or None: a tensor subclass (torchao's quantised weights, NF4) computes its products its
    own way, where the fused kernels would read its storage."""
    if weight is not None and type(weight) not in _PLAIN:
        return f"{name} is a {type(weight).__qualname__}, not a plain tensor"
    return None


# FakeTensor: a plain tensor's stand-in while torch.export traces (its weights too); the
# fused ops have fakes, so the exported program holds them
_PLAIN = (torch.nn.Parameter, torch.Tensor, FakeTensor)


def _parameters(layer) -> dict:
    """The layer's parameters by name. An ``nn.DataParallel`` replica has none of its own:
    replicate sets each device's copy as a plain attribute and records it in
    ``_former_parameters``, which the fused forwards read as they read parameters."""
    if layer.__dict__.get("_is_replica", False):
        return layer.__dict__.get("_former_parameters") or {}
    return layer._parameters


def _difference(now: tuple, was: tuple) -> str:
    (params_now, approximate_now, subs_now), (params_was, approximate_was, subs_was) = now, was
    if subs_now != subs_was:
        return (f"submodules ({', '.join(subs_now) or 'none'}), patched with "
                f"({', '.join(subs_was) or 'none'})")  # fmt: skip
    if approximate_now != approximate_was:
        return f"approximate={approximate_now!r}, patched with {approximate_was!r}"
    return (f"parameters ({', '.join(params_now) or 'none'}), patched with "
            f"({', '.join(params_was) or 'none'})")  # fmt: skip


def class_forward(module, why: str, *args, **kwargs):
    """``type(module).forward(module, ...)`` with a :class:`PatchFallbackWarning` saying why
    the fused forward does not run (shown once per module class and reason; not while
    torch.compile traces: Dynamo cannot trace ``warnings.warn``, and a graph break there
    would fail ``fullgraph=True`` where the unpatched model compiles)."""
    if not tracing():
        warn(f"vlmkernels: {type(module).__qualname__} runs its class's forward, not the fused "
             f"one: {why}", PatchFallbackWarning)  # fmt: skip
    return type(module).forward(module, *args, **kwargs)


def original_function(replacement: Callable, original: Callable, where: str,
                      route: Callable | None = None,
                      fused_only: type | None = None) -> Callable:  # fmt: skip
    """``replacement`` (a vlmkernels function a patched forward calls in place of the
    library's ``original``, named ``where``) running ``original`` instead, with a
    :class:`PatchFallbackWarning`, where the fused path would not give the original's
    result or error: where ``route(*args, **kwargs)`` names a reason (a call the original
    answers otherwise than the fused ops would: a bool q that its ``-x`` refuses, tables it
    broadcasts along another axis), and where the replacement raises (the fused ops check
    their arguments and raise their own errors; the original then gives its own result or
    error, e.g. torch's RuntimeError for tables that do not broadcast), unless an argument
    is a ``fused_only`` (a type only the replacement takes: the positions that
    ``angles="positions"`` hands on instead of tables). ``route`` takes the replacement's
    arguments. While torch.compile traces, ``route`` still decides (no warning); an error
    is not retried there (the fused ops raise theirs before tracing anything, and Dynamo
    would trace the original's too)."""

    @functools.wraps(replacement)
    def guarded(*args, **kwargs):
        if tracing():
            if route is not None and route(*args, **kwargs) is not None:
                return original(*args, **kwargs)
            return replacement(*args, **kwargs)
        try:  # (a call the predicate cannot take, e.g. a missing argument, raises here too)
            why = None if route is None else route(*args, **kwargs)
            if why is None:
                return replacement(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the original gives its own answer
            if fused_only is not None and any(
                isinstance(a, fused_only) for a in (*args, *kwargs.values())
            ):
                raise
            why = f"it raised {type(exc).__name__}: {str(exc).partition(chr(10))[0]}"
        warn(f"vlmkernels: {where} runs the original function, not the fused one: {why}",
             PatchFallbackWarning)  # fmt: skip
        return original(*args, **kwargs)

    return guarded


# the layers whose parameters' devices and dtypes torch checks against their input's
_TYPED = (torch.nn.Linear, torch.nn.modules.conv._ConvNd, torch.nn.LayerNorm)


def _dtype_problem(module, x: torch.Tensor, typed) -> str | None:
    """Why torch refuses the features ``x`` with the parameters of the ``typed`` layers of
    ``module`` ((name, is a LayerNorm) pairs), or None (see :func:`fused_forward`)."""
    dtype, device = x.dtype, x.device
    for name, is_norm in typed:
        layer = _submodule(module, name)
        own = _parameters(layer)
        weight, bias = own.get("weight"), own.get("bias")
        if all(t is None or (t.dtype == dtype and t.device == device) for t in (weight, bias)):
            continue  # (the usual call: nothing to check, at a few attribute reads)
        for t in (weight, bias):
            if t is not None and (why := other_device(x, t, name)) is not None:
                return why
        if is_norm:
            why = layer_norm_dtypes(x, layer, name)
        elif weight is not None:
            why = mixed_dtypes(x, weight, name)
            if (why is None and bias is not None and bias.dtype != weight.dtype
                    and autocast_dtype(x) is None):  # fmt: skip
                why = f"{name}'s bias is {bias.dtype} and its weight {weight.dtype}"
        if why is not None:
            return why
    return None


def fused_forward(module, reads: Iterable[str], forward: Callable) -> Callable:
    """``forward`` (an instance forward built for ``module``) guarded for the submodules
    ``reads`` whose parameters it reads instead of calling them: each call checks them
    (:func:`changed_part`) and runs the class's forward instead where one changed
    (:func:`class_forward`). The guard carries them as ``parts``.

    The linears, convolutions and LayerNorms among them compute on tensors of the device
    and dtype of the forward's first argument (the features): where torch refuses those
    with their parameters (:func:`other_device`, :func:`mixed_dtypes`, a bias of another
    dtype than its weight outside autocast, :func:`layer_norm_dtypes`), or the features
    are not a tensor, the class's forward runs too, for torch's error (the fused ops,
    which read any float parameters or raise their own TypeError, would not give it)."""
    parts = parts_of(module, reads)
    typed = tuple((name, issubclass(cls, torch.nn.LayerNorm))
                  for name, (cls, _) in parts.items() if issubclass(cls, _TYPED))  # fmt: skip
    # the features' name in the class's forward (self, features, ...)
    first = (*inspect.signature(type(module).forward).parameters, None, None)[1]

    @functools.wraps(forward)
    def guarded(self, *args, **kwargs):
        why = changed_part(self, parts)
        if why is None and typed:
            x = args[0] if args else kwargs.get(first)
            if x is not None and not isinstance(x, torch.Tensor):
                why = f"the features are a {type(x).__name__}, not a tensor"
            elif x is not None:
                why = _dtype_problem(self, x, typed)
        if why is not None:
            return class_forward(self, why, *args, **kwargs)
        return forward(self, *args, **kwargs)

    guarded.parts = parts
    return guarded

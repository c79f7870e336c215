"""One way to define a vlmkernels op: the schema once, an implementation per backend, the
fake, the backward, in one declaration.

>>> scale = Op("scale_rows", "(Tensor x, Tensor w, float alpha) -> Tensor", family="demo")
>>> @scale.fake
... def _(x, w, alpha):
...     return torch.empty_like(x)
>>> @scale.impl("torch")
... def _(x, w, alpha):
...     return x * w[:, None] * alpha
>>> @scale.autograd
... class _:
...     def setup_context(ctx, inputs, output):
...         ctx.save_for_backward(inputs[1])
...         ctx.alpha = inputs[2]
...     def backward(ctx, grad):
...         (w,) = ctx.saved_tensors
...         return scale(grad, w, ctx.alpha), None, None
>>> y = scale(x, w, 2.0)

Registration: the op is ``torch.ops.vlmkernels.<name>`` (``torch.library.custom_op`` with the
given schema, its fake and its autograd formula), so ``opcheck`` and
``torch.compile(fullgraph=True)`` see one opaque op with a fake.

Calls. ``op(*args)`` picks the implementation of the backend :func:`resolve_backend` chooses
for the op's family and the first tensor argument. In plain eager mode it calls that
implementation directly (through an ``autograd.Function`` sharing the op's
``setup_context`` and ``backward`` when a gradient may be needed), skipping the dispatcher:
about 2-4 us of host time instead of 10-15. Whenever the dispatcher matters it goes through
``torch.ops.vlmkernels.<name>`` instead: under ``torch.compile`` and ``torch.export``, with
tensor subclasses or Python dispatch / function modes active (fake tensors,
functionalization, FlopCounterMode, DTensor), functorch transforms, or while the autograd
profiler records (so traces name the op). Both paths run the same functions and give the
same results. ``torch.jit.trace``, which would freeze shapes and launch arguments as
constants, is refused; forward-mode AD too (no formulas).

Implementations take the schema's arguments positionally and return what the schema says.
A backend without an implementation raises, naming the op and the backends it has.

Compile caches. PyTorch keys its compiled-graph caches (AOTAutograd's, Inductor's) on the
traced graph, which names a custom op but not its autograd formula or its fake
(pytorch/pytorch#144344, #160472): after a vlmkernels upgrade that changes either, a warm
cache would replay the old backward (an error, or wrong gradients). So each op's schema
ends with ``int revision=0``, which its functions ignore; calls through the dispatcher
pass :data:`REVISION`, a fingerprint of vlmkernels' sources, which the traced graph then
holds as a constant: another vlmkernels, another cache key. A direct
``torch.ops.vlmkernels.<name>(...)`` call may leave it out.
"""

from __future__ import annotations

import functools
import hashlib
import pathlib
from collections.abc import Callable

import torch
from torch.autograd import forward_ad

from .backend import resolve_backend
from .checks import refuse_jit_trace
from .runtime import contiguous_vectors, tracing
from .version import __version__

__all__ = ["Op", "as_saved", "first_order_only"]

_OPS: dict[str, Op] = {}

_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_profiler_enabled = torch._C._autograd._profiler_enabled
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None) or (
    lambda: torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")
)
_dispatch_modes = torch._C._len_torch_dispatch_stack
_function_modes = torch._C._is_torch_function_mode_enabled
_functorch = torch._C._are_functorch_transforms_active
_jit_tracing = torch._C._get_tracing_state
_interpreters = torch._C._functorch.get_interpreter_stack
_legacy_batched = torch._C._functorch.is_legacy_batchedtensor
_JVP = torch._C._functorch.TransformType.Jvp
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _refuse_forward_mode(op: str, args, tensor_positions) -> None:
    """Forward-mode AD has no formula in vlmkernels: raise rather than let a tangent come
    out 0 (``torch.func.jvp`` through a custom op) or go missing (a dual tensor of
    ``torch.autograd.forward_ad``). Only called while a transform or a dual level is active."""
    jvp = any(i.key() == _JVP for i in _interpreters() or ())
    dual = forward_ad._current_level >= 0 and any(
        args[i] is not None and forward_ad.unpack_dual(args[i]).tangent is not None
        for i in tensor_positions
    )
    if jvp or dual:
        raise NotImplementedError(
            f"{op}: forward-mode AD (torch.func.jvp, jacfwd, hessian, "
            "torch.autograd.forward_ad) is not implemented; use reverse mode "
            "(torch.autograd.grad, torch.autograd.functional.jacobian)"
        )


def _refuse_batched_grads(op: str, grads) -> None:
    """Batched upstream gradients (``torch.autograd.grad(is_grads_batched=True)``,
    ``torch.autograd.functional.jacobian(vectorize=True)``) reach the kernels as tensors
    without storage: refused by name before any launch. Not looked at while a graph is
    traced (compiled autograd would break its graph there), where no such tensor comes."""
    if tracing():
        return
    for g in grads:  # (a loop: any() over a generator costs a call per gradient)
        if g is not None and _legacy_batched(g):
            raise NotImplementedError(
                f"{op}: batched gradients (is_grads_batched=True, jacobian(vectorize=True)) "
                "are not supported by its backward; take one gradient at a time "
                "(vectorize=False)"
            )


def _without_autocast(fn: Callable, *args):
    with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
        return fn(*args)


def without_autocast(fn: Callable) -> Callable:
    """``fn`` run with autocast off, for an autograd Function's ``forward`` or ``backward``
    whose inputs are already in the dtypes autocast would choose (the entry point cast
    them): its products, outside the op dispatch that turns autocast off, would otherwise
    run in 16 bits behind its back."""

    @functools.wraps(fn)
    def run(*args):
        return _without_autocast(fn, *args)

    return run


def _fingerprint() -> int:
    """A 48-bit hash of the vlmkernels version and the source of its Python modules (a few
    ms, once per process, at import)."""
    digest = hashlib.blake2b(__version__.encode(), digest_size=6)
    root = pathlib.Path(__file__).resolve().parent.parent
    try:
        for path in sorted(root.rglob("*.py")):
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(path.read_bytes())
    except OSError:  # sources not readable as files: the version alone
        pass
    return int.from_bytes(digest.digest(), "little")


# The revision argument dispatcher calls pass (see the module docstring)
REVISION = _fingerprint()


class Op:
    """A ``vlmkernels::<name>`` op (see the module docstring).

    Args:
        name: the op's name in the ``vlmkernels`` namespace.
        schema: its schema without the name, e.g. ``"(Tensor x, int n) -> Tensor"``.
        family: the op family whose backend choice applies (``resolve_backend(family, t)``).
        mutates: names of the tensor arguments written in place.
    """

    def __init__(self, name: str, schema: str, *, family: str, mutates: tuple[str, ...] = ()):
        if name in _OPS:
            raise ValueError(f"vlmkernels::{name} is defined twice")
        self.name = name
        self.qualname = f"vlmkernels::{name}"
        self.schema = schema
        self.family = family
        self.mutates = tuple(mutates)
        self._impls: dict[str, Callable] = {}
        self._function: type[torch.autograd.Function] | None = None
        self._apply: Callable | None = None  # the C++ Function.apply of _function
        self._tensor_positions: tuple[int, ...] = _tensor_positions(schema)
        # the names of the schema's arguments, without the revision
        self._names = tuple(a.split()[-1].split("=")[0] for a in _argument_list(schema))
        self._arity = len(self._names)
        # the dispatcher bumps the version counters of mutated tensors (ADInplaceOrView);
        # the eager path skips it and bumps them itself
        self._mutated_positions = tuple(
            i for i, name in enumerate(self._names) if name in self.mutates
        )
        self._custom = torch.library.custom_op(
            self.qualname, self._dispatch, mutates_args=self.mutates, schema=_revised(schema)
        )
        self.overload = getattr(torch.ops.vlmkernels, name).default
        _OPS[name] = self

    # ---------------------------------------------------------------- declaration

    def impl(self, backend: str):
        """Decorator: the implementation for ``backend`` ("torch", "triton", "cuda")."""

        def register(fn: Callable) -> Callable:
            self._impls[backend] = fn
            return fn

        return register

    def fake(self, fn: Callable) -> Callable:
        """Decorator: the fake (meta) implementation, shapes and dtypes only."""
        arity = self._arity
        self._custom.register_fake(lambda *args: fn(*args[:arity]))
        return fn

    def autograd(self, spec):
        """Decorator on a namespace (a class) with ``setup_context(ctx, inputs, output)`` and
        ``backward(ctx, *grads)`` returning one gradient (or None) per schema argument."""
        setup, backward = spec.setup_context, spec.backward
        arity = self._arity

        # the dispatcher's autograd sees the revision as one more input: hidden from both
        # (as torch hides its own extra inputs: needs_input_grad restored after the call)
        def revised_setup(ctx, inputs, output):
            needs = ctx.needs_input_grad
            ctx.needs_input_grad = needs[:arity]
            try:
                return setup(ctx, inputs[:arity], output)
            finally:
                ctx.needs_input_grad = needs

        def revised_backward(ctx, *grads):
            _refuse_batched_grads(self.qualname, grads)
            needs = ctx.needs_input_grad
            ctx.needs_input_grad = needs[:arity]
            try:
                out = backward(ctx, *grads)
            finally:
                ctx.needs_input_grad = needs
            return (*out, None) if isinstance(out, tuple) else (out, None)

        self._custom.register_autograd(revised_backward, setup_context=revised_setup)
        self._function = _function_class(self, setup, backward)
        self._apply = _c_apply(self._function)
        return spec

    @property
    def backends(self) -> tuple[str, ...]:
        return tuple(self._impls)

    # ---------------------------------------------------------------- calls

    def implementation(self, args) -> Callable:
        """The implementation the call ``self(*args)`` runs; under autocast, run with
        autocast off: an op computes in the dtypes it is given (the public functions apply
        autocast's casts themselves), and the PyTorch path's products, or the Triton path's
        host-side ones, would otherwise run in 16 bits behind its back."""
        backend = resolve_backend(self.family, args[self._tensor_positions[0]])
        fn = self._impls.get(backend)
        if fn is None:
            raise RuntimeError(
                f"{self.qualname} has no '{backend}' implementation (it has: "
                f"{', '.join(self._impls)})"
            )
        if _any_autocast():
            return functools.partial(_without_autocast, fn)
        return fn

    def _dispatch(self, *args):
        args = args[: self._arity]  # without the revision
        return self.implementation(args)(*args)

    def __call__(self, *args):
        # (is_compiling alone is process-wide: true while any thread compiles, see tracing)
        compiling = tracing()
        transformed = not compiling and (_functorch() or forward_ad._current_level >= 0)
        if transformed:  # before the dispatcher path too, where the tangent would be 0
            _refuse_forward_mode(self.qualname, args, self._tensor_positions)
        if compiling or _profiler_enabled() or _dispatch_modes() or _function_modes():
            return self.overload(*args, REVISION)
        if _jit_tracing() is not None:
            refuse_jit_trace(self.qualname)
        if transformed and _functorch():
            return self._under_functorch(args)
        if self._mutated_positions and not torch.is_inference_mode_enabled():
            self._refuse_inference_writes(args)
        tracked = self._apply is not None and torch.is_grad_enabled()
        needs_grad = wrapped = negated = False
        # one pass: the dispatcher's cases, autograd, tensors left over from an exited
        # functorch transform (wrappers, which the full Function.apply and the dispatcher
        # unwrap; the kernels cannot read them)
        for i in self._tensor_positions:
            t = args[i]
            if t is not None:
                if type(t) not in _PLAIN:
                    return self.overload(*args, REVISION)
                if tracked and not needs_grad and t.requires_grad:
                    needs_grad = True
                if _wrapped(t):
                    wrapped = True
                if t.is_neg():
                    negated = True
        if negated:
            args = self._resolved_negations(args)
        if needs_grad:
            # the C++ apply skips Function.apply's Python layer (about 1.5 us), which does
            # nothing here: it binds defaults for a separate setup_context (the eager
            # path's has none), routes functorch transforms (sent to the dispatcher above)
            # and unwraps leftover wrappers, which take the full apply
            return self._function.apply(*args) if wrapped else self._apply(*args)
        if wrapped:
            return self.overload(*args, REVISION)
        out = self.implementation(args)(*args)
        if self._mutated_positions:  # autograd then refuses a stale saved tensor
            torch.autograd.graph.increment_version(
                [args[i] for i in self._mutated_positions if args[i] is not None]
            )
        return out

    def _resolved_negations(self, args) -> tuple:
        """``args`` with each lazily negated tensor (``is_neg()``, e.g. ``z.conj().imag``)
        materialised: the kernels read memory through the pointer, where such a tensor's
        values are stored unnegated. One the op writes into is refused: the write would go
        to the copy. Upstream gradients reach the kernels as arguments of the backward ops,
        so a negated ``grad_outputs`` is resolved here too."""
        for i in self._mutated_positions:
            if args[i] is not None and args[i].is_neg():
                raise ValueError(
                    f"{self.qualname}: {self._names[i]} is a lazily negated view (is_neg(), "
                    "e.g. from .conj().imag) and is written in place; call "
                    "resolve_neg() on it first"
                )
        return tuple(
            a.resolve_neg() if isinstance(a, torch.Tensor) and a.is_neg() else a for a in args
        )

    def _under_functorch(self, args):
        """The dispatcher's call under a functorch transform; PyTorch's refusal of the grad
        transforms for custom ops with an autograd formula (pytorch/pytorch#168393), which
        does not name the op, raised naming it."""
        try:
            return self.overload(*args, REVISION)
        except RuntimeError as exc:
            if "functorch transforms" not in str(exc) or "setup_context" not in str(exc):
                raise
            raise NotImplementedError(
                f"{self.qualname}: torch.func.grad, vjp and jacrev are not supported (PyTorch "
                "runs a custom op's autograd formula as an autograd.Function without "
                "setup_context, which these transforms refuse: pytorch/pytorch#168393); use "
                "torch.autograd.grad (torch.func.vmap of the op works)"
            ) from exc

    def _refuse_inference_writes(self, args) -> None:
        """PyTorch's rule for in-place ops, checked before anything is written (the kernels
        write through pointers, which autograd does not see)."""
        for i in self._mutated_positions:
            t = args[i]
            if t is not None and t.is_inference():
                raise RuntimeError(
                    f"{self.qualname}: {self._names[i]} is an inference tensor (made under "
                    "torch.inference_mode), and an in-place update of one outside "
                    "InferenceMode is not allowed; clone it first, or call under "
                    "torch.inference_mode()"
                )

    def __repr__(self) -> str:
        return f"<Op {self.qualname}{self.schema} backends={list(self._impls)}>"


def _function_class(op: Op, setup: Callable, backward: Callable):
    """The eager path's ``autograd.Function``: the implementation forward, the op's own
    ``setup_context`` and ``backward``.

    Written in the combined style (``forward(ctx, *args)`` calls ``setup_context`` itself):
    with a separate ``setup_context``, ``Function.apply`` binds the arguments to
    ``forward``'s signature through ``inspect.signature`` on every call, about six torch ops'
    worth of host time. The eager path is never taken under functorch transforms (see
    :meth:`Op.__call__`), the one place the separate style is required."""

    def forward(ctx, *args):
        output = op.implementation(args)(*args)
        setup(ctx, args, output)
        return output

    def checked_backward(ctx, *grads):
        _refuse_batched_grads(op.qualname, grads)
        return backward(ctx, *grads)

    return type(
        f"{op.name}_function",
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "backward": staticmethod(checked_backward)},
    )


def _c_apply(function: type[torch.autograd.Function]) -> Callable:
    """``function``'s C++ ``apply`` (``torch._C._FunctionBase.apply`` bound to it), or its
    ``apply`` where this torch has no such method."""
    apply = vars(torch._C._FunctionBase).get("apply")
    return apply.__get__(None, function) if hasattr(apply, "__get__") else function.apply


def _argument_list(schema: str) -> list[str]:
    """The arguments of a schema ``"(...) -> ..."``, e.g. ``["Tensor(a!) q", "int n"]``."""
    close = schema.rindex(")", 0, schema.index("->"))
    arguments = schema[schema.index("(") + 1 : close].strip()
    return [a.strip() for a in arguments.split(",")] if arguments else []


def _revised(schema: str) -> str:
    """``schema`` with a last argument ``int revision=0`` (see the module docstring)."""
    close = schema.rindex(")", 0, schema.index("->"))
    separator = ", " if _argument_list(schema) else ""
    return f"{schema[:close]}{separator}int revision=0{schema[close:]}"


def _tensor_positions(schema: str) -> tuple[int, ...]:
    """Positions of the ``Tensor`` / ``Tensor?`` arguments in a schema's argument list."""
    positions = tuple(
        i
        for i, argument in enumerate(_argument_list(schema))
        if argument.startswith("Tensor") and not argument.startswith("Tensor[]")
    )
    if not positions:
        raise ValueError(f"an op needs a tensor argument to choose its backend: {schema}")
    return positions


def as_saved(*ts):
    """Tensors an op made itself and saved for backward (statistics, ranges, indices, a
    stored activation), in the layout it made them in: contiguous. A
    ``saved_tensors_hooks`` unpack may hand back another layout, which a kernel reading
    them by pointer would misread; the usual unpack costs no copy. None passes through."""
    return contiguous_vectors(*ts)


# ------------------------------------------------------------------ first-order backward


class _SecondOrderNotImplemented(torch.autograd.Function):
    """Returns ``grads`` (first-order gradients, a tuple: not inputs, so the results are
    not views, which would refuse in-place changes such as ``clip_grad_norm_``'s); the
    tensor arguments are what they depend on, so that differentiating them reaches this
    node, which raises."""

    @staticmethod
    def forward(ctx, message, grads, *sources):
        ctx.message = message
        return grads

    @staticmethod
    def backward(ctx, *_):
        raise NotImplementedError(ctx.message)


class _SavedOnce:
    """An autograd ``ctx`` whose ``saved_tensors`` are unpacked once and kept: a
    non-reentrant ``torch.utils.checkpoint`` refuses a saved tensor unpacked twice (its
    CheckpointError), and a ``save_on_cpu`` unpack copies again on each read. Every other
    attribute is the ctx's (read and written through)."""

    __slots__ = ("_ctx", "_saved")

    def __init__(self, ctx):
        object.__setattr__(self, "_ctx", ctx)
        object.__setattr__(self, "_saved", None)

    @property
    def saved_tensors(self):
        if self._saved is None:
            object.__setattr__(self, "_saved", self._ctx.saved_tensors)
        return self._saved

    def __getattr__(self, name):
        return getattr(self._ctx, name)

    def __setattr__(self, name, value):
        setattr(self._ctx, name, value)


def first_order_only(op: str):
    """Decorates an autograd ``backward(ctx, *grads)`` whose gradients are not themselves
    differentiable (fused kernels, gradients saved by the forward pass, collectives).

    Under ``create_graph=True`` the gradients it returns hang from a node that depends on
    the saved tensors and the upstream gradients and raises NotImplementedError naming
    ``op`` when anything differentiates them: a second-order gradient raises at the second
    backward instead of coming out silently 0 or partial (as from a backward whose saved
    gradients are constants to autograd). Without ``create_graph`` nothing changes.
    """
    message = (
        f"{op}: second-order gradients (differentiating a gradient obtained with "
        "create_graph=True) are not implemented by vlmkernels' fused kernels; compute such "
        "terms with a differentiable formula instead"
    )

    def decorate(backward):
        @functools.wraps(backward)
        def wrapped(ctx, *grads):
            if not torch.is_grad_enabled():  # the usual backward: no graph to build
                return backward(ctx, *grads)
            once = _SavedOnce(ctx)  # the saved tensors read once: for backward and here
            with torch.no_grad():
                out = backward(once, *grads)
            single = not isinstance(out, tuple)
            out = [out] if single else list(out)
            where = [i for i, g in enumerate(out) if isinstance(g, torch.Tensor)]
            sources = [t for t in (*once.saved_tensors, *grads)
                       if isinstance(t, torch.Tensor) and t.requires_grad]  # fmt: skip
            tied = _SecondOrderNotImplemented.apply(
                message, tuple(out[i].detach() for i in where), *sources
            )
            for i, g in zip(where, tied, strict=True):
                out[i] = g
            return out[0] if single else tuple(out)

        return wrapped

    return decorate

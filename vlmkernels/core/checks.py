"""Argument checks run before any kernel launch; each error names the argument at fault."""

from __future__ import annotations

import math
import numbers

import torch

from .runtime import tracing

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# exact types that pass the number checks without the (slower) abstract-class test
_PLAIN_REALS = (float, int)


def _dtype_names(dtypes) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def check_features(op: str, t, name: str) -> None:
    """One (N, d) floating tensor of an accepted dtype (:data:`FLOAT_DTYPES`), N and d > 0."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{op}: {name} must be a floating tensor ({_dtype_names(FLOAT_DTYPES)}), got {t.dtype}"
        )
    if t.dim() != 2:
        raise ValueError(f"{op}: {name} must be 2-D (batch, dim), got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"{op}: {name} is empty (batch size 0); the loss is undefined")
    if t.shape[1] == 0:
        raise ValueError(f"{op}: {name} has feature dim 0")


def check_compatible(op: str, a: torch.Tensor, b: torch.Tensor, names) -> None:
    """Two feature tensors with the same feature dim, dtype and device."""
    if a.shape[1] == b.shape[1] and a.dtype == b.dtype and a.device == b.device:
        return
    for what, va, vb, exc in (
        ("feature dim", a.shape[1], b.shape[1], ValueError),
        ("dtype", a.dtype, b.dtype, TypeError),
        ("device", a.device, b.device, ValueError),
    ):
        if va != vb:
            verb = "be on" if what == "device" else "have"
            raise exc(f"{op}: {names[0]} and {names[1]} must {verb} the same {what}, "
                      f"got {va} and {vb}")  # fmt: skip


def check_feature_pair(
    op: str, a: torch.Tensor, b: torch.Tensor, names=("image_features", "text_features")
):
    """Two (N, d) floating tensors with the same N, d, dtype and device, N and d > 0."""
    if (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() == 2
            and a.shape == b.shape and a.dtype == b.dtype and a.dtype in FLOAT_DTYPES
            and a.numel() and a.device == b.device):  # fmt: skip
        return
    for t, name in zip((a, b), names, strict=True):
        check_features(op, t, name)
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{op}: {names[0]} and {names[1]} must have the same batch size, "
            f"got {a.shape[0]} and {b.shape[0]}"
        )
    check_compatible(op, a, b, names)


def check_queries_keys(op: str, q, k, names=("queries", "keys")) -> None:
    """An (M, d) and an (N, d) floating tensor of one dtype and device, M, N and d > 0."""
    if (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and q.dim() == 2
            and k.dim() == 2 and q.dtype == k.dtype and q.dtype in FLOAT_DTYPES
            and q.shape[1] == k.shape[1] and q.numel() and k.numel()
            and q.device == k.device):  # fmt: skip
        return
    check_features(op, q, names[0])
    check_features(op, k, names[1])
    check_compatible(op, q, k, names)


def check_real(op: str, name: str, value, low: float, high: float, high_open=False) -> float:
    """``value`` (a real number, not a bool) in [low, high] ([low, high) with
    ``high_open``), as a float."""
    if type(value) not in _PLAIN_REALS and (isinstance(value, bool)
                                            or not isinstance(value, numbers.Real)):  # fmt: skip
        raise TypeError(f"{op}: {name} must be a float in {_interval(low, high, high_open)}, "
                        f"got {value!r}")  # fmt: skip
    value = float(value)
    if not (low <= value < high if high_open else low <= value <= high):
        # {x} of x = float(arg), no !r: the one form Dynamo traces for a symbolic float on
        # every supported Python and torch ({arg!r} fails on 3.13, {arg} on torch 2.13)
        raise ValueError(f"{op}: {name} must be in {_interval(low, high, high_open)}, "
                         f"got {value}")  # fmt: skip
    return value


def _interval(low: float, high: float, high_open: bool) -> str:
    return f"[{low:g}, {high:g}{')' if high_open else ']'}"


def refuse_jit_trace(op: str) -> None:
    """Raises: torch.jit.trace records shapes and launch arguments as constants."""
    raise RuntimeError(
        f"{op}: torch.jit.trace is not supported (it records shapes and launch arguments "
        "as constants); use torch.compile or torch.export"
    )


def check_int(op: str, name: str, value, low: int | None = None) -> int:
    """``value`` (an integer, not a bool: a Python or NumPy int) as an int, at least
    ``low`` when given. Under torch.jit.trace a size read from a shape is a tensor: the
    trace is refused as such, not the size."""
    if isinstance(value, torch.Tensor) and torch.jit.is_tracing():
        refuse_jit_trace(op)
    if type(value) is not int and (isinstance(value, bool)
                                   or not isinstance(value, numbers.Integral)):  # fmt: skip
        raise TypeError(f"{op}: {name} must be an int, got {value!r}")
    value = int(value)
    if low is not None and not _at_least(value, low):
        raise ValueError(f"{op}: {name} must be >= {low}, got {value}")
    return value


def _at_least(value, low: int) -> bool:
    """``value >= low``; while torch.compile traces, where the value may be a SymInt (a
    size read from a shape, an unbacked ``.item()``; Dynamo shows it as an int), True
    unless the trace knows it false (``guard_or_true``: no guard, no specialisation).
    torch's symbolic-shapes module is imported only there, where it is loaded already: it
    imports sympy, which would add about 0.3 s to ``import vlmkernels``."""
    if not tracing():
        return value >= low
    from torch.fx.experimental.symbolic_shapes import guard_or_true

    return guard_or_true(value >= low)


def isqrt(n) -> int:
    """floor(sqrt(n)) of an int n >= 0, exact; of a SymInt while torch.compile traces with
    dynamic shapes (``math.isqrt`` refuses one), through a float square root, which is
    exact below 2^52 (token counts), as transformers' own ``int(n ** 0.5)``."""
    if tracing():  # dynamo sees a SymInt as an int
        return torch.sym_int(n**0.5)
    return math.isqrt(n)


def check_bool(op: str, name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be True or False, got {value!r}")
    return value


def scalar_tensor(op: str, name: str, value, device: torch.device, optional: bool = False):
    """``value`` (a Python number or a one-element floating tensor) as a 0-d tensor on ``device``.

    Tensors keep their autograd history (reshape and device moves are differentiable), so
    a learnable ``logit_scale`` receives its gradient.
    """
    if value is None:
        if optional:
            return None
        raise TypeError(f"{op}: {name} is required, got None")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"{op}: {name} must be a scalar (a 0-d or one-element tensor or a float), "
                f"got a tensor of shape {tuple(value.shape)}"
            )
        if not value.dtype.is_floating_point:
            raise TypeError(f"{op}: {name} must be a floating tensor, got {value.dtype}")
        if value.dim() != 0:  # a 0-d tensor as it is: a reshape would add an autograd node
            value = value.reshape(())
        if value.device != device:
            value = to_device(op, name, value, device)
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        what = type(value).__name__
        raise TypeError(f"{op}: {name} must be a float or a one-element tensor, got {what}")
    # filled on the device: torch.tensor(value, device=...) builds a host tensor and copies
    # it over with a blocking copy, which on a GPU synchronises the stream on every call
    return torch.full((), float(value), dtype=torch.float32, device=device)


def to_device(op: str, name: str, t: torch.Tensor, device: torch.device, **kwargs):
    """``t.to(device, **kwargs)`` for an auxiliary tensor (a scale, ids, a mask), which may
    come from another device; a meta tensor (no data to copy) is refused by name."""
    if t.device.type == "meta" and device.type != "meta":
        raise ValueError(f"{op}: {name} must be on {device}, got a meta tensor (no data)")
    if device.type != "cpu" and t.device != device and not (t.is_cpu and t.is_pinned()):
        # a blocking copy to a GPU synchronises the stream (cudaStreamSynchronize after the
        # copy); a non-blocking one from pageable host memory stages it at once and returns
        # (what the tensor holds is copied, so the caller may change it afterwards). Not
        # from pinned memory, which the copy reads later (a caller reusing the buffer would
        # race it), nor to the host, which must wait for the data.
        kwargs.setdefault("non_blocking", True)
    return t.to(device, **kwargs)


def saveable(t):
    """``t``, or a copy of it where it is an inference tensor (made under
    ``torch.inference_mode``) that an op may save for backward: autograd refuses to save
    one, while the PyTorch formulas the ops replace save only what they derive from such
    an auxiliary input (targets from ids, angles from positions, a teacher's softmax).
    None passes through; so does everything while torch.compile traces (which cannot
    look at inference tensors, nor takes them)."""
    if (t is None or tracing() or not t.is_inference()
            or not torch.is_grad_enabled() or torch.is_inference_mode_enabled()):  # fmt: skip
        return t
    return t.clone()


def saveable_pair(a, b):
    """``(saveable(a), saveable(b))``, the trace and the modes looked at once (host time:
    :func:`tracing` is two Python calls)."""
    if tracing() or not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
        return a, b
    return (a if a is None or not a.is_inference() else a.clone(),
            b if b is None or not b.is_inference() else b.clone())  # fmt: skip


REDUCTIONS = ("mean", "sum", "none")


def in_choices(value, choices) -> bool:
    """Whether ``value`` is one of ``choices`` (a dict or set): False, not TypeError, for an
    unhashable value (a list read from a config), so the caller's error names the argument."""
    try:
        return value in choices
    except TypeError:
        return False


def check_reduction(op: str, reduction) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def check_chunk_size(op: str, chunk_size) -> int:
    """0 means 'choose from the memory budget'."""
    if chunk_size is None:
        return 0
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
        raise TypeError(f"{op}: chunk_size must be a positive int or None, got {chunk_size!r}")
    if chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be a positive int or None, got {chunk_size!r}")
    return int(chunk_size)

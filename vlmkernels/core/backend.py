"""Which implementation an op runs: ``triton``, ``torch`` or ``cuda``.

Default, per call, from the device of the inputs:

- CUDA tensors run the Triton kernels, or the CUDA C++ ones where the device's tuned
  configs record them as faster for the op and the extension is available. On a ROCm
  build of torch (AMD GPUs, shown as "cuda" devices) they run the PyTorch reference, with
  a :class:`DeviceFallbackWarning` once per process: the Triton kernels are written for
  NVIDIA GPUs and Triton's AMD backend does not compile them.
- CPU tensors run the plain-PyTorch reference, unless Triton's interpreter is on
  (``TRITON_INTERPRET=1`` when vlmkernels was imported), in which case they run the
  Triton kernels through the interpreter: this is how CPU-only CI exercises every kernel.
- float64 inputs always take the PyTorch path (Triton kernels take 16- and 32-bit floats).

A choice can be forced for the whole process with ``VLMKERNELS_BACKEND=triton|torch|cuda``
or for a block of code with :func:`use_backend`, which takes precedence over the variable.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import torch

from . import cuda, runtime
from .configs import derived_cache, generation, store
from .family import cuda_ops
from .tuning import preferred_backend

BACKENDS = ("triton", "torch", "cuda")
# A ROCm build of torch shows AMD GPUs as "cuda" devices. The Triton kernels use inline PTX
# (the MUFU exponential and reciprocal) and 3xTF32 dots for fp32 inputs: for gfx942 (MI300)
# Triton's AMD backend rejects 12 of the 104 compile variants in bf16, 28 in fp32.
ROCM = getattr(torch.version, "hip", None) is not None
ROCM_WHY = ("vlmkernels' Triton kernels are written for NVIDIA GPUs (inline PTX, 3xTF32 "
            "dots) and do not compile for AMD GPUs (a ROCm build of torch)")  # fmt: skip
_ROCM_WARNED = [False]
_DEFAULTS = derived_cache()  # (op, CUDA device) -> whether CUDA C++ was recorded faster

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "vlmkernels_backend", default=None
)


class DeviceFallbackWarning(UserWarning):
    """The ops run their PyTorch reference on this device, not the kernels (an AMD GPU)."""


def rocm_default(op: str) -> str:
    """The backend for "cuda" tensors of a ROCm build of torch when none is forced: the
    PyTorch reference, said once per process with a :class:`DeviceFallbackWarning` (not
    while torch.compile traces: Dynamo cannot trace ``warnings.warn``)."""
    if not _ROCM_WARNED[0] and not runtime.tracing():
        _ROCM_WARNED[0] = True
        runtime.warn(f"vlmkernels: {op} and every other op run their PyTorch reference on "
                     f"this GPU: {ROCM_WHY}. Set VLMKERNELS_BACKEND=torch to choose it "
                     "explicitly.", DeviceFallbackWarning)  # fmt: skip
    return "torch"


def cuda_backend_status() -> tuple[bool, str]:
    """(available, reason) for the CUDA C++ backend (:func:`.cuda.status`)."""
    return cuda.status()


def triton_interpreted() -> bool:
    """True when Triton kernels defined by vlmkernels run through Triton's CPU interpreter."""
    return runtime.INTERPRETED


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name


_backend_variable = runtime.environment_reader("VLMKERNELS_BACKEND")


def get_backend() -> str | None:
    """The forced backend (context manager first, then ``VLMKERNELS_BACKEND``), or None."""
    forced = _forced.get()
    if forced is not None:
        return forced
    env = _backend_variable()
    if env:
        env = env.strip().lower()
        return _check_name(env, "VLMKERNELS_BACKEND") if env else None
    return None


def remember_backend(ctx) -> None:
    """Stores the :func:`use_backend` choice of this context (not the environment's) on an
    autograd ``ctx`` at forward time, for :func:`in_forward_backend`."""
    ctx.forced = _forced.get()


def in_forward_backend(backward):
    """Decorates an autograd ``backward(ctx, *grads)`` to run under the choice that
    :func:`remember_backend` stored: autograd may run the backward on another thread (CUDA
    tensors), where the context variable is unset, and a backward called inside another
    ``use_backend`` block than the forward's (or none) still runs the forward's choice."""

    @functools.wraps(backward)
    def wrapped(ctx, *grads):
        if ctx.forced is _forced.get():
            return backward(ctx, *grads)
        token = _forced.set(ctx.forced)
        try:
            return backward(ctx, *grads)
        finally:
            _forced.reset(token)

    return wrapped


@contextlib.contextmanager
def use_backend(name: str):
    """Force ``name`` (``"triton"``, ``"torch"`` or ``"cuda"``) for ops called in the block,
    in this thread (or asyncio task): a context variable, which threads started inside the
    block do not inherit. In eager mode each op's backward runs on its forward's choice,
    wherever and whenever autograd runs it; a backward compiled by torch.compile resolves
    the backend when it runs (``VLMKERNELS_BACKEND`` holds for both). Activation
    checkpointing recomputes the forward outside the block, on the default backend: force
    one there with ``VLMKERNELS_BACKEND`` or a ``context_fn`` entering this block.

    >>> with vlmkernels.use_backend("torch"):
    ...     loss = vlmkernels.clip_loss(img, txt, scale)
    """
    token = _forced.set(_check_name(name, "backend"))
    try:
        yield
    finally:
        _forced.reset(token)


def cuda_default(op: str, device: torch.device) -> str:
    """The backend of ``op`` for CUDA tensors when none is forced: the one recorded as
    faster on this device (:func:`.tuning.preferred_backend`, written by ``vlmkernels
    tune``) when it is available, else Triton. Cached per (op, device) until
    :func:`.tuning.clear_cache`."""
    key = (op, device)
    faster = _DEFAULTS.get(key)
    if faster is None:
        since = generation()  # a clear while reading the files: not stored
        faster = op in cuda_ops() and preferred_backend(op, device) == "cuda"
        store(_DEFAULTS, key, faster, since)
    return "cuda" if faster and cuda_backend_status()[0] else "triton"


def resolve_backend(op: str, tensor: torch.Tensor) -> str:
    """The backend ``op`` runs for inputs like ``tensor``; raises if a forced one cannot."""
    forced = get_backend()
    if forced is None:
        if tensor.dtype == torch.float64:
            return "torch"
        if tensor.is_cuda:
            return rocm_default(op) if ROCM else cuda_default(op, tensor.device)
        return "triton" if tensor.is_cpu and runtime.INTERPRETED else "torch"
    if forced == "cuda":
        ok, why = cuda_backend_status()
        if not ok:
            raise RuntimeError(f"{op}: the 'cuda' backend is unavailable: {why}")
        if op not in cuda_ops():
            raise RuntimeError(
                f"{op}: has no CUDA C++ implementation (ops with one: "
                f"{', '.join(sorted(cuda_ops()))}); use the 'triton' or 'torch' backend"
            )
    if forced == "triton":
        if tensor.dtype == torch.float64:
            raise TypeError(
                f"{op}: the 'triton' backend takes float16, bfloat16 or float32 inputs; "
                "use the 'torch' backend for float64"
            )
        if tensor.device.type == "cpu" and not triton_interpreted():
            raise RuntimeError(
                f"{op}: the 'triton' backend needs CUDA tensors, or TRITON_INTERPRET=1 set "
                "before vlmkernels is imported to run the kernels on the CPU"
            )
        if tensor.device.type not in ("cpu", "cuda"):
            raise RuntimeError(f"{op}: the 'triton' backend does not run on {tensor.device}")
        if ROCM and tensor.is_cuda:
            raise RuntimeError(f"{op}: the 'triton' backend does not run here: {ROCM_WHY}; "
                               "use the 'torch' backend")  # fmt: skip
    return forced

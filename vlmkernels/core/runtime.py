"""What every family's launchers share: whether Triton is interpreted, device facts,
config spaces, the device guard."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
import warnings

import torch
import triton
from torch._guards import TracingContext

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
# torch.nn.Module.__call__'s frames between a model's caller and a patched forward
_MODULE_CALL = os.path.join("torch", "nn", "modules", "module.py")
_CALLS = frozenset({"__call__", "_call_impl", "_wrapped_call_impl"})


def _internal(frame) -> bool:
    """A frame of vlmkernels, or of a module's call machinery: ``nn.Module.__call__`` and
    an ``__call__`` of a module class wrapping it (transformers' GradientCheckpointingLayer)."""
    filename = frame.f_code.co_filename
    if filename.startswith(_PACKAGE_DIR) or filename.endswith(_MODULE_CALL):
        return True
    return frame.f_code.co_name in _CALLS and isinstance(
        frame.f_locals.get("self"), torch.nn.Module
    )


def warn(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` attributed to the first frame outside vlmkernels and outside a
    module's call machinery: the user's call (or the model code calling a patched module),
    however deep inside the package the warning is decided (a fixed ``stacklevel`` points
    at a different internal frame on each call path). Python 3.11 has no
    ``skip_file_prefixes``."""
    frame, level = sys._getframe(1), 2
    while frame is not None and _internal(frame):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


@triton.jit
def _probe():
    pass


# Triton decides at decoration time whether a kernel is compiled or interpreted
# (TRITON_INTERPRET=1); every kernel module is imported after this one, so they agree.
INTERPRETED = type(_probe).__name__ == "InterpretedFunction"

# Triton's interpreter patches triton.language while a kernel runs, so two threads running
# kernels at once fail inside it; interpreted launches take this lock (compiled launches do
# not need it). None where no kernel really runs (benchmarks/host.py replaces Triton's
# launcher with a no-op): the launches then take the compiled path's code.
INTERPRETER_LOCK: threading.RLock | None = threading.RLock()


def _fresh_lock_after_fork() -> None:
    """A forked child (a DataLoader worker) has only the forking thread: a lock another
    thread held at the fork would never be released there."""
    global INTERPRETER_LOCK
    if INTERPRETER_LOCK is not None:
        INTERPRETER_LOCK = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_fresh_lock_after_fork)


def launch_lock():
    """The context a launch runs in: :data:`INTERPRETER_LOCK` when kernels are interpreted
    (read at each call: a fork replaces it), else none."""
    lock = INTERPRETER_LOCK
    return lock if INTERPRETED and lock is not None else contextlib.nullcontext()


def environment_reader(name: str):
    """A function returning ``os.environ.get(name)``, read on every call (tests and
    spawned workers set the variable at run time). CPython's ``os.environ`` encodes the key
    on each ``get``, about 0.5 us, paid on every call of an op that reads one; the reader
    looks the pre-encoded key up in the mapping ``os.environ`` keeps in step with its
    writes, where the running Python has one."""
    environ = os.environ
    data, encode, decode = (getattr(environ, a, None) for a in ("_data", "encodekey",
                                                                 "decodevalue"))  # fmt: skip
    if not isinstance(data, dict) or encode is None or decode is None:
        return lambda: environ.get(name)
    key = encode(name)

    def read():
        value = data.get(key)
        return None if value is None else decode(value)

    return read


_FP_FUSION = {"enable_fp_fusion": True}
_fp_fusion_env = environment_reader("TRITON_DEFAULT_FP_FUSION")


def fp_fusion() -> dict:
    """The launch option for floating-point contraction (``a * b + c`` as one FMA) in
    vlmkernels' kernels: ``{"enable_fp_fusion": True}``, the default they were written,
    tuned and checked against, asked for explicitly as torch.compile's kernels ask for it.
    Triton 3.9 warns at the first compile that leaves it unset that its default turns to off
    in 3.10, which would split every FMA of the inner loops in two. ``{}`` where the process
    sets ``TRITON_DEFAULT_FP_FUSION``: the user's choice then applies (and
    ``TRITON_FORCE_DISABLE_FP_FUSION`` always does). Read at each call; the dict is shared,
    not to be written."""
    return _FP_FUSION if _fp_fusion_env() is None else {}


@functools.cache
def num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


_NO_GUARD = contextlib.nullcontext()  # reusable: it holds no state


# torch.cuda.current_device() without its lazy-init call: a CUDA tensor exists, so CUDA is
# initialised (the plain call where this torch has no such binding, as CPU builds)
_current_cuda_device = getattr(torch._C, "_cuda_getDevice", torch.cuda.current_device)


def device_guard(t: torch.Tensor):
    """Makes ``t``'s CUDA device current for a launch; a no-op for CPU tensors and where it
    is current already (the usual case: switching costs a few us of host time per call)."""
    if not t.is_cuda or t.get_device() == _current_cuda_device():
        return _NO_GUARD
    return torch.cuda.device(t.device)


def scalar_like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised 0-d tensor on the device of the 0-d tensor ``t``, in ``t``'s dtype
    or ``dtype``: ``torch.empty_like``, about 0.5 us of host time less than
    ``torch.empty((), ...)``."""
    return torch.empty_like(t) if dtype is None else torch.empty_like(t, dtype=dtype)


def autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype where autocast is on for ``t``'s device type (CUDA or CPU), else
    None: what ``torch.autocast`` casts a matmul's operands to there."""
    kind = "cuda" if t.is_cuda else "cpu" if t.is_cpu else None
    if kind is None or not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


def autocast_pair(a, b):
    """Two operands of a product in two different dtypes (fp32 and bf16 towers, say) cast
    to the autocast dtype where autocast is on, as its matmul would take them; else (one
    dtype, float64, no autocast, not tensors: left to the caller's checks) as they are."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.dtype == b.dtype:
        return a, b
    low = autocast_dtype(a)
    if low is None or a.dtype not in _AUTOCAST_ELIGIBLE or b.dtype not in _AUTOCAST_ELIGIBLE:
        return a, b
    return a.to(low), b.to(low)


def autocast_operands(*tensors):
    """``tensors`` as ``torch.autocast`` hands them to a matmul: where autocast is on for
    the first one's device type, floating tensors other than float64 cast to the autocast
    dtype (differentiably: the gradients reach the fp32 originals), the others (None and
    non-tensors included, left to the caller's checks) as they are; else all as they are."""
    if not isinstance(tensors[0], torch.Tensor):
        return tensors
    low = autocast_dtype(tensors[0])
    if low is None:
        return tensors
    return tuple(
        t.to(low)
        if isinstance(t, torch.Tensor) and t.is_floating_point()
        and t.dtype not in (low, torch.float64)
        else t
        for t in tensors
    )  # fmt: skip


_is_compiling = torch.compiler.is_compiling
_dynamo_compiling = torch.compiler.is_dynamo_compiling
_tracing_context = TracingContext.try_get


def traced_here() -> bool:
    """Where ``torch.compiler.is_compiling()`` is true: whether this thread is the one
    tracing (Dynamo, which folds ``is_dynamo_compiling`` to True, or the code a compile or
    an export runs untraced in its thread: fakes, AOTAutograd's trace of a backward, under
    the thread's ``TracingContext``). See :func:`tracing`."""
    return _dynamo_compiling() or _tracing_context() is not None


def _tracing() -> bool:
    """Whether this call is being traced by torch.compile or torch.export, in this thread.

    ``torch.compiler.is_compiling()`` alone is a process-wide flag in recent PyTorch, true
    in every thread for the whole of another thread's compile session (seconds): an eager
    call in a serving thread would take the traced path's shortcuts (an inference tensor
    not copied before autograd saves it, host checks skipped, the ring refused). Costs
    nothing more where no thread compiles."""
    return _is_compiling() and traced_here()


def _flag_tracing() -> bool:
    # _tracing with one Python call less (the eager path asks several times per call):
    # Dynamo folds is_dynamo_compiling to True (reading the flag there would guard the
    # graph on it: a recompilation at the next eager-valued call); outside Dynamo, the
    # flag torch.compiler.is_compiling() returns (outside TorchScript, which never runs this)
    return _dynamo_compiling() or (_compiler._is_compiling_flag and _tracing_context() is not None)


_compiler = torch.compiler
tracing = (
    _flag_tracing
    if isinstance(getattr(_compiler, "_is_compiling_flag", None), bool)
    and "_is_compiling_flag" in getattr(_is_compiling, "__code__", _tracing.__code__).co_names
    else _tracing
)
tracing.__doc__ = _tracing.__doc__


def mean_weight(weight: float, count, mean: bool = True):
    """(the op's weight, a divisor) for a loss of ``weight`` per term, divided by ``count``
    for a mean: ``weight / count`` and 1; or, while torch.compile traces, ``weight`` and
    ``count``, by which the caller divides the op's result (:func:`divided`): a float of a
    symbolic ``count`` in an op's float argument would fix the batch size in the graph,
    and every other size would compile again."""
    if not mean:
        return weight, 1
    if tracing():
        return weight, count
    return weight / count, 1


def divided(t: torch.Tensor, divisor) -> torch.Tensor:
    """``t / divisor``, without the op where ``divisor`` is 1 (see :func:`mean_weight`)."""
    return t if isinstance(divisor, int) and divisor == 1 else t / divisor


def sm_count(device: torch.device) -> int:
    """Multiprocessor count of ``device``; a nominal 8 under the CPU interpreter."""
    if device.type != "cuda":
        return 8
    return num_sms(device.index if device.index is not None else torch.cuda.current_device())


def dot_precision(dtype: torch.dtype) -> tuple[bool, str]:
    """(upcast operands to fp32 before ``tl.dot``, ``input_precision``) for inputs of ``dtype``.

    16-bit inputs go to the tensor cores as they are, accumulating in fp32. fp32 inputs use
    three TF32 products ("tf32x3"), accurate to about fp32 rounding (plain TF32 would be
    ~1e-3). Under the interpreter every operand is upcast: its bf16 arithmetic is wrong.
    """
    if INTERPRETED:
        return True, "ieee"
    if dtype == torch.float32:
        return False, "tf32x3"
    return False, "tf32"


# Launch configs come from the persisted lookup of :mod:`._tuning` (deterministic: nothing is
# benchmarked at run time). VLMKERNELS_AUTOTUNE=1 opts back into Triton's in-memory
# autotuning over the whole config space at the first call of every distinct key value (each
# new size, as triton.autotune keys it; the config files are then not consulted). Read at
# import; :mod:`._tuning` reads this attribute at each launch.
AUTOTUNE = os.environ.get("VLMKERNELS_AUTOTUNE", "0").strip().lower() in ("1", "true", "on", "yes")


class ConfigSpace(list):
    """The configs a kernel may launch with: a list (what ``scripts/compile_check.py``
    compiles) holding the GPU config space, or only the interpreter's config under Triton's
    interpreter, with both kept as attributes: ``space`` (GPU configs, the first being the
    heuristic default) and ``interpreter``."""

    def __init__(self, active, space, interpreter):
        super().__init__(active)
        self.space = list(space)
        self.interpreter = interpreter


def autotune_configs(gpu_configs: list[triton.Config], interpreter_config: triton.Config):
    """The config space of a kernel for :func:`._tuning.tuned`: the GPU configs (the first is
    the default when no tuned entry applies), or the single interpreter config under
    Triton's interpreter, which cannot benchmark (it fails with more than one)."""
    active = [interpreter_config] if INTERPRETED else gpu_configs
    return ConfigSpace(active, gpu_configs, interpreter_config)


# Host-side integer helpers. ``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr
# functions: a call from the host unwraps its arguments and costs 1-2 us, about 100 times
# these, and a launcher makes several per launch.


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the host's ints."""
    return -(-a // b)


GRID_YZ_LIMIT = 65535  # CUDA's largest grid y and z dimensions


def grid_fits(extent: int, what: str, count: str) -> None:
    """Refuses a launch grid's y or z ``extent`` past :data:`GRID_YZ_LIMIT` (CUDA's 65,535:
    the launch fails with "invalid argument") with a ValueError naming ``what`` launches it
    and the ``count`` it is."""
    if extent > GRID_YZ_LIMIT:
        raise ValueError(
            f"{what}: {count} = {extent} is past {GRID_YZ_LIMIT}, CUDA's largest grid y and z "
            "dimension, which the kernels launch it on; split the call into smaller ones"
        )


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1): ``triton.next_power_of_2``'s value for
    n >= 1, and the autotuning key of a size (its bucket)."""
    return 1 << (max(int(n), 1) - 1).bit_length()


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, without the call where ``t`` already has it: a no-op ``Tensor.to``
    still costs about half a torch op of host time, and the eager paths make dozens."""
    return t if t.dtype == dtype else t.to(dtype)


def contiguous_vectors(*ts):
    """Each tensor (or None) as the kernels read a 1-D parameter (a bias, a norm weight):
    element n at ``ptr + n``, so a strided or expanded view is copied first."""
    # (a list comprehension: one call, where a generator costs one per tensor and one more)
    return tuple([None if t is None else t.contiguous() for t in ts])

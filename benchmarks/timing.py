"""Time and peak memory of one callable, on CUDA or on the CPU.

CUDA: ``triton.testing.do_bench`` with quantiles (0.5, 0.2, 0.8), in ms. do_bench zeroes a
256 MB buffer before every repetition (an L2 flush), so reusing the same inputs across
repetitions does not serve them from L2; the inputs are therefore allocated once per case.
Calls slower than :data:`SLOW_MS` get one warm-up and about three timed repetitions
(do_bench also makes six untimed calls of its own to size the loop).

CPU: ``time.perf_counter`` around each call; quantiles over the repetitions (at least
:data:`CPU_MIN_REPS`, or 3 for calls slower than :data:`CPU_SLOW_MS`, more until
:data:`CPU_TARGET_S` seconds are spent): enough to tell providers apart on a CPU, whose
timings are a smoke test, not the GPU targets.

Peak memory (CUDA only): ``torch.cuda.reset_peak_memory_stats()`` once the inputs exist, then
``max_memory_allocated() - memory_allocated()`` (the latter read before the call) over one
call: the inputs are excluded; gradients, saved tensors and temporaries are included.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

QUANTILES = (0.5, 0.2, 0.8)
SLOW_MS = 100.0
CPU_MIN_REPS = 5
CPU_MAX_REPS = 50
CPU_TARGET_S = 0.15
CPU_SLOW_MS = 50.0


@dataclass(frozen=True)
class Timing:
    """Milliseconds at the 50th, 20th and 80th percentiles; reps when the count is known."""

    p50: float
    p20: float
    p80: float
    reps: int | None = None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def call_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one synchronised call, in ms (used to size the timing loop)."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return (time.perf_counter() - t0) * 1e3


def _reset(tensors: Sequence[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


def _quantiles(samples_ms: list[float]) -> Timing:
    samples = torch.tensor(samples_ms, dtype=torch.float64)
    q = torch.quantile(samples, torch.tensor(QUANTILES, dtype=torch.float64))
    return Timing(*(float(v) for v in q), reps=len(samples_ms))


def time_cuda(
    fn: Callable[[], object], grad_to_none: Sequence[torch.Tensor], estimate_ms: float
) -> Timing:
    from triton.testing import do_bench

    if estimate_ms > SLOW_MS:
        warmup, rep = 1, 3 * estimate_ms
    else:
        warmup, rep = 25, 100
    q = do_bench(
        fn,
        warmup=warmup,
        rep=rep,
        grad_to_none=list(grad_to_none) or None,
        quantiles=list(QUANTILES),
    )
    return Timing(*(float(v) for v in q))


def time_cpu(
    fn: Callable[[], object], grad_to_none: Sequence[torch.Tensor], estimate_ms: float
) -> Timing:
    min_reps = CPU_MIN_REPS if estimate_ms < CPU_SLOW_MS else 3
    samples: list[float] = []
    spent = 0.0
    while len(samples) < min_reps or (spent < CPU_TARGET_S and len(samples) < CPU_MAX_REPS):
        _reset(grad_to_none)
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        samples.append(dt * 1e3)
        spent += dt
    return _quantiles(samples)


def time_fn(
    fn: Callable[[], object],
    device: torch.device,
    *,
    grad_to_none: Sequence[torch.Tensor] = (),
    estimate_ms: float = 0.0,
) -> Timing:
    """Quantiles of the run time of ``fn`` (already warmed up), grads reset between calls."""
    if device.type == "cuda":
        return time_cuda(fn, grad_to_none, estimate_ms)
    return time_cpu(fn, grad_to_none, estimate_ms)


def peak_memory_mib(
    fn: Callable[[], object], device: torch.device, grad_to_none: Sequence[torch.Tensor] = ()
) -> float | None:
    """MiB allocated at the peak of one call of ``fn`` above what was allocated before it.

    None on devices without allocator statistics (the CPU): not measured, not zero.
    """
    if device.type != "cuda":
        return None
    _reset(grad_to_none)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del out
    return peak / 2**20

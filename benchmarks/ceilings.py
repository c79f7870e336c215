"""Device ceilings measured once per run, with the same timers as the cases.

The measurement itself (buffers, sizes, FLOP and byte counts) is the one ``vlmkernels info``
caches, :func:`vlmkernels.cli.measure_copy` and :func:`vlmkernels.cli.measure_matmul`; here
it runs with the harness's timer (:func:`benchmarks.timing.time_fn`: do_bench quantiles on a
GPU, perf_counter repetitions on the CPU) in the run's dtype:

- Copy bandwidth: ``dst.copy_(src)`` of a large uint8 buffer; bytes moved = read + written
  = 2 x size. 1 GiB on a GPU, 256 MiB on the CPU.
- Matmul rate: ``torch.mm`` of two square matrices, 2 n^3 FLOP, in the run's dtype:
  n = 8192 on a GPU (bf16 by default); on the CPU (fp32 by default) the best rate of
  n in {512, 1024, 2048}, since a CPU's rate depends on how the operands fit its caches
  and a ceiling must bound every case of the run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmkernels.cli import measure_copy, measure_matmul

from .timing import Timing, call_ms, time_fn


@dataclass(frozen=True)
class Ceilings:
    copy_gbps: float
    copy_bytes: int
    matmul_tflops: float
    matmul_n: int
    matmul_dtype: torch.dtype
    copy_ms: Timing
    matmul_ms: Timing


def _timer(device: torch.device):
    """``timer(fn)`` -> (p50 ms, Timing): a warm-up call, then :func:`time_fn`."""

    def timer(fn):
        call_ms(fn, device)
        timing = time_fn(fn, device, estimate_ms=call_ms(fn, device))
        return timing.p50, timing

    return timer


def measure(device: torch.device, dtype: torch.dtype) -> Ceilings:
    """Copy GB/s and matmul TFLOP/s of ``device`` (``dtype`` for the matmul)."""
    timer = _timer(device)
    copy_gbps, copy_bytes, copy_ms = measure_copy(device, timer)
    matmul_tflops, n, mm_ms = measure_matmul(device, dtype, timer)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Ceilings(
        copy_gbps=copy_gbps,
        copy_bytes=copy_bytes,
        matmul_tflops=matmul_tflops,
        matmul_n=n,
        matmul_dtype=dtype,
        copy_ms=copy_ms,
        matmul_ms=mm_ms,
    )

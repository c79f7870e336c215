"""Device ceilings measured once per run, with the same timers as the cases.

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


def _copy_ms(device: torch.device, nbytes: int) -> Timing:
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)

    def copy():
        dst.copy_(src)

    return time_fn(copy, device, estimate_ms=call_ms(copy, device))


def _matmul_ms(device: torch.device, dtype: torch.dtype, n: int) -> Timing:
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=gen).to(dtype)
    b = torch.randn(n, n, device=device, generator=gen).to(dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)

    def mm():
        torch.mm(a, b, out=c)

    call_ms(mm, device)
    return time_fn(mm, device, estimate_ms=call_ms(mm, device))


def measure(device: torch.device, dtype: torch.dtype) -> Ceilings:
    """Copy GB/s and matmul TFLOP/s of ``device`` (``dtype`` for the matmul)."""
    on_gpu = device.type == "cuda"
    nbytes = (1 << 30) if on_gpu else (256 << 20)
    copy_ms = _copy_ms(device, nbytes)
    sizes = (8192,) if on_gpu else (512, 1024, 2048)
    timed = {n: _matmul_ms(device, dtype, n) for n in sizes}
    n = max(sizes, key=lambda k: k**3 / timed[k].p50)
    mm_ms = timed[n]
    if on_gpu:
        torch.cuda.empty_cache()
    return Ceilings(
        copy_gbps=2 * nbytes / (copy_ms.p50 * 1e-3) / 1e9,
        copy_bytes=nbytes,
        matmul_tflops=2 * n**3 / (mm_ms.p50 * 1e-3) / 1e12,
        matmul_n=n,
        matmul_dtype=dtype,
        copy_ms=copy_ms,
        matmul_ms=mm_ms,
    )

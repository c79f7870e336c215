"""One pytest-benchmark test per (op, provider, shape, mode) of the suites (see conftest.py)."""

from __future__ import annotations

import math

import pytest
import torch

from .harness import BuildArgs, Skip, dtype_str, shape_str
from .timing import call_ms, synchronize, time_fn


def _step(prepared, mode: str, device: torch.device):
    """The timed function: grads reset, the call, the GPU synchronised."""

    def step():
        for t in prepared.leaves:
            t.grad = None
        out = prepared.fn()
        if mode == "fwd+bwd":
            out.backward()
        synchronize(device)
        return out

    return step


def _extra_info(case, prepared, device) -> dict:
    """The harness's timing of the same call (do_bench on CUDA: events, no host sync per
    call; grads reset by the timer), and the op's rates at its p50."""

    def call():
        out = prepared.fn()
        if case.mode == "fwd+bwd":
            out.backward()

    call_ms(call, device)
    timing = time_fn(call, device, grad_to_none=prepared.leaves, estimate_ms=call_ms(call, device))
    flops = case.op.flops(case.shape, case.mode)
    nbytes = case.op.nbytes(case.shape, case.mode, case.dtype.itemsize)
    seconds = timing.p50 * 1e-3
    return {
        "timer": "triton.testing.do_bench" if device.type == "cuda" else "perf_counter",
        "harness_p50_ms": timing.p50,
        "harness_p20_ms": timing.p20,
        "harness_p80_ms": timing.p80,
        "tflops": flops / seconds / 1e12,
        "gbps": nbytes / seconds / 1e9,
        "op": case.op.name,
        "provider": case.provider.name,
        "shape": shape_str(case.shape),
        "mode": case.mode,
        "dtype": dtype_str(case.dtype),
        "device": str(device),
        "note": prepared.note,
    }


def test_suite_case(bench_case, bench_device, bench_options, benchmark):
    case = bench_case
    try:
        prepared = case.provider.build(
            BuildArgs(case.op.name, case.shape, case.dtype, bench_device, 0, bench_options)
        )
    except Skip as exc:
        pytest.skip(str(exc))
    # the first call: the exact loss (a checksummed provider's later calls return a
    # placeholder, the timed calls paying for the op alone)
    first = prepared.fn()
    value = float(first.detach().float().reshape(-1)[0])
    assert math.isfinite(value), f"{case.id}: non-finite output {value}"
    del first
    step = _step(prepared, case.mode, bench_device)
    if not getattr(benchmark, "disabled", False):
        benchmark.extra_info.update(_extra_info(case, prepared, bench_device))
    benchmark(step)
    for t in prepared.leaves:
        if t.grad is not None and case.mode == "fwd+bwd":
            assert torch.isfinite(t.grad).all(), f"{case.id}: non-finite gradient"

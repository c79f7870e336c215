"""The benchmark suites as pytest-benchmark tests: ``pytest benchmarks --benchmark-only``.

One test per (op, provider, shape, mode) from the suite definitions (``test_suites.py``),
the ``quick`` profile on a GPU and the ``cpu`` profile otherwise. The timed function resets
the gradients, makes the call (``fwd``, or ``fwd+bwd``: forward and ``.backward()``) and
synchronises the GPU, so pytest-benchmark's wall-clock rounds measure the finished work.
The harness's own timing (``triton.testing.do_bench`` on CUDA) of the same call goes to
``extra_info`` with the op's FLOP/byte rates. ``--benchmark-disable`` runs every case once
(a smoke test; no harness timing).

Options (each also read from an environment variable, the option winning):

- ``--bench-profile cpu|cpu-quick|quick|full`` (``VLMKERNELS_BENCH_PROFILE``)
- ``--bench-ops a,b``: families or op names (``VLMKERNELS_BENCH_OPS``)
- ``--bench-providers a,b`` (``VLMKERNELS_BENCH_PROVIDERS``)
- ``--bench-shape KEY=V1,V2`` (repeatable, a key given twice takes both lists;
  ``VLMKERNELS_BENCH_SHAPE="N=64;d=32"``): replaces the values of KEY in the suites that
  have it (others are left alone)
- ``--bench-modes fwd,fwd+bwd``, ``--bench-dtype bf16|fp16|fp32``,
  ``--bench-compile-backend B`` (``aot_eager`` makes the compile provider quick on a CPU)

Without pytest-benchmark installed a stand-in ``benchmark`` fixture calls each case once.
"""

from __future__ import annotations

import gc
import importlib.util
import os
from dataclasses import dataclass, field

import pytest
import torch

from . import parse_shape, shape_options, suites
from .harness import PROFILES, TIMED_MODES, OpSpec, Provider, Suite, dtype_str, shape_str

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HAS_PLUGIN = importlib.util.find_spec("pytest_benchmark") is not None
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class BenchCase:
    suite: Suite
    op: OpSpec
    provider: Provider
    shape: dict = field(hash=False)
    mode: str
    dtype: torch.dtype

    @property
    def id(self) -> str:
        return f"{self.op.name}-{self.provider.name}-{shape_str(self.shape)}-{self.mode}"


def pytest_addoption(parser):
    g = parser.getgroup("vlmkernels benchmark suites")
    g.addoption("--bench-profile", choices=PROFILES, help="default: quick on a GPU, else cpu")
    g.addoption("--bench-ops", help="comma-separated families or op names (default: all)")
    g.addoption("--bench-providers", help="comma-separated provider names (default: all)")
    g.addoption("--bench-shape", action="append", default=[], metavar="KEY=V1,V2",
                help="replace KEY's values in the suites that have it (repeatable)")  # fmt: skip
    g.addoption("--bench-modes", help="subset of fwd,fwd+bwd (default: the suite's; each "
                "suite leaves out those it cannot time)")  # fmt: skip
    g.addoption("--bench-dtype", choices=sorted(DTYPES), help="default: bf16 GPU, fp32 CPU")
    g.addoption("--bench-compile-backend", help="torch.compile backend (default inductor)")


def _option(config, name: str):
    value = config.getoption(name.replace("-", "_").removeprefix("__"))
    if value:
        return value
    env = "VLMKERNELS_" + name.removeprefix("--").replace("-", "_").upper()
    if name == "--bench-shape":
        return [s for s in os.environ.get(env, "").split(";") if s.strip()]
    return os.environ.get(env) or None


def _list(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def _shapes(texts: list[str]) -> dict[str, list[int]]:
    """{key: sizes} of the repeated ``--bench-shape`` options, merged as bench's ``--shape``."""
    try:
        return shape_options(parse_shape(text) for text in texts)
    except ValueError as exc:
        raise pytest.UsageError(f"--bench-shape: {exc}") from None


def _selected(suite: Suite, op: OpSpec, wanted: list[str]) -> bool:
    return not wanted or suite.name in wanted or op.name in wanted


def collect_cases(config) -> list[BenchCase]:
    """Every (op, provider, shape, mode) the options select."""
    profile = _option(config, "--bench-profile") or ("quick" if DEVICE.type == "cuda" else "cpu")
    wanted = _list(_option(config, "--bench-ops"))
    providers = _list(_option(config, "--bench-providers"))
    modes = _list(_option(config, "--bench-modes"))
    dtype_name = _option(config, "--bench-dtype")
    overrides = _shapes(_option(config, "--bench-shape") or [])
    found = suites()
    known = set(found) | {op.name for s in found.values() for op in s.ops}
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise pytest.UsageError(f"--bench-ops: unknown {unknown}; known: {sorted(known)}")
    # the timed modes only: a "bwd" case would time the forward (test_suites._step)
    bad = [m for m in modes if m not in TIMED_MODES]
    if bad:
        raise pytest.UsageError(f"--bench-modes: {bad} not among {', '.join(TIMED_MODES)}")
    chosen = [s for s in found.values() if any(_selected(s, op, wanted) for op in s.ops)]
    names = {
        p.name for s in chosen for op in s.ops if _selected(s, op, wanted) for p in op.providers
    }
    if set(providers) - names:
        raise pytest.UsageError(f"--bench-providers: unknown {sorted(set(providers) - names)}; "
                                f"known: {sorted(names)}")  # fmt: skip
    keys = {k for s in chosen for k in s.sweep(profile)}
    if set(overrides) - keys:
        foreign = sorted(set(overrides) - keys)
        raise pytest.UsageError(f"--bench-shape: no selected suite has the key(s) {foreign} "
                                f"(keys: {sorted(keys)})")  # fmt: skip
    cases = []
    for suite in found.values():
        ops = [op for op in suite.ops if _selected(suite, op, wanted)]
        if not ops:
            continue
        grid = suite.sweep(profile)
        shapes = suite.shapes(profile, {k: v for k, v in overrides.items() if k in grid})
        dtype = DTYPES[dtype_name] if dtype_name else suite.default_dtype(DEVICE)
        suite_modes = [m for m in TIMED_MODES if m in suite.default_modes or m == "fwd+bwd"
                       and "bwd" in suite.default_modes]  # fmt: skip
        # a requested mode the suite cannot time (fwd+bwd of get_rope_index) is left out
        suite_modes = [m for m in modes or suite_modes if m in suite.modes]
        for op in ops:
            for shape in shapes:
                for p in op.providers:
                    if providers and p.name not in providers:
                        continue
                    for mode in suite_modes:
                        cases.append(BenchCase(suite, op, p, shape, mode, p.dtype or dtype))
    return cases


def pytest_generate_tests(metafunc):
    if "bench_case" not in metafunc.fixturenames:
        return
    params = []
    for case in collect_cases(metafunc.config):
        reason = case.provider.available(DEVICE) or case.provider.limit(case.shape)
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param(case, id=case.id, marks=marks))
    metafunc.parametrize("bench_case", params)


@pytest.fixture
def bench_options(request) -> dict:
    return {
        "compile_backend": _option(request.config, "--bench-compile-backend") or "inductor",
    }


@pytest.fixture
def bench_device() -> torch.device:
    return DEVICE


@pytest.fixture(autouse=True)
def _free_memory():
    yield
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


def pytest_sessionfinish(session, exitstatus):
    """Destroys a process group a suite created (the distributed suite's single rank)."""
    import sys

    for name, module in list(sys.modules.items()):
        group = getattr(module, "GROUP", None) if name.startswith("benchmarks.") else None
        if group is not None and hasattr(group, "release"):
            group.release()


def pytest_report_header(config):
    plugin = "pytest-benchmark" if HAS_PLUGIN else "no pytest-benchmark: each case runs once"
    return f"vlmkernels benchmark suites on {DEVICE} ({plugin}); dtype default " + dtype_str(
        torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    )


if not HAS_PLUGIN:

    class _OnceBenchmark:
        """Stand-in for pytest-benchmark's fixture: calls the function once."""

        disabled = True

        def __init__(self):
            self.extra_info: dict = {}

        def __call__(self, fn, *args, **kwargs):
            return fn(*args, **kwargs)

    @pytest.fixture
    def benchmark():
        return _OnceBenchmark()

"""Benchmarks of vlmkernels ops against their baselines: ``python -m benchmarks --help``.

Each op family is one module ``bench_<family>.py`` defining ``SUITE`` (a
:class:`benchmarks.harness.Suite`); :func:`suites` finds them, so adding a family is adding
that one module. Results go to ``benchmarks/results/<family>.csv`` (long format).
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def suites() -> dict:
    """{family name: Suite} for every ``bench_*`` module of this package."""
    found = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("bench_"):
            suite = importlib.import_module(f"{__name__}.{info.name}").SUITE
            found[suite.name] = suite
    return found

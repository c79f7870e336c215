"""Benchmarks of vlmkernels ops against their baselines: ``python -m benchmarks --help``.

Each op family is one module ``bench_<family>.py`` defining ``SUITE`` (a
:class:`benchmarks.harness.Suite`); :func:`suites` finds them, so adding a family is adding
that one module.

Output folders. ``python -m benchmarks`` (``vlmkernels bench``), ``vlmkernels report`` and
``vlmkernels profile`` write into :func:`output_dir` by default: ``$VLMKERNELS_RESULTS_DIR``,
else ``bench-results/`` in the current directory (git-ignored), so a run leaves the
checkout clean. The committed results, :data:`RESULTS_DIR` (``benchmarks/results/``), change
only when asked: ``--out benchmarks/results``. ``report`` reads both folders by default.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import tempfile
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
OUTPUT_ENV = "VLMKERNELS_RESULTS_DIR"
OUTPUT_DIR_NAME = "bench-results"


class UsageError(Exception):
    """A user error (a bad option value, an unreadable input): the commands print it as one
    line, ``<prog>: <message>``, and exit with status 2."""


def output_dir() -> Path:
    """The default output folder: ``$VLMKERNELS_RESULTS_DIR``, else ``./bench-results``."""
    env = os.environ.get(OUTPUT_ENV, "").strip()
    return Path(env).expanduser() if env else Path(OUTPUT_DIR_NAME)


def writable_dir(path: Path, option: str = "--out") -> Path:
    """``path``, created if missing, once a file could be created in it; else UsageError
    naming ``option`` (a file there, a parent that is a file, no permission). Called before
    anything is measured, so a bad folder costs nothing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {path}: is a file, expected a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise UsageError(f"{option} {path}: cannot write there ({why})") from None
    return path


def suites() -> dict:
    """{family name: Suite} for every ``bench_*`` module of this package."""
    found = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("bench_"):
            suite = importlib.import_module(f"{__name__}.{info.name}").SUITE
            found[suite.name] = suite
    return found

"""Benchmarks of vlmkernels ops against their baselines: ``python -m benchmarks --help``.

Each op family declares its suite module (``Family.bench_suite`` in the family's
``family.py``, e.g. ``"bench_rope"``): a module of this package defining ``SUITE`` (a
:class:`benchmarks.harness.Suite`); a family's further suites are the modules named
``<bench_suite>_<part>.py``. :func:`suites` finds them through the registered families, so
adding a family's benchmarks is its declaration plus that module. The issues' targets the
summaries judge are in :mod:`benchmarks.targets`.

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
import sys
from collections.abc import Callable
from pathlib import Path

from vlmkernels.core.configs import unwritable_folder

RESULTS_DIR = Path(__file__).resolve().parent / "results"
OUTPUT_ENV = "VLMKERNELS_RESULTS_DIR"
OUTPUT_DIR_NAME = "bench-results"


class UsageError(Exception):
    """A user error (a bad option value, an unreadable input): the commands print it as one
    line, ``<prog>: <message>``, and exit with status 2."""


def run_command(body: Callable[[list[str] | None, str], int], argv: list[str] | None,
                prog: str) -> int:  # fmt: skip
    """A command's exit status: ``body(argv, prog)``'s, or 2 after printing a
    :class:`UsageError` as ``<prog>: <message>`` on stderr."""
    try:
        return body(argv, prog)
    except UsageError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2


def output_dir() -> Path:
    """The default output folder: ``$VLMKERNELS_RESULTS_DIR``, else ``./bench-results``."""
    env = os.environ.get(OUTPUT_ENV, "").strip()
    return Path(env).expanduser() if env else Path(OUTPUT_DIR_NAME)


def output_label(out: Path | None) -> str:
    """What to blame for an unusable output folder: ``--out`` where the user gave it, else
    the variable or the default that chose it."""
    if out is not None:
        return "--out"
    if os.environ.get(OUTPUT_ENV, "").strip():
        return OUTPUT_ENV
    return "the default output folder (choose one with --out or $" + OUTPUT_ENV + ")"


def writable_dir(path: Path, option: str = "--out") -> Path:
    """``path``, created if missing, once a file could be created in it; else UsageError
    naming ``option`` (a file there, a parent that is a file, no permission). Called before
    anything is measured, so a bad folder costs nothing."""
    path = Path(path)
    why = unwritable_folder(path)
    if why is not None:
        raise UsageError(f"{option} {path}: {why}")
    return path


def parse_shape(text: str) -> tuple[str, list[int]]:
    """``KEY=INT[,INT...]`` of positive sizes as (key, sizes); ValueError saying what it
    wants otherwise (``--shape`` of bench, ``--bench-shape`` of pytest benchmarks)."""
    key, _, values = text.partition("=")
    try:
        ints = [int(v) for v in values.split(",") if v.strip()]
    except ValueError:
        ints = []
    if not key.strip() or not ints or min(ints) < 1:
        raise ValueError(f"wants KEY=INT[,INT...] of positive sizes, got {text!r}")
    return key.strip(), ints


def shape_options(pairs) -> dict[str, list[int]]:
    """{key: sizes} of repeated ``--shape KEY=INT[,INT...]`` options: a key given twice
    takes both lists (``--shape N=4 --shape N=8`` is ``N=4,8``), each size once."""
    out: dict[str, list[int]] = {}
    for key, values in pairs:
        out[key] = list(dict.fromkeys([*out.get(key, []), *values]))
    return out


def check_forced_backend() -> None:
    """A bad VLMKERNELS_BACKEND, or one that cannot run here (the CUDA C++ extension not
    built), fails every case: a UsageError before anything is measured (bench, profile)."""
    from vlmkernels.core.backend import cuda_backend_status, get_backend

    try:
        forced = get_backend()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if forced == "cuda":
        ok, why = cuda_backend_status()
        if not ok:
            raise UsageError(f"VLMKERNELS_BACKEND=cuda: the CUDA C++ backend is unavailable: "
                             f"{why}")  # fmt: skip


def suite_modules() -> dict[str, list[str]]:
    """{op family: its suite modules}, from the families' declarations.

    Each registered family (:func:`vlmkernels.core.family.families`; importing ``vlmkernels``
    registers them) names its suite module, ``Family.bench_suite`` (``"bench_rope"``); its
    further suites are the modules of this package named ``<bench_suite>_<part>``
    (``bench_rope_index``, ``bench_contrastive_dist``), each given to the family with the
    longest declared name it extends. A family declaring a module this package lacks is a
    LookupError.
    """
    import vlmkernels  # noqa: F401 - registers the op families
    from vlmkernels.core.family import families

    declared = {f.bench_suite: name for name, f in families().items() if f.bench_suite}
    here = sorted(m.name for m in pkgutil.iter_modules(__path__))
    absent = sorted(set(declared) - set(here))
    if absent:
        owners = ", ".join(f"{declared[m]} declares {m}" for m in absent)
        raise LookupError(f"no such benchmark suite module in {__path__[0]}: {owners}")
    found: dict[str, list[str]] = {name: [] for name in declared.values()}
    for module in here:
        owners = [m for m in declared if module == m or module.startswith(m + "_")]
        if owners:
            found[declared[max(owners, key=len)]].append(module)
    return found


def suites() -> dict:
    """{suite name: Suite} of every op family's suite modules (:func:`suite_modules`), each
    module's ``SUITE``."""
    found = {}
    for modules in suite_modules().values():
        for module in modules:
            suite = importlib.import_module(f"{__name__}.{module}").SUITE
            found[suite.name] = suite
    return found


def suite_family(suite_name: str) -> str:
    """The op family whose suite module defines the suite ``suite_name``."""
    for family, modules in suite_modules().items():
        for module in modules:
            if importlib.import_module(f"{__name__}.{module}").SUITE.name == suite_name:
                return family
    raise LookupError(f"no op family has the benchmark suite {suite_name!r}")

"""``python -m benchmarks [OPS...] [--quick|--full] [--providers ...] [--dtype ...] [--modes ...]
[--out DIR] [--plot]`` (also ``vlmkernels bench``)

OPS are family names (``contrastive``) or op names (``clip_loss``, ``siglip_loss``); none
means every family. On a GPU the default sweep is ``--full`` and ``--quick`` the small
one. Without a GPU the CPU sweep runs (small shapes, float32; about 2 minutes for every
suite on 2 cores), ``--quick`` the CPU quick sweep (the first shape of each suite's CPU
grid) and ``--full`` is ignored; the run says so at its start and its end, and that CPU
timings are not the GPU targets.

Modes: each suite times its own default modes (``fwd`` and ``fwd+bwd``; the rotary suite
also ``bwd``; ``get_rope_index`` only ``fwd``). With ``--modes``, each suite times the
requested modes it supports and names those it skips. ``--modes host`` (alone) measures
instead the host time per eager call of the ops that have a host budget in
:mod:`benchmarks.targets`, beside the eager formula's, in a fresh interpreter with Triton's
launcher stubbed (:mod:`benchmarks.host`), into ``<out>/host.csv``.

Output: one long-format CSV per suite, appended, in ``--out`` (default
:func:`benchmarks.output_dir`: ``$VLMKERNELS_RESULTS_DIR``, else ``./bench-results``,
git-ignored); the committed ``benchmarks/results/`` change only with ``--out
benchmarks/results``. The folder is checked before anything is measured. A progress bar
(tqdm when it is installed and stderr is a terminal, else a ``[k/n]`` line per finished
(op, shape, provider)) counts the cases; ``--plot`` writes PNG charts of the run per op
(:mod:`benchmarks.plots`, needs matplotlib) next to the CSVs. User errors (an unknown op,
mode or provider, an unwritable ``--out``) print one line, ``<prog>: <message>``, and exit
with status 2.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import torch

from . import (
    UsageError,
    check_forced_backend,
    host,
    output_dir,
    output_label,
    parse_shape,
    run_command,
    shape_options,
    suites,
    writable_dir,
)
from .ceilings import measure
from .env import GpuMonitor, collect, describe
from .harness import CPU_QUICK, MODES, RunConfig, Runner, dtype_str, shape_str
from .host import DEFAULT_CALLS
from .progress import Progress
from .report import CsvSink, ceiling_records, check_appendable, table

DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}
HOST = "host"
CPU_NOTE = (
    "CPU timings are not the GPU targets: the targets (README, 'Benchmarks') are H100/H200 "
    "times in bf16 at far larger shapes; a CPU run checks that every provider runs and agrees."
)


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _names(text: str) -> list[str]:
    """A non-empty comma-separated list of names (``--providers ,`` is a mistake, not
    'every provider')."""
    names = _csv_list(text)
    if not names:
        raise argparse.ArgumentTypeError(f"wants comma-separated names, got {text!r}")
    return names


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"wants a positive number of seconds, got {text!r}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"wants a positive integer, got {text!r}")
    return value


def _shape_arg(text: str) -> tuple[str, list[int]]:
    try:
        return parse_shape(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_args(argv: list[str] | None, prog: str = "python -m benchmarks") -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description="Benchmarks of vlmkernels ops.")
    p.add_argument("ops", nargs="*", help="families or op names (default: all)")
    sweep = p.add_mutually_exclusive_group()
    sweep.add_argument(
        "--quick",
        action="store_true",
        help="GPU: the small sweep; CPU: the first shape of each suite's CPU grid",
    )
    sweep.add_argument(
        "--full", action="store_true", help="GPU: the full sweep (default there); CPU: ignored"
    )
    p.add_argument("--providers", type=_names, help="comma-separated provider names")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument(
        "--modes",
        type=_csv_list,
        help=f"subset of {','.join(MODES)} (default: each suite's own; a suite skips, and "
        f"names, the modes it cannot time), or {HOST} alone: the host time per call of the "
        "ops with a host budget, beside the eager formula's (benchmarks/host.py)",
    )
    p.add_argument(
        "--host-calls",
        type=_positive,
        default=DEFAULT_CALLS,
        metavar="N",
        help=f"--modes {HOST}: timed calls per case (default {DEFAULT_CALLS})",
    )
    p.add_argument(
        "--shape",
        type=_shape_arg,
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="replace one key's values in the sweep, e.g. --shape N=65536 (repeatable)",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="CSV folder (default: $VLMKERNELS_RESULTS_DIR, else ./bench-results; the "
        "committed results: --out benchmarks/results)",
    )
    p.add_argument("--time-budget", type=_seconds, help="seconds; later cases are skipped")
    p.add_argument("--no-limits", action="store_true", help="run providers' capped sizes")
    p.add_argument("--compile-backend", default="inductor", help="backend of torch.compile")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--list", action="store_true", help="print the cases and exit")
    p.add_argument(
        "--plot", action="store_true", help="PNG charts per op into --out (needs matplotlib)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar or counter")
    return p.parse_args(argv)


def _overrides(shape_args, chosen: dict, profile: str) -> dict[str, dict]:
    """{suite: its --shape replacements}: a key applies to the suites whose grid has it
    (``--shape N=64 --shape S=64`` serves contrastive and rope in one run); a key no
    selected suite has is an error."""
    out = {name: {} for name in chosen}
    for key, values in shape_options(shape_args).items():
        hits = [name for name, s in chosen.items() if key in s.sweep(profile)]
        if not hits:
            keys = sorted({k for s in chosen.values() for k in s.sweep(profile)})
            raise UsageError(f"--shape: no selected suite has the key {key!r} (keys: {keys})")
        for name in hits:
            out[name][key] = values
    return out


def _select(tokens: list[str], available: dict) -> dict:
    """{suite name: [OpSpec]} for the requested families or ops."""
    if not tokens:
        return {name: list(s.ops) for name, s in available.items()}
    chosen: dict = {}
    for token in tokens:
        if token in available:
            chosen[token] = list(available[token].ops)
            continue
        for name, s in available.items():
            match = [op for op in s.ops if op.name == token]
            if match:
                ops = chosen.setdefault(name, [])
                ops.extend(op for op in match if op not in ops)
                break
        else:
            names = sorted(available) + sorted(op.name for s in available.values() for op in s.ops)
            raise UsageError(f"unknown op or family {token!r}; known: {', '.join(names)}")
    return chosen


def _with_providers(selection: dict, wanted: set[str]) -> tuple[dict, list[str]]:
    """(selection, notes): the ops that have one of the ``wanted`` providers, and a note for
    each op left out (it would print an empty table)."""
    kept, notes = {}, []
    for name, ops in selection.items():
        for op in ops:
            names = [p.name for p in op.providers]
            if wanted.intersection(names):
                kept.setdefault(name, []).append(op)
            else:
                notes.append(f"[{op.name}] has none of --providers {','.join(sorted(wanted))} "
                             f"(its providers: {', '.join(names)}): not run")  # fmt: skip
    return kept, notes


def _suite_modes(requested: list[str] | None, chosen: dict) -> tuple[dict, list[str]]:
    """({suite name: modes to time}, notes). Without ``requested`` each suite's default
    modes; with it, the requested modes each suite can time, a note naming those it skips
    (a suite that can time none of them is left out)."""
    if requested is not None:
        bad = [m for m in requested if m not in MODES]
        if bad or not requested:
            what = f"unknown mode(s) {bad}" if bad else "no mode given"
            raise UsageError(f"--modes: {what}; choose from {', '.join(MODES)}")
    modes, notes = {}, []
    for name, suite in chosen.items():
        if requested is None:
            modes[name] = tuple(suite.default_modes)
            continue
        kept = tuple(m for m in MODES if m in requested and m in suite.modes)
        skipped = [m for m in requested if m not in suite.modes]
        if skipped:
            what = f"skips {','.join(skipped)}" if kept else "is left out"
            asked = ",".join(requested)
            notes.append(f"{name}: times {','.join(suite.modes)} only; {what} (--modes {asked})")
        if kept:
            modes[name] = kept
    return modes, notes


def _cpu_banner(names: list[str], available, overrides, profile: str, args) -> None:
    """What a CPU run measures (the sweep of each suite), and that it is not the targets."""

    def sweep(name):
        grid = {**available[name].sweep(profile), **overrides[name]}
        return f"{name}: " + " x ".join(f"{k} in {v}" for k, v in grid.items())

    what = "CPU quick sweep" if profile == CPU_QUICK else "CPU sweep"
    print("=" * 78)
    print(f"No CUDA device found: running the {what} (" + "; ".join(map(sweep, names)) + ").")
    print(CPU_NOTE)
    if args.full:
        print("--full chooses the GPU's full sweep and is ignored here.")
    elif not args.quick:
        print("--quick runs the smallest CPU sweep (the first shape of each suite).")
    print("=" * 78)


class _CountingRunner(Runner):
    """The harness's runner, advancing a progress display after each (op, shape, provider)."""

    progress: Progress | None = None

    def _run_provider(self, op, provider, shape):
        try:
            return super()._run_provider(op, provider, shape)
        finally:
            if self.progress is not None:
                self.progress.step(f"{op.name} {shape_str(shape)} {provider.name}")


def _count_cases(runs, device: torch.device) -> int:
    """(op, shape, provider) triples the runs will build (unavailable providers excluded)."""
    total = 0
    for suite, ops, cfg in runs:
        n_shapes = len(suite.shapes(cfg.profile, cfg.shape_overrides))
        for op in ops:
            chosen = [p for p in op.providers if cfg.providers is None or p.name in cfg.providers]
            total += n_shapes * sum(1 for p in chosen if p.available(device) is None)
    return total


def _plot(out: Path, run_id: str, suite_name: str) -> None:
    from . import plots

    missing = plots.unavailable()
    if missing:
        print(f"--plot: {missing}; no charts written")
        return
    rows = [r for r in plots.read_rows([out / f"{suite_name}.csv"]) if r["run_id"] == run_id]
    for path in plots.charts(rows, out):
        print(f"chart {path}")


def main(argv: list[str] | None = None, prog: str = "python -m benchmarks") -> int:
    return run_command(_main, argv, prog)


def _main(argv: list[str] | None, prog: str) -> int:
    args = parse_args(argv, prog)
    available = suites()
    selection = _select(args.ops, available)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        profile = "quick" if args.quick else "full"
    else:
        profile = CPU_QUICK if args.quick else "cpu"
    chosen = {n: available[n] for n in selection}
    if args.modes and HOST in args.modes:
        if len(args.modes) > 1:
            raise UsageError(f"--modes {HOST} runs alone (host time, no kernel runs); got "
                             f"--modes {','.join(args.modes)}")  # fmt: skip
        check_forced_backend()
        return host.run(args, selection, available)
    overrides = _overrides(args.shape, chosen, profile)
    modes, mode_notes = _suite_modes(args.modes, chosen)
    known = {p.name for s in selection.values() for op in s for p in op.providers}
    if args.providers and not set(args.providers) <= known:
        unknown = sorted(set(args.providers) - known)
        raise UsageError(f"--providers: unknown {unknown}; known: {', '.join(sorted(known))}")
    if args.providers:
        selection, skipped = _with_providers(selection, set(args.providers))
        mode_notes += skipped
    check_forced_backend()

    runs = []
    for name, ops in selection.items():
        if name not in modes:
            continue
        suite = available[name]
        dtype = DTYPES[args.dtype] if args.dtype else suite.default_dtype(device)
        cfg = RunConfig(
            device=device,
            dtype=dtype,
            profile=profile,
            modes=modes[name],
            providers=frozenset(args.providers) if args.providers else None,
            shape_overrides=overrides[name],
            limits=not args.no_limits,
            time_budget_s=args.time_budget,
            options={"compile_backend": args.compile_backend},
            seed=args.seed,
        )
        try:
            suite.shapes(cfg.profile, cfg.shape_overrides)
        except KeyError as exc:
            raise UsageError(exc.args[0]) from None
        runs.append((suite, ops, cfg))

    if args.list:
        for note in mode_notes:
            print(note)
        for suite, ops, cfg in runs:
            for op in ops:
                for shape in suite.shapes(cfg.profile, cfg.shape_overrides):
                    for p in op.providers:
                        if cfg.providers is None or p.name in cfg.providers:
                            print(
                                f"{op.name} {p.name} {shape_str(shape)} {dtype_str(cfg.dtype)} "
                                f"{','.join(cfg.modes)}"
                            )
        return 0

    args.out = writable_dir(args.out or output_dir(), output_label(args.out))
    for suite, _, _ in runs:  # a foreign file there is refused, not rewritten
        check_appendable(args.out / f"{suite.name}.csv")
    if device.type != "cuda":
        _cpu_banner([r[0].name for r in runs], available, overrides, profile, args)
    for note in mode_notes:
        print(note)
    if not runs:
        print("nothing to run: no selected suite times the requested modes")
        return 0
    started = time.perf_counter()
    env = collect(device)
    monitor = GpuMonitor(device)
    run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    print(describe(env))
    print(f"run {run_id}; NVML {'on' if monitor.available else 'off (no pynvml or no GPU)'}")

    ceilings = {}
    progress = Progress(_count_cases(runs, device), enabled=not args.no_progress)
    with progress:
        errors = _run_all(runs, args, device, env, monitor, run_id, ceilings, progress)
    if device.type != "cuda":
        print("\n" + CPU_NOTE)
    print(f"total {time.perf_counter() - started:.0f} s; results in {args.out}")
    return 1 if errors else 0


def _run_all(runs, args, device, env, monitor, run_id, ceilings, progress) -> int:
    """Runs every suite, prints its tables and summary; returns the number of errors."""
    errors = 0
    for suite, ops, cfg in runs:
        out = args.out / f"{suite.name}.csv"
        sink = CsvSink(out, suite.name, suite.x_name, run_id, env)

        def ceilings_of(dtype, sink=sink, run_dtype=cfg.dtype):
            """The ceilings of ``dtype``, measured once per run; rows in each suite's CSV."""
            if dtype not in ceilings:
                c = ceilings[dtype] = measure(device, dtype)
                print(
                    f"ceilings: copy {c.copy_gbps:.1f} GB/s ({c.copy_bytes >> 20} MiB, "
                    f"read+write), matmul {c.matmul_tflops:.2f} TFLOP/s ({dtype_str(dtype)} "
                    f"{c.matmul_n}^3)"
                )
            if dtype != run_dtype:
                sink(ceiling_records(ceilings[dtype]))
            return ceilings[dtype]

        sink(ceiling_records(ceilings_of(cfg.dtype)))
        print(
            f"\n{suite.name}: profile {cfg.profile}, {dtype_str(cfg.dtype)}, modes "
            f"{','.join(cfg.modes)}"
        )
        runner = _CountingRunner(suite, cfg, ceilings[cfg.dtype], monitor, sink, ceilings_of)
        runner.progress = progress
        results = runner.run(ops)
        for op in ops:
            print(f"\n{op.name} ({dtype_str(cfg.dtype)}, {env.device})")
            print(table(results, op.name, suite.reference))
        if suite.summarize is not None:
            print()
            print("\n".join(suite.summarize(results, cfg)))
        skipped = [r for r in results.records if r.status == "skipped" and r.metric == "ms"]
        failed = [r for r in results.records if r.status == "error"]
        errors += len(failed)
        for r in failed:
            print(f"ERROR {r.case.op} {r.case.provider} {r.case.mode} {r.case.shape_str}: {r.note}")
        if skipped:
            print(f"{len(skipped)} case(s) skipped (see the CSV's status/note columns)")
        budget = sorted({r.case.shape_str for r in skipped if r.note.startswith("time budget")})
        if budget:
            print("shapes skipped for the time budget: " + "; ".join(budget))
        print(f"\nwrote {out}")
        if args.plot:
            _plot(args.out, run_id, suite.name)
    return errors


if __name__ == "__main__":
    sys.exit(main())

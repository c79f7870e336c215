"""``python -m benchmarks [OPS...] [--quick|--full] [--providers ...] [--dtype ...] [--out DIR]
[--plot]`` (also ``vlmkernels bench``)

OPS are family names (``contrastive``) or op names (``clip_loss``, ``siglip_loss``); none
means every family. On a GPU the default sweep is ``--full``; without one the CPU quick
suite runs (small shapes, float32), whatever the flags, and says so. A progress bar (tqdm
when it is installed and stderr is a terminal, else a ``[k/n]`` line per finished
(op, shape, provider)) counts the cases; ``--plot`` writes PNG charts of the run per op
(:mod:`benchmarks.plots`, needs matplotlib) next to the CSVs.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import torch

from . import RESULTS_DIR, suites
from .ceilings import measure
from .env import GpuMonitor, collect, describe
from .harness import MODES, RunConfig, Runner, dtype_str, shape_str
from .progress import Progress
from .report import CsvSink, ceiling_records, table

DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _shape_arg(text: str) -> tuple[str, list[int]]:
    key, _, values = text.partition("=")
    try:
        return key.strip(), [int(v) for v in _csv_list(values)]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--shape wants KEY=INT[,INT...], got {text!r}") from exc


def parse_args(argv: list[str] | None, prog: str = "python -m benchmarks") -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description="Benchmarks of vlmkernels ops.")
    p.add_argument("ops", nargs="*", help="families or op names (default: all)")
    sweep = p.add_mutually_exclusive_group()
    sweep.add_argument("--quick", action="store_true", help="GPU: the small sweep")
    sweep.add_argument("--full", action="store_true", help="GPU: the full sweep (default)")
    p.add_argument("--providers", type=_csv_list, help="comma-separated provider names")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--modes", type=_csv_list, help=f"subset of {','.join(MODES)}")
    p.add_argument(
        "--shape",
        type=_shape_arg,
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="replace one key's values in the sweep, e.g. --shape N=65536 (repeatable)",
    )
    p.add_argument(
        "--out", type=Path, default=RESULTS_DIR, help="CSV directory (default benchmarks/results)"
    )
    p.add_argument("--time-budget", type=float, help="seconds; later cases are skipped")
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
    for key, values in shape_args:
        hits = [name for name, s in chosen.items() if key in s.grid(profile)]
        if not hits:
            keys = sorted({k for s in chosen.values() for k in s.grid(profile)})
            raise SystemExit(f"no selected suite has the shape key {key!r} (keys: {keys})")
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
            raise SystemExit(f"unknown op or family {token!r}; known: {', '.join(names)}")
    return chosen


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
    args = parse_args(argv, prog)
    available = suites()
    selection = _select(args.ops, available)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    profile = ("quick" if args.quick else "full") if device.type == "cuda" else "cpu"
    overrides = _overrides(args.shape, {n: available[n] for n in selection}, profile)

    if device.type != "cuda":
        grids = "; ".join(
            f"{name}: "
            + " x ".join(
                f"{k} in {v}" for k, v in {**available[name].grid("cpu"), **overrides[name]}.items()
            )
            for name in selection
        )
        print("=" * 78)
        print("No CUDA device found: running the CPU quick suite (" + grids + ").")
        if args.quick or args.full:
            print("--quick/--full choose GPU sweeps and are ignored here.")
        print("=" * 78)

    modes = tuple(args.modes or next(iter(available[n] for n in selection)).default_modes)
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise SystemExit(f"unknown mode(s) {bad}; choose from {MODES}")
    known = {p.name for s in selection.values() for op in s for p in op.providers}
    if args.providers and not set(args.providers) <= known:
        raise SystemExit(f"unknown provider(s) {set(args.providers) - known}; known: {known}")

    runs = []
    for name, ops in selection.items():
        suite = available[name]
        dtype = DTYPES[args.dtype] if args.dtype else suite.default_dtype(device)
        cfg = RunConfig(
            device=device,
            dtype=dtype,
            profile=profile,
            modes=modes,
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
            raise SystemExit(exc.args[0]) from None
        runs.append((suite, ops, cfg))

    if args.list:
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
    print(f"total {time.perf_counter() - started:.0f} s")
    return 1 if errors else 0


def _run_all(runs, args, device, env, monitor, run_id, ceilings, progress) -> int:
    """Runs every suite, prints its tables and summary; returns the number of errors."""
    errors = 0
    for suite, ops, cfg in runs:
        if cfg.dtype not in ceilings:
            c = measure(device, cfg.dtype)
            ceilings[cfg.dtype] = c
            print(
                f"ceilings: copy {c.copy_gbps:.1f} GB/s ({c.copy_bytes >> 20} MiB, read+write), "
                f"matmul {c.matmul_tflops:.2f} TFLOP/s ({dtype_str(cfg.dtype)} {c.matmul_n}^3)"
            )
        out = args.out / f"{suite.name}.csv"
        sink = CsvSink(out, suite.name, suite.x_name, run_id, env)
        sink(ceiling_records(ceilings[cfg.dtype]))
        print(
            f"\n{suite.name}: profile {cfg.profile}, {dtype_str(cfg.dtype)}, modes "
            f"{','.join(cfg.modes)}"
        )
        runner = _CountingRunner(suite, cfg, ceilings[cfg.dtype], monitor, sink)
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

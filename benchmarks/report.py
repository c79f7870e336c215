"""Long-format CSV output, the console tables, and the markdown summary of the CSVs.

One CSV per op family (``<out>/<suite>.csv``), one row per (case, metric), appended as each
case ends. A results CSV written with other columns is rewritten once with the union of
both; a file that is not a results CSV is refused (:func:`check_appendable`).

``python -m benchmarks.report [--results DIR ...] [--out DIR]`` (``vlmkernels report``) turns
the CSVs into ``SUMMARY.md``: one table per op, device and dtype from the latest run, and the
charts of :mod:`benchmarks.plots` next to it. It reads the ``*.csv`` of every ``--results``
folder (default: the committed ``benchmarks/results/`` and the output folder of ``bench``,
:func:`benchmarks.output_dir`, where they exist) and writes into ``--out`` (default that output
folder, git-ignored; a path ending in ``.md`` names the markdown file itself). The committed
summary is rewritten only when asked: ``--results benchmarks/results --out
benchmarks/results``. A CSV without the columns the summary reads, or that cannot be read, is a
one-line error naming the file (exit status 2).
"""

from __future__ import annotations

import csv
import math
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from vlmkernels.core.files import replaced

from . import RESULTS_DIR, UsageError, output_dir, output_label, run_command, writable_dir
from .ceilings import Ceilings
from .env import SAMPLE_COLUMNS, Environment
from .harness import Case, Record, Results, dtype_str

RUN_COLUMNS = ["timestamp", "run_id", "suite"]
CASE_COLUMNS = ["op", "provider", "mode", "shape", "x_name", "x_value", "dtype"]
VALUE_COLUMNS = ["metric", "unit", "p50", "p20", "p80", "status", "note"]
ENV_COLUMNS = list(Environment.__dataclass_fields__)
CLOCK_COLS = [f"{c}_{w}" for c in SAMPLE_COLUMNS for w in ("before", "after")] + ["throttled"]
COLUMNS = RUN_COLUMNS + CASE_COLUMNS + VALUE_COLUMNS + ENV_COLUMNS + CLOCK_COLS
# what the summary and the charts read from every row
REPORT_COLUMNS = ["timestamp", "run_id", "op", "provider", "mode", "shape", "dtype", "metric"]
REPORT_COLUMNS += ["p50", "status", "note", "device", "torch", "triton", "cuda", "driver"]


def now_utc() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}" if math.isfinite(v) else str(v)
    return str(v)


class CsvSink:
    """Appends records of one suite to ``path`` with the run's environment on every row."""

    def __init__(self, path: Path, suite: str, x_name: str, run_id: str, env: Environment):
        self.path, self.suite, self.x_name, self.run_id = path, suite, x_name, run_id
        self.env = env.as_row()
        self.columns = self._prepare_header()

    def _prepare_header(self) -> list[str]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _drop_partial_row(self.path)
        if not self.path.exists() or self.path.stat().st_size == 0:
            with self.path.open("w", newline="") as f:
                csv.writer(f).writerow(COLUMNS)
            return list(COLUMNS)
        with self.path.open(newline="") as f:
            header = next(csv.reader(f), [])
        if header == COLUMNS:
            return list(COLUMNS)
        with self.path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        columns = COLUMNS + [c for c in header if c not in COLUMNS]
        # whole or not at all: rewritten in place, an interruption part-way (Ctrl-C, a full
        # disk) lost every result the file held
        with replaced(self.path, newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns)
            w.writeheader()
            w.writerows(rows)
        return columns

    def row(self, r: Record) -> dict[str, str]:
        shape = dict(r.case.shape)
        out = {
            "timestamp": now_utc(),
            "run_id": self.run_id,
            "suite": self.suite,
            "op": r.case.op,
            "provider": r.case.provider,
            "mode": r.case.mode,
            "shape": r.case.shape_str,
            "x_name": self.x_name if self.x_name in shape else "",
            "x_value": _fmt(shape.get(self.x_name)),
            "dtype": r.case.dtype,
            "metric": r.metric,
            "unit": r.unit,
            "p50": _fmt(r.p50),
            "p20": _fmt(r.p20),
            "p80": _fmt(r.p80),
            "status": r.status,
            "note": r.note,
            **self.env,
            "throttled": r.throttled,
        }
        for c in SAMPLE_COLUMNS:
            out[f"{c}_before"] = _fmt(r.before.get(c))
            out[f"{c}_after"] = _fmt(r.after.get(c))
        return out

    def __call__(self, records: Sequence[Record]) -> None:
        if not records:
            return
        with self.path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            w.writerows(self.row(r) for r in records)


def _drop_partial_row(path: Path) -> None:
    """Cuts a last line without its newline (a run killed mid-write): the rows appended
    next would otherwise continue it, and the file would no longer read as a results CSV."""
    if not path.is_file():
        return
    with path.open("rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def check_appendable(path: Path) -> None:
    """UsageError unless ``path`` is missing, empty or a results CSV (its header has
    :data:`REPORT_COLUMNS`): checked before a run appends to it, so a foreign file in
    ``--out`` is neither rewritten nor measured for."""
    if not path.exists() or path.stat().st_size == 0:
        return
    try:
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UsageError(f"{path}: cannot read it ({type(exc).__name__}: {exc})") from None
    missing = [c for c in REPORT_COLUMNS if c not in header]
    if missing:
        raise UsageError(f"{path}: not a benchmark results CSV (missing the column(s) "
                         f"{', '.join(missing)}); move it or choose another --out")  # fmt: skip


def ceiling_records(c: Ceilings) -> list[Record]:
    """The run's ceilings as rows of the pseudo-op ``ceiling`` (provider torch)."""
    copy = Case("ceiling", "torch", "", (("bytes", c.copy_bytes),), "uint8")
    mm = Case("ceiling", "torch", "", (("n", c.matmul_n),), dtype_str(c.matmul_dtype))
    return [
        Record(copy, "copy_gbps", c.copy_gbps, unit="GB/s (read + write)", note="dst.copy_(src)"),
        Record(copy, "ms", c.copy_ms.p50, c.copy_ms.p20, c.copy_ms.p80),
        Record(mm, "matmul_tflops", c.matmul_tflops, unit="TFLOP/s (2 n^3)", note="torch.mm"),
        Record(mm, "ms", c.matmul_ms.p50, c.matmul_ms.p20, c.matmul_ms.p80),
    ]


def _num(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "-"
    if not math.isfinite(v):  # a run can write nan or inf (_fmt)
        return str(v)
    if v == 0 or abs(v) >= 10 ** (digits - 1):
        return f"{v:.0f}"
    return f"{v:.{max(0, digits - 1 - math.floor(math.log10(abs(v))))}f}"


def table(results: Results, op: str, reference: str) -> str:
    """One line per (shape, mode, provider): time, memory, throughput, ceilings, and the
    reference provider's speed-up over (and memory ratio to) each other provider."""
    by_case: dict[Case, dict[str, Record]] = {}
    for r in results.records:
        if r.case.op == op and r.case.mode:
            by_case.setdefault(r.case, {})[r.metric] = r
    # a provider computing in another dtype than the run's (fp32 modules in a bf16 run) is
    # compared with the reference's rows, in the run's dtype
    ref_dtype = next((c.dtype for c in by_case if c.provider == reference), None)
    header = (
        f"{'shape':<18} {'mode':<8} {'provider':<11} {'ms p50':>10} {'peak MiB':>9} "
        f"{'TFLOP/s':>8} {'%mm':>6} {'GB/s':>8} {'%copy':>6} "
        f"{reference + ' speed-up':>20} {'mem ratio':>9}"
    )
    lines = [header, "-" * len(header)]
    for case, metrics in by_case.items():
        ms = metrics.get("ms")
        if ms is None:
            continue
        time_txt = _num(ms.p50) if ms.ok else ms.status
        if ms.throttled == "yes":
            time_txt += "*"
        mem = metrics.get("peak_mem_mb")
        mem_txt = _num(mem.p50) if mem is not None and mem.ok else ("n/m" if ms.ok else "")

        def val(name, metrics=metrics):
            rec = metrics.get(name)
            return _num(rec.p50) if rec is not None and rec.ok else ""

        speed = mem_ratio = ""
        if case.provider != reference:
            ref = Case(case.op, reference, case.mode, case.shape, ref_dtype or case.dtype)
            s = results.find(ref, f"speedup_vs_{case.provider}")
            m = results.find(ref, f"mem_ratio_vs_{case.provider}")
            speed = f"{_num(s.p50)}x" if s is not None else ""
            mem_ratio = _num(m.p50) if m is not None else ""
        lines.append(
            f"{case.shape_str:<18} {case.mode:<8} {case.provider:<11} {time_txt:>10} "
            f"{mem_txt:>9} {val('tflops'):>8} {val('pct_matmul_ceiling'):>6} "
            f"{val('gbps'):>8} {val('pct_copy_ceiling'):>6} {speed:>20} {mem_ratio:>9}"
        )
    if any(r.throttled == "yes" for r in results.records if r.case.op == op):
        lines.append("* clocks throttled during the case (NVML reasons or violation counters)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Markdown summary of the CSVs (``vlmkernels report`` / ``python -m benchmarks.report``)
# --------------------------------------------------------------------------------------

SUMMARY_HEADER = """# Benchmark summary

Generated by `vlmkernels report` (or `python -m benchmarks.report`) from
{sources}; do not edit by hand. One table per op and device, from the
latest run that measured the op on that device (its run id, date, commit and versions
above the table). Times are p50 milliseconds (CUDA: `triton.testing.do_bench`; CPU:
`time.perf_counter` repetitions; `bwd` = p50(fwd+bwd) - p50(fwd)). Speed-up = the other
provider's ms / the reference's ms (> 1: the reference is faster). % of ceiling: the
reference's rate from the op's FLOP or byte model against the ceiling measured in the same
run (matmul TFLOP/s or copy GB/s, whichever the op comes closer to). `*`: the clocks
throttled during the case (NVML). A status instead of a time: the case did not run
(`oom`, `skipped`, `error`, `below_noise`). Compare numbers within one table only.

Charts (time and % of ceiling against size, one line per provider) are written next to
this file when matplotlib is installed; they are git-ignored, so run the command to see
them.
"""


def _cell_ms(row: dict | None) -> str:
    if row is None:
        return ""
    if row["status"] != "ok" or not row["p50"]:
        return row["status"]
    return _num(float(row["p50"])) + ("*" if row.get("throttled") == "yes" else "")


def _ceiling_line(rows: list[dict], run_id: str) -> str:
    parts = []
    for r in rows:
        if r["run_id"] != run_id or r["op"] != "ceiling" or not r["p50"]:
            continue
        if r["metric"] == "copy_gbps":
            parts.append(f"copy {float(r['p50']):.1f} GB/s")
        elif r["metric"] == "matmul_tflops":
            n = r["shape"].removeprefix("n=")
            parts.append(f"matmul {float(r['p50']):.3g} TFLOP/s ({r['dtype']} {n}^3)")
    return ", ".join(dict.fromkeys(parts)) or "not recorded"


def op_table(group: list[dict], all_rows: list[dict]) -> list[str]:
    """The markdown lines of one (op, device, dtype) group (rows of one run)."""
    from .plots import CEILING_METRICS, binding_ceiling

    first = group[0]
    run_id = first["run_id"]
    dtype = next((r["dtype"] for r in group if r["dtype"]), "")
    full = first.get("git_commit", "")
    commit = (full[:12] + ("-dirty" if full.endswith("-dirty") else "")) or "?"
    lines = [
        f"## {first['op']}: {first['device']}, {dtype}",
        "",
        f"Run `{run_id}` ({first['timestamp']}), commit `{commit}`, torch {first['torch']}, "
        f"triton {first['triton']}, CUDA {first['cuda'] or '-'}, driver "
        f"{first['driver'] or '-'}; ceilings: {_ceiling_line(all_rows, run_id)}.",
        "",
    ]
    cases = [r for r in group if r["mode"] and r["metric"] == "ms"]
    providers = list(dict.fromkeys(r["provider"] for r in cases))
    refs = {r["provider"] for r in group if r["metric"].startswith("speedup_vs_")}
    ref = "vlmkernels" if "vlmkernels" in providers else (sorted(refs) or providers or [""])[0]
    others = [p for p in providers if p != ref]
    ceiling = binding_ceiling(group)
    index = {(r["shape"], r["mode"], r["provider"], r["metric"]): r for r in group}
    has_mem = any(r["metric"] == "peak_mem_mb" and r["status"] == "ok" for r in group)
    header = ["shape", "mode", *(f"{p} ms" for p in providers)]
    header += [f"vs {p}" for p in others]
    if ceiling:
        header.append(f"{ref} % {CEILING_METRICS[ceiling]}")
    if has_mem:
        header.append(f"{ref} MiB")
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    omitted = 0
    shapes = list(dict.fromkeys(r["shape"] for r in cases))
    order = {"fwd": 0, "bwd": 1, "fwd+bwd": 2}
    keys = sorted(
        dict.fromkeys((r["shape"], r["mode"]) for r in cases),
        key=lambda k: (shapes.index(k[0]), order.get(k[1], 3)),
    )
    for shape, mode in keys:
        ms = [index.get((shape, mode, p, "ms")) for p in providers]
        if all(r is None or r["status"] == "skipped" for r in ms):
            omitted += 1
            continue
        cells = [shape.replace(",", ", "), mode, *(_cell_ms(r) for r in ms)]
        for p in others:
            s = index.get((shape, mode, ref, f"speedup_vs_{p}"))
            cells.append(f"{_num(float(s['p50']))}x" if s and s["p50"] else "")
        if ceiling:
            c = index.get((shape, mode, ref, ceiling))
            cells.append(_num(float(c["p50"])) if c and c["status"] == "ok" and c["p50"] else "")
        if has_mem:
            m = index.get((shape, mode, ref, "peak_mem_mb"))
            cells.append(_num(float(m["p50"])) if m and m["status"] == "ok" and m["p50"] else "")
        lines.append("| " + " | ".join(cells) + " |")
    notes = []
    if omitted:
        notes.append(f"{omitted} (shape, mode) row(s) skipped by every provider are omitted")
    for r in group:
        if r["status"] == "unavailable":
            notes.append(f"`{r['provider']}` not run: {r['note']}")
    if any(r.get("throttled") == "yes" for r in group):
        notes.append("`*` clocks throttled during the case")
    if notes:
        lines += ["", *(f"- {n}" for n in dict.fromkeys(notes))]
    return lines + [""]


def summary_markdown(rows: list[dict], sources: str = "`benchmarks/results/*.csv`") -> str:
    """The whole summary: :data:`SUMMARY_HEADER` (naming ``sources``, the CSVs read) then
    one table per (op, device, dtype)."""
    from .plots import latest_runs

    out = [SUMMARY_HEADER.format(sources=sources)]
    groups = latest_runs(rows)
    host = host_section(rows)
    if not groups and not host:
        out.append("No benchmark rows found.\n")
    for group in groups.values():
        out.append("\n".join(op_table(group, rows)))
    out += host
    return "\n".join(out).rstrip() + "\n"


def host_section(rows: list[dict]) -> list[str]:
    """The latest host-time run per device (``--modes host``, :mod:`benchmarks.host`): a
    table of each budgeted op's host us, the eager formula's and the budget; [] without one."""
    from .host import HOST_METRIC, rows_table

    last: dict[str, tuple[str, str]] = {}
    for r in rows:
        if r["metric"] == HOST_METRIC:
            stamp = (r["timestamp"], r["run_id"])
            last[r["device"]] = max(last.get(r["device"], stamp), stamp)
    out = []
    for device, (_, run_id) in last.items():
        run = [r for r in rows if r["run_id"] == run_id and r["metric"] == HOST_METRIC]
        first = run[0]
        full = first.get("git_commit", "")
        commit = (full[:12] + ("-dirty" if full.endswith("-dirty") else "")) or "?"
        out.append("\n".join([
            f"## Host time per call: {device}",
            "",
            f"Run `{run_id}` ({first['timestamp']}), commit `{commit}`, torch {first['torch']}, "
            f"triton {first['triton']}. `python -m benchmarks --modes host`: microseconds of "
            "host time per eager call (median), Triton's launcher stubbed (TRITON_INTERPRET=1, "
            "float32 CPU tensors at the shape shown), beside the eager formula's; the budgets "
            "are those of `benchmarks/targets.py` (issue 11).",
            "",
            *rows_table(run, markdown=True),
            "",
        ]))  # fmt: skip
    return out


_MEASURED = ("p50", "p20", "p80")  # numbers, nan and inf included (or empty: a failed case)


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _shape_ok(text: str) -> bool:
    """An empty shape, or KEY=INT parts joined by commas (what :func:`shape_str` writes)."""
    for part in filter(None, text.split(",")):
        key, sep, value = part.partition("=")
        if not key or not sep or not value.lstrip("-").isdigit():
            return False
    return True


def read_csvs(paths: Sequence[Path]) -> list[dict[str, str]]:
    """The rows of ``paths``, each file checked for :data:`REPORT_COLUMNS`; UsageError
    naming the file when one cannot be read, lacks a column or has a measured cell that is
    not a number. Cells missing from a short (truncated) row read as empty."""
    rows: list[dict[str, str]] = []
    for path in paths:
        try:
            with path.open(newline="") as f:
                reader = csv.DictReader(f)
                missing = [c for c in REPORT_COLUMNS if c not in (reader.fieldnames or [])]
                if missing:
                    raise UsageError(
                        f"{path}: not a benchmark results CSV: missing the column(s) "
                        f"{', '.join(missing)}"
                    )
                for row in reader:
                    row = {k: v or "" for k, v in row.items() if k is not None}
                    bad = [c for c in _MEASURED if row.get(c) and not _number(row[c])]
                    if not _shape_ok(row.get("shape", "")):
                        raise UsageError(
                            f"{path}, line {reader.line_num}: not a benchmark results CSV: "
                            f"shape={row['shape']!r} is not KEY=INT[,KEY=INT...]"
                        )
                    if bad:
                        raise UsageError(
                            f"{path}, line {reader.line_num}: not a benchmark results CSV: "
                            f"{bad[0]}={row[bad[0]]!r} is not a number"
                        )
                    rows.append(row)
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise UsageError(f"{path}: cannot read it ({type(exc).__name__}: {exc})") from None
    return rows


def _summary_path(out: Path, label: str = "--out") -> Path:
    """``out/SUMMARY.md``, or ``out`` itself when it names a ``.md`` file; its folder is
    created and checked before anything is read (UsageError naming ``label`` otherwise)."""
    if out.suffix.lower() == ".md":
        if out.is_dir():
            raise UsageError(f"{label} {out}: is a folder, expected a folder or a .md file path")
        writable_dir(out.parent, f"{label} {out}: its folder")
        return out
    return writable_dir(out, label) / "SUMMARY.md"


def main(argv: list[str] | None = None, prog: str = "python -m benchmarks.report") -> int:
    return run_command(_main, argv, prog)


def _main(argv: list[str] | None, prog: str) -> int:
    import argparse

    from . import plots

    p = argparse.ArgumentParser(prog=prog, description="Markdown summary (and charts) of the "
                                "benchmark CSVs: the latest run per op and device.")  # fmt: skip
    p.add_argument(
        "--results",
        type=Path,
        action="append",
        metavar="DIR",
        help="folder of <suite>.csv files (repeatable; default: benchmarks/results and the "
        "output folder, $VLMKERNELS_RESULTS_DIR or ./bench-results, where they exist)",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="folder for SUMMARY.md and the charts, or a .md file (default: the output "
        "folder; the committed summary: --results benchmarks/results --out benchmarks/results)",
    )
    p.add_argument("--no-charts", action="store_true", help="markdown only")
    args = p.parse_args(argv)
    folders = args.results or [d for d in (RESULTS_DIR, output_dir()) if d.is_dir()]
    folders = list({d.resolve(): d for d in folders}.values())
    for d in folders:
        if not d.is_dir():
            raise UsageError(f"--results {d}: not a folder")
    paths = sorted(path for d in folders for path in d.glob("*.csv"))
    if not paths:
        where = ", ".join(str(d) for d in folders) or f"{RESULTS_DIR} or {output_dir()}"
        raise UsageError(f"no CSV files in {where}")
    out = _summary_path(args.out or output_dir(), output_label(args.out))
    rows = read_csvs(paths)
    sources = ", ".join(f"`{_shown(d)}/*.csv`" for d in folders if any(d.glob("*.csv")))
    try:
        out.write_text(summary_markdown(rows, sources))
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot write it ({exc.strerror or exc})") from None
    tables = len(plots.latest_runs(rows)) + len(host_section(rows))
    print(f"wrote {out} ({tables} tables from {len(paths)} CSV files)")
    if args.no_charts:
        return 0
    missing = plots.unavailable()
    if missing:
        print(f"no charts: {missing}")
        return 0
    for path in plots.charts(rows, out.parent):
        print(f"chart {path}")
    return 0


def _shown(folder: Path) -> str:
    """``folder`` relative to the checkout when it is inside it (stable across clones)."""
    root = Path(__file__).resolve().parent.parent
    try:
        return str(folder.resolve().relative_to(root))
    except ValueError:
        return str(folder)


if __name__ == "__main__":
    sys.exit(main())

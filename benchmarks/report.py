"""Long-format CSV output and the console tables.

One CSV per op family (``<out>/<suite>.csv``), one row per (case, metric), appended as each
case ends. A file written with other columns is rewritten once with the union of both.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from .ceilings import Ceilings
from .env import SAMPLE_COLUMNS, Environment
from .harness import Case, Record, Results, dtype_str

RUN_COLUMNS = ["timestamp", "run_id", "suite"]
CASE_COLUMNS = ["op", "provider", "mode", "shape", "x_name", "x_value", "dtype"]
VALUE_COLUMNS = ["metric", "unit", "p50", "p20", "p80", "status", "note"]
ENV_COLUMNS = list(Environment.__dataclass_fields__)
CLOCK_COLS = [f"{c}_{w}" for c in SAMPLE_COLUMNS for w in ("before", "after")] + ["throttled"]
COLUMNS = RUN_COLUMNS + CASE_COLUMNS + VALUE_COLUMNS + ENV_COLUMNS + CLOCK_COLS


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
        with self.path.open("w", newline="") as f:
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
            ref = Case(case.op, reference, case.mode, case.shape, case.dtype)
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

"""Charts of benchmark results (``--plot`` of the bench command, and ``report``).

One PNG per (op, device, dtype) from the latest run in the rows given: a column per mode;
top row the p50 time against the op's size key (the suite's ``x_name``, log scale), bottom
row the percent of the ceiling the op comes closest to (matmul TFLOP/s for the contrastive
losses, copy GB/s for the rotary ops), one line per provider (and per value of the other
shape keys when they vary). Only ``ok`` points are drawn. Needs matplotlib (imported
lazily, Agg backend); the row helpers below are plain Python.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

MODE_ORDER = ("fwd", "bwd", "fwd+bwd")
CEILING_METRICS = {"pct_matmul_ceiling": "matmul", "pct_copy_ceiling": "copy"}


def unavailable() -> str | None:
    """None when charts can be drawn, else the reason."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
    return None


def read_rows(paths: Iterable[Path]) -> list[dict[str, str]]:
    """The rows of the long-format CSVs that exist among ``paths``."""
    rows: list[dict[str, str]] = []
    for path in paths:
        if Path(path).is_file():
            with Path(path).open(newline="") as f:
                rows.extend(csv.DictReader(f))
    return rows


def value(row: dict[str, str]) -> float | None:
    """p50 of an ``ok`` row, else None."""
    if row.get("status") != "ok" or not row.get("p50"):
        return None
    try:
        return float(row["p50"])
    except ValueError:
        return None


def shape_dict(text: str) -> dict[str, int]:
    out = {}
    for part in filter(None, text.split(",")):
        key, _, v = part.partition("=")
        out[key] = int(v)
    return out


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def latest_runs(
    rows: Sequence[dict[str, str]],
) -> dict[tuple[str, str, str], list[dict[str, str]]]:
    """{(op, device, dtype): rows of the latest run measuring that op on that device in that
    dtype} (case rows only, in file order; ceilings are rows of the pseudo-op ``ceiling``,
    kept per run; the host-time rows, metric ``host_us``, are a section of their own in the
    summary). A later bf16 run does not hide an fp32 one; a later run of the same op, device
    and dtype does, whatever providers it timed (speed-ups compare within one run)."""
    last: dict[tuple[str, str, str], tuple[str, str]] = {}
    for r in rows:
        if r["op"] == "ceiling" or not r["mode"] or r["metric"] == "host_us":
            continue
        key = (r["op"], r["device"], r["dtype"])
        stamp = (r["timestamp"], r["run_id"])
        if key not in last or stamp > last[key]:
            last[key] = stamp
    out: dict[tuple[str, str, str], list[dict[str, str]]] = {}
    for (op, device, dtype), (_, run_id) in last.items():
        # a provider's unavailable row has no dtype
        out[op, device, dtype] = [
            r for r in rows if r["run_id"] == run_id and r["op"] == op
            and r["device"] == device and r["dtype"] in (dtype, "")
        ]  # fmt: skip
    return out


def binding_ceiling(rows: Sequence[dict[str, str]]) -> str | None:
    """The ``pct_*_ceiling`` metric with the larger median over the rows, or None."""
    best, best_median = None, 0.0
    for metric in CEILING_METRICS:
        vals = sorted(v for r in rows if r["metric"] == metric and (v := value(r)) is not None)
        if vals and vals[len(vals) // 2] > best_median:
            best, best_median = metric, vals[len(vals) // 2]
    return best


def _x_key(rows: Sequence[dict[str, str]]) -> str | None:
    """The suite's size key when every measured row has it, else the most varied key."""
    measured = [r for r in rows if r["metric"] == "ms" and value(r) is not None]
    names = {r.get("x_name", "") for r in measured}
    if len(names) == 1 and "" not in names:
        return names.pop()
    counts: dict[str, set[int]] = {}
    for r in measured:
        for k, v in shape_dict(r["shape"]).items():
            counts.setdefault(k, set()).add(v)
    return max(counts, key=lambda k: len(counts[k])) if counts else None


def series(rows: Sequence[dict[str, str]], metric: str, mode: str, x_key: str) -> dict:
    """{(provider, other keys): sorted [(x, p50)]} for one metric and mode; the other keys
    are those of the shape that vary (``"d=768"``), empty when none does."""
    chosen = [r for r in rows if r["metric"] == metric and r["mode"] == mode]
    varying = {
        k
        for k in {k for r in chosen for k in shape_dict(r["shape"])}
        if k != x_key and len({shape_dict(r["shape"]).get(k) for r in chosen}) > 1
    }
    out: dict[str, list[tuple[int, float]]] = {}
    for r in chosen:
        shape = shape_dict(r["shape"])
        v = value(r)
        if v is None or x_key not in shape:
            continue
        extra = " ".join(f"{k}={shape[k]}" for k in sorted(varying) if k in shape)
        out.setdefault((r["provider"], extra), []).append((shape[x_key], v))
    return {k: sorted(v) for k, v in out.items()}


class _Styles:
    """A colour per provider and a dash pattern per value of the other shape keys."""

    def __init__(self):
        self.colors: dict[str, str] = {}
        self.dashes: dict[str, str] = {}

    def __call__(self, provider: str, extra: str) -> tuple[str, str]:
        color = self.colors.setdefault(provider, f"C{len(self.colors) % 10}")
        dash = self.dashes.setdefault(extra, ("-", "--", ":", "-.")[len(self.dashes) % 4])
        return color, dash


def _draw(ax, lines: dict, styles: _Styles) -> None:
    for (provider, extra), pts in lines.items():
        color, dash = styles(provider, extra)
        label = f"{provider} {extra}".strip()
        ax.plot(*zip(*pts, strict=True), marker="o", color=color, linestyle=dash, label=label)


def chart(rows: Sequence[dict[str, str]], path: Path) -> Path | None:
    """Draws one (op, device, run) group into ``path``; None when nothing is plottable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_key = _x_key(rows)
    modes = [m for m in MODE_ORDER if any(r["mode"] == m and r["metric"] == "ms" for r in rows)]
    if x_key is None or not modes:
        return None
    ceiling = binding_ceiling(rows)
    fig, axes = plt.subplots(2, len(modes), figsize=(4.6 * len(modes), 7), squeeze=False)
    styles = _Styles()
    for col, mode in enumerate(modes):
        top, bottom = axes[0][col], axes[1][col]
        _draw(top, series(rows, "ms", mode, x_key), styles)
        top.set_title(mode)
        top.set_ylabel("p50 ms")
        top.set_yscale("log")
        pct = series(rows, ceiling, mode, x_key) if ceiling else {}
        _draw(bottom, pct, styles)
        if ceiling and pct:
            bottom.set_ylabel(f"% of {CEILING_METRICS[ceiling]} ceiling")
        else:
            bottom.text(0.5, 0.5, "no rate for this mode", ha="center", transform=bottom.transAxes)
            bottom.set_axis_off()
        for ax in (top, bottom) if pct else (top,):
            ax.set_xscale("log", base=2)
            ax.set_xlabel(x_key)
            ax.grid(True, which="both", alpha=0.3)
        if col == 0 and top.get_legend_handles_labels()[0]:
            top.legend(fontsize=7)
    first = rows[0]
    dtype = next((r["dtype"] for r in rows if r["dtype"]), "")
    fig.suptitle(f"{first['op']}: {first['device']}, {dtype} (run {first['run_id']})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def chart_name(op: str, device: str, dtype: str) -> str:
    return f"{op}_{slug(device)}_{dtype}.png"


def charts(rows: Sequence[dict[str, str]], out_dir: Path) -> list[Path]:
    """One PNG per (op, device, dtype) of the latest run among ``rows``; returns the paths."""
    written = []
    for (op, device, dtype), group in latest_runs(rows).items():
        path = chart(group, Path(out_dir) / chart_name(op, device, dtype))
        if path is not None:
            written.append(path)
    return written

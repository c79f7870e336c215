"""Host time per eager call (``python -m benchmarks --modes host``): what an op costs the CPU
around its kernels, beside the eager formula's cost, against the budgets of
:mod:`benchmarks.targets` (issue 11: 25 us per forward call of the rotary family, 60 us per
forward+backward of a loss).

Method:

- A fresh interpreter (``python -m benchmarks.host``, started by the run in the checkout)
  with ``TRITON_INTERPRET=1`` in its environment: Triton decides at import whether kernels
  are compiled or interpreted, so this cannot be set in a process that has imported it. There
  CPU tensors take the Triton backend, the same Python path as CUDA tensors (argument checks,
  layouts, the op's dispatch and autograd wrapper, output allocation, vlmkernels' launch
  code: config, grid), and Triton's own launcher is replaced by a no-op: ``run`` of the
  interpreter's kernel class and of the ``triton.heuristics`` / ``triton.autotune`` wrappers
  (what ``TunedKernel.launch`` calls). No kernel runs, and Triton's launch cost (on a GPU,
  binding and specialising the arguments and the driver call) is excluded, as the budgets
  say. The lock that serialises interpreted launches is off too (nothing runs under it),
  so vlmkernels' launch code is the compiled path's. Each case records how many launches
  a call made, so a call that took another path shows as 0.
- Small float32 CPU tensors (each suite's ``host_shape``: the rotary ops at B=1, S=8, the
  losses at N=8, d=32; ``--shape`` changes them), with ``requires_grad`` as in training; one
  torch thread. The vlmkernels providers' call is the op alone (the rotary ops on prepared
  q/k views, without the suite's checksum wrapper); a loss's is ``loss(...).backward()``.
- The eager formula: the suite's ``eager`` provider on the same tensors and call. It runs in
  full (it has no kernel to stub); on such small tensors its time is the host cost of its
  torch ops.
- Per case ``--host-calls`` calls (default 1000) after a tenth as many warm-up calls, each
  timed alone with ``time.perf_counter_ns`` (gradients reset between calls, untimed; the
  garbage collector paused), the cases taking turns in 10 rounds of a tenth of the calls
  each (a slow spell hits all of them); the median, with the 20th and 80th percentiles, in
  microseconds. A shared or loaded machine inflates every number: compare the columns of
  one run, and the two scale rows timed the same way in the same interpreter: ``x.add(1)``
  on a 1-element tensor (one torch op's host cost there and then; op ``torch_add``) and a
  bare ``torch.library.custom_op`` call (one tensor in, an empty one out; op
  ``custom_op``), the unit in which issue 11 set the budgets: it measured 10-15 us for such
  a call on its CPU machine, so 25 us is about two of them and 60 us about five. For the
  losses, a third row (op ``autograd_fn``, mode ``fwd+bwd``): an ``autograd.Function``
  that does nothing, on leaves shaped like the CLIP loss's (two (N, d) features and a 0-d
  scale, each needing a gradient), called and back-propagated as the losses are: what
  autograd alone costs a forward+backward there and then, below which no loss row can go
  (vlmkernels' eager path is such a Function, the dispatcher skipped).

Output: ``<out>/host.csv`` (``--out``; rows of metric ``host_us``, mode ``fwd`` or
``fwd+bwd``), a table per run (vlmkernels us, eager us, budget, PASS / MISS), and the section
"Host time per call" of ``vlmkernels report``. The run exits 0 whether budgets are met or
not (like the other targets, a miss is reported, not an error); 1 if a case failed.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

import torch

from . import UsageError, output_dir, output_label, shape_options, suites, targets, writable_dir
from .harness import BuildArgs, Case, Prepared, Record, _failure, shape_str

HOST_METRIC = "host_us"
HOST_FILE = "host.csv"
# One torch op's host cost in the same interpreter and run: the scale of the other rows (it
# varies several-fold between machines and with their load)
SCALE_SUITE, SCALE_OP = "host", "torch_add"
SCALE_NOTE = "x.add(1) on a 1-element tensor: one torch op's host cost in this run (the scale)"
# A bare custom op's call: the unit of issue 11's budgets (10-15 us where it set them)
CUSTOM_OP = "custom_op"
CUSTOM_OP_NOTE = (
    "a bare torch.library.custom_op call (one tensor in, an empty one out): the "
    "dispatcher's cost in this run (issue 11 measured 10-15 us)"
)
ISSUE_CUSTOM_OP_US = (10, 15)
# autograd's own cost of a loss step: the floor of the fwd+bwd rows, on leaves shaped like
# the CLIP loss's at its host shape
AUTOGRAD_FN = "autograd_fn"
FLOOR_FEATURES = (8, 32)
AUTOGRAD_FN_NOTE = (
    f"an autograd.Function that does nothing (two {FLOOR_FEATURES} features and a 0-d scale in, "
    "a 0-d loss out, empty gradients back), forward+backward: autograd's own cost of a "
    "loss step in this run"
)
DEFAULT_CALLS = 1000
ROUNDS = 10  # interleaved rounds of each case's calls (see measure)
ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------
# In the measuring interpreter (TRITON_INTERPRET=1)
# --------------------------------------------------------------------------------------

LAUNCHES = [0]


def _no_launch(self, *args, **kwargs):
    LAUNCHES[0] += 1


def stub_triton_launcher() -> list[str]:
    """Replaces ``run`` of the classes Triton launches kernels through (the interpreter's,
    and the wrappers of every vlmkernels Triton kernel) with a no-op counting launches;
    returns their names. Only in an interpreter that measures host time."""
    from triton.runtime.interpreter import InterpretedFunction

    from vlmkernels.core import runtime
    from vlmkernels.core.tuning import all_kernels

    classes = {InterpretedFunction} | {type(k.fn) for k in all_kernels().values()}
    for cls in classes:
        cls.run = _no_launch
    runtime.INTERPRETER_LOCK = None  # nothing runs under it now: the compiled path's code
    return sorted(cls.__name__ for cls in classes)


def host_call(prepared: Prepared, mode: str) -> Callable[[], object]:
    """The call timed: the op alone for ``fwd``, the loss and its backward for ``fwd+bwd``."""
    if mode == "fwd":
        return prepared.call or prepared.fn
    return lambda: prepared.fn().backward()


def time_calls(
    call: Callable[[], object],
    leaves: Sequence[torch.Tensor],
    calls: int,
    warmup: int,
    collect: bool = True,
) -> list[int]:
    """Nanoseconds of each of ``calls`` calls (after ``warmup`` untimed ones), the garbage
    collector paused (and run first with ``collect``)."""

    def reset():
        for t in leaves:
            t.grad = None

    for _ in range(warmup):
        reset()
        call()
    samples = []
    if collect:
        gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(calls):
            reset()
            t0 = time.perf_counter_ns()
            call()
            samples.append(time.perf_counter_ns() - t0)
    finally:
        if enabled:
            gc.enable()
    return samples


def quantiles_us(samples_ns: Sequence[int]) -> dict[str, float]:
    """p50, p20, p80 of the samples, in microseconds (nearest rank)."""
    ordered = sorted(samples_ns)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] / 1e3

    return {"p50": at(0.5), "p20": at(0.2), "p80": at(0.8)}


@functools.cache
def bare_custom_op() -> Callable[[torch.Tensor], torch.Tensor]:
    """A ``torch.library.custom_op`` that returns an empty tensor like its input, with its
    fake: the host cost of the dispatcher around an op with nothing inside. Registered
    (once) in the measuring interpreter only."""

    @torch.library.custom_op("vlmkernels_host::bare", mutates_args=())
    def bare(x: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(x)

    bare.register_fake(lambda x: torch.empty_like(x))
    return bare


class _Nothing(torch.autograd.Function):
    """A loss that computes nothing: the autograd floor row (:data:`AUTOGRAD_FN`)."""

    @staticmethod
    def forward(ctx, x, y, scale):
        return x.new_empty(())

    @staticmethod
    def backward(ctx, grad):
        return grad.new_empty(FLOOR_FEATURES), grad.new_empty(FLOOR_FEATURES), grad.new_empty(())


def autograd_floor(dtype: torch.dtype) -> tuple[Callable[[], object], tuple[torch.Tensor, ...]]:
    """(call, leaves) of the autograd floor row: ``_Nothing`` on fresh leaves, backward."""
    leaves = (torch.randn(FLOOR_FEATURES, dtype=dtype, requires_grad=True),
              torch.randn(FLOOR_FEATURES, dtype=dtype, requires_grad=True),
              torch.ones((), dtype=dtype, requires_grad=True))  # fmt: skip
    return lambda: _Nothing.apply(*leaves).backward(), leaves


def measure(cases: list[dict], calls: int, seed: int, dtype: str,
            rounds: int = ROUNDS) -> list[dict]:  # fmt: skip
    """Host time of each case {suite, op, provider, mode, shape}: the case with p50, p20,
    p80 (us), calls and launches per call, or status ``error`` and a note.

    The cases (and the scale row) are timed in ``rounds`` interleaved rounds of
    ``calls / rounds`` calls each, after one warm-up of a tenth of ``calls`` per case: a
    slow spell of a shared machine then falls on every case alike, and the ratios within
    the run (vlmkernels against the eager formula, against one torch op) hold."""
    from vlmkernels.core import runtime

    if not runtime.INTERPRETED:
        raise RuntimeError(
            "the host-time mode needs TRITON_INTERPRET=1 set before Triton is imported"
        )
    stub_triton_launcher()
    torch.set_num_threads(1)
    found = suites()
    out, timed = [], []  # timed: (result, call, leaves, samples)
    warmup = max(10, calls // 10)
    for case in cases:
        suite = found[case["suite"]]
        op = next(o for o in suite.ops if o.name == case["op"])
        provider = next(p for p in op.providers if p.name == case["provider"])
        args = BuildArgs(op.name, case["shape"], getattr(torch, dtype), torch.device("cpu"),
                         seed, {})  # fmt: skip
        try:
            prepared = provider.build(args)
            call = host_call(prepared, case["mode"])
            LAUNCHES[0] = 0
            time_calls(call, prepared.leaves, 0, warmup)
            result = {**case, "calls": calls, "launches": LAUNCHES[0] / warmup,
                      "note": prepared.note, "status": "ok"}  # fmt: skip
            timed.append((result, call, prepared.leaves, []))
        except Exception as exc:  # noqa: BLE001 - recorded, the other cases go on
            status, note = _failure(exc)
            result = {**case, "status": status, "note": note}
            _print_case(result)
        out.append(result)
    one = torch.ones(1, dtype=getattr(torch, dtype))
    bare = bare_custom_op()
    floor, floor_leaves = autograd_floor(getattr(torch, dtype))
    floor_shape = {"N": FLOOR_FEATURES[0], "d": FLOOR_FEATURES[1]}
    scales = [{"suite": SCALE_SUITE, "op": op, "provider": "torch", "mode": mode,
               "shape": shape, "calls": calls, "launches": 0.0, "status": "ok", "note": note}
              for op, mode, shape, note in (
                  (SCALE_OP, "fwd", {"n": 1}, SCALE_NOTE),
                  (CUSTOM_OP, "fwd", {"n": 1}, CUSTOM_OP_NOTE),
                  (AUTOGRAD_FN, "fwd+bwd", floor_shape, AUTOGRAD_FN_NOTE))]  # fmt: skip
    for scale, call, leaves in zip(scales, (lambda: one.add(1), lambda: bare(one), floor),
                                   ((), (), floor_leaves), strict=True):  # fmt: skip
        time_calls(call, leaves, 0, warmup)
        timed.append((scale, call, leaves, []))
    per_round = [calls // rounds + (r < calls % rounds) for r in range(rounds)]
    for n in per_round:
        gc.collect()
        for result, call, leaves, samples in timed:
            try:
                if result["status"] == "ok":
                    samples += time_calls(call, leaves, n, 0, collect=False)
            except Exception as exc:  # noqa: BLE001 - a case failing after its warm-up
                result["status"], result["note"] = _failure(exc)
    for result, _, _, samples in timed:
        if result["status"] == "ok":
            result.update(quantiles_us(samples))
        _print_case(result)
    return [*out, *scales]


# how each scale row is printed as it is timed: (what was called, what the row is)
_SCALE_LABELS = {
    SCALE_OP: ("one.add(1)", "the scale"),
    CUSTOM_OP: ("bare(one)", "issue 11's unit"),
    AUTOGRAD_FN: ("nothing, fwd+bwd", "autograd's own"),
}


def _print_case(r: dict) -> None:
    if r["op"] in _SCALE_LABELS:
        called, what = _SCALE_LABELS[r["op"]]
        print(f"  [{r['op']}] {called} {r['p50']:9.1f} us ({what})", flush=True)
        return
    label = f"  [{r['op']}] {shape_str(r['shape'])} {r['provider']:<22} {r['mode']:<8}"
    if r["status"] != "ok":
        print(f"{label} {r['status']}: {r['note']}", flush=True)
    else:
        print(f"{label} {r['p50']:9.1f} us ({r['launches']:g} launches / call)", flush=True)


def _child(argv: list[str]) -> int:
    """``python -m benchmarks.host SPEC.json RESULT.json`` (started by :func:`run`)."""
    spec = json.loads(Path(argv[0]).read_text())
    results = measure(spec["cases"], spec["calls"], spec["seed"], spec["dtype"])
    Path(argv[1]).write_text(json.dumps(results))
    return 0


# --------------------------------------------------------------------------------------
# In the benchmark run: select, start the measuring interpreter, record, report
# --------------------------------------------------------------------------------------


def host_cases(selection: Mapping[str, list], available: Mapping, overrides: Mapping,
               providers: frozenset[str] | None) -> tuple[list[dict], list[str]]:  # fmt: skip
    """(cases, notes): per selected op with a host budget in :mod:`benchmarks.targets`, its
    judged providers and the provider reported beside them, at the suite's host shape
    (``overrides``: ``--shape`` values, the first of each key, for the suites whose host
    shape has the key; a key none has is a UsageError)."""
    cases, notes, used, timed = [], [], set(), set()
    for name, ops in selection.items():
        suite = available[name]
        budgets = targets.for_suite(name, metric=HOST_METRIC)
        if not budgets or suite.host_shape is None:
            notes.append(f"{name}: no host-time budget in benchmarks/targets.py; not timed")
            continue
        shape = dict(suite.host_shape)
        for key, values in overrides.items():
            if key in shape:
                shape[key] = values[0]
                used.add(key)
        for op in ops:
            for t in (t for t in budgets if t.op == op.name):
                for provider in (t.provider, t.beside):
                    timed.add(provider)
                    case = {"suite": name, "op": op.name, "provider": provider,
                            "mode": t.mode, "shape": shape}  # fmt: skip
                    wanted = providers is None or provider in providers
                    if provider and wanted and case not in cases:
                        cases.append(case)
    unknown = sorted(set(providers or ()) - timed - {None})
    if unknown:
        raise UsageError(f"--providers: {unknown} not timed by --modes host; it times "
                         f"{', '.join(sorted(p for p in timed if p))}")  # fmt: skip
    unused = sorted(set(overrides) - used)
    if unused:
        raise UsageError(
            f"--shape: no host shape of the selected suites has the key(s) {unused} (each "
            "suite's host_shape)"
        )
    return cases, notes


def _records(results: list[dict], dtype: str) -> list[Record]:
    out = []
    for r in results:
        case = Case(r["op"], r["provider"], r["mode"], tuple(r["shape"].items()), dtype)
        if r["status"] != "ok":
            out.append(Record(case, HOST_METRIC, status=r["status"], note=r["note"]))
            continue
        budget = _budget(r["suite"], r["op"], r["provider"], r["mode"])
        parts = [r["note"], f"median of {r['calls']} calls",
                 f"{r['launches']:g} Triton launches per call (stubbed)"]  # fmt: skip
        if budget is not None:
            verdict = "PASS" if budget.hit(r["p50"]) else "MISS"
            parts.append(f"budget {budget.bound:g} us (issue {budget.issue}): {verdict}")
        note = "; ".join(p for p in parts if p)
        out.append(Record(case, HOST_METRIC, r["p50"], r["p20"], r["p80"], note=note))
    return out


def _budget(suite: str, op: str, provider: str, mode: str) -> targets.Target | None:
    found = targets.for_suite(suite, metric=HOST_METRIC, op=op, provider=provider, mode=mode)
    return found[0] if found else None


def rows_table(rows: Sequence[Mapping[str, str]], markdown: bool = False) -> list[str]:
    """Per budgeted (op, mode, provider): its host us, the eager formula's, the budget and
    the verdict, from CSV rows (or records as rows) of one run."""
    index = {(r["op"], r["mode"], r["provider"]): r for r in rows if r["metric"] == HOST_METRIC}

    def us(row) -> str:
        if row is None:
            return "-"
        return f"{float(row['p50']):.1f}" if row["status"] == "ok" and row["p50"] else row["status"]

    header = ["op", "mode", "shape", "provider", "host us", "eager us", "budget us", "verdict"]
    lines = []
    if markdown:
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    else:
        lines.append(f"{'op':<18} {'mode':<8} {'shape':<14} {'provider':<22} {'host us':>9} "
                     f"{'eager us':>9} {'budget us':>9}  verdict")  # fmt: skip
    for t in targets.TARGETS:
        row = index.get((t.op, t.mode, t.provider))
        if t.metric != HOST_METRIC or row is None:
            continue
        beside = index.get((t.op, t.mode, t.beside)) if t.beside else None
        if row["status"] == "ok" and row["p50"]:
            value = float(row["p50"])
            verdict = "PASS" if t.hit(value) else f"MISS ({value / t.bound:.1f}x the budget)"
        else:
            verdict = "not measured"
        cells = [t.op, t.mode, row["shape"], t.provider, us(row), us(beside), f"{t.bound:g}",
                 verdict]  # fmt: skip
        if markdown:
            lines.append("| " + " | ".join(c.replace(",", ", ") for c in cells) + " |")
        else:
            lines.append(f"{cells[0]:<18} {cells[1]:<8} {cells[2]:<14} {cells[3]:<22} "
                         f"{cells[4]:>9} {cells[5]:>9} {cells[6]:>9}  {cells[7]}")  # fmt: skip
    scale = index.get((SCALE_OP, "fwd", "torch"))
    if scale is not None:
        lines += ["", f"Scale: one torch op (`x.add(1)` on a 1-element tensor) took {us(scale)} "
                  "us per call in the same run."]  # fmt: skip
        if not markdown:
            lines[-1] = lines[-1].replace("`", "")
    bare = index.get((CUSTOM_OP, "fwd", "torch"))
    if bare is not None and bare["status"] == "ok" and bare["p50"]:
        lo, hi = ISSUE_CUSTOM_OP_US
        lines.append(
            f"A bare `torch.library.custom_op` call took {us(bare)} us; issue 11 set the budgets "
            f"where it took {lo}-{hi} us (the budgets are judged as written, not rescaled)."
        )
        if not markdown:
            lines[-1] = lines[-1].replace("`", "")
    floor = index.get((AUTOGRAD_FN, "fwd+bwd", "torch"))
    if floor is not None and floor["status"] == "ok" and floor["p50"]:
        lines.append(
            f"An `autograd.Function` that does nothing took {us(floor)} us forward+backward on "
            "the CLIP loss's leaves: autograd's own share of each fwd+bwd row, below which "
            "none can go."
        )
        if not markdown:
            lines[-1] = lines[-1].replace("`", "")
    return lines


def _as_row(r: Record) -> dict[str, str]:
    return {"op": r.case.op, "mode": r.case.mode, "provider": r.case.provider,
            "shape": r.case.shape_str, "metric": r.metric, "status": r.status,
            "p50": "" if r.p50 is None else str(r.p50)}  # fmt: skip


def run(args, selection: Mapping[str, list], available: Mapping) -> int:
    """``--modes host``: measures the selected ops' host time in a fresh interpreter and
    appends the rows to ``<out>/host.csv``; 1 if a case failed."""
    from .env import collect, describe
    from .report import CsvSink, check_appendable

    overrides = shape_options(args.shape)
    providers = frozenset(args.providers) if args.providers else None
    cases, notes = host_cases(selection, available, overrides, providers)
    calls = args.host_calls
    dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(
        args.dtype, args.dtype or "float32"
    )
    if args.list:
        for note in notes:
            print(note)
        for c in cases:
            print(f"{c['op']} {c['provider']} {shape_str(c['shape'])} {dtype} host {c['mode']}")
        return 0
    out_dir = writable_dir(args.out or output_dir(), output_label(args.out))
    check_appendable(out_dir / HOST_FILE)
    for note in notes:
        print(note)
    if not cases:
        print("nothing to run: no selected op has a host-time budget")
        return 0
    print(f"Host time per call: {len(cases)} cases in a fresh interpreter with "
          f"TRITON_INTERPRET=1, Triton's launcher stubbed, {dtype} CPU tensors, median of "
          f"{calls} calls, one thread (benchmarks/host.py)")  # fmt: skip
    env_vars = {k: v for k, v in os.environ.items() if k != "VLMKERNELS_BACKEND"}
    env_vars |= {"TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        spec, result = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec.write_text(json.dumps({"cases": cases, "calls": calls, "seed": args.seed,
                                    "dtype": dtype}))  # fmt: skip
        proc = subprocess.run([sys.executable, "-m", "benchmarks.host", str(spec), str(result)],
                              cwd=ROOT, env=env_vars)  # fmt: skip
        if proc.returncode != 0 or not result.exists():
            print(f"the host-time interpreter failed (exit status {proc.returncode})")
            return 1
        results = json.loads(result.read_text())
    env = collect(torch.device("cpu"))
    run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    print(describe(env))
    print(f"run {run_id}")
    path = out_dir / HOST_FILE
    records = _records(results, dtype)
    for name in dict.fromkeys(r["suite"] for r in results):
        x_name = available[name].x_name if name in available else ""
        mine = [rec for rec, r in zip(records, results, strict=True) if r["suite"] == name]
        CsvSink(path, name, x_name, run_id, env)(mine)
    print()
    print("\n".join(rows_table([_as_row(r) for r in records])))
    failed = [r for r in results if r["status"] == "error"]
    for r in failed:
        print(f"ERROR {r['op']} {r['provider']} {r['mode']}: {r['note']}")
    print(f"\nwrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))

"""``python -m benchmarks.profile OP [--shape K=V ...] [--dtype D] [--provider P] [--mode M]
[--out DIR]`` (also ``vlmkernels profile``): one op call under ``torch.profiler``.

The inputs and the call are those of the benchmark suite (the provider's ``build``; default
provider ``vlmkernels``), at the suite's first shape of this device's profile (``cpu`` or,
on a GPU, ``quick``) with ``--shape`` replacing keys. After ``--warmup`` calls (compilation,
autotuning), ``--iters`` calls run under the profiler (CPU and, on a GPU, CUDA activities).

Written to ``--out`` (default ``profile/`` in the output folder of ``bench``,
:func:`benchmarks.output_dir`: ``$VLMKERNELS_RESULTS_DIR/profile``, else
``./bench-results/profile``, git-ignored; checked before anything runs):
``<stem>.trace.json`` (Chrome trace: chrome://tracing or Perfetto) and
``<stem>.kernels.csv``; printed: the kernel table and the Nsight Compute command line that
profiles the same call (``--bare`` runs the call without torch.profiler, between
``cudaProfilerStart``/``Stop``, hence ncu's ``--profile-from-start off``).

What the rates mean: the op's FLOP and byte models count the work of the whole call, so the
TFLOP/s and GB/s printed are whole-call figures (from the p50 wall time of the call, and on
a GPU also from the summed kernel time per call). A kernel's row gets a rate only when that
kernel is the whole call (one kernel, one launch per call); otherwise it gets its share of
the device time, since dividing the call's work by one kernel's time would overstate it.
On the CPU the rows are aten operators by self CPU time, not kernels.
"""

from __future__ import annotations

import argparse
import csv
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from . import (
    UsageError,
    check_forced_backend,
    output_dir,
    output_label,
    run_command,
    suite_family,
    suites,
    writable_dir,
)
from .harness import BuildArgs, Skip, dtype_str, first_line, shape_str
from .timing import call_ms, synchronize, time_fn

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Row:
    name: str
    total_ms: float
    launches: int
    share: float
    rate: str = ""


def _shape_arg(text: str) -> tuple[str, int]:
    key, _, v = text.partition("=")
    try:
        value = int(v)
    except ValueError:
        value = 0
    if not key.strip() or value < 1:
        raise argparse.ArgumentTypeError(f"wants KEY=INT, a positive size, got {text!r}")
    return key.strip(), value


def _count(minimum: int):
    """An argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"wants an integer >= {minimum}, got {text!r}")
        return value

    return parse


def parse_args(argv, prog: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description="Profile one op call (torch.profiler).")
    p.add_argument("op", help="op name, e.g. clip_loss, mrope (see `bench --list`)")
    p.add_argument("--shape", type=_shape_arg, action="append", default=[], metavar="KEY=V")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--provider", default="vlmkernels", help="default: vlmkernels")
    p.add_argument("--mode", choices=("fwd", "fwd+bwd"), help="default: fwd+bwd if the suite "
                   "times a backward pass, else fwd")  # fmt: skip
    p.add_argument("--iters", type=_count(1), default=5, help="profiled calls (default 5)")
    p.add_argument("--warmup", type=_count(0), default=2, help="calls before profiling (default 2)")
    p.add_argument(
        "--out",
        type=Path,
        help="output folder (default: profile/ in $VLMKERNELS_RESULTS_DIR, else "
        "./bench-results/profile)",
    )
    p.add_argument("--rows", type=_count(1), default=15, help="table rows (default 15)")
    p.add_argument("--compile-backend", default="inductor", help="for the compile provider")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bare", action="store_true", help="no torch.profiler, no files: for ncu")
    return p.parse_args(argv)


def find_op(name: str):
    """(suite, OpSpec) of the op called ``name``."""
    found = suites()
    for suite in found.values():
        for op in suite.ops:
            if op.name == name:
                return suite, op
    names = sorted(op.name for s in found.values() for op in s.ops)
    raise UsageError(f"unknown op {name!r}; known: {', '.join(names)}")


def pick_shape(suite, provider, profile: str, overrides: dict[str, int], op: str):
    """The first shape of the profile's grid (keys replaced) that the provider accepts; a
    key the op's shapes do not have (a suite's other shape group) is a UsageError."""
    try:
        shapes = suite.shapes(profile, {k: [v] for k, v in overrides.items()})
    except KeyError as exc:
        raise UsageError(f"--shape: {exc.args[0]}") from None
    shape = next((s for s in shapes if provider.limit(s) is None), shapes[0])
    foreign = [k for k in overrides if k not in shape]
    if foreign:
        raise UsageError(f"--shape {foreign[0]}: {op} takes the keys {', '.join(shape)}")
    return shape


def _step(prepared, mode: str):
    if mode == "fwd":
        return prepared.fn

    def step():
        for t in prepared.leaves:
            t.grad = None
        prepared.fn().backward()

    return step


def short_kernel_name(name: str) -> str:
    """An identifier for ncu's ``-k regex:`` (no return type, namespace or template args)."""
    base = re.split(r"[<(]", name.removeprefix("void ").strip(), maxsplit=1)[0]
    return base.split("::")[-1].strip() or name


def triton_kernels(suite_name: str, op) -> list[str]:
    """Names of the Triton kernels of the op's family (its declaration), as the compiled
    kernels are named (for ncu's ``-k``): those naming the op's stem, else all of them; none
    for an op vlmkernels runs without them (``OpSpec.launches_triton``)."""
    from vlmkernels.core.family import family

    if not op.launches_triton:
        return []
    names = []
    for kernel in family(suite_family(suite_name)).kernels:
        fn = kernel.fn  # the @triton.jit function, possibly under triton.heuristics
        while getattr(fn, "__name__", None) is None and hasattr(fn, "fn"):
            fn = fn.fn
        names.append(getattr(fn, "__name__", kernel.name))
    stem = op.name.split("_")[0]
    return [n for n in names if stem in n] or names


def _rate_text(flops: float, nbytes: float, ms: float) -> str:
    parts = []
    if flops:
        parts.append(f"{flops / (ms * 1e-3) / 1e12:.3g} TFLOP/s")
    if nbytes:
        parts.append(f"{nbytes / (ms * 1e-3) / 1e9:.3g} GB/s")
    return ", ".join(parts)


def kernel_rows(prof, on_gpu: bool, iters: int, flops: float, nbytes: float) -> list[Row]:
    """Per-kernel rows (GPU: device kernels and copies; CPU: aten operators, self time)."""
    from torch.autograd import DeviceType

    events = [e for e in prof.key_averages() if not getattr(e, "is_user_annotation", False)]
    if on_gpu:
        events = [e for e in events if e.device_type == DeviceType.CUDA]
        times = {e.key: e.self_device_time_total / 1e3 for e in events}
    else:
        events = [e for e in events if e.device_type == DeviceType.CPU]
        times = {e.key: e.self_cpu_time_total / 1e3 for e in events}
    total = sum(times.values()) or 1.0
    rows = [
        Row(e.key, times[e.key], e.count, times[e.key] / total)
        for e in sorted(events, key=lambda e: -times[e.key])
        if times[e.key] > 0
    ]
    if on_gpu and len(rows) == 1 and rows[0].launches == iters:
        rows[0].rate = _rate_text(flops, nbytes, rows[0].total_ms / iters)
    return rows


def _table(rows: list[Row], limit: int, on_gpu: bool, iters: int) -> list[str]:
    what = "kernel" if on_gpu else "aten operator (self CPU time)"
    header = f"{'ms total':>10} {'launches':>8} {'per call':>9} {'share':>6}  {'rate':<24} {what}"
    lines = [header, "-" * len(header)]
    for r in rows[:limit]:
        name = r.name if len(r.name) <= 90 else r.name[:87] + "..."
        lines.append(
            f"{r.total_ms:10.3f} {r.launches:8d} {r.launches / iters:9.3g} {r.share:6.1%}  "
            f"{r.rate or '-':<24} {name}"
        )
    if len(rows) > limit:
        lines.append(f"... {len(rows) - limit} more in the CSV")
    return lines


def _write_csv(path: Path, rows: list[Row], iters: int) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "total_ms", "launches", "launches_per_call", "share", "rate"])
        for r in rows:
            w.writerow([r.name, f"{r.total_ms:.6g}", r.launches, f"{r.launches / iters:.6g}",
                        f"{r.share:.4f}", r.rate])  # fmt: skip


def ncu_command(args, shape: dict[str, int], dtype: torch.dtype, mode: str, kernels) -> str:
    parts = ["ncu", "--set", "full", "--target-processes", "all", "--profile-from-start", "off"]
    if kernels:
        parts += ["-k", "regex:" + "|".join(dict.fromkeys(kernels))]
    parts += ["python", "-m", "vlmkernels", "profile", args.op]
    for k, v in shape.items():
        parts += ["--shape", f"{k}={v}"]
    parts += ["--dtype", {v: k for k, v in DTYPES.items()}.get(dtype, "fp32"), "--mode", mode]
    if args.provider != "vlmkernels":
        parts += ["--provider", args.provider]
    if args.compile_backend != "inductor":
        parts += ["--compile-backend", args.compile_backend]
    if args.seed:
        parts += ["--seed", str(args.seed)]  # the same inputs as the profiled call
    parts += ["--iters", "1", "--bare"]
    return shlex.join(parts)


def _ceiling_text(device: torch.device, dtype: torch.dtype, flops: float, nbytes: float, ms):
    """Percent of the ceilings cached by ``vlmkernels info`` (never measured here)."""
    try:
        from vlmkernels.cli import cached_ceilings

        entry = cached_ceilings()
    except Exception:  # noqa: BLE001 - optional
        entry = None
    if not entry:
        return "(run `vlmkernels info` once to cache the device ceilings and get % of them)"
    label = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(
        dtype, "tf32" if device.type == "cuda" else "fp32"
    )
    parts = []
    mm = entry.get("matmul", {}).get(label)
    if flops and mm:
        parts.append(f"{100 * flops / (ms * 1e-3) / 1e12 / mm['tflops']:.1f} % of {label} matmul")
    if nbytes:
        parts.append(f"{100 * nbytes / (ms * 1e-3) / 1e9 / entry['copy_gbps']:.1f} % of copy")
    return "= " + ", ".join(parts) + " ceilings (cached by `vlmkernels info`)"


def _refused(label: str, exc: BaseException) -> str:
    """The one-line error of a case the op (or torch) refuses: its label and the reason."""
    return f"{label}: the call fails ({type(exc).__name__}: {first_line(exc)})"


def _release(provider) -> None:
    """Destroys a process group a suite created for the call (the distributed suite)."""
    module = sys.modules.get(getattr(provider.build, "__module__", ""))
    group = getattr(module, "GROUP", None)
    if group is not None and hasattr(group, "release"):
        group.release()


def main(argv: list[str] | None = None, prog: str = "python -m benchmarks.profile") -> int:
    return run_command(_main, argv, prog)


def _main(argv: list[str] | None, prog: str) -> int:
    args = parse_args(argv, prog)
    suite, op = find_op(args.op)
    check_forced_backend()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    dtype = DTYPES[args.dtype] if args.dtype else suite.default_dtype(device)
    mode = args.mode or ("fwd+bwd" if "fwd+bwd" in suite.default_modes else "fwd")
    if mode not in suite.modes:
        raise UsageError(f"--mode {mode}: {args.op} times {', '.join(suite.modes)} only")
    provider = next((p for p in op.providers if p.name == args.provider), None)
    if provider is None:
        names = ", ".join(p.name for p in op.providers)
        raise UsageError(f"--provider: {args.op} has no provider {args.provider!r}; {names}")
    if not args.bare:
        args.out = writable_dir(args.out or output_dir() / "profile", output_label(args.out))
    reason = provider.available(device)
    if reason:
        print(f"{args.op}: provider {provider.name} unavailable here: {reason}", file=sys.stderr)
        return 2
    keys = [key for key, _ in args.shape]
    if len(set(keys)) < len(keys):
        twice = sorted({k for k in keys if keys.count(k) > 1})
        raise UsageError(f"--shape: {', '.join(twice)} given more than once (one call, one "
                         "size per key)")  # fmt: skip
    shape = pick_shape(suite, provider, "quick" if on_gpu else "cpu", dict(args.shape), args.op)
    if provider.dtype is not None and provider.dtype != dtype:
        if args.dtype and not args.bare:
            print(f"--dtype {args.dtype}: provider {provider.name} computes in "
                  f"{dtype_str(provider.dtype)}; profiling that")  # fmt: skip
        dtype = provider.dtype  # its bytes, its ceiling, its label: as the bench rows
    label = f"{args.op} {provider.name} {shape_str(shape)} {dtype_str(dtype)} {mode}"
    if not on_gpu and not args.bare:
        print(f"No CUDA device found: profiling on the CPU (CPU activities only): {label}")
    try:
        prepared = provider.build(
            BuildArgs(args.op, shape, dtype, device, args.seed,
                      {"compile_backend": args.compile_backend})
        )  # fmt: skip
    except Skip as exc:
        print(f"{label}: skipped by the provider: {exc}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError, TypeError) as exc:  # the op refuses the case
        raise UsageError(_refused(label, exc)) from None
    try:
        return _run(args, suite, op, prepared, device, dtype, mode, shape, label)
    finally:
        _release(provider)


def _run(args, suite, op, prepared, device, dtype, mode, shape, label) -> int:
    from torch.profiler import ProfilerActivity, profile, record_function

    on_gpu = device.type == "cuda"
    step = _step(prepared, mode)
    try:  # the first calls: a size the op refuses (or cannot hold) shows here
        for _ in range(args.warmup):
            call_ms(step, device)
        estimate = None if args.bare else call_ms(step, device)
    except (ValueError, RuntimeError, TypeError) as exc:
        raise UsageError(_refused(label, exc)) from None
    if args.bare:
        if on_gpu:
            torch.cuda.profiler.start()
        for _ in range(args.iters):
            step()
        synchronize(device)
        if on_gpu:
            torch.cuda.profiler.stop()
        print(f"ran {label} x{args.iters}")
        return 0
    timing = time_fn(step, device, grad_to_none=prepared.leaves, estimate_ms=estimate)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        for i in range(args.iters):
            with record_function(f"{args.op} call {i}"):
                step()
            synchronize(device)
    flops = op.flops(shape, mode)
    nbytes = op.nbytes(shape, mode, dtype.itemsize)
    rows = kernel_rows(prof, on_gpu, args.iters, flops, nbytes)

    stem = re.sub(r"[^A-Za-z0-9_.+-]+", "_", label.replace(" ", "_"))
    trace = args.out / f"{stem}.trace.json"
    prof.export_chrome_trace(str(trace))
    table_csv = args.out / f"{stem}.kernels.csv"
    _write_csv(table_csv, rows, args.iters)

    print(f"\n{label}: {args.iters} profiled calls after {args.warmup} warm-up calls")
    print("\n".join(_table(rows, args.rows, on_gpu, args.iters)))
    print(
        f"\nwhole call, p50 {timing.p50:.4g} ms (wall, {'do_bench' if on_gpu else 'perf_counter'}"
        f"): {_rate_text(flops, nbytes, timing.p50) or 'no FLOP/byte model'} from the op's "
        f"model ({flops / 1e9:.4g} GFLOP, {nbytes / 1e6:.4g} MB per call)"
    )
    print("  " + _ceiling_text(device, dtype, flops, nbytes, timing.p50))
    if on_gpu and rows:
        device_ms = sum(r.total_ms for r in rows) / args.iters
        print(f"  summed kernel time per call {device_ms:.4g} ms: "
              f"{_rate_text(flops, nbytes, device_ms)}")  # fmt: skip
    print(
        "  per-kernel rates are given only where one kernel is the whole call: the model "
        "counts the call's work, not a kernel's"
        if on_gpu
        else "  CPU rows are aten operators by self time (no per-operator rate)"
    )
    print(f"\nwrote {trace}\nwrote {table_csv}")
    kernels = [short_kernel_name(rows[0].name)] if on_gpu and rows else []
    if not kernels and args.provider == "vlmkernels":  # another provider's are not ours
        kernels = triton_kernels(suite.name, op)
    print("\nNsight Compute, the same call (on the GPU machine):")
    print("  " + ncu_command(args, shape, dtype, mode, kernels))
    if not on_gpu:
        if args.provider != "vlmkernels":
            print(f"  (no kernel regex: provider {args.provider} runs kernels that are not "
                  "vlmkernels', so every kernel is profiled)")  # fmt: skip
        else:
            which = ", ".join(kernels) if kernels else "none found: every kernel is profiled"
            print(f"  (kernel regex from the op's Triton kernels here: {which})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``vlmkernels`` command (also ``python -m vlmkernels``).

- ``info``: versions, device, backends, where the Triton configs come from, and the device
  ceilings (measured once per device and versions, cached as JSON under
  ``~/.cache/vlmkernels/``; ``VLMKERNELS_CACHE_DIR`` moves the cache; a malformed cache, or
  entry, is ignored with a one-line note and measured again).
- ``tune``: autotunes the Triton kernels on this GPU (:mod:`vlmkernels.core.tuner`).
- ``inspect``: compiles the families' Triton kernels for a GPU architecture on any machine
  and reports registers, spills, shared memory, CTAs per SM, the hot loop's instruction mix
  and a static time estimate; checks them against ``vlmkernels/kernel_budgets.json``
  (:mod:`vlmkernels.core.inspection`, :mod:`vlmkernels.core.estimate`).
- ``bench``, ``profile``, ``report``: the benchmark suites, which live in the top-level
  ``benchmarks/`` folder of a checkout (not installed with the package). These commands find
  it next to the package (an editable install) or in the working directory or one of its
  parents, and say so when there is none; the package is imported from that folder by its
  location, without changing ``sys.path`` (:func:`load_benchmarks`), and runs the suites the
  op families declare (``Family.bench_suite``). They write into ``bench-results/`` in the working
  directory (``VLMKERNELS_RESULTS_DIR`` moves it; git-ignored), not into the checkout's
  committed ``benchmarks/results/`` unless ``--out`` says so.

A user error (a bad ``VLMKERNELS_BACKEND``, option value or input file) is one line on
stderr, ``vlmkernels <command>: <message>``, and exit status 2; no traceback.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from .core.version import __version__

DELEGATED = {
    "bench": ("benchmarks.__main__", "run the benchmark suites (tables, CSV, --plot charts)"),
    "profile": ("benchmarks.profile", "run one op under torch.profiler: trace, kernel table"),
    "report": ("benchmarks.report", "markdown summary and charts from the results CSVs"),
}
CACHE_FILE = "ceilings.json"


class CommandError(Exception):
    """A user error: :func:`main` prints ``vlmkernels <command>: <message>`` to stderr and
    returns 2."""


# --------------------------------------------------------------------------------------
# Device facts and ceilings (info)
# --------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """``$VLMKERNELS_CACHE_DIR``, else ``$XDG_CACHE_HOME/vlmkernels``, else ``~/.cache/...``."""
    env = os.environ.get("VLMKERNELS_CACHE_DIR", "").strip()
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(base).expanduser() if base else Path.home() / ".cache") / "vlmkernels"


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def nvml():
    """The initialised ``pynvml`` module (the ``nvidia-ml-py`` package), or None without it
    or without a driver library."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # ImportError, or NVMLError when no driver library is present
        return None


def driver_version(nv=None) -> str:
    """The NVIDIA driver version: through NVML (``nv``, else :func:`nvml`), else
    ``nvidia-smi``; "" without either."""
    nv = nv if nv is not None else nvml()
    if nv is not None:
        try:
            v = nv.nvmlSystemGetDriverVersion()
            return v.decode() if isinstance(v, bytes) else str(v)
        except Exception:  # an NVML error: try nvidia-smi
            pass
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20, check=True,
            ).stdout  # fmt: skip
            return out.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            pass
    return ""


def device_facts(device=None) -> dict:
    """The device and versions (the ceilings cache is keyed by these; the benchmark CSVs
    carry them on every row): ``device`` (a ``torch.device``; None: the current CUDA device
    where there is one, else the CPU)."""
    import torch
    import triton

    from vlmkernels.core.version import __version__

    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    facts = {
        "vlmkernels": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda or "",
        "driver": "",
    }
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        facts |= {
            "device_type": "cuda",
            "device": torch.cuda.get_device_name(device),
            "arch": f"sm_{major}{minor}",
            "driver": driver_version(),
        }
    else:
        facts |= {
            "device_type": "cpu",
            "device": f"{cpu_name()} ({torch.get_num_threads()} threads)",
            "arch": platform.machine(),
        }
    return facts


def cache_key(facts: dict) -> str:
    keys = ("device", "driver", "cuda", "torch", "triton")
    return " | ".join(f"{k} {facts[k]}" for k in keys)


def _median_ms(fn, on_gpu: bool) -> float:
    """Median time of ``fn`` in ms: do_bench on a GPU, perf_counter repetitions on the CPU."""
    if on_gpu:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    samples = []
    while len(samples) < 5 or (sum(samples) < 500 and len(samples) < 50):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    samples.sort()
    return samples[len(samples) // 2]


# The device ceilings. ``vlmkernels info`` (cached per device and versions) and the
# benchmark harness (measured in each run, benchmarks/ceilings.py) both measure them here,
# each with its own timer: ``timer(fn)`` returns (median ms, what to keep of the timing).
COPY_BYTES = {"cuda": 1 << 30, "cpu": 256 << 20}
MATMUL_SIZES = {"cuda": (8192,), "cpu": (512, 1024, 2048)}


def _default_timer(device):
    on_gpu = device.type == "cuda"
    return lambda fn: (_median_ms(fn, on_gpu), None)


def measure_copy(device, timer=None) -> tuple[float, int, object]:
    """(GB/s, bytes, timing) of ``dst.copy_(src)`` on a large uint8 buffer
    (:data:`COPY_BYTES`); bytes moved = read + written = 2 x size."""
    import torch

    timer = timer or _default_timer(device)
    nbytes = COPY_BYTES.get(device.type, COPY_BYTES["cpu"])
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms, timing = timer(functools.partial(dst.copy_, src))
    del src, dst
    return 2 * nbytes / (ms * 1e-3) / 1e9, nbytes, timing


def measure_matmul(device, dtype, timer=None, tf32: bool | None = None):
    """(TFLOP/s, n, timing) of ``torch.mm`` of square ``dtype`` matrices, 2 n^3 FLOP: the
    best n of :data:`MATMUL_SIZES` (one size on a GPU; on the CPU the rate depends on how
    the operands fit the caches, and a ceiling must bound every case). ``tf32`` sets
    ``torch.backends.cuda.matmul.fp32_precision`` for the measurement (None: as it is, and
    untouched). Not the legacy ``allow_tf32``: reading it raises once the process has set
    TF32 through the new API (``torch.backends.fp32_precision = "tf32"``, as transformers'
    ``TrainingArguments(tf32=True)`` does with torch >= 2.9)."""
    import torch

    timer = timer or _default_timer(device)
    matmul = torch.backends.cuda.matmul
    flag = matmul.fp32_precision
    best = None
    try:
        if tf32 is not None:
            matmul.fp32_precision = "tf32" if tf32 else "ieee"
        for n in MATMUL_SIZES.get(device.type, MATMUL_SIZES["cpu"]):
            a = torch.randn(n, n, device=device).to(dtype)
            b = torch.randn(n, n, device=device).to(dtype)
            c = torch.empty(n, n, device=device, dtype=dtype)
            ms, timing = timer(lambda a=a, b=b, c=c: torch.mm(a, b, out=c))
            rate = 2 * n**3 / (ms * 1e-3) / 1e12
            if best is None or rate > best[0]:
                best = (rate, n, timing)
    finally:
        if tf32 is not None:
            matmul.fp32_precision = flag
    return best


def measure_ceilings(device_type: str) -> dict:
    """Copy GB/s and matmul TFLOP/s (:func:`measure_copy`, :func:`measure_matmul`): bf16,
    fp16 and tf32 on a GPU, fp32 on the CPU."""
    import torch

    dev = torch.device(device_type)
    gbps, nbytes, _ = measure_copy(dev)
    out = {"copy_gbps": gbps, "copy_bytes": nbytes, "matmul": {}}
    kinds = (
        [("bf16", torch.bfloat16), ("fp16", torch.float16), ("tf32", torch.float32)]
        if device_type == "cuda"
        else [("fp32", torch.float32)]
    )
    for label, dtype in kinds:
        tflops, n, _ = measure_matmul(dev, dtype, tf32=label == "tf32")
        out["matmul"][label] = {"tflops": tflops, "n": n}
    if device_type == "cuda":
        torch.cuda.empty_cache()
    return out


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def ceilings_problem(entry) -> str:
    """An empty string when ``entry`` is a ceilings record as :func:`measure_ceilings` makes,
    else what is wrong with it."""
    if not isinstance(entry, dict):
        return f"the entry is a JSON {type(entry).__name__}, not an object"
    bad = [k for k in ("copy_gbps", "copy_bytes") if not _number(entry.get(k))]
    matmul = entry.get("matmul")
    if not isinstance(matmul, dict) or not matmul:
        bad.append("matmul")
    else:
        bad += [
            f"matmul.{label}"
            for label, mm in matmul.items()
            if not isinstance(mm, dict) or not _number(mm.get("tflops")) or not _number(mm.get("n"))
        ]
    return f"{', '.join(bad)} missing or not positive numbers" if bad else ""


def _read_cache() -> tuple[dict, str]:
    """({key: entry} of the cache file, what is wrong with the file or ""); a missing file
    is an empty cache."""
    path = cache_dir() / CACHE_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}, ""
    except OSError as exc:
        return {}, f"it cannot be read ({type(exc).__name__}: {exc})"
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        return {}, f"it does not parse ({type(exc).__name__}: {exc})"
    except RecursionError:
        return {}, "it does not parse (JSON nested too deeply)"
    if not isinstance(data, dict):
        return {}, f"it is a JSON {type(data).__name__}, not an object"
    return data, ""


def cached_ceilings(facts: dict | None = None) -> dict | None:
    """The cached ceilings of this device and versions, or None (never measures; a
    malformed cache or entry counts as none)."""
    entry = _read_cache()[0].get(cache_key(facts or device_facts()))
    return entry if entry is not None and not ceilings_problem(entry) else None


def ceilings(facts: dict, refresh: bool = False) -> tuple[dict, bool]:
    """(ceilings, came from the cache); measures and stores them when needed. A malformed
    cache file or entry is ignored with a note on stderr, measured again and replaced."""
    key = cache_key(facts)
    path = cache_dir() / CACHE_FILE
    data, problem = _read_cache()
    if key in data and not problem:
        problem = ceilings_problem(data[key])
        if problem:
            problem = f"{problem} (entry {key!r})"
    if problem:
        print(f"vlmkernels info: ignoring the ceilings cache {path}: {problem}; measuring "
              "again", file=sys.stderr)  # fmt: skip
    elif not refresh and key in data:
        return data[key], True
    entry = measure_ceilings(facts["device_type"])
    entry["measured_at"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    # re-read: another process may have stored its device's entry while this one measured;
    # only well-formed entries are written back (a malformed one could not even be dumped)
    data = {k: v for k, v in _read_cache()[0].items() if not ceilings_problem(v)}
    data[key] = entry
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # a name of its own: processes sharing the folder never rename each other's halves
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=CACHE_FILE, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        print(f"(could not write the ceilings cache {path}: {exc})", file=sys.stderr)
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return entry, False


# --------------------------------------------------------------------------------------
# Backends (info)
# --------------------------------------------------------------------------------------


def backends(facts: dict) -> dict[str, str]:
    from vlmkernels.core.backend import ROCM, ROCM_WHY, get_backend
    from vlmkernels.core.cuda import status as cuda_status
    from vlmkernels.core.runtime import INTERPRETED
    from vlmkernels.core.tuning import lookup_report

    if facts["device_type"] == "cuda" and ROCM:
        triton_line = f"unavailable: {ROCM_WHY}; GPU tensors take the PyTorch path"
    elif facts["device_type"] == "cuda":
        triton_line = f"compiled for {facts['arch']} (CUDA tensors run the Triton kernels)"
    elif INTERPRETED:
        triton_line = "interpreter (TRITON_INTERPRET=1): CPU tensors run the Triton kernels"
    else:
        triton_line = (
            "no GPU: CPU tensors take the PyTorch path (TRITON_INTERPRET=1 set before the "
            "import runs the Triton kernels in Triton's interpreter)"
        )
    ok, reason = cuda_status()
    cuda_line = ("available: " if ok else "unavailable: ") + reason
    try:
        configs = config_lines(lookup_report())
    except Exception as exc:  # noqa: BLE001 - info reports what it can
        configs = [f"unknown ({type(exc).__name__}: {exc})"]
    try:
        forced = get_backend()
    except ValueError as exc:  # a bad VLMKERNELS_BACKEND: every op would raise it
        raise CommandError(str(exc)) from None
    return {
        "triton": triton_line,
        "torch": "always (CPU default, float64 inputs)",
        "cuda": cuda_line,
        "forced": forced or "none (VLMKERNELS_BACKEND unset)",
        "configs": configs,
    }


def transformers_support() -> dict:
    """{"version": ..., "tested": [...], "models": {arch: {part: "ok" or why not}}} for the
    installed transformers (``vlmkernels.patch``), or {"version": None} without it."""
    try:
        import transformers
    except ImportError:
        return {"version": None}
    from vlmkernels.integrations import transformers as patching

    return {
        "version": transformers.__version__,
        "tested": list(patching.TESTED_VERSIONS),
        "models": patching.support(),
    }


def transformers_lines() -> list[str]:
    """The installed transformers and which model families ``vlmkernels.patch`` patches."""
    found = transformers_support()
    if found["version"] is None:
        return ["transformers: not installed (vlmkernels.patch needs it)"]
    tested = found["tested"]
    lines = [f"transformers {found['version']} (vlmkernels.patch tested with {', '.join(tested)}):"]
    from vlmkernels.integrations.transformers import part_label

    width = max(map(len, found["models"]), default=0)
    for arch, parts in found["models"].items():
        ok = [part_label(p) for p, v in parts.items() if v.startswith("ok")]
        refused = {p: v for p, v in parts.items() if not v.startswith("ok")}
        state = "patches " + ", ".join(ok) if ok else "does not patch"
        lines.append(f"  {arch:<{width}} {state}")
        lines += [f"    {p}: refused: {v.splitlines()[0]}" for p, v in refused.items()]
    return lines


def _config_text(entry: dict) -> str:
    source = entry.get("source", "?")
    if entry.get("path"):
        label = f"{entry.get('label') or 'configs'}, {entry.get('buckets', 0)} shape buckets"
        text = f"{source}: {entry['path']} ({label})"
    elif source == "default":
        by_config: dict[str, list[str]] = {}
        for dtype, config in (entry.get("defaults") or {}).items():
            by_config.setdefault(" ".join(f"{k}={v}" for k, v in config.items()), []).append(dtype)
        cfgs = "; ".join(f"{', '.join(ds)}: {c}" if len(by_config) > 1 else c
                         for c, ds in by_config.items())  # fmt: skip
        some = ", some variants another" if entry.get("variant_defaults") else ""
        text = f"default config ({cfgs}{some})" if cfgs else "default config"
    else:
        text = {
            "interpreter": "Triton's interpreter: one config",
            "autotune": "autotuned at the first call of each shape (VLMKERNELS_AUTOTUNE=1)",
        }.get(source, str(source))
    problems = [q for f in entry.get("files") or [] for q in f.get("problems") or []]
    if problems:
        text += "; ignored: " + "; ".join(str(q) for q in problems)
    return text


def config_lines(report: dict[str, dict]) -> list[str]:
    """One line per kernel from :func:`vlmkernels.core.tuning.lookup_report`."""
    return [f"{name}: {_config_text(entry)}" for name, entry in report.items()] or [
        "no tuned kernels"
    ]


def _format_ceilings(entry: dict, cached: bool) -> list[str]:
    origin = "cached" if cached else "measured now"
    lines = [
        f"ceilings ({origin}, {entry.get('measured_at', '?')}; {cache_dir() / CACHE_FILE}; "
        "--refresh re-measures):"
    ]
    lines.append(
        f"  copy    {entry['copy_gbps']:10.1f} GB/s   (read + write, "
        f"{entry['copy_bytes'] >> 20} MiB dst.copy_(src))"
    )
    for label, mm in entry["matmul"].items():
        lines.append(f"  matmul  {mm['tflops']:10.3g} TFLOP/s  ({label}, torch.mm {mm['n']}^3)")
    return lines


def cmd_info(args: argparse.Namespace) -> int:
    import vlmkernels.ops  # noqa: F401  (registers the families whose kernels info lists)

    facts = device_facts()
    found = backends(facts)
    entry, cached = (None, False) if args.no_ceilings else ceilings(facts, args.refresh)
    if args.json:
        doc = {"facts": facts, "backends": found, "ceilings": entry,
               "transformers": transformers_support()}  # fmt: skip
        print(json.dumps(doc, indent=1))
        return 0
    print(f"vlmkernels {facts['vlmkernels']} ({Path(__file__).resolve().parent})")
    print(
        f"python {facts['python']} | torch {facts['torch']} | triton {facts['triton']} | "
        f"CUDA {facts['cuda'] or '-'} | driver {facts['driver'] or '-'}"
    )
    print(f"device: {facts['device']} [{facts['device_type']}, {facts['arch']}]")
    print("backends:")
    for name in ("triton", "torch", "cuda"):
        label = "cuda (C++)" if name == "cuda" else name
        print(f"  {label:<11} {found[name]}")
    print(f"  {'forced':<11} {found['forced']}")
    for line in transformers_lines():
        print(line)
    print("Triton configs (per kernel; `vlmkernels tune` on a GPU writes tuned ones):")
    for line in found["configs"]:
        print(f"  {line}")
    if entry is not None:
        print("\n".join(_format_ceilings(entry, cached)))
    return 0


# --------------------------------------------------------------------------------------
# tune
# --------------------------------------------------------------------------------------


def cmd_tune(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available():
        print(
            "vlmkernels tune: no CUDA GPU here. Tuning times every config of the Triton "
            "kernels on the GPU that will run them (under Triton's interpreter autotuning "
            "collapses to one config), so there is nothing to tune on a CPU; the ops use the "
            "shipped configs or the heuristic defaults. Run it on the GPU machine.",
            file=sys.stderr,
        )
        return 2
    import vlmkernels.ops  # noqa: F401  (registers the families whose kernels it tunes)
    from vlmkernels.core import configs, runtime, tuner

    # everything that can be refused is, before hours of timing are spent
    if runtime.INTERPRETED:
        raise CommandError("cannot tune under Triton's interpreter (TRITON_INTERPRET=1): "
                           "unset it")  # fmt: skip
    try:
        tuner.kernel_names(args.ops or None)
    except ValueError as exc:
        raise CommandError(str(exc).removeprefix("tune: ")) from None
    out = args.out if args.out is not None else configs.user_config_dir()
    why = configs.unwritable_folder(out)
    if why is not None:
        where = "--out" if args.out is not None else configs.CONFIG_DIR_ENV
        raise CommandError(f"{where} {out}: {why}")
    written = tuner.tune(kernels=args.ops or None, device=None, out_dir=args.out, log=print)
    if not written:
        print(f"nothing written (out dir: {args.out or 'the tuner default'})")
        return 0
    print("wrote:")
    for name, path in written.items():
        print(f"  {name}: {path}")
    print("The ops read these at their next import (user directory first, then the package).")
    return 0


# --------------------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------------------


def cmd_inspect(args: argparse.Namespace) -> int:
    from vlmkernels.core import runtime

    if runtime.INTERPRETED:  # the kernels must be compiled, not interpreted: a fresh process
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        argv = [sys.executable, "-m", "vlmkernels", "inspect", *args.argv]
        return subprocess.run(argv, env=env).returncode
    import vlmkernels.ops  # noqa: F401  (registers the families)
    from vlmkernels.core import estimate, inspection
    from vlmkernels.core.files import write_json

    try:
        cases = inspection.select_cases(args.ops)
        arch = inspection.normalise_arch(args.arch)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    budget_path = args.budgets or inspection.BUDGET_FILE
    fresh = args.write_budgets and not Path(budget_path).exists()  # a new file to write
    try:
        budgets = {} if fresh else inspection.load_budgets(args.budgets)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    dtypes = tuple(args.dtype or inspection.DTYPES)
    configs = args.configs
    if args.write_budgets:
        configs, dtypes, cases = "all", inspection.DTYPES, inspection.all_cases()
    start = time.perf_counter()
    records = inspection.inspect_cases(cases, dtypes, arch, configs, use_cache=not args.no_cache)
    seconds = time.perf_counter() - start
    workloads = budgets.get("workloads", {})
    for r in records:
        if r["default"] and r["case"] in workloads:
            r["estimates"] = estimate.estimate(r, workloads[r["case"]])
    if args.write_budgets:
        new = inspection.new_budgets(records, budgets)
        try:  # whole or not at all: a file cut short would fail every later inspect
            write_json(Path(budget_path), new)
        except OSError as exc:
            raise CommandError(f"could not write {budget_path} ({exc}); it is unchanged") from None
        print(
            f"wrote {budget_path}: {len(new['instructions_per_tile'])} budgets, "
            f"{len(new['expected_failures'])} expected failures",
            file=sys.stderr,
        )
        for e in new["expected_failures"]:
            print(
                f"  expected failure {e['check']} {e['case']}/{e['dtype']} {e['config']}: "
                f"{e['reason']}",
                file=sys.stderr,
            )
        budgets = new
    unexpected, expected, stale = inspection.check(records, budgets)
    if args.json:
        print(json.dumps(records, indent=1))
    else:
        print(
            f"{arch}, Triton {records[0].get('triton') if records else '?'}: * = default "
            "config; instr = static instructions per tile (the loop around the k-loop), per "
            "loop (the busiest innermost loop) or per program; spill = ptxas's spill stores, "
            "bytes per thread (a local array is not one); CTA = CTAs per SM"
        )
        print(
            "\n".join(inspection.table_lines(records, budgets) + inspection.estimate_lines(records))
        )
        for f in expected:
            print(
                f"expected failure: {f['check']} {f['case']}/{f['dtype']} {f['config']}: "
                f"{f['message']} ({f['reason']})"
            )
        for e in stale:
            print(
                f"passes now (remove from expected_failures): {e['check']} "
                f"{e['case']}/{e['dtype']} {e.get('config', '')}"
            )
        for f in unexpected:
            print(f"FAILED {f['check']} {f['case']}/{f['dtype']} {f['config']}: {f['message']}")
    print(
        f"{len(records)} variants in {seconds:.1f} s (cache: {inspection.cache_dir()})",
        file=sys.stderr,
    )
    return 1 if args.check and (unexpected or stale) else 0


# --------------------------------------------------------------------------------------
# bench, profile, report: the checkout's benchmarks package
# --------------------------------------------------------------------------------------


def _repo_candidates() -> list[Path]:
    here = Path(__file__).resolve().parent.parent
    cwd = Path.cwd().resolve()
    return [here, cwd, *cwd.parents]


def benchmarks_root() -> Path | None:
    """The checkout whose ``benchmarks/`` folder holds the harness, or None."""
    for root in _repo_candidates():
        if (root / "benchmarks" / "harness.py").is_file():
            return root
    return None


def load_benchmarks(root: Path):
    """The ``benchmarks`` package of the checkout ``root``, imported from its files.

    The package is not installed, and the checkout need not be on ``sys.path``: it is
    imported as any package is, from a spec built on its location
    (``importlib.util.spec_from_file_location`` with ``submodule_search_locations``, so
    ``benchmarks.<module>`` imports resolve inside that folder), and registered under its
    name as an import registers it. ``sys.path`` is not changed and no module is removed.
    The suites it runs are the op families' (:func:`benchmarks.suites`). A ``benchmarks``
    already imported from that folder is returned as it is; one imported from elsewhere is a
    :class:`CommandError` (two packages cannot share the name in one process).
    """
    init = (root / "benchmarks" / "__init__.py").resolve()
    loaded = sys.modules.get("benchmarks")
    if loaded is not None:
        where = Path(getattr(loaded, "__file__", "") or "")
        if where.resolve() == init:
            return loaded
        raise CommandError(
            f"another `benchmarks` module is already imported ({where or loaded!r}), not "
            f"the checkout's {init.parent}; run the command in a fresh process"
        )
    spec = importlib.util.spec_from_file_location(
        "benchmarks", init, submodule_search_locations=[str(init.parent)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["benchmarks"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["benchmarks"]
        raise
    return module


def _delegate(command: str, argv: list[str]) -> int:
    module_name, _ = DELEGATED[command]
    root = benchmarks_root()
    if root is None:
        print(
            f"vlmkernels {command}: the benchmark suites live in the benchmarks/ folder of a "
            "vlmkernels checkout and are not installed with the package. Run this from a "
            "checkout (git clone the repository, `pip install -e .` or `make bench`, then run "
            "it inside the clone). `vlmkernels info`, `tune` and `inspect` work anywhere.",
            file=sys.stderr,
        )
        return 2
    try:
        load_benchmarks(root)
    except CommandError as exc:
        print(f"vlmkernels {command}: {exc}", file=sys.stderr)
        return 2
    module = importlib.import_module(module_name)
    return int(module.main(argv, prog=f"vlmkernels {command}") or 0)


# --------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vlmkernels",
        description="Triton kernels for vision-language models: device facts, benchmarks, "
        "tuning, profiling and reports.",
        epilog="bench, profile and report need a checkout (the benchmarks/ folder); "
        "`vlmkernels COMMAND --help` gives each command's options.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser("info", help="device, versions, backends and device ceilings")
    info.add_argument("--refresh", action="store_true", help="re-measure the cached ceilings")
    info.add_argument("--no-ceilings", action="store_true", help="skip the ceilings")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=cmd_info, parser=info)
    tune = sub.add_parser("tune", help="autotune the Triton kernels on this GPU, persist winners")
    tune.add_argument("ops", nargs="*", help="ops or kernels to tune (default: all)")
    tune.add_argument(
        "--out", type=Path, help="config directory (default: the tuner's, VLMKERNELS_CONFIG_DIR)"
    )
    tune.set_defaults(func=cmd_tune, parser=tune)
    insp = sub.add_parser(
        "inspect",
        help="compile the Triton kernels for a GPU (no GPU needed) and report "
        "registers, spills, shared memory, occupancy, instruction mix and estimates",
    )
    insp.add_argument("ops", nargs="*", help="families, kernels, variants or ops (default: all)")
    insp.add_argument("--arch", default="sm_90a", help="target architecture (default sm_90a)")
    insp.add_argument(
        "--dtype",
        action="append",
        choices=["bf16", "fp16", "fp32"],
        help="input dtype (repeatable; default bf16 and fp32)",
    )
    insp.add_argument(
        "--configs",
        choices=["all", "default"],
        default="all",
        help="every config of each kernel's space, or the default one",
    )
    insp.add_argument("--json", action="store_true", help="the records as a JSON list")
    insp.add_argument(
        "--check",
        action="store_true",
        help="exit 1 on a failed check (spill, shared memory, budget) that is not "
        "an expected failure of the budget file, or on a stale expected failure",
    )
    insp.add_argument(
        "--write-budgets",
        action="store_true",
        help="regenerate the budget file from every variant (default configs' "
        "instructions + margin; expected failures kept, fixed ones dropped)",
    )
    insp.add_argument("--budgets", type=Path, help="the budget file (default: the package's)")
    insp.add_argument("--no-cache", action="store_true", help="compile again, ignore the cache")
    insp.set_defaults(func=cmd_inspect, parser=insp)
    for name, (_, text) in DELEGATED.items():
        sub.add_parser(name, help=text, add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        status = _run(argv)
        sys.stdout.flush()  # a closed pipe shows here, not at the interpreter's exit
        return status
    except BrokenPipeError:
        # the reader left (`vlmkernels info | head -3`): stop as a Unix tool does on SIGPIPE,
        # without a traceback; stdout goes to devnull so the interpreter's flush at exit
        # does not raise again
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)  # dup2 made its copy: this one would stay open in the process
        return 141


def _run(argv: list[str]) -> int:
    if argv and argv[0] in DELEGATED:
        return _delegate(argv[0], argv[1:])
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # argparse would blame the top parser for a subcommand's unknown option
        getattr(args, "parser", parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    args.argv = argv[1:]
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except CommandError as exc:
        print(f"vlmkernels {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Static inspection of the families' Triton kernels: compile each declared variant for a GPU
architecture on any machine (no GPU needed) and read what the compiler made of it.

For every :class:`~.family.CompileCase` of every registered family, every input dtype asked
for and every config of its kernel's space the tuner may pick for that variant and dtype
(:meth:`~.tuning.TunedKernel.space_for`; the default among them), Triton's whole
pipeline runs for an explicit target (TTIR -> TTGIR -> LLIR -> PTX -> cubin, Triton's own
ptxas), and the cubin is read with ``cuobjdump``: registers and stack frame (its resource
usage), ptxas's own report of that compile (spill stores and loads: local memory that is
not a spill, such as libdevice's table for large sin/cos arguments, is not counted), the
SASS (:mod:`.sass`: local-memory traffic, the hot loop and its instruction mix), Triton's
shared memory, and the CTAs per SM those allow on the
architecture (:data:`ARCHS`). Records are cached as JSON by the source's hash (the kernel and
every Triton function it calls, the argument types and hints, the constexprs), the options,
the target and the Triton version (:func:`cache_dir`), so a second run reads them back.

The checks (:func:`check`) and the instruction budgets live in ``kernel_budgets.json`` beside
this package (:data:`BUDGET_FILE`; ``vlmkernels inspect --write-budgets`` regenerates it).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import pathlib
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable

from . import estimate, runtime, sass
from .family import CompileCase, families
from .files import write_json

__all__ = ["ARCHS", "BUDGET_FILE", "DTYPES", "FORMAT", "all_cases", "cache_dir", "check",
           "compile_case", "config_label", "estimate_lines", "failures", "inspect_cases",
           "load_budgets", "missed", "new_budgets", "normalise_arch", "occupancy",
           "select_cases", "source", "table_lines"]  # fmt: skip

FORMAT = 3  # of the cached records: bump when a record's fields change
BUDGET_FILE = pathlib.Path(__file__).resolve().parents[1] / "kernel_budgets.json"
DTYPES = ("bf16", "fp32")

# Per-SM limits (CUDA C programming guide, compute capability table): registers per SM and
# per thread, register allocation unit per warp, shared memory per block (opt-in maximum)
# and per SM, the shared memory the system reserves per block, warps and CTAs per SM.
_SM90 = dict(regs_per_sm=65536, max_regs_per_thread=255, reg_unit=256,
             shared_per_block=227 * 1024, shared_per_sm=228 * 1024, reserved_per_block=1024,
             max_warps=64, max_ctas=32)  # fmt: skip
_SM80 = dict(_SM90, shared_per_block=163 * 1024, shared_per_sm=164 * 1024)
_SM89 = dict(_SM90, shared_per_block=99 * 1024, shared_per_sm=100 * 1024, max_warps=48,
             max_ctas=24)  # fmt: skip
ARCHS = {"sm_80": _SM80, "sm_86": _SM89, "sm_89": _SM89, "sm_90": _SM90, "sm_90a": _SM90}


def arch_number(arch: str) -> int:
    """80, 90... of "sm_90a", "sm_90", "90a" or "90"."""
    return int(arch.removeprefix("sm_").rstrip("a"))


def normalise_arch(arch: str) -> str:
    name = arch if arch.startswith("sm_") else f"sm_{arch}"
    if name not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)}")
    return name


# --------------------------------------------------------------------------------------
# Which variants
# --------------------------------------------------------------------------------------


def all_cases() -> list[tuple[str, CompileCase]]:
    """(family, case) over every registered family's compile cases."""
    return [
        (name, case)
        for name, f in families().items()
        for case in (f.compile_cases() if f.compile_cases else [])
    ]


def select_cases(names: Iterable[str] = ()) -> list[tuple[str, CompileCase]]:
    """The cases named by family, kernel, case or op alias (a family's ``aliases``); all of
    them without names. An unknown name is a ValueError listing the known ones."""
    cases = all_cases()
    names = list(names)
    if not names:
        return cases
    chosen, known = [], set()
    for fam, case in cases:
        aliases = families()[fam].aliases
        labels = {fam, case.name, case.kernel.name}
        known |= labels | set(aliases)
        for name in names:
            if name in labels or case.kernel.name in aliases.get(name, ()):
                chosen.append((fam, case))
                break
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown kernels {unknown}; known: {', '.join(sorted(known))}")
    return chosen


# --------------------------------------------------------------------------------------
# Compiling one variant
# --------------------------------------------------------------------------------------


def _jit_of(kernel):
    import triton

    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn
    return kernel


def source(case: CompileCase, dtype: str, config):
    """The AST source of ``case`` for inputs of ``dtype`` with ``config``'s constexprs, with
    the argument types and hints Triton's launcher would specialise."""
    from triton.compiler import ASTSource

    jit = _jit_of(case.kernel)
    constexprs = {**case.constants(dtype), **config.kwargs, **{n: 1 for n in case.unit_strides}}
    pointers = case.pointer_types(dtype)
    sig, attrs = {}, {}
    for i, name in enumerate(jit.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = case.scalars.get(name, "i32")
            if name in case.aligned:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(jit, sig, constexprs=constexprs, attrs=attrs)


def config_label(config) -> str:
    """ "BM=128,BN=128,BK=64 w8 s3": the constexprs, warps and stages."""
    kw = ",".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{kw} w{config.num_warps} s{config.num_stages}"


def _tool(name: str) -> str:
    import triton

    bundled = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    for candidate in (str(bundled), shutil.which(name), f"/usr/local/cuda/bin/{name}"):
        if candidate and os.path.exists(candidate):
            return candidate
    raise RuntimeError(f"{name} not found (neither Triton's bundled copy nor CUDA's)")


def _cuobjdump(cubin: bytes, option: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([_tool("cuobjdump"), option, f.name], capture_output=True,
                             text=True, check=True)  # fmt: skip
    finally:
        os.unlink(f.name)
    return out.stdout


def _resource(usage: str, field: str) -> int:
    for token in usage.split():
        if token.startswith(field + ":"):
            return int(token.split(":")[1])
    return 0


def occupancy(registers: int, shared: int, warps: int, arch: str) -> tuple[int, str]:
    """(CTAs per SM, the resource that limits it) for a CTA of ``warps`` warps using
    ``registers`` per thread and ``shared`` bytes; 0 when the CTA cannot launch."""
    lim = ARCHS[normalise_arch(arch)]
    if shared > lim["shared_per_block"]:
        return 0, "shared memory over the per-block limit"
    if registers > lim["max_regs_per_thread"]:
        return 0, "registers"
    per_warp = math.ceil(max(registers, 1) * 32 / lim["reg_unit"]) * lim["reg_unit"]
    by = {
        "registers": (lim["regs_per_sm"] // per_warp) // warps,
        "shared memory": lim["shared_per_sm"] // (shared + lim["reserved_per_block"]),
        "warps": lim["max_warps"] // warps,
        "CTAs": lim["max_ctas"],
    }
    limiter = min(by, key=by.get)
    return by[limiter], limiter


_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_spills(log: str) -> tuple[int, int] | None:
    """(bytes of spill stores, of spill loads) per thread from ptxas's ``-v`` log of one
    kernel; (0, 0) when it reports none (ptxas 13 prints no "Function properties" line for a
    kernel without stack); None when ``log`` is not such a log."""
    if not re.search(r"Used \d+ registers", log):
        return None
    found = _PTXAS_SPILLS.search(log)
    return (int(found[1]), int(found[2])) if found else (0, 0)


def _compile_logged(src, target, options):
    """``triton.compile`` with ptxas run (not read from Triton's cache) and its ``-v`` log,
    which Triton prints when asked, captured: (compiled, log)."""
    import triton
    from triton import knobs

    saved = knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log
    knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = True, True
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            compiled = triton.compile(src, target=target, options=options)
    finally:
        knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = saved
    return compiled, out.getvalue()


def _analyse(cubin: bytes, shared: int, warps: int, arch: str, ptxas_log: str = "") -> dict:
    usage = _cuobjdump(cubin, "--dump-resource-usage")
    code = sass.parse(_cuobjdump(cubin, "--dump-sass"))
    registers = _resource(usage, "REG")
    local_st, local_ld = sass.local_memory_bytes(code)
    # without ptxas's word, all local-memory traffic counts as spills (never fewer)
    spill_st, spill_ld = ptxas_spills(ptxas_log) or (local_st, local_ld)
    ctas, limiter = occupancy(registers, shared, warps, arch)
    region = sass.hot_region(code)
    body = region.of(code)
    inner = [r for r in sass.loops(code) if region.holds(r)]
    inner = [r for r in inner if not any(r.holds(o) for o in inner)]
    return dict(
        registers=registers,
        stack_bytes=_resource(usage, "STACK"),
        spill_bytes=spill_st,
        spill_load_bytes=spill_ld,
        local_store_bytes=local_st,
        local_load_bytes=local_ld,
        shared_bytes=shared,
        ctas_per_sm=ctas,
        occupancy_limit=limiter,
        region=region.kind,
        instructions_per_tile=len(body),
        inner_loop_instructions=sum(len(r.of(code)) for r in inner),
        inner_loops=[len(r.of(code)) for r in sorted(inner, key=lambda r: r.start)],
        instructions_total=len(code),
        mix=sass.mix(body),
        program_mix=sass.mix(code),
    )


_PTXAS_VARIABLES = ("TRITON_PTXAS_PATH", "TRITON_PTXAS_BLACKWELL_PATH")


def cache_dir() -> pathlib.Path:
    """``$VLMKERNELS_INSPECT_CACHE``; else ``build/inspect-cache`` of the checkout the
    package is in (git-ignored); else ``~/.cache/vlmkernels/inspect``."""
    env = os.environ.get("VLMKERNELS_INSPECT_CACHE", "").strip()
    if env:
        return pathlib.Path(env).expanduser()
    root = pathlib.Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file() and (root / "vlmkernels").is_dir():
        return root / "build" / "inspect-cache"
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = pathlib.Path(base).expanduser() if base else pathlib.Path.home() / ".cache"
    return base / "vlmkernels" / "inspect"


# what every compiled record holds (a cache entry without them is damaged)
_RECORD_KEYS = ("arch", "triton", "registers", "spill_bytes", "shared_bytes", "ctas_per_sm",
                "region", "instructions_per_tile", "mix")  # fmt: skip


def _read_cached(path: pathlib.Path) -> dict | None:
    """The record cached at ``path``; None when there is none or it is damaged (not JSON,
    not an object, a key missing), and then the variant compiles again."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or any(k not in record for k in _RECORD_KEYS):
        return None
    return record


def compile_options(config) -> dict:
    """The options a launch with ``config`` compiles with: its warps and stages, and the
    floating-point contraction every launch asks for (:func:`.runtime.fp_fusion`)."""
    return dict(num_warps=config.num_warps, num_stages=config.num_stages,
                **runtime.fp_fusion())  # fmt: skip


def compile_case(case: CompileCase, dtype: str, config, arch: str = "sm_90a",
                 use_cache: bool = True) -> dict:  # fmt: skip
    """One variant with one config, compiled for ``arch``: a record (see
    :func:`inspect_cases`). Raises what Triton raises when it does not compile."""
    import triton
    from triton.backends.compiler import GPUTarget

    if runtime.INTERPRETED:
        raise RuntimeError("the kernels are interpreted (TRITON_INTERPRET=1 at import): "
                           "inspect them in a process without it")  # fmt: skip
    arch = normalise_arch(arch)
    src = source(case, dtype, config)
    options = compile_options(config)
    # the assemblers a process may swap in: the same Triton's PTX gives other registers
    # and spills with another ptxas (Triton 3.9's CUDA 13 one against its bundled CUDA 12)
    assemblers = [os.environ.get(v, "") for v in _PTXAS_VARIABLES]
    key = hashlib.sha256(
        json.dumps(
            [FORMAT, triton.__version__, arch, dtype, src.hash(), options, assemblers]
        ).encode()
    ).hexdigest()[:32]
    path = cache_dir() / f"{key}.json"
    default = case.kernel.default_for(dtype, case.constants(dtype))
    labels = dict(kernel=case.kernel.name, case=case.name, config=config_label(config),
                  default=config is default, dtype=dtype)  # fmt: skip
    cached = _read_cached(path) if use_cache else None
    if cached is not None:  # the labels are the caller's: two cases may compile to one source
        return {**cached, **labels}
    target = GPUTarget("cuda", arch_number(arch), 32)
    compiled, log = _compile_logged(src, target, options)
    ptx, ttgir = compiled.asm["ptx"], compiled.asm["ttgir"]
    record = dict(
        **labels,
        arch=arch,
        triton=triton.__version__,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        constexprs=dict(config.kwargs),
        mma="wgmma" if "wgmma" in ptx else ("mma" if "mma.sync" in ptx else None),
        async_copies="async_copy" in ttgir or "async_tma" in ttgir,
        **_analyse(compiled.asm["cubin"], compiled.metadata.shared, config.num_warps, arch, log),
    )
    if use_cache:
        try:  # whole or not at all, its temporary removed when the write fails
            write_json(path, record)
        except OSError:
            pass  # a read-only or full cache: the record is still returned
    return record


def inspect_cases(cases, dtypes=DTYPES, arch: str = "sm_90a", configs: str = "all",
                  use_cache: bool = True, progress=None) -> list[dict]:  # fmt: skip
    """Records for ``cases`` ((family, case) pairs, :func:`select_cases`) x ``dtypes`` x
    configs ("all": the kernel's space for that variant and dtype, the configs the tuner may
    pick; "default": the untuned default), in that order.

    A record: ``family``, ``kernel``, ``case``, ``config`` (label), ``default`` (bool),
    ``dtype``, ``arch``, ``triton``, ``num_warps``, ``num_stages``, ``constexprs``, ``mma``
    ("wgmma", "mma" or None), ``async_copies``, ``registers``, ``stack_bytes``,
    ``spill_bytes`` / ``spill_load_bytes`` (ptxas's spill stores / loads per thread),
    ``local_store_bytes`` / ``local_load_bytes`` (the SASS's static local-memory store /
    load bytes: spills and local arrays),
    ``shared_bytes``, ``ctas_per_sm`` and ``occupancy_limit``, ``region`` ("tile": one
    iteration of the loop around the k-loop, "loop": the busiest innermost loop,
    "program": the whole kernel), ``instructions_per_tile`` (static count of that region),
    ``inner_loop_instructions`` (its inner loops, counted once in it), ``inner_loops`` (the
    size of each, in address order), ``instructions_total``,
    ``mix`` (the region's instruction mix, :func:`.sass.mix`), ``program_mix``. A variant
    that does not compile gives ``{"error": ...}`` with the labels instead.
    """
    records = []
    for fam, case in cases:
        for dtype in dtypes:
            space = case.kernel.space_for(dtype, case.constants(dtype))
            defaults = [case.kernel.default_for(dtype, case.constants(dtype))]
            for config in space if configs == "all" else defaults:
                if progress:
                    progress(f"{case.name} {dtype} {config_label(config)}")
                try:
                    record = compile_case(case, dtype, config, arch, use_cache)
                except Exception as exc:  # every failure is reported, then checked
                    record = dict(kernel=case.kernel.name, case=case.name, dtype=dtype,
                                  config=config_label(config), arch=normalise_arch(arch),
                                  default=config is defaults[0],
                                  error=f"{type(exc).__name__}: {str(exc)[:400]}")  # fmt: skip
                records.append(dict(family=fam, **record))
    return records


def missed(case: CompileCase, dtype: str, record: dict) -> list[str]:
    """The expectations of ``case`` (``CompileCase.expect``) that ``record`` misses ("async"
    applies to 16-bit inputs only: fp32 tiles are loaded synchronously)."""
    misses = []
    if "error" in record:
        return [record["error"]]
    if "mma" in case.expect and record["mma"] is None:
        misses.append("no tensor-core instructions")
    if "async" in case.expect and dtype != "fp32" and not record["async_copies"]:
        misses.append("loads are not asynchronous")
    if "no_spill" in case.expect and (record["spill_bytes"] or record["spill_load_bytes"]):
        misses.append("spills")
    return misses


# --------------------------------------------------------------------------------------
# Checks and budgets
# --------------------------------------------------------------------------------------


def load_budgets(path: pathlib.Path | None = None) -> dict:
    """The budget file: the package's (``{}`` when it has none) or ``path``, which must
    exist and hold a JSON object (ValueError saying what is wrong otherwise)."""
    if path is None:
        return json.loads(BUDGET_FILE.read_text()) if BUDGET_FILE.is_file() else {}
    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(f"--budgets {path}: no such file")
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"--budgets {path}: not a budget file ({exc})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"--budgets {path}: not a budget file (a JSON {type(doc).__name__})")
    wrong = _malformed_section(doc)
    if wrong:
        raise ValueError(f"--budgets {path}: not a budget file ({wrong})")
    return doc


def _malformed_section(doc: dict) -> str | None:
    """What is wrong with the sections of a budget file the checks read, or None."""

    def number(v) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool)

    for name in ("instructions_per_tile", "measured"):
        section = doc.get(name, {})
        if not isinstance(section, dict) or not all(number(v) for v in section.values()):
            return f"{name!r} must be an object of numbers"
    failures = doc.get("expected_failures", [])
    keys = ("check", "case", "dtype", "reason")
    if not isinstance(failures, list) or not all(
        isinstance(e, dict) and all(isinstance(e.get(k), str) for k in keys) for e in failures
    ):
        return f"'expected_failures' must be a list of objects with {', '.join(keys)}"
    for name in ("workloads", "margin"):
        if not isinstance(doc.get(name, {}), dict):
            return f"{name!r} must be an object"
    return None


def _budget_key(record: dict) -> str:
    return f"{record['case']}/{record['dtype']}"


def _expected(budgets: dict, record: dict, name: str) -> str | None:
    """The reason given for an expected failure of check ``name`` on ``record``, or None."""
    for entry in budgets.get("expected_failures", []):
        if (entry["check"] == name and entry["case"] == record["case"]
                and entry["dtype"] == record["dtype"]
                and entry.get("config", record["config"]) == record["config"]):  # fmt: skip
            return entry["reason"]
    return None


def failures(records: list[dict], budgets: dict) -> list[dict]:
    """Every failed check, as {"check", "case", "dtype", "config", "message"}:

    - "compiles": every variant and config compiles;
    - "no_spill": no default config spills (local-memory stores or loads);
    - "shared": every config the tuner may pick for the variant and dtype (any of them may
      be tuned in) fits the architecture's shared memory per block;
    - "budget": a default config's ``instructions_per_tile`` is at most the budget of its
      (case, dtype), where the file's Triton version is the one running (another version
      compiles to other SASS).
    """
    out = []
    same_triton = budgets.get("triton") in {r.get("triton") for r in records}

    def fail(name, r, message):
        out.append(dict(check=name, case=r["case"], dtype=r["dtype"], config=r["config"],
                        message=message))  # fmt: skip

    for r in records:
        if "error" in r:
            fail("compiles", r, r["error"])
            continue
        limit = ARCHS[r["arch"]]["shared_per_block"]
        if r["shared_bytes"] > limit:
            fail("shared", r, f"{r['shared_bytes']} B of shared memory, limit {limit} B")
        if not r["default"]:
            continue
        if r["spill_bytes"] or r["spill_load_bytes"]:
            fail("no_spill", r, f"spills {r['spill_bytes']} B stored, "
                                f"{r['spill_load_bytes']} B loaded per thread")  # fmt: skip
        budget = budgets.get("instructions_per_tile", {}).get(_budget_key(r))
        if same_triton and budget is not None and r["instructions_per_tile"] > budget:
            fail("budget", r, f"{r['instructions_per_tile']} instructions per "
                              f"{r['region']}, budget {budget}")  # fmt: skip
    return out


def check(records: list[dict], budgets: dict) -> tuple[list[dict], list[dict], list[dict]]:
    """(unexpected failures, expected failures with their ``reason``, stale expectations:
    entries of ``expected_failures`` whose check now passes on an inspected variant)."""
    found = failures(records, budgets)
    unexpected, expected = [], []
    for f in found:
        reason = _expected(budgets, f, f["check"])
        (expected if reason else unexpected).append({**f, "reason": reason} if reason else f)
    inspected = {(r["case"], r["dtype"], r["config"]) for r in records}
    failing = {(f["check"], f["case"], f["dtype"], f["config"]) for f in found}

    def covers(e, key):  # an entry without a config covers every config
        return key[:2] == (e["case"], e["dtype"]) and e.get("config", key[2]) == key[2]

    stale = [
        e for e in budgets.get("expected_failures", [])
        if any(covers(e, k) for k in inspected)
        and not any(k[0] == e["check"] and covers(e, k[1:]) for k in failing)
    ]  # fmt: skip
    return unexpected, expected, stale


def new_budgets(records: list[dict], old: dict, margin: float = 0.02, slack: int = 8) -> dict:
    """The budget file for ``records`` (every default config): each (case, dtype) gets its
    measured ``instructions_per_tile`` plus ``margin`` and ``slack`` instructions. Expected
    failures that still fail keep their reasons; fixed ones are dropped; new failures are
    added with a reason starting "TODO" (the tests refuse it until someone writes why)."""
    budgets = {
        _budget_key(r): math.ceil(r["instructions_per_tile"] * (1 + margin)) + slack
        for r in records
        if r["default"] and "error" not in r
    }
    measured = {_budget_key(r): r["instructions_per_tile"]
                for r in records if r["default"] and "error" not in r}  # fmt: skip
    triton_versions = sorted({r["triton"] for r in records if "triton" in r})
    keep = {
        k: v
        for k, v in old.items()
        if k not in ("instructions_per_tile", "measured", "expected_failures", "triton", "arch")
    }
    draft = dict(old, instructions_per_tile=budgets)
    expected = []
    for f in failures(records, {k: v for k, v in draft.items() if k != "expected_failures"}):
        if f["check"] == "budget":
            continue
        reason = _expected(old, f, f["check"]) or (
            f"TODO: explain or fix ({f['message']}; found by --write-budgets)"
        )
        expected.append(dict(check=f["check"], case=f["case"], dtype=f["dtype"],
                             config=f["config"], reason=reason))  # fmt: skip
    return dict(
        keep,
        arch=records[0]["arch"] if records else "sm_90a",
        triton=triton_versions[0] if len(triton_versions) == 1 else triton_versions,
        margin=dict(relative=margin, instructions=slack),
        instructions_per_tile=dict(sorted(budgets.items())),
        measured=dict(sorted(measured.items())),
        expected_failures=expected,
    )


# --------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------

_MIX_COLUMNS = ("MMA", "FFMA", "FADD", "FMUL", "MUFU", "SHFL", "BAR")


def _widths(mix: dict, kind: str) -> str:
    """ "128x24 16x8": the instructions of ``kind`` ("LDG", "STG"...) by width in bits."""
    found = sorted(
        (
            (int(k.split(".")[1]), v)
            for k, v in mix.items()
            if k.startswith(kind + ".") and k.split(".")[1].isdigit()
        ),
        reverse=True,
    )
    return " ".join(f"{w}x{n}" for w, n in found) or "-"


def table_lines(records: list[dict], budgets: dict) -> list[str]:
    """The table of ``vlmkernels inspect``: one line per kernel variant and config."""
    head = (
        f"{'case':20s} {'dtype':5s} {'config':26s} {'regs':>4s} {'spill':>5s} {'smem KB':>7s} "
        f"{'CTA':>3s} {'region':7s} {'instr':>5s} {'budget':>6s} "
        + " ".join(f"{c:>5s}" for c in _MIX_COLUMNS)
        + "  LDG | STG | LDS | STS"
    )
    lines = [head, "-" * len(head)]
    limits = budgets.get("instructions_per_tile", {})
    for r in records:
        label = (
            f"{r['case']:20s} {r['dtype']:5s} {('*' if r['default'] else ' ') + r['config']:26s}"
        )
        if "error" in r:
            lines.append(f"{label} FAILED: {r['error'][:120]}")
            continue
        mix = r["mix"]
        budget = limits.get(f"{r['case']}/{r['dtype']}", "-") if r["default"] else ""
        lines.append(
            f"{label} {r['registers']:4d} {r['spill_bytes']:5d} {r['shared_bytes'] / 1024:7.1f} "
            f"{r['ctas_per_sm']:3d} {r['region']:7s} {r['instructions_per_tile']:5d} "
            f"{budget!s:>6s} "
            + " ".join(f"{mix.get(c, 0):5d}" for c in _MIX_COLUMNS)
            + "  "
            + " | ".join(_widths(mix, k) for k in ("LDG", "STG", "LDS", "STS"))
        )
    return lines


def estimate_lines(records: list[dict]) -> list[str]:
    lines = []
    for r in records:
        for e in r.get("estimates", []):
            lines.append(
                f"{r['case']:20s} {r['dtype']:5s} {e['shape']:28s} {e['device']:5s} "
                f"{e['low_ms']:9.3f} .. {e['high_ms']:9.3f} ms  ({e['bound']}-bound)"
            )
    if not lines:
        return []
    return (
        [
            "",
            "Estimated time of one launch over the whole M x N product (or all programs) at the "
            "benchmark shapes, default config (a static model, not a measurement):",
        ]
        + lines
        + ["", "Assumptions:"]
        + [f"  {a}" for a in estimate.assumptions()]
    )

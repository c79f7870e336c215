"""Compile every family's Triton kernels for sm_90 (H100/H200) without a GPU and report their
resources.

Runs Triton's full compiler (TTIR -> TTGIR -> LLIR -> PTX -> cubin, ptxas included) for an
explicit target on each compile-time variant a family declares
(:class:`vlmkernels.core.family.CompileCase`), so kernels that would not compile on the GPU
fail here; prints registers, spills and shared memory per variant and config (from ptxas),
and checks what each variant expects ("mma", "async", "no_spill").

    python scripts/compile_check.py [--arch 90] [--dtype bf16] [--configs all|first] [--only P]

One line per variant and config, "ok" or "FAIL"; exit status 1 if any failed or missed an
expectation.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import vlmkernels  # noqa: E402, F401  (registers the families)
from vlmkernels.core.family import CompileCase, families  # noqa: E402


def jit_of(kernel):
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn
    return kernel


def source(case: CompileCase, dtype: str, config: triton.Config) -> ASTSource:
    """The AST source of ``case`` for inputs of ``dtype`` with ``config``'s constexprs, with
    the argument types and hints Triton's launcher would specialise."""
    jit = jit_of(case.kernel)
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


def _ptxas(ptxas: str, ptx: str, arch: str) -> str:
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    out = subprocess.run(
        [ptxas, f"-arch=sm_{arch}a", "-v", f.name, "-o", os.devnull],
        capture_output=True,
        text=True,
    )
    os.unlink(f.name)
    return out.stdout + out.stderr


def ptxas_resources(ptx: str, arch: str) -> dict | str:
    """{"registers", "spill_stores", "spill_loads"} from ptxas -v (Triton's bundled ptxas;
    if it rejects the PTX version Triton wrote, the version line is lowered to the one it
    names), or ptxas's last line when it reports none."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas")
    if not os.path.exists(ptxas):
        ptxas = "ptxas"
    text = _ptxas(ptxas, ptx, arch)
    accepted = re.search(r"current version is '([\d.]+)'", text)
    if accepted:
        ptx = re.sub(r"^\.version \S+", f".version {accepted.group(1)}", ptx, count=1, flags=re.M)
        text = _ptxas(ptxas, ptx, arch)
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if not regs:
        return "ptxas: " + text.strip().splitlines()[-1] if text.strip() else "ptxas: no report"
    return {"registers": int(regs.group(1)), "spill_stores": int(spill.group(1)),
            "spill_loads": int(spill.group(2))}  # fmt: skip


def compile_case(case: CompileCase, dtype: str, config: triton.Config, arch: str) -> dict:
    """Compiles one variant with one config: a record of what came out."""
    target = GPUTarget("cuda", int(arch.rstrip("a")), 32)
    compiled = triton.compile(
        source(case, dtype, config),
        target=target,
        options=dict(num_warps=config.num_warps, num_stages=config.num_stages),
    )
    ptx, ttgir = compiled.asm["ptx"], compiled.asm["ttgir"]
    return {
        "mma": "wgmma" if "wgmma" in ptx else ("mma" if "mma.sync" in ptx else None),
        "async": "async_copy" in ttgir or "async_tma" in ttgir,
        "shared": compiled.metadata.shared,
        "resources": ptxas_resources(ptx, arch),
    }


def missed(case: CompileCase, dtype: str, record: dict) -> list[str]:
    """The expectations of ``case`` that ``record`` misses ("async" applies to 16-bit
    inputs only: fp32 tiles are loaded synchronously)."""
    misses = []
    if "mma" in case.expect and record["mma"] is None:
        misses.append("no tensor-core instructions")
    if "async" in case.expect and dtype != "fp32" and not record["async"]:
        misses.append("loads are not asynchronous")
    resources = record["resources"]
    if "no_spill" in case.expect:
        if not isinstance(resources, dict):
            misses.append(str(resources))
        elif resources["spill_stores"] or resources["spill_loads"]:
            misses.append("spills")
    return misses


def describe(record: dict) -> str:
    resources = record["resources"]
    if isinstance(resources, dict):
        regs = (f"regs {resources['registers']}, spill st/ld "
                f"{resources['spill_stores']}/{resources['spill_loads']} B")  # fmt: skip
    else:
        regs = resources
    piped = "async copies" if record["async"] else "sync loads"
    return f"{record['mma'] or 'no mma'}, {piped}, smem {record['shared']} B, {regs}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="90")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--configs", default="all", choices=["all", "first"],
                    help="every config of the space, or the default (first) one")  # fmt: skip
    ap.add_argument("--only", default="", help="variants whose name starts with this")
    args = ap.parse_args(argv)
    failures = 0
    for name, declared in families().items():
        for case in declared.compile_cases() if declared.compile_cases else []:
            if args.only and not case.name.startswith(args.only):
                continue
            space = list(case.kernel.space)
            for config in space if args.configs == "all" else space[:1]:
                label = (f"{name}/{case.name:18s} {config.kwargs} warps={config.num_warps} "
                         f"stages={config.num_stages}")  # fmt: skip
                try:
                    record = compile_case(case, args.dtype, config, args.arch)
                except Exception as exc:  # report every failure, then fail
                    failures += 1
                    print(f"FAIL {label}: {type(exc).__name__}: {str(exc)[:400]}")
                    continue
                misses = missed(case, args.dtype, record)
                failures += bool(misses)
                status = "FAIL" if misses else "ok  "
                extra = f" (expected: {'; '.join(misses)})" if misses else ""
                print(f"{status} {label}: {describe(record)}{extra}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""Compile every family's Triton kernels for sm_90 (H100/H200) without a GPU and report their
resources.

Runs Triton's full compiler (TTIR -> TTGIR -> LLIR -> PTX -> cubin, ptxas included) for an
explicit target on each compile-time variant a family declares
(:class:`vlmkernels.core.family.CompileCase`), so kernels that would not compile on the GPU
fail here; prints registers, spills and shared memory per variant and config, and checks
what each variant expects ("mma", "async", "no_spill"). The compiling and reading is
:mod:`vlmkernels.core.inspection` (``vlmkernels inspect`` reports more: occupancy, the hot
loop's instruction mix, estimates, budgets), whose record cache this shares.

    python scripts/compile_check.py [--arch 90] [--dtype bf16] [--configs all|first] [--only P]

One line per variant and config, "ok" or "FAIL"; exit status 1 if any failed or missed an
expectation.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import vlmkernels  # noqa: E402, F401  (registers the families)
from vlmkernels.core import inspection  # noqa: E402


def describe(record: dict) -> str:
    piped = "async copies" if record["async_copies"] else "sync loads"
    return (f"{record['mma'] or 'no mma'}, {piped}, smem {record['shared_bytes']} B, "
            f"regs {record['registers']}, spill st/ld {record['spill_bytes']}/"
            f"{record['spill_load_bytes']} B")  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="90")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--configs", default="all", choices=["all", "first"],
                    help="every config of the space, or the default one (per dtype)")  # fmt: skip
    ap.add_argument("--only", default="", help="variants whose name starts with this")
    args = ap.parse_args(argv)
    failures = 0
    for name, case in inspection.all_cases():
        if args.only and not case.name.startswith(args.only):
            continue
        configs = "all" if args.configs == "all" else "default"
        for record in inspection.inspect_cases([(name, case)], (args.dtype,),
                                               f"sm_{args.arch}a", configs):  # fmt: skip
            label = f"{name}/{case.name:18s} {record['config']}"
            if "error" in record:
                failures += 1
                print(f"FAIL {label}: {record['error']}")
                continue
            misses = inspection.missed(case, args.dtype, record)
            failures += bool(misses)
            status = "FAIL" if misses else "ok  "
            extra = f" (expected: {'; '.join(misses)})" if misses else ""
            print(f"{status} {label}: {describe(record)}{extra}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

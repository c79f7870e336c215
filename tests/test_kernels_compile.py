"""The Triton kernels compile for the H100/H200 (sm_90) on a machine without a GPU.

Runs scripts/compile_check.py (Triton's whole pipeline down to a cubin, for an explicit
target, outside the interpreter) on the default config of every compile-time variant the
families declare, for 16-bit inputs and fp32 inputs ("tf32x3"): each line must be "ok",
which includes each variant's declared expectations (tensor-core instructions, asynchronous
pipelined loads for 16-bit inputs, no register spills). Skipped where a GPU is present:
there the kernels are compiled and run by the tests.
"""

import os
import pathlib
import subprocess
import sys

import pytest
import torch

import vlmkernels  # noqa: F401  (registers the families)
from vlmkernels.core.family import families

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "compile_check.py"


def _declared() -> dict[str, str]:
    """{variant: family} over every family's compile cases."""
    return {
        case.name: name
        for name, f in families().items()
        for case in (f.compile_cases() if f.compile_cases else [])
    }


def test_every_family_with_kernels_declares_its_variants():
    for name, f in families().items():
        if f.kernels:
            cases = f.compile_cases() if f.compile_cases else []
            assert cases, f"family {name} has Triton kernels but declares no compile cases"
            assert {c.kernel for c in cases} == set(f.kernels), name


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the kernels run for real")
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.xdist_group("sm90_cubins")  # beside test_inspect's compiles: see there
def test_kernels_compile_for_sm90(dtype):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--dtype", dtype, "--configs", "first"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith(("ok", "FAIL"))]
    assert result.returncode == 0, result.stdout + result.stderr
    seen = {line.split()[1].split("/")[1] for line in lines}
    assert seen == set(_declared()), (seen, lines)
    assert all(line.startswith("ok") for line in lines), lines

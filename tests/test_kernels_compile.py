"""The Triton kernels compile for the H100/H200 (sm_90) on a machine without a GPU.

Runs scripts/compile_check.py (Triton's whole pipeline down to a cubin, for an explicit
target, outside the interpreter) on the default config of every compile-time variant the
families declare, for 16-bit inputs and fp32 inputs ("tf32x3"): each line must be "ok",
which includes each variant's declared expectations (tensor-core instructions, asynchronous
pipelined loads for 16-bit inputs, no register spills). Skipped where a GPU is present:
there the kernels are compiled and run by the tests. The check runs inside
``test_inspect.py::test_default_configs_pass_the_checks`` (:func:`compile_check_passes`),
which compiles the same configs: one test compiles them, once.
"""

import pathlib
import subprocess
import sys

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


def compile_check_passes(dtype: str, env: dict) -> None:
    """``scripts/compile_check.py --dtype dtype --configs first`` in a subprocess (``env``:
    without TRITON_INTERPRET) prints an "ok" line for every declared variant. Run by
    ``test_inspect.py::test_default_configs_pass_the_checks`` after its inspection of the
    same configs, so that the variants compile once (as two tests on two xdist workers they
    compiled twice: 480 s of CI's worker time instead of 250)."""
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

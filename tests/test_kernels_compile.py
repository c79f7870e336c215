"""The Triton kernels compile for the H100 (sm_90) on a machine without a GPU.

Runs scripts/compile_check.py (Triton's whole pipeline down to a cubin, for an explicit
target, outside the interpreter) on the default config of every kernel, for 16-bit inputs
(the contrastive kernels must use wgmma with asynchronous, pipelined loads; the rotary
kernels must not spill) and fp32 inputs ("tf32x3").
Skipped where a GPU is present: there the kernels are compiled and run by the tests.
"""

import os
import pathlib
import subprocess
import sys

import pytest
import torch

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "compile_check.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the kernels run for real")
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_kernels_compile_for_sm90(dtype):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--dtype", dtype, "--configs", "first"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith(("ok", "FAIL"))]
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(lines) == 9 and all(line.startswith("ok") for line in lines), lines
    contrastive = [line for line in lines if "clip" in line or "siglip" in line]
    assert len(contrastive) == 6 and all("wgmma" in line for line in contrastive), lines
    if dtype == "bf16":
        assert all("async copies" in line for line in contrastive), lines
    rope = [line for line in lines if "rope" in line]
    assert len(rope) == 3 and all("spill st/ld 0/0" in line for line in rope), lines

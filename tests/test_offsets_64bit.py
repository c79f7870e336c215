"""64-bit offsets where sizes pass 2^31 elements, checked on the compiled kernels.

Triton specialises an integer argument below 2^31 as i32, and a product of two i32 values
is i32: ``s * stride`` wraps past 2^31 even though each factor fits, and the load or store
goes to a wrong address on the GPU (the CPU interpreter, which computes the same
products, never sees sizes that large). These tests compile a declared variant
(:class:`vlmkernels.core.family.CompileCase`, its default config) to TTIR for sm_90a in a
subprocess without the interpreter and require that the named stride arguments are used
only through a sign extension to i64, so that every product with them is 64-bit.
"""

import json
import os
import re
import subprocess
import sys

import pytest

_SCRIPT = r"""
import json, os, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
import vlmkernels  # noqa: F401  (registers the families)
from vlmkernels.core import inspection

out = {}
for name in sys.argv[1:]:
    (_, case), = inspection.select_cases([name])
    config = case.kernel.default_for("bf16", case.constants("bf16"))
    src = inspection.source(case, "bf16", config)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=config.num_warps,
                                           num_stages=config.num_stages))
    out[name] = compiled.asm["ttir"]
print(json.dumps(out))
"""


def _ttir(*cases: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _SCRIPT, *cases], env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.splitlines()[-1])


def i32_uses(ttir: str, arg: str) -> list[str]:
    """The TTIR lines that use argument ``arg`` other than to sign-extend it to i64."""
    use = re.compile(rf"%{arg}\b")
    lines = [ln.strip() for ln in ttir.splitlines() if use.search(ln)]
    lines = [ln for ln in lines if not ln.startswith(("tt.func", "#loc"))]
    return [ln for ln in lines if not re.search(rf"arith\.extsi %{arg} : i32 to i64", ln)]


def test_i32_uses_finds_a_32_bit_product():
    ttir = ("%o_s = arith.muli %s, %sws : i32 loc(#loc1)\n"
            "%p = arith.extsi %swls : i32 to i64 loc(#loc2)\n")  # fmt: skip
    assert i32_uses(ttir, "sws") == ["%o_s = arith.muli %s, %sws : i32 loc(#loc1)"]
    assert i32_uses(ttir, "swls") == []


@pytest.mark.skipif(sys.platform == "win32", reason="Triton compiles on Linux")
def test_split_combine_offsets_are_64_bit():
    """The split-K combine reads partial s at s * sws, sws = q's element count (and
    s * swls, lse's): with num_splits = 32 the i32 product wrapped from q of 2^31 / 31
    elements on (q (1, 32, 32768, 128) bf16 reads split 16 at a wrong address)."""
    ttir = _ttir("attention_combine")["attention_combine"]
    for stride in ("sws", "swls"):
        assert i32_uses(ttir, stride) == [], stride

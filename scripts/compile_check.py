"""Compile the Triton kernels for sm_90 (H100) without a GPU and report their resources.

Runs Triton's full compiler (TTIR -> TTGIR -> LLIR -> PTX -> cubin, ptxas included) for an
explicit target, so kernels that would not compile on the GPU fail here; prints registers,
spills and shared memory per kernel and config, from ptxas.

    python scripts/compile_check.py [--arch 90] [--dtype bf16] [--configs all|first]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

os.environ.pop("TRITON_INTERPRET", None)

from vlmkernels.ops import contrastive as C  # noqa: E402
from vlmkernels.ops import rope as R  # noqa: E402


def jit_of(kernel):
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn
    return kernel


def configs_of(kernel):
    while kernel is not None and not hasattr(kernel, "configs"):
        kernel = getattr(kernel, "fn", None)
    return kernel.configs if kernel is not None else []


# What Triton's launcher specialises for a typical call (contiguous tensors with sizes that
# are multiples of 16): unit strides become constants, 16-byte-aligned pointers and
# multiples of 16 get a divisibility hint (which enables vector loads and pipelining).
CONTRASTIVE_UNIT = ("stride_xd", "stride_yd")
CONTRASTIVE_ALIGNED = (
    "N",
    "D",
    "stride_xn",
    "stride_yn",
    "stride_gm",
    "n_bucket",
    "n_rows",
    "row0",
)
ROPE_UNIT = ("sqd", "skd", "sqod", "skod", "std")
ROPE_ALIGNED = ("D", "sqb", "sqs", "sqh", "skb", "sks", "skh", "sqob", "sqos", "sqoh", "skob",
                "skos", "skoh", "stb", "sts")  # fmt: skip


def source(jit, ptr_types, constexprs, unit=CONTRASTIVE_UNIT, aligned=CONTRASTIVE_ALIGNED,
           scalars=None) -> ASTSource:  # fmt: skip
    constexprs = dict(constexprs, **{name: 1 for name in unit})
    scalars = scalars or {}
    sig, attrs = {}, {}
    for i, name in enumerate(jit.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ptr_types:
            sig[name] = ptr_types[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = scalars.get(name, "i32")
            if name in aligned:
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


def ptxas_report(ptx: str, arch: str) -> str:
    """Registers and spills from ptxas -v (Triton's bundled ptxas; if it rejects the PTX
    version that Triton wrote, the version line is lowered to the one it names)."""
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
    return f"regs {regs.group(1)}, spill st/ld {spill.group(1)}/{spill.group(2)} B"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="90")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument(
        "--configs",
        default="all",
        choices=["all", "first"],
        help="every autotuning config, or the default (first) one",
    )
    ap.add_argument("--only", default="", help="kernels whose name starts with this")
    args = ap.parse_args()
    elem = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}[args.dtype]
    precision = "tf32x3" if args.dtype == "fp32" else "tf32"
    target = GPUTarget("cuda", int(args.arch.rstrip("a")), 32)
    f32 = "*fp32"
    kernels = {
        "clip_stats": (
            C._clip_stats_kernel,
            dict(x_ptr=elem, y_ptr=elem, scale_ptr=f32, bias_ptr=f32, row_ids_ptr=f32,
                 col_ids_ptr=f32, xt_ptr=elem, yt_ptr=elem, tscale_ptr=f32, t_lse_row_ptr=f32,
                 t_lse_col_ptr=f32, row_max_ptr=f32, row_sum_ptr=f32, col_max_ptr=f32,
                 col_sum_ptr=f32, row_acc_ptr=f32, col_acc_ptr=f32),
            dict(HAS_BIAS=True, ROWS=True, COLS=True, IDS=False, SMOOTH=False, TEACHER=False),
        ),
        "clip_stats_targets": (
            C._clip_stats_kernel,
            dict(x_ptr=elem, y_ptr=elem, scale_ptr=f32, bias_ptr=f32, row_ids_ptr="*i64",
                 col_ids_ptr="*i64", xt_ptr=elem, yt_ptr=elem, tscale_ptr=f32,
                 t_lse_row_ptr=f32, t_lse_col_ptr=f32, row_max_ptr=f32, row_sum_ptr=f32,
                 col_max_ptr=f32, col_sum_ptr=f32, row_acc_ptr=f32, col_acc_ptr=f32),
            dict(HAS_BIAS=True, ROWS=True, COLS=True, IDS=True, SMOOTH=True, TEACHER=True),
        ),
        "clip_grad": (
            C._clip_grad_kernel,
            dict(x_ptr=elem, y_ptr=elem, scale_ptr=f32, bias_ptr=f32, row_ids_ptr=f32,
                 col_ids_ptr=f32, xt_ptr=elem, yt_ptr=elem, tscale_ptr=f32, row_coef_ptr=f32,
                 col_coef_ptr=f32, grad_ptr=elem, partial_ptr=f32),
            dict(HAS_BIAS=True, ROWS=True, COLS=True, IDS=False, SMOOTH=False, TEACHER=False),
        ),
        "clip_grad_targets": (
            C._clip_grad_kernel,
            dict(x_ptr=elem, y_ptr=elem, scale_ptr=f32, bias_ptr=f32, row_ids_ptr="*i64",
                 col_ids_ptr="*i64", xt_ptr=elem, yt_ptr=elem, tscale_ptr=f32,
                 row_coef_ptr=f32, col_coef_ptr=f32, grad_ptr=elem, partial_ptr=f32),
            dict(HAS_BIAS=True, ROWS=True, COLS=True, IDS=True, SMOOTH=True, TEACHER=True),
        ),
        "siglip_grad": (
            C._siglip_kernel,
            dict(x_ptr=elem, y_ptr=elem, scale_ptr=f32, bias_ptr=f32, w_row_ptr=f32,
                 loss_ptr=f32, grad_ptr=elem, partial_ptr=f32),
            dict(HAS_BIAS=True, WRITE_GRAD=True),
        ),
        "siglip_loss": (
            C._siglip_kernel,
            dict(x_ptr=elem, y_ptr=elem, scale_ptr=f32, bias_ptr=f32, w_row_ptr=f32,
                 loss_ptr=f32, grad_ptr=f32, partial_ptr=f32),
            dict(HAS_BIAS=True, WRITE_GRAD=False),
        ),
        "rope_table": (
            R._rope_kernel,
            dict(q_ptr=elem, k_ptr=elem, qo_ptr=elem, ko_ptr=elem, cos_ptr=elem, sin_ptr=elem,
                 pos_ptr=elem, freq_ptr=elem),
            dict(SOURCE=R.TABLE, MODE=R.CHUNKED, SEC_T=16, SEC_H=24, SEC_W=24, BACKWARD=False,
                 COPY_PASS=False, BLOCK_HALF=64, BLOCK_PASS=64),
        ),
        "rope_positions": (
            R._rope_kernel,
            dict(q_ptr=elem, k_ptr=elem, qo_ptr=elem, ko_ptr=elem, cos_ptr=elem, sin_ptr=elem,
                 pos_ptr="*i64", freq_ptr=f32),
            dict(SOURCE=R.POSITIONS, MODE=R.INTERLEAVED, SEC_T=24, SEC_H=20, SEC_W=20,
                 BACKWARD=True, COPY_PASS=False, BLOCK_HALF=64, BLOCK_PASS=64),
        ),
        "rope_vision": (
            R._rope_kernel,
            dict(q_ptr=elem, k_ptr=elem, qo_ptr=elem, ko_ptr=elem, cos_ptr=f32, sin_ptr=f32,
                 pos_ptr=elem, freq_ptr=elem),
            dict(SOURCE=R.TABLE, MODE=R.PLAIN, SEC_T=0, SEC_H=0, SEC_W=0, BACKWARD=False,
                 COPY_PASS=False, BLOCK_HALF=64, BLOCK_PASS=64),
        ),
    }  # fmt: skip
    failures = 0
    for name, (kernel, ptrs, flags) in kernels.items():
        if args.only and not name.startswith(args.only):
            continue
        jit = jit_of(kernel)
        configs = configs_of(kernel)
        for cfg in configs if args.configs == "all" else configs[:1]:
            if kernel is R._rope_kernel:
                const = dict(flags, **cfg.kwargs)
                src = source(jit, ptrs, const, ROPE_UNIT, ROPE_ALIGNED, {"scaling": "fp32"})
            else:
                const = dict(flags, DOT_FP32=False, INPUT_PRECISION=precision, EVEN_K=True)
                const.update(cfg.kwargs)
                src = source(jit, ptrs, const)
            label = f"{name:12s} {cfg.kwargs} warps={cfg.num_warps} stages={cfg.num_stages}"
            try:
                compiled = triton.compile(
                    src, target=target, options=dict(num_warps=cfg.num_warps,
                                                     num_stages=cfg.num_stages),
                )  # fmt: skip
            except Exception as exc:  # report every failure, then fail
                failures += 1
                print(f"FAIL {label}: {type(exc).__name__}: {str(exc)[:400]}")
                continue
            ptx, ttgir = compiled.asm["ptx"], compiled.asm["ttgir"]
            mma = "wgmma" if "wgmma" in ptx else ("mma" if "mma.sync" in ptx else "no mma")
            asynchronous = "async_copy" in ttgir or "async_tma" in ttgir
            piped = "async copies" if asynchronous else "sync loads"
            shared = compiled.metadata.shared
            print(f"ok   {label}: {mma}, {piped}, smem {shared} B, {ptxas_report(ptx, args.arch)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""What the shared tools need of the token-compression family: its kernels and their
compile-time variants, tuning shapes and workload, its benchmark suite."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from ...core.backend import use_backend
from ...core.family import CompileCase, Family, register
from ...core.tuning import torch_dtype
from . import kernels
from .functional import pool_tokens, select_tokens, tome_merge

# Realistic shapes: ToMe in a CLIP-L / ViT-L layer (576 tokens, 577 with the class token),
# FastV-style selection of a quarter of LLaVA's 576 image tokens at the LLM's width, and
# LLaVA-OneVision's video pooling (32 frames of 27 x 27 tokens at Qwen2-7B's 3584), and
# Gemma 3's 4 x 4 mean of its SigLIP patches (64 x 64 at 1152) for 8 crops.
TUNE_SHAPES = (
    {"op": "tome_merge", "B": 256, "N": 576, "C": 1024, "r": 16, "dtype": "bf16"},
    {"op": "tome_merge", "B": 32, "N": 577, "C": 1024, "r": 16, "class_token": True,
     "dtype": "bf16"},
    {"op": "select_tokens", "B": 8, "N": 576, "C": 4096, "keep": 144, "dtype": "bf16"},
    {"op": "pool_tokens", "B": 32, "H": 27, "W": 27, "C": 3584, "kind": "bilinear",
     "dtype": "bf16"},
    {"op": "pool_tokens", "B": 32, "H": 24, "W": 24, "C": 3584, "kind": "avg2x2",
     "dtype": "bf16"},
    {"op": "pool_tokens", "B": 8, "H": 64, "W": 64, "C": 1152, "kind": "avg", "block": 4,
     "dtype": "bf16"},
)  # fmt: skip


def tune_workload(spec: Mapping, device: torch.device, names: Iterable[str]) -> None:
    """Run one op of ``spec`` forward and backward on the Triton kernels: {"op":
    "tome_merge" ("B", "N", "C", "r", "class_token"), "select_tokens" ("B", "N", "C",
    "keep") or "pool_tokens" ("B", "H", "W", "C", "kind", and "block" for kind "avg": the
    output grid is (H // block, W // block)), "dtype"}."""
    dtype = torch_dtype(spec.get("dtype", "bf16"))
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device).to(dtype)

    op, b, c = spec["op"], int(spec["B"]), int(spec["C"])
    with use_backend("triton"):
        if op == "tome_merge":
            n = int(spec["N"])
            x = randn(b, n, c).requires_grad_()
            out, _, _ = tome_merge(x, randn(b, n, c), int(spec["r"]),
                                   class_token=bool(spec.get("class_token", False)))  # fmt: skip
        elif op == "select_tokens":
            n = int(spec["N"])
            x = randn(b, n, c).requires_grad_()
            out, _ = select_tokens(x, randn(b, n).float(), int(spec["keep"]))
        elif op == "pool_tokens":
            h, w = int(spec["H"]), int(spec["W"])
            x = randn(b, h * w, c).requires_grad_()
            kind, block = spec.get("kind", "bilinear"), spec.get("block")
            size = None if block is None else (h // int(block), w // int(block))
            out = pool_tokens(x, (h, w), kind, size)
        else:
            raise ValueError(f"tokens spec {dict(spec)}: unknown op {op!r}")
        out.backward(torch.ones_like(out))


_ELEM = "*{elem}"
_I64 = "*i64"
_F32 = "*fp32"
_ROWS = ("sxc", "sob")  # contiguous channels; unit strides of the typical call


def _match_constexprs(dtype: str) -> dict:
    # as runtime.dot_precision picks them on a GPU: 16-bit operands as they are, fp32 as tf32x3
    return dict(CLASS_TOKEN=True, UPCAST=False, PRECISION="tf32x3" if dtype == "fp32" else "tf32")


def compile_cases() -> list[CompileCase]:
    """Every kernel variant the ops launch (bf16 / fp16 / fp32 inputs)."""
    gather = dict(x_ptr=_ELEM, idx_ptr=_I64, o_ptr=_ELEM)
    merge = dict(x_ptr=_ELEM, s_ptr=_ELEM, mem_ptr=_I64, off_ptr=_I64, o_ptr=_ELEM,
                 os_ptr=_ELEM)  # fmt: skip
    unmerge = dict(g_ptr=_ELEM, gs_ptr=_ELEM, x_ptr=_ELEM, s_ptr=_ELEM, o_ptr=_ELEM,
                   os_ptr=_ELEM, src_ptr=_I64, dx_ptr=_ELEM, ds_ptr=_ELEM)  # fmt: skip
    pool = dict(x_ptr=_ELEM, o_ptr=_ELEM)
    return [
        CompileCase("tokens_gather", kernels._gather_rows_kernel, gather, {},
                    unit_strides=("sxc", "sik"), aligned=("C", "sxb", "sxn", "sob", "sok"),
                    scalars={"scale": "fp32"}, expect=("no_spill",)),
        CompileCase("tome_match", kernels._tome_match_kernel,
                    dict(m_ptr=_ELEM, best_ptr=_F32, arg_ptr=_I64), _match_constexprs,
                    unit_strides=("smc",), aligned=("C", "smb", "smn"),
                    expect=("mma", "no_spill")),
        CompileCase("tome_plan", kernels._tome_plan_kernel,
                    dict(best_ptr=_F32, arg_ptr=_I64, src_ptr=_I64, mem_ptr=_I64, off_ptr=_I64),
                    dict(CLASS_TOKEN=False), expect=("no_spill",)),
        CompileCase("tome_plan_class_token", kernels._tome_plan_kernel,
                    dict(best_ptr=_F32, arg_ptr=_I64, src_ptr=_I64, mem_ptr=_I64, off_ptr=_I64),
                    dict(CLASS_TOKEN=True), expect=("no_spill",)),
        CompileCase("tome_merge_rows", kernels._tome_merge_kernel, merge, dict(HAS_SIZE=False),
                    unit_strides=("sxc",), aligned=("C", "sxb", "sxn"), expect=("no_spill",)),
        CompileCase("tome_merge_rows_sizes", kernels._tome_merge_kernel, merge, dict(HAS_SIZE=True),
                    unit_strides=("sxc", "ssn"), aligned=("C", "sxb", "sxn"),
                    expect=("no_spill",)),
        CompileCase("tome_unmerge_rows", kernels._tome_unmerge_kernel, unmerge,
                    dict(HAS_SIZE=False, SIZE_GRAD=False), unit_strides=("sgc", "sxc", "soc"),
                    aligned=("C", "sgb", "sgn", "sxb", "sxn", "sob", "son"),
                    expect=("no_spill",)),
        CompileCase("tome_unmerge_rows_sizes", kernels._tome_unmerge_kernel, unmerge,
                    dict(HAS_SIZE=True, SIZE_GRAD=True), unit_strides=("sgc", "sxc", "soc"),
                    aligned=("C", "sgb", "sgn", "sxb", "sxn", "sob", "son"),
                    expect=("no_spill",)),
        CompileCase("tokens_pool_avg2x2", kernels._pool_kernel, pool,
                    dict(MODE=kernels.AVG, KH=2, KW=2), unit_strides=("sxc",),
                    aligned=("C", "sxb", "sxn"), scalars={"scale_h": "fp32", "scale_w": "fp32"},
                    expect=("no_spill",)),
        CompileCase("tokens_pool_avg4x4", kernels._pool_kernel, pool,
                    dict(MODE=kernels.AVG, KH=4, KW=4), unit_strides=("sxc",),
                    aligned=("C", "sxb", "sxn"), scalars={"scale_h": "fp32", "scale_w": "fp32"},
                    expect=("no_spill",)),
        CompileCase("tokens_pool_bilinear", kernels._pool_kernel, pool,
                    dict(MODE=kernels.BILINEAR, KH=1, KW=1), unit_strides=("sxc",),
                    aligned=("C", "sxb", "sxn"), scalars={"scale_h": "fp32", "scale_w": "fp32"},
                    expect=("no_spill",)),
        CompileCase("tokens_pool_bwd", kernels._pool_bwd_kernel, dict(g_ptr=_ELEM, dx_ptr=_ELEM),
                    dict(WIN_H=8, WIN_W=8), unit_strides=("sgc",), aligned=("C", "sgb", "sgn"),
                    scalars={"scale_h": "fp32", "scale_w": "fp32"}, expect=("no_spill",)),
    ]  # fmt: skip


FAMILY = register(
    Family(
        name="tokens",
        kernels=(
            kernels._gather_rows_kernel,
            kernels._tome_match_kernel,
            kernels._tome_plan_kernel,
            kernels._tome_merge_kernel,
            kernels._tome_unmerge_kernel,
            kernels._pool_kernel,
            kernels._pool_bwd_kernel,
        ),
        compile_cases=compile_cases,
        tune_shapes=TUNE_SHAPES,
        tune_workload=tune_workload,
        aliases={
            "select_tokens": ("tokens_gather",),
            "tome_merge": ("tome_match", "tome_plan", "tome_merge_rows", "tome_unmerge_rows"),
            "pool_tokens": ("tokens_pool", "tokens_pool_bwd", "tokens_gather"),
        },
        bench_suite="bench_tokens",
    )
)

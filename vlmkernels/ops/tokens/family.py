"""What the shared tools need of the token-compression family: its kernels and their
compile-time variants, its benchmark suite."""

from __future__ import annotations

from ...core.family import CompileCase, Family, register
from . import kernels

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
        CompileCase("tome_merge", kernels._tome_merge_kernel, merge, dict(HAS_SIZE=False),
                    unit_strides=("sxc",), aligned=("C", "sxb", "sxn"), expect=("no_spill",)),
        CompileCase("tome_merge_sizes", kernels._tome_merge_kernel, merge, dict(HAS_SIZE=True),
                    unit_strides=("sxc", "ssn"), aligned=("C", "sxb", "sxn"),
                    expect=("no_spill",)),
        CompileCase("tome_unmerge", kernels._tome_unmerge_kernel, unmerge,
                    dict(HAS_SIZE=False, SIZE_GRAD=False), unit_strides=("sgc", "sxc", "soc"),
                    aligned=("C", "sgb", "sgn", "sxb", "sxn", "sob", "son"),
                    expect=("no_spill",)),
        CompileCase("tome_unmerge_sizes", kernels._tome_unmerge_kernel, unmerge,
                    dict(HAS_SIZE=True, SIZE_GRAD=True), unit_strides=("sgc", "sxc", "soc"),
                    aligned=("C", "sgb", "sgn", "sxb", "sxn", "sob", "son"),
                    expect=("no_spill",)),
        CompileCase("tokens_pool_avg2x2", kernels._pool_kernel, pool, dict(MODE=kernels.AVG2X2),
                    unit_strides=("sxc",), aligned=("C", "sxb", "sxn"),
                    scalars={"scale_h": "fp32", "scale_w": "fp32"}, expect=("no_spill",)),
        CompileCase("tokens_pool_bilinear", kernels._pool_kernel, pool,
                    dict(MODE=kernels.BILINEAR), unit_strides=("sxc",),
                    aligned=("C", "sxb", "sxn"), scalars={"scale_h": "fp32", "scale_w": "fp32"},
                    expect=("no_spill",)),
    ]  # fmt: skip


FAMILY = register(
    Family(
        name="tokens",
        kernels=(
            kernels._gather_rows_kernel,
            kernels._tome_match_kernel,
            kernels._tome_merge_kernel,
            kernels._tome_unmerge_kernel,
            kernels._pool_kernel,
        ),
        compile_cases=compile_cases,
        aliases={
            "select_tokens": ("tokens_gather",),
            "tome_merge": ("tome_match", "tome_merge", "tome_unmerge"),
            "pool_tokens": ("tokens_pool", "tokens_gather"),
        },
        bench_suite="bench_tokens",
    )
)

"""What the shared tools need of the connector family: its kernels and the compile-time
variants the ops launch (the GEMM core's forward, backward and recompute variants, the
norm statistics and backward, the shuffle copy, the DeepStack add), and its benchmark
suite."""

from __future__ import annotations

from ...core.family import CompileCase, Family, register
from . import kernels
from .kernels import (
    ACT_GELU,
    ACT_GELU_GRAD,
    ACT_NONE,
    ACT_SWIGLU,
    ACT_SWIGLU_GRAD,
    LAYER_NORM,
    NO_NORM,
    RMS_NORM,
    X_A,
    X_NONE,
)

_E = "*{elem}"
_F32 = "*fp32"
# GEMM pointers: operands, output, the X source and its norm, the epilogue's tensors (the
# launcher passes the output for the unused ones).
_GEMM_PTRS = dict(a_ptr=_E, b_ptr=_E, c_ptr=_E, x_ptr=_E, mean_ptr=_F32, rstd_ptr=_F32,
                  nw_ptr=_E, nb_ptr=_E, bias_ptr=_E, aux_ptr=_E, aux2_ptr=_E, res_ptr=_E,
                  colsum_ptr=_F32)  # fmt: skip
_GEMM_OFF = dict(XSIDE=X_NONE, GATHER=False, NORM=NO_NORM, PER_PATCH=False, NORM_BIAS=False,
                 FOLD=False, SCATTER=False, BIAS=False, ACT=ACT_NONE, STORE_AUX=False,
                 STORE_AUX2=False, RESIDUAL=False)  # fmt: skip
# Model sizes are multiples of 16 (K, N, C and the row strides).
_ALIGNED = ("N", "K", "sam", "sbk", "sbn", "scm", "saux_m", "sres_m", "C", "sxb", "sxh", "sxw",
            "scb", "sch", "scw")  # fmt: skip


def _gemm(name, flags, unit, expect=("mma", "no_spill"), kernel=None, aligned=()):
    def constexprs(dtype: str) -> dict:
        precision = "tf32x3" if dtype == "fp32" else "tf32"
        # launchers.first_linear: a forward norm is folded into the GEMM for 16-bit inputs
        fold = flags.get("XSIDE") == X_A and flags.get("NORM", NO_NORM) != NO_NORM
        return {**_GEMM_OFF, **flags, "FOLD": fold and dtype != "fp32", "DOT_FP32": False,
                "INPUT_PRECISION": precision}  # fmt: skip

    kernel = kernels._gemm_kernel if kernel is None else kernel
    return CompileCase(name, kernel, _GEMM_PTRS, constexprs, unit_strides=unit,
                       aligned=_ALIGNED + aligned, expect=expect)  # fmt: skip


def compile_cases() -> list[CompileCase]:
    """Forward: the first linear on plain rows (LLaVA), with a per-patch LayerNorm and the
    2 x 2 merge (Qwen2-VL), with an RMSNorm of the merged rows (post-shuffle), the second
    linear, the SwiGLU first linear after a LayerNorm of the shuffled rows (Aya Vision).
    Backward: dh with GELU' (and GELU(h) stored) or SwiGLU's derivative, the weight
    gradients with the bias gradient (on dY and a plain or stored X: the normalised merged
    features, or the shuffle copy), dx scattered through the merge."""
    fwd_unit = ("sxc", "sbk", "scn", "saux_n")
    plain = ("sak", "sbn", "scn", "saux_n")
    return [
        _gemm("connector_fc1", dict(XSIDE=X_A, BIAS=True, ACT=ACT_GELU, STORE_AUX=True), fwd_unit),
        _gemm("connector_fc1_merge_ln", dict(XSIDE=X_A, GATHER=True, NORM=LAYER_NORM,
                                             PER_PATCH=True, NORM_BIAS=True, BIAS=True,
                                             ACT=ACT_GELU), fwd_unit),
        _gemm("connector_fc1_merge_rms", dict(XSIDE=X_A, GATHER=True, NORM=RMS_NORM, BIAS=False,
                                              ACT=ACT_NONE), fwd_unit),
        # Aya Vision: the LayerNorm of the shuffled rows, SwiGLU (value and gate interleaved)
        _gemm("connector_fc1_swiglu", dict(XSIDE=X_A, GATHER=True, NORM=LAYER_NORM,
                                           NORM_BIAS=True, BIAS=True, ACT=ACT_SWIGLU,
                                           STORE_AUX=True), fwd_unit),
        _gemm("connector_fc2", dict(BIAS=True, RESIDUAL=True), ("sak", "sbk", "scn", "sres_n")),
        # GELU' epilogue: its own kernel and space (kernels._DH_GPU_CONFIGS), no spills
        _gemm("connector_dh", dict(ACT=ACT_GELU_GRAD, STORE_AUX2=True), plain,
              kernel=kernels._gemm_dh_kernel),
        _gemm("connector_dh_swiglu", dict(ACT=ACT_SWIGLU_GRAD, STORE_AUX2=True), plain,
              kernel=kernels._gemm_dh_kernel),
        # A = dY^T: unit stride along m, its k stride and M the features of dY (multiples
        # of 16 in a typical launch, which Triton specialises)
        _gemm("connector_dw", {}, ("sam", "sbn", "scn"), aligned=("sak", "M")),
        _gemm("connector_dx_scatter", dict(GATHER=True, SCATTER=True), ("sak", "sbn", "scc")),
        CompileCase("connector_norm_stats", kernels._norm_stats_kernel,
                    dict(x_ptr=_E, mean_ptr=_F32, rstd_ptr=_F32), dict(GATHER=True, RMS=False),
                    unit_strides=("sxc",), aligned=("L", "C", "sxb", "sxh", "sxw"),
                    scalars={"eps": "fp32"}, expect=("no_spill",)),
        CompileCase("connector_normalize", kernels._normalize_kernel,
                    dict(x_ptr=_E, mean_ptr=_F32, rstd_ptr=_F32, nw_ptr=_E, nb_ptr=_E,
                         out_ptr=_E),
                    dict(GATHER=True, NORM=LAYER_NORM, PER_PATCH=True, NORM_BIAS=True),
                    unit_strides=("sxc", "sok"), aligned=("K", "C", "sxb", "sxh", "sxw", "som"),
                    expect=("no_spill",)),
        CompileCase("connector_norm_fold", kernels._norm_fold_kernel,
                    dict(w_ptr=_E, nw_ptr=_E, nb_ptr=_E, b_ptr=_E, wf_ptr=_E, colsum_ptr=_F32,
                         bias_ptr=_F32),
                    dict(NORM_BIAS=True, BIAS=True), unit_strides=("swk",),
                    aligned=("K", "swn"), expect=("no_spill",)),
        CompileCase("connector_norm_grad", kernels._norm_grad_kernel,
                    dict(g_ptr=_E, x_ptr=_E, mean_ptr=_F32, rstd_ptr=_F32, nw_ptr=_E, dx_ptr=_E,
                         part_w_ptr=_F32, part_b_ptr=_F32),
                    dict(GATHER=True, NORM=LAYER_NORM, PER_PATCH=True, WEIGHT_GRAD=True),
                    unit_strides=("sxc", "sdc"), aligned=("L", "K", "C"),
                    expect=("no_spill",)),
        CompileCase("connector_shuffle", kernels._shuffle_kernel, dict(x_ptr=_E, out_ptr=_E),
                    dict(BACKWARD=False), unit_strides=("sxc", "sok"),
                    aligned=("K", "C", "sxb", "sxh", "sxw", "som"), expect=("no_spill",)),
        CompileCase("connector_deepstack", kernels._deepstack_kernel,
                    dict(h_ptr=_E, e_ptr=_E, idx_ptr="*i64", out_ptr=_E), dict(INPLACE=False),
                    unit_strides=("shd", "sed", "sod"), aligned=("D", "shr", "ser", "sor"),
                    expect=("no_spill",)),
    ]  # fmt: skip


FAMILY = register(
    Family(
        name="connectors",
        kernels=(
            kernels._gemm_kernel,
            kernels._gemm_dh_kernel,
            kernels._norm_stats_kernel,
            kernels._norm_fold_kernel,
            kernels._normalize_kernel,
            kernels._norm_grad_kernel,
            kernels._shuffle_kernel,
            kernels._deepstack_kernel,
        ),
        compile_cases=compile_cases,
        aliases={
            name: ("connector_gemm", "connector_gemm_dh") for name in ("mlp_projector", "merger")
        },  # fmt: skip
        bench_suite="bench_connectors",
    )  # fmt: skip
)

"""What the shared tools need of the attention family: its kernels and their compile-time
variants, tuning shapes and workload, benchmark suite."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from ...core.family import CompileCase, Family, register
from ...core.tuning import torch_dtype
from . import delta_kernel, kernels, key_mass_kernels, launchers, layernorm_kernels

# Realistic shapes (fusion note): the Q-Former's cross-attention, a MiniCPM-V resampler
# slice, Flamingo's media-masked attention, few queries over many keys, FastV scoring.
TUNE_SHAPES = (
    {"model": "BLIP-2 Q-Former cross", "batch": 256, "heads": 12, "head_dim": 64,
     "lq": 32, "lk": 257, "dtype": "bf16"},
    {"model": "BLIP-2 Q-Former cross (fp32)", "batch": 256, "heads": 12, "head_dim": 64,
     "lq": 32, "lk": 257, "dtype": "fp32"},
    {"model": "MiniCPM-V resampler, one slice", "batch": 1, "heads": 28, "head_dim": 128,
     "lq": 64, "lk": 1024, "dtype": "bf16"},
    {"model": "few queries, one image", "batch": 1, "heads": 16, "head_dim": 64,
     "lq": 32, "lk": 4096, "dtype": "bf16"},
    {"model": "Flamingo text over 5 x 64 latents", "batch": 8, "heads": 8, "head_dim": 64,
     "lq": 2048, "lk": 320, "dtype": "bf16", "media": 64},
    {"model": "self-attention with key mass (FastV layer)", "batch": 1, "heads": 32,
     "head_dim": 128, "lq": 2048, "lk": 2048, "dtype": "bf16", "causal": True},
)  # fmt: skip


def tune_inputs(spec: Mapping, device: torch.device):
    """(q, k, v, launch arguments) for a tuning spec: {"batch", "heads", "head_dim", "lq",
    "lk", "dtype", "causal" (False), "media" (latents per media item: immediate-media
    ranges over lq tokens, one media item every lq / (lk / media) tokens)}."""
    b, h, d = int(spec["batch"]), int(spec["heads"]), int(spec["head_dim"])
    lq, lk = int(spec["lq"]), int(spec["lk"])
    dtype = torch_dtype(spec.get("dtype", "bf16"))
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype)

    q, k, v = randn(b, h, lq, d), randn(b, h, lk, d), randn(b, h, lk, d)
    lo = hi = None
    if spec.get("media"):
        n = int(spec["media"])
        media = lk // n
        t = torch.arange(lq, device=device) // max(lq // media, 1) + 1
        t = t.clamp(max=media).to(torch.int32)
        lo = ((t - 1) * n).expand(b, lq).contiguous()
        hi = (t * n).expand(b, lq).contiguous()
    args = dict(cu_q=None, cu_k=None, max_lq=lq, max_lk=lk, keep=None, lo=lo, hi=hi,
                causal=bool(spec.get("causal", False)), scale=d**-0.5)  # fmt: skip
    return q, k, v, args


def tune_workload(spec: Mapping, device: torch.device, names: Iterable[str]) -> None:
    """The forward, and the backward or the key mass when those kernels are tuned; the
    dK/dV kernels of a key bias (ToMe) and of grouped-query heads (two query heads per K/V
    head) get a backward of their own."""
    q, k, v, a = tune_inputs(spec, device)
    out, lse = launchers.forward(q, k, v, **a)
    names = set(names)

    def backward(k, v, bias=None, forward=None):
        out, lse = forward or launchers.forward(q, k, v, **a, bias=bias)
        delta = launchers.delta(out, out, lse, None)  # dO = O: any gradient will do
        launchers.backward(out, q, k, v, lse, delta, **a, bias=bias)

    if any(n.startswith("attention_bwd") for n in names) or "attention_delta" in names:
        backward(k, v, forward=(out, lse))
    if names & {"attention_bwd_kv_bias", "attention_bwd_kv_fp32_bias_gqa"}:
        backward(k, v, bias=torch.zeros(q.shape[0], 1, k.shape[2], device=device))
    if names & {"attention_bwd_kv_gqa", "attention_bwd_kv_fp32_bias_gqa"} and q.shape[1] % 2 == 0:
        backward(k[:, ::2].contiguous(), v[:, ::2].contiguous())
    if "attention_key_mass" in names and a["lo"] is None:
        launchers.key_mass(q, k, lse, a["causal"], a["scale"], q.shape[2] - 1, q.shape[2], 1.0)


# What Triton's launcher specialises for a typical call: unit last-dim strides become
# constants; 16-byte-aligned pointers and multiples of 16 get a divisibility hint.
_QKV = ("sqd", "skd", "svd")
_ROW = ("sqb", "sqh", "sqm", "skb", "skh", "skn", "svb", "svh", "svn")


def _core(fp32, **flags):
    """The constexprs of a GPU launch (head dim 64) for 16-bit or fp32 inputs."""
    precision = "tf32x3" if fp32 else "tf32"
    return dict(DOT_FP32=False, INPUT_PRECISION=precision, BLOCK_D=64, EVEN_D=True, **flags)


def compile_cases() -> list[CompileCase]:
    """The core kernels of each input class (16-bit: bf16 pointers, fp32: fp32 pointers and
    3xTF32, whatever the dtype asked: each kernel is launched for its class only): dense
    forward (plain, causal with key padding, media ranges, split-K), packed forward, both
    backward kernels (plain, causal, media); the per-key bias in each core pass; grouped
    heads; the tanh gate's epilogue (media); attention dropout (forward, both backward
    passes, with key padding); the split-K combine, the backward's row term and the key
    mass. The
    group G (grouped-query attention) is a constant 1 (Triton specialises an int argument
    equal to 1) except in the _gqa cases."""
    # G = 1 (no grouped heads) is a constant of a typical launch; the _gqa cases keep it
    unit = _QKV + ("sod", "sdod", "sdkd", "sdvd", "sdqd", "slm", "sdm", "G")
    aligned = _ROW + ("sob", "soh", "som", "sos", "sdob", "sdoh", "sdom", "sdkb", "sdkh", "sdkn",
                      "sdvb", "sdvh", "sdvn", "sdqb", "sdqh", "sdqm")  # fmt: skip
    scalars = {"sm_scale": "fp32", "drop_scale": "fp32"}
    flags = dict(VARLEN=False, CAUSAL=False, KEEP=False, RANGES=False, BIAS=False,
                 DROPOUT=False)  # fmt: skip

    def own(kernel, names):
        return tuple(n for n in names if n in kernel.arg_names)

    def case(name, kernel, fp32, outputs, gqa=False, **over):
        elem = "fp32" if fp32 else "bf16"
        pointers = dict(q_ptr=elem, k_ptr=elem, v_ptr=elem, cu_q_ptr="i32", cu_k_ptr="i32",
                        keep_ptr="u8", lo_ptr="i32", hi_ptr="i32", lse_ptr="fp32",
                        do_ptr=elem, delta_ptr="fp32", bias_ptr="fp32", db_ptr="fp32",
                        gate_ptr="fp32", seed_ptr="i64", row_ptr="fp32",
                        **outputs)  # fmt: skip
        pointers = {k: "*" + (elem if v == "elem" else v) for k, v in pointers.items()
                    if k in kernel.arg_names}  # fmt: skip
        extra = {"SPLIT": False, "GATE": False, "ROW": False} if "ROW" in kernel.arg_names else {}
        constexprs = _core(fp32, **{**flags, **extra, **over})
        # 16-bit tiles load asynchronously, except in the dK/dV pass with arbitrary ranges
        # (its loads sit under a per-block branch)
        sync = fp32 or (over.get("RANGES") and kernel is kernels._attn_bwd_kv)
        expect = ("mma", "no_spill") if sync else ("mma", "async", "no_spill")
        ones = tuple(n for n in own(kernel, unit) if not (gqa and n == "G"))
        return CompileCase(name, kernel, pointers, constexprs, unit_strides=ones,
                           aligned=own(kernel, aligned), scalars=scalars,
                           expect=expect)  # fmt: skip

    fwd_out = dict(o_ptr="elem")
    kv_out = dict(dk_ptr="elem", dv_ptr="elem")
    q_out = dict(dq_ptr="elem")
    k = kernels
    return [
        case("attention_fwd", k._attn_fwd, False, fwd_out),
        case("attention_fwd_causal_padding", k._attn_fwd, False, fwd_out, CAUSAL=True,
             KEEP=True),
        case("attention_fwd_media", k._attn_fwd, False, fwd_out, RANGES=True),
        case("attention_fwd_varlen", k._attn_fwd, False, fwd_out, VARLEN=True),
        case("attention_fwd_bias", k._attn_fwd, False, fwd_out, BIAS=True),
        case("attention_fwd_media_gate", k._attn_fwd, False, fwd_out, RANGES=True, GATE=True),
        case("attention_fwd_fp32_media_gate", k._attn_fwd32, True, fwd_out, RANGES=True,
             GATE=True),
        case("attention_fwd_split", k._attn_fwd, False, dict(o_ptr="fp32"), SPLIT=True),
        # key_mass=<row>: the row's logits stored as the forward goes (causal, split-K: the
        # FastV shape on one image)
        case("attention_fwd_row", k._attn_fwd, False, dict(o_ptr="fp32"), CAUSAL=True,
             SPLIT=True, ROW=True),
        case("attention_fwd_fp32", k._attn_fwd32, True, fwd_out),
        case("attention_fwd_fp32_media", k._attn_fwd32, True, fwd_out, RANGES=True),
        case("attention_fwd_fp32_split", k._attn_fwd32, True, dict(o_ptr="fp32"), SPLIT=True),
        case("attention_bwd_kv", k._attn_bwd_kv, False, kv_out),
        case("attention_bwd_kv_causal", k._attn_bwd_kv, False, kv_out, CAUSAL=True),
        case("attention_bwd_kv_bias", k._attn_bwd_kv_bias, False, kv_out, BIAS=True),
        case("attention_bwd_kv_fp32_bias", k._attn_bwd_kv32_bias_gqa, True, kv_out, BIAS=True),
        case("attention_fwd_gqa", k._attn_fwd, False, fwd_out, gqa=True),
        case("attention_bwd_kv_gqa", k._attn_bwd_kv_gqa, False, kv_out, gqa=True),
        case("attention_bwd_kv_fp32_gqa", k._attn_bwd_kv32_bias_gqa, True, kv_out, gqa=True),
        case("attention_bwd_q_gqa", k._attn_bwd_q, False, q_out, gqa=True),
        case("attention_bwd_q_bias", k._attn_bwd_q, False, q_out, BIAS=True),
        case("attention_bwd_q", k._attn_bwd_q, False, q_out),
        case("attention_bwd_q_media", k._attn_bwd_q, False, q_out, RANGES=True),
        case("attention_bwd_kv_fp32", k._attn_bwd_kv32, True, kv_out, KEEP=True),
        case("attention_bwd_q_fp32_media", k._attn_bwd_q32, True, q_out, RANGES=True),
        # attention dropout (training), key padding: the Q-Former's forms (fp32 by default,
        # its forward a kernel of its own) and the 16-bit ones; measured without a case
        # (sm_90a, no spill): split forward 225 registers, media forward 232, fp32 dQ 166
        case("attention_fwd_dropout", k._attn_fwd, False, fwd_out, KEEP=True, DROPOUT=True),
        case("attention_fwd_fp32_dropout", k._attn_fwd32_dropout, True, fwd_out, KEEP=True,
             DROPOUT=True),
        case("attention_bwd_kv_dropout", k._attn_bwd_kv, False, kv_out, KEEP=True,
             DROPOUT=True),
        case("attention_bwd_kv_fp32_dropout", k._attn_bwd_kv32, True, kv_out, KEEP=True,
             DROPOUT=True),
        case("attention_bwd_q_dropout", k._attn_bwd_q, False, q_out, KEEP=True, DROPOUT=True),
        CompileCase("attention_combine", k._attn_combine,
                    dict(ws_ptr="*fp32", wl_ptr="*fp32", o_ptr="*{elem}", lse_ptr="*fp32",
                         cu_q_ptr="*i32", gate_ptr="*fp32"),
                    dict(VARLEN=False, GATE=False, BLOCK_D=64, EVEN_D=True),
                    unit_strides=("swd", "sod", "swlm", "slm"),
                    expect=("no_spill",)),
        CompileCase("attention_key_mass", key_mass_kernels._attn_key_mass,
                    dict(q_ptr="*{elem}", k_ptr="*{elem}", lse_ptr="*fp32", bias_ptr="*fp32",
                         mass_ptr="*fp32"),
                    lambda dt: dict(CAUSAL=True, BIAS=False, BLOCK_D=64, EVEN_D=True,
                                    DOT_FP32=False,
                                    INPUT_PRECISION="tf32x3" if dt == "fp32" else "tf32"),
                    unit_strides=("sqd", "skd", "slm"), aligned=_ROW[:6],
                    scalars={"sm_scale": "fp32", "weight": "fp32"},
                    expect=("mma", "no_spill")),
        CompileCase("attention_delta", delta_kernel._attn_delta,
                    dict(o_ptr="*{elem}", do_ptr="*{elem}", lse_ptr="*fp32", dlse_ptr="*fp32",
                         delta_ptr="*fp32"),
                    dict(HAS_DO=True, HAS_DLSE=True, BLOCK_D=64),
                    unit_strides=("sod", "sdod", "slm", "sgm"),
                    aligned=("D", "sob", "soh", "som", "sdob", "sdoh", "sdom"),
                    expect=("no_spill",)),
        CompileCase("attention_row_mass", key_mass_kernels._attn_row_mass,
                    dict(row_ptr="*fp32", lse_ptr="*fp32", mass_ptr="*fp32"), {},
                    unit_strides=("slm",), aligned=("max_lk", "srb", "srh"),
                    scalars={"weight": "fp32"}, expect=("no_spill",)),
        *_qformer_cases(),
    ]  # fmt: skip


def _qformer_cases() -> list[CompileCase]:
    """The Q-Former's bias + residual + LayerNorm (N = 768: BLOCK_N 1024), with the bias."""
    ln = layernorm_kernels
    elem = dict(x_ptr="*{elem}", c_ptr="*fp32", r_ptr="*{elem}", w_ptr="*fp32")
    stats = dict(mean_ptr="*fp32", rstd_ptr="*fp32")
    return [
        CompileCase("qformer_add_ln_fwd", ln._add_ln_fwd_kernel,
                    dict(**elem, b_ptr="*fp32", y_ptr="*{elem}", **stats),
                    dict(HAS_C=True, BLOCK_N=1024), unit_strides=("sxn", "srn"),
                    aligned=("N", "sxm", "srm"), scalars={"eps": "fp32"},
                    expect=("no_spill",)),
        CompileCase("qformer_add_ln_bwd", ln._add_ln_bwd_kernel,
                    dict(g_ptr="*{elem}", **elem, **stats, dz_ptr="*{elem}", dw_ptr="*fp32",
                         db_ptr="*fp32"),
                    dict(HAS_C=True, BLOCK_N=1024), unit_strides=("sgn", "sxn", "srn"),
                    aligned=("N", "sgm", "sxm", "srm"), expect=("no_spill",)),
    ]  # fmt: skip


_CORE = (*(f"attention_{p}{s}" for p in ("fwd", "bwd_kv", "bwd_q") for s in ("", "_fp32")),
         "attention_bwd_kv_bias", "attention_bwd_kv_gqa", "attention_bwd_kv_fp32_bias_gqa",
         "attention_fwd_fp32_dropout")  # fmt: skip

FAMILY = register(
    Family(
        name="attention",
        kernels=(
            kernels.KERNELS
            + delta_kernel.KERNELS
            + key_mass_kernels.KERNELS
            + layernorm_kernels.KERNELS
        ),
        compile_cases=compile_cases,
        aliases={
            "attention": (*_CORE, "attention_combine", "attention_delta", "attention_key_mass"),
            "cross_attention": (*_CORE, "attention_combine", "attention_delta"),
            "media_cross_attention": (*_CORE, "attention_delta"),
            "qformer_add_layernorm": ("qformer_add_ln_fwd", "qformer_add_ln_bwd"),
        },
        tune_shapes=TUNE_SHAPES,
        tune_workload=tune_workload,
        bench_suite="bench_attention",
    )  # fmt: skip
)

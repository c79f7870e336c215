"""What the shared tools need of the attention family: its kernels and their compile-time
variants, tuning shapes and workload, benchmark suite."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from ...core.family import CompileCase, Family, register
from ...core.tuning import torch_dtype
from . import kernels, launchers

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
    """The forward, and the backward or the key mass when those kernels are tuned."""
    q, k, v, a = tune_inputs(spec, device)
    out, lse = launchers.forward(q, k, v, **a)
    names = set(names)
    if names & {"attention_bwd_kv", "attention_bwd_q"}:
        delta = (out.float() * out.float()).sum(-1)
        launchers.backward(out, q, k, v, lse, delta, **a)
    if "attention_key_mass" in names and a["lo"] is None:
        launchers.key_mass(q, k, lse, a["causal"], a["scale"], q.shape[2] - 1, q.shape[2], 1.0)


# What Triton's launcher specialises for a typical call: unit last-dim strides become
# constants; 16-byte-aligned pointers and multiples of 16 get a divisibility hint.
_QKV = ("sqd", "skd", "svd")
_ROW = ("sqb", "sqh", "sqm", "skb", "skh", "skn", "svb", "svh", "svn")


def _core(dtype, **flags):
    """The constexprs of a GPU launch for inputs of ``dtype`` (head dim 64)."""
    precision = "tf32x3" if dtype == "fp32" else "tf32"
    return dict(DOT_FP32=False, INPUT_PRECISION=precision, BLOCK_D=64, **flags)


def compile_cases() -> list[CompileCase]:
    """Dense forward (plain, causal with key padding, media ranges, split-K), packed forward,
    the combine, both backward kernels (plain, causal), the key mass."""
    ptrs = dict(q_ptr="*{elem}", k_ptr="*{elem}", v_ptr="*{elem}", cu_q_ptr="*i32",
                cu_k_ptr="*i32", keep_ptr="*u8", lo_ptr="*i32", hi_ptr="*i32")  # fmt: skip
    fwd = dict(ptrs, o_ptr="*{elem}", lse_ptr="*fp32")
    split = dict(ptrs, o_ptr="*fp32", lse_ptr="*fp32")
    bwd = dict(ptrs, do_ptr="*{elem}", lse_ptr="*fp32", delta_ptr="*fp32")
    unit = _QKV + ("sod", "sdod", "sdkd", "sdvd", "sdqd", "slm", "sdm")
    aligned = _ROW + ("sob", "soh", "som", "sdob", "sdoh", "sdom")
    scalars = {"sm_scale": "fp32"}
    flags = dict(VARLEN=False, CAUSAL=False, KEEP=False, RANGES=False, SPLIT=False)

    def own(kernel, names):
        return tuple(n for n in names if n in kernel.arg_names)

    def fwd_case(name, pointers, **over):
        k = kernels._attn_fwd
        return CompileCase(name, k, pointers, lambda dt, o=over: _core(dt, **{**flags, **o}),
                           unit_strides=own(k, unit), aligned=own(k, aligned), scalars=scalars,
                           expect=("mma", "no_spill"))  # fmt: skip

    def bwd_case(name, kernel, pointers, **over):
        f = {k: v for k, v in flags.items() if k != "SPLIT"}
        return CompileCase(name, kernel, pointers, lambda dt, o=over: _core(dt, **{**f, **o}),
                           unit_strides=own(kernel, unit), aligned=own(kernel, aligned),
                           scalars=scalars, expect=("mma", "no_spill"))  # fmt: skip

    return [
        fwd_case("attention_fwd", fwd),
        fwd_case("attention_fwd_causal_padding", fwd, CAUSAL=True, KEEP=True),
        fwd_case("attention_fwd_media", fwd, RANGES=True),
        fwd_case("attention_fwd_varlen", fwd, VARLEN=True),
        fwd_case("attention_fwd_split", split, SPLIT=True),
        CompileCase("attention_combine", kernels._attn_combine,
                    dict(ws_ptr="*fp32", wl_ptr="*fp32", o_ptr="*{elem}", lse_ptr="*fp32",
                         cu_q_ptr="*i32"),
                    dict(VARLEN=False, BLOCK_D=64), unit_strides=("swd", "sod", "swlm", "slm"),
                    expect=("no_spill",)),
        bwd_case("attention_bwd_kv", kernels._attn_bwd_kv,
                 dict(bwd, dk_ptr="*{elem}", dv_ptr="*{elem}")),
        bwd_case("attention_bwd_kv_causal", kernels._attn_bwd_kv,
                 dict(bwd, dk_ptr="*{elem}", dv_ptr="*{elem}"), CAUSAL=True),
        bwd_case("attention_bwd_q", kernels._attn_bwd_q, dict(bwd, dq_ptr="*{elem}")),
        bwd_case("attention_bwd_q_media", kernels._attn_bwd_q, dict(bwd, dq_ptr="*{elem}"),
                 RANGES=True),
        CompileCase("attention_key_mass", kernels._attn_key_mass,
                    dict(q_ptr="*{elem}", k_ptr="*{elem}", lse_ptr="*fp32", mass_ptr="*fp32"),
                    lambda dt: dict(CAUSAL=True, BLOCK_D=64, DOT_FP32=False,
                                    INPUT_PRECISION="tf32x3" if dt == "fp32" else "tf32"),
                    unit_strides=("sqd", "skd", "slm"), aligned=_ROW[:6],
                    scalars={"sm_scale": "fp32", "weight": "fp32"},
                    expect=("mma", "no_spill")),
    ]  # fmt: skip


FAMILY = register(
    Family(
        name="attention",
        kernels=kernels.KERNELS,
        compile_cases=compile_cases,
        aliases={
            "attention": (
                "attention_fwd",
                "attention_combine",
                "attention_bwd_kv",
                "attention_bwd_q",
                "attention_key_mass",
            ),
            "cross_attention": (
                "attention_fwd",
                "attention_combine",
                "attention_bwd_kv",
                "attention_bwd_q",
            ),
            "media_cross_attention": ("attention_fwd", "attention_bwd_kv", "attention_bwd_q"),
        },
        tune_shapes=TUNE_SHAPES,
        tune_workload=tune_workload,
        bench_suite=None,
    )  # fmt: skip
)

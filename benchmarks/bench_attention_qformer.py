r"""BLIP-2's Q-Former, whole (issue 12): transformers' ``Blip2QFormerModel`` against the
same instance patched by ``vlmkernels.patch`` (the attention core, the one-GEMM K / V of
every cross-attention layer, fused bias + residual + LayerNorm).

Shapes: B images, L layers of hidden size Hd (Hd / 64 heads, FFN 4 Hd, cross-attention
every 2nd layer), Lq = 32 queries, N image tokens of E features. BLIP-2 (ViT-g): L 12,
Hd 768, N 257, E 1408.

Inputs: seeded random queries (B, Lq, Hd) and image features (B, N, E), ``requires_grad``;
the model's own random initialisation (seeded), eval mode (no dropout). fwd+bwd fills the
inputs' and every parameter's gradients from a fixed random output gradient.

Providers (each builds its own model copy):

- ``vlmkernels``: the patched model in the run's dtype (bf16 on a GPU, fp32 on the CPU);
- ``vlmkernels_fp32``: the patched model in fp32 (3xTF32 attention on a GPU);
- ``transformers``: the unpatched model in the run's dtype;
- ``transformers_fp32``: the unpatched model in fp32, transformers' default for the
  Q-Former (``_keep_in_fp32_modules``);
- ``compile``: ``torch.compile`` of the unpatched model in the run's dtype (compile time
  excluded).

FLOP model (forward): per layer 8 B Lq Hd^2 (q, k, v, o) + 4 B Lq^2 Hd (attention) +
16 B Lq Hd^2 (FFN); per cross layer also 4 B Lq Hd^2 (q, o), 4 B N E Hd (K, V) and
4 B Lq N Hd; backward 2x. Byte model: the weights once and the image features.

Sweep: GPU full B in {1, 32, 256}, quick B in {1, 256}, BLIP-2's sizes; CPU B = 2, L 4,
Hd 128, N 65, E 176 (fp32). Issue 12's targets (H100, bf16, not yet in
:mod:`benchmarks.targets`): forward <= 1 ms at B 1 and <= 3.5 ms at B 256; fp32 within
1.5x of bf16; forward+backward <= 1/3 of transformers' bf16.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from . import targets
from .bench_attention import _prepared
from .harness import (
    BuildArgs,
    Case,
    OpSpec,
    Prepared,
    Provider,
    Results,
    RunConfig,
    Suite,
    dtype_str,
)


def _model(shape: Mapping[str, int], dtype: torch.dtype, device: torch.device, seed: int):
    from transformers.models.blip_2 import modeling_blip_2 as M

    hd = shape["Hd"]
    config = M.Blip2QFormerConfig(
        hidden_size=hd, num_hidden_layers=shape["L"], num_attention_heads=max(hd // 64, 1),
        intermediate_size=4 * hd, encoder_hidden_size=shape["E"], cross_attention_frequency=2,
    )  # fmt: skip
    torch.manual_seed(seed)
    return M.Blip2QFormerModel(config).eval().to(device=device, dtype=dtype)


def _build(args: BuildArgs, dtype: torch.dtype | None, how: str) -> Prepared:
    s, dtype = args.shape, dtype or args.dtype
    model = _model(s, dtype, args.device, args.seed)
    note = f"{dtype_str(dtype)} model"
    if how == "patched":
        import vlmkernels

        vlmkernels.patch(model)
        note += "; vlmkernels.patch (attention core, one K/V GEMM, fused add + LayerNorm)"
    gen = torch.Generator(device=args.device).manual_seed(args.seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=args.device).to(dtype)

    query = randn(s["B"], s["Lq"], s["Hd"]).requires_grad_()
    image = randn(s["B"], s["N"], s["E"]).requires_grad_()
    grad = randn(s["B"], s["Lq"], s["Hd"])
    fn = model
    if how == "compile":
        backend = args.options.get("compile_backend", "inductor")
        torch._dynamo.reset()
        fn = torch.compile(model, backend=backend, dynamic=False)
        note += f"; torch.compile(backend={backend}, dynamic=False); compile time excluded"

    def call():
        return fn(query_embeds=query, encoder_hidden_states=image).last_hidden_state

    return _prepared(call, (query, image, *model.parameters()), grad, note)


VLMKERNELS = Provider("vlmkernels", lambda a: _build(a, None, "patched"))
VLMKERNELS_FP32 = Provider(
    "vlmkernels_fp32", lambda a: _build(a, torch.float32, "patched"), dtype=torch.float32
)
TRANSFORMERS = Provider("transformers", lambda a: _build(a, None, "eager"))
TRANSFORMERS_FP32 = Provider(
    "transformers_fp32", lambda a: _build(a, torch.float32, "eager"), dtype=torch.float32
)
COMPILE = Provider("compile", lambda a: _build(a, None, "compile"))


def flops(shape: Mapping[str, int], mode: str) -> float:
    b, lq, hd, n, e = shape["B"], shape["Lq"], shape["Hd"], shape["N"], shape["E"]
    layers, cross = shape["L"], (shape["L"] + 1) // 2
    per_layer = 8 * b * lq * hd * hd + 4 * b * lq * lq * hd + 16 * b * lq * hd * hd
    per_cross = 4 * b * lq * hd * hd + 4 * b * n * e * hd + 4 * b * lq * n * hd
    fwd = float(layers * per_layer + cross * per_cross)
    return {"fwd": fwd, "bwd": 2 * fwd, "fwd+bwd": 3 * fwd}[mode]


def nbytes(shape: Mapping[str, int], mode: str, itemsize: int) -> float:
    hd, e, layers = shape["Hd"], shape["E"], shape["L"]
    weights = layers * 12 * hd * hd + (layers + 1) // 2 * (2 * hd * hd + 2 * e * hd)
    fwd = float((weights + shape["B"] * shape["N"] * e) * itemsize)
    return {"fwd": fwd, "bwd": 2 * fwd, "fwd+bwd": 3 * fwd}[mode]


def grid(profile: str) -> dict[str, list[int]]:
    blip2 = {"L": [12], "Hd": [768], "Lq": [32], "N": [257], "E": [1408]}
    if profile == "cpu":
        return {"B": [2], "L": [4], "Hd": [128], "Lq": [32], "N": [65], "E": [176]}
    if profile == "quick":
        return {"B": [1, 256], **blip2}
    return {"B": [1, 32, 256], **blip2}


OPS = (
    OpSpec("qformer", (VLMKERNELS, VLMKERNELS_FP32, TRANSFORMERS, TRANSFORMERS_FP32, COMPILE),
           flops, nbytes),
)  # fmt: skip


def summarize(results: Results, cfg: RunConfig) -> list[str]:
    """Per measured shape: vlmkernels' time against transformers' in the run dtype and in
    fp32; then the issue's targets (:mod:`benchmarks.targets`, GPU shapes)."""
    lines = ["Q-Former, vlmkernels against the other providers:"]
    seen = sorted({(r.case.mode, r.case.shape, r.case.dtype) for r in results.records
                   if r.case.op == "qformer"})  # fmt: skip
    for mode, shape, dt in seen:

        def ms(provider, dt=dt, mode=mode, shape=shape):
            case = Case("qformer", provider, mode, shape, dt)
            return results.get(case, "ms").value

        ours = ms("vlmkernels")
        if ours is None:
            continue
        parts = [f"vlmkernels {ours:.3g} ms"]
        for other in ("transformers", "transformers_fp32", "compile", "vlmkernels_fp32"):
            if (t := ms(other)) is not None:
                parts.append(f"{other} {t:.3g} ms ({t / ours:.2f}x)")
        text = ", ".join(f"{k}={v}" for k, v in shape)
        lines.append(f"  {mode} {dt} ({text}): " + "; ".join(parts))
    return lines + targets.summary(
        "attention_qformer", results, cfg.device.type == "cuda",
        "no CUDA device: a CPU sweep with a small Q-Former; GPU rows owed",
    )  # fmt: skip


SUITE = Suite(name="attention_qformer", ops=OPS, grid=grid, x_name="B", summarize=summarize)

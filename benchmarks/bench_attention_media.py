r"""Flamingo's media-masked cross-attention (issue 12): ``media_cross_attention``.

Shapes: B sequences of T text tokens, H heads of dim D, M media items of L latents each
(keys M L); one media token every T / M tokens, the first at token T / (2 M), so the tokens
before it see nothing (immediate-media mode, open_flamingo's default). The issue's shape:
B = 8, T = 2048, H = 8, D = 64, M = 5, L = 64.

Inputs: seeded random normal q (B, H, T, D), k, v (B, H, M L, D) in the run's dtype (bf16
on a GPU, fp32 on the CPU), ``requires_grad``; a fixed random output gradient handed over by
a 0-d placeholder (no reduction timed).

Providers:

- ``vlmkernels``: :func:`vlmkernels.ops.attention.media_cross_attention` (each query block
  visits only its media's key blocks; Triton on CUDA, the PyTorch path on the CPU);
- ``eager``: open_flamingo's ``MaskedCrossAttention`` attention step written out: the
  (T, M L) text_time / media_time mask, -finfo.max fill, softmax, zeroed rows before the
  first media item, in the input dtype;
- ``sdpa``: ``scaled_dot_product_attention`` with that boolean mask (rows before the first
  media item see every key and are zeroed afterwards);
- ``flex`` (CUDA): FlexAttention with the same mask as a ``mask_mod`` and its block mask;
- ``compile``: ``torch.compile`` of the eager function (compile time excluded);
- ``vlmkernels_gate`` / ``vlmkernels_gate_unfused``: open_flamingo's gated output,
  tanh(attn_gate) * attention (a scalar gate, a leaf too), with the gate in the kernel's
  epilogue (``gate=``) or as a separate multiply after it.

The baselines' masks (the dense one, the block mask) are built once, outside the timed
calls, as a model builds them once per forward for all its cross-attention layers; in
open_flamingo each layer builds its own, so the baselines' times here are a lower bound.
``vlmkernels`` takes ``media_locations`` itself and its segment setup is timed.

Byte model: read q, k, v and write out, (2 T + 2 M L) B H D e per forward; the backward
twice that. FLOP model: the visible pairs only, 4 B H T' L D per forward (each of the T'
tokens from the first media item on sees one media item's L latents; those before it see
none), 2.5x for the backward.

Sweep: GPU full and quick B = 8, T = 2048, H = 8, D = 64, M = 5, L = 64; CPU B = 2,
T = 256, H = 4, D = 64, M = 5, L = 16 (fp32). Target (:mod:`benchmarks.targets`, GPU,
bf16): ``vlmkernels`` forward <= 30 us at the issue's shape.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from . import targets
from .harness import (
    BuildArgs,
    OpSpec,
    Prepared,
    Provider,
    Suite,
    checksummed,
)


def media_locations(shape: Mapping[str, int], device) -> torch.Tensor:
    t, m = shape["T"], shape["M"]
    loc = torch.zeros(shape["B"], t, dtype=torch.bool, device=device)
    every = max(t // m, 1)
    loc[:, (every // 2 + every * torch.arange(m)).clamp(max=t - 1)] = True
    return loc


def make_inputs(args: BuildArgs):
    s = args.shape
    gen = torch.Generator(device=args.device).manual_seed(args.seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=args.device).to(args.dtype)

    n = s["M"] * s["L"]
    q = randn(s["B"], s["H"], s["T"], s["D"]).requires_grad_()
    k = randn(s["B"], s["H"], n, s["D"]).requires_grad_()
    v = randn(s["B"], s["H"], n, s["D"]).requires_grad_()
    return q, k, v, media_locations(s, args.device), randn(s["B"], s["H"], s["T"], s["D"])


def flamingo_mask(loc: torch.Tensor, m: int, latents: int):
    """(B, 1, T, M L) bool allowed, (B, 1, T, 1) bool rows before the first media item."""
    text_time = loc.cumsum(-1)
    media_time = torch.arange(m, device=loc.device).repeat_interleave(latents) + 1
    return (text_time[:, None, :, None] == media_time), (text_time == 0)[:, None, :, None]


def _prepared(call, leaves, grad, note):
    """The output's checksum <out, G> (first call), its backward G."""
    return Prepared(checksummed(call, lambda outs: (grad,)), leaves, note, call=call)


def build_vlmkernels(args: BuildArgs) -> Prepared:
    from vlmkernels.ops import attention as A

    q, k, v, loc, g = make_inputs(args)
    latents = args.shape["L"]
    return _prepared(lambda: A.media_cross_attention(q, k, v, loc, latents), (q, k, v), g, "")


def build_gated(args: BuildArgs, fused: bool) -> Prepared:
    from vlmkernels.ops import attention as A

    q, k, v, loc, g = make_inputs(args)
    gate = torch.full((1,), 0.3, device=q.device, requires_grad=True)
    latents = args.shape["L"]
    if fused:
        call = lambda: A.media_cross_attention(q, k, v, loc, latents, gate=gate)  # noqa: E731
        note = "tanh(gate) in the forward kernel's epilogue"
    else:
        call = lambda: A.media_cross_attention(q, k, v, loc, latents) * gate.tanh()  # noqa: E731
        note = "media_cross_attention, then * tanh(gate)"
    return _prepared(call, (q, k, v, gate), g, note)


def _eager(args: BuildArgs, compiled: bool) -> Prepared:
    q, k, v, loc, g = make_inputs(args)
    allowed, before = flamingo_mask(loc, args.shape["M"], args.shape["L"])

    def fn(q, k, v):
        sim = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
        sim = sim.masked_fill(~allowed, -torch.finfo(sim.dtype).max)
        attn = (sim - sim.amax(-1, keepdim=True).detach()).softmax(-1)
        return attn.masked_fill(before, 0.0) @ v

    note = "open_flamingo's MaskedCrossAttention step, dense (T, M L) mask"
    if compiled:
        backend = args.options.get("compile_backend", "inductor")
        torch._dynamo.reset()
        fn = torch.compile(fn, backend=backend, dynamic=False)
        note += f"; torch.compile(backend={backend}, dynamic=False); compile time excluded"
    return _prepared(lambda: fn(q, k, v), (q, k, v), g, note)


def build_sdpa(args: BuildArgs) -> Prepared:
    import torch.nn.functional as F

    q, k, v, loc, g = make_inputs(args)
    allowed, before = flamingo_mask(loc, args.shape["M"], args.shape["L"])
    mask = allowed | before  # rows before the first media see everything, then zeroed

    def call():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).masked_fill(before, 0.0)

    return _prepared(call, (q, k, v), g, "SDPA with the boolean mask, default backend")


def build_flex(args: BuildArgs) -> Prepared:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    q, k, v, loc, g = make_inputs(args)
    text_time = loc.cumsum(-1)
    latents = args.shape["L"]
    before = (text_time == 0)[:, None, :, None]

    def mask_mod(b, h, i, j):
        t = text_time[b, i]
        return (t == j // latents + 1) | (t == 0)

    block = create_block_mask(mask_mod, q.shape[0], None, q.shape[2], k.shape[2],
                              device=q.device)  # fmt: skip
    flex = torch.compile(flex_attention, dynamic=False)

    def call():
        return flex(q, k, v, block_mask=block).masked_fill(before, 0.0)

    return _prepared(call, (q, k, v), g, "FlexAttention, mask_mod + block mask (compiled)")


def _cuda_only(device: torch.device) -> str | None:
    return None if device.type == "cuda" else "FlexAttention needs CUDA here"


PROVIDERS = (
    Provider("vlmkernels", build_vlmkernels),
    Provider("eager", lambda a: _eager(a, False)),
    Provider("sdpa", build_sdpa),
    Provider("flex", build_flex, available=_cuda_only),
    Provider("compile", lambda a: _eager(a, True)),
    Provider(
        "vlmkernels_gate", lambda a: build_gated(a, True), agrees_with="vlmkernels_gate_unfused"
    ),  # fmt: skip
    Provider(
        "vlmkernels_gate_unfused", lambda a: build_gated(a, False), agrees_with="vlmkernels_gate"
    ),  # fmt: skip
)


def flops(shape: Mapping[str, int], mode: str) -> float:
    """4 L D per token that sees a media item (the tokens before the first one, at
    :func:`media_locations`, see none)."""
    first = max(shape["T"] // shape["M"], 1) // 2
    seeing = shape["T"] - min(first, shape["T"] - 1)
    fwd = 4.0 * shape["B"] * shape["H"] * seeing * shape["L"] * shape["D"]
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[mode]


def nbytes(shape: Mapping[str, int], mode: str, itemsize: int) -> float:
    fwd = (2 * shape["T"] + 2 * shape["M"] * shape["L"]) * shape["B"] * shape["H"] * shape["D"]
    return float({"fwd": fwd, "bwd": 2 * fwd, "fwd+bwd": 3 * fwd}[mode] * itemsize)


def grid(profile: str) -> dict[str, list[int]]:
    if profile == "cpu":
        return {"B": [2], "T": [256], "H": [4], "D": [64], "M": [5], "L": [16]}
    return {"B": [8], "T": [2048], "H": [8], "D": [64], "M": [5], "L": [64]}


OPS = (OpSpec("media_cross_attention", PROVIDERS, flops, nbytes),)


summarize = targets.summarizer(
    "attention_media", "no CUDA device: a CPU sweep, whose shapes and dtype differ; GPU rows owed"
)


SUITE = Suite(name="attention_media", ops=OPS, grid=grid, x_name="T", summarize=summarize)

r"""Few-query cross-attention and attention with the per-key mass (issue 12).

Shapes (one grid): B images or slices, H heads of dim D, Lq queries (32: BLIP-2's Q-Former,
64: resamplers) over Lk keys (257 image tokens up to 4096). ``cross_attention`` is the
few-query case; ``attention_key_mass`` is :func:`vlmkernels.attention` with
``key_mass=-1`` (FastV's last row) on the same shapes.

Inputs: seeded random normal q (B, H, Lq, D), k, v (B, H, Lk, D) in the run's dtype (bf16
on a GPU, fp32 on the CPU), ``requires_grad`` (the leaves fwd+bwd fills). Each timed call
ends in a 0-d placeholder whose backward hands a fixed random gradient to the output (no
reduction is timed).

Providers:

- ``vlmkernels``: :func:`vlmkernels.ops.attention.cross_attention` /
  ``attention(key_mass=-1)`` (Triton on CUDA, the PyTorch path on the CPU);
- ``vlmkernels_plain`` (``attention_key_mass`` only): ``attention`` without the mass, the
  baseline of the <= 1.15x target;
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` with PyTorch's backend
  choice (cuDNN or flash on an H100; math on the CPU); for the key mass, SDPA followed by
  the eager mass (softmax of the last row's logits, averaged over heads), as FastV users
  run it;
- ``sdpa_cudnn``, ``sdpa_flash`` (CUDA only): SDPA restricted to one backend;
- ``eager``: softmax(q k^T / sqrt(D)) v in the input dtype, as transformers' eager
  attention computes it (the key mass: the head-mean of the probabilities' last row);
- ``compile``: ``torch.compile`` of the eager function (compile time excluded).

Byte model: the forward reads q, k, v and writes out, (2 Lq + 2 Lk) B H D e; the backward
reads q, k, v, out, dout and writes dq, dk, dv, (4 Lq + 4 Lk) B H D e. FLOP model: 4 B H Lq
Lk D per forward, 2.5x that for the backward (flash-attention's convention).

Sweep: GPU full B in {1, 8, 64}, H = 16, Lq in {32, 64}, Lk in {1024, 4096}, D = 64; quick
B in {1, 64}, Lq = 32, Lk = 4096; CPU B = 2, H = 4, Lq = 32, Lk = 257, D = 64 (fp32).
Targets (:mod:`benchmarks.targets`, issue 12; GPU, bf16): ``vlmkernels`` at least 2x
faster than ``sdpa_cudnn`` when B H <= 32, at least 0.95x elsewhere; the key mass in at
most 1.15x of ``vlmkernels_plain``.
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


def make_inputs(args: BuildArgs):
    s = args.shape
    gen = torch.Generator(device=args.device).manual_seed(args.seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=args.device).to(args.dtype)

    q = randn(s["B"], s["H"], s["Lq"], s["D"]).requires_grad_()
    k = randn(s["B"], s["H"], s["Lk"], s["D"]).requires_grad_()
    v = randn(s["B"], s["H"], s["Lk"], s["D"]).requires_grad_()
    return q, k, v, randn(s["B"], s["H"], s["Lq"], s["D"])


def _prepared(call, leaves, grad, note):
    """The output's checksum <out, G> (first call; the key mass is not in it), its
    backward G."""
    fn = checksummed(call, lambda outs: (grad,) + (None,) * (len(outs) - 1))
    return Prepared(fn, leaves, note, call=call)


def eager_attention(q, k, v):
    p = torch.softmax((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1)
    return p @ v


def eager_mass(q, k, v):
    p = torch.softmax((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1)
    return p @ v, p[:, :, -1].mean(1).detach()


def build_vlmkernels(args: BuildArgs) -> Prepared:
    from vlmkernels.ops import attention as A

    q, k, v, g = make_inputs(args)
    if args.op == "cross_attention":
        return _prepared(lambda: A.cross_attention(q, k, v), (q, k, v), g, "")
    return _prepared(lambda: A.attention(q, k, v, key_mass=-1), (q, k, v), g, "key_mass=-1")


def build_plain(args: BuildArgs) -> Prepared:
    from vlmkernels.ops import attention as A

    q, k, v, g = make_inputs(args)
    return _prepared(lambda: A.attention(q, k, v), (q, k, v), g, "no key_mass")


def _sdpa(args: BuildArgs, backend: str | None) -> Prepared:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v, g = make_inputs(args)
    chosen = {"cudnn": [SDPBackend.CUDNN_ATTENTION], "flash": [SDPBackend.FLASH_ATTENTION]}

    def call():
        if backend is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            with sdpa_kernel(chosen[backend]):
                out = F.scaled_dot_product_attention(q, k, v)
        if args.op == "attention_key_mass":
            p = torch.softmax((q[:, :, -1:] @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5, -1)
            return out, p[:, :, 0].mean(1).detach()
        return out

    return _prepared(call, (q, k, v), g, f"SDPA backend={backend or 'default'}")


def _eager(args: BuildArgs, compiled: bool) -> Prepared:
    q, k, v, g = make_inputs(args)
    fn = eager_attention if args.op == "cross_attention" else eager_mass
    note = "softmax(q k^T / sqrt(D)) v in the input dtype"
    if compiled:
        backend = args.options.get("compile_backend", "inductor")
        torch._dynamo.reset()
        fn = torch.compile(fn, backend=backend, dynamic=False)
        note += f"; torch.compile(backend={backend}, dynamic=False); compile time excluded"
    return _prepared(lambda: fn(q, k, v), (q, k, v), g, note)


def _cuda_only(device: torch.device) -> str | None:
    return None if device.type == "cuda" else "SDPA backend choice needs CUDA"


VLMKERNELS = Provider("vlmkernels", build_vlmkernels)
PLAIN = Provider("vlmkernels_plain", build_plain)
SDPA = Provider("sdpa", lambda a: _sdpa(a, None))
SDPA_CUDNN = Provider("sdpa_cudnn", lambda a: _sdpa(a, "cudnn"), available=_cuda_only)
SDPA_FLASH = Provider("sdpa_flash", lambda a: _sdpa(a, "flash"), available=_cuda_only)
EAGER = Provider("eager", lambda a: _eager(a, False))
COMPILE = Provider("compile", lambda a: _eager(a, True))


def flops(shape: Mapping[str, int], mode: str) -> float:
    fwd = 4.0 * shape["B"] * shape["H"] * shape["Lq"] * shape["Lk"] * shape["D"]
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[mode]


def nbytes(shape: Mapping[str, int], mode: str, itemsize: int) -> float:
    bhd = shape["B"] * shape["H"] * shape["D"] * itemsize
    fwd = (2 * shape["Lq"] + 2 * shape["Lk"]) * bhd
    bwd = (4 * shape["Lq"] + 4 * shape["Lk"]) * bhd
    return float({"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode])


def grid(profile: str) -> dict[str, list[int]]:
    if profile == "cpu":
        return {"B": [2], "H": [4], "Lq": [32], "Lk": [257], "D": [64]}
    if profile == "quick":
        return {"B": [1, 64], "H": [16], "Lq": [32], "Lk": [4096], "D": [64]}
    return {"B": [1, 8, 64], "H": [16], "Lq": [32, 64], "Lk": [1024, 4096], "D": [64]}


_COMMON = (VLMKERNELS, SDPA, SDPA_CUDNN, SDPA_FLASH, EAGER, COMPILE)
OPS = (
    OpSpec("cross_attention", _COMMON, flops, nbytes),
    OpSpec("attention_key_mass", (VLMKERNELS, PLAIN, *_COMMON[1:]), flops, nbytes),
)


summarize = targets.summarizer(
    "attention", "no CUDA device: a CPU sweep, whose shapes and dtype differ; GPU rows owed"
)


SUITE = Suite(name="attention", ops=OPS, grid=grid, x_name="B", summarize=summarize)

r"""Token-grid pooling: ``pool_bilinear``, LLaVA-OneVision's ``apply_pooling`` (bilinear,
align_corners=False, an S x S grid of projected video-frame tokens to ceil(S/2) x ceil(S/2)),
and ``pool_avg2x2`` (the 2 x 2 mean, on the largest even grid <= S).

Shapes: F frames of S x S tokens of C channels; the model's: F = 32, S = 27 (384 px SigLIP,
patch 14), C = 3584 (Qwen2-7B hidden size), 27 x 27 -> 14 x 14.

Inputs: seeded random normal (F, S S, C) in the run's dtype, ``requires_grad``.

Providers:

- ``vlmkernels``: :func:`vlmkernels.ops.tokens.pool_tokens` (Triton on CUDA, the PyTorch
  path on the CPU; the backward is a gather per input token, no atomics);
- ``eager``: transformers' formula: view as (F, S, S, C), permute to channels first,
  ``contiguous``, ``F.interpolate(mode="bilinear")`` (``avg_pool2d(2)`` for the average),
  permute back, view (F, h w, C);
- ``compile``: ``torch.compile`` of the eager function (static shapes, compile time
  excluded).

Each timed call ends in a 0-d placeholder whose backward hands a fixed random gradient to
the output (no reduction is timed).

Byte model: read the grid, write the pooled grid, (S^2 + h w) F C e per pass (the backward
the same on the gradients). FLOP model: 4 multiply-adds per output element and pass
(bilinear; 4 adds for the average), 8 h w F C.

Sweep: GPU F in {8, 32}, S = 27, C = 3584 (quick: F = 32); CPU F = 4, S = 27, C = 256.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from .bench_tokens import _prepared
from .harness import BuildArgs, OpSpec, Prepared, Provider, Suite


def _out_side(op: str, s: int) -> tuple[int, int]:
    """(input side, output side) of ``op`` on an S x S grid."""
    if op == "pool_avg2x2":
        even = s - s % 2
        return even, even // 2
    return s, math.ceil(s / 2)


def pool_eager(x: torch.Tensor, side: int, out: int, average: bool) -> torch.Tensor:
    frames, _, dim = x.shape
    grid = x.view(frames, side, side, -1).permute(0, 3, 1, 2).contiguous()
    if average:
        grid = F.avg_pool2d(grid, 2)
    else:
        grid = F.interpolate(grid, size=[out, out], mode="bilinear")
    return grid.permute(0, 2, 3, 1).reshape(frames, -1, dim)


def _inputs(args: BuildArgs):
    side, out = _out_side(args.op, args.shape["S"])
    frames, c = args.shape["F"], args.shape["C"]
    gen = torch.Generator(device=args.device).manual_seed(args.seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=args.device).to(args.dtype)

    return side, out, randn(frames, side * side, c).requires_grad_(), randn(frames, out * out, c)


def build_vlmkernels(args: BuildArgs) -> Prepared:
    from vlmkernels.ops import tokens

    side, _, x, grad = _inputs(args)
    kind = "avg2x2" if args.op == "pool_avg2x2" else "bilinear"
    return _prepared(lambda: (tokens.pool_tokens(x, (side, side), kind),), x, grad, "")


def _eager(args: BuildArgs, compiled: bool) -> Prepared:
    side, out, x, grad = _inputs(args)
    fn, note = pool_eager, "transformers' apply_pooling formula"
    if compiled:
        backend = args.options.get("compile_backend", "inductor")
        torch._dynamo.reset()
        fn = torch.compile(fn, backend=backend, dynamic=False)
        note += f"; torch.compile(backend={backend}, dynamic=False); compile time excluded"
    average = args.op == "pool_avg2x2"
    return _prepared(lambda: (fn(x, side, out, average),), x, grad, note)


PROVIDERS = (
    Provider("vlmkernels", build_vlmkernels),
    Provider("eager", lambda args: _eager(args, False)),
    Provider("compile", lambda args: _eager(args, True)),
)


def _model(op: str):
    def nbytes(shape: Mapping[str, int], mode: str, itemsize: int) -> float:
        side, out = _out_side(op, shape["S"])
        passes = 2 if mode == "fwd+bwd" else 1
        return float(passes * (side * side + out * out) * shape["F"] * shape["C"] * itemsize)

    def flops(shape: Mapping[str, int], mode: str) -> float:
        _, out = _out_side(op, shape["S"])
        passes = 2 if mode == "fwd+bwd" else 1
        return float(passes * 8 * out * out * shape["F"] * shape["C"])

    return flops, nbytes


def grid(profile: str) -> dict[str, list[int]]:
    if profile == "cpu":
        return {"F": [4], "S": [27], "C": [256]}
    if profile == "quick":
        return {"F": [32], "S": [27], "C": [3584]}
    return {"F": [8, 32], "S": [27], "C": [3584]}


OPS = tuple(OpSpec(op, PROVIDERS, *_model(op)) for op in ("pool_bilinear", "pool_avg2x2"))

SUITE = Suite(name="tokens_pool", ops=OPS, grid=grid, x_name="F")

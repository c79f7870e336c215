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
the same on the gradients). FLOP model per output element and pass: 4 multiply-adds (8
FLOPs) for the bilinear, 3 adds and a scale (4 FLOPs) for the average.

Sweep: GPU F in {8, 32}, S = 27, C = 3584 (quick: F = 32); CPU F = 4, S = 27, C = 256.

The projector fused with the pooling (``proj_pool_bilinear``, ``proj_pool_avg2x2``):
LLaVA-OneVision's projector, Linear(K -> C) + GELU + Linear(C -> C) (SigLIP K = 1152 to
Qwen2-7B's C = 3584; CPU K = 128), on the F x S x S frame tokens, then the pooling above.

- ``vlmkernels``: ``vlmkernels.mlp_projector(x, ..., pool=kind, grid=(S, S))``, the pooling
  before the second linear (same result up to rounding; that GEMM and its two backward
  GEMMs on the pooled rows);
- ``vlmkernels_unfused``: ``vlmkernels.mlp_projector`` then ``pool_tokens``;
- ``eager``: ``F.linear``, ``F.gelu``, ``F.linear`` then the pooling formula above
  (transformers' projector, then ``apply_pooling``);
- ``eager_pool_first``: the eager formula with the pooling before the second linear (what
  the algebra alone buys);
- ``compile``: ``torch.compile`` of ``eager`` (CUDA only).

Inputs: x (F, S S, K) and the weights (scaled by fan-in^-1/2), all ``requires_grad`` (their
gradients are part of fwd+bwd). FLOP model: the pool-first form's, the least any provider
does, 2 F (S^2 K C + h w C C) per pass (x3 fwd+bwd) plus the pooling's, the same for every
provider (projector-then-pool does more: its rate is an effective one, and no provider's %
of the matmul ceiling can pass 100). Byte model: x and the weights read, the pooled output
written, per pass. ``saved_mb``: what autograd keeps for the backward after the forward,
inputs and weights excluded (``bench_connectors.saved_bytes``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from .bench_connectors import leaf_linear_bytes, saved_bytes
from .bench_tokens import _prepared
from .harness import BuildArgs, OpSpec, Prepared, Provider, Suite


def _out_side(op: str, s: int) -> tuple[int, int]:
    """(input side, output side) of ``op`` on an S x S grid."""
    if op.endswith("avg2x2"):
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


def _kind(op: str) -> str:
    return "avg2x2" if op.endswith("avg2x2") else "bilinear"


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
    kind = _kind(args.op)
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


# ------------------------------------------------------------ projector fused with pooling


def _projector_inputs(args: BuildArgs):
    side, out = _out_side(args.op, args.shape["S"])
    frames, k, c = args.shape["F"], args.shape["K"], args.shape["C"]
    gen = torch.Generator(device="cpu").manual_seed(args.seed)

    def randn(*shape, scale=1.0, grad=True):
        t = (torch.randn(*shape, generator=gen) * scale).to(args.device, args.dtype)
        return t.requires_grad_(grad)

    tensors = (randn(frames, side * side, k), randn(c, k, scale=k**-0.5), randn(c),
               randn(c, c, scale=c**-0.5), randn(c))  # fmt: skip
    return side, out, tensors, randn(frames, out * out, c, grad=False)


def projector_eager(x, w1, b1, w2, b2, side, out, average, pool_first=False):
    """LLaVA-OneVision's projector then its pooling (``pool_first``: the pooling moved
    before the second linear)."""
    h = F.gelu(F.linear(x, w1, b1))
    if pool_first:
        return F.linear(pool_eager(h, side, out, average), w2, b2)
    return pool_eager(F.linear(h, w2, b2), side, out, average)


def _projector_prepared(args: BuildArgs, fn, note: str) -> Prepared:
    side, out, tensors, grad = _projector_inputs(args)

    def call():
        return (fn(*tensors, side, out),)

    def metrics():
        return {"saved_mb": saved_bytes(call, tensors) / 2**20}

    prepared = _prepared(call, tensors[0], grad, note)
    return Prepared(prepared.fn, tensors, note, call=call, metrics=metrics)


def _build_projector(variant: str):
    def build(args: BuildArgs) -> Prepared:
        import vlmkernels

        kind = _kind(args.op)
        average = kind == "avg2x2"
        if variant == "vlmkernels":

            def fn(x, w1, b1, w2, b2, side, out):
                return vlmkernels.mlp_projector(x, w1, b1, w2, b2, pool=kind, grid=(side, side))

            return _projector_prepared(args, fn, "pooled before the second linear")
        if variant == "vlmkernels_unfused":

            def fn(x, w1, b1, w2, b2, side, out):
                y = vlmkernels.mlp_projector(x, w1, b1, w2, b2)
                return vlmkernels.pool_tokens(y, (side, side), kind)

            return _projector_prepared(args, fn, "mlp_projector then pool_tokens")
        first = variant == "eager_pool_first"
        note = "transformers' projector then apply_pooling" + (", pooled first" if first else "")

        def fn(x, w1, b1, w2, b2, side, out):
            return projector_eager(x, w1, b1, w2, b2, side, out, average, first)

        if variant == "compile":
            backend = args.options.get("compile_backend", "inductor")
            torch._dynamo.reset()
            fn = torch.compile(fn, backend=backend, dynamic=False)
            note += f"; torch.compile(backend={backend}, dynamic=False); compile time excluded"
        return _projector_prepared(args, fn, note)

    return build


def _cuda_only(device: torch.device) -> str | None:
    if device.type == "cuda":
        return None
    return "the projectors are compiled on CUDA only (Inductor's CPU compile of fwd+bwd is slow)"


PROJECTOR_PROVIDERS = tuple(
    Provider(name, _build_projector(name))
    for name in ("vlmkernels", "vlmkernels_unfused", "eager", "eager_pool_first")
) + (Provider("compile", _build_projector("compile"), available=_cuda_only),)


def _model(op: str):
    def nbytes(shape: Mapping[str, int], mode: str, itemsize: int) -> float:
        side, out = _out_side(op, shape["S"])
        passes = 2 if mode == "fwd+bwd" else 1
        return float(passes * (side * side + out * out) * shape["F"] * shape["C"] * itemsize)

    def flops(shape: Mapping[str, int], mode: str) -> float:
        _, out = _out_side(op, shape["S"])
        passes = 2 if mode == "fwd+bwd" else 1
        per_output = 4 if op.endswith("avg2x2") else 8
        return float(passes * per_output * out * out * shape["F"] * shape["C"])

    return flops, nbytes


def _projector_model(op: str):
    pool_flops, _ = _model(op)

    def flops(shape: Mapping[str, int], mode: str) -> float:
        """The least any provider must do: the second GEMM on the pooled rows."""
        side, out = _out_side(op, shape["S"])
        k, c = shape["K"], shape["C"]
        passes = 3 if mode == "fwd+bwd" else 1
        gemms = 2 * shape["F"] * (side * side * k * c + out * out * c * c)
        return float(passes * gemms + pool_flops(shape, mode))

    def nbytes(shape: Mapping[str, int], mode: str, itemsize: int) -> float:
        """The connectors' model (:func:`leaf_linear_bytes`) of x, the pooled output and
        the two weights."""
        side, out = _out_side(op, shape["S"])
        k, c = shape["K"], shape["C"]
        x, y, w = shape["F"] * side * side * k, shape["F"] * out * out * c, c * (k + c)
        return leaf_linear_bytes(x, y, w, mode, itemsize)

    return flops, nbytes


def grid(profile: str) -> dict[str, list[int]]:
    if profile == "cpu":
        return {"F": [4], "S": [27], "C": [256], "K": [128]}
    if profile == "quick":
        return {"F": [32], "S": [27], "C": [3584], "K": [1152]}
    return {"F": [8, 32], "S": [27], "C": [3584], "K": [1152]}


OPS = tuple(OpSpec(op, PROVIDERS, *_model(op)) for op in ("pool_bilinear", "pool_avg2x2")) + tuple(
    OpSpec(op, PROJECTOR_PROVIDERS, *_projector_model(op))
    for op in ("proj_pool_bilinear", "proj_pool_avg2x2")
)

SUITE = Suite(name="tokens_pool", ops=OPS, grid=grid, x_name="F")

r"""Token compression: ``tome_merge`` (ToMe's bipartite soft matching + size-weighted merge)
and ``select_tokens`` (keep the top-scoring tokens in their order).

Shapes (one grid for both ops): B images of N tokens of C channels; ToMe removes r tokens
(metric: a (B, N, C) tensor like ToMe's head-averaged keys); ``select_tokens`` keeps
N // 4 tokens (FastV / VisionZip-style pruning of 75 %; r does not apply). The issue's shape:
B = 256, N = 576 (LLaVA's 24 x 24 CLIP grid), C = 1024, r = 16.

Inputs: seeded random normal x (``requires_grad``, the leaf whose ``.grad`` fwd+bwd fills),
metric and scores (no gradient), in the run's dtype (bf16 on a GPU, fp32 on the CPU).

Providers:

- ``vlmkernels``: :func:`vlmkernels.ops.tokens.tome_merge` / ``select_tokens`` (Triton on
  CUDA, the PyTorch path on the CPU);
- ``eager``: ToMe as published, written out here (``bipartite_soft_matching``: metric over
  its norm, A = even, B = odd tokens, A B^T scores, row max and argmax, argsort descending,
  the top r merged; ``merge_wavg``: ``scatter_reduce`` sums of x * size and of size, then the
  division), in the input dtype as ToMe runs it; for ``select_tokens``: ``torch.topk`` of the
  scores, ``sort`` of the indices, ``gather`` of the rows;
- ``compile``: ``torch.compile`` of the same eager functions (static shapes, dynamo reset per
  shape, compile time excluded by the warm-up).

Each timed call ends in a 0-d placeholder whose backward hands a fixed random gradient to
the outputs (no reduction is timed; the sizes get a zero gradient).

Byte model: ToMe forward reads metric and x and writes the N - r merged rows,
(2 N + (N - r)) B C e; the backward reads the merged rows' gradient and writes x's,
(N + (N - r)) B C e more. select_tokens: read and write the kept rows, 2 B K C e (K = N // 4);
the backward reads their gradient and writes x's whole gradient, (K + N) B C e. FLOP model:
ToMe's score GEMM, 2 B ceil(N/2) floor(N/2) C; select: none counted.

Sweep: GPU full B in {32, 256}, N = 576, C = 1024, r = 16; quick B = 256; CPU B = 4, N = 196,
C = 256, r = 16 (fp32). Target (:mod:`benchmarks.targets`, issue 13): ``tome_merge`` forward
in at most 1/5 of eager's time at B = 256 (bf16, GPU).
"""

from __future__ import annotations

import math
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

# --------------------------------------------------------------------------------------
# Eager baselines
# --------------------------------------------------------------------------------------


def tome_eager(x: torch.Tensor, metric: torch.Tensor, r: int):
    """ToMe's bipartite soft matching + merge_wavg (no class token), in x's dtype."""
    with torch.no_grad():
        m = metric / metric.norm(dim=-1, keepdim=True)
        a, b = m[..., ::2, :], m[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx, src_idx = edge_idx[..., r:, :], edge_idx[..., :r, :]
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)

    def merge(t):
        src, dst = t[..., ::2, :], t[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce="sum")
        return torch.cat([unm, dst], dim=1)

    size = torch.ones_like(x[..., 0, None])
    out = merge(x * size)
    size = merge(size)
    return out / size, size


def select_eager(x: torch.Tensor, scores: torch.Tensor, keep: int):
    """topk + sort + gather."""
    idx = scores.topk(keep, dim=1).indices.sort(dim=1).values
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[2])), idx


# --------------------------------------------------------------------------------------
# Inputs and providers
# --------------------------------------------------------------------------------------


def keep_of(shape: Mapping[str, int]) -> int:
    return max(shape["N"] // 4, 1)


def make_inputs(args: BuildArgs):
    B, N, C = args.shape["B"], args.shape["N"], args.shape["C"]
    gen = torch.Generator(device=args.device).manual_seed(args.seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=args.device).to(args.dtype)

    x = randn(B, N, C).requires_grad_()
    if args.op == "tome_merge":
        n_out = N - args.shape["r"]
        return x, randn(B, N, C), randn(B, n_out, C)
    return x, randn(B, N).float(), randn(B, keep_of(args.shape), C)


def _prepared(call, x, grad, note):
    """The tokens' checksum <out, G> (first call), their backward G (zeros for the sizes)."""
    fn = checksummed(call, lambda outs: (grad,) + (None,) * (len(outs) - 1))
    return Prepared(fn, (x,), note, call=call)


def build_vlmkernels(args: BuildArgs) -> Prepared:
    from vlmkernels.ops import tokens

    x, other, grad = make_inputs(args)
    if args.op == "tome_merge":
        r = args.shape["r"]
        return _prepared(lambda: tokens.tome_merge(x, other, r)[:2], x, grad, "")
    keep = keep_of(args.shape)
    return _prepared(lambda: tokens.select_tokens(x, other, keep)[:1], x, grad, f"keep={keep}")


def _eager_call(args: BuildArgs, compiled: bool):
    x, other, grad = make_inputs(args)
    if args.op == "tome_merge":
        fn, extra, note = tome_eager, args.shape["r"], "ToMe merge.py as published"
    else:
        fn, extra, note = select_eager, keep_of(args.shape), "topk + sort + gather"
    if compiled:
        backend = args.options.get("compile_backend", "inductor")
        torch._dynamo.reset()
        fn = torch.compile(fn, backend=backend, dynamic=False)
        note += f"; torch.compile(backend={backend}, dynamic=False); compile time excluded"
    if args.op == "tome_merge":
        return _prepared(lambda: fn(x, other, extra), x, grad, note)
    return _prepared(lambda: fn(x, other, extra)[:1], x, grad, note)


VLMKERNELS = Provider("vlmkernels", build_vlmkernels)
EAGER = Provider("eager", lambda args: _eager_call(args, False))
COMPILE = Provider("compile", lambda args: _eager_call(args, True))

# --------------------------------------------------------------------------------------
# Cost models, grid, suite
# --------------------------------------------------------------------------------------


def tome_flops(shape: Mapping[str, int], mode: str) -> float:
    """The score GEMM, in the forward only (the backward reuses the merge plan)."""
    if mode == "bwd":
        return 0.0
    n = shape["N"]
    return 2.0 * shape["B"] * math.ceil(n / 2) * (n // 2) * shape["C"]


def tome_bytes(shape: Mapping[str, int], mode: str, itemsize: int) -> float:
    n, n_out = shape["N"], shape["N"] - shape["r"]
    rows = {"fwd": 2 * n + n_out, "bwd": n + n_out, "fwd+bwd": 3 * n + 2 * n_out}[mode]
    return float(rows * shape["B"] * shape["C"] * itemsize)


def select_bytes(shape: Mapping[str, int], mode: str, itemsize: int) -> float:
    """Forward: the kept rows read and written; backward: their gradient read and x's
    whole (B, N, C) gradient written (zeros on the dropped rows)."""
    kept, n = keep_of(shape), shape["N"]
    rows = {"fwd": 2 * kept, "bwd": kept + n, "fwd+bwd": 3 * kept + n}[mode]
    return float(rows * shape["B"] * shape["C"] * itemsize)


def grid(profile: str) -> dict[str, list[int]]:
    if profile == "cpu":
        return {"B": [4], "N": [196], "C": [256], "r": [16]}
    if profile == "quick":
        return {"B": [256], "N": [576], "C": [1024], "r": [16]}
    return {"B": [32, 256], "N": [576], "C": [1024], "r": [16]}


OPS = (
    OpSpec("tome_merge", (VLMKERNELS, EAGER, COMPILE), tome_flops, tome_bytes),
    OpSpec("select_tokens", (VLMKERNELS, EAGER, COMPILE), lambda s, m: 0.0, select_bytes),
)


summarize = targets.summarizer(
    "tokens", "no CUDA device: a CPU sweep, whose shapes and dtype differ"
)


SUITE = Suite(name="tokens", ops=OPS, grid=grid, x_name="B", summarize=summarize)

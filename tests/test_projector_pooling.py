"""mlp_projector(..., pool=) against float64 references of projector-then-pool.

The reference is the unfused formula, written here as transformers runs it: LLaVA's
Linear + GELU + Linear, then the projected grid pooled (``F.avg_pool2d(2)`` or
LLaVA-OneVision's ``F.interpolate(mode="bilinear", align_corners=False)``), in float64 on
the same rounded inputs, gradients by autograd. The fused op pools before the second
linear, which is exact in exact arithmetic (the poolings are affine with weights summing to
1), so the tolerances are the projector's (tests/test_connectors.py): fp32 1e-5, bf16 3e-2
(max abs error relative to max |ref|), float64 1e-12.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import vlmkernels
from vlmkernels.ops import connectors as C

TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float64: 1e-12}
NAMES = ("x", "w1", "b1", "w2", "b2")
# kind, grid, pool_size, store_hidden: odd output grids for the average, odd input grids for
# bilinear, and an explicit size
CASES = [
    ("avg2x2", (2, 6), None, False),
    ("bilinear", (5, 3), None, False),
    ("bilinear", (3, 4), (2, 3), True),
]


@pytest.fixture(params=["triton", "torch"])
def backend(request):
    with vlmkernels.use_backend(request.param):
        yield request.param


def max_rel(out, ref):
    ref = ref.double()
    return ((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def make(b, hw, k, n1, n2, dtype):
    shapes = ((b, hw, k), (n1, k), (n1,), (n2, n1), (n2,))
    scales = (1.0, k**-0.5, 1.0, n1**-0.5, 1.0)
    return [
        (torch.randn(s) * c).to(dtype).requires_grad_() for s, c in zip(shapes, scales, strict=True)
    ]


def projector_then_pool(x, w1, b1, w2, b2, grid, kind, size):
    y = F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)
    b, _, n = y.shape
    g = y.view(b, *grid, n).permute(0, 3, 1, 2)
    if kind == "avg2x2":
        g = F.avg_pool2d(g, 2)
    else:
        size = size or (math.ceil(grid[0] / 2), math.ceil(grid[1] / 2))
        g = F.interpolate(g, size=size, mode="bilinear", align_corners=False)
    return g.permute(0, 2, 3, 1).reshape(b, -1, n)


def every_other(t):
    """t's values as a non-contiguous leaf (every other element of a wider buffer)."""
    wide = torch.zeros(2 * t.numel(), dtype=t.dtype)
    wide[::2] = t.detach()
    return wide[::2].requires_grad_()


def check(dtype, kind, grid, size, store_hidden=False, b=2, k=12, n1=20, n2=9,
          strided_biases=False):  # fmt: skip
    t = make(b, grid[0] * grid[1], k, n1, n2, dtype)
    if strided_biases:
        t[2], t[4] = every_other(t[2]), every_other(t[4])
    y = C.mlp_projector(*t, pool=kind, grid=grid, pool_size=size, store_hidden=store_hidden)
    t64 = [v.detach().double().requires_grad_() for v in t]
    ref = projector_then_pool(*t64, grid, kind, size)
    assert y.shape == ref.shape and y.dtype == dtype
    assert max_rel(y, ref) < TOL[dtype]
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(y, t, g.to(dtype))
    refs = torch.autograd.grad(ref, t64, g)
    for name, got, want in zip(NAMES, grads, refs, strict=True):
        assert max_rel(got, want) < 2 * TOL[dtype], (name, max_rel(got, want))


@pytest.mark.parametrize(("kind", "grid", "size", "store"), CASES)
def test_pooled_projector_fp32(kind, grid, size, store, backend):
    check(torch.float32, kind, grid, size, store_hidden=store)


@pytest.mark.parametrize(("kind", "grid", "size", "store"), CASES[:2])
def test_pooled_projector_bf16(kind, grid, size, store, backend):
    check(torch.bfloat16, kind, grid, size, store_hidden=store)


@pytest.mark.parametrize("kind", ["avg2x2", "bilinear"])
def test_pooled_projector_strided_biases(kind, backend):
    """b1, b2 as strided views: the kernels read them through a contiguous copy."""
    check(torch.float32, kind, (4, 4), None, strided_biases=True)


@pytest.mark.parametrize(("kind", "grid", "size", "store"), CASES[:2])
def test_pooled_projector_float64(kind, grid, size, store):
    check(torch.float64, kind, grid, size, store_hidden=store)


def test_no_bias_strided_weight_and_partial_grads(backend):
    grid, k, n1, n2 = (5, 3), 8, 12, 6
    x = torch.randn(3, 15, 2 * k)[..., ::2].requires_grad_()  # last dim stride 2
    w1 = (torch.randn(n1, k) * 0.3).requires_grad_()
    w2 = torch.randn(n1, n2).t().requires_grad_()  # transposed
    y = C.mlp_projector(x, w1, None, w2, None, pool="bilinear", grid=grid)
    xr, w1r, w2r = (v.detach().double().requires_grad_() for v in (x, w1, w2))
    ref = projector_then_pool(xr, w1r, None, w2r, None, grid, "bilinear", None)
    assert max_rel(y, ref) < 1e-5
    g = torch.randn_like(ref)
    for ours, theirs in ((x, xr), (w2, w2r)):  # one input's gradient at a time
        (got,) = torch.autograd.grad(y, ours, g.float(), retain_graph=True)
        (want,) = torch.autograd.grad(ref, theirs, g, retain_graph=True)
        assert max_rel(got, want) < 1e-5
    with torch.no_grad():
        assert max_rel(C.mlp_projector(x, w1, None, w2, None, pool="bilinear", grid=grid),
                       ref) < 1e-5  # fmt: skip


def test_bad_pool_arguments():
    x, w1, b1, w2, b2 = make(2, 12, 4, 8, 3, torch.float32)
    cases = [
        (dict(pool="max", grid=(3, 4)), "pool must be None, 'avg2x2' or 'bilinear'"),
        (dict(pool="avg2x2"), r"needs grid=\(H, W\)"),
        (dict(pool="bilinear", grid=(3, 5)), "grid 3 x 5 = 15 tokens, but x has 12"),
        (dict(pool="avg2x2", grid=(3, 4)), "needs an even grid, got 3 x 4"),
        (dict(pool="avg2x2", grid=(2, 6), pool_size=(2, 2)), r"gives pool_size \(1, 3\)"),
        (dict(pool="bilinear", grid=(3, 4), pool_size=(0, 2)), "pool_size must be a pair"),
        (dict(pool="bilinear", grid=(3.0, 4)), "grid must be a pair of positive ints"),
        (dict(grid=(3, 4)), "grid goes with pool='avg2x2' or 'bilinear' \\(pool is None\\)"),
        (dict(pool_size=(1, 2)), "pool_size goes with pool="),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            C.mlp_projector(x, w1, b1, w2, b2, **kwargs)
    with pytest.raises(ValueError, match=r"x must be \(B, H W, K\)"):
        C.mlp_projector(x[0], w1, b1, w2, b2, pool="bilinear", grid=(3, 4))
    # integers of other types (numpy's, a torch.Size) are ints, as pool_tokens takes them
    numpy = pytest.importorskip("numpy")
    want = C.mlp_projector(x, w1, b1, w2, b2, pool="bilinear", grid=(3, 4))
    for grid in ((numpy.int64(3), 4), torch.Size((3, 4))):
        got = C.mlp_projector(x, w1, b1, w2, b2, pool="bilinear", grid=grid)
        assert torch.equal(got, want)


def test_opcheck():
    """Schema, autograd registration and fake, which do not depend on the backend (the AOT
    path: test_connectors.py's test_torch_compile_fullgraph)."""
    x, w1, b1, w2, b2 = make(1, 15, 6, 8, 5, torch.float32)
    grid4 = x.detach().view(1, 5, 3, 6).requires_grad_()
    even = grid4[:, :4, :2].detach().requires_grad_()
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    with vlmkernels.use_backend("torch"):
        for inputs, size, mode, save in ((grid4, [3, 2], 1, False), (even, [2, 1], 0, True)):
            args = (inputs, w1, b1, w2, b2, size, mode, save)
            torch.library.opcheck(torch.ops.vlmkernels.pooled_projector, args, test_utils=utils)
            out, saved = torch.ops.vlmkernels.pooled_projector(*args)
            assert out.requires_grad and not saved.requires_grad  # saved: the backward's


def test_benchmark_providers_agree():
    """The tokens_pool suite's projector cases (benchmarks/bench_tokens_pool.py) compute one
    result: fused, mlp_projector then pool_tokens, eager, eager pooled first."""
    from pathlib import Path

    from vlmkernels.cli import load_benchmarks

    load_benchmarks(Path(__file__).resolve().parents[1])
    from benchmarks import bench_tokens_pool as bp
    from benchmarks.harness import BuildArgs

    shape = {"F": 2, "S": 5, "C": 8, "K": 6}
    with vlmkernels.use_backend("torch"):
        for op in ("proj_pool_bilinear", "proj_pool_avg2x2"):
            args = BuildArgs(op, shape, torch.float64, torch.device("cpu"), 0, {})
            outs = {p.name: p.build(args).call()[0] for p in bp.PROJECTOR_PROVIDERS
                    if p.name != "compile"}  # fmt: skip
            ref = outs.pop("eager")
            out = 2 if op.endswith("avg2x2") else 3  # avg2x2: the even 4 x 4 part, halved
            assert ref.shape == (2, out * out, 8)
            for name, out in outs.items():
                assert max_rel(out, ref) < 1e-12, (op, name)


@pytest.mark.parametrize("kind", ["avg2x2", "bilinear"])
def test_compiles_once_for_every_grid(kind):
    """A symbolic grid (the side read from x's token count, dynamic=True) gives a symbolic
    pooled size, which the op's ``int[] size`` fixed in the graph: one compilation per grid
    (pool_tokens, ``SymInt[]``, compiled once). One graph for three grids; values and
    gradients those of projector_then_pool."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    def f(x, w1, b1, w2, b2):
        side = torch.sym_int(x.shape[1] ** 0.5)
        return C.mlp_projector(x, w1, b1, w2, b2, pool=kind, grid=(side, side))

    torch._dynamo.reset()
    compiled = torch.compile(f, backend=backend, fullgraph=True, dynamic=True)
    with vlmkernels.use_backend("torch"):
        for side in (4, 6, 8):
            args = make(2, side * side, 6, 8, 5, torch.float32)
            out = compiled(*args)
            want = projector_then_pool(*args, (side, side), kind, None)
            assert max_rel(out, want) < 1e-5
            grads = torch.autograd.grad(out.square().sum(), args)
            for g, w in zip(grads, torch.autograd.grad(want.square().sum(), args), strict=True):
                assert max_rel(g, w) < 1e-4
    assert len(graphs) == 1, len(graphs)

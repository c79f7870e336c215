"""The ``saved_mb`` metric of the connector suite: the bytes autograd keeps for backward after
a forward pass (benchmarks/bench_connectors.py ``saved_bytes``), and the target it feeds
(the LLaVA projector's saved activations <= 0.6x eager's, issue 13).

Expected sizes come from the shapes: eager's Linear + GELU + Linear keeps h and GELU(h)
(2 M N1 elements; x, W1, W2 are inputs), vlmkernels' projector keeps only its inputs, or
h with ``store_hidden=True``.
"""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import vlmkernels
from vlmkernels.cli import load_benchmarks
from vlmkernels.ops import connectors as C

load_benchmarks(Path(__file__).resolve().parents[1])

from benchmarks import bench_connectors as bc  # noqa: E402
from benchmarks import targets  # noqa: E402
from benchmarks.harness import Case  # noqa: E402


def _projector(m, k, n1, n2, dtype):
    x = torch.randn(m, k, dtype=dtype, requires_grad=True)
    w1 = (torch.randn(n1, k) * k**-0.5).to(dtype).requires_grad_()
    b1 = torch.randn(n1, dtype=dtype, requires_grad=True)
    w2 = (torch.randn(n2, n1) * n1**-0.5).to(dtype).requires_grad_()
    b2 = torch.randn(n2, dtype=dtype, requires_grad=True)
    return [x, w1, b1, w2, b2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saved_bytes_of_eager_and_vlmkernels_projectors(dtype):
    m, k, n1, n2 = 37, 24, 40, 20
    t = _projector(m, k, n1, n2, dtype)
    e = dtype.itemsize

    def eager():
        return F.linear(F.gelu(F.linear(t[0], t[1], t[2])), t[3], t[4])

    assert bc.saved_bytes(eager, t) == 2 * m * n1 * e  # h and GELU(h)
    # the inputs count when not excluded: x (GELU's input h is not an input)
    assert bc.saved_bytes(eager, t[1:]) == 2 * m * n1 * e + m * k * e
    for backend in ("torch", "triton"):
        with vlmkernels.use_backend(backend):
            assert bc.saved_bytes(lambda: C.mlp_projector(*t), t) == 0, backend
            stored = bc.saved_bytes(lambda: C.mlp_projector(*t, store_hidden=True), t)
            assert stored == m * n1 * e, backend
    with torch.no_grad():
        assert bc.saved_bytes(eager, t) == 0


def test_pooled_projector_keeps_only_its_inputs():
    """mlp_projector(pool=...): nothing but the inputs, h (B H W x N1) with store_hidden;
    projector-then-pool in eager keeps h and GELU(h) (interpolate keeps no tensor)."""
    b, (H, W), k, n1, n2 = 2, (5, 3), 8, 12, 6
    x, w1, b1, w2, b2 = _projector(b * H * W, k, n1, n2, torch.float32)
    x = x.detach().view(b, H * W, k).requires_grad_()
    t = [x, w1, b1, w2, b2]

    def eager():
        y = F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2).view(b, H, W, n2)
        return F.interpolate(y.permute(0, 3, 1, 2), size=(3, 2), mode="bilinear")

    assert bc.saved_bytes(eager, t) == 2 * b * H * W * n1 * 4
    for backend in ("torch", "triton"):
        with vlmkernels.use_backend(backend):

            def fused(store_hidden=False):
                return C.mlp_projector(*t, pool="bilinear", grid=(H, W), store_hidden=store_hidden)

            assert bc.saved_bytes(fused, t) == 0, backend
            stored = bc.saved_bytes(lambda: fused(True), t)  # noqa: B023
            assert stored == b * H * W * n1 * 4, backend


def test_saved_bytes_counts_a_storage_once():
    x = torch.randn(8, 6, requires_grad=True)

    def twice():
        h = x * 2.0
        return (h * h[:, :3].repeat(1, 2)).sum()  # h saved twice (as h and through a view)

    # h (8 x 6) once, and the repeated slice (8 x 6) it multiplies by
    assert bc.saved_bytes(twice, [x]) == 2 * 8 * 6 * 4


def test_suite_records_saved_mb_and_the_target_judges_it():
    from benchmarks.ceilings import Ceilings
    from benchmarks.env import GpuMonitor
    from benchmarks.harness import RunConfig, Runner
    from benchmarks.timing import Timing

    cpu = torch.device("cpu")
    shape = {k: v[0] for k, v in bc.grid("cpu").items()}
    (target,) = [t for t in targets.for_suite("connectors", metric="saved_mb")
                 if t.dtype == "float32"]  # fmt: skip
    assert target.shape_dict == shape  # the CPU target follows the CPU sweep
    overrides = {k: [v] for k, v in shape.items()}
    providers = frozenset({"vlmkernels", "eager"})
    cfg = RunConfig(device=cpu, dtype=torch.float32, profile="cpu", modes=("fwd+bwd",),
                    providers=providers, shape_overrides=overrides)  # fmt: skip
    t = Timing(1.0, 1.0, 1.0)
    ceil = Ceilings(10.0, 1 << 20, 1.0, 64, torch.float32, t, t)
    op = [o for o in bc.SUITE.ops if o.name == "llava_projector"]
    with vlmkernels.use_backend("torch"):  # the CPU suite's path (no interpreter timed)
        results = Runner(bc.SUITE, cfg, ceil, GpuMonitor(cpu), lambda records: None).run(op)
    key = tuple(shape.items())
    saved = {
        p: results.find(Case("llava_projector", p, "fwd+bwd", key, "float32"), "saved_mb").p50
        for p in ("vlmkernels", "eager")
    }
    m, n = shape["M"], shape["N"]
    assert saved == {"vlmkernels": 0.0, "eager": 2 * m * n * 4 / 2**20}
    verdict = target.evaluate(results)
    assert verdict.measured and verdict.value == 0.0 and verdict.hit
    lines = bc.summarize(results, cfg)
    assert any("saved_mb / eager saved_mb" in line and "HIT" in line for line in lines)

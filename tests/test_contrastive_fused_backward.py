"""The fused CLIP backward (:mod:`vlmkernels.ops.contrastive.fused_backward`): gradients
against float64 references, through the Triton interpreter on a CPU-only machine.

Tolerances, relative errors against float64 math on the same (rounded) inputs: fp32 1e-5
(fp32 accumulation everywhere), bf16 / fp16 feature gradients 1e-2 / 3e-3 (the gradients
are rounded to the input dtype), scale and bias gradients 1e-4 of max(|ref|, 0.1). A
wrong kernel (a missing term, a transposed operand, a lost tile) is off by O(1).
Sizes are odd (not multiples of the interpreter's 32-wide tiles).
"""

import pytest
import torch
import torch.nn.functional as F

import vlmkernels
from vlmkernels.ops.contrastive import fused_backward, launchers
from vlmkernels.ops.contrastive.algebra import Targets

FEAT_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 3e-3}
SCALAR_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-4, torch.float16: 1e-4}
FUSED = ("fused", "fused_deterministic")


def rel_err(a, b, floor=0.0):
    a, b = a.double(), b.double()
    return ((a - b).norm() / max(b.norm().item(), floor)).item()


def features(n, d, dtype, gen, strided=False):
    f = F.normalize(torch.randn(n, 2 * d if strided else d, generator=gen), dim=-1)
    f = f.to(dtype)
    return f[:, ::2] if strided else f


def ref_loss(x, y, s, b, smoothing=0.0, direction="both"):
    """float64 clip-style loss: mean of the row (image-to-text) and column cross-entropies."""
    logits = s * x @ y.T + (b if b is not None else 0.0)
    labels = torch.arange(x.shape[0])
    rows = F.cross_entropy(logits, labels, label_smoothing=smoothing)
    if direction == "rows":
        return rows
    return (rows + F.cross_entropy(logits.T, labels, label_smoothing=smoothing)) / 2


@pytest.fixture
def calls(monkeypatch):
    """Counts the fused kernel's launches (to tell the fused design from the fallback)."""
    count = []
    original = fused_backward.fused_block_grads

    def spy(*args, **kwargs):
        count.append(kwargs.get("deterministic"))
        return original(*args, **kwargs)

    monkeypatch.setattr(launchers, "fused_block_grads", spy)
    return count


def grads(design, x, y, s, b, monkeypatch, **kw):
    monkeypatch.setenv(fused_backward.ENV_DESIGN, design)
    leaves = [t.detach().clone().requires_grad_() for t in (x, y, s)]
    bias = b.detach().clone().requires_grad_() if b is not None else None
    with vlmkernels.use_backend("triton"):
        loss = vlmkernels.clip_loss(*leaves, bias, **kw)
    loss.backward()
    return [t.grad for t in leaves] + [bias.grad if bias is not None else None]


def ref_grads(x, y, s, b, **kw):
    leaves = [t.detach().double().requires_grad_() for t in (x, y, s)]
    bias = b.detach().double().requires_grad_() if b is not None else None
    ref_loss(*leaves, bias, **kw).backward()
    return [t.grad for t in leaves] + [bias.grad if bias is not None else None]


def check(out, ref, dtype):
    for name, o, r in zip(("dx", "dy"), out[:2], ref[:2], strict=True):
        assert o.dtype == dtype
        assert rel_err(o, r) < FEAT_TOL[dtype], name
    for name, o, r in zip(("dscale", "dbias"), out[2:], ref[2:], strict=True):
        if r is not None:
            assert abs(o.double() - r).item() / max(abs(r).item(), 0.1) < SCALAR_TOL[dtype], name


@pytest.mark.parametrize("design", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_clip_grads_against_float64(design, dtype, monkeypatch, calls):
    gen = torch.Generator().manual_seed(1)
    x, y = features(45, 40, dtype, gen), features(45, 40, dtype, gen)
    s, b = torch.tensor(12.0), torch.tensor(-1.5)
    out = grads(design, x, y, s, b, monkeypatch)
    check(out, ref_grads(x, y, s, b), dtype)
    assert calls == [design == "fused_deterministic"]


@pytest.mark.parametrize("design", FUSED)
def test_no_bias_smoothing_strided_odd(design, monkeypatch, calls):
    gen = torch.Generator().manual_seed(2)
    x, y = (
        features(37, 50, torch.float32, gen, strided=True),
        features(37, 50, torch.float32, gen, strided=True),
    )
    assert not x.is_contiguous()
    s = torch.tensor(7.0)
    out = grads(design, x, y, s, None, monkeypatch, label_smoothing=0.1)
    check(out, ref_grads(x, y, s, None, smoothing=0.1), torch.float32)
    assert out[3] is None and calls


def test_one_direction(monkeypatch, calls):
    """contrastive_cross_entropy: the row direction only (ROWS without COLS)."""
    gen = torch.Generator().manual_seed(3)
    x, y = features(41, 33, torch.float32, gen), features(41, 33, torch.float32, gen)
    s = torch.tensor(9.0)
    monkeypatch.setenv(fused_backward.ENV_DESIGN, "fused")
    a, c, sl = (t.clone().requires_grad_() for t in (x, y, s))
    with vlmkernels.use_backend("triton"):
        vlmkernels.contrastive_cross_entropy(a, c, sl).backward()
    ref = ref_grads(x, y, s, None, direction="rows")
    check([a.grad, c.grad, sl.grad, None], ref, torch.float32)
    assert calls


@pytest.mark.parametrize("design", FUSED)
@pytest.mark.parametrize("frozen", ["image", "text"])
def test_frozen_tower_skips_the_frozen_gradient(design, frozen, monkeypatch, calls):
    """LiT (a locked image tower) or a frozen text tower: the frozen side's gradient is
    neither made nor stored (the launcher gets y_grad=False: clip_loss puts the frozen side
    second), the other side's and the scalars' match float64."""
    gen = torch.Generator().manual_seed(8)
    x, y = features(43, 40, torch.float32, gen), features(43, 40, torch.float32, gen)
    s, b = torch.tensor(10.0), torch.tensor(-0.5)
    seen = []
    original = fused_backward._clip_fused_grad_kernel.run

    def spy(*args, **kwargs):
        seen.append(kwargs["Y_GRAD"])
        return original(*args, **kwargs)

    monkeypatch.setattr(fused_backward._clip_fused_grad_kernel, "run", spy)
    monkeypatch.setenv(fused_backward.ENV_DESIGN, design)
    xl, yl, sl, bl = (t.clone().requires_grad_(t is not (x if frozen == "image" else y))
                      for t in (x, y, s, b))  # fmt: skip
    with vlmkernels.use_backend("triton"):
        vlmkernels.clip_loss(xl, yl, sl, bl).backward()
    ref = ref_grads(x, y, s, b)
    live, live_ref = (yl.grad, ref[1]) if frozen == "image" else (xl.grad, ref[0])
    assert (xl.grad if frozen == "image" else yl.grad) is None
    assert rel_err(live, live_ref) < FEAT_TOL[torch.float32]
    for o, r in ((sl.grad, ref[2]), (bl.grad, ref[3])):
        assert abs(o.double() - r).item() / max(abs(r).item(), 0.1) < 1e-5
    assert calls and seen == [False]


def test_launcher_matches_chunked_with_accumulators():
    """block_grads_triton's designs agree, also when adding into fp32 accumulators (ring
    steps), on a rectangular block with an offset diagonal and one direction only."""
    gen = torch.Generator().manual_seed(4)
    x, y = features(40, 24, torch.float32, gen), features(70, 24, torch.float32, gen)
    targets = Targets(offset=20)
    lse_r = torch.logsumexp(5.0 * x @ y.T, 1)
    row_coef = torch.stack(
        (
            lse_r,
            torch.rand(40, generator=gen),
            torch.rand(40, generator=gen),
            torch.zeros(40),
            torch.zeros(40),
            torch.zeros(40),
        )
    )
    scale = torch.tensor(5.0)
    results = {}
    for design in ("chunked",) + FUSED:
        acc_x, acc_y = torch.ones(40, 24), torch.ones(70, 24)
        dx, dy, ds, db = launchers.block_grads_triton(
            x, y, scale, None, targets, row_coef, None, 16, acc_x, acc_y, design=design
        )
        assert dx is acc_x and dy is acc_y
        results[design] = (dx, dy, ds, db)
    for design in FUSED:
        for a, b in zip(results[design], results["chunked"], strict=True):
            assert rel_err(a, b, floor=1e-3) < 1e-5, design


def test_deterministic_is_bitwise_repeatable(monkeypatch):
    gen = torch.Generator().manual_seed(5)
    x, y = features(67, 36, torch.bfloat16, gen), features(67, 36, torch.bfloat16, gen)
    s, b = torch.tensor(11.0), torch.tensor(0.5)
    first = grads("fused_deterministic", x, y, s, b, monkeypatch)
    second = grads("fused_deterministic", x, y, s, b, monkeypatch)
    for a, c in zip(first, second, strict=True):
        assert torch.equal(a, c)
    # 3 x 3 blocks on a 2 x 2 grid: programs with several row and column blocks
    check(first, ref_grads(x, y, s, b), torch.bfloat16)


def test_ids_fall_back_to_chunked(monkeypatch, calls):
    """Targets the fused kernel does not cover (ids) run the chunked design: the same
    gradients as design="chunked", and the fused kernel is not launched."""
    gen = torch.Generator().manual_seed(6)
    x, y = features(39, 28, torch.float32, gen), features(39, 28, torch.float32, gen)
    ids = torch.arange(39) // 2
    s = torch.tensor(8.0)
    fused = grads("fused", x, y, s, None, monkeypatch, ids=ids)
    chunked = grads("chunked", x, y, s, None, monkeypatch, ids=ids)
    assert calls == []
    for a, c in zip(fused[:3], chunked[:3], strict=True):
        assert torch.equal(a, c)


def test_unknown_design_raises(monkeypatch):
    assert fused_backward.clip_backward_design() == "chunked"
    with pytest.raises(ValueError, match="design='flash'"):
        fused_backward.clip_backward_design("flash")
    monkeypatch.setenv(fused_backward.ENV_DESIGN, "fast")
    with pytest.raises(ValueError, match=fused_backward.ENV_DESIGN):
        fused_backward.clip_backward_design()


def test_deterministic_algorithms_never_run_the_atomic_design(monkeypatch, calls):
    """torch.use_deterministic_algorithms(True): tune's "fused" gives way to the chunked
    design, an explicit "fused" becomes "fused_deterministic"; without the flag both stay."""
    monkeypatch.setattr(fused_backward, "preferred_design", lambda *args: "fused")
    gpu = torch.device("cuda", 0)
    assert fused_backward.clip_backward_design(None, gpu) == "fused"
    assert fused_backward.clip_backward_design("fused") == "fused"
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert fused_backward.clip_backward_design(None, gpu) == "chunked"
        assert fused_backward.clip_backward_design("fused") == "fused_deterministic"
        monkeypatch.setenv(fused_backward.ENV_DESIGN, "fused")
        assert fused_backward.clip_backward_design(None, gpu) == "fused_deterministic"
        gen = torch.Generator().manual_seed(9)
        x, y = features(33, 24, torch.float32, gen), features(33, 24, torch.float32, gen)
        out = grads("fused", x, y, torch.tensor(9.0), None, monkeypatch)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert calls == [True]
    check(out, ref_grads(x, y, torch.tensor(9.0), None), torch.float32)


def test_atomic_programs_with_several_tiles(monkeypatch):
    """One SM: a 1 x 2 grid over 3 x 3 tiles, each program running several row and column
    blocks from its staggered start, all adding into the same fp32 buffers."""
    monkeypatch.setattr(fused_backward, "sm_count", lambda device: 1)
    assert fused_backward._grid(67, 67, torch.device("cpu"), False, 2) == (1, 2)
    gen = torch.Generator().manual_seed(7)
    x, y = features(67, 36, torch.float32, gen), features(67, 36, torch.float32, gen)
    s, b = torch.tensor(11.0), torch.tensor(0.5)
    out = grads("fused", x, y, s, b, monkeypatch, label_smoothing=0.05)
    check(out, ref_grads(x, y, s, b, smoothing=0.05), torch.float32)


def test_design_comparison_and_tune_workload_run_both_designs(calls):
    """What the tuner runs on a GPU, here through the interpreter on a small shape: the
    design comparison times both designs (the fused one launches its kernel), and the
    tuning workload runs the fused kernel when it is being tuned."""
    from vlmkernels.ops.contrastive import family

    timed, lines = [], []

    def bench(fn):
        fn()
        timed.append(len(calls))
        return 1.5

    spec = {"N": 40, "d": 24, "dtype": "fp32"}
    out = family.compare_backward_designs([spec], torch.device("cpu"), bench, lines.append)
    assert out == {"clip_backward": {"chunked": 1.5, "fused": 1.5, "shapes": 1}}
    assert timed == [0, 1] and len(lines) == 1
    assert fused_backward.ENV_DESIGN not in __import__("os").environ
    family.tune_workload({**spec, "ops": ("clip",)}, torch.device("cpu"), ["clip_fused_grad"])
    # the tuning runs both designs with both towers learning, then with one frozen
    assert calls == [False, False, False, True, True]

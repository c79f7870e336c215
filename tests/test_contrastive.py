"""clip_loss / siglip_loss: values and every gradient against float64 references.

Runs the Triton kernels (interpreted on a CPU-only machine) and the chunked PyTorch
reference. Sizes are odd (not multiples of the 32-wide interpreter tiles) and small enough
for the interpreter (about 100 programs per launch).

Tolerances, as relative errors ||out - ref|| / ||ref|| against float64 math on the same
(rounded) inputs:
- float32: 1e-5 for the loss and all gradients (fp32 accumulation; measured ~3e-7).
- float16: loss 2e-3 (the fp16 result is rounded, 2^-11), feature gradients 3e-3
  (the logit-gradient chunk is an fp16 GEMM operand), scale/bias gradients 1e-4.
- bfloat16: loss 1e-2 (2^-8 rounding), feature gradients 1e-2, scale/bias 1e-4.
Scale and bias gradients are compared relative to max(|ref|, 0.1 w), w the total weight
of the loss (1 for a mean, N for a sum): CLIP's bias gradient
is exactly zero in exact arithmetic (each softmax row sums to one), so it is held to an
absolute bound. A wrong kernel (a missing term, a wrong index, a transposed operand) is
off by O(1).
"""

import math

import pytest
import torch
import torch.nn.functional as F

import vlmkernels
from vlmkernels.ops.contrastive import ops as C

TOL = {
    torch.float32: dict(loss=1e-5, feat=1e-5, scalar=1e-5),
    torch.float16: dict(loss=2e-3, feat=3e-3, scalar=1e-4),
    torch.bfloat16: dict(loss=1e-2, feat=1e-2, scalar=1e-4),
    torch.float64: dict(loss=1e-12, feat=1e-12, scalar=1e-12),
}
BACKENDS = ["triton", "torch"]


# ------------------------------------------------------------------ float64 references


def ref_clip_losses(x, y, s, b):
    """(2, N): per-sample image-to-text and text-to-image cross-entropies."""
    logits = s * x @ y.T
    if b is not None:
        logits = logits + b
    labels = torch.arange(x.shape[0])
    return torch.stack(
        (
            F.cross_entropy(logits, labels, reduction="none"),
            F.cross_entropy(logits.T, labels, reduction="none"),
        )
    )


def ref_siglip_rows(x, y, s, b):
    logits = s * x @ y.T
    if b is not None:
        logits = logits + b
    z = 2 * torch.eye(x.shape[0], dtype=logits.dtype) - 1
    return -F.logsigmoid(z * logits).sum(1)


def ref_clip(x, y, s, b, reduction="mean"):
    losses = ref_clip_losses(x, y, s, b)
    return {"mean": losses.mean(), "sum": losses.sum() / 2, "none": losses}[reduction]


def ref_siglip(x, y, s, b, reduction="mean"):
    rows = ref_siglip_rows(x, y, s, b)
    return {"mean": rows.sum() / x.shape[0], "sum": rows.sum(), "none": rows}[reduction]


LOSSES = {
    "clip": (vlmkernels.clip_loss, ref_clip),
    "siglip": (vlmkernels.siglip_loss, ref_siglip),
}


# ------------------------------------------------------------------ helpers


def rel_err(actual, expected, floor=0.0):
    """||actual - expected|| / max(||expected||, floor)."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    den = max(expected.norm().item(), floor)
    return ((actual - expected).norm() / (den if den > 0 else 1.0)).item()


def features(n, d, dtype, device, normalize=True, scale=1.0):
    x = torch.randn(n, d, device=device, dtype=torch.float32)
    if normalize:
        x = F.normalize(x, dim=-1)
    return (x * scale).to(dtype)


def leaf(t):
    return t.detach().clone().requires_grad_(True)


def spy_general_grads(monkeypatch, kind):
    """The (y_grad, dy) of every call of the general (chunked or PyTorch-path) gradient
    launchers of ``kind`` ("clip": the block gradients; "siglip"), which still run."""
    names = {"clip": ("_block_grads_triton", "_block_grads_torch"),
             "siglip": ("_siglip_grads_triton", "_siglip_grads_torch")}[kind]  # fmt: skip
    calls = []
    for name in names:
        grads = getattr(C, name)

        def spy(*args, _grads=grads, y_grad=True, **kwargs):
            out = _grads(*args, y_grad=y_grad, **kwargs)
            calls.append((y_grad, out[1]))
            return out

        monkeypatch.setattr(C, name, spy)
    return calls


def run_loss(fn, x, y, s, b, reduction="mean", upstream=None, **kw):
    """Loss value and gradients wrt every input that requires grad (None elsewhere)."""
    out = fn(x, y, s, b, reduction=reduction, **kw)
    target = out if upstream is None else (out.float() * upstream).sum()
    inputs = [t for t in (x, y, s, b) if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(target, inputs)
    it = iter(grads)
    return out, [
        next(it) if isinstance(t, torch.Tensor) and t.requires_grad else None for t in (x, y, s, b)
    ]


def reference(ref, x, y, s, b, reduction="mean", upstream=None):
    as64 = [
        t.detach().double().cpu().requires_grad_(t.requires_grad)
        if isinstance(t, torch.Tensor)
        else t
        for t in (x, y, s, b)
    ]
    out = ref(*as64, reduction=reduction)
    target = out if upstream is None else (out * upstream.double().cpu()).sum()
    target.backward()
    return out, [t.grad if isinstance(t, torch.Tensor) and t.requires_grad else None for t in as64]


def check_against_reference(name, x, y, s, b, reduction="mean", upstream=None, **kw):
    fn, ref = LOSSES[name]
    tol = TOL[x.dtype]
    out, grads = run_loss(fn, x, y, s, b, reduction, upstream, **kw)
    ref_out, ref_grads = reference(ref, x, y, s, b, reduction, upstream)
    assert out.dtype == x.dtype
    assert torch.isfinite(out).all()
    assert rel_err(out, ref_out) < tol["loss"], (rel_err(out, ref_out), tol)
    weight = {"mean": 1.0, "sum": float(x.shape[0])}.get(reduction)
    if weight is None:
        weight = upstream.abs().sum().item()
    for i, (g, rg) in enumerate(zip(grads, ref_grads, strict=True)):
        if rg is None:
            assert g is None
            continue
        kind = "feat" if i < 2 else "scalar"
        assert g.dtype == (x, y, s, b)[i].dtype
        assert g.shape == (x, y, s, b)[i].shape
        # CLIP's bias gradient is exactly 0 in exact arithmetic: compare it absolutely, on
        # the scale of the loss's total weight (1 for a mean, N for a sum)
        floor = 0.1 * weight if kind == "scalar" else 0.0
        err = rel_err(g, rg, floor)
        assert err < tol[kind], (i, err, tol[kind])


@pytest.fixture(params=BACKENDS)
def backend(request):
    with vlmkernels.use_backend(request.param):
        yield request.param


# ------------------------------------------------------------------ values and gradients


@pytest.mark.parametrize("name", ["clip", "siglip"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,d", [(97, 80), (45, 130), (130, 33), (300, 96), (40, 1152)])
def test_values_and_grads(name, dtype, n, d, device, backend):
    x, y = leaf(features(n, d, dtype, device)), leaf(features(n, d, dtype, device))
    s = leaf(torch.tensor(13.7, device=device))
    b = leaf(torch.tensor(-2.3, device=device))
    check_against_reference(name, x, y, s, b)


@pytest.mark.parametrize("name", ["clip", "siglip"])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reductions(name, reduction, device, backend):
    n, d = 70, 48
    x, y = leaf(features(n, d, torch.float32, device)), leaf(features(n, d, torch.float32, device))
    s = leaf(torch.tensor(9.0, device=device))
    b = leaf(torch.tensor(1.5, device=device))
    upstream = None
    if reduction == "none":
        shape = (2, n) if name == "clip" else (n,)
        upstream = torch.rand(shape, device=device) + 0.1  # distinct weight per sample
    check_against_reference(name, x, y, s, b, reduction, upstream)


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_no_bias_float_scale_and_partial_grads(name, device, backend):
    """Scale as a Python float, no bias, only text features requiring grad."""
    n, d = 50, 40
    x = features(n, d, torch.float32, device)
    y = leaf(features(n, d, torch.float32, device))
    check_against_reference(name, x, y, 20.0, None)


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_one_element_scale_and_unnormalised_features(name, device, backend):
    """open_clip-style (1,)-shaped parameters; features far from unit norm."""
    n, d = 60, 36
    x = leaf(features(n, d, torch.float32, device, normalize=False, scale=0.7))
    y = leaf(features(n, d, torch.float32, device, normalize=False, scale=0.5))
    s = leaf(torch.full((1,), 3.0, device=device))
    b = leaf(torch.full((1,), -4.0, device=device))
    check_against_reference(name, x, y, s, b)


@pytest.mark.parametrize("name", ["clip", "siglip"])
@pytest.mark.parametrize("layout", ["column_major", "every_other_feature", "row_slices"])
def test_strided_inputs(name, layout, device, backend):
    n, d = 66, 40
    if layout == "column_major":
        x = features(n, d, torch.float32, device).T.contiguous().T
        y = features(n, d, torch.float32, device).T.contiguous().T
    elif layout == "every_other_feature":
        x = features(n, 2 * d, torch.float32, device)[:, ::2]
        y = features(n, 2 * d, torch.float32, device)[:, 1::2]
    else:
        x = features(2 * n, d, torch.float32, device)[::2]
        y = features(3 * n, d, torch.float32, device)[n : 2 * n]
    assert not (x.is_contiguous() and y.is_contiguous())
    x, y = x.detach().requires_grad_(), y.detach().requires_grad_()
    s = leaf(torch.tensor(11.0, device=device))
    b = leaf(torch.tensor(0.5, device=device))
    check_against_reference(name, x, y, s, b)


@pytest.mark.parametrize("name", ["clip", "siglip"])
@pytest.mark.parametrize("chunk_size", [1, 32, 41])
def test_chunked_backward(name, chunk_size, device, backend):
    """The logit gradient made in chunks of rows (the last one partial) gives the same
    gradients as one chunk."""
    if backend == "triton" and chunk_size == 1:
        pytest.skip("one-row chunks are a torch-backend stress case (slow interpreted)")
    n, d = 90, 40
    x, y = leaf(features(n, d, torch.float32, device)), leaf(features(n, d, torch.float32, device))
    s = leaf(torch.tensor(15.0, device=device))
    b = leaf(torch.tensor(-1.0, device=device))
    check_against_reference(name, x, y, s, b, chunk_size=chunk_size)


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_large_logits_are_stable(name, device, backend):
    """Scale 100 (CLIP's cap) on unnormalised features: logits in the hundreds, where an
    unshifted exp overflows fp32 and a fixed shift underflows."""
    n, d = 40, 64
    x = leaf(features(n, d, torch.float32, device, normalize=False, scale=0.4))
    y = leaf(features(n, d, torch.float32, device, normalize=False, scale=0.4))
    s = leaf(torch.tensor(100.0, device=device))
    check_against_reference(name, x, y, s, None)


@pytest.mark.parametrize("design", ["chunked", "fused"])
@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_bias_past_exp_overflow(name, design, device, backend, monkeypatch):
    """A bias above 88.7 (b log2(e) > 128): the padding rows and columns of a tile
    (n = 40 is no multiple of the blocks) must not reach exp2(b log2 e) = inf, which times
    their weight 0 made the scale and bias gradients NaN (and, in the fused backward, the
    feature gradients); the loss does not depend on a CLIP bias at all."""
    monkeypatch.setenv("VLMKERNELS_CLIP_BACKWARD", design)
    n, d = 40, 16
    x, y = leaf(features(n, d, torch.float32, device)), leaf(features(n, d, torch.float32, device))
    s = leaf(torch.tensor(10.0, device=device))
    b = leaf(torch.tensor(100.0, device=device))
    check_against_reference(name, x, y, s, b)


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_zero_scale(name, device, backend):
    """s = 0 (constant logits) still has a scale gradient, sum(dS * XY^T)."""
    n, d = 50, 40
    x, y = leaf(features(n, d, torch.float32, device)), leaf(features(n, d, torch.float32, device))
    s = leaf(torch.tensor(0.0, device=device))
    b = leaf(torch.tensor(-1.0, device=device))
    check_against_reference(name, x, y, s, b)


def test_single_pair(device, backend):
    x, y = (
        leaf(features(1, 16, torch.float32, device)),
        leaf(features(1, 16, torch.float32, device)),
    )
    s = leaf(torch.tensor(10.0, device=device))
    b = leaf(torch.tensor(-10.0, device=device))
    for name in LOSSES:
        check_against_reference(name, x, y, s, b)


def test_float64_through_torch_backend(device):
    """float64 takes the PyTorch path by default (the kernels take 16/32-bit floats)."""
    n, d = 30, 20
    x, y = leaf(features(n, d, torch.float64, device)), leaf(features(n, d, torch.float64, device))
    s = leaf(torch.tensor(7.0, dtype=torch.float64, device=device))
    b = leaf(torch.tensor(-1.0, dtype=torch.float64, device=device))
    for name in LOSSES:
        check_against_reference(name, x, y, s, b)


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_gradcheck_torch_backend(name):
    n, d = 7, 5
    x = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    y = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-0.7, dtype=torch.float64, requires_grad=True)
    fn = LOSSES[name][0]
    with vlmkernels.use_backend("torch"):
        assert torch.autograd.gradcheck(lambda *a: fn(*a, chunk_size=3), (x, y, s, b))


# ------------------------------------------------------------------ behaviour


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_deterministic(name, device):
    """No atomics: two runs give bitwise identical losses and gradients."""
    n, d = 70, 48
    x, y = features(n, d, torch.bfloat16, device), features(n, d, torch.bfloat16, device)
    s = torch.tensor(10.0, device=device)
    b = torch.tensor(-5.0, device=device)
    runs = []
    for _ in range(2):
        xi, yi, si, bi = leaf(x), leaf(y), leaf(s), leaf(b)
        runs.append(run_loss(LOSSES[name][0], xi, yi, si, bi))
    (o1, g1), (o2, g2) = runs
    assert torch.equal(o1, o2)
    for a, c in zip(g1, g2, strict=True):
        assert torch.equal(a, c)


def test_inputs_not_modified(device):
    x, y = features(40, 24, torch.float32, device), features(40, 24, torch.float32, device)
    s, b = torch.tensor(5.0, device=device), torch.tensor(1.0, device=device)
    copies = [t.clone() for t in (x, y, s, b)]
    for name in LOSSES:
        xi, yi = leaf(x), leaf(y)
        run_loss(LOSSES[name][0], xi, yi, s, b)
        for t, c in zip((xi, yi, s, b), copies, strict=True):
            assert torch.equal(t, c)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy sees NaN
@pytest.mark.parametrize("name", ["clip", "siglip"])
@pytest.mark.parametrize("poison", ["nan_feature", "inf_feature", "nan_scale"])
def test_non_finite_inputs_give_non_finite_loss(name, poison, device, backend):
    n, d = 40, 24
    x, y = features(n, d, torch.float32, device), features(n, d, torch.float32, device)
    s = torch.tensor(10.0, device=device)
    if poison == "nan_feature":
        x[3, 5] = float("nan")
    elif poison == "inf_feature":
        y[7, 2] = float("inf")
    else:
        s = torch.tensor(float("nan"), device=device)
    x, y = leaf(x), leaf(y)
    out, (gx, gy, *_) = run_loss(LOSSES[name][0], x, y, s, -1.0)
    assert not torch.isfinite(out).all()
    assert not (torch.isfinite(gx).all() and torch.isfinite(gy).all())


def test_siglip_fused_and_recomputed_paths_agree(device):
    """A scalar SigLIP loss with grads uses the fused forward; reduction='none' recomputes
    in backward. Both give the same gradients."""
    n, d = 64, 40
    x, y = features(n, d, torch.float32, device), features(n, d, torch.float32, device)
    s, b = torch.tensor(10.0, device=device), torch.tensor(-10.0, device=device)
    xa, ya = leaf(x), leaf(y)
    vlmkernels.siglip_loss(xa, ya, s, b).backward()
    xb, yb = leaf(x), leaf(y)
    (vlmkernels.siglip_loss(xb, yb, s, b, reduction="none").sum() / n).backward()
    assert rel_err(xa.grad, xb.grad) < 1e-6
    assert rel_err(ya.grad, yb.grad) < 1e-6
    with torch.no_grad():
        assert (
            rel_err(
                vlmkernels.siglip_loss(x, y, s, b),
                ref_siglip(*(t.double().cpu() for t in (x, y, s, b))),
            )
            < 1e-5
        )


def test_backends_agree(device):
    n, d = 64, 40
    x, y = features(n, d, torch.float32, device), features(n, d, torch.float32, device)
    for name, (fn, _) in LOSSES.items():
        with vlmkernels.use_backend("triton"):
            a = fn(x, y, 12.0, 0.5, reduction="none")
        with vlmkernels.use_backend("torch"):
            c = fn(x, y, 12.0, 0.5, reduction="none")
        assert rel_err(a, c) < 1e-6, name


# ------------------------------------------------------------------ bad input


def _bad_calls(device):
    x, y = features(8, 16, torch.float32, device), features(8, 16, torch.float32, device)
    return [
        ((x, features(9, 16, torch.float32, device), 1.0), ValueError, "same batch size"),
        ((x, features(8, 12, torch.float32, device), 1.0), ValueError, "same feature dim"),
        ((x, y.half(), 1.0), TypeError, "same dtype"),
        ((x, y.to("meta"), 1.0), ValueError, "same device"),
        ((x.long(), y.long(), 1.0), TypeError, "image_features must be a floating"),
        ((x, y.int(), 1.0), TypeError, "text_features must be a floating"),
        ((x[:0], y[:0], 1.0), ValueError, "batch size 0"),
        ((x[:, :0], y[:, :0], 1.0), ValueError, "feature dim 0"),
        ((x[0], y[0], 1.0), ValueError, "must be 2-D"),
        ((x.numpy() if device.type == "cpu" else 1, y, 1.0), TypeError, "torch.Tensor"),
        ((x, y, torch.ones(2)), ValueError, "logit_scale must be a scalar"),
        ((x, y, "10"), TypeError, "logit_scale must be a float"),
        ((x, y, torch.tensor(1)), TypeError, "logit_scale must be a floating"),
        ((x, y, 1.0, torch.ones(3)), ValueError, "logit_bias must be a scalar"),
        ((x, y, torch.tensor(1.0, device="meta")), ValueError, "logit_scale must be on .*meta"),
    ]


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_bad_input_errors(name, device):
    fn = LOSSES[name][0]
    for args, exc, message in _bad_calls(device):
        if name == "siglip" and len(args) == 3:
            args = (*args, None)
        with pytest.raises(exc, match=message):
            fn(*args)


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_bad_keyword_errors(name, device):
    fn = LOSSES[name][0]
    x, y = features(8, 16, torch.float32, device), features(8, 16, torch.float32, device)
    with pytest.raises(ValueError, match="reduction must be one of"):
        fn(x, y, 1.0, 0.0, reduction="avg")
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        fn(x, y, 1.0, 0.0, chunk_size=0)
    for wrong in (2.5, "64", True):  # a wrong type is a TypeError, as every argument's
        with pytest.raises(TypeError, match="chunk_size must be a positive int"):
            fn(x, y, 1.0, 0.0, chunk_size=wrong)


def test_ids_and_design_variable_errors(device, monkeypatch):
    """Bool ids (two huge classes, not ids) and meta ids are refused by name; a bad
    VLMKERNELS_CLIP_BACKWARD is refused by the forward of a loss that will need it, not
    only by its backward."""
    x, y = features(8, 16, torch.float32, device), leaf(features(8, 16, torch.float32, device))
    good = torch.arange(8, device=device)
    for fn in (vlmkernels.clip_loss, vlmkernels.contrastive_cross_entropy):
        pair = fn is vlmkernels.contrastive_cross_entropy
        name = "query_ids" if pair else "ids"

        def with_ids(ids, fn=fn, pair=pair):
            return fn(x, y, 10.0, **(dict(query_ids=ids, key_ids=good) if pair else dict(ids=ids)))

        with pytest.raises(TypeError, match=f"{name} must be an integer tensor, got torch.bool"):
            with_ids(good % 2 == 0)
        with pytest.raises(ValueError, match=f"{name} must be on .*meta"):
            with_ids(torch.arange(8, device="meta"))
        monkeypatch.setenv("VLMKERNELS_CLIP_BACKWARD", "fastest")
        with pytest.raises(ValueError, match="VLMKERNELS_CLIP_BACKWARD='fastest'"):
            fn(x, y, 10.0)
        with torch.no_grad():  # no backward to run: not consulted
            fn(x, y, 10.0)
        monkeypatch.delenv("VLMKERNELS_CLIP_BACKWARD")


@pytest.mark.parametrize("frozen", ["image", "text"])
@pytest.mark.parametrize("negative_only", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_siglip_with_a_frozen_tower(frozen, negative_only, chunk_size, device, backend,
                                    monkeypatch):  # fmt: skip
    """LiT: one side needs no gradient. The summed SigLIP loss is symmetric in the two
    sides, so the frozen one goes second and the fused pass skips its gradient product,
    in one pass or chunk by chunk; loss and gradients are the formula's."""
    n, d = 11, 16
    x, y = features(n, d, torch.float32, device), features(n, d, torch.float32, device)
    x, y = (x, leaf(y)) if frozen == "image" else (leaf(x), y)
    s, b = leaf(torch.tensor(9.0, device=device)), leaf(torch.tensor(-4.0, device=device))
    asked = []
    whole = C._siglip_fused_whole
    monkeypatch.setattr(C, "_siglip_fused_whole", lambda *a: asked.append(a[-1]) or whole(*a))
    general = spy_general_grads(monkeypatch, "siglip")
    loss = vlmkernels.siglip_loss(x, y, s, b, negative_only=negative_only, chunk_size=chunk_size)
    xr, yr, sr, br = (t.detach().double().cpu().requires_grad_(t.requires_grad)
                      for t in (x, y, s, b))  # fmt: skip
    logits = sr * xr @ yr.T + br
    z = -torch.ones(n, n, dtype=torch.float64) if negative_only else 2 * torch.eye(n) - 1
    ref = -F.logsigmoid(z * logits).sum() / n
    assert rel_err(loss, ref) < 1e-5
    trained = [t for t in (x, y, s, b) if t.requires_grad]
    ref_trained = [t for t in (xr, yr, sr, br) if t.requires_grad]
    for got, want in zip(torch.autograd.grad(loss, trained),
                         torch.autograd.grad(ref, ref_trained), strict=True):  # fmt: skip
        assert rel_err(got, want, floor=1e-2) < 1e-5  # the bias gradient sums to near 0
    if backend == "triton":
        assert asked == [False]  # the frozen side second, its gradient not computed
    if backend == "torch" or chunk_size:  # the general pass: no dy product either
        assert general == [(False, None)]
    else:
        assert general == []


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_per_sample_losses_with_frozen_text(name, device, backend, monkeypatch):
    """reduction="none" with the text features frozen: the per-sample ops' backward skips
    dy's product (G^T x); values and the other gradients are the formula's."""
    n, d = 11, 16
    x, y = leaf(features(n, d, torch.float32, device)), features(n, d, torch.float32, device)
    s, b = leaf(torch.tensor(9.0, device=device)), leaf(torch.tensor(-2.0, device=device))
    general = spy_general_grads(monkeypatch, name)
    upstream = torch.rand(n, device=device)
    check_against_reference(name, x, y, s, b, reduction="none", upstream=upstream)
    assert general == [(False, None)]


@pytest.mark.parametrize("chunk_size", [None, 16])
def test_siglip_fp16_gradients_are_rounded_after_the_loss_scale(chunk_size, device, backend):
    """fp16 features whose gradients lie in fp16's subnormal range (below 6e-5, as a mean
    over a large batch gives): SigLIP computes them in the forward pass, and a GradScaler's
    loss scale must lift them before they are rounded to fp16, as in eager autograd. Each
    entry is then within fp16 rounding of the float64 gradient (stored unscaled in fp16,
    entries of 3e-6 are off by up to 1%)."""
    n, d, loss_scale = 48, 32, 2.0**12
    x, y = (features(n, d, torch.float16, device, scale=1e-3) for _ in range(2))
    s, b = torch.tensor(10.0, device=device), torch.tensor(-10.0, device=device)
    xa, ya = leaf(x), leaf(y)
    loss = vlmkernels.siglip_loss(xa, ya, s, b, chunk_size=chunk_size)
    (loss.float() * loss_scale).backward()
    xr, yr = (t.detach().double().cpu().requires_grad_() for t in (x, y))
    ref_siglip(xr, yr, s.double().cpu(), b.double().cpu()).backward()
    assert (xr.grad.abs() < 6e-5).float().mean() > 0.9  # subnormal in fp16
    for got, want in ((xa.grad, xr.grad), (ya.grad, yr.grad)):
        assert got.dtype == torch.float16
        err = (got.double().cpu() / loss_scale - want).abs() / want.abs()
        assert err.max() < 2e-3, err.max()


@pytest.mark.parametrize("chunk_size", [None, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_siglip_scale_gradient_where_the_bias_dominates(chunk_size, dtype, device, backend):
    """|b| >> |s x.y| (small features or scale against SigLIP's b = -10): the kernels'
    sum(g S) - b sum(g) cancels, and the scale's gradient comes from sum(g x.y) instead
    (the cancelled form was off by 2e-3 here). Within 1e-5 (fp32) or fp16 rounding of
    float64 on the same inputs."""
    n, d = 48, 64
    x, y = (features(n, d, dtype, device, scale=0.03) for _ in range(2))
    s, b = leaf(torch.tensor(1.0, device=device)), torch.tensor(-10.0, device=device)
    loss = vlmkernels.siglip_loss(leaf(x), y, s, b, chunk_size=chunk_size)
    (got,) = torch.autograd.grad(loss, s)
    sr = leaf(s.detach().double().cpu())
    (want,) = torch.autograd.grad(ref_siglip(x.double().cpu(), y.double().cpu(), sr,
                                             b.double().cpu()), sr)  # fmt: skip
    assert rel_err(got, want) < (1e-5 if dtype == torch.float32 else 2e-4)


def test_siglip_bias_is_required_argument(device):
    x, y = features(8, 16, torch.float32, device), features(8, 16, torch.float32, device)
    with pytest.raises(TypeError):
        vlmkernels.siglip_loss(x, y, 1.0)


# ------------------------------------------------------------------ memory: no N x N tensor


class _AllocationRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Largest tensor (in elements) produced by any aten op run under it; the Triton
    interpreter's own byte-view copies of kernel arguments (set_/copy_) are not counted."""

    IGNORED = {"aten::set_", "aten::copy_"}

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._schema.name in self.IGNORED:
            return out
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_triton_path_never_allocates_n_by_n(device):
    """Every tensor the Triton launchers allocate is O(N (d + chunk)), not O(N^2)."""
    n, d, chunk = 160, 24, 32
    x, y = features(n, d, torch.float32, device), features(n, d, torch.float32, device)
    s, b = torch.tensor(10.0, device=device), torch.tensor(-1.0, device=device)
    grads = torch.rand(2, n, device=device)
    targets = C.Targets()
    with _AllocationRecorder() as rec:
        rows, cols = C._block_stats_triton(x, y, s, b, targets)
        row_coef = rows.coefficients(targets, n, grads[0], None)
        col_coef = cols.coefficients(targets, n, grads[1], None)
        C._block_grads_triton(x, y, s, b, targets, row_coef, col_coef, chunk)
        C._siglip_rows_triton(x, y, s, b)
        C._siglip_grads_triton(x, y, s, b, grads[0], chunk)
    assert rec.largest <= max(n * d, n * chunk, 16 * n)
    assert rec.largest < n * n // 4


def test_triton_chunk_rows_keep_the_dy_product_compute_bound():
    """Default chunks: 128 MiB of rows, never under 2048 rows (dY's product would fall
    under the GEMM ridge point), never over the block; an explicit chunk_size as given."""
    from vlmkernels.ops.contrastive.chunked import MIN_TRITON_CHUNK_ROWS, triton_chunk_rows

    def rows(n, dtype=torch.bfloat16, chunk_size=0):
        return triton_chunk_rows(torch.empty((n, 8), dtype=dtype, device="meta"), chunk_size)

    assert MIN_TRITON_CHUNK_ROWS == 2048
    assert rows(65536) == 2048  # 256 MiB: 128 MiB would be 1024 rows
    assert rows(262144, torch.float32) == 2048
    assert rows(16384) == 4096  # 128 MiB
    assert rows(1000) == 1000
    assert rows(65536, chunk_size=300) == 300


# ------------------------------------------------------------------ op registration


def _op_inputs(device, bias=True):
    n, d = 40, 24
    x, y = leaf(features(n, d, torch.float32, device)), leaf(features(n, d, torch.float32, device))
    s = leaf(torch.tensor(8.0, device=device))
    b = leaf(torch.tensor(-2.0, device=device)) if bias else None
    return x, y, s, b


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(bias, device, backend):
    x, y, s, b = _op_inputs(device, bias)
    n = x.shape[0]
    ops = torch.ops.vlmkernels
    ce = (None, None, None, None, None, None, 0, 0.0, 0.0, True, True, 0)
    torch.library.opcheck(ops.contrastive_ce_forward, (x, y, s, b, *ce))
    # the losses are differentiable results, the states what the backward reads
    out = ops.contrastive_ce_forward(x, y, s, b, *ce)
    assert [t.requires_grad for t in out] == [True, True, False, False]
    torch.library.opcheck(ops.siglip_loss_forward, (x, y, s, b, 0, 0))
    torch.library.opcheck(ops.siglip_loss_fused, (x, y, s, b, 1.0 / n, 0, 0, True))
    y_frozen = y.detach()
    torch.library.opcheck(ops.siglip_loss_fused, (x, y_frozen, s, b, 1.0 / n, 0, 0, False))
    assert ops.siglip_loss_fused(x, y_frozen, s, b, 1.0 / n, 0, 0, False)[2] is None
    # the backward ops are not differentiable themselves (no double backward)
    x, y, s = x.detach(), y.detach(), s.detach()
    b = b.detach() if b is not None else None
    _, _, row_state, col_state = ops.contrastive_ce_forward(x, y, s, b, *ce)
    upstream = torch.rand(2, n, device=device)
    for y_grad in (True, False):  # without y_grad: no dy (no G^T x), the rest unchanged
        ce_args = (x, y, s, b, *ce, row_state, col_state, *upstream, y_grad)
        torch.library.opcheck(ops.contrastive_ce_backward, ce_args)
        siglip_args = (x, y, s, b, upstream[0], 16, 0, y_grad)
        torch.library.opcheck(ops.siglip_loss_backward, siglip_args)
        for op, args in ((ops.contrastive_ce_backward, ce_args),
                         (ops.siglip_loss_backward, siglip_args)):  # fmt: skip
            got, full = op(*args), op(*args[:-1], True)
            assert (got[1] is not None) == y_grad
            for g, w in zip(got, full, strict=True):
                assert g is None or torch.equal(g, w)


@pytest.mark.parametrize("name", ["clip", "siglip"])
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(name, compiler, device):
    fn = LOSSES[name][0]
    x, y, _, b = _op_inputs(device)
    s = leaf(torch.tensor(math.log(14.0), device=device))  # a log-scale, as CLIP learns it

    def step(x, y, s, b, reduction="mean"):
        return fn(F.normalize(x, dim=-1), F.normalize(y, dim=-1), s.exp(), b, reduction=reduction)

    compiled = torch.compile(step, backend=compiler, fullgraph=True)
    out, grads = run_loss(compiled, x, y, s, b)
    ref_out, ref_grads = run_loss(step, leaf(x), leaf(y), leaf(s), leaf(b))
    # same op inside; Inductor reorders the fp32 normalisation around it
    assert rel_err(out, ref_out) < 1e-6
    for i, (g, rg) in enumerate(zip(grads, ref_grads, strict=True)):
        assert rel_err(g, rg, floor=1e-2 if i >= 2 else 0.0) < 1e-4


def test_mean_losses_compile_once_for_every_batch_size(device):
    """A mean's weight 1/N in an op's float argument fixed N in the traced graph (one
    compilation per batch size, and a hard failure after the recompile limit with
    fullgraph): traced, the ops take the sum's weight and the result is divided by N.
    Three batch sizes, one graph, each loss and gradient the eager one."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    calls = [
        lambda x, y: vlmkernels.clip_loss(x, y, 10.0),
        lambda x, y: vlmkernels.siglip_loss(x, y, 10.0, -10.0),
        lambda x, y: vlmkernels.contrastive_cross_entropy(x, y, 10.0),
    ]
    for call in calls:
        graphs.clear()
        compiled = torch.compile(call, backend=backend, fullgraph=True, dynamic=True)
        for n in (6, 9, 13):
            x, y = features(n, 16, torch.float32, device), features(n, 16, torch.float32, device)
            got, want = (leaf(x), leaf(y)), (leaf(x), leaf(y))
            out, ref = compiled(*got), call(*want)
            out.backward()
            ref.backward()
            assert rel_err(out, ref) < 1e-6
            assert rel_err(got[0].grad, want[0].grad) < 1e-5
        assert len(graphs) == 1, len(graphs)


def test_ops_live_in_vlmkernels_namespace():
    for op in (
        "contrastive_ce_forward",
        "contrastive_ce_backward",
        "siglip_loss_forward",
        "siglip_loss_backward",
        "siglip_loss_fused",
    ):
        assert hasattr(torch.ops.vlmkernels, op)


# ------------------------------------------------------------------ modules vs open_clip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_bias", [False, True])
def test_clip_module_matches_open_clip(dtype, with_bias, device, open_clip_loss):
    oc = open_clip_loss
    n, d = 52, 40
    x, y = features(n, d, dtype, device), features(n, d, dtype, device)
    log_scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float32, device=device)
    bias = torch.tensor(-1.5, device=device) if with_bias else None

    def run(module):
        xi, yi, ls = leaf(x), leaf(y), leaf(log_scale)
        bi = leaf(bias) if bias is not None else None
        out = module(xi, yi, ls.exp(), bi, output_dict=True)
        assert set(out) == {"contrastive_loss"}
        inputs = [t for t in (xi, yi, ls, bi) if t is not None]
        return out["contrastive_loss"], torch.autograd.grad(out["contrastive_loss"], inputs)

    ours, ours_g = run(vlmkernels.nn.ClipLoss())
    theirs, theirs_g = run(oc.ClipLoss())
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert ours.dtype == theirs.dtype
    assert rel_err(ours, theirs) < tol
    for a, c in zip(ours_g[:3], theirs_g[:3], strict=True):
        assert rel_err(a, c) < tol
    if with_bias:
        # CLIP's bias gradient is exactly 0; what is left is rounding: sum_j p_ij - 1 per row,
        # a few ulps of 1 from the probabilities recomputed in the backward kernel (here
        # 1.3e-7 under the interpreter, 1.1e-8 on the torch path, -2e-8 in open_clip),
        # weighted 1/N per row and direction; the earlier |ours - theirs| < 1e-7 was an
        # accident of one numpy's exp
        eps = torch.finfo(dtype).eps
        assert abs(ours_g[3].item()) < 16 * eps and abs(theirs_g[3].item()) < 16 * eps
    plain = vlmkernels.nn.ClipLoss()(x, y, log_scale.exp(), bias)
    assert plain.dim() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_siglip_module_matches_open_clip(dtype, device, open_clip_loss):
    oc = open_clip_loss
    n, d = 52, 40
    x, y = features(n, d, dtype, device), features(n, d, dtype, device)
    log_scale = torch.tensor(math.log(10.0), device=device)
    bias = torch.tensor(-10.0, device=device)

    def run(module):
        xi, yi, ls, bi = leaf(x), leaf(y), leaf(log_scale), leaf(bias)
        out = module(xi, yi, ls.exp(), bi, output_dict=True)["contrastive_loss"]
        return out, torch.autograd.grad(out, (xi, yi, ls, bi))

    ours, ours_g = run(vlmkernels.nn.SigLipLoss())
    theirs, theirs_g = run(oc.SigLipLoss())
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert rel_err(ours, theirs) < tol
    for a, c in zip(ours_g, theirs_g, strict=True):
        assert rel_err(a, c) < tol


def test_modules_logits_and_labels_match_open_clip(open_clip_loss):
    """get_logits and get_ground_truth, which training code calls for logging and
    evaluation, are open_clip's (values, dtypes, gradients)."""
    oc = open_clip_loss
    cpu = torch.device("cpu")
    x, y = features(6, 8, torch.float64, cpu), features(6, 8, torch.float64, cpu)
    for ours, theirs in ((vlmkernels.nn.ClipLoss(), oc.ClipLoss()),
                         (vlmkernels.nn.SigLipLoss(), oc.SigLipLoss())):  # fmt: skip
        for bias in (None, torch.tensor(-1.5, dtype=torch.float64)):
            xa, xb = leaf(x), leaf(x)
            a, b = ours.get_logits(xa, y, 10.0, bias), theirs.get_logits(xb, y, 10.0, bias)
            a, b = (a, b) if isinstance(a, tuple) else ((a,), (b,))
            assert len(a) == len(b)
            for u, v in zip(a, b, strict=True):
                assert u.dtype == v.dtype and rel_err(u, v) < 1e-12
            w = torch.rand(6, 6, dtype=torch.float64)
            sum((u * w).sum() for u in a).backward()
            sum((v * w).sum() for v in b).backward()
            assert rel_err(xa.grad, xb.grad) < 1e-12
    clip, clip_oc = vlmkernels.nn.ClipLoss(), oc.ClipLoss()
    assert torch.equal(clip.get_ground_truth("cpu", 5), clip_oc.get_ground_truth("cpu", 5))
    sig, sig_oc = vlmkernels.nn.SigLipLoss(), oc.SigLipLoss()
    for negative_only in (False, True):
        got = sig.get_ground_truth("cpu", torch.bfloat16, 5, negative_only)
        want = sig_oc.get_ground_truth("cpu", torch.bfloat16, 5, negative_only)
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_teacher_under_autocast_follows_the_features(device):
    """Under autocast a teacher given in the caller's dtype (fp32, like the features) is
    cast with them: the loss is the one of the bf16 inputs."""
    n, d = 12, 16
    x, y, tx, ty = (features(n, d, torch.float32, device) for _ in range(4))
    with torch.autocast(device.type, dtype=torch.bfloat16):
        ours = vlmkernels.clip_loss(x, y, 10.0, teacher=(tx, ty), alpha=0.4)
    assert ours.dtype == torch.float32
    exact = [t.bfloat16().double() for t in (x, y, tx, ty)]  # the bf16 inputs, in fp64
    expected = vlmkernels.clip_loss(*exact[:2], 10.0, teacher=tuple(exact[2:]), alpha=0.4)
    assert rel_err(ours, expected) < 1e-5
    with pytest.raises(ValueError, match="teacher"):  # still shaped like the features
        with torch.autocast(device.type, dtype=torch.bfloat16):
            vlmkernels.clip_loss(x, y, 10.0, teacher=(tx[:-1], ty), alpha=0.4)


@pytest.mark.parametrize("teacher", [False, True])
def test_contrastive_cross_entropy_under_autocast(teacher, device):
    """Under autocast fp32 queries and keys (and teacher features) are multiplied in the
    autocast dtype, as ALBEF's / BLIP's matmul is, and the loss is fp32; 16-bit features
    stay as they are."""
    m, n, d = 6, 15, 16
    q, k, tq, tk = (features(r, d, torch.float32, device) for r in (m, n, m, n))
    kw = dict(offset=3, label_smoothing=0.1)
    if teacher:
        kw.update(teacher_queries=tq, teacher_keys=tk, alpha=0.4)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        ours = vlmkernels.contrastive_cross_entropy(q, k, 10.0, **kw)
        low = vlmkernels.contrastive_cross_entropy(q.bfloat16(), k.bfloat16(), 10.0,
                                                   **(kw | ({"teacher_queries": tq.bfloat16(),
                                                              "teacher_keys": tk.bfloat16()}
                                                             if teacher else {})))  # fmt: skip
    assert ours.dtype == torch.float32 and low.dtype == torch.float32
    exact = dict(kw)
    if teacher:
        exact.update(teacher_queries=tq.bfloat16().double(), teacher_keys=tk.bfloat16().double())
    expected = vlmkernels.contrastive_cross_entropy(q.bfloat16().double(), k.bfloat16().double(),
                                                    10.0, **exact)  # fmt: skip
    assert rel_err(ours, expected) < 1e-5 and rel_err(low, expected) < 1e-5


def test_module_constructor_errors():
    """world_size > 1 is tested in test_distributed_modules.py (spawned gloo groups)."""
    with pytest.raises(ValueError, match="dist_impl"):
        vlmkernels.nn.SigLipLoss(dist_impl="ring")


@pytest.mark.parametrize("text_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_autocast_matches_open_clip_under_autocast(name, text_dtype, device, open_clip_loss):
    """Under autocast, fp32 features are multiplied in the autocast dtype (as open_clip's
    matmul is) and the loss comes back in fp32 (as its cross-entropy does). Text features
    already in bf16 (a bf16 tower beside an fp32 one) are taken as that matmul takes them,
    each gradient in its own feature's dtype; outside autocast two dtypes stay an error."""
    oc = open_clip_loss
    n, d = 48, 40
    x = leaf(features(n, d, torch.float32, device))
    y = leaf(features(n, d, torch.float32, device).to(text_dtype))
    s, b = torch.tensor(10.0, device=device), torch.tensor(-2.0, device=device)
    ours_mod = vlmkernels.nn.ClipLoss() if name == "clip" else vlmkernels.nn.SigLipLoss()
    theirs_mod = oc.ClipLoss() if name == "clip" else oc.SigLipLoss()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        ours = ours_mod(x, y, s, b)
        theirs = theirs_mod(x, y, s, b)
        queries = vlmkernels.contrastive_cross_entropy(x, y, s, b)
    assert ours.dtype == queries.dtype == torch.float32
    exact_on_bf16 = LOSSES[name][1](*(t.double().cpu() for t in (x.bfloat16(), y.bfloat16(), s, b)))
    assert rel_err(ours, exact_on_bf16) < 1e-5
    assert rel_err(ours, theirs) < 2e-2  # open_clip rounds its logits to bf16
    gx, gy = torch.autograd.grad(ours, (x, y))
    assert (gx.dtype, gy.dtype) == (torch.float32, text_dtype)
    if text_dtype != torch.float32:
        with pytest.raises(TypeError, match="same dtype, got torch.float32 and torch.bfloat16"):
            ours_mod(x, y, s, b)


def test_dtypes_under_autocast_and_of_the_gradcache_results(device):
    """float64 features under autocast keep a float64 loss (autocast leaves them alone, as
    open_clip's loss does); the *_with_grads results have the dtypes of clip_loss and its
    backward: fp32 features under bf16 autocast get fp32 gradients, bf16 features a bf16
    loss; chunk_size takes any integral."""
    n, d = 9, 16
    x64, y64 = features(n, d, torch.float64, device), features(n, d, torch.float64, device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        assert vlmkernels.clip_loss(x64, y64, 5.0).dtype == torch.float64
        assert vlmkernels.siglip_loss(x64, y64, 5.0, -1.0).dtype == torch.float64
    x, y = leaf(features(n, d, torch.float32, device)), leaf(features(n, d, torch.float32, device))
    for fn, extra in ((vlmkernels.clip_loss, ()), (vlmkernels.siglip_loss, (-1.0,))):
        grads_fn = {vlmkernels.clip_loss: vlmkernels.clip_loss_with_grads,
                    vlmkernels.siglip_loss: vlmkernels.siglip_loss_with_grads}[fn]  # fmt: skip
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = fn(x, y, 5.0, *extra)
            gx, gy = torch.autograd.grad(loss, (x, y))
            got = grads_fn(x, y, 5.0, *extra)
        assert [t.dtype for t in got[:3]] == [loss.dtype, gx.dtype, gy.dtype]
        xb, yb = x.detach().bfloat16(), y.detach().bfloat16()
        assert grads_fn(xb, yb, 5.0, *extra)[0].dtype == fn(xb, yb, 5.0, *extra).dtype
    numpy = pytest.importorskip("numpy")
    assert torch.allclose(vlmkernels.clip_loss(x, y, 5.0, chunk_size=numpy.int64(4)),
                          vlmkernels.clip_loss(x, y, 5.0, chunk_size=4))  # fmt: skip


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_with_grads_compile_once_for_every_batch_size(name, device):
    """clip_loss_with_grads / siglip_loss_with_grads passed the mean's 1/N as the ops'
    float argument: traced, one graph per batch size (and a hard failure after the
    recompile limit with fullgraph), as the losses themselves did before. One graph for
    three sizes, each result the eager one."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    def call(x, y):
        if name == "clip":
            return vlmkernels.clip_loss_with_grads(x, y, 10.0)
        return vlmkernels.siglip_loss_with_grads(x, y, 10.0, -10.0)

    torch._dynamo.reset()
    compiled = torch.compile(call, backend=backend, fullgraph=True, dynamic=True)
    for n in (6, 9, 13):
        x, y = features(n, 16, torch.float32, device), features(n, 16, torch.float32, device)
        for got, want in zip(compiled(x, y), call(x, y), strict=True):
            assert (got is None) == (want is None)
            assert got is None or rel_err(got, want) < 1e-5
    assert len(graphs) == 1, len(graphs)

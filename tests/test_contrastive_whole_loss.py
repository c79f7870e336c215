"""The whole-loss path (``vlmkernels.ops.contrastive.whole_loss`` and ``.whole_targets``) with
the default targets: a mean or sum CLIP loss (and one direction, ALBEF's without
distillation), and the fused SigLIP loss, in prepared launches with the host's finishing
arithmetic in Triton kernels (the other targets: ``test_contrastive_whole_targets.py``).

Checked here: that the path is taken where it applies (and not elsewhere), that it agrees
with float64 math and with the general launchers it replaces (the fallbacks: more than
one chunk of rows, the fused backward design, a tuner recording launches), with one and
with several finishing programs (the interpreter's blocks are 32 samples and 8 rows), and
opcheck of its ops. The values and gradients of every public form are also covered by
``test_contrastive.py``, which runs through this path.
"""

import pytest
import torch
import torch.nn.functional as F
from test_contrastive import check_against_reference, features, leaf, rel_err

import vlmkernels
from vlmkernels.core import tuning
from vlmkernels.kernels.blocks import TILE_ROWS_MAX
from vlmkernels.ops.contrastive import finalize, whole_loss, whole_targets
from vlmkernels.ops.contrastive import ops as C


@pytest.fixture
def calls(monkeypatch):
    """Counts the whole-loss path's calls that returned a result, per function: the
    cross-entropy's forward and backward (:mod:`~vlmkernels.ops.contrastive.whole_targets`,
    which the default targets take too) and the fused SigLIP loss."""
    counts = {"ce_forward": 0, "ce_backward": 0, "siglip_fused": 0}
    functions = {
        "ce_forward": ("_ce_targets_forward_whole", whole_targets.ce_targets_forward),
        "ce_backward": ("_ce_targets_backward_whole", whole_targets.ce_targets_backward),
        "siglip_fused": ("_siglip_fused_whole", whole_loss.siglip_fused),
    }

    def counting(name):
        attr, fn = functions[name]

        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            counts[name] += out is not None
            return out

        monkeypatch.setattr(C, attr, wrapped)

    for name in counts:
        counting(name)
    return counts


def _inputs(n, d, dtype, device, bias=True):
    x, y = leaf(features(n, d, dtype, device)), leaf(features(n, d, dtype, device))
    s = leaf(torch.tensor(7.0, device=device))
    b = leaf(torch.tensor(-1.5, device=device)) if bias else None
    return x, y, s, b


@pytest.mark.parametrize("name", ["clip", "siglip"])
@pytest.mark.parametrize(
    "n,d,dtype,bias,reduction",
    [
        (5, 24, torch.float32, True, "mean"),  # one finishing program
        (45, 33, torch.float32, False, "sum"),  # several (finishing rows of 8, parts of 32)
        (37, 40, torch.bfloat16, True, "mean"),
        (21, 16, torch.float16, True, "sum"),
    ],
)
def test_whole_loss_path_matches_float64(name, n, d, dtype, bias, reduction, device, calls):
    x, y, s, b = _inputs(n, d, dtype, device, bias)
    with vlmkernels.use_backend("triton"):
        check_against_reference(name, x, y, s, b, reduction)
    if name == "clip":
        assert calls["ce_forward"] == 1 and calls["ce_backward"] == 1
    else:
        assert calls["siglip_fused"] == 1


def _grads(fn, x, y, s, b, **kw):
    x, y, s = leaf(x), leaf(y), leaf(s)
    b = leaf(b) if b is not None else None
    loss = fn(x, y, s, b, **kw)
    loss.backward()
    return [loss] + [t.grad for t in (x, y, s, b) if t is not None]


@pytest.mark.parametrize("fallback", ["chunked", "fused_design", "recording"])
def test_fallbacks_agree_with_the_whole_loss_path(fallback, device, calls, monkeypatch):
    x, y, s, b = _inputs(29, 20, torch.float32, device)
    with vlmkernels.use_backend("triton"):
        whole = _grads(vlmkernels.clip_loss, x, y, s, b)
        whole_sig = _grads(vlmkernels.siglip_loss, x, y, s, b)
        assert calls == {"ce_forward": 1, "ce_backward": 1, "siglip_fused": 1}
        kw = {}
        if fallback == "chunked":
            kw = dict(chunk_size=8)  # four chunks of rows: the general launchers
        elif fallback == "fused_design":
            monkeypatch.setenv("VLMKERNELS_CLIP_BACKWARD", "fused")
        else:  # launches that cannot be prepared: as while `vlmkernels tune` records
            monkeypatch.setattr(tuning, "_RECORDING", [])
            whole_loss._PLANS.clear()  # the cache of every whole-loss plan
        general = _grads(vlmkernels.clip_loss, x, y, s, b, **kw)
        general_sig = _grads(vlmkernels.siglip_loss, x, y, s, b, **kw)
    expected = {
        "chunked": {"ce_forward": 2, "ce_backward": 1, "siglip_fused": 1},
        "fused_design": {"ce_forward": 2, "ce_backward": 1, "siglip_fused": 2},
        "recording": {"ce_forward": 1, "ce_backward": 1, "siglip_fused": 1},
    }[fallback]
    assert calls == expected
    # CLIP's bias gradient is 0 up to rounding: sum_j p_ij - 1 per row, a few ulps of 1
    # whichever path sums it (1.2e-7 against 0 under torch 2.15)
    assert abs(general[4] - whole[4]) < 8 * torch.finfo(torch.float32).eps
    for got, want in zip(general[:4] + general_sig, whole[:4] + whole_sig, strict=True):
        assert rel_err(got, want, floor=1e-2) < 1e-5


def test_several_parts_programs_sum_the_loss(device):
    """N over the parts kernel's block: per-program partials, then _sum_parts_kernel."""
    n = 2 * finalize.PARTS_BLOCK + 3
    x, y, s, _ = _inputs(n, 8, torch.float32, device, bias=False)
    with vlmkernels.use_backend("triton"):
        check_against_reference("clip", x, y, s, None, "mean")


@pytest.mark.parametrize("m,n,offset,cols", [(11, 11, 0, True), (7, 19, 5, False)])
def test_reduced_ops_opcheck(m, n, offset, cols, device):
    x, y, s, b = (t.detach() for t in _inputs(m, 24, torch.float32, device))
    y = features(n, 24, torch.float32, device)
    ops = torch.ops.vlmkernels
    options = (1 / m, offset, cols, 0)
    with vlmkernels.use_backend("triton"):
        torch.library.opcheck(ops.contrastive_ce_reduced, (leaf(x), leaf(y), leaf(s), leaf(b),
                                                           *options))  # fmt: skip
        _, coef = ops.contrastive_ce_reduced(x, y, s, b, *options)
        assert coef.shape == (1 + cols, 6, m)
        # the coefficients are the backward's, not a differentiable result; the loss is
        loss, graded = ops.contrastive_ce_reduced(leaf(x), leaf(y), leaf(s), leaf(b), *options)
        assert loss.requires_grad and not graded.requires_grad
        grad = torch.tensor(1.7, device=device)
        both = ops.contrastive_ce_reduced_backward(x, y, s, b, coef, grad, 1 / m, offset, 0, True)
        for y_grad in (True, False):
            args = (x, y, s, b, coef, grad, 1 / m, offset, 0, y_grad)
            torch.library.opcheck(ops.contrastive_ce_reduced_backward, args)
        # without y_grad: no dy (no G^T x), the other gradients unchanged
        dx, dy, ds, db = ops.contrastive_ce_reduced_backward(*args)
        assert dy is None and both[1].shape == y.shape
        for got, want in zip((dx, ds, db), (both[0], *both[2:]), strict=True):
            assert rel_err(got, want, floor=1e-2) < 1e-6


def _ref_one_direction(q, k, s, b, offset, reduction):
    logits = s * q @ k.T + (b if b is not None else 0.0)
    labels = torch.arange(q.shape[0]) + offset
    return F.cross_entropy(logits, labels, reduction=reduction)


@pytest.mark.parametrize(
    "m,n,offset,dtype,reduction",
    [(9, 9, 0, torch.float32, "mean"), (13, 57, 0, torch.float32, "sum"),
     (12, 41, 20, torch.bfloat16, "mean"), (10, 40, 30, torch.float32, "mean")],
)  # fmt: skip
def test_one_direction_matches_float64(m, n, offset, dtype, reduction, device, calls):
    """ALBEF's / BLIP's form without distillation or ids: queries (M, d) against in-batch
    keys plus a queue (N >= M + offset), the positive of query i at key i + offset."""
    q, _, s, b = _inputs(m, 24, dtype, device)
    k = leaf(features(n, 24, dtype, device))
    with vlmkernels.use_backend("triton"):
        out = vlmkernels.contrastive_cross_entropy(q, k, s, b, offset=offset,
                                                   reduction=reduction)  # fmt: skip
        out.backward()
    assert calls["ce_forward"] == 1 and calls["ce_backward"] == 1
    ref = [t.detach().double().requires_grad_() for t in (q, k, s, b)]
    expected = _ref_one_direction(*ref, offset, reduction)
    expected.backward()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert out.dtype == dtype
    assert rel_err(out, expected) < tol
    weight = 1.0 if reduction == "mean" else float(m)
    for got, want, floor in zip((q.grad, k.grad, s.grad, b.grad), (t.grad for t in ref),
                                (0.0, 0.0, 0.1 * weight, 0.1 * weight), strict=True):  # fmt: skip
        assert rel_err(got, want, floor) < (tol if floor == 0.0 else 1e-4)


def test_one_direction_without_a_positive_for_every_query_takes_the_general_path(device, calls):
    """Queries whose key i + offset is outside the keys have no target (NaN losses): the
    general launchers handle them, as documented."""
    q, _, s, _ = _inputs(6, 16, torch.float32, device, bias=False)
    k = leaf(features(8, 16, torch.float32, device))
    with vlmkernels.use_backend("triton"):
        losses = vlmkernels.contrastive_cross_entropy(q, k, s, offset=4, reduction="none")
        mean = vlmkernels.contrastive_cross_entropy(q, k, s, offset=4)
    assert calls["ce_forward"] == 0
    assert torch.isnan(losses[4:]).all() and torch.isfinite(losses[:4]).all()
    assert torch.isnan(mean)


def test_upstream_gradient_scales_every_gradient(device):
    """The upstream gradient reaches the kernels as a tensor (no host read): 2.5 x loss
    gives 2.5 x each gradient."""
    x, y, s, b = _inputs(13, 16, torch.float32, device)
    with vlmkernels.use_backend("triton"):
        base = _grads(vlmkernels.clip_loss, x, y, s, b)
        scaled = _grads(lambda *a: 2.5 * vlmkernels.clip_loss(*a), x, y, s, b)
    for got, want in zip(scaled[1:], base[1:], strict=True):
        assert rel_err(got, 2.5 * want, floor=1e-3) < 1e-6


def test_siglip_rows_far_apart_are_copied_per_call(device, calls, monkeypatch):
    """Rows 2^23 elements apart: offsets inside a tile would pass 32 bits, so the fused
    SigLIP path copies such features (tile_addressable); its plan, keyed on the caller's
    layout, remembers that, and a call served by the cached plan copies too. A contiguous
    call copies nothing."""
    n, d = 3, 16
    stride = 2**31 // TILE_ROWS_MAX + 1
    far = torch.zeros(2 * stride + d, device=device).as_strided((n, d), (stride, 1))
    far.copy_(features(n, d, torch.float32, device))
    keys = leaf(features(n, d, torch.float32, device))
    copies = []
    real = whole_loss.tile_addressable

    def spy(t):
        out = real(t)
        copies.append(out is not t)
        return out

    monkeypatch.setattr(whole_loss, "tile_addressable", spy)
    with vlmkernels.use_backend("triton"):
        for call in range(2):
            copies.clear()
            x = far.requires_grad_()
            x.grad = keys.grad = None
            loss = vlmkernels.siglip_loss(x, keys, 9.0, -3.0)
            loss.backward()
            if call:  # the cached plan: one copy of the far tensor, none of the keys
                assert copies == [True, False]
            got = loss.detach(), x.grad, keys.grad
            near = leaf(far.detach().contiguous())
            keys.grad = None
            copies.clear()
            want = vlmkernels.siglip_loss(near, keys, 9.0, -3.0)
            want.backward()
            if call:
                assert copies == []
            for a, b in zip(got, (want, near.grad, keys.grad), strict=True):
                assert rel_err(a, b) < 1e-6
    assert calls["siglip_fused"] == 4

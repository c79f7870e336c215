"""Second-order gradients of the contrastive losses: not implemented, so they raise, at the
second backward, never silently 0.

For every loss (the functions and the open_clip-compatible modules, both backends): a first
backward with ``create_graph=True`` still gives the exact first-order gradients (float64
formula, 1e-5 relative); they carry a graph node, so differentiating them (alone, or inside
an objective that also has differentiable terms, where a missing node would silently drop
their part) raises NotImplementedError naming the loss. The float64 formula's second
derivative checked here is far from 0: a silent 0 is wrong. The ring mode and the
distributed modules are checked in test_distributed_ring.py / test_distributed_modules.py.
"""

import pytest
import torch
import torch.nn.functional as F

import vlmkernels

BACKENDS = ["triton", "torch"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    with vlmkernels.use_backend(request.param):
        yield request.param


def _clip(x, y, s, b):
    logits = s * x @ y.T + b
    labels = torch.arange(x.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def _siglip(x, y, s, b):
    logits = s * x @ y.T + b
    z = 2 * torch.eye(x.shape[0], dtype=logits.dtype) - 1
    return -F.logsigmoid(z * logits).sum() / x.shape[0]


def _ce(x, y, s, b):
    return F.cross_entropy(s * x @ y.T + b, torch.arange(x.shape[0]))


# name: (the loss as called, the float64 formula, the name its error carries)
LOSSES = {
    "clip_loss": (lambda *a: vlmkernels.clip_loss(*a), _clip, "clip_loss"),
    "clip_loss_none": (
        lambda *a: vlmkernels.clip_loss(*a, reduction="none").mean(),
        _clip,
        "clip_loss",
    ),
    "contrastive_cross_entropy": (
        lambda *a: vlmkernels.contrastive_cross_entropy(*a),
        _ce,
        "contrastive_cross_entropy",
    ),
    "siglip_loss": (lambda *a: vlmkernels.siglip_loss(*a), _siglip, "siglip_loss"),
    "siglip_loss_none": (
        lambda *a: vlmkernels.siglip_loss(*a, reduction="none").sum() / a[0].shape[0],
        _siglip,
        "siglip_loss",
    ),
    "nn.ClipLoss": (lambda *a: vlmkernels.nn.ClipLoss()(*a), _clip, "clip_loss"),
    "nn.SigLipLoss": (lambda *a: vlmkernels.nn.SigLipLoss()(*a), _siglip, "siglip_loss"),
}


def _inputs(device, dtype=torch.float32):
    g = torch.Generator().manual_seed(11)
    n, d = 37, 24
    x = F.normalize(torch.randn(n, d, generator=g), dim=1)
    y = F.normalize(torch.randn(n, d, generator=g), dim=1)
    s, b = torch.tensor(7.0), torch.tensor(-1.5)
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in (x, y, s, b)]


def rel(a, b, floor=0.0):
    """||a - b|| / max(||b||, floor)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / max(b.norm().item(), floor)).item()


@pytest.mark.parametrize("name", list(LOSSES))
def test_second_order_raises_first_order_exact(name, device, backend):
    fn, formula, op = LOSSES[name]
    x, y, s, b = _inputs(device)
    gx, gy, gs, gb = torch.autograd.grad(fn(x, y, s, b), [x, y, s, b], create_graph=True)
    ref_in = [t.detach().double().cpu().requires_grad_() for t in (x, y, s, b)]
    ref = torch.autograd.grad(formula(*ref_in), ref_in, create_graph=True)
    for got, want in zip((gx, gy, gs, gb), ref, strict=True):
        # CLIP's bias gradient is 0 in exact arithmetic: compare it to the loss's weight
        assert rel(got, want, floor=0.1 if got.dim() == 0 else 0.0) < 1e-5
    second = torch.autograd.grad(ref[0].sum(), ref_in[2])[0]
    assert abs(second.item()) > 1e-2  # what a silent 0 would get wrong
    assert gx.requires_grad and gs.requires_grad
    message = f"{op}.*second-order gradients"
    with pytest.raises(NotImplementedError, match=message):
        torch.autograd.grad(gx.sum(), s)
    # next to a differentiable term, the gradient's part is not silently dropped
    with pytest.raises(NotImplementedError, match=message):
        torch.autograd.grad((gx * gx).sum() + (s * s).sum(), s)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("name", ["clip_loss", "siglip_loss"])
def test_backward_create_graph_then_backward_raises(name, device, backend):
    """``loss.backward(create_graph=True)`` works (first-order .grad as without it); a
    backward through the .grad it left raises."""
    fn, _, op = LOSSES[name]
    x, y, s, b = _inputs(device)
    fn(x, y, s, b).backward()
    plain = x.grad.clone()
    x.grad = None
    fn(x, y, s, b).backward(create_graph=True)
    torch.testing.assert_close(x.grad.detach(), plain, rtol=0, atol=0)
    with pytest.raises(NotImplementedError, match=f"{op}.*second-order"):
        (x.grad * x.grad).sum().backward()
    for t in (x, y, s, b):
        t.grad = None  # the graph create_graph left in .grad refers back to the leaves

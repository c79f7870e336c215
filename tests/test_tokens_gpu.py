"""The token kernels at model sizes on a GPU (compiled Triton, tensor cores): ToMe at a
LLaVA/CLIP-L layer (577 tokens with the class token, 1024 channels), the selection of a
quarter of the tokens, LLaVA-OneVision's 27 x 27 -> 14 x 14 pooling at 3584 channels;
against the float64 references of tests/test_tokens.py. Skipped without CUDA."""

import pytest
import torch
from test_tokens import close, ref_pool, ref_select, ref_tome

from vlmkernels.ops import tokens as T

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("class_token, n", [(True, 577), (False, 576)])
def test_tome_model_size(dtype, class_token, n):
    B, C, r = 4, 1024, 96
    x = torch.randn(B, n, C, device="cuda").to(dtype).requires_grad_()
    metric = torch.randn(B, n, C, device="cuda").to(dtype)
    size = torch.randint(1, 4, (B, n, 1), device="cuda").to(dtype).requires_grad_()
    out, sizes, source = T.tome_merge(x, metric, r, size=size, class_token=class_token)
    x64 = x.detach().cpu().double().requires_grad_()
    s64 = size.detach().cpu().double().requires_grad_()
    ref_out, ref_sizes, ref_source = ref_tome(x64, metric.cpu(), r, s64, class_token)
    assert torch.equal(source.cpu(), ref_source)
    close(out, ref_out, dtype, "merged")
    close(sizes, ref_sizes, dtype, "sizes")
    g, gs = torch.randn_like(out), torch.randn_like(sizes)
    torch.autograd.backward((out, sizes), (g, gs))
    torch.autograd.backward((ref_out, ref_sizes), (g.cpu().double(), gs.cpu().double()))
    close(x.grad, x64.grad, dtype, "dx")
    close(size.grad, s64.grad, dtype, "dsize")


def test_tome_issue_shape_runs():
    """B 256, N 576, C 1024, r 16 (the benchmark's shape): shapes, sizes add up."""
    x = torch.randn(256, 576, 1024, device="cuda", dtype=torch.bfloat16)
    out, sizes, source = T.tome_merge(x, x, 16)
    assert out.shape == (256, 560, 1024) and torch.equal(
        sizes.float().sum(1), torch.full((256, 1), 576.0, device="cuda")
    )
    assert source.max() == 559 and out.isfinite().all()


def test_select_model_size():
    B, N, C, keep = 8, 576, 4096, 144
    x = torch.randn(B, N, C, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    scores = torch.randn(B, N, device="cuda")
    out, idx = T.select_tokens(x, scores, keep)
    assert torch.equal(idx.cpu(), ref_select(scores.cpu(), keep))
    assert torch.equal(out, x.detach().gather(1, idx[..., None].expand(-1, -1, C)))
    out.backward(torch.ones_like(out))
    assert x.grad.float().sum().item() == B * keep * C


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_pool_llava_onevision_size(dtype):
    x = torch.randn(32, 27 * 27, 3584, device="cuda").to(dtype).requires_grad_()
    out = T.pool_tokens(x, (27, 27), "bilinear")
    x64 = x.detach().cpu().double().requires_grad_()
    ref = ref_pool(x64, (27, 27), (14, 14))
    close(out, ref, dtype, "bilinear")
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g.cpu().double())
    close(x.grad, x64.grad, dtype, "bilinear grad")


@pytest.mark.parametrize(
    "class_token, n, r", [(False, 576, 16), (True, 577, 288), (False, 4097, 1)]
)
def test_tome_plan_compiled_matches_sorts(class_token, n, r):
    """The compiled bookkeeping kernel (several 64-token blocks, up to 2049 A tokens) equals
    the PyTorch path's stable sorts bitwise on tie-heavy scores with -inf rows."""
    from vlmkernels.ops.tokens import kernels, reference

    na, nb = (n + 1) // 2, n // 2
    gen = torch.Generator(device="cuda").manual_seed(n + r)
    best = torch.randint(0, 7, (64, na), device="cuda", generator=gen).float() / 7
    best[::3, 1::5] = float("-inf")
    arg = torch.randint(0, nb, (64, na), device="cuda", generator=gen)
    if class_token:
        best[:, 0], arg[:, 0] = float("-inf"), 0
    got = kernels.tome_plan(best, arg, n, r, class_token)
    want = reference.tome_plan(best, arg, n, r, class_token)
    for name, g, w in zip(("source", "members", "offsets"), got, want, strict=True):
        assert torch.equal(g, w), name

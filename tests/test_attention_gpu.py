"""The attention kernels at model sizes on a CUDA GPU (skipped without one).

Reference: the PyTorch path of vlmkernels in float64 on the same GPU (itself checked against
dense-mask float64 formulas in test_attention.py). Tolerances (max abs error / max |ref|):
bf16 2e-2, fp16 5e-3, fp32 1e-5 (3xTF32 dots: plain TF32 would be ~1e-3 and fail).
"""

import pytest
import torch

import vlmkernels  # noqa: F401
from vlmkernels.core.backend import use_backend
from vlmkernels.ops import attention as A
from vlmkernels.ops.attention import launchers, ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-5}


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def reference(fn, *args, **kwargs):
    with use_backend("torch"):
        cast = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                for a in args]  # fmt: skip
        return fn(*cast, **kwargs)


def leaves(*shapes, dtype):
    return [torch.randn(*s, device="cuda", dtype=dtype).requires_grad_() for s in shapes]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("b,h,lq,lk,d", [(1, 16, 32, 4096, 64), (256, 12, 32, 257, 64),
                                          (2, 28, 64, 1000, 128)])  # fmt: skip
def test_few_query_cross_attention(dtype, b, h, lq, lk, d):
    """Q-Former, few-query (split-K at B x H = 16) and resampler shapes, with gradients."""
    q, k, v = leaves((b, h, lq, d), (b, h, lk, d), (b, h, lk, d), dtype=dtype)
    out = A.cross_attention(q, k, v)
    ref = reference(A.cross_attention, q, k, v)
    assert rel(out, ref) < TOL[dtype]
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    with use_backend("torch"):
        ref_grads = torch.autograd.grad(A.cross_attention(q64, k64, v64), (q64, k64, v64),
                                        g.double())  # fmt: skip
    for a, r in zip(grads, ref_grads, strict=True):
        assert rel(a, r) < 3 * TOL[dtype]


def test_split_k_matches_one_pass():
    q, k, v = (torch.randn(1, 8, n, 64, device="cuda", dtype=torch.bfloat16)
               for n in (32, 8192, 8192))  # fmt: skip
    assert launchers.choose_splits(8, 32, 8192, q.device) > 1
    args = (None, None, 32, 8192, None, None, None, False, 0.125)
    split, _ = ops.attention_core(q, k, v, *args, 0, None, None, 0.0, None)
    one, _ = ops.attention_core(q, k, v, *args, 1, None, None, 0.0, None)
    ref, _ = reference(ops.attention_core, q, k, v, *args, 0, None, None, 0.0, None)
    assert rel(split, ref) < 2e-2 and rel(one, ref) < 2e-2


def test_media_and_key_mass_at_flamingo_size():
    q = torch.randn(8, 8, 2048, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(8, 8, 320, 64, device="cuda", dtype=torch.bfloat16) for _ in "kv")
    loc = torch.zeros(8, 2048, dtype=torch.bool, device="cuda")
    loc[:, [100, 500, 900, 1300, 1700]] = True
    out = A.media_cross_attention(q, k, v, loc, 64)
    ref = reference(A.media_cross_attention, q, k, v, loc, 64)
    assert rel(out, ref) < 2e-2 and (out[:, :, :100] == 0).all()
    plain = A.attention(q, k, v, causal=True)
    out, mass = A.attention(q, k, v, causal=True, key_mass=-1)
    assert torch.equal(out, plain)
    _, ref_mass = reference(A.attention, q, k, v, causal=True, key_mass=-1)
    assert rel(mass, ref_mass) < 2e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("b,h,hk,lq,lk,d", [(1, 16, 4, 64, 1100, 96), (8, 12, 12, 577, 577, 64)])
def test_grouped_bias_gate_at_model_sizes(dtype, b, h, hk, lq, lk, d):
    """Idefics2's resampler (16 heads over 4 key/value heads, D 96) with a gate, and a ToMe
    layer (577 tokens, a log(size) key bias per key): values and every gradient (q, k, v,
    the bias, the gate) against the float64 PyTorch path."""
    q, k, v = leaves((b, h, lq, d), (b, hk, lk, d), (b, hk, lk, d), dtype=dtype)
    bias = torch.randint(1, 5, (b, lk), device="cuda").log().float().requires_grad_()
    gate = (torch.randn(1, device="cuda") * 0.5).requires_grad_()
    inputs = (q, k, v, bias, gate)

    def run(q, k, v, bias, gate):
        return A.cross_attention(q, k, v, key_bias=bias, gate=gate)

    out = run(*inputs)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, g)
    leaves64 = [t.detach().double().requires_grad_() for t in inputs]
    with use_backend("torch"):
        ref = run(*leaves64)
        ref_grads = torch.autograd.grad(ref, leaves64, g.double())
    assert rel(out, ref) < TOL[dtype]
    for a, r in zip(grads, ref_grads, strict=True):
        assert rel(a, r) < 3 * TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_grouped_query_causal_backward(dtype):
    """Grouped-query heads without a bias (Qwen2-VL's language model: 28 query heads over 4
    key/value heads, D 128, causal): the dK/dV kernel of grouped heads (16-bit) and the fp32
    one of a bias or groups, each with its own default config, against float64."""
    q, k, v = leaves((2, 28, 300, 128), (2, 4, 300, 128), (2, 4, 300, 128), dtype=dtype)
    out = A.attention(q, k, v, causal=True)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    with use_backend("torch"):
        ref = A.attention(*leaves64, causal=True)
        ref_grads = torch.autograd.grad(ref, leaves64, g.double())
    assert rel(out, ref) < TOL[dtype]
    for a, r in zip(grads, ref_grads, strict=True):
        assert rel(a, r) < 3 * TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("packed", [False, True])
def test_delta_kernel(dtype, packed):
    """The backward's row term at the Q-Former's training shape (B 256, 12 heads, 32
    queries, d 64; packed: the same rows as (T, H, D)), strided dO, with dlse and -inf rows,
    against float64 on the GPU; and a padded Q-Former-style cross-attention whose mask is a
    key bias (the patched modules' form) against the padding form."""
    b, h, lq, d = 256, 12, 32, 64
    shape, lse_shape = ((b * lq, h, d), (h, b * lq)) if packed else ((b, h, lq, d), (b, h, lq))
    out = torch.randn(shape, device="cuda").to(dtype)
    grad_out = torch.randn(*shape[:-1], 2 * d, device="cuda").to(dtype)[..., ::2]
    lse = torch.randn(lse_shape, device="cuda")
    lse.view(-1)[::5] = float("-inf")
    grad_lse = torch.randn(lse_shape, device="cuda")
    got = ops.attention_delta(out, grad_out, lse, grad_lse)
    want = (grad_out.double() * out.double()).sum(-1)
    want = (want.transpose(0, 1) if packed else want) - grad_lse.double()
    want = torch.where(torch.isfinite(lse), want, 0.0)
    assert rel(got, want) < 1e-5
    if packed:
        return
    q, k, v = leaves((8, h, lq, d), (8, h, 257, d), (8, h, 257, d), dtype=dtype)
    keep = torch.ones(8, 257, dtype=torch.bool, device="cuda")
    keep[3, 200:] = False
    bias = torch.where(keep, 0.0, torch.finfo(torch.float32).min)
    by_bias = A.cross_attention(q, k, v, key_bias=bias)
    by_pad = A.cross_attention(q, k, v, key_padding_mask=~keep)
    assert rel(by_bias, by_pad) < TOL[dtype]
    g = torch.randn_like(by_pad)
    for a, r in zip(torch.autograd.grad(by_bias, (q, k, v), g),
                    torch.autograd.grad(by_pad, (q, k, v), g), strict=True):  # fmt: skip
        assert rel(a, r) < 3 * TOL[dtype]

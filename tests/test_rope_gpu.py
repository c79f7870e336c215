"""The rotary kernels at model sizes on a CUDA GPU (skipped without one).

Reference: the PyTorch path of vlmkernels in float64 on the same GPU (itself checked against
transformers' formulas in test_rope.py). Tolerance: max abs error / max |ref| below 1e-2 for
bf16 (one rounding of the output), 1e-6 for fp32.
"""

import pytest
import torch

import vlmkernels

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def max_rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def reference(fn, *args, **kwargs):
    with vlmkernels.use_backend("torch"):
        cast = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                for a in args]  # fmt: skip
        return fn(*cast, **kwargs)


MODELS = {
    "qwen2_vl_7b": dict(hq=28, hk=4, d=128, section=[16, 24, 24], interleaved=False),
    "qwen3_vl_8b": dict(hq=32, hk=8, d=128, section=[24, 20, 20], interleaved=True),
}


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("seq", [4096, 65536])
def test_text_mrope_at_scale(model, seq):
    cfg = MODELS[model]
    q = torch.randn(1, seq, cfg["hq"], cfg["d"], device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, seq, cfg["hk"], cfg["d"], device="cuda", dtype=torch.bfloat16)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    positions = torch.randint(0, 30000, (3, 1, seq), device="cuda")
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, 128, 2, device="cuda").float() / 128))
    kw = dict(interleaved=cfg["interleaved"])
    out = vlmkernels.mrope_from_positions(q, k, positions, inv_freq, cfg["section"], **kw)
    ref = reference(vlmkernels.mrope_from_positions, q, k, positions, inv_freq.double(),
                    cfg["section"], **kw)  # fmt: skip
    for o, r in zip(out, ref, strict=True):
        assert max_rel(o, r) < 1e-2
    angle = positions[..., None].float() * inv_freq
    cos = torch.cat((angle, angle), -1).cos().to(torch.bfloat16)
    sin = torch.cat((angle, angle), -1).sin().to(torch.bfloat16)
    out = vlmkernels.mrope(q, k, cos, sin, cfg["section"], **kw)
    ref = reference(vlmkernels.mrope, q, k, cos, sin, cfg["section"], **kw)
    for o, r in zip(out, ref, strict=True):
        assert max_rel(o, r) < 1e-2
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    q1, k1 = q.detach().requires_grad_(), k.detach().requires_grad_()
    out = vlmkernels.mrope(q1, k1, cos, sin, cfg["section"], **kw)
    torch.autograd.backward(out, (gq, gk))
    ref_q, ref_k = q.double().requires_grad_(), k.double().requires_grad_()
    with vlmkernels.use_backend("torch"):
        ref_out = vlmkernels.mrope(ref_q, ref_k, cos.double(), sin.double(), cfg["section"], **kw)
    torch.autograd.backward(ref_out, (gq.double(), gk.double()))
    assert max_rel(q1.grad, ref_q.grad) < 1e-2 and max_rel(k1.grad, ref_k.grad) < 1e-2


def test_vision_rope_at_scale():
    n, heads, hd = 16384, 16, 80
    qkv = torch.randn(n, 3, heads, hd, device="cuda", dtype=torch.bfloat16)
    q, k = qkv[:, 0], qkv[:, 1]
    cos, sin = torch.randn(n, hd, device="cuda"), torch.randn(n, hd, device="cuda")
    out = vlmkernels.vision_rope(q, k, cos, sin)
    ref = reference(vlmkernels.vision_rope, q, k, cos, sin)
    for o, r in zip(out, ref, strict=True):
        assert max_rel(o, r) < 1e-2


def test_fp32_exact():
    q = torch.randn(2, 8, 1000, 128, device="cuda")
    k = torch.randn(2, 2, 1000, 128, device="cuda")
    cos, sin = torch.randn(2, 1000, 128, device="cuda"), torch.randn(2, 1000, 128, device="cuda")
    out = vlmkernels.rope(q, k, cos, sin)
    ref = reference(vlmkernels.rope, q, k, cos, sin)
    for o, r in zip(out, ref, strict=True):
        assert max_rel(o, r) < 1e-6


def test_64bit_offsets():
    """q with more than 2^31 elements (4.3 GB in bf16): offsets past int32 are right."""
    seq, hq, d = 589_824, 28, 130  # 28 * 130 * 589824 > 2^31
    free, _ = torch.cuda.mem_get_info()
    if free < 16 * 2**30:
        pytest.skip("needs 16 GiB of free GPU memory")
    q = torch.empty(1, seq, hq, d, device="cuda", dtype=torch.bfloat16).normal_()
    k = torch.randn(1, seq, 1, d, device="cuda", dtype=torch.bfloat16)
    assert q.numel() > 2**31
    cos = torch.randn(1, seq, d, device="cuda", dtype=torch.bfloat16)
    sin = torch.randn_like(cos)
    out_q, _ = vlmkernels.rope(q, k, cos, sin, unsqueeze_dim=2)
    tail = slice(seq - 64, seq)
    with vlmkernels.use_backend("torch"):
        parts = (t[:, tail].double() for t in (q, k, cos, sin))
        ref_q, _ = vlmkernels.rope(*parts, unsqueeze_dim=2)
    assert max_rel(out_q[:, tail], ref_q) < 1e-2

"""Patched connectors at model sizes on a GPU (compiled Triton, tensor cores): Gemma 3's
projector (pool_tokens(kind="avg") + the merger with Gemma's RMSNorm folded in), Mistral 3's
projector (the merger on the channel-major unfold's reordered weight, per image) and the
4 x 4 block mean itself, forward and every gradient against the float64 module on the CPU.
Skipped without CUDA."""

import copy

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import vlmkernels  # noqa: E402
import vlmkernels.integrations.transformers as vt  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DEVICE = "cuda"
# relative to the largest reference element; fp32 runs 3xTF32 over K = 1152 / 4096
TOL = {torch.bfloat16: 3e-2, torch.float32: 1e-4}


def max_rel(out, ref):
    return ((out.double().cpu() - ref.double()).abs().max() / ref.double().abs().max()).item()


def _randomise(module):
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            scale = p.shape[0] ** -0.5 if p.dim() > 1 else 0.2
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return module


def _compare(module, x, *args, dtype):
    """The patched module in ``dtype`` on CUDA against the float64 module on the CPU:
    output, the features' and every parameter's gradient."""
    exact = _randomise(module).double()
    mine = copy.deepcopy(exact).to(DEVICE, dtype)
    vt.patch(mine)
    xg = x.to(DEVICE, dtype).requires_grad_()
    x64 = xg.detach().cpu().double().requires_grad_()
    cuda_args = [a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args]
    out, want = mine(xg, *cuda_args), exact(x64, *args)
    assert out.shape == want.shape and max_rel(out, want) < TOL[dtype], max_rel(out, want)
    g = torch.randn(want.shape, dtype=torch.float64)
    out.backward(g.to(DEVICE, dtype))
    want.backward(g)
    assert max_rel(xg.grad, x64.grad) < 3 * TOL[dtype]
    for (name, p), q in zip(mine.named_parameters(), exact.parameters(), strict=True):
        assert max_rel(p.grad, q.grad) < 3 * TOL[dtype], (name, max_rel(p.grad, q.grad))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gemma3_projector_model_size(dtype):
    """Gemma 3 4B's projector: 2 crops of 64 x 64 SigLIP patches (1152) pooled 4 x 4 to
    16 x 16, RMSNorm, @ (1152, 2560)."""
    from transformers.models.gemma3 import modeling_gemma3

    config = transformers.Gemma3Config(
        vision_config={"hidden_size": 1152, "image_size": 896, "patch_size": 14},
        text_config={"hidden_size": 2560}, mm_tokens_per_image=256,
    )  # fmt: skip
    module = modeling_gemma3.Gemma3MultiModalProjector(config)
    _compare(module, torch.randn(2, 64 * 64, 1152) + 0.5, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mistral3_projector_model_size(dtype):
    """Mistral Small 3.1's projector: Pixtral features (1024) of two images (16 x 16 and
    8 x 8 patches of 14 px; few rows keep the float64 reference quick), RMSNorm, the 2 x 2
    unfold merge (4096 -> 1024), then Linear 1024 -> 5120, GELU, Linear 5120 -> 5120."""
    from transformers.models.mistral3 import modeling_mistral3

    config = transformers.Mistral3Config(
        vision_config={"hidden_size": 1024, "patch_size": 14, "head_dim": 64},
        text_config={"hidden_size": 5120}, spatial_merge_size=2,
    )  # fmt: skip
    module = modeling_mistral3.Mistral3MultiModalProjector(config)
    sizes = torch.tensor([[224, 224], [112, 112]])
    _compare(module, torch.randn(16 * 16 + 8 * 8, 1024), sizes, dtype=dtype)


def test_pool_avg_gemma3_size_bitwise_fp32():
    """The 4 x 4 block mean at Gemma 3's size: fp32 bitwise F.avg_pool2d's on CUDA (the same
    summation order), bf16 within rounding; the backward within rounding."""
    x = torch.randn(8, 64 * 64, 1152, device=DEVICE)
    out = vlmkernels.pool_tokens(x, (64, 64), "avg", (16, 16))
    ref = F.avg_pool2d(x.transpose(1, 2).reshape(8, 1152, 64, 64), 4).flatten(2).transpose(1, 2)
    assert torch.equal(out, ref)
    xb = x.bfloat16().requires_grad_()
    outb = vlmkernels.pool_tokens(xb, (64, 64), "avg", (16, 16))
    assert max_rel(outb, ref.cpu()) < 1e-2
    g = torch.randn_like(outb)
    outb.backward(g)
    # each input token gets its block's output gradient / 16: (oy, dy, ox, dx) order
    blocks = g.float().reshape(8, 16, 1, 16, 1, 1152).expand(8, 16, 4, 16, 4, 1152) / 16
    assert max_rel(xb.grad, blocks.reshape(8, 64 * 64, 1152).cpu()) < 1e-2

"""vlmkernels.patch on transformers' IdeficsGatedCrossAttentionLayer (tiny config, random
weights, fp32): outputs and parameter and input gradients against the transformers module,
with IDEFICS's additive image-by-image masks (immediate and cumulative) and without a mask;
undo restores the instance exactly; bad masks and attention dropout in training refused."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers.models.idefics import modeling_idefics as M  # noqa: E402

from vlmkernels.integrations.tables.attention import mask_ranges  # noqa: E402
from vlmkernels.integrations.transformers import patch  # noqa: E402


def tiny_layer(qk_layer_norms, alpha_type):
    config = M.IdeficsConfig(hidden_size=32, num_attention_heads=2, intermediate_size=48,
                             alpha_type=alpha_type, alpha_initializer="ones",
                             alphas_initializer_range=1.0, qk_layer_norms=qk_layer_norms,
                             dropout=0.0, vision_config={"embed_dim": 24})  # fmt: skip
    torch.manual_seed(3)
    layer = M.IdeficsGatedCrossAttentionLayer(config, layer_idx=0).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return layer


def idefics_inputs(immediate, batch=2, tokens=11, images=3, latents=4):
    """IDEFICS's mask: image i's latents are seen from its token on (immediate: until the
    next image), as (1 - allowed) * finfo.min; the gate marks tokens seeing any image."""
    x = torch.randn(batch, tokens, 32, requires_grad=True)
    img = torch.randn(batch, images * latents, 24, requires_grad=True)
    starts = torch.tensor([[1, 4, 5], [0, 6, 20]])  # row 1 never reaches image 3
    t = torch.arange(tokens)
    seen = t[None, :, None] >= starts[:, None, :]  # (B, T, images)
    if immediate:
        nxt = torch.cat([starts[:, 1:], torch.full((batch, 1), 10**6)], 1)
        seen &= t[None, :, None] < nxt[:, None, :]
    allowed = seen.repeat_interleave(latents, dim=-1)
    mask = (1.0 - allowed[:, None].float()) * torch.finfo(torch.float32).min
    gate = allowed.any(-1).float()
    return x, img, mask, gate


def run(layer, x, img, mask, gate):
    out = layer(x, image_hidden_states=img, image_attention_mask=mask, cross_attention_gate=gate)
    g = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
    grads = torch.autograd.grad((out * g).sum(), [x, img, *layer.parameters()])
    return out, grads


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("immediate,qk_norms,alpha_type,masked", [
    (True, False, "float", True), (False, True, "vector", True), (True, False, "float", False),
])  # fmt: skip
def test_idefics_gated_cross_attention(immediate, qk_norms, alpha_type, masked):
    layer = tiny_layer(qk_norms, alpha_type)
    before = dict(layer.__dict__)
    x, img, mask, gate = idefics_inputs(immediate)
    mask = mask if masked else None
    gate = gate if masked else torch.ones_like(gate)
    want, want_grads = run(layer, x, img, mask, gate)
    handle = patch(layer)
    assert "forward" in layer.__dict__
    got, got_grads = run(layer, x, img, mask, gate)
    assert rel(got, want) < 1e-5
    for a, b in zip(got_grads, want_grads, strict=True):
        assert rel(a, b) < 1e-4
    handle.undo()
    assert layer.__dict__ == before
    again, _ = run(layer, x, img, mask, gate)
    assert torch.equal(again, want)


def test_idefics_patch_anywhere_and_refusals():
    layer = tiny_layer(False, "float")
    outer = torch.nn.Sequential(torch.nn.Identity(), copy.deepcopy(layer))
    x, img, mask, gate = idefics_inputs(True)
    handle = patch(outer)
    assert "forward" in outer[1].__dict__
    outer.train()
    outer[1].cross_attn.dropout = 0.1
    with pytest.raises(RuntimeError, match="attention dropout 0.1 in training mode"):
        outer[1](x, image_hidden_states=img, image_attention_mask=mask,
                 cross_attention_gate=gate)  # fmt: skip
    outer.eval()
    holes = mask.clone()
    holes[0, 0, 3, 1] = torch.finfo(torch.float32).min  # image 1 minus one latent
    holes[0, 0, 3, 0] = 0.0
    with pytest.raises(ValueError, match="not one interval per text token"):
        outer[1](x, image_hidden_states=img, image_attention_mask=holes,
                 cross_attention_gate=gate)  # fmt: skip
    handle.undo()
    assert "forward" not in outer[1].__dict__


def test_mask_ranges():
    allowed = torch.tensor([[[[0, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]]]], dtype=torch.bool)
    lo, hi = mask_ranges(allowed, 2, 3, 4)
    assert lo.tolist() == [[1, 0, 0]] * 2 and hi.tolist() == [[3, 0, 4]] * 2
    with pytest.raises(ValueError, match=r"must be \(B, 1, 3, 5\)"):
        mask_ranges(allowed, 1, 3, 5)

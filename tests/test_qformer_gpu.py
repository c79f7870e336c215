"""The fused Q-Former on a GPU (skipped without CUDA): BLIP-2's sizes (12 layers, 768,
cross-attention every 2nd layer to 257 x 1408 image features) patched against
transformers in fp32 (3xTF32) and bf16, the bias + residual + LayerNorm kernel at N = 768
against float64, and the CUDA-graph path at batch 1: the patched Q-Former captured once
and replayed on new inputs gives the eager patched outputs."""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
transformers = pytest.importorskip("transformers")

from transformers.models.blip_2 import modeling_blip_2 as M  # noqa: E402

from vlmkernels.integrations.transformers import patch  # noqa: E402
from vlmkernels.ops.attention.qformer import add_layernorm  # noqa: E402

DEVICE = torch.device("cuda")


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def blip2_qformer(dtype=torch.float32, layers=12):
    config = M.Blip2QFormerConfig(num_hidden_layers=layers, cross_attention_frequency=2,
                                  encoder_hidden_size=1408)  # fmt: skip
    torch.manual_seed(0)
    return M.Blip2QFormerModel(config).eval().to(DEVICE, dtype)


def inputs(b, dtype=torch.float32, grad=False):
    gen = torch.Generator(device=DEVICE).manual_seed(b)
    q = torch.randn(b, 32, 768, device=DEVICE, generator=gen).to(dtype)
    x = torch.randn(b, 257, 1408, device=DEVICE, generator=gen).to(dtype)
    return q.requires_grad_(grad), x.requires_grad_(grad)


@pytest.mark.parametrize("dtype,n", [(torch.float32, 768), (torch.bfloat16, 768),
                                     (torch.float16, 1000)])  # fmt: skip
def test_add_layernorm_cuda(dtype, n):
    torch.manual_seed(1)
    m = 4099
    x = torch.randn(m, n, device=DEVICE).to(dtype).requires_grad_()
    r = torch.randn(m, n, device=DEVICE).to(dtype).requires_grad_()
    w, b, c = (torch.randn(n, device=DEVICE).requires_grad_() for _ in range(3))
    y = add_layernorm(x, r, w, b, x_bias=c)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, r, w, b, c], g)
    xs = [t.detach().double().requires_grad_() for t in (x, r, w, b, c)]
    want_y = torch.nn.functional.layer_norm(xs[0] + xs[1] + xs[4], (n,), xs[2], xs[3], 1e-12)
    want = torch.autograd.grad(want_y, xs, g.double())
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel(y, want_y) < tol
    assert all(rel(a, e) < 2 * tol for a, e in zip(got, want, strict=True))


def test_blip2_qformer_fp32_and_bf16():
    model = blip2_qformer()
    q, x = inputs(4, grad=True)
    want = model(query_embeds=q, encoder_hidden_states=x).last_hidden_state
    g = torch.randn_like(want)
    leaves = [q, x, *model.parameters()]
    want_grads = torch.autograd.grad(want, leaves, g)
    with patch(model):
        got = model(query_embeds=q, encoder_hidden_states=x).last_hidden_state
        got_grads = torch.autograd.grad(got, leaves, g)
    assert rel(got, want) < 1e-4
    assert rel(got_grads[0], want_grads[0]) < 1e-4 and rel(got_grads[1], want_grads[1]) < 1e-4
    model16 = model.to(torch.bfloat16)
    with patch(model16), torch.no_grad():
        got16 = model16(query_embeds=q.bfloat16(), encoder_hidden_states=x.bfloat16())
    assert rel(got16.last_hidden_state, want) < 3e-2


def test_cuda_graph_batch_1():
    """Patch, run once outside the capture, capture the forward with static inputs and no
    masks, replay on new inputs; a weight changed in place afterwards shows in the next
    replay (the graph stacks the live weights)."""
    model = blip2_qformer()
    patch(model)
    q, x = inputs(1)
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                model(query_embeds=q, encoder_hidden_states=x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = model(query_embeds=q, encoder_hidden_states=x).last_hidden_state
        new_q, new_x = inputs(2)
        q.copy_(new_q[:1])
        x.copy_(new_x[:1])
        graph.replay()
        want = model(query_embeds=q, encoder_hidden_states=x).last_hidden_state
        torch.cuda.synchronize()
        assert rel(static_out, want) < 1e-6
        for p in model.parameters():
            p.data.mul_(0.9)  # through .data: no version counter moves
        graph.replay()
        want = model(query_embeds=q, encoder_hidden_states=x).last_hidden_state
    torch.cuda.synchronize()
    assert rel(static_out, want) < 1e-6

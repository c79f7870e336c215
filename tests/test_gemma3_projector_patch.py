"""vlmkernels.patch on Gemma 3's multimodal projector (AvgPool2d, Gemma's RMSNorm, @ W):
a tiny Gemma 3 model's image features against transformers', 16-bit accuracy against
float64, the class forward (and transformers' errors) where the fused one cannot give
transformers' result, and fullgraph compilation. The per-connector checks shared with the
other connectors (outputs and gradients, autocast, keyword input) are in
test_connectors_patch.py (cases ``gemma3``, ``t5gemma2``)."""

import copy
import re

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from test_connectors_patch import (  # noqa: E402
    TOL,
    _gemma3,
    assert_16_bit_close,
    assert_as_transformers,
    max_rel,
    randomise,
)

import vlmkernels.integrations.transformers as vt  # noqa: E402
from vlmkernels.integrations.patching import PatchFallbackWarning  # noqa: E402


def _tiny_gemma3():
    from transformers.models.gemma3 import modeling_gemma3

    vision = {
        "hidden_size": 12,
        "image_size": 56,
        "patch_size": 7,
        "num_attention_heads": 2,
        "intermediate_size": 16,
        "num_hidden_layers": 1,
    }
    text = {
        "hidden_size": 20,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 1,
        "vocab_size": 64,
    }
    config = transformers.Gemma3Config(vision_config=vision, text_config=text,
                                       mm_tokens_per_image=4)  # fmt: skip
    return modeling_gemma3.Gemma3ForConditionalGeneration(config).eval()


def _features(out):
    return getattr(out, "pooler_output", out)  # a ModelOutput from transformers 5.x


def test_gemma3_model_image_features_match_transformers():
    """The whole model patched: its projector (the only target) gives transformers' image
    features from pixels, and the same gradients of the pixels and of the projector's
    weights (the norm's weight enters as 1 + w)."""
    torch.manual_seed(0)
    ref = _tiny_gemma3()
    randomise(ref.model.multi_modal_projector)
    mine = copy.deepcopy(ref)
    with vt.patch(mine) as handle:
        assert handle.targets == ("model.multi_modal_projector.forward",)
        px1, px2 = (torch.randn(2, 3, 56, 56).requires_grad_() for _ in range(2))
        with torch.no_grad():
            px2.copy_(px1)
        out = _features(mine.model.get_image_features(px1))
        want = _features(ref.model.get_image_features(px2))
        assert out.shape == want.shape == (2, 4, 20)
        assert max_rel(out, want) < TOL
        g = torch.randn_like(want)
        out.backward(g)
        want.backward(g)
        assert max_rel(px1.grad, px2.grad) < TOL
        pairs = zip(mine.model.multi_modal_projector.named_parameters(),
                    ref.model.multi_modal_projector.parameters(), strict=True)  # fmt: skip
        for (name, p), q in pairs:
            assert max_rel(p.grad, q.grad) < TOL, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemma3_projector_16_bit_accuracy(dtype):
    """A 16-bit projector: output and gradients within 16-bit rounding of the float64
    projector's (the norm weight folded into W rounds differently from transformers)."""
    module, x = _gemma3()()
    assert_16_bit_close(randomise(module).double(), dtype, x)


@pytest.mark.parametrize(
    "change, why",
    [
        (lambda m: setattr(m, "avg_pool", nn.AvgPool2d(4, ceil_mode=True)), "not a mean of"),
        (lambda m: setattr(m, "avg_pool", nn.AvgPool2d(4, stride=2)), "not a mean of"),
        (lambda m: setattr(m, "avg_pool", nn.AvgPool2d(3)), "does not divide the 8 x 8"),
    ],
)
def test_gemma3_projector_other_poolings_run_the_class_forward(change, why):
    """A pooling changed after patching to one the block mean does not compute (ceil_mode,
    overlapping blocks, a kernel that drops the last rows): transformers' result, with a
    PatchFallbackWarning naming why."""
    module, x = _gemma3()()
    ref = randomise(module)
    mine = copy.deepcopy(ref)
    with vt.patch(mine):
        change(mine), change(ref)
        with pytest.warns(PatchFallbackWarning, match=why):
            out = mine(x)
        assert max_rel(out, ref(x)) < TOL


def test_gemma3_projector_raises_as_transformers_does():
    """Features of another token count, rank or channel count, and fp32 features into bf16
    weights outside autocast: transformers' own errors (its unpacking, its reshape, its
    norm's broadcast, its matmul), not the kernels'."""
    module, x = _gemma3()()
    ref = randomise(module)
    mine = copy.deepcopy(ref)
    vt.patch(mine)

    assert assert_as_transformers(ref, mine, x[:, :63])
    assert assert_as_transformers(ref, mine, x[0])
    assert assert_as_transformers(ref, mine, x[..., :7])
    for m in (ref, mine):
        m.mm_input_projection_weight.data = m.mm_input_projection_weight.data.bfloat16()
    assert (
        "the features are torch.float32 and the projection"
        in assert_as_transformers(ref, mine, x)[0]
    )


def test_gemma3_projector_compiles_fullgraph():
    """torch.compile(fullgraph=True) of the patched projector traces the fused forward (no
    graph break) and gives its eager result."""
    module, x = _gemma3()()
    mine = randomise(module)
    vt.patch(mine)
    eager = mine(x)
    compiled = torch.compile(mine, fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(x), eager, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "name, shape",
    [
        ("mm_soft_emb_norm.weight", (1,)),  # broadcast over the channels by transformers
        ("mm_soft_emb_norm.weight", (1, 12)),
        ("mm_soft_emb_norm.weight", (13,)),  # transformers' broadcasting error
        ("mm_input_projection_weight", (12,)),  # matmul by a vector: (B, 4)
        ("mm_input_projection_weight", (1, 12, 20)),  # a batched matmul
        ("mm_input_projection_weight", (13, 20)),  # transformers' matmul error
    ],
)
def test_gemma3_projector_weights_of_other_shapes_run_the_class_forward(name, shape):
    """A weight replaced after patching by one of another shape: transformers' result
    (it broadcasts the norm's weight, and matmul takes a vector or a batch of matrices) or
    its own error, never the merger's ValueError."""
    module, x = _gemma3()()
    ref = randomise(module)
    mine = copy.deepcopy(ref)
    vt.patch(mine)
    new = torch.randn(shape)
    for m in (ref, mine):
        owner, _, attr = name.rpartition(".")
        setattr(m.get_submodule(owner), attr, nn.Parameter(new.clone()))
    try:
        want = ref(x)
    except RuntimeError as e:
        with pytest.warns(PatchFallbackWarning, match="shape"):
            with pytest.raises(RuntimeError, match=re.escape(str(e))):
                mine(x)
        return
    with pytest.warns(PatchFallbackWarning, match="shape"):
        out = mine(x)
    assert out.shape == want.shape
    assert max_rel(out, want) < TOL


@pytest.mark.parametrize(
    "x_dtype, w_dtype",
    [(torch.float64, torch.float32), (torch.float32, torch.float64), (torch.int64, torch.float32)],
)
def test_gemma3_projector_under_autocast_raises_as_transformers_does(x_dtype, w_dtype):
    """Under autocast, features and W of two dtypes autocast does not cast to one (float64,
    an integer tensor): transformers' matmul error, not the merger's or pool_tokens'."""
    module, x = _gemma3()()
    ref = randomise(module).to(w_dtype)
    mine = copy.deepcopy(ref)
    vt.patch(mine)
    x = (x * 3).to(x_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RuntimeError) as want:
            ref(x)
        with pytest.warns(PatchFallbackWarning, match="the features are"):
            with pytest.raises(RuntimeError, match=re.escape(str(want.value))):
                mine(x)


@pytest.mark.parametrize(
    "kernel, side, n",
    [(0, 8, 64), (-4, 8, 64), ((4,), 8, 64), (4, 0, 0)],
)
def test_gemma3_projector_degenerate_poolings_as_transformers(kernel, side, n):
    """A kernel of 0 (``mm_tokens_per_image`` above the patch count: tokens_per_side >
    patches_per_image), a negative or one-element kernel, an empty grid: transformers'
    result or its own error (not a ZeroDivisionError or pool_tokens' ValueError)."""
    module, _ = _gemma3()()
    ref = randomise(module)
    mine = copy.deepcopy(ref)
    vt.patch(mine)
    for m in (ref, mine):
        m.avg_pool.kernel_size = m.avg_pool.stride = kernel
        m.patches_per_image = side
    x = torch.randn(2, n, 12)
    try:
        want = ref(x)
    except RuntimeError as e:
        with pytest.warns(PatchFallbackWarning):
            with pytest.raises(RuntimeError, match=re.escape(str(e))):
                mine(x)
        return
    with pytest.warns(PatchFallbackWarning):
        out = mine(x)
    assert max_rel(out, want) < TOL


class _Quantised(torch.Tensor):
    """A tensor subclass standing in for a quantised weight (torchao's, NF4)."""


@pytest.mark.parametrize("name", ["mm_input_projection_weight", "mm_soft_emb_norm.weight"])
def test_gemma3_projector_subclass_weights_run_the_class_forward(name):
    """A weight that is a tensor subclass (a quantised one) is not read by the fused
    kernels: the class forward runs it, naming the weight."""
    module, x = _gemma3()()
    ref = randomise(module)
    mine = copy.deepcopy(ref)
    vt.patch(mine)
    owner, _, attr = name.rpartition(".")
    for m in (ref, mine):
        p = getattr(m.get_submodule(owner), attr)
        setattr(m.get_submodule(owner), attr, nn.Parameter(p.detach().as_subclass(_Quantised)))
    with pytest.warns(PatchFallbackWarning, match=f"{re.escape(name)} is a _Quantised"):
        out = mine(x)
    assert max_rel(out, ref(x)) < TOL

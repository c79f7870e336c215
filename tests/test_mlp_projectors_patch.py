"""vlmkernels.patch on LLaVA's MLP projector and Idefics3's connector under other names
(DeepSeek-VL's aligner, VideoLLaMA 3's projector, MiniMax-M3-VL's two-MLP projector, Janus's
aligner; the
ModernVBERT and UltraVBERT connectors, and Aya Vision's and Command A Vision's SwiGLU
projectors): the whole models patch their projector; a layer
changed after patching, or an input transformers refuses, runs the class forward. Outputs
and gradients against transformers are checked in test_connectors_patch.py (``SAME_CODE``:
deepseek_vl, video_llama_3, minimax_m3_vl, janus, modernvbert, ultravbert, aya_vision,
cohere2_vision)."""

import copy
import importlib
import re
import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from test_connectors_patch import (  # noqa: E402
    SAME_CODE,
    TOL,
    _modeling,
    assert_as_transformers,
    max_rel,
    randomise,
)

import vlmkernels.integrations.transformers as vt  # noqa: E402
from vlmkernels.integrations.patching import PatchFallbackWarning  # noqa: E402

# model key: (its full model class, the projector's attribute in the inner model)
WHOLE = {
    "deepseek_vl": ("DeepseekVLForConditionalGeneration", "aligner"),
    "video_llama_3": ("VideoLlama3ForConditionalGeneration", "projector"),
    "minimax_m3_vl": ("MiniMaxM3SparseForConditionalGeneration", "multi_modal_projector"),
    "janus": ("JanusForConditionalGeneration", "aligner"),
}


@pytest.mark.parametrize("key", sorted(WHOLE))
def test_whole_model_patches_its_projector(key):
    """The full model (default config, meta device) patches its projector's forward, and
    support() reports the architecture."""
    cls_name, attr = WHOLE[key]
    cls = getattr(_modeling(key), cls_name)
    with torch.device("meta"):
        model = cls(cls.config_class())
    with vt.patch(model) as handle:
        assert f"model.{attr}.forward" in handle.targets
    assert "forward" not in getattr(model.model, attr).__dict__
    assert vt.support()[f"{key}.connector"] == {"connector": "ok"}


def _patched_copy(key):
    """(module, a patched copy of it, features) of the SAME_CODE case ``key``, weights
    random."""
    module, x = SAME_CODE[key]()
    ref = randomise(module)
    mine = copy.deepcopy(ref)
    vt.patch(mine)
    return ref, mine, x


def test_video_llama3_readout_grown_after_patching_runs_the_class_forward():
    """A layer appended to VideoLLaMA 3's readout after patching is not skipped: the class's
    forward runs (with a warning), giving transformers' result."""
    module, x = SAME_CODE["video_llama_3"]()
    ref = randomise(module)
    mine = copy.deepcopy(ref)
    with vt.patch(mine):
        extra = nn.Linear(20, 20)
        ref.readout.append(extra)
        mine.readout.append(copy.deepcopy(extra))
        with pytest.warns(PatchFallbackWarning, match="readout changed since patching"):
            out = mine(x)
        assert max_rel(out, ref(x)) < TOL


def test_minimax_m3_vl_projector_merge_size_0_raises_as_transformers():
    """A spatial_merge_size set to 0 after patching: transformers' ZeroDivisionError (its
    floor division), with its message, where the fused forward's modulo raised another."""
    ref, mine, x = _patched_copy("minimax_m3_vl")
    ref.spatial_merge_size = mine.spatial_merge_size = 0
    assert assert_as_transformers(ref, mine, x)


def test_minimax_m3_vl_projector_partial_window_raises_as_transformers():
    """Patches that do not fill the 2 x 2 merge windows: transformers' error (its second
    MLP's matmul), not a kernel's, and not a result."""
    ref, mine, x = _patched_copy("minimax_m3_vl")
    bad = x[:26]
    with pytest.raises(RuntimeError) as want:
        ref(bad)
    with (
        pytest.raises(RuntimeError, match=re.escape(str(want.value))),
        pytest.warns(PatchFallbackWarning, match="not windows of 4 patches"),
    ):
        mine(bad)


@pytest.mark.parametrize("key", ["modernvbert", "ultravbert"])
def test_vbert_connectors_refuse_their_own_pixel_shuffle_and_fall_back(key):
    """ModernVBERT's / UltraVBERT's connector: a pixel_shuffle of the instance's own is
    refused (the fused forward would skip it); a grid the shuffle factor does not divide
    runs the class forward, with transformers' error."""
    module, x = SAME_CODE[key]()
    ref = randomise(module)
    own = copy.deepcopy(ref)
    own.pixel_shuffle = lambda x, factor: x
    with pytest.raises(vt.UnsupportedLayoutError, match="pixel_shuffle"):
        vt.patch(own)
    mine = copy.deepcopy(ref)
    vt.patch(mine)
    mine.pixel_shuffle_factor = ref.pixel_shuffle_factor = 4  # 6 x 6 patches
    with pytest.raises(RuntimeError) as want:
        ref(x)
    with (
        pytest.raises(RuntimeError, match=re.escape(str(want.value))),
        pytest.warns(PatchFallbackWarning, match="side divisible by 4"),
    ):
        mine(x)


@pytest.mark.parametrize("key", ["aya_vision", "cohere2_vision"])
def test_gated_projectors_fuse_their_activation_and_second_linear(key):
    """Aya Vision's / Command A Vision's projector: the SwiGLU and the second linear are
    fused (no fallback on the patched model); another activation, a LoRA-like second linear
    or a hooked first linear set after patching runs the class forward, with its result; a
    grid the factor does not divide gives transformers' error."""
    module, x = SAME_CODE[key]()
    ref = randomise(module)
    mine = copy.deepcopy(ref)
    with vt.patch(mine):
        with warnings.catch_warnings():
            warnings.simplefilter("error", PatchFallbackWarning)
            assert max_rel(mine(x), ref(x)) < TOL
        silu = mine.act
        for m in (mine, ref):
            m.act = nn.GELU()
        with pytest.warns(PatchFallbackWarning, match="act is now"):
            assert max_rel(mine(x), ref(x)) < TOL
        for m in (mine, ref):
            m.act = silu
            m.linear_2 = nn.Sequential(copy.deepcopy(ref.linear_2), nn.Tanh())
        with pytest.warns(PatchFallbackWarning, match="linear_2 is now"):
            assert max_rel(mine(x), ref(x)) < TOL
        for m in (mine, ref):
            m.linear_2 = m.linear_2[0]
        hook = mine.linear_1.register_forward_hook(lambda m, i, o: o * 2)
        ref.linear_1.register_forward_hook(lambda m, i, o: o * 2)
        with pytest.warns(PatchFallbackWarning, match="linear_1 has hooks"):
            assert max_rel(mine(x), ref(x)) < TOL
        hook.remove()
        with pytest.raises(RuntimeError) as want:
            ref(x[:, :35])
        with (
            pytest.raises(RuntimeError, match=re.escape(str(want.value))),
            pytest.warns(PatchFallbackWarning, match="not a square grid"),
        ):
            mine(x[:, :35])


@pytest.mark.parametrize("key", ["aya_vision", "cohere2_vision"])
def test_gated_projector_with_another_activation_is_refused(key):
    """A projector built with an activation that is not SiLU is refused at patch time,
    naming it, and left unchanged."""
    module, _ = SAME_CODE[key]()
    module.act = nn.GELU()
    with pytest.raises(vt.UnsupportedLayoutError, match="is not SiLU"):
        vt.patch(module)
    assert "forward" not in module.__dict__


@pytest.mark.parametrize("key", ["aya_vision", "cohere2_vision"])
def test_gated_projector_with_a_silu_subclass_is_refused(key):
    """An ``act`` of a subclass of nn.SiLU (which may compute another function) is refused
    at patch time, and the module left unchanged: the fused forward computes SiLU, where it
    returned SiLU's result for this act's doubled one."""

    class Doubled(nn.SiLU):
        def forward(self, x):
            return 2 * super().forward(x)

    module, _ = SAME_CODE[key]()
    module.act = Doubled()
    with pytest.raises(vt.UnsupportedLayoutError, match="is not SiLU"):
        vt.patch(module)
    assert "forward" not in module.__dict__


@pytest.mark.parametrize("key", ["aya_vision", "cohere2_vision"])
@pytest.mark.parametrize("when", ["before patching", "after patching"])
def test_gated_projector_with_an_in_place_silu_is_transformers(key, when):
    """An ``nn.SiLU(inplace=True)`` act: while autograd records linear_1's output,
    transformers' in-place SiLU of a ``chunk`` view raises its RuntimeError, and so does
    the patched module (the class's forward), where the fused forward returned a result;
    without grad (no_grad, or nothing requiring it) both give the same result."""
    ref, mine, x = _patched_copy(key)
    if when == "before patching":
        vt.unpatch(mine)
        mine.act = nn.SiLU(inplace=True)
        vt.patch(mine)
    else:
        mine.act = nn.SiLU(inplace=True)
    ref.act = nn.SiLU(inplace=True)
    # Aya Vision's act is transformers' SiLUActivation: an nn.SiLU set after patching is
    # another class, which runs the class's forward whatever autograd does
    fused = not (key == "aya_vision" and when == "after patching")
    why = assert_as_transformers(ref, mine, x)
    assert why and ("in-place SiLU" in why[0] or "act is now" in why[0])

    def close(got, want):
        return max_rel(got, want) < TOL

    with torch.no_grad():
        assert bool(assert_as_transformers(ref, mine, x, same=close)) != fused
    for m in (ref, mine):
        m.requires_grad_(False)
    assert bool(assert_as_transformers(ref, mine, x, same=close)) != fused
    with pytest.raises(RuntimeError, match="modified inplace"):
        ref(x.clone().requires_grad_())
    assert assert_as_transformers(ref, mine, x.clone().requires_grad_())


def test_janus_aligner_of_depth_1_is_refused():
    """Janus's aligner without a hidden layer (depth 1: fc1 alone) is refused at patch time,
    naming why, and left unchanged."""
    modeling = _modeling("janus")
    config = importlib.import_module(
        "transformers.models.janus.configuration_janus"
    ).JanusVisionConfig(hidden_size=12, projection_dim=20, depth=1, num_attention_heads=2)
    module = modeling.JanusVisionAlignerMLP(config)
    with pytest.raises(vt.UnsupportedLayoutError, match="hidden_layers holds no Linear"):
        vt.patch(module)
    assert "forward" not in module.__dict__


@pytest.mark.parametrize(
    "key",
    ["deepseek_vl", "video_llama_3", "minimax_m3_vl", "janus", "modernvbert", "ultravbert",
     "aya_vision", "cohere2_vision"],
)  # fmt: skip
@pytest.mark.parametrize("autocast", [False, True])
def test_features_of_a_dtype_transformers_refuses_get_its_error(key, autocast):
    """float64 features into an fp32 connector, outside autocast and under it (which does
    not cast float64): transformers' own error (its Linear's), from the class's forward,
    not the fused ops' TypeError."""
    ref, mine, x = _patched_copy(key)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        why = assert_as_transformers(ref, mine, x.double())
    assert why and "the features are torch.float64" in why[0]


# each MLP row's second linear (the last one the fused GEMMs read), and its first
_MLP_LAYERS = {"deepseek_vl": ("linear2", "linear1"), "video_llama_3": ("readout.2", "readout.0"),
               "minimax_m3_vl": ("merge_linear_1", "linear_1"),
               "janus": ("hidden_layers.0", "fc1")}  # fmt: skip


@pytest.mark.parametrize("key", sorted(_MLP_LAYERS))
@pytest.mark.parametrize(
    "change, autocast",
    [("bfloat16", False), ("float64", False), ("float64", True), ("wider", False), ("bias", False)],
)
def test_mlp_layers_transformers_refuses_or_broadcasts_run_the_class_forward(key, change, autocast):
    """A second linear of another dtype than the features (float64 also under autocast,
    which does not cast it), features one channel wider than the first linear takes, or a
    first bias of one element set after patching: transformers' RuntimeError (its linear's)
    or its result (the bias broadcast), from the class's forward, where the fused ops raised
    their TypeError or ValueError."""
    ref, mine, x = _patched_copy(key)
    second, first = _MLP_LAYERS[key]
    for m in (ref, mine):
        if change in ("bfloat16", "float64"):
            m.get_submodule(second).to(getattr(torch, change))
        elif change == "bias":
            m.get_submodule(first).bias = nn.Parameter(torch.ones(1))
    if change == "wider":
        x = torch.cat([x, x[..., :1]], dim=-1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        assert assert_as_transformers(ref, mine, x)


@pytest.mark.parametrize("shape", [(12,), (4, 7, 12), (8, 1, 12)])
def test_minimax_m3_vl_projector_features_of_other_ranks_are_transformers(shape):
    """1-D features and (B, L, C) ones: transformers' reshape makes rows of the per-patch
    results' first dim (D for 1-D features, B for 3-D), which its merge MLP refuses unless
    L is 1; its RuntimeError or result, where the fused forward checked the features' first
    dim and raised the projector's ValueError."""
    ref, mine, _ = _patched_copy("minimax_m3_vl")
    x = torch.randn(shape)
    try:
        want = ref(x)
    except RuntimeError:  # the class's forward's error
        assert_as_transformers(ref, mine, x)
    else:  # (8, 1, 12): fused, within rounding (bitwise only on the PyTorch backend)
        assert max_rel(mine(x), want) < TOL


def _transposed(x):
    """``x``'s values as a (B, S, C) view whose token rows are not contiguous."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


@pytest.mark.parametrize("key", ["modernvbert", "ultravbert"])
@pytest.mark.parametrize(
    "change",
    ["factor 2.0", "factor 3", "factor 1", "wider", "transposed", "float64 projection"],
)
def test_vbert_connectors_on_what_transformers_refuses_raise_its_error(key, change):
    """A pixel_shuffle_factor set after patching to a float or to a factor the projection's
    weight does not take, features of another width, a projection of another dtype (under
    autocast, which does not cast float64), and features whose token rows are not contiguous
    (transformers' pixel_shuffle views them, and its view refuses their strides): the class's
    forward, with transformers' error, where the fused merger raised its own TypeError or
    ValueError, or returned a result."""
    ref, mine, x = _patched_copy(key)
    for m in (ref, mine):
        if change.startswith("factor"):
            m.pixel_shuffle_factor = eval(change.split()[1])
        elif change == "float64 projection":
            m.modality_projection.double()
    x = {"wider": torch.cat([x, x[..., :1]], dim=-1), "transposed": _transposed(x)}.get(change, x)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=change == "float64 projection"):
        assert assert_as_transformers(ref, mine, x)


@pytest.mark.parametrize("key", ["aya_vision", "cohere2_vision"])
@pytest.mark.parametrize(
    "change",
    ["factor 2.0", "factor 3", "wider", "bias of one", "no images", "norm bfloat16",
     "norm float64", "norm of one", "odd linear_1", "three outputs", "linear_2 wider",
     "linear_2 bias of one", "linear_2 bfloat16"],
)  # fmt: skip
def test_gated_projectors_on_what_transformers_refuses_or_broadcasts_are_transformers(key, change):
    """A downsample_factor set after patching to a float (transformers' int() casts take it)
    or to one linear_1 does not take, features of another width, a linear_1 bias of one
    element (transformers broadcasts it), a batch of no images, and for Aya Vision a
    LayerNorm of a dtype CPU layer_norm refuses beside fp32 features, or of weights of one
    element: transformers' result or error, from the class's forward, where the fused
    merger raised its own TypeError or ValueError, another message, or returned a result.
    And the SwiGLU's: a linear_1 of an odd width (its halves differ by one: an error, or
    with three outputs a broadcast result), a linear_2 of one more input, of a bias of one
    element or of another dtype."""
    if change.startswith("norm") and key == "cohere2_vision":
        pytest.skip("Command A Vision's projector has no norm")
    ref, mine, x = _patched_copy(key)
    for m in (ref, mine):
        if change.startswith("factor"):
            m.downsample_factor = eval(change.split()[1])
        elif change == "bias of one":
            m.linear_1.bias = nn.Parameter(torch.ones(1))
        elif change == "norm of one":
            m.layernorm.weight = nn.Parameter(torch.ones(1))
        elif change.startswith("norm"):
            m.layernorm.to(getattr(torch, change.split()[1]))
        elif change == "odd linear_1":
            m.linear_1 = nn.Linear(m.linear_1.in_features, m.linear_1.out_features - 1)
        elif change == "three outputs":  # halves of 2 and 1: the gate broadcasts
            m.linear_1 = nn.Linear(m.linear_1.in_features, 3)
            m.linear_2 = nn.Linear(2, m.linear_2.out_features)
        elif change == "linear_2 wider":
            m.linear_2 = nn.Linear(m.linear_2.in_features + 1, m.linear_2.out_features)
        elif change == "linear_2 bias of one":
            m.linear_2.bias = nn.Parameter(torch.ones(1))
        elif change == "linear_2 bfloat16":
            m.linear_2.bfloat16()
    if change in ("odd linear_1", "three outputs", "linear_2 wider"):  # the same layers
        mine.load_state_dict(ref.state_dict())
    x = {"wider": torch.cat([x, x[..., :1]], dim=-1), "no images": x[:0]}.get(change, x)
    assert assert_as_transformers(ref, mine, x)


@pytest.mark.parametrize(
    "key",
    ["deepseek_vl", "video_llama_3", "minimax_m3_vl", "janus", "ultravbert", "aya_vision",
     "cohere2_vision", "hy_v4_vl"],
)  # fmt: skip
@pytest.mark.parametrize("moved", ["module", "features"])
def test_features_and_weights_on_two_devices_raise_as_transformers(key, moved):
    """The module on one device and the features on another (a model on the GPU, its
    features left on the CPU; here the meta device stands in for it): transformers' layer
    raises its RuntimeError, from the class's forward, where the fused ops raised their
    TypeError or ValueError about the device. (ModernVBERT is left out: torch's linear
    without bias mixes meta and CPU tensors without an error.)"""
    if key == "hy_v4_vl":
        from test_hy_v4_vl_merger_patch import _merger

        module, x, args = _merger(), torch.randn(1, 24, 8), ((4, 6),)
    else:
        module, x = SAME_CODE[key]()
        module, args = randomise(module), ()
    mine = copy.deepcopy(module)
    vt.patch(mine)
    if moved == "module":
        module, mine = module.to("meta"), mine.to("meta")
    else:
        x = x.to("meta")
    why = assert_as_transformers(module, mine, x, *args)
    assert why and "meta" in why[0]

"""vlmkernels.patch on Mistral 3's projector (RMSNorm, a channel-major 2 x 2 unfold per
image, Linear without bias, Linear + GELU + Linear) and the same code in LightOnOCR's and
Mistral Large 4's: outputs and gradients against transformers on images of two sizes, in
fp32 and bf16; the class forward (and transformers' errors) where the fused one cannot
serve; a tiny Mistral 3 model's image features from pixels."""

import copy
import importlib
import re
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_connectors_patch import (  # noqa: E402
    TOL,
    _modeling,
    assert_16_bit_close,
    assert_as_transformers,
    assert_patched_matches,
    max_rel,
    randomise,
)

import vlmkernels.integrations.transformers as vt  # noqa: E402
from vlmkernels.integrations.patching import PatchFallbackWarning  # noqa: E402

PREFIX = {"mistral3": "Mistral3", "lighton_ocr": "LightOnOcr", "mistral_large4": "MistralLarge4"}
SIZES = torch.tensor([[16, 24], [8, 8]])  # pixels: (4, 6) and (2, 2) patches of 4 x 4


def _config(key, **vision):
    kw = dict(vision_config={"hidden_size": 8, "num_attention_heads": 2, "intermediate_size": 16,
                             "patch_size": 4, "head_dim": 4, **vision},
              text_config={"hidden_size": 20, "num_attention_heads": 2, "num_key_value_heads": 1,
                           "intermediate_size": 16, "head_dim": 10, "num_hidden_layers": 1,
                           "vocab_size": 64})  # fmt: skip
    if key != "lighton_ocr":  # (LightOnOCR's merge size is fixed at 2)
        kw["spatial_merge_size"] = 2
    return getattr(transformers, f"{PREFIX[key]}Config")(**kw)


def _projector(key):
    modeling = _modeling(key)
    return randomise(getattr(modeling, f"{PREFIX[key]}MultiModalProjector")(_config(key)))


@pytest.mark.parametrize("key", sorted(PREFIX))
def test_mistral3_projector_matches_transformers(key):
    """Two images of two sizes: transformers' output and the gradients of the features and
    of every weight (the merging layer's through its column reordering); keyword call."""
    shape = assert_patched_matches(
        _projector(key), torch.randn(28, 8),
        lambda m, x: m(image_features=x, image_sizes=SIZES),
    )  # fmt: skip
    assert shape == (7, 20)


def test_mistral3_projector_bf16():
    """A bf16 projector: within bf16 rounding of the float64 one (output and gradients)."""
    assert_16_bit_close(_projector("mistral3").double(), torch.bfloat16, torch.randn(28, 8), SIZES)


@pytest.mark.parametrize(
    "features, sizes, why",
    [
        (torch.randn(20, 8), SIZES, "do not hold the features"),  # transformers' split
        (torch.randn(1, 28, 8), SIZES, "not \\(patches, channels\\)"),
        (torch.randn(6, 8), torch.tensor([[8, 12]]), "not made of 2 x 2"),  # unfold drops
    ],
)
def test_mistral3_projector_runs_the_class_forward_where_it_cannot_serve(features, sizes, why):
    """Sizes that do not hold the features, batched features, a grid side the window does
    not divide (unfold drops its last patches): transformers' result or error, from the
    class's forward, with a warning naming why."""
    ref = _projector("mistral3")
    mine = copy.deepcopy(ref)
    vt.patch(mine)
    assert re.search(why, assert_as_transformers(ref, mine, features, sizes)[0])


def test_mistral3_model_image_features_match_transformers():
    """A tiny Mistral 3 (one Pixtral layer) patched whole: its Pixtral attentions and its
    projector; image features from pixels of two sizes as transformers'."""
    modeling = _modeling("mistral3")
    config = _config("mistral3", num_hidden_layers=1, image_size=24)
    torch.manual_seed(0)
    ref = modeling.Mistral3ForConditionalGeneration(config).eval()
    randomise(ref.model.multi_modal_projector)
    mine = copy.deepcopy(ref)
    pixels = torch.randn(2, 3, 24, 24)
    sizes = torch.tensor([[16, 24], [24, 8]])
    with vt.patch(mine) as handle, torch.no_grad():
        assert "model.multi_modal_projector.forward" in handle.targets
        got = mine.model.get_image_features(pixels, sizes).pooler_output
        want = ref.model.get_image_features(pixels, sizes).pooler_output
    assert [t.shape for t in got] == [t.shape for t in want] == [(6, 20), (3, 20)]
    for a, b in zip(got, want, strict=True):
        assert max_rel(a, b) < TOL


def test_lighton_ocr_and_mistral_large4_models_patch_their_projector():
    """The full models (default configs, meta device) patch their projector."""
    for key, attr in (("lighton_ocr", "vision_projection"),
                      ("mistral_large4", "multi_modal_projector")):  # fmt: skip
        try:
            modeling = importlib.import_module(f"transformers.models.{key}.modeling_{key}")
        except ImportError:
            continue  # Mistral Large 4 is in transformers from 5.22
        cls = getattr(modeling, f"{PREFIX[key]}ForConditionalGeneration")
        with torch.device("meta"):
            model = cls(cls.config_class())
        with vt.patch(model) as handle:
            assert f"model.{attr}.forward" in handle.targets


@pytest.mark.parametrize("autocast", [False, True])
def test_mistral3_projector_float64_features_raise_as_transformers_does(autocast):
    """float64 features on an fp32 projector, outside autocast or under it (which leaves
    float64 uncast): the merging layer's RuntimeError, from the class's forward (was the
    merger's TypeError). Found by a connector-rows hunt."""
    ref = _projector("mistral3")
    mine = copy.deepcopy(ref)
    vt.patch(mine)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        why = assert_as_transformers(ref, mine, torch.randn(28, 8, dtype=torch.float64), SIZES)
    assert re.search("float64 and patch_merger.merging_layer torch.float32", why[0])


@pytest.mark.parametrize("sizes", [SIZES.float(), [(16.0, 24.0), (8.0, 8.0)]])
def test_mistral3_projector_float_image_sizes_raise_as_transformers_does(sizes):
    """image_sizes of floats (a float tensor or a list of floats): transformers' split raises
    its TypeError; the patched forward ran (int() on each size) and returned a result. Found
    by a connector-rows hunt."""
    ref = _projector("mistral3")
    mine = copy.deepcopy(ref)
    vt.patch(mine)
    assert re.search(
        "holds floats", assert_as_transformers(ref, mine, torch.randn(28, 8), sizes)[0]
    )


def test_mistral3_fp32_norm_in_a_bf16_projector_raises_as_transformers():
    """An fp32 RMSNorm in a bf16 projector outside autocast: Llama's norm promotes its
    result to fp32, which transformers' bf16 merging layer refuses; the patch runs the class
    forward for that error instead of returning a bf16 result."""
    ref = _projector("mistral3").bfloat16()
    ref.norm.float()
    mine = copy.deepcopy(ref)
    vt.patch(mine)
    why = assert_as_transformers(ref, mine, torch.randn(28, 8).bfloat16(), SIZES)
    assert "a torch.float32 RMSNorm" in why[0]


def test_mistral3_bf16_norm_on_fp32_features_runs_fused():
    """A bf16 RMSNorm in an fp32 projector: Llama's norm keeps the features' fp32 (the
    product promotes to fp32), as the fused norm does, so the fused forward serves it."""
    ref = _projector("mistral3")
    ref.norm.bfloat16()
    mine = copy.deepcopy(ref)
    vt.patch(mine)
    x = torch.randn(28, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PatchFallbackWarning)
        got = mine(x, SIZES)
    want = ref(x, SIZES)
    assert got.dtype == want.dtype == torch.float32 and max_rel(got, want) < TOL

"""vlmkernels.patch on PaddleOCR-VL's projector (per image: LayerNorm per patch, 2 x 2
windows side by side, Linear + GELU + Linear): outputs and gradients against transformers
on images of several grids (a two-frame one too), in fp32 and bf16; the class forward (and
transformers' errors) where its split or reshape refuses; the whole model patches it."""

import copy
import re

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

GRIDS = torch.tensor([[1, 4, 6], [2, 2, 4], [1, 2, 2]])  # 24 + 16 + 4 patches


def _projector():
    modeling = _modeling("paddleocr_vl")
    config = transformers.PaddleOCRVLConfig(
        vision_config={"hidden_size": 8, "num_attention_heads": 2, "intermediate_size": 16,
                       "spatial_merge_size": 2},
        text_config={"hidden_size": 20, "num_attention_heads": 2, "num_key_value_heads": 1,
                     "intermediate_size": 16, "head_dim": 10},
    )  # fmt: skip
    return randomise(modeling.PaddleOCRProjector(config))


def test_paddleocr_projector_matches_transformers():
    """Three images (one of two frames): transformers' output, the features' and every
    weight's gradients; positional and keyword calls; undo restores the class forward."""
    x = torch.randn(44, 8) + 3.0  # a mean the LayerNorm removes
    call = lambda m, t: m(image_features=t, image_grid_thw=GRIDS)  # noqa: E731
    assert assert_patched_matches(_projector(), x, call) == (11, 20)


def test_paddleocr_projector_bf16():
    """A bf16 projector: within bf16 rounding of the float64 one (output and gradients)."""
    assert_16_bit_close(_projector().double(), torch.bfloat16, torch.randn(44, 8), GRIDS)


@pytest.mark.parametrize(
    "features, grids, why",
    [
        (torch.randn(40, 8), GRIDS, "do not hold the features"),  # split refuses
        (torch.randn(6, 8), torch.tensor([[1, 2, 3]]), "not made of 2 x 2"),  # reshape
        (torch.randn(1, 44, 8), GRIDS, "not \\(patches, channels\\)"),
    ],
)
def test_paddleocr_projector_raises_as_transformers_does(features, grids, why):
    """Grids that do not hold the features, a side the window does not divide, a batched
    (1, P, C) input: transformers' own errors, from the class's forward."""
    ref = _projector()
    mine = copy.deepcopy(ref)
    vt.patch(mine)
    assert re.search(why, assert_as_transformers(ref, mine, features, grids)[0])


def test_paddleocr_whole_model_patches_its_projector():
    """The full model (default config, meta device) patches its projector."""
    modeling = _modeling("paddleocr_vl")
    cls = modeling.PaddleOCRVLForConditionalGeneration
    with torch.device("meta"):
        model = cls(cls.config_class())
    with vt.patch(model) as handle:
        assert "model.projector.forward" in handle.targets
    assert vt.support()["paddleocr_vl.connector"] == {"connector": "ok"}


def test_paddleocr_model_image_features_match_transformers():
    """A tiny PaddleOCR-VL (one vision layer) patched whole: its image features from pixels
    (the projector's input as the model hands it) are transformers'."""
    modeling = _modeling("paddleocr_vl")
    config = transformers.PaddleOCRVLConfig(
        vision_config={"hidden_size": 8, "num_attention_heads": 2, "intermediate_size": 16,
                       "spatial_merge_size": 2, "num_hidden_layers": 1, "patch_size": 4},
        text_config={"hidden_size": 20, "num_attention_heads": 2, "num_key_value_heads": 1,
                     "intermediate_size": 16, "head_dim": 10, "num_hidden_layers": 1,
                     "vocab_size": 64},
    )  # fmt: skip
    torch.manual_seed(0)
    ref = modeling.PaddleOCRVLForConditionalGeneration(config).eval()
    mine = copy.deepcopy(ref)
    grids = torch.tensor([[1, 4, 6], [1, 2, 4]])
    pixels = torch.randn(32, 3, 4, 4)
    with vt.patch(mine) as handle, torch.no_grad():
        assert "model.projector.forward" in handle.targets
        got = mine.model.get_image_features(pixels, grids).pooler_output
        want = ref.model.get_image_features(pixels, grids).pooler_output
    assert [t.shape for t in got] == [t.shape for t in want] == [(6, 20), (2, 20)]
    for a, b in zip(got, want, strict=True):
        assert max_rel(a, b) < TOL


@pytest.mark.parametrize("autocast", [False, True])
def test_paddleocr_projector_float64_features_raise_as_transformers_does(autocast):
    """float64 features on an fp32 projector, outside autocast or under it (which leaves
    float64 uncast): LayerNorm's RuntimeError, from the class's forward (was the merger's
    TypeError). Found by a connector-rows hunt."""
    ref = _projector()
    mine = copy.deepcopy(ref)
    vt.patch(mine)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        why = assert_as_transformers(ref, mine, torch.randn(44, 8, dtype=torch.float64), GRIDS)
    assert re.search("float64 and pre_norm.s parameters torch.float32", why[0])

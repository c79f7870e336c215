"""vlmkernels.patch on HunYuan-V4-VL's vision patch merger (RMSNorm, a 2 x 2 stride-2
convolution, GELU, a 1 x 1 convolution, a newline token after each row): outputs and
gradients against transformers on a two-frame grid, in fp32 and bf16; the class forward
where a convolution or the grid is not what the fused forward computes; the whole model
patches it."""

import copy
import re
import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from test_connectors_patch import (  # noqa: E402
    _modeling,
    assert_16_bit_close,
    assert_as_transformers,
    assert_patched_matches,
    max_rel,
    randomise,
)

import vlmkernels.integrations.transformers as vt  # noqa: E402
from vlmkernels.integrations.patching import PatchFallbackWarning  # noqa: E402


def _merger():
    modeling = _modeling("hy_v4_vl")  # (in transformers from 5.24)
    from transformers.models.hy_v4_vl.configuration_hy_v4_vl import HYV4VLVisionConfig

    config = HYV4VLVisionConfig(hidden_size=8, out_hidden_size=20, spatial_merge_size=2,
                                num_attention_heads=2, intermediate_size=16)  # fmt: skip
    return randomise(modeling.HYV4VLVisionPatchMerger(config))


def test_hy_v4_vl_merger_matches_transformers():
    """Two frames of 4 x 6 patches: transformers' output (newline tokens included) and the
    gradients of the features and every weight (the convolutions' as Linear weights)."""
    shape = assert_patched_matches(_merger(), torch.randn(1, 2 * 4 * 6, 8),
                                   lambda m, x: m(x, size=(4, 6)))  # fmt: skip
    assert shape == (1, 2 * 2 * 4, 20)


def test_hy_v4_vl_merger_bf16():
    """A bf16 merger: within bf16 rounding of the float64 one (output and gradients)."""
    assert_16_bit_close(_merger().double(), torch.bfloat16, torch.randn(1, 24, 8), (4, 6))


@pytest.mark.parametrize(
    "change, size, why",
    [
        (None, (5, 6), "in 2 x 2 windows"),  # the convolution drops the last row
        (None, (4, 5), "in 2 x 2 windows"),
        (lambda m: setattr(m.proj_conv, "stride", (1, 1)), (4, 6), "not a Linear"),
        (lambda m: setattr(m.proj_out, "padding", (1, 1)), (4, 6), "not a Linear"),
    ],
)
def test_hy_v4_vl_merger_runs_the_class_forward_where_it_cannot_serve(change, size, why):
    """A grid side the window does not divide, convolutions changed after patching:
    transformers' result or error, with a warning naming why."""
    ref = _merger()
    mine = copy.deepcopy(ref)
    vt.patch(mine)
    if change is not None:
        change(ref), change(mine)
    x = torch.randn(1, size[0] * size[1], 8)
    assert re.search(why, assert_as_transformers(ref, mine, x, size)[0])


def test_hy_v4_vl_whole_model_patches_its_merger():
    """The full model (default config, meta device) patches its vision merger."""
    modeling = _modeling("hy_v4_vl")
    cls = modeling.HYV4VLForConditionalGeneration
    with torch.device("meta"):
        model = cls(cls.config_class())
    mergers = [
        n for n, m in model.named_modules() if isinstance(m, modeling.HYV4VLVisionPatchMerger)
    ]
    with vt.patch(model) as handle:
        assert [f"{n}.forward" for n in mergers] == [
            t for t in handle.targets if t.endswith("patch_merger.forward")
        ]
    assert len(mergers) == 1 and isinstance(model.get_submodule(mergers[0]).proj_conv, nn.Conv2d)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_hy_v4_vl_merger_under_autocast(x_dtype):
    """Under CPU bf16 autocast with fp32 weights: transformers' result dtype (fp32: its
    newline, cast to the norm's fp32 result, promotes the convolutions' bf16 output) and
    an error against float64 within twice transformers'."""
    ref = _merger()
    mine = copy.deepcopy(ref)
    vt.patch(mine)
    x = torch.randn(1, 24, 8).to(x_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = ref(x, (4, 6)), mine(x, (4, 6))
    exact = copy.deepcopy(ref).double()(x.double(), (4, 6))
    assert got.dtype == want.dtype == torch.float32
    assert max_rel(got, exact) <= 2 * max_rel(want, exact) + 2e-3


def test_hy_v4_vl_merger_fp32_norm_in_a_bf16_merger_raises_as_transformers():
    """An fp32 RMSNorm in a bf16 merger outside autocast: Llama's norm promotes its result
    to fp32, which transformers' bf16 convolution refuses; the patch runs the class forward
    for that error instead of returning a bf16 result."""
    ref = _merger().bfloat16()
    ref.before_rms.float()
    mine = copy.deepcopy(ref)
    vt.patch(mine)
    why = assert_as_transformers(ref, mine, torch.randn(1, 24, 8).bfloat16(), (4, 6))
    assert "a torch.float32 RMSNorm" in why[0]


def test_hy_v4_vl_merger_bf16_norm_on_fp32_features_runs_fused():
    """A bf16 RMSNorm in an fp32 merger: Llama's norm keeps the features' fp32, as the
    fused norm does, so the fused forward serves it."""
    ref = _merger()
    ref.before_rms.bfloat16()
    mine = copy.deepcopy(ref)
    vt.patch(mine)
    x = torch.randn(1, 24, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PatchFallbackWarning)
        got = mine(x, (4, 6))
    want = ref(x, (4, 6))
    assert got.dtype == want.dtype == torch.float32 and max_rel(got, want) < 1e-5


@pytest.mark.parametrize(
    "change, size, autocast",
    [
        (None, (4.0, 6.0), False),  # transformers' reshape refuses float sizes
        (None, torch.tensor([4.0, 6.0]), False),
        ("no patches", (4, 6), False),  # its final reshape of 0 elements raises
        ("proj_out bfloat16", (4, 6), False),
        ("proj_out float64", (4, 6), True),  # autocast does not cast float64
        ("norm of one", (4, 6), False),  # Llama's norm broadcasts a weight of one element
        ("conv bias of one", (4, 6), False),
        ("newline (20, 1)", (4, 6), False),  # transformers reshapes it to (1, D, 1, 1)
        ("newline (4, 5)", (4, 6), False),
    ],
)
def test_hy_v4_vl_merger_on_what_transformers_refuses_or_takes_otherwise(change, size, autocast):
    """Sizes of floats, no patches, a 1 x 1 convolution of another dtype than the features,
    and weights of shapes transformers broadcasts, reshapes or refuses: its result or error,
    from the class's forward, where the fused forward returned a result (int() of each size,
    the empty merge), or raised the merger's TypeError or ValueError or expand's error."""
    ref = _merger()
    mine = copy.deepcopy(ref)
    vt.patch(mine)
    x = torch.randn(1, 24, 8)
    for m in (ref, mine):
        if change in ("proj_out bfloat16", "proj_out float64"):
            m.proj_out.to(getattr(torch, change.split()[1]))
        elif change == "norm of one":
            m.before_rms.weight = nn.Parameter(torch.full((1,), 0.5))
        elif change == "conv bias of one":
            m.proj_conv.bias = nn.Parameter(torch.ones(1))
        elif change is not None and change.startswith("newline"):
            shape = (20, 1) if "(20, 1)" in change else (4, 5)
            m.image_newline = nn.Parameter(torch.arange(20.0).reshape(shape))
    if change == "no patches":
        x = x[:, :0]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        assert assert_as_transformers(ref, mine, x, size)

"""vlmkernels.patch on the transformers connectors: each patched module (tiny config, random
weights, fp32) against an unpatched copy of itself: outputs, input and parameter gradients;
the same parameters and state_dict keys; recognised inside a foreign module tree; undo
restores the instance exactly."""

import copy

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import vlmkernels.integrations.transformers as vt  # noqa: E402

TOL = 1e-5


def max_rel(out, ref):
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def randomise(module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 1.0))
    return module


def llava():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    config = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=12, intermediate_size=16),
                         text_config=LlamaConfig(hidden_size=24, intermediate_size=16,
                                                 num_attention_heads=4),
                         projector_hidden_act="gelu")  # fmt: skip
    return LlavaMultiModalProjector(config), torch.randn(2, 5, 12)


def _shuffle(name):
    def build():
        if name == "idefics3":
            from transformers import Idefics3Config as Config
            from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector as Cls
        else:
            from transformers import SmolVLMConfig as Config
            from transformers.models.smolvlm.modeling_smolvlm import SmolVLMConnector as Cls
        config = Config(vision_config={"hidden_size": 8, "num_attention_heads": 2},
                        text_config={"hidden_size": 24, "num_attention_heads": 4},
                        scale_factor=2 if name == "idefics3" else 3)  # fmt: skip
        side = 2 * config.scale_factor
        return Cls(config), torch.randn(2, side * side, 8)

    return build


def internvl():
    from transformers import InternVLConfig
    from transformers.models.internvl.modeling_internvl import InternVLMultiModalProjector

    config = InternVLConfig(vision_config={"hidden_size": 6, "num_attention_heads": 2},
                            text_config={"hidden_size": 24, "num_attention_heads": 4,
                                         "num_key_value_heads": 2},
                            downsample_ratio=0.5, projector_hidden_act="gelu")  # fmt: skip
    return InternVLMultiModalProjector(config), torch.randn(2, 9, 24)


def qwen2():
    from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchMerger

    return PatchMerger(dim=10, context_dim=6, spatial_merge_size=2), torch.randn(28, 6)


def qwen2_5():
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLPatchMerger

    return Qwen2_5_VLPatchMerger(dim=10, context_dim=6, spatial_merge_size=2), torch.randn(28, 6)


def _qwen3(post):
    def build():
        from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionPatchMerger

        config = Qwen3VLVisionConfig(hidden_size=6, spatial_merge_size=2, out_hidden_size=10)
        return Qwen3VLVisionPatchMerger(config, use_postshuffle_norm=post), torch.randn(28, 6)

    return build


CASES = {"llava": llava, "idefics3": _shuffle("idefics3"), "smolvlm": _shuffle("smolvlm"),
         "internvl": internvl, "qwen2_vl": qwen2, "qwen2_5_vl": qwen2_5,
         "qwen3_vl": _qwen3(False), "qwen3_vl_postshuffle": _qwen3(True)}  # fmt: skip


class Wrapper(nn.Module):
    """A model outside transformers holding a connector."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


@pytest.mark.parametrize("name", list(CASES))
def test_patched_connector_matches_transformers(name):
    module, x = CASES[name]()
    ref = randomise(module)
    mine = Wrapper(copy.deepcopy(ref))
    keys = list(mine.inner.state_dict())
    with vt.patch(mine) as handle:
        assert handle.targets == ("inner.forward",)
        assert list(mine.inner.state_dict()) == keys == list(ref.state_dict())
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        out, want = mine(x1), ref(x2)
        assert out.shape == want.shape
        assert max_rel(out, want) < TOL, max_rel(out, want)
        g = torch.randn_like(want)
        out.backward(g)
        want.backward(g)
        assert max_rel(x1.grad, x2.grad) < TOL
        for (n, p), q in zip(mine.inner.named_parameters(), ref.parameters(), strict=True):
            assert max_rel(p.grad, q.grad) < TOL, (n, max_rel(p.grad, q.grad))
    assert "forward" not in mine.inner.__dict__


def test_connector_patched_as_root_and_switched_off():
    module, x = llava()
    with vt.patch(module) as handle:
        assert handle.targets == ("<root>.forward",)
    assert "forward" not in module.__dict__
    with pytest.raises(ValueError, match="nothing to patch"):
        vt.patch(module, connector=False)


def test_refuses_tanh_gelu():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    config = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=12),
                         text_config=LlamaConfig(hidden_size=24, num_attention_heads=4),
                         projector_hidden_act="gelu_pytorch_tanh")  # fmt: skip
    module = LlavaMultiModalProjector(config)
    with pytest.raises(vt.UnsupportedLayoutError, match="not exact GELU"):
        vt.patch(module)
    assert "forward" not in module.__dict__


def test_deepstack_process():
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextModel

    config = Qwen3VLTextConfig(hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                               vocab_size=32, rope_parameters={"rope_type": "default",
                               "rope_theta": 10000.0, "mrope_section": [2, 1, 1]})  # fmt: skip
    model = Qwen3VLTextModel(config)
    hidden = torch.randn(2, 7, 16, requires_grad=True)
    mask = torch.rand(2, 7) < 0.5
    embeds = torch.randn(int(mask.sum()), 16, requires_grad=True)
    want = Qwen3VLTextModel._deepstack_process(model, hidden, mask, embeds)
    with vt.patch(model, rope=False) as handle:
        assert handle.targets == ("<root>._deepstack_process",)
        out = model._deepstack_process(hidden, mask, embeds)
    assert "_deepstack_process" not in model.__dict__
    assert torch.equal(out, want)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [hidden, embeds], g)
    ref = torch.autograd.grad(want, [hidden, embeds], g)
    assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))

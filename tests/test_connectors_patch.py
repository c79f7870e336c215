"""vlmkernels.patch on the transformers connectors: each patched module (tiny config, random
weights, fp32) against an unpatched copy of itself: outputs, input and parameter gradients;
the same parameters and state_dict keys; recognised inside a foreign module tree; undo
restores the instance exactly; under autocast, bf16 as transformers' linears compute."""

import copy
import functools
import importlib
import re
import warnings
from math import isqrt

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import vlmkernels.integrations.transformers as vt  # noqa: E402
from vlmkernels.core.runtime import INTERPRETED  # noqa: E402
from vlmkernels.integrations.patching import PatchFallbackWarning, is_patched  # noqa: E402

TOL = 1e-5


def max_rel(out, ref):
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def randomise(module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 1.0))
    return module


def assert_patched_matches(ref, x, call=None):
    """A patched copy of ``ref`` (the module as its only target) against ``ref`` on
    features ``x``: ``call(module, x)`` (default ``module(x)``) gives ``ref``'s output
    within TOL, and the same gradients of x and of every parameter; undo restores the class
    forward. Returns the output's shape."""
    call = call or (lambda m, t: m(t))
    mine = copy.deepcopy(ref)
    with vt.patch(mine) as handle:
        assert handle.targets == ("<root>.forward",)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        out, want = call(mine, x1), call(ref, x2)
        assert out.shape == want.shape and max_rel(out, want) < TOL, max_rel(out, want)
        g = torch.randn_like(want)
        out.backward(g)
        want.backward(g)
        assert max_rel(x1.grad, x2.grad) < TOL
        for (name, p), q in zip(mine.named_parameters(), ref.parameters(), strict=True):
            assert max_rel(p.grad, q.grad) < TOL, name
    assert "forward" not in mine.__dict__
    return tuple(out.shape)


def assert_16_bit_close(exact, dtype, x, *args):
    """A copy of the float64 module ``exact`` in ``dtype``, patched, called on ``x`` (and
    ``args``, as given): its output and the gradients of x and every parameter within
    16-bit rounding (2e-2 relative) of the float64 module's."""
    mine = copy.deepcopy(exact).to(dtype)
    vt.patch(mine)
    x16 = x.to(dtype).requires_grad_()
    x64 = x16.detach().double().requires_grad_()
    out, want = mine(x16, *args), exact(x64, *args)
    assert out.dtype == dtype and max_rel(out, want) < 2e-2
    g = torch.randn_like(want)
    out.backward(g.to(dtype))
    want.backward(g)
    assert max_rel(x16.grad, x64.grad) < 2e-2
    for (name, p), q in zip(mine.named_parameters(), exact.parameters(), strict=True):
        assert max_rel(p.grad, q.grad) < 2e-2, name


def assert_as_transformers(ref, mine, *args, same=torch.equal) -> list[str]:
    """``mine(*args)`` (a patched copy of ``ref``) gives ``ref``'s result (``same(got,
    want)``, by default bitwise), or raises its exception with its message; returns the
    messages of the PatchFallbackWarnings shown."""
    try:
        want, error = ref(*args), None
    except Exception as e:  # noqa: BLE001 (whatever transformers raises)
        want, error = None, e
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", PatchFallbackWarning)
        if error is None:
            assert same(mine(*args), want)
        else:
            with pytest.raises(type(error), match=re.escape(str(error))):
                mine(*args)
    return [str(w.message) for w in seen if issubclass(w.category, PatchFallbackWarning)]


def _modeling(key: str):
    """transformers' modeling module of ``key``; the test is skipped where the installed
    transformers predates the model."""
    return pytest.importorskip(f"transformers.models.{key}.modeling_{key}")


def _llava_like(key, prefix):
    def build():
        from transformers import CLIPVisionConfig, LlamaConfig

        modeling = _modeling(key)
        config = getattr(transformers, f"{prefix}Config")(
            vision_config=CLIPVisionConfig(hidden_size=12, intermediate_size=16),
            text_config=LlamaConfig(hidden_size=24, intermediate_size=16, num_attention_heads=4),
            projector_hidden_act="gelu",
        )
        return getattr(modeling, f"{prefix}MultiModalProjector")(config), torch.randn(2, 5, 12)

    return build


llava = _llava_like("llava", "Llava")


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


def _tiny_config(name: str, **fields):
    """``transformers.<name>`` with a 6-wide vision config of 2 heads and a 24-wide text
    config of 4 heads (2 KV heads), and ``fields``."""
    return getattr(transformers, name)(
        vision_config={"hidden_size": 6, "num_attention_heads": 2},
        text_config={"hidden_size": 24, "num_attention_heads": 4, "num_key_value_heads": 2},
        **fields,
    )


def _internvl_like(key, prefix):
    def build():
        modeling = _modeling(key)
        config = _tiny_config(f"{prefix}Config", downsample_ratio=0.5, projector_hidden_act="gelu")
        return getattr(modeling, f"{prefix}MultiModalProjector")(config), torch.randn(2, 9, 24)

    return build


internvl = _internvl_like("internvl", "InternVL")


def vipllava():
    modeling = _modeling("vipllava")
    config = _tiny_config("VipLlavaConfig", projector_hidden_act="gelu")
    # five feature layers: (B, S, 5 x 6) features
    return modeling.VipLlavaMultiModalProjector(config), torch.randn(2, 7, 30)


def _granite_docling():
    modeling = _modeling("granite_docling")
    config = importlib.import_module(
        "transformers.models.granite_docling.configuration_granite_docling"
    ).GraniteDoclingVisionConfig(hidden_size=6, out_hidden_size=10, num_attention_heads=2)
    return modeling.GraniteDoclingDeepStackMerger(config, 2), torch.randn(2, 4, 24)


def _perception_lm(ratio=2):
    def build():
        modeling = _modeling("perception_lm")
        config = transformers.PerceptionLMConfig(
            vision_config={"architecture": "vit_pe_core_large_patch14_336",
                           "model_args": {"embed_dim": 12}, "num_classes": 0},
            text_config={"hidden_size": 24, "num_attention_heads": 4, "num_key_value_heads": 2,
                         "model_type": "llama"},
            projector_pooling_ratio=ratio,
        )  # fmt: skip
        # (B, 4 x 4, C) features, pooled to 2 x 2 (ratio 2)
        return modeling.PerceptionLMMultiModalProjector(config), torch.randn(2, 16, 12)

    return build


def _lfm2_vl(layer_norm=True):
    def build():
        modeling = _modeling("lfm2_vl")
        config = _tiny_config("Lfm2VlConfig", projector_hidden_size=16, downsample_factor=2,
                              projector_use_layernorm=layer_norm)  # fmt: skip
        # (B, W, H, C) features of a 4 x 6 grid: 2 x 3 merged rows per sample
        return modeling.Lfm2VlMultiModalProjector(config), torch.randn(2, 4, 6, 6)

    return build


def lfm3_vl():
    modeling = _modeling("lfm3_vl")
    # LayerNorm on each 6-wide token, 2 x 2 tokens one row
    config = _tiny_config("Lfm3VlConfig", projector_hidden_size=16)
    return modeling.Lfm3VlMultiModalProjector(config), torch.randn(28, 6)


def kimi_k25():
    modeling = _modeling("kimi_k25")
    # (N, 2 x 2, C) merged groups in, (N, 1, 24) out
    config = _tiny_config("Kimi_K25Config", projection_hidden_size=6)
    return modeling.Kimi_K25MultimodalProjection(config), torch.randn(7, 4, 6)


def qwen2():
    from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchMerger

    return PatchMerger(dim=10, context_dim=6, spatial_merge_size=2), torch.randn(28, 6)


def qwen2_5():
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLPatchMerger

    return Qwen2_5_VLPatchMerger(dim=10, context_dim=6, spatial_merge_size=2), torch.randn(28, 6)


def _qwen3(post, key="qwen3_vl", prefix="Qwen3VL"):
    def build():
        import importlib

        config_module = importlib.import_module(f"transformers.models.{key}.configuration_{key}")
        modeling = importlib.import_module(f"transformers.models.{key}.modeling_{key}")
        config = getattr(config_module, f"{prefix}VisionConfig")(
            hidden_size=6, spatial_merge_size=2, out_hidden_size=10
        )
        merger = getattr(modeling, f"{prefix}VisionPatchMerger")
        return merger(config, use_postshuffle_norm=post), torch.randn(28, 6)

    return build


def _gemma3(key="gemma3", prefix="Gemma3"):
    def build():
        modeling = _modeling(key)
        config_module = importlib.import_module(f"transformers.models.{key}.configuration_{key}")
        vision = {
            "hidden_size": 12,
            "image_size": 56,
            "patch_size": 7,
            "num_attention_heads": 2,
            "intermediate_size": 16,
        }
        text = {
            "hidden_size": 20,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 8,
            "intermediate_size": 16,
        }
        if key == "gemma3":
            config = config_module.Gemma3Config(
                vision_config=vision, text_config=text, mm_tokens_per_image=4
            )
        else:
            config = config_module.T5Gemma2EncoderConfig(
                vision_config=vision, text_config=text, mm_tokens_per_image=4
            )
        # (B, 8 x 8 patches, 12) pooled 4 x 4 to 2 x 2, RMSNorm, @ (12, 20)
        return getattr(modeling, f"{prefix}MultiModalProjector")(config), torch.randn(2, 64, 12)

    return build


CASES = {"llava": llava, "idefics3": _shuffle("idefics3"), "smolvlm": _shuffle("smolvlm"),
         "internvl": internvl, "vipllava": vipllava, "lfm2_vl": _lfm2_vl(),
         "lfm3_vl": lfm3_vl,
         "kimi_k25": kimi_k25, "perception_lm": _perception_lm(), "gemma3": _gemma3(),
         "qwen2_vl": qwen2,
         "qwen2_5_vl": qwen2_5,
         "qwen3_vl": _qwen3(False), "qwen3_vl_postshuffle": _qwen3(True)}  # fmt: skip


def _qwen2_like(key, cls):
    def build():
        merger = getattr(_modeling(key), cls)
        return merger(dim=10, context_dim=6, spatial_merge_size=2), torch.randn(28, 6)

    return build


def _inkling2():
    modeling = _modeling("inkling2")
    config = importlib.import_module(
        "transformers.models.inkling2.configuration_inkling2"
    ).Inkling2VisionConfig(hidden_size=6, spatial_merge_size=2, projection_hidden_dim=16,
                           text_hidden_size=10, projector_bias=True)  # fmt: skip
    return modeling.Inkling2VisionMerger(config), torch.randn(7, 24)


def _cosmos3_edge():
    modeling = _modeling("cosmos3_edge")
    config = transformers.Cosmos3EdgeConfig(
        text_config={"hidden_size": 10, "num_attention_heads": 2, "num_key_value_heads": 1},
        vision_config={"hidden_size": 6, "num_attention_heads": 2, "spatial_merge_size": 2},
        projector_hidden_size=16,
    )
    return modeling.Cosmos3EdgePatchMerger(config), torch.randn(28, 6)


def _qwen3_omni(post):
    def build():
        modeling = _modeling("qwen3_omni_moe")
        config = importlib.import_module(
            "transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe"
        ).Qwen3OmniMoeVisionEncoderConfig(hidden_size=6, spatial_merge_size=2, out_hidden_size=10)
        merger = modeling.Qwen3OmniMoeVisionPatchMerger(config, use_postshuffle_norm=post)
        return merger, torch.randn(28, 6)

    return build


def _onevision1_5():
    modeling = _modeling("llava_onevision1_5")
    config = modeling.LlavaOnevision15VisionConfig(
        hidden_size=8, num_heads=2, spatial_merge_size=2, out_hidden_size=10
    )
    return modeling.LlavaOnevision15VisionPatchMerger(config), torch.randn(28, 8)


def _mlp_named(key, cls, **config):
    """LLaVA's MLP under other names: DeepSeek-VL's aligner, VideoLLaMA 3's projector,
    MiniMax-M3-VL's projector (two MLPs, 2 x 2 merge windows between them)."""

    def build():
        modeling = _modeling(key)
        config_cls = getattr(transformers, {"deepseek_vl": "DeepseekVLConfig",
                                            "video_llama_3": "VideoLlama3Config",
                                            "minimax_m3_vl": "MiniMaxM3VLConfig"}[key])  # fmt: skip
        vision = dict(hidden_size=12, num_attention_heads=2, intermediate_size=16,
                      spatial_merge_size=2)  # fmt: skip
        # (transformers 5.16 and 5.17 need VideoLLaMA 3's text model type)
        text = dict(hidden_size=20, num_attention_heads=2, num_key_value_heads=1,
                    intermediate_size=16, model_type="qwen2")  # fmt: skip
        module = getattr(modeling, cls)(config_cls(vision_config=vision, text_config=text,
                                                   **config))  # fmt: skip
        return module, torch.randn(28, 12) if key == "minimax_m3_vl" else torch.randn(2, 5, 12)

    return build


def _vbert(key, prefix):
    """Idefics3's connector under another name: ModernVBERT's; UltraVBERT's, with an
    RMSNorm after the projection."""

    def build():
        modeling = _modeling(key)
        config = getattr(transformers, f"{prefix}Config")(
            vision_config={"hidden_size": 8, "num_attention_heads": 2, "intermediate_size": 16},
            text_config={"hidden_size": 20, "num_attention_heads": 2, "intermediate_size": 16},
            pixel_shuffle_factor=2,
        )
        return getattr(modeling, f"{prefix}Connector")(config), torch.randn(2, 36, 8)

    return build


def _gated(key, prefix):
    """Aya Vision's and Command A Vision's SwiGLU projectors (pixel shuffle, Aya's
    LayerNorm, Linear, SiLU-gated half, Linear)."""

    def build():
        modeling = _modeling(key)
        config = getattr(transformers, f"{prefix}Config")(
            vision_config={"hidden_size": 8, "num_attention_heads": 2, "intermediate_size": 16},
            text_config={"hidden_size": 20, "num_attention_heads": 2, "num_key_value_heads": 1,
                         "intermediate_size": 16, "head_dim": 10},
            downsample_factor=2, alignment_intermediate_size=24,
        )  # fmt: skip
        return getattr(modeling, f"{prefix}MultiModalProjector")(config), torch.randn(2, 36, 8)

    return build


def _janus(depth):
    def build():
        modeling = _modeling("janus")
        config = importlib.import_module(
            "transformers.models.janus.configuration_janus"
        ).JanusVisionConfig(hidden_size=12, projection_dim=20, depth=depth, num_attention_heads=2)
        return modeling.JanusVisionAlignerMLP(config), torch.randn(2, 5, 12)

    return build


# The same code as a CASES class under another name: checked against transformers, not run
# through every CASES test again. Qwen3.5 and Qwen3.5-MoE: Qwen3-VL's merger (the same
# code, config fields and use_postshuffle_norm; their vision towers build it without the
# post-shuffle norm); EXAONE 4.5's and Qwen2.5-Omni's mergers are Qwen2.5-VL's (RMSNorm),
# dots3.note's Qwen2-VL's, LLaVA-OneVision-1.5's, Cohere Compass's and Qwen4-Exp's Qwen3-VL's;
# LLaVA-NeXT-Video's and Video-LLaVA's projectors LLaVA's, Qianfan-OCR's InternVL's (on
# features the model shuffled). And LLaVA's forward with the layers sized from other config
# fields: FastVLM's projector, Inkling2's merger; VipLLaVA's with another norm name:
# Granite-Docling's DeepStack mergers; Qwen3-VL's forward in Cosmos3-Edge's merger and, with
# Qwen2-VL's names and a ModuleList, Qwen3-Omni-MoE's. (And LFM2-VL's projector built
# without its norm; T5Gemma 2's projector, Gemma 3's; LLaVA's MLP in DeepSeek-VL's aligner,
# VideoLLaMA 3's Sequential and, twice, MiniMax-M3-VL's projector; Idefics3's connector in
# ModernVBERT's and UltraVBERT's, the latter with a norm after it; and the first linear of
# Aya Vision's and Command A Vision's SwiGLU projectors; Janus's aligner at depth 2 and 3.)
SAME_CODE = {"qwen3_5": _qwen3(False, "qwen3_5", "Qwen3_5"),
             "qwen3_5_moe": _qwen3(False, "qwen3_5_moe", "Qwen3_5Moe"),
             "exaone4_5": _qwen2_like("exaone4_5", "Exaone4_5_PatchMerger"),
             "qwen2_5_omni": _qwen2_like("qwen2_5_omni", "Qwen2_5OmniPatchMerger"),
             "cohere_compass": _qwen3(False, "cohere_compass", "CohereCompass"),
             "qwen4_exp": _qwen3(False, "qwen4_exp", "Qwen4Exp"),
             "fast_vlm": _llava_like("fast_vlm", "FastVlm"), "inkling2": _inkling2,
             "qianfan_ocr": _internvl_like("qianfan_ocr", "QianfanOCR"),
             "dots3_note": _qwen2_like("dots3_note", "Dots3NoteVisionMerger"),
             "llava_onevision1_5": _onevision1_5,
             "granite_docling": _granite_docling, "cosmos3_edge": _cosmos3_edge,
             "qwen3_omni_moe": _qwen3_omni(False), "qwen3_omni_moe_postshuffle": _qwen3_omni(True),
             "lfm2_vl_no_norm": _lfm2_vl(layer_norm=False),
             "llava_next_video": _llava_like("llava_next_video", "LlavaNextVideo"),
             "video_llava": _llava_like("video_llava", "VideoLlava"),
             "t5gemma2": _gemma3("t5gemma2", "T5Gemma2"),
             "deepseek_vl": _mlp_named("deepseek_vl", "DeepseekVLAligner"),
             "video_llama_3": _mlp_named("video_llama_3", "VideoLlama3Projector"),
             "minimax_m3_vl": _mlp_named("minimax_m3_vl", "MiniMaxM3VLMultiModalProjector",
                                         projector_hidden_size=16),
             "modernvbert": _vbert("modernvbert", "ModernVBert"),
             "ultravbert": _vbert("ultravbert", "UltraVBert"),
             "aya_vision": _gated("aya_vision", "AyaVision"),
             "cohere2_vision": _gated("cohere2_vision", "Cohere2Vision"),
             "janus": _janus(2), "janus_depth3": _janus(3)}  # fmt: skip


class Wrapper(nn.Module):
    """A model outside transformers holding a connector."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def test_unpatch_a_copy_of_a_patched_model():
    """A deep copy (an EMA or teacher model) carries the patch, bound to itself, and no
    handle: vlmkernels.unpatch removes it; the original's handle then still undoes its own
    instance, and undoing after unpatch on the same instance is a no-op."""
    module, x = CASES["qwen2_5_vl"]()
    model = Wrapper(randomise(module))
    before = {n: set(vars(m)) for n, m in model.named_modules()}
    ref = model(x)
    handle = vt.patch(model)
    twin = copy.deepcopy(model)
    with pytest.raises(vt.AlreadyPatchedError, match=r"vlmkernels.unpatch\(model\)"):
        vt.patch(twin)
    assert vt.unpatch(twin) == 2  # the fused forward and the data-parallel replication
    assert {n: set(vars(m)) for n, m in twin.named_modules()} == before
    assert torch.equal(twin(x), ref)
    assert vt.unpatch(twin) == 0
    vt.patch(twin).undo()  # patchable again
    assert vt.unpatch(model) == 2
    handle.undo()  # nothing left: no error
    assert not handle.active
    assert {n: set(vars(m)) for n, m in model.named_modules()} == before
    with pytest.raises(TypeError, match="unpatch: model must be an nn.Module, got NoneType"):
        vt.unpatch(None)


def test_undo_warns_about_copies_made_inside_the_model():
    """A copy of a patched module put in the model after patching (PEFT's
    modules_to_save, an EMA submodule) carries the patch, which undo() leaves: it says so
    and names them (it was silent); unpatch removes them."""
    module, x = CASES["llava"]()
    model = Wrapper(randomise(module))
    handle = vt.patch(model)
    model.extra = copy.deepcopy(model.inner)
    with pytest.warns(UserWarning, match=r"extra\.forward still run patched code"):
        handle.undo()
    assert vt.unpatch(model) == 2


def test_undo_warning_points_at_the_undo():
    """The warning about copies left patched names the line that undid the patch, by
    ``undo()`` or by leaving a ``with vlmkernels.patch(...)`` block, not a line inside
    vlmkernels."""
    for use_with in (False, True):
        module, x = CASES["llava"]()
        model = Wrapper(module)
        with pytest.warns(UserWarning, match="still run patched code") as record:
            if use_with:
                with vt.patch(model):
                    model.extra = copy.deepcopy(model.inner)
            else:
                handle = vt.patch(model)
                model.extra = copy.deepcopy(model.inner)
                handle.undo()
        assert [w.filename for w in record] == [__file__]
        vt.unpatch(model)


@pytest.mark.parametrize("name", [*CASES, *SAME_CODE])
def test_patched_connector_matches_transformers(name):
    module, x = {**CASES, **SAME_CODE}[name]()
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


@pytest.mark.parametrize("build", [qwen2, qwen2_5])
def test_merger_norm_changed_after_patching_is_followed(build):
    """The merger's norm is read on every call: an eps set, or a norm of the same class
    (with a bias where there was none) put in, after patching."""
    module, x = build()
    ref = randomise(module)
    mine = copy.deepcopy(ref)
    with vt.patch(mine):
        for m in (mine, ref):
            if hasattr(m.ln_q, "variance_epsilon"):
                m.ln_q.variance_epsilon = 0.5
            else:
                m.ln_q.eps = 0.5
        assert max_rel(mine(x), ref(x)) < TOL
        if isinstance(ref.ln_q, nn.LayerNorm):
            new = randomise(nn.LayerNorm(ref.ln_q.normalized_shape, eps=0.25))
            mine.ln_q, ref.ln_q = copy.deepcopy(new), new
            assert max_rel(mine(x), ref(x)) < TOL


@pytest.mark.parametrize("post", [False, True])
@pytest.mark.parametrize("name", ["qwen3_vl", "qwen3_omni_moe"])
def test_merger_postshuffle_flag_flipped_after_patching_is_followed(name, post):
    """Qwen3-VL's and Qwen3-Omni-MoE's mergers read ``use_postshuffle_norm`` on every call:
    the flag flipped after patching, with a norm of the new width put in (a LayerNorm, the
    class the patch checked), gives transformers' result, not an error from the patched
    layout's norm width."""
    module, x = {"qwen3_vl": _qwen3, "qwen3_omni_moe": _qwen3_omni}[name](post)()
    ref = randomise(module)
    mine = copy.deepcopy(ref)
    name = "ln_q" if hasattr(ref, "ln_q") else "norm"
    new = randomise(nn.LayerNorm(6 if post else 24, eps=1e-6))
    with vt.patch(mine):
        for m in (mine, ref):
            m.use_postshuffle_norm = not post
            setattr(m, name, copy.deepcopy(new))
        assert max_rel(mine(x), ref(x)) < TOL


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen3_vl"])
def test_gelu_made_tanh_after_patching_runs_the_class_forward(name):
    """The fused merger computes exact GELU: its nn.GELU switched to the tanh approximation
    after patching (the same class) runs the class's forward, warning, with transformers'
    result; switched back, the fused forward again."""
    module, x = CASES[name]()
    ref = randomise(module)
    mine = copy.deepcopy(ref)

    def act(m):
        return m.mlp[1] if hasattr(m, "mlp") else m.act_fn

    with vt.patch(mine), torch.no_grad():
        fused = mine(x * 3)
        for m in (mine, ref):
            act(m).approximate = "tanh"
        with pytest.warns(PatchFallbackWarning, match="approximate='tanh', patched with 'none'"):
            got = mine(x * 3)
        assert max_rel(got, ref(x * 3)) < TOL and max_rel(got, fused) > 1e-5
        act(mine).approximate = "none"
        with warnings.catch_warnings():
            warnings.simplefilter("error", PatchFallbackWarning)
            assert torch.equal(mine(x * 3), fused)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [0.0, 60.0])
def test_patched_connector_under_autocast(name, x_dtype, offset):
    """Under autocast with fp32 weights (mixed-precision training's master weights), fp32 or
    bf16 features: the patched connector computes in bf16 as transformers' linears do, returns
    bf16, and its output and gradients (fp32, for the fp32 weights) are as close to the
    float64 ones as transformers' own. Also for features with a large mean (``offset``),
    which a norm's fp32 statistics must see before any rounding to bf16."""
    module, x = CASES[name]()
    ref = randomise(module)
    mine = copy.deepcopy(ref)
    exact = copy.deepcopy(ref).double()
    x = (x + offset).to(x_dtype)
    leaves = []
    outs = []
    with vt.patch(mine):
        for model in (mine, ref):
            xi = x.clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(xi)
            g = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
            out.float().backward(g)
            outs.append(out)
            leaves.append([xi.grad, *(p.grad for p in model.parameters())])
    x64 = x.double().requires_grad_()
    want = exact(x64)
    want.backward(torch.linspace(-1, 1, want.numel(), dtype=torch.float64).reshape(want.shape))
    exact_grads = [x64.grad, *(p.grad for p in exact.parameters())]
    # Triton's CPU interpreter truncates fp32 -> bf16 where GPUs round to nearest: twice
    # the rounding error of each bf16 result
    factor = 4 if INTERPRETED and not torch.cuda.is_available() else 2
    # Gemma 3's projector casts its result back to the features' dtype (type_as)
    assert outs[0].dtype == outs[1].dtype == (x_dtype if name == "gemma3" else torch.bfloat16)
    err_mine, err_ref = (max_rel(o.double(), want) for o in outs)
    assert err_mine <= factor * err_ref + 2e-3, (err_mine, err_ref)
    for mine_g, ref_g, e in zip(*leaves, exact_grads, strict=True):
        assert mine_g.dtype == ref_g.dtype
        err_mine, err_ref = max_rel(mine_g.double(), e), max_rel(ref_g.double(), e)
        assert err_mine <= factor * err_ref + 2e-3, (err_mine, err_ref)


def _within(tol: float, label):
    """A ``same`` for :func:`assert_as_transformers`: the result's dtype, and its values
    bitwise (``tol`` 0) or within ``tol`` relative; ``label`` names the case."""

    def same(got, want) -> bool:
        assert got.dtype == want.dtype, label
        if tol == 0:
            assert torch.equal(got, want), label
        else:
            assert max_rel(got, want) < tol, (label, max_rel(got, want))
        return True

    return same


# (features, norm parameters) dtypes outside autocast: torch's layer_norm takes fp32
# parameters with 16-bit features and refuses the other mixes; Llama's RMSNorm promotes its
# result (bf16 features, an fp32 norm: fp32, which a bf16 linear refuses)
_NORM_MIXES = [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
               (torch.float16, torch.bfloat16), (torch.float64, torch.float32)]  # fmt: skip


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("name", [*CASES, *SAME_CODE])
def test_norm_of_another_dtype_than_the_features_as_transformers(name, autocast):
    """A norm whose parameters are of another dtype than the features and the linears, also
    under CPU autocast (which leaves layer_norm's dtypes as they are, where CUDA's runs it in
    fp32): the patched module gives transformers' result (fused where the norm takes them
    and returns the features' dtype) or raises transformers' error, where the fused norm
    prologue, which reads parameters of any float dtype, would have returned a result (fp32
    features and a bf16 LayerNorm, for one)."""
    module, x = {**CASES, **SAME_CODE}[name]()
    base = randomise(module)
    norms = [
        n
        for n, m in base.named_modules()
        if "norm" in type(m).__name__.lower() and getattr(m, "weight", None) is not None
    ]
    if not norms:
        pytest.skip("no norm")
    for x_dtype, norm_dtype in _NORM_MIXES:
        ref = copy.deepcopy(base).to(x_dtype)
        for n in norms:
            ref.get_submodule(n).to(norm_dtype)
        mine = copy.deepcopy(ref)
        vt.patch(mine)
        # (16-bit intermediates round in other places than transformers' separate layers)
        exact = {x_dtype, norm_dtype} <= {torch.float32, torch.float64} and not autocast
        same = _within(TOL if exact else 4e-2, (x_dtype, norm_dtype))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            assert_as_transformers(ref, mine, x.to(x_dtype), same=same)


def _other_dtypes(module, x):
    """(what, module, features): features of another dtype than an fp32 module's (fp16, and
    integers), and a module whose first and last biased Linears hold a bias of another dtype
    than their weight."""
    yield "fp16 features", module, x.half()
    yield "integer features", module, (x * 10).long()
    biased = [
        n for n, m in module.named_modules() if isinstance(m, nn.Linear) and m.bias is not None
    ]
    for name, dtype in zip(biased[:1] + biased[-1:], (torch.bfloat16, torch.float64), strict=False):
        changed = copy.deepcopy(module)
        changed.get_submodule(name).bias.data = changed.get_submodule(name).bias.data.to(dtype)
        yield f"a {dtype} bias in {name}", changed, x


@pytest.mark.parametrize("name", [*CASES, *SAME_CODE])
def test_dtypes_torch_refuses_as_transformers(name):
    """Features of another dtype than the linears, or a bias of another dtype than its
    weight, outside autocast: the patched module raises transformers' (torch's) error, or
    gives its result where transformers computes one (a 3-D input's bias is added after the
    matmul, which promotes), where the fused ops raised their own TypeError."""
    module, x = {**CASES, **SAME_CODE}[name]()
    for what, ref, xi in _other_dtypes(randomise(module), x):
        mine = copy.deepcopy(ref)
        vt.patch(mine)
        assert_as_transformers(ref, mine, xi, same=_within(0, what))


@pytest.mark.parametrize("name", ["idefics3", "smolvlm"])
def test_shuffle_of_features_whose_token_rows_are_not_contiguous_as_transformers(name):
    """Features whose token rows do not follow each other in memory (a transposed copy):
    transformers' pixel shuffle ``view`` refuses them, so the patched connector runs the
    class's forward for that RuntimeError, as the vBERT connectors (the same shuffle) do,
    where the fused merger, which reads any strides, returned a result."""
    module, x = CASES[name]()
    ref = randomise(module)
    mine = copy.deepcopy(ref)
    vt.patch(mine)
    x = x.transpose(1, 2).contiguous().transpose(1, 2)
    with pytest.raises(RuntimeError):
        ref(x)
    assert assert_as_transformers(ref, mine, x)  # (its error, from the class's forward)


def _same_meta(got, want) -> bool:
    """Results on the meta device (no values): the same device, shape and dtype."""
    return (got.device, got.shape, got.dtype) == (want.device, want.shape, want.dtype)


@pytest.mark.parametrize("name", [*CASES, *SAME_CODE])
def test_weights_on_another_device_as_transformers(name):
    """A module whose weights are on another device than the features (a model on the GPU,
    its features left on the CPU; here the meta device), either way: the class's forward
    runs, for transformers' error (or its result), where the fused ops raised their own
    TypeError or ValueError."""
    module, x = {**CASES, **SAME_CODE}[name]()
    ref = randomise(module)
    for model, xi in ((copy.deepcopy(ref).to("meta"), x), (ref, x.to("meta"))):
        mine = copy.deepcopy(model)
        vt.patch(mine)
        assert_as_transformers(model, mine, xi, same=_same_meta)


class LoraLinear(nn.Module):
    """A PEFT-style LoRA wrapper: ``weight`` is the base layer's, the forward adds B A x."""

    def __init__(self, base: nn.Linear, rank: int = 2):
        super().__init__()
        self.base_layer = base
        self.lora_a = nn.Linear(base.in_features, rank, bias=False)
        self.lora_b = nn.Linear(rank, base.out_features, bias=False)
        randomise(self.lora_a), randomise(self.lora_b)

    @property
    def weight(self):
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def forward(self, x):
        return self.base_layer(x) + self.lora_b(self.lora_a(x))


@pytest.mark.parametrize("name", ["llava", "qwen2_5_vl", "internvl"])
def test_layers_replaced_or_hooked_after_patching_run_as_they_are(name):
    """A layer the fused forward reads the parameters of, replaced after patching (a LoRA
    wrapper whose ``weight`` is the base one), hooked, or given its own forward: the module
    runs its class's forward (the layer's own behaviour, with a PatchFallbackWarning), as
    under a hook for every module; the fused one again once the layer is back."""
    module, x = CASES[name]()
    mine = randomise(module)
    ref = copy.deepcopy(mine)
    fc1 = {"llava": "linear_1", "qwen2_5_vl": "mlp.0", "internvl": "linear_1"}[name]
    parent_name, _, leaf = fc1.rpartition(".")
    with vt.patch(mine):
        fused = mine(x)
        lora = LoraLinear(mine.get_submodule(fc1))
        setattr(mine.get_submodule(parent_name), leaf, lora)
        setattr(ref.get_submodule(parent_name), leaf, copy.deepcopy(lora))
        with pytest.warns(PatchFallbackWarning, match="now LoraLinear"):
            out = mine(x)
        assert max_rel(out, ref(x)) < TOL and max_rel(out, fused) > 1e-3  # the LoRA term
        for model in (mine, ref):
            parent = model.get_submodule(parent_name)
            setattr(parent, leaf, getattr(parent, leaf).base_layer)
        seen = []
        hook = mine.get_submodule(fc1).register_forward_hook(lambda *_: seen.append(1))
        with pytest.warns(PatchFallbackWarning, match="hooks"):
            assert max_rel(mine(x), fused) < TOL
        assert seen == [1]
        hook.remove()
        layer = mine.get_submodule(fc1)
        layer.forward = lambda t, layer=layer: nn.Linear.forward(layer, t) * 2
        with pytest.warns(PatchFallbackWarning, match="forward of its own"):
            assert max_rel(mine(x), fused) > 1e-3
        del layer.forward
        seen = []  # a hook for every module (module trackers, FLOP counters)
        hook = torch.nn.modules.module.register_module_forward_pre_hook(
            lambda m, args: seen.append(m)
        )
        try:
            with pytest.warns(PatchFallbackWarning, match="global module forward pre hook"):
                assert max_rel(mine(x), fused) < TOL
        finally:
            hook.remove()
        assert any(m is mine.get_submodule(fc1) for m in seen)
        with warnings.catch_warnings():
            warnings.simplefilter("error", PatchFallbackWarning)
            assert torch.equal(mine(x), fused)  # fused again


def test_connector_patched_as_root_and_switched_off():
    module, x = llava()
    with vt.patch(module) as handle:
        assert handle.targets == ("<root>.forward",)
    assert "forward" not in module.__dict__
    with pytest.raises(ValueError, match="nothing to patch"):
        vt.patch(module, connector=False)


@pytest.mark.parametrize(("key", "prefix", "projector"), [
    ("vipllava", "VipLlava", "VipLlavaMultiModalProjector"),  # on its five feature layers
    ("lfm3_vl", "Lfm3Vl", "Lfm3VlMultiModalProjector"),
    ("kimi_k25", "Kimi_K25", "Kimi_K25MultimodalProjection"),
    ("granite_docling", "GraniteDocling", "GraniteDoclingDeepStackMerger"),
    ("lfm2_vl", "Lfm2Vl", "Lfm2VlMultiModalProjector"),
])  # fmt: skip
def test_whole_model_patches_its_projector(key, prefix, projector):
    """The whole model (default config, meta device) patches every module of its projector
    class with the connector part (Granite-Docling: the DeepStack mergers of its coarse and
    fine paths), and nothing else there but, for LFM3-VL's and Kimi-K2.5's towers, the
    vision rotary (and Granite-Docling's DeepStack add)."""
    modeling = _modeling(key)
    cls = getattr(modeling, f"{prefix}ForConditionalGeneration")
    with torch.device("meta"):
        model = cls(cls.config_class())
    kind = getattr(modeling, projector)
    want = {f"{n}.forward" for n, m in model.named_modules() if isinstance(m, kind)}
    with vt.patch(model) as handle:
        assert want and want <= set(handle.targets)
        others = set(handle.targets) - want
        assert all(t.endswith(("attn.forward", "._deepstack_process")) for t in others)
    with vt.patch(model, vision=False, deepstack=False) as handle:
        assert set(handle.targets) == want


@pytest.mark.parametrize(("ratio", "side", "fused"), [(1, 4, True), (2, 5, False),
                                                     (3, 6, False)])  # fmt: skip
def test_perception_lm_projector_other_poolings(ratio, side, fused):
    """PerceptionLM's projector without pooling (ratio 1) runs the plain fused projector; a
    pooling that is no 2 x 2 mean (an odd grid's adaptive bins, ratio 3) runs the class's
    forward, with a warning: the same values either way."""
    module, _ = _perception_lm(ratio)()
    ref = randomise(module)
    mine = copy.deepcopy(ref)
    x = torch.randn(2, side * side, 12)
    with vt.patch(mine), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = mine(x)
    fallbacks = [w for w in caught if issubclass(w.category, PatchFallbackWarning)]
    assert len(fallbacks) == (0 if fused else 1)
    assert fused or f"pooling ratio {ratio} of a {side} x {side} grid is not a 2 x 2 mean" in str(
        fallbacks[0].message
    )
    want = ref(x)
    assert out.shape == want.shape and max_rel(out, want) < TOL


@pytest.mark.parametrize("layer_norm", [True, False])
def test_lfm2_vl_use_layer_norm_flipped_after_patching_is_followed(layer_norm):
    """LFM2-VL's forward reads ``use_layer_norm`` on every call: the flag flipped after
    patching (and, turned on, a LayerNorm put in) gives transformers' result, not the norm
    of the patched layout applied or dropped silently."""
    module, x = _lfm2_vl(layer_norm)()
    ref = randomise(module)
    mine = copy.deepcopy(ref)
    with vt.patch(mine), warnings.catch_warnings():
        warnings.simplefilter("ignore", PatchFallbackWarning)
        for m in (mine, ref):
            m.use_layer_norm = not layer_norm
            if m.layer_norm is None:
                m.layer_norm = randomise(nn.LayerNorm(24))
        mine.layer_norm.load_state_dict(ref.layer_norm.state_dict())
        assert max_rel(mine(x), ref(x)) < TOL
    if layer_norm:  # patched with the flag off and a norm left in place: the norm is not read
        mine = copy.deepcopy(ref)
        with vt.patch(mine):
            assert max_rel(mine(x), ref(x)) < TOL


def test_perception_lm_projector_refuses_a_grid_that_is_not_square():
    module, _ = _perception_lm()()
    with vt.patch(module), pytest.raises(ValueError, match="num_tokens 15 is expected to be"):
        module(torch.randn(2, 15, 12))


def test_qwen3_omni_merger_patched_as_root_where_a_thinker_root_class_is_missing(monkeypatch):
    """The Qwen3-Omni-MoE merger patched as the root (a connector module itself) where the
    installed transformers lacks a root class of the rotary table's Qwen3-Omni row
    (``Qwen3OmniMoeThinkerModel``, absent from 5.16.1): the merger patches, as on 5.25
    (the missing class raised UnsupportedLayoutError from the rotary table's root lookup)."""
    modeling = _modeling("qwen3_omni_moe")
    monkeypatch.delattr(modeling, "Qwen3OmniMoeThinkerModel", raising=False)
    module, x = _qwen3_omni(False)()
    ref = randomise(module)
    mine = copy.deepcopy(ref)
    with vt.patch(mine) as handle:
        assert handle.targets == ("<root>.forward",)
        assert max_rel(mine(x), ref(x)) < TOL


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


class _ShardedLinear(nn.Linear):
    """What FSDP2's fully_shard on a layer makes: a subclass of the layer's class."""


@pytest.mark.parametrize("wrap", [
    lambda layer: _ShardedLinear(layer.in_features, layer.out_features),
    LoraLinear,  # a PEFT LoRA wrapper: the original linear as base_layer
    lambda layer: torch.compile(layer),  # an OptimizedModule holding it as _orig_mod
    lambda layer: torch.ao.nn.quantized.dynamic.Linear(layer.in_features, layer.out_features),
    lambda layer: nn.Identity(),
])  # fmt: skip
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.ao's quantised Linear
@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")  # torch >= 2.13
def test_layers_wrapped_before_patching_are_named_as_such(wrap):
    """A layer wrapped before patching (FSDP2 on the layer, tensor parallelism, PEFT,
    quantisation) is refused as such, not blamed on the transformers version; a layer
    replaced by something unrelated stays a layout error."""
    module, _ = llava()
    module.linear_1 = wrap(module.linear_1)
    wrapped = not isinstance(module.linear_1, nn.Identity)
    with pytest.raises(vt.UnsupportedLayoutError) as info:
        vt.patch(module)
    message = str(info.value)
    assert isinstance(info.value, vt.WrappedLayerError) == wrapped
    assert ("wrapped or replaced after it was built" in message) == wrapped
    assert ("tested with" in message) != wrapped
    assert "linear_1 is " in message and "forward" not in module.__dict__


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


@pytest.mark.parametrize(("key", "text_model"), [
    ("cohere_compass", "CohereCompassTextModel"),
    ("granite_docling", "GraniteDoclingTextModel"),
    ("qwen3_omni_moe", "Qwen3OmniMoeThinkerTextModel"),
])  # fmt: skip
def test_deepstack_process_of_the_copies(key, text_model):
    """Qwen3-VL's ``_deepstack_process`` in Cohere Compass's, Granite-Docling's (default
    config, meta device) and the Qwen3-Omni-MoE thinker's text models: the deepstack part
    patches it alone, and the patched method gives transformers' values and gradients
    bitwise (both are an index_put of the visual rows)."""
    from test_patch_transformers import cohere_compass, qwen_omni

    if key == "granite_docling":
        cls = _modeling(key).GraniteDoclingForConditionalGeneration
        with torch.device("meta"):
            model = cls(cls.config_class())
    else:
        model = cohere_compass() if key == "cohere_compass" else qwen_omni("3")
    others = {part for p in vt.patchers() for part in p.parts} - {"positions", "deepstack"}
    names = [n for n, m in model.named_modules() if type(m).__name__ == text_model]
    hidden = torch.randn(2, 7, 16, requires_grad=True)
    mask = torch.rand(2, 7) < 0.5
    embeds = torch.randn(int(mask.sum()), 16, requires_grad=True)
    text = model.get_submodule(names[0])
    want = type(text)._deepstack_process(text, hidden, mask, embeds)
    with vt.patch(model, **dict.fromkeys(others, False)) as handle:
        assert handle.targets == tuple(f"{n}._deepstack_process" for n in names)
        out = text._deepstack_process(hidden, mask, embeds)
    assert torch.equal(out, want)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [hidden, embeds], g)
    ref = torch.autograd.grad(want, [hidden, embeds], g)
    assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))


def qwen3_5_model(prefix):
    """A tiny Qwen3.5 (or Qwen3.5-MoE) model: one vision block; a hybrid text model of a
    linear-attention and a full-attention layer."""
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 0],
            "partial_rotary_factor": 0.5}  # fmt: skip
    text = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, head_dim=8,
                num_key_value_heads=1, vocab_size=64, rope_parameters=rope,
                layer_types=["linear_attention", "full_attention"], linear_key_head_dim=4,
                linear_value_head_dim=4, linear_num_key_heads=2,
                linear_num_value_heads=2)  # fmt: skip
    if prefix.endswith("Moe"):
        text |= dict(moe_intermediate_size=8, shared_expert_intermediate_size=8,
                     num_experts=2, num_experts_per_tok=1)  # fmt: skip
    else:
        text |= dict(intermediate_size=16)
    config = getattr(transformers, f"{prefix}Config")(
        vision_config=dict(depth=1, hidden_size=8, intermediate_size=16, num_heads=2,
                           patch_size=4, temporal_patch_size=1, out_hidden_size=16,
                           num_position_embeddings=16),
        text_config=text, image_token_id=5, video_token_id=6, vision_start_token_id=7,
        vision_end_token_id=8,
    )  # fmt: skip
    torch.manual_seed(0)
    return randomise(getattr(transformers, f"{prefix}ForConditionalGeneration")(config).eval())


@pytest.mark.parametrize("prefix", ["Qwen3_5", "Qwen3_5Moe"])
def test_qwen3_5_model_runs_its_merger_fused(prefix, monkeypatch):
    """A whole Qwen3.5 model with the connector table's parts patched (the rotary table's
    off): its vision merger (Qwen3-VL's code) is the only target (no DeepStack in
    Qwen3.5), runs the fused merger once for two images of different grids, and the logits
    and pixel gradients are transformers'; undo restores the model exactly."""
    from vlmkernels.integrations.tables import connectors

    ref = qwen3_5_model(prefix)
    mine = copy.deepcopy(ref)
    calls = []
    fused = connectors.merger
    monkeypatch.setattr(connectors, "merger", lambda *a, **k: calls.append(1) or fused(*a, **k))
    ids = torch.tensor([[1, 7, 5, 5, 5, 5, 8, 3], [1, 2, 7, 5, 5, 8, 3, 4]])
    grid = torch.tensor([[1, 4, 4], [1, 2, 4]])  # 4 and 2 merged tokens
    px = torch.randn(24, 3 * 4 * 4)
    kw = dict(input_ids=ids, image_grid_thw=grid, mm_token_type_ids=(ids == 5).long())
    x1, x2 = px.clone().requires_grad_(), px.clone().requires_grad_()
    want = ref(pixel_values=x2, **kw).logits
    rotary_off = dict(rope=False, vision=False, rope_index=False)
    with vt.patch(mine, **rotary_off) as handle, warnings.catch_warnings():
        warnings.simplefilter("error", PatchFallbackWarning)
        assert handle.targets == ("model.visual.merger.forward",)
        got = mine(pixel_values=x1, **kw).logits
        assert calls == [1]
        assert max_rel(got, want) < TOL, max_rel(got, want)
        g = torch.randn_like(want)
        got.backward(g)
        want.backward(g)
        assert max_rel(x1.grad, x2.grad) < TOL, max_rel(x1.grad, x2.grad)
    assert "forward" not in mine.model.visual.merger.__dict__
    with torch.no_grad():
        assert torch.equal(mine(pixel_values=px, **kw).logits, want)
    assert calls == [1]


def test_wrapped_merger_in_a_whole_model_names_the_parts_that_still_patch():
    """A whole Qwen3.5 model (no DeepStack) whose merger layer PEFT wrapped: the refusal
    names the connector and the call that still patches the rotary table's parts (not "no
    other part applies": the hint counts every table's working parts), and that call
    patches them."""
    model = qwen3_5_model("Qwen3_5")
    model.model.visual.merger.linear_fc1 = LoraLinear(model.model.visual.merger.linear_fc1)
    with pytest.raises(vt.WrappedLayerError) as info:
        vt.patch(model)
    message = str(info.value)
    assert "connector: Qwen3_5VisionPatchMerger.linear_fc1 is LoraLinear" in message
    assert "still works: vlmkernels.patch(model, connector=False)" in message, message
    with vt.patch(model, connector=False) as handle:
        assert "model.get_rope_index" in handle.targets
        assert not any("merger" in t for t in handle.targets)


# ------------------------------------------------------- InternVL: the shuffle in the GEMM


def internvl_model():
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    config = InternVLConfig(
        vision_config=dict(hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                           num_attention_heads=2, image_size=[24, 24], patch_size=[4, 4]),
        text_config=dict(model_type="qwen2", hidden_size=24, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=64),
        downsample_ratio=0.5, projector_hidden_act="gelu", image_token_id=5,
    )  # fmt: skip
    torch.manual_seed(0)
    return randomise(InternVLForConditionalGeneration(config).eval())


@pytest.mark.parametrize(("layer", "strategy"), [(-1, "default"), (-2, "default")])
def test_internvl_shuffle_folded_into_the_projector(layer, strategy, monkeypatch):
    """get_image_features of a patched InternVL model: InternVL's pixel shuffle is never
    run (the projector's GEMM reads the unshuffled (B, S, S, C) features, here a strided
    view without the class token, through the shuffle addressing, LayerNorm of each
    shuffled row in its prologue); features and every gradient match transformers."""
    from transformers.models.internvl.modeling_internvl import InternVLModel

    ref = internvl_model()
    mine = copy.deepcopy(ref)
    shuffles = []
    original = InternVLModel.pixel_shuffle

    def counting(self, *args, **kwargs):
        shuffles.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(InternVLModel, "pixel_shuffle", counting)
    px = torch.randn(2, 3, 24, 24)
    kw = dict(vision_feature_layer=layer, vision_feature_select_strategy=strategy)
    with vt.patch(mine) as handle:
        assert set(handle.targets) == {
            "model.multi_modal_projector.forward",
            "model.get_image_features",
            "model.pixel_shuffle",
        }
        x1, x2 = px.clone().requires_grad_(), px.clone().requires_grad_()
        out = mine.get_image_features(x1, **kw).pooler_output
        assert shuffles == []  # the shuffle ran as addressing only
        want = ref.get_image_features(x2, **kw).pooler_output
        assert shuffles == [ref.model]
        side = 24 // 4 // 2
        assert out.shape == want.shape == (2, side * side, 24)
        assert max_rel(out, want) < TOL, max_rel(out, want)
        g = torch.randn_like(want)
        out.backward(g)
        want.backward(g)
        assert max_rel(x1.grad, x2.grad) < TOL
        for (n, p), q in zip(mine.named_parameters(), ref.parameters(), strict=True):
            if q.grad is not None:
                assert max_rel(p.grad, q.grad) < TOL, (n, max_rel(p.grad, q.grad))
            else:
                assert p.grad is None, n
        # a direct call outside get_image_features is InternVL's own shuffle
        feats = torch.randn(2, 6, 6, 8)
        assert torch.equal(mine.model.pixel_shuffle(feats, 0.5), original(ref.model, feats, 0.5))
        assert len(shuffles) == 2
    assert not {"get_image_features", "pixel_shuffle"} & set(mine.model.__dict__)
    assert "forward" not in mine.model.multi_modal_projector.__dict__


def test_internvl_generate_with_images():
    """generate() reads get_image_features' parameters to encode pixel_values before the
    prefill: the patched method shows InternVL's own (it passes them on), and greedy
    decoding gives transformers' tokens."""
    import inspect

    ref = internvl_model().eval()
    mine = copy.deepcopy(ref)
    ids = torch.tensor([[7, 8] + [5] * 9 + [9, 10]])
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                  pixel_values=torch.randn(1, 3, 24, 24))  # fmt: skip
    with torch.no_grad():
        want = ref.generate(**inputs, max_new_tokens=3, do_sample=False)
        with vt.patch(mine):
            patched = inspect.signature(mine.model.get_image_features)
            assert patched == inspect.signature(ref.model.get_image_features)
            assert "pixel_values" in patched.parameters
            got = mine.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(got, want)


def test_internvl_model_logits_and_projector_switched_off():
    """The whole patched model (image tokens scattered into the text) gives transformers'
    logits; with the projector left unpatched the shuffle is not deferred."""
    ref = internvl_model()
    mine = copy.deepcopy(ref)
    side = 24 // 4 // 2
    ids = torch.tensor([[1, 2] + [5] * side * side + [3, 4]] * 2)
    px = torch.randn(2, 3, 24, 24)
    want = ref(input_ids=ids, pixel_values=px).logits
    with vt.patch(mine):
        got = mine(input_ids=ids, pixel_values=px).logits
    assert max_rel(got, want) < TOL
    with vt.patch(mine.model.multi_modal_projector) as handle:
        assert handle.targets == ("<root>.forward",)
        assert max_rel(mine(input_ids=ids, pixel_values=px).logits, want) < TOL
    # a LoRA wrapper added to the patched projector after patching: the shuffle is not
    # deferred and the projector runs its class's forward, LoRA term included
    with vt.patch(mine):
        lora = LoraLinear(mine.model.multi_modal_projector.linear_1)
        mine.model.multi_modal_projector.linear_1 = lora
        ref.model.multi_modal_projector.linear_1 = copy.deepcopy(lora)
        with pytest.warns(PatchFallbackWarning, match="linear_1 is now LoraLinear"):
            got = mine(input_ids=ids, pixel_values=px).logits
        assert max_rel(got, ref(input_ids=ids, pixel_values=px).logits) < TOL


def test_internvl_shuffle_deferral_is_per_thread():
    """A thread inside get_image_features (the shuffle deferred there) does not make a
    direct pixel_shuffle call of another thread on the same model skip its shuffle."""
    import threading

    model = internvl_model()
    inner = model.model
    feats = torch.randn(1, 6, 6, 8)
    want = type(inner).pixel_shuffle(inner, feats, 0.5)
    inside, release = threading.Event(), threading.Event()

    def hold(*_):
        inside.set()
        release.wait(10)

    with torch.no_grad(), vt.patch(model):
        hook = inner.vision_tower.register_forward_hook(hold)
        worker = threading.Thread(target=inner.get_image_features,
                                  args=(torch.randn(1, 3, 24, 24),))  # fmt: skip
        worker.start()
        try:
            assert inside.wait(10)
            got = inner.pixel_shuffle(feats, 0.5)  # this thread is not inside the call
        finally:
            release.set()
            worker.join(10)
            hook.remove()
    assert got.shape == want.shape and torch.equal(got, want)


# ------------------------------------------------------------------ MiniCPM-V 4.6 merger


def minicpm_merger(times, prefix="MiniCPMV4_6", key="minicpmv4_6"):
    import importlib

    config_module = importlib.import_module(f"transformers.models.{key}.configuration_{key}")
    modeling = importlib.import_module(f"transformers.models.{key}.modeling_{key}")
    config = getattr(config_module, f"{prefix}Config")(
        vision_config={"hidden_size": 6, "num_attention_heads": 2},
        text_config={"model_type": "qwen3_5_text", "hidden_size": 10, "num_attention_heads": 2,
                     "num_key_value_heads": 1},
        merger_times=times,
    )  # fmt: skip
    torch.manual_seed(1)
    return randomise(getattr(modeling, f"{prefix}Merger")(config))


@pytest.mark.parametrize("times", [1, 2])
def test_minicpm_v4_6_merger(times):
    """MiniCPMV4_6Merger: images of different (and non-square) grids, runs of equal ones
    batched in one op; each round's 2 x 2 space-to-depth is the GEMM's addressing and the
    LayerNorm of the merged row its prologue. Outputs (a list per image) and gradients match
    transformers."""
    ref = minicpm_merger(times)
    mine = Wrapper(copy.deepcopy(ref))
    unit = 2**times
    sizes = torch.tensor([[2 * unit, 3 * unit], [2 * unit, 3 * unit], [unit, unit],
                          [3 * unit, unit]])  # fmt: skip
    total = int(sizes.prod(-1).sum())
    x = torch.randn(1, total, 6)
    with vt.patch(mine) as handle:
        assert handle.targets == ("inner.forward",)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        out = mine.inner(x1, sizes)
        want = ref(x2, sizes)
        assert len(out) == len(want) == len(sizes)
        for o, w in zip(out, want, strict=True):
            assert o.shape == w.shape
            assert max_rel(o, w) < TOL, max_rel(o, w)
        gs = [torch.randn_like(w) for w in want]
        torch.autograd.backward(out, gs)
        torch.autograd.backward(want, gs)
        assert max_rel(x1.grad, x2.grad) < TOL
        for (n, p), q in zip(mine.inner.named_parameters(), ref.parameters(), strict=True):
            assert max_rel(p.grad, q.grad) < TOL, (n, max_rel(p.grad, q.grad))
        with pytest.raises(ValueError, match="divisible by merge"):
            mine.inner(x, torch.tensor([[unit + 1, unit]]))
    assert "forward" not in mine.inner.__dict__


def test_minicpm_merger_mlp_grown_after_patching_runs_the_class_forward():
    """transformers runs merger_times rounds; the fused forward ran every MLP in the
    ModuleList, one appended after patching included."""
    ref = minicpm_merger(1)
    mine = copy.deepcopy(ref)
    sizes = torch.tensor([[4, 4]])
    x = torch.randn(1, 16, 6)
    with vt.patch(mine):
        for m in (ref, mine):
            m.mlp.append(copy.deepcopy(m.mlp[0]))
        with pytest.warns(PatchFallbackWarning, match="mlp changed since patching"):
            out = mine(x, sizes)
    want = ref(x, sizes)
    assert all(torch.equal(o, w) for o, w in zip(out, want, strict=True))


@pytest.mark.parametrize(("key", "prefix"), [("minicpmv4_7", "MiniCPMV4_7"),
                                             ("minicpm_ocr", "MiniCPMOcr")])  # fmt: skip
def test_minicpm_v4_7_and_ocr_mergers(key, prefix):
    pytest.importorskip(f"transformers.models.{key}.modeling_{key}")
    ref = minicpm_merger(1, prefix, key)
    mine = copy.deepcopy(ref)
    sizes = torch.tensor([[4, 2], [2, 2]])
    x = torch.randn(1, 12, 6)
    with vt.patch(mine):
        out = mine(x, sizes)
    want = ref(x, sizes)
    assert all(max_rel(o, w) < TOL for o, w in zip(out, want, strict=True))


def test_internvl_projector_unshuffled_input_compiles():
    """The patched projector on the unshuffled grid under torch.compile(fullgraph=True):
    InternVL's transformers model itself does not compile with fullgraph (a lock in its
    output capturing), the projector's fused path does."""
    from transformers.models.internvl.modeling_internvl import InternVLModel

    model = internvl_model()
    projector = model.model.multi_modal_projector
    feats = torch.randn(2, 37, 8)[:, 1:].reshape(2, 6, 6, 8)  # a strided view, as in the model
    want = projector(InternVLModel.pixel_shuffle(None, feats, 0.5).reshape(2, 9, 32))
    with vt.patch(projector):
        compiled = torch.compile(projector, backend="aot_eager", fullgraph=True)
        got = compiled(feats.reshape(2, 36, 8))
    assert max_rel(got, want) < TOL


def test_minicpm_v4_6_full_model_patches_its_merger_and_its_llm_rotary():
    """MiniCPM-V 4.6's language model is Qwen3.5's text model: patch(model) takes its
    merger (this table) and the text attention's rotary function (the rotary table's
    part for a model holding a Qwen3.5 text model)."""
    from transformers.models.minicpmv4_6 import configuration_minicpmv4_6 as cf
    from transformers.models.minicpmv4_6 import modeling_minicpmv4_6 as modeling

    config = cf.MiniCPMV4_6Config(
        vision_config={"hidden_size": 8, "num_attention_heads": 2, "intermediate_size": 16,
                       "num_hidden_layers": 1, "image_size": 28, "patch_size": 14},
        text_config={"model_type": "qwen3_5_text", "hidden_size": 16, "num_attention_heads": 2,
                     "num_key_value_heads": 1, "num_hidden_layers": 1, "intermediate_size": 16,
                     "vocab_size": 64, "layer_types": ["full_attention"]},
        insert_layer_id=0,
    )  # fmt: skip
    model = modeling.MiniCPMV4_6ForConditionalGeneration(config)
    attention = next(n for n, m in model.named_modules() if type(m).__name__ == "Qwen3_5Attention")
    ids = torch.randint(3, 60, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        for angles in ("table", "positions"):
            with vt.patch(model, angles=angles) as handle:
                assert sorted(handle.targets) == sorted(
                    ["model.merger.forward", f"{attention}.forward"]
                    + ([f"{attention.rpartition('.layers')[0]}.rotary_emb.forward"]
                       if angles == "positions" else [])
                )  # fmt: skip
                assert max_rel(model(input_ids=ids).logits, want) < TOL
    assert "forward" not in model.model.merger.__dict__


@pytest.mark.parametrize("name", ["idefics3", "smolvlm", "qwen3_vl_postshuffle", "internvl"])
def test_patched_connector_compiles_with_dynamic_token_counts(name):
    """torch.compile(fullgraph=True, dynamic=True) of the patched connector, called with two
    token counts (the grid side, or the merged rows, symbolic): the fused path's grid
    arithmetic traces (no math.isqrt on a SymInt) and the outputs are transformers'."""
    module, x = CASES[name]()
    if name == "internvl":  # the unshuffled grid, InternVL's pixel shuffle deferred
        inputs = [torch.randn(2, side * side, 6) for side in (4, 6)]
    elif name == "qwen3_vl_postshuffle":
        inputs = [torch.randn(n, 6) for n in (28, 44)]
    else:
        scale = 2 if name == "idefics3" else 3
        inputs = [torch.randn(2, (scale * k) ** 2, 8) for k in (2, 3)]
    reference = copy.deepcopy(module)
    with vt.patch(module):
        compiled = torch.compile(module, backend="aot_eager", fullgraph=True, dynamic=True)
        got = [compiled(x) for x in inputs]
    for x, out in zip(inputs, got, strict=True):
        if name == "internvl":
            from transformers.models.internvl.modeling_internvl import InternVLModel

            side = isqrt(x.shape[1])
            grid = x.reshape(2, side, side, 6)
            x = InternVLModel.pixel_shuffle(None, grid, 0.5).reshape(2, -1, 24)
        assert max_rel(out, reference(x)) < TOL


# two inputs of different token counts for each layout added after the test above
_GROWN = {"vipllava": ((2, 7, 30), (2, 11, 30)), "lfm2_vl": ((2, 4, 6, 6), (2, 6, 8, 6)),
          "lfm3_vl": ((28, 6), (44, 6)), "kimi_k25": ((7, 4, 6), (11, 4, 6)),
          "perception_lm": ((2, 16, 12), (2, 36, 12))}  # fmt: skip


@pytest.mark.parametrize("name", list(_GROWN))
def test_newer_connectors_compile_with_dynamic_token_counts(name):
    """torch.compile(fullgraph=True, dynamic=True) of the patched VipLLaVA, LFM2-VL, LFM3-VL,
    Kimi-K2.5 and PerceptionLM connectors, called with two token counts: the fused forward
    traces without a graph break (PerceptionLM's square-grid check and pooling choice on a
    symbolic count included) and the outputs are transformers'. Dynamo is reset first: every
    patched forward is one code object (PatchedMethod.__call__), whose cache of 8 entries the
    compile tests before this one fill (run in one process, the last two failed with
    "recompile limit exceeded" under fullgraph)."""
    torch._dynamo.reset()
    module, _ = CASES[name]()
    reference = copy.deepcopy(module)
    inputs = [torch.randn(shape) for shape in _GROWN[name]]
    with vt.patch(module):
        compiled = torch.compile(module, backend="aot_eager", fullgraph=True, dynamic=True)
        got = [compiled(x) for x in inputs]
    for x, out in zip(inputs, got, strict=True):
        assert max_rel(out, reference(x)) < TOL


def test_patched_modules_of_different_classes_compile_separately():
    """torch.compile(fullgraph=True) of patched modules of different classes, one at a
    time in one process: each class has its own compiled-entry cache (its own frame), so
    more classes than Dynamo's recompile limit do not run out of it (before, the 9th class
    failed; here the limit is 2 and four classes compile)."""
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=2):
        for name in ("llava", "vipllava", "lfm3_vl", "qwen2_vl"):
            module, x = CASES[name]()
            reference = copy.deepcopy(module)
            with vt.patch(module):
                compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
                assert max_rel(compiled(x), reference(x)) < TOL
    torch._dynamo.reset()


def test_data_parallel_replicas_run_their_own_weights(cpu_replicate):
    """nn.DataParallel replicates each module by copying its __dict__, where the patched
    forward is bound to the original: the patch binds it to each replica, which then runs
    on its own parameter copies and passes them their gradients. The replicas' parameters
    are plain attributes (their ``_parameters`` is empty): the fused forward still runs, no
    fallback (HF Trainer wraps a model so on a machine with several GPUs). On the CPU, with
    torch.nn.parallel.replicate's broadcast replaced by copies (device 1's scaled by 2)."""
    ref, x = llava()
    mine = copy.deepcopy(ref)
    with vt.patch(mine):
        want = cpu_replicate(ref, ["cpu", "cpu"])[1]
        got = cpu_replicate(mine, ["cpu", "cpu"])[1]
        assert got.__dict__["forward"].__self__ is got
        with warnings.catch_warnings():
            warnings.simplefilter("error", PatchFallbackWarning)
            out = got(x)
        ref_out = want(x)
        assert max_rel(out, ref_out) < TOL
        (g,) = torch.autograd.grad(out.sum(), got.linear_1.weight)
        (g_ref,) = torch.autograd.grad(ref_out.sum(), want.linear_1.weight)
        assert max_rel(g, g_ref) < TOL
    assert "_replicate_for_data_parallel" not in mine.__dict__


def test_hooks_on_the_modules_a_fused_forward_skips():
    """Hooks that must run as transformers runs them: on InternVL's projector (it must see
    the shuffled features, so the shuffle is not deferred) and on the Qwen2-VL merger's
    Sequential (which the fused forward does not call: the class's forward runs, with a
    PatchFallbackWarning)."""
    ref = internvl_model()
    mine = copy.deepcopy(ref)
    side = 24 // 4 // 2
    ids = torch.tensor([[1, 2] + [5] * side * side + [3, 4]] * 2)
    px = torch.randn(2, 3, 24, 24)

    def zero_first(module, args):
        return (args[0].clone().index_fill_(1, torch.tensor([0]), 0.0),)

    seen = {}
    for model, key in ((ref, "want"), (mine, "got")):
        projector = model.model.multi_modal_projector
        projector.register_forward_pre_hook(
            lambda m, a, key=key: seen.setdefault(key, a[0].shape) and None
        )
        projector.register_forward_pre_hook(zero_first)
    want = ref(input_ids=ids, pixel_values=px).logits
    with vt.patch(mine):
        got = mine(input_ids=ids, pixel_values=px).logits
    assert seen["got"] == seen["want"] and max_rel(got, want) < TOL
    merger, x = qwen2()
    ref_merger = copy.deepcopy(merger)
    for m in (merger, ref_merger):
        m.mlp.register_forward_hook(lambda mod, args, out: out * 2)
    with vt.patch(merger), pytest.warns(PatchFallbackWarning, match="mlp has hooks"):
        assert max_rel(merger(x), ref_merger(x)) < TOL


# --------------------------------------------------------------------------------------
# What a fused forward would silently drop: a grown container, tensor-subclass weights,
# a bypassed helper method; the fallback under fullgraph compile; accelerate's moves
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", ["linear", "dropout"])
def test_merger_mlp_grown_after_patching_runs_the_class_forward(extra):
    """The merger's nn.Sequential MLP grown after patching keeps its class and first layers;
    the fused forward skipped the appended layer (0.70 off; dropout never applied)."""
    ref, x = qwen2()
    randomise(ref)
    mine = copy.deepcopy(ref)
    with vt.patch(mine):
        layer = nn.Linear(10, 10) if extra == "linear" else nn.Dropout(0.5)
        for m in (ref, mine):
            m.mlp.append(copy.deepcopy(layer))
            m.train()
        with pytest.warns(PatchFallbackWarning, match=r"mlp changed since patching: submodules"):
            torch.manual_seed(1)
            got = mine(x)
        torch.manual_seed(1)
        assert torch.equal(got, ref(x))


class _DoubledWeight(torch.Tensor):
    """A weight whose F.linear differs from its raw storage, as torchao's quantised weights
    and NF4 compute F.linear their own way in a tensor subclass."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear:
            x, w, *rest = args
            with torch._C.DisableTorchFunctionSubclass():
                return func(x, w.as_subclass(torch.Tensor) * 2, *rest, **kwargs)
        return super().__torch_function__(func, types, args, kwargs)


@pytest.mark.parametrize("name", ["llava", "qwen2"])
def test_tensor_subclass_weight_runs_the_class_forward(name):
    """The fused kernels would read the subclass's storage (39% / 47% off, no warning)."""
    ref, x = {"llava": llava, "qwen2": qwen2}[name]()
    randomise(ref)
    mine = copy.deepcopy(ref)
    with vt.patch(mine), torch.no_grad():
        for m in (ref, mine):
            layer = m.linear_1 if name == "llava" else m.mlp[0]
            layer.weight = nn.Parameter(layer.weight.detach().as_subclass(_DoubledWeight))
        with pytest.warns(PatchFallbackWarning, match=r"weight is a _DoubledWeight"):
            got = mine(x)
        assert torch.equal(got.as_subclass(torch.Tensor), ref(x).as_subclass(torch.Tensor))


def test_fallback_compiles_fullgraph():
    """A layer hooked after patching makes the module run its class's forward, under
    torch.compile(fullgraph=True) too, as the unpatched module does (the fallback's warning
    was a graph break, and fullgraph failed)."""
    ref, x = qwen2()
    randomise(ref)
    mine = copy.deepcopy(ref)
    with vt.patch(mine):
        for m in (ref, mine):
            m.mlp[0].register_forward_hook(lambda mod, args, out: out * 2)
        torch._dynamo.reset()
        compiled = torch.compile(mine, backend="aot_eager", fullgraph=True)
        assert max_rel(compiled(x), ref(x)) < TOL
    torch._dynamo.reset()


@pytest.mark.parametrize("how", ["subclass", "instance"])
@pytest.mark.parametrize(("name", "method"), [("idefics3", "pixel_shuffle"),
                                            ("lfm2_vl", "pixel_unshuffle")])  # fmt: skip
def test_shuffle_connector_with_its_own_pixel_shuffle_is_refused(how, name, method):
    """The fused Idefics3 connector (LFM2-VL's projector) computes the pixel (un)shuffle in
    its GEMM's addressing: one overridden in a subclass or set on the instance was dropped
    (2.05 off)."""
    module, x = CASES[name]()
    cls = type(module)
    shuffle = getattr(cls, method)
    if how == "subclass":
        module.__class__ = type("Flipped", (cls,), {
            method: lambda self, x, *args: shuffle(self, x.flip(1), *args)
        })  # fmt: skip
    else:
        setattr(module, method, lambda x, *args: shuffle(module, x.flip(1), *args))
    with pytest.raises(vt.UnsupportedLayoutError, match=method):
        vt.patch(module)
    assert "forward" not in vars(module)


@pytest.mark.parametrize(("name", "method"), [("idefics3", "pixel_shuffle"),
                                            ("lfm2_vl", "pixel_unshuffle")])  # fmt: skip
def test_shuffle_method_set_on_the_instance_after_patching_runs_the_class_forward(name, method):
    """The pixel (un)shuffle the fused forward computes in its addressing, set on the
    instance after patching, is not dropped silently (0.5 to 0.8 off): the module runs its
    class's forward, which calls it, with a warning; removed, the fused forward again."""
    module, x = CASES[name]()
    ref = randomise(module)
    mine = copy.deepcopy(ref)
    with vt.patch(mine), torch.no_grad():
        fused = mine(x)
        for m in (mine, ref):
            shuffle = getattr(type(m), method)
            setattr(m, method, lambda x, *args, m=m, f=shuffle: f(m, x.flip(1), *args))
        with pytest.warns(PatchFallbackWarning, match=f"{method} is set on the instance"):
            got = mine(x)
        assert max_rel(got, ref(x)) < TOL and max_rel(got, fused) > 1e-3
        del mine.__dict__[method]
        with warnings.catch_warnings():
            warnings.simplefilter("error", PatchFallbackWarning)
            assert torch.equal(mine(x), fused)


def _add_accelerate_hook(module):
    """accelerate.hooks.add_hook_to_module, in short (accelerate is optional)."""
    module._old_forward = module.forward
    module._hf_hook = object()
    module.forward = functools.partial(lambda m, *a, **k: m._old_forward(*a, **k), module)


def _remove_accelerate_hook(module):
    """accelerate.hooks.remove_hook_from_module, in short."""
    del module._hf_hook
    module.forward = module._old_forward
    del module._old_forward


def _patched_attributes(module):
    return [k for k, v in vars(module).items() if is_patched(v)]


def test_undo_after_accelerate_removed_its_hook():
    """accelerate moved the patched _old_forward into forward: undo() reported success and
    left the fused forward in place (and a new patch raised AlreadyPatchedError)."""
    proj, x = llava()
    want = proj(x)
    _add_accelerate_hook(proj)
    handle = vt.patch(proj)
    assert handle.targets == ("<root>._old_forward",)
    _remove_accelerate_hook(proj)  # the patched method is now proj.forward
    assert _patched_attributes(proj)
    handle.undo()
    assert _patched_attributes(proj) == [] and not handle.active
    assert "_old_forward" not in vars(proj)
    assert torch.equal(proj(x), want)
    vt.patch(proj).undo()  # patchable again


def test_undo_after_accelerate_added_its_hook():
    """accelerate moved the patched forward into _old_forward: undo() raised "forward
    changed" though only accelerate had moved it."""
    proj, x = llava()
    want = proj(x)
    handle = vt.patch(proj)
    _add_accelerate_hook(proj)  # the patched method is now proj._old_forward
    handle.undo()
    assert _patched_attributes(proj) == []
    assert proj.__dict__["_old_forward"].__func__ is type(proj).forward
    assert torch.equal(proj(x), want)  # through the hook, the class's forward
    _remove_accelerate_hook(proj)
    assert torch.equal(proj(x), want)
    vt.patch(proj).undo()


@pytest.mark.parametrize("name", [*CASES, *SAME_CODE])
def test_patched_connector_takes_its_input_by_the_class_forwards_name(name):
    """The input passed by keyword under the name the class's forward gives it (VipLLaVA's
    and Kimi-K2.5's ``hidden_states``, Granite-Docling's and LFM3-VL's ``image_features``,
    Qwen3-Omni-MoE's ``hidden``): transformers' result, not a TypeError from the fused
    forward's own parameter name; a wrong keyword raises transformers' TypeError. And the
    patched module still pickles (it loads unpatched)."""
    import inspect
    import io

    module, x = {**CASES, **SAME_CODE}[name]()
    ref = randomise(module)
    mine = copy.deepcopy(ref)
    param = list(inspect.signature(type(ref).forward).parameters)[1]
    with vt.patch(mine):
        assert list(inspect.signature(mine.forward).parameters) == [param]
        assert max_rel(mine(**{param: x}), ref(**{param: x})) < TOL
        with pytest.raises(TypeError, match="unexpected keyword argument 'not_an_input'"):
            mine(not_an_input=x)
        buffer = io.BytesIO()  # the patched method pickles as the module's forward
        torch.save(mine, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer, weights_only=False)(x), ref(x))


@pytest.mark.parametrize("name", ["qwen2_5_vl", "exaone4_5", "qwen2_5_omni"])
def test_rmsnorm_merger_on_features_of_another_dtype_is_transformers(name):
    """Qwen2.5-VL's RMSNorm returns ``weight * x.to(x.dtype)``: bf16 features into an fp32
    merger come out of the norm in fp32 and run the fp32 MLP (transformers returns fp32),
    where the fused merger raised TypeError (the features' dtype is not the weights'). An
    fp32 norm before bf16 linears gives transformers' RuntimeError, not a bf16 result."""
    module, x = {**CASES, **SAME_CODE}[name]()
    ref = randomise(module)
    mine = copy.deepcopy(ref)
    x = x.bfloat16()
    with vt.patch(mine), warnings.catch_warnings():
        warnings.simplefilter("ignore", PatchFallbackWarning)
        out, want = mine(x), ref(x)
        assert out.dtype == want.dtype == torch.float32 and max_rel(out, want) < TOL
        for m in (mine, ref):
            m.mlp.bfloat16()
        with pytest.raises(RuntimeError, match="same dtype"):
            ref(x)
        with pytest.raises(RuntimeError, match="same dtype"):
            mine(x)


def test_minicpm_merger_takes_target_sizes_as_a_list():
    """transformers' merger indexes ``target_sizes`` row by row: a list of (h, w) pairs (or
    of size tensors) works there; the fused forward called ``target_sizes.tolist()`` and
    raised AttributeError."""
    ref = minicpm_merger(1)
    mine = copy.deepcopy(ref)
    x = torch.randn(1, 24, 6)
    with vt.patch(mine):
        for sizes in ([[4, 4], [2, 4]], [torch.tensor([4, 4]), torch.tensor([2, 4])]):
            out, want = mine(x, sizes), ref(x, sizes)
            assert len(out) == len(want) == 2
            assert all(max_rel(o, w) < TOL for o, w in zip(out, want, strict=True))


def test_minicpm_merger_times_changed_after_patching_runs_the_class_forward():
    """transformers runs ``merger_times`` rounds (the first ``merger_times`` MLPs); set
    lower after patching, the fused forward still ran every MLP of the ModuleList (another
    output width, silently): it runs the class's forward instead, with a warning."""
    ref = minicpm_merger(2)
    mine = copy.deepcopy(ref)
    sizes = torch.tensor([[4, 8]])
    x = torch.randn(1, 32, 6)
    with vt.patch(mine):
        for m in (ref, mine):
            m.merger_times = 1
        with pytest.warns(PatchFallbackWarning, match="merger_times"):
            out = mine(x, sizes)
    want = ref(x, sizes)
    assert [o.shape for o in out] == [w.shape for w in want] == [(8, 6)]
    assert all(torch.equal(o, w) for o, w in zip(out, want, strict=True))


@pytest.mark.parametrize(("name", "norm"), [("vipllava", "projector_layernorm"),
                                            ("granite_docling", "layer_norm"),
                                            ("internvl", "layer_norm"), ("lfm2_vl", "layer_norm"),
                                            ("minicpm", "mlp.0.pre_norm")])  # fmt: skip
def test_layer_norm_without_weight_is_refused_at_patch_time(name, norm):
    """A LayerNorm made without elementwise affine (no weight) before patching: patched,
    every call raised ValueError ("needs norm_weight") where transformers computes; it is
    refused at patch time, as the Qwen-VL mergers' check does."""
    module = minicpm_merger(1) if name == "minicpm" else {**CASES, **SAME_CODE}[name]()[0]
    parent, _, leaf = norm.rpartition(".")
    width = module.get_submodule(norm).normalized_shape
    setattr(module.get_submodule(parent), leaf, nn.LayerNorm(width, elementwise_affine=False))
    with pytest.raises(vt.UnsupportedLayoutError, match="without a 1-D weight"):
        vt.patch(module)
    assert "forward" not in module.__dict__


@pytest.mark.parametrize("name", ["qwen3_vl_postshuffle", "qwen3_omni_moe_postshuffle",
                                  "cosmos3_edge"])  # fmt: skip
def test_postshuffle_merger_takes_any_width_its_view_takes(name):
    """With ``use_postshuffle_norm`` transformers views the features as (-1, hidden_size)
    rows whatever their last dim: (14, 12) or (6, 16) features make 7 or 4 merged rows of
    24. The fused merger took the last dim as the patch width and raised ValueError where
    hidden_size / width is not a square."""
    module, _ = {**CASES, **SAME_CODE}[name]()
    ref = randomise(module)
    if name == "cosmos3_edge":  # its flag set (the norm of the merged row put in)
        ref.use_postshuffle_norm = True
        ref.norm = randomise(nn.LayerNorm(24, eps=1e-6))
    mine = copy.deepcopy(ref)
    with vt.patch(mine):
        for x in (torch.randn(14, 12), torch.randn(6, 16), torch.randn(28, 6)):
            out, want = mine(x), ref(x)
            assert out.shape == want.shape and max_rel(out, want) < TOL


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_omni_moe",
                                  "cosmos3_edge"])  # fmt: skip
def test_merger_on_features_wider_than_its_patch_norm_is_transformers(name):
    """Features already s^2 patches wide, (7, 24), into a merger that norms each 6-wide
    patch: transformers' norm raises (Cosmos3-Edge's forward reshapes them to patches
    first and computes); the fused merger read them as 28 patches and returned a result.
    It now runs the class's forward: transformers' error, or its result."""
    module, _ = {**CASES, **SAME_CODE}[name]()
    ref = randomise(module)
    mine = copy.deepcopy(ref)
    x = torch.randn(7, 24)
    with vt.patch(mine), warnings.catch_warnings():
        warnings.simplefilter("ignore", PatchFallbackWarning)
        if name == "cosmos3_edge":
            assert max_rel(mine(x), ref(x)) < TOL
        else:
            with pytest.raises(RuntimeError) as want:
                ref(x)
            with pytest.raises(RuntimeError) as got:
                mine(x)
            assert str(got.value) == str(want.value)


@pytest.mark.parametrize("name", ["idefics3", "smolvlm"])
def test_shuffle_connector_refuses_a_4d_input_as_transformers_does(name):
    """Idefics3's and SmolVLM's connectors take (B, S * S, C) features; a (B, S, S, C) grid
    makes transformers' pixel_shuffle raise (it unpacks three sizes), while the fused
    merger (layout "grid" takes 4-D grids too) returned a result."""
    module, x = CASES[name]()
    ref = randomise(module)
    mine = copy.deepcopy(ref)
    side = isqrt(x.shape[1])
    grid = x.view(x.shape[0], side, side, x.shape[-1])
    with vt.patch(mine), warnings.catch_warnings():
        warnings.simplefilter("ignore", PatchFallbackWarning)
        with pytest.raises(ValueError) as want:
            ref(grid)
        with pytest.raises(ValueError) as got:
            mine(grid)
        assert str(got.value) == str(want.value)
        assert max_rel(mine(x), ref(x)) < TOL


@pytest.mark.parametrize("name", ["llava", "vipllava", "qwen2_5_vl"])
def test_patched_connector_exports(name):
    """torch.export of a patched connector (the README's alternative to torch.jit.trace):
    non-strict export reads ``module.forward.__code__``, which the patched method refused
    (AttributeError: __code__). The exported program holds the fused op, not transformers'
    layers (the export's fake weights were taken for tensor subclasses, and the fused
    forward fell back), and gives transformers' result."""
    module, x = CASES[name]()
    ref = randomise(module)
    mine = copy.deepcopy(ref)
    with vt.patch(mine):
        program = torch.export.export(mine, (x,))
    called = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "vlmkernels.connector.default" in called
    assert not called & {"aten.linear.default", "aten.gelu.default", "aten.layer_norm.default"}
    assert max_rel(program.module()(x), ref(x)) < TOL

"""vlmkernels.integrations.transformers.patch on tiny random-weight Qwen2-VL, Qwen2.5-VL,
Qwen3-VL and Qwen3.5 models (and their MoE variants), built from configs (no download).

Inputs are laid out as the processors lay them out: ``<|vision_start|>``, one
``<|image_pad|>`` / ``<|video_pad|>`` per merged patch, ``<|vision_end|>`` (Qwen3-VL: one
such block per video frame, each after a timestamp), ``mm_token_type_ids`` 1 on image pads
and 2 on video pads; batch 2, the second row left-padded; two images (one per row) and one
two-frame video. Weights are drawn with ``initializer_range=0.1`` so that attention depends
on the positions: swapping the H and W position rows moves the logits by more than 1e-2
relative (checked), far above the tolerance.

Tolerance (fp32 everywhere): patched and unpatched logits, and every parameter gradient of
a fixed linear loss on the logits, agree to ``max|a - b| <= 1e-5 * max|b|`` (per tensor).
The table path does transformers' arithmetic in fp32 (observed bitwise equal); the
positions path computes the angles in the kernel (observed ~1e-7). ``undo`` is checked
bitwise.
"""

import contextlib
import copy
import functools
import types
import warnings

import pytest
import torch
from torch.profiler import profile

transformers = pytest.importorskip("transformers")

import vlmkernels.integrations.transformers as vt  # noqa: E402
from vlmkernels.integrations.patching import PatchFallbackWarning  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = 1e-5
IMG, VID, VSTART, VEND, PAD = 120, 121, 122, 123, 0
MERGE = 2
PATCH, TEMPORAL = 4, 2
PATCH_DIM = 3 * TEMPORAL * PATCH * PATCH
TEXT_LAYERS, VISION_DEPTH = 2, 2
IMAGE_GRIDS, VIDEO_GRIDS = ((1, 4, 6), (1, 2, 4)), ((2, 2, 4),)

# ------------------------------------------------------------------ tiny models and inputs


def _text(hidden, section, **extra):
    return dict(
        vocab_size=128, hidden_size=hidden, intermediate_size=128,
        num_hidden_layers=TEXT_LAYERS, num_attention_heads=4, num_key_value_heads=2,
        bos_token_id=1, eos_token_id=2, pad_token_id=PAD, initializer_range=0.1,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=section),
        **extra,
    )  # fmt: skip


def _vision(**extra):
    # Narrow (2 heads) because the interpreter runs the merger's GEMMs: the weight gradient
    # alone is (4 C / 16)^2 programs for vision width C.
    return dict(
        depth=VISION_DEPTH, num_heads=2, patch_size=PATCH, spatial_merge_size=MERGE,
        temporal_patch_size=TEMPORAL, initializer_range=0.1, **extra,
    )  # fmt: skip


_TOKENS = dict(
    image_token_id=IMG, video_token_id=VID, vision_start_token_id=VSTART,
    vision_end_token_id=VEND,
)  # fmt: skip


def qwen2_vl():
    """Text head dim 16 (chunked [2, 3, 3]), vision head dim 16."""
    config = transformers.Qwen2VLConfig(
        text_config=_text(64, [2, 3, 3]),
        vision_config=_vision(embed_dim=32, hidden_size=64, mlp_ratio=2),
        **_TOKENS,
    )
    return transformers.Qwen2VLForConditionalGeneration(config)


def qwen2_5_vl():
    """Text head dim 32 (chunked [4, 6, 6]), vision head dim 16 with 2x2-merge windows and
    one full-attention block, video temporal interval 2 * 1.5."""
    config = transformers.Qwen2_5_VLConfig(
        text_config=_text(128, [4, 6, 6]),
        vision_config=_vision(
            hidden_size=32, intermediate_size=64, out_hidden_size=128, window_size=16,
            fullatt_block_indexes=[1], tokens_per_second=2,
        ),
        **_TOKENS,
    )  # fmt: skip
    return transformers.Qwen2_5_VLForConditionalGeneration(config)


def _qwen3_vl_towers() -> dict:
    """Qwen3-VL's text and vision configs: text head dim 16 (interleaved [4, 2, 2]), vision
    head dim 12, deepstack on block 0."""
    vision = _vision(hidden_size=24, intermediate_size=64, out_hidden_size=64,
                     num_position_embeddings=16, deepstack_visual_indexes=[0])  # fmt: skip
    return dict(text_config=_text(64, [4, 2, 2], head_dim=16), vision_config=vision)


def qwen3_vl():
    """:func:`_qwen3_vl_towers`."""
    config = transformers.Qwen3VLConfig(**_qwen3_vl_towers(), **_TOKENS)
    return transformers.Qwen3VLForConditionalGeneration(config)


def qwen3_vl_moe():
    """Qwen3-VL's model with a mixture-of-experts decoder (two experts, top-1, every
    layer); its inputs are Qwen3-VL's."""
    moe = dict(num_experts=2, num_experts_per_tok=1, moe_intermediate_size=32)
    config = transformers.Qwen3VLMoeConfig(
        text_config=_text(64, [4, 2, 2], head_dim=16, **moe),
        vision_config=_vision(
            hidden_size=24, intermediate_size=64, out_hidden_size=64,
            num_position_embeddings=16, deepstack_visual_indexes=[0],
        ),
        **_TOKENS,
    )  # fmt: skip
    return transformers.Qwen3VLMoeForConditionalGeneration(config)


def qwen3_5(moe: bool = False):
    """Qwen3.5 (or Qwen3.5-MoE, two experts, top-1): a hybrid decoder, one Gated DeltaNet
    layer then one attention layer whose text rotary is partial, 16 of the head's 32 lanes
    (interleaved [4, 2, 2]; the released models rotate a quarter); Qwen3-VL's vision tower
    without DeepStack, and its inputs."""
    text = _text(64, [4, 2, 2], head_dim=32, layer_types=["linear_attention", "full_attention"],
                 linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                 linear_num_value_heads=4)  # fmt: skip
    text["rope_parameters"]["partial_rotary_factor"] = 0.5
    if moe:
        text.update(num_experts=2, num_experts_per_tok=1, moe_intermediate_size=32,
                    shared_expert_intermediate_size=32)  # fmt: skip
    prefix = "Qwen3_5Moe" if moe else "Qwen3_5"
    config = getattr(transformers, f"{prefix}Config")(
        text_config=text,
        vision_config=_vision(hidden_size=24, intermediate_size=64, out_hidden_size=64,
                              num_position_embeddings=16),
        **_TOKENS,
    )  # fmt: skip
    return getattr(transformers, f"{prefix}ForConditionalGeneration")(config)


def glm4v(moe: bool = False, prefix: str | None = None, glm46v: bool = False):
    """GLM-4V (or GLM-4V-MoE, two routed experts, top-1, after one dense layer; or another
    model of GLM-4V's code, ``prefix`` naming its classes: GLM-OCR's "GlmOcr"): text head
    dim 32 of which half rotates (the released models' partial_rotary_factor), chunked
    sections [2, 3, 3] over its 8 frequencies; GLM-4V's in pairs (rotate_half_llm),
    GLM-4V-MoE's rotate-half. Vision head dim 12. Its video frames are image tokens (a
    batch holds images or videos, not both), so the tests give it images. ``glm46v``:
    GLM-4.6V, its own model class around the towers of the one GLM-4V (or -MoE) builds,
    made from their model types as its checkpoints name them."""
    text = _text(128, [2, 3, 3])
    text["rope_parameters"]["partial_rotary_factor"] = 0.5
    if moe:
        text.update(n_routed_experts=2, num_experts_per_tok=1, moe_intermediate_size=32,
                    n_shared_experts=1, first_k_dense_replace=1)  # fmt: skip
    vision = _vision(hidden_size=24, intermediate_size=64, out_hidden_size=128, image_size=16)
    prefix = prefix or ("Glm4vMoe" if moe else "Glm4v")
    if glm46v:
        kind = "glm4v_moe" if moe else "glm4v"
        text["model_type"], vision["model_type"] = f"{kind}_text", f"{kind}_vision"
        prefix = "Glm46V"
    config = getattr(transformers, f"{prefix}Config")(
        text_config=text,
        vision_config=vision,
        image_token_id=IMG, video_token_id=VID, image_start_token_id=VSTART,
        image_end_token_id=VEND, video_start_token_id=VSTART, video_end_token_id=VEND,
    )  # fmt: skip
    return getattr(transformers, f"{prefix}ForConditionalGeneration")(config)


def paddleocr_vl():
    """PaddleOCR-VL: Qwen2-VL's text rotary (head dim 32, chunked [4, 6, 6]) and
    get_rope_index, a NaViT-style vision tower (head dim 12) calling Qwen's vision rotary
    function."""
    vision = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=VISION_DEPTH,
                  num_attention_heads=2, image_size=16, patch_size=PATCH,
                  spatial_merge_size=MERGE)  # fmt: skip
    config = transformers.PaddleOCRVLConfig(
        text_config=_text(128, [4, 6, 6], head_dim=32), vision_config=vision, **_TOKENS
    )
    return transformers.PaddleOCRVLForConditionalGeneration(config)


def cosmos3_omni():
    """Cosmos3-Omni: its own model around Qwen3-VL's towers (:func:`_qwen3_vl_towers`),
    with Qwen3-VL's get_rope_index."""
    towers = _qwen3_vl_towers()
    towers["text_config"]["model_type"] = "qwen3_vl_text"
    config = transformers.Cosmos3OmniConfig(**towers, **_TOKENS)
    return transformers.Cosmos3OmniForConditionalGeneration(config)


def qwen4_exp():
    """Qwen4-Exp: two attention layers ("full_attention", which transformers runs as its
    sparse, indexed attention), text head dim 16 of which half
    rotates (interleaved [2, 1, 1]), a QSA indexer of one KV head, two experts (top-1),
    hyper-connections of 2; Qwen3-VL's vision tower (head dim 12)."""
    text = _text(64, [2, 1, 1], head_dim=16)
    text["rope_parameters"] |= dict(partial_rotary_factor=0.5, mrope_interleaved=True)
    text.update(
        layer_types=["full_attention"] * TEXT_LAYERS, moe_intermediate_size=16,
        shared_expert_intermediate_size=16, num_experts=2, num_experts_per_tok=1, hc_count=2,
        hc_lowrank=8, ngram_vocab_size_base=1000, split_ngram_parts=4, heads_per_ngram=2,
        indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=4,
        indexer_compress_ratio=2,
    )  # fmt: skip
    config = transformers.Qwen4ExpConfig(
        text_config=text,
        vision_config=_vision(hidden_size=24, intermediate_size=64, out_hidden_size=64,
                              num_position_embeddings=16),
        **_TOKENS,
    )  # fmt: skip
    return transformers.Qwen4ExpForConditionalGeneration(config)


def cohere_compass():
    """Cohere Compass: Qwen2-VL's rotary functions and Qwen3-VL's get_rope_index, a rotary
    class with a table per layer type: here a sliding-window layer (theta 1e4, interleaved
    [4, 2, 2]) then a full-attention one (theta 5e5, [2, 3, 3]); text head dim 16, vision
    head dim 12 (Qwen3-VL's tower, deepstack on block 0)."""
    text = _text(64, [4, 2, 2], head_dim=16, sliding_window=8,
                 layer_types=["sliding_attention", "full_attention"])  # fmt: skip
    text["rope_parameters"] = {
        "sliding_attention": dict(rope_type="default", rope_theta=1e4, mrope_section=[4, 2, 2]),
        "full_attention": dict(rope_type="default", rope_theta=5e5, mrope_section=[2, 3, 3]),
    }
    config = transformers.CohereCompassConfig(
        text_config=text,
        vision_config=_vision(hidden_size=24, intermediate_size=64, out_hidden_size=64,
                              num_position_embeddings=16, deepstack_visual_indexes=[0]),
        **_TOKENS,
    )  # fmt: skip
    return transformers.CohereCompassForConditionalGeneration(config)


def ernie4_5_vl():
    """ERNIE-4.5-VL: text head dim 16 rotating in lane pairs over the whole head, in fp32
    (sections [h, w, t] = [2, 2, 4], its own rule), one dense then one MoE layer (two
    experts, top-1, a shared one); a NaViT-style vision tower (head dim 12, patches of
    3 x 4 x 4) calling Qwen's vision rotary function."""
    text = _text(64, [2, 2, 4], head_dim=16, moe_intermediate_size=[32, 16], moe_k=1,
                 moe_num_experts=2, moe_num_shared_experts=1)  # fmt: skip
    vision = dict(depth=VISION_DEPTH, hidden_size=24, intermediate_size=48, num_heads=2,
                  patch_size=PATCH, spatial_merge_size=MERGE, initializer_range=0.1)  # fmt: skip
    config = transformers.Ernie4_5_VLMoeConfig(
        text_config=text, vision_config=vision, image_token_id=IMG, video_token_id=VID,
        image_start_token_id=VSTART, image_end_token_id=VEND, video_start_token_id=VSTART,
        video_end_token_id=VEND,
    )  # fmt: skip
    return transformers.Ernie4_5_VLMoeForConditionalGeneration(config)


def text_rotary_model(arch: str):
    """HunYuan-VL, Cosmos3-Edge or GLM-Image: text head dim 16 (sections [2, 3, 3], each
    model's own rule; GLM-Image's head half rotary, as released, [1, 1, 2]), one-layer
    vision towers (not patched: no rotary of theirs in Qwen's form)."""
    text = _text(64, [2, 3, 3], head_dim=16)
    small = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                 patch_size=PATCH)  # fmt: skip
    if arch == "hunyuan_vl":
        config = transformers.HunYuanVLConfig(
            text_config=text, vision_config=dict(small, out_hidden_size=64, text_hidden_size=64)
        )
        return transformers.HunYuanVLForConditionalGeneration(config)
    if arch == "cosmos3_edge":
        config = transformers.Cosmos3EdgeConfig(
            text_config=text, vision_config=dict(small, num_patches=16), projector_hidden_size=32
        )
        return transformers.Cosmos3EdgeForConditionalGeneration(config)
    text["rope_parameters"] |= dict(partial_rotary_factor=0.5, mrope_section=[1, 1, 2])
    config = transformers.GlmImageConfig(
        text_config=dict(text, vision_vocab_size=64),
        vision_config=dict(depth=1, hidden_size=24, intermediate_size=48, num_heads=2,
                           patch_size=PATCH, image_size=16),
        vq_config=dict(embed_dim=8, num_embeddings=16, latent_channels=8),
    )  # fmt: skip
    return transformers.GlmImageForConditionalGeneration(config)


_AUDIO = dict(num_mel_bins=8, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=16,
              d_model=16, max_source_positions=16, n_window=4)  # fmt: skip


def qwen_omni(version: str):
    """A Qwen2.5-Omni thinker (Qwen2.5-VL's text rotary, chunked [4, 6, 6], head dim 32, and
    windowed vision tower) or a Qwen3-Omni-MoE thinker (Qwen3-VL's: interleaved [4, 2, 2],
    head dim 16, two experts, DeepStack on block 0); a one-layer audio encoder."""
    tokens = dict(image_token_id=IMG, video_token_id=VID, vision_start_token_id=VSTART,
                  vision_end_token_id=VEND)  # fmt: skip
    if version == "2.5":
        config = transformers.Qwen2_5OmniThinkerConfig(
            text_config=_text(128, [4, 6, 6], head_dim=32),
            vision_config=dict(_vision(hidden_size=24, intermediate_size=48, out_hidden_size=128,
                                       window_size=16, fullatt_block_indexes=[1])),
            audio_config=dict(_AUDIO, output_dim=128),
            image_token_index=IMG, video_token_index=VID, vision_start_token_id=VSTART,
            vision_end_token_id=VEND,
        )  # fmt: skip
        return transformers.Qwen2_5OmniThinkerForConditionalGeneration(config)
    config = transformers.Qwen3OmniMoeThinkerConfig(
        text_config=_text(64, [4, 2, 2], head_dim=16, num_experts=2, num_experts_per_tok=1,
                          moe_intermediate_size=32),
        vision_config=_vision(hidden_size=24, intermediate_size=64, out_hidden_size=64,
                              num_position_embeddings=16, deepstack_visual_indexes=[0]),
        audio_config=dict(_AUDIO, output_dim=64, downsample_hidden_size=8), **tokens,
    )  # fmt: skip
    return transformers.Qwen3OmniMoeThinkerForConditionalGeneration(config)


ARCHS = {"qwen2_vl": qwen2_vl, "qwen2_5_vl": qwen2_5_vl, "qwen3_vl": qwen3_vl}


def _tokens(grid):
    return grid[0] * grid[1] * grid[2] // MERGE**2


def make_inputs(arch: str, with_video: bool = True) -> dict:
    """Two left-padded rows: text, an image, text, a video (if ``with_video``), text;
    text, another image, text."""
    g = torch.Generator().manual_seed(1)

    def text(n):
        return torch.randint(3, 100, (n,), generator=g).tolist()

    def image(grid):
        return [VSTART] + [IMG] * _tokens(grid) + [VEND]

    def video(grid):
        if arch == "qwen3_vl":  # one block per frame, after its timestamp
            frame = [VSTART] + [VID] * (grid[1] * grid[2] // MERGE**2) + [VEND]
            return sum((text(2) + frame for _ in range(grid[0])), [])
        return [VSTART] + [VID] * _tokens(grid) + [VEND]

    rows = [
        text(4)
        + image(IMAGE_GRIDS[0])
        + text(3)
        + (video(VIDEO_GRIDS[0]) if with_video else [])
        + text(4),
        text(3) + image(IMAGE_GRIDS[1]) + text(5),
    ]
    length = max(map(len, rows))
    ids = torch.tensor([[PAD] * (length - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    types = torch.zeros_like(ids)
    types[ids == IMG], types[ids == VID] = 1, 2

    def pixels(grids):
        n = sum(t * h * w for t, h, w in grids)
        return torch.randn(n, PATCH_DIM, generator=g)

    inputs = dict(
        input_ids=ids, attention_mask=mask, mm_token_type_ids=types,
        pixel_values=pixels(IMAGE_GRIDS), image_grid_thw=torch.tensor(IMAGE_GRIDS),
    )  # fmt: skip
    if with_video:
        inputs.update(pixel_values_videos=pixels(VIDEO_GRIDS),
                      video_grid_thw=torch.tensor(VIDEO_GRIDS))  # fmt: skip
    if arch == "qwen2_5_vl":
        inputs["second_per_grid_ts"] = torch.tensor([1.5])
    return inputs


class Built:
    """A model, its inputs, and its unpatched logits and parameter gradients."""

    def __init__(self, arch: str):
        torch.manual_seed(0)
        self.arch = arch
        self.model = ARCHS[arch]().eval().to(DEVICE)
        self.inputs = {k: v.to(DEVICE) for k, v in make_inputs(arch).items()}
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.ref_logits, self.ref_grads = self.run()

    def run(self, forward_ops=None):
        """Logits and the parameter gradients of a fixed linear loss on them; the ops the
        forward pass ran are counted into ``forward_ops`` if given."""
        with profile() if forward_ops is not None else contextlib.nullcontext() as prof:
            logits = self.model(**self.inputs).logits
        if forward_ops is not None:
            forward_ops.update(_vlmkernels_ops(prof))
        grads = torch.autograd.grad(linear_loss(logits), self.params, allow_unused=True)
        return logits.detach(), grads

    def logits(self, model=None):
        with torch.no_grad():
            return (model or self.model)(**self.inputs).logits


@pytest.fixture(scope="module", params=list(ARCHS))
def built(request) -> Built:
    return Built(request.param)


@pytest.fixture(scope="module")
def qwen2(request) -> Built:
    return Built("qwen2_vl")


def rotary_patch(model, **parts):
    """The rotary table's parts alone: the connector tables' parts, which a Qwen-VL model
    also gets by default (its merger, Qwen3-VL's DeepStack), have their own tests
    (tests/test_connectors_patch.py) and :func:`test_patched_matches_transformers`."""
    return vt.patch(model, **{"connector": False, "deepstack": False, **parts})


def assert_close(actual, expected, what):
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= TOL * scale, f"{what}: max abs error {err:.3g} > {TOL} * {scale:.3g}"


def linear_loss(logits):
    """The fixed linear loss whose parameter gradients the tests compare: the logits
    weighted by a seeded random tensor, summed."""
    g = torch.Generator().manual_seed(2)
    return (logits * torch.randn(logits.shape, generator=g).to(logits.device)).sum()


def assert_same_grads(params, got, want, zero_below=0.0):
    """Parameter by parameter: both gradients are None, or they agree (assert_close). One
    whose reference is below ``zero_below`` times the largest reference (zero up to
    rounding) must only stay below it."""
    floor = zero_below * max(g.abs().max().item() for g in want if g is not None)
    for p, g, ref in zip(params, got, want, strict=True):
        assert (g is None) == (ref is None)
        if ref is None:
            continue
        if ref.abs().max() < floor:
            assert g.abs().max() < floor
        else:
            assert_close(g, ref, f"gradient of a {tuple(p.shape)} parameter")


def logits_grads_tokens(model, inputs, params, new_tokens: int):
    """The model's logits, the parameter gradients of :func:`linear_loss` on them, and (if
    ``new_tokens``) the tokens of a greedy ``generate()``, else None."""
    logits = model(**inputs).logits
    grads = torch.autograd.grad(linear_loss(logits), params, allow_unused=True)
    tokens = None
    if new_tokens:
        with torch.no_grad():
            tokens = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    return logits.detach(), grads, tokens


def _vlmkernels_ops(prof) -> dict[str, int]:
    return {e.key: e.count for e in prof.key_averages() if e.key.startswith("vlmkernels::")}


def op_counts(fn):
    """Runs fn under the profiler; returns ({vlmkernels op: calls}, fn's result)."""
    with profile() as prof:
        out = fn()
    return _vlmkernels_ops(prof), out


def instance_overrides(model) -> list[tuple[str, str]]:
    names = ("forward", "_old_forward", "get_rope_index")
    return [(n, a) for n, m in model.named_modules() for a in names if a in m.__dict__]


# ------------------------------------------------------------------ equality with transformers


@pytest.mark.parametrize("angles", ["table", "positions"])
def test_patched_matches_transformers(built, angles):
    """Logits and every parameter gradient match the unpatched model; the text and vision
    ops ran once per layer (one vision call each for the images and the video)."""
    counts = {}
    with vt.patch(built.model, angles=angles):
        logits, grads = built.run(forward_ops=counts)
    assert_close(logits, built.ref_logits, "logits")
    assert_same_grads(built.params, grads, built.ref_grads)
    vision_calls = 2 * VISION_DEPTH
    if angles == "table":
        assert counts.get("vlmkernels::rope_table", 0) == TEXT_LAYERS + vision_calls
    else:
        assert counts.get("vlmkernels::rope_positions", 0) == TEXT_LAYERS
        assert counts.get("vlmkernels::rope_table", 0) == vision_calls
    # the connector table's parts ran too: each merger (Qwen3-VL's DeepStack mergers too)
    # once per vision call, and Qwen3-VL's DeepStack add in the decoder
    deepstack = built.model.model.visual.__dict__["_modules"].get("deepstack_merger_list", ())
    assert counts.get("vlmkernels::connector", 0) == 2 * (1 + len(deepstack)), counts
    assert (counts.get("vlmkernels::deepstack_add", 0) > 0) == (len(deepstack) > 0), counts


def test_greedy_generation_matches_transformers(built):
    """generate() with the KV cache (prefill, then decode steps whose positions come from
    the cached rope deltas) gives the unpatched model's tokens, greedy."""
    with torch.no_grad():
        want = built.model.generate(**built.inputs, max_new_tokens=4, do_sample=False)
        with vt.patch(built.model):
            got = built.model.generate(**built.inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, want)


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen3_vl"])
def test_compiled_patched_model(arch):
    """torch.compile of a patched model traces vlmkernels' rotary op (the rebuilt attention
    forward's globals are guarded as the dict they are: guards on the module its name
    imports crashed where that module's function is transformers' hub-kernel Func) and
    gives the unpatched logits."""
    torch.manual_seed(0)
    model = ARCHS[arch]().eval().to(DEVICE)
    ids = torch.randint(3, 100, (1, 8), device=DEVICE)  # text only
    codes = []

    def backend(gm, example_inputs):
        codes.append(gm.code)
        return gm

    with torch.no_grad():
        want = model(input_ids=ids).logits
        with rotary_patch(model):
            got = torch.compile(model, backend=backend)(input_ids=ids).logits
    torch._dynamo.reset()
    assert any("vlmkernels.rope_table" in code for code in codes)
    assert_close(got, want, "compiled logits")


def test_rope_index_replaces_the_per_row_loop(built):
    """With rope_index, position ids and logits match transformers', and transformers'
    per-row loop (which calls get_vision_position_ids per vision group) does not run."""
    inner = built.model.model
    calls = []
    original = inner.get_vision_position_ids

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    x = built.inputs
    args = dict(
        input_ids=x["input_ids"], mm_token_type_ids=x["mm_token_type_ids"],
        image_grid_thw=x["image_grid_thw"], video_grid_thw=x["video_grid_thw"],
        attention_mask=x["attention_mask"],
    )  # fmt: skip
    if "second_per_grid_ts" in x:
        args["second_per_grid_ts"] = x["second_per_grid_ts"]
    inner.get_vision_position_ids = spy
    try:
        ref_pos, ref_delta = inner.get_rope_index(**args)
        assert calls, "the spy does not see transformers' loop"
        calls.clear()
        with rotary_patch(built.model, rope=False, vision=False, rope_index=True) as handle:
            assert handle.targets == ("model.get_rope_index",)
            pos, delta = inner.get_rope_index(**args)
            logits = built.logits()
    finally:
        del inner.get_vision_position_ids
    assert not calls
    assert torch.equal(pos, ref_pos) and torch.equal(delta, ref_delta)
    assert torch.equal(logits, built.ref_logits)


# ------------------------------------------------------------------ per instance, exact undo


def test_undo_restores_exactly(qwen2):
    model = qwen2.model
    before = instance_overrides(model)
    handle = rotary_patch(model)
    patched = instance_overrides(model)
    assert len(patched) == TEXT_LAYERS + VISION_DEPTH + 1
    assert set(handle.targets) == {f"{n}.{a}" for n, a in patched}
    handle.undo()
    assert instance_overrides(model) == before == []
    assert not handle.active
    handle.undo()  # a second undo does nothing
    counts, logits = op_counts(qwen2.logits)
    assert counts == {}
    assert torch.equal(logits, qwen2.ref_logits)


def test_context_manager(qwen2):
    with rotary_patch(qwen2.model, rope_index=False) as handle:
        assert handle.active and instance_overrides(qwen2.model)
    assert not handle.active and instance_overrides(qwen2.model) == []


def test_two_instances_one_patched(qwen2):
    twin = copy.deepcopy(qwen2.model)
    with rotary_patch(twin):
        counts, logits = op_counts(qwen2.logits)
        assert counts == {}
        assert torch.equal(logits, qwen2.ref_logits)
        counts, twin_logits = op_counts(lambda: qwen2.logits(twin))
        assert counts["vlmkernels::rope_table"] == TEXT_LAYERS + 2 * VISION_DEPTH
        assert_close(twin_logits, qwen2.ref_logits, "logits of the patched twin")
    assert torch.equal(qwen2.logits(twin), qwen2.ref_logits)


def _snapshot(modeling):
    """Every global of the modeling module and every attribute of its classes (and of
    torch.nn.Module), as (name, id) pairs: patch must rebind none of them."""
    spaces = {"module": vars(modeling), "nn.Module": vars(torch.nn.Module)}
    spaces |= {n: vars(c) for n, c in vars(modeling).items() if isinstance(c, type)}
    return {k: {n: id(v) for n, v in space.items()} for k, space in spaces.items()}


def test_transformers_and_torch_unchanged(built):
    import sys

    modeling = sys.modules[type(built.model).__module__]
    before = _snapshot(modeling)
    with rotary_patch(built.model, angles="positions"):
        assert _snapshot(modeling) == before
    assert _snapshot(modeling) == before


def test_patching_twice_raises(qwen2):
    with rotary_patch(qwen2.model, rope_index=False):
        with pytest.raises(vt.AlreadyPatchedError):
            rotary_patch(qwen2.model, rope_index=False)
        with pytest.raises(vt.AlreadyPatchedError):
            rotary_patch(qwen2.model.model.language_model)
        with pytest.raises(vt.AlreadyPatchedError):
            rotary_patch(qwen2.model.model.visual)
    with rotary_patch(qwen2.model.model.language_model):  # fine again once undone
        pass


def test_undo_refuses_when_overwritten(qwen2):
    attn = qwen2.model.model.language_model.layers[0].self_attn
    handle = rotary_patch(qwen2.model, rope_index=False)
    mine = attn.forward
    attn.forward = lambda *a, **k: None
    with pytest.raises(RuntimeError, match="changed after patching"):
        handle.undo()
    assert handle.active and attn.__dict__["forward"] is not mine  # nothing restored
    attn.forward = mine
    handle.undo()
    assert instance_overrides(qwen2.model) == []


def test_text_model_and_vision_tower_roots(qwen2):
    """A ...TextModel gets the text part only, a vision tower the vision part only."""
    text, visual = qwen2.model.model.language_model, qwen2.model.model.visual
    with rotary_patch(text) as handle:
        assert handle.targets == tuple(f"layers.{i}.self_attn.forward" for i in range(TEXT_LAYERS))
    with rotary_patch(visual) as handle:
        assert handle.targets == tuple(f"blocks.{i}.attn.forward" for i in range(VISION_DEPTH))
    with rotary_patch(qwen2.model, vision=False, rope_index=False) as handle:
        assert all(".self_attn." in t for t in handle.targets)


def test_model_inside_a_wrapper(qwen2):
    """A wrapper holding the model (peft's PeftModel, a LightningModule: here a plain
    module with it as ``.model``) gets the outermost Qwen-VL model's parts, not the
    connector parts alone; logits match, undo restores."""

    class Wrapper(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, **inputs):
            return self.model(**inputs)

    wrapper = Wrapper(qwen2.model)
    with vt.patch(wrapper) as handle:
        targets = handle.targets
        logits = qwen2.logits(wrapper)
    assert "model.model.get_rope_index" in targets
    assert any(".self_attn." in t for t in targets) and any(".attn." in t for t in targets)
    assert_close(logits, qwen2.ref_logits, "logits")
    assert instance_overrides(qwen2.model) == []


def test_wrapper_holding_the_towers_apart_gets_every_towers_parts(qwen2):
    """A module holding a vision tower and a text model side by side, neither inside the
    other (a user's own composition; GLM-4.6V builds its towers so): each root's parts
    apply, not the first one found alone."""
    inner = qwen2.model.model
    pair = torch.nn.ModuleDict({"visual": inner.visual, "text": inner.language_model})
    with vt.patch(pair) as handle:
        targets = handle.targets
    assert sum(".self_attn." in t for t in targets) == TEXT_LAYERS, targets
    assert sum(".attn." in t and ".self_attn." not in t for t in targets) == VISION_DEPTH
    with vt.patch(pair, angles="positions") as handle:
        assert any("rotary_emb" in t for t in handle.targets), handle.targets
    assert instance_overrides(qwen2.model) == []


def test_pickled_patched_model_loads_unpatched_and_patches_again(qwen2):
    """torch.save of a patched model (before its first forward: transformers' output
    recorder hooks do not pickle) loads unpatched, holding the classes' own methods where
    the patched ones were; it runs transformers' code and can be patched again."""
    import io

    from vlmkernels.integrations.patching import is_patched

    torch.manual_seed(0)
    fresh = ARCHS["qwen2_vl"]().eval().to(DEVICE)
    fresh.load_state_dict(qwen2.model.state_dict())
    buffer = io.BytesIO()
    with vt.patch(fresh):
        torch.save(fresh, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert not any(is_patched(m.__dict__.get("forward")) for m in loaded.modules())
    assert_close(qwen2.logits(loaded), qwen2.ref_logits, "logits of the loaded model")
    with vt.patch(loaded) as handle:
        assert "model.get_rope_index" in handle.targets
        assert_close(qwen2.logits(loaded), qwen2.ref_logits, "logits patched again")
    # the classes' methods pinned per instance would hide a later change to a class:
    # unpatch takes them out, as it takes out patched ones
    assert vt.unpatch(loaded) > 0
    assert instance_overrides(loaded) == []


def test_deleted_patched_model_is_freed_without_the_cyclic_collector(qwen2):
    """``del`` of a patched model (handle dropped too) frees its weights at once, as for an
    unpatched model: the patched methods do not make reference cycles through the modules
    that hold them."""
    import gc
    import weakref

    model = copy.deepcopy(qwen2.model)
    handle = vt.patch(model)
    qwen2.logits(model)
    weights = [weakref.ref(p) for p in model.parameters()]
    kept = model.model.get_rope_index  # a patched method kept past its model
    gc.collect()
    gc.disable()
    try:
        del model, handle
        alive = sum(w() is not None for w in weights)
    finally:
        gc.enable()
    assert alive == 0, f"{alive} of {len(weights)} parameters wait for the cyclic collector"
    with pytest.raises(ReferenceError, match="no longer exists"):
        kept(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))


def test_patch_inside_a_meta_device_block(monkeypatch):
    """Deferred initialisation (build and patch under ``torch.device("meta")``, load the
    weights later): the one-time probe of the installed get_rope_index runs on the CPU,
    not on the caller's default device."""
    from vlmkernels.integrations.tables import qwen_vl

    monkeypatch.setattr(qwen_vl, "_PROBED", {})  # probe now, inside the block
    with torch.device("meta"):
        model = ARCHS["qwen2_vl"]()
        with vt.patch(model) as handle:
            assert "model.get_rope_index" in handle.targets


# ------------------------------------------------------------------ errors


def test_unsupported_models_raise(qwen2):
    config = transformers.Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1,
    )  # fmt: skip
    for model in (
        torch.nn.Linear(4, 4),
        transformers.Qwen2ForCausalLM(config),
        qwen2.model.model.language_model.layers[0],  # a Qwen2-VL class, but not a model
    ):
        with pytest.raises(vt.UnsupportedModelError):
            rotary_patch(model)
    assert instance_overrides(qwen2.model) == []
    # a model no table knows: the error names every table's architectures, not only the
    # rotary one's; a Qwen-VL class that is not a model keeps the rotary table's message
    with pytest.raises(vt.UnsupportedModelError) as info:
        vt.patch(transformers.Qwen2ForCausalLM(config))
    for arch in ("qwen2_vl", "llava", "blip_2", "idefics", "internvl", "smolvlm"):
        assert arch in str(info.value)
    with pytest.raises(vt.UnsupportedModelError, match="takes a"):
        vt.patch(qwen2.model.model.language_model.layers[0])


def test_bad_arguments_raise(qwen2):
    # named with the function, as every other patch error is
    with pytest.raises(ValueError, match="^vlmkernels.patch: angles"):
        rotary_patch(qwen2.model, angles="cache")
    with pytest.raises(ValueError, match="^vlmkernels.patch: .*rope=True"):
        rotary_patch(qwen2.model, rope=False, angles="positions")
    with pytest.raises(ValueError, match="nothing to patch"):
        rotary_patch(qwen2.model, rope=False, vision=False, rope_index=False)
    with pytest.raises(TypeError, match="rope must be True or False, got 'no'"):
        rotary_patch(qwen2.model, rope="no")  # a string is not taken by truthiness
    # 'positions' is angles="positions", not a part keyword: as one it bypassed the check
    # above (rope=False patched the rotary module alone, and the forward failed later)
    for parts in ({"rope": False, "positions": True}, {"positions": True},
                  {"angles": "positions", "positions": False}):  # fmt: skip
        with pytest.raises(TypeError, match="angles='positions'"):
            rotary_patch(qwen2.model, **parts)
    assert instance_overrides(qwen2.model) == []


def _with_attention_class(model, make_subclass):
    """A copy of model whose first text attention module is an instance of
    make_subclass(its class)."""
    model = copy.deepcopy(model)
    attn = model.model.language_model.layers[0].self_attn
    attn.__class__ = make_subclass(type(attn))
    return model


def _calls_super(base):
    class NoRotaryCall(base):
        def forward(self, *args, **kwargs):  # the rotary call happens in base.forward
            return super().forward(*args, **kwargs)

    return NoRotaryCall


def _decorated(base):
    """Two ``functools.wraps`` layers over the class's (possibly already decorated)
    forward, one renaming a keyword as ``deprecate_kwarg`` does; each counts its calls."""
    import functools

    def counted(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            wrapper.calls += 1
            return fn(*args, **kwargs)

        wrapper.calls = 0
        return wrapper

    def renamed(old, new):
        def decorate(fn):
            @functools.wraps(fn)
            def wrapper(*args, **kwargs):
                if old in kwargs:
                    kwargs[new] = kwargs.pop(old)
                return fn(*args, **kwargs)

            return wrapper

        return decorate

    class Decorated(base):
        forward = counted(renamed("legacy_cache", "past_key_values")(base.forward))

    return Decorated


_REGISTRY = {}


def _opaque(base):
    """A decorator that keeps the wrapped function in a registry, not in its closure."""
    import functools

    _REGISTRY[base] = base.forward

    @functools.wraps(base.forward)
    def wrapper(self, *args, **kwargs):
        return _REGISTRY[base](self, *args, **kwargs)

    return type("Opaque", (base,), {"forward": wrapper})


@pytest.mark.parametrize("make_subclass", [_calls_super, _opaque])
def test_unrecognised_layout_raises_and_changes_nothing(qwen2, make_subclass):
    model = _with_attention_class(qwen2.model, make_subclass)
    with pytest.raises(vt.UnsupportedLayoutError) as error:
        rotary_patch(model, rope_index=False)
    message = str(error.value)
    assert f"transformers {transformers.__version__}" in message
    assert "tested with" in message and vt.TESTED_VERSIONS[-1] in message
    assert "vlmkernels.patch(model, rope=False)" in message
    assert instance_overrides(model) == []
    with rotary_patch(model, rope=False, rope_index=False):  # the vision part alone is fine
        pass


def test_overridden_vision_position_hook_is_refused(qwen2, monkeypatch):
    """A model class overriding get_vision_position_ids (the per-image hook transformers'
    get_rope_index calls) is refused: the vectorised index would skip it silently."""
    if not hasattr(type(qwen2.model.model), "get_vision_position_ids"):
        pytest.skip("this transformers has no get_vision_position_ids")
    model = copy.deepcopy(qwen2.model)
    base = type(model.model)

    def spaced(self, start_position, grid_thw, temp_merge_size=1, spatial_merge_size=1,
               time_interval=1.0, device=None):  # fmt: skip
        spacing = 4 * time_interval
        return base.get_vision_position_ids(self, start_position, grid_thw, temp_merge_size,
                                            spatial_merge_size, spacing, device)  # fmt: skip

    model.model.__class__ = type("Spaced", (base,), {"get_vision_position_ids": spaced})
    with pytest.raises(TypeError, match="overrides Qwen2VLModel.get_vision_position_ids"):
        vt.rope_index_method(model.model)
    with pytest.raises(vt.UnsupportedLayoutError, match="get_vision_position_ids"):
        rotary_patch(model)
    assert instance_overrides(model) == []
    with rotary_patch(model, rope_index=False):
        pass
    # the same function set on transformers' class itself
    monkeypatch.setattr(base, "get_vision_position_ids", spaced)
    with pytest.raises(vt.UnsupportedLayoutError, match="replaced on the class"):
        rotary_patch(qwen2.model)
    assert instance_overrides(qwen2.model) == []


def _rotary_subclass(model):
    """``model``'s text rotary module as a subclass with its own forward (double angles)."""
    rotary = model.model.language_model.rotary_emb
    base = type(rotary)

    def forward(self, x, position_ids):
        return base.forward(self, x, 2 * position_ids)

    rotary.__class__ = type("Doubled", (base,), {"forward": forward})


def test_rotary_subclass_with_its_own_forward_is_refused_with_positions(qwen2):
    """angles='positions' replaces the rotary's forward: one a subclass overrides is refused
    (its angles would be dropped); the table path keeps it."""
    model = copy.deepcopy(qwen2.model)
    _rotary_subclass(model)
    ref = qwen2.logits(model)
    with pytest.raises(vt.UnsupportedLayoutError, match="overrides Qwen2VLRotaryEmbedding"):
        rotary_patch(model, angles="positions")
    assert instance_overrides(model) == []
    with rotary_patch(model, angles="table"):
        assert_close(qwen2.logits(model), ref, "logits")


def test_replaced_module_rotary_function_is_refused(qwen2, monkeypatch):
    """A rotary function another package put in transformers' module (a research variant,
    another kernel library's patch) is refused, not silently replaced by stock RoPE."""
    modeling = __import__(type(qwen2.model).__module__, fromlist=["_"])
    name = next(n for n in ("apply_rotary_pos_emb", "apply_multimodal_rotary_pos_emb")
                if hasattr(modeling, n))  # transformers >= 5.17, 5.16  # fmt: skip
    stock = getattr(modeling, name)

    def rotate_k_only(q, k, *args):
        return q, stock(q, k, *args)[1]

    monkeypatch.setattr(modeling, name, rotate_k_only)
    model = copy.deepcopy(qwen2.model)
    with pytest.raises(vt.UnsupportedLayoutError, match="rotate_k_only, not the transformers"):
        rotary_patch(model)
    assert instance_overrides(model) == []
    with rotary_patch(model, rope=False):  # the other parts are fine
        pass


def test_attention_subclass_of_another_package_calling_transformers_rotary(qwen2):
    """A user's attention subclass in a package of its own, whose forward calls transformers'
    rotary function (imported there), is patched with transformers' logits; it was refused
    as "not the <package> function" though it was transformers' own."""
    model = copy.deepcopy(qwen2.model)
    attention = model.model.language_model.layers[0].self_attn
    base = type(attention)
    stock = base.forward
    while hasattr(stock, "__wrapped__"):  # the undecorated code, as a user's copy would be
        stock = stock.__wrapped__
    scope = dict(stock.__globals__, __name__="userpkg.attention")  # their module's globals
    forward = types.FunctionType(stock.__code__, scope, "forward", stock.__defaults__,
                                 stock.__closure__)  # fmt: skip
    forward.__kwdefaults__ = stock.__kwdefaults__
    mine = type("MyAttention", (base,), {"forward": forward, "__module__": "userpkg.attention"})
    for layer in model.model.language_model.layers:
        layer.self_attn.__class__ = mine
    ref = qwen2.logits(model)
    with rotary_patch(model, vision=False, rope_index=False) as handle:
        assert any("self_attn" in t for t in handle.targets), handle.targets
        assert_close(qwen2.logits(model), ref, "logits")


def test_two_handles_on_one_model_undo_quietly(qwen2):
    """Parts patched by two handles: undoing one leaves the other's, without the warning
    about patched copies."""
    model = copy.deepcopy(qwen2.model)
    text = rotary_patch(model, vision=False, rope_index=False)
    vision = rotary_patch(model, rope=False, rope_index=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        text.undo()
        assert instance_overrides(model) != []
        vision.undo()
    assert instance_overrides(model) == []


def test_rotary_section_set_after_patching_is_read(qwen2):
    """angles='positions' reads the rotary module's mrope_section at each call, as
    transformers does."""
    model = copy.deepcopy(qwen2.model)
    rotary = model.model.language_model.rotary_emb
    if getattr(rotary, "mrope_section", None) is None:
        pytest.skip("this transformers' rotary has no mrope_section")
    with rotary_patch(model, angles="positions"):
        rotary.mrope_section = [4, 2, 2]
        got = qwen2.logits(model)
    assert_close(got, qwen2.logits(model), "logits")


@pytest.mark.parametrize("section", [None, [2, 2, 2], [3, 3, 3]])
def test_qwen3_interleaved_sections_of_any_sum(section):
    """Qwen3-VL's interleaved lanes take sections that do not sum to head_dim / 2 (the class
    default [24, 20, 20] of a config leaving it out; transformers' slices clip), on both
    paths."""
    rope = dict(rope_type="default", rope_theta=10000.0)
    if section is not None:
        rope["mrope_section"] = section
    config = transformers.Qwen3VLTextConfig(**{**_text(64, None, head_dim=16),
                                               "rope_parameters": rope})  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Qwen3VLTextModel(config).to(DEVICE).eval()
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    positions = torch.stack([torch.arange(12), torch.arange(12) % 4, torch.arange(12) // 3])
    positions = positions[:, None].expand(3, 2, 12).to(DEVICE)
    with torch.no_grad():
        ref = model(input_ids=ids, position_ids=positions).last_hidden_state
        for angles in ("table", "positions"):
            with rotary_patch(model, angles=angles):
                out = model(input_ids=ids, position_ids=positions).last_hidden_state
            assert_close(out, ref, f"hidden states ({angles})")


def test_tables_narrower_than_the_head_are_refused_as_transformers_refuses_them():
    """A rope type honouring partial_rotary_factor makes tables narrower than the head,
    which transformers' Qwen-VL rotary function cannot broadcast: the patched model raises
    too (vlmkernels.rope would rotate part of the head, a layout nobody defined): with
    tables, transformers' own error (its function runs, with a PatchFallbackWarning); with
    angles='positions', which has no tables to hand it, vlmkernels' ValueError."""
    rope = dict(rope_type="linear", factor=2.0, rope_theta=10000.0, mrope_section=[1, 1, 2],
                partial_rotary_factor=0.5)  # fmt: skip
    config = transformers.Qwen2VLTextConfig(**{**_text(64, [2, 3, 3]), "rope_parameters": rope})
    model = transformers.Qwen2VLTextModel(config).to(DEVICE).eval()
    if model.rotary_emb.inv_freq.numel() * 2 == config.hidden_size // 4:
        pytest.skip("this transformers ignores partial_rotary_factor here")
    ids = torch.randint(3, 100, (1, 8), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    with pytest.raises(RuntimeError) as want:
        model(input_ids=ids)
    with rotary_patch(model), pytest.raises(RuntimeError) as got:
        with pytest.warns(PatchFallbackWarning, match="8 wide"):
            model(input_ids=ids)
    assert str(got.value) == str(want.value)
    with rotary_patch(model, angles="positions"), pytest.raises(ValueError, match="8 wide"):
        model(input_ids=ids)


def test_decorated_forward_is_patched_and_its_decorators_run(qwen2):
    """Decorators on forward (functools.wraps wrappers, keyword renaming) are rebuilt around
    the patched code: they keep running, and the rotary call runs the vlmkernels op."""
    model = _with_attention_class(qwen2.model, _decorated)
    attn = model.model.language_model.layers[0].self_attn
    decorated = type(attn).forward
    with rotary_patch(model, vision=False, rope_index=False):
        counts, logits = op_counts(lambda: qwen2.logits(model))
        installed = attn.__dict__["forward"]
    assert counts["vlmkernels::rope_table"] == TEXT_LAYERS
    assert decorated.calls == 1  # the wrapper of the patched forward ran, once
    assert installed.__func__ is not decorated and installed.__func__.__wrapped__ is not None
    assert_close(logits, qwen2.ref_logits, "logits")
    assert "forward" not in attn.__dict__
    assert torch.equal(qwen2.logits(model), qwen2.ref_logits)  # undone: the class's forward
    assert decorated.calls == 2


def _attention_calling(base, rotary_function, keyword: str):
    """A text attention class whose forward calls ``rotary_function`` (a global of its own
    module namespace) with the last argument passed by the keyword ``keyword``."""
    namespace = {"torch": torch, "apply_rotary_pos_emb": rotary_function}
    source = f"""
def forward(self, hidden_states, attention_mask=None, position_ids=None,
            past_key_values=None, position_embeddings=None, **kwargs):
    b, s, _ = hidden_states.shape
    q, k, v = (proj(hidden_states).view(b, s, -1, self.head_dim).transpose(1, 2)
               for proj in (self.q_proj, self.k_proj, self.v_proj))
    cos, sin = position_embeddings
    if cos.dim() == 4:  # transformers <= 5.16: (3, B, S, D); text only, so T = H = W
        cos, sin = cos[0], sin[0]
    q, k = apply_rotary_pos_emb(q, k, cos, sin, {keyword}=1)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                           enable_gqa=True)
    return self.o_proj(out.transpose(1, 2).reshape(b, s, -1)), None
"""
    exec(compile(source, f"<attention calling {keyword}>", "exec"), namespace)
    namespace["forward"].__module__ = base.__module__
    return type("Renamed", (base,), {"forward": namespace["forward"]})


def _rotate(q, k, cos, sin, dim):
    cos, sin = cos.unsqueeze(dim), sin.unsqueeze(dim)

    def turn(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), -1)

    return q * cos + turn(q) * sin, k * cos + turn(k) * sin


def _renamed_function():
    def apply_rotary_pos_emb(query, key, cos, sin, position_dim=1):
        return _rotate(query, key, cos, sin, position_dim)

    return apply_rotary_pos_emb, "position_dim"


def _function_as_module():
    """What transformers' hub-kernel decorator makes of the function when the ``kernels``
    package is installed: an nn.Module instance whose forward is the function."""

    class Func(torch.nn.Module):
        def forward(self, q, k, cos, sin, unsqueeze_dim=1):
            return _rotate(q, k, cos, sin, unsqueeze_dim)

    return Func(), "unsqueeze_dim"


@pytest.mark.parametrize("make_function", [_renamed_function, _function_as_module])
def test_renamed_or_kernelized_rotary_function(qwen2, make_function):
    text = copy.deepcopy(qwen2.model.model.language_model)
    function, keyword = make_function()
    base = type(text.layers[0].self_attn)
    # shipped with transformers, as a release's own function would be (another package's
    # is refused: test_replaced_module_rotary_function_is_refused)
    owner = function if isinstance(function, types.FunctionType) else type(function)
    owner.__module__ = base.__module__
    attention = _attention_calling(base, function, keyword)
    for layer in text.layers:
        layer.self_attn.__class__ = attention
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    ref = text(input_ids=ids).last_hidden_state
    with rotary_patch(text):
        counts, out = op_counts(lambda: text(input_ids=ids))
    assert counts == {"vlmkernels::rope_table": TEXT_LAYERS}
    assert_close(out.last_hidden_state, ref, "hidden states")


def test_deep_copy_of_a_patched_model_is_independent(qwen2):
    """A deep copy runs the vlmkernels ops on its own weights after the original is undone
    and deleted; it is patched (a second patch raises), and only the original has a handle."""
    import gc

    original = copy.deepcopy(qwen2.model)
    handle = rotary_patch(original)
    twin = copy.deepcopy(original)
    handle.undo()
    del original, handle
    gc.collect()
    counts, logits = op_counts(lambda: qwen2.logits(twin))
    assert counts["vlmkernels::rope_table"] == TEXT_LAYERS + 2 * VISION_DEPTH
    assert_close(logits, qwen2.ref_logits, "logits of the copy")
    for module in twin.modules():
        bound = module.__dict__.get("forward") or module.__dict__.get("get_rope_index")
        if bound is not None:
            assert bound.__self__ is module
    with pytest.raises(vt.AlreadyPatchedError):
        rotary_patch(twin)


def test_support_report_on_the_installed_transformers():
    """Every architecture patches on the installed (tested) transformers; the report is what
    ``vlmkernels info`` prints."""
    report = vt.support()
    rotary = {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe",
              "glm4v", "glm4v_moe", "glm_ocr", "paddleocr_vl"}  # fmt: skip
    assert rotary <= set(report), report
    for arch in rotary:
        assert report[arch].keys() >= {"rope", "vision", "positions", "rope_index"}, arch
    # the Omni thinkers: no rope_index (their get_rope_index places audio too); Qwen3-Omni's
    # float position ids take no angles='positions'
    omni = report["qwen2_5_omni"]  # 5.16's vision function is the older (tensor, freqs) one
    assert omni == {"rope": "ok", "positions": "ok", "vision": omni["vision"]}
    assert omni["vision"] == "ok" or "parameters ['tensor', 'freqs']" in omni["vision"]
    assert report["qwen3_omni_moe"] == {"rope": "ok", "vision": "ok"}
    assert report["glm46v"].keys() == {"rope_index"}  # its towers patch as GLM-4V's
    assert report["cosmos3_omni"].keys() == {"rope_index"}  # its towers patch as Qwen3-VL's
    assert report["qwen4_exp"].keys() == {"rope", "vision", "rope_index"}  # no positions
    assert report["cohere_compass"].keys() == {"rope", "vision", "rope_index"}  # no positions
    assert report["ernie4_5_vl_moe"].keys() == {"rope", "vision"}  # its own rope index
    # on an older tested release, a model added later (its module absent) is reported as
    # not importable; on the newest, every architecture patches
    older = transformers.__version__ != vt.TESTED_VERSIONS[-1]
    known = {("qwen2_5_omni", "vision"): omni["vision"]}  # checked above
    hunyuan = report["hunyuan_vl"]["rope"]  # 5.16's attention calls its own multimodal function
    assert hunyuan == "ok" or (
        transformers.__version__.startswith("5.16.") and "calls none of" in hunyuan
    )
    known[("hunyuan_vl", "rope")] = hunyuan
    for arch, parts in report.items():  # the other families' tables too
        ok = [v.startswith("ok") or (older and "No module named 'transformers.models." in v)
              or known.get((arch, part)) == v for part, v in parts.items()]  # fmt: skip
        assert parts and all(ok), (arch, parts)


def test_foreign_instance_forward_raises(qwen2):
    attn = qwen2.model.model.visual.blocks[1].attn
    attn.forward = lambda *a, **k: None
    try:
        with pytest.raises(vt.UnsupportedLayoutError, match="instance-level forward"):
            rotary_patch(qwen2.model, rope_index=False)
        assert instance_overrides(qwen2.model) == [("model.visual.blocks.1.attn", "forward")]
    finally:
        del attn.forward


def test_accelerate_style_hook_is_kept(qwen2):
    """Where accelerate's hooks own ``forward`` (calling ``module._old_forward``), patch
    replaces ``_old_forward``, the hook keeps running, and undo puts it back."""
    model = copy.deepcopy(qwen2.model)
    attn = model.model.language_model.layers[0].self_attn
    hooked = []

    def hook_forward(*args, **kwargs):
        hooked.append(1)
        return attn._old_forward(*args, **kwargs)

    attn._hf_hook, attn._old_forward, attn.forward = object(), attn.forward, hook_forward
    old = attn._old_forward
    with rotary_patch(model, vision=False, rope_index=False) as handle:
        assert "model.language_model.layers.0.self_attn._old_forward" in handle.targets
        counts, logits = op_counts(lambda: qwen2.logits(model))
    assert hooked and counts["vlmkernels::rope_table"] == TEXT_LAYERS
    assert_close(logits, qwen2.ref_logits, "logits")
    assert attn.__dict__["_old_forward"] is old and attn.__dict__["forward"] is hook_forward
    rotary_patch(model, vision=False, rope_index=False)
    assert vt.unpatch(model) > TEXT_LAYERS  # no handle: the class's forward bound back
    assert attn.__dict__["forward"] is hook_forward
    assert attn.__dict__["_old_forward"].__func__ is type(attn).forward
    hooked_layer = "model.language_model.layers.0.self_attn"
    assert instance_overrides(model) == [(hooked_layer, "forward"), (hooked_layer, "_old_forward")]
    hooked.clear()
    counts, logits = op_counts(lambda: qwen2.logits(model))
    assert hooked and counts == {} and torch.equal(logits, qwen2.ref_logits)


def test_positions_refused_for_dynamic_rope():
    rope = dict(rope_type="dynamic", factor=2.0, rope_theta=10000.0, mrope_section=[2, 3, 3])
    config = transformers.Qwen2VLTextConfig(**{**_text(64, [2, 3, 3]), "rope_parameters": rope})
    model = transformers.Qwen2VLTextModel(config)
    with pytest.raises(vt.UnsupportedLayoutError, match="dynamic"):
        rotary_patch(model, angles="positions")
    assert instance_overrides(model) == []
    with rotary_patch(model, angles="table"):
        pass


# ------------------------------------------------------------------ the transformers <= 5.16 layout


def apply_multimodal_rotary_pos_emb(q, k, cos, sin, mrope_section, unsqueeze_dim=1):
    """transformers <= 5.16's semantics, written here from the notes' description: the
    (3, B, S, D) tables split by ``mrope_section * 2``, chunk i taken from axis i % 3."""

    def merge(table):
        chunks = table.split(list(mrope_section) * 2, dim=-1)
        return torch.cat([c[i % 3] for i, c in enumerate(chunks)], -1).unsqueeze(unsqueeze_dim)

    cos, sin = merge(cos), merge(sin)

    def rotate(x):
        half = x.shape[-1] // 2
        turned = torch.cat((-x[..., half:], x[..., :half]), -1)
        return x * cos + turned * sin

    return rotate(q), rotate(k)


# it stands in for transformers' own function (the patch replaces only the library's)
apply_multimodal_rotary_pos_emb.__module__ = "transformers.models.qwen2_vl.modeling_qwen2_vl"


def _layout_516(base_attention, base_rotary):
    """Subclasses laying a Qwen2-VL text model out as transformers <= 5.16 did: the rotary
    module returns unmerged (3, B, S, D) tables, the attention merges them through
    ``apply_multimodal_rotary_pos_emb`` (a global of this test module)."""

    class Rotary516(base_rotary):
        def forward(self, x, position_ids):
            freqs = position_ids[..., None].float() * self.inv_freq.float()
            emb = torch.cat((freqs, freqs), -1)
            scale = self.attention_scaling
            return (emb.cos() * scale).to(x.dtype), (emb.sin() * scale).to(x.dtype)

    class Attention516(base_attention):
        def forward(self, hidden_states, attention_mask=None, position_ids=None,
                    past_key_values=None, position_embeddings=None, **kwargs):  # fmt: skip
            b, s, _ = hidden_states.shape
            q, k, v = (
                proj(hidden_states).view(b, s, -1, self.head_dim).transpose(1, 2)
                for proj in (self.q_proj, self.k_proj, self.v_proj)
            )
            cos, sin = position_embeddings
            q, k = apply_multimodal_rotary_pos_emb(
                q, k, cos, sin, self.config.rope_parameters["mrope_section"]
            )
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=True
            )
            return self.o_proj(out.transpose(1, 2).reshape(b, s, -1)), None

    return Attention516, Rotary516


@pytest.mark.parametrize("angles", ["table", "positions"])
def test_mrope_layout_of_transformers_516(qwen2, angles, monkeypatch):
    """On the 5.16 layout (emulated by subclasses, the rotary one standing in for the
    module's class), the text attention's ``apply_multimodal_rotary_pos_emb`` runs
    vlmkernels.mrope (or the positions op)."""
    text = copy.deepcopy(qwen2.model.model.language_model)
    attention, rotary = _layout_516(type(text.layers[0].self_attn), type(text.rotary_emb))
    modeling = __import__(type(text).__module__, fromlist=["_"])
    monkeypatch.setattr(modeling, type(text.rotary_emb).__name__, rotary)
    text.rotary_emb.__class__ = rotary
    for layer in text.layers:
        layer.self_attn.__class__ = attention
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 100, (2, 12), generator=g).to(DEVICE)
    positions = torch.stack([torch.arange(12), torch.arange(12) % 4, torch.arange(12) // 3])
    positions = positions[:, None].expand(3, 2, 12).to(DEVICE)
    ref = text(input_ids=ids, position_ids=positions).last_hidden_state
    with rotary_patch(text, angles=angles):
        counts, out = op_counts(lambda: text(input_ids=ids, position_ids=positions))
    op = "vlmkernels::rope_table" if angles == "table" else "vlmkernels::rope_positions"
    assert counts == {op: TEXT_LAYERS}
    assert_close(out.last_hidden_state, ref, "hidden states")


def test_qwen3_vl_moe_matches_transformers():
    """The whole Qwen3-VL-MoE model patched (rotary, vision rotary, merger, DeepStack): its
    logits and parameter gradients match the unpatched model's, and greedy generate() gives
    its tokens. The router's weight gradients are zero up to rounding here (top-1 of two
    experts, renormalised weight 1), so they must only stay so."""
    torch.manual_seed(0)
    model = qwen3_vl_moe().eval().to(DEVICE)
    inputs = {k: v.to(DEVICE) for k, v in make_inputs("qwen3_vl").items()}
    params = [p for p in model.parameters() if p.requires_grad]
    run = functools.partial(logits_grads_tokens, model, inputs, params, 4)
    want, want_grads, want_tokens = run()
    with vt.patch(model):
        counts, (got, got_grads, got_tokens) = op_counts(run)
    assert counts.get("vlmkernels::rope_table", 0) > 0 and counts.get("vlmkernels::connector")
    assert counts.get("vlmkernels::deepstack_add", 0) > 0
    assert_close(got, want, "logits")
    assert_same_grads(params, got_grads, want_grads, zero_below=1e-5)
    assert torch.equal(got_tokens, want_tokens)


def assert_partial_rotary_matches(inputs, got, want, rot):
    """Outputs of a partial-rotary replacement against transformers' function: same dtypes
    and shapes, the first ``rot`` lanes within rounding (fp32 1e-6, 16-bit 1e-2 of the
    largest: transformers rounds each product and the sum), the lanes past them bitwise
    the inputs'."""
    for x, a, w in zip(inputs, got, want, strict=True):
        tol = 1e-6 if x.dtype == torch.float32 else 1e-2
        assert a.dtype == w.dtype and a.shape == w.shape
        assert (a[..., :rot] - w[..., :rot]).abs().max() <= tol * w[..., :rot].abs().max()
        assert torch.equal(a[..., rot:], x[..., rot:])


@pytest.mark.parametrize(("moe", "angles"), [(False, "positions"), (True, "table")])
def test_qwen3_5_matches_transformers(moe, angles):
    """Qwen3.5 (and its MoE variant) with the rotary parts patched: its attention's
    ``apply_rotary_pos_emb`` rotates the first half of each head and passes the rest, the
    positions path too; logits and parameter gradients match the unpatched model's, and so
    do greedy generate() tokens on the positions path (decode positions from the cached
    rope deltas; the table path's generation is Qwen3-VL's, tested above). The router's
    weight gradients are zero up to rounding (top-1 of two experts), so they must only stay
    so."""
    torch.manual_seed(0)
    model = qwen3_5(moe).eval().to(DEVICE)
    inputs = {k: v.to(DEVICE) for k, v in make_inputs("qwen3_vl").items()}
    params = [p for p in model.parameters() if p.requires_grad]
    new_tokens = 3 if angles == "positions" else 0
    run = functools.partial(logits_grads_tokens, model, inputs, params, new_tokens)
    want, want_grads, want_tokens = run()
    with rotary_patch(model, angles=angles):
        counts, (got, got_grads, got_tokens) = op_counts(run)
    text_op = "vlmkernels::rope_positions" if angles == "positions" else "vlmkernels::rope_table"
    assert counts.get(text_op, 0) > 0 and counts.get("vlmkernels::rope_table", 0) > 0, counts
    assert_close(got, want, "logits")
    assert_same_grads(params, got_grads, want_grads, zero_below=1e-5)
    assert got_tokens is want_tokens is None or torch.equal(got_tokens, want_tokens)
    assert not instance_overrides(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qwen3_5_rotary_function_passes_the_lanes_past_its_tables(dtype):
    """The replacement of Qwen3.5's ``apply_rotary_pos_emb`` against transformers' on
    random (B, H, S, D) views with tables a quarter of the head wide: the rotated lanes
    agree (fp32 to rounding; bf16 within 1e-2 of the largest, transformers rounding each
    product and the sum), the passed lanes are the inputs' bitwise; tables wider than the
    head are refused by name."""
    from transformers.models.qwen3_5 import modeling_qwen3_5 as qwen3_5_module

    from vlmkernels.integrations.tables.qwen_vl import apply_partial_rotary_pos_emb

    g = torch.Generator().manual_seed(5)
    b, s, d, rot = 2, 5, 32, 8
    q, k = (torch.randn(b, s, h, d, generator=g).to(DEVICE, dtype).transpose(1, 2)
            for h in (4, 2))  # fmt: skip
    angles = torch.randn(b, s, rot // 2, generator=g).repeat(1, 1, 2).to(DEVICE)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    got = apply_partial_rotary_pos_emb(q, k, cos, sin)
    want = qwen3_5_module.apply_rotary_pos_emb(q, k, cos, sin)
    assert_partial_rotary_matches((q, k), got, want, rot)
    wide = torch.ones(b, s, d + 2, device=DEVICE, dtype=dtype)
    with pytest.raises(ValueError, match="34 wide for a head dim of 32.*at most as wide"):
        apply_partial_rotary_pos_emb(q, k, wide, wide)


def test_qwen3_5_text_only_model():
    """Qwen3.5's text-only ``ForCausalLM`` takes the text parts, with (B, S) position ids;
    a Qwen3.5 attention module alone is refused by name."""
    torch.manual_seed(0)
    config = qwen3_5().config.text_config
    model = transformers.Qwen3_5ForCausalLM(config).eval().to(DEVICE)
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        for angles in ("table", "positions"):
            with rotary_patch(model, angles=angles):
                counts, got = op_counts(lambda: model(input_ids=ids).logits)
            assert sum(counts.values()) == 1, counts  # the one attention layer
            assert_close(got, want, f"logits ({angles})")
    attention = next(m for m in model.modules() if type(m).__name__ == "Qwen3_5Attention")
    with pytest.raises(vt.UnsupportedModelError, match="Qwen3_5ForCausalLM"):
        rotary_patch(attention)


@pytest.mark.parametrize("head", ["ForSequenceClassification", "TextForSequenceClassification"])
def test_qwen3_5_task_heads_take_the_parts_of_the_model_they_hold(head):
    """Qwen3.5's task heads (a reward model's ``ForSequenceClassification`` holding a
    ``Qwen3_5Model``, ``TextForSequenceClassification`` a ``Qwen3_5TextModel``) are
    classes of the architecture's module that are not roots: they get the parts of the
    model they hold (not the merger alone, nor a refusal), and their scores match."""
    cls = getattr(transformers, f"Qwen3_5{head}", None)
    if cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no Qwen3_5{head}")
    torch.manual_seed(0)
    vl = qwen3_5().config
    text = head.startswith("Text")
    model = cls(vl.text_config if text else vl).eval().to(DEVICE)
    grid = IMAGE_GRIDS[1]  # one image of 2 merged tokens in one row
    ids = torch.tensor([[5, 6, VSTART] + [IMG] * _tokens(grid) + [VEND, 7, 8]])
    inputs = dict(input_ids=ids) if text else dict(
        input_ids=ids, mm_token_type_ids=(ids == IMG).long(), image_grid_thw=torch.tensor([grid]),
        pixel_values=torch.randn(grid[0] * grid[1] * grid[2], PATCH_DIM),
    )  # fmt: skip
    inputs = {k: v.to(DEVICE) for k, v in inputs.items()}
    with torch.no_grad():
        want = model(**inputs).logits
        with rotary_patch(model, angles="positions") as handle:
            counts, got = op_counts(lambda: model(**inputs).logits)
    assert counts.get("vlmkernels::rope_positions", 0) == 1, counts  # one attention layer
    assert ("model.get_rope_index" in handle.targets) != text, handle.targets
    assert (counts.get("vlmkernels::rope_table", 0) > 0) != text, counts  # the vision tower
    assert_close(got, want, "scores")
    assert not instance_overrides(model)


@pytest.mark.parametrize("angles", ["table", "positions"])
@pytest.mark.parametrize("moe", [False, True])
def test_glm4v_matches_transformers(moe, angles):
    """GLM-4V (lanes rotating in pairs) and GLM-4V-MoE (rotate-half), half of each head
    rotating: logits and parameter gradients match the unpatched model's, and greedy
    generate() tokens too (decode positions from the cached rope deltas); get_rope_index
    (Qwen3-VL's code in GLM's classes) is vlmkernels'. The router's gradients are zero up
    to rounding (top-1 of two experts), so they must only stay so."""
    torch.manual_seed(0)
    model = glm4v(moe).eval().to(DEVICE)
    inputs = {k: v.to(DEVICE) for k, v in make_inputs("qwen3_vl", with_video=False).items()}
    params = [p for p in model.parameters() if p.requires_grad]
    run = functools.partial(logits_grads_tokens, model, inputs, params, 3)
    want, want_grads, want_tokens = run()
    with rotary_patch(model, angles=angles) as handle:
        counts, (got, got_grads, got_tokens) = op_counts(run)
    assert "model.get_rope_index" in handle.targets, handle.targets
    text_op = "vlmkernels::rope_positions" if angles == "positions" else "vlmkernels::rope_table"
    assert counts.get(text_op, 0) > 0 and counts.get("vlmkernels::rope_table", 0) > 0, counts
    assert_close(got, want, "logits")
    assert_same_grads(params, got_grads, want_grads, zero_below=1e-5)
    assert torch.equal(got_tokens, want_tokens)
    assert not instance_overrides(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_glm4v_rotary_function_rotates_pairs(dtype):
    """The replacement of GLM-4V's ``apply_rotary_pos_emb`` against transformers' on random
    (B, H, S, D) views with tables half the head wide, in the order the installed function
    takes (probed: each frequency twice in a row from 5.17, [f | f] in 5.16, which it
    reorders itself): the rotated lanes agree (fp32 to rounding, bf16 within 1e-2 of the
    largest), the passed lanes are the inputs' bitwise."""
    from transformers.models.glm4v import modeling_glm4v

    from vlmkernels.integrations.tables import qwen_vl

    arch = next(a for a in qwen_vl.ARCHITECTURES if a.key == "glm4v")
    order = qwen_vl.functions._table_order(arch)
    assert order == ("halves" if transformers.__version__.startswith("5.16.") else "pairs")
    replacement = {"pairs": qwen_vl.apply_paired_rotary_pos_emb,
                   "halves": qwen_vl.apply_paired_rotary_pos_emb_from_halves}[order]  # fmt: skip
    g = torch.Generator().manual_seed(6)
    b, s, d, rot = 2, 5, 32, 16
    q, k = (torch.randn(b, s, h, d, generator=g).to(DEVICE, dtype).transpose(1, 2)
            for h in (4, 2))  # fmt: skip
    angles = torch.randn(b, s, rot // 2, generator=g)
    angles = angles.repeat_interleave(2, -1) if order == "pairs" else angles.repeat(1, 1, 2)
    cos, sin = angles.cos().to(DEVICE, dtype), angles.sin().to(DEVICE, dtype)
    got = replacement(q, k, cos, sin)
    want = modeling_glm4v.apply_rotary_pos_emb(q, k, cos, sin)
    assert_partial_rotary_matches((q, k), got, want, rot)


def on_torch_path_on_cpu():
    """The PyTorch path for a whole-model test on the CPU, where the model's kernels (lane
    rules, widths) are another test's on Triton's interpreter; the default path on a GPU."""
    from vlmkernels import use_backend

    return use_backend("torch") if DEVICE.type == "cpu" else contextlib.nullcontext()


def every_rotary_call_matches(model, inputs, angles, zero_below=0.0, vision=True):
    """``model`` (two text layers, two vision blocks) with the rotary parts patched
    (``angles``; the vision tower's unless not ``vision``): every rotary call runs on
    vlmkernels, counted per layer, forward and backward (which runs the same op, transposed;
    one vision call for the batch's images); logits, parameter gradients
    (:func:`assert_same_grads` with ``zero_below``) and greedy generate() tokens match the
    unpatched model's; nothing is left on the instances after. Returns the patch's
    targets."""
    params = [p for p in model.parameters() if p.requires_grad]
    run = functools.partial(logits_grads_tokens, model, inputs, params, 3)
    want, want_grads, want_tokens = run()
    with rotary_patch(model, angles=angles, vision=vision) as handle:
        counts, (got, got_grads, _) = op_counts(
            functools.partial(logits_grads_tokens, model, inputs, params, 0)
        )
        got_tokens = run()[2]
    towers = 2 * VISION_DEPTH * vision
    if angles == "table":
        assert counts == {"vlmkernels::rope_table": 2 * TEXT_LAYERS + towers}
    else:
        assert counts == {"vlmkernels::rope_positions": 2 * TEXT_LAYERS,
                          **({"vlmkernels::rope_table": towers} if vision else {})}  # fmt: skip
    assert_close(got, want, "logits")
    assert_same_grads(params, got_grads, want_grads, zero_below=zero_below)
    assert torch.equal(got_tokens, want_tokens)
    assert not instance_overrides(model)
    return handle.targets


@pytest.mark.parametrize("angles", ["table", "positions"])
@pytest.mark.parametrize("arch", ["glm_ocr", "paddleocr_vl"])
def test_ocr_models_match_transformers(arch, angles):
    """GLM-OCR (GLM-4V's paired lanes) and PaddleOCR-VL (Qwen2-VL's rotary in its own
    classes; its vision tower takes (N, 3, patch, patch) patches), images only: every
    rotary call runs on vlmkernels (two text layers, two vision blocks, one call each for
    the batch's images), get_rope_index is vlmkernels'; logits, parameter gradients and
    greedy generate() tokens match the unpatched model's."""
    torch.manual_seed(0)
    model = glm4v(prefix="GlmOcr") if arch == "glm_ocr" else paddleocr_vl()
    model = model.eval().to(DEVICE)
    inputs = make_inputs("qwen3_vl" if arch == "glm_ocr" else "qwen2_vl", with_video=False)
    if arch == "paddleocr_vl":
        pixels = inputs["pixel_values"]
        inputs["pixel_values"] = pixels[:, : 3 * PATCH * PATCH].reshape(-1, 3, PATCH, PATCH)
    inputs = {k: v.to(DEVICE) for k, v in inputs.items()}
    assert "model.get_rope_index" in every_rotary_call_matches(model, inputs, angles)


@pytest.mark.parametrize(("moe", "angles"), [(False, "table"), (False, "positions"),
                                           (True, "table")])  # fmt: skip
def test_glm46v_matches_transformers(moe, angles):
    """GLM-4.6V (and its MoE text tower, GLM-4.6V's own): ``Glm46VModel`` holds GLM-4V's
    (or GLM-4V-MoE's) towers side by side, so their rows patch both rotary parts, and its
    get_rope_index (GLM-4V's code in its own class) is vlmkernels'; every rotary call runs on
    vlmkernels; logits, parameter gradients and greedy generate() tokens match. On the CPU
    the ops take the PyTorch path: the towers' kernels are test_glm4v_matches_transformers'
    (Triton's interpreter runs the paired kernel at about 50 ms a program)."""
    torch.manual_seed(0)
    model = glm4v(moe, glm46v=True).eval().to(DEVICE)
    assert type(model.model.language_model).__name__ == ("Glm4vMoeTextModel" if moe
                                                         else "Glm4vTextModel")  # fmt: skip
    inputs = {k: v.to(DEVICE) for k, v in make_inputs("qwen3_vl", with_video=False).items()}
    with on_torch_path_on_cpu():
        targets = every_rotary_call_matches(model, inputs, angles, 1e-5)
    assert "model.get_rope_index" in targets, targets


@pytest.mark.parametrize(("version", "angles"), [("2.5", "table"), ("2.5", "positions"),
                                               ("3", "table")])  # fmt: skip
def test_qwen_omni_thinkers_match_transformers(version, angles):
    """The Qwen2.5-Omni and Qwen3-Omni-MoE thinkers: their text and vision rotary calls run
    on vlmkernels (get_rope_index, which also places audio, stays theirs); logits and
    parameter gradients match the unpatched model's, and greedy generate() tokens. Qwen3-Omni's
    float position ids refuse angles='positions' by name, with nothing installed.
    transformers 5.16's Qwen2.5-Omni vision function rotates one tensor from the raw
    frequencies (``(tensor, freqs)``): its vision part is refused by name, the rest
    patches (``vision=False``)."""
    torch.manual_seed(0)
    model = qwen_omni(version).eval().to(DEVICE)
    inputs = make_inputs("qwen3_vl", with_video=False)  # images only: no seconds per grid
    inputs = {k: v.to(DEVICE) for k, v in inputs.items() if k != "mm_token_type_ids"}
    vision = vt.support()["qwen2_5_omni" if version == "2.5" else "qwen3_omni_moe"]["vision"]
    if vision != "ok":
        assert version == "2.5" and "parameters ['tensor', 'freqs']" in vision, vision
        with pytest.raises(vt.UnsupportedLayoutError, match="vision: .*'tensor', 'freqs'"):
            rotary_patch(model, angles=angles)
    targets = every_rotary_call_matches(model, inputs, angles, 1e-5, vision=vision == "ok")
    assert not any("get_rope_index" in t for t in targets), targets
    if version == "3":
        with pytest.raises(vt.UnsupportedLayoutError, match="qwen3_omni_moe .*float position"):
            rotary_patch(model, angles="positions")
        assert not instance_overrides(model)


@pytest.mark.parametrize("angles", ["table", "positions"])
def test_cosmos3_omni_matches_transformers(angles):
    """Cosmos3-Omni holds Qwen3-VL's towers side by side: their text and vision rotary
    calls run on vlmkernels, and its own get_rope_index (Qwen3-VL's code) is vlmkernels';
    logits, parameter gradients and greedy generate() tokens match. On the CPU the ops take
    the PyTorch path (the towers' Triton kernels are the Qwen3-VL tests')."""
    torch.manual_seed(0)
    model = cosmos3_omni().eval().to(DEVICE)
    inputs = {k: v.to(DEVICE) for k, v in make_inputs("qwen3_vl", with_video=False).items()}
    with on_torch_path_on_cpu():
        targets = every_rotary_call_matches(model, inputs, angles, 1e-5)
    assert "model.get_rope_index" in targets, targets


def test_qwen4_exp_matches_transformers():
    """Qwen4-Exp (Qwen3.5's partial rotary with k optional, Qwen3-VL's vision tower and
    get_rope_index): every text attention and vision rotary call runs on vlmkernels (its
    sparse-attention indexer's stay transformers'), get_rope_index is vlmkernels'; logits,
    parameter gradients and greedy generate() tokens match. angles='positions' is refused
    by name (the indexer reads the tables too), nothing installed. PyTorch path on the CPU:
    the partial kernel on Triton is Qwen3.5's test."""
    torch.manual_seed(0)
    model = qwen4_exp().eval().to(DEVICE)
    inputs = {k: v.to(DEVICE) for k, v in make_inputs("qwen3_vl", with_video=False).items()}
    with on_torch_path_on_cpu():
        targets = every_rotary_call_matches(model, inputs, "table", 1e-5)
    assert "model.get_rope_index" in targets
    with pytest.raises(vt.UnsupportedLayoutError, match="qwen4_exp .*indexer"):
        rotary_patch(model, angles="positions")
    assert not instance_overrides(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qwen4_exp_rotary_function_with_and_without_k(dtype):
    """The replacement of Qwen4-Exp's ``apply_rotary_pos_emb`` against transformers' on
    random views with tables half the head wide: (q, k) and q alone (k None, as its
    indexer calls it, with heads on dim 2), the passed lanes bitwise."""
    from transformers.models.qwen4_exp import modeling_qwen4_exp as qwen4

    from vlmkernels.integrations.tables import qwen_vl

    g = torch.Generator().manual_seed(10)
    b, s, d, rot = 2, 5, 16, 8
    q, k = (torch.randn(b, s, h, d, generator=g).to(DEVICE, dtype) for h in (4, 2))
    angles = torch.randn(b, s, rot // 2, generator=g).repeat(1, 1, 2)
    cos, sin = angles.cos().to(DEVICE, dtype), angles.sin().to(DEVICE, dtype)
    replacement = qwen_vl.apply_partial_rotary_pos_emb_optional_k
    got = replacement(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    want = qwen4.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    assert_partial_rotary_matches((q.transpose(1, 2), k.transpose(1, 2)), got, want, rot)
    alone = replacement(q, cos=cos, sin=sin, unsqueeze_dim=2)
    want = qwen4.apply_rotary_pos_emb(q, cos=cos, sin=sin, unsqueeze_dim=2)
    assert isinstance(alone, torch.Tensor)
    assert_partial_rotary_matches((q,), (alone,), (want,), rot)


@pytest.mark.parametrize("unsqueeze_dim", [0, -3])
def test_qwen4_exp_rotary_function_without_k_on_tables_of_fewer_axes(unsqueeze_dim):
    """Qwen4-Exp's function with k None and (S, R) tables (one table for every row): the
    unsqueezed table names q's heads axis from the right, here axis 1 of (B, H, S, D) q,
    as in transformers; the replacement takes q alone there too."""
    from transformers.models.qwen4_exp import modeling_qwen4_exp as qwen4

    from vlmkernels.integrations.tables import qwen_vl

    g = torch.Generator().manual_seed(13)
    q = torch.randn(2, 4, 5, 16, generator=g).to(DEVICE)
    angles = torch.randn(5, 4, generator=g).repeat(1, 2).to(DEVICE)
    cos, sin = angles.cos(), angles.sin()
    got = qwen_vl.apply_partial_rotary_pos_emb_optional_k(q, cos=cos, sin=sin,
                                                          unsqueeze_dim=unsqueeze_dim)  # fmt: skip
    want = qwen4.apply_rotary_pos_emb(q, cos=cos, sin=sin, unsqueeze_dim=unsqueeze_dim)
    assert_partial_rotary_matches((q,), (got,), (want,), 8)


def test_cohere_compass_matches_transformers():
    """Cohere Compass (a frequency table and sections per layer type): every text and
    vision rotary call runs on vlmkernels from transformers' tables, get_rope_index is
    vlmkernels'; logits, parameter gradients and greedy generate() tokens match.
    angles='positions' is refused by name, nothing installed. PyTorch path on the CPU: the
    interleaved kernel on Triton is Qwen3-VL's test."""
    torch.manual_seed(0)
    model = cohere_compass().eval().to(DEVICE)
    inputs = {k: v.to(DEVICE) for k, v in make_inputs("qwen3_vl", with_video=False).items()}
    with on_torch_path_on_cpu():
        targets = every_rotary_call_matches(model, inputs, "table")
    assert "model.get_rope_index" in targets
    with pytest.raises(vt.UnsupportedLayoutError, match="cohere_compass .*per layer type"):
        rotary_patch(model, angles="positions")
    assert not instance_overrides(model)


def test_ernie4_5_vl_matches_transformers():
    """ERNIE-4.5-VL (lane pairs over the whole head, computed in fp32): every text and
    vision rotary call runs on vlmkernels from transformers' tables (its get_rope_index
    stays its own); logits, parameter gradients and greedy generate() tokens match.
    angles='positions' is refused by name, nothing installed. PyTorch path on the CPU: the
    whole-head paired kernel on Triton is test_rope's (test_mrope_pairs_values_and_grads)."""
    torch.manual_seed(0)
    model = ernie4_5_vl().eval().to(DEVICE)
    inputs = make_inputs("qwen3_vl", with_video=False)
    inputs["pixel_values"] = inputs["pixel_values"][:, : 3 * PATCH * PATCH]  # no temporal axis
    inputs = {k: v.to(DEVICE) for k, v in inputs.items()}
    with on_torch_path_on_cpu():
        targets = every_rotary_call_matches(model, inputs, "table", 1e-5)
    assert not any("get_rope_index" in t for t in targets), targets
    with pytest.raises(vt.UnsupportedLayoutError, match="ernie4_5_vl_moe .*height and width"):
        rotary_patch(model, angles="positions")
    assert not instance_overrides(model)


def fp32_rotary_outputs(arch: str, q_dtype, k_dtype, seed: int):
    """(vlmkernels', transformers') outputs of ERNIE-4.5-VL's (lane pairs) or HunYuan-VL's
    (rotate-half) ``apply_rotary_pos_emb``, which compute in fp32 and cast back to q's
    dtype, on random (B, H, S, D) views with fp32 tables as wide as the head, in the order
    their rotary classes make."""
    import importlib

    from vlmkernels.integrations.tables import qwen_vl

    if arch == "hunyuan_vl" and transformers.__version__.startswith("5.16."):
        pytest.skip("5.16's HunYuan-VL attention calls its own multimodal function")
    module = importlib.import_module(f"transformers.models.{arch}.modeling_{arch}")
    pairs = arch == "ernie4_5_vl_moe"
    g = torch.Generator().manual_seed(seed)
    b, s, d = 2, 5, 16
    q, k = (torch.randn(b, s, h, d, generator=g).to(DEVICE, dtype).transpose(1, 2)
            for h, dtype in ((4, q_dtype), (2, k_dtype)))  # fmt: skip
    angles = torch.randn(b, s, d // 2, generator=g)
    angles = angles.repeat_interleave(2, -1) if pairs else angles.repeat(1, 1, 2)
    cos, sin = angles.cos().to(DEVICE), angles.sin().to(DEVICE)
    replacement = (qwen_vl.apply_fp32_paired_rotary_pos_emb if pairs
                   else qwen_vl.apply_fp32_rotary_pos_emb)  # fmt: skip
    return replacement(q, k, cos, sin), module.apply_rotary_pos_emb(q, k, cos, sin)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["ernie4_5_vl_moe", "hunyuan_vl"])
def test_fp32_rotary_functions_match_transformers(arch, dtype):
    """:func:`fp32_rotary_outputs`: q's dtype out, values to fp32 rounding (bf16: both
    compute in fp32 and round once, so within one bf16 step at the largest; Triton's
    interpreter truncates bf16 stores, a step at most)."""
    got, want = fp32_rotary_outputs(arch, dtype, dtype, seed=8)
    for g_, w in zip(got, want, strict=True):
        assert g_.dtype == w.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 2**-7  # one bf16 step (8 bits)
        torch.testing.assert_close(g_.float(), w.float(), rtol=0, atol=tol * w.abs().max().item())


@pytest.mark.parametrize("arch", ["ernie4_5_vl_moe", "hunyuan_vl"])
def test_fp32_rotary_functions_round_a_narrower_k_once(arch):
    """fp32 q with a bf16 k: transformers rotates k.float() and returns it in q's dtype
    (fp32), so the replacement's k is the exact rotation to fp32 rounding, not one rounded
    to bf16 first."""
    got, want = fp32_rotary_outputs(arch, torch.float32, torch.bfloat16, seed=9)
    for g_, w in zip(got, want, strict=True):
        assert g_.dtype == w.dtype == torch.float32
        torch.testing.assert_close(g_, w, rtol=0, atol=1e-5)


def _merged_chunks(table, section):
    """transformers <= 5.16's apply_multimodal_rotary_pos_emb merge of (3, ..., R) tables."""
    parts = table.split(list(section) * 2, dim=-1)
    return torch.cat([m[i % 3] for i, m in enumerate(parts)], dim=-1)


@pytest.mark.parametrize("function", ["full", "partial", "optional_k", "multimodal",
                                      "positions"])  # fmt: skip
def test_text_rotary_functions_keep_the_promoted_precision(function):
    """bf16 q and k with fp32 tables (autocast: the rotary class casts its tables to the
    fp32 hidden states' dtype, the projections give bf16): transformers' ``q * cos +
    rotate_half(q) * sin`` is fp32 and exact to fp32 rounding. The replacements return it
    in fp32 to that rounding, not the rotation rounded to bf16 and cast up."""
    from transformers.models.qwen3_5 import modeling_qwen3_5 as qwen3_5_module
    from transformers.models.qwen3_vl import modeling_qwen3_vl as qwen3_vl

    from vlmkernels.integrations.tables import qwen_vl

    g = torch.Generator().manual_seed(11)
    b, s, d, section = 2, 5, 16, (2, 3, 3)
    q, k = (torch.randn(b, s, h, d, generator=g).to(DEVICE, torch.bfloat16).transpose(1, 2)
            for h in (4, 2))  # fmt: skip
    positions = torch.randint(0, 50, (3, b, s), generator=g).to(DEVICE)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, d, 2, device=DEVICE) / d)
    angles = positions[..., None].float() * inv_freq
    cos3, sin3 = (f(torch.cat((angles, angles), -1)) for f in (torch.cos, torch.sin))
    cos, sin = _merged_chunks(cos3, section), _merged_chunks(sin3, section)
    want = qwen3_vl.apply_rotary_pos_emb(q, k, cos, sin)  # Qwen2-VL's (>= 5.17) too
    if function == "full":
        got = qwen_vl.apply_rotary_pos_emb(q, k, cos, sin)
    elif function == "partial":
        got = qwen_vl.apply_partial_rotary_pos_emb(q, k, cos, sin)
        want = qwen3_5_module.apply_rotary_pos_emb(q, k, cos, sin)
    elif function == "optional_k":
        got = (qwen_vl.apply_partial_rotary_pos_emb_optional_k(q, cos=cos, sin=sin),)
        want = want[:1]
    elif function == "multimodal":
        got = qwen_vl.apply_multimodal_rotary_pos_emb(q, k, cos3, sin3, list(section))
    else:
        fp32 = qwen_vl.PositionAngles(inv_freq, 1.0, section, False, torch.float32)
        got = qwen_vl.apply_rotary_pos_emb(q, k, positions, fp32)
    for g_, w in zip(got, want, strict=True):
        assert g_.dtype == w.dtype == torch.float32
        torch.testing.assert_close(g_, w, rtol=0, atol=1e-6 * w.abs().max().item())


@pytest.mark.parametrize("function", ["full", "partial", "multimodal"])
@pytest.mark.parametrize(
    ("q_dtype", "cos_dtype", "sin_dtype"),
    [(torch.bfloat16, torch.bfloat16, torch.float32),
     (torch.float32, torch.float32, torch.float64)],
)  # fmt: skip
def test_text_rotary_functions_promote_with_sin_too(function, q_dtype, cos_dtype, sin_dtype):
    """transformers' ``q * cos + rotate_half(q) * sin`` promotes over q, cos and sin: a
    sin wider than cos widens the result. The replacements return that dtype and values."""
    from transformers.models.qwen3_5 import modeling_qwen3_5 as qwen3_5_module

    from vlmkernels.integrations.tables import qwen_vl

    g = torch.Generator().manual_seed(12)
    b, s, d, section = 2, 5, 16, (2, 3, 3)
    q, k = (torch.randn(b, h, s, d, generator=g).to(DEVICE, q_dtype) for h in (4, 2))
    angles = torch.randn(3, b, s, d // 2, generator=g).repeat(1, 1, 1, 2).to(DEVICE)
    cos3, sin3 = angles.cos().to(cos_dtype), angles.sin().to(sin_dtype)
    cos, sin = _merged_chunks(cos3, section), _merged_chunks(sin3, section)
    want = qwen3_5_module.apply_rotary_pos_emb(q, k, cos, sin)
    if function == "multimodal":
        got = qwen_vl.apply_multimodal_rotary_pos_emb(q, k, cos3, sin3, list(section))
    else:
        replacement = {"full": qwen_vl.apply_rotary_pos_emb,
                       "partial": qwen_vl.apply_partial_rotary_pos_emb}[function]  # fmt: skip
        got = replacement(q, k, cos, sin)
    for g_, w in zip(got, want, strict=True):
        assert g_.dtype == w.dtype == torch.promote_types(cos_dtype, sin_dtype)
        tol = 1e-2 if torch.bfloat16 in (q_dtype, cos_dtype) else 1e-6  # products of bf16
        torch.testing.assert_close(g_, w, rtol=0, atol=tol * w.abs().max().item())


@pytest.mark.parametrize("arch", ["hunyuan_vl", "cosmos3_edge", "glm_image"])
def test_text_rotary_models_match_transformers(arch):
    """HunYuan-VL, Cosmos3-Edge and GLM-Image, whose text attention calls Qwen's rotary
    functions (GLM-Image's partial) on tables of their own rotary classes: the whole model
    patches its text rotary alone, every call runs on vlmkernels; on text, logits,
    parameter gradients and greedy generate() tokens match. Neither positions nor a
    vision part is offered. transformers 5.16's HunYuan-VL attention calls its own
    multimodal function (3 or 4 axes): refused by name, nothing installed."""
    torch.manual_seed(0)
    model = text_rotary_model(arch).eval().to(DEVICE)
    if arch == "hunyuan_vl" and transformers.__version__.startswith("5.16."):
        with pytest.raises(vt.UnsupportedLayoutError, match="rope: .*calls none of apply_rot"):
            rotary_patch(model)
        assert not instance_overrides(model)
        return
    g = torch.Generator().manual_seed(3)
    inputs = {"input_ids": torch.randint(5, 60, (2, 9), generator=g),
              "attention_mask": torch.ones(2, 9, dtype=torch.long)}  # fmt: skip
    inputs["attention_mask"][1, :2] = 0  # a left-padded row
    inputs = {k: v.to(DEVICE) for k, v in inputs.items()}
    targets = every_rotary_call_matches(model, inputs, "table", 1e-5, vision=False)
    assert all(".self_attn." in t for t in targets), targets
    assert vt.support()[arch] == {"rope": "ok"}


def test_nothing_to_patch_names_the_parts_the_model_takes():
    """A model none of whose parts is left on (Cosmos3-Edge with rope and connector off,
    while vision and rope_index are on but not its parts) is told which parts it takes, not
    that every part was switched off."""
    model = text_rotary_model("cosmos3_edge")
    takes = "it takes connector, rope\\)"
    with pytest.raises(ValueError, match=f"nothing to patch .*do not apply.* {takes}"):
        rotary_patch(model, rope=False)
    off = dict.fromkeys({part for p in vt.patchers() for part in p.parts} - {"positions"}, False)
    with pytest.raises(ValueError, match=f"nothing to patch .every part is off; {takes}"):
        vt.patch(model, **off)


@pytest.mark.parametrize("arch", ["hunyuan_vl", "cosmos3_edge", "glm_image"])
def test_text_rotary_models_refuse_positions_by_name(arch):
    """angles='positions' on a model whose rotary class is its own is refused by name with
    nothing installed, as Cohere Compass's and ERNIE-4.5-VL's are, not silently patched with
    the table path (alone, or held beside a Qwen-VL model that takes positions)."""
    model = text_rotary_model(arch)
    with pytest.raises(vt.UnsupportedLayoutError, match=f"{arch} .*its own"):
        rotary_patch(model, angles="positions")
    assert not instance_overrides(model)


def test_probing_get_rope_index_prints_nothing(monkeypatch):
    """The probe of Cohere Compass's get_rope_index builds its default config, which has no
    rotary parameters (they are per layer type): transformers' notice about it is not
    printed (``vlmkernels info``, ``patch``), and the logger is left as it was."""
    import logging

    from transformers.models.cohere_compass import modeling_cohere_compass

    from vlmkernels.integrations.tables import qwen_vl

    cls = modeling_cohere_compass.CohereCompassModel
    monkeypatch.delitem(qwen_vl._PROBED, cls, raising=False)
    logger = logging.getLogger("transformers.modeling_rope_utils")
    records, filters = [], list(logger.filters)
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        assert qwen_vl.installed_semantics(cls, "qwen3_vl") == ("start_plus_max_hw", False)
        assert records == []
        cls.config_class()  # outside the probe the notice reaches the handler
    finally:
        logger.removeHandler(handler)
    assert records and all("no RoPE parameters" in r.getMessage() for r in records)
    assert logger.filters == filters


def test_fp32_rotary_function_that_does_otherwise_is_refused(monkeypatch):
    """An ERNIE-4.5-VL ``apply_rotary_pos_emb`` (which its attention calls) that returns
    fp32 for bf16 q, unlike the released one, refuses the text rotary part by name, with
    what the probe found (nothing installed), rather than being replaced by a function
    that casts back."""
    from transformers.models.ernie4_5_vl_moe import modeling_ernie4_5_vl_moe as ernie

    model = ernie4_5_vl()
    released = ernie.apply_rotary_pos_emb
    monkeypatch.setattr(ernie, "apply_rotary_pos_emb",
                        lambda *a, **kw: tuple(t.float() for t in released(*a, **kw)))  # fmt: skip
    with pytest.raises(vt.UnsupportedLayoutError, match="rope: .*in fp32 and return q's dtype"):
        rotary_patch(model)
    assert not instance_overrides(model)


def test_glm4v_rotary_function_of_unknown_table_order_is_refused(monkeypatch):
    """A GLM-4V ``apply_rotary_pos_emb`` that takes its tables in neither known order
    refuses the text rotary part by name (nothing installed; the support report says why)
    rather than leaving it unpatched or reading the tables wrongly."""
    from transformers.models.glm4v import modeling_glm4v

    from vlmkernels.integrations.tables import qwen_vl

    model = glm4v()
    monkeypatch.setitem(qwen_vl.functions._TABLE_ORDER, modeling_glm4v.apply_rotary_pos_emb, None)
    with pytest.raises(vt.UnsupportedLayoutError, match="rope: .*in an order vlmkernels knows"):
        rotary_patch(model)
    assert not instance_overrides(model)
    assert "in an order vlmkernels knows" in vt.support()["glm4v"]["rope"]


def test_glm4v_table_order_probe_that_raised_is_not_remembered(monkeypatch):
    """A probe of GLM-4V's function that raised (here under a FakeTensorMode, whose tensors
    have no values) tells nothing about the function: the patch refuses there, and works
    once outside, rather than refusing the text rotary for the rest of the process."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from vlmkernels.integrations.tables import qwen_vl

    monkeypatch.setattr(qwen_vl.functions, "_TABLE_ORDER", {})
    arch = next(a for a in qwen_vl.ARCHITECTURES if a.key == "glm4v")
    with FakeTensorMode():
        assert qwen_vl.functions._table_order(arch) is None
    assert qwen_vl.functions._table_order(arch) in ("pairs", "halves")
    model = glm4v()
    with rotary_patch(model) as handle:
        assert "model.language_model.layers.0.self_attn.forward" in handle.targets
    assert not instance_overrides(model)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_in_training(reentrant):
    """transformers' activation checkpointing (reentrant or not) on a patched
    Qwen2.5-VL in training mode: the decoder and vision blocks recompute their forwards, with
    vlmkernels' ops, in the backward; logits and every parameter gradient match the
    unpatched model's."""
    torch.manual_seed(0)
    model = qwen2_5_vl().train().to(DEVICE)
    # transformers 5.23 renamed it (the old name warns, to be removed in v6)
    options = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    inputs = {k: v.to(DEVICE) for k, v in make_inputs("qwen2_5_vl").items()}
    inputs["pixel_values"].requires_grad_(reentrant)  # a reentrant block needs a grad input
    params = [p for p in model.parameters() if p.requires_grad]

    def run():
        for p in params:
            p.grad = None
        logits = model(**inputs).logits
        linear_loss(logits).backward()
        return logits.detach(), [p.grad for p in params]

    want, want_grads = run()
    with vt.patch(model):
        counts, (got, got_grads) = op_counts(run)
    assert counts.get("vlmkernels::rope_table", 0) > 0
    assert_close(got, want, "logits")
    assert_same_grads(params, got_grads, want_grads)

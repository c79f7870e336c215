"""vlmkernels.patch on models whose attention calls a Qwen-VL rotary function under their
own module's name: the vision towers calling Qwen2-VL's ``apply_rotary_pos_emb_vision``
(the vision-only rows of the rotary table: dots3.note's, EXAONE 4.5's, GLM-5-Next's,
Kimi-K2.5's, LFM3-VL's, LLaVA-OneVision-1.5's, MLCD's, Muse Glimmer's and Spark's,
Ovis2.5's, Step3p7's and VideoLLaMA3's) or its lane-pair (Inkling2's) or partial
(MiniMax-M3-VL's) variant, and NeoMME's text encoder calling Qwen3.5's partial
``apply_rotary_pos_emb``.

Each tower is built tiny from its config (two blocks, two heads of 16 lanes, weights drawn
with ``initializer_range=0.1``) and fed two images of different grids (one image where the
tower takes a (1, C, H, W) batch): skipping the rotary moves each tower's output by 1.6e-2
to 0.13 relative (checked), far above the tolerance. Tolerance (fp32):
patched and unpatched outputs, and every parameter gradient of a fixed linear loss on
them, agree to ``max|a - b| <= 1e-5 * max|b|`` (the table path does transformers'
arithmetic in fp32). Whole models are built on the meta device from their default
configs, which is enough to see what patching installs.
"""

import functools
import importlib
import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_patch_transformers import (  # noqa: E402
    DEVICE,
    assert_close,
    assert_partial_rotary_matches,
    assert_same_grads,
    instance_overrides,
    linear_loss,
    on_torch_path_on_cpu,
    op_counts,
    rotary_patch,
)

import vlmkernels.integrations.transformers as vt  # noqa: E402

# key -> (class prefix, vision attention class, its inputs, config fields beyond _TINY).
# Inputs: "flat" (N, C * T * P^2) patches and grid_thw (Qwen-VL's), "patches" (N, C, P, P)
# and grid_thw, "pixels" (N / 4, 4 P^2, C) per 2 x 2 block and its grid in blocks, "image"
# (1, C, H, W) without a grid, "merge" flat with merge_sizes, "sized" a padded (2, C, H, W)
# batch and each image's (height, width) in pixels, "square" (1, C, image_size, image_size),
# "xy" (2, N, C P^2) padded patches and each patch's (x, y), (-1, -1) for padding.
_MUSE = dict(
    pos_emb_height=4, pos_emb_width=4, max_position_embeddings=16, patch_temporal=2, merge_size=2
)  # a window of 4 x 4 patches: the 4 x 6 image gets two
TOWERS = {
    "dots3_note": ("Dots3Note", "Dots3NoteVisionAttention", "flat",
                   dict(mlp_layer_types=["dense", "dense"], per_layer_config={})),
    "exaone4_5": ("Exaone4_5_", "Exaone4_5_VisionAttention", "flat", {}),
    "glm5_next": ("Glm5Next", "Glm5NextVisionAttention", "flat", {}),
    "kimi_k25": ("Kimi_K25", "Kimi_K25VisionAttention", "patches",
                 dict(pos_emb_height=8, pos_emb_width=8, pos_emb_time=4,
                      merge_kernel_size=[2, 2])),
    "lfm3_vl": ("Lfm3Vl", "Lfm3VlVisionAttention", "flat",
                dict(layer_types=["full_attention", "conv"])),
    "llava_onevision1_5": ("LlavaOnevision15", "LlavaOnevision15VisionAttention", "flat", {}),
    "mlcd": ("MLCD", "MLCDAttention", "image", {}),
    "muse_glimmer": ("MuseGlimmer", "MuseGlimmerVisionAttention", "flat", _MUSE),
    "muse_spark": ("MuseSpark", "MuseSparkVisionAttention", "flat", _MUSE),
    "ovis2_5": ("Ovis2_5", "Ovis2_5VisionAttention", "flat", {}),
    # layer scale 1, not 0.1: the rotary then moves the output by ~5e-2, not ~7e-3
    "step3p7": ("Step3p7", "Step3p7VisionAttention", "image",
                dict(mlp_ratio=1.5, layer_scale_init_value=1.0, max_position_embeddings=16)),
    "video_llama_3": ("VideoLlama3", "VideoLlama3VisionAttention", "merge", {}),
    # the lane-pair (fp32) and partial variants of the function
    "inkling2": ("Inkling2", "Inkling2VisionAttention", "pixels",
                 dict(posemb_grid_size=8, mlp_ratio=1.5, projection_hidden_dim=32,
                      text_hidden_size=32, layer_scale_init_value=1.0)),
    "minimax_m3_vl": ("MiniMaxM3VL", "MiniMaxM3VLVisionAttention", "flat", {}),
    # Llama's text function on (B, H, N, hd), unsqueeze_dim=0: two images of two sizes
    "pixtral": ("Pixtral", "PixtralAttention", "sized", dict(head_dim=16, image_size=32)),
    # complex lane pairs on (B, N, H, hd), a class token: one square image of image_size
    "llama4": ("Llama4", "Llama4VisionAttention", "square",
               dict(intermediate_size=128, vision_output_dim=32, projector_input_dim=32,
                    projector_output_dim=32)),
    # a rotate-half per position axis (x, y) on half of each head
    "gemma4": ("Gemma4", "Gemma4VisionAttention", "xy",
               dict(head_dim=16, position_embedding_size=16, pooling_kernel_size=2)),
}  # fmt: skip

# Rotary calls per vision block where not one (Gemma 4 rotates q and k apart), and the
# whole model's config fields where its default has no vision tower.
CALLS_PER_BLOCK = {"gemma4": 2}
WHOLE_MODEL = {"gemma4": dict(vision_config={})}

# Set on every tower whose config has the field: 2 blocks of 2 heads x 16 lanes, patches of
# 4 x 4 pixels.
_TINY = dict(
    depth=2, num_hidden_layers=2, num_heads=2, num_attention_heads=2, num_key_value_heads=2,
    hidden_size=32, intermediate_size=48, moe_intermediate_size=24, out_hidden_size=32,
    adapter_in_dim=32, adapter_out_dim=32, projection_intermediate_size=48, patch_size=4,
    window_size=16, image_size=16,
)  # fmt: skip
GRIDS = ((1, 4, 6), (1, 2, 4))  # two images, in patches (t, h, w): the "image" towers the first


def _modeling(key):
    try:
        return importlib.import_module(f"transformers.models.{key}.modeling_{key}")
    except ImportError:
        pytest.skip(f"transformers {transformers.__version__} has no {key}")


def _pixels(config, kind, g):
    p = config.patch_size
    channels = getattr(config, "in_channels", None) or getattr(config, "num_channels", 3)
    if kind == "image":
        _, h, w = GRIDS[0]
        return torch.randn(1, channels, h * p, w * p, generator=g)
    if kind == "xy":
        _, h, w = GRIDS[0]
        return torch.rand(len(GRIDS), h * w, channels * p * p, generator=g)
    if kind == "square":
        return torch.randn(1, channels, config.image_size, config.image_size, generator=g)
    if kind == "sized":
        _, h, w = GRIDS[0]  # the largest
        return torch.randn(len(GRIDS), channels, h * p, w * p, generator=g)
    n = sum(t * h * w for t, h, w in GRIDS)
    if kind == "patches":
        return torch.randn(n, channels, p, p, generator=g)
    if kind == "pixels":  # per 2 x 2 block of patches, its pixels
        return torch.randn(n // 4, 4 * p * p, channels, generator=g)
    frames = getattr(config, "temporal_patch_size", None) or getattr(config, "patch_temporal", 1)
    return torch.randn(n, channels * frames * p * p, generator=g)


def tower(key):
    """(the tiny vision tower of ``key``, its inputs, the vision attention class)."""
    prefix, attention, kind, extra = TOWERS[key]
    modeling = _modeling(key)
    cls = getattr(modeling, f"{prefix}VisionModel")
    known = cls.config_class().to_dict()
    config = cls.config_class(**{k: v for k, v in (_TINY | extra).items() if k in known})
    # read by transformers' weight init, a config field or not (Kimi-K2.5's, Muse's,
    # Step3p7's are not): weights of 0.1 make the attention depend on the positions
    config.initializer_range = 0.1
    model = cls(config).eval().to(DEVICE)
    g = torch.Generator().manual_seed(1)
    # (pixel_values or hidden_states, grid_thw or image_grid_thw, ...)
    first, second, *_ = inspect.signature(model.forward).parameters
    inputs = {first: _pixels(config, kind, g)}
    if kind == "sized":
        inputs[second] = torch.tensor(GRIDS)[:, 1:] * config.patch_size
    elif kind == "xy":
        xy = torch.full((*inputs[first].shape[:2], 2), -1)
        for i, (_, h, w) in enumerate(GRIDS):
            y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            xy[i, : h * w] = torch.stack([x.flatten(), y.flatten()], -1)
        inputs[second] = xy
    elif kind not in ("image", "square"):  # "pixels": the grid in 2 x 2 blocks
        inputs[second] = torch.tensor(GRIDS) // torch.tensor([1, 2, 2] if kind == "pixels" else 1)
    if kind == "merge":
        inputs["merge_sizes"] = torch.full((len(GRIDS),), 2)
    return model, {k: v.to(DEVICE) for k, v in inputs.items()}, getattr(modeling, attention)


def outputs_and_grads(model, inputs, params):
    out = model(**inputs)
    out = out if isinstance(out, torch.Tensor) else out[0]
    return out.detach(), torch.autograd.grad(linear_loss(out), params, allow_unused=True)


def assert_patch_matches(model, inputs, targets, calls: int) -> None:
    """The model patched (the rotary table's parts) replaces ``targets`` (sorted names)
    and makes ``calls`` vlmkernels rotary calls, forward and backward; its output and
    parameter gradients match the unpatched run's; nothing is left on the instances
    after. On the CPU, the PyTorch path."""
    params = [p for p in model.parameters() if p.requires_grad]
    run = functools.partial(outputs_and_grads, model, inputs, params)
    want, want_grads = run()
    with rotary_patch(model) as handle, on_torch_path_on_cpu():
        counts, (got, got_grads) = op_counts(run)
    assert sorted(handle.targets) == sorted(targets)
    assert counts == {"vlmkernels::rope_table": calls}
    assert_close(got, want, "output")
    assert_same_grads(params, got_grads, want_grads)
    assert not instance_overrides(model)


@pytest.mark.parametrize("key", sorted(TOWERS))
def test_tower_matches_transformers(key):
    """The tower patches its vision attentions alone; every rotary call runs on vlmkernels
    (one per block, Gemma 4's two, forward and backward); outputs and parameter gradients match the
    unpatched tower's; nothing is left on the instances after. On the CPU, the PyTorch
    path: the kernel's (B, N, H, hd) layouts are tests/test_rope.py's, interpreted."""
    torch.manual_seed(0)
    model, inputs, attention = tower(key)
    blocks = [name for name, m in model.named_modules() if isinstance(m, attention)]
    assert_patch_matches(model, inputs, [f"{name}.forward" for name in blocks],
                         2 * CALLS_PER_BLOCK.get(key, 1) * len(blocks))  # fmt: skip


@pytest.mark.parametrize("key", sorted(TOWERS))
def test_whole_model_patches_its_vision_attentions(key):
    """The whole model (default config, meta device) takes the vision part: every vision
    attention of its tower, and no other rotary target; ``support()`` says so."""
    prefix, attention, _, _ = TOWERS[key]
    modeling = _modeling(key)
    cls = getattr(modeling, f"{prefix}ForConditionalGeneration", None)
    if cls is None:  # MLCD: the tower is the model
        cls = getattr(modeling, f"{prefix}VisionModel")
    with torch.device("meta"):
        model = cls(cls.config_class(**WHOLE_MODEL.get(key, {})))
    blocks = [n for n, m in model.named_modules() if isinstance(m, getattr(modeling, attention))]
    with rotary_patch(model) as handle:
        assert sorted(handle.targets) == sorted(f"{name}.forward" for name in blocks)
    assert not instance_overrides(model)
    assert vt.support()[key] == {"vision": "ok"}


# a model of another module holding a patched tower: (its key, the tower's vision config
# model type, the tower's key and attention class)
HOLDERS = {
    "mistral3": ("pixtral", "pixtral", "PixtralAttention"),
    "lighton_ocr": ("pixtral", "pixtral", "PixtralAttention"),
    "llava": ("pixtral", "pixtral", "PixtralAttention"),  # Pixtral 12B's layout
    "embedding_gemma2": ("gemma4_vision", "gemma4", "Gemma4VisionAttention"),
}


@pytest.mark.parametrize("key", sorted(HOLDERS))
def test_models_holding_a_patched_tower_patch_it(key):
    """Mistral3's and LightOnOCR's models and a LLaVA model with a Pixtral tower, and
    EmbeddingGemma2's model with a Gemma 4 tower, patch the tower's vision attentions
    (meta device, the tower's default config) and nothing else of the rotary table."""
    vision_type, tower_key, attention = HOLDERS[key]
    modeling = _modeling(key)
    cls = next(getattr(modeling, n) for n in sorted(dir(modeling))
               if n.endswith(("ConditionalGeneration", "Gemma2Model")))  # fmt: skip
    config = cls.config_class(vision_config={"model_type": vision_type})
    with torch.device("meta"):
        model = cls(config)
    attention = getattr(_modeling(tower_key), attention)
    blocks = [n for n, m in model.named_modules() if isinstance(m, attention)]
    assert len(blocks) == config.vision_config.num_hidden_layers
    with rotary_patch(model) as handle:
        assert sorted(handle.targets) == sorted(f"{name}.forward" for name in blocks)
    assert not instance_overrides(model)


@pytest.mark.parametrize("key", ["llama4", "gemma4"])
def test_tower_compiles_fullgraph(key):
    """The patched Llama 4 and Gemma 4 towers (their replacements read a complex table,
    and reshape the head per axis) compile with fullgraph=True and give the eager patched
    output."""
    torch.manual_seed(0)
    model, inputs, _ = tower(key)
    with rotary_patch(model), torch.no_grad():
        want = model(**inputs)
        torch._dynamo.reset()
        got = torch.compile(model, fullgraph=True, backend="aot_eager")(**inputs)
    assert torch.equal(got[0], want[0])  # (a model output: its first field)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vision_function_variants_match_transformers(dtype):
    """The replacements of Inkling2's (lane pairs, fp32, each result in its input's dtype;
    Llama 4's the same with complex angles, on an expanded batch of two) and
    MiniMax-M3-VL's (a quarter of each head rotated, in the tables' dtype, the rest
    passed) vision functions against the installed ones on (N, H, hd) views of a packed
    projection (MiniMax-M3-VL's on 5.16: (1, N, H, hd)), fp32 tables (MiniMax's in q's
    dtype, as its rotary class casts them): same dtypes, values within rounding."""
    from vlmkernels.integrations.tables import qwen_vl

    g = torch.Generator().manual_seed(6)
    n, d, rot = 11, 16, 4
    qkv = torch.randn(n, 3, 2, d, generator=g).to(DEVICE, dtype)
    q, k = qkv[:, 0], qkv[:, 1]
    pairs = torch.randn(n, d // 2, generator=g).repeat_interleave(2, -1).to(DEVICE)
    inkling2 = _modeling("inkling2")
    got = qwen_vl.functions.apply_paired_rotary_pos_emb_vision(q, k, pairs.cos(), pairs.sin())
    want = inkling2.apply_rotary_pos_emb_vision(q, k, pairs.cos(), pairs.sin())
    for a, w in zip(got, want, strict=True):  # fp32 math, one rounding (one bf16 step: the
        assert a.dtype == w.dtype == dtype  # interpreter truncates bf16 stores)
        tol = 1e-6 if dtype == torch.float32 else 2**-7
        assert (a.float() - w.float()).abs().max() <= tol * w.float().abs().max()
    # Llama 4's: the same pairs times complex angles (N, 1, hd / 2), on (B, N, H, hd)
    angles = torch.randn(n, 1, d // 2, generator=g).to(DEVICE)
    freqs_ci = torch.polar(torch.ones_like(angles), angles)
    qb, kb = q[None].expand(2, -1, -1, -1), k[None].expand(2, -1, -1, -1)
    got = qwen_vl.functions.vision_apply_rotary_emb(qb, kb, freqs_ci)
    want = _modeling("llama4").vision_apply_rotary_emb(qb, kb, freqs_ci=freqs_ci)
    for a, w in zip(got, want, strict=True):
        assert a.dtype == w.dtype == dtype and a.shape == w.shape
        tol = 1e-6 if dtype == torch.float32 else 2**-7
        assert (a.float() - w.float()).abs().max() <= tol * w.float().abs().max()
    minimax = _modeling("minimax_m3_vl")
    if transformers.__version__.startswith("5.16."):
        q, k = q[None], k[None]
    half = torch.randn(n, rot // 2, generator=g).repeat(1, 2).to(DEVICE)
    cos, sin = half.cos().to(dtype), half.sin().to(dtype)
    got = qwen_vl.functions.apply_partial_rotary_pos_emb_vision(q, k, cos, sin)
    assert_partial_rotary_matches((q, k), got, minimax.apply_rotary_pos_emb_vision(q, k, cos, sin),
                                  rot)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemma4_function_matches_transformers(dtype):
    """Gemma 4's ``apply_multidimensional_rope`` replacement against the installed one: on
    its (B, N, H, hd) call (the kernel) and on a layout it serves with transformers' formula
    ((B, H, N, hd), unsqueeze_dim=1): the same dtype, fp32 bitwise, bf16 within an ulp of
    the largest value (transformers rounds three times); a tensor of fp32 tables promotes a
    bf16 x as transformers' products do; a head that does not split per axis is refused."""
    from vlmkernels.integrations.tables import qwen_vl

    gemma4 = _modeling("gemma4")
    g = torch.Generator().manual_seed(8)
    b, n, h, d = 2, 7, 3, 16
    x = torch.randn(b, n, h, d, generator=g).to(DEVICE, dtype)
    cos, sin = (torch.randn(b, n, d, generator=g).to(DEVICE, dtype) for _ in range(2))
    pos = torch.zeros(b, n, 2, dtype=torch.long, device=DEVICE)
    mine, theirs = qwen_vl.functions.apply_multidimensional_rope, gemma4.apply_multidimensional_rope
    for args, kw in (((x, cos, sin, pos), {}),
                     ((x.transpose(1, 2), cos, sin, pos), {"unsqueeze_dim": 1}),
                     ((x, cos.float(), sin.float(), pos), {})):  # fmt: skip
        got, want = mine(*args, **kw), theirs(*args, **kw)
        assert got.dtype == want.dtype and got.shape == want.shape
        if want.dtype == torch.float32:
            assert torch.equal(got, want)
        else:
            assert (got.float() - want.float()).abs().max() <= 2**-7 * want.float().abs().max()
    with pytest.raises(ValueError, match="does not split into 3 even parts"):
        mine(x, cos, sin, torch.zeros(b, n, 3, dtype=torch.long))


_TWO_LAYERS = ("layers.0.self_attn.forward", "layers.1.self_attn.forward")


def test_deepseek_ocr2_vision_encoder_matches_transformers():
    """DeepSeek-OCR-2's vision encoder (a Qwen2-style decoder over the SAM features and its
    queries, bidirectional over the image, causal over the queries) patches its attentions
    alone; every call runs on vlmkernels; outputs and parameter gradients match
    transformers'. Its vision model (default config, meta device) patches the encoder's."""
    modeling = _modeling("deepseek_ocr2")
    configs = importlib.import_module(
        "transformers.models.deepseek_ocr2.configuration_deepseek_ocr2"
    )  # (5.16's modeling module names neither config class)
    config = configs.DeepseekOcr2VisionEncoderConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, initializer_range=0.1,
    )  # fmt: skip
    torch.manual_seed(0)
    model = modeling.DeepseekOcr2VisionEncoder(config).eval().to(DEVICE)
    g = torch.Generator().manual_seed(4)
    inputs = {"inputs_embeds": torch.randn(2, 9, 32, generator=g).to(DEVICE), "num_patches": 6}
    assert_patch_matches(model, inputs, _TWO_LAYERS, 4)
    with torch.device("meta"):
        tower = modeling.DeepseekOcr2VisionModel(configs.DeepseekOcr2VisionConfig())
    blocks = [n for n, m in tower.named_modules()
              if isinstance(m, modeling.DeepseekOcr2VisionAttention)]  # fmt: skip
    with rotary_patch(tower) as handle:
        assert blocks and sorted(handle.targets) == sorted(f"{n}.forward" for n in blocks)


def test_neomme_encoder_matches_transformers():
    """NeoMME's encoder (a sliding-window layer rotating whole heads, a full-attention layer
    rotating a quarter of each head, per its rope parameters) patches its text attentions
    alone; every call runs on vlmkernels; on a left-padded text batch, hidden states and
    parameter gradients match transformers'; positions are refused by name."""
    modeling = _modeling("neomme")
    config = modeling.NeoMMEModel.config_class(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, embedding_rank=16,
        layer_types=["sliding_attention", "full_attention"], sliding_window=4,
        initializer_range=0.1,
    )  # fmt: skip
    torch.manual_seed(0)
    model = modeling.NeoMMEModel(config).eval()
    with torch.no_grad():  # its init zeroes the output projections and gates: the attention
        for p in model.parameters():  # would add nothing (skipping the rotary: 0.18, checked)
            p.copy_(torch.randn_like(p) * 0.2)
    model = model.to(DEVICE)
    g = torch.Generator().manual_seed(3)
    inputs = {"input_ids": torch.randint(7, 120, (2, 9), generator=g),
              "attention_mask": torch.ones(2, 9, dtype=torch.long)}  # fmt: skip
    inputs["attention_mask"][1, :2] = 0
    inputs = {k: v.to(DEVICE) for k, v in inputs.items()}
    assert_patch_matches(model, inputs, _TWO_LAYERS, 4)
    with pytest.raises(vt.UnsupportedLayoutError, match="neomme .*its own"):
        rotary_patch(model, angles="positions")
    assert vt.support()["neomme"] == {"rope": "ok"}

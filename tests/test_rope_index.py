"""vlmkernels.ops.rope_index against the installed transformers' own get_rope_index.

Tiny Qwen2-VL / Qwen2.5-VL / Qwen3-VL (and Qwen3-VL-MoE, Qwen3.5, Qwen3.5-MoE) models are built
from small configs
(no download). Random batches: 1-4 rows, random text, 0-3 images and 0-2 videos per row with
random grids (videos up to t = 14, so the text-after-video rules differ), right, left and no
padding, mask holes, fully padded rows, text-only batches, random dtypes. The rule the
installed version does not implement is checked against `_reference`, a plain loop written
from the module docstring's math, itself checked against transformers on the installed rule.
"""

import copy
import inspect
import itertools
import random
import types

import pytest
import torch

from vlmkernels.ops.rope.index import TEXT_AFTER_VISION, get_rope_index

transformers = pytest.importorskip("transformers")

from vlmkernels.integrations import transformers as vt  # noqa: E402
from vlmkernels.integrations.transformers import rope_index_method  # noqa: E402

MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
QWEN3_LIKE = (
    "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe", "glm4v", "glm4v_moe", "glm46v", "glm_ocr",
    "cohere_compass",
)  # fmt: skip
QWEN2_LIKE = ("paddleocr_vl",)
TEXT_CFG = dict(
    hidden_size=16,
    intermediate_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    vocab_size=64,
    head_dim=8,
    rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [1, 1, 2]},
)


def _tiny_model(name):
    qwen3_vision = dict(
        depth=1,
        hidden_size=16,
        intermediate_size=16,
        num_heads=2,
        out_hidden_size=16,
        deepstack_visual_indexes=[],
    )
    qwen2_vision = dict(depth=1, embed_dim=16, hidden_size=16, num_heads=2, mlp_ratio=1)
    moe_text = dict(TEXT_CFG, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=8)
    # Qwen3.5: one attention layer (no Gated DeltaNet), the whole head rotary
    qwen3_5_text = dict(
        TEXT_CFG,
        layer_types=["full_attention"],
        rope_parameters={**TEXT_CFG["rope_parameters"], "partial_rotary_factor": 1.0},
    )
    qwen3_5_vision = {k: v for k, v in qwen3_vision.items() if k != "deepstack_visual_indexes"}
    glm_vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2,
                      out_hidden_size=16)  # fmt: skip
    glm_moe_text = dict(TEXT_CFG, n_routed_experts=2, num_experts_per_tok=1,
                        moe_intermediate_size=8, first_k_dense_replace=1)  # fmt: skip
    # Cohere Compass: rotary parameters per layer type
    per_type = {"full_attention": TEXT_CFG["rope_parameters"]}
    compass_text = dict(TEXT_CFG, layer_types=["full_attention"], rope_parameters=per_type)
    setups = {
        "qwen2_vl": ("Qwen2VLModel", "Qwen2VLConfig", qwen2_vision, TEXT_CFG),
        "qwen2_5_vl": (
            "Qwen2_5_VLModel",
            "Qwen2_5_VLConfig",
            dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16),
            TEXT_CFG,
        ),
        "qwen3_vl": ("Qwen3VLModel", "Qwen3VLConfig", qwen3_vision, TEXT_CFG),
        "qwen3_vl_moe": ("Qwen3VLMoeModel", "Qwen3VLMoeConfig", qwen3_vision, moe_text),
        "qwen3_5": ("Qwen3_5Model", "Qwen3_5Config", qwen3_5_vision, qwen3_5_text),
        "qwen3_5_moe": (
            "Qwen3_5MoeModel",
            "Qwen3_5MoeConfig",
            qwen3_5_vision,
            dict(qwen3_5_text, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=8),
        ),
        "glm4v": ("Glm4vModel", "Glm4vConfig", glm_vision, TEXT_CFG),
        "glm_ocr": ("GlmOcrModel", "GlmOcrConfig", glm_vision, TEXT_CFG),
        "glm46v": ("Glm46VModel", "Glm46VConfig", glm_vision, TEXT_CFG),
        "cohere_compass": ("CohereCompassModel", "CohereCompassConfig", qwen3_vision, compass_text),
        "paddleocr_vl": (
            "PaddleOCRVLModel",
            "PaddleOCRVLConfig",
            dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2),
            TEXT_CFG,
        ),
        "glm4v_moe": ("Glm4vMoeModel", "Glm4vMoeConfig", glm_vision, glm_moe_text),
    }
    model_name, config_name, vision, text = setups[name]
    config = getattr(transformers, config_name)(vision_config=vision, text_config=text)
    return getattr(transformers, model_name)(config).eval()


@pytest.fixture(scope="module")
def models():
    # quiet while the models are built, and the verbosity restored after the module: the
    # transformers logger is process-wide, and the later modules' tests expect its default
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield {name: _tiny_model(name) for name in (*MODEL_TYPES, *QWEN3_LIKE, *QWEN2_LIKE)}
    finally:
        transformers.logging.set_verbosity(verbosity)


# ------------------------------------------------------------------------------ random batches


def _text(rng, lo=1, hi=6):
    return [("text", rng.randint(lo, hi))]


def _random_row(rng, model_type, m, vision):
    """A list of ("text", L) / (kind, grid) items; frames of a Qwen3-VL video are separate."""
    items = ["image"] * rng.randint(0, 3) + ["video"] * rng.randint(0, 2) if vision else []
    rng.shuffle(items)
    row, grids = _text(rng), {"image": [], "video": []}
    prev = None
    for kind in items:
        t = rng.choice([1, 1, 1, 2]) if kind == "image" else rng.randint(2, 14)
        grid = (t, m * rng.randint(1, 3), m * rng.randint(1, 3))
        grids[kind].append(grid)
        if kind == prev or rng.random() < 0.7:
            row += _text(rng)  # two runs of one type must be apart, else one grid per run
        if kind == "video" and model_type == "qwen3_vl":
            for frame in range(t):
                row += ([] if frame == 0 else _text(rng, 1, 2)) + [(kind, (1, *grid[1:]))]
        else:
            row.append((kind, grid))
        prev = kind
    if rng.random() < 0.7:
        row += _text(rng)
    return row, grids


def _tokens(rng, row, m):
    kinds, holes = [], []
    for kind, arg in row:
        if kind == "text":
            if arg >= 2 and rng.random() < 0.2:
                holes.append(len(kinds) + 1)
            kinds += [0] * arg
        else:
            t, h, w = arg
            kinds += [1 if kind == "image" else 2] * (t * (h // m) * (w // m))
    return kinds, holes


def _random_batch(rng, model_type, m):
    batch = rng.randint(1, 4)
    vision = rng.random() < 0.85
    padding = rng.choice(["right", "left", "none"])
    rows, images, videos = [], [], []
    for _ in range(batch):
        if padding != "none" and rng.random() < 0.12:
            rows.append(([], []))  # all padding
            continue
        row, grids = _random_row(rng, model_type, m, vision)
        images += grids["image"]
        videos += grids["video"]
        rows.append(_tokens(rng, row, m))
    seq = max(len(k) for k, _ in rows) + rng.randint(0, 3)
    kinds = torch.randint(0, 3, (batch, seq))  # padded tokens get random types: masked anyway
    mask = torch.zeros(batch, seq, dtype=torch.long)
    for b, (row_kinds, holes) in enumerate(rows):
        n = len(row_kinds)
        if padding == "none":
            row_kinds = row_kinds + [0] * (seq - n)
            n = seq
        lo = seq - n if padding == "left" else 0
        kinds[b, lo : lo + n] = torch.tensor(row_kinds, dtype=torch.long)
        mask[b, lo : lo + n] = 1
        for hole in holes:
            mask[b, lo + hole] = 0
    unmasked = padding == "none" and not any(h for _, h in rows)
    # int32 ids: transformers' index_put with a mask fails on them (Int destination, Long source)
    ids_dtype = rng.choice([torch.long, torch.int32]) if unmasked else torch.long
    inputs = dict(
        input_ids=torch.randint(0, 64, (batch, seq), dtype=ids_dtype),
        mm_token_type_ids=kinds.to(rng.choice([torch.long, torch.int32])),
        image_grid_thw=torch.tensor(images, dtype=torch.long).view(-1, 3) if images else None,
        video_grid_thw=torch.tensor(videos, dtype=torch.long).view(-1, 3) if videos else None,
        attention_mask=None if unmasked else mask,
    )
    if model_type == "qwen2_5_vl" and videos and rng.random() < 0.85:
        seconds = [rng.choice([0.3, 0.5, 1 / 3, 0.7, 1.0, 1.5, 2.0, 2.7]) for _ in videos]
        kind = rng.choice(["float32", "float32", "float64", "list"])
        inputs["second_per_grid_ts"] = (
            seconds if kind == "list" else torch.tensor(seconds, dtype=getattr(torch, kind))
        )
    return inputs


# ----------------------------------------------------------------------------- the reference


def _reference(inputs, model_type, m, tokens_per_second, rule, truncate):
    """Positions and deltas by the module docstring's math, one run at a time."""
    ids, kinds, mask = inputs["input_ids"], inputs["mm_token_type_ids"], inputs["attention_mask"]
    mask = torch.ones_like(ids) if mask is None else mask
    images = iter(inputs["image_grid_thw"].tolist() if inputs["image_grid_thw"] is not None else [])
    videos = inputs["video_grid_thw"].tolist() if inputs["video_grid_thw"] is not None else []
    seconds = inputs.get("second_per_grid_ts")
    if model_type == "qwen3_vl":
        videos = [(1, h, w) for t, h, w in videos for _ in range(t)]
    videos = iter(enumerate(videos))
    positions = torch.zeros(3, *ids.shape, dtype=ids.dtype)
    deltas = []
    for b in range(ids.shape[0]):
        keep = mask[b].bool()
        row, start = [], 0
        for kind, run in itertools.groupby(kinds[b][keep].tolist()):
            n = len(list(run))
            if kind == 0:
                row += [(start + k,) * 3 for k in range(n)]
                start += n
                continue
            v, (t, h, w) = next(videos) if kind == 2 else (None, next(images))
            h, w = h // m, w // m
            tau = 1
            if model_type == "qwen2_5_vl" and kind == 2:
                tau = _tau(seconds, v, tokens_per_second, truncate)
            time = (torch.arange(t) * tau).long().tolist()
            for i, j, l in itertools.product(range(t), range(h), range(w)):
                row.append((start + time[i], start + j, start + l))
            largest = max(max(p) for p in row)
            start = start + max(h, w) if rule == "start_plus_max_hw" else largest + 1
        if row:
            positions[:, b, keep] = torch.tensor(row, dtype=ids.dtype).T
        deltas.append(max(max(p) for p in row) + 1 - len(row) if row else 0)
    return positions, torch.tensor(deltas, dtype=torch.long).unsqueeze(1)


def _tau(seconds, v, tokens_per_second, truncate):
    if seconds is None:
        return tokens_per_second
    s = seconds[v]
    return tokens_per_second * (int(s) if truncate else s)


# ------------------------------------------------------------------------------------ helpers


def _configure(model, rng):
    vision = model.config.vision_config
    vision.spatial_merge_size = rng.choice([2, 2, 1])
    if hasattr(vision, "tokens_per_second"):
        vision.tokens_per_second = rng.choice([1, 2, 4])
    return vision.spatial_merge_size, getattr(vision, "tokens_per_second", None)


def _call_hf(model, inputs):
    return type(model).get_rope_index(model, **inputs)


def _hf_with_dead_rows(model, inputs):
    """transformers' result; rows that are all padding (transformers raises on them) are zero."""
    mask = inputs["attention_mask"]
    live = None if mask is None else mask.bool().any(1)
    if live is None or bool(live.all()):
        return _call_hf(model, inputs)
    with pytest.raises(ValueError, match="non-empty"):
        _call_hf(model, inputs)
    rows = ("input_ids", "mm_token_type_ids", "attention_mask")
    full_pos = torch.zeros(3, *mask.shape, dtype=inputs["input_ids"].dtype)
    full_deltas = torch.zeros(mask.shape[0], 1, dtype=torch.long)
    if live.any():
        pos, deltas = _call_hf(model, {k: v[live] if k in rows else v for k, v in inputs.items()})
        full_pos[:, live] = pos
        full_deltas[live] = deltas
    return full_pos, full_deltas


def _ours(inputs, model_type, m, tokens_per_second, **options):
    return get_rope_index(
        **inputs,
        model_type=model_type,
        spatial_merge_size=m,
        tokens_per_second=tokens_per_second,
        **options,
    )


def _assert_same(got, want):
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape and g.device == w.device
        assert torch.equal(g, w), (g, w)


def _snapshot(inputs):
    return copy.deepcopy(inputs)


def _assert_unchanged(inputs, before):
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(inputs[key], value) and inputs[key].dtype == value.dtype, key
        else:
            assert inputs[key] == value, key


# -------------------------------------------------------------------------------------- tests


def _installed(model):
    """(text_after_vision, truncate_seconds) of the installed transformers' class."""
    cls = type(model)
    return vt.installed_semantics(cls, vt._rope_index_arch(model)[1].data["rope_index"])


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_random_batches_match_transformers_and_reference(models, model_type):
    model = models[model_type]
    rng = random.Random(MODEL_TYPES.index(model_type))
    installed, installed_truncate = _installed(model)
    other = next(r for r in TEXT_AFTER_VISION if r != installed)
    diverged = 0
    for _ in range(60):
        m, tps = _configure(model, rng)
        inputs = _random_batch(rng, model_type, m)
        before = _snapshot(inputs)
        want = _hf_with_dead_rows(model, inputs)
        got = _ours(
            inputs, model_type, m, tps, text_after_vision=installed,
            truncate_seconds=installed_truncate,
        )  # fmt: skip
        _assert_same(got, want)
        _assert_same(_reference(inputs, model_type, m, tps, installed, installed_truncate), want)
        got_other = _ours(
            inputs, model_type, m, tps, text_after_vision=other,
            truncate_seconds=installed_truncate,
        )  # fmt: skip
        want_other = _reference(inputs, model_type, m, tps, other, installed_truncate)
        _assert_same(got_other, want_other)
        images = inputs["image_grid_thw"]
        if model_type != "qwen3_vl" or images is None or bool((images[:, 0] == 1).all()):
            diverged += not torch.equal(got_other[0], got[0])
        if model_type == "qwen2_5_vl":
            flipped = not installed_truncate
            got_t = _ours(
                inputs, model_type, m, tps, text_after_vision=installed,
                truncate_seconds=flipped,
            )  # fmt: skip
            _assert_same(got_t, _reference(inputs, model_type, m, tps, installed, flipped))
        _assert_unchanged(inputs, before)
    # Qwen3-VL runs have t' = 1 (videos split into frames, images t = 1): the rules agree
    assert (diverged == 0) if model_type == "qwen3_vl" else (diverged > 10)


@pytest.mark.parametrize("name", QWEN3_LIKE)
def test_qwen3_like_models_match_transformers(models, name):
    """The models whose get_rope_index is Qwen3-VL's (its MoE variant, Qwen3.5,
    Qwen3.5-MoE, GLM-4V, GLM-4V-MoE, GLM-4.6V, GLM-OCR and Cohere Compass) get it installed
    and agree with their own."""
    model, rng = models[name], random.Random(7)
    for _ in range(10):
        inputs = _random_batch(rng, "qwen3_vl", 2)
        _assert_same(rope_index_method(model)(**inputs), _hf_with_dead_rows(model, inputs))


@pytest.mark.parametrize("name", QWEN2_LIKE)
def test_qwen2_like_models_match_transformers(models, name):
    """The models whose get_rope_index is Qwen2-VL's (PaddleOCR-VL) get it installed and
    agree with their own."""
    model, rng = models[name], random.Random(8)
    for _ in range(10):
        inputs = _random_batch(rng, "qwen2_vl", 2)
        _assert_same(rope_index_method(model)(**inputs), _hf_with_dead_rows(model, inputs))


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl"])
def test_long_video_worked_example(model_type):
    """Text 5, video (8, 4, 4) with merge 2 (merged 8 x 2 x 2), text 3: notes' example."""
    kinds = torch.tensor([[0] * 5 + [2] * 32 + [0] * 3])
    inputs = dict(
        input_ids=torch.zeros_like(kinds),
        mm_token_type_ids=kinds,
        video_grid_thw=torch.tensor([[8, 4, 4]]),
        second_per_grid_ts=torch.tensor([0.5]),
    )
    common = dict(model_type=model_type, spatial_merge_size=2, tokens_per_second=2)
    for rule, tail in (("start_plus_max_hw", [7, 8, 9]), ("max_plus_one", [13, 14, 15])):
        pos, delta = get_rope_index(**inputs, **common, text_after_vision=rule)
        assert pos[0, 0, 5:37].unique().tolist() == [5 + i for i in range(8)]  # tau = 1
        assert pos[:, 0, -3:].tolist() == [tail] * 3
        assert pos[1, 0, 5:9].tolist() == [5, 5, 6, 6] and pos[2, 0, 5:9].tolist() == [5, 6, 5, 6]
        assert delta.tolist() == [[max(12, tail[-1]) + 1 - 40]]


def test_probe_tells_the_rules_apart():
    """The probe classifies stand-ins that implement each rule with `_reference`."""

    def fake(name, model_type, rule, truncate):
        def get_rope_index(
            self,
            input_ids,
            mm_token_type_ids,
            image_grid_thw=None,
            video_grid_thw=None,
            second_per_grid_ts=None,
            attention_mask=None,
            **kwargs,
        ):
            vision = self.config.vision_config
            inputs = dict(
                input_ids=input_ids,
                mm_token_type_ids=mm_token_type_ids,
                image_grid_thw=image_grid_thw,
                video_grid_thw=video_grid_thw,
                attention_mask=attention_mask,
                second_per_grid_ts=second_per_grid_ts if model_type == "qwen2_5_vl" else None,
            )
            m, tps = vision.spatial_merge_size, vision.tokens_per_second
            return _reference(inputs, model_type, m, tps, rule, truncate)

        def config_class():
            return types.SimpleNamespace(vision_config=types.SimpleNamespace())

        return type(name, (), {"get_rope_index": get_rope_index, "config_class": config_class})

    cases = [("Qwen2_5_VLModel", "qwen2_5_vl"), ("Qwen2VLModel", "qwen2_vl")]
    cases += [("Qwen3VLModel", "qwen3_vl")]
    for (name, model_type), rule, truncate in itertools.product(
        cases, TEXT_AFTER_VISION, (False, True)
    ):
        found = vt._probe(fake(name, model_type, rule, truncate), model_type)
        assert found == (rule, truncate and model_type == "qwen2_5_vl")


def test_installed_semantics_by_version(models):
    """The probe on the installed classes: 5.16-5.17 truncate Qwen2.5-VL's seconds
    (``int(second_per_grid_t)``), 5.18 and newer do not (``time_interval`` became a float,
    read for 5.18.0 to 5.25.0); every version since 5.3 starts text after vision at
    start + max(h, w)."""
    version = tuple(int(x) for x in transformers.__version__.split(".")[:2])
    for model_type in MODEL_TYPES:
        rule, truncate = _installed(models[model_type])
        if version >= (5, 16):
            assert rule == "start_plus_max_hw"
            assert truncate == (model_type == "qwen2_5_vl" and version < (5, 18))


def test_defaults_do_not_follow_the_installed_transformers(monkeypatch):
    """get_rope_index's semantics are its arguments' defaults, never a probe: with every
    transformers class unimportable the result is the same."""
    kinds = torch.tensor([[0] * 2 + [2] * 32 + [0] * 2])
    inputs = dict(
        input_ids=torch.zeros_like(kinds), mm_token_type_ids=kinds,
        video_grid_thw=torch.tensor([[8, 4, 4]]), second_per_grid_ts=torch.tensor([1.5]),
        model_type="qwen2_5_vl", spatial_merge_size=2, tokens_per_second=2,
    )  # fmt: skip
    want = get_rope_index(**inputs)
    explicit = get_rope_index(
        **inputs, text_after_vision="start_plus_max_hw", truncate_seconds=False
    )
    _assert_same(want, explicit)
    assert want[0][0, 0, 2:34].max() == 2 + 21  # 7 * 2 * 1.5: float seconds
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)
    _assert_same(get_rope_index(**inputs), want)


def test_edge_shapes_and_dtypes():
    common = dict(model_type="qwen2_vl", spatial_merge_size=2)
    empty = torch.zeros(0, 5, dtype=torch.int32)
    pos, delta = get_rope_index(empty, empty, **common)
    assert pos.shape == (3, 0, 5) and pos.dtype == torch.int32
    assert delta.shape == (0, 1) and delta.dtype == torch.get_default_dtype()  # torch.tensor([])
    ids = torch.zeros(2, 4, dtype=torch.int32)
    pos, delta = get_rope_index(ids, ids, **common)
    assert pos.dtype == torch.int32 and delta.dtype == torch.long
    assert pos[:, 1].tolist() == [[0, 1, 2, 3]] * 3 and delta.tolist() == [[0], [0]]
    mask = torch.tensor([[0, 0, 0, 0], [0, 1, 1, 0]])
    pos, delta = get_rope_index(ids, ids, attention_mask=mask, **common)
    assert pos[:, 0].abs().sum() == 0 and pos[:, 1].tolist() == [[0, 0, 1, 0]] * 3
    assert delta.tolist() == [[0], [0]]


def test_bad_arguments():
    ids = torch.zeros(1, 3, dtype=torch.long)
    common = dict(model_type="qwen2_vl", spatial_merge_size=2)
    with pytest.raises(ValueError, match="model_type"):
        get_rope_index(ids, ids, model_type="llava", spatial_merge_size=2)
    with pytest.raises(ValueError, match="tokens_per_second"):
        get_rope_index(ids, ids, model_type="qwen2_5_vl", spatial_merge_size=2)
    with pytest.raises(ValueError, match="text_after_vision"):
        get_rope_index(ids, ids, **common, text_after_vision="x")
    with pytest.raises(ValueError, match="mm_token_type_ids"):
        get_rope_index(ids, None, **common)
    # each error names the argument at fault
    cases = [
        (dict(input_ids=[[0, 0, 0]]), TypeError, "input_ids"),
        (dict(input_ids=ids[0]), ValueError, "input_ids"),
        (dict(mm_token_type_ids=ids.float()), TypeError, "mm_token_type_ids"),
        (dict(input_ids=ids.bool()), TypeError, "input_ids"),  # bool positions: 0 or True
        (dict(mm_token_type_ids=ids.bool()), TypeError, "mm_token_type_ids"),
        (dict(mm_token_type_ids=ids[:, :2]), ValueError, "mm_token_type_ids"),
        (dict(image_grid_thw=torch.ones(1, 2, dtype=torch.long)), ValueError, "image_grid_thw"),
        (dict(video_grid_thw=torch.ones(3, dtype=torch.long)), ValueError, "video_grid_thw"),
        (dict(image_grid_thw=[[1, 2, 2]]), TypeError, "image_grid_thw"),
        # a bool grid reads as sizes 0 and 1 (a mask passed in the grid's place)
        (dict(image_grid_thw=torch.ones(1, 3, dtype=torch.bool)), TypeError, "image_grid_thw"),
        (dict(video_grid_thw=torch.ones(1, 3, dtype=torch.bool)), TypeError, "video_grid_thw"),
        (dict(attention_mask=torch.ones(1, 4)), ValueError, "attention_mask"),
        (dict(attention_mask=[[1, 1, 1]]), TypeError, "attention_mask"),
        (dict(spatial_merge_size=0), ValueError, "spatial_merge_size"),
        (dict(spatial_merge_size=2.0), TypeError, "spatial_merge_size"),
        (dict(truncate_seconds="yes"), TypeError, "truncate_seconds"),
        (
            dict(model_type="qwen2_5_vl", tokens_per_second=2, second_per_grid_ts=["1.5"]),
            TypeError,
            "second_per_grid_ts",
        ),
        (dict(model_type="qwen2_5_vl", tokens_per_second="2"), TypeError, "tokens_per_second"),
    ]
    for change, error, name in cases:
        args = dict(input_ids=ids, mm_token_type_ids=ids, **common) | change
        with pytest.raises(error, match=name):
            get_rope_index(**args)


def test_seconds_per_grid_one_per_video_run():
    """second_per_grid_ts holds one entry per video (transformers takes one per video run
    with next(iter(...)) and raises past the last): fewer entries than video runs, or a
    0-d tensor, raise naming it instead of reusing the last entry (or tokens_per_second)."""
    # two videos of 2 x 1 x 1 patches (merge 1): 2 tokens each, text between them
    kinds = torch.tensor([[0, 2, 2, 0, 2, 2, 0]])
    common = dict(model_type="qwen2_5_vl", spatial_merge_size=1, tokens_per_second=2,
                  video_grid_thw=torch.tensor([[2, 1, 1], [2, 1, 1]]))  # fmt: skip
    ids = torch.zeros_like(kinds)
    get_rope_index(ids, kinds, second_per_grid_ts=[0.5, 3.0], **common)  # one each: fine
    get_rope_index(ids, kinds, second_per_grid_ts=[0.5, 3.0, 1.0], **common)  # extra: unused
    for seconds in ([0.5], torch.tensor([0.5]), [], torch.tensor([])):
        with pytest.raises(RuntimeError, match="second_per_grid_ts"):
            get_rope_index(ids, kinds, second_per_grid_ts=seconds, **common)
    with pytest.raises(TypeError, match="second_per_grid_ts must be a 1-D"):
        get_rope_index(ids, kinds, second_per_grid_ts=torch.tensor(0.5), **common)
    # no video run: nothing is read, an empty table is fine
    text = torch.zeros(1, 3, dtype=torch.long)
    get_rope_index(text, text, model_type="qwen2_5_vl", spatial_merge_size=1,
                   tokens_per_second=2, second_per_grid_ts=[])  # fmt: skip


def test_positions_in_a_narrow_id_dtype():
    """Positions take input_ids' dtype (as in transformers): an int8 row of 128 tokens
    holds them (0 .. 127), one of 129 does not and raises rather than wrapping to -128."""
    common = dict(model_type="qwen2_vl", spatial_merge_size=2)
    for seq in (128, 129):
        ids = torch.zeros(1, seq, dtype=torch.int8)
        if seq == 128:
            positions, _ = get_rope_index(ids, ids, **common)
            assert positions.dtype == torch.int8
            assert torch.equal(positions[:, 0], torch.arange(seq).expand(3, seq).to(torch.int8))
        else:
            with pytest.raises(OverflowError, match="reach 128.*input_ids' dtype torch.int8"):
                get_rope_index(ids, ids, **common)


# ------------------------------------------------------------------------- rope_index_method


def test_method_follows_a_deep_copy(models):
    """The method is bound to its model: a deep copy calls it on the copy (its own config),
    and works after the original is gone."""
    import gc

    original = copy.deepcopy(models["qwen2_vl"])
    original.get_rope_index = rope_index_method(original)
    twin = copy.deepcopy(original)
    assert twin.get_rope_index.__self__ is twin
    original.config.vision_config.spatial_merge_size = 1
    twin.config.vision_config.spatial_merge_size = 2
    del original
    gc.collect()
    inputs = _random_batch(random.Random(4), "qwen2_vl", 2)
    inputs.pop("second_per_grid_ts", None)
    _assert_same(twin.get_rope_index(**inputs), _hf_with_dead_rows(twin, inputs))


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_method_signature_and_calls(models, model_type):
    model = models[model_type]
    method = rope_index_method(model)
    assert inspect.signature(method) == inspect.signature(model.get_rope_index)
    rng = random.Random(3)
    for _ in range(12):
        m, tps = _configure(model, rng)  # the method reads the config at each call
        inputs = _random_batch(rng, model_type, m)
        if inputs["attention_mask"] is not None and not inputs["attention_mask"].any(1).all():
            continue
        if model_type != "qwen2_5_vl":
            inputs.pop("second_per_grid_ts", None)
        want = _call_hf(model, inputs)
        _assert_same(method(**inputs), want)
        # as generation calls it: input_ids positional, everything else in model_kwargs
        extra = dict(pixel_values=None, use_cache=True)
        if model_type != "qwen2_5_vl":
            extra["second_per_grid_ts"] = torch.ones(1)  # absorbed by **kwargs, as in transformers
        model_kwargs = {k: v for k, v in inputs.items() if k != "input_ids"}
        _assert_same(method(inputs["input_ids"], **{**extra, **model_kwargs}), want)
        args = [inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"]]
        args += [inputs["video_grid_thw"]]
        if model_type == "qwen2_5_vl":
            args.append(inputs.get("second_per_grid_ts"))
        _assert_same(method(*args, inputs["attention_mask"]), want)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_method_inside_compute_3d_position_ids(models, model_type):
    model = models[model_type]
    rng = random.Random(11)
    for _ in range(6):
        m, _ = _configure(model, rng)
        inputs = _random_batch(rng, model_type, m)
        if inputs["image_grid_thw"] is None and inputs["video_grid_thw"] is None:
            continue
        if inputs["attention_mask"] is not None and not inputs["attention_mask"].any(1).all():
            continue
        # transformers 5.24 renamed past_key_values to cache (the old name still warns)
        params = inspect.signature(type(model).compute_3d_position_ids).parameters
        cache = "cache" if "cache" in params else "past_key_values"
        call = dict(inputs, inputs_embeds=None, **{cache: None})
        if model_type != "qwen2_5_vl":
            call.pop("second_per_grid_ts", None)
        results = []
        for patched in (False, True):
            model.rope_deltas = None
            if patched:
                model.get_rope_index = rope_index_method(model)
            try:
                results.append((model.compute_3d_position_ids(**call), model.rope_deltas))
            finally:
                model.__dict__.pop("get_rope_index", None)
        _assert_same(results[1], results[0])


def test_method_rejects_unsupported_models(models):
    with pytest.raises(TypeError, match="supports"):
        rope_index_method(torch.nn.Linear(2, 2))
    outer = transformers.Qwen2VLForConditionalGeneration(models["qwen2_vl"].config)
    with pytest.raises(TypeError, match=r"pass its \.model"):
        rope_index_method(outer)
    subclass = type("Custom", (type(models["qwen2_vl"]),), {"get_rope_index": lambda self: 0})
    with pytest.raises(TypeError, match="overrides"):
        rope_index_method(subclass.__new__(subclass))


# ------------------------------------------------------------------------------- host syncs


def _sync_case():
    rng = random.Random(5)
    return next(
        inputs
        for inputs in (_random_batch(rng, "qwen2_5_vl", 2) for _ in range(100))
        if inputs["video_grid_thw"] is not None
        and isinstance(inputs.get("second_per_grid_ts"), torch.Tensor)
    )


def test_no_host_sync_traces_as_one_graph():
    """fullgraph=True fails on any .item()/.tolist()/data-dependent shape: zero syncs."""
    torch._dynamo.reset()
    inputs = _sync_case()
    options = dict(
        model_type="qwen2_5_vl",
        spatial_merge_size=2,
        tokens_per_second=2,
        text_after_vision="max_plus_one",
        truncate_seconds=False,
    )
    compiled = torch.compile(get_rope_index, fullgraph=True, backend="eager")
    _assert_same(compiled(**inputs, **options), get_rope_index(**inputs, **options))
    # Qwen3-VL runs are single frames: its own batch (the Qwen2.5-VL one is invalid there)
    rng = random.Random(5)
    inputs = next(
        inputs
        for inputs in (_random_batch(rng, "qwen3_vl", 2) for _ in range(100))
        if inputs["video_grid_thw"] is not None
    )
    inputs.pop("second_per_grid_ts", None)
    options.update(model_type="qwen3_vl", text_after_vision="start_plus_max_hw")
    _assert_same(compiled(**inputs, **options), get_rope_index(**inputs, **options))


@pytest.mark.parametrize("seconds", ["tensor", "list"])
def test_traces_with_dynamic_numbers(seconds):
    """torch.compile(dynamic=True) makes number arguments symbolic: tokens_per_second (and
    a list's seconds) were checked with math.isfinite, which dynamo cannot trace for a
    symbolic number (fullgraph failed); comparisons check the same."""
    torch._dynamo.reset()
    inputs = _sync_case()
    if seconds == "list":
        inputs["second_per_grid_ts"] = inputs["second_per_grid_ts"].tolist()
    options = dict(model_type="qwen2_5_vl", spatial_merge_size=2, tokens_per_second=2)
    compiled = torch.compile(get_rope_index, fullgraph=True, backend="eager", dynamic=True)
    _assert_same(compiled(**inputs, **options), get_rope_index(**inputs, **options))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_host_sync_on_cuda():
    inputs = _sync_case()
    cuda_inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    for model_type in MODEL_TYPES:
        if model_type == "qwen3_vl":  # single-frame runs: a batch of its own
            rng = random.Random(5)
            inputs = next(i for i in (_random_batch(rng, model_type, 2) for _ in range(100))
                          if i["video_grid_thw"] is not None)  # fmt: skip
            inputs.pop("second_per_grid_ts", None)
            cuda_inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v
                           for k, v in inputs.items()}  # fmt: skip
        options = dict(model_type=model_type, spatial_merge_size=2, tokens_per_second=2)
        want = get_rope_index(**inputs, **options)  # probes eagerly, on CPU
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = get_rope_index(**cuda_inputs, **options)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        _assert_same([g.cpu() for g in got], want)


_TYPES = [0] * 5 + [1] * 16 + [0] * 3


@pytest.mark.parametrize(
    "types,grid,extra",
    [
        (_TYPES, [[1, 4, 4]], {}),  # 16 image tokens, a 4-token grid
        (_TYPES, [[1, 16, 16]], {}),  # a 64-token grid
        (_TYPES, None, {}),  # image tokens, no grid
        ([0] * 2 + [1] * 16 + [0] * 2 + [1] * 16, [[1, 8, 8]], {}),  # two images, one grid
        (_TYPES, [[1, -8, -8]], {}),  # negative grid
        ([0] * 5 + [3] * 16 + [0] * 3, [[1, 8, 8]], {}),  # unknown token type
        ([0] * 5 + [2] * 16 + [0] * 3, [[1, 8, 8]], {}),  # video tokens, no video grid
        (_TYPES, [[1, 8, 8]], dict(model_type="qwen2_5_vl", tokens_per_second=float("nan"))),
    ],
)
def test_inconsistent_values_raise(types, grid, extra):
    """Inputs transformers' loop refuses (a shape error, KeyError, StopIteration) raise here
    too, instead of positions from a clamped or made-up grid (checked on the device)."""
    mm = torch.tensor([types])
    kwargs = dict(model_type="qwen2_vl", spatial_merge_size=2)
    kwargs.update(extra)
    image_grid = None if grid is None else torch.tensor(grid)
    with pytest.raises((RuntimeError, ValueError), match="get_rope_index"):
        get_rope_index(torch.zeros_like(mm), mm, image_grid, **kwargs)


@pytest.mark.parametrize("seconds", [torch.tensor([float("nan")]), torch.tensor([-1.0]),
                                     [float("inf")], [-0.5]])  # fmt: skip
def test_seconds_per_grid_must_be_finite(seconds):
    """A NaN second_per_grid_ts made Qwen2.5-VL video positions huge negative integers;
    non-finite or negative seconds raise (a tensor's on the device, without a host sync)."""
    mm = torch.tensor([[0] * 3 + [2] * 16 + [0] * 2])
    with pytest.raises((RuntimeError, ValueError), match="second_per_grid_ts must be finite"):
        get_rope_index(torch.zeros_like(mm), mm, video_grid_thw=torch.tensor([[1, 8, 8]]),
                       model_type="qwen2_5_vl", spatial_merge_size=2, tokens_per_second=2,
                       second_per_grid_ts=seconds)  # fmt: skip

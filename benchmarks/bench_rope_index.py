r"""M-RoPE position ids: ``get_rope_index`` of transformers against vlmkernels'.

Input: B conversations, each (text 100 | image (1, 32, 32) | text 50 | image (1, 24, 40) |
text 30 | video (8, 24, 24) | text 60 - 3 r) tokens, row r shortened by 3 r tokens and
right-padded (attention_mask), merge size 2: 256 + 240 + 1152 vision tokens per row. Qwen3-VL
lays the video out as it does, one frame per run with 4 timestamp tokens before each.

Providers: ``transformers``, the installed model class's own method (a per-row Python loop
with host syncs), on a tiny model built from a config (its cost does not depend on the model
size); ``vlmkernels``, :func:`vlmkernels.get_rope_index` (batched torch ops, no host sync).
Forward only. Byte model: mm_token_type_ids (int32), attention_mask and the grids read
(input_ids only for its shape), the (3, B, S) positions (input_ids' int64) and the deltas
written; no FLOPs. Target (:mod:`benchmarks.targets`, issue 4): at
least 50x faster than transformers at B = 8 on a GPU.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping

import torch

from . import targets
from .harness import BuildArgs, OpSpec, Prepared, Provider, Results, RunConfig, Suite

MERGE = 2
IMAGES = ((1, 32, 32), (1, 24, 40))
VIDEO = (8, 24, 24)
MODEL_TYPES = ("qwen2_vl", "qwen3_vl")


def _vision_tokens(grid) -> int:
    t, h, w = grid
    return t * (h // MERGE) * (w // MERGE)


def make_batch(model_type: str, batch: int, device: torch.device):
    """(input_ids, mm_token_type_ids, attention_mask, image_grid_thw, video_grid_thw)."""
    rows = []
    for r in range(batch):
        parts = [(0, 100), (1, _vision_tokens(IMAGES[0])), (0, 50), (1, _vision_tokens(IMAGES[1]))]
        parts.append((0, 30))
        if model_type == "qwen3_vl":
            frame = _vision_tokens((1, *VIDEO[1:]))
            for _ in range(VIDEO[0]):
                parts += [(0, 4), (2, frame)]
        else:
            parts.append((2, _vision_tokens(VIDEO)))
        parts.append((0, 60 - 3 * r))
        rows.append(torch.cat([torch.full((n,), kind, dtype=torch.int32) for kind, n in parts]))
    length = max(len(r) for r in rows)
    types = torch.zeros(batch, length, dtype=torch.int32)
    mask = torch.zeros(batch, length, dtype=torch.long)
    for i, r in enumerate(rows):
        types[i, : len(r)] = r
        mask[i, : len(r)] = 1
    input_ids = torch.randint(10, 1000, (batch, length))
    images = torch.tensor([g for _ in range(batch) for g in IMAGES])
    videos = torch.tensor([VIDEO] * batch)
    return tuple(t.to(device) for t in (input_ids, types, mask, images, videos))


def _tiny_model(model_type: str):
    import transformers

    transformers.logging.set_verbosity_error()
    text = dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=1024, head_dim=8,
                rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                 "mrope_section": [1, 1, 2]})  # fmt: skip
    if model_type == "qwen3_vl":
        vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2,
                      out_hidden_size=16, deepstack_visual_indexes=[],
                      spatial_merge_size=MERGE)  # fmt: skip
        config = transformers.Qwen3VLConfig(vision_config=vision, text_config=text)
        return transformers.Qwen3VLModel(config).eval()
    vision = dict(depth=1, embed_dim=16, hidden_size=16, num_heads=2, mlp_ratio=1,
                  spatial_merge_size=MERGE)  # fmt: skip
    config = transformers.Qwen2VLConfig(vision_config=vision, text_config=text)
    return transformers.Qwen2VLModel(config).eval()


def _model_type(op: str) -> str:
    return op.removeprefix("get_rope_index_")


def build_transformers(args: BuildArgs) -> Prepared:
    model = _tiny_model(_model_type(args.op)).to(args.device)
    ids, types, mask, images, videos = make_batch(_model_type(args.op), args.shape["B"],
                                                  args.device)  # fmt: skip

    def fn():
        with torch.no_grad():
            positions, _ = model.get_rope_index(ids, types, images, videos, attention_mask=mask)
        return positions[0, 0, -1]

    return Prepared(fn, (), "the installed model class's get_rope_index")


def build_vlmkernels(args: BuildArgs) -> Prepared:
    from vlmkernels import get_rope_index

    model_type = _model_type(args.op)
    ids, types, mask, images, videos = make_batch(model_type, args.shape["B"], args.device)

    def fn():
        positions, _ = get_rope_index(ids, types, images, videos, attention_mask=mask,
                                      model_type=model_type, spatial_merge_size=MERGE)  # fmt: skip
        return positions[0, 0, -1]

    return Prepared(fn, (), "vlmkernels.get_rope_index (no host sync)")


def transformers_available(device: torch.device) -> str | None:
    if importlib.util.find_spec("transformers") is None:
        return "transformers is not installed"
    return None


def _bytes(shape: Mapping[str, int], op: str) -> float:
    """What get_rope_index moves: the token types, the mask and the grids read (input_ids
    only for their shape), the (3, B, S) positions in input_ids' dtype and the (B, 1)
    int64 deltas written."""
    ids, types, mask, images, videos = make_batch(_model_type(op), shape["B"], torch.device("cpu"))
    read = types.nbytes + mask.nbytes + images.nbytes + videos.nbytes
    return float(read + 3 * ids.nbytes + 8 * shape["B"])


def _op(name: str) -> OpSpec:
    return OpSpec(
        name,
        (
            Provider("vlmkernels", build_vlmkernels),
            Provider("transformers", build_transformers, available=transformers_available),
        ),
        lambda shape, mode: 0.0,
        lambda shape, mode, itemsize: _bytes(shape, name),
        launches_triton=False,  # batched torch ops
    )


OPS = tuple(_op(f"get_rope_index_{m}") for m in MODEL_TYPES)


def grid(profile: str) -> dict[str, list[int]]:
    return {"B": [1, 8]} if profile == "cpu" else {"B": [1, 8, 32]}


def summarize(results: Results, cfg: RunConfig) -> list[str]:
    """The targets of :mod:`benchmarks.targets` for this suite, as measured in this run."""
    found = targets.for_suite("rope_index")
    first = found[0]
    lines = [
        f"Target ({targets.shape_text(first.shape)}, forward): {first.provider} ms / "
        f"{first.baseline} ms {first.text} ({targets.issues(found)}, benchmarks/targets.py)"
    ]
    for t in found:
        verdict = t.evaluate(results, _dtype(cfg))
        if not verdict.measured:
            lines.append(f"  {t.op}: not measured ({verdict.reason})")
            continue
        verdict_text = "HIT" if verdict.hit else "MISS"
        lines.append(
            f"  {t.op}: {verdict.value:.3g}x (= {verdict.num.value:.4g} / "
            f"{verdict.den.value:.4g} ms) on {cfg.device.type}: "
            f"{verdict_text if cfg.device.type == 'cuda' else 'CPU, not the target'}"
        )
    return lines


def _dtype(cfg: RunConfig) -> str:
    return str(cfg.dtype).removeprefix("torch.")


SUITE = Suite(
    name="rope_index",
    ops=OPS,
    grid=grid,
    x_name="B",
    default_modes=("fwd",),
    summarize=summarize,
    modes=("fwd",),  # integer positions: nothing to differentiate
)

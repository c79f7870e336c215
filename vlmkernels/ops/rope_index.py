"""M-RoPE position ids of the Qwen-VL models, vectorised: `get_rope_index` without host syncs.

transformers' `Qwen2VLModel` / `Qwen2_5_VLModel` / `Qwen3VLModel.get_rope_index` loops over
the rows in Python, groups token types with `.tolist()` and builds every image with a meshgrid
after `.item()` calls. `get_rope_index` here computes the same tensors with a fixed number of
batched torch ops; `rope_index_method(model)` wraps it for one model instance.

Semantics
---------
Row b keeps its tokens with `attention_mask != 0` (all of them without a mask). They fall into
maximal runs of equal `mm_token_type_ids` (0 text, 1 image, 2 video). Run r starts at position
s_r, with s_0 = 0 and s_{r+1} = s_r + n_r:

- a text run of L tokens: token k gets (s + k, s + k, s + k); n = L.
- a vision run with grid (t, h, w) and merge size m, merged (t', h', w') = (t, h // m, w // m):
  token k = (i h' + j) w' + l gets (s + trunc(i tau), s + j, s + l), and
  - n = max(h', w')                              text_after_vision="start_plus_max_hw"
  - n = 1 + max(trunc((t' - 1) tau), h' - 1, w' - 1)  text_after_vision="max_plus_one"

  "start_plus_max_hw" is transformers 5.16.1, 5.17.0 and 5.23.0 (read; the change came with the
  mm_token_type_ids API of 5.3), "max_plus_one" (s_{r+1} = largest position so far + 1) is
  transformers <= 5.2 and vLLM. They differ only
  where trunc((t' - 1) tau) >= max(h', w'), i.e. Qwen2/2.5-VL videos with a long time span:
  the text after such a video starts inside the video's T range. In Qwen3-VL every valid run
  has t' = 1 (images have t = 1, videos are split into frames), so both rules agree there.
- tau = 1, except for Qwen2.5-VL videos: tau = tokens_per_second * second_per_grid_ts[v],
  multiplied in the dtype torch promotion gives (float32 for a float32 tensor) and then i * tau
  in that dtype, truncated by `.long()`, as transformers does. transformers 5.16-5.17 truncate
  the seconds first, tau = tokens_per_second * int(second_per_grid_ts[v])
  (`truncate_seconds=True`). Without `second_per_grid_ts`, tau = tokens_per_second.
- The image runs of the whole batch, in row-major order, take the rows of `image_grid_thw` in
  order; the video runs take `video_grid_thw` (and `second_per_grid_ts`) likewise. Qwen3-VL
  splits a video of t frames into t grids (1, h, w), one per run (frames are separated by
  timestamp text).

Padded tokens get position 0. rope_deltas[b] = (largest position in the row) + 1 - (number of
unpadded tokens), so decoding continues at `past_length + delta`. A row that is all padding gets
zeros and delta 0 (transformers raises there: `torch.cat` of an empty list).

Outputs: position_ids (3, B, S) in input_ids' dtype, rope_deltas (B, 1) int64 (float32 when
B == 0, as `torch.tensor([])` gives in transformers), both on input_ids' device.

Vectorisation
-------------
Per token j: the previous unpadded token (a cummax of indices) tells whether j starts a run;
a cummax of run-start indices gives each token its run start and a cumsum of the mask its
offset k in the run. A flattened cumsum of run starts numbers the image and video runs of the
batch, which index the grid tables (Qwen3-VL: a searchsorted over cumsum(t) maps frame
numbers to videos). Each text token contributes 1 and each vision run start its n to an
exclusive cumsum along the row, which is s_r at every run start.

Host syncs: none. Shapes depend only on input shapes, nothing is read back to the host, and
no op with a data-dependent output size is used (`torch.compile(fullgraph=True)` traces it).
Grid tables, masks or `second_per_grid_ts` held on another device than input_ids are copied
with `non_blocking=True`; a Python list of seconds becomes a CPU tensor first. Inputs that
transformers rejects (more vision runs than grids, a run whose length is not t h' w', types
other than 0/1/2) give unspecified values here instead of an error: checking would need a sync.

Default semantics
-----------------
`text_after_vision=None` and `truncate_seconds=None` mean "what the installed transformers
does". The first eager call per model type probes the installed class's own `get_rope_index`
once (cached) on an instance created without `__init__` carrying a default config: a Qwen2/2.5-VL
video (8, 4, 4) with merge size 2 (Qwen3-VL: an image (8, 4, 4)), seconds 1.5 at 2 tokens per
second, then one text token. The text token lands at 2 under "start_plus_max_hw" and at the
largest T + 1 otherwise; the largest T is 21 with float seconds and 14 when they are truncated.
Without transformers the default is the 5.23 behaviour ("start_plus_max_hw", float seconds).
Under `torch.compile`, make one eager call first or pass both options explicitly.
"""

from __future__ import annotations

import importlib
import inspect
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["get_rope_index", "installed_semantics", "rope_index_method", "TEXT_AFTER_VISION"]

MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
TEXT_AFTER_VISION = ("start_plus_max_hw", "max_plus_one")
_TEXT, _IMAGE, _VIDEO = 0, 1, 2

# class name -> (module, semantics). Qwen3VLMoeModel's get_rope_index is Qwen3VLModel's.
_SUPPORTED = {
    "Qwen2VLModel": ("transformers.models.qwen2_vl.modeling_qwen2_vl", "qwen2_vl"),
    "Qwen2_5_VLModel": ("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "qwen2_5_vl"),
    "Qwen3VLModel": ("transformers.models.qwen3_vl.modeling_qwen3_vl", "qwen3_vl"),
    "Qwen3VLMoeModel": ("transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe", "qwen3_vl"),
}
_CANONICAL = {
    "qwen2_vl": "Qwen2VLModel",
    "qwen2_5_vl": "Qwen2_5_VLModel",
    "qwen3_vl": "Qwen3VLModel",
}


# ----------------------------------------------------------------------------- the computation


def get_rope_index(
    input_ids: torch.Tensor,
    mm_token_type_ids: torch.Tensor,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    model_type: str,
    spatial_merge_size: int,
    second_per_grid_ts: torch.Tensor | list[float] | None = None,
    tokens_per_second: int | float | None = None,
    text_after_vision: str | None = None,
    truncate_seconds: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE position ids (3, B, S) and rope deltas (B, 1) of a batch; see the module docstring.

    `model_type` is "qwen2_vl", "qwen2_5_vl" or "qwen3_vl". `second_per_grid_ts` (one entry per
    video) and `tokens_per_second` are used by "qwen2_5_vl" only, which requires the latter.
    `text_after_vision` is "start_plus_max_hw" or "max_plus_one"; `truncate_seconds` selects
    int(second_per_grid_ts) (transformers 5.16-5.17). None (default): the installed
    transformers' behaviour. No host syncs; the inputs are not modified.
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    if mm_token_type_ids is None:
        raise ValueError("mm_token_type_ids is required (the processor returns it with input_ids)")
    if input_ids.dim() != 2 or mm_token_type_ids.shape != input_ids.shape:
        raise ValueError(
            f"input_ids and mm_token_type_ids must be (B, S) of one shape, got "
            f"{tuple(input_ids.shape)} and {tuple(mm_token_type_ids.shape)}"
        )
    if model_type == "qwen2_5_vl" and tokens_per_second is None:
        raise ValueError("model_type='qwen2_5_vl' needs tokens_per_second")
    text_after_vision, truncate_seconds = _resolve(
        text_after_vision, truncate_seconds, lambda: installed_semantics(model_type)
    )

    batch, seq = input_ids.shape
    device = input_ids.device
    if batch == 0 or seq == 0:
        deltas_dtype = torch.long if batch else torch.get_default_dtype()
        return (
            torch.zeros(3, batch, seq, dtype=input_ids.dtype, device=device),
            torch.zeros(batch, 1, dtype=deltas_dtype, device=device),
        )
    kinds = _on(mm_token_type_ids, device)
    if attention_mask is None:
        valid = torch.ones(batch, seq, dtype=torch.bool, device=device)
    else:
        valid = _on(attention_mask, device).bool()

    is_image = valid & (kinds == _IMAGE)
    is_video = valid & (kinds == _VIDEO)
    is_text = valid & ~(is_image | is_video)
    starts, start_idx, offset = _runs(kinds, valid)

    image_ord = _run_ordinal(starts & is_image, start_idx)
    video_ord = _run_ordinal(starts & is_video, start_idx)
    t, h, w = _token_grids(
        image_grid_thw, video_grid_thw, image_ord, video_ord, is_video, model_type
    )
    h, w = h // spatial_merge_size, w // spatial_merge_size
    tau = None
    if model_type == "qwen2_5_vl":
        tau = _video_time_scale(
            second_per_grid_ts, tokens_per_second, truncate_seconds, video_ord, device
        )

    frames_hw = (h * w).clamp(min=1)
    width = w.clamp(min=1)
    i, in_frame = offset // frames_hw, offset % frames_hw
    rel_t = _scaled_time(i, tau, is_video)
    rel_h, rel_w = in_frame // width, in_frame % width

    if text_after_vision == "start_plus_max_hw":
        vision_step = torch.maximum(h, w)
    else:
        last_t = _scaled_time(t - 1, tau, is_video).clamp(min=0)
        vision_step = torch.maximum(last_t, torch.maximum(h, w) - 1) + 1
    step = torch.where(is_text, 1, torch.where(starts & ~is_text, vision_step, 0))
    run_start_pos = (step.cumsum(1) - step).gather(1, start_idx)

    rel = torch.stack([rel_t, rel_h, rel_w]).where(~is_text, offset)
    positions = (run_start_pos + rel).where(valid, 0)
    deltas = _deltas(positions, valid)
    return positions.to(input_ids.dtype), deltas


def _on(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x.to(device, non_blocking=True)


def _runs(kinds: torch.Tensor, valid: torch.Tensor):
    """Per token: starts a run?, index of its run's first token, offset inside the run.

    Runs are maximal groups of equal type among the unpadded tokens of a row; padded tokens
    between two tokens of one type do not split their run.
    """
    batch, seq = kinds.shape
    idx = torch.arange(seq, device=kinds.device).expand(batch, seq)
    last_valid = torch.where(valid, idx, -1).cummax(dim=1).values
    prev_valid = F.pad(last_valid[:, :-1], (1, 0), value=-1)
    prev_kind = kinds.gather(1, prev_valid.clamp(min=0)).where(prev_valid >= 0, -1)
    starts = valid & (kinds != prev_kind)
    start_idx = torch.where(starts, idx, 0).cummax(dim=1).values
    rank = valid.long().cumsum(1)
    offset = rank - rank.gather(1, start_idx)
    return starts, start_idx, offset


def _run_ordinal(run_starts: torch.Tensor, start_idx: torch.Tensor) -> torch.Tensor:
    """Number of such runs before each token's run, counting the batch in row-major order."""
    ordinal = run_starts.flatten().long().cumsum(0).view_as(run_starts) - 1
    return ordinal.gather(1, start_idx)


def _rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table[index] along dim 0, with index clamped into range."""
    index = index.clamp(0, table.shape[0] - 1)
    return table.index_select(0, index.flatten()).view(*index.shape, *table.shape[1:])


def _grid_table(grid_thw: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    if grid_thw is None or grid_thw.shape[0] == 0:
        return torch.ones(1, 3, dtype=torch.long, device=device)
    return _on(grid_thw, device).long()


def _token_grids(image_grid_thw, video_grid_thw, image_ord, video_ord, is_video, model_type):
    """(t, h, w) of the grid each vision token belongs to, before merging."""
    device = image_ord.device
    images = _rows(_grid_table(image_grid_thw, device), image_ord)
    video_table = _grid_table(video_grid_thw, device)
    if model_type == "qwen3_vl":
        # video_ord counts frames; frame f belongs to the video v with cum_t[v-1] <= f < cum_t[v]
        cum_t = video_table[:, 0].cumsum(0)
        videos = _rows(video_table, torch.searchsorted(cum_t, video_ord, right=True))
        videos = torch.cat([torch.ones_like(videos[..., :1]), videos[..., 1:]], dim=-1)
    else:
        videos = _rows(video_table, video_ord)
    t, h, w = torch.where(is_video.unsqueeze(-1), videos, images).unbind(-1)
    return t, h, w


def _video_time_scale(second_per_grid_ts, tokens_per_second, truncate, video_ord, device):
    """tau per token (Qwen2.5-VL): a Python number, or a per-video table gathered by video_ord."""
    if second_per_grid_ts is None:
        return tokens_per_second
    seconds = second_per_grid_ts
    if not isinstance(seconds, torch.Tensor):
        seconds = [int(s) for s in seconds] if truncate else list(seconds)
        if all(isinstance(s, int) for s in seconds):
            seconds = torch.tensor(seconds, dtype=torch.long)
        else:
            # transformers multiplies Python floats in double, then i * tau in the default dtype
            scaled = [tokens_per_second * s for s in seconds]
            return _rows(
                _on(torch.tensor(scaled, dtype=torch.get_default_dtype()), device), video_ord
            )
    elif truncate and seconds.is_floating_point():
        seconds = seconds.long()
    if seconds.numel() == 0:
        return tokens_per_second
    return _rows(_on(tokens_per_second * seconds.reshape(-1), device), video_ord)


def _scaled_time(i: torch.Tensor, tau, is_video: torch.Tensor) -> torch.Tensor:
    """trunc(i * tau) for video tokens (transformers' `(arange(t) * interval).long()`), else i."""
    if tau is None:
        return i
    return torch.where(is_video, (i * tau).long(), i)


def _deltas(positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    largest = positions.where(valid, -1).amax(dim=(0, 2))
    return (largest + 1 - valid.sum(1)).unsqueeze(1)


# ------------------------------------------------------------------- installed-version detection

_DETECTED: dict[str, tuple[str, bool]] = {}
_PROBED: dict[type, tuple[str, bool]] = {}


def _resolve(text_after_vision, truncate_seconds, detect: Callable[[], tuple[str, bool]]):
    """Fill the options left None from `detect()`."""
    if text_after_vision is not None and text_after_vision not in TEXT_AFTER_VISION:
        raise ValueError(
            f"text_after_vision must be one of {TEXT_AFTER_VISION} or None, "
            f"got {text_after_vision!r}"
        )
    if text_after_vision is None or truncate_seconds is None:
        rule, truncate = detect()
        text_after_vision = rule if text_after_vision is None else text_after_vision
        truncate_seconds = truncate if truncate_seconds is None else truncate_seconds
    return text_after_vision, bool(truncate_seconds)


def installed_semantics(model_type: str) -> tuple[str, bool]:
    """(text_after_vision, truncate_seconds) of the installed transformers, probed once."""
    if model_type not in _DETECTED:
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
        cls = _transformers_class(_CANONICAL[model_type])
        _DETECTED[model_type] = ("start_plus_max_hw", False) if cls is None else _probed(cls)
    return _DETECTED[model_type]


def _probed(cls) -> tuple[str, bool]:
    if cls not in _PROBED:
        _PROBED[cls] = _probe(cls)
    return _PROBED[cls]


def _transformers_class(name: str):
    try:
        return getattr(importlib.import_module(_SUPPORTED[name][0]), name)
    except (ImportError, AttributeError):
        return None


def _probe(cls) -> tuple[str, bool]:
    """Run cls.get_rope_index on one vision run (8, 4, 4) followed by one text token."""
    model_type = _SUPPORTED[cls.__name__][1]
    if "mm_token_type_ids" not in inspect.signature(cls.get_rope_index).parameters:
        raise RuntimeError(
            f"the installed {cls.__name__}.get_rope_index predates mm_token_type_ids "
            "(transformers < 5.3): pass text_after_vision and truncate_seconds explicitly"
        )
    config = cls.config_class()
    config.vision_config.spatial_merge_size = 2
    config.vision_config.tokens_per_second = 2
    stub = cls.__new__(cls)  # an nn.Module without __init__: only `config` is needed
    stub.__dict__["config"] = config
    kind = _IMAGE if model_type == "qwen3_vl" else _VIDEO
    grid = {"image_grid_thw" if kind == _IMAGE else "video_grid_thw": torch.tensor([[8, 4, 4]])}
    n_vision = 8 * 2 * 2
    kinds = torch.tensor([[kind] * n_vision + [_TEXT]])
    try:
        positions, _ = cls.get_rope_index(
            stub,
            torch.zeros_like(kinds),
            mm_token_type_ids=kinds,
            second_per_grid_ts=torch.tensor([1.5]),
            **grid,
        )
    except Exception as e:
        raise RuntimeError(
            f"could not probe the installed {cls.__name__}.get_rope_index: pass "
            "text_after_vision and truncate_seconds explicitly"
        ) from e
    largest_t = int(positions[0, 0, :n_vision].max())
    text_pos = int(positions[0, 0, -1])
    if text_pos == 2:
        rule = "start_plus_max_hw"
    elif text_pos == largest_t + 1:
        rule = "max_plus_one"
    else:
        raise RuntimeError(f"unrecognised {cls.__name__}.get_rope_index semantics")
    return rule, model_type == "qwen2_5_vl" and largest_t == 14


# ------------------------------------------------------------------------ per-model method


def rope_index_method(
    model, *, text_after_vision: str | None = None, truncate_seconds: bool | None = None
) -> Callable:
    """A drop-in for `model.get_rope_index`, to install with `model.get_rope_index = ...`.

    `model` is the inner model holding `get_rope_index`: an instance of `Qwen2VLModel`,
    `Qwen2_5_VLModel` or `Qwen3VLModel` (same method and signature in transformers 5.16.1, 5.17.0
    and 5.23.0), or `Qwen3VLMoeModel` (whose method is Qwen3VLModel's in 5.23.0), or a subclass
    that does not override the method. `*ForConditionalGeneration` holds it as `.model`.
    `Qwen*VLModel.compute_3d_position_ids` calls `self.get_rope_index` and
    `*ForConditionalGeneration._prepare_position_ids_for_generation` calls
    `self.model.get_rope_index`, so the instance attribute takes over in both. Another signature
    (transformers < 5.3 has no mm_token_type_ids) raises TypeError.

    The callable has the installed method's signature (`inspect.signature` equal, `**kwargs`
    absorbing what generation passes), reads `config.vision_config.spatial_merge_size` (and
    `tokens_per_second`) from the model at each call as transformers does, and holds the model
    by a weak reference. Semantics default to the installed transformers' (probed once per class).
    """
    cls = _supported_class(model)
    model_type = _SUPPORTED[cls.__name__][1]
    signature = _checked_signature(cls, model_type)
    rule, truncate = _resolve(text_after_vision, truncate_seconds, lambda: _probed(cls))
    model_ref = weakref.ref(model)

    def options(second_per_grid_ts):
        vision_config = model_ref().config.vision_config
        return dict(
            model_type=model_type,
            spatial_merge_size=vision_config.spatial_merge_size,
            second_per_grid_ts=second_per_grid_ts,
            tokens_per_second=getattr(vision_config, "tokens_per_second", None),
            text_after_vision=rule,
            truncate_seconds=truncate,
        )

    if model_type == "qwen2_5_vl":

        def method(
            input_ids,
            mm_token_type_ids,
            image_grid_thw=None,
            video_grid_thw=None,
            second_per_grid_ts=None,
            attention_mask=None,
            **kwargs,
        ):
            return get_rope_index(
                input_ids,
                mm_token_type_ids,
                image_grid_thw,
                video_grid_thw,
                attention_mask,
                **options(second_per_grid_ts),
            )

    else:

        def method(
            input_ids,
            mm_token_type_ids,
            image_grid_thw=None,
            video_grid_thw=None,
            attention_mask=None,
            **kwargs,
        ):
            return get_rope_index(
                input_ids,
                mm_token_type_ids,
                image_grid_thw,
                video_grid_thw,
                attention_mask,
                **options(None),
            )

    method.__signature__ = signature
    method.__name__ = method.__qualname__ = "get_rope_index"
    method.__doc__ = f"vlmkernels' vectorised {cls.__name__}.get_rope_index ({rule})."
    return method


def _supported_class(model):
    for cls in type(model).__mro__:
        if cls.__name__ in _SUPPORTED and cls.__module__ == _SUPPORTED[cls.__name__][0]:
            if type(model).get_rope_index is not cls.get_rope_index:
                raise TypeError(
                    f"{type(model).__name__} overrides {cls.__name__}.get_rope_index; "
                    "its semantics are unknown"
                )
            return cls
    inner = getattr(model, "model", None)
    hint = (
        f" (pass its .model, a {type(inner).__name__})"
        if inner is not None and hasattr(type(inner), "get_rope_index")
        else ""
    )
    raise TypeError(
        f"rope_index_method supports {', '.join(_SUPPORTED)} instances, "
        f"got {type(model).__name__}{hint}"
    )


def _checked_signature(cls, model_type: str) -> inspect.Signature:
    """The installed signature without `self`, checked against the one `method` implements."""
    installed = inspect.signature(cls.get_rope_index)
    params = list(installed.parameters.values())[1:]
    expected = ["input_ids", "mm_token_type_ids", "image_grid_thw", "video_grid_thw"]
    expected += ["second_per_grid_ts"] if model_type == "qwen2_5_vl" else []
    expected += ["attention_mask", "kwargs"]
    shape = [(p.name, p.kind, p.default) for p in params]
    want = [
        (name, inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.empty if i < 2 else None)
        for i, name in enumerate(expected[:-1])
    ] + [("kwargs", inspect.Parameter.VAR_KEYWORD, inspect.Parameter.empty)]
    if shape != want:
        raise TypeError(
            f"unsupported {cls.__name__}.get_rope_index signature {installed}; "
            f"expected parameters {expected}"
        )
    return installed.replace(parameters=params)

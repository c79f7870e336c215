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

  "start_plus_max_hw" is transformers 5.16.1 to 5.25.0 (read; the change came with the
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

Host syncs: none for int32 and int64 input_ids. Shapes depend only on input shapes, nothing
is read back to the host, and no op with a data-dependent output size is used
(`torch.compile(fullgraph=True)` traces it); narrower input_ids (int8, int16, uint8: the
positions' dtype) cost one host read of the largest position, which raises OverflowError
where it does not fit. Grid tables, masks or `second_per_grid_ts` held on another device than
input_ids are copied with `non_blocking=True`; a Python list of seconds becomes a CPU tensor
first. Inputs that transformers rejects (token types other than 0/1/2, a vision run without a
grid row, a grid that is not positive, a run whose length is not t h' w') raise as they do
there, checked on the device with `torch._assert_async` (no sync: RuntimeError at once on the
CPU, a device-side assert on a GPU).

Defaults
--------
`text_after_vision="start_plus_max_hw"` and `truncate_seconds=False`: what transformers
5.18 and newer compute (5.16-5.17 truncate the seconds). The defaults are fixed, whatever
transformers is installed; the patching layer
(`vlmkernels.integrations.transformers.rope_index_method`) probes the installed model class
and passes what it found.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from ...core.checks import check_int, to_device

__all__ = ["get_rope_index", "MODEL_TYPES", "TEXT_AFTER_VISION"]

MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
TEXT_AFTER_VISION = ("start_plus_max_hw", "max_plus_one")
_TEXT, _IMAGE, _VIDEO = 0, 1, 2


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
    text_after_vision: str = "start_plus_max_hw",
    truncate_seconds: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE position ids (3, B, S) and rope deltas (B, 1) of a batch; see the module docstring.

    `model_type` is "qwen2_vl", "qwen2_5_vl" or "qwen3_vl". `second_per_grid_ts` (one entry per
    video) and `tokens_per_second` are used by "qwen2_5_vl" only, which requires the latter.
    `text_after_vision` is "start_plus_max_hw" (transformers >= 5.3, the default) or
    "max_plus_one" (transformers <= 5.2, vLLM); `truncate_seconds=True` takes
    int(second_per_grid_ts) as transformers 5.16-5.17 do. No host syncs (but for input_ids
    narrower than int32: see Returns); the inputs are not modified.

    Args:
        input_ids: (B, S) integer token ids; only their shape, dtype and device are read.
        mm_token_type_ids: (B, S) integers, 0 text, 1 image, 2 video (transformers'
            processor output of the same name).
        image_grid_thw, video_grid_thw: (number of images / videos in the batch, 3) integer
            (t, h, w) patch grids before merging, in the order their runs appear row by row.
        attention_mask: (B, S), nonzero at the tokens kept; None keeps every token.
        spatial_merge_size: m, the side of the patch square the merger folds into a token.
        second_per_grid_ts: (number of videos,) seconds per temporal grid step (Qwen2.5-VL).
        tokens_per_second: Qwen2.5-VL's ``vision_config.tokens_per_second``.

    Returns:
        position_ids (3, B, S) in input_ids' dtype and rope_deltas (B, 1) int64. Positions
        that input_ids' dtype cannot hold (int8 ids past position 127) raise OverflowError.
    """
    _check_arguments(
        input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw, attention_mask,
        model_type, spatial_merge_size, second_per_grid_ts, tokens_per_second,
        text_after_vision, truncate_seconds,
    )  # fmt: skip

    batch, seq = input_ids.shape
    device = input_ids.device
    if batch == 0 or seq == 0:
        deltas_dtype = torch.long if batch else torch.get_default_dtype()
        return (
            torch.zeros(3, batch, seq, dtype=input_ids.dtype, device=device),
            torch.zeros(batch, 1, dtype=deltas_dtype, device=device),
        )
    kinds = _on(mm_token_type_ids, device, "mm_token_type_ids")
    if attention_mask is None:
        valid = torch.ones(batch, seq, dtype=torch.bool, device=device)
    else:
        valid = _on(attention_mask, device, "attention_mask").bool()

    is_image = valid & (kinds == _IMAGE)
    is_video = valid & (kinds == _VIDEO)
    is_text = valid & ~(is_image | is_video)
    starts, start_idx, offset = _runs(kinds, valid)

    image_ord = _run_ordinal(starts & is_image, start_idx)
    video_ord = _run_ordinal(starts & is_video, start_idx)
    (t, h, w), (n_images, n_videos) = _token_grids(
        image_grid_thw, video_grid_thw, image_ord, video_ord, is_video, model_type
    )
    _check_values(kinds, valid, start_idx, image_ord, video_ord, is_image, is_video, t, h, w,
                  n_images, n_videos, spatial_merge_size)  # fmt: skip
    h, w = h // spatial_merge_size, w // spatial_merge_size
    tau = None
    if model_type == "qwen2_5_vl":
        tau = _video_time_scale(
            second_per_grid_ts, tokens_per_second, truncate_seconds, video_ord, is_video, device
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
    if input_ids.dtype not in (torch.int64, torch.int32):
        _check_fits(positions, input_ids.dtype)
    return positions.to(input_ids.dtype), deltas


def _check_values(kinds, valid, start_idx, image_ord, video_ord, is_image, is_video, t, h, w,
                  n_images, n_videos, m) -> None:  # fmt: skip
    """The values transformers' loop would trip over, checked on the device without a host
    synchronisation (``torch._assert_async``: raises at once on the CPU, at the next
    synchronisation on a GPU, where a failure is a device-side assert): token types outside
    {0, 1, 2}; a vision run without a grid (no grid table, or more runs than grid rows);
    grids that are not positive; a run whose length is not its grid's t h w / m^2 tokens
    (one frame, h w / m^2, per Qwen3-VL video run). transformers' loop raises on each;
    without these checks the positions came from a clamped or made-up grid."""
    op = "get_rope_index"
    vision = is_image | is_video
    bad_kind = valid & ((kinds < _TEXT) | (kinds > _VIDEO))
    torch._assert_async(~bad_kind.any(), f"{op}: mm_token_type_ids must be 0 (text), 1 (image) "
                        "or 2 (video) at every unpadded token")  # fmt: skip
    missing = (is_image & (image_ord >= n_images)) | (is_video & (video_ord >= n_videos))
    torch._assert_async(~missing.any(), f"{op}: more image / video runs in "
                        "mm_token_type_ids than rows of image_grid_thw / video_grid_thw (frames "
                        "for qwen3_vl)")  # fmt: skip
    bad_grid = vision & ((t < 1) | (h < 1) | (w < 1))
    torch._assert_async(~bad_grid.any(), f"{op}: grid (t, h, w) rows must be positive")
    run_len = torch.zeros_like(start_idx).scatter_add_(1, start_idx, valid.long())
    run_len = run_len.gather(1, start_idx)
    wrong = vision & (run_len != t * (h // m) * (w // m))
    torch._assert_async(~wrong.any(), f"{op}: an image / video run's token count differs from "
                        "its grid's t * h * w / spatial_merge_size^2")  # fmt: skip


def _check_fits(positions: torch.Tensor, dtype: torch.dtype) -> None:
    """Positions in a narrow id dtype (int8, uint8, int16, ...) would wrap around: refused
    (a host read of the largest, only for such dtypes)."""
    largest = int(positions.max())
    if largest > torch.iinfo(dtype).max:
        raise OverflowError(
            f"get_rope_index: the position ids reach {largest}, which input_ids' dtype "
            f"{dtype} (the positions' dtype) cannot hold; pass int32 or int64 input_ids"
        )


def _check_arguments(input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw,
                     attention_mask, model_type, spatial_merge_size, second_per_grid_ts,
                     tokens_per_second, text_after_vision, truncate_seconds):  # fmt: skip
    """Each error names the argument and what was expected (shapes and types only: the
    values stay on the device)."""
    op = "get_rope_index"
    if model_type not in MODEL_TYPES:
        raise ValueError(f"{op}: model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    if text_after_vision not in TEXT_AFTER_VISION:
        raise ValueError(
            f"{op}: text_after_vision must be one of {TEXT_AFTER_VISION}, got {text_after_vision!r}"
        )
    if not isinstance(truncate_seconds, bool):
        raise TypeError(f"{op}: truncate_seconds must be a bool, got {truncate_seconds!r}")
    spatial_merge_size = check_int(op, "spatial_merge_size", spatial_merge_size, 1)
    if mm_token_type_ids is None:
        raise ValueError(
            f"{op}: mm_token_type_ids is required (the processor returns it with input_ids)"
        )
    for name, t in (("input_ids", input_ids), ("mm_token_type_ids", mm_token_type_ids)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a (B, S) tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{op}: {name} must be (B, S), got shape {tuple(t.shape)}")
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"{op}: {name} must be an integer tensor, got {t.dtype}")
    if mm_token_type_ids.shape != input_ids.shape:
        raise ValueError(
            f"{op}: mm_token_type_ids must have input_ids' shape {tuple(input_ids.shape)}, "
            f"got {tuple(mm_token_type_ids.shape)}"
        )
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(
                f"{op}: attention_mask must be a (B, S) tensor or None, got "
                f"{type(attention_mask).__name__}"
            )
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"{op}: attention_mask must have input_ids' shape {tuple(input_ids.shape)}, "
                f"got {tuple(attention_mask.shape)}"
            )
    for name, grid in (("image_grid_thw", image_grid_thw), ("video_grid_thw", video_grid_thw)):
        if grid is None:
            continue
        if not isinstance(grid, torch.Tensor):
            raise TypeError(
                f"{op}: {name} must be an (N, 3) tensor or None, got {type(grid).__name__}"
            )
        if grid.dim() != 2 or grid.shape[1] != 3:
            raise ValueError(
                f"{op}: {name} must be (N, 3) rows of (t, h, w), got shape {tuple(grid.shape)}"
            )
        if grid.dtype.is_floating_point or grid.dtype.is_complex or grid.dtype == torch.bool:
            raise TypeError(f"{op}: {name} must be an integer tensor, got {grid.dtype}")
    if model_type == "qwen2_5_vl":
        if tokens_per_second is None:
            raise ValueError(f"{op}: model_type='qwen2_5_vl' needs tokens_per_second")
        if isinstance(tokens_per_second, bool) or not isinstance(tokens_per_second, numbers.Real):
            raise TypeError(f"{op}: tokens_per_second must be a number, got {tokens_per_second!r}")
        # comparisons, not math.isfinite (NaN fails both): torch.compile traces them for a
        # symbolic number (dynamic=True makes a number argument one)
        if not 0 <= tokens_per_second < math.inf:
            raise ValueError(f"{op}: tokens_per_second must be finite and >= 0, got "
                             f"{tokens_per_second!r}")  # fmt: skip
    seconds = second_per_grid_ts
    if seconds is not None:
        if isinstance(seconds, torch.Tensor):
            if seconds.dim() != 1 or seconds.dtype.is_complex or seconds.dtype == torch.bool:
                raise TypeError(
                    f"{op}: second_per_grid_ts must be a 1-D real tensor (one entry per "
                    f"video), got {seconds.dtype} of shape {tuple(seconds.shape)}"
                )
        elif not isinstance(seconds, (list, tuple)) or not all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) for v in seconds
        ):
            raise TypeError(
                f"{op}: second_per_grid_ts must be a tensor or a list of numbers (one per "
                f"video), got {seconds!r}"
            )
        elif not all(0 <= v < math.inf for v in seconds):
            raise ValueError(f"{op}: second_per_grid_ts must be finite and >= 0, got "
                             f"{list(seconds)}")  # fmt: skip


def _on(x: torch.Tensor, device: torch.device, name: str = "a computed table") -> torch.Tensor:
    return to_device("get_rope_index", name, x, device)  # non-blocking to a GPU only


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


def _grid_table(grid_thw: torch.Tensor | None, device: torch.device, name: str) -> torch.Tensor:
    if grid_thw is None or grid_thw.shape[0] == 0:
        return torch.ones(1, 3, dtype=torch.long, device=device)
    return _on(grid_thw, device, name).long()


def _token_grids(image_grid_thw, video_grid_thw, image_ord, video_ord, is_video, model_type):
    """((t, h, w) of the grid each vision token belongs to, before merging; (image runs,
    video runs) the grid tables serve: their rows, or frames for qwen3_vl, a device scalar
    then). ``_rows`` clamps past the last row, so more runs than that is checked apart."""
    device = image_ord.device
    images = _rows(_grid_table(image_grid_thw, device, "image_grid_thw"), image_ord)
    video_table = _grid_table(video_grid_thw, device, "video_grid_thw")
    n_images = 0 if image_grid_thw is None else image_grid_thw.shape[0]
    n_videos = 0 if video_grid_thw is None else video_grid_thw.shape[0]
    if model_type == "qwen3_vl":
        # video_ord counts frames; frame f belongs to the video v with cum_t[v-1] <= f < cum_t[v]
        cum_t = video_table[:, 0].cumsum(0)
        n_videos = cum_t[-1] if n_videos else 0  # one run per frame
        videos = _rows(video_table, torch.searchsorted(cum_t, video_ord, right=True))
        videos = torch.cat([torch.ones_like(videos[..., :1]), videos[..., 1:]], dim=-1)
    else:
        videos = _rows(video_table, video_ord)
    t, h, w = torch.where(is_video.unsqueeze(-1), videos, images).unbind(-1)
    return (t, h, w), (n_images, n_videos)


def _video_time_scale(second_per_grid_ts, tokens_per_second, truncate, video_ord, is_video,
                      device):  # fmt: skip
    """tau per token (Qwen2.5-VL): a Python number, or a per-video table gathered by video_ord.
    The table has an entry for every video run (checked on the device: transformers takes
    one per run with ``next`` and raises past the last; ``_rows`` would clamp to it)."""
    if second_per_grid_ts is None:
        return tokens_per_second
    seconds = second_per_grid_ts
    count = len(seconds)  # a list's length or a 1-D tensor's (a shape: no host sync)
    torch._assert_async((~is_video | (video_ord < count)).all(),
                        "get_rope_index: second_per_grid_ts has fewer entries than there are "
                        "video runs (one per video)")  # fmt: skip
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
    else:  # on the device: no host sync (a NaN became a huge negative position)
        ok = (torch.isfinite(seconds) & (seconds >= 0)).all()
        torch._assert_async(ok, "get_rope_index: second_per_grid_ts must be finite and >= 0")
        if truncate and seconds.is_floating_point():
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

"""The public token-compression functions: argument checks that name the argument at fault,
raised before any launch, then the ops (:mod:`.ops`)."""

from __future__ import annotations

import math
import numbers

import torch

from ...core.checks import FLOAT_DTYPES, _dtype_names, check_bool, check_int, in_choices
from . import ops
from .kernels import AVG, BILINEAR

__all__ = ["pool_tokens", "select_tokens", "tome_merge"]

_functorch_active = torch._C._are_functorch_transforms_active

POOL_KINDS = {"avg2x2": AVG, "avg": AVG, "bilinear": BILINEAR}


def _check_tokens(op: str, t, name: str) -> None:
    """A (B, N, C) floating tensor with N, C > 0."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{op}: {name} must be a floating tensor ({_dtype_names(FLOAT_DTYPES)}), got {t.dtype}"
        )
    if t.dim() != 3:
        raise ValueError(
            f"{op}: {name} must be 3-D (batch, tokens, channels), got shape {tuple(t.shape)}"
        )
    if t.shape[1] == 0 or t.shape[2] == 0:
        raise ValueError(f"{op}: {name} has no tokens or no channels: shape {tuple(t.shape)}")


def _check_same_device(op: str, a: torch.Tensor, b: torch.Tensor, names) -> None:
    if a.device != b.device:
        raise ValueError(
            f"{op}: {names[0]} and {names[1]} must be on the same device, got {a.device} and "
            f"{b.device}"
        )


# ------------------------------------------------------------------------------ selection


def select_tokens(x: torch.Tensor, scores: torch.Tensor, keep: int):
    """The ``keep`` highest-scoring tokens of each sample, in their original order.

    Args:
        x: (B, N, C) tokens (float16, bfloat16, float32, float64).
        scores: (B, N) real scores on x's device (e.g. the attention mass each token
            receives).
        keep: tokens kept per sample, 1 <= keep <= N.

    Returns:
        (selected (B, keep, C), indices (B, keep) int64): ``indices[b]`` is increasing and
        ``selected[b, k] = x[b, indices[b, k]]``.

    Ties are broken deterministically: among equal scores the token with the lower index
    ranks first (a stable descending sort), so with ties at the cut the lower indices are
    kept. NaN scores rank above every number (as ``torch.sort`` orders them).

    Gradients: x receives the gradient of the selected rows (zeros for the dropped tokens).
    ``scores`` receives none: the selection is piecewise constant in the scores, as
    ``torch.topk``'s indices are; if ``scores`` requires grad its ``.grad`` stays None.
    """
    op = "select_tokens"
    _check_tokens(op, x, "x")
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"{op}: scores must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dtype.is_complex or scores.dtype == torch.bool:
        raise TypeError(f"{op}: scores must be a real tensor, got {scores.dtype}")
    if tuple(scores.shape) != tuple(x.shape[:2]):
        raise ValueError(
            f"{op}: scores must have shape (batch, tokens) = {tuple(x.shape[:2])} to match x, "
            f"got {tuple(scores.shape)}"
        )
    _check_same_device(op, x, scores, ("x", "scores"))
    keep = check_int(op, "keep", keep)
    N = x.shape[1]
    if not 1 <= keep <= N:
        raise ValueError(f"{op}: keep must be in [1, {N}] (the number of tokens), got {keep}")
    order = torch.sort(scores.detach(), dim=1, descending=True, stable=True).indices
    index = order[:, :keep].sort(dim=1).values
    # the inverse map the backward gathers by: made here where a gradient may be asked for
    # (under a functorch transform x can read requires_grad=False while what it wraps
    # requires one: vmap inside autograd); else index stands in, and the op's autograd
    # makes it if it records the call after all (an exported graph traced without
    # gradients, run with them)
    grads = torch.is_grad_enabled() and (x.requires_grad or _functorch_active())
    inverse = ops.inverse_rows(index, N) if grads else index
    return ops.select_rows(x, index, inverse), index


# ------------------------------------------------------------------------------------ ToMe


def tome_merge(
    x: torch.Tensor,
    metric: torch.Tensor,
    r: int,
    *,
    size: torch.Tensor | None = None,
    class_token: bool = False,
):
    """ToMe's bipartite soft matching and size-weighted merge (Bolya et al., ICLR 2023).

    The tokens are split alternately into A (positions 0, 2, 4, ...) and B (1, 3, 5, ...).
    With m the metric rows normalised to unit length, each A token a gets its best match
    ``j(a) = argmax_j <m_a, m_b_j>`` (cosine score ``s(a)``; the class token, position 0,
    gets ``s = -inf`` when ``class_token``). The r A tokens with the highest ``s`` are
    merged into their matches; with sizes s_i (1 each, or ``size``) every output token is
    ``sum_i s_i x_i / sum_i s_i`` over the tokens it absorbs, and its size is the sum. The
    score matrix is never stored: a Triton kernel keeps each A row's running max and argmax
    over B column tiles.

    Args:
        x: (B, N, C) tokens to merge.
        metric: (B, N, Cm) the similarity features (ToMe: the keys averaged over heads).
        r: tokens to remove, 0 <= r <= (N - class_token) // 2.
        size: (B, N, 1) the tokens' sizes (floating), or None for ones.
        class_token: protect the token at position 0 (it is never merged).

    Returns:
        (merged (B, N - r, C), sizes (B, N - r, 1) in size's dtype (x's without ``size``),
        source (B, N) int64: the output row each input token went into). The output order is
        ToMe's: the unmerged A tokens in decreasing order of their best score (by position
        when ``class_token``, which keeps the class token first), then the B tokens in order.

    Ties, deterministic: among equal scores the lower B index is the match, and among
    equal best scores the lower A index is merged first (ToMe's ``argsort`` leaves both
    unspecified), except the class token, which ranks last even among other -inf scores.
    Equal means equal as computed: the Triton kernel takes the cosine as the dot product
    over the two norms, not of the normalised rows, so scores that are equal only after
    ToMe's normalisation (parallel rows, e.g. a 1-channel metric or a row and its double)
    can come out an ulp apart there and be ordered by that ulp.
    ``r = 0`` merges nothing and returns x itself, the sizes (ones if None) and the identity
    map, as ToMe's ``do_nothing`` does. A metric row of norm 0 (or with a
    non-finite norm) has no cosine similarity (ToMe would compute NaN scores and match it
    arbitrarily): its scores are -inf, so such a token ranks last among the A tokens, like the
    class token, and is never a B token's match while any valid pair exists (a row of -inf
    scores matches B token 0).

    Gradients: x through the weighted mean; ``size`` (if it requires grad) through the
    weights and the summed sizes. ``metric`` gets none: the matching is piecewise constant
    in it (ToMe computes it under ``torch.no_grad``); its ``.grad`` stays None.
    """
    op = "tome_merge"
    _check_tokens(op, x, "x")
    _check_tokens(op, metric, "metric")
    if tuple(metric.shape[:2]) != tuple(x.shape[:2]):
        raise ValueError(
            f"{op}: metric must have x's (batch, tokens) = {tuple(x.shape[:2])}, got "
            f"{tuple(metric.shape[:2])}"
        )
    _check_same_device(op, x, metric, ("x", "metric"))
    class_token = check_bool(op, "class_token", class_token)
    r = check_int(op, "r", r)
    B, N, _ = x.shape
    protected = int(class_token)
    limit = (N - protected) // 2
    if not 0 <= r <= limit:
        what = " non-class" if class_token else ""
        raise ValueError(
            f"{op}: r must be in [0, {limit}] (at most half of the {N - protected}{what} "
            f"tokens), got {r}"
        )
    if size is not None:
        if not isinstance(size, torch.Tensor):
            raise TypeError(f"{op}: size must be a torch.Tensor or None, got {type(size).__name__}")
        if size.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: size must be a floating tensor, got {size.dtype}")
        if tuple(size.shape) != (B, N, 1):
            raise ValueError(
                f"{op}: size must have shape (batch, tokens, 1) = {(B, N, 1)}, got "
                f"{tuple(size.shape)}"
            )
        _check_same_device(op, x, size, ("x", "size"))
    if r == 0:
        sizes = size if size is not None else x.new_ones((B, N, 1))
        return x, sizes, torch.arange(N, device=x.device).expand(B, N).contiguous()
    best, arg = ops.tome_match(metric.detach(), class_token)
    source, members, offsets = ops.tome_plan(best, arg, N, r, class_token)
    merged, sizes = ops.tome_merge(x, size, source, members, offsets)
    return merged, sizes, source


# ---------------------------------------------------------------------------------- pooling


def _check_pair(op: str, name: str, value) -> tuple[int, int]:
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value)
        or not all(v > 0 for v in value)
    ):
        raise ValueError(f"{op}: {name} must be a pair of positive ints (h, w), got {value!r}")
    return int(value[0]), int(value[1])


def pool_tokens(x: torch.Tensor, grid, kind: str = "avg2x2", size=None) -> torch.Tensor:
    """Pools a row-major (H, W) grid of tokens.

    Args:
        x: (B, H W, C) tokens, token ``y W + x`` at row y, column x.
        grid: (H, W).
        kind: ``"avg2x2"``: the mean of each 2 x 2 block (H and W even), output (H/2, W/2);
            ``"avg"``: the mean of each (H/h) x (W/w) block, output ``size`` (h, w), which
            must divide (H, W): ``nn.AvgPool2d(kernel_size=stride=(H/h, W/w))``, as Gemma 3's
            projector pools its 64 x 64 patches to 16 x 16 (the sum runs in fp32 in
            AvgPool2d's order, then one correctly rounded division: bitwise aten's on the
            Triton path); ``"bilinear"``: LLaVA-OneVision's ``apply_pooling``,
            ``F.interpolate(mode="bilinear", align_corners=False)`` to ``size`` (default
            (ceil(H/2), ceil(W/2)), as LLaVA-OneVision): with scale = H / h,
            sy = max((oy + 0.5) scale - 0.5, 0), y0 = floor(sy), y1 = min(y0 + 1, H - 1) and
            weights 1 - (sy - y0), sy - y0 (the columns likewise). On even grids
            ``"avg2x2"`` and ``"bilinear"`` agree.
        size: (h, w) output grid: required by ``"avg"``, optional for ``"bilinear"``;
            ``"avg2x2"`` takes None or (H/2, W/2).

    Returns:
        (B, h w, C), row-major. Differentiable in x: the adjoint, computed as a gather per
        input token (deterministic, no atomics) on the Triton path.
    """
    op = "pool_tokens"
    _check_tokens(op, x, "x")
    H, W = _check_pair(op, "grid", grid)
    if H * W != x.shape[1]:
        raise ValueError(
            f"{op}: grid {H} x {W} = {H * W} tokens, but x has {x.shape[1]} tokens (dim 1)"
        )
    if not in_choices(kind, POOL_KINDS):
        raise ValueError(f"{op}: kind must be one of {tuple(POOL_KINDS)}, got {kind!r}")
    if kind == "avg2x2":
        if H % 2 or W % 2:
            raise ValueError(
                f"{op}: kind='avg2x2' needs an even grid, got {H} x {W} (use kind='bilinear' "
                "for odd grids)"
            )
        out = (H // 2, W // 2)
        if size is not None and _check_pair(op, "size", size) != out:
            raise ValueError(f"{op}: kind='avg2x2' gives size {out}, got size={size!r}")
    elif kind == "avg":
        if size is None:
            raise ValueError(f"{op}: kind='avg' needs size=(h, w), the output grid")
        out = _check_pair(op, "size", size)
        if H % out[0] or W % out[1]:
            raise ValueError(
                f"{op}: kind='avg' averages blocks of (H/h, W/w): size {out[0]} x {out[1]} "
                f"must divide the grid {H} x {W}"
            )
    else:
        out = (
            (math.ceil(H / 2), math.ceil(W / 2)) if size is None else _check_pair(op, "size", size)
        )
    return ops.pool(x, [H, W], list(out), POOL_KINDS[kind])

"""The connector family's public functions: argument checks that name the argument at fault,
raised before any launch, then the ops (:mod:`.ops`).

Every function takes fp16, bf16, fp32 (Triton, fp32 accumulation) and float64 (the PyTorch
path); the weights of the linears must have the features' dtype and device. Under
``torch.autocast`` the projector and the merger run as autocast runs the linears they
replace: the features, weights and biases (fp32 master weights, say) cast to the autocast
dtype, the result in it; the norm weights stay as given (the norm's statistics are fp32).
The merger's LayerNorm reads fp32 features as autocast's fp32 ``layer_norm`` does: they are
centred in fp32 before the cast (the norm is shift-invariant), so rows with a large mean
keep the digits the norm reads.
"""

from __future__ import annotations

import math
import numbers

import torch

from ...core.checks import (
    FLOAT_DTYPES,
    check_bool,
    check_int,
    check_real,
    in_choices,
    isqrt,
    to_device,
)
from ...core.overlap import check_no_overlap
from ...core.runtime import autocast_operands
from . import ops
from .kernels import ACT_GELU, ACT_SWIGLU, LAYER_NORM, NO_NORM, RMS_NORM
from .reference import AVG2X2, BILINEAR

__all__ = ["deepstack_add", "merger", "mlp_projector", "pixel_shuffle"]

_NORMS = {None: NO_NORM, "layernorm": LAYER_NORM, "rmsnorm": RMS_NORM}
_POOLS = {"avg2x2": AVG2X2, "bilinear": BILINEAR}


def _check_tensor(op: str, name: str, t, dims=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{op}: {name} must be a float16, bfloat16, float32 or float64 tensor, got {t.dtype}"
        )
    if dims is not None and t.dim() not in dims:
        raise ValueError(
            f"{op}: {name} must be {' or '.join(f'{d}-D' for d in dims)}, got shape "
            f"{tuple(t.shape)}"
        )


def _square_grid(op: str, n: int, scale: int) -> int:
    """The side of the square grid of ``n`` tokens, divisible by ``scale``."""
    side = isqrt(n)
    if side * side != n:
        raise ValueError(f"{op}: x must hold a square grid of tokens (dim 1), got {n} tokens")
    if side % scale:
        raise ValueError(
            f"{op}: the grid side {side} (x has {n} tokens) must be divisible by scale={scale}"
        )
    return side


def pixel_shuffle(x: torch.Tensor, scale: int = 2) -> torch.Tensor:
    """Space-to-depth of a square token grid, as Idefics3, SmolVLM, InternVL and MiniCPM-V 4.6
    do before their projector (bitwise ``Idefics3Connector.pixel_shuffle``).

    Args:
        x: (B, N, C), N = S * S tokens in row-major order with S divisible by ``scale``.
        scale: the side of the merged blocks.

    Returns:
        (B, N / scale^2, C scale^2): out[b, i * (S / s) + j, (dr * s + dc) * C + c] =
        x[b, (i * s + dr) * S + j * s + dc, c], a new contiguous tensor.
    """
    op = "pixel_shuffle"
    _check_tensor(op, "x", x, (3,))
    scale = check_int(op, "scale", scale, 1)
    b, n, c = x.shape
    side = _square_grid(op, n, scale)
    out = ops.merge_tokens(x.unflatten(1, (side, side)), [scale, scale])
    return out.view(b, n // (scale * scale), c * scale * scale)


def _check_linear(op, name_w, w, name_b, b, x, in_features) -> int:
    _check_tensor(op, name_w, w, (2,))
    if w.shape[1] != in_features:
        raise ValueError(
            f"{op}: {name_w} must be (out_features, {in_features}) to take the "
            f"{in_features} input features, got shape {tuple(w.shape)}"
        )
    for t, name in ((w, name_w), (b, name_b)):
        if t is None:
            continue
        _check_tensor(op, name, t)
        if t.dtype != x.dtype or t.device != x.device:
            raise TypeError(
                f"{op}: {name} must have x's dtype and device ({x.dtype}, {x.device}), got "
                f"{t.dtype} on {t.device}"
            )
    if b is not None and tuple(b.shape) != (w.shape[0],):
        raise ValueError(f"{op}: {name_b} must be ({w.shape[0]},), got shape {tuple(b.shape)}")
    return w.shape[0]


_ACTIVATIONS = {"gelu": ACT_GELU, "swiglu": ACT_SWIGLU}


def _check_activation(op: str, activation) -> int:
    if not in_choices(activation, _ACTIVATIONS):
        raise ValueError(
            f"{op}: activation must be 'gelu' (exact, erf) or 'swiglu', got {activation!r}"
        )
    return _ACTIVATIONS[activation]


def _second_in_features(op: str, n1: int, act: int) -> int:
    """The inputs of the second linear: w1's outputs, or half of them for SwiGLU."""
    if act != ACT_SWIGLU:
        return n1
    if n1 % 2:
        raise ValueError(
            f"{op}: activation='swiglu' needs an even out_features of w1 (value and gate "
            f"halves), got {n1}"
        )
    return n1 // 2


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _check_pair(op: str, name: str, value) -> tuple[int, int]:
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(
            isinstance(v, (int, numbers.Integral)) and not isinstance(v, bool) and v > 0
            for v in value
        )
    ):
        raise ValueError(f"{op}: {name} must be a pair of positive ints (h, w), got {value!r}")
    return int(value[0]), int(value[1])


def _pool_args(op: str, x, pool, grid, pool_size):
    """(H, W, (h, w), mode) of the pooled projector, checked."""
    if not in_choices(pool, _POOLS):
        raise ValueError(f"{op}: pool must be None, 'avg2x2' or 'bilinear', got {pool!r}")
    if x.dim() != 3:
        raise ValueError(f"{op}: with pool, x must be (B, H W, K), got shape {tuple(x.shape)}")
    if grid is None:
        raise ValueError(f"{op}: pool={pool!r} needs grid=(H, W), the token grid of x")
    H, W = _check_pair(op, "grid", grid)
    if H * W != x.shape[1]:
        raise ValueError(
            f"{op}: grid {H} x {W} = {H * W} tokens, but x has {x.shape[1]} tokens (dim 1)"
        )
    if pool == "avg2x2":
        if H % 2 or W % 2:
            raise ValueError(
                f"{op}: pool='avg2x2' needs an even grid, got {H} x {W} (pool='bilinear' "
                "takes odd grids)"
            )
        size = (H // 2, W // 2)
        if pool_size is not None and _check_pair(op, "pool_size", pool_size) != size:
            raise ValueError(f"{op}: pool='avg2x2' gives pool_size {size}, got {pool_size!r}")
    elif pool_size is None:
        size = (-(-H // 2), -(-W // 2))
    else:
        size = _check_pair(op, "pool_size", pool_size)
    return H, W, size, _POOLS[pool]


def mlp_projector(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    activation: str = "gelu",
    *,
    store_hidden: bool = False,
    pool: str | None = None,
    grid: tuple[int, int] | None = None,
    pool_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """LLaVA's projector, y = GELU(x W1^T + b1) W2^T + b2, GELU exact (erf), optionally
    followed by a pooling of the projected token grid, computed before the second linear.
    Or the SwiGLU projector (Aya Vision's, without its shuffle and norm): h = x W1^T + b1
    split into its halves (v, g), y = (v SiLU(g)) W2^T + b2.

    Args:
        x: (..., K) features; (B, H W, K) with ``pool``.
        w1, b1: (N1, K) and (N1,) or None. w2, b2: (N2, N1) and (N2,) or None; (N2, N1 / 2)
            with "swiglu".
        activation: "gelu", or "swiglu" (rows [0, N1 / 2) of w1 give v, the rest the gate g:
            ``v, g = h.chunk(2, -1)``; not with ``pool``).
        store_hidden: keep the pre-activation h = x W1^T + b1 (M x N1) for the backward;
            by default only the inputs are kept and the backward recomputes h with one
            GEMM (GELU(h) is never stored: the backward recomputes it from h either way).
        pool: None, or the pooling of the projected (H, W) grid of each sample:
            ``"avg2x2"`` (the 2 x 2 mean, H and W even, to (H/2, W/2)) or ``"bilinear"``
            (LLaVA-OneVision's ``apply_pooling``: ``F.interpolate(mode="bilinear",
            align_corners=False)`` to ``pool_size``, default (ceil(H/2), ceil(W/2))), the
            kinds of :func:`vlmkernels.pool_tokens`.
        grid: (H, W), the row-major token grid of x's dim 1; with ``pool`` only.
        pool_size: (h, w), the output grid of ``"bilinear"``.

    With ``pool``, the result is pool(projector(x)) computed as

        y = pool(GELU(x W1^T + b1)) W2^T + b2                     (B, h w, N2)

    Both poolings are affine combinations of tokens with weights summing to 1, so they
    commute with the second linear, pool(a W2^T + b2) = pool(a) W2^T + b2: the same result
    in exact arithmetic, up to rounding in floating point (not bitwise: the sums run in
    another order, and 16-bit inputs round the pooled activations instead of the projected
    outputs).

    When it pays (FLOP model; M = B H W tokens, m = B h w pooled ones): the second GEMM runs
    on m rows instead of M, in the forward (y = p W2^T) and in both of its backward GEMMs
    (dW2 = g^T p, dp = g W2), so the GEMM FLOPs per pass go from 2 M (K N1 + N1 N2) to
    2 (M K N1 + m N1 N2): 0.45x at LLaVA-OneVision's 27 x 27 -> 14 x 14 (K 1152,
    N1 = N2 3584), 0.4x for the 2 x 2 mean (m = M / 4) at LLaVA-1.5's K 1024, N 4096. The
    forward pays for any m < M (the pooling reads M N1 elements instead of M N2). The
    backward's price is bandwidth: the pooling's adjoint and GELU' run as aten kernels,
    about two more 16-bit passes over the M x N1 hidden elements than the unfused
    projector (which fuses GELU' into its GEMM), against 4 (1 - m / M) N2 FLOPs saved per
    hidden element; at an H100's ~200 FLOP per byte that breaks even near N2 ~ 300 (a
    model, not a measurement). Nothing is kept for the backward but the inputs (h,
    M x N1, with ``store_hidden``).

    Returns:
        (..., N2), or (B, h w, N2) with ``pool``. The backward gives dx, dW1, db1, dW2, db2
        from dh = (g W2) * GELU'(h), dW2 = g^T GELU(h), dW1 = dh^T x, dx = dh W1 (with
        ``pool``: dW2 = g^T pool(GELU(h)), dh = pool^T(g W2) * GELU'(h)).
    """
    op = "mlp_projector"
    _check_tensor(op, "x", x)
    x, w1, b1, w2, b2 = autocast_operands(x, w1, b1, w2, b2)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{op}: x must be (..., in_features) with in_features > 0")
    act = _check_activation(op, activation)
    n1 = _check_linear(op, "w1", w1, "b1", b1, x, x.shape[-1])
    n2 = _check_linear(op, "w2", w2, "b2", b2, x, _second_in_features(op, n1, act))
    if pool is not None and act == ACT_SWIGLU:
        raise ValueError(f"{op}: pool={pool!r} takes activation='gelu', got 'swiglu'")
    if pool is None and (grid is not None or pool_size is not None):
        given = "grid" if grid is not None else "pool_size"
        raise ValueError(f"{op}: {given} goes with pool='avg2x2' or 'bilinear' (pool is None)")
    if pool is not None:
        H, W, size, mode = _pool_args(op, x, pool, grid, pool_size)
        save = check_bool(op, "store_hidden", store_hidden) and _needs_grad(x, w1, b1, w2, b2)
        grid4 = x.unflatten(1, (H, W))
        y = ops.pooled_projector(grid4, w1, b1, w2, b2, list(size), mode, save)[0]
        return y.view(x.shape[0], size[0] * size[1], n2)
    lead = x.shape[:-1]
    rows = x.reshape(-1, 1, 1, x.shape[-1])
    save = check_bool(op, "store_hidden", store_hidden) and _needs_grad(x, w1, b1, w2, b2)
    y = ops.connector(rows, w1, b1, w2, b2, None, None, None, [1, 1], NO_NORM, False, 0.0, act,
                      save)[0]  # fmt: skip
    return y.view(*lead, n2)


def merger(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None = None,
    w2: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    *,
    merge_size: int | tuple[int, int] = 2,
    layout: str = "consecutive",
    norm: str | None = None,
    norm_weight: torch.Tensor | None = None,
    norm_bias: torch.Tensor | None = None,
    eps: float = 1e-6,
    norm_before_merge: bool = True,
    activation: str = "gelu",
    store_hidden: bool = False,
) -> torch.Tensor:
    """A merging connector in one op: norm, merge of s x s patches (s = ``merge_size``),
    Linear [+ GELU + Linear], the merged features never copied.

    Layouts of x and the merged rows X (K = s^2 C):

    - ``"consecutive"`` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL mergers): x (P, C), each s^2
      consecutive patches one row: X = x.view(P / s^2, K); the result is (P / s^2, N).
    - ``"grid"`` (pixel shuffle: Idefics3, SmolVLM, InternVL, MiniCPM-V 4.6): x (B, S * S, C)
      a square grid, X = :func:`pixel_shuffle` (x, s); the result is (B, S^2 / s^2, N). Or
      x (B, H, W, C), any grid, and ``merge_size`` s or (MH, MW) dividing (H, W):
      X[(b, i, j), (dr MW + dc) C + c] = x[b, i MH + dr, j MW + dc, c] (MiniCPM-V 4.6's
      space-to-depth); the result is (B, H / MH, W / MW, N).

    Norm (``norm`` "layernorm" (weight, bias optional) or "rmsnorm" (weight), ``eps``):
    applied to each patch (length C) before the merge (``norm_before_merge``, Qwen2/2.5-VL,
    Qwen3-VL's default) or to each merged row (length K) after it (Qwen3-VL's
    use_postshuffle_norm, InternVL, MiniCPM-V 4.6). Statistics in fp32.

    Then h = norm(X) W1^T + b1 and y = GELU(h) W2^T + b2 with ``w2``, else y = h
    (Idefics3: one linear, no bias). ``activation``: "gelu" (exact, erf; checked even without
    ``w2``), or "swiglu" with ``w2`` (Aya Vision, Command A Vision: y = (v SiLU(g)) W2^T + b2
    for the halves ``v, g = h.chunk(2, -1)``, w2 (N, N1 / 2)); ``store_hidden`` as in
    :func:`mlp_projector`. ``eps`` defaults to 1e-6, the Qwen-VL mergers' LayerNorm eps.
    """
    op = "merger"
    if layout not in ("consecutive", "grid"):
        raise ValueError(f"{op}: layout must be 'consecutive' or 'grid', got {layout!r}")
    _check_tensor(op, "x", x, (2,) if layout == "consecutive" else (3, 4))
    x_given = x
    x, w1, b1, w2, b2 = autocast_operands(x, w1, b1, w2, b2)
    if layout == "grid" and x.dim() == 4 and isinstance(merge_size, (tuple, list)):
        if len(merge_size) != 2:
            raise ValueError(f"{op}: merge_size must be an int or (MH, MW), got {merge_size!r}")
        mh, mw = (check_int(op, "merge_size", m, 1) for m in merge_size)
    else:
        mh = mw = s = check_int(op, "merge_size", merge_size, 1)
    if layout == "consecutive":
        p, c = x.shape
        if p % (s * s):
            raise ValueError(f"{op}: x has {p} patches, not a multiple of merge_size^2 = {s * s}")
        grid = x.view(p // (s * s), 1, s * s, c) if x.is_contiguous() else None
        if grid is None:
            grid = x.unflatten(0, (p // (s * s), 1, s * s))
        merge, lead = [1, s * s], (p // (s * s),)
    elif x.dim() == 4:
        b, h, w, c = x.shape
        if h % mh or w % mw:
            raise ValueError(
                f"{op}: the grid ({h}, {w}) of x must be divisible by merge_size ({mh}, {mw})"
            )
        grid, merge, lead = x, [mh, mw], (b, h // mh, w // mw)
    else:
        b, n, c = x.shape
        side = _square_grid(op, n, s)
        grid, merge, lead = x.unflatten(1, (side, side)), [s, s], (b, n // (s * s))
    if c == 0:
        raise ValueError(f"{op}: x has 0 channels")
    if not in_choices(norm, _NORMS):
        raise ValueError(f"{op}: norm must be 'layernorm', 'rmsnorm' or None, got {norm!r}")
    kind = _NORMS[norm]
    per_patch = check_bool(op, "norm_before_merge", norm_before_merge)
    length = c if per_patch else mh * mw * c
    if kind == NO_NORM:
        if norm_weight is not None or norm_bias is not None:
            raise ValueError(f"{op}: norm_weight / norm_bias given without a norm")
    else:
        if norm_weight is None:
            raise ValueError(f"{op}: norm={norm!r} needs norm_weight ({length},)")
        if kind == RMS_NORM and norm_bias is not None:
            raise ValueError(f"{op}: norm='rmsnorm' takes no norm_bias")
        for t, name in ((norm_weight, "norm_weight"), (norm_bias, "norm_bias")):
            if t is None:
                continue
            _check_tensor(op, name, t, (1,))
            if t.shape[0] != length or t.device != x.device:
                raise ValueError(
                    f"{op}: {name} must be ({length},) on {x.device} (the norm runs "
                    f"{'per patch' if per_patch else 'per merged row'}), got shape "
                    f"{tuple(t.shape)} on {t.device}"
                )
    eps = check_real(op, "eps", eps, 0.0, math.inf)
    n1 = _check_linear(op, "w1", w1, "b1", b1, x, mh * mw * c)
    act = _check_activation(op, activation)  # checked even where unused (no w2)
    if w2 is not None:
        n_out = _check_linear(op, "w2", w2, "b2", b2, x, _second_in_features(op, n1, act))
    else:
        if act == ACT_SWIGLU:
            raise ValueError(f"{op}: activation='swiglu' needs w2 (v SiLU(g) feeds it)")
        if b2 is not None:
            raise ValueError(f"{op}: b2 given without w2")
        act, n_out = 0, n1
    save = check_bool(op, "store_hidden", store_hidden) and _needs_grad(
        x, w1, b1, w2, b2, norm_weight, norm_bias
    )
    if kind == LAYER_NORM and x is not x_given:  # cast by autocast
        grid = _centred(x_given.reshape(grid.shape), merge, per_patch).to(x.dtype)
    y = ops.connector(grid, w1, b1, w2, b2, norm_weight, norm_bias, None, merge, kind,
                      per_patch, eps, act, save)[0]  # fmt: skip
    return y.view(*lead, n_out)


def _centred(grid: torch.Tensor, merge, per_patch: bool) -> torch.Tensor:
    """``grid`` (L, GH, GW, C) minus the mean of each row the LayerNorm normalises: each
    patch, or each merged block of ``merge`` = (MH, MW) patches."""
    if per_patch:
        return grid - grid.mean(-1, keepdim=True)
    (mh, mw), (lead, gh, gw, c) = merge, grid.shape
    blocks = grid.reshape(lead, gh // mh, mh, gw // mw, mw, c)
    return (blocks - blocks.mean((2, 4, 5), keepdim=True)).reshape(grid.shape)


def deepstack_add(
    hidden: torch.Tensor,
    visual_pos_mask: torch.Tensor,
    visual_embeds: torch.Tensor,
    *,
    inplace: bool = False,
) -> torch.Tensor:
    """Qwen3-VL's DeepStack injection (``_deepstack_process``): the visual features added to
    the hidden states at the visual positions.

    Args:
        hidden: (B, S, D) (any leading shape) hidden states.
        visual_pos_mask: bool, ``hidden``'s shape without D; V True entries (checked on
            the device, without a host synchronisation: RuntimeError on the CPU, a
            device-side assert on a GPU).
        visual_embeds: (V, D), cast to hidden's dtype; row v goes to the v-th True position
            in row-major order.
        inplace: add into ``hidden`` and return it (forward only: neither ``hidden`` nor
            ``visual_embeds`` may need a gradient); by default a new tensor is returned
            and ``hidden`` is left as it was.

    Returns:
        out = hidden with out[mask] = hidden[mask] + visual_embeds.
    """
    op = "deepstack_add"
    _check_tensor(op, "hidden", hidden)
    _check_tensor(op, "visual_embeds", visual_embeds, (2,))
    if hidden.dim() < 2:
        raise ValueError(f"{op}: hidden must be (..., D) with at least 2 dims, got shape "
                         f"{tuple(hidden.shape)}")  # fmt: skip
    if not isinstance(visual_pos_mask, torch.Tensor) or visual_pos_mask.dtype != torch.bool:
        got = (
            visual_pos_mask.dtype
            if isinstance(visual_pos_mask, torch.Tensor)
            else type(visual_pos_mask).__name__
        )
        raise TypeError(f"{op}: visual_pos_mask must be a bool tensor, got {got}")
    if tuple(visual_pos_mask.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"{op}: visual_pos_mask must have hidden's shape without the last dim "
            f"({tuple(hidden.shape[:-1])}), got {tuple(visual_pos_mask.shape)}"
        )
    if visual_embeds.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{op}: visual_embeds must be (V, {hidden.shape[-1]}), got {tuple(visual_embeds.shape)}"
        )
    if visual_pos_mask.is_meta:
        raise ValueError(f"{op}: visual_pos_mask is a meta tensor: the rows it selects depend "
                         "on its values (trace with fake tensors instead)")  # fmt: skip
    visual_pos_mask = to_device(op, "visual_pos_mask", visual_pos_mask, hidden.device)
    visual_embeds = to_device(op, "visual_embeds", visual_embeds, hidden.device,
                              dtype=hidden.dtype)  # fmt: skip
    if check_bool(op, "inplace", inplace):
        if _needs_grad(hidden, visual_embeds):
            raise RuntimeError(
                f"{op}: inplace=True is forward-only, but "
                f"{'hidden' if _needs_grad(hidden) else 'visual_embeds'} requires grad; "
                "use inplace=False"
            )
        check_no_overlap(op, {"hidden": hidden}, {"visual_embeds": visual_embeds})
        ops.deepstack_add_(hidden, visual_pos_mask, visual_embeds)
        return hidden
    return ops.deepstack_add(hidden, visual_pos_mask, visual_embeds)

"""The contrastive family's public functions on one device: argument checks, autocast,
then the ops (:mod:`.ops`); and the GradCache forms, which return the gradients instead of
building an autograd graph.

Each error names the argument at fault and is raised before any kernel launch. The
process-group forms of :func:`clip_loss` and :func:`siglip_loss` are
:func:`vlmkernels.clip_loss` / :func:`vlmkernels.siglip_loss`
(:mod:`vlmkernels.distributed.contrastive`), which check their arguments with
:func:`prepare` and :func:`check_targets` and run these functions without a group.
"""

from __future__ import annotations

import torch
from torch.autograd import forward_ad

from ...core.checks import (
    check_bool,
    check_chunk_size,
    check_feature_pair,
    check_int,
    check_queries_keys,
    check_real,
    check_reduction,
    saveable,
    saveable_pair,
    scalar_tensor,
    to_device,
)
from ...core.op import _refuse_forward_mode
from ...core.runtime import autocast_dtype, autocast_pair, cast, divided, mean_weight, tracing
from . import ops
from .fused_backward import check_design_variable

__all__ = [
    "check_targets",
    "clip_loss",
    "clip_loss_with_grads",
    "contrastive_cross_entropy",
    "prepare",
    "siglip_loss",
    "siglip_loss_with_grads",
]


def prepare(op, image_features, text_features, logit_scale, logit_bias, reduction, chunk_size):
    """Checked arguments: (x, y, scale, bias, chunk_size, dtype of the result).

    Under autocast, fp32 features are cast to the autocast dtype and the loss is returned
    in fp32, as open_clip's matmul (autocast to 16 bits) and cross-entropy (to fp32) do;
    features of two dtypes are both cast there, as that matmul takes them.
    """
    image_features, text_features = autocast_pair(image_features, text_features)
    check_feature_pair(op, image_features, text_features)
    check_reduction(op, reduction)
    chunk = check_chunk_size(op, chunk_size)
    device = image_features.device
    scale = scalar_tensor(op, "logit_scale", logit_scale, device)
    bias = None if logit_bias is None else scalar_tensor(op, "logit_bias", logit_bias, device)
    (image_features, text_features), out_dtype = autocast_features(image_features,
                                                                   text_features)  # fmt: skip
    return image_features, text_features, scale, bias, chunk, out_dtype


def check_teacher_parts(op: str, name: str, teacher, **parts) -> None:
    """Refuses parts of a teacher (its scale, its keys) given without the teacher ``name``:
    they would be ignored, as a misspelt distillation set-up would."""
    if teacher is None:
        given = [k for k, v in parts.items() if v is not None]
        if given:
            raise ValueError(f"{op}: {', '.join(given)} given without {name}")


def autocast_features(*features: torch.Tensor):
    """(features, dtype of the loss): under autocast, fp32 features cast to the autocast
    dtype and an fp32 loss, as the formulas' matmul (autocast to 16 bits) and
    cross-entropy (to fp32) would give; else the features as given and their dtype. The
    features share a dtype and device (checked by the caller)."""
    first = features[0]
    low = autocast_dtype(first)
    if low is None or first.dtype == torch.float64:  # autocast leaves float64 alone
        return features, first.dtype
    if first.dtype != torch.float32:
        return features, torch.float32
    return tuple(f.to(low) for f in features), torch.float32


def _checked_alpha(op, label_smoothing, alpha) -> float:
    """alpha as a float in [0, 1], label_smoothing checked in [0, 1) (:func:`check_real`,
    called only where a float in range, which it returns as it is, is not given)."""
    if not (type(label_smoothing) is float and 0.0 <= label_smoothing < 1.0):
        check_real(op, "label_smoothing", label_smoothing, 0.0, 1.0, high_open=True)
    if not (type(alpha) is float and 0.0 <= alpha <= 1.0):
        alpha = check_real(op, "alpha", alpha, 0.0, 1.0)
    return alpha


def check_targets(op, n, device, ids=None, label_smoothing=0.0, alpha=0.0, teacher=None,
                   like=None, names=("ids", "teacher[0]", "teacher[1]"),
                   dtype=None):  # fmt: skip
    """Checks the extra-target arguments; returns (ids as int64 or None, teacher detached,
    in ``dtype`` if given). ``names``: what the ids and the two teacher tensors are called in
    the caller."""
    ids = check_ids(op, names[0], ids, n, device)
    alpha = _checked_alpha(op, label_smoothing, alpha)
    if teacher is not None:
        teacher = check_teacher(op, teacher, like, names[1:], device, dtype)
    elif alpha:
        raise ValueError(f"{op}: alpha > 0 needs teacher features")
    return ids, teacher


def _ids_as_taken(ids, n, device) -> bool:
    """Whether ``ids`` is already what the ops take: an (n,) contiguous int64 tensor on
    ``device`` (the kernels read id i at ids + i)."""
    return (type(ids) is torch.Tensor and ids.dtype == torch.int64 and ids.shape == (n,)
            and ids.device == device and (n < 2 or ids.stride(0) == 1))  # fmt: skip


def check_ids(op, name, ids, n, device):
    """``ids`` (None, or an (n,) integer tensor) as contiguous int64 on ``device`` (the
    kernels read id i at ids + i)."""
    if ids is None:
        return None
    if _ids_as_taken(ids, n, device):
        return saveable(ids)
    got = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
    if (not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex()
            or ids.dtype == torch.bool):  # fmt: skip
        raise TypeError(f"{op}: {name} must be an integer tensor, got {got}")
    if ids.shape != (n,):
        raise ValueError(f"{op}: {name} must have shape ({n},), got {tuple(ids.shape)}")
    return to_device(op, name, ids, device, dtype=torch.int64).contiguous()


def _check_id_pair(op, query_ids, key_ids, m, n, device):
    """``(check_ids(op, "query_ids", query_ids, m, device), check_ids(op, "key_ids",
    key_ids, n, device))`` (both None, or both given: checked by the caller), with one
    look at the trace where both are already what the ops take (host time)."""
    if query_ids is None:
        return None, None
    if _ids_as_taken(query_ids, m, device) and _ids_as_taken(key_ids, n, device):
        return saveable_pair(query_ids, key_ids)  # check_ids' first case for both
    return (check_ids(op, "query_ids", query_ids, m, device),
            check_ids(op, "key_ids", key_ids, n, device))  # fmt: skip


def check_teacher(op, teacher, like, names, device, dtype=None):
    """``teacher``, a pair of feature tensors shaped like the pair ``like`` (the caller's
    features: same dtype, on ``device``; ``names``: what they are called in the caller),
    detached, and cast to ``dtype`` where given (the dtype the loss runs in: the autocast
    one when autocast cast the features)."""
    if not isinstance(teacher, (tuple, list)) or len(teacher) != 2:
        raise TypeError(f"{op}: teacher must be a pair (image, text) of feature tensors, "
                        f"got {type(teacher).__name__}")  # fmt: skip
    first, second = teacher
    _check_teacher_part(op, first, like[0], names[0], device)
    _check_teacher_part(op, second, like[1], names[1], device)
    if first.requires_grad or second.requires_grad:
        first, second = first.detach(), second.detach()
    if dtype is not None and first.dtype != dtype:
        return first.to(dtype), second.to(dtype)
    return saveable_pair(first, second)


def _check_teacher_part(op, t, ref, name, device):
    if isinstance(t, torch.Tensor) and t.shape == ref.shape and t.dtype == ref.dtype:
        if t.device != device:
            raise ValueError(f"{op}: {name} must be on {device}, got {t.device}")
        return
    want = f"({tuple(ref.shape)}, {ref.dtype})"
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor shaped like the features "
                        f"{want}, got {type(t).__name__}")  # fmt: skip
    raise ValueError(f"{op}: {name} must be a tensor shaped like the features "
                     f"{want}, got ({tuple(t.shape)}, {t.dtype})")  # fmt: skip


def _teacher_scale(op, teacher_logit_scale, scale, device):
    """The teacher's logit scale as a 0-d tensor (default: the student's ``scale``). It
    receives no gradient whether it requires one or not: the ops' backward gives None for
    every teacher input, so it is passed as it is (a detach would cost a torch op)."""
    if teacher_logit_scale is not None:
        return saveable(scalar_tensor(op, "teacher_logit_scale", teacher_logit_scale, device))
    return scale


def _alpha_args(alpha, like: torch.Tensor):
    """(float alpha, alpha tensor or None): the ops' two forms of the teacher's share (the
    caller has a teacher).

    Eager, the float (no tensor made per call). Under torch.compile, a 0-d
    tensor made in the graph (fp32, fp64 for fp64 features) and a constant float the ops
    ignore: a float argument of an op is a constant of the graph, so each new alpha (ALBEF's
    warm-up ramps it every step) would compile again, while a float Dynamo made dynamic
    flows into the tensor unspecialised (two compilations in all, as the PyTorch formula).
    The tensor is made by arithmetic, zeros + alpha: torch.scalar_tensor(alpha) (and
    torch.full, torch.tensor) specialise alpha again under AOTAutograd (aot_eager, Inductor:
    Dynamo's pass that turns such floats into tensors does not cover them), a recompilation
    per value. The teacher's term is then in the graph whatever alpha is (alpha = 0 gives
    the same numbers without it)."""
    if tracing():  # this thread (is_compiling alone is process-wide)
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        return 0.0, torch.zeros((), dtype=dtype, device=like.device) + alpha
    return float(alpha), None


def _distilled(teacher: tuple, alpha: float, alpha_t) -> tuple:
    """The ops' teacher arguments (x_t, y_t, s_t): ``teacher`` where its term counts
    (alpha > 0, or torch.compile's tensor alpha, whose value the graph does not know),
    else Nones: at alpha = 0 the teacher's logits are not computed."""
    return teacher if alpha_t is not None or alpha else (None, None, None)


def _reduce(losses, reduction, halve_sum):
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum() * (0.5 if halve_sum else 1.0)
    return losses


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale,
    logit_bias=None,
    *,
    reduction: str = "mean",
    chunk_size: int | None = None,
    ids: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    teacher: tuple[torch.Tensor, torch.Tensor] | None = None,
    teacher_logit_scale=None,
    alpha: float = 0.0,
) -> torch.Tensor:
    r"""Symmetric InfoNCE (CLIP) loss without the N x N logits in memory.

    ``(CE(s I T^T + b, targets) + CE(s T I^T + b, targets^T)) / 2``; with the default
    targets (``arange``) this is open_clip's ``ClipLoss``.

    Args:
        image_features: (N, d) float16, bfloat16, float32 (or float64 on the torch backend).
        text_features: (N, d), same dtype and device.
        logit_scale: the multiplier s itself (open_clip passes ``logit_scale.exp()``): a float
            or a one-element tensor (0-d, or (1,) as transformers' SigLIP keeps it), which
            receives a gradient when it requires one.
        logit_bias: optional additive bias b, float or one-element tensor.
        reduction: ``"mean"`` (the CLIP loss), ``"sum"`` (N times the mean: the two
            directions' summed cross-entropies, halved) or ``"none"``: a (2, N) tensor whose
            rows are the per-sample image-to-text and text-to-image losses.
        chunk_size: rows of logit gradient materialised at once in the backward pass
            (memory ``chunk_size * N`` elements, up to 3.25 times that on the PyTorch
            path); None: 128 MiB (``CHUNK_BUDGET_BYTES``), at least 2048 rows on the
            Triton path (see the module docstring).
        ids: (N,) integers: every pair with equal ids is a positive, each row's target
            spread evenly over its positives (BLIP's ``idx``).
        label_smoothing: eps: targets (1 - eps) hard + eps / N.
        teacher: (image, text) features of a teacher (momentum) model, no gradient: targets
            alpha softmax(s_t I_t T_t^T) + (1 - alpha) hard (ALBEF's distillation), with
            ``teacher_logit_scale`` s_t (default: ``logit_scale``, detached).
        teacher_logit_scale: s_t, a float or one-element tensor (no gradient); None: as above.
        alpha: the teacher's share of the targets, in [0, 1] (default 0: no teacher
            term; > 0 needs ``teacher``). Under torch.compile a changing alpha (a warm-up
            ramp) compiles twice in all, not once per value.

    Returns:
        The loss in the features' dtype (computed in fp32); under autocast, fp32 features
        are cast to the autocast dtype and the loss is fp32, as open_clip's would be.

    Features that need no gradient (a frozen tower, as LiT's image tower) cost the
    reduced losses' backward no gradient product of their own.

    Second-order gradients are not implemented: a backward with ``create_graph=True``
    gives the first-order gradients, and differentiating those raises NotImplementedError.
    """
    op = "clip_loss"
    x, y, scale, bias, chunk, out_dtype = prepare(
        op, image_features, text_features, logit_scale, logit_bias, reduction, chunk_size
    )
    if teacher is None and teacher_logit_scale is not None:  # (no call where nothing to refuse)
        check_teacher_parts(op, "teacher", teacher, teacher_logit_scale=teacher_logit_scale)
    if torch.is_grad_enabled():
        check_design_variable()
    n = x.shape[0]
    plain = ids is None and teacher is None and label_smoothing == 0.0 and alpha == 0.0
    # a frozen image tower (LiT): the reduced loss is symmetric in the two sides, and its
    # backward skips the second side's gradient product where autograd does not ask for it
    swap = reduction != "none" and y.requires_grad and not x.requires_grad
    if plain and reduction != "none" and n:
        # the default targets, reduced: one op whose backward is one op
        weight, per = mean_weight(0.5, n, reduction == "mean")
        first, second = (y, x) if swap else (x, y)
        loss = ops.contrastive_ce_reduced(first, second, scale, bias, weight, 0, True, chunk)[0]
        return cast(divided(loss, per), out_dtype)
    # the teacher is shaped like the caller's features (under autocast prepare has cast
    # those to the autocast dtype; the teacher follows them)
    ids, teacher = check_targets(op, n, x.device, ids, label_smoothing, alpha, teacher,
                                 (image_features, text_features), dtype=x.dtype)  # fmt: skip
    if teacher is not None:
        alpha, alpha_t = _alpha_args(alpha, x)
        teacher = (*teacher, _teacher_scale(op, teacher_logit_scale, scale, x.device))
        teacher = _distilled(teacher, alpha, alpha_t)
    else:  # _alpha_args and _distilled without a teacher (alpha is 0: checked)
        alpha, alpha_t, teacher = float(alpha), None, (None, None, None)
    if reduction != "none" and n:
        # reduced: one op whose backward is one op (the teacher only where it counts)
        weight, per = mean_weight(0.5, n, reduction == "mean")
        if swap:
            x, y, teacher = y, x, (teacher[1], teacher[0], teacher[2])
        loss = ops.contrastive_ce_targets_reduced(
            x, y, scale, bias, ids, ids, *teacher, alpha_t, weight, 0,
            float(label_smoothing), alpha, True, chunk,
        )[0]  # fmt: skip
        return cast(divided(loss, per), out_dtype)
    row_losses, col_losses, _, _ = ops.contrastive_ce_forward(
        x, y, scale, bias, ids, ids, *teacher, alpha_t, 0, float(label_smoothing), alpha,
        True, True, chunk,
    )  # fmt: skip
    losses = torch.stack((row_losses, col_losses))
    return cast(_reduce(losses, reduction, True), out_dtype)


def contrastive_cross_entropy(
    queries: torch.Tensor,
    keys: torch.Tensor,
    logit_scale,
    logit_bias=None,
    *,
    offset: int = 0,
    query_ids: torch.Tensor | None = None,
    key_ids: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    teacher_queries: torch.Tensor | None = None,
    teacher_keys: torch.Tensor | None = None,
    teacher_logit_scale=None,
    alpha: float = 0.0,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> torch.Tensor:
    r"""One direction of a contrastive loss: the cross-entropy of each query (row) over all
    keys (columns) of S = s Q K^T + b (M x N), without S in memory.

    The building block of ALBEF / BLIP's image-text contrastive losses: keys may be a
    concatenation of in-batch (momentum) features and a no-grad queue, e.g. b x (b + 65536).

    Targets of row i: positives where ``key_ids == query_ids[i]`` (BLIP's ``idx`` with its
    ``idx_queue``) or, without ids, key ``i + offset``; spread evenly over the positives,
    smoothed by ``label_smoothing`` over the N keys and mixed as
    ``alpha softmax(s_t Q_t K_t^T) + (1 - alpha) hard`` with teacher (momentum) features
    ``teacher_queries`` (and ``teacher_keys``, default ``keys``): ALBEF's distillation.
    The teacher's targets are constants (ALBEF computes them under no_grad): no gradient
    reaches teacher features, nor ``keys`` through the default ``teacher_keys``.

    ``logit_bias`` b is optional (None: no bias) and ``chunk_size`` is as in
    :func:`clip_loss` (rows of logit gradient materialised at once in the backward pass).

    Returns the mean (default), the sum, or the (M,) per-query losses (``"none"``), in the
    features' dtype; under autocast, fp32 features (and teacher features) are cast to the
    autocast dtype and the loss is fp32, as ALBEF's / BLIP's matmul and log-softmax give.
    Gradients flow to queries, keys (where they require grad: keys without, such as a
    queue, cost the reduced loss's backward no G^T Q product), scale and bias; first order
    only, as :func:`clip_loss`.

    A query with no positive key (no ``key_ids`` equal to its id, or ``i + offset`` outside
    0 .. N - 1) has no target unless ``alpha = 1``: its loss is NaN, and so are the mean,
    the sum and every gradient its loss reaches (no host synchronisation checks for it).
    To leave such queries out, mask the ``"none"`` losses, e.g.
    ``torch.where(valid, losses, 0).sum()``: a zero upstream gradient keeps them out of the
    gradients too.
    """
    op = "contrastive_cross_entropy"
    queries, keys = autocast_pair(queries, keys)
    check_queries_keys(op, queries, keys)
    if teacher_queries is None and (teacher_keys is not None or teacher_logit_scale is not None):
        check_teacher_parts(op, "teacher_queries", teacher_queries, teacher_keys=teacher_keys,
                            teacher_logit_scale=teacher_logit_scale)  # fmt: skip
    if torch.is_grad_enabled():
        check_design_variable()
    check_reduction(op, reduction)
    chunk = check_chunk_size(op, chunk_size)
    offset = check_int(op, "offset", offset)
    device = queries.device
    scale = scalar_tensor(op, "logit_scale", logit_scale, device)
    bias = None if logit_bias is None else scalar_tensor(op, "logit_bias", logit_bias, device)
    if (query_ids is None) != (key_ids is None):
        raise ValueError(f"{op}: query_ids and key_ids go together")
    given = (queries, keys)
    (queries, keys), out_dtype = autocast_features(queries, keys)
    m, n = queries.shape[0], keys.shape[0]
    plain = query_ids is None and teacher_queries is None and label_smoothing == 0.0
    if plain and alpha == 0.0 and reduction != "none" and m and 0 <= offset <= n - m:
        # one positive per query, reduced: one op whose backward is one op
        weight, per = mean_weight(1.0, m, reduction == "mean")
        loss = ops.contrastive_ce_reduced(queries, keys, scale, bias, weight, offset, False,
                                          chunk)[0]  # fmt: skip
        return cast(divided(loss, per), out_dtype)
    q_ids, k_ids = _check_id_pair(op, query_ids, key_ids, m, n, device)
    alpha = _checked_alpha(op, label_smoothing, alpha)
    teacher = (None, None, None)
    if teacher_queries is None and alpha:  # (with a teacher, alpha's value is not read)
        raise ValueError(f"{op}: alpha > 0 needs teacher_queries")
    if teacher_queries is not None:
        teacher_keys = given[1] if teacher_keys is None else teacher_keys
        tq, tk = check_teacher(op, (teacher_queries, teacher_keys), given,
                               ("teacher_queries", "teacher_keys"), device,
                               queries.dtype)  # fmt: skip
        teacher = (tq, tk, _teacher_scale(op, teacher_logit_scale, scale, device))
        alpha, alpha_t = _alpha_args(alpha, queries)
        teacher = _distilled(teacher, alpha, alpha_t)
    else:  # _alpha_args and _distilled without a teacher (alpha is 0: checked)
        alpha, alpha_t = float(alpha), None
    if reduction != "none" and m and n and (q_ids is not None or 0 <= offset <= n - m):
        # reduced, every query's positives known to the kernels (ids, or the key at
        # i + offset): one op whose backward is one op; a query without a positive (ids)
        # makes the loss NaN there too. Without ids, queries past the keys take the
        # general path below.
        weight, per = mean_weight(1.0, m, reduction == "mean")
        loss = ops.contrastive_ce_targets_reduced(
            queries, keys, scale, bias, q_ids, k_ids, *teacher, alpha_t, weight, offset,
            float(label_smoothing), alpha, False, chunk,
        )[0]  # fmt: skip
        return cast(divided(loss, per), out_dtype)
    row_losses, _, _, _ = ops.contrastive_ce_forward(
        queries, keys, scale, bias, q_ids, k_ids, *teacher, alpha_t, offset,
        float(label_smoothing), alpha, True, False, chunk,
    )  # fmt: skip
    return cast(_reduce(row_losses, reduction, False), out_dtype)


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale,
    logit_bias,
    *,
    reduction: str = "mean",
    chunk_size: int | None = None,
    negative_only: bool = False,
) -> torch.Tensor:
    r"""Pairwise sigmoid (SigLIP) loss without the N x N logits in memory.

    ``-sum_ij logsigmoid(z_ij (s I_i . T_j + b)) / N`` with z = +1 on the diagonal and -1
    elsewhere, as open_clip's ``SigLipLoss`` on one device.

    Args:
        image_features, text_features: (N, d), as in :func:`clip_loss`.
        logit_scale: the multiplier s (open_clip passes ``logit_scale.exp()``).
        logit_bias: the bias b (float, one-element tensor, or None for no bias).
        reduction: ``"mean"`` (sum over all pairs / N, open_clip's normalisation), ``"sum"``
            or ``"none"``: the (N,) per-image losses ``-sum_j logsigmoid(z_ij S_ij)``.
        chunk_size: rows of logit gradient materialised at once; None: as in
            :func:`clip_loss`.
        negative_only: every pair is a negative (z = -1): the blocks of other ranks' texts
            in open_clip's distributed SigLIP.

    When a scalar loss needs gradients, they are computed in the forward pass (no
    recomputation of the logits) and the backward pass scales them by the upstream gradient;
    features that need no gradient (a frozen tower) cost no gradient product of their own.
    Those of fp16 features are kept in fp32 until then, so that a GradScaler's loss scale
    lifts their small entries (about s / N) out of fp16's subnormal range before they are
    rounded, as in eager autograd.
    Second-order gradients are not implemented: differentiating the gradients of a backward
    with ``create_graph=True`` raises NotImplementedError (it never gives 0).
    """
    op = "siglip_loss"
    x, y, scale, bias, chunk, out_dtype = prepare(
        op, image_features, text_features, logit_scale, logit_bias, reduction, chunk_size
    )
    check_bool(op, "negative_only", negative_only)
    n = x.shape[0]
    offset = n if negative_only else 0  # col = row + n: no positive pair
    # (x, y and scale are tensors here, bias a tensor or None; no generator: a call per item)
    wants_grad = torch.is_grad_enabled() and (
        x.requires_grad or y.requires_grad or scale.requires_grad
        or (bias is not None and bias.requires_grad)
    )  # fmt: skip
    if reduction != "none" and wants_grad:
        weight, per = mean_weight(1.0, n, reduction == "mean")
        # the summed loss is symmetric in the two sides (z is): a side without gradient
        # (a frozen tower) goes second, and its gradient product is skipped
        if y.requires_grad and not x.requires_grad:
            x, y = y, x
        fused = ops.siglip_loss_fused(x, y, scale, bias, weight, chunk, offset, y.requires_grad)
        return cast(divided(fused[0], per), out_dtype)
    rows = ops.siglip_loss_forward(x, y, scale, bias, chunk, offset)
    if reduction == "mean":
        out = rows.sum() / n
    elif reduction == "sum":
        out = rows.sum()
    else:
        out = rows
    return cast(out, out_dtype)


def clip_loss_with_grads(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale,
    logit_bias=None,
    *,
    reduction: str = "mean",
    chunk_size: int | None = None,
    ids: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
):
    """(loss, d image_features, d text_features, d logit_scale, d logit_bias) of
    :func:`clip_loss` without building an autograd graph (GradCache: the features are
    detached representations; the gradients are then pushed through the encoders).

    ``d logit_bias`` is None without a bias. Scalar reductions only.
    """
    op = "clip_loss_with_grads"
    _refuse_dual(op, image_features, text_features, logit_scale, logit_bias)
    if reduction == "none":
        raise ValueError(f"{op}: reduction must be 'mean' or 'sum'")
    x, y, scale, bias, chunk, out_dtype = prepare(op, image_features, text_features,
                                                  logit_scale, logit_bias, reduction,
                                                  chunk_size)  # fmt: skip
    ids, _ = check_targets(op, x.shape[0], x.device, ids, label_smoothing)
    # n > 0: prepare checked. Traced, the sum's weight and a division by n (mean_weight):
    # 1 / (2 n) in the ops' float argument would fix the batch size in the graph
    weight, per = mean_weight(0.5, x.shape[0], reduction == "mean")
    with torch.no_grad():
        # the reduced ops clip_loss runs, their backward called with a unit gradient: the
        # same results as clip_loss(...).backward()
        x, y, scale = x.detach(), y.detach(), scale.detach()
        bias = bias.detach() if bias is not None else None
        # the unit gradient, or 1 / n while traced (the sum's weight): the kernels scale the
        # gradients in fp32 (float64 for float64 features: the backward forms weight times
        # this in its dtype, and an fp32 one rounded the mean's 1 / n), as in eager mode,
        # rather than dividing rounded ones
        unit = torch.float64 if x.dtype == torch.float64 else torch.float32
        one = divided(torch.ones((), dtype=unit, device=x.device), per)
        if ids is None and not label_smoothing:
            loss, coef = ops.contrastive_ce_reduced(x, y, scale, bias, weight, 0, True, chunk)
            dx, dy, ds, db = ops.contrastive_ce_reduced_backward(
                x, y, scale, bias, coef, one, weight, 0, chunk, True
            )
        else:
            tensors = (x, y, scale, bias, ids, ids, None, None, None, None)
            options = (weight, 0, float(label_smoothing), 0.0)
            loss, coef = ops.contrastive_ce_targets_reduced(*tensors, *options, True, chunk)
            dx, dy, ds, db = ops.contrastive_ce_targets_reduced_backward(
                *tensors, coef, one, *options, chunk, True
            )
        loss = divided(loss, per)
    return _as_autograd_gives(loss, dx, dy, ds, db, out_dtype, image_features, text_features,
                              logit_scale, logit_bias)  # fmt: skip


def siglip_loss_with_grads(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale,
    logit_bias,
    *,
    reduction: str = "mean",
    chunk_size: int | None = None,
):
    """(loss, d image_features, d text_features, d logit_scale, d logit_bias) of
    :func:`siglip_loss` without building an autograd graph (GradCache); one pass over the
    logits. ``d logit_bias`` is None without a bias. Scalar reductions only."""
    op = "siglip_loss_with_grads"
    _refuse_dual(op, image_features, text_features, logit_scale, logit_bias)
    if reduction == "none":
        raise ValueError(f"{op}: reduction must be 'mean' or 'sum'")
    x, y, scale, bias, chunk, out_dtype = prepare(op, image_features, text_features,
                                                  logit_scale, logit_bias, reduction,
                                                  chunk_size)  # fmt: skip
    weight, per = mean_weight(1.0, x.shape[0], reduction == "mean")  # see clip's
    with torch.no_grad():
        bias = bias.detach() if bias is not None else None
        loss, dx, dy, ds, db = ops.siglip_loss_fused(
            x.detach(), y.detach(), scale.detach(), bias, weight, chunk, 0, True
        )
        loss, dx, dy, ds, db = _divided_all(per, loss, dx, dy, ds, db)
    return _as_autograd_gives(loss, dx, dy, ds, db, out_dtype, image_features, text_features,
                              logit_scale, logit_bias)  # fmt: skip


def _refuse_dual(op, *args) -> None:
    """The GradCache forms detach their inputs, which would drop a forward_ad tangent
    before any op sees it (a loss without its tangent): refused as the ops refuse it."""
    if forward_ad._current_level >= 0:
        tensors = [t for t in args if isinstance(t, torch.Tensor)]
        _refuse_forward_mode(op, tensors, range(len(tensors)))


def _divided_all(per, *values):
    """Each of ``values`` (tensors, or None) divided by ``per`` (:func:`divided`): the loss
    and its gradients, all linear in the ops' weight."""
    return tuple(v if v is None else divided(v, per) for v in values)


def _as_autograd_gives(
    loss, dx, dy, ds, db, out_dtype, image_features, text_features, logit_scale, logit_bias
):
    """The GradCache results in the dtypes and shapes the plain loss and its backward give:
    the loss in the loss's dtype, each feature gradient in its features' dtype (fp32
    features under autocast get fp32 gradients), the scale and bias gradients in the shape
    of a tensor ``logit_scale`` / ``logit_bias`` (transformers' SigLIP keeps them as (1,)
    parameters); no bias gradient without a bias."""
    if isinstance(logit_scale, torch.Tensor):
        ds = ds.reshape(logit_scale.shape)
    if logit_bias is None:
        db = None
    elif isinstance(logit_bias, torch.Tensor):
        db = db.reshape(logit_bias.shape)
    return loss.to(out_dtype), dx.to(image_features.dtype), dy.to(text_features.dtype), ds, db

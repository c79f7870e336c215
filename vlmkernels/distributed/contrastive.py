"""The public ``clip_loss`` and ``siglip_loss`` (``vlmkernels.clip_loss`` /
``vlmkernels.siglip_loss``): the single-device losses of :mod:`vlmkernels.ops.contrastive`
without a ``process_group``, the ring of :mod:`.ring` with one.

With a group, this rank's arguments are checked as the single-device functions check
them; an error is raised on every rank (:func:`.ring.report_local_error` tells the others,
which are waiting in the ring's consistency exchange), never on one rank while the others
hang.
"""

from __future__ import annotations

import inspect
import textwrap

import torch

from ..core.checks import check_bool
from ..ops.contrastive import functional
from ..ops.contrastive.functional import check_targets, check_teacher_parts, prepare
from .ring import clip_loss_ring, report_local_error, siglip_loss_ring

__all__ = ["clip_loss", "siglip_loss"]


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
    process_group=None,
) -> torch.Tensor:
    if process_group is None:
        return functional.clip_loss(
            image_features, text_features, logit_scale, logit_bias, reduction=reduction,
            chunk_size=chunk_size, ids=ids, label_smoothing=label_smoothing, teacher=teacher,
            teacher_logit_scale=teacher_logit_scale, alpha=alpha,
        )  # fmt: skip
    op = "clip_loss"
    try:
        _check_local_rows(op, image_features)
        x, y, scale, bias, chunk, out_dtype = prepare(
            op, image_features, text_features, logit_scale, logit_bias, reduction, chunk_size
        )
        check_teacher_parts(op, "teacher", teacher, teacher_logit_scale=teacher_logit_scale)
        ids, teacher = check_targets(op, x.shape[0], x.device, ids, label_smoothing, alpha,
                                     teacher, (image_features, text_features))  # fmt: skip
        if teacher is not None:
            raise NotImplementedError(
                f"{op}: teacher targets are not supported with a process_group"
            )
    except Exception as exc:
        report_local_error(op, process_group, image_features, exc)
    loss = clip_loss_ring(x, y, scale, bias, process_group, chunk, reduction, ids=ids,
                          label_smoothing=float(label_smoothing))  # fmt: skip
    return loss.to(out_dtype)


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale,
    logit_bias,
    *,
    reduction: str = "mean",
    chunk_size: int | None = None,
    negative_only: bool = False,
    process_group=None,
) -> torch.Tensor:
    if process_group is None:
        return functional.siglip_loss(
            image_features, text_features, logit_scale, logit_bias, reduction=reduction,
            chunk_size=chunk_size, negative_only=negative_only,
        )  # fmt: skip
    op = "siglip_loss"
    try:
        _check_local_rows(op, image_features)
        x, y, scale, bias, chunk, out_dtype = prepare(
            op, image_features, text_features, logit_scale, logit_bias, reduction, chunk_size
        )
        check_bool(op, "negative_only", negative_only)
        if negative_only:
            raise ValueError(f"{op}: negative_only does not apply with a process_group")
    except Exception as exc:
        report_local_error(op, process_group, image_features, exc)
    return siglip_loss_ring(x, y, scale, bias, process_group, chunk, reduction).to(out_dtype)


def _check_local_rows(op: str, features) -> None:
    """The ring needs a row on every rank: an empty shard is refused as such (the global
    loss would be defined, but not by "an empty batch")."""
    if isinstance(features, torch.Tensor) and features.dim() == 2 and features.shape[0] == 0:
        raise ValueError(
            f"{op}: this rank's image_features are empty (local batch 0); the process_group "
            "mode needs at least one sample on every rank"
        )


def _document(fn, single, process_group: str) -> None:
    """``fn``'s docstring: ``single``'s, with the ``process_group`` argument added last to
    its Args section. Both are normalised first (``inspect.cleandoc``, ``textwrap.dedent``):
    Python 3.13 strips a docstring's indentation when it compiles it, 3.12 keeps it."""
    doc = inspect.cleandoc(single.__doc__ or "")
    args = doc.find("\nArgs:\n")
    if args < 0:
        raise RuntimeError(f"{single.__qualname__}'s docstring has no Args section")
    end = doc.find("\n\n", args)
    end = len(doc) if end < 0 else end
    entry = textwrap.indent(textwrap.dedent(process_group).strip("\n"), "    ")
    fn.__doc__ = doc[:end] + "\n" + entry + doc[end:]


_document(clip_loss, functional.clip_loss, """\
        process_group: a torch.distributed group: the features are this rank's shard of the
            global batch, the loss and gradients those of the global batch
            (:mod:`vlmkernels.distributed`); ``ids`` and ``label_smoothing`` apply over the
            global batch, a ``teacher`` is not supported there (NotImplementedError, raised
            on every rank).""")  # fmt: skip
_document(siglip_loss, functional.siglip_loss, """\
        process_group: a torch.distributed group: the loss of the global batch, computed
            on a ring (:mod:`vlmkernels.distributed`). A scalar loss computes its gradients
            in the forward pass, exact when every rank back-propagates the same upstream
            gradient (``loss.backward()`` everywhere); per-rank weights need
            ``reduction="none"``.""")  # fmt: skip

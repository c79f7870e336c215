"""Drop-in replacements for open_clip's ``ClipLoss`` and ``SigLipLoss``.

Same constructor arguments and ``forward`` signature and return values; the loss is
computed by :func:`vlmkernels.clip_loss` / :func:`vlmkernels.siglip_loss`, which never
build the N x N logits. One process (world_size 1) for now: the multi-GPU exchange paths
come in a later release and are refused explicitly rather than run wrong.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.contrastive import clip_loss, siglip_loss


def _refuse_distributed(cls: str, world_size: int) -> None:
    if world_size != 1:
        raise NotImplementedError(
            f"vlmkernels.nn.{cls} supports world_size=1 only in this version (got "
            f"world_size={world_size}); use open_clip.loss.{cls} for multi-GPU training "
            "until the distributed paths land"
        )


class ClipLoss(nn.Module):
    """open_clip ``ClipLoss``: ``(CE(s I T^T [+ b], arange) + CE(s T I^T [+ b], arange)) / 2``.

    ``local_loss``, ``gather_with_grad``, ``cache_labels``, ``rank`` and ``use_horovod`` are
    accepted for compatibility; with one process they do not change the result.
    """

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
    ):
        super().__init__()
        _refuse_distributed("ClipLoss", world_size)
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale,
        logit_bias=None,
        output_dict: bool = False,
    ):
        loss = clip_loss(image_features, text_features, logit_scale, logit_bias)
        return {"contrastive_loss": loss} if output_dict else loss


class SigLipLoss(nn.Module):
    """open_clip ``SigLipLoss``: ``-sum_ij logsigmoid(z_ij (s I_i . T_j + b)) / N``.

    ``cache_labels``, ``rank`` and ``dist_impl`` are accepted for compatibility, and so is
    ``chunk_size`` (newer open_clip releases): this loss is always computed in chunks.
    """

    def __init__(
        self,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        dist_impl: str | None = None,
        chunk_size: int = 0,
    ):
        super().__init__()
        _refuse_distributed("SigLipLoss", world_size)
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = dist_impl or "bidir"
        if self.dist_impl not in ("bidir", "shift", "reduce", "gather"):
            raise ValueError(
                "SigLipLoss: dist_impl must be one of 'bidir', 'shift', 'reduce', 'gather'; "
                f"got {dist_impl!r}"
            )
        self.chunk_size = chunk_size

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale,
        logit_bias,
        output_dict: bool = False,
    ):
        loss = siglip_loss(image_features, text_features, logit_scale, logit_bias)
        return {"contrastive_loss": loss} if output_dict else loss

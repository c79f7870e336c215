"""Contrastive losses over a torch.distributed process group.

``vlmkernels.clip_loss(..., process_group=pg)`` and ``vlmkernels.siglip_loss(...,
process_group=pg)`` (:mod:`.contrastive`) run on a ring of the group's ranks
(:mod:`.ring`): each rank keeps its own features and the text features travel around the
ring, so the loss and gradients are those of the global batch with O(local batch x d)
memory per rank. Without a group they are the single-device losses of
:mod:`vlmkernels.ops.contrastive`.

Every distributed entry point, the ring's and the ``vlmkernels.nn`` modules', starts with
the one consistency exchange of :mod:`.consistency`, so that arguments that differ between
ranks, or fail their checks on one rank, raise the same error on every rank.
"""

from .contrastive import clip_loss, siglip_loss
from .ring import clip_loss_ring, siglip_loss_ring

__all__ = ["clip_loss", "clip_loss_ring", "siglip_loss", "siglip_loss_ring"]

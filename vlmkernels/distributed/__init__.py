"""Contrastive losses over a torch.distributed process group.

``vlmkernels.clip_loss(..., process_group=pg)`` and ``vlmkernels.siglip_loss(...,
process_group=pg)`` call into :mod:`vlmkernels.distributed.ring`: each rank keeps its own
features and the text features travel around a ring of the group's ranks, so the loss and
gradients are those of the global batch with O(local batch x d) memory per rank.

Importing :mod:`vlmkernels` does not import this package; ``clip_loss`` / ``siglip_loss``
import it on their first call with a ``process_group``.
"""

from .ring import clip_loss_ring, siglip_loss_ring

__all__ = ["clip_loss_ring", "siglip_loss_ring"]

"""torch.nn modules built on the vlmkernels ops."""

from .attention import GatedCrossAttentionBlock, MaskedCrossAttention
from .contrastive import ClipLoss, SigLipLoss

__all__ = ["ClipLoss", "GatedCrossAttentionBlock", "MaskedCrossAttention", "SigLipLoss"]

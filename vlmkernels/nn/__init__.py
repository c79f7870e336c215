"""torch.nn modules built on the vlmkernels ops."""

from .contrastive import ClipLoss, SigLipLoss

__all__ = ["ClipLoss", "SigLipLoss"]

"""vlmkernels: Triton and CUDA kernels for vision-language models, as drop-in torch ops.

Importing the package registers its ops in the ``vlmkernels`` torch.library namespace and
changes nothing else in torch or any other library.
"""

__version__ = "0.1.0"

from . import nn  # noqa: E402
from ._backend import BACKENDS, get_backend, use_backend  # noqa: E402
from .integrations.transformers import patch  # noqa: E402
from .ops.contrastive import (  # noqa: E402
    clip_loss,
    clip_loss_with_grads,
    contrastive_cross_entropy,
    siglip_loss,
    siglip_loss_with_grads,
)
from .ops.rope import mrope, mrope_from_positions, rope, vision_rope  # noqa: E402
from .ops.rope_index import get_rope_index  # noqa: E402

__all__ = [
    "BACKENDS",
    "clip_loss",
    "clip_loss_with_grads",
    "contrastive_cross_entropy",
    "get_backend",
    "get_rope_index",
    "mrope",
    "mrope_from_positions",
    "nn",
    "patch",
    "rope",
    "siglip_loss",
    "siglip_loss_with_grads",
    "use_backend",
    "vision_rope",
]

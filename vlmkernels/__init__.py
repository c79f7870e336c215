"""vlmkernels: Triton and CUDA kernels for vision-language models, as drop-in torch ops.

Importing the package registers its ops in the ``vlmkernels`` torch.library namespace and
changes nothing else in torch or any other library.
"""

import os as _os

try:  # first, so that a missing triton (or numpy, for its interpreter) is named with its fix
    import triton as _triton  # noqa: F401
except ModuleNotFoundError as exc:
    if exc.name == "triton":
        _fix = "vlmkernels needs Triton (Linux): pip install 'triton>=3.6,<3.10'"
    elif exc.name == "numpy" and _os.environ.get("TRITON_INTERPRET"):
        _fix = "Triton's interpreter (TRITON_INTERPRET=1) needs numpy: pip install numpy"
    else:
        raise
    raise ModuleNotFoundError(f"{_fix} ({exc})", name=exc.name) from exc

from . import nn, ops
from .core.backend import BACKENDS, get_backend, use_backend
from .core.version import __version__
from .distributed import clip_loss, siglip_loss
from .integrations.transformers import patch, unpatch
from .ops.attention import attention, cross_attention, media_cross_attention
from .ops.connectors import deepstack_add, merger, mlp_projector, pixel_shuffle
from .ops.contrastive import clip_loss_with_grads, contrastive_cross_entropy, siglip_loss_with_grads
from .ops.rope import get_rope_index, mrope, mrope_from_positions, rope, vision_rope
from .ops.tokens import pool_tokens, select_tokens, tome_merge

__all__ = [
    "BACKENDS",
    "__version__",
    "ops",
    "attention",
    "clip_loss",
    "clip_loss_with_grads",
    "contrastive_cross_entropy",
    "cross_attention",
    "deepstack_add",
    "get_backend",
    "get_rope_index",
    "media_cross_attention",
    "merger",
    "mlp_projector",
    "mrope",
    "mrope_from_positions",
    "nn",
    "patch",
    "pixel_shuffle",
    "pool_tokens",
    "rope",
    "select_tokens",
    "siglip_loss",
    "siglip_loss_with_grads",
    "tome_merge",
    "unpatch",
    "use_backend",
    "vision_rope",
]

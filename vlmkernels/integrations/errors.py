"""The errors of the patching mechanism (:mod:`.patching`), in a module of their own so that
the function rebuilding (:mod:`.rebuild`) raises them without importing the engine."""

from __future__ import annotations

__all__ = [
    "AlreadyPatchedError",
    "UnsupportedLayoutError",
    "UnsupportedModelError",
    "WrappedLayerError",
]


class UnsupportedModelError(TypeError):
    """The object is not a model architecture the patch knows."""


class UnsupportedLayoutError(RuntimeError):
    """The installed library lays the model out in a way the patch does not know."""


class WrappedLayerError(UnsupportedLayoutError):
    """A layer of a known layout was wrapped or replaced in this instance (FSDP's
    ``fully_shard`` on the layer, tensor parallelism, a PEFT adapter, a quantised linear):
    a fused forward that reads its parameters would bypass the wrapper."""


class AlreadyPatchedError(RuntimeError):
    """The instance (or part of it) is already patched by vlmkernels."""

"""Integrations with model libraries: per-instance patches that run their models on the
vlmkernels ops. Importing this package imports none of those libraries."""

from .transformers import PatchHandle, patch

__all__ = ["PatchHandle", "patch"]

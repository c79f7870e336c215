"""Triton building blocks shared between op families (:mod:`.blocks`).

The layer between :mod:`vlmkernels.core` (backend choice, checks, op definition, tuning)
and the families under :mod:`vlmkernels.ops`, which build their kernels from these.
"""

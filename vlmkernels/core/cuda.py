"""The CUDA C++ backend: the compiled extension ``vlmkernels._C`` (``csrc/<family>/``,
built by setup.py where torch has CUDA and nvcc is present).

The extension is imported on first use (:func:`status`, or a family's launcher), never by
``import vlmkernels``. Importing it registers each family's ``torch.ops.vlmkernels.*_cuda_``
ops (CUDA, and Meta for the checks) beside the Python custom ops of the namespace.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util

import torch


def _not_built_reason() -> str:
    if not torch.version.cuda:
        return f"not built: torch {torch.__version__} has no CUDA"
    return (
        "not built: setup.py skipped or failed it (its reason is in the install log); rebuild "
        "with nvcc found: pip install -e . --no-deps --no-build-isolation"
    )


@functools.cache
def status() -> tuple[bool, str]:
    """(available, reason): whether ``vlmkernels._C`` is built and loads here, e.g.
    ``(False, "not built: torch 2.13.0+cpu has no CUDA")`` or
    ``(True, "built for sm_80, sm_90a (CUDA runtime 13.0)")``."""
    if importlib.util.find_spec("vlmkernels._C") is None:
        return False, _not_built_reason()
    try:
        ext = importlib.import_module("vlmkernels._C")
    except ImportError as exc:
        return False, f"vlmkernels._C is built but does not load: {exc}"
    archs = ", ".join(a for a in str(getattr(ext, "cuda_archs", "unknown")).split("__") if a)
    version = int(getattr(ext, "cuda_runtime_version", 0))
    return True, f"built for {archs} (CUDA runtime {version // 1000}.{version % 1000 // 10})"


def require(op: str) -> None:
    """Raises, naming ``op`` and the reason, when the extension is unavailable."""
    ok, why = status()
    if not ok:
        raise RuntimeError(f"{op}: the 'cuda' backend is unavailable: {why}")

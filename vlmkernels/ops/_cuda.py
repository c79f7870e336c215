"""The CUDA C++ backend: the compiled extension ``vlmkernels._C`` (csrc/, built by setup.py
where torch has CUDA and nvcc is present) and Python launchers with the Triton launchers'
signatures.

The extension is imported on first use (:func:`status`, or a launcher), never by
``import vlmkernels``. Importing it registers ``torch.ops.vlmkernels.rope_cuda_`` (CUDA, and
Meta for the checks) beside the Python custom ops of the namespace.
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


def _require(op: str) -> None:
    ok, why = status()
    if not ok:
        raise RuntimeError(f"{op}: the 'cuda' backend is unavailable: {why}")


def rope_launch(q, k, qo, ko, *, table=None, positions=None, inv_freq=None, mode=0,
                sections=(0, 0, 0), scaling=1.0, backward=False):  # fmt: skip
    """:func:`vlmkernels.ops.rope._launch` on the CUDA C++ kernels (csrc/rope.cu): rotates
    canonical (B, S, H, D) views q, k into qo, ko (which may be q, k: in place), from
    ``table`` = (cos, sin), each (A, B, S, R), or from (3, B, S) ``positions`` and
    (R / 2,) ``inv_freq``."""
    _require("rope")
    if not q.is_cuda:
        raise RuntimeError(f"rope: the 'cuda' backend needs CUDA tensors, got {q.device}")
    cos, sin = table if table is not None else (None, None)
    if positions is not None and positions.dtype not in (torch.int32, torch.int64):
        positions = positions.long()  # the kernels read int32 or int64 positions
    torch.ops.vlmkernels.rope_cuda_(
        q, k, qo, ko, cos, sin, positions, inv_freq,
        int(mode), [int(v) for v in sections], float(scaling), bool(backward),
    )  # fmt: skip

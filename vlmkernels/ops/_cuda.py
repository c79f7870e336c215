"""The CUDA C++ backend: the compiled extension ``vlmkernels._C`` (built by setup.py where
torch has CUDA and nvcc is present) and Python launchers with the Triton launchers'
signatures."""

from __future__ import annotations

import functools
import importlib


@functools.cache
def status() -> tuple[bool, str]:
    """(available, reason): whether the extension is built and importable here."""
    try:
        importlib.import_module("vlmkernels._C")
    except ImportError as exc:
        return False, f"the CUDA C++ extension vlmkernels._C is not built ({exc})"
    return True, "vlmkernels._C loaded"


def rope_launch(q, k, qo, ko, *, table=None, positions=None, inv_freq=None, mode=0,
                sections=(0, 0, 0), scaling=1.0, backward=False):  # fmt: skip
    """:func:`vlmkernels.ops.rope._launch` on the CUDA C++ kernels."""
    ok, why = status()
    if not ok:
        raise RuntimeError(f"rope: the 'cuda' backend is unavailable: {why}")
    raise NotImplementedError("rope: the CUDA C++ rotary kernels are not built into this version")

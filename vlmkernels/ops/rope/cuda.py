"""The rotary ops on the CUDA C++ kernels (``csrc/rope/``, op ``vlmkernels::rope_cuda_``
registered by the extension), with the Triton launcher's signature."""

from __future__ import annotations

import torch

from ...core.cuda import require


def rope_launch(q, k, qo, ko, *, table=None, positions=None, inv_freq=None, mode=0,
                sections=(0, 0, 0), scaling=1.0, backward=False):  # fmt: skip
    """:func:`.kernels.launch` on the CUDA C++ kernels (csrc/rope/rope.cu): rotates
    canonical (B, S, H, D) views q, k into qo, ko (which may be q, k: in place), from
    ``table`` = (cos, sin), each (A, B, S, R), or from (3, B, S) ``positions`` and
    (R / 2,) ``inv_freq``."""
    require("rope")
    if not q.is_cuda:
        raise RuntimeError(f"rope: the 'cuda' backend needs CUDA tensors, got {q.device}")
    _launch_op(q, k, qo, ko, table=table, positions=positions, inv_freq=inv_freq, mode=mode,
               sections=sections, scaling=scaling, backward=backward)  # fmt: skip


def _launch_op(q, k, qo, ko, *, table, positions, inv_freq, mode, sections, scaling, backward):
    """The op call of :func:`rope_launch` (tests run it on CPU tensors, over the binding
    built for the CPU)."""
    cos, sin = table if table is not None else (None, None)
    if positions is not None and positions.dtype not in (torch.int32, torch.int64):
        positions = positions.long()  # the kernels read int32 or int64 positions
    torch.ops.vlmkernels.rope_cuda_(
        q, k, qo, ko, cos, sin, positions, inv_freq,
        int(mode), [int(v) for v in sections], float(scaling), bool(backward),
    )  # fmt: skip

"""The rotary ops on the CUDA C++ kernels (``csrc/rope/``, op ``vlmkernels::rope_cuda_``
registered by the extension), with the Triton launcher's signature."""

from __future__ import annotations

import torch

from ...core.cuda import require
from .layout import PAIRS  # the CUDA C++ kernels rotate halves only

_DATA = (torch.float32, torch.float16, torch.bfloat16)  # q, k (tables: float64 too)


def rope_launch(q, k, qo, ko, *, table=None, positions=None, inv_freq=None, mode=0,
                sections=(0, 0, 0), scaling=1.0, backward=False):  # fmt: skip
    """:func:`.kernels.launch` on the CUDA C++ kernels (csrc/rope/rope.cu): rotates
    canonical (B, S, H, D) views q, k into qo, ko (which may be q, k: in place), from
    ``table`` = (cos, sin), each (A, B, S, R), or from (3, B, S) ``positions`` and
    (R / 2,) ``inv_freq``."""
    if mode & PAIRS:
        raise RuntimeError("rope: the 'cuda' backend rotates halves only; paired lanes "
                           "(pairs=True) run on the 'triton' backend")  # fmt: skip
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


def fits(q, k, qo, ko, *, table=None, inv_freq=None, **kwargs) -> bool:
    """Whether the CUDA C++ kernels take a call of :func:`rope_launch` (csrc/rope/rope.h's
    limits: rotate-half lanes, q, k in fp32 / fp16 / bf16, tables in those or fp64, at most
    16384 heads and a head dim of 65536, at most 256 accesses per half head vector). The
    Triton kernel takes every call the public functions pass; with the backend not forced,
    the others run there (:func:`.ops._cuda_or_triton`)."""
    if kwargs.get("mode", 0) & PAIRS:
        return False
    if q.dtype not in _DATA or k.dtype not in _DATA:
        return False
    if table is not None and any(t.dtype not in (*_DATA, torch.float64) for t in table):
        return False
    if q.shape[2] + k.shape[2] > 1 << 14 or q.shape[3] > 1 << 16:
        return False
    rot = table[0].shape[-1] if table is not None else 2 * inv_freq.numel()
    if rot // 2 <= 256:  # one lane per thread fits whatever the access width
        return True
    try:  # wider: the access width decides (the layout's strides and alignment)
        torch.ops.vlmkernels.rope_cuda_plan(q, k, qo, ko, rot)
    except RuntimeError:
        return False
    return True

"""Memory overlap checks for ops that write their inputs in place.

An in-place op must refuse tensors whose elements alias: an expanded view (stride 0) or a
self-overlapping view would be written more than once, and two written tensors (or a written
one and an input it reads) sharing elements would read values already written. Views that
share a storage without sharing elements, such as q and k sliced from one packed qkv
projection, are fine.

The check is exact. It is free for tensors in different storages whose strides provably do
not overlap (the usual case); otherwise it marks the element offsets of each tensor in the
shared span and counts, which costs O(numel) work on the tensors' device and one host sync.
"""

from __future__ import annotations

import torch

from .runtime import tracing

__all__ = ["check_no_overlap"]


def _provably_disjoint_strides(t: torch.Tensor) -> bool:
    """Sufficient for no internal overlap: sorted by stride, each dim of size > 1 steps past
    everything the smaller dims reach."""
    reach = 0
    for size, stride in sorted(
        ((n, abs(s)) for n, s in zip(t.shape, t.stride(), strict=True) if n > 1),
        key=lambda d: d[1],
    ):
        if stride <= reach:
            return False
        reach += stride * (size - 1)
    return True


def _extent(t: torch.Tensor) -> tuple[int, int]:
    """[first, last] element offsets ``t`` touches in its storage (element units)."""
    lo = hi = t.storage_offset()
    for size, stride in zip(t.shape, t.stride(), strict=True):
        if size > 1:
            lo += min(0, stride * (size - 1))
            hi += max(0, stride * (size - 1))
    return lo, hi


def _offsets(t: torch.Tensor) -> torch.Tensor:
    """Storage offset (element units) of every element of ``t``, flattened, int64."""
    offsets = torch.full((), t.storage_offset(), dtype=torch.long, device=t.device)
    for dim, (size, stride) in enumerate(zip(t.shape, t.stride(), strict=True)):
        shape = [1] * t.dim()
        shape[dim] = size
        offsets = offsets + (torch.arange(size, device=t.device) * stride).view(shape)
    return offsets.reshape(-1)


def _unwrapped(t: torch.Tensor) -> torch.Tensor:
    """The plain tensor a functorch-wrapped one (a vmap BatchedTensor, a grad transform's
    tensor) stands for, with its storage."""
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


def check_no_overlap(op: str, written: dict[str, torch.Tensor], read=None) -> None:
    """Raises ``ValueError`` naming the arguments if an element of a ``written`` tensor is
    reached twice: by two of its own indices, by another written tensor, or by a ``read``
    tensor (inputs the op reads while it writes). Empty tensors alias nothing.

    While torch.compile traces, only the same tensor passed twice is refused: the rest of
    the check reads storage pointers and offsets, which Dynamo cannot trace (other overlaps
    are then not detected). Under functorch transforms (vmap) the tensors they wrap are
    checked: a write to each sample's slice is a write to the whole."""
    read = read or {}
    compiling = tracing()
    if not compiling and torch._C._are_functorch_transforms_active():
        written = {n: _unwrapped(t) for n, t in written.items()}
        read = {n: _unwrapped(t) for n, t in read.items()}
    for name, t in written.items():
        if compiling:  # offsets cannot be traced
            break
        if t.numel() > 1 and not _provably_disjoint_strides(t) and _has_duplicates(t):
            raise ValueError(
                f"{op}: {name} (shape {tuple(t.shape)}, strides {t.stride()}) reaches some "
                f"elements more than once (an expanded or overlapping view); in place, they "
                f"would be written more than once. Pass a tensor without self-overlap or use "
                f"inplace=False"
            )
    tensors = [(n, t, True) for n, t in written.items()] + [(n, t, False) for n, t in read.items()]
    if not compiling:
        tensors = [(n, t, w) for n, t, w in tensors if t.numel() > 0]
    for i, (name_a, a, writes_a) in enumerate(tensors):
        for name_b, b, writes_b in tensors[i + 1 :]:
            if not (writes_a or writes_b):
                continue
            if compiling:  # identity only: storage pointers cannot be traced
                if a is b:
                    raise ValueError(
                        f"{op}: {name_a} and {name_b} are the same tensor; in place, it "
                        f"would be written while it is read. Pass tensors that do not "
                        f"overlap or use inplace=False"
                    )
            elif a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and (
                _shares_elements(a, b)
            ):
                raise ValueError(
                    f"{op}: {name_a} and {name_b} share memory; in place, "
                    f"{name_a if writes_a else name_b} would be written while it is read. "
                    f"Pass tensors that do not overlap or use inplace=False"
                )


def _has_duplicates(t: torch.Tensor) -> bool:
    offsets = _offsets(t)
    return bool(offsets.unique().numel() != offsets.numel())


def _shares_elements(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors on one storage share a byte (exact)."""
    sa, sb = a.element_size(), b.element_size()
    (lo_a, hi_a), (lo_b, hi_b) = _extent(a), _extent(b)
    lo_a, hi_a, lo_b, hi_b = lo_a * sa, (hi_a + 1) * sa, lo_b * sb, (hi_b + 1) * sb
    if hi_a <= lo_b or hi_b <= lo_a:
        return False
    lo, hi = min(lo_a, lo_b), max(hi_a, hi_b)
    marks = torch.zeros(hi - lo, dtype=torch.int8, device=a.device)

    def bytes_of(t, size):
        starts = _offsets(t) * size - lo
        return (starts[:, None] + torch.arange(size, device=t.device)).reshape(-1)

    marks[bytes_of(a, sa)] = 1
    return bool(marks[bytes_of(b, sb)].any())

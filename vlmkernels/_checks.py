"""Argument checks run before any kernel launch; each error names the argument at fault."""

from __future__ import annotations

import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _dtype_names(dtypes) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def check_feature_pair(
    op: str, a: torch.Tensor, b: torch.Tensor, names=("image_features", "text_features")
):
    """Two (N, d) floating tensors with the same N, d, dtype and device, N and d > 0."""
    for t, name in zip((a, b), names, strict=True):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"{op}: {name} must be a floating tensor ({_dtype_names(FLOAT_DTYPES)}), "
                f"got {t.dtype}"
            )
        if t.dim() != 2:
            raise ValueError(f"{op}: {name} must be 2-D (batch, dim), got shape {tuple(t.shape)}")
        if t.shape[0] == 0:
            raise ValueError(f"{op}: {name} is empty (batch size 0); the loss is undefined")
        if t.shape[1] == 0:
            raise ValueError(f"{op}: {name} has feature dim 0")
    da, db = a.shape, b.shape
    if da[0] != db[0]:
        raise ValueError(
            f"{op}: {names[0]} and {names[1]} must have the same batch size, "
            f"got {da[0]} and {db[0]}"
        )
    if da[1] != db[1]:
        raise ValueError(
            f"{op}: {names[0]} and {names[1]} must have the same feature dim, "
            f"got {da[1]} and {db[1]}"
        )
    if a.dtype != b.dtype:
        raise TypeError(
            f"{op}: {names[0]} and {names[1]} must have the same dtype, got {a.dtype} and {b.dtype}"
        )
    if a.device != b.device:
        raise ValueError(
            f"{op}: {names[0]} and {names[1]} must be on the same device, "
            f"got {a.device} and {b.device}"
        )


def scalar_tensor(op: str, name: str, value, device: torch.device, optional: bool = False):
    """``value`` (a Python number or a one-element floating tensor) as a 0-d tensor on ``device``.

    Tensors keep their autograd history (reshape and device moves are differentiable), so
    a learnable ``logit_scale`` receives its gradient.
    """
    if value is None:
        if optional:
            return None
        raise TypeError(f"{op}: {name} is required, got None")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"{op}: {name} must be a scalar (a 0-d or one-element tensor or a float), "
                f"got a tensor of shape {tuple(value.shape)}"
            )
        if not value.dtype.is_floating_point:
            raise TypeError(f"{op}: {name} must be a floating tensor, got {value.dtype}")
        value = value.reshape(())
        if value.device != device:
            value = value.to(device)
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a float or a 0-d tensor, got {type(value).__name__}")
    return torch.tensor(float(value), dtype=torch.float32, device=device)


REDUCTIONS = ("mean", "sum", "none")


def check_reduction(op: str, reduction) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def check_chunk_size(op: str, chunk_size) -> int:
    """0 means 'choose from the memory budget'."""
    if chunk_size is None:
        return 0
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be a positive int or None, got {chunk_size!r}")
    return chunk_size

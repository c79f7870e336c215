"""Gemma 3's multimodal projector in the connector family's tables of the transformers
integration: ``Gemma3MultiModalProjector`` (Gemma 3, and the models built on its classes:
MedGemma, ShieldGemma 2) and T5Gemma 2's ``T5Gemma2MultiModalProjector`` (the same code).

Part ``connector`` (a keyword of :func:`vlmkernels.patch`). transformers' forward, on the
SigLIP features x (B, P^2, C) of a P x P patch grid (P = image_size / patch_size, 64 in the
released configs) with the pooled grid t x t (t^2 = ``mm_tokens_per_image``, 256) and
k = P / t:

    pooled = AvgPool2d(k)(x as (B, C, P, P))                 a channels-first copy first
    normed = x / sqrt(mean(x^2) + eps) * (1 + w)             fp32, rounded to x's dtype
    y = normed @ W                                           W (C, D), no bias

The patched forward runs :func:`vlmkernels.pool_tokens` (``kind="avg"``: one pass over the
features, no channels-first copy; fp32 sums in AvgPool2d's order) and one
:func:`~vlmkernels.ops.connectors.merger` on the pooled rows (the RMSNorm's statistics in
the GEMM, with the weight (1 + w) formed in fp32 as Gemma's norm forms it). Outputs and the
gradients of x, W and w match transformers (bf16 to its rounding: the norm's weight is
folded into W, so 16-bit results are not bitwise transformers').

The class's own forward runs (raising where transformers raises) for a grid that is not P
x P (or is empty), a pooling with another padding, stride, ``ceil_mode`` or divisor, a
kernel below 1 (torch's errors), or a kernel that does not divide P (AvgPool2d drops the
last rows), W and x of two dtypes outside autocast (or under it, two it does not cast to
one: float64, integers), weights whose shapes are not (C,) and (C, D) for the features' C
channels (transformers broadcasts the norm's weight and matmul takes a vector or a stack
of matrices), and tensor-subclass weights, each with a
:class:`~vlmkernels.integrations.patching.PatchFallbackWarning`. Roots: the Gemma 3 and
T5Gemma 2 models and the projectors themselves, or any model holding one.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from ...ops.connectors import merger
from ...ops.tokens import pool_tokens
from ..patching import (
    Patcher,
    SetMethod,
    UnsupportedLayoutError,
    class_forward,
    exact_layer,
    fused_forward,
    mixed_dtypes,
    not_plain,
    other_device,
    register,
)
from .connectors import TESTED_VERSIONS, _arch, _one_input, _where

__all__ = ["GEMMA3_PROJECTOR_PATCHER"]


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _unfused(module, x) -> str | None:
    """Why the fused forward cannot give transformers' result for ``x``, or None."""
    pool, w = module.avg_pool, module.mm_input_projection_weight
    side = module.patches_per_image
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[1] != side * side:
        return f"the features are not (B, {side} x {side} patches, C)"
    kernel, stride = _pair(pool.kernel_size), _pair(pool.stride)
    if (stride != kernel or _pair(pool.padding) != (0, 0) or pool.ceil_mode
            or pool.divisor_override is not None):  # fmt: skip
        return f"avg_pool is {pool!r}, not a mean of disjoint blocks"
    if not (len(kernel) == 2 and all(isinstance(k, int) and k >= 1 for k in kernel)
            and isinstance(side, int) and side >= 1):  # fmt: skip
        # a kernel of 0 (tokens_per_side above patches_per_image), an empty grid: torch's errors
        return f"avg_pool's kernel {kernel} on the {side} x {side} grid is not k x k blocks, k >= 1"
    if side % kernel[0] or side % kernel[1]:
        return f"the {kernel} pooling does not divide the {side} x {side} grid"
    # (the norm's weight: the guard of mm_soft_emb_norm, a part, checks it)
    if (why := not_plain("mm_input_projection_weight", w)) is not None:
        return why
    c, norm_w = x.shape[2], module.mm_soft_emb_norm.weight
    if tuple(norm_w.shape) != (c,) or w.dim() != 2 or w.shape[0] != c:
        # transformers broadcasts the norm's weight, takes a vector or a batch of matrices
        # as W (matmul), or raises its own error
        return (f"the weights' shapes {tuple(norm_w.shape)} and {tuple(w.shape)} do not "
                f"take {c} channels as ({c},) and ({c}, D)")  # fmt: skip
    return (other_device(x, norm_w, "mm_soft_emb_norm") or other_device(x, w, "the projection")
            or mixed_dtypes(x, w, "the projection"))  # fmt: skip


def _gemma3_forward(module, arch):
    """The fused forward of a Gemma 3 projector (see the module's docstring)."""
    where = _where(module)
    norm_cls = Patcher.cls(sys.modules[arch.module], arch.data["norm"])
    exact_layer(module.mm_soft_emb_norm, norm_cls, f"{where}.mm_soft_emb_norm")
    exact_layer(module.avg_pool, nn.AvgPool2d, f"{where}.avg_pool")
    w = getattr(module, "mm_input_projection_weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise UnsupportedLayoutError(f"{where}.mm_input_projection_weight is not a 2-D tensor")

    def fused(self, x):
        why = _unfused(self, x)
        if why is not None:
            return class_forward(self, why, x)
        norm, w = self.mm_soft_emb_norm, self.mm_input_projection_weight
        b, _, c = x.shape
        side = self.patches_per_image
        kh, kw = _pair(self.avg_pool.kernel_size)
        h, wd = side // kh, side // kw
        pooled = pool_tokens(x, (side, side), "avg", (h, wd))
        y = merger(pooled.reshape(b * h * wd, c), w.t(), norm="rmsnorm",
                   norm_weight=1.0 + norm.weight.float(), eps=norm.eps, merge_size=1)  # fmt: skip
        return y.view(b, h * wd, w.shape[1]).type_as(x)

    return fused_forward(module, ("mm_soft_emb_norm", "avg_pool"), _one_input(module, fused))


GEMMA3_PROJECTOR_PATCHER = register(
    Patcher(
        "transformers",
        TESTED_VERSIONS,
        tuple(
            _arch(
                key,
                prefix,
                "projector",
                f"{prefix}MultiModalProjector",
                data={"norm": f"{prefix}RMSNorm"},
            )
            for key, prefix in (("gemma3", "Gemma3"), ("t5gemma2", "T5Gemma2"))
        ),
        (SetMethod("connector", "projector", "forward", _gemma3_forward),),
    )
)

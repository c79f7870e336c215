"""Mistral 3's multimodal projector in the connector family's tables of the transformers
integration (part ``connector`` of :func:`vlmkernels.patch`): ``Mistral3MultiModalProjector``
(Mistral Small 3.1 / 3.2, Magistral Small), and the same code in LightOnOCR's and Mistral
Large 4's projectors.

transformers' forward, on the Pixtral features (P, C) of the images of ``image_sizes``
(pixels; (h, w) = size // patch_size patches each, P = sum of h w) with the merge window
s x s (``spatial_merge_size``, 2):

    x = RMSNorm(features)                                    per patch (Llama's rounding)
    X = unfold(x of each image as (C, h, w), s, stride s)    (h w / s^2, C s^2) rows: a copy
    y = GELU(X Wm^T W1^T + b1) W2^T + b2                      via Linear(C s^2 -> C), no bias

where ``unfold`` orders each row channel-major, X[r, c s^2 + dr s + dc]. The patched forward
runs, per image, one :func:`~vlmkernels.ops.connectors.merger` of layout "grid" on the
(1, h, w, C) view (the RMSNorm in the GEMM's prologue, the windows read through its
addressing, never copied) with Wm's columns put in the merger's patch-major order
(Wm viewed (C, C, s^2), transposed to (C, s^2, C): one copy of Wm per call, in the graph),
then one :func:`~vlmkernels.ops.connectors.mlp_projector` over every image's rows. Outputs
and the gradients of the features and every weight match transformers (16-bit to its
rounding: the norm rounds once, where Llama's rounds before its weight).

Features that are not (P, C), features and the merging layer of two dtypes outside autocast
(or under it, two it does not cast to one: float64, integers), sizes whose patches do not
add up to P, and a side the window does not divide (``unfold`` would drop its last
patches) run the class's forward (with a
:class:`~vlmkernels.integrations.patching.PatchFallbackWarning`). Roots: the models,
the projectors themselves, or any model holding one.
"""

from __future__ import annotations

import sys

import torch

from ...ops.connectors import mlp_projector
from ..patching import (
    Patcher,
    SetMethod,
    UnsupportedLayoutError,
    class_forward,
    exact_layer,
    fused_forward,
    promoted_norm,
    register,
)
from .connector_layouts import merge_per_image, patch_major
from .connectors import TESTED_VERSIONS, _arch, _check_mlp, _linear, _where

__all__ = ["MISTRAL3_PROJECTOR_PATCHER"]


def _grids(features, image_sizes, patch: int, s: int, wm, norm_weight) -> list | str:
    """The (h, w) patch grid of each image where the fused forward serves them, else why
    not."""
    if not isinstance(features, torch.Tensor) or features.dim() != 2:
        return "the features are not (patches, channels)"
    if (why := promoted_norm(features, norm_weight, "RMSNorm")) is not None:
        return why
    sizes = image_sizes.tolist() if isinstance(image_sizes, torch.Tensor) else image_sizes
    try:
        if any(isinstance(v, float) or torch.is_tensor(v) and v.is_floating_point()
               for size in sizes for v in size):  # fmt: skip
            return "image_sizes holds floats"  # transformers' split takes ints only
        grids = [(int(h) // patch, int(w) // patch) for h, w in sizes]
    except (TypeError, ValueError):
        return "image_sizes is not a list of (height, width)"
    if sum(h * w for h, w in grids) != features.shape[0]:
        return "the image sizes do not hold the features' patches"
    if any(h % s or w % s for h, w in grids):
        return f"a patch grid is not made of {s} x {s} windows"
    return grids


def _mistral3_forward(module, arch):
    where = _where(module)
    norm_cls = Patcher.cls(sys.modules[arch.module], arch.data["norm"])
    exact_layer(module.norm, norm_cls, f"{where}.norm")
    merging = _linear(module.patch_merger, "merging_layer", f"{where}.patch_merger")
    _check_mlp(module)
    if merging.bias is not None or module.linear_1.in_features != merging.out_features:
        raise UnsupportedLayoutError(
            f"{where}: linear_1 does not take the patch merger's {merging.out_features} "
            "features, or the merger has a bias"
        )

    def forward(self, image_features, image_sizes):
        pm = self.patch_merger
        s = pm.spatial_merge_size
        grids = _grids(image_features, image_sizes, pm.patch_size, s, pm.merging_layer.weight,
                       self.norm.weight)  # fmt: skip
        if isinstance(grids, str):
            return class_forward(self, grids, image_features, image_sizes)
        norm, wm, l1, l2 = self.norm, pm.merging_layer.weight, self.linear_1, self.linear_2
        c = image_features.shape[1]
        merged = merge_per_image(image_features, [(1, h, w) for h, w in grids],
                                 patch_major(wm, c, s), merge_size=(s, s), norm="rmsnorm",
                                 norm_weight=norm.weight, eps=norm.variance_epsilon)  # fmt: skip
        return mlp_projector(merged, l1.weight, l1.bias, l2.weight, l2.bias)

    parts = ("norm", "patch_merger", "patch_merger.merging_layer", "linear_1", "act", "linear_2")
    return fused_forward(module, parts, forward)


def _mistral3_arch(key, prefix):
    return _arch(key, prefix, "projector", f"{prefix}MultiModalProjector",
                 data={"norm": f"{prefix}RMSNorm"})  # fmt: skip


MISTRAL3_PROJECTOR_PATCHER = register(
    Patcher(
        "transformers",
        TESTED_VERSIONS,
        (
            _mistral3_arch("mistral3", "Mistral3"),
            _mistral3_arch("lighton_ocr", "LightOnOcr"),
            _mistral3_arch("mistral_large4", "MistralLarge4"),
        ),
        (SetMethod("connector", "projector", "forward", _mistral3_forward),),
    )
)

"""PaddleOCR-VL's projector in the connector family's tables of the transformers integration
(part ``connector`` of :func:`vlmkernels.patch`): ``PaddleOCRProjector``.

transformers' forward, on the features (P, C) of the images of ``image_grid_thw`` (rows
(t, h, w), P = sum of t h w) with the merge window (m1, m2) (``merge_kernel_size``, 2 x 2):
per image, the LayerNorm ``pre_norm`` of each patch, the m1 x m2 windows of its (t, h, w)
grid side by side ((t h w / (m1 m2), m1 m2 C): a reshape and a transposed copy), Linear +
exact GELU + Linear; the images' rows concatenated. The patched forward runs one
:func:`~vlmkernels.ops.connectors.merger` per image (layout "grid" on the (t, h, w, C) view:
the LayerNorm in the first GEMM's prologue, the windows read through its addressing, never
copied), then the same concatenation. Outputs and the gradients of the features and every
weight match transformers.

Features that are not (P, C), features and weights of two dtypes outside autocast (or under
it, two it does not cast to one: float64, integers), a grid row count or sizes
transformers' split and reshape refuse, run the class's forward (its errors), with a
:class:`~vlmkernels.integrations.patching.PatchFallbackWarning`. Roots: PaddleOCR-VL's
models, the projector itself, or any model holding one.
"""

from __future__ import annotations

import torch

from ..patching import Patcher, SetMethod, class_forward, fused_forward, register
from .connector_layouts import merge_per_image
from .connectors import TESTED_VERSIONS, _arch, _check_norm_mlp

__all__ = ["PADDLEOCR_PROJECTOR_PATCHER"]


def _grids(features, grid_thw, window, w1) -> list | str:
    """The (t, h, w) rows of ``grid_thw`` where the fused forward serves them, else why
    not."""
    if not isinstance(features, torch.Tensor) or features.dim() != 2:
        return "the features are not (patches, channels)"
    if not isinstance(grid_thw, torch.Tensor) or grid_thw.dim() != 2 or grid_thw.shape[1] != 3:
        return "image_grid_thw is not (images, 3)"
    grids = grid_thw.tolist()  # (transformers' split reads the sizes on the host too)
    m1, m2 = window
    if sum(t * h * w for t, h, w in grids) != features.shape[0]:
        return "the grids do not hold the features' patches"
    if any(t < 1 or h % m1 or w % m2 for t, h, w in grids):
        return f"a grid is not made of {m1} x {m2} windows"
    return grids


def _paddleocr_forward(module, arch):
    _check_norm_mlp(module, "pre_norm")

    def forward(self, image_features, image_grid_thw):
        window = tuple(self.merge_kernel_size)
        grids = _grids(image_features, image_grid_thw, window, self.linear_1.weight)
        if isinstance(grids, str):
            return class_forward(self, grids, image_features, image_grid_thw)
        ln, l1, l2 = self.pre_norm, self.linear_1, self.linear_2
        return merge_per_image(image_features, grids, l1.weight, l1.bias, l2.weight, l2.bias,
                               merge_size=window, norm="layernorm", norm_weight=ln.weight,
                               norm_bias=ln.bias, eps=ln.eps)  # fmt: skip

    return fused_forward(module, ("pre_norm", "linear_1", "act", "linear_2"), forward)


PADDLEOCR_PROJECTOR_PATCHER = register(
    Patcher(
        "transformers",
        TESTED_VERSIONS,
        (_arch("paddleocr_vl", "PaddleOCRVL", "projector", "PaddleOCRProjector"),),
        (SetMethod("connector", "projector", "forward", _paddleocr_forward),),
    )
)

"""HunYuan-V4-VL's vision patch merger in the connector family's tables of the transformers
integration (part ``connector`` of :func:`vlmkernels.patch`): ``HYV4VLVisionPatchMerger``.

transformers' forward, on one image's (or video's) features (1, t h w, C) with
``size`` = (h, w) and the merge window s = ``spatial_merge_size`` (2):

    x = RMSNorm(features)                          per patch (Llama's rounding)
    y = Conv2d(C -> s^2 C, kernel s, stride s)(x)  of each frame: a merge and a Linear
    y = Conv2d(s^2 C -> D, kernel 1)(GELU(y))      a Linear
    each row of the (h/s, w/s) grid followed by ``image_newline``; (1, t h/s (w/s + 1), D)

The patched forward runs one :func:`~vlmkernels.ops.connectors.merger` of layout "grid"
on the (t, h, w, C) view (the RMSNorm in the first GEMM's prologue, the s x s windows read
through its addressing; the convolutions' weights as Linear weights, the first one's taps
put in the merger's patch-major order: one copy of it per call, in the graph), then the
newline column (one concatenation, as transformers'). Outputs and the gradients of the
features and every weight match transformers (16-bit to its rounding).

Features whose size is not t h w C, a side s does not divide (the convolution drops the
last patches), no patches, sizes that are not ints, convolutions of other strides, paddings,
dilations or groups, weights of a dtype or shape transformers' calls refuse, broadcast or
reshape run the class's forward, with a
:class:`~vlmkernels.integrations.patching.PatchFallbackWarning`. Roots: the HunYuan-V4-VL
models and vision model, the merger itself, or any model holding one.
"""

from __future__ import annotations

import operator
import sys

import torch
from torch import nn

from ...ops.connectors import merger
from ..patching import (
    Patcher,
    SetMethod,
    class_forward,
    exact_layer,
    fused_forward,
    other_device,
    promoted_norm,
    register,
)
from .connector_layouts import patch_major
from .connectors import TESTED_VERSIONS, _arch, _exact_gelu, _where

__all__ = ["HY_V4_VL_MERGER_PATCHER"]


def _conv_is_linear(conv: nn.Conv2d, k: int) -> bool:
    """Whether ``conv`` is a Linear on each disjoint k x k window (stride = kernel = k)."""
    return (tuple(conv.kernel_size) == (k, k) and tuple(conv.stride) == (k, k)
            and tuple(conv.padding) == (0, 0) and tuple(conv.dilation) == (1, 1)
            and conv.groups == 1)  # fmt: skip


def _unfused(module, x, size) -> str | None:
    s = module.spatial_merge_size
    conv, out = module.proj_conv, module.proj_out
    if not (_conv_is_linear(conv, s) and _conv_is_linear(out, 1)):
        return "a convolution is not a Linear on disjoint windows"
    try:  # (transformers' reshape takes ints, or integer tensors of one element, not floats)
        h, w = (operator.index(v) for v in size)
    except (TypeError, ValueError, RuntimeError):
        return "size is not (h, w) of ints"
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or h < 1 or w < 1 or x.numel() == 0:
        # (no patches: transformers' last reshape of 0 elements raises)
        return "the features are not (..., patches, channels) of an (h, w) grid"
    norm = module.before_rms.weight
    why = (other_device(x, norm, "the RMSNorm")
           or other_device(x, module.image_newline, "image_newline")
           or promoted_norm(x, norm, "RMSNorm"))  # fmt: skip
    if why is not None:
        return why
    c = x.shape[-1]
    if c != conv.in_channels or x.numel() % (h * w * c) or h % s or w % s:
        return f"the features are not frames of {h} x {w} patches in {s} x {s} windows"
    # weights of the shapes the fused forward reads them as (transformers broadcasts the
    # norm's weight, reshapes the newline token, or raises its own error)
    n1, n2 = conv.weight.shape[0], out.weight.shape[0]
    shapes = ((module.before_rms.weight, (c,)), (conv.weight, (n1, c, s, s)),
              (conv.bias, (n1,)), (out.weight, (n2, n1, 1, 1)), (out.bias, (n2,)),
              (module.image_newline, (n2,)))  # fmt: skip
    if any(t is not None and tuple(t.shape) != shape for t, shape in shapes):
        return "a weight's shape is not the one the merger reads"
    return None


def _hy_v4_vl_forward(module, arch):
    where = _where(module)
    norm_cls = Patcher.cls(sys.modules[arch.module], arch.data["norm"])
    exact_layer(module.before_rms, norm_cls, f"{where}.before_rms")
    exact_layer(module.proj_conv, nn.Conv2d, f"{where}.proj_conv")
    exact_layer(module.proj_out, nn.Conv2d, f"{where}.proj_out")
    _exact_gelu(module.proj_act, f"{where}.proj_act")

    def forward(self, hidden_states, size):
        why = _unfused(self, hidden_states, size)
        if why is not None:
            return class_forward(self, why, hidden_states, size)
        s, norm, conv, out = self.spatial_merge_size, self.before_rms, self.proj_conv, self.proj_out
        h, w = (int(v) for v in size)
        c = hidden_states.shape[-1]
        x = hidden_states.reshape(-1, h, w, c)
        w1 = patch_major(conv.weight, c, s)
        w2 = out.weight.reshape(out.out_channels, out.in_channels)
        y = merger(x, w1, conv.bias, w2, out.bias, merge_size=(s, s), layout="grid",
                   norm="rmsnorm", norm_weight=norm.weight, eps=norm.variance_epsilon)  # fmt: skip
        # in the norm's result dtype, as transformers casts it; the concatenation promotes
        # (fp32 under autocast, the convolutions' bf16 result beside it)
        dtype = torch.promote_types(hidden_states.dtype, norm.weight.dtype)
        newline = self.image_newline.to(dtype).expand(*y.shape[:2], 1, y.shape[-1])
        return torch.cat([y, newline], dim=2).reshape(1, -1, y.shape[-1])

    return fused_forward(module, ("before_rms", "proj_conv", "proj_act", "proj_out"), forward)


_ARCH = _arch("hy_v4_vl", "HYV4VL", "merger", "HYV4VLVisionPatchMerger",
              data={"norm": "HYV4VLRMSNorm"}, roots=("HYV4VLVisionModel",))  # fmt: skip

HY_V4_VL_MERGER_PATCHER = register(
    Patcher("transformers", TESTED_VERSIONS, (_ARCH,),
            (SetMethod("connector", "merger", "forward", _hy_v4_vl_forward),))
)  # fmt: skip

"""The SwiGLU projectors of Aya Vision and Command A Vision in the connector family's tables
of the transformers integration (part ``connector`` of :func:`vlmkernels.patch`):
``AyaVisionMultiModalProjector`` and ``Cohere2VisionMultiModalProjector``.

transformers' forward, on the features (B, S * S, C) with the downsample factor f:

    X = pixel_shuffle(x, f)                    (B, S/f, S/f, f^2 C), a copy (Idefics3's order)
    X = LayerNorm(X)                           Aya Vision only, over each f^2 C row
    h = X W1^T + b1;  a, g = h[..., :I], h[..., I:]
    y = (SiLU(g) a) W2^T + b2

The patched forward is one :func:`~vlmkernels.ops.connectors.merger` of layout "grid" with
``activation="swiglu"``: the shuffle read through the GEMM's addressing (never copied),
Aya's LayerNorm in its prologue, SiLU(g) a in the first GEMM's epilogue (h is not written
unless the backward needs it), then the second linear. Outputs and the gradients of the
features and every weight match transformers. Features that are not a square grid of a
side f divides run the class's forward (its errors), with a
:class:`~vlmkernels.integrations.patching.PatchFallbackWarning`, and so do a batch of no
images, a factor set after patching to a float or to one linear_1 does not take, a
LayerNorm or linear of a dtype or shape transformers' calls refuse or broadcast, a
linear_1 of an odd width (transformers' halves differ by one), and an
``nn.SiLU(inplace=True)`` while autograd records (transformers' in-place SiLU of a
``chunk`` view raises). A layer that is not the expected ``nn.Linear`` / ``nn.LayerNorm``,
or an ``act`` that is not SiLU (``nn.SiLU`` or transformers' ``SiLUActivation``, not a
subclass), is refused at patch time, and so is a ``pixel_shuffle`` of the class's or
instance's own. Roots: the models, the projectors themselves, or any model holding one.
"""

from __future__ import annotations

import torch
from torch import nn

from ...core.checks import isqrt
from ...ops.connectors import merger
from ..patching import (
    Patcher,
    SetMethod,
    UnsupportedLayoutError,
    class_forward,
    fused_forward,
    linear_chain_problem,
    register,
)
from .connector_layouts import square_grid_problem
from .connectors import TESTED_VERSIONS, _arch, _check_layer_norm, _linear, _where

__all__ = ["GATED_PROJECTOR_PATCHER"]


def _layer_norm_problem(name, ln, width) -> str | None:
    """Why transformers' LayerNorm ``ln`` (named ``name``) refuses or broadcasts the
    shuffled rows of ``width`` channels, or None: a normalized shape or parameters not
    (``width``,). (Their device and dtype: the guard's, :func:`fused_forward`.)"""
    if tuple(ln.normalized_shape) != (width,) or any(
        t is not None and tuple(t.shape) != (width,) for t in (ln.weight, ln.bias)
    ):
        return f"{name}'s shape does not take {width} features"
    return None


def _silu(act, where: str) -> None:
    """Refuses ``act`` unless it is SiLU: ``nn.SiLU`` or transformers' ``SiLUActivation``
    (``ACT2FN["silu"]``, F.silu; a kernel-hub forward swapped onto the class computes the
    same function). Of those classes exactly: a subclass may compute another function
    (the guard checks the class itself after patching, :func:`fused_forward`)."""
    if type(act) is nn.SiLU:
        return
    cls = type(act)
    if cls.__name__ == "SiLUActivation" and cls.__module__.startswith("transformers."):
        return
    raise UnsupportedLayoutError(f"{where}: the activation {act!r} is not SiLU")


def _in_place_problem(module, norm, x) -> str | None:
    """Why transformers' ``self.act(gate) * x`` raises, or None: an in-place SiLU
    (``nn.SiLU(inplace=True)``) modifies ``gate``, a view ``chunk`` returned, which autograd
    refuses (its RuntimeError) where it records linear_1's output (grad mode on, and the
    features or a parameter of linear_1 or the norm requiring grad). Without autograd the
    in-place SiLU computes what the fused forward does."""
    if not getattr(module.act, "inplace", False) or not torch.is_grad_enabled():
        return None
    layers = [module.linear_1, *((module.get_submodule(norm),) if norm is not None else ())]
    if x.requires_grad or any(p.requires_grad for layer in layers for p in layer.parameters()):
        return "act is an in-place SiLU of a chunk of linear_1's output (autograd refuses it)"
    return None


def _gated_forward(module, arch):
    where = _where(module)
    _linear(module, "linear_1", where)
    _linear(module, "linear_2", where)
    _silu(module.act, f"{where}.act")
    f = module.downsample_factor
    if isinstance(f, bool) or not isinstance(f, int) or f < 1:
        raise UnsupportedLayoutError(f"{where}.downsample_factor is {f!r}, not an int >= 1")
    norm = arch.data["norm"]
    if norm is not None:
        _check_layer_norm(module, norm, where)

    def forward(self, image_features):
        f, l1, l2, x = self.downsample_factor, self.linear_1, self.linear_2, image_features
        if isinstance(f, bool) or not isinstance(f, int) or f < 1:  # (set after patching)
            why = f"downsample_factor is {f!r}, not an int >= 1"
        else:
            why = square_grid_problem(x, f)
        if why is None:  # (no images: transformers' reshape raises its own message)
            width = f * f * x.shape[-1]
            why = "no images" if x.shape[0] == 0 else None
            if why is None and norm is not None:
                why = _layer_norm_problem(norm, self.get_submodule(norm), width)
            why = why or linear_chain_problem(width, [("linear_1", l1.weight, l1.bias)])
            n1 = l1.weight.shape[0]
            if why is None and n1 % 2:
                why = f"linear_1's {n1} outputs have no two equal halves"
            why = why or linear_chain_problem(n1 // 2, [("linear_2", l2.weight, l2.bias)])
            why = why or _in_place_problem(self, norm, x)
        if why is not None:
            return class_forward(self, why, image_features)
        kw = {}
        if norm is not None:
            ln = self.get_submodule(norm)
            kw = dict(norm="layernorm", norm_weight=ln.weight, norm_bias=ln.bias, eps=ln.eps,
                      norm_before_merge=False)  # fmt: skip
        b, n, _ = image_features.shape
        side = isqrt(n) // f
        y = merger(image_features, l1.weight, l1.bias, l2.weight, l2.bias, merge_size=f,
                   layout="grid", activation="swiglu", **kw)  # fmt: skip
        return y.view(b, side, side, -1)

    reads = (*((norm,) if norm else ()), "linear_1", "act", "linear_2")
    return fused_forward(module, reads, forward)


def _gated_arch(key, prefix, norm):
    return _arch(key, prefix, "projector", f"{prefix}MultiModalProjector", data={"norm": norm})


GATED_PROJECTOR_PATCHER = register(
    Patcher(
        "transformers",
        TESTED_VERSIONS,
        (
            _gated_arch("aya_vision", "AyaVision", "layernorm"),
            _gated_arch("cohere2_vision", "Cohere2Vision", None),
        ),
        (SetMethod("connector", "projector", "forward", _gated_forward,
                   bypasses=("pixel_shuffle",)),),
    )
)  # fmt: skip

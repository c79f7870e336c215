"""LLaVA's MLP projector under other names, in the connector family's tables of the
transformers integration (part ``connector`` of :func:`vlmkernels.patch`), each module's
forward one or two :func:`~vlmkernels.ops.connectors.mlp_projector` calls (Linear + exact
GELU + Linear; GELU fused into the first GEMM, h the only activation the backward needs,
recomputed):

- ``DeepseekVLAligner`` (DeepSeek-VL): ``linear1``, ``activation``, ``linear2``;
- ``VideoLlama3Projector`` (VideoLLaMA 3): the ``readout`` ``nn.Sequential`` of Linear,
  GELU, Linear;
- ``MiniMaxM3VLMultiModalProjector`` (MiniMax-M3-VL): an MLP on each patch, the
  ``spatial_merge_size``^2 consecutive results of a merge window side by side (a view), and
  a second MLP on them: two projector calls;
- ``JanusVisionAlignerMLP`` (Janus, Janus-Pro): ``fc1``, then ``activation_fn`` and a
  Linear per entry of ``hidden_layers`` (one at the released ``depth`` 2): ``fc1``, the
  activation and the first hidden layer as one projector call, any further ones called as
  the class calls them (depth 1, fc1 alone, is refused).

A layer that is not the expected ``nn.Linear`` / exact GELU is refused at patch time; one
replaced or hooked after patching makes the module run its class's forward, with a
:class:`~vlmkernels.integrations.patching.PatchFallbackWarning`; so do features, or weights
the fused GEMMs read, of a dtype or shape transformers' Linear calls refuse or broadcast (a
second linear of another dtype, features of another width, a bias of one element), for
transformers' error or result. Roots: the models
(``...ForConditionalGeneration``, ``MiniMaxM3SparseForConditionalGeneration``,
``...Model``), the projectors themselves, or any model holding one.
"""

from __future__ import annotations

import torch
from torch import nn

from ...ops.connectors import mlp_projector
from ..patching import (
    Patcher,
    SetMethod,
    UnsupportedLayoutError,
    class_forward,
    exact_layer,
    fused_forward,
    linear_chain_problem,
    register,
)
from .connectors import TESTED_VERSIONS, _arch, _check_mlp, _exact_gelu, _linear, _one_input, _where

__all__ = ["MLP_PROJECTOR_PATCHERS"]


def _mlp(x, l1, l2):
    return mlp_projector(x, l1.weight, l1.bias, l2.weight, l2.bias)


def _mlp_problem(x, width=None, **layers) -> str | None:
    """Why the fused projector does not compute transformers' Linear calls ``layers`` (by
    name) on ``x`` of ``width`` channels, by default its last dim's
    (:func:`linear_chain_problem`: weights of another shape), or None; features
    that are not a tensor of at least one dimension too."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        return "the features are not a tensor of (..., channels)"
    width = x.shape[-1] if width is None else width
    return linear_chain_problem(width, [(n, l.weight, l.bias) for n, l in layers.items()])


def _deepseek_vl_forward(module, arch):
    _check_mlp(module, "linear1", "activation", "linear2")

    def fused(self, x):
        why = _mlp_problem(x, linear1=self.linear1, linear2=self.linear2)
        if why is not None:
            return class_forward(self, why, x)
        return _mlp(x, self.linear1, self.linear2)

    return fused_forward(module, ("linear1", "activation", "linear2"), _one_input(module, fused))


_READOUT = ("readout.0", "readout.1", "readout.2")


def _video_llama3_forward(module, arch):
    readout = module.readout
    _check_mlp(readout, "0", "1", "2", where=f"{_where(module)}.readout")

    def fused(self, x):
        readout = self.readout
        why = _mlp_problem(x, **{"readout.0": readout[0], "readout.2": readout[2]})
        if why is not None:
            return class_forward(self, why, x)
        return _mlp(x, readout[0], readout[2])

    # "readout" itself: an nn.Sequential grown or shrunk after patching
    return fused_forward(module, ("readout", *_READOUT), _one_input(module, fused))


def _minimax_m3_vl_forward(module, arch):
    _check_mlp(module)
    _check_mlp(module, "merge_linear_1", "merge_act", "merge_linear_2")

    def fused(self, x):
        l1, l2 = self.linear_1, self.linear_2
        why = _mlp_problem(x, linear_1=l1, linear_2=l2)
        if why is not None:
            return class_forward(self, why, x)
        window = self.spatial_merge_size**2
        # transformers' reshape: the per-patch result (..., D) as (rows // window, -1)
        d = l2.weight.shape[0]
        rows = x.shape[0] if x.dim() > 1 else d
        # its reshape raises (a window of 0: its floor division), or makes other rows
        if window < 1 or rows == 0 or rows % window:
            why = f"{tuple(x.shape)} features are not windows of {window} patches"
            return class_forward(self, why, x)
        width = x.numel() // x.shape[-1] * d // (rows // window) if x.shape[-1] else 0
        why = _mlp_problem(x, width, merge_linear_1=self.merge_linear_1,
                           merge_linear_2=self.merge_linear_2)  # fmt: skip
        if why is not None:
            return class_forward(self, why, x)
        y = _mlp(x, l1, l2)
        return _mlp(y.reshape(y.shape[0] // window, -1), self.merge_linear_1, self.merge_linear_2)

    parts = ("linear_1", "act", "linear_2", "merge_linear_1", "merge_act", "merge_linear_2")
    return fused_forward(module, parts, _one_input(module, fused))


def _janus_forward(module, arch):
    where = _where(module)
    layers = module.hidden_layers
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise UnsupportedLayoutError(f"{where}.hidden_layers holds no Linear (depth 1)")
    _linear(module, "fc1", where)
    _exact_gelu(module.activation_fn, f"{where}.activation_fn")
    for i, layer in enumerate(layers):
        exact_layer(layer, nn.Linear, f"{where}.hidden_layers.{i}")

    def fused(self, x):
        layers = self.hidden_layers
        why = _mlp_problem(x, fc1=self.fc1, **{"hidden_layers.0": layers[0]})
        if why is not None:
            return class_forward(self, why, x)
        y = _mlp(x, self.fc1, layers[0])
        for layer in list(layers)[1:]:
            y = layer(self.activation_fn(y))
        return y

    # "hidden_layers" itself: a ModuleList grown or shrunk after patching
    parts = ("fc1", "activation_fn", "hidden_layers", "hidden_layers.0")
    return fused_forward(module, parts, _one_input(module, fused))


def _minimax_m3_vl_arch():
    # (its full model has another name than ...ForConditionalGeneration)
    return _arch("minimax_m3_vl", "MiniMaxM3VL", "projector", "MiniMaxM3VLMultiModalProjector",
                 models=False,
                 roots=("MiniMaxM3VLModel", "MiniMaxM3SparseForConditionalGeneration"))  # fmt: skip


MLP_PROJECTOR_PATCHERS = tuple(
    register(Patcher("transformers", TESTED_VERSIONS, (arch,),
                     (SetMethod("connector", "projector", "forward", build),)))
    for arch, build in (
        (_arch("deepseek_vl", "DeepseekVL", "projector", "DeepseekVLAligner"),
         _deepseek_vl_forward),
        (_arch("video_llama_3", "VideoLlama3", "projector", "VideoLlama3Projector"),
         _video_llama3_forward),
        (_minimax_m3_vl_arch(), _minimax_m3_vl_forward),
        (_arch("janus", "Janus", "projector", "JanusVisionAlignerMLP"), _janus_forward),
    )
)  # fmt: skip

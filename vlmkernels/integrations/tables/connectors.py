"""The connector family's tables of the transformers integration: the vision-to-language
connectors run on :mod:`vlmkernels.ops.connectors`, recognised anywhere in a module tree,
with their own parameters (same state_dict keys; outputs and gradients match).

Part ``connector`` (a keyword of :func:`vlmkernels.patch`), every module of these classes
gets an instance ``forward``:

- ``LlavaMultiModalProjector``, ``LlavaNextMultiModalProjector``,
  ``LlavaOnevisionMultiModalProjector``: :func:`~vlmkernels.ops.connectors.mlp_projector`
  (Linear + exact GELU + Linear);
- ``Idefics3Connector``, ``SmolVLMConnector``: pixel shuffle + Linear (no bias) as one
  :func:`~vlmkernels.ops.connectors.merger` (layout "grid": the shuffled copy is never made);
- ``InternVLMultiModalProjector``: LayerNorm + Linear + GELU + Linear in one merger (its
  input is already shuffled by ``InternVLModel``);
- ``PatchMerger`` (Qwen2-VL, LayerNorm per patch), ``Qwen2_5_VLPatchMerger`` (RMSNorm per
  patch), ``Qwen3VLVisionPatchMerger`` (LayerNorm per patch, or per merged row with
  ``use_postshuffle_norm``; Qwen3-VL-MoE's too): the merger with the norm in the GEMM's
  prologue.

Part ``deepstack``: ``Qwen3VLTextModel._deepstack_process`` (and the MoE one's) runs
:func:`~vlmkernels.ops.connectors.deepstack_add` (one pass, no clone).

An activation other than exact GELU, or a module whose layers are not the expected
``nn.Linear`` / norms, is refused at patch time (:class:`UnsupportedLayoutError`).

Roots: the LLaVA, Idefics3, SmolVLM and InternVL models (``...ForConditionalGeneration``,
``...Model``) and the connector modules themselves; for the Qwen-VL models (whose roots the
rotary table owns) any model holding their merger modules (or Qwen3-VL's text model): the
full models, the vision towers, the mergers themselves, a foreign model.
"""

from __future__ import annotations

import math

from torch import nn
from torch.nn import functional as F

from ...ops.connectors import deepstack_add, merger, mlp_projector
from ..patching import Architecture, Patcher, SetMethod, UnsupportedLayoutError, register

__all__ = ["DEEPSTACK_PATCHER", "INTERNVL_PATCHER", "LLAVA_PATCHER", "QWEN_MERGER_PATCHER",
           "SHUFFLE_PATCHER", "TESTED_VERSIONS"]  # fmt: skip

TESTED_VERSIONS = ("5.24.0",)


def _module(key: str) -> str:
    return f"transformers.models.{key}.modeling_{key}"


def _arch(key, prefix, role, cls, part="connector", models=True):
    roots = {cls: (part,)}
    if models:
        roots |= {f"{prefix}ForConditionalGeneration": (part,), f"{prefix}Model": (part,)}
    return Architecture(key=f"{key}.{part}", module=_module(key), classes={role: cls},
                        roots=roots, anywhere=True)  # fmt: skip


def _linear(module, name: str, where: str) -> nn.Linear:
    layer = getattr(module, name, None)
    if type(layer) is not nn.Linear:
        raise UnsupportedLayoutError(f"{where}.{name} is {type(layer).__name__}, not nn.Linear")
    return layer


def _exact_gelu(act, where: str) -> None:
    if isinstance(act, nn.GELU) and act.approximate == "none":
        return
    inner = getattr(act, "act", None)
    if type(act).__name__ == "GELUActivation" and (
        inner is F.gelu or getattr(inner, "__func__", None) is type(act)._gelu_python
    ):
        return
    raise UnsupportedLayoutError(f"{where}: the activation {act!r} is not exact GELU")


def _where(module) -> str:
    return type(module).__qualname__


# --------------------------------------------------------------------------------------
# LLaVA projectors
# --------------------------------------------------------------------------------------


def _llava_forward(module, arch):
    where = _where(module)
    _linear(module, "linear_1", where), _linear(module, "linear_2", where)
    _exact_gelu(module.act, where)

    def forward(self, image_features):
        l1, l2 = self.linear_1, self.linear_2
        return mlp_projector(image_features, l1.weight, l1.bias, l2.weight, l2.bias)

    return forward


LLAVA_PATCHER = register(
    Patcher(
        "transformers",
        TESTED_VERSIONS,
        (
            _arch("llava", "Llava", "projector", "LlavaMultiModalProjector"),
            _arch("llava_next", "LlavaNext", "projector", "LlavaNextMultiModalProjector"),
            _arch(
                "llava_onevision",
                "LlavaOnevision",
                "projector",
                "LlavaOnevisionMultiModalProjector",
            ),
        ),  # fmt: skip
        (SetMethod("connector", "projector", "forward", _llava_forward),),
    )
)


# --------------------------------------------------------------------------------------
# Pixel-shuffle connectors (Idefics3, SmolVLM) and InternVL's projector
# --------------------------------------------------------------------------------------


def _shuffle_forward(module, arch):
    where = _where(module)
    _linear(module.modality_projection, "proj", f"{where}.modality_projection")
    scale = module.scale_factor
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise UnsupportedLayoutError(f"{where}.scale_factor is {scale!r}, not an int >= 1")

    def forward(self, image_hidden_states):
        proj = self.modality_projection.proj
        return merger(image_hidden_states, proj.weight, proj.bias,
                      merge_size=self.scale_factor, layout="grid")  # fmt: skip

    return forward


SHUFFLE_PATCHER = register(
    Patcher(
        "transformers",
        TESTED_VERSIONS,
        (
            _arch("idefics3", "Idefics3", "shuffle_connector", "Idefics3Connector"),
            _arch("smolvlm", "SmolVLM", "shuffle_connector", "SmolVLMConnector"),
        ),
        (SetMethod("connector", "shuffle_connector", "forward", _shuffle_forward),),
    )
)


def _internvl_forward(module, arch):
    where = _where(module)
    _linear(module, "linear_1", where), _linear(module, "linear_2", where)
    _exact_gelu(module.act, where)
    if type(module.layer_norm) is not nn.LayerNorm:
        raise UnsupportedLayoutError(f"{where}.layer_norm is not nn.LayerNorm")

    def forward(self, image_features):
        ln, l1, l2 = self.layer_norm, self.linear_1, self.linear_2
        lead, k = image_features.shape[:-1], image_features.shape[-1]
        y = merger(image_features.reshape(-1, k), l1.weight, l1.bias, l2.weight, l2.bias,
                   merge_size=1, norm="layernorm", norm_weight=ln.weight, norm_bias=ln.bias,
                   eps=ln.eps)  # fmt: skip
        return y.view(*lead, y.shape[-1])

    return forward


INTERNVL_PATCHER = register(
    Patcher(
        "transformers",
        TESTED_VERSIONS,
        (_arch("internvl", "InternVL", "internvl_projector", "InternVLMultiModalProjector"),),
        (SetMethod("connector", "internvl_projector", "forward", _internvl_forward),),
    )
)


# --------------------------------------------------------------------------------------
# Qwen-VL patch mergers
# --------------------------------------------------------------------------------------


def _norm_of(norm, where: str):
    """(kind, weight, bias, eps) of a merger's norm module."""
    if type(norm) is nn.LayerNorm:
        if len(norm.normalized_shape) != 1 or norm.weight is None:
            raise UnsupportedLayoutError(f"{where}: a LayerNorm without a 1-D weight")
        return "layernorm", "weight", "bias" if norm.bias is not None else None, norm.eps
    if type(norm).__name__.endswith("RMSNorm") and hasattr(norm, "variance_epsilon"):
        return "rmsnorm", "weight", None, norm.variance_epsilon
    raise UnsupportedLayoutError(f"{where}: unknown norm {type(norm).__name__}")


def _qwen_merger_forward(module, arch):
    where = _where(module)
    if hasattr(module, "ln_q"):  # Qwen2-VL, Qwen2.5-VL: mlp = [Linear, GELU, Linear]
        norm_name, before = "ln_q", True
        mlp = module.mlp
        if not isinstance(mlp, nn.Sequential) or len(mlp) != 3:
            raise UnsupportedLayoutError(f"{where}.mlp is not [Linear, GELU, Linear]")
        fc1, act, fc2 = ("mlp.0", "mlp.1", "mlp.2")
        _linear(mlp, "0", f"{where}.mlp"), _linear(mlp, "2", f"{where}.mlp")
        _exact_gelu(mlp[1], where)
    elif hasattr(module, "linear_fc1"):  # Qwen3-VL
        norm_name, before = "norm", not module.use_postshuffle_norm
        fc1, act, fc2 = "linear_fc1", "act_fn", "linear_fc2"
        _linear(module, fc1, where), _linear(module, fc2, where)
        _exact_gelu(module.act_fn, where)
    else:
        raise UnsupportedLayoutError(f"{where}: neither ln_q + mlp nor norm + linear_fc1/2")
    kind, _, bias_name, eps = _norm_of(getattr(module, norm_name), where)
    if module.get_submodule(fc1).in_features != module.hidden_size:
        raise UnsupportedLayoutError(f"{where}: {fc1} does not take {module.hidden_size} features")
    del act

    def forward(self, x):
        norm = self.get_submodule(norm_name)
        l1, l2 = self.get_submodule(fc1), self.get_submodule(fc2)
        hidden = self.hidden_size
        c = norm.weight.shape[0] if before else x.shape[-1]
        s = math.isqrt(hidden // c)
        if s * s * c != hidden:
            raise ValueError(f"{where}: {hidden} merged features are not s^2 x {c}")
        return merger(x.reshape(-1, c), l1.weight, l1.bias, l2.weight, l2.bias, merge_size=s,
                      norm=kind, norm_weight=norm.weight,
                      norm_bias=getattr(norm, bias_name) if bias_name else None, eps=eps,
                      norm_before_merge=before)  # fmt: skip

    return forward


_QWEN = (("qwen2_vl", "PatchMerger"), ("qwen2_5_vl", "Qwen2_5_VLPatchMerger"),
         ("qwen3_vl", "Qwen3VLVisionPatchMerger"),
         ("qwen3_vl_moe", "Qwen3VLMoeVisionPatchMerger"))  # fmt: skip

QWEN_MERGER_PATCHER = register(
    Patcher(
        "transformers",
        TESTED_VERSIONS,
        tuple(_arch(key, "", "merger", cls, models=False) for key, cls in _QWEN),
        (SetMethod("connector", "merger", "forward", _qwen_merger_forward),),
    )
)


# --------------------------------------------------------------------------------------
# Qwen3-VL DeepStack
# --------------------------------------------------------------------------------------


def _deepstack_method(module, arch):
    def _deepstack_process(self, hidden_states, visual_pos_masks, visual_embeds):
        return deepstack_add(hidden_states, visual_pos_masks, visual_embeds)

    return _deepstack_process


def _check_deepstack(cls, arch):
    if not callable(getattr(cls, "_deepstack_process", None)):
        raise UnsupportedLayoutError(f"{cls.__qualname__} has no _deepstack_process")


DEEPSTACK_PATCHER = register(
    Patcher(
        "transformers",
        TESTED_VERSIONS,
        tuple(
            _arch(key, "", "text_model", cls, part="deepstack", models=False)
            for key, cls in (
                ("qwen3_vl", "Qwen3VLTextModel"),
                ("qwen3_vl_moe", "Qwen3VLMoeTextModel"),
            )
        ),  # fmt: skip
        (
            SetMethod(
                "deepstack",
                "text_model",
                "_deepstack_process",
                _deepstack_method,
                check=_check_deepstack,
            ),
        ),  # fmt: skip
    )
)

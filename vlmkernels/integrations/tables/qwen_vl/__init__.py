"""The M-RoPE tables of the transformers integration (the rotary family's): which classes
of Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE, Qwen3.5, Qwen3.5-MoE, and of GLM-4V
(GLM-4.1V, GLM-4.6V-Flash), GLM-4V-MoE (GLM-4.5V, GLM-4.6V), GLM-4.6V's own classes
(around GLM-4V's towers), GLM-OCR, PaddleOCR-VL, Cohere Compass, ERNIE-4.5-VL, Qwen4-Exp,
Cosmos3-Omni, the text rotary of HunYuan-VL, Cosmos3-Edge, GLM-Image and NeoMME, and the
vision rotary of eighteen more towers (:func:`_vision_rotary`), whose code transformers
adapted from Qwen-VL's (Pixtral's and DeepSeek-OCR-2's: Llama's text function; Llama 4's
and Gemma 4's: their own), play which role (:data:`ARCHITECTURES`), and what each part
replaces (:data:`REPLACEMENTS`); the vlmkernels-backed functions they install are in
:mod:`.functions`.
:mod:`vlmkernels.integrations.transformers` documents the parts and applies them;
:mod:`...patching` is the mechanism."""

from __future__ import annotations

import contextlib
import inspect
import logging
import types
from collections.abc import Callable

import torch

from ....ops.rope.index import TEXT_AFTER_VISION, get_rope_index
from ...patching import (
    Architecture,
    Patcher,
    Rebind,
    SetMethod,
    UnsupportedLayoutError,
    foreign_source,
    marked,
    register,
)
from .functions import (
    PositionAngles,
    _in_fp32,
    _paired,
    _positions_rotary_forward,
    _rotation,
    _vision_rotation,
    apply_fp32_paired_rotary_pos_emb,
    apply_fp32_rotary_pos_emb,
    apply_multidimensional_rope,
    apply_multimodal_rotary_pos_emb,
    apply_paired_rotary_pos_emb,
    apply_paired_rotary_pos_emb_from_halves,
    apply_paired_rotary_pos_emb_vision,
    apply_partial_rotary_pos_emb,
    apply_partial_rotary_pos_emb_optional_k,
    apply_partial_rotary_pos_emb_vision,
    apply_rotary_pos_emb,
    apply_rotary_pos_emb_vision,
    paired_table_order,
    vision_apply_rotary_emb,
)

__all__ = [
    "ARCHITECTURES",
    "PATCHER",
    "PositionAngles",
    "REPLACEMENTS",
    "TESTED_VERSIONS",
    "installed_semantics",
    "paired_table_order",
    "rope_index_method",
]

# The releases the patching and get_rope_index tests passed on (CI runs the newest and the
# oldest of the 5.17+ layout on every change).
TESTED_VERSIONS = (
    "5.16.1",
    "5.17.0",
    "5.18.0",
    "5.19.0",
    "5.20.0",
    "5.20.2",
    "5.21.1",
    "5.22.2",
    "5.23.0",
    "5.24.0",
    "5.25.0",
)

# --------------------------------------------------------------------------------------
# Architectures
# --------------------------------------------------------------------------------------


def _qwen(key, prefix, vision_model, vision_attention, text_attention, text_rotary, rope_index,
          rotation="full", interleaved=None, causal_lm=False, text_model=None,
          no_positions=None):  # fmt: skip
    """A Qwen-VL-style architecture: its classes by role, which parts apply to which root,
    the M-RoPE lane rule and the model type of :func:`vlmkernels.get_rope_index`.

    ``rope_index``: None where its ``get_rope_index`` is its own (it stays transformers').
    ``rotation``: what its text rotary function does with the tables: "full" (rotate-half,
    tables as wide as the head), "partial" (rotate-half on the first ``cos.shape[-1]``
    lanes, the rest passed: Qwen3.5, GLM-4V-MoE), "pairs" (partial, lanes (2j, 2j + 1)
    rotating together: GLM-4V), "full_fp32" (rotate-half over the whole head, computed in
    fp32 and cast back to q's dtype: HunYuan-VL), "pairs_fp32" (the same in pairs:
    ERNIE-4.5-VL) or "partial_optional_k" (Qwen3.5's, k optional: Qwen4-Exp).
    ``interleaved``: Qwen3-VL's section rule (default: the models whose ``get_rope_index``
    is Qwen3-VL's). ``causal_lm``: it has a text-only ``ForCausalLM`` (Qwen3.5).
    ``text_model``: the text model's class, where it is not ``<prefix>TextModel``
    (PaddleOCR-VL's). ``no_positions``: why ``angles="positions"`` does not apply (its
    rotary class, or another reader of its tables, is not Qwen-VL's), where it does not."""
    positions = () if no_positions else ("positions",)
    full = ("rope", "vision", *(("rope_index",) if rope_index else ()), *positions)
    text = ("rope", *positions)
    return Architecture(
        key=key,
        module=f"transformers.models.{key}.modeling_{key}",
        classes={
            "text_attention": text_attention,
            "vision_attention": vision_attention,
            "text_rotary": text_rotary,
            **({"model": f"{prefix}Model"} if rope_index else {}),
        },
        roots={
            f"{prefix}ForConditionalGeneration": full,
            f"{prefix}Model": full,
            text_model or f"{prefix}TextModel": text,
            **({f"{prefix}ForCausalLM": text} if causal_lm else {}),
            vision_model: ("vision",),
        },
        data={
            "interleaved": rope_index == "qwen3_vl" if interleaved is None else interleaved,
            "rope_index": rope_index,
            "rotation": rotation,
            **({"no_positions": no_positions} if no_positions else {}),
        },  # fmt: skip
    )


def _omni(key, prefix, text_attention, text_rotary, interleaved, positions=True):
    """A Qwen-Omni architecture: the thinker's text attention and vision tower are Qwen-VL's
    (the same rotary functions), without ``rope_index`` (its ``get_rope_index`` also places
    audio). The whole model, the thinker, its text model and the vision encoder are roots;
    in the whole model every module of the text attention class is patched (Qwen2.5-Omni's
    talker shares the thinker's; transformers 5.16's Qwen2.5-Omni vision function rotates
    one tensor from the raw frequencies, ``(tensor, freqs)``, and its vision part is
    refused there by name). ``positions``: whether ``angles="positions"`` applies
    (not where ``get_rope_index`` makes float position ids, fractional for video time:
    Qwen3-Omni-MoE's)."""
    text = ("rope", "positions") if positions else ("rope",)
    parts = (*text[:1], "vision", *text[1:])
    why = "its get_rope_index makes float position ids, fractional for video time"
    refused = {} if positions else {"no_positions": why}
    return Architecture(
        key=key,
        module=f"transformers.models.{key}.modeling_{key}",
        classes={
            "text_attention": text_attention,
            "vision_attention": f"{prefix}VisionAttention",
            "text_rotary": text_rotary,
        },
        roots={
            f"{prefix}ForConditionalGeneration": parts,
            f"{prefix}ThinkerForConditionalGeneration": parts,
            f"{prefix}ThinkerModel": parts,
            f"{prefix}ThinkerTextModel": text,
            f"{prefix}VisionEncoder": ("vision",),
        },
        data={"interleaved": interleaved, "rotation": "full", **refused},
    )


def _host(key, prefix, rope_index):
    """A model of its own module around another architecture's towers (built by
    ``AutoModel`` from its sub-configs): GLM-4.6V's ``Glm46VModel`` holds GLM-4V's or
    GLM-4V-MoE's vision and text models, Cosmos3-Omni's Qwen3-VL's; their rows patch the
    rotary parts. Its own roots take ``rope_index`` (its ``get_rope_index``, the model type
    ``rope_index`` names)."""
    return Architecture(
        key=key,
        module=f"transformers.models.{key}.modeling_{key}",
        classes={"model": f"{prefix}Model"},
        roots={
            f"{prefix}ForConditionalGeneration": ("rope_index",),
            f"{prefix}Model": ("rope_index",),
        },
        data={"rope_index": rope_index, "rotation": None},  # no rotary part of its own
    )


def _text_rotary(key, prefix, text_attention, rotation="full",
                 roots=("ForConditionalGeneration", "Model", "TextModel")):  # fmt: skip
    """A model whose text attention calls one of the Qwen-VL text rotary functions
    (``rotation`` as for :func:`_qwen`) while its rotary class, vision tower and
    ``get_rope_index`` are its own: ``rope`` alone, from transformers' tables
    (``angles="positions"`` is refused by name, not ignored), on the ``<prefix><root>``
    classes."""
    return Architecture(
        key=key,
        module=f"transformers.models.{key}.modeling_{key}",
        classes={"text_attention": text_attention},
        roots={f"{prefix}{root}": ("rope",) for root in roots},
        data={
            "rotation": rotation,
            "no_positions": "its rotary class and position ids are its own, not Qwen-VL's",
        },
    )


def _vision_rotary(key, prefix, vision_attention, rotation="full",
                   roots=("ForConditionalGeneration", "Model", "VisionModel")):  # fmt: skip
    """A model whose vision attention calls Qwen2-VL's ``apply_rotary_pos_emb_vision`` (the
    same code under its module's name; ``rotation`` "pairs": its lane-pair variant, in fp32,
    Inkling2's; "partial": rotate-half on the first ``cos.shape[-1]`` lanes, in the
    activations' dtype, MiniMax-M3-VL's; "llama": transformers' text ``apply_rotary_pos_emb``
    with its ``unsqueeze_dim``, Pixtral's; "complex": Llama 4's ``vision_apply_rotary_emb``,
    lane pairs times complex angles; "multidimensional": Gemma 4's
    ``apply_multidimensional_rope``, a rotate-half per position axis on its share of the
    head) while the rest of its rotary is its own or absent:
    ``vision`` alone, on the ``<prefix><root>`` classes (the whole model, the multimodal
    model and the vision tower)."""
    return Architecture(
        key=key,
        module=f"transformers.models.{key}.modeling_{key}",
        classes={"vision_attention": vision_attention},
        roots={f"{prefix}{root}": ("vision",) for root in roots},
        data={"vision_rotation": rotation},
    )


# Class names in transformers.models.<key>.modeling_<key>, stable from 5.16 to 5.25. What
# each row relies on, compared with docstrings stripped on every release tested:
# - Qwen3.5's, GLM-4V's, GLM-OCR's, Cohere Compass's, Cosmos3-Omni's and Qwen4-Exp's
#   get_rope_index and get_vision_position_ids are Qwen3-VL's (video grids split per
#   frame), GLM-4.6V's GLM-4V's; PaddleOCR-VL's get_rope_index is Qwen2-VL's.
# - GLM's sections are chunked (its recomposition splits the frequencies by section, axis
#   i % 3); GLM-OCR's rotary function and class are GLM-4V's.
# - Text rotary functions: PaddleOCR-VL's, Cohere Compass's, Cosmos3-Edge's and the
#   Qwen-Omni thinkers' are Qwen2-VL's; GLM-Image's and NeoMME's are Qwen3.5's (partial),
#   Qwen4-Exp's Qwen3.5's with k optional; HunYuan-VL's is Qwen2-VL's computed in fp32
#   (>= 5.17; 5.16's attention calls its own multimodal function, refused), ERNIE-4.5-VL's
#   rotates the whole head's lane pairs in fp32.
# - Rotary classes: PaddleOCR-VL's Qwen2-VL's, the Qwen-Omni thinkers' Qwen2.5-VL's and
#   Qwen3-VL's, Qwen4-Exp's Qwen3.5's; HunYuan-VL's (XD-RoPE), ERNIE-4.5-VL's, Cohere
#   Compass's and NeoMME's (per layer type), Cosmos3-Edge's and GLM-Image's are their own.
# - Vision rotary functions: Qwen2-VL's in every row with a vision part, as
#   rotate_half; the vision-only rows' attentions call it on (N, H, hd) q and k (Qwen-VL's
#   packed qkv) or (B, N, H, hd) ones (Kimi-K2.5, MLCD, Muse Glimmer and Spark, Step3p7);
#   Inkling2's rotates lane pairs (its rotate_pairwise) in fp32, MiniMax-M3-VL's the first
#   cos.shape[-1] lanes without the fp32 upcast (5.16: on (1, N, H, hd) q, cos[None, :,
#   None]; later (N, H, hd), cos[:, None]: the heads axis -2 either way).
# - Pixtral's vision attention (the tower of Mistral3's and LightOnOCR's models) calls the
#   text apply_rotary_pos_emb (Llama's, rotate-half over the whole head, in the tables'
#   dtype) on (B, H, N, hd) q with (N, hd) tables and unsqueeze_dim=0.
# - DeepSeek-OCR-2's vision encoder attention calls Llama's text function too, on (B, H, N,
#   hd) q with (B, N, hd) tables (1-D positions).
# - Llama 4's vision attention calls vision_apply_rotary_emb: (B, N, H, hd) q and k as
#   complex lane pairs in fp32 times (N, 1, hd / 2) complex angles, back to q's dtype.
# - Gemma 4's vision attention calls apply_multidimensional_rope on q and k apart, each
#   (B, N, H, hd) with (B, N, hd) tables: the head split per position axis (2), each part
#   rotate-half with its part of the tables, in the dtype of x * cos.
ARCHITECTURES = (
    _qwen("qwen2_vl", "Qwen2VL", "Qwen2VisionTransformerPretrainedModel",
          "VisionAttention", "Qwen2VLAttention", "Qwen2VLRotaryEmbedding", "qwen2_vl"),
    _qwen("qwen2_5_vl", "Qwen2_5_VL", "Qwen2_5_VisionTransformerPretrainedModel",
          "Qwen2_5_VLVisionAttention", "Qwen2_5_VLAttention", "Qwen2_5_VLRotaryEmbedding",
          "qwen2_5_vl"),
    _qwen("qwen3_vl", "Qwen3VL", "Qwen3VLVisionModel", "Qwen3VLVisionAttention",
          "Qwen3VLTextAttention", "Qwen3VLTextRotaryEmbedding", "qwen3_vl"),
    _qwen("qwen3_vl_moe", "Qwen3VLMoe", "Qwen3VLMoeVisionModel", "Qwen3VLMoeVisionAttention",
          "Qwen3VLMoeTextAttention", "Qwen3VLMoeTextRotaryEmbedding", "qwen3_vl"),
    _qwen("qwen3_5", "Qwen3_5", "Qwen3_5VisionModel", "Qwen3_5VisionAttention",
          "Qwen3_5Attention", "Qwen3_5TextRotaryEmbedding", "qwen3_vl", "partial",
          causal_lm=True),
    _qwen("qwen3_5_moe", "Qwen3_5Moe", "Qwen3_5MoeVisionModel", "Qwen3_5MoeVisionAttention",
          "Qwen3_5MoeAttention", "Qwen3_5MoeTextRotaryEmbedding", "qwen3_vl", "partial",
          causal_lm=True),
    _qwen("glm4v", "Glm4v", "Glm4vVisionModel", "Glm4vVisionAttention", "Glm4vTextAttention",
          "Glm4vTextRotaryEmbedding", "qwen3_vl", "pairs", interleaved=False),
    _qwen("glm4v_moe", "Glm4vMoe", "Glm4vMoeVisionModel", "Glm4vMoeVisionAttention",
          "Glm4vMoeTextAttention", "Glm4vMoeTextRotaryEmbedding", "qwen3_vl", "partial",
          interleaved=False),
    _qwen("glm_ocr", "GlmOcr", "GlmOcrVisionModel", "GlmOcrVisionAttention",
          "GlmOcrTextAttention", "GlmOcrTextRotaryEmbedding", "qwen3_vl", "pairs",
          interleaved=False),
    _qwen("paddleocr_vl", "PaddleOCRVL", "PaddleOCRVisionModel", "PaddleOCRVisionAttention",
          "PaddleOCRAttention", "PaddleOCRRotaryEmbedding", "qwen2_vl",
          text_model="PaddleOCRTextModel"),
    _omni("qwen2_5_omni", "Qwen2_5Omni", "Qwen2_5OmniAttention", "Qwen2_5OmniRotaryEmbedding",
          interleaved=False),
    _omni("qwen3_omni_moe", "Qwen3OmniMoe", "Qwen3OmniMoeThinkerTextAttention",
          "Qwen3OmniMoeThinkerTextRotaryEmbedding", interleaved=True, positions=False),
    _host("glm46v", "Glm46V", "qwen3_vl"),
    _host("cosmos3_omni", "Cosmos3Omni", "qwen3_vl"),
    _qwen("qwen4_exp", "Qwen4Exp", "Qwen4ExpVisionModel", "Qwen4ExpVisionAttention",
          "Qwen4ExpTextAttention", "Qwen4ExpTextRotaryEmbedding", "qwen3_vl",
          "partial_optional_k", causal_lm=True,
          no_positions="its sparse-attention indexer reads the cos/sin tables too"),
    _qwen("cohere_compass", "CohereCompass", "CohereCompassVisionModel",
          "CohereCompassVisionAttention", "CohereCompassAttention",
          "CohereCompassRotaryEmbedding", "qwen3_vl", causal_lm=True,
          no_positions="its rotary class keeps a frequency table and sections per layer type"),
    _qwen("ernie4_5_vl_moe", "Ernie4_5_VLMoe", "Ernie4_5_VLMoeVisionTransformerPretrainedModel",
          "Ernie4_5_VLMoeVisionAttention", "Ernie4_5_VLMoeTextAttention",
          "Ernie4_5_VLMoeTextRotaryEmbedding", None, "pairs_fp32",
          no_positions="its rotary class alternates the height and width frequencies, time "
                       "last, a section rule the positions path does not have"),
    _text_rotary("hunyuan_vl", "HunYuanVL", "HunYuanVLDenseV1Attention", "full_fp32"),
    _text_rotary("cosmos3_edge", "Cosmos3Edge", "Cosmos3EdgeTextAttention"),
    _text_rotary("glm_image", "GlmImage", "GlmImageTextAttention", "partial"),
    # a multimodal embedding encoder (no generation head)
    _text_rotary("neomme", "NeoMME", "NeoMMEAttention", "partial",
                 roots=("Model", "ForMaskedLM", "ForRetrieval")),
    *(_vision_rotary(key, prefix, f"{prefix}VisionAttention") for key, prefix in (
        ("dots3_note", "Dots3Note"), ("exaone4_5", "Exaone4_5_"), ("glm5_next", "Glm5Next"),
        ("kimi_k25", "Kimi_K25"), ("lfm3_vl", "Lfm3Vl"),
        ("llava_onevision1_5", "LlavaOnevision15"), ("muse_glimmer", "MuseGlimmer"),
        ("muse_spark", "MuseSpark"), ("ovis2_5", "Ovis2_5"), ("step3p7", "Step3p7"),
        ("video_llama_3", "VideoLlama3"))),
    _vision_rotary("mlcd", "MLCD", "MLCDAttention", roots=("VisionModel",)),
    _vision_rotary("inkling2", "Inkling2", "Inkling2VisionAttention", "pairs"),
    _vision_rotary("minimax_m3_vl", "MiniMaxM3VL", "MiniMaxM3VLVisionAttention", "partial",
                   roots=("VisionModel", "Model")),
    # the tower alone: Mistral3's and LightOnOCR's models hold it (patch finds it there)
    _vision_rotary("pixtral", "Pixtral", "PixtralAttention", "llama", roots=("VisionModel",)),
    _vision_rotary("llama4", "Llama4", "Llama4VisionAttention", "complex",
                   roots=("ForConditionalGeneration", "VisionModel")),
    _vision_rotary("gemma4", "Gemma4", "Gemma4VisionAttention", "multidimensional"),
    # its vision encoder (after the SAM encoder) is a Qwen2-style decoder: 1-D positions
    _vision_rotary("deepseek_ocr2", "DeepseekOcr2", "DeepseekOcr2VisionAttention", "llama",
                   roots=("ForConditionalGeneration", "Model", "VisionModel", "VisionEncoder")),
)  # fmt: skip


# --------------------------------------------------------------------------------------
# Plans: what each part installs, checked on the classes before anything is installed
# --------------------------------------------------------------------------------------


def _rope_type(rotary) -> str:
    rope_type = getattr(rotary, "rope_type", None)
    if not isinstance(rope_type, str):
        raise UnsupportedLayoutError(
            f"{type(rotary).__qualname__} has no string rope_type ({rope_type!r}); "
            f"angles='positions' cannot tell whether its inv_freq is static"
        )
    return rope_type


def _mrope_section(rotary) -> tuple[int, int, int]:
    """The rotary module's section: its own attribute (>= 5.17, and Qwen3-VL), else its
    config's (Qwen2/2.5-VL <= 5.16, whose attention passes the config's to the function)."""
    section = getattr(rotary, "mrope_section", None)
    if section is None:
        parameters = getattr(getattr(rotary, "config", None), "rope_parameters", None) or {}
        section = parameters.get("mrope_section")
    if section is None or len(section) != 3:
        raise UnsupportedLayoutError(
            f"{type(rotary).__qualname__} has no 3-part mrope_section ({section!r})"
        )
    return tuple(int(s) for s in section)


def _check_rotary_class(cls: type, arch: Architecture | None = None) -> None:
    params = list(inspect.signature(cls.forward).parameters)
    if params != ["self", "x", "position_ids"]:
        raise UnsupportedLayoutError(
            f"{cls.__module__}.{cls.__qualname__}.forward takes {params[1:]}, not (x, position_ids)"
        )


def _positions_forward(rotary, arch: Architecture):
    """``angles="positions"``: this text rotary module hands positions on, no tables."""
    rope_type = _rope_type(rotary)
    if "dynamic" in rope_type or rope_type == "longrope":
        raise UnsupportedLayoutError(
            f"angles='positions' is not supported with rope_type={rope_type!r}: its "
            f"inv_freq changes during the forward pass; use angles='table'"
        )
    if not isinstance(getattr(rotary, "inv_freq", None), torch.Tensor):
        raise UnsupportedLayoutError(f"{type(rotary).__qualname__} has no inv_freq buffer")
    _check_rotary_class(type(rotary), arch)
    return _positions_rotary_forward(_mrope_section(rotary), arch.data["interleaved"],
                                     arch.data["rotation"] == "pairs")  # fmt: skip


def _rope_index_function(model, arch: Architecture):
    """``get_rope_index`` of this ``...Model``: :func:`rope_index_method`'s function."""
    try:
        return rope_index_method(model).__func__
    except TypeError as exc:  # an overridden or re-signed get_rope_index
        raise UnsupportedLayoutError(str(exc)) from exc


# --------------------------------------------------------------------------------------
# get_rope_index as a method of one model instance
# --------------------------------------------------------------------------------------

_PROBED: dict[type, tuple[str, bool]] = {}


def _rope_index_arch(model) -> tuple[type, Architecture]:
    """The class in ``model``'s MRO that defines the supported ``get_rope_index``."""
    by_module = {a.module: a for a in ARCHITECTURES if "model" in a.classes}
    for cls in type(model).__mro__:
        arch = by_module.get(getattr(cls, "__module__", None))
        if arch is not None and cls.__name__ == arch.classes["model"]:
            # get_rope_index and the per-image hook it calls (transformers >= 5.16)
            for name in ("get_rope_index", "get_vision_position_ids"):
                method = getattr(cls, name, None)
                if getattr(type(model), name, None) is not method:
                    raise TypeError(
                        f"{type(model).__name__} overrides {cls.__name__}.{name}; its "
                        "semantics are unknown"
                    )
                source = None if method is None else foreign_source(method, "transformers")
                if source is not None:
                    raise TypeError(
                        f"{cls.__name__}.{name} was replaced on the class (by {source}); "
                        "its semantics are unknown"
                    )
            return cls, arch
    inner = getattr(model, "model", None)
    hint = (
        f" (pass its .model, a {type(inner).__name__})"
        if inner is not None and hasattr(type(inner), "get_rope_index")
        else ""
    )
    raise TypeError(
        f"rope_index_method supports {', '.join(a.classes['model'] for a in by_module.values())}"
        f" instances, got {type(model).__name__}{hint}"
    )


def _rope_index_signature(cls, model_type: str) -> inspect.Signature:
    """The installed signature (with ``self``), checked against the one implemented here."""
    installed = inspect.signature(cls.get_rope_index)
    expected = ["self", "input_ids", "mm_token_type_ids", "image_grid_thw", "video_grid_thw"]
    expected += ["second_per_grid_ts"] if model_type == "qwen2_5_vl" else []
    expected += ["attention_mask", "kwargs"]
    plain, empty = inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.empty
    want = [(n, plain, empty if i < 3 else None) for i, n in enumerate(expected[:-1])]
    want.append(("kwargs", inspect.Parameter.VAR_KEYWORD, empty))
    got = [(p.name, p.kind, p.default) for p in installed.parameters.values()]
    if got != want:
        raise TypeError(
            f"unsupported {cls.__name__}.get_rope_index signature {installed}; "
            f"expected parameters {expected[1:]}"
        )
    return installed


def installed_semantics(cls, model_type: str) -> tuple[str, bool]:
    """(text_after_vision, truncate_seconds) of the installed ``cls.get_rope_index``
    (``model_type`` as :func:`vlmkernels.get_rope_index` takes it), probed once per class
    (see :func:`_probe`)."""
    if cls not in _PROBED:
        with torch.device("cpu"):  # not the caller's default device (meta for deferred init)
            _PROBED[cls] = _probe(cls, model_type)
    return _PROBED[cls]


def _probe(cls, model_type: str) -> tuple[str, bool]:
    """Runs ``cls.get_rope_index`` on one vision run (8, 4, 4), merge 2, then one text token.

    The instance is created without ``__init__`` and carries a default config: a
    Qwen2/2.5-VL video with seconds 1.5 at 2 tokens per second (Qwen3-VL: an image). The
    text token lands at 2 under "start_plus_max_hw" and at the largest T + 1 under
    "max_plus_one"; the largest T is 21 with float seconds and 14 when they are truncated
    (transformers 5.16-5.17).
    """
    qwen2_5, qwen3 = model_type == "qwen2_5_vl", model_type == "qwen3_vl"
    with _quiet_default_rope():
        config = cls.config_class()
    config.vision_config.spatial_merge_size = 2
    config.vision_config.tokens_per_second = 2
    stub = cls.__new__(cls)  # an nn.Module without __init__: only `config` is needed
    stub.__dict__["config"] = config
    kind = 1 if qwen3 else 2
    grid = {"image_grid_thw" if qwen3 else "video_grid_thw": torch.tensor([[8, 4, 4]])}
    n_vision = 8 * 2 * 2
    kinds = torch.tensor([[kind] * n_vision + [0]])
    extra = {"second_per_grid_ts": torch.tensor([1.5])} if qwen2_5 else {}
    try:
        positions, _ = cls.get_rope_index(
            stub, torch.zeros_like(kinds), mm_token_type_ids=kinds, **grid, **extra
        )
    except Exception as e:
        raise TypeError(
            f"could not probe the installed {cls.__name__}.get_rope_index ({e}); "
            "rope_index_method(model, text_after_vision=..., truncate_seconds=...) takes them "
            "explicitly"
        ) from e
    largest_t = int(positions[0, 0, :n_vision].max())
    text_pos = int(positions[0, 0, -1])
    if text_pos == 2:
        rule = "start_plus_max_hw"
    elif text_pos == largest_t + 1:
        rule = "max_plus_one"
    else:
        raise TypeError(f"unrecognised {cls.__name__}.get_rope_index semantics")
    return rule, qwen2_5 and largest_t == 14


class _DefaultRopeNotice(logging.Filter):
    """Drops transformers' notice that a default config has no rotary parameters (Cohere
    Compass's: per layer type, none by default), which the probe's config would print."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "no RoPE parameters were found" not in record.getMessage()


@contextlib.contextmanager
def _quiet_default_rope():
    """While the probe builds a default config: that one notice, from that one logger."""
    logger, notice = logging.getLogger("transformers.modeling_rope_utils"), _DefaultRopeNotice()
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


def rope_index_method(
    model, *, text_after_vision: str | None = None, truncate_seconds: bool | None = None
) -> Callable:
    """A drop-in for ``model.get_rope_index``: :func:`vlmkernels.get_rope_index` as a method
    bound to ``model``, to install with ``model.get_rope_index = rope_index_method(model)``.

    ``model`` is the inner model holding ``get_rope_index`` (``Qwen2VLModel``,
    ``Qwen2_5_VLModel``, ``Qwen3VLModel``, ``Qwen3VLMoeModel``, ``Qwen3_5Model``,
    ``Qwen3_5MoeModel``, ``Glm4vModel``, ``Glm4vMoeModel``, ``Glm46VModel``, ``GlmOcrModel``,
    ``PaddleOCRVLModel``, ``CohereCompassModel``, or a subclass that does not override it);
    ``...ForConditionalGeneration`` holds it as ``.model``. Their ``compute_3d_position_ids``
    and generation's ``_prepare_position_ids_for_generation`` call ``get_rope_index`` on the
    instance, so the instance attribute takes over in both.

    The method has the installed signature (``**kwargs`` absorbing what generation passes)
    and reads ``config.vision_config.spatial_merge_size`` (and ``tokens_per_second``) at each
    call, as transformers does. ``text_after_vision`` and ``truncate_seconds`` default to what
    the installed class does (probed once per class). Bound with ``types.MethodType``, it
    follows the model through ``copy.deepcopy``.

    Raises:
        TypeError: not a supported class, an overridden method, or another signature
            (transformers < 5.3 has no ``mm_token_type_ids``).
    """
    cls, arch = _rope_index_arch(model)
    model_type = arch.data["rope_index"]
    signature = _rope_index_signature(cls, model_type)
    if text_after_vision is not None and text_after_vision not in TEXT_AFTER_VISION:
        raise ValueError(
            f"text_after_vision must be one of {TEXT_AFTER_VISION} or None, got "
            f"{text_after_vision!r}"
        )
    if text_after_vision is None or truncate_seconds is None:
        rule, truncate = installed_semantics(cls, model_type)
        text_after_vision = rule if text_after_vision is None else text_after_vision
        truncate_seconds = truncate if truncate_seconds is None else bool(truncate_seconds)
    options = dict(model_type=model_type, text_after_vision=text_after_vision,
                   truncate_seconds=truncate_seconds)  # fmt: skip

    def call(self, input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw, seconds,
             attention_mask):  # fmt: skip
        vision = self.config.vision_config
        return get_rope_index(
            input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw, attention_mask,
            spatial_merge_size=vision.spatial_merge_size, second_per_grid_ts=seconds,
            tokens_per_second=getattr(vision, "tokens_per_second", None), **options,
        )  # fmt: skip

    if model_type == "qwen2_5_vl":

        def get_rope_index_(self, input_ids, mm_token_type_ids, image_grid_thw=None,
                            video_grid_thw=None, second_per_grid_ts=None, attention_mask=None,
                            **kwargs):  # fmt: skip
            return call(self, input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw,
                        second_per_grid_ts, attention_mask)  # fmt: skip

    else:

        def get_rope_index_(self, input_ids, mm_token_type_ids, image_grid_thw=None,
                            video_grid_thw=None, attention_mask=None, **kwargs):  # fmt: skip
            return call(self, input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw,
                        None, attention_mask)  # fmt: skip

    get_rope_index_.__signature__ = signature
    get_rope_index_.__name__ = get_rope_index_.__qualname__ = "get_rope_index"
    get_rope_index_.__doc__ = (
        f"vlmkernels' vectorised {cls.__name__}.get_rope_index ({text_after_vision}"
        f"{', truncated seconds' if truncate_seconds else ''})."
    )
    return types.MethodType(marked(get_rope_index_), model)


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


REPLACEMENTS = (
    Rebind("rope", "text_attention", (apply_rotary_pos_emb, apply_multimodal_rotary_pos_emb),
           only=_rotation("full")),
    Rebind("rope", "text_attention", (apply_partial_rotary_pos_emb,), only=_rotation("partial")),
    Rebind("rope", "text_attention", (apply_partial_rotary_pos_emb_optional_k,),
           only=_rotation("partial_optional_k")),
    Rebind("rope", "text_attention", (apply_paired_rotary_pos_emb,), only=_paired("pairs")),
    Rebind("rope", "text_attention", (apply_paired_rotary_pos_emb_from_halves,),
           only=_paired("halves")),
    Rebind("rope", "text_attention", (apply_fp32_rotary_pos_emb,),
           only=_in_fp32("full_fp32", pairs=False)),
    Rebind("rope", "text_attention", (apply_fp32_paired_rotary_pos_emb,),
           only=_in_fp32("pairs_fp32", pairs=True)),
    Rebind("vision", "vision_attention", (apply_rotary_pos_emb_vision,),
           only=_vision_rotation("full")),
    Rebind("vision", "vision_attention", (apply_paired_rotary_pos_emb_vision,),
           only=_vision_rotation("pairs")),
    Rebind("vision", "vision_attention", (apply_partial_rotary_pos_emb_vision,),
           only=_vision_rotation("partial")),
    Rebind("vision", "vision_attention", (apply_rotary_pos_emb,), only=_vision_rotation("llama")),
    Rebind("vision", "vision_attention", (vision_apply_rotary_emb,),
           only=_vision_rotation("complex")),
    Rebind("vision", "vision_attention", (apply_multidimensional_rope,),
           only=_vision_rotation("multidimensional")),
    SetMethod("positions", "text_rotary", "forward", _positions_forward, _check_rotary_class),
    SetMethod("rope_index", "model", "get_rope_index", _rope_index_function,
              lambda cls, arch: _rope_index_summary(cls, arch)),
)  # fmt: skip

PATCHER = register(Patcher("transformers", TESTED_VERSIONS, ARCHITECTURES, REPLACEMENTS))


def _rope_index_summary(cls, arch: Architecture) -> str:
    _rope_index_signature(cls, arch.data["rope_index"])
    rule, truncate = installed_semantics(cls, arch.data["rope_index"])
    return f"ok ({rule}{', truncated seconds' if truncate else ''})"

"""Swap the rotary path of one transformers Qwen-VL model instance for the vlmkernels ops.

>>> handle = vlmkernels.integrations.transformers.patch(model)  # Qwen-VL, GLM-4V (MoE)
>>> ...                                                          # train / generate
>>> handle.undo()                                                # or: with patch(model): ...

What is swapped, per part (each a keyword of :func:`patch`):

- ``rope``: the text attention's call to transformers' rotary function runs
  :func:`vlmkernels.rope` (``apply_rotary_pos_emb``, cos/sin already merged by the rotary
  class; Qwen3.5's and GLM-4V-MoE's rotate the first ``cos.shape[-1]`` lanes of the head
  and pass the rest, GLM-4V's too with lanes (2j, 2j + 1) rotating together
  (``pairs=True``), the others need tables as wide as the head) or :func:`vlmkernels.mrope`
  (``apply_multimodal_rotary_pos_emb``, (3, B, S, D) tables, Qwen2/2.5-VL up to
  transformers 5.16).
- ``vision``: the vision attention's ``apply_rotary_pos_emb_vision`` runs
  :func:`vlmkernels.vision_rope` (also in the towers that call Qwen2-VL's function under
  their own module's name: Kimi-K2.5, Ovis2.5, VideoLLaMA3 and the others of
  :mod:`.tables.qwen_vl`); Pixtral's and DeepSeek-OCR-2's vision attentions, which call
  the text ``apply_rotary_pos_emb``, run :func:`vlmkernels.rope`; Llama 4's
  ``vision_apply_rotary_emb`` (complex lane pairs) runs ``vision_rope(..., pairs=True)``
  and Gemma 4's ``apply_multidimensional_rope`` (a rotate-half per position axis) runs
  ``rope`` on a view whose sequence axis is the head's share per axis.
- ``rope_index``: ``get_rope_index`` of the ``...Model`` instance is
  :func:`rope_index_method` (:func:`vlmkernels.get_rope_index` with the semantics of the
  installed transformers, probed once per class).
- ``angles="positions"`` (with ``rope``): the text rotary module no longer builds cos/sin
  tables; it hands the (3, B, S) position ids on, and the attention calls
  :func:`vlmkernels.mrope_from_positions` with the module's ``inv_freq``,
  ``attention_scaling`` and M-RoPE section (chunked for Qwen2/2.5-VL, interleaved for
  Qwen3-VL and Qwen3.5; chunked over the frequencies, in pairs or halves, for GLM-4V and
  GLM-4V-MoE). The rotary module then returns ``(position_ids,
  PositionAngles(...))`` in place of ``(cos, sin)``: only the patched attention understands
  that pair, and anything else that unpacked it as tensors would fail loudly rather than
  compute wrong values. Refused
  for rope types that update ``inv_freq`` during the forward pass (``dynamic``,
  ``longrope``). The angles stay in fp32 (the table path rounds cos/sin to the activations'
  dtype first, as transformers does), so in bf16 the two paths differ by that rounding.

Outputs have the dtypes transformers' functions return (type promotion of q and cos for
the text functions, q's and k's dtypes for the vision one); the ops compute in fp32.

Mechanism (:mod:`.patching`; the Qwen-VL tables are :mod:`.tables.qwen_vl`). The attention
classes call the rotary function by its module-global name, so for each patched attention
module the class's ``forward`` is rebuilt on the same code object and closure over a copy of
its module's globals in which that one name is bound to the vlmkernels-backed function, and
set as the instance attribute ``forward``; ``nn.Module.__call__`` finds it before the
class's. Decorators on ``forward`` (``deprecate_kwarg``, which renames ``past_key_values``
to ``cache`` from transformers 5.24, or any ``functools.wraps`` wrapper) are rebuilt around
it and keep running. A rotary function whose parameters were renamed is called through an
adapter; one turned into a module by the hub-kernel decorator
(``use_kernel_forward_from_hub`` with the ``kernels`` package installed) is replaced like a
function. Before anything is installed, the undecorated forward's bytecode must load exactly
one of the expected names as a global and the installed function must take the same
parameters; otherwise :class:`UnsupportedLayoutError` names the transformers version, the
tested range and the parts that still patch, and nothing changes. A layer that the fused
forward would read, found wrapped or replaced (FSDP's ``fully_shard`` on it, tensor
parallelism, PEFT, quantisation), gives :class:`WrappedLayerError` (a subclass) instead.

Why this is per instance and exactly undoable: nothing is assigned to a module or a class
of torch or transformers. Only the patched instances' ``__dict__`` gain entries
(``forward``, or ``_old_forward`` where accelerate's hooks already own ``forward``, and
``get_rope_index``), and :meth:`PatchHandle.undo` puts back exactly what each slot held
before. The installed values are methods bound to their modules, so ``copy.deepcopy`` of a
patched model gives an independent patched copy (it runs the vlmkernels ops on its own
weights; patching it again raises :class:`AlreadyPatchedError`, and only the original has a
handle). The copied globals are a snapshot: module globals rebound after ``patch`` do not
reach the patched instances. Pickling the model object (``torch.save(model)``) stores it
unpatched: the loaded model runs transformers' code (it holds the classes' own methods
where the patched ones were) and can be patched again; ``save_pretrained`` stores weights
only.

Version matrix (the rotary call each attention's ``forward`` makes):

=============  ===============================  ===================================
transformers   Qwen2-VL, Qwen2.5-VL text        Qwen3-VL (and MoE) text
=============  ===============================  ===================================
<= 5.16        ``apply_multimodal_rotary_       ``apply_rotary_pos_emb`` (the rotary
               pos_emb`` on (3, B, S, D)        class merges the interleaved
               tables -> ``mrope``              sections) -> ``rope``
>= 5.17        ``apply_rotary_pos_emb`` (the    ``apply_rotary_pos_emb`` -> ``rope``
               rotary class merges) -> ``rope``
=============  ===============================  ===================================

Qwen3.5 (and MoE) and GLM-4V-MoE, all versions: ``apply_rotary_pos_emb`` with partial rotary
-> ``rope``; GLM-4V and GLM-OCR: partial rotary in pairs -> ``rope(..., pairs=True)``;
PaddleOCR-VL and Cohere Compass: Qwen2-VL's functions (Cohere Compass without
``positions``: its rotary class keeps a table per layer type). ERNIE-4.5-VL: the whole head
in pairs, in fp32 -> ``rope(..., pairs=True)``; neither ``positions`` nor ``rope_index``
(its section rule and ``get_rope_index`` are its own). Qwen4-Exp: Qwen3.5's partial
function with k optional -> ``rope``, without ``positions`` (its sparse-attention indexer,
left as it is, reads the tables too). HunYuan-VL (>= 5.17; rotate-half in
fp32), Cosmos3-Edge and GLM-Image (partial): ``rope`` alone, on any of their
``...ForConditionalGeneration``, ``...Model`` and ``...TextModel``.
All versions: vision attention ``apply_rotary_pos_emb_vision`` -> ``vision_rope``;
``get_rope_index(input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw,
[second_per_grid_ts,] attention_mask, **kwargs)`` -> :func:`rope_index_method`. The layout is
recognised from the code, not from the version number, so a release that moves the call
again is refused instead of silently left unpatched. :data:`TESTED_VERSIONS` lists the
releases tests/test_patch_transformers.py passed on; :func:`support` tells what patches on
the installed one (``vlmkernels info`` prints it).

Other families add tables (``integrations/tables/<group>.py``, each registering a
:class:`.patching.Patcher`) whose parts :func:`patch` switches with keywords of the same
names (``**parts``); a table's architectures may apply anywhere in a module tree.

Models: ``Qwen2VL`` / ``Qwen2_5_VL`` / ``Qwen3VL`` / ``Qwen3VLMoe`` / ``Qwen3_5`` /
``Qwen3_5Moe`` / ``Glm4v`` / ``Glm4vMoe`` / ``GlmOcr`` / ``PaddleOCRVL`` / ``CohereCompass``
``...ForConditionalGeneration`` and ``...Model`` (all three parts), ``...TextModel`` and
Qwen3.5's and Cohere Compass's ``...ForCausalLM`` (``rope`` only: no vision tower and no
``get_rope_index``; also wherever a model holds one, as MiniCPM-V 4.6 holds Qwen3.5's) and
the vision towers (``vision`` only). The Qwen2.5-Omni and Qwen3-Omni-MoE thinkers (and the
whole Omni models holding them) take ``rope``, ``vision`` and, for Qwen2.5-Omni,
``positions``; their ``get_rope_index`` also places audio and stays theirs. A module holding
one of these (a wrapper, or a task head of the same module: Qwen3.5's
``...ForSequenceClassification`` and ``...ForTokenClassification``), or several side by
side, gets the parts of every one it holds. GLM-4.6V's ``Glm46VForConditionalGeneration``
and ``Glm46VModel`` build GLM-4V's (or GLM-4V-MoE's) towers: those patch as GLM-4V's, and
its own ``get_rope_index`` (GLM-4V's code) takes ``rope_index``; Cosmos3-Omni's likewise,
around Qwen3-VL's towers.
"""

from __future__ import annotations

from ..core.checks import check_bool
from . import tables  # noqa: F401  (registers every table's patcher)
from .patching import (
    AlreadyPatchedError,
    PatchHandle,
    UnsupportedLayoutError,
    UnsupportedModelError,
    WrappedLayerError,
    install,
    patchers,
    unpatch,
)
from .tables.qwen_vl import (  # noqa: F401  (the rotary family's table, re-exported)
    ARCHITECTURES,
    PATCHER,
    REPLACEMENTS,
    TESTED_VERSIONS,
    PositionAngles,
    _probe,
    _rope_index_arch,
    installed_semantics,
    rope_index_method,
)

__all__ = [
    "AlreadyPatchedError",
    "PatchHandle",
    "PositionAngles",
    "TESTED_VERSIONS",
    "UnsupportedLayoutError",
    "UnsupportedModelError",
    "WrappedLayerError",
    "part_label",
    "patch",
    "rope_index_method",
    "support",
    "unpatch",
]


def _hint(failures: dict, working: list[str]) -> str:
    off = {part: f"{part}=False" for part in failures}
    off.pop("positions", None)
    if "positions" in failures and "rope" not in failures:
        off["positions"] = "angles='table'"
    fixes = [off[p] for p in failures if p in off]
    if working and len(fixes) == len(failures):
        return f"still works: vlmkernels.patch(model, {', '.join(fixes)})"
    if all(isinstance(exc, WrappedLayerError) for exc in failures.values()):
        return "no other part of vlmkernels.patch applies to this model"
    return "no part of vlmkernels.patch applies to this model on this version"


def patch(model, *, rope: bool = True, vision: bool = True, rope_index: bool = True,
          angles: str = "table", **parts: bool) -> PatchHandle:  # fmt: skip
    """Run this transformers model instance's supported parts on the vlmkernels ops (see
    the module docstring for what and how).

    Args:
        model: for the rotary parts, a Qwen-VL ``...ForConditionalGeneration`` or
            ``...Model`` (text, vision and ``get_rope_index``), a ``...TextModel`` (text
            only) or a vision tower, or a module holding them (``peft``'s ``PeftModel``,
            Qwen3.5's task heads, towers side by side: the parts of every one held);
            other tables' architectures anywhere in its tree.
        rope: text attention rotary -> :func:`vlmkernels.rope` / :func:`vlmkernels.mrope`.
        vision: vision attention rotary -> :func:`vlmkernels.vision_rope`.
        rope_index: ``get_rope_index`` -> :func:`rope_index_method`.
        angles: ``"table"`` (transformers' cos/sin) or ``"positions"`` (angles computed in
            the kernel from the position ids, no cos/sin tables; needs ``rope``).
        parts: other tables' parts by name, each on (True, the default) or off.

    Returns:
        A :class:`PatchHandle`; ``handle.undo()`` restores the instance exactly.

    Raises:
        UnsupportedModelError: no table recognises the model.
        UnsupportedLayoutError: the installed transformers does not lay the model out as
            expected; the message names each part that failed and the call that still
            works (nothing is changed); :class:`WrappedLayerError` where the layers were
            wrapped or replaced in this instance (FSDP on a layer, PEFT, quantisation).
        AlreadyPatchedError: the instance is already patched (undo the first handle).
    """
    for name, on in (("rope", rope), ("vision", vision), ("rope_index", rope_index)):
        check_bool("vlmkernels.patch", name, on)
    if angles not in ("table", "positions"):
        raise ValueError(f"vlmkernels.patch: angles must be 'table' or 'positions', got "
                         f"{angles!r}")  # fmt: skip
    if angles == "positions" and not rope:
        raise ValueError("vlmkernels.patch: angles='positions' applies to the text rotary path: "
                         "it needs rope=True")  # fmt: skip
    # the rotary table's "positions" part is set by angles="positions", not a keyword
    known = {part for p in patchers() for part in p.parts} - {"positions"}
    if "positions" in parts:
        raise TypeError(
            "vlmkernels.patch: positions is not a part keyword; the text rotary path "
            "computes its angles from positions with angles='positions'"
        )
    unknown = set(parts) - known
    if unknown:
        raise TypeError(
            f"vlmkernels.patch: unknown parts {sorted(unknown)}; parts: {sorted(known)}"
        )
    for name, on in parts.items():
        check_bool("vlmkernels.patch", name, on)
    switches = {part: True for part in known}
    switches |= {"rope": rope, "vision": vision, "rope_index": rope_index,
                 "positions": rope and angles == "positions", **parts}  # fmt: skip
    wanted = {part for part, on in switches.items() if on}
    matched = [(p, found) for p in patchers() if (found := p.match(model)) is not None]
    if not matched:
        _unsupported(model)
    found = [match for _, matches in matched for match in matches]
    if not any(wanted & set(applicable) for _, _, applicable in found):
        offered = dict.fromkeys(part_label(p) for _, _, applicable in found for p in applicable)
        why = "the parts switched on do not apply to this model" if wanted else "every part is off"
        raise ValueError(
            f"vlmkernels.patch: nothing to patch ({why}; it takes {', '.join(offered)})"
        )
    for arch, _, applicable in found:
        why = arch.data.get("no_positions")
        if "positions" in wanted and "rope" in applicable and why:
            raise UnsupportedLayoutError(
                f"vlmkernels.patch: angles='positions' does not apply to {arch.key} ({why}); "
                f"use angles='table'"
            )
    plans = [(patcher, *patcher.plan(model, wanted, matches)) for patcher, matches in matched]
    # the hint names what still patches across every table (a Qwen-VL model's rotary parts
    # while its merger is refused), and switches off every table's failing parts
    every_failure = {part: exc for *_, failures, _ in plans for part, exc in failures.items()}
    every_working = [part for *_, working in plans for part in working]
    for patcher, _, failures, _ in plans:
        if failures:
            raise patcher.layout_error(failures, _hint(every_failure, every_working))
    return install(model, [slot for _, slots, _, _ in plans for slot in slots])


def _unsupported(model) -> None:
    """Raise :class:`UnsupportedModelError` for a model no table matches: the rotary table's
    own message where it knows the model's module (a Qwen-VL class it does not take), else
    every table's architectures."""
    PATCHER.root(model)  # raises for a class of a module it knows
    names = sorted({arch.split(".")[0] for p in patchers() for arch in p.architectures})
    raise UnsupportedModelError(
        f"vlmkernels.patch supports transformers models (or modules holding them) of the "
        f"architectures {', '.join(names)}; none is in {type(model).__module__}."
        f"{type(model).__qualname__} (`vlmkernels info` lists the parts per architecture)"
    )


def part_label(part: str) -> str:
    """How :func:`patch` turns ``part`` on, for listings: its keyword's name, or for the
    rotary table's ``positions`` the argument that sets it (``angles='positions'``)."""
    return "positions (angles='positions')" if part == "positions" else part


def support() -> dict[str, dict[str, str]]:
    """What :func:`patch` can do with the installed transformers, from the classes alone:
    ``{arch: {part: "ok" or the reason it is refused}}`` for each architecture of every
    table; the rotary ``rope_index`` also gives the probed semantics."""
    report = {}
    for patcher in patchers():
        report |= patcher.support()
    return report

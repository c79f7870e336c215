"""The ModernVBERT and UltraVBERT connectors in the connector family's tables of the
transformers integration (part ``connector`` of :func:`vlmkernels.patch`):
``ModernVBertConnector`` (ModernVBERT, ColModernVBERT's retrieval model) and
``UltraVBertConnector``.

Both are Idefics3's connector under other names: the pixel shuffle of the (B, S * S, C)
features by ``pixel_shuffle_factor`` s (Idefics3's ``pixel_shuffle``), then
``modality_projection``, an ``nn.Linear`` (s^2 C -> D, no bias); UltraVBERT's then runs its
RMSNorm ``norm`` on the result. The patched forward runs one
:func:`~vlmkernels.ops.connectors.merger` of layout "grid" (the shuffled copy is never
made) and, for UltraVBERT, calls ``norm`` as the class does. Outputs and gradients match
transformers. Features that are not a square grid of (B, S * S, C) with s dividing S run
the class's forward (its errors), with a
:class:`~vlmkernels.integrations.patching.PatchFallbackWarning`, and so do features whose
token rows are not contiguous (its pixel shuffle's ``view`` refuses them), a factor set after
patching to a float, and a projection weight of a dtype or shape transformers' Linear call
refuses or broadcasts; a ``pixel_shuffle``
overridden on the class or the instance is refused (the fused forward would skip it).
Roots: their models (``...Model``, ``...ForMaskedLM``, ...), the connectors, or any model
holding one.
"""

from __future__ import annotations

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
from .connector_layouts import shuffle_view_problem, square_grid_problem
from .connectors import TESTED_VERSIONS, _arch, _linear, _where

__all__ = ["VBERT_CONNECTOR_PATCHER"]


def _vbert_forward(module, arch):
    where = _where(module)
    _linear(module, "modality_projection", where)
    s = module.pixel_shuffle_factor
    if isinstance(s, bool) or not isinstance(s, int) or s < 1:
        raise UnsupportedLayoutError(f"{where}.pixel_shuffle_factor is {s!r}, not an int >= 1")
    post_norm = arch.data.get("post_norm", False)

    def forward(self, image_hidden_states):
        s, proj, x = self.pixel_shuffle_factor, self.modality_projection, image_hidden_states
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:  # (set after patching)
            why = f"pixel_shuffle_factor is {s!r}, not an int >= 1"
        else:  # (the weight's shape: transformers' Linear raises its own error)
            weights = [("modality_projection", proj.weight, proj.bias)]
            why = (
                square_grid_problem(x, s)
                or linear_chain_problem(s * s * x.shape[-1], weights)
                or shuffle_view_problem(x, s)
            )
        if why is not None:
            return class_forward(self, why, image_hidden_states)
        y = merger(image_hidden_states, proj.weight, proj.bias, merge_size=s, layout="grid")
        return self.norm(y) if post_norm else y

    return fused_forward(module, ("modality_projection",), forward)


def _vbert_arch(key, prefix, post_norm):
    return _arch(key, prefix, "connector", f"{prefix}Connector", models=False,
                 data={"post_norm": post_norm}, roots=(f"{prefix}Model",))  # fmt: skip


VBERT_CONNECTOR_PATCHER = register(
    Patcher(
        "transformers",
        TESTED_VERSIONS,
        (
            _vbert_arch("modernvbert", "ModernVBert", False),
            _vbert_arch("ultravbert", "UltraVBert", True),
        ),
        (SetMethod("connector", "connector", "forward", _vbert_forward,
                   bypasses=("pixel_shuffle",)),),
    )
)  # fmt: skip

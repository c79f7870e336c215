"""Hooks that a fused forward would bypass: a module's own, and those registered for every
module (``register_module_forward_hook`` and its kin: module trackers, FLOP counters). A
forward that fuses what submodules compute must take the unfused path where one is set."""

from __future__ import annotations

import torch

__all__ = ["global_hooks", "has_hooks"]


def has_hooks(module) -> bool:
    """Whether ``module`` has forward or backward hooks of its own (a fused forward that
    does not call it would skip them)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)  # fmt: skip


# (attribute of torch.nn.modules.module, kind in words) of the hooks registered for every
# module (register_module_forward_hook and its kin: module trackers, FLOP counters)
_GLOBAL_HOOKS = tuple((f"_global_{k}_hooks", k.replace("_", " "))
                      for k in ("forward_pre", "forward", "backward_pre", "backward"))  # fmt: skip


def global_hooks() -> str | None:
    """The first kind of hook registered for every module, in words, or None: a fused
    forward skips the calls of the submodules it reads, which such a hook would miss."""
    for name, kind in _GLOBAL_HOOKS:
        if getattr(torch.nn.modules.module, name, None):
            return f"a global module {kind} hook is registered"
    return None

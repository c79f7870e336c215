"""Process-global state under threads: serving stacks call the ops, patch models and read
the tuned configs from several Python threads at once. Each test makes the interleaving
that broke deterministically (events, not luck), so a failure is the race itself."""

import threading

import pytest
import torch

from vlmkernels.integrations import patching


class _Plain(torch.nn.Module):
    def forward(self, x):
        return x


@patching.marked
def _forward(self, x):
    return x + 1


def _patched(module):
    return patching.install(module, [patching.method_slot(module, "forward", _forward, "forward")])


def test_undo_while_another_thread_patches():
    """An undo walks the handles still active (to warn about patched copies) while another
    thread patches its own model: the set of handles must not change under the walk
    ("Set changed size during iteration" after the undo had already restored the model)."""
    inside, added = threading.Event(), threading.Event()

    class Pausing:  # an active handle whose slots the walk reads: it lets the patch in
        @property
        def _slots(self):
            inside.set()
            added.wait(0.3)  # the fixed undo holds the set: the patch waits for the walk
            return []

    pausing = Pausing()
    patching._ACTIVE.add(pausing)
    handles, errors = [], []

    def patch_another():
        inside.wait(5)
        handles.append(_patched(_Plain()))
        added.set()

    worker = threading.Thread(target=patch_another)
    worker.start()
    try:
        model = _Plain()
        handle = _patched(model)
        try:
            handle.undo()
        except RuntimeError as exc:
            errors.append(exc)
    finally:
        worker.join()
        patching._ACTIVE.discard(pausing)
        for h in handles:
            h.undo()
    assert not errors, errors
    assert "forward" not in vars(model) and not handle.active
    assert handles and not handles[0].active

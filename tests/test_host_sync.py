"""Host synchronisations in the eager ops: a read of a tensor's values on the host
(``.item()``, ``.tolist()``, ``bool``/``int``/``float`` of a tensor, ``nonzero``, ...) waits
for the GPU queue to drain, and a CUDA graph capture refuses it. On the CPU such a read is
free and invisible, so :func:`no_host_reads` refuses every read that vlmkernels' own code
makes (Triton's interpreter, which reads its operands on the host by design, and the
tests' own reads pass)."""

import contextlib
import sys

import pytest
import torch

import vlmkernels

_PACKAGE = vlmkernels.__path__[0]
_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu",
          "numpy", "masked_select", "unique")  # fmt: skip


def _ours(depth=2) -> bool:
    return sys._getframe(depth).f_code.co_filename.startswith(_PACKAGE)


@contextlib.contextmanager
def no_host_reads(monkeypatch):
    def refusing(name, original):
        def method(self, *args, **kwargs):
            if _ours():
                raise AssertionError(f"host read in vlmkernels: Tensor.{name}")
            return original(self, *args, **kwargs)

        return method

    with monkeypatch.context() as m:
        for name in _READS:
            m.setattr(torch.Tensor, name, refusing(name, getattr(torch.Tensor, name)))
        for name in ("nonzero", "masked_select", "unique", "equal"):
            original = getattr(torch, name)
            m.setattr(torch, name, lambda *a, _n=name, _o=original, **k: (
                (_ for _ in ()).throw(AssertionError(f"host read in vlmkernels: torch.{_n}"))
                if _ours() else _o(*a, **k)))  # fmt: skip
        yield


@pytest.mark.parametrize("backend", ["triton"])
@pytest.mark.parametrize("inplace", [False, True])
def test_deepstack_add_reads_nothing_on_the_host(backend, inplace, monkeypatch):
    hidden = torch.randn(2, 5, 8, requires_grad=not inplace)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 1:3] = mask[1, 4] = True
    embeds = torch.randn(3, 8, requires_grad=not inplace)
    want = hidden.detach().clone()
    want[mask] += embeds.detach()
    with vlmkernels.use_backend(backend), no_host_reads(monkeypatch):
        target = hidden if not inplace else hidden.clone()
        out = vlmkernels.deepstack_add(target, mask, embeds, inplace=inplace)
        if not inplace:
            out.sum().backward()
    assert torch.equal(out, want)
    if not inplace:
        assert torch.equal(embeds.grad, torch.ones_like(embeds))
    with pytest.raises(RuntimeError, match="as many True entries"):
        vlmkernels.deepstack_add(hidden.detach(), mask, embeds.detach()[1:], inplace=inplace)

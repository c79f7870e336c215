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
from torch.utils._python_dispatch import TorchDispatchMode

import vlmkernels
from vlmkernels.core.checks import scalar_tensor, to_device

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


def test_a_python_scale_is_filled_on_the_device_not_copied():
    """A float ``logit_scale`` (or bias, teacher scale) becomes a device tensor by a fill:
    ``torch.tensor(x, device="cuda")`` builds a host tensor and copies it with a blocking
    copy, a stream synchronisation per loss call. A dispatch mode sees the fill and not the
    copy inside torch.tensor; the meta device stands in for a GPU."""
    seen = []

    class Seen(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    with Seen():
        made = scalar_tensor("clip_loss", "logit_scale", 1 / 0.07, torch.device("meta"))
    assert seen == [torch.ops.aten.full.default] and made.shape == ()
    got = scalar_tensor("clip_loss", "logit_scale", 1 / 0.07, torch.device("cpu"))
    assert got.dtype == torch.float32 and torch.equal(got, torch.tensor(1 / 0.07))


def test_auxiliary_tensors_move_to_the_device_without_blocking():
    """ids, masks, a tensor scale or inv_freq handed over on the host: a blocking copy to a
    GPU synchronises the stream, a non-blocking one from a host tensor does not (copies to
    the host stay blocking). The meta device stands in for a GPU."""
    seen = []

    class Seen(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is not torch.ops.aten.is_pinned.default:
                seen.append((func, (kwargs or {}).get("non_blocking", False)))
            return func(*args, **(kwargs or {}))

    ids = torch.arange(4)
    with Seen():
        to_device("clip_loss", "ids", ids, torch.device("meta"), dtype=torch.int64)
        to_device("clip_loss", "ids", ids, torch.device("cpu"))  # there already: no copy
    assert seen == [(torch.ops.aten._to_copy.default, True)]
    # from pinned memory the copy would read the buffer later, racing a caller that reuses
    # it: blocking (a CPU-only torch cannot pin, so is_pinned stands in)
    seen.clear()
    with pytest.MonkeyPatch.context() as m, Seen():
        m.setattr(torch.Tensor, "is_pinned", lambda self: True)
        to_device("clip_loss", "ids", ids, torch.device("meta"), dtype=torch.int64)
    assert seen == [(torch.ops.aten._to_copy.default, False)]


def test_packed_cross_attention_with_both_bounds_reads_nothing_on_the_host(monkeypatch):
    """With max_seqlen_q and max_seqlen_k given, the offsets are checked on the device
    (flash-attention's contract): the forward and backward read nothing on the host, give
    the results of the call that reads them, and bad offsets or bounds still raise."""
    q, k, v = (torch.randn(n, 2, 16, requires_grad=True) for n in (8, 12, 12))
    cq = torch.tensor([0, 4, 4, 8], dtype=torch.int32)
    ck = torch.tensor([0, 5, 7, 12], dtype=torch.int32)
    with vlmkernels.use_backend("triton"):
        want = vlmkernels.cross_attention(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck)
        want_grads = torch.autograd.grad(want.sum(), (q, k, v))
        with no_host_reads(monkeypatch):
            got = vlmkernels.cross_attention(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck,
                                             max_seqlen_q=4, max_seqlen_k=2**40)  # fmt: skip
            grads = torch.autograd.grad(got.sum(), (q, k, v))
        assert torch.equal(got, want)
        assert all(torch.equal(a, b) for a, b in zip(grads, want_grads, strict=True))
        bounds = dict(max_seqlen_q=4, max_seqlen_k=4)  # a key segment of 5
        with pytest.raises(RuntimeError, match="max_seqlen_k is smaller than a segment"):
            vlmkernels.cross_attention(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, **bounds)
        bad = torch.tensor([0, 5, 3, 12], dtype=torch.int32)
        with pytest.raises(RuntimeError, match="cu_seqlens_k must start at 0, be non-dec"):
            vlmkernels.cross_attention(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=bad,
                                       max_seqlen_q=4, max_seqlen_k=12)  # fmt: skip


def test_patched_attention_masks_with_a_row_per_query_are_not_read_on_the_host(monkeypatch):
    """transformers' mask helpers build (B, 1, T, N) masks; the patched Q-Former / perceiver
    attention checks that their rows agree on the device, not with a host read per layer."""
    from vlmkernels.integrations.tables.attention import key_mask

    mask = torch.zeros(2, 1, 3, 4)
    mask[1, ..., 3] = torch.finfo(torch.float32).min
    with no_host_reads(monkeypatch):
        pad, bias = key_mask(mask, 2, 3, 4, "here")
    assert pad is None and torch.equal(bias, mask[:, 0, 0])

"""The PyTorch path of the contrastive losses keeps its temporaries within the chunk budget.

Each case runs in a fresh subprocess (``VLMKERNELS_BACKEND=torch``, one thread) that
allocates its inputs, runs a small warm-up (libraries, allocator arenas), then reads the
peak resident set size (``ru_maxrss``) before and after one forward + backward at N = 4096,
d = 64, fp32, and reports the growth. What the call needs beyond its chunk temporaries is
O(N d): the gradients (1 MiB each here) and O(N) statistics.

Bound: growth <= 1.25 x budget + 16 MiB (allocator slack, page rounding, the O(N d)
gradients). Measured: 129 to 133 MiB for the 128 MiB budget in every case; before the
chunk rows were sized from the budget, a chunk of 2^24 elements (here the whole 4096 x 4096
matrix, 64 MiB in fp32) had several temporaries at once: 466 MiB for clip_loss (531 MiB with
a teacher) and 197 MiB for siglip_loss.

In process, with an explicit chunk_size, no tensor the PyTorch path makes in forward or
backward is larger than chunk_size x N (or the N x d inputs): nothing N x N.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

import vlmkernels

BUDGET = 128 << 20  # the documented default chunk budget ("None picks 128 MiB")
N, D = 4096, 64

SCRIPT = r"""
import json, resource, sys
import torch
torch.set_num_threads(1)
import vlmkernels
from vlmkernels.ops import contrastive as C

case, n, d = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])


def call(x, y, s, b):
    if case == "clip":
        return vlmkernels.clip_loss(x, y, s, b)
    if case == "clip_ids":
        return vlmkernels.clip_loss(x, y, s, b, ids=torch.arange(x.shape[0]) // 2)
    if case == "clip_teacher":
        return vlmkernels.clip_loss(x, y, s, b, teacher=(x.detach(), y.detach()), alpha=0.4)
    if case == "cross_entropy":
        return vlmkernels.contrastive_cross_entropy(x, y, s, b, offset=0)
    if case == "siglip":
        return vlmkernels.siglip_loss(x, y, s, b)
    if case == "siglip_none":
        return vlmkernels.siglip_loss(x, y, s, b, reduction="none").sum()
    raise ValueError(case)


def inputs(rows):
    g = torch.Generator().manual_seed(rows)
    x = torch.nn.functional.normalize(torch.randn(rows, d, generator=g), dim=1)
    y = torch.nn.functional.normalize(torch.randn(rows, d, generator=g), dim=1)
    s, b = torch.tensor(10.0), torch.tensor(-2.0)
    return [t.requires_grad_() for t in (x, y, s, b)]


with vlmkernels.use_backend("torch"):
    call(*inputs(300)).backward()
    args = inputs(n)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    call(*args).backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert all(torch.isfinite(t.grad).all() for t in args)
print(json.dumps({"growth": (after - before) * 1024, "budget": C.CHUNK_BUDGET_BYTES}))
"""

# one subprocess each (a few seconds): the CLIP path's three buffer layouts (plain, the ids
# mask, a teacher's third buffer) and SigLIP's row pass (forward) and gradient pass
# (backward); contrastive_cross_entropy and the fused SigLIP loss run subsets of these
CASES = ["clip", "clip_ids", "clip_teacher", "siglip_none"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB: Linux")
@pytest.mark.parametrize("case", CASES)
def test_torch_path_peak_memory_within_chunk_budget(case):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["VLMKERNELS_BACKEND"] = "torch"
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, case, str(N), str(D)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    growth = report["growth"]
    assert growth <= 1.25 * BUDGET + (16 << 20), (
        f"{case}: peak RSS grew by {growth / 2**20:.0f} MiB for a {BUDGET >> 20} MiB budget"
    )
    assert report["budget"] == BUDGET


class _LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Largest tensor (in elements) any aten op run under it produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("targets", ["plain", "ids", "teacher", "siglip"])
def test_torch_path_tensors_are_chunk_sized(targets):
    """With an explicit chunk_size, no tensor of the PyTorch path's forward and backward
    exceeds chunk_size x N elements (or the N x d inputs)."""
    n, d, chunk = 160, 24, 32
    x, y = (torch.randn(n, d).requires_grad_() for _ in range(2))
    s, b = torch.tensor(10.0, requires_grad=True), torch.tensor(-1.0, requires_grad=True)
    kw = dict(chunk_size=chunk)
    if targets == "ids":
        kw["ids"] = torch.arange(n) // 3
    if targets == "teacher":
        kw.update(teacher=(torch.randn(n, d), torch.randn(n, d)), alpha=0.3)
    with vlmkernels.use_backend("torch"), _LargestTensor() as rec:
        if targets == "siglip":
            loss = vlmkernels.siglip_loss(x, y, s, b, **kw)
        else:
            loss = vlmkernels.clip_loss(x, y, s, b, **kw)
        loss.backward()
    assert rec.largest <= max(n * d, n * chunk)


def test_out_of_memory_in_the_mixed_precision_probe_is_not_remembered(monkeypatch):
    """The probe of 16-bit products with fp32 results (``aten::mm.dtype``, CUDA) runs at
    the first backward, the step of peak memory. Out of memory there was taken for "not
    supported" and cached for the process: after a caller recovered (an automatic batch
    size search retrying smaller), every product took fp32 copies of both operands, twice
    their memory, and fp32 GEMMs. It is raised instead, and the next call probes again."""
    import types

    from vlmkernels.ops.contrastive import chunked

    real = torch
    state = {"oom": True}

    def ones(*args, device=None, **kwargs):
        if state["oom"]:
            raise real.OutOfMemoryError("CUDA out of memory. Tried to allocate 512 B")
        return real.ones(*args, **kwargs)

    def mm(a, b, dtype):
        return real.mm(a.to(dtype), b.to(dtype))

    def addmm(acc, a, b, dtype, out):
        return out.addmm_(a.to(dtype), b.to(dtype))

    fake = types.SimpleNamespace(
        ones=ones, zeros=lambda *a, device=None, **k: real.zeros(*a, **k),
        bfloat16=real.bfloat16, float32=real.float32, OutOfMemoryError=real.OutOfMemoryError,
        ops=types.SimpleNamespace(aten=types.SimpleNamespace(
            mm=types.SimpleNamespace(dtype=mm), addmm=types.SimpleNamespace(dtype_out=addmm))),
    )  # fmt: skip
    monkeypatch.setattr(chunked, "torch", fake)
    chunked._mixed_precision_mm.cache_clear()
    try:
        with pytest.raises(real.OutOfMemoryError):
            chunked._mixed_precision_mm("cuda")
        state["oom"] = False
        assert chunked._mixed_precision_mm("cuda") is True
    finally:
        chunked._mixed_precision_mm.cache_clear()

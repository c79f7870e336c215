"""The elementwise math of the fused SigLIP kernel against float64.

:func:`vlmkernels.kernels.blocks.softplus2_sigmoid` gives log2(1 + 2^t) and sigmoid(t ln 2)
(softplus and sigmoid in base-2 units) from one exponential, a degree-8 polynomial for
log2(1 + e) and a reciprocal (no logarithm, no division): checked on every few-thousandth
fp32 value of t in [-126, 126] (where 2^-|t| is a normal number) and on the polynomial's
interval e in [0, 1], relative to float64 of the same fp32 inputs. Under the interpreter
exp2 and the reciprocal are numpy's (correctly rounded); on the GPU they are the MUFU's (2
and 1 ulp more): the bounds allow for both.
"""

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from vlmkernels.kernels.blocks import log2_1p_unit, softplus2_sigmoid

# measured under the interpreter: softplus 1.9e-7, sigmoid 1.8e-7, the polynomial 1.5e-7
# (torch's fp32 softplus and sigmoid: 1.0e-7, 1.2e-7)
BOUND = 6e-7
LN2 = float(np.log(2.0))


@triton.jit
def _elementwise(z_ptr, sp_ptr, sig_ptr, lp_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    z = tl.load(z_ptr + offs, mask=mask, other=0.0)
    sp, sig = softplus2_sigmoid(z)
    tl.store(sp_ptr + offs, sp, mask=mask)
    tl.store(sig_ptr + offs, sig, mask=mask)
    # the polynomial alone, on e in [0, 1] given as z
    tl.store(lp_ptr + offs, log2_1p_unit(tl.abs(z)), mask=mask)


def _run(z: torch.Tensor, device):
    z = z.to(device)
    sp, sig, lp = (torch.empty_like(z) for _ in range(3))
    block = 1024
    _elementwise[(triton.cdiv(z.numel(), block),)](z, sp, sig, lp, z.numel(), BLOCK=block)
    return sp.cpu().double(), sig.cpu().double(), lp.cpu().double()


def _rel(out, ref):
    return ((out - ref).abs() / ref.abs()).max().item()


def test_softplus_sigmoid_fp32_accuracy(device):
    # fp32 values spaced ~3e-4 apart in relative terms over [-126, 126], the ends and zero
    mags = torch.logspace(-30, np.log10(126.0), 40000, dtype=torch.float64).float()
    t = torch.cat((-mags.flip(0), torch.zeros(1), mags, torch.tensor([-126.0, 126.0])))
    sp, sig, _ = _run(t, device)
    zd = t.double() * LN2
    assert _rel(sp * LN2, torch.nn.functional.softplus(zd)) < BOUND
    assert _rel(sig, torch.sigmoid(zd)) < BOUND


def test_log1p_polynomial_accuracy(device):
    e = torch.cat((torch.logspace(-38, 0, 20000, dtype=torch.float64).float(),
                   torch.linspace(0, 1, 20001)[1:]))  # fmt: skip
    _, _, lp = _run(e, device)
    assert _rel(lp * LN2, torch.log1p(e.double())) < BOUND


def test_softplus_sigmoid_of_padding_and_extremes(device):
    z = torch.tensor([-1e30, -2e38, -1e4, -150.0, 150.0, 1e4, 2e38])
    sp, sig, _ = _run(z, device)
    # padding logits give exactly 0; past -126 2^-|t| flushes to 0 (an absolute error
    # under 1e-38); past +126 softplus is t and sigmoid 1
    assert sp[:3].tolist() == [0.0, 0.0, 0.0] and sig[:3].tolist() == [0.0, 0.0, 0.0]
    assert abs(sp[3].item()) < 1e-38 and abs(sig[3].item()) < 1e-38
    assert sp[4:].tolist() == z[4:].double().tolist()
    assert sig[4:].tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("z", [float("nan")])
def test_softplus_sigmoid_propagates_nan(device, z):
    sp, sig, _ = _run(torch.tensor([z]), device)
    assert sp.isnan().all() and sig.isnan().all()

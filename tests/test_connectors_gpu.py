"""The connector GEMMs at model sizes on a GPU (compiled Triton, tensor cores): the Qwen-VL
mergers with the norm folded into the first GEMM (16-bit: 1,280 channels per patch, four
patch segments of a 5,120-wide row) or in its prologue (fp32), the pixel-shuffle connector
of Idefics3 (no norm, gathered addressing), Aya Vision's SwiGLU projector (InternVL's
shuffle and LayerNorm, value and gate rows interleaved in the first GEMM), forward and every
gradient against the float64 references of tests/test_connectors.py. Skipped without
CUDA."""

import pytest
import torch
import torch.nn.functional as F
from test_connectors import MERGERS, max_rel, ref_merger, swiglu

from vlmkernels.ops import connectors as C

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# relative to the largest reference element; fp32 runs 3xTF32 over K = 5,120
TOL = {torch.bfloat16: 3e-2, torch.float32: 1e-4}


def _rand(*shape, dtype, scale=1.0, offset=0.0):
    t = torch.randn(*shape, device="cuda") * scale + offset
    return t.to(dtype).requires_grad_()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "name", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl_postshuffle", "idefics3", "aya_vision"]
)
def test_merger_model_size(name, dtype):
    gated = name == "aya_vision"  # InternVL's layout and norm, SwiGLU of 2 x 2,048
    layout, s, norm, before, two = MERGERS["internvl" if gated else name]
    c = 1280 if layout == "consecutive" else 1152
    if layout == "consecutive":  # 4 x 64 patches, merged 2 x 2 into 64 rows of 5,120
        x = _rand(256, c, dtype=dtype, offset=0.5)
    else:  # two images of 16 x 16 patches, pixel-shuffled by 2
        x = _rand(2, 256, c, dtype=dtype, offset=0.5)
    k = s * s * c
    n1, n_out = (k, 3584) if two else (4096, 4096)
    n1 = 4096 if gated else n1
    length = c if before else k
    nw = (1 + 0.2 * torch.randn(length, device="cuda")).to(dtype).requires_grad_() if norm else None
    nb = _rand(length, dtype=dtype, scale=0.2) if norm == "layernorm" else None
    w1 = _rand(n1, k, dtype=dtype, scale=k**-0.5)
    b1 = _rand(n1, dtype=dtype, scale=0.1) if two else None
    n_in = n1 // 2 if gated else n1
    w2 = _rand(n_out, n_in, dtype=dtype, scale=n_in**-0.5) if two else None
    b2 = _rand(n_out, dtype=dtype, scale=0.1) if two else None
    kw = dict(merge_size=s, layout=layout, norm=norm, norm_weight=nw, norm_bias=nb, eps=1e-6,
              norm_before_merge=before)  # fmt: skip
    y = C.merger(x, w1, b1, w2, b2, activation="swiglu" if gated else "gelu", **kw)
    tensors = {"x": x, "w1": w1, "b1": b1, "w2": w2, "b2": b2, "norm_weight": nw,
               "norm_bias": nb}  # fmt: skip
    tensors = {n: t for n, t in tensors.items() if t is not None}
    r = {n: t.detach().cpu().double().requires_grad_() for n, t in tensors.items()}
    ref = ref_merger(r["x"], r["w1"], r.get("b1"), r.get("w2"), r.get("b2"), s=s,
                     layout=layout, norm=norm, nw=r.get("norm_weight"),
                     nb=r.get("norm_bias"), eps=1e-6, before=before,
                     act=swiglu if gated else F.gelu)  # fmt: skip
    assert y.shape == ref.shape
    assert max_rel(y.cpu(), ref) < TOL[dtype], max_rel(y.cpu(), ref)
    g = torch.randn(ref.shape, dtype=torch.float64)
    grads = torch.autograd.grad(y, list(tensors.values()), g.to("cuda", dtype))
    refs = torch.autograd.grad(ref, list(r.values()), g)
    for n, got, want in zip(tensors, grads, refs, strict=True):
        assert max_rel(got.cpu(), want) < 3 * TOL[dtype], (n, max_rel(got.cpu(), want))

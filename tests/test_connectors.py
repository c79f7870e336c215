"""pixel_shuffle / mlp_projector / merger / deepstack_add against float64 references.

The references are written here from the transformers modules' formulas (Idefics3's pixel
shuffle, LLaVA's Linear-GELU-Linear, the Qwen-VL mergers' norm + view + MLP, Qwen3-VL's
``_deepstack_process``) and evaluated in float64 on the same rounded inputs, gradients by
autograd. Tolerances (max abs error relative to max |ref|): fp32 1e-5 (the GEMMs accumulate
in fp32); fp16 5e-3; bf16 3e-2 (the hidden activations are rounded to 16 bits between the
two GEMMs, as in the eager modules).
"""

import pytest
import torch
import torch.nn.functional as F

import vlmkernels
from vlmkernels.ops import connectors as C
from vlmkernels.ops.connectors import launchers, ops
from vlmkernels.ops.connectors.kernels import ACT_SWIGLU, ACT_SWIGLU_GRAD, LAYER_NORM, RMS_NORM

TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float64: 1e-12}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(params=["triton", "torch"])
def backend(request):
    with vlmkernels.use_backend(request.param):
        yield request.param


def max_rel(out, ref):
    ref = ref.double()
    return ((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def rand(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape) * scale).to(dtype).requires_grad_()


def leaf64(t):
    return t.detach().double().requires_grad_()


# ------------------------------------------------------------------ references (float64)


def idefics3_shuffle(x, s):
    from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector

    return Idefics3Connector.pixel_shuffle(None, x, s)


def ref_norm(v, kind, w, b, eps):
    if kind == "layernorm":
        return F.layer_norm(v, (v.shape[-1],), w, b, eps)
    return v * torch.rsqrt(v.square().mean(-1, keepdim=True) + eps) * w


def swiglu(h):
    """Aya Vision's ``x, gate = h.chunk(2, dim=-1); act(gate) * x``, act SiLU."""
    v, gate = h.chunk(2, dim=-1)
    return F.silu(gate) * v


def ref_merger(x, w1, b1, w2, b2, *, s, layout, norm, nw, nb, eps, before, act=F.gelu):
    """The Qwen-VL mergers (consecutive), the pixel-shuffle projectors (grid) and, with
    ``act`` :func:`swiglu`, Aya Vision's projector (grid, LayerNorm after the shuffle)."""
    c = x.shape[-1]
    if norm is not None and before:
        x = ref_norm(x, norm, nw, nb, eps)
    if layout == "consecutive":
        X = x.reshape(-1, s * s * c)
    else:
        X = idefics3_shuffle(x, s)
    if norm is not None and not before:
        X = ref_norm(X, norm, nw, nb, eps)
    h = F.linear(X, w1, b1)
    return h if w2 is None else F.linear(act(h), w2, b2)


def check_grads(pairs, tol):
    for name, (got, ref) in pairs.items():
        assert got is not None, name
        err = max_rel(got, ref)
        assert err < tol, (name, err)


# ------------------------------------------------------------------ pixel_shuffle


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("side", "scale", "c"), [(4, 2, 8), (6, 3, 5), (6, 2, 3)])
def test_pixel_shuffle_bitwise_idefics3(dtype, side, scale, c, backend):
    x = rand(2, side * side, c, dtype=dtype)
    out = vlmkernels.ops.connectors.pixel_shuffle(x, scale)
    ref = idefics3_shuffle(x, scale)
    assert out.shape == ref.shape and out.is_contiguous()
    assert torch.equal(out, ref)
    g = torch.randn_like(out)
    (dx,) = torch.autograd.grad(out, x, g)
    (dref,) = torch.autograd.grad(ref, x, g)
    assert torch.equal(dx, dref)


def test_pixel_shuffle_strided_input(backend):
    base = torch.randn(2, 7, 16, 6)
    x = base[:, 3, :, ::2]  # (2, 16, 3), strides (112, 6, 2)
    assert not x.is_contiguous()
    assert torch.equal(C.pixel_shuffle(x, 2), idefics3_shuffle(x.contiguous(), 2))
    xt = torch.randn(2, 8, 16).transpose(1, 2)  # (2, 16, 8) channel-major
    assert torch.equal(C.pixel_shuffle(xt, 4), idefics3_shuffle(xt.contiguous(), 4))


@pytest.mark.parametrize(("shape", "scale"), [((2, 16, 3), 1), ((2, 4, 3), 2), ((0, 16, 3), 2)])
def test_pixel_shuffle_output_is_its_own_tensor(shape, scale, backend):
    """Where the shuffle moves nothing (scale 1, a grid of one merged token, no images) the
    result is still a new tensor: writing into it leaves x alone, and a compiled graph (a
    custom op's output may not alias its input) runs."""
    x = torch.randn(shape)
    y = C.pixel_shuffle(x, scale)
    assert torch.equal(y, idefics3_shuffle(x, scale))
    assert y.numel() == 0 or y.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    xg = x.clone().requires_grad_()
    g = torch.randn(y.shape)
    (dx,) = torch.autograd.grad(C.pixel_shuffle(xg, scale), xg, g)
    assert dx.numel() == 0 or dx.untyped_storage().data_ptr() != g.untyped_storage().data_ptr()
    compiled = torch.compile(C.pixel_shuffle, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x, scale), y)


def test_projectors_backward_without_rows(backend):
    """A micro-batch without images: zero rows forward and backward, zero weight grads."""
    w1, b1 = rand(10, 8, scale=0.3), rand(10)
    w2, b2 = rand(6, 10, scale=0.3), rand(6)
    pooled = dict(pool="avg2x2", grid=(4, 4))
    cases = [
        (rand(0, 8), lambda x: C.mlp_projector(x, w1, b1, w2, b2)),
        (rand(0, 2), lambda x: C.merger(x, w1, b1, w2, b2, merge_size=2)),
        (rand(0, 16, 8), lambda x: C.mlp_projector(x, w1, b1, w2, b2, **pooled)),
    ]
    for x, fn in cases:
        y = fn(x)
        assert y.shape[0] == 0 and y.shape[-1] == 6
        grads = torch.autograd.grad(y.sum(), [x, w1, b1, w2, b2])
        assert grads[0].shape == x.shape
        assert all(torch.count_nonzero(g) == 0 for g in grads[1:])


# ------------------------------------------------------------------ mlp_projector


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("store_hidden", [False, True])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_mlp_projector(dtype, store_hidden, activation, backend):
    """GELU(x W1^T + b1) W2^T + b2, or with "swiglu" (v SiLU(g)) W2^T + b2 for the halves
    (v, g) of h: I = 19 value columns, so the interleaved tiles of the first GEMM (half a
    tile per output column) end mid-tile and the gate half starts at an odd column."""
    k, n1, n2 = 24, 38, 20
    n_in, act = (n1 // 2, swiglu) if activation == "swiglu" else (n1, F.gelu)
    x = rand(3, 5, k, dtype=dtype)
    w1, b1 = rand(n1, k, dtype=dtype, scale=0.3), rand(n1, dtype=dtype)
    w2, b2 = rand(n2, n_in, dtype=dtype, scale=0.3), rand(n2, dtype=dtype)
    params = [x, w1, b1, w2, b2]
    y = C.mlp_projector(*params, activation=activation, store_hidden=store_hidden)
    ref64 = [leaf64(t) for t in params]
    ref = F.linear(act(F.linear(*ref64[:3])), *ref64[3:])
    assert y.shape == (3, 5, n2) and y.dtype == dtype
    assert max_rel(y, ref) < TOL[dtype]
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(y, params, g.to(dtype))
    refs = torch.autograd.grad(ref, ref64, g)
    names = ["x", "w1", "b1", "w2", "b2"]
    check_grads(dict(zip(names, zip(grads, refs, strict=True), strict=True)), 2 * TOL[dtype])


def test_swiglu_kernels_alone():
    """The two epilogues on their own, in fp32 outputs, against float64: the forward's
    v SiLU(g) and its pre-activation h (both halves, W1's column order), and the backward's
    (dv, dg) with v SiLU(g) stored for dW2, for gates spanning -30..30 (SiLU's saturated
    ends and sigmoid's underflow)."""
    m, k, i = 21, 12, 11
    x = torch.randn(m, 1, 1, k)
    w1, b1 = torch.randn(2 * i, k) * 0.3, torch.randn(2 * i) * 0.3
    b1[i:] = torch.linspace(-30, 30, i)  # the gates' offsets
    grid = launchers.Addressing.of(x, [1, 1])
    out, pre = torch.empty(m, i), torch.empty(m, 2 * i)
    with vlmkernels.use_backend("triton"):
        launchers.first_linear(out, launchers.XOperand(x, grid), w1, b1, act=ACT_SWIGLU,
                               aux=pre)  # fmt: skip
    h = F.linear(x.reshape(m, k).double(), w1.double(), b1.double())
    assert max_rel(pre, h) < 1e-6
    assert max_rel(out, swiglu(h)) < 1e-6
    w2, dy = torch.randn(7, i), torch.randn(m, 7)
    dh, p = torch.empty(m, 2 * i), torch.empty(m, i)
    launchers.gemm(dh, m, i, 7, a=dy, a_strides=dy.stride(), b=w2, b_strides=w2.stride(),
                   act=ACT_SWIGLU_GRAD, aux=pre, aux2=p)  # fmt: skip
    h64 = pre.double().requires_grad_()
    (dh_ref,) = torch.autograd.grad(swiglu(h64), h64, dy.double() @ w2.double())
    assert max_rel(dh, dh_ref) < 1e-6
    assert max_rel(p, swiglu(pre.double())) < 1e-6


def test_mlp_projector_strided_no_bias_and_partial_grads(backend):
    k, n1, n2 = 16, 24, 12
    x = torch.randn(2, 7, 2 * k)[..., ::2].requires_grad_()  # last dim stride 2
    w1 = rand(n1, k, scale=0.3)
    w2 = torch.randn(n1, n2).t().requires_grad_()  # transposed weight
    y = C.mlp_projector(x, w1, None, w2, None)
    xr, w1r, w2r = leaf64(x), leaf64(w1), leaf64(w2)
    ref = F.linear(F.gelu(F.linear(xr, w1r)), w2r)
    assert max_rel(y, ref) < 1e-5
    g = torch.randn_like(ref)
    (dx,) = torch.autograd.grad(y, x, g.float())  # only one input's gradient
    (dxr,) = torch.autograd.grad(ref, xr, g)
    assert max_rel(dx, dxr) < 1e-5
    with torch.no_grad():
        assert max_rel(C.mlp_projector(x, w1, None, w2, None), ref) < 1e-5


def test_float64_takes_the_torch_path():
    x, w1, b1, w2, b2 = (rand(5, 8, dtype=torch.float64), rand(6, 8, dtype=torch.float64),
                         rand(6, dtype=torch.float64), rand(4, 6, dtype=torch.float64),
                         rand(4, dtype=torch.float64))  # fmt: skip
    y = C.mlp_projector(x, w1, b1, w2, b2)
    assert max_rel(y, F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)) < 1e-14


# ------------------------------------------------------------------ merger

MERGERS = {
    # name: (layout, merge size, norm, norm before merge, two linears)
    "qwen2_vl": ("consecutive", 2, "layernorm", True, True),
    "qwen2_5_vl": ("consecutive", 2, "rmsnorm", True, True),
    "qwen3_vl_postshuffle": ("consecutive", 2, "layernorm", False, True),
    "idefics3": ("grid", 2, None, True, False),
    "internvl": ("grid", 2, "layernorm", False, True),
    "grid_rms_per_patch": ("grid", 3, "rmsnorm", True, True),
}


def merger_inputs(name, dtype, c=6, n_out=10, hidden=None):
    """(x, [w1, b1, w2, b2], kwargs) of one of the MERGERS; the first linear's width is
    ``hidden`` (default 2 K - 3, K = s^2 c)."""
    layout, s, norm, before, two = MERGERS[name]
    if layout == "consecutive":
        x = rand(7 * s * s, c, dtype=dtype)
    else:
        x = rand(2, (2 * s) ** 2, c, dtype=dtype)
    k = s * s * c
    n1 = (hidden or 2 * k - 3) if two else n_out
    length = c if before else k
    nw = (1 + 0.3 * torch.randn(length)).to(dtype).requires_grad_() if norm else None
    nb = rand(length, dtype=dtype, scale=0.3) if norm == "layernorm" else None
    w1 = rand(n1, k, dtype=dtype, scale=0.3)
    b1 = rand(n1, dtype=dtype) if two or name != "idefics3" else None
    w2 = rand(n_out, n1, dtype=dtype, scale=0.2) if two else None
    b2 = rand(n_out, dtype=dtype) if two else None
    kwargs = dict(merge_size=s, layout=layout, norm=norm, norm_weight=nw, norm_bias=nb,
                  eps=1e-6, norm_before_merge=before)  # fmt: skip
    return x, [w1, b1, w2, b2], kwargs


@pytest.mark.parametrize("name", list(MERGERS))
@pytest.mark.parametrize("store_hidden", [False, True])
def test_merger_fp32(name, store_hidden, backend):
    merger_case(name, torch.float32, store_hidden)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["qwen2_vl", "internvl"])
def test_merger_16bit(name, dtype, backend):
    merger_case(name, dtype, False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("store_hidden", [False, True])
def test_merger_swiglu_aya_vision(dtype, store_hidden, backend):
    """Aya Vision's projector: pixel shuffle, LayerNorm of the shuffled rows, SwiGLU (16-bit:
    the norm folded into the interleaved first GEMM, its column sums and bias read per
    interleaved column), every gradient."""
    merger_case("internvl", dtype, store_hidden, activation="swiglu")


@pytest.mark.parametrize("biases", ["all", "none"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", [n for n, m in MERGERS.items() if m[2] is not None])
def test_merger_16bit_folded_norm(name, dtype, biases):
    """With 16-bit inputs the norm is folded into the first GEMM (launchers.first_linear:
    raw X times the norm-scaled weight, then r_s (P_s - mu_s colsum_s) per patch segment,
    the accumulator rescaled by r_{s-1} / r_s between segments). Features far from zero
    mean (offset 20: the mean term cancels most of P) with patch scales spanning
    1e-2..1e2 (rstd ratios up to 1e4 between segments), C = 40 (segments end mid-tile at the
    interpreter's BK 16), 37 outputs: within the 16-bit tolerance of float64, and within 1.5x the
    error of eager 16-bit (X normalised and rounded, then the linear). Without any bias
    (``biases="none"``: no b1, no norm bias) the fold has no bias to write."""
    x, weights, kw = merger_inputs(name, dtype, c=40, hidden=37)
    if biases == "none":
        weights[1], kw["norm_bias"] = None, None
    shape = x.shape
    scale = 10 ** (4 * torch.rand(*shape[:-1], 1) - 2)
    x = ((20 + torch.randn(shape)) * scale).to(dtype)
    with vlmkernels.use_backend("triton"):
        y = C.merger(x, *weights, **kw)
    r = [None if t is None else leaf64(t) for t in (x, *weights, kw["norm_weight"],
                                                     kw["norm_bias"])]  # fmt: skip
    ref = ref_merger(*r[:5], s=kw["merge_size"], layout=kw["layout"], norm=kw["norm"],
                     nw=r[5], nb=r[6], eps=kw["eps"], before=kw["norm_before_merge"])  # fmt: skip
    err = max_rel(y, ref)
    assert err < TOL[dtype], err
    # the first linear alone against eager 16-bit (normalised X rounded, then the linear)
    layout, s, norm, before, _ = MERGERS[name]
    grid_x = x.view(-1, s, s, x.shape[-1]) if layout == "consecutive" else x.view(
        x.shape[0], int(x.shape[1] ** 0.5), -1, x.shape[-1])  # fmt: skip
    grid = launchers.Addressing.of(grid_x, (s, s))
    kind = LAYER_NORM if norm == "layernorm" else RMS_NORM
    mean, rstd = launchers.norm_stats(grid_x, grid, kind, before, kw["eps"])
    nb = None if kw["norm_bias"] is None else kw["norm_bias"].detach()
    xop = launchers.XOperand(grid_x, grid, kind, before, mean, rstd, kw["norm_weight"].detach(), nb)
    w1, b1 = weights[0].detach(), weights[1] if weights[1] is None else weights[1].detach()
    # fp32 outputs on both sides: the comparison is of the products, not the final rounding
    folded = torch.empty((grid.M, w1.shape[0]), dtype=torch.float32)
    launchers.first_linear(folded, xop, w1, b1)
    normed = ref_norm_rows(r[0], s, layout, norm, before, r[5], r[6], kw["eps"])
    h_ref = F.linear(normed, r[1], r[2])
    eager = F.linear(normed.to(dtype).float(), w1.float(), None if b1 is None else b1.float())
    assert max_rel(folded, h_ref) <= 1.5 * max_rel(eager, h_ref), (
        max_rel(folded, h_ref), max_rel(eager, h_ref))  # fmt: skip


def ref_norm_rows(x, s, layout, norm, before, nw, nb, eps):
    """norm(X), the merged and normalised rows the first linear sees (float64)."""
    if before:
        x = ref_norm(x, norm, nw, nb, eps)
    X = x.reshape(-1, s * s * x.shape[-1]) if layout == "consecutive" else idefics3_shuffle(x, s)
    X = X.reshape(-1, X.shape[-1])
    return X if before else ref_norm(X, norm, nw, nb, eps)


def test_norm_fold_weights():
    """fold_norm: Wf = w[k % L] W (rounded), colsum of the rounded Wf per segment, and
    b + sum_k nb[k % L] W[n, k], against float64, on a strided W (a transposed view)."""
    c, segments, n = 37, 4, 23
    x = torch.randn(2, 4, 4, c).bfloat16()
    grid = launchers.Addressing.of(x, (2, 2))
    nw, nb = (1 + 0.3 * torch.randn(c)).bfloat16(), torch.randn(c).bfloat16()
    w = torch.randn(segments * c, n).bfloat16().t()
    b = torch.randn(n).bfloat16()
    xop = launchers.XOperand(x, grid, LAYER_NORM, True, weight=nw, bias=nb)
    wf, colsum, bias = launchers.fold_norm(w, b, xop)
    w64 = w.double()
    ref_wf = w64 * nw.double().repeat(segments)
    assert wf.dtype == torch.bfloat16 and wf.is_contiguous()
    assert max_rel(wf, ref_wf) < 2**-8
    assert max_rel(colsum, wf.double().view(n, segments, c).sum(-1)) < 1e-6
    assert max_rel(bias, b.double() + w64 @ nb.double().repeat(segments)) < 1e-6


def merger_case(name, dtype, store_hidden, activation="gelu"):
    if activation == "swiglu":  # 13 value and 13 gate rows in w1; w2 takes 13 features
        x, weights, kw = merger_inputs(name, dtype, hidden=26)
        weights[2] = rand(10, 13, dtype=dtype, scale=0.2)
    else:
        x, weights, kw = merger_inputs(name, dtype)
    y = C.merger(x, *weights, store_hidden=store_hidden, activation=activation, **kw)
    tensors = {"x": x, "w1": weights[0], "b1": weights[1], "w2": weights[2], "b2": weights[3],
               "norm_weight": kw["norm_weight"], "norm_bias": kw["norm_bias"]}  # fmt: skip
    tensors = {k: v for k, v in tensors.items() if v is not None}
    r = {k: leaf64(v) for k, v in tensors.items()}
    ref = ref_merger(
        r["x"], r["w1"], r.get("b1"), r.get("w2"), r.get("b2"), s=kw["merge_size"],
        layout=kw["layout"], norm=kw["norm"], nw=r.get("norm_weight"), nb=r.get("norm_bias"),
        eps=kw["eps"], before=kw["norm_before_merge"],
        act=swiglu if activation == "swiglu" else F.gelu,
    )  # fmt: skip
    assert y.shape == ref.shape and y.dtype == dtype
    assert max_rel(y, ref) < TOL[dtype], max_rel(y, ref)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(y, list(tensors.values()), g.to(dtype))
    refs = torch.autograd.grad(ref, list(r.values()), g)
    pairs = dict(zip(tensors, zip(grads, refs, strict=True), strict=True))
    check_grads(pairs, 3 * TOL[dtype])


@pytest.mark.parametrize("name", ["qwen2_vl", "internvl", "qwen3_vl_postshuffle"])
@pytest.mark.parametrize("bias", ["none", "frozen"])
def test_layernorm_weight_grad_without_a_bias_grad(name, bias, backend):
    """A LayerNorm whose bias gets no gradient (no bias, or a frozen one) while its weight
    does: the weight's gradient is sum(g xh) alone (the bias's sum(g) kept apart)."""
    x, weights, kw = merger_inputs(name, torch.float32)
    x = x.detach()
    weights = [w.detach() if w is not None else None for w in weights]
    kw["norm_bias"] = None if bias == "none" else kw["norm_bias"].detach()
    y = C.merger(x, *weights, **kw)
    (g,) = torch.autograd.grad(y.sum(), kw["norm_weight"])
    _, s, norm, before, _ = MERGERS[name]
    nw = leaf64(kw["norm_weight"])
    nb = None if kw["norm_bias"] is None else kw["norm_bias"].double()
    ref = ref_merger(x.double(), *(w.double() if w is not None else None for w in weights),
                     s=s, layout=MERGERS[name][0], norm=norm, nw=nw, nb=nb, eps=1e-6,
                     before=before)  # fmt: skip
    (g_ref,) = torch.autograd.grad(ref.sum(), nw)
    assert max_rel(g, g_ref) < TOL[torch.float32]


def test_merger_strided_features(backend):
    """Qwen-VL features sliced from a wider buffer (row stride != C)."""
    base = torch.randn(16, 10)
    x = base[:, 2:8].requires_grad_(False).clone().requires_grad_()
    xs = torch.randn(16, 10)[:, 2:8]
    xs.copy_(x.detach())
    xs.requires_grad_()
    _, weights, kw = merger_inputs("qwen2_vl", torch.float32)
    y = C.merger(xs, *weights, **kw)
    y_ref = C.merger(x, *weights, **kw)
    assert max_rel(y, y_ref) < 1e-6
    (g1,) = torch.autograd.grad(y.sum(), xs)
    (g2,) = torch.autograd.grad(y_ref.sum(), x)
    assert max_rel(g1, g2) < 1e-6


def strided_like(t, expand=False):
    """A view equal to the 1-D ``t`` that is not contiguous: every other element of a
    wider buffer, or (``expand``, for a constant vector) one element expanded."""
    if expand:
        return t.detach()[:1].expand(t.shape).requires_grad_()
    wide = torch.zeros(2 * t.numel(), dtype=t.dtype)
    wide[::2] = t.detach()
    return wide[::2].requires_grad_()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl", "internvl"])
def test_merger_strided_and_expanded_vectors(name, dtype, backend):
    """Biases and norm weights as strided or expanded views (a fused checkpoint's slices,
    ``torch.ones(1).expand(C)``) give what their contiguous copies give, values and
    gradients; 16-bit post-merge norms take the folded-norm GEMM."""
    x, weights, kw = merger_inputs(name, dtype)
    w1, b1, w2, b2 = weights
    nw, nb = kw["norm_weight"], kw["norm_bias"]
    nw_const = torch.full(nw.shape, 1.5, dtype=dtype)
    views = dict(b1=strided_like(b1), b2=strided_like(b2), nw=strided_like(nw_const, True))
    if nb is not None:
        views["nb"] = strided_like(nb)
    plain = {k: v.detach().contiguous().requires_grad_() for k, v in views.items()}

    def run(v):
        args = dict(kw, norm_weight=v["nw"], norm_bias=v.get("nb"))
        y = C.merger(x, w1, v["b1"], w2, v["b2"], **args)
        return y, torch.autograd.grad(y.float().square().sum(), [x, *v.values()])

    (y, grads), (y_ref, grads_ref) = run(views), run(plain)
    assert torch.equal(y, y_ref)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert g.shape == g_ref.shape
        assert max_rel(g, g_ref) < 1e-6


def minicpm_space_to_depth(x, mh, mw):
    """MiniCPMV4_6Merger's merge of each (mh, mw) block of an (H, W) grid, per image."""
    b, h, w, c = x.shape
    x = x.view(b, h // mh, mh, w // mw, mw, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // mh, w // mw, mh * mw * c)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("hw", "merge"), [((4, 6), (2, 2)), ((6, 3), (3, 1)), ((2, 6), (1, 3))])
def test_merger_grid_4d(dtype, hw, merge, backend):
    """x (B, H, W, C) with any grid and an (MH, MW) merge (MiniCPM-V 4.6's merger rounds),
    LayerNorm of the merged rows, Linear + GELU + Linear; a strided view (every other
    channel of a wider buffer) as x."""
    (h, w), (mh, mw) = hw, merge
    c, n_out = 5, 7
    k = mh * mw * c
    x = torch.randn(2, h, w, 2 * c)[..., ::2].to(dtype).requires_grad_()
    nw = (1 + 0.3 * torch.randn(k)).to(dtype).requires_grad_()
    nb = rand(k, dtype=dtype, scale=0.3)
    w1, b1 = rand(k + 3, k, dtype=dtype, scale=0.3), rand(k + 3, dtype=dtype)
    w2, b2 = rand(n_out, k + 3, dtype=dtype, scale=0.2), rand(n_out, dtype=dtype)
    size = merge if mh != mw else mh
    y = C.merger(x, w1, b1, w2, b2, merge_size=size, layout="grid", norm="layernorm",
                 norm_weight=nw, norm_bias=nb, eps=1e-5, norm_before_merge=False)  # fmt: skip
    tensors = [x, nw, nb, w1, b1, w2, b2]
    r = [leaf64(t) for t in tensors]
    X = F.layer_norm(minicpm_space_to_depth(r[0], mh, mw), (k,), r[1], r[2], 1e-5)
    ref = F.linear(F.gelu(F.linear(X, r[3], r[4])), r[5], r[6])
    assert y.shape == (2, h // mh, w // mw, n_out) and y.dtype == dtype
    assert max_rel(y, ref) < TOL[dtype], max_rel(y, ref)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(y, tensors, g.to(dtype))
    refs = torch.autograd.grad(ref, r, g)
    names = ["x", "norm_weight", "norm_bias", "w1", "b1", "w2", "b2"]
    check_grads(dict(zip(names, zip(grads, refs, strict=True), strict=True)), 3 * TOL[dtype])


# ------------------------------------------------------------------ deepstack


def qwen3_deepstack(hidden, mask, embeds):
    """Qwen3VLTextModel._deepstack_process."""
    hidden = hidden.clone()
    local = hidden[mask, :] + embeds.to(hidden.dtype)
    hidden[mask, :] = local
    return hidden


def assert_same_sum(out, ref, backend):
    """Bitwise equal (one fp32 add rounded once, as eager's), except that Triton's CPU
    interpreter truncates fp32 -> bf16 where the GPU rounds to nearest: one ulp there."""
    if out.dtype == torch.bfloat16 and backend == "triton" and not torch.cuda.is_available():
        torch.testing.assert_close(out, ref, rtol=2**-7, atol=0)
    else:
        assert torch.equal(out, ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_deepstack_add(dtype, backend):
    hidden = rand(2, 9, 20, dtype=dtype)
    mask = torch.rand(2, 9) < 0.5
    embeds = rand(int(mask.sum()), 20, dtype=dtype)
    before = hidden.detach().clone()
    out = C.deepstack_add(hidden, mask, embeds)
    ref = qwen3_deepstack(hidden, mask, embeds)
    assert_same_sum(out, ref, backend)
    assert torch.equal(hidden, before)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [hidden, embeds], g)
    want = torch.autograd.grad(ref, [hidden, embeds], g)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_deepstack_add_inplace_and_casts(backend):
    hidden = torch.randn(3, 7, 12, dtype=torch.bfloat16)
    mask = torch.rand(3, 7) < 0.4
    embeds = torch.randn(int(mask.sum()), 12)  # fp32, cast to bf16 as Qwen3-VL does
    ref = qwen3_deepstack(hidden, mask, embeds)
    version = hidden._version
    out = C.deepstack_add(hidden, mask, embeds, inplace=True)
    assert out is hidden and hidden._version > version  # autograd sees the write
    assert_same_sum(hidden, ref, backend)
    with pytest.raises(RuntimeError, match="forward-only, but hidden requires grad"):
        C.deepstack_add(hidden.float().requires_grad_(), mask, embeds, inplace=True)
    before = hidden.clone()  # trainable visual features: refused, not given no gradient
    with pytest.raises(RuntimeError, match="forward-only, but visual_embeds requires grad"):
        C.deepstack_add(hidden, mask, embeds.requires_grad_(), inplace=True)
    assert torch.equal(hidden, before)
    with torch.no_grad():
        C.deepstack_add(hidden, mask, embeds, inplace=True)
    with pytest.raises(RuntimeError, match="as many True entries"):
        C.deepstack_add(hidden, mask, embeds[1:])
    meta = [t.to("meta") for t in (hidden, mask, embeds)]
    with pytest.raises(ValueError, match="visual_pos_mask is a meta tensor"):
        C.deepstack_add(*meta)


def test_deepstack_add_inplace_refuses_aliased_memory(backend):
    """In place, a hidden expanded over the batch (its rows written more than once) or
    visual features that are a view of hidden raise before anything is written."""
    mask = torch.tensor([[False, True, False, True]] * 2)
    embeds = torch.randn(4, 6)
    expanded = torch.randn(1, 4, 6).expand(2, 4, 6)
    before = expanded.clone()
    with pytest.raises(ValueError, match="hidden .* more than once"):
        C.deepstack_add(expanded, mask, embeds, inplace=True)
    assert torch.equal(expanded, before)
    hidden = torch.randn(2, 4, 6)
    with pytest.raises(ValueError, match="hidden and visual_embeds share memory"):
        C.deepstack_add(hidden, mask, hidden[0], inplace=True)
    want = qwen3_deepstack(expanded, mask, embeds)
    assert torch.equal(C.deepstack_add(expanded, mask, embeds), want)  # out of place: fine


@pytest.mark.parametrize("inplace", [False, True])
def test_deepstack_add_strided_hidden(inplace, backend):
    """A hidden whose leading dims no view flattens (a transposed batch), in place or not."""
    hidden = torch.randn(7, 3, 12).transpose(0, 1)
    mask = torch.rand(3, 7) < 0.4
    embeds = torch.randn(int(mask.sum()), 12)
    ref = qwen3_deepstack(hidden, mask, embeds)
    out = C.deepstack_add(hidden, mask, embeds, inplace=inplace)
    assert (out is hidden) == inplace
    assert_same_sum(out, ref, backend)


def test_deepstack_add_copies_other_rows_bitwise(backend):
    """Rows without a visual feature are hidden's as they are, as Qwen3-VL's clone leaves
    them: -0.0 stays -0.0 (an added 0.0 would make it +0.0)."""
    hidden = torch.randn(2, 5, 8)
    hidden[torch.rand_like(hidden) < 0.3] = -0.0
    mask = torch.tensor([[True, False, False, True, False], [False, True, False, False, False]])
    out = C.deepstack_add(hidden, mask, torch.randn(3, 8))
    assert torch.equal(out[~mask].view(torch.int32), hidden[~mask].view(torch.int32))


@pytest.mark.parametrize("inplace", [False, True])
def test_deepstack_add_zero_width_hidden(inplace, backend):
    """Hidden states of width 0 (D = 0, visual features (V, 0)): an empty result of hidden's
    shape, as Qwen3-VL's indexing gives, and empty gradients, not a reshape error."""
    hidden = torch.randn(2, 3, 0, requires_grad=not inplace)
    mask = torch.tensor([[True, False, True], [False, True, False]])
    embeds = torch.randn(3, 0, requires_grad=not inplace)
    out = C.deepstack_add(hidden, mask, embeds, inplace=inplace)
    assert out.shape == (2, 3, 0) and (out is hidden) == inplace
    if not inplace:
        d_hidden, d_embeds = torch.autograd.grad(out.sum(), [hidden, embeds])
        assert d_hidden.shape == (2, 3, 0) and d_embeds.shape == (3, 0)


# ------------------------------------------------------------------ bad input


def test_bad_inputs():
    x = torch.randn(2, 16, 4)
    w1, w2 = torch.randn(8, 4), torch.randn(3, 8)
    hidden, mask = torch.randn(1, 4, 6), torch.tensor([[True, False, True, False]])
    hidden_before = hidden.clone()
    cases = [
        # flags are bools and eps a number: a string is refused, not taken by truthiness
        (lambda: C.mlp_projector(x, w1, None, w2, None, store_hidden="no"), TypeError,
         "store_hidden must be True or False"),
        (lambda: C.merger(torch.randn(8, 4), torch.randn(8, 16), norm_before_merge="no"),
         TypeError, "norm_before_merge must be True or False"),
        (lambda: C.merger(torch.randn(8, 4), torch.randn(8, 16), norm="rmsnorm",
                          norm_weight=torch.ones(4), eps="1e-6"), TypeError,
         "eps must be a float"),
        (lambda: C.deepstack_add(hidden, mask, torch.randn(2, 6), inplace="False"), TypeError,
         "inplace must be True or False"),
        (lambda: C.deepstack_add(hidden, mask, torch.randn(2, 6, device="meta")), ValueError,
         "visual_embeds must be on cpu"),
        (lambda: C.pixel_shuffle(torch.randn(2, 15, 4), 2), ValueError, "square grid"),
        (lambda: C.pixel_shuffle(torch.randn(2, 9, 4), 2), ValueError, "divisible by scale"),
        (lambda: C.pixel_shuffle(torch.randn(16, 4), 2), ValueError, "x must be 3-D"),
        (lambda: C.pixel_shuffle(x.int(), 2), TypeError, "x must be a float16"),
        (lambda: C.pixel_shuffle(x, 0), ValueError, "scale must be >= 1, got 0"),
        (lambda: C.mlp_projector(x, w1, None, torch.randn(3, 7), None), ValueError, "w2 must be"),
        (lambda: C.mlp_projector(x, torch.randn(8, 5), None, w2, None), ValueError, "w1 must be"),
        (lambda: C.mlp_projector(x, w1, torch.randn(7), w2, None), ValueError, "b1 must be"),
        (lambda: C.mlp_projector(x, w1.half(), None, w2, None), TypeError, "w1 must have x's"),
        (lambda: C.mlp_projector(x, w1, None, w2, None, "relu"), ValueError, "activation"),
        (lambda: C.mlp_projector(x, torch.randn(7, 4), None, torch.randn(3, 3), None,
                                 "swiglu"), ValueError, "even out_features of w1"),
        (lambda: C.mlp_projector(x, w1, None, w2, None, "swiglu"), ValueError,
         r"w2 must be \(out_features, 4\)"),
        (lambda: C.mlp_projector(torch.randn(1, 16, 4), w1, None, torch.randn(3, 4), None,
                                 "swiglu", pool="avg2x2", grid=(4, 4)), ValueError,
         "takes activation='gelu'"),
        (lambda: C.merger(torch.randn(8, 4), torch.randn(8, 16), activation="swiglu"),
         ValueError, "'swiglu' needs w2"),
        (lambda: C.merger(torch.randn(10, 4), torch.randn(8, 16)), ValueError, "multiple of"),
        (lambda: C.merger(torch.randn(8, 4), torch.randn(8, 16), norm="batchnorm"),
         ValueError, "norm must be"),
        (lambda: C.merger(torch.randn(8, 4), torch.randn(8, 16), norm=["layernorm"]),
         ValueError, "norm must be"),
        (lambda: C.merger(torch.randn(8, 4), torch.randn(8, 16), activation="relu"),
         ValueError, "activation must be"),
        (lambda: C.mlp_projector(torch.randn(1, 16, 4), torch.randn(8, 4), None,
                                 torch.randn(8, 8), None, pool=["avg2x2"], grid=(4, 4)),
         ValueError, "pool must be"),
        (lambda: C.merger(torch.randn(8, 4), torch.randn(8, 16), norm="layernorm"),
         ValueError, "needs norm_weight"),
        (lambda: C.merger(torch.randn(8, 4), torch.randn(8, 16), norm="layernorm",
                          norm_weight=torch.randn(16)), ValueError, r"norm_weight must be \(4,\)"),
        (lambda: C.merger(torch.randn(8, 4), torch.randn(8, 16), layout="rows"),
         ValueError, "layout must be"),
        (lambda: C.merger(torch.randn(1, 4, 6, 4), torch.randn(8, 16), layout="grid",
                          merge_size=(3, 2)), ValueError, r"grid \(4, 6\) of x must be divisible"),
        (lambda: C.merger(torch.randn(1, 4, 6, 4), torch.randn(8, 16), layout="grid",
                          merge_size=(2, 2, 1)), ValueError, r"merge_size must be an int or"),
        (lambda: C.merger(torch.randn(1, 4, 6, 4), torch.randn(8, 24), layout="grid",
                          merge_size=(2, 2)), ValueError, r"w1 must be \(out_features, 16\)"),
        (lambda: C.merger(torch.randn(8, 4), torch.randn(8, 16), merge_size=(2, 2)),
         TypeError, "merge_size must be an int"),
        (lambda: C.deepstack_add(torch.randn(2, 3, 4), torch.ones(2, 4, dtype=torch.bool),
                                 torch.randn(8, 4)), ValueError, "visual_pos_mask must have"),
        (lambda: C.deepstack_add(torch.randn(2, 3, 4), torch.ones(2, 3), torch.randn(6, 4)),
         TypeError, "visual_pos_mask must be a bool tensor, got torch.float32"),
        (lambda: C.deepstack_add(torch.randn(4), torch.tensor(True), torch.randn(1, 4)),
         ValueError, r"hidden must be \(\.\.\., D\) with at least 2 dims, got shape \(4,\)"),
        (lambda: C.pixel_shuffle(x, 2.0), TypeError, "scale must be an int, got 2.0"),
    ]  # fmt: skip
    for call, exc, message in cases:
        with pytest.raises(exc, match=message):
            call()
    assert torch.equal(hidden, hidden_before)  # inplace="False" wrote nothing
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the type check comes first there too
        with pytest.raises(TypeError, match="w1 must be a torch.Tensor"):
            C.mlp_projector(x, w1.tolist(), None, w2, None)


def test_numpy_integer_sizes_act_as_ints():
    """A scale or merge size read from a NumPy config is an int to the connectors, as it is
    to the tokens ops (tome_merge's r, select_tokens' keep)."""
    np = pytest.importorskip("numpy")
    x = torch.randn(2, 16, 3)
    assert torch.equal(C.pixel_shuffle(x, np.int64(2)), C.pixel_shuffle(x, 2))
    rows, w1, w2 = torch.randn(8, 3), torch.randn(5, 12), torch.randn(4, 5)
    expected = C.merger(rows, w1, None, w2, None, merge_size=2)
    assert torch.equal(C.merger(rows, w1, None, w2, None, merge_size=np.int32(2)), expected)


# ------------------------------------------------------------------ registration


def test_opcheck(backend):
    x = torch.randn(2, 4, 4, 3, requires_grad=True)
    w1, b1 = torch.randn(5, 12, requires_grad=True), torch.randn(5, requires_grad=True)
    w2, b2 = torch.randn(4, 5, requires_grad=True), torch.randn(4, requires_grad=True)
    nw, nb = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    lib = torch.ops.vlmkernels
    args = (x, w1, b1, w2, b2, nw, nb, None, [2, 2], 1, True, 1e-6, 1, False)
    torch.library.opcheck(lib.connector, args)
    # SwiGLU (activation 3): w1's 6 rows are 3 value and 3 gate rows, w2 takes 3 features
    w1g, b1g = torch.randn(6, 12, requires_grad=True), torch.randn(6, requires_grad=True)
    w2g = torch.randn(4, 3, requires_grad=True)
    for save in (False, True):
        torch.library.opcheck(lib.connector, (x, w1g, b1g, w2g, b2, nw, nb, None, [2, 2], 1,
                                              True, 1e-6, 3, save))  # fmt: skip
    # what the backward reads (saved activation, statistics) is not a differentiable result
    out, *aux = lib.connector(*args)
    assert out.requires_grad and not any(t.requires_grad for t in aux)
    torch.library.opcheck(lib.merge_tokens, (x, [2, 2]))
    hidden = torch.randn(2, 5, 6, requires_grad=True)
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 1, 0, 1]], dtype=torch.bool)
    embeds = torch.randn(5, 6, requires_grad=True)
    torch.library.opcheck(lib.deepstack_add, (hidden, mask, embeds))
    torch.library.opcheck(lib.deepstack_add_, (hidden.detach().clone(), mask, embeds.detach()))


@pytest.mark.parametrize("fullgraph", [False, True])
def test_deepstack_add_compiles_with_its_backward(fullgraph):
    """torch.compile(model) as users write it (graph breaks allowed) over deepstack_add with
    gradients: its backward traces (the mask's rows are taken at a static count, the
    embeds' rows; mask indexing's nonzero stopped the backend, and the fallback then traced
    Triton's launcher); values and both gradients match eager."""
    torch._dynamo.reset()
    hidden, embeds = rand(2, 5, 6), rand(3, 6)
    mask = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 0, 0, 1]], dtype=torch.bool)

    def step(h, e):
        return (C.deepstack_add(h, mask, e) * torch.linspace(-1, 1, 6)).sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=fullgraph)
    got = torch.autograd.grad(compiled(hidden, embeds), (hidden, embeds))
    want = torch.autograd.grad(step(hidden, embeds), (hidden, embeds))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(got[1], torch.linspace(-1, 1, 6).expand(3, 6))


def test_pixel_shuffle_compiles_with_a_dynamic_batch():
    """Training with a batch size that changes: the backward's unmerge shape is a SymInt
    list (mark_dynamic on the batch raised a specialisation error)."""
    torch._dynamo.reset()
    x = rand(3, 16, 4)
    torch._dynamo.mark_dynamic(x, 0)
    compiled = torch.compile(lambda x: C.pixel_shuffle(x, 2), backend="aot_eager",
                             fullgraph=True)  # fmt: skip
    (g,) = torch.autograd.grad(compiled(x).square().sum(), x)
    assert torch.equal(g, 2 * x.detach())


def test_torch_compile_fullgraph():
    x = rand(2, 16, 4)
    w1, b1 = rand(8, 16, scale=0.3), rand(8)
    w2, b2 = rand(6, 8, scale=0.3), rand(6)
    nw, nb = rand(16), rand(16)

    def connector(x):
        shuffled = vlmkernels.ops.connectors.pixel_shuffle(x, 2)
        y = C.mlp_projector(shuffled, w1, b1, w2, b2)
        z = C.merger(x, w1, b1, w2, b2, layout="grid", norm="layernorm", norm_weight=nw,
                     norm_bias=nb, norm_before_merge=False)  # fmt: skip
        p = C.mlp_projector(shuffled, w1, b1, w2, b2, pool="bilinear", grid=(2, 2),
                            pool_size=(1, 1))  # fmt: skip
        return y.square().sum() + z.sum() + p.square().sum()

    compiled = torch.compile(connector, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    (g,) = torch.autograd.grad(out, x)
    ref = connector(x)
    (g_ref,) = torch.autograd.grad(ref, x)
    assert max_rel(out, ref) < 1e-6 and max_rel(g, g_ref) < 1e-6
    assert ops.connector.backends == ("triton", "torch")
    assert ops.pooled_projector.backends == ("triton", "torch")

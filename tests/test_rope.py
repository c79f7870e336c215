"""rope / mrope / mrope_from_positions / vision_rope against float64 references.

References are written from transformers' formulas (``q * cos + rotate_half(q) * sin``,
the <= 5.16 section split for chunked M-RoPE, Qwen3-VL's recomposition for interleaved
M-RoPE, fp32 angles ``position * inv_freq`` as the rotary classes compute them) and
evaluated in float64 on the same (rounded) inputs.

Tolerances (max abs error relative to max |ref|): fp32 1e-6; fp16 2e-3; bf16 1e-2 (one
rounding of the output; the interpreter's fp32 -> bf16 conversion truncates, so up to one
ulp, 2^-7). Gradients: the same per dtype.
"""

import pytest
import torch

import vlmkernels
from vlmkernels.ops import rope as R

TOL = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}
BACKENDS = ["triton", "torch"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    with vlmkernels.use_backend(request.param):
        yield request.param


# ------------------------------------------------------------------ references (float64)


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), -1)


def ref_rope(q, k, cos, sin, unsqueeze_dim=1):
    """transformers' apply_rotary_pos_emb, partial rotary when cos is narrower than q."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    rot = cos.shape[-1]
    out = []
    for x in (q, k):
        x_rot, x_pass = x[..., :rot], x[..., rot:]
        out.append(torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), -1))
    return tuple(out)


def merge_chunked(table, section):
    """(3, ..., R) -> (..., R): transformers <= 5.16's split by section * 2, chunk i from
    axis i % 3."""
    parts = table.split(list(section) * 2, dim=-1)
    return torch.cat([m[i % 3] for i, m in enumerate(parts)], dim=-1)


def merge_interleaved(table, section):
    """(3, ..., R) -> (..., R): Qwen3-VL's recomposition on each half."""
    half = table.shape[-1] // 2
    out = []
    for part in (table[..., :half], table[..., half:]):
        merged = part[0].clone()
        for axis, offset in ((1, 1), (2, 2)):
            idx = slice(offset, section[axis] * 3, 3)
            merged[..., idx] = part[axis, ..., idx]
        out.append(merged)
    return torch.cat(out, -1)


def ref_mrope(q, k, cos, sin, section, unsqueeze_dim=1, interleaved=False):
    merge = merge_interleaved if interleaved else merge_chunked
    return ref_rope(q, k, merge(cos, section), merge(sin, section), unsqueeze_dim)


def tables_from_positions(position_ids, inv_freq, scaling=1.0):
    """(3, ..., R) float64 cos/sin of the fp32 angles position * inv_freq."""
    angle = (position_ids[..., None].float() * inv_freq.float()).double()
    angle = torch.cat((angle, angle), -1)
    return angle.cos() * scaling, angle.sin() * scaling


# ------------------------------------------------------------------ helpers


def max_rel(actual, expected):
    expected = expected.double().cpu()
    scale = expected.abs().max().clamp_min(1e-30)
    return ((actual.double().cpu() - expected).abs().max() / scale).item()


def leaf(t):
    return t.detach().clone().requires_grad_(True)


def check_fp32_against_float64(fn, ref_fn, q, k, cos, sin):
    """``fn(q, k, cos, sin)`` (fp32) against ``ref_fn`` on float64 copies: the outputs, and
    the gradients of q, k, cos and sin."""
    refs = ref_fn(*(t.double().cpu() for t in (q, k, cos, sin)))
    check_outputs(fn(q, k, cos, sin), refs, torch.float32, (q, k))
    check_grads(fn, ref_fn, [leaf(q), leaf(k), leaf(cos), leaf(sin)], torch.float32)


def qk_views(b, s, hq, hk, d, dtype, device, layout):
    """q, k as attention code produces them, for ``layout``:
    "bhsd" (transposed (B, S, H, D) projections, unsqueeze_dim 1), "bshd" (unsqueeze_dim 2),
    "thd" (token-major), "packed" (views of one (T, 3, H, D) qkv: vision style)."""
    if layout == "packed":
        qkv = torch.randn(b * s, 3, hq, d, device=device).to(dtype)
        return qkv[:, 0], qkv[:, 1, :hk], 1
    q = torch.randn(b, s, hq, d, device=device).to(dtype)
    k = torch.randn(b, s, hk, d, device=device).to(dtype)
    if layout == "bhsd":
        return q.transpose(1, 2), k.transpose(1, 2), 1
    if layout == "bshd":
        return q, k, 2
    return q.reshape(b * s, hq, d), k.reshape(b * s, hk, d), 1


def table_shape(q, unsqueeze_dim, rot):
    shape = [n for i, n in enumerate(q.shape[:-1]) if i != unsqueeze_dim]
    return (*shape, rot)


def check_outputs(outs, refs, dtype, like):
    for out, ref, x in zip(outs, refs, like, strict=True):
        assert out.shape == x.shape and out.dtype == x.dtype
        assert max_rel(out, ref) < TOL[dtype], max_rel(out, ref)


def check_grads(fn, ref_fn, inputs, dtype):
    """Gradients of sum(w * out) wrt the tensors of ``inputs`` that require grad."""
    outs = fn(*inputs)
    weights = [torch.randn_like(o, dtype=torch.float32) for o in outs]
    wanted = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(
        sum((o.float() * w).sum() for o, w in zip(outs, weights, strict=True)), wanted
    )
    ref_inputs = [
        t.detach().double().cpu().requires_grad_(t.requires_grad)
        if isinstance(t, torch.Tensor) and t.is_floating_point()
        else t
        for t in inputs
    ]
    ref_outs = ref_fn(*ref_inputs)
    ref_wanted = [t for t in ref_inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    ref_grads = torch.autograd.grad(
        sum((o * w.double().cpu()).sum() for o, w in zip(ref_outs, weights, strict=True)),
        ref_wanted,
    )
    for g, rg, t in zip(grads, ref_grads, wanted, strict=True):
        assert g.shape == t.shape and g.dtype == t.dtype
        assert max_rel(g, rg) < TOL[dtype], max_rel(g, rg)


# ------------------------------------------------------------------ values and gradients


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["bhsd", "bshd", "thd"])
@pytest.mark.parametrize("interleaved", [False, True])
def test_mrope_values_and_grads(dtype, layout, interleaved, device, backend):
    b, s, hq, hk, d = 2, 9, 5, 2, 32
    section = [6, 5, 5] if not interleaved else [4, 6, 6]
    q, k, ud = qk_views(b, s, hq, hk, d, dtype, device, layout)
    cos = torch.randn(3, *table_shape(q, ud, d), device=device).to(dtype)
    sin = torch.randn_like(cos)
    outs = vlmkernels.mrope(q, k, cos, sin, section, ud, interleaved=interleaved)
    refs = ref_mrope(*(t.double().cpu() for t in (q, k, cos, sin)), section, ud, interleaved)
    check_outputs(outs, refs, dtype, (q, k))
    check_grads(
        lambda q, k: vlmkernels.mrope(q, k, cos, sin, section, ud, interleaved=interleaved),
        lambda q, k: ref_mrope(q, k, cos.double().cpu(), sin.double().cpu(), section, ud,
                               interleaved),
        [leaf(q), leaf(k)],
        dtype,
    )  # fmt: skip


@pytest.mark.parametrize("d", [64, 72, 80, 128, 256])
def test_rope_head_dims(d, device, backend):
    dtype = torch.bfloat16
    q, k, ud = qk_views(1, 5, 3, 1, d, dtype, device, "bhsd")
    cos = torch.randn(*table_shape(q, ud, d), device=device).to(dtype)
    sin = torch.randn_like(cos)
    outs = vlmkernels.rope(q, k, cos, sin, ud)
    check_outputs(outs, ref_rope(*(t.double().cpu() for t in (q, k, cos, sin)), ud), dtype, (q, k))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_partial_rotary_and_broadcast_table(dtype, device, backend):
    """Qwen3.5-style partial rotary (cos narrower than the head dim) with a table shared by
    the batch (leading dim 1)."""
    b, s, d, rot = 3, 6, 64, 16
    q, k, ud = qk_views(b, s, 4, 2, d, dtype, device, "bhsd")
    cos = torch.randn(1, s, rot, device=device).to(dtype)
    sin = torch.randn_like(cos)
    outs = vlmkernels.rope(q, k, cos, sin, ud)
    check_outputs(outs, ref_rope(*(t.double().cpu() for t in (q, k, cos, sin)), ud), dtype, (q, k))
    check_grads(
        lambda q, k: vlmkernels.rope(q, k, cos, sin, ud),
        lambda q, k: ref_rope(q, k, cos.double().cpu(), sin.double().cpu(), ud),
        [leaf(q), leaf(k)],
        dtype,
    )


def test_table_gradients(device, backend):
    """cos/sin that require grad (transformers' tables never do) get correct gradients."""
    q, k, ud = qk_views(2, 5, 3, 2, 16, torch.float32, device, "bhsd")
    cos = torch.randn(3, *table_shape(q, ud, 16), device=device)
    sin = torch.randn_like(cos)
    section = [2, 3, 3]
    check_grads(
        lambda q, k, c, s: vlmkernels.mrope(q, k, c, s, section, ud),
        lambda q, k, c, s: ref_mrope(q, k, c, s, section, ud),
        [leaf(q), leaf(k), leaf(cos), leaf(sin)],
        torch.float32,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["bhsd", "thd"])
@pytest.mark.parametrize("interleaved", [False, True])
def test_mrope_from_positions(dtype, layout, interleaved, device, backend):
    b, s, d = 2, 11, 32
    section = [6, 5, 5] if not interleaved else [4, 6, 6]
    q, k, ud = qk_views(b, s, 4, 2, d, dtype, device, layout)
    tokens = [n for i, n in enumerate(q.shape[:-1]) if i != ud]
    positions = torch.randint(0, 5000, (3, *tokens), device=device)
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
    scaling = 0.9
    outs = vlmkernels.mrope_from_positions(
        q, k, positions, inv_freq, section, interleaved=interleaved, attention_scaling=scaling
    )
    cos, sin = tables_from_positions(positions.cpu(), inv_freq.cpu(), scaling)
    refs = ref_mrope(q.double().cpu(), k.double().cpu(), cos, sin, section, ud, interleaved)
    check_outputs(outs, refs, dtype, (q, k))
    check_grads(
        lambda q, k: vlmkernels.mrope_from_positions(
            q, k, positions, inv_freq, section, interleaved=interleaved, attention_scaling=scaling
        ),
        lambda q, k: ref_mrope(q, k, cos, sin, section, ud, interleaved),
        [leaf(q), leaf(k)],
        dtype,
    )


@pytest.mark.parametrize("section", [[24, 20, 20], [2, 2, 2], [0, 3, 1]])
def test_interleaved_sections_of_any_sum(section, device, backend):
    """Qwen3-VL's interleaved rule takes sections that do not sum to R / 2, as
    transformers' slices do (the [24, 20, 20] default at head dim 16, or fewer lanes); the
    chunked rule still needs the sum."""
    b, s, d = 1, 5, 16
    q, k, ud = qk_views(b, s, 2, 1, d, torch.float32, device, "bhsd")
    positions = torch.randint(0, 300, (3, b, s), device=device)
    inv_freq = 1.0 / (1e4 ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
    cos, sin = tables_from_positions(positions.cpu(), inv_freq.cpu())
    refs = ref_mrope(q.double().cpu(), k.double().cpu(), cos, sin, section, ud, True)
    outs = vlmkernels.mrope_from_positions(q, k, positions, inv_freq, section, interleaved=True)
    check_outputs(outs, refs, torch.float32, (q, k))
    tables = [t.float().to(device) for t in (cos, sin)]
    outs = vlmkernels.mrope(q, k, *tables, section, interleaved=True)
    check_outputs(outs, refs, torch.float32, (q, k))
    with pytest.raises(ValueError, match="sums to"):
        vlmkernels.mrope(q, k, *tables, section)


def test_positions_broadcast_size_one_axes(device, backend):
    """(3, 1, S) positions for a batch of B (one layout for every row), as the table ops
    broadcast size-1 axes; q laid out (B, S, H, D) is refused naming the layout it needs."""
    b, s, d = 3, 6, 16
    q, k, _ = qk_views(b, s, 2, 1, d, torch.float32, device, "bhsd")
    positions = torch.randint(0, 300, (3, 1, s), device=device)
    inv_freq = torch.rand(d // 2, device=device)
    outs = vlmkernels.mrope_from_positions(q, k, positions, inv_freq, [4, 2, 2])
    full = positions.expand(3, b, s)
    cos, sin = tables_from_positions(full.cpu(), inv_freq.cpu())
    check_outputs(outs, ref_mrope(q.double().cpu(), k.double().cpu(), cos, sin, [4, 2, 2]),
                  torch.float32, (q, k))  # fmt: skip
    text = vlmkernels.mrope_from_positions(q, k, full[0, :1], inv_freq, [4, 2, 2])
    want = vlmkernels.mrope_from_positions(q, k, full[0], inv_freq, [4, 2, 2])
    assert all(torch.equal(a, e) for a, e in zip(text, want, strict=True))
    bshd = q.transpose(1, 2)  # (B, S, H, D): heads on dim 2
    with pytest.raises(ValueError, match=r"for q as \(B, H, S, D\), heads on dim 1"):
        vlmkernels.mrope_from_positions(bshd, torch.randn_like(bshd), full, inv_freq, [4, 2, 2])


def test_positions_partial_rotary_and_text_positions(device, backend):
    """rotary_dim < head dim (lanes past it unchanged); (B, S) text positions = (3, B, S)."""
    b, s, d, rot = 2, 7, 48, 16
    q, k, _ = qk_views(b, s, 3, 1, d, torch.float32, device, "bhsd")
    positions = torch.randint(0, 100, (b, s), device=device)
    inv_freq = 1.0 / (1e4 ** (torch.arange(0, rot, 2, dtype=torch.float32, device=device) / rot))
    outs = vlmkernels.mrope_from_positions(q, k, positions, inv_freq, [4, 2, 2], rotary_dim=rot)
    cos, sin = tables_from_positions(positions.expand(3, b, s).cpu(), inv_freq.cpu())
    refs = ref_mrope(q.double().cpu(), k.double().cpu(), cos, sin, [4, 2, 2])
    check_outputs(outs, refs, torch.float32, (q, k))
    assert torch.equal(outs[0][..., rot:], q[..., rot:])


def test_positions_with_strided_inv_freq(device, backend):
    """inv_freq given as a strided view (every other entry of a longer vector) is read by
    value, not by the kernel's unit stride."""
    b, s, d = 1, 9, 32
    q, k, _ = qk_views(b, s, 2, 1, d, torch.float32, device, "bhsd")
    positions = torch.randint(0, 300, (3, b, s), device=device)
    inv_freq = torch.rand(d, device=device)[::2]
    assert inv_freq.stride() == (2,)
    outs = vlmkernels.mrope_from_positions(q, k, positions, inv_freq, [6, 5, 5])
    cos, sin = tables_from_positions(positions.cpu(), inv_freq.cpu().contiguous())
    refs = ref_mrope(q.double().cpu(), k.double().cpu(), cos, sin, [6, 5, 5])
    check_outputs(outs, refs, torch.float32, (q, k))


def test_positions_op_reads_inv_freq_by_value(device, backend):
    """The op itself (``torch.ops.vlmkernels.rope_positions``, public) given a strided or a
    float64 inv_freq: every backend rotates by the values, as the PyTorch path does. The
    Triton kernel read a strided view with a unit stride (other frequencies); the CUDA C++
    kernel refused float64."""
    b, s, d = 1, 9, 32
    q, k, _ = qk_views(b, s, 2, 1, d, torch.float32, device, "bhsd")
    positions = torch.randint(0, 300, (3, b, s), device=device)
    wide = torch.rand(d, device=device)
    cos, sin = tables_from_positions(positions.cpu(), wide[::2].cpu().contiguous())
    refs = ref_mrope(q.double().cpu(), k.double().cpu(), cos, sin, [6, 5, 5])
    op = torch.ops.vlmkernels.rope_positions
    for inv_freq in (wide[::2], wide[::2].double()):
        outs = op(q, k, positions, inv_freq, 1, R.CHUNKED, [6, 5, 5], 1.0, False)
        check_outputs(outs, refs, torch.float32, (q, k))


_B, _S, _D = 2, 5, 8
_BAD_POSITIONS = [
    (torch.randint(0, 9, (3, _S)), ValueError, r"positions must be \(3, 2, 5\) for q"),
    (torch.randint(0, 9, (3, _B, _S - 2)), ValueError, r"got \(3, 2, 3\)"),
    (torch.randint(0, 9, (3, _B + 1, _S)), ValueError, r"got \(3, 3, 5\)"),
    (torch.randint(0, 9, (2, _B, _S)), ValueError, r"got \(2, 2, 5\)"),
    (torch.rand(3, _B, _S) * 9, TypeError, "positions must be int32 or int64"),
]
_BAD_TABLES = [
    (torch.randn(3, _B, _S + 1, _D), ValueError, r"cos and sin must be \(A, 2, 5, R\)"),
    (torch.randn(2, _B, _S, _D), ValueError, r"got \(2, 2, 5, 8\)"),
    (torch.randn(_B, _S, _D), ValueError, r"got \(2, 5, 8\)"),
    (torch.randn(3, _B, _S, _D + 2), ValueError, "at most the head dim 8, got 10"),
    (torch.randn(3, _B, _S, _D).to(torch.int32), TypeError, "cos must be a floating tensor"),
]


@pytest.mark.parametrize("bad", range(len(_BAD_POSITIONS)))
def test_positions_op_refuses_what_its_kernels_would_misread(bad, backend):
    """A direct ``torch.ops.vlmkernels.rope_positions`` call whose positions do not match q
    (the Triton kernel read them out of bounds: (3, S) beside B = 2 as broadcast, a short S
    past its end; the PyTorch path raised a broadcasting error), or that are on another
    device, is refused on every backend as the CUDA C++ binding refuses it, naming the
    argument."""
    positions, error, match = _BAD_POSITIONS[bad]
    q, k = torch.randn(_B, _S, 2, _D), torch.randn(_B, _S, 2, _D)
    op = torch.ops.vlmkernels.rope_positions
    with pytest.raises(error, match=match):
        op(q, k, positions, torch.rand(_D // 2), 2, R.CHUNKED, [2, 1, 1], 1.0, False)
    # another device (the dispatcher sends a call with a meta tensor to the fake; the op's
    # eager call takes q's backend, as a CUDA q beside CPU positions does)
    positions, inv_freq = torch.randint(0, 9, (3, _B, _S)), torch.rand(_D // 2)
    for name, args in (("positions", (positions.to("meta"), inv_freq)),
                       ("inv_freq", (positions, inv_freq.to("meta")))):  # fmt: skip
        with pytest.raises(ValueError, match=f"{name} is on meta, q on cpu"):
            R.ops.rope_positions(q, k, *args, 2, R.CHUNKED, [2, 1, 1], 1.0, False)
    with pytest.raises(ValueError, match=r"chunked sections \[2, 1, 2\] must sum to R / 2"):
        op(q, k, torch.randint(0, 9, (3, _B, _S)), torch.rand(_D // 2), 2, R.CHUNKED,
           [2, 1, 2], 1.0, False)  # fmt: skip
    token_major = torch.randn(_S, 2, _D)  # (T, H, D): (3, T) and (3, 1, T) both fit
    for shape in ((3, _S), (3, 1, _S)):
        out = op(token_major, token_major, torch.randint(0, 9, shape), torch.rand(_D // 2), 1,
                 R.CHUNKED, [2, 1, 1], 1.0, False)  # fmt: skip
        assert out[0].shape == token_major.shape


@pytest.mark.parametrize("bad", range(len(_BAD_TABLES)))
def test_table_ops_refuse_what_their_kernels_would_misread(bad, backend):
    """As above for ``rope_table`` and the in-place ``rope_table_``: tables whose token axes
    do not match q's (read out of bounds by the Triton kernel and by the PyTorch path's
    strided view), a leading axis other than 1 or 3, a rotary dim past the head dim; q and k
    untouched."""
    table, error, match = _BAD_TABLES[bad]
    q, k = torch.randn(_B, _S, 2, _D), torch.randn(_B, _S, 2, _D)
    before = q.clone(), k.clone()
    with pytest.raises(error, match=match):
        torch.ops.vlmkernels.rope_table(q, k, table, table, 2, True, R.INTERLEAVED, [1, 1, 2],
                                        False)  # fmt: skip
    with pytest.raises(error, match=match):
        torch.ops.vlmkernels.rope_table_(q, k, table, table, 2, True, R.INTERLEAVED, [1, 1, 2])
    assert torch.equal(q, before[0]) and torch.equal(k, before[1])
    broadcast = torch.randn(3, 1, _S, _D)  # size-1 token axes broadcast
    out = torch.ops.vlmkernels.rope_table(q, k, broadcast, broadcast, 2, True, R.INTERLEAVED,
                                          [1, 1, 2], False)  # fmt: skip
    assert out[0].shape == q.shape


@pytest.mark.parametrize("hd", [72, 80])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vision_rope_on_packed_qkv(hd, dtype, device, backend):
    """q, k as strided views of a packed (N, 3, H, hd) projection; fp32 tables."""
    n, heads = 37, 3
    q, k, _ = qk_views(1, n, heads, heads, hd, dtype, device, "packed")
    assert not q.is_contiguous()
    cos = torch.randn(n, hd, device=device)
    sin = torch.randn(n, hd, device=device)
    outs = vlmkernels.vision_rope(q, k, cos, sin)
    refs = ref_rope(*(t.double().cpu() for t in (q, k, cos, sin)), 1)
    check_outputs(outs, refs, dtype, (q, k))
    check_grads(
        lambda q, k: vlmkernels.vision_rope(q, k, cos, sin),
        lambda q, k: ref_rope(q, k, cos.double().cpu(), sin.double().cpu(), 1),
        [leaf(q), leaf(k)],
        dtype,
    )


def test_matches_transformers_functions(device):
    """Against the installed transformers' own functions, in fp32."""
    tf = pytest.importorskip("transformers.models.qwen2_vl.modeling_qwen2_vl")
    q, k, ud = qk_views(2, 6, 4, 2, 32, torch.float32, device, "bhsd")
    cos = torch.randn(*table_shape(q, ud, 32), device=device)
    sin = torch.randn_like(cos)
    for ours, theirs in zip(
        vlmkernels.rope(q, k, cos, sin), tf.apply_rotary_pos_emb(q, k, cos, sin), strict=True
    ):
        assert max_rel(ours, theirs) < 1e-6
    vq, vk, _ = qk_views(1, 20, 2, 2, 80, torch.bfloat16, device, "packed")
    vc, vs = torch.randn(20, 80, device=device), torch.randn(20, 80, device=device)
    for ours, theirs in zip(
        vlmkernels.vision_rope(vq, vk, vc, vs),
        tf.apply_rotary_pos_emb_vision(vq, vk, vc, vs),
        strict=True,
    ):
        assert max_rel(ours, theirs) <= 2**-7  # fp32 math, one rounding each


def test_float64_is_computed_in_float64(device):
    """float64 inputs (the PyTorch path) are rotated in fp64: the table and positions forms
    match the float64 formula to rounding, their gradients pass gradcheck, and the table
    gradients too; vision_rope rounds to fp32 first as transformers' vision function does,
    so it is bitwise the installed transformers' result."""
    f64 = torch.float64
    q, k, ud = qk_views(2, 5, 3, 1, 16, f64, device, "bhsd")
    cos = torch.randn(3, *table_shape(q, ud, 16), device=device, dtype=f64)
    sin = torch.randn_like(cos)
    section = [2, 3, 3]
    outs = vlmkernels.mrope(q, k, cos, sin, section, ud)
    check_outputs(outs, ref_mrope(q, k, cos, sin, section, ud), f64, (q, k))
    args = [leaf(t) for t in (q, k, cos, sin)]
    assert torch.autograd.gradcheck(lambda *a: vlmkernels.mrope(*a, section, ud), args)
    positions = torch.randint(0, 5000, (3, 2, 5), device=device)
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, 16, 2, dtype=torch.float32, device=device) / 16))
    outs = vlmkernels.mrope_from_positions(q, k, positions, inv_freq, section)
    # fp32 angles and their fp32 cos / sin, as transformers' rotary classes compute them
    angle = positions.cpu()[..., None].float() * inv_freq.cpu()
    angle = torch.cat((angle, angle), -1)
    pc, ps = angle.cos().double(), angle.sin().double()
    check_outputs(outs, ref_mrope(q.cpu(), k.cpu(), pc, ps, section, ud), f64, (q, k))
    qk = [leaf(q), leaf(k)]
    assert torch.autograd.gradcheck(
        lambda q, k: vlmkernels.mrope_from_positions(q, k, positions, inv_freq, section), qk
    )
    tf = pytest.importorskip("transformers.models.qwen2_vl.modeling_qwen2_vl")
    vq, vk, _ = qk_views(1, 9, 2, 2, 16, f64, device, "packed")
    vc, vs = torch.randn(9, 16, device=device), torch.randn(9, 16, device=device)
    want = tf.apply_rotary_pos_emb_vision(vq, vk, vc, vs)
    for ours, theirs in zip(vlmkernels.vision_rope(vq, vk, vc, vs), want, strict=True):
        assert ours.dtype == f64 and torch.equal(ours, theirs)


def test_inplace(device, backend):
    q, k, ud = qk_views(2, 5, 3, 2, 16, torch.bfloat16, device, "bhsd")
    cos = torch.randn(3, *table_shape(q, ud, 16), device=device).to(torch.bfloat16)
    sin = torch.randn_like(cos)
    expected = vlmkernels.mrope(q, k, cos, sin, [2, 3, 3], ud)
    q2, k2 = q.clone(), k.clone()
    out = vlmkernels.mrope(q2, k2, cos, sin, [2, 3, 3], ud, inplace=True)
    assert out[0] is q2 and out[1] is k2
    assert torch.equal(q2, expected[0]) and torch.equal(k2, expected[1])
    with pytest.raises(RuntimeError, match="inplace=True is forward-only"):
        vlmkernels.mrope(leaf(q), k, cos, sin, [2, 3, 3], ud, inplace=True)
    # a q that autograd saved elsewhere: its new version makes that backward refuse, on
    # every backend (the kernels write through pointers)
    w = torch.ones(16, dtype=q2.dtype, device=device, requires_grad=True)
    saved = (w * q2).sum()
    vlmkernels.mrope(q2, k2, cos, sin, [2, 3, 3], ud, inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.backward()


def _aliased_pairs(device):
    """(name, q, k) where in-place rotation would rotate some element twice or read
    rotated values: stride-0 expansion over heads, q is k, q and k overlapping views."""
    base = torch.randn(2, 5, 3, 16, device=device)
    qkv = torch.randn(2, 5, 6, 16, device=device)
    expanded = torch.randn(2, 5, 1, 16, device=device).expand(2, 5, 3, 16)
    k = torch.randn(2, 5, 3, 16, device=device)
    return [
        ("q expanded over heads", expanded, k),
        ("k expanded over heads", k.clone(), expanded[:, :, :1].clone().expand(2, 5, 3, 16)),
        ("q is k", base, base),
        ("q and k overlap", qkv[:, :, 0:3], qkv[:, :, 2:5]),
        ("q overlaps itself", torch.randn(2 * 5 * 3 * 16 + 8, device=device).as_strided(
            (2, 5, 3, 16), (240, 48, 8, 1)), k),
    ]  # fmt: skip


def test_inplace_refuses_aliased_memory(device, backend):
    """In place, any aliasing between or within the rotated tensors raises before the
    kernel runs, and nothing is modified; views of one packed buffer that do not share
    elements are accepted."""
    cos = torch.randn(2, 5, 16, device=device)
    sin = torch.randn_like(cos)
    for what, q, k in _aliased_pairs(device):
        storages = {id(t): t.untyped_storage() for t in (q, k)}
        before = [bytes(st) for st in storages.values()] if device.type == "cpu" else None
        with pytest.raises(ValueError, match="share memory|more than once"):
            vlmkernels.rope(q, k, cos, sin, 2, inplace=True)
        if before is not None:
            assert [bytes(st) for st in storages.values()] == before, what
    # the table aliasing q is refused too (it would be read after being rotated)
    q = torch.randn(2, 5, 3, 16, device=device)
    with pytest.raises(ValueError, match="share memory"):
        vlmkernels.rope(q, q[:, :, 1:2].clone(), q[:, :, 0], sin, 2, inplace=True)
    # q, k from one packed qkv: disjoint elements of one storage
    qkv = torch.randn(2, 5, 3, 4, 16, device=device)
    q, k = qkv[:, :, 0], qkv[:, :, 1]
    expected = vlmkernels.rope(q, k, cos, sin, 2)
    other = qkv[:, :, 2].clone()
    vlmkernels.rope(q, k, cos, sin, 2, inplace=True)
    assert torch.equal(q, expected[0]) and torch.equal(k, expected[1])
    assert torch.equal(qkv[:, :, 2], other)


def test_inputs_not_modified_and_layout_preserved(device, backend):
    q, k, ud = qk_views(2, 5, 3, 2, 16, torch.bfloat16, device, "bhsd")
    cos = torch.randn(*table_shape(q, ud, 16), device=device).to(torch.bfloat16)
    sin = torch.randn_like(cos)
    copies = [t.clone() for t in (q, k, cos, sin)]
    out_q, out_k = vlmkernels.rope(q, k, cos, sin, ud)
    for t, c in zip((q, k, cos, sin), copies, strict=True):
        assert torch.equal(t, c)
    assert out_q.stride() == q.stride() and out_k.stride() == k.stride()


# ------------------------------------------------------------------ bad input


def test_bad_inputs(device):
    q, k, ud = qk_views(1, 4, 2, 1, 16, torch.float32, device, "bhsd")
    cos = torch.randn(3, *table_shape(q, ud, 16), device=device)
    sin = torch.randn_like(cos)
    inv_freq = torch.rand(8, device=device)
    pos = torch.randint(0, 9, (3, 1, 4), device=device)
    cases = [
        (lambda: vlmkernels.mrope(q, k, cos, sin, [2, 3, 2]), ValueError, "sums to 7"),
        (lambda: vlmkernels.mrope(q, k, cos, sin, [8, 0]), ValueError, "3 non-negative"),
        (lambda: vlmkernels.rope(q[..., :15], k[..., :15], cos[0, ..., :15], sin[0, ..., :15]),
         ValueError, "even"),
        (lambda: vlmkernels.vision_rope(q[0, ..., :15], k[0, ..., :15], cos[0, 0, :, :15],
                                        sin[0, 0, :, :15]), ValueError, "^vision_rope: .*even"),
        (lambda: vlmkernels.rope(q, k[:, :, :3], cos[0], sin[0]), ValueError, "same batch"),
        (lambda: vlmkernels.rope(q, k[..., :8], cos[0], sin[0]), ValueError, "same head dim"),
        (lambda: vlmkernels.rope(q.long(), k, cos[0], sin[0]), TypeError, "q must be a floating"),
        (lambda: vlmkernels.rope(q[0, 0], k[0, 0], cos[0], sin[0]), ValueError, "must be 4-D"),
        (lambda: vlmkernels.rope(q, k, cos[0, ..., :5], sin[0, ..., :5]), ValueError, "rotary dim"),
        (lambda: vlmkernels.rope(q, k, cos[0, :, :3], sin[0, :, :3]), ValueError, "broadcast"),
        (lambda: vlmkernels.mrope(q, k, cos[0], sin[0], [2, 3, 3]), ValueError, "shape \\(3, "),
        (lambda: vlmkernels.mrope_from_positions(q, k, pos.float(), inv_freq, [2, 3, 3]),
         TypeError, "integer"),
        (lambda: vlmkernels.mrope_from_positions(q, k, pos[:, :, :3], inv_freq, [2, 3, 3]),
         ValueError, "position_ids must have shape"),
        (lambda: vlmkernels.mrope_from_positions(q, k, pos, inv_freq, [2, 3, 3], rotary_dim=8),
         ValueError, "rotary_dim=8"),
        (lambda: vlmkernels.mrope_from_positions(q, k, pos, inv_freq[None], [2, 3, 3]),
         ValueError, "1-D"),
        (lambda: vlmkernels.rope(q, k, cos[0], sin[0], unsqueeze_dim=3), ValueError, "heads axis"),
        (lambda: vlmkernels.rope(q, k, cos[0], sin[0], unsqueeze_dim=1.0), TypeError,
         "unsqueeze_dim must be an int"),
        (lambda: vlmkernels.mrope(q, k, cos, sin, [2.5, 3, 2.5]), TypeError,
         "mrope_section must be a sequence of 3 ints"),
        (lambda: vlmkernels.mrope_from_positions(q, k, pos, inv_freq, [2.0, 3.0, 3.0]),
         TypeError, "mrope_section"),
        (lambda: vlmkernels.mrope(q, k, cos, sin, 8), TypeError, "mrope_section"),
        # flags are bools (a string "False" must not rotate in place), numbers are numbers
        (lambda: vlmkernels.rope(q, k, cos[0], sin[0], inplace="False"), TypeError,
         "inplace must be True or False"),
        (lambda: vlmkernels.mrope(q, k, cos, sin, [2, 3, 3], interleaved="false"), TypeError,
         "interleaved must be True or False"),
        (lambda: vlmkernels.mrope_from_positions(q, k, pos, inv_freq, [2, 3, 3],
                                                 interleaved=1), TypeError, "interleaved"),
        (lambda: vlmkernels.mrope_from_positions(q, k, pos, inv_freq, [2, 3, 3],
                                                 attention_scaling="2"), TypeError,
         "attention_scaling must be a float"),
        (lambda: vlmkernels.mrope_from_positions(q, k, pos, inv_freq, [2, 3, 3],
                                                 rotary_dim="16"), TypeError,
         "rotary_dim must be an int"),
        (lambda: vlmkernels.rope(q, k, cos[0].tolist(), sin[0]), TypeError,
         "cos must be a floating tensor, got list"),
        (lambda: vlmkernels.mrope_from_positions(q, k, pos, inv_freq.to("meta"), [2, 3, 3]),
         ValueError, "inv_freq must be on .*meta"),
    ]  # fmt: skip
    before = q.clone()
    for call, exc, message in cases:
        with pytest.raises(exc, match=message):
            call()
    assert torch.equal(q, before)


# ------------------------------------------------------------------ paired lanes (GLM-4V)


def rotate_pairs(x):
    """GLM-4V's rotate_half_llm: (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    return torch.stack((-x[..., 1::2], x[..., 0::2]), -1).flatten(-2)


def ref_rope_pairs(q, k, cos, sin, unsqueeze_dim=1):
    """GLM-4V's apply_rotary_pos_emb: the first cos.shape[-1] lanes rotate in pairs."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    rot = cos.shape[-1]
    return tuple(torch.cat((x[..., :rot] * cos + rotate_pairs(x[..., :rot]) * sin,
                            x[..., rot:]), -1) for x in (q, k))  # fmt: skip


def merge_pairs(table, section, interleaved=False):
    """(3, ..., R) -> (..., R): lanes 2j and 2j + 1 from the axis of frequency j (chunked
    sections over the frequencies, as GLM-4V's recomposition; or Qwen3-VL's rule)."""
    j = torch.arange(table.shape[-1]) // 2
    t, h, w = section
    if interleaved:
        axis = torch.where(
            (j % 3 == 1) & (j < 3 * h), 1, torch.where((j % 3 == 2) & (j < 3 * w), 2, 0)
        )
    else:
        axis = torch.where(j < t, 0, torch.where(j < t + h, 1, 2))
    return torch.stack([table[a, ..., lane] for lane, a in enumerate(axis.tolist())], -1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["bhsd", "thd"])
def test_rope_pairs_partial_values_and_grads(dtype, layout, device, backend):
    """pairs=True (GLM-4V: half the head rotates, in pairs) against transformers' formula;
    the lanes past the table pass bitwise; gradients of q and k, and of the tables."""
    b, s, d, rot = 2, 7, 40, 20
    q, k, ud = qk_views(b, s, 3, 2, d, dtype, device, layout)
    cos = torch.randn(*table_shape(q, ud, rot), device=device).to(dtype)
    sin = torch.randn_like(cos)
    outs = vlmkernels.rope(q, k, cos, sin, ud, pairs=True)
    refs = ref_rope_pairs(*(t.double().cpu() for t in (q, k, cos, sin)), ud)
    check_outputs(outs, refs, dtype, (q, k))
    for out, x in zip(outs, (q, k), strict=True):
        assert torch.equal(out[..., rot:], x[..., rot:])
    tables = [leaf(cos), leaf(sin)] if dtype == torch.float32 else [cos, sin]
    check_grads(
        lambda q, k, c, s: vlmkernels.rope(q, k, c, s, ud, pairs=True),
        lambda q, k, c, s: ref_rope_pairs(q, k, c, s, ud),
        [leaf(q), leaf(k), *tables],
        dtype,
    )


@pytest.mark.parametrize("interleaved", [False, True])
def test_mrope_pairs_values_and_grads(interleaved, device, backend):
    """(3, ..., R) tables with paired lanes: lanes 2j and 2j + 1 take frequency j's axis;
    gradients of q, k and the three-axis tables."""
    b, s, d = 2, 5, 24
    section = [4, 4, 4] if not interleaved else [2, 3, 3]
    q, k, ud = qk_views(b, s, 3, 1, d, torch.float32, device, "bshd")
    cos = torch.randn(3, *table_shape(q, ud, d), device=device)
    sin = torch.randn_like(cos)

    def ref(q, k, c, s):
        return ref_rope_pairs(q, k, merge_pairs(c, section, interleaved),
                              merge_pairs(s, section, interleaved), ud)  # fmt: skip

    def ours(q, k, c, s):
        return vlmkernels.mrope(q, k, c, s, section, ud, interleaved=interleaved, pairs=True)

    check_outputs(ours(q, k, cos, sin), ref(*(t.double().cpu() for t in (q, k, cos, sin))),
                  torch.float32, (q, k))  # fmt: skip
    check_grads(ours, ref, [leaf(q), leaf(k), leaf(cos), leaf(sin)], torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mrope_from_positions_pairs(dtype, device, backend):
    """GLM-4V's text rotary from positions: chunked sections over the R / 2 frequencies
    (its recomposition), each frequency's fp32 cos and sin on two adjacent lanes
    (repeat_interleave), half the head rotating in pairs."""
    b, s, d, rot = 2, 9, 32, 16
    section = [2, 3, 3]
    q, k, ud = qk_views(b, s, 4, 2, d, dtype, device, "bhsd")
    positions = torch.randint(0, 5000, (3, b, s), device=device)
    inv_freq = 1.0 / (1e4 ** (torch.arange(0, rot, 2, dtype=torch.float32, device=device) / rot))
    angle = (positions.cpu()[..., None].float() * inv_freq.cpu()).double()  # (3, B, S, R/2)
    angle = torch.cat([m[i % 3] for i, m in enumerate(angle.split(section, -1))], -1)
    cos, sin = (f(angle).repeat_interleave(2, -1) * 0.7 for f in (torch.cos, torch.sin))

    def ours(q, k):
        return vlmkernels.mrope_from_positions(q, k, positions, inv_freq, section, pairs=True,
                                               attention_scaling=0.7)  # fmt: skip

    check_outputs(ours(q, k), ref_rope_pairs(q.double().cpu(), k.double().cpu(), cos, sin),
                  dtype, (q, k))  # fmt: skip
    check_grads(ours, lambda q, k: ref_rope_pairs(q, k, cos, sin), [leaf(q), leaf(k)], dtype)


def test_pairs_bad_inputs(device):
    """pairs is a bool; the CUDA C++ kernels rotate halves only: the 'cuda' backend forced
    on paired lanes says so (the default backend runs them on Triton)."""
    q, k, ud = qk_views(1, 4, 2, 1, 16, torch.float32, device, "bhsd")
    cos = torch.randn(*table_shape(q, ud, 16), device=device)
    with pytest.raises(TypeError, match="pairs must be True or False"):
        vlmkernels.rope(q, k, cos, cos, pairs="yes")
    positions = torch.zeros(3, 1, 4, dtype=torch.long, device=device)
    with pytest.raises(TypeError, match="pairs must be True or False"):
        vlmkernels.mrope_from_positions(q, k, positions, torch.rand(8, device=device),
                                        [2, 3, 3], pairs=1)  # fmt: skip
    with pytest.raises(RuntimeError, match="'cuda' backend rotates halves only"):
        R.cuda.rope_launch(q, k, q, k, table=(cos, cos), mode=R.PLAIN | R.PAIRS)
    assert not R.cuda.fits(q, k, q, k, table=(cos, cos), mode=R.PAIRS)
    with pytest.raises(ValueError, match="lane_rule must be .* plus 4 for paired lanes"):
        torch.ops.vlmkernels.rope_table(q, k, cos, cos, 1, False, 8, [0, 0, 0], False)


# ------------------------------------------------------------------ registration


def test_opcheck(device, backend):
    """The ops on q and k in the callers' layouts: (B, S, H, D) with (3, B, S, R) and
    (1, B, S, R) tables, (B, H, S, D) transposed views with (B, S, R) tables, token-major
    (T, H, D) with positions (3, T)."""
    q, k, _ = qk_views(1, 6, 3, 2, 16, torch.float32, device, "bshd")
    q, k = leaf(q), leaf(k)
    cos = torch.randn(3, 1, 6, 16, device=device)
    sin = torch.randn_like(cos)
    ops = torch.ops.vlmkernels
    torch.library.opcheck(ops.rope_table, (q, k, cos, sin, 2, True, R.CHUNKED, [2, 3, 3], False))
    torch.library.opcheck(
        ops.rope_table, (q, k, cos[:1], sin[:1], 2, True, R.PLAIN, [0, 0, 0], True)
    )
    qt, kt, _ = qk_views(1, 6, 3, 2, 16, torch.float32, device, "bhsd")
    qt, kt = leaf(qt), leaf(kt)
    torch.library.opcheck(
        ops.rope_table, (qt, kt, cos[0], sin[0], 1, False, R.PLAIN, [0, 0, 0], False)
    )
    positions = torch.randint(0, 50, (3, 1, 6), device=device)
    inv_freq = torch.rand(8, device=device)
    torch.library.opcheck(
        ops.rope_positions, (q, k, positions, inv_freq, 2, R.INTERLEAVED, [2, 3, 3], 1.0, False)
    )
    qs, ks, _ = qk_views(1, 6, 3, 2, 16, torch.float32, device, "thd")
    torch.library.opcheck(
        ops.rope_positions,
        (leaf(qs), leaf(ks), positions[:, 0], inv_freq, 1, R.CHUNKED, [2, 3, 3], 1.0, False),
    )
    torch.library.opcheck(
        ops.rope_table_,
        (q.detach().clone(), k.detach().clone(), cos, sin, 2, True, R.CHUNKED, [2, 3, 3]),
    )
    paired = R.CHUNKED | R.PAIRS  # GLM-4V's lanes
    torch.library.opcheck(ops.rope_table, (q, k, cos, sin, 2, True, paired, [2, 3, 3], False))
    torch.library.opcheck(
        ops.rope_positions, (q, k, positions, inv_freq, 2, paired, [2, 3, 3], 1.0, False)
    )


def test_inplace_under_torch_compile(device):
    """The in-place form traces under torch.compile(fullgraph=True): separate tensors and
    disjoint views of one buffer are rotated as eagerly; the same tensor as q and k is
    refused at trace time (the other overlap checks read storage, which Dynamo cannot)."""
    b, h, s, d = 1, 2, 4, 16
    cos = torch.randn(3, b, s, d, device=device).cos()
    sin = torch.randn(3, b, s, d, device=device).sin()

    def rotate(q, k):
        vlmkernels.mrope(q, k, cos, sin, [2, 3, 3], inplace=True)
        return q, k

    qk = torch.randn(b, h, s, 2 * d, device=device)
    q, k = qk[..., :d], qk[..., d:]
    want = vlmkernels.mrope(q.clone(), k.clone(), cos, sin, [2, 3, 3])
    compiled = torch.compile(rotate, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        compiled(q, k)
        assert max_rel(q, want[0]) < 1e-6 and max_rel(k, want[1]) < 1e-6
        torch._dynamo.reset()
        with pytest.raises(Exception, match="q and k are the same tensor"):
            compiled(q, q)
    torch._dynamo.reset()


def test_export_with_every_dim_dynamic(device):
    """torch.export with Dim.AUTO on every dim of mrope's inputs: the rotary dim, which
    mrope_section pins, is specialised (a symbolic one broke the sections' cache with
    'unhashable type: SymInt'); the exported program gives eager's results."""
    from torch.export import Dim

    class Rotate(torch.nn.Module):
        def forward(self, q, k, cos, sin):
            return vlmkernels.mrope(q, k, cos, sin, [1, 1, 2])

    q, k = torch.randn(2, 2, 6, 8, device=device), torch.randn(2, 2, 6, 8, device=device)
    cos, sin = torch.randn(3, 2, 6, 8, device=device), torch.randn(3, 2, 6, 8, device=device)
    auto = {d: Dim.AUTO for d in range(4)}
    program = torch.export.export(Rotate(), (q, k, cos, sin), dynamic_shapes=(auto,) * 4)
    for got, want in zip(program.module()(q, k, cos, sin), Rotate()(q, k, cos, sin),
                         strict=True):  # fmt: skip
        assert torch.equal(got, want)


def test_inplace_under_vmap_names_the_op(device):
    """The in-place forms have no batching rule: under torch.func.vmap PyTorch's error names
    the op (the overlap check, reading storage, said 'Cannot access storage of
    BatchedTensorImpl'); the out-of-place form vmaps."""
    q, k = torch.randn(2, 1, 2, 4, 8, device=device), torch.randn(2, 1, 2, 4, 8, device=device)
    cos, sin = torch.randn(2, 1, 4, 8, device=device), torch.randn(2, 1, 4, 8, device=device)
    with pytest.raises(RuntimeError, match="vlmkernels::rope_table_"):
        torch.func.vmap(lambda *a: vlmkernels.rope(*a, inplace=True))(q, k, cos, sin)
    got = torch.func.vmap(vlmkernels.rope)(q, k, cos, sin)
    for i in range(2):
        want = vlmkernels.rope(q[i], k[i], cos[i], sin[i])
        for g, w in zip(got, want, strict=True):
            assert torch.allclose(g[i], w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compiler, device):
    q, k, ud = qk_views(2, 5, 4, 2, 32, torch.float32, device, "bhsd")
    positions = torch.randint(0, 100, (3, 2, 5), device=device)
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, 32, 2, dtype=torch.float32, device=device) / 32))

    def attention_rope(q, k):
        q, k = vlmkernels.mrope_from_positions(
            q, k, positions, inv_freq, [6, 5, 5], interleaved=True
        )
        return (q * 2).sum() + (k.square()).sum()

    compiled = torch.compile(attention_rope, backend=compiler, fullgraph=True)
    q1, k1, q2, k2 = leaf(q), leaf(k), leaf(q), leaf(k)
    out, ref = compiled(q1, k1), attention_rope(q2, k2)
    out.backward()
    ref.backward()
    assert max_rel(out, ref) < 1e-6
    assert max_rel(q1.grad, q2.grad) < 1e-6 and max_rel(k1.grad, k2.grad) < 1e-6


@pytest.mark.parametrize("pairs", [False, True])
def test_batched_vision_rope_compiles_with_dynamic_token_counts(pairs, device):
    """vision_rope on (1, N, H, hd) q and k with (N, hd) tables (Kimi-K2.5's towers; pairs:
    Inkling2's rule) under torch.compile(fullgraph=True, dynamic=True), at two token counts:
    the tables' missing batch axis is added while tracing, and values and q's gradient
    match eager."""

    def rotate(q, k, cos, sin):
        q, k = vlmkernels.vision_rope(q, k, cos, sin, pairs=pairs)
        return (q * 2).sum() + k.square().sum()

    compiled = torch.compile(rotate, backend="aot_eager", fullgraph=True, dynamic=True)
    for n in (7, 12):
        q, k = (torch.randn(1, n, 2, 16, device=device) for _ in range(2))
        cos, sin = (torch.randn(n, 16, device=device) for _ in range(2))
        q1, q2 = leaf(q), leaf(q)
        out, ref = compiled(q1, k, cos, sin), rotate(q2, k, cos, sin)
        out.backward()
        ref.backward()
        assert max_rel(out, ref) < 1e-6 and max_rel(q1.grad, q2.grad) < 1e-6


@pytest.mark.parametrize(
    ("q_shape", "table_shape"),
    [
        ((1, 11, 2, 16), (11, 16)),  # Kimi-K2.5's and Muse's towers: one image batch
        ((2, 11, 2, 16), (1, 11, 16)),  # MLCD's: batched images, the table unsqueezed
        ((2, 11, 2, 16), (11, 16)),
        ((2, 11, 2, 16), (2, 11, 16)),
    ],  # fmt: skip
)
def test_vision_rope_takes_batched_heads_as_transformers_broadcasts(q_shape, table_shape,
                                                                   device, backend):  # fmt: skip
    """(B, N, H, hd) q and k with tables of (N, hd), (1, N, hd) or (B, N, hd):
    transformers' vision function unsqueezes the tables at -2 and broadcasts them from the
    right, so the heads are always the second-to-last axis (not axis 1, as for a 3-D q).
    Values and gradients match the float64 formula and, in fp32, transformers' function."""
    q, k = (torch.randn(q_shape, device=device) for _ in range(2))
    cos, sin = (torch.randn(table_shape, device=device) for _ in range(2))
    outs = vlmkernels.vision_rope(q, k, cos, sin)
    refs = ref_rope(*(t.double().cpu() for t in (q, k, cos, sin)), -2)
    check_outputs(outs, refs, torch.float32, (q, k))
    check_grads(
        lambda q, k: vlmkernels.vision_rope(q, k, cos, sin),
        lambda q, k: ref_rope(q, k, cos.double().cpu(), sin.double().cpu(), -2),
        [leaf(q), leaf(k)],
        torch.float32,
    )
    tf = pytest.importorskip("transformers.models.qwen2_vl.modeling_qwen2_vl")
    for ours, theirs in zip(outs, tf.apply_rotary_pos_emb_vision(q, k, cos, sin), strict=True):
        assert max_rel(ours, theirs) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vision_rope_in_lane_pairs(dtype, device, backend):
    """``pairs=True``: lanes (2j, 2j + 1) rotate together (Inkling2's vision function), on
    (N, H, hd) views of a packed projection; values and gradients match the float64
    formula, and in fp32 the installed Inkling2's own function."""
    q, k, _ = qk_views(1, 13, 2, 2, 16, dtype, device, "packed")
    angles = torch.randn(13, 8, device=device).repeat_interleave(2, -1)
    cos, sin = angles.cos(), angles.sin()
    outs = vlmkernels.vision_rope(q, k, cos, sin, pairs=True)
    refs = ref_rope_pairs(*(t.double().cpu() for t in (q, k, cos, sin)))
    check_outputs(outs, refs, dtype, (q, k))
    check_grads(
        lambda q, k: vlmkernels.vision_rope(q, k, cos, sin, pairs=True),
        lambda q, k: ref_rope_pairs(q, k, cos.double().cpu(), sin.double().cpu()),
        [leaf(q), leaf(k)],
        dtype,
    )
    if dtype == torch.float32:
        tf = pytest.importorskip("transformers.models.inkling2.modeling_inkling2")
        want = tf.apply_rotary_pos_emb_vision(q, k, cos, sin)
        for ours, theirs in zip(outs, want, strict=True):
            assert max_rel(ours, theirs) < 1e-6


@pytest.mark.parametrize(
    ("q_shape", "table_shape", "unsqueeze_dim"),
    [
        ((2, 3, 7, 16), (7, 16), -3),  # (B, H, S, D), one (S, D) table for every row
        ((2, 3, 7, 16), (7, 16), 0),  # the same heads axis: (S, D).unsqueeze(0)
        ((2, 7, 3, 16), (7, 16), -2),  # (B, S, H, D)
        ((2, 7, 3, 16), (7, 16), 1),
        ((2, 3, 7, 16), (16,), 0),  # one row of angles for every token
    ],  # fmt: skip
)
@pytest.mark.parametrize("multimodal", [False, True])
def test_tables_with_fewer_token_axes_broadcast_from_the_right(q_shape, table_shape,
                                                               unsqueeze_dim, multimodal,
                                                               device, backend):  # fmt: skip
    """transformers' ``cos.unsqueeze(unsqueeze_dim)`` broadcasts against q from the right,
    so tables without q's leading token axes are taken, the heads axis being the one the
    unsqueezed table's size 1 lands on. rope and mrope (its (3, ...) tables) take them too:
    values and gradients of q, k, cos and sin match the float64 formula."""
    q, k = (torch.randn(q_shape, device=device) for _ in range(2))
    lead, section = ((3,), [2, 3, 3]) if multimodal else ((), None)
    cos, sin = (torch.randn(*lead, *table_shape, device=device) for _ in range(2))
    op, ref_op = (vlmkernels.mrope, ref_mrope) if multimodal else (vlmkernels.rope, ref_rope)
    args = (section,) if multimodal else ()

    def fn(q, k, cos, sin):
        return op(q, k, cos, sin, *args, unsqueeze_dim)

    def ref_fn(q, k, cos, sin):
        return ref_op(q, k, cos, sin, *args, unsqueeze_dim)

    check_fp32_against_float64(fn, ref_fn, q, k, cos, sin)


@pytest.mark.parametrize(
    ("fn", "q_shape", "cos_shape", "sin_shape"),
    [
        ("rope", (2, 3, 7, 16), (2, 7, 16), (1, 7, 16)),
        ("rope", (2, 3, 7, 16), (1, 7, 16), (2, 1, 16)),
        ("mrope", (2, 3, 7, 16), (3, 2, 7, 16), (3, 1, 7, 16)),
        ("vision_rope", (7, 3, 16), (7, 16), (1, 16)),
        ("vision_rope", (2, 7, 3, 16), (7, 16), (2, 7, 16)),
    ],  # fmt: skip
)
def test_cos_and_sin_of_different_shapes_broadcast(fn, q_shape, cos_shape, sin_shape,
                                                   device, backend):  # fmt: skip
    """transformers multiplies q by cos and rotate_half(q) by sin, each broadcast on its
    own: cos and sin need not have one shape. Values and gradients (q, k, cos, sin) match
    the float64 formula."""
    q, k = (torch.randn(q_shape, device=device) for _ in range(2))
    cos, sin = torch.randn(cos_shape, device=device), torch.randn(sin_shape, device=device)
    ud = -2 if fn == "vision_rope" else 1
    extra = ([2, 3, 3],) if fn == "mrope" else ()
    ref_op = ref_mrope if fn == "mrope" else ref_rope

    def ours(q, k, cos, sin):
        return getattr(vlmkernels, fn)(q, k, cos, sin, *extra)

    def ref_fn(q, k, cos, sin):
        return ref_op(q, k, cos, sin, *extra, ud)

    check_fp32_against_float64(ours, ref_fn, q, k, cos, sin)


@pytest.mark.parametrize("fn", ["rope", "mrope", "mrope_from_positions", "vision_rope"])
@pytest.mark.parametrize("needs", ["q", "k", "cos"])
def test_an_output_needs_grad_as_transformers_does(fn, needs, device, backend):
    """transformers' rotated k is ``k * cos + rotate_half(k) * sin``: it requires grad when
    k, cos or sin does, not because q does (LoRA on q_proj alone leaves the first layer's
    k without grad); likewise q. Each output's ``requires_grad`` is transformers', and the
    gradient of the one that needs it is unchanged."""
    layout = "thd" if fn == "vision_rope" else "bhsd"
    q, k, _ = qk_views(2, 5, 3, 2, 16, torch.float32, device, layout)
    lead = (3,) if fn == "mrope" else ()
    cos, sin = (torch.randn(*lead, *table_shape(q, 1, 16), device=device) for _ in range(2))
    positions = torch.randint(0, 9, (3, 2, 5), device=device)
    inv_freq = torch.rand(8, device=device)
    if fn == "mrope_from_positions" and needs == "cos":
        pytest.skip("no tables")
    q, k, cos = (leaf(t) if name == needs else t for t, name in ((q, "q"), (k, "k"), (cos, "cos")))
    if fn == "mrope":
        outs = vlmkernels.mrope(q, k, cos, sin, [2, 3, 3])
    elif fn == "mrope_from_positions":
        outs = vlmkernels.mrope_from_positions(q, k, positions, inv_freq, [2, 3, 3])
    else:
        outs = getattr(vlmkernels, fn)(q, k, cos, sin)
    want = {"q": (True, False), "k": (False, True), "cos": (True, True)}[needs]
    assert tuple(o.requires_grad for o in outs) == want
    grad_out = torch.randn_like(outs[want.index(True)])
    (grad,) = torch.autograd.grad(outs[want.index(True)], {"q": q, "k": k, "cos": cos}[needs],
                                  grad_out)  # fmt: skip
    assert grad.shape == {"q": q, "k": k, "cos": cos}[needs].shape and grad.abs().sum() > 0


def test_vision_rope_refuses_tables_that_would_widen_q():
    """Tables with more token axes than q (transformers would broadcast q up to a larger
    result) are refused, naming the shapes."""
    q, k = torch.randn(4, 2, 8), torch.randn(4, 2, 8)
    with pytest.raises(ValueError, match="^vision_rope: cos .*q of shape \\(4, 2, 8\\)"):
        vlmkernels.vision_rope(q, k, torch.randn(3, 4, 8), torch.randn(3, 4, 8))


def test_vision_rope_refuses_a_half_width_table():
    """cos / sin of the (N, hd / 2) frequencies (before transformers' cat) are refused, as
    transformers' apply_rotary_pos_emb_vision refuses them, not rotated partially."""
    q, k = torch.randn(4, 2, 8), torch.randn(4, 2, 8)
    half = torch.randn(4, 4)
    with pytest.raises(ValueError, match="^vision_rope: cos and sin must be"):
        vlmkernels.vision_rope(q, k, half.cos(), half.sin())


def test_mrope_names_a_table_of_the_wrong_rank_before_the_sections():
    """An M-RoPE table without its leading axis of 3 (a merged (B, S, R) table) and another
    width is refused for its shape, not reported as a section sum that does not match it."""
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 1, 3, 8)
    merged = torch.randn(1, 3, 6)
    with pytest.raises(ValueError, match="^mrope: cos must have shape \\(3, "):
        vlmkernels.mrope(q, k, merged.cos(), merged.sin(), [2, 1, 1])


def test_vision_rope_names_q_when_q_has_no_heads_axis():
    """q and k left as the (N, H hd) projection (not viewed into heads) are refused naming
    q's shape, not blamed on tables that are right for (N, H, hd)."""
    q, k = torch.randn(4, 16), torch.randn(4, 16)
    angles = torch.randn(4, 8)
    with pytest.raises(ValueError, match="^vision_rope: q must be .*got shape \\(4, 16\\)"):
        vlmkernels.vision_rope(q, k, angles.cos(), angles.sin())


@pytest.mark.parametrize("fn", ["rope", "mrope", "vision_rope"])
def test_zero_dim_tables_are_refused_naming_them(fn):
    """A 0-d cos or sin (a scalar tensor) is a bad table: refused naming it, not an
    IndexError from reading its last dim."""
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 1, 3, 8)
    if fn == "vision_rope":
        q, k = q[0].transpose(0, 1), k[0].transpose(0, 1)
    table = torch.randn(3, 1, 3, 8) if fn == "mrope" else torch.randn(1, 3, 8)
    if fn == "vision_rope":
        table = table[0]
    extra = ([2, 1, 1],) if fn == "mrope" else ()
    call = getattr(vlmkernels, fn)
    for cos, sin, name in ((torch.tensor(1.0), table, "cos"), (table, torch.tensor(1.0), "sin")):
        with pytest.raises(ValueError, match=f"^{fn}: {name} must have shape"):
            call(q, k, cos, sin, *extra)


@pytest.mark.parametrize("fn", ["mrope", "mrope_from_positions"])
def test_compiled_mrope_is_not_compiled_again_at_the_next_call(fn, device):
    """The checked-sections cache (functional._SECTIONS), read and filled while
    torch.compile traced, made the graph guard on its contents: the traced call's new entry
    failed that guard at the very next call, which compiled everything again."""
    from vlmkernels.ops.rope import functional

    functional._SECTIONS.clear()
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    inv_freq = 1.0 / (1e4 ** (torch.arange(0, 8, 2, dtype=torch.float32, device=device) / 8))

    def call(q, k, cos, sin, positions):
        if fn == "mrope":
            return vlmkernels.mrope(q, k, cos, sin, [2, 1, 1])
        return vlmkernels.mrope_from_positions(q, k, positions, inv_freq, [2, 1, 1])

    compiled = torch.compile(call, backend=backend, fullgraph=True)
    for _ in range(2):
        q, k = torch.randn(1, 2, 5, 8, device=device), torch.randn(1, 2, 5, 8, device=device)
        cos, sin = torch.randn(3, 1, 5, 8, device=device), torch.randn(3, 1, 5, 8, device=device)
        positions = torch.randint(0, 9, (3, 1, 5), device=device)
        got, want = compiled(q, k, cos, sin, positions), call(q, k, cos, sin, positions)
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g, w)
    assert len(graphs) == 1, len(graphs)


def test_compiled_positions_with_a_constant_batch(device):
    """torch.compile(dynamic=True) makes q's batch symbolic while text position ids built
    with a constant batch, (B, S), keep it constant: the check ``n not in (1, t)`` (dynamo's
    containment test misjudges a constant against an equal symbolic size) refused them,
    and the refusal's message (str of a symbolic size) failed to trace. Eager accepts them;
    so does the compiled call now, with eager's values."""
    torch._dynamo.reset()
    inv_freq = 1.0 / (1e4 ** (torch.arange(0, 8, 2, dtype=torch.float32, device=device) / 8))

    def call(q, k):
        positions = torch.arange(q.shape[2], device=device).expand(2, -1)
        return vlmkernels.mrope_from_positions(q, k, positions, inv_freq, [2, 1, 1])

    q, k = torch.randn(2, 2, 5, 8, device=device), torch.randn(2, 2, 5, 8, device=device)
    compiled = torch.compile(call, backend="eager", fullgraph=True, dynamic=True)
    for got, want in zip(compiled(q, k), call(q, k), strict=True):
        assert torch.equal(got, want)

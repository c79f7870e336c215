"""cross_attention / attention / media_cross_attention against float64 references.

The references build the dense boolean mask of each case (key padding, bottom-right causal,
open_flamingo's media mask: text_time = cumsum(media_locations), key j in media j // L + 1,
immediate: equal, else <=) and evaluate softmax(scale q k^T + mask) v in float64 on the same
(rounded) inputs, rows without a visible key giving 0; gradients by float64 autograd.

Tolerances (max abs error relative to max |ref|): fp32 1e-5 (3xTF32 on the GPU; exact dots
under the interpreter), fp16 5e-3, bf16 2e-2 (the P V product takes P rounded to the input
dtype, as flash-attention does, and the interpreter's fp32 -> bf16 conversion truncates).
"""

import math

import pytest
import torch

import vlmkernels  # noqa: F401
from vlmkernels.core import runtime
from vlmkernels.core.backend import use_backend
from vlmkernels.ops import attention as A
from vlmkernels.ops.attention import launchers, ops

TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2, torch.float64: 1e-12}
BACKENDS = ["triton", "torch"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    with use_backend(request.param):
        yield request.param


# ------------------------------------------------------------------ references (float64)


def ref_attention(q, k, v, ok, scale, bias=None):
    """softmax(scale q k^T (+ bias, (B, Lk))) v over the keys ``ok`` (broadcast to
    (B, H, Lq, Lk)) allows, float64; rows without a visible key give 0. Returns (out, lse)."""
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.double()[:, None, None, :]
    ok = ok.expand_as(s)
    row = ok.any(-1, keepdim=True)
    s = torch.where(ok & row, s, torch.where(row, float("-inf"), 0.0))
    p = torch.softmax(s, dim=-1) * row
    lse = torch.logsumexp(s, -1).masked_fill(~row[..., 0], float("-inf"))
    return p @ v.double(), lse


def causal_mask(lq, lk):
    i, j = torch.arange(lq)[:, None], torch.arange(lk)[None, :]
    return j <= i + (lk - lq)


def flamingo_mask(media_locations, n_keys, latents, only_immediate):
    """open_flamingo's MaskedCrossAttention mask, (B, 1, T, Lk) bool, and the rows with
    text_time 0 (zeroed after the softmax)."""
    text_time = media_locations.cumsum(-1)
    media_time = torch.arange(n_keys // latents).repeat_interleave(latents) + 1
    compare = torch.eq if only_immediate else torch.ge
    mask = compare(text_time[:, :, None], media_time[None, None, :])
    return mask[:, None], (text_time == 0)[:, None, :, None]


def rand(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, device=device).to(dtype)


def leaf(t):
    return t.detach().clone().requires_grad_(True)


def rel_lse(a, b):
    """rel() over the finite entries; the -inf entries must agree."""
    finite = torch.isfinite(b)
    assert torch.equal(torch.isfinite(a), finite) and torch.isneginf(a[~finite]).all()
    return rel(a[finite], b[finite])


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def check_grads(outs, refs, leaves, ref_leaves, tol):
    """Backward of sum(g * out) with the same random g on both sides; compare leaves."""
    gs = [torch.randn(r.shape, dtype=torch.float64) for r in refs]
    torch.autograd.backward(list(outs), [g.to(o.dtype) for g, o in zip(gs, outs, strict=True)])
    torch.autograd.backward(list(refs), gs)
    for x, r in zip(leaves, ref_leaves, strict=True):
        assert x.grad is not None
        assert rel(x.grad, r.grad) < tol, (rel(x.grad, r.grad), x.shape)


# ------------------------------------------------------------------ dense cross_attention


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cross_attention_dense(dtype, device, backend):
    """Odd sizes, q a transposed (B, L, H, D) view, key padding (a transposed mask), lse;
    out and lse and their gradients."""
    b, h, lq, lk, d = 2, 2, 19, 29, 24
    q_leaf = leaf(rand(b, lq, h, d, dtype=dtype, device=device))
    q = q_leaf.transpose(1, 2)
    k, v = (
        leaf(rand(b, h, lk, d, dtype=dtype, device=device)),
        leaf(rand(b, h, lk, d, dtype=dtype, device=device)),
    )
    pad = (torch.rand(lk, b, device=device) < 0.3).t()  # a transposed (key-major) mask
    pad[1, :] = True
    pad[1, 5] = False  # batch 1 sees one key
    out, lse = A.cross_attention(q, k, v, key_padding_mask=pad, scale=0.3, return_lse=True)
    q64_leaf, k64, v64 = (leaf(t.detach().double()) for t in (q_leaf, k, v))
    ref, ref_lse = ref_attention(q64_leaf.transpose(1, 2), k64, v64, (~pad)[:, None, None, :],
                                 0.3)  # fmt: skip
    assert out.shape == q.shape and out.dtype == dtype and lse.dtype == torch.float32
    assert rel(out, ref) < TOL[dtype]
    assert rel(lse, ref_lse) < TOL[dtype]
    check_grads([out, lse], [ref, ref_lse], [q_leaf, k, v], [q64_leaf, k64, v64], 3 * TOL[dtype])


def test_segment_offsets_past_32_bits_are_copied_or_refused(monkeypatch):
    """The kernels' offsets inside a segment are 32-bit: a layout whose segment spans 2^31
    elements (a transposed (B, L, H, D) view from 2^19 rows at H D = 4096) is copied
    contiguous, one whose contiguous form still does (a packed segment of 2^31 / (H D)
    rows) is refused. The limit is lowered to 2^12 here: 80 rows of a transposed view at
    H D = 64 span 5071 elements, contiguous 1279; a packed 80-row segment spans 5119."""
    monkeypatch.setattr(launchers, "OFFSET_LIMIT", 2**12)
    b, h, l, d = 2, 4, 80, 16
    q_leaf = leaf(rand(b, l, h, d))
    q = q_leaf.transpose(1, 2)
    assert launchers.addressable(q[:, :, :40], 40, False, "q").data_ptr() == q.data_ptr()
    copy = launchers.addressable(q, l, False, "q")
    assert copy.is_contiguous() and torch.equal(copy, q)
    k, v = leaf(rand(b, h, 7, d)), leaf(rand(b, h, 7, d))
    with use_backend("triton"):
        out = A.attention(q, k, v)
    q64, k64, v64 = (leaf(t.detach().double()) for t in (q_leaf, k, v))
    ref, _ = ref_attention(q64.transpose(1, 2), k64, v64, torch.ones(1, 1, 1, 7).bool(), d**-0.5)
    assert rel(out, ref) < TOL[torch.float32]
    check_grads([out], [ref], [q_leaf, k, v], [q64, k64, v64], 3 * TOL[torch.float32])
    packed = rand(l, h, d)
    cu = torch.tensor([0, l], dtype=torch.int32)
    with use_backend("triton"), pytest.raises(ValueError, match="in-segment addressing"):
        A.cross_attention(packed, packed, packed, cu_seqlens_q=cu, cu_seqlens_k=cu,
                          max_seqlen_q=l, max_seqlen_k=l)  # fmt: skip


def test_segment_offsets_of_the_contiguous_outputs_are_refused_too(monkeypatch):
    """out, dq, dk and dv are contiguous whatever the inputs' strides, and written with the
    same 32-bit in-segment offsets: a packed q stored heads-major ((H, T, D) transposed,
    rows D apart) spans less than its contiguous out (rows H D apart), which the kernels
    wrote past 2^31 elements at the wrapped offset (a 600,000-row segment at H D = 4096)
    before the contiguous form was checked too. Limit 2^12: 80 rows at H D = 64 span 1279
    elements heads-major, 5071 contiguous."""
    monkeypatch.setattr(launchers, "OFFSET_LIMIT", 2**12)
    l, h, d = 80, 4, 16
    heads_major = rand(h, l, d).transpose(0, 1)
    with pytest.raises(ValueError, match="in-segment addressing"):
        launchers.addressable(heads_major, l, True, "q")
    cu = torch.tensor([0, l], dtype=torch.int32)
    with use_backend("triton"), pytest.raises(ValueError, match="in-segment addressing"):
        A.cross_attention(heads_major, heads_major, heads_major, cu_seqlens_q=cu,
                          cu_seqlens_k=cu, max_seqlen_q=l, max_seqlen_k=l)  # fmt: skip
    # at the real limit: no memory, the shapes alone
    q = torch.empty((32, 600_000, 128), device="meta", dtype=torch.bfloat16).transpose(0, 1)
    monkeypatch.setattr(launchers, "OFFSET_LIMIT", 2**31)
    with pytest.raises(ValueError, match="in-segment addressing"):
        launchers.addressable(q, 600_000, True, "q")
    short = launchers.addressable(q[:400_000], 400_000, True, "q")
    assert short.data_ptr() == q.data_ptr() and short.stride() == q.stride()


@pytest.mark.parametrize("packed", [False, True])
def test_batch_heads_past_the_grid_limit_fold_into_z(packed, monkeypatch):
    """Batch x heads is the kernels' grid y dimension, at most 65,535 in CUDA (the launch
    failed with "invalid argument" from 4,097 images at 16 heads): past it the launchers
    fold the rest into grid z and the kernels exit past batch x heads. The limit is lowered
    to 5 here: 3 x 3 query heads (one key head) run on y = 5, z = 2 with one idle program
    (z = 4 with 2 key splits); forward (one pass, and split in 2 with the combine),
    backward and the key mass equal the unfolded launch's exactly, dense and packed."""
    b, h, lq, lk, d = 3, 3, 11, 23, 8
    lengths = torch.tensor([0, 11, 5, 9], dtype=torch.int32)
    if packed:
        cu_q = torch.cumsum(lengths, 0, dtype=torch.int32)
        cu_k = torch.cumsum(torch.tensor([0, 23, 7, 12], dtype=torch.int32), 0,
                            dtype=torch.int32)  # fmt: skip
        q = rand(int(cu_q[-1]), h, d)
        k, v = rand(int(cu_k[-1]), 1, d), rand(int(cu_k[-1]), 1, d)
    else:
        cu_q = cu_k = None
        q, k, v = rand(b, h, lq, d), rand(b, 1, lk, d), rand(b, 1, lk, d)

    def run():
        results = []
        for splits in (1, 2):
            out, lse = launchers.forward(q, k, v, cu_q, cu_k, lq, lk, None, None, None, True,
                                         0.3, splits)  # fmt: skip
            results += [out, lse]
        do = torch.ones_like(out) * 0.5
        delta = launchers.delta(out, do, lse, None)
        results += launchers.backward(do, q, k, v, lse, delta, cu_q, cu_k, lq, lk, None, None,
                                      None, True, 0.3)[:3]  # fmt: skip
        if not packed:
            results.append(launchers.key_mass(q, k, lse, True, 0.3, 2, 9, 1.5))
        return results

    with use_backend("triton"):
        unfolded = run()
        monkeypatch.setattr(runtime, "GRID_YZ_LIMIT", 5)
        # fresh plan caches: the grids are planned per layout
        monkeypatch.setattr(launchers, "_FORWARD_PLANS", launchers.prepared_cache())
        monkeypatch.setattr(launchers, "_BACKWARD_PLANS", launchers.prepared_cache())
        assert launchers.grid_bh(b * h) == (5, 2)
        folded = run()
    for x, y in zip(unfolded, folded, strict=True):
        assert torch.equal(x, y)
    with pytest.raises(ValueError, match="past 5, CUDA"):
        launchers.grid_bh(26)  # z = 6 > 5 as well
    seed = torch.zeros(1, dtype=torch.int64)
    monkeypatch.setattr(runtime, "GRID_YZ_LIMIT", 65535)
    with pytest.raises(ValueError, match="key blocks"):
        launchers.dropout_mask(seed, (1, 1, 1, 64 * 65535 + 1), 0.5)


def test_default_scale_and_no_padding(device):
    q, k, v = (
        rand(1, 2, 5, 16, device=device),
        rand(1, 2, 9, 16, device=device),
        rand(1, 2, 9, 16, device=device),
    )
    ref, _ = ref_attention(q, k, v, torch.ones(1, 1, 1, 9, dtype=torch.bool), 0.25)
    assert rel(A.cross_attention(q, k, v), ref) < 1e-5


def test_float64_takes_the_torch_path(device):
    q, k, v = (leaf(rand(1, 2, 6, 8, dtype=torch.float64, device=device)) for _ in range(3))
    out = A.cross_attention(q, k, v)
    ref, _ = ref_attention(q, k, v, torch.ones(1, 1, 1, 6, dtype=torch.bool), 8**-0.5)
    assert rel(out, ref) < 1e-12
    assert torch.autograd.gradcheck(lambda a, b, c: A.cross_attention(a, b, c), (q, k, v))


@pytest.mark.parametrize("splits", [1, 3])
def test_split_k_forced(splits, device):
    """Both forward paths (one program per query block, keys split over 3 programs with the
    log-sum-exp combine), plain, causal and media ranges; the backward after a split."""
    b, h, lq, lk, d = 2, 1, 13, 50, 16
    q, k, v = (leaf(rand(b, h, n, d, device=device)) for n in (lq, lk, lk))
    lo = torch.randint(0, 20, (b, lq), dtype=torch.int32)
    hi = (lo + torch.randint(0, 31, (b, lq), dtype=torch.int32)).contiguous()
    lo[0, 3], hi[0, 3] = 0, 0  # an empty row
    j = torch.arange(lk)
    cases = [
        (None, None, False, torch.ones(1, 1, 1, lk, dtype=torch.bool)),
        (None, None, True, causal_mask(lq, lk)[None, None]),
        (lo, hi, False, ((j >= lo[..., None]) & (j < hi[..., None]))[:, None]),
    ]
    with use_backend("triton"):
        for lo_, hi_, causal, ok in cases:
            out, lse = ops.attention_core(q, k, v, None, None, lq, lk, None, lo_, hi_, causal,
                                          0.2, splits, None, None, 0.0, None)  # fmt: skip
            q64, k64, v64 = (leaf(t.detach().double()) for t in (q, k, v))
            ref, ref_lse = ref_attention(q64, k64, v64, ok, 0.2)
            assert rel(out, ref) < 1e-5
            assert rel_lse(lse, ref_lse) < 1e-5
            for t in (q, k, v):
                t.grad = None
            check_grads([out], [ref], [q, k, v], [q64, k64, v64], 3e-5)


def test_split_heuristic():
    cpu = torch.device("cpu")  # a nominal 8 multiprocessors
    assert launchers.choose_splits(64, 32, 4096, cpu) == 1
    assert launchers.choose_splits(1, 32, 4096, cpu) == 16
    assert launchers.choose_splits(1, 32, 300, cpu) == 2
    assert launchers.choose_splits(2, 32, 100, cpu) == 1


# ------------------------------------------------------------------ packed varlen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_attention_varlen(dtype, device, backend):
    """Segments with empty and length-1 queries and keys; strided packed inputs and strided
    offsets (the two columns of one offsets table)."""
    lens_q, lens_k = [0, 1, 7, 18, 3], [5, 0, 1, 30, 9]
    h, d = 2, 20
    tq, tk = sum(lens_q), sum(lens_k)
    q = leaf(rand(tq, 2 * h, d, dtype=dtype, device=device))
    k, v = (leaf(rand(tk, h, d, dtype=dtype, device=device)) for _ in range(2))
    qs = q[:, ::2]  # a strided view
    cu = lambda lens: torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()],  # noqa: E731
                                   dtype=torch.int32, device=device)  # fmt: skip
    table = torch.stack((cu(lens_q), cu(lens_k)), 1)
    out, lse = A.cross_attention(qs, k, v, cu_seqlens_q=table[:, 0], cu_seqlens_k=table[:, 1],
                                 return_lse=True)  # fmt: skip
    assert out.shape == qs.shape and lse.shape == (h, tq)
    q64, k64, v64 = (leaf(t.detach().double()) for t in (qs, k, v))
    refs, ref_lses = [], []
    a = c = 0
    for nq, nk in zip(lens_q, lens_k, strict=True):
        o, s = ref_attention(q64[a : a + nq].transpose(0, 1), k64[c : c + nk].transpose(0, 1),
                             v64[c : c + nk].transpose(0, 1),
                             torch.ones(1, 1, nk, dtype=torch.bool), d**-0.5)  # fmt: skip
        refs.append(o.transpose(0, 1))
        ref_lses.append(s)
        a, c = a + nq, c + nk
    ref, ref_lse = torch.cat(refs), torch.cat(ref_lses, dim=1)
    assert rel(out, ref) < TOL[dtype]
    assert (out[0] == 0).all() and torch.isneginf(lse[:, 0]).all()  # a query with no key
    assert rel_lse(lse, ref_lse) < TOL[dtype]
    check_grads([out], [ref], [k, v], [k64, v64], 3 * TOL[dtype])
    assert rel(q.grad[:, ::2], q64.grad) < 3 * TOL[dtype]
    assert (q.grad[:, 1::2] == 0).all() and (q.grad[0] == 0).all()


# ------------------------------------------------------------------ attention, causal, key mass


@pytest.mark.parametrize("lq,lk", [(9, 21), (17, 17), (20, 6)])
def test_attention_causal(lq, lk, device, backend):
    """Bottom-right causal for Lq < Lk, Lq = Lk and Lq > Lk (rows seeing no key give 0)."""
    q, k, v = (leaf(rand(2, 2, n, 16, device=device)) for n in (lq, lk, lk))
    out = A.attention(q, k, v, causal=True)
    q64, k64, v64 = (leaf(t.detach().double()) for t in (q, k, v))
    ref, _ = ref_attention(q64, k64, v64, causal_mask(lq, lk)[None, None], 0.25)
    assert rel(out, ref) < 1e-5
    if lq > lk:
        assert (out[:, :, : lq - lk] == 0).all()
    check_grads([out], [ref], [q, k, v], [q64, k64, v64], 3e-5)


@pytest.mark.parametrize("causal,dtype,lq,lk", [
    (False, torch.float32, 11, 26), (True, torch.bfloat16, 11, 26),
    (True, torch.float32, 40, 40), (True, torch.float32, 37, 21)])  # fmt: skip
def test_key_mass(causal, dtype, lq, lk, device, backend):
    """mean, row 0 and row -1: the mass against the float64 probabilities; out bitwise the
    same as without key_mass; the mass is not differentiable. Causal with several query and
    key blocks (the kernel skips the query blocks a key block is hidden from and masks only
    those the diagonal crosses), and with rows that see no key (Lq > Lk: they add 0)."""
    b, h = 2, 2
    q, k, v = (leaf(rand(b, h, n, 16, dtype=dtype, device=device)) for n in (lq, lk, lk))
    plain = A.attention(q, k, v, causal=causal)
    ok = causal_mask(lq, lk)[None, None] if causal else torch.ones(1, 1, 1, lk, dtype=torch.bool)
    s = (q.double() @ k.double().transpose(-1, -2)) * 0.25
    p = torch.softmax(s.masked_fill(~ok, float("-inf")), -1).nan_to_num(0.0)
    for key_mass, want in (("mean", p.mean(dim=(1, 2))), (0, p[:, :, 0].mean(1)),
                           (-1, p[:, :, -1].mean(1)), (4, p[:, :, 4].mean(1))):  # fmt: skip
        out, mass = A.attention(q, k, v, causal=causal, key_mass=key_mass)
        assert torch.equal(out, plain)
        assert mass.shape == (b, lk) and mass.dtype == torch.float32
        assert not mass.requires_grad
        assert rel(mass, want) < (1e-5 if dtype == torch.float32 else 2e-2), key_mass
        assert torch.allclose(mass.sum(-1).double(), want.sum(-1), atol=1e-3)


@pytest.mark.parametrize("causal", [False, True])
def test_key_mass_row_with_split_keys_and_bias(causal, device, backend):
    """An int row's mass comes from the logits the forward stores (attention_row_mass):
    with the keys split across programs (split-K: 3 splits of 700 keys on the
    interpreter's nominal 8 SMs), causal (key blocks past the row are never visited) and a
    key bias; against float64, out bitwise as without key_mass."""
    b, h, lq, lk = 1, 2, 5, 700
    q, k, v = (rand(b, h, n, 16, device=device) for n in (lq, lk, lk))
    bias = rand(b, h, lk, device=device)
    plain = A.attention(q, k, v, causal=causal, key_bias=bias)
    s = (q.double() @ k.double().transpose(-1, -2)) * 0.25 + bias.double()[:, :, None]
    if causal:
        s = s.masked_fill(~causal_mask(lq, lk)[None, None], float("-inf"))
    p = torch.softmax(s, -1)
    for row in (-1, 1):
        out, mass = A.attention(q, k, v, causal=causal, key_bias=bias, key_mass=row)
        assert torch.equal(out, plain)
        assert rel(mass, p[:, :, row].mean(1)) < 1e-5, row
    # the op's mass is non-differentiable: it never requires grad, out does
    out, _, mass = torch.ops.vlmkernels.attention_row_mass(leaf(q), k, v, causal, 0.25, bias,
                                                           1, 0.5)  # fmt: skip
    assert out.requires_grad and not mass.requires_grad


# ------------------------------------------------------------------ media_cross_attention


def media_case(device, dtype=torch.float32):
    b, h, t, d, latents, n_media = 2, 2, 23, 16, 5, 3
    q = leaf(rand(b, h, t, d, dtype=dtype, device=device))
    k, v = (leaf(rand(b, h, n_media * latents, d, dtype=dtype, device=device)) for _ in "kv")
    loc = torch.zeros(b, t, dtype=torch.bool, device=device)
    loc[0, [2, 9, 10]] = True  # media 2 and 3 back to back
    loc[1, [0, 15]] = True  # two media only
    return q, k, v, loc, latents


def test_media_tokens_without_latents(device, backend):
    """Media tokens but no latents (M = 0): with immediate media every token after one has
    no answer (NaN, as the docstring says, on both backends); tokens before any media and
    the non-immediate mode give 0."""
    q = rand(1, 2, 4, 16, device=device)
    k = rand(1, 2, 0, 16, device=device)
    loc = torch.tensor([[False, True, False, False]], device=device)
    out = A.media_cross_attention(q, k, k, loc, 5)
    assert (out[:, :, 0] == 0).all() and out[:, :, 1:].isnan().all()
    assert (A.media_cross_attention(q, k, k, loc, 5, only_immediate=False) == 0).all()


@pytest.mark.parametrize("only_immediate", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_media_cross_attention(only_immediate, dtype, device, backend):
    q, k, v, loc, latents = media_case(device, dtype)
    out = A.media_cross_attention(q, k, v, loc, latents, only_immediate=only_immediate)
    mask, before_first = flamingo_mask(loc.cpu(), k.shape[2], latents, only_immediate)
    q64, k64, v64 = (leaf(t.detach().double()) for t in (q, k, v))
    ref, _ = ref_attention(q64, k64, v64, mask, q.shape[-1] ** -0.5)
    ref = ref.masked_fill(before_first, 0.0)
    assert rel(out, ref) < TOL[dtype]
    assert (out[0, :, :2] == 0).all()  # text_time 0: exactly zero
    check_grads([out], [ref], [q, k, v], [q64, k64, v64], 3 * TOL[dtype])
    assert (q.grad[0, :, :2] == 0).all()


@pytest.mark.parametrize("only_immediate", [True, False])
def test_media_long_segments(only_immediate, device, backend):
    """Media of 40 latents and query blocks inside one media item: the key blocks every
    row of a query block sees whole run without a mask, those a segment boundary cuts
    (keys 32..47 for the rows of media 2, whose latents start at 40) with it."""
    b, h, t, d, latents = 2, 2, 48, 16, 40
    q = leaf(rand(b, h, t, d, device=device))
    k, v = (leaf(rand(b, h, 2 * latents, d, device=device)) for _ in "kv")
    loc = torch.zeros(b, t, dtype=torch.bool, device=device)
    loc[0, [0, 16]] = True
    loc[1, [5, 33]] = True
    out = A.media_cross_attention(q, k, v, loc, latents, only_immediate=only_immediate)
    mask, before_first = flamingo_mask(loc.cpu(), k.shape[2], latents, only_immediate)
    q64, k64, v64 = (leaf(x.detach().double()) for x in (q, k, v))
    ref, _ = ref_attention(q64, k64, v64, mask, d**-0.5)
    ref = ref.masked_fill(before_first, 0.0)
    assert rel(out, ref) < 1e-5
    check_grads([out], [ref], [q, k, v], [q64, k64, v64], 3e-5)


def test_media_more_locations_than_media(device):
    """More media tokens than media items: NaN rows in immediate mode (no answer), every
    media item in the cumulative mode (open_flamingo's <=)."""
    q, k, v, loc, latents = media_case(device)
    loc[1, 20] = True
    loc[1, 21] = True
    out = A.media_cross_attention(q, k, v, loc, latents)
    assert torch.isnan(out[1, :, 21:]).all() and not torch.isnan(out[1, :, :21]).any()
    assert not torch.isnan(out[0]).any()
    out = A.media_cross_attention(q, k, v, loc, latents, only_immediate=False)
    mask, zero = flamingo_mask(loc, k.shape[2], latents, False)
    ref, _ = ref_attention(q, k, v, mask, 0.25)
    assert rel(out, ref.masked_fill(zero, 0.0)) < 1e-5


def test_media_visits_only_its_segments():
    """The ranges the kernel gets: each token's own media latents (no dense mask)."""
    loc = torch.tensor([[False, True, False, True, True, False]])
    lo, hi = A.functional.media_ranges(loc, 4, 12, True)
    assert lo.tolist() == [[0, 0, 0, 4, 8, 8]] and hi.tolist() == [[0, 4, 4, 8, 12, 12]]
    lo, hi = A.functional.media_ranges(loc, 4, 8, True)
    assert lo.tolist() == [[0, 0, 0, 4, 1, 1]] and hi.tolist() == [[0, 4, 4, 8, 0, 0]]
    lo, hi = A.functional.media_ranges(loc, 4, 8, False)
    assert lo.tolist() == [[0] * 6] and hi.tolist() == [[0, 4, 4, 8, 8, 8]]


# ------------------------------------------------------------------ bad input


def test_bad_input():
    q, k, v = rand(2, 2, 5, 8), rand(2, 2, 7, 8), rand(2, 2, 7, 8)
    qp, kp = rand(6, 2, 8), rand(9, 2, 8)
    cq = torch.tensor([0, 2, 6], dtype=torch.int32)
    ck = torch.tensor([0, 4, 9], dtype=torch.int32)
    loc = torch.zeros(2, 5, dtype=torch.bool)
    ca, mca, att = A.cross_attention, A.media_cross_attention, A.attention
    cases = [
        (lambda: ca(q, k[..., :4], v), ValueError, "k must have q's head dim 8"),
        (lambda: ca(q, k, v[..., :6, :]), ValueError, "v must have k's batch, heads and length"),
        (lambda: ca(q, k.repeat(1, 3, 1, 1)[:, :3], v.repeat(1, 3, 1, 1)[:, :3]), ValueError,
         "k's number of heads must divide q's"),
        (lambda: ca(q, k[:1], v[:1]), ValueError, "k must have q's batch size"),
        (lambda: ca(q, k.half(), v), TypeError, "k must have q's dtype"),
        (lambda: ca(q.int(), k, v), TypeError, "q must be a floating tensor"),
        (lambda: ca(q[0], k, v), ValueError, "q must be 4-D"),
        (lambda: ca(q, k, v, scale="x"), TypeError, "scale must be a finite float"),
        (lambda: ca(rand(1, 1, 2, 300), rand(1, 1, 2, 300), rand(1, 1, 2, 300)), ValueError,
         "head dim must be in"),
        (lambda: ca(q, k, v, key_padding_mask=torch.zeros(2, 6, dtype=torch.bool)),
         ValueError, r"key_padding_mask must have shape \(B, Lk\)"),
        (lambda: ca(q, k, v, key_padding_mask=torch.zeros(2, 7)), TypeError,
         "key_padding_mask must be a bool tensor"),
        (lambda: ca(qp, kp, kp, cu_seqlens_q=cq), ValueError, "must be given together"),
        (lambda: ca(qp, kp, kp, cu_seqlens_q=cq.long(), cu_seqlens_k=ck), TypeError,
         "cu_seqlens_q must be int32"),
        (lambda: ca(qp, kp, kp, cu_seqlens_q=torch.tensor([1, 2, 6], dtype=torch.int32),
                    cu_seqlens_k=ck), ValueError, "cu_seqlens_q must start at 0"),
        (lambda: ca(qp, kp, kp, cu_seqlens_q=torch.tensor([0, 4, 2, 6], dtype=torch.int32),
                    cu_seqlens_k=torch.tensor([0, 1, 2, 9], dtype=torch.int32)), ValueError,
         "cu_seqlens_q must be non-decreasing"),
        (lambda: ca(qp, kp, kp, cu_seqlens_q=cq, cu_seqlens_k=torch.tensor(
            [0, 4, 8], dtype=torch.int32)), ValueError, "cu_seqlens_k must end at the packed"),
        (lambda: ca(qp, kp, kp, cu_seqlens_q=cq, cu_seqlens_k=ck[:2]), ValueError,
         "cu_seqlens_k must end|cu_seqlens_k must have cu_seqlens_q's length"),
        (lambda: ca(qp, kp, kp, cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=3), ValueError,
         r"max_seqlen_q \(3\) is smaller than the longest segment \(4\)"),
        (lambda: ca(qp, kp, kp, cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_k=-1), ValueError,
         r"max_seqlen_k must be >= 0, got -1"),
        (lambda: ca(q, k, v, max_seqlen_q=3), ValueError, "go with cu_seqlens"),
        (lambda: ca(qp, kp, kp, cu_seqlens_q=cq.to("meta"), cu_seqlens_k=ck), ValueError,
         "cu_seqlens_q must be on q's device|cu_seqlens_q is a meta tensor"),
        (lambda: ca(qp.to("meta"), kp.to("meta"), kp.to("meta"), cu_seqlens_q=cq.to("meta"),
                    cu_seqlens_k=ck.to("meta")), ValueError, "cu_seqlens_q is a meta tensor"),
        (lambda: ca(qp, kp, kp, cu_seqlens_q=cq, cu_seqlens_k=ck,
                    key_padding_mask=torch.zeros(2, 9, dtype=torch.bool)), ValueError,
         "key_padding_mask is for dense inputs"),
        (lambda: mca(q, k, v, loc, 3), ValueError, "not a multiple of latents_per_media"),
        (lambda: mca(q, k, v, loc, 0), ValueError, "latents_per_media must be >= 1"),
        (lambda: mca(q, k, v, loc.int(), 7), TypeError, "media_locations must be a bool"),
        (lambda: mca(q, k, v, loc[:, :4], 7), ValueError, r"media_locations must have shape"),
        (lambda: att(q, k, v, key_mass="max"), ValueError, "key_mass must be None"),
        (lambda: att(q, k, v, key_mass=5), ValueError, "key_mass row 5 is out of range"),
        (lambda: att(q, k, v, key_mass=1.0), TypeError, "key_mass must be None"),
        (lambda: att(q, k, v, causal=1), TypeError, "causal must be True or False"),
    ]  # fmt: skip
    for call, exc, message in cases:
        with pytest.raises(exc, match=message):
            call()


def test_packed_max_seqlen_is_an_upper_bound(device, backend):
    """max_seqlen past the packed length (a loose bound, as flash-attention takes) gives
    the tight bound's result on both backends; the Triton path sized its grid and its
    one-segment offset check by it and refused 2^40 as an offset overflow."""
    qp, kp, vp = (rand(n, 2, 8, device=device) for n in (6, 9, 9))
    cq = torch.tensor([0, 2, 6], dtype=torch.int32, device=device)
    ck = torch.tensor([0, 4, 9], dtype=torch.int32, device=device)
    want = A.cross_attention(qp, kp, vp, cu_seqlens_q=cq, cu_seqlens_k=ck)
    got = A.cross_attention(qp, kp, vp, cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=2**40,
                            max_seqlen_k=2**40)  # fmt: skip
    assert torch.equal(got, want)


# ------------------------------------------------------------------ registration


def test_opcheck(device):
    """The dense (causal, key-keep with a forced split, ranges) and packed forms and the key
    mass, split between the backends (opcheck checks the registration: schema, fake,
    autograd, which both share)."""
    q, k, v = (leaf(rand(1, 2, n, 16, device=device)) for n in (5, 9, 9))
    core = torch.ops.vlmkernels.attention_core
    keep = (torch.rand(1, 9) < 0.7).to(torch.uint8)
    lo = torch.tensor([[0, 0, 3, 3, 6]], dtype=torch.int32)
    hi = torch.tensor([[0, 3, 6, 6, 9]], dtype=torch.int32)
    qp, kp, vp = (leaf(rand(n, 2, 16, device=device)) for n in (6, 9, 9))
    cq = torch.tensor([0, 2, 6], dtype=torch.int32)
    ck = torch.tensor([0, 4, 9], dtype=torch.int32)
    tail = (None, None, 0.0, None)  # key_bias, gate, dropout_p, dropout_seed
    cases = [
        ("triton", core, (q, k, v, None, None, 5, 9, None, None, None, True, 0.3, 0, *tail)),
        ("torch", core, (q, k, v, None, None, 5, 9, keep, None, None, False, 0.3, 2, *tail)),
        ("triton", core, (q, k, v, None, None, 5, 9, None, lo, hi, False, 0.3, 0, *tail)),
        ("torch", core, (qp, kp, vp, cq, ck, 4, 5, None, None, None, False, 0.3, 0, *tail)),
        ("triton", torch.ops.vlmkernels.attention_key_mass,
         (q.detach(), k.detach(), torch.randn(1, 2, 5), True, 0.3, 0, 5, 0.1, None)),
        ("triton", torch.ops.vlmkernels.attention_row_mass, (q, k, v, True, 0.3, None, 4, 0.5)),
        ("torch", torch.ops.vlmkernels.attention_row_mass,
         (q, k, v, False, 0.3, torch.randn(1, 2, 9), 0, 0.5)),
    ]  # fmt: skip
    for backend, op, args in cases:
        with use_backend(backend):
            torch.library.opcheck(op, args)


def test_torch_compile_fullgraph(device):
    q, k, v = (leaf(rand(2, 2, n, 16, device=device)) for n in (7, 10, 10))
    loc = torch.zeros(2, 7, dtype=torch.bool, device=device)
    loc[:, [1, 4]] = True

    def f(q, k, v):
        out, mass = A.attention(q, k, v, causal=True, key_mass=-1)
        media = A.media_cross_attention(q, k, v, loc, 5)
        return out.square().sum() + media.sum() + mass.sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    leaves = [leaf(t) for t in (q, k, v)]
    got, want = compiled(*leaves), f(q, k, v)
    got.backward()
    want.backward()
    assert rel(got, want) < 1e-6
    for a, b in zip(leaves, (q, k, v), strict=True):
        assert rel(a.grad, b.grad) < 1e-6


def test_torch_compile_symbolic_scale(device):
    """A float scale that Dynamo makes symbolic (dynamic=True, or a second value under
    automatic dynamic) traces in one graph, as the other ops' float arguments do (the
    finiteness check is comparisons, which a graph traces), with eager's results."""
    torch._dynamo.reset()
    q, k = rand(1, 2, 4, 8, device=device), rand(1, 2, 5, 8, device=device)

    def f(q, k, s):
        return A.attention(q, k, k, scale=s)

    for dynamic in (True, None):
        compiled = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=dynamic)
        for s in (0.3, 0.4, 0.5):
            assert rel(compiled(q, k, s), f(q, k, s)) < 1e-6
        torch._dynamo.reset()


def test_packed_offsets_batched_under_vmap_are_named(device):
    """Packed inputs under torch.func.vmap: offsets shared by every sample (in_dims=None)
    give the per-sample loop's results; offsets that differ per sample are refused by
    name (they are read on the host: a BatchedTensor has no storage to read)."""
    q, k = rand(3, 6, 2, 8, device=device), rand(3, 7, 2, 8, device=device)
    cu_q = torch.tensor([0, 2, 6], dtype=torch.int32, device=device)
    cu_k = torch.tensor([[0, 3, 7], [0, 4, 7], [0, 1, 7]], dtype=torch.int32, device=device)

    def f(q, k, a, b):
        return A.cross_attention(q, k, k, cu_seqlens_q=a, cu_seqlens_k=b, max_seqlen_q=4,
                                 max_seqlen_k=6)  # fmt: skip

    got = torch.func.vmap(f, in_dims=(0, 0, None, None))(q, k, cu_q, cu_k[0])
    for i in range(3):
        assert rel(got[i], f(q[i], k[i], cu_q, cu_k[0])) < 1e-6
    with pytest.raises(ValueError, match="cu_seqlens_k differs per sample under"):
        torch.func.vmap(f, in_dims=(0, 0, None, 0))(q, k, cu_q, cu_k)


def test_torch_compile_dynamic_lengths(device):
    """Lengths that change from step to step (mark_dynamic, dynamic=True): one graph for
    every length (the shape-derived arguments are SymInts), results equal to eager."""
    torch._dynamo.reset()

    def f(q, k):
        out, mass = A.attention(q, k, k, causal=True, key_mass=-1)
        return out.square().sum() + mass.sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=True)
    for n in (5, 9, 12, 7):
        q, k = (leaf(rand(1, 2, m, 16, device=device)) for m in (n, n + 2))
        got = compiled(q, k)
        assert rel(got, f(q, k)) < 1e-6
        got.backward()
        assert q.grad is not None and k.grad is not None
    q = leaf(rand(2, 2, 6, 16, device=device))
    torch._dynamo.mark_dynamic(q, 2)
    torch.compile(f, backend="aot_eager", fullgraph=True)(q, q).backward()


def test_lse_gradient_matches_float64_autograd(device):
    """d lse / d s = P: the lse output is differentiable (delta - dlse in the backward)."""
    q, k, v = (leaf(rand(1, 2, n, 16, device=device)) for n in (6, 11, 11))
    _, lse = A.cross_attention(q, k, v, return_lse=True)
    q64, k64 = leaf(q.detach().double()), leaf(k.detach().double())
    ref = torch.logsumexp(q64 @ k64.transpose(-1, -2) * 0.25, -1)
    g = torch.randn_like(ref)
    lse.backward(g.float())
    ref.backward(g)
    assert rel(q.grad, q64.grad) < 1e-5 and rel(k.grad, k64.grad) < 1e-5
    assert (v.grad == 0).all()


def test_math_of_the_module_docstring():
    assert "lse_i" in A.__doc__ and math.isclose(launchers.block_d(24), 32)


def test_split_k_packed(device):
    """The split-K forward on packed segments (empty, length-1 and long key segments)."""
    lens_q, lens_k = [3, 0, 9], [40, 6, 1]
    cu = lambda lens: torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()],  # noqa: E731
                                   dtype=torch.int32, device=device)  # fmt: skip
    q = rand(sum(lens_q), 2, 16, device=device)
    k, v = (rand(sum(lens_k), 2, 16, device=device) for _ in "kv")
    args = (cu(lens_q), cu(lens_k), 9, 40, None, None, None, False, 0.3)
    with use_backend("triton"):
        split, split_lse = ops.attention_core(q, k, v, *args, 3, None, None, 0.0, None)
        one, one_lse = ops.attention_core(q, k, v, *args, 1, None, None, 0.0, None)
    with use_backend("torch"):
        ref, ref_lse = ops.attention_core(q.double(), k.double(), v.double(), *args, 0, None, None,
                                          0.0, None)  # fmt: skip
    assert rel(split, ref) < 1e-5 and rel(one, ref) < 1e-5
    assert rel_lse(split_lse, ref_lse) < 1e-5 and rel_lse(one_lse, ref_lse) < 1e-5


def test_tuning_workload_runs(device):
    """The family's tuning workload on tiny specs (forward, backward, key mass; media)
    launches each core kernel of the spec's dtype it is asked to tune: the dK/dV kernels of
    a bias and of grouped heads included (these need an even head count)."""
    from vlmkernels.core.tuning import _record
    from vlmkernels.ops.attention import family

    names = [k.name for k in family.FAMILY.kernels]
    fp32_core = {"attention_fwd_fp32", "attention_bwd_kv_fp32", "attention_bwd_q_fp32",
                 "attention_bwd_kv_fp32_bias_gqa", "attention_delta"}  # fmt: skip
    for spec, launched in (
        ({"batch": 1, "heads": 2, "head_dim": 16, "lq": 8, "lk": 20, "dtype": "fp32"},
         fp32_core | {"attention_key_mass"}),
        ({"batch": 1, "heads": 2, "head_dim": 16, "lq": 8, "lk": 20, "dtype": "bf16"},
         {"attention_fwd", "attention_bwd_kv", "attention_bwd_q", "attention_bwd_kv_bias",
          "attention_bwd_kv_gqa", "attention_delta", "attention_key_mass"}),
        ({"batch": 1, "heads": 1, "head_dim": 16, "lq": 12, "lk": 8, "dtype": "fp32",
          "media": 4}, fp32_core),
    ):  # fmt: skip
        with _record() as calls:
            family.tune_workload(spec, device, names)
        assert {c.kernel.name for c in calls} == launched, spec
    q, k, v, args = family.tune_inputs({"batch": 2, "heads": 1, "head_dim": 16, "lq": 12,
                                        "lk": 8, "dtype": "fp32", "media": 4}, device)  # fmt: skip
    assert (
        args["lo"].tolist()[0] == [0] * 6 + [4] * 6 and args["hi"].tolist()[0] == [4] * 6 + [8] * 6
    )


def test_torch_compile_packed(device):
    """Packed segments under torch.compile(fullgraph=True): max_seqlen given (the offsets
    cannot be read while tracing), and a max_seqlen shorter than a segment refused by the
    graph's device-side check (not rows left unwritten)."""
    cq = torch.tensor([0, 3, 3, 8], dtype=torch.int32, device=device)
    ck = torch.tensor([0, 5, 6, 6], dtype=torch.int32, device=device)
    q = leaf(rand(8, 2, 16, device=device))
    k, v = (leaf(rand(6, 2, 16, device=device)) for _ in "kv")

    def f(q, k, v):
        out = A.cross_attention(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=5,
                                max_seqlen_k=5)  # fmt: skip
        return out.square().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    ls = [leaf(t) for t in (q, k, v)]
    got, want = compiled(*ls), f(q, k, v)
    got.backward()
    want.backward()
    assert rel(got, want) < 1e-6
    for a, b in zip(ls, (q, k, v), strict=True):
        assert rel(a.grad, b.grad) < 1e-6
    # dynamo reports the ValueError raised while tracing as its own exception type
    with pytest.raises(Exception, match="max_seqlen_q must be given under torch.compile"):
        torch.compile(lambda q: A.cross_attention(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck),
                      backend="aot_eager", fullgraph=True)(q.detach())  # fmt: skip
    for name, other in (("max_seqlen_q", "max_seqlen_k"), ("max_seqlen_k", "max_seqlen_q")):
        kw = {name: 4, other: 5}

        def short(q, kw=kw):
            return A.cross_attention(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, **kw)

        with pytest.raises(RuntimeError, match=rf"{name} is smaller than a segment"):
            torch.compile(short, backend="aot_eager", fullgraph=True)(q.detach())
    # a loose bound past int32 (the offsets' dtype) fits every segment: it is compared as
    # at most the packed length, as in eager mode (it wrapped to 0 and was refused)
    for dynamic in (False, True):
        loose = torch.compile(lambda q: A.cross_attention(
            q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=2**40, max_seqlen_k=2**33,
        ), backend="aot_eager", fullgraph=True, dynamic=dynamic)  # fmt: skip
        assert torch.equal(loose(q.detach()), A.cross_attention(
            q.detach(), k, v, cu_seqlens_q=cq, cu_seqlens_k=ck))  # fmt: skip
    # bad offsets are refused in the graph as in eager mode with both bounds given (both
    # check on the device), before any kernel reads past the packed tensors: not from 0,
    # decreasing, ending past or short of the packed length
    for bad in ([1, 3, 3, 8], [0, 5, 3, 8], [0, 3, 5, 10], [0, 3, 5, 7]):
        cu = torch.tensor(bad, dtype=torch.int32, device=device)

        def offsets(q, cu=cu):
            return A.cross_attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=ck,
                                     max_seqlen_q=8, max_seqlen_k=5)  # fmt: skip

        with pytest.raises(RuntimeError, match="cu_seqlens_q must start at 0, be non-dec"):
            offsets(q.detach())
        with pytest.raises(RuntimeError, match="cu_seqlens_q must start at 0, be non-dec"):
            torch.compile(offsets, backend="aot_eager", fullgraph=True)(q.detach())


def test_torch_compile_packed_symbolic_max_seqlen(device):
    """A symbolic max_seqlen (a packed length read from a shape with dynamic=True; a
    segment length read with .item() under capture_scalar_outputs, as flash-attention
    users compute it): the device-side check's message formatted the value, which fixed it
    in the graph (one compilation per length), and check_int's ``value < 0`` could not be
    decided for a data-dependent value (fullgraph failed). One graph for three lengths,
    each result the eager one."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    def inputs(t):
        cq = torch.tensor([0, 2, t], dtype=torch.int32, device=device)
        ck = torch.tensor([0, 3, t + 5], dtype=torch.int32, device=device)
        return rand(t, 2, 16, device=device), rand(t + 5, 2, 16, device=device), cq, ck

    def by_shape(q, kv, cq, ck):
        return A.cross_attention(q, kv, kv, cu_seqlens_q=cq, cu_seqlens_k=ck,
                                 max_seqlen_q=q.shape[0], max_seqlen_k=kv.shape[0])  # fmt: skip

    def by_item(q, kv, cq, ck):
        lq, lk = (cq[1:] - cq[:-1]).max().item(), (ck[1:] - ck[:-1]).max().item()
        return A.cross_attention(q, kv, kv, cu_seqlens_q=cq, cu_seqlens_k=ck,
                                 max_seqlen_q=lq, max_seqlen_k=lk)  # fmt: skip

    for f in (by_shape, by_item):
        torch._dynamo.reset()
        graphs.clear()
        compiled = torch.compile(f, backend=backend, fullgraph=True, dynamic=True)
        with torch._dynamo.config.patch(capture_scalar_outputs=True):
            for t in (4, 6, 9):
                args = inputs(t)
                assert rel(compiled(*args), f(*args)) < 1e-6
        assert len(graphs) == 1, (f.__name__, len(graphs))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_weight_absorption(dtype):
    """Folding W_k into fixed queries gives the projected attention (the key bias cancels,
    the value bias passes through), values and gradients."""
    from vlmkernels.ops.attention.absorption import absorb_queries, absorbed_cross_attention

    h, lq, d, b, n, c = 3, 5, 8, 2, 13, 20
    queries, x = leaf(rand(h, lq, d, dtype=dtype)), leaf(rand(b, n, c, dtype=dtype))
    w_k, w_v = leaf(rand(h * d, c, dtype=dtype) * 0.3), leaf(rand(h * d, c, dtype=dtype) * 0.3)
    b_k, b_v = leaf(rand(h * d, dtype=dtype)), leaf(rand(h * d, dtype=dtype))
    out = absorbed_cross_attention(queries, x, w_k, w_v, b_v)
    folded = absorb_queries(queries, w_k)
    assert torch.equal(out, absorbed_cross_attention(queries, x, w_k, w_v, b_v, absorbed=folded))
    ls = [leaf(t.detach().double()) for t in (queries, x, w_k, w_v, b_k, b_v)]
    q64, x64, wk64, wv64, bk64, bv64 = ls
    k = (x64 @ wk64.T + bk64).view(b, n, h, d).transpose(1, 2)
    v = (x64 @ wv64.T + bv64).view(b, n, h, d).transpose(1, 2)
    ref = torch.softmax(q64[None] @ k.transpose(-1, -2) / math.sqrt(d), -1) @ v
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert rel(out, ref) < tol
    g = torch.randn_like(ref)
    out.backward(g.to(dtype))
    ref.backward(g)
    for t, r in zip((queries, x, w_k, w_v, b_v), (q64, x64, wk64, wv64, bv64), strict=True):
        assert rel(t.grad, r.grad) < 10 * tol
    assert bk64.grad.abs().max() < 1e-12  # the key bias cancels in the softmax
    with pytest.raises(ValueError, match=r"w_k must be \(heads \* d, C\)"):
        absorbed_cross_attention(queries, x, w_k[:-1], w_v)
    with pytest.raises(ValueError, match=r"b_v must be \(heads \* d,\)"):
        absorbed_cross_attention(queries, x, w_k, w_v, b_v[:3])
    stale = absorb_queries(queries[:, 1:], w_k)  # absorbed for other queries
    with pytest.raises(ValueError, match="absorbed must be absorb_queries"):
        absorbed_cross_attention(queries, x, w_k, w_v, absorbed=stale)
    other = torch.float32 if dtype == torch.float64 else torch.float64
    with pytest.raises(TypeError, match="x must have queries' dtype"):
        absorbed_cross_attention(queries, x.to(other), w_k, w_v)


def test_empty_sizes(device, backend):
    """No queries, no keys (every row empty: 0 and lse -inf, zero gradients)."""
    q, k, v = (leaf(rand(1, 2, n, 16, device=device)) for n in (0, 5, 5))
    out, lse = A.cross_attention(q, k, v, return_lse=True)
    assert out.shape == (1, 2, 0, 16) and lse.shape == (1, 2, 0)
    q, k, v = (leaf(rand(1, 2, n, 16, device=device)) for n in (4, 0, 0))
    out, lse = A.cross_attention(q, k, v, return_lse=True)
    assert (out == 0).all() and torch.isneginf(lse).all()
    out.sum().backward()
    assert (q.grad == 0).all()
    # the key mass is a mean over heads (and rows): over none it is NaN (eager's empty
    # mean), not a plausible zero
    k, v = rand(1, 1, 5, 16, device=device), rand(1, 1, 5, 16, device=device)
    for h, lq in ((0, 3), (2, 0)):
        q = rand(1, h, lq, 16, device=device)
        cases = (("mean", (1, 2)), (0, 1)) if lq else (("mean", (1, 2)),)
        for key_mass, dims in cases:
            eager = torch.zeros(1, h, lq, 5, device=device).mean(dim=dims)
            eager = eager if isinstance(key_mass, str) else eager[:, key_mass]
            mass = A.attention(q, k, v, key_mass=key_mass)[1]
            assert mass.shape == (1, 5) and mass.isnan().all() and eager.isnan().all()
    # no heads on either side: SDPA's empty output (0 is a multiple of every head count)
    for hk in (0, 2):
        q, k, v = (leaf(rand(2, h, n, 16, device=device)) for h, n in ((0, 3), (hk, 5), (hk, 5)))
        out = A.attention(q, k, v)
        assert out.shape == (2, 0, 3, 16)
        out.sum().backward()
        assert k.grad.shape == k.shape and (k.grad == 0).all()
    with pytest.raises(ValueError, match="k's number of heads must divide q's 2"):
        A.attention(rand(1, 2, 3, 16), rand(1, 0, 5, 16), rand(1, 0, 5, 16))


@pytest.mark.parametrize("op", ["attention", "cross_attention", "packed", "media"])
def test_follows_autocast_as_sdpa(op, device, backend):
    """Under torch.autocast fp32 q, k, v are cast to the autocast dtype, as
    F.scaled_dot_product_attention's are: the output is bitwise the op's on the cast
    inputs, in that dtype, and the gradients reach the fp32 leaves (the casts'
    backward); a 16-bit k beside fp32 q and v is taken too. float64 stays float64."""
    b, h, lq, lk, d = 2, 2, 5, 8, 16
    shapes = ((b, h, lq, d), (b, h, lk, d), (b, h, lk, d))
    if op == "packed":
        shapes = ((b * lq, h, d), (b * lk, h, d), (b * lk, h, d))
    cu = {"packed": dict(cu_seqlens_q=torch.tensor([0, 3, 10], dtype=torch.int32, device=device),
                         cu_seqlens_k=torch.tensor([0, 9, 16], dtype=torch.int32,
                                                   device=device))}  # fmt: skip
    media = torch.zeros(b, lq, dtype=torch.bool, device=device)
    media[:, 0] = media[:, 3] = True
    call = {
        "attention": lambda q, k, v: A.attention(q, k, v, causal=True),
        "cross_attention": lambda q, k, v: A.cross_attention(q, k, v),
        "packed": lambda q, k, v: A.cross_attention(q, k, v, **cu["packed"]),
        "media": lambda q, k, v: A.media_cross_attention(q, k, v, media, 4),
    }[op]
    low = torch.bfloat16
    with torch.autocast(device.type, dtype=low):
        sdpa = torch.nn.functional.scaled_dot_product_attention(*(rand(*s) for s in shapes[1:]),
                                                                rand(*shapes[2]))  # fmt: skip
    assert sdpa.dtype == low or op == "packed"
    given = [leaf(rand(*s, device=device)) for s in shapes]
    given[1] = leaf(given[1].detach().to(low))  # a 16-bit tower beside fp32 ones
    with torch.autocast(device.type, dtype=low):
        out = call(*given)
    cast = [leaf(t.detach().to(low)) for t in given]
    want = call(*cast)
    assert out.dtype == low and torch.equal(out, want)
    w = rand(*out.shape, device=device).to(low)
    (out * w).sum().backward()
    (want * w).sum().backward()
    for g, c in zip(given, cast, strict=True):
        assert g.grad.dtype == g.dtype and torch.equal(g.grad, c.grad.to(g.dtype))
    if backend == "torch":  # float64 runs there only
        with torch.autocast(device.type, dtype=low):
            assert call(*(t.detach().double() for t in given)).dtype == torch.float64


# ------------------------------------------------- grouped-query attention, per-key bias


def gqa_ref(q, k, v, ok, scale, bias=None):
    """The float64 reference with k, v repeated per query head and the bias (B, 1 or H, Lk)
    added to the scaled logits: softmax(scale q k^T + bias) v."""
    g = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    if bias is None:
        return ref_attention(q, kk, vv, ok, scale)
    s = (q @ kk.transpose(-1, -2)) * scale + bias[:, :, None, :]
    ok = ok.expand_as(s)
    s = s.masked_fill(~ok, float("-inf"))
    return torch.softmax(s, -1) @ vv, torch.logsumexp(s, -1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_query_cross_attention(dtype, device, backend):
    """H = 6 query heads over 2 key/value heads (group 3), odd sizes, key padding, lse;
    dK and dV are the sums over each group; a strided k."""
    b, h, hk, lq, lk, d = 2, 6, 2, 11, 23, 20
    q = leaf(rand(b, h, lq, d, dtype=dtype, device=device))
    k_leaf = leaf(rand(b, lk, hk, d, dtype=dtype, device=device))
    k = k_leaf.transpose(1, 2)
    v = leaf(rand(b, hk, lk, d, dtype=dtype, device=device))
    pad = torch.rand(b, lk, device=device) < 0.3
    pad[0, :3] = False
    out, lse = A.cross_attention(q, k, v, key_padding_mask=pad, return_lse=True)
    q64, k64_leaf, v64 = (leaf(t.detach().double()) for t in (q, k_leaf, v))
    ref, ref_lse = gqa_ref(q64, k64_leaf.transpose(1, 2), v64, (~pad)[:, None, None, :],
                           d**-0.5)  # fmt: skip
    assert out.shape == q.shape
    assert rel(out, ref) < TOL[dtype] and rel(lse, ref_lse) < TOL[dtype]
    check_grads([out, lse], [ref, ref_lse], [q, k_leaf, v], [q64, k64_leaf, v64],
                3 * TOL[dtype])  # fmt: skip


@pytest.mark.parametrize("causal", [False, True])
def test_grouped_query_attention_and_key_mass(causal, device, backend):
    """attention with 4 query heads per key/value head (causal and not), and the key mass
    with grouped heads."""
    b, h, hk, lq, lk, d = 1, 4, 1, 9, 14, 16
    q, k, v = (leaf(rand(b, n_h, n, d, device=device)) for n_h, n in ((h, lq), (hk, lk),
                                                                        (hk, lk)))  # fmt: skip
    out, mass = A.attention(q, k, v, causal=causal, key_mass="mean")
    ok = causal_mask(lq, lk)[None, None] if causal else torch.ones(1, 1, 1, lk, dtype=torch.bool)
    q64, k64, v64 = (leaf(t.detach().double()) for t in (q, k, v))
    ref, _ = gqa_ref(q64, k64, v64, ok, 0.25)
    s = (q64.detach() @ k64.detach().repeat_interleave(h, 1).transpose(-1, -2)) * 0.25
    p = torch.softmax(s.masked_fill(~ok, float("-inf")), -1)
    assert rel(out, ref) < 1e-5 and rel(mass, p.mean(dim=(1, 2))) < 1e-5
    check_grads([out], [ref], [q, k, v], [q64, k64, v64], 3e-5)


@pytest.mark.parametrize("per_head,dtype", [(False, torch.float32), (True, torch.float32),
                                            (False, torch.bfloat16)])  # fmt: skip
def test_key_bias(per_head, dtype, device, backend):
    """ToMe's proportional attention: key_bias = log(size), (B, Lk) or (B, H, Lk), with
    grouped heads and causal; out, the key mass (with the bias) and the gradients of q, k, v
    and the bias against float64."""
    b, h, hk, lq, lk, d = 2, 4, 2, 10, 19, 16
    q = leaf(rand(b, h, lq, d, dtype=dtype, device=device))
    k, v = (leaf(rand(b, hk, lk, d, dtype=dtype, device=device)) for _ in "kv")
    size = torch.randint(1, 6, (b, h, lk) if per_head else (b, lk), device=device)
    bias = leaf(size.log().to(dtype))
    out, mass = A.attention(q, k, v, causal=True, key_bias=bias, key_mass=-1)
    q64, k64, v64, bias64 = (leaf(t.detach().double()) for t in (q, k, v, bias))
    ok = causal_mask(lq, lk)[None, None]
    ref, _ = gqa_ref(q64, k64, v64, ok, 0.25, bias64 if per_head else bias64[:, None])
    s = (q64.detach() @ k64.detach().repeat_interleave(2, 1).transpose(-1, -2)) * 0.25
    s = s + (bias64.detach() if per_head else bias64.detach()[:, None])[:, :, None, :]
    p = torch.softmax(s.masked_fill(~ok, float("-inf")), -1)
    assert rel(out, ref) < TOL[dtype]
    assert rel(mass, p[:, :, -1].mean(1)) < TOL[dtype]
    check_grads([out], [ref], [q, k, v, bias], [q64, k64, v64, bias64], 3 * TOL[dtype])


@pytest.mark.parametrize("mask", [float("-inf"), torch.finfo(torch.float32).min, -1e9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_key_bias_masks(mask, dtype, device, backend):
    """Additive masks as key_bias (transformers' finfo.min, -1e9, -inf): a masked key gets
    probability 0, and a row whose every key is masked gives 0 and no gradient, as a fully
    padded one (no NaN: finfo.min overflowed in base 2 and the backward took -inf - -inf;
    with -1e9 the row's lse lost log2 of its sum and the backward gave 1 per key)."""
    if dtype == torch.float64 and backend == "triton":
        pytest.skip("float64 takes the torch path")
    b, h, lq, lk, d = 2, 2, 5, 9, 16
    q = leaf(rand(b, h, lq, d, device=device).to(dtype))
    k, v = (leaf(rand(b, h, lk, d, device=device).to(dtype)) for _ in "kv")
    bias = 0.5 * torch.randn(b, lk, device=device, dtype=dtype)
    bias[1] = mask  # every key of sample 1
    bias[0, 3] = mask  # one key of sample 0
    bias = leaf(bias)
    out = A.cross_attention(q, k, v, key_bias=bias, scale=0.25)
    q64, k64, v64, bias64 = (leaf(t.detach().double()) for t in (q, k, v, bias))
    ok = torch.ones(b, 1, 1, lk, dtype=torch.bool)
    ok[1], ok[0, ..., 3] = False, False
    ref, _ = ref_attention(q64, k64, v64, ok, 0.25, bias64)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert rel(out, ref) < TOL[dtype]
    check_grads([out], [ref], [q, k, v], [q64, k64, v64], 3 * TOL[dtype])
    assert torch.isfinite(bias.grad).all() and not bias.grad[1].any()


def test_key_bias_packed_grouped(device, backend):
    """Packed segments (an empty one, a length-1 one) with grouped heads and a (Tk,) bias."""
    lens_q, lens_k = [4, 0, 1, 7], [6, 3, 0, 11]
    h, hk, d = 4, 2, 16
    cu = lambda lens: torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()],  # noqa: E731
                                   dtype=torch.int32, device=device)  # fmt: skip
    q = leaf(rand(sum(lens_q), h, d, device=device))
    k, v = (leaf(rand(sum(lens_k), hk, d, device=device)) for _ in "kv")
    bias = leaf(rand(sum(lens_k), device=device))
    out = A.cross_attention(q, k, v, cu_seqlens_q=cu(lens_q), cu_seqlens_k=cu(lens_k),
                            key_bias=bias, scale=0.3)  # fmt: skip
    q64, k64, v64, bias64 = (leaf(t.detach().double()) for t in (q, k, v, bias))
    refs, a, c = [], 0, 0
    for nq, nk in zip(lens_q, lens_k, strict=True):
        seg = lambda t, s, n: t[s : s + n].transpose(0, 1)[None]  # noqa: E731
        if nk == 0:
            refs.append(torch.zeros(nq, h, d, dtype=torch.float64) + 0 * q64[a : a + nq])
        else:
            o, _ = gqa_ref(seg(q64, a, nq), seg(k64, c, nk), seg(v64, c, nk),
                           torch.ones(1, 1, 1, nk, dtype=torch.bool), 0.3,
                           bias64[None, None, c : c + nk])  # fmt: skip
            refs.append(o[0].transpose(0, 1))
        a, c = a + nq, c + nk
    ref = torch.cat(refs)
    assert rel(out, ref) < 1e-5
    check_grads([out], [ref], [q, k, v, bias], [q64, k64, v64, bias64], 3e-5)


def test_grouped_and_bias_bad_input():
    q, k = rand(1, 4, 3, 8), rand(1, 3, 5, 8)
    with pytest.raises(ValueError, match="k's number of heads must divide q's 4"):
        A.cross_attention(q, k, k)
    k = rand(1, 2, 5, 8)
    with pytest.raises(ValueError, match="v's number of heads"):
        A.attention(q, k, rand(1, 3, 5, 8))
    with pytest.raises(ValueError, match=r"key_bias must have shape \(B, Lk\)"):
        A.attention(q, k, k, key_bias=rand(1, 4))
    with pytest.raises(TypeError, match="key_bias must be a floating tensor"):
        A.cross_attention(q, k, k, key_bias=torch.ones(1, 5, dtype=torch.int64))
    with pytest.raises(TypeError, match="key_bias must be a tensor"):
        A.cross_attention(q, k, k, key_bias=[0.0] * 5)
    with pytest.raises(ValueError, match=r"key_bias must have shape \(Tk,\)"):
        cu = torch.tensor([0, 5], dtype=torch.int32)
        A.cross_attention(rand(5, 4, 8), rand(5, 2, 8), rand(5, 2, 8), cu_seqlens_q=cu,
                          cu_seqlens_k=cu, key_bias=rand(1, 5))  # fmt: skip


def test_grouped_and_bias_opcheck_and_compile(device):
    """opcheck of the core with grouped heads and a bias (both backends), and
    torch.compile(fullgraph=True) of attention with both."""
    q = leaf(rand(1, 4, 5, 16, device=device))
    k, v = (leaf(rand(1, 2, 9, 16, device=device)) for _ in "kv")
    bias = leaf(rand(1, 1, 9, device=device))
    core = torch.ops.vlmkernels.attention_core
    for backend in BACKENDS:
        with use_backend(backend):
            torch.library.opcheck(
                core,
                (q, k, v, None, None, 5, 9, None, None, None, True, 0.3, 0, bias, None, 0.0, None),
            )

    def f(q, k, v, bias):
        return A.attention(q, k, v, key_bias=bias).square().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    leaves = [leaf(t) for t in (q, k, v, bias[:, 0])]
    got, want = compiled(*leaves), f(q, k, v, bias[:, 0])
    got.backward()
    want.backward()
    assert rel(got, want) < 1e-6
    for a, b in zip(leaves, (q, k, v, bias), strict=True):
        assert rel(a.grad, b.grad) < 1e-6


def test_nan_key_bias_propagates(device, backend):
    """A NaN in key_bias makes the rows that see its key NaN, as eager attention (SDPA)
    does, instead of counting as a masked key; a -inf bias still masks."""
    q, k, v = rand(1, 2, 3, 16, device=device), rand(1, 2, 5, 16, device=device), rand(
        1, 2, 5, 16, device=device)  # fmt: skip
    bias = torch.zeros(1, 5, device=device)
    bias[0, 1] = float("-inf")
    masked = A.cross_attention(q, k, v, key_bias=bias)
    keep = [0, 2, 3, 4]
    want = A.cross_attention(q, k[:, :, keep], v[:, :, keep])
    assert rel(masked, want) < 1e-5
    bias[0, 2] = float("nan")
    assert torch.isnan(A.cross_attention(q, k, v, key_bias=bias)).all()


# ------------------------------------------------------------------ tanh gate epilogue


@pytest.mark.parametrize("gate_shape", [(), (2, 16)])
def test_nan_gate_propagates(gate_shape, device, backend):
    """tanh(NaN) is NaN on every backend: the Triton epilogue's clamp once turned a NaN
    gate into tanh = 1 (the ungated output, finite) while the PyTorch path gave NaN."""
    q, k, v = rand(1, 2, 3, 16, device=device), rand(1, 2, 5, 16, device=device), rand(
        1, 2, 5, 16, device=device)  # fmt: skip
    gate = torch.full(gate_shape, 0.5, device=device)
    gate.view(-1)[0] = float("nan")
    out = A.cross_attention(q, k, v, gate=gate)
    assert out[:, 0, :, 0].isnan().all()
    media = torch.ones(1, 3, dtype=torch.bool, device=device)
    assert A.media_cross_attention(q, k, v, media, 5, gate=gate)[:, 0, :, 0].isnan().all()


@pytest.mark.parametrize("key_mass", [-1, "mean"])
def test_nan_row_makes_key_mass_nan(key_mass, device, backend):
    """A head whose mass row is NaN (a NaN key) makes the mass NaN, on both backends, not
    a finite mass from the other heads (the NaN row's lse was read as 'no visible key')."""
    q, k, v = (rand(1, 2, 5, 16, device=device) for _ in range(3))
    k[0, 0, 0, 0] = float("nan")
    out, mass = A.attention(q, k, v, causal=True, key_mass=key_mass)
    assert out[0, 0].isnan().all()
    assert mass.isnan().all()


@pytest.mark.parametrize("gate_shape,dtype", [((1,), torch.float32), ((2, 16), torch.float32),
                                              ((1,), torch.bfloat16)])  # fmt: skip
def test_media_cross_attention_tanh_gate(gate_shape, dtype, device, backend):
    """tanh(gate) * media-masked attention (scalar and per-channel gates): out and the
    gradients of q, k, v and the gate; a gate at 0 (Flamingo's initial value) gives 0 and
    still a gradient for the gate only."""
    q, k, v, loc, latents = media_case(device, dtype)
    mask, before_first = flamingo_mask(loc.cpu(), k.shape[2], latents, True)
    for scale in (0.7, 0.0):
        gate = leaf(rand(*gate_shape, device=device) * scale)
        for t in (q, k, v):
            t.grad = None
        out = A.media_cross_attention(q, k, v, loc, latents, gate=gate)
        q64, k64, v64, g64 = (leaf(t.detach().double()) for t in (q, k, v, gate))
        ref, _ = ref_attention(q64, k64, v64, mask, q.shape[-1] ** -0.5)
        c = g64.tanh() if g64.numel() == 1 else g64.tanh()[None, :, None, :]
        ref = ref.masked_fill(before_first, 0.0) * c
        if scale == 0.0:
            assert (out == 0).all()
            check_grads([out], [ref], [gate], [g64], 3 * TOL[dtype])
            assert (q.grad == 0).all() and (k.grad == 0).all() and (v.grad == 0).all()
        else:
            assert rel(out, ref) < TOL[dtype]
            check_grads([out], [ref], [q, k, v, gate], [q64, k64, v64, g64], 3 * TOL[dtype])


@pytest.mark.parametrize("gate_shape", [(1,), (2, 64)])
def test_tanh_gate_fp16_backward_under_a_loss_scale(gate_shape, device, backend):
    """fp16 with a GradScaler-sized upstream gradient (2^15) and small gates: 256 queries
    on 8 keys make P^T dO 256 times dO, which overflowed fp16 when taken ungated (eager's
    P^T (c dO) is c times smaller); at a closed gate (0, Flamingo's initial value) dq, dk
    and dv are exactly 0, not NaN (the gate's own gradient, sum(dO * PV), overflows fp16
    there as eager's does: checked at scale 1). Each gradient, divided by the scale, is
    within fp16 rounding of float64's."""
    q = rand(1, 2, 256, 64, dtype=torch.float16, device=device)
    k, v = (rand(1, 2, 8, 64, dtype=torch.float16, device=device) for _ in "kv")
    up = (0.25 + 0.05 * torch.randn(1, 2, 256, 64, device=device)).half()
    for value, loss_scale in ((0.01, 2.0**15), (0.0, 2.0**15), (0.0, 1.0)):
        gate = torch.full(gate_shape, value, device=device)
        leaves = [leaf(t) for t in (q, k, v, gate)]
        out = A.cross_attention(*leaves[:3], gate=leaves[3])
        ((out.float() * up.float()).sum() * loss_scale).backward()
        refs = [leaf(t.detach().double()) for t in (q, k, v, gate)]
        c = refs[3].tanh() if len(gate_shape) == 1 else refs[3].tanh()[None, :, None, :]
        ref, _ = ref_attention(*refs[:3], torch.ones(1, 1, 1, 8, dtype=torch.bool),
                               64**-0.5)  # fmt: skip
        (ref * c * up.double()).sum().backward()
        for name, got, want in zip("qkvg", leaves, refs, strict=True):
            if value == 0.0 and name != "g":
                assert (got.grad == 0).all(), name
            elif value != 0.0 or loss_scale == 1.0:
                assert torch.isfinite(got.grad).all(), (value, name)
                assert rel(got.grad.double() / loss_scale, want.grad) < 3e-3, (value, name)


def test_tanh_gate_split_k_packed_and_grouped(device):
    """The gate through the split-K combine (dense, forced splits), packed segments and a
    per-channel (H D,) gate with grouped heads."""
    q = rand(1, 4, 7, 16, device=device)
    k, v = (rand(1, 2, 50, 16, device=device) for _ in "kv")
    gate = rand(4, 16, device=device)
    args = (None, None, 7, 50, None, None, None, False, 0.25)
    with use_backend("triton"):
        split, _ = ops.attention_core(q, k, v, *args, 3, None, gate, 0.0, None)
    ref, _ = gqa_ref(q.double(), k.double(), v.double(), torch.ones(1, 1, 1, 50, dtype=bool),
                     0.25)  # fmt: skip
    assert rel(split, ref * gate.double().tanh()[None, :, None, :]) < 1e-5
    cu = torch.tensor([0, 3, 7], dtype=torch.int32, device=device)
    ck = torch.tensor([0, 20, 50], dtype=torch.int32, device=device)
    qp = leaf(rand(7, 4, 16, device=device))
    kp, vp = (leaf(rand(50, 2, 16, device=device)) for _ in "kv")
    g = leaf(rand(64, device=device))
    out = A.cross_attention(qp, kp, vp, cu_seqlens_q=cu, cu_seqlens_k=ck, gate=g)
    with use_backend("torch"):
        want = A.cross_attention(*(leaf(t.detach().double()) for t in (qp, kp, vp)),
                                 cu_seqlens_q=cu, cu_seqlens_k=ck,
                                 gate=leaf(g.detach().double()))  # fmt: skip
    assert rel(out, want) < 1e-5
    out.square().sum().backward()
    assert g.grad.shape == (64,) and g.grad.abs().max() > 0


def test_tanh_gate_bad_input_and_opcheck(device):
    q, k = rand(1, 2, 5, 8, device=device), rand(1, 2, 9, 8, device=device)
    with pytest.raises(ValueError, match=r"gate must have one element or shape \(H, D\)"):
        A.cross_attention(q, k, k, gate=rand(3, device=device))
    with pytest.raises(TypeError, match="gate must be a floating tensor"):
        A.cross_attention(q, k, k, gate=torch.ones(1, dtype=torch.int64))
    q, k, v = leaf(q), leaf(k), leaf(rand(1, 2, 9, 8, device=device))
    core = torch.ops.vlmkernels.attention_core
    for backend, gate in (("triton", leaf(rand(1, device=device))),
                          ("torch", leaf(rand(2, 8, device=device)))):  # fmt: skip
        with use_backend(backend):
            torch.library.opcheck(
                core,
                (q, k, v, None, None, 5, 9, None, None, None, True, 0.3, 0, None, gate, 0.0, None),
            )


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("packed", [False, True])
def test_fake_strides_match_the_implementations(backend, packed):
    """attention_core's and its backward's fakes give the layouts the implementations
    return (contiguous) for transposed inputs, as HF's q.view(B, L, H, D).transpose(1, 2)
    makes: a compiled reshape of the output relies on it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    g = torch.Generator().manual_seed(0)
    if packed:  # (40, 4, 16) views of (4, 40, 16)
        qkv = [torch.randn(4, 40, 16, generator=g).transpose(0, 1) for _ in range(3)]
        cu = torch.tensor([0, 15, 40], dtype=torch.int32)
        lens = (cu, cu, 25, 25)
    else:
        qkv = [torch.randn(1, 20, 2, 16, generator=g).transpose(1, 2) for _ in range(3)]
        lens = (None, None, 20, 20)
    options = (None, None, None, False, 0.25, 0, None, None, 0.0, None)

    def run(q, k, v, cu_q, cu_k, *rest):
        with use_backend(backend):
            out, lse = ops.attention_core(q, k, v, cu_q, cu_k, *rest)
            delta = torch.zeros_like(lse)
            grads = ops.attention_core_backward(out, q, k, v, lse, delta, cu_q, cu_k,
                                                *rest[:-5], None, 0.0, None)  # fmt: skip
        return [out, *grads[:3]]

    real = run(*qkv, *lens, *options)
    with FakeTensorMode() as mode:
        fake = run(*(mode.from_tensor(t) if isinstance(t, torch.Tensor) else t
                     for t in (*qkv, *lens)), *options)  # fmt: skip
    assert real[0].is_contiguous()
    assert [t.stride() for t in fake] == [t.stride() for t in real]


@pytest.mark.parametrize("row_mass", [False, True])
def test_second_order_raises(row_mass, device):
    """The backward kernels' gradients are first order: differentiating them raises
    (before, they came out without a graph, so a gradient penalty through attention lost
    the attention's terms without a word)."""
    q, k = (torch.randn(1, 2, 5, 16, device=device, requires_grad=True) for _ in "qk")
    if row_mass:
        out, _ = A.attention(q, k, k, key_mass=-1)
    else:
        out = A.attention(q, k, k)
    (gq,) = torch.autograd.grad((out * torch.randn_like(out)).sum(), q, create_graph=True)
    assert gq.requires_grad
    with pytest.raises(NotImplementedError, match="attention.*second-order"):
        gq.sum().backward()


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_delta_matches_float64(packed, dtype, device):
    """The backward's row term in one kernel: rowsum(dO O) - dlse in lse's layout, 0 where
    lse is not finite; dO strided, both gradients optional; opcheck."""
    shape, lse_shape = ((23, 3, 40), (3, 23)) if packed else ((2, 3, 13, 40), (2, 3, 13))
    out = torch.randn(shape, device=device).to(dtype)
    grad_out = torch.randn(*shape[:-1], 2 * shape[-1], device=device).to(dtype)[..., ::2]
    lse = torch.randn(lse_shape, device=device)
    lse.view(-1)[::7] = float("-inf")
    lse.view(-1)[3] = float("nan")
    grad_lse = torch.randn(lse_shape, device=device)
    finite = torch.isfinite(lse)
    rows = (grad_out.double() * out.double()).sum(-1)
    rows = rows.transpose(0, 1) if packed else rows
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for g, gl in ((grad_out, grad_lse), (grad_out, None), (None, grad_lse), (None, None)):
        want = (rows if g is not None else 0.0) - (gl.double() if gl is not None else 0.0)
        want = torch.where(finite, want, 0.0) * torch.ones(lse_shape, dtype=torch.float64)
        with use_backend("triton"):
            got = ops.attention_delta(out, g, lse, gl)
        assert got.shape == lse_shape and got.dtype == torch.float32
        assert (got[~finite] == 0).all()
        assert rel(got[finite], want[finite]) < tol, (g is None, gl is None)
    with use_backend("triton"):
        torch.library.opcheck(ops.attention_delta.overload, (out, grad_out, lse, grad_lse))


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda q, x, w: A.absorbed_cross_attention(q[0], x, w, w), ValueError, "queries must be"),
        (
            lambda q, x, w: A.absorbed_cross_attention(q.tolist(), x, w, w),
            TypeError,
            "queries must",
        ),
        (lambda q, x, w: A.absorbed_cross_attention(q, x, w, w, scale="a"), TypeError, "scale"),
        (
            lambda q, x, w: A.absorbed_cross_attention(q, x, w, w, scale=float("inf")),
            TypeError,
            "scale must be a finite",
        ),
        (lambda q, x, w: A.absorbed_cross_attention(q, None, w, w), TypeError, "x must be"),
        (lambda q, x, w: A.absorbed_cross_attention(q, x, w, None), TypeError, "w_v must be"),
        (lambda q, x, w: A.absorb_queries(q.tolist(), w), TypeError, "queries must"),
        (lambda q, x, w: A.absorb_queries(q.long(), w.long()), TypeError, "floating"),
    ],
)
def test_absorbed_cross_attention_bad_input(call, exc, match):
    """Bad arguments raise naming the argument, not an unpacking / attribute error."""
    q, x, w = torch.randn(2, 3, 4), torch.randn(1, 5, 6), torch.randn(8, 6)
    with pytest.raises(exc, match=f"^absorb.*{match}"):
        call(q, x, w)


@pytest.mark.parametrize("what", ["gate", "key_bias"])
def test_compiled_gate_and_bias_of_constant_sizes(what, device):
    """torch.compile(dynamic=True) makes q's and k's sizes symbolic while an (H, D) gate or
    a (B, H, Lk) key_bias built with constant sizes keeps them constant: the checks
    ``tuple(t.shape) not in (...)`` (dynamo's containment test misjudges a constant against
    an equal symbolic size) refused them. Eager accepts them; so does the compiled call,
    with eager's values."""
    torch._dynamo.reset()

    def f(q, k):
        if what == "gate":
            return A.cross_attention(q, k, k, gate=torch.full((2, 8), 0.3, device=device))
        return A.cross_attention(q, k, k, key_bias=torch.ones(2, 2, 7, device=device))

    q, k = rand(2, 2, 5, 8, device=device), rand(2, 2, 7, 8, device=device)
    got = torch.compile(f, backend="eager", fullgraph=True, dynamic=True)(q, k)
    assert rel(got, f(q, k)) < 1e-6


def test_weight_absorption_without_image_tokens():
    """An image of no tokens (N = 0): softmax(Q K^T) V over no keys is 0, as the unfolded
    attention (and cross_attention) gives, not the value bias, which passes through only
    because each softmax row sums to 1; b_v then gets a zero gradient."""
    from vlmkernels.ops.attention.absorption import absorbed_cross_attention

    h, lq, d, c = 2, 3, 4, 5
    queries, x = leaf(rand(h, lq, d)), leaf(rand(2, 0, c))
    w_k, w_v, b_v = leaf(rand(h * d, c)), leaf(rand(h * d, c)), leaf(rand(h * d))
    out = absorbed_cross_attention(queries, x, w_k, w_v, b_v)
    assert out.shape == (2, h, lq, d) and (out == 0).all()
    out.sum().backward()
    assert (b_v.grad == 0).all()


def test_weight_absorption_refuses_absorbed_queries_without_their_gradient():
    """With ``absorbed`` given, queries and w_k reach the result only through it: an
    absorbed made under no_grad (cached "once per weight update") left their gradients
    None, silently, while they required grad. It raises; one made with grad, or detached
    queries and w_k, or no grad mode, are accepted."""
    from vlmkernels.ops.attention.absorption import absorb_queries, absorbed_cross_attention

    h, lq, d, b, n, c = 2, 3, 2, 2, 4, 5
    queries, x = leaf(rand(h, lq, d)), leaf(rand(b, n, c))
    w_k, w_v = leaf(rand(h * d, c)), leaf(rand(h * d, c))
    with torch.no_grad():
        cached = absorb_queries(queries, w_k)
    with pytest.raises(ValueError, match="absorbed carries no gradient"):
        absorbed_cross_attention(queries, x, w_k, w_v, absorbed=cached)
    with pytest.raises(ValueError, match="absorbed carries no gradient"):
        absorbed_cross_attention(queries.detach(), x, w_k, w_v, absorbed=cached)
    out = absorbed_cross_attention(queries, x, w_k, w_v, absorbed=absorb_queries(queries, w_k))
    out.sum().backward()
    assert queries.grad is not None and w_k.grad is not None
    absorbed_cross_attention(queries.detach(), x, w_k.detach(), w_v, absorbed=cached)
    with torch.no_grad():
        absorbed_cross_attention(queries, x, w_k, w_v, absorbed=cached)

"""The CUDA C++ rotary kernels (csrc/rope/rope.cu) against the Triton kernels on a GPU. Skipped
without CUDA or without the built extension vlmkernels._C.

Every case runs the same op under ``use_backend("cuda")`` and ``use_backend("triton")``.

- Angles from cos/sin tables: results must be bitwise equal in fp32, fp16 and bf16. Both
  kernels do the same fp32 operations in the same order (each two-product sum as one FMA
  fusing the same product, as Triton 3.6 to 3.9 contracts it) and round once to nearest.
- Angles from positions: both take cosf/sinf from libdevice, the same algorithm and
  constants, but Triton links its own copy with flush-to-zero, so results may differ for
  denormal angles (never with integer positions and normal inv_freq). Checked here to 2^-21
  of the tensor's max (a one-ulp cos/sin difference), plus one ulp of the output in fp16/bf16
  (a flipped rounding); ``test_positions_bitwise`` records (xfail if not) whether they are
  bitwise equal.

Backward rotations are compared on the op itself (``backward=True``): under autograd the
backward pass runs on the engine's thread, where ``use_backend`` does not reach.
"""

import pytest
import torch

import vlmkernels
from vlmkernels.core import cuda as _cuda
from vlmkernels.ops.rope import functional as R
from vlmkernels.ops.rope.layout import to_bshd

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(
        torch.cuda.is_available() and not _cuda.status()[0],
        reason=f"the CUDA C++ extension is unavailable: {_cuda.status()[1]}",
    ),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MANTISSA = {torch.float16: 10, torch.bfloat16: 7}
MIN_EXPONENT = {torch.float16: -13, torch.bfloat16: -125}  # frexp's, of the smallest normal
SECTIONS = {R.PLAIN: [0, 0, 0], R.CHUNKED: [16, 24, 24], R.INTERLEAVED: [24, 20, 20]}


def both(fn, *args, **kwargs):
    """fn's results with the CUDA C++ kernels and with the Triton kernels."""
    outs = []
    for backend in ("cuda", "triton"):
        with vlmkernels.use_backend(backend):
            out = fn(*args, **kwargs)
        outs.append(out if isinstance(out, tuple) else (out,))
    torch.cuda.synchronize()
    return outs


def assert_same_layout(cuda_outs, triton_outs):
    for a, b in zip(cuda_outs, triton_outs, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype and a.stride() == b.stride()


def assert_equal(cuda_outs, triton_outs):
    assert_same_layout(cuda_outs, triton_outs)
    for a, b in zip(cuda_outs, triton_outs, strict=True):
        if not torch.equal(a, b):
            diff = (a.double() - b.double()).abs()
            where = tuple(int(i) for i in (diff == diff.max()).nonzero()[0])
            raise AssertionError(
                f"{int((a != b).sum())} of {a.numel()} elements differ ({a.dtype}), max "
                f"{diff.max().item():.3g} at {where}"
            )


def ulp(x: torch.Tensor) -> torch.Tensor:
    """One ulp of the 16-bit dtype of x at |x| (as float64; subnormals included)."""
    _, exponent = torch.frexp(x.float())
    exponent = exponent.clamp_min(MIN_EXPONENT[x.dtype])
    return torch.ldexp(torch.ones_like(x, dtype=torch.float64), exponent - 1 - MANTISSA[x.dtype])


def assert_close_positions(cuda_outs, triton_outs):
    """Positions-path tolerance (module docstring): an fp32 difference of 2^-21 of the
    tensor's max, plus, in 16-bit, one ulp of the output (a flipped rounding)."""
    assert_same_layout(cuda_outs, triton_outs)
    for a, b in zip(cuda_outs, triton_outs, strict=True):
        if a.numel() == 0:
            continue
        diff = (a.double() - b.double()).abs()
        bound = 2.0**-21 * b.double().abs().max()
        if a.dtype != torch.float32:
            bound = bound + torch.maximum(ulp(a), ulp(b))
        assert bool((diff <= bound).all()), diff.max()


def qk(layout, dtype, b=2, s=33, hq=6, hk=2, d=128):
    """q, k, unsqueeze_dim as attention code makes them (see tests/test_rope.py)."""
    if layout == "packed":  # views of one (T, 3, H, D) projection
        qkv = torch.randn(b * s, 3, hq, d, device="cuda").to(dtype)
        return qkv[:, 0], qkv[:, 1, :hk], 1
    q = torch.randn(b, s, hq, d, device="cuda").to(dtype)
    k = torch.randn(b, s, hk, d, device="cuda").to(dtype)
    if layout == "bhsd":
        return q.transpose(1, 2), k.transpose(1, 2), 1
    if layout == "bshd":
        return q, k, 2
    return q.reshape(b * s, hq, d), k.reshape(b * s, hk, d), 1


def tables(q, ud, rot, a=None, dtype=None):
    shape = [n for i, n in enumerate(q.shape[:-1]) if i != ud] + [rot]
    shape = ([a] if a else []) + shape
    cos = torch.randn(shape, device="cuda").to(dtype or q.dtype)
    return cos, torch.randn_like(cos)


def canonical_table_call(q, k, cos, sin, ud, rule, backward):
    """The rope_table op, as the public functions call it (with the backward flag)."""
    leading = rule != R.PLAIN
    return torch.ops.vlmkernels.rope_table(
        q, k, cos, sin, ud, leading, rule, SECTIONS[rule], backward
    )


# ------------------------------------------------------------------ tables


@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize("rule", [R.PLAIN, R.CHUNKED, R.INTERLEAVED])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["bhsd", "bshd", "thd", "packed"])
def test_tables(layout, dtype, rule, backward):
    q, k, ud = qk(layout, dtype)
    cos, sin = tables(q, ud, 128, a=3 if rule != R.PLAIN else None)
    assert_equal(*both(canonical_table_call, q, k, cos, sin, ud, rule, backward))
    if not backward:  # the public functions, with their layout handling
        if rule == R.PLAIN:
            assert_equal(*both(vlmkernels.rope, q, k, cos, sin, ud))
        else:
            inter = rule == R.INTERLEAVED
            outs = both(vlmkernels.mrope, q, k, cos, sin, SECTIONS[rule], ud, interleaved=inter)
            assert_equal(*outs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 72, 80, 128, 256])
def test_head_dims(d, dtype):
    q, k, ud = qk("bhsd", dtype, s=17, hq=5, hk=1, d=d)
    cos, sin = tables(q, ud, d)
    assert_equal(*both(vlmkernels.rope, q, k, cos, sin, ud))
    cos3, sin3 = tables(q, ud, d, a=3)
    section = [d // 2 - d // 6 - d // 8, d // 6, d // 8]
    for inter in (False, True):
        outs = both(vlmkernels.mrope, q, k, cos3, sin3, section, ud, interleaved=inter)
        assert_equal(*outs)


@pytest.mark.parametrize(
    "table_dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64]
)
def test_table_dtypes_and_broadcast(table_dtype):
    """Tables in any float dtype (vision RoPE passes fp32 with bf16 q), shared by the batch."""
    q, k, ud = qk("bhsd", torch.bfloat16, b=3, s=20, d=80)
    cos = torch.randn(1, 20, 80, device="cuda", dtype=table_dtype)
    sin = torch.randn_like(cos)
    assert_equal(*both(vlmkernels.rope, q, k, cos, sin, ud))


@pytest.mark.parametrize("hd", [72, 80])
@pytest.mark.parametrize("dtype", DTYPES)
def test_vision_rope_packed(hd, dtype):
    q, k, _ = qk("packed", dtype, b=1, s=300, hq=16, hk=16, d=hd)
    cos, sin = torch.randn(300, hd, device="cuda"), torch.randn(300, hd, device="cuda")
    assert_equal(*both(vlmkernels.vision_rope, q, k, cos, sin))


@pytest.mark.parametrize("dtype", DTYPES)
def test_inplace(dtype):
    q, k, ud = qk("bhsd", dtype)
    cos, sin = tables(q, ud, 128, a=3)
    results = []
    for backend in ("cuda", "triton"):
        q2, k2 = q.clone(), k.clone()
        with vlmkernels.use_backend(backend):
            out = vlmkernels.mrope(q2, k2, cos, sin, [16, 24, 24], ud, inplace=True)
        assert out[0] is q2 and out[1] is k2
        results.append((q2, k2))
    assert_equal(*results)
    partial_cos, partial_sin = cos[..., :32], sin[..., :32]  # lanes 32..128 left alone
    results = []
    for backend in ("cuda", "triton"):
        q2, k2 = q.clone(), k.clone()
        with vlmkernels.use_backend(backend):
            vlmkernels.mrope(q2, k2, partial_cos, partial_sin, [8, 4, 4], ud, inplace=True)
        assert torch.equal(q2[..., 32:], q[..., 32:])
        results.append((q2, k2))
    assert_equal(*results)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("d", "rot"), [(64, 16), (72, 24), (128, 64), (80, 2)])
def test_partial_rotary(d, rot, dtype):
    q, k, ud = qk("bhsd", dtype, d=d)
    cos, sin = tables(q, ud, rot)
    outs = both(vlmkernels.rope, q, k, cos, sin, ud)
    assert_equal(*outs)
    assert torch.equal(outs[0][0][..., rot:], q[..., rot:])


def test_head_counts_and_mixed_dtypes():
    for hq, hk in [(1, 1), (28, 4), (40, 8), (64, 8), (3, 0)]:
        q, k, ud = qk("bshd", torch.bfloat16, s=9, hq=hq, hk=max(hk, 1))
        k = k[:, :, :hk]
        cos, sin = tables(q, ud, 128)
        assert_equal(*both(vlmkernels.rope, q, k, cos, sin, ud))
    q, k, ud = qk("bshd", torch.bfloat16, s=9)
    cos, sin = tables(q, ud, 128, dtype=torch.float32)
    assert_equal(*both(vlmkernels.rope, q, k.float(), cos, sin, ud))  # k fp32, q bf16


def test_unaligned_and_strided_layouts():
    """Layouts that rule out 16-byte accesses take the narrower or scalar paths."""
    plan = torch.ops.vlmkernels.rope_cuda_plan
    base = torch.randn(2, 9, 4, 129, device="cuda").to(torch.bfloat16)
    q = base[..., 1:]  # contiguous last dim, pointer 2 bytes past a 16-byte boundary
    k = base[:, :, :2, 1:]
    assert plan(q, k, torch.empty_like(q), torch.empty_like(k), 128)[0] == 1
    cos, sin = tables(q, 2, 128)
    assert_equal(*both(vlmkernels.rope, q, k, cos, sin, 2))
    wide = torch.randn(2, 9, 4, 256, device="cuda").to(torch.bfloat16)
    q, k = wide[..., ::2], wide[:, :, :2, 1::2]  # last-dim stride 2
    assert plan(q, k, torch.empty_like(q), torch.empty_like(k), 128)[0] == 1
    assert_equal(*both(vlmkernels.rope, q, k, cos, sin, 2))
    q = torch.randn(2, 9, 128, 4, device="cuda").transpose(-1, -2)  # fp32, last-dim stride 4
    assert plan(q, q[:, :, :1], torch.empty_like(q), torch.empty_like(q[:, :, :1]), 128)[0] == 1
    assert_equal(*both(vlmkernels.rope, q, q[:, :, :1], cos.float(), sin.float(), 2))


@pytest.mark.parametrize(
    ("dtype", "d", "expected"),
    [(torch.bfloat16, 128, 8), (torch.bfloat16, 80, 8), (torch.bfloat16, 72, 4),
     (torch.float16, 64, 8), (torch.float32, 128, 4), (torch.float32, 72, 4)],
)  # fmt: skip
def test_vector_width(dtype, d, expected):
    q, k, _ = qk("bhsd", dtype, d=d)
    qv, kv = to_bshd(q, 1), to_bshd(k, 1)
    vec, threads_x, tokens = torch.ops.vlmkernels.rope_cuda_plan(
        qv, kv, torch.empty_like(qv), torch.empty_like(kv), d
    )
    assert vec == expected and threads_x * tokens <= 256 and threads_x % (d // 2 // vec) == 0


# ------------------------------------------------------------------ positions


@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("rule", [R.CHUNKED, R.INTERLEAVED])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["bhsd", "thd"])
def test_positions(layout, dtype, rule, pos_dtype, backward):
    q, k, ud = qk(layout, dtype)
    tokens = [n for i, n in enumerate(q.shape[:-1]) if i != ud]
    positions = torch.randint(0, 40000, (3, *tokens), device="cuda", dtype=pos_dtype)
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, 128, 2, device="cuda").float() / 128))
    if not backward:
        outs = both(
            vlmkernels.mrope_from_positions, q, k, positions, inv_freq, SECTIONS[rule],
            interleaved=rule == R.INTERLEAVED, attention_scaling=0.9,
        )  # fmt: skip
        assert_close_positions(*outs)
    op = torch.ops.vlmkernels.rope_positions
    outs = both(op, q, k, positions, inv_freq, ud, rule, SECTIONS[rule], 0.9, backward)
    assert_close_positions(*outs)


@pytest.mark.parametrize("dtype", DTYPES)
def test_positions_partial_rotary_and_text_positions(dtype):
    q, k, _ = qk("bhsd", dtype, d=96)
    positions = torch.randint(0, 1000, (2, 33), device="cuda")  # text: T = H = W
    inv_freq = 1.0 / (1e4 ** (torch.arange(0, 32, 2, device="cuda").float() / 32))
    outs = both(vlmkernels.mrope_from_positions, q, k, positions, inv_freq, [8, 4, 4],
                rotary_dim=32)  # fmt: skip
    assert_close_positions(*outs)
    assert torch.equal(outs[0][0][..., 32:], q[..., 32:])


@pytest.mark.xfail(strict=False, reason="cosf/sinf: nvcc's libdevice vs Triton's (FTZ) copy")
def test_positions_bitwise():
    """Large angles too (positions up to 3e5 with inv_freq[0] = 1: Payne-Hanek reduction)."""
    q, k, _ = qk("bhsd", torch.float32, b=1, s=4096, hq=4, hk=2)
    positions = torch.randint(0, 300_000, (3, 1, 4096), device="cuda")
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, 128, 2, device="cuda").float() / 128))
    outs = both(vlmkernels.mrope_from_positions, q, k, positions, inv_freq, [24, 20, 20],
                interleaved=True)  # fmt: skip
    assert_equal(*outs)


# ------------------------------------------------------------------ plumbing


def test_stream_and_empty_inputs():
    q, k, ud = qk("bhsd", torch.bfloat16)
    cos, sin = tables(q, ud, 128)
    expected = both(vlmkernels.rope, q, k, cos, sin, ud)[1]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), vlmkernels.use_backend("cuda"):
        out = vlmkernels.rope(q, k, cos, sin, ud)
    stream.synchronize()
    assert_equal(out, expected)
    q0, k0, ud = qk("bhsd", torch.bfloat16, s=0)
    cos0, sin0 = tables(q0, ud, 128)
    with vlmkernels.use_backend("cuda"):
        out = vlmkernels.rope(q0, k0, cos0, sin0, ud)
    assert out[0].shape == q0.shape


def test_bad_arguments_raise():
    q, k, ud = qk("bshd", torch.bfloat16)
    cos, sin = tables(q, ud, 128, a=3)
    op = torch.ops.vlmkernels.rope_cuda_
    with pytest.raises(RuntimeError, match="sections must sum"):
        op(q, k, q.clone(), k.clone(), cos, sin, None, None, R.CHUNKED, [1, 2, 3], 1.0, False)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        op(q.double(), k, q.double(), k, cos, sin, None, None, 1, [16, 24, 24], 1.0, False)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"), vlmkernels.use_backend("cuda"):
        vlmkernels.rope(q.cpu(), k.cpu(), cos[0].cpu(), sin[0].cpu(), ud)


def test_status_names_the_architectures():
    ok, why = _cuda.status()
    assert ok and why.startswith("built for sm_"), why


def test_64bit_offsets():
    """q with more than 2^31 elements (4.3 GB in bf16): offsets past int32 are right."""
    seq, hq, d = 600_000, 28, 128
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip("needs 24 GiB of free GPU memory")
    q = torch.empty(1, seq, hq, d, device="cuda", dtype=torch.bfloat16).normal_()
    k = torch.randn(1, seq, 4, d, device="cuda", dtype=torch.bfloat16)
    assert q.numel() > 2**31
    cos = torch.randn(1, seq, d, device="cuda", dtype=torch.bfloat16)
    sin = torch.randn_like(cos)
    with vlmkernels.use_backend("cuda"):
        out_q, out_k = vlmkernels.rope(q, k, cos, sin, unsqueeze_dim=2)
    tail = slice(seq - 256, seq)
    with vlmkernels.use_backend("triton"):
        ref_q, ref_k = vlmkernels.rope(q[:, tail], k[:, tail], cos[:, tail], sin[:, tail], 2)
    assert_equal((out_q[:, tail], out_k[:, tail]), (ref_q, ref_k))
    del out_q, out_k
    with vlmkernels.use_backend("cuda"):  # in place over the whole tensor
        vlmkernels.rope(q, k, cos, sin, unsqueeze_dim=2, inplace=True)
    assert_equal((q[:, tail], k[:, tail]), (ref_q, ref_k))

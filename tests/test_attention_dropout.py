"""Attention dropout in the attention kernels (``dropout_p``, ``dropout_seed``).

out = (P * M / (1 - p)) V with M drawn in the kernel from Philox keyed by the seed, never
stored. ``dropout_mask`` materialises the kernels' mask from the same @triton.jit function
(a kernel of its own); the references take that mask and evaluate the attention and its
gradients with float64 autograd on the same (rounded) inputs. Tolerances (max abs error
relative to max |ref|): fp32 1e-5, bf16 2e-2 (as tests/test_attention.py: P rounded to
bf16 before P V, the interpreter's conversion truncates).
"""

import math

import pytest
import torch

import vlmkernels
from vlmkernels.core.backend import use_backend
from vlmkernels.ops import attention as A
from vlmkernels.ops.attention import ops, reference

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def rand(*shape, device, dtype=torch.float32):
    return torch.randn(*shape, device=device).to(dtype)


def leaf(t):
    return t.detach().clone().requires_grad_()


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def seed_tensor(value, device):
    return torch.tensor([value], dtype=torch.int64, device=device)


def ref_dropout(q, k, v, ok, keep, p, scale):
    """(P * keep / (1 - p)) v in float64, P = softmax(scale q k^T) over ``ok`` (rows without
    a visible key give 0); k, v repeated to q's heads (grouped-query attention)."""
    g = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(g, 1) for t in (k, v))
    s = (q.double() @ k.transpose(-1, -2)) * scale
    ok = ok.expand_as(s)
    row = ok.any(-1, keepdim=True)
    s = torch.where(ok & row, s, torch.where(row, float("-inf"), 0.0))
    probs = torch.softmax(s, dim=-1) * row
    return (probs * keep / (1 - p)) @ v


def grads_of(out, leaves, g):
    return torch.autograd.grad((out.double() * g).sum(), leaves)


def test_mask_helper_is_the_reference_philox_and_keeps_one_minus_p(device):
    """The mask kernel equals the torch path's Philox bit for bit; its keep rate is within
    5 binomial standard deviations of 1 - p; every index (b, h, i, j) draws its own bit."""
    seed = seed_tensor(2**40 + 12345, device)
    b, h, lq, lk = 2, 3, 21, 70
    ar = lambda n: torch.arange(n, device=device)  # noqa: E731
    for p in (0.1, 0.6):
        mask = A.dropout_mask(seed, (b, h, lq, lk), p)
        want = reference.dropout_keep(seed, ar(b)[:, None, None, None],
                                      ar(h)[None, :, None, None], ar(lq)[:, None],
                                      ar(lk)[None, :], p)  # fmt: skip
        assert mask.dtype == torch.bool and torch.equal(mask, want)
        n = mask.numel()
        assert abs(mask.double().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
        same = (1 - p) ** 2 + p**2  # agreement of two independent masks
        for x, y in ((mask[0], mask[1]), (mask[:, 0], mask[:, 2]),
                     (mask[..., :10, :], mask[..., 10:20, :]),
                     (mask[..., :35], mask[..., 35:70])):  # fmt: skip
            agree = (x == y).double().mean().item()
            assert abs(agree - same) < 5 * math.sqrt(same * (1 - same) / x.numel())
    other = A.dropout_mask(seed_tensor(7, device), (b, h, lq, lk), 0.6)
    assert not torch.equal(other, mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_dropout_matches_float64_with_the_kernel_mask(device, dtype):
    """Grouped heads (2 over 1) and key padding, odd sizes: out and dq, dk, dv against the
    float64 reference with the mask of ``dropout_mask``."""
    p, scale = 0.3, 0.35
    q = rand(2, 2, 5, 16, device=device, dtype=dtype)
    k, v = (rand(2, 1, 37, 16, device=device, dtype=dtype) for _ in "kv")
    pad = torch.zeros(2, 37, dtype=torch.bool, device=device)
    pad[1, 25:] = True
    seed = seed_tensor(987654321, device)
    leaves = [leaf(t) for t in (q, k, v)]
    out = A.cross_attention(*leaves, key_padding_mask=pad, scale=scale, dropout_p=p,
                            dropout_seed=seed)  # fmt: skip
    keep = A.dropout_mask(seed, (2, 2, 5, 37), p)
    ref_leaves = [leaf(t.double()) for t in (q, k, v)]
    ref = ref_dropout(*ref_leaves, (~pad)[:, None, None, :], keep, p, scale)
    assert out.dtype == dtype and rel(out, ref) < TOL[dtype]
    g = torch.randn(ref.shape, dtype=torch.float64, device=device)
    for a, b in zip(grads_of(out, leaves, g), grads_of(ref, ref_leaves, g), strict=True):
        assert rel(a, b) < TOL[dtype]
    no_drop = A.cross_attention(q, k, v, key_padding_mask=pad, scale=scale)
    assert rel(out, no_drop) > 0.05  # the mask changed the output


def test_packed_and_split_dropout_match_float64(device):
    """Packed segments (an empty one) draw as dense batch b over their own rows; split-K
    (forced 3 splits) drops each split's partial and gives the unsplit result."""
    p, scale = 0.25, 0.25
    lens_q, lens_k = [3, 0, 5], [23, 5, 1]
    cu = lambda lens: torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()],  # noqa: E731
                                   dtype=torch.int32, device=device)  # fmt: skip
    q = rand(sum(lens_q), 2, 16, device=device)
    k, v = (rand(sum(lens_k), 2, 16, device=device) for _ in "kv")
    seed = seed_tensor(31337, device)
    leaves = [leaf(t) for t in (q, k, v)]
    out = A.cross_attention(*leaves, cu_seqlens_q=cu(lens_q), cu_seqlens_k=cu(lens_k),
                            scale=scale, dropout_p=p, dropout_seed=seed)  # fmt: skip
    keep = A.dropout_mask(seed, (3, 2, 5, 23), p)
    g = torch.randn(out.shape, dtype=torch.float64, device=device)
    got = grads_of(out, leaves, g)
    qa = ka = 0
    for b, (nq, nk) in enumerate(zip(lens_q, lens_k, strict=True)):
        seg = [leaf(t.double()[a : a + n].transpose(0, 1)[None])
               for t, a, n in ((q, qa, nq), (k, ka, nk), (v, ka, nk))]  # fmt: skip
        if nq:
            ref = ref_dropout(*seg, torch.ones(1, 1, 1, nk, dtype=torch.bool, device=device),
                              keep[b : b + 1, :, :nq, :nk], p, scale)  # fmt: skip
            assert rel(out[qa : qa + nq].transpose(0, 1)[None], ref) < 1e-5
            gs = g[qa : qa + nq].transpose(0, 1)[None]
            want = torch.autograd.grad((ref * gs).sum(), seg)
            for whole, a, n, w in zip(got, (qa, ka, ka), (nq, nk, nk), want, strict=True):
                err = (whole[a : a + n].transpose(0, 1)[None].double() - w).abs().max()
                assert err < 1e-5 * whole.abs().max()  # one key: dq = 0 up to rounding
        qa, ka = qa + nq, ka + nk
    dense_q, dense_k, dense_v = (rand(1, 1, n, 16, device=device) for n in (5, 90, 90))
    args = (None, None, 5, 90, None, None, None, False, scale)
    with use_backend("triton"):
        split, _ = ops.attention_core(dense_q, dense_k, dense_v, *args, 3, None, None, p, seed)
        one, _ = ops.attention_core(dense_q, dense_k, dense_v, *args, 1, None, None, p, seed)
    ref = ref_dropout(dense_q, dense_k, dense_v, torch.ones(1, 1, 1, 90, dtype=torch.bool),
                      A.dropout_mask(seed, (1, 1, 5, 90), p), p, scale)  # fmt: skip
    assert rel(split, ref) < 1e-5 and rel(one, ref) < 1e-5


def test_seeded_by_the_torch_generator(device):
    """One draw per call from the device's generator: torch.manual_seed reproduces the
    output bitwise, the next call differs; dropout_p = 0 is bitwise the call without
    dropout and draws nothing."""
    q = rand(1, 1, 5, 16, device=device)
    k, v = (rand(1, 1, 20, 16, device=device) for _ in "kv")
    torch.manual_seed(11)
    first = A.cross_attention(q, k, v, dropout_p=0.2)
    second = A.cross_attention(q, k, v, dropout_p=0.2)
    torch.manual_seed(11)
    assert torch.equal(A.cross_attention(q, k, v, dropout_p=0.2), first)
    assert not torch.equal(first, second)
    torch.manual_seed(11)
    seed = A.draw_dropout_seed(device)
    assert torch.equal(A.cross_attention(q, k, v, dropout_p=0.2, dropout_seed=seed), first)
    torch.manual_seed(12)
    zero = A.cross_attention(q, k, v, dropout_p=0.0)
    after = torch.rand(3)
    torch.manual_seed(12)
    assert torch.equal(zero, A.cross_attention(q, k, v)) and torch.equal(after, torch.rand(3))


def test_backward_regenerates_the_forward_mask(device):
    """Directional derivative of the fp32 kernels' loss (central differences, one fixed
    seed) against their backward; gradcheck of the float64 torch path with its mask."""
    seed = seed_tensor(424242, device)
    q = rand(1, 2, 5, 16, device=device)
    k, v = (rand(1, 2, 19, 16, device=device) for _ in "kv")
    w = rand(1, 2, 5, 16, device=device)

    def loss(q, k, v):
        out = A.cross_attention(q, k, v, dropout_p=0.4, dropout_seed=seed)
        return (out.double() * w.double()).sum()

    leaves = [leaf(t) for t in (q, k, v)]
    grads = torch.autograd.grad(loss(*leaves), leaves)
    dirs = [rand(*t.shape, device=device) for t in leaves]
    h = 1e-2
    plus = loss(*(t + h * d for t, d in zip(leaves, dirs, strict=True))).item()
    minus = loss(*(t - h * d for t, d in zip(leaves, dirs, strict=True))).item()
    numeric = (plus - minus) / (2 * h)
    analytic = sum((g.double() * d.double()).sum().item() for g, d in zip(grads, dirs, strict=True))
    assert abs(numeric - analytic) < 1e-3 * max(abs(analytic), 1.0)

    def f64(q, k, v):
        return A.cross_attention(q, k, v, dropout_p=0.4, dropout_seed=seed)

    small = [leaf(rand(1, 1, n, 8, device=device).double()) for n in (3, 9, 9)]
    assert torch.autograd.gradcheck(f64, small)


def test_bad_dropout_arguments_are_named(device):
    q = rand(1, 2, 3, 16, device=device)
    k = rand(1, 2, 5, 16, device=device)
    for p in (1.0, -0.1, float("nan"), True, "0.1"):
        with pytest.raises(ValueError, match="cross_attention: dropout_p must be a float in"):
            A.cross_attention(q, k, k, dropout_p=p)
    loc = torch.ones(1, 3, dtype=torch.bool, device=device)
    with pytest.raises(ValueError, match="media_cross_attention: dropout_p"):
        A.media_cross_attention(q, k, k, loc, 5, dropout_p=1.5)
    for seed in (torch.tensor([1], dtype=torch.int32), torch.zeros(2, dtype=torch.int64), 3):
        with pytest.raises(TypeError, match="dropout_seed must be a one-element int64 tensor"):
            A.cross_attention(q, k, k, dropout_p=0.1, dropout_seed=seed)
    args = (None, None, 3, 5, None, None, None, False, 0.25, 0, None, None, 0.1, None)
    with pytest.raises(ValueError, match="dropout_p = 0.1 needs a dropout_seed"):
        ops.attention_core(q, k, k, *args)
    # an argument error raised after the seed draw would shift every later random number
    state = torch.random.get_rng_state()
    with pytest.raises(TypeError, match="scale must be a finite float"):
        A.media_cross_attention(q, k, k, loc, 5, dropout_p=0.1, scale=float("nan"))
    bad_cu = torch.tensor([0, 2], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        A.cross_attention(q[0, :, :3].transpose(0, 1), k[0].transpose(0, 1),
                          k[0].transpose(0, 1), cu_seqlens_q=bad_cu,
                          cu_seqlens_k=torch.tensor([0, 5], dtype=torch.int32, device=device),
                          dropout_p=0.1)  # fmt: skip
    assert torch.equal(torch.random.get_rng_state(), state)


def test_opcheck_and_compile_with_dropout(device):
    """opcheck of the core with dropout (its registration: schema, fake, autograd) and the
    torch path's output (the same mask), and torch.compile(fullgraph=True) of
    cross_attention drawing its seed inside the graph, reproducible under manual_seed."""
    q = leaf(rand(1, 2, 5, 16, device=device))
    k, v = (leaf(rand(1, 2, 9, 16, device=device)) for _ in "kv")
    seed = seed_tensor(99, device)
    core = torch.ops.vlmkernels.attention_core
    args = (q, k, v, None, None, 5, 9, None, None, None, False, 0.3, 0, None, None, 0.5, seed)
    with use_backend("triton"):
        torch.library.opcheck(core, args)
        out = core(*args)[0]
    with use_backend("torch"):
        assert rel(out, core(*args)[0]) < 1e-5

    def f(q, k, v):
        return A.cross_attention(q, k, v, dropout_p=0.3).square().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    leaves = [leaf(t) for t in (q, k, v)]
    torch.manual_seed(5)
    got = compiled(*leaves)
    got.backward()
    torch.manual_seed(5)
    want = f(q, k, v)
    want.backward()
    assert rel(got, want) < 1e-6
    for a, b in zip(leaves, (q, k, v), strict=True):
        assert rel(a.grad, b.grad) < 1e-6


def test_mask_helper_on_every_backend_and_bad_input(device):
    """dropout_mask on the PyTorch path (a CPU without Triton's interpreter takes it) is the
    kernel's mask; its arguments are checked before anything runs."""
    seed = seed_tensor(99, device)
    default = A.dropout_mask(seed, (2, 3, 5, 9), 0.3)
    with use_backend("torch"):
        assert torch.equal(A.dropout_mask(seed, (2, 3, 5, 9), 0.3), default)
    assert A.dropout_mask(seed, (2, 0, 5, 9), 0.3).shape == (2, 0, 5, 9)
    with pytest.raises(TypeError, match="seed must be a one-element int64 tensor"):
        A.dropout_mask(seed.int(), (2, 3, 5, 9), 0.3)
    with pytest.raises(ValueError, match="shape must be four ints"):
        A.dropout_mask(seed, (2, 3, 5), 0.3)
    with pytest.raises(ValueError, match="dropout_p must be a float in"):
        A.dropout_mask(seed, (2, 3, 5, 9), 1.0)


def test_dropout_mask_beside_other_threads_kernels(device):
    """dropout_mask's kernel takes the interpreter's launch lock like every other launch:
    beside another thread's kernels it neither fails nor disturbs them (the interpreter
    runs one kernel at a time)."""
    import threading

    seed = torch.tensor([1234], device=device)
    want_mask = A.dropout_mask(seed, (1, 2, 40, 70), 0.3)
    x, y = torch.randn(24, 16, device=device), torch.randn(24, 16, device=device)
    want_loss = vlmkernels.clip_loss(x, y, 10.0)
    failures = []

    def repeat(call, want):
        try:
            for _ in range(3):
                assert torch.equal(call(), want)
        except Exception as exc:  # reported below, with the thread's call
            failures.append(repr(exc))

    calls = [(lambda: A.dropout_mask(seed, (1, 2, 40, 70), 0.3), want_mask),
             (lambda: vlmkernels.clip_loss(x, y, 10.0), want_loss)] * 2  # fmt: skip
    threads = [threading.Thread(target=repeat, args=call) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures


def test_compiled_bad_dropout_p_raises_the_eager_error():
    """Under torch.compile(fullgraph=True), after the calls that make dropout_p a symbolic
    float, a value out of range raises cross_attention's error (as the cause of Dynamo's):
    with ``repr`` Dynamo raised "tp_repr_impl not implemented" on Python 3.13 instead, and
    with a plain f-string "BUILD_STRING type error" on torch 2.13."""
    q, k = rand(1, 2, 3, 8, device="cpu"), rand(1, 2, 5, 8, device="cpu")
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, p: A.cross_attention(q, k, k, dropout_p=p),
                             backend="eager", fullgraph=True)  # fmt: skip
    with vlmkernels.use_backend("torch"):
        for p in (0.1, 0.2, 0.3):
            compiled(q, k, p)
        with pytest.raises(Exception) as info:
            compiled(q, k, 1.5)
    errors = [info.value, info.value.__cause__]
    assert any("dropout_p must be a float in [0, 1), got 1.5" in str(e) for e in errors), errors

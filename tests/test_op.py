"""The op definition (``vlmkernels.core.op.Op``): the eager path (an ``autograd.Function``
called through its C++ ``apply``) and the dispatcher path give the same values and
gradients; tensors left over from an exited functorch transform take ``Function.apply``'s
full path; the backend variable is read on every call; traced graphs carry the revision
that keeps compile caches from replaying another vlmkernels' backward."""

from __future__ import annotations

import os

import pytest
import torch
from torch.autograd import forward_ad
from torch.utils.flop_counter import FlopCounterMode

from vlmkernels.core import op
from vlmkernels.core.op import Op
from vlmkernels.core.runtime import environment_reader

scale_rows = Op("test_scale_rows", "(Tensor x, Tensor w, float alpha) -> Tensor", family="test")
CALLS = []  # which implementation ran, per call


@scale_rows.fake
def _(x, w, alpha):
    return torch.empty_like(x)


@scale_rows.impl("torch")
def _(x, w, alpha):
    CALLS.append("torch")
    return x * w[:, None] * alpha


@scale_rows.autograd
class _:
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])
        ctx.alpha = inputs[2]

    def backward(ctx, grad):
        (w,) = ctx.saved_tensors
        return scale_rows(grad, w, ctx.alpha), None, None


add_ = Op("test_add_", "(Tensor(a!) x, Tensor? y, Tensor(b!)? z) -> ()", family="test",
          mutates=("x", "z"))  # fmt: skip


@add_.impl("torch")
def _(x, y, z):
    # through a raw pointer, as a Triton kernel writes: no version counter bumped here
    x.data.add_(1)
    if z is not None:
        z.data.add_(1)


def _inputs():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, generator=gen, dtype=torch.float64)
    return x, w


def test_eager_and_dispatcher_paths_agree():
    x, w = _inputs()
    up = torch.randn(5, 7, dtype=torch.float64)
    eager = scale_rows(x, w, 1.5)
    assert type(eager.grad_fn).__name__ == "test_scale_rows_functionBackward"  # eager path
    (g_eager,) = torch.autograd.grad(eager, x, up)
    with FlopCounterMode(display=False):  # a function mode: the dispatcher path
        dispatched = scale_rows(x, w, 1.5)
    assert "test_scale_rows" in type(dispatched.grad_fn).__name__
    assert type(dispatched.grad_fn).__name__ != type(eager.grad_fn).__name__
    (g_dispatched,) = torch.autograd.grad(dispatched, x, up)
    expected = x.detach() * w[:, None] * 1.5
    torch.testing.assert_close(eager, expected, rtol=0, atol=0)
    torch.testing.assert_close(dispatched, expected, rtol=0, atol=0)
    torch.testing.assert_close(g_eager, up * w[:, None] * 1.5, rtol=0, atol=0)
    torch.testing.assert_close(g_dispatched, g_eager, rtol=0, atol=0)


def test_no_grad_call_builds_no_graph():
    x, w = _inputs()
    CALLS.clear()
    with torch.no_grad():
        out = scale_rows(x, w, 2.0)
    assert out.grad_fn is None and not out.requires_grad and CALLS == ["torch"]


def test_tensor_left_over_from_a_functorch_transform():
    """A tensor kept from inside ``torch.func.grad`` (a dead wrapper): ``Function.apply``
    unwraps it, so the eager path hands such calls to it rather than to the C++ apply."""
    x, w = _inputs()
    kept = []
    torch.func.grad(lambda a: (kept.append(a) or a).sum())(x)
    assert torch._C._functorch.is_functorch_wrapped_tensor(kept[0])
    out = scale_rows(kept[0], w, 2.0)
    torch.testing.assert_close(out, x.detach() * w[:, None] * 2.0, rtol=0, atol=0)
    out.sum().backward()
    torch.testing.assert_close(x.grad, (w[:, None] * 2.0).expand(5, 7), rtol=0, atol=0)


def test_second_order_through_the_eager_path():
    """The op's backward calls the op again; create_graph=True differentiates that call."""
    x, w = _inputs()
    y = scale_rows(x, w, 3.0)
    (gx,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)  # 18 w^2 x
    assert type(gx.grad_fn).__name__ == "test_scale_rows_functionBackward"
    (gxx,) = torch.autograd.grad(gx.sum(), x)
    torch.testing.assert_close(gxx, (18 * w[:, None] ** 2).expand(5, 7))


@pytest.mark.parametrize("name", ["VLMKERNELS_TEST_READER", "VLMKERNELS_TEST_READER_ÄÖ"])
def test_environment_reader_follows_the_environment(monkeypatch, name):
    read = environment_reader(name)
    monkeypatch.delenv(name, raising=False)
    assert read() is None
    monkeypatch.setenv(name, "torch")
    assert read() == "torch"
    os.environ[name] = "triton "
    assert read() == "triton "
    monkeypatch.delenv(name)
    assert read() is None


def test_functorch_transforms_raise_or_are_right():
    """Under ``torch.func.grad`` an op goes through the dispatcher, where PyTorch raises
    for custom ops with a registered autograd formula (pytorch/pytorch#168393, as the
    README says), re-raised naming the op; should a PyTorch release support it, the
    gradient must be right. ``vmap`` runs through torch's per-sample fallback."""
    x, w = _inputs()
    x = x.detach()
    try:
        g = torch.func.grad(lambda a: scale_rows(a, w, 2.0).sum())(x)
    except NotImplementedError as exc:
        assert "test_scale_rows: torch.func.grad, vjp and jacrev are not" in str(exc)
    else:
        torch.testing.assert_close(g, (w[:, None] * 2.0).expand(5, 7))
    out = torch.func.vmap(lambda a: scale_rows(a, w, 2.0))(torch.stack((x, -x)))
    torch.testing.assert_close(out, torch.stack((x, -x)) * w[:, None] * 2.0)


def test_forward_mode_and_batched_gradients_raise():
    """No forward-mode formula: ``torch.func.jvp`` (alone or under vmap) and dual tensors of
    ``torch.autograd.forward_ad`` raise naming the op instead of giving a 0 or missing
    tangent, as a custom op would; batched upstream gradients raise before any kernel.
    Dual-level code without dual inputs and one-at-a-time Jacobians still work."""
    x, w = _inputs()
    x = x.detach()
    f = lambda a: scale_rows(a, w, 2.0)  # noqa: E731
    message = "test_scale_rows: forward-mode AD"
    with pytest.raises(NotImplementedError, match=message):
        torch.func.jvp(f, (x,), (torch.ones_like(x),))
    with pytest.raises(NotImplementedError, match=message):
        torch.func.vmap(lambda a: torch.func.jvp(f, (a,), (a,))[1])(torch.stack((x, x)))
    with forward_ad.dual_level():
        with pytest.raises(NotImplementedError, match=message):
            f(forward_ad.make_dual(x, torch.ones_like(x)))
        torch.testing.assert_close(f(x), x * w[:, None] * 2.0)
    with pytest.raises(RuntimeError, match="test_scale_rows: torch.jit.trace is not supported"):
        torch.jit.trace(f, (x,), check_trace=False)
    small = lambda a: scale_rows(a, w[:2], 2.0)  # noqa: E731
    with pytest.raises(NotImplementedError, match="test_scale_rows: batched gradients"):
        torch.autograd.functional.jacobian(small, x[:2, :3], vectorize=True)
    jac = torch.autograd.functional.jacobian(small, x[:2, :3])  # one row at a time
    torch.testing.assert_close(jac.sum((2, 3)), w[:2, None].expand(2, 3) * 2.0)


class _PassThroughFunctionMode(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", ["profiler", "flop_counter", "function_mode"])
def test_forward_mode_raises_on_the_dispatcher_path(mode):
    """Under torch.profiler, a TorchDispatchMode (FlopCounterMode) or a TorchFunctionMode
    an op goes through the dispatcher, where a custom op's tangent is missing (dual
    tensors) or 0 (torch.func.jvp): forward-mode AD raised only on the eager path and
    came out silently wrong under these modes."""
    x, w = _inputs()
    x = x.detach()
    f = lambda a: scale_rows(a, w, 2.0)  # noqa: E731
    modes = {"profiler": torch.profiler.profile, "flop_counter": lambda: FlopCounterMode(
        display=False), "function_mode": _PassThroughFunctionMode}  # fmt: skip
    message = "test_scale_rows: forward-mode AD"
    with modes[mode]():
        with pytest.raises(NotImplementedError, match=message):
            torch.func.jvp(f, (x,), (torch.ones_like(x),))
        with forward_ad.dual_level():
            with pytest.raises(NotImplementedError, match=message):
                f(forward_ad.make_dual(x, torch.ones_like(x)))
            torch.testing.assert_close(f(x), x * w[:, None] * 2.0)


def test_traced_graph_holds_the_revision():
    """Compile caches key on the traced graph, which does not see an op's backward or fake
    (pytorch/pytorch#144344): the graph holds vlmkernels' source fingerprint instead, so a
    changed vlmkernels misses the cache. Calls without the revision still work."""
    x, w = _inputs()
    codes = []

    def backend(gm, example_inputs):
        codes.append(gm.code)
        return gm

    compiled = torch.compile(lambda x, w: scale_rows(x, w, 2.0), backend=backend, fullgraph=True)
    out = compiled(x, w)
    assert f"2.0, {op.REVISION})" in codes[0]
    (grad,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(grad, (w[:, None] * 2.0).expand(5, 7), rtol=0, atol=0)
    direct = torch.ops.vlmkernels.test_scale_rows(x, w, 2.0)  # revision left out: 0
    (grad_direct,) = torch.autograd.grad(direct.sum(), x)
    torch.testing.assert_close(direct, out, rtol=0, atol=0)
    torch.testing.assert_close(grad_direct, grad, rtol=0, atol=0)
    torch.library.opcheck(torch.ops.vlmkernels.test_scale_rows.default, (x, w, 2.0))
    torch.library.opcheck(torch.ops.vlmkernels.test_scale_rows.default, (x, w, 2.0, 7))


def test_tracing_reads_is_compilings_flag_directly():
    """``runtime.tracing`` reads the flag ``torch.compiler.is_compiling()`` returns (host
    time: that function is two Python calls), on the PyTorch versions where that is what it
    returns, and answers as ``is_compiling() and traced_here()`` would: False eager, True
    while this thread's compile traces. A PyTorch that changes is_compiling gets the plain
    call (the test then fails here, to be looked at)."""
    from vlmkernels.core import runtime

    assert runtime.tracing is runtime._flag_tracing
    seen = []

    def probe(x):
        seen.append((runtime.tracing(), runtime._tracing(), torch.compiler.is_compiling()))
        return x + 1

    torch.compile(probe, backend="eager", fullgraph=False)(torch.ones(2))
    probe(torch.ones(2))
    assert seen[0] == (True, True, True) and seen[-1] == (False, False, False)


def test_revision_follows_the_version(monkeypatch):
    before = op._fingerprint()
    assert before == op.REVISION and 0 < before < 2**48
    monkeypatch.setattr(op, "__version__", op.__version__ + ".post1")
    assert op._fingerprint() != before


def test_schema_arguments_with_alias_annotations():
    schema = "(Tensor(a!) q, Tensor(b!) k, Tensor cos, int n, Tensor[] parts) -> ()"
    assert op._argument_list(schema)[:2] == ["Tensor(a!) q", "Tensor(b!) k"]
    assert op._tensor_positions(schema) == (0, 1, 2)
    assert op._revised(schema).endswith("Tensor[] parts, int revision=0) -> ()")
    assert op._revised("() -> Tensor") == "(int revision=0) -> Tensor"


def test_mutated_arguments_get_new_versions():
    """An op that writes its arguments through raw pointers: the eager path bumps their
    version counters as the dispatcher does, so a tensor autograd saved before the write
    is refused in backward instead of giving a silently wrong gradient."""
    x, y, z = (torch.zeros(3, dtype=torch.float64) for _ in "xyz")  # float64: the torch backend
    versions = x._version, y._version, z._version
    add_(x, y, z)
    assert (x._version, y._version, z._version) == (versions[0] + 1, versions[1], versions[2] + 1)
    add_(x, None, None)  # absent optional arguments are skipped
    assert x._version == versions[0] + 2
    with FlopCounterMode(display=False):  # the dispatcher path agrees
        add_(x, y, z)
    assert x._version > versions[0] + 2 and y._version == versions[1]
    w = torch.ones(3, dtype=torch.float64, requires_grad=True)
    saved = (w * x).sum()  # autograd saves x
    add_(x, None, None)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.backward()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_gets_a_free_interpreter_lock():
    """A fork (a DataLoader worker) while another thread holds the interpreter's launch
    lock: the child has a lock of its own to take, not one held by a thread it lacks, and
    launches prepared before the fork (cached per layout) take that one too."""
    import signal
    import threading

    import vlmkernels
    from vlmkernels.core import runtime

    a, b = torch.randn(40, 16), torch.randn(40, 16)
    want = vlmkernels.clip_loss(a, b, 10.0)  # prepares and caches its launches
    held, release = threading.Event(), threading.Event()

    def hold():
        with runtime.INTERPRETER_LOCK:
            held.set()
            release.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    held.wait(10)
    try:
        pid = os.fork()
        if pid == 0:  # the child: exit 0 only if the lock is free and the loss runs
            ok = False
            try:
                signal.alarm(30)  # a hang ends the child
                if runtime.INTERPRETER_LOCK.acquire(timeout=5):
                    runtime.INTERPRETER_LOCK.release()
                    ok = torch.equal(vlmkernels.clip_loss(a, b, 10.0), want)
            finally:
                os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
    finally:
        release.set()
        thread.join()
    assert os.waitstatus_to_exitcode(status) == 0


def test_ops_compute_in_their_dtypes_under_autocast():
    """Under the caller's autocast an op computes in the dtypes it is given (the public
    functions apply autocast's casts themselves): the PyTorch path's products do not drop
    to bf16 behind its back. bf16 attention (which, like SDPA, casts fp32 inputs to the
    autocast dtype and accumulates in fp32), fp32 ToMe, fp16 SigLIP gradients: the same
    results with and without autocast."""
    import vlmkernels

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 16, dtype=torch.bfloat16) for n in (5, 9, 9))
    x, metric = torch.randn(2, 20, 8), torch.randn(2, 20, 8)
    f, g = (torch.randn(16, 32).half().requires_grad_() for _ in "fg")

    def run():
        out = vlmkernels.cross_attention(q, k, v)
        merged = vlmkernels.tome_merge(x, metric, 6)[0]
        (dx,) = torch.autograd.grad(vlmkernels.siglip_loss(f, g, 10.0, -10.0), f)
        return out, merged, dx

    with vlmkernels.use_backend("torch"):
        plain = run()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cast = run()
    for a, b in zip(plain, cast, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("path", ["eager", "profiler"])
def test_lazily_negated_upstream_gradient(path):
    """A gradient with the negative bit (``z.conj().imag``, or ``torch._neg_view``, given as
    ``grad_outputs``) stores its values unnegated: the Triton kernels, reading it through
    its pointer, gave the gradient of -g (pixel_shuffle, rope, pool_tokens, cross_attention's
    out and lse, ...) on the eager path; the dispatcher's (under the profiler) resolved it
    already and must go on doing so."""
    import contextlib

    import vlmkernels

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 3, generator=g, requires_grad=True)
    q, k, v = (torch.randn(1, 2, 3, 4, generator=g, requires_grad=True) for _ in range(3))
    ctx = torch.profiler.profile() if path == "profiler" else contextlib.nullcontext()
    with vlmkernels.use_backend("triton"), ctx:
        out = vlmkernels.pixel_shuffle(x, 2)
        w = torch.randn(out.shape, generator=g)
        negated = torch.complex(torch.zeros_like(w), -w).conj().imag  # values w, is_neg()
        assert negated.is_neg() and torch.equal(negated, w)
        (got,) = torch.autograd.grad(out, x, negated)
        (want,) = torch.autograd.grad(vlmkernels.pixel_shuffle(x, 2), x, w)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        o, lse = vlmkernels.cross_attention(q, k, v, return_lse=True)
        wo, wl = torch.randn(o.shape, generator=g), torch.randn(lse.shape, generator=g)
        got = torch.autograd.grad((o, lse), (q, k, v), (torch._neg_view(-wo), torch._neg_view(-wl)))
        o, lse = vlmkernels.cross_attention(q, k, v, return_lse=True)
        want = torch.autograd.grad((o, lse), (q, k, v), (wo, wl))
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_lazily_negated_input():
    """An input with the negative bit (``z.conj().imag`` of a complex ``z``) stores its
    values unnegated: the Triton kernels read -x for x (pixel_shuffle, rope, cross_attention,
    and the gradients through them). One the op writes in place is refused."""
    import vlmkernels

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 3, generator=g)
    q, cos, sin = torch.randn(1, 2, 3, 4, generator=g), torch.randn(1, 3, 4), torch.randn(1, 3, 4)
    negated = lambda t: torch.complex(torch.zeros_like(t), -t).conj().imag  # noqa: E731
    assert negated(x).is_neg() and torch.equal(negated(x), x)
    with vlmkernels.use_backend("triton"):
        want = vlmkernels.pixel_shuffle(x, 2)
        torch.testing.assert_close(vlmkernels.pixel_shuffle(negated(x), 2), want, rtol=0, atol=0)
        want = vlmkernels.rope(q, q, cos, sin)
        got = vlmkernels.rope(negated(q), q, cos, sin)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        want = vlmkernels.cross_attention(q, q, q)
        got = vlmkernels.cross_attention(negated(q), q, q)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        leaf = x.clone().requires_grad_()
        (got,) = torch.autograd.grad(vlmkernels.pixel_shuffle(negated(leaf), 2).pow(2).sum(), leaf)
        torch.testing.assert_close(got, 2 * leaf.detach(), rtol=0, atol=0)
        with pytest.raises(ValueError, match="lazily negated view"):
            vlmkernels.rope(negated(q), q.clone(), cos, sin, inplace=True)

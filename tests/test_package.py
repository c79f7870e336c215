"""Package-level behaviour: backend selection, and no global side effects on import."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import vlmkernels
from vlmkernels.core import cuda
from vlmkernels.core.backend import resolve_backend
from vlmkernels.core.runtime import INTERPRETED


def test_default_backend_follows_device_and_interpreter():
    cpu = torch.zeros(2)
    assert resolve_backend("op", cpu) == ("triton" if INTERPRETED else "torch")
    assert resolve_backend("op", cpu.double()) == "torch"
    if torch.cuda.is_available():
        assert resolve_backend("op", cpu.cuda()) == "triton"


def test_amd_gpus_run_the_pytorch_reference(monkeypatch):
    """A ROCm build of torch shows AMD GPUs as "cuda" devices, where the Triton kernels do
    not compile (inline PTX, 3xTF32 dots): unforced, the ops take the PyTorch reference,
    with one DeviceFallbackWarning per process; the 'triton' backend forced there is
    refused by name. NVIDIA "cuda" tensors are unaffected."""
    import types
    import warnings

    from vlmkernels.core import backend

    gpu = types.SimpleNamespace(dtype=torch.bfloat16, is_cuda=True, is_cpu=False,
                                device=torch.device("cuda", 0))  # fmt: skip
    monkeypatch.setattr(backend, "cuda_default", lambda op, device: "triton")
    assert resolve_backend("rope", gpu) == "triton"  # NVIDIA
    monkeypatch.setattr(backend, "ROCM", True)
    monkeypatch.setattr(backend, "_ROCM_WARNED", [False])
    with pytest.warns(backend.DeviceFallbackWarning, match="written for NVIDIA GPUs"):
        assert resolve_backend("rope", gpu) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        assert resolve_backend("clip_loss", gpu) == "torch"
        with vlmkernels.use_backend("torch"):
            assert resolve_backend("rope", gpu) == "torch"
        assert resolve_backend("rope", torch.zeros(2)) == ("triton" if INTERPRETED else "torch")
    with vlmkernels.use_backend("triton"):
        with pytest.raises(
            RuntimeError,
            match="rope: the 'triton' backend does not run here: "
            "vlmkernels' Triton kernels are written for NVIDIA GPUs",
        ):
            resolve_backend("rope", gpu)


def test_amd_fallback_warning_points_at_the_callers_line(monkeypatch):
    """Said from an op call, the DeviceFallbackWarning names the caller's line, not the
    op dispatcher's inside vlmkernels (its fixed stacklevel stopped there)."""
    from vlmkernels.core import backend

    monkeypatch.setattr(backend, "ROCM", True)
    monkeypatch.setattr(backend, "_ROCM_WARNED", [False])
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))  # a ROCm "cuda"
    x = torch.randn(4, 8)
    with pytest.warns(backend.DeviceFallbackWarning) as record:
        vlmkernels.clip_loss(x, x, 10.0)
    assert [w.filename for w in record] == [__file__]


def test_context_manager_forces_and_restores():
    t = torch.zeros(2)
    assert vlmkernels.get_backend() is None
    with vlmkernels.use_backend("torch"):
        assert vlmkernels.get_backend() == "torch"
        assert resolve_backend("op", t) == "torch"
    assert vlmkernels.get_backend() is None


def test_env_variable_forces_backend(monkeypatch):
    monkeypatch.setenv("VLMKERNELS_BACKEND", "torch")
    assert resolve_backend("op", torch.zeros(2)) == "torch"
    with vlmkernels.use_backend("triton" if INTERPRETED else "torch"):  # the manager wins
        assert vlmkernels.get_backend() == ("triton" if INTERPRETED else "torch")
    monkeypatch.setenv("VLMKERNELS_BACKEND", "fast")
    with pytest.raises(ValueError, match="VLMKERNELS_BACKEND must be one of"):
        resolve_backend("op", torch.zeros(2))


def test_bad_backend_names_and_unavailable_backends():
    with pytest.raises(ValueError, match="backend must be one of"):
        with vlmkernels.use_backend("cudnn"):
            pass
    x = torch.randn(4, 8)
    # where the extension is built (a CUDA torch with nvcc), it refuses the op instead
    refusal = (
        "has no CUDA C\\+\\+ implementation"
        if cuda.status()[0]
        else "'cuda' backend is unavailable"
    )
    with vlmkernels.use_backend("cuda"):
        with pytest.raises(RuntimeError, match=refusal):
            vlmkernels.clip_loss(x, x, 1.0)
    with vlmkernels.use_backend("triton"):
        with pytest.raises(TypeError, match="float64"):
            vlmkernels.clip_loss(x.double(), x.double(), 1.0)


@pytest.mark.skipif(INTERPRETED, reason="the interpreter lets Triton run CPU tensors")
def test_triton_on_cpu_without_interpreter_is_refused():
    with vlmkernels.use_backend("triton"):
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            vlmkernels.clip_loss(torch.randn(4, 8), torch.randn(4, 8), 1.0)


def test_import_changes_nothing_global():
    """Every public attribute of torch, torch.nn, torch.nn.functional and torch.Tensor is
    the same object before and after ``import vlmkernels`` (and open_clip's loss module
    is untouched), in a fresh interpreter."""
    script = textwrap.dedent(
        """
        import torch, torch.nn, torch.nn.functional
        mods = {"torch": torch, "nn": torch.nn, "F": torch.nn.functional,
                "Tensor": torch.Tensor, "autograd": torch.autograd}
        def snap():
            return {(m, k): id(getattr(o, k)) for m, o in mods.items() for k in dir(o)
                    if not k.startswith("__")}
        before = snap()
        import vlmkernels, vlmkernels.nn
        after = snap()
        changed = sorted(k for k in before if before[k] != after.get(k))
        added = sorted(k for k in after if k not in before)
        print(changed, added)
        assert not changed and not added, (changed, added)
        assert "open_clip" not in __import__("sys").modules
        assert "transformers" not in __import__("sys").modules
        """
    )
    env = dict(os.environ)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _rope_call(fn_name):
    def call(q, k):
        if fn_name == "mrope":
            d = q.shape[-1]
            angle = torch.randn(3, 1, q.shape[2], d)
            return vlmkernels.mrope(q, k, angle.cos(), angle.sin(), [2, 3, 3])
        positions = torch.randint(0, 9, (3, 1, q.shape[2]))
        inv_freq = torch.rand(q.shape[-1] // 2)
        return vlmkernels.mrope_from_positions(q, k, positions, inv_freq, [2, 3, 3])

    return call


@pytest.mark.skipif(not INTERPRETED, reason="needs two usable backends on CPU tensors")
@pytest.mark.parametrize("op", ["clip_loss", "siglip_loss", "mrope", "mrope_from_positions"])
def test_backward_follows_the_forced_backend_on_another_thread(op, monkeypatch):
    """A forward run under use_backend("torch") back-propagates on the torch path too, even
    when autograd runs the backward on another thread (as it does for CUDA tensors), where
    the use_backend context is not set."""
    import threading

    from vlmkernels.core import op as op_definition
    from vlmkernels.ops.contrastive import ops as contrastive_ops

    seen = []
    for module in (op_definition, contrastive_ops):  # where the ops choose their backend
        original = module.resolve_backend

        def recording(name, tensor, _original=original):
            seen.append(_original(name, tensor))
            return seen[-1]

        monkeypatch.setattr(module, "resolve_backend", recording)

    if op in ("clip_loss", "siglip_loss"):
        x, y = torch.randn(6, 8, requires_grad=True), torch.randn(6, 8, requires_grad=True)
        inputs = (x, y)
        bias = (-1.0,) if op == "siglip_loss" else ()
        with vlmkernels.use_backend("torch"):
            # per-row losses: a scalar SigLIP loss would compute its gradients in the forward
            out = getattr(vlmkernels, op)(x, y, 2.0, *bias, reduction="none").sum()
    else:
        q = torch.randn(1, 2, 5, 16, requires_grad=True)
        k = torch.randn(1, 1, 5, 16, requires_grad=True)
        inputs = (q, k)
        with vlmkernels.use_backend("torch"):
            out = sum(t.sum() for t in _rope_call(op)(q, k))
    assert seen and set(seen) == {"torch"}
    seen.clear()
    assert vlmkernels.get_backend() is None and resolve_backend(op, inputs[0]) == "triton"
    seen.clear()
    errors = []

    def backward():
        try:
            out.backward()
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    worker = threading.Thread(target=backward)
    worker.start()
    worker.join()
    assert not errors, errors
    assert seen and set(seen) == {"torch"}, seen
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in inputs)


def test_backward_inside_another_backend_block_runs_the_forwards():
    """A float64 forward (the torch path, nothing forced) whose backward runs inside
    use_backend("triton"), which refuses float64: the backward keeps the forward's choice
    instead of raising (a forced forward's backward outside the block: the test above)."""
    x = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    y = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    loss = vlmkernels.clip_loss(x, y, 2.0, reduction="none").sum()
    with vlmkernels.use_backend("triton"):
        loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    q = torch.randn(1, 2, 5, 16, dtype=torch.float64, requires_grad=True)
    angle = torch.randn(1, 5, 16, dtype=torch.float64)
    out = vlmkernels.rope(q, q.detach(), angle.cos(), angle.sin())[0].sum()
    with vlmkernels.use_backend("triton"):
        out.backward()
    assert q.grad is not None
    x = torch.randn(1, 16, 4, dtype=torch.float64, requires_grad=True)  # pixel_shuffle too
    out = vlmkernels.pixel_shuffle(x, 2)
    with vlmkernels.use_backend("triton"):
        out.backward(torch.ones_like(out))
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.skipif(not INTERPRETED, reason="the interpreter's thread safety")
def test_threads_calling_ops_under_the_interpreter():
    """Triton's interpreter patches triton.language while a kernel runs; launches from
    several threads are serialised, so each thread gets the single-threaded results."""
    import threading

    gen = torch.Generator().manual_seed(3)
    cases = []
    for _ in range(4):
        q, k = torch.randn(2, 4, 3, 16, generator=gen), torch.randn(2, 4, 2, 16, generator=gen)
        cos, sin = torch.randn(2, 4, 16, generator=gen), torch.randn(2, 4, 16, generator=gen)
        x, y = torch.randn(40, 16, generator=gen), torch.randn(40, 16, generator=gen)
        cases.append((q, k, cos, sin, x, y))

    def run(case):
        q, k, cos, sin, x, y = case
        return (*vlmkernels.rope(q, k, cos, sin, 2), vlmkernels.clip_loss(x, y, 10.0))

    expected = [run(case) for case in cases]
    results, errors = [None] * len(cases), []

    def work(i):
        try:
            for _ in range(2):
                results[i] = run(cases[i])
        except Exception as exc:  # reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    for got, want in zip(results, expected, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


class _CudaLike:
    """Stands in for a CUDA tensor on device ``index`` (only what device_guard reads)."""

    is_cuda = True

    def __init__(self, index):
        self.index = index
        self.device = torch.device("cuda", index)

    def get_device(self):
        return self.index


def test_device_guard_switches_only_to_another_device(monkeypatch):
    """The launch guard makes the tensor's device current only where another one is: a CPU
    tensor or one on the current device gets a no-op, which nests."""
    from vlmkernels.core import runtime

    switched = []
    monkeypatch.setattr(runtime, "_current_cuda_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda d: switched.append(d) or runtime._NO_GUARD)
    for t in (torch.ones(1), _CudaLike(0)):
        with runtime.device_guard(t), runtime.device_guard(t):
            pass
    assert switched == []
    with runtime.device_guard(_CudaLike(1)):
        pass
    assert switched == [torch.device("cuda", 1)]


@pytest.mark.parametrize(
    "hidden, env, said",
    [
        ("triton", {}, "vlmkernels needs Triton (Linux): pip install 'triton>=3.6,<3.10'"),
        ("numpy", {"TRITON_INTERPRET": "1"}, "Triton's interpreter (TRITON_INTERPRET=1) "
         "needs numpy: pip install numpy"),
    ],
)  # fmt: skip
def test_import_names_a_missing_dependency_and_its_fix(hidden, env, said):
    """Without triton (a venv from ``pip install --no-deps``), or without numpy under
    ``TRITON_INTERPRET=1`` (Triton's interpreter imports it, and neither package declares
    it), ``import vlmkernels`` says what to install: a ModuleNotFoundError naming the
    module, not a bare one raised deep inside triton."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules[{hidden!r}] = None  # as if it were not installed
        try:
            import vlmkernels
        except ModuleNotFoundError as exc:
            print(exc.name, exc, sep="\\n")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | env
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    name, message = proc.stdout.splitlines()[:2]
    assert name == hidden and message.startswith(said), proc.stdout


def test_import_leaves_sympy_unloaded():
    """``import vlmkernels`` does not load torch's symbolic-shapes module (it imports sympy:
    about 0.3 s, a fifth of the package's import on the CPU machine); the checks that
    need it under torch.compile find it loaded there."""
    script = textwrap.dedent(
        """
        import sys
        import vlmkernels, vlmkernels.nn, vlmkernels.distributed
        loaded = [m for m in ("sympy", "torch.fx.experimental.symbolic_shapes")
                  if m in sys.modules]
        assert not loaded, loaded
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr

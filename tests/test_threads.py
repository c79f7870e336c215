"""Process-global state under threads: serving stacks call the ops, patch models and read
the tuned configs from several Python threads at once. Each test makes the interleaving
that broke deterministically (events, not luck), so a failure is the race itself."""

import json
import threading

import pytest
import torch
import triton

from vlmkernels.core import configs as CF
from vlmkernels.core import tuning as T
from vlmkernels.integrations import patching

H100 = "NVIDIA H100 80GB HBM3"


class _Plain(torch.nn.Module):
    def forward(self, x):
        return x


@patching.marked
def _forward(self, x):
    return x + 1


def _patched(module):
    return patching.install(module, [patching.method_slot(module, "forward", _forward, "forward")])


def test_undo_while_another_thread_patches():
    """An undo walks the handles still active (to warn about patched copies) while another
    thread patches its own model: the set of handles must not change under the walk
    ("Set changed size during iteration" after the undo had already restored the model)."""
    inside, added = threading.Event(), threading.Event()

    class Pausing:  # an active handle whose slots the walk reads: it lets the patch in
        @property
        def _slots(self):
            inside.set()
            added.wait(0.3)  # the fixed undo holds the set: the patch waits for the walk
            return []

    pausing = Pausing()
    patching._ACTIVE.add(pausing)
    handles, errors = [], []

    def patch_another():
        inside.wait(5)
        handles.append(_patched(_Plain()))
        added.set()

    worker = threading.Thread(target=patch_another)
    worker.start()
    try:
        model = _Plain()
        handle = _patched(model)
        try:
            handle.undo()
        except RuntimeError as exc:
            errors.append(exc)
    finally:
        worker.join()
        patching._ACTIVE.discard(pausing)
        for h in handles:
            h.undo()
    assert not errors, errors
    assert "forward" not in vars(model) and not handle.active
    assert handles and not handles[0].active


# ------------------------------------------------- tuned configs and recorded choices


def test_a_choice_read_while_another_thread_records_is_not_kept(config_dirs, monkeypatch):
    """A serving thread reads backends.json while the tuner's thread records a new choice
    (and empties the caches): the value read from the old file answers that call but is
    not cached, or it would stand until the next clear_cache. Designs alike."""
    user, _ = config_dirs
    T.record_preferred_backend("rope", "triton", H100, user)
    CF.record_preferred_design("clip_backward", "chunked", H100, user)
    backend, design = CF._recorded_backend, CF._read_designs

    def read_backend(op, device):
        found = backend(op, device)  # the old file's answer, then the tuner's thread writes
        T.record_preferred_backend("rope", "cuda", H100, user)
        return found

    def read_designs(path):
        found = design(path)
        if not writing:  # (recording reads the file too)
            writing.append(True)
            CF.record_preferred_design("clip_backward", "fused", H100, user)
        return found

    writing = []

    monkeypatch.setattr(CF, "_recorded_backend", read_backend)
    monkeypatch.setattr(CF, "_read_designs", read_designs)
    assert T.preferred_backend("rope", H100) == "triton"
    assert CF.preferred_design("clip_backward", H100) == "chunked"
    monkeypatch.setattr(CF, "_recorded_backend", backend)
    monkeypatch.setattr(CF, "_read_designs", design)
    assert T.preferred_backend("rope", H100) == "cuda"
    assert CF.preferred_design("clip_backward", H100) == "fused"


def test_a_clear_just_after_a_choice_is_cached(config_dirs, monkeypatch):
    """Another thread's clear_cache between the store of a choice and its lookup: the call
    returns the choice (it raised KeyError, reading the emptied cache)."""
    user, _ = config_dirs
    T.record_preferred_backend("rope", "cuda", H100, user)
    CF.record_preferred_design("clip_backward", "fused", H100, user)

    class ClearedAfterStore(dict):
        def __setitem__(self, key, value):
            super().__setitem__(key, value)
            T.clear_cache()  # another thread's, just after the store

    monkeypatch.setattr(CF, "_BACKENDS", ClearedAfterStore())
    monkeypatch.setattr(CF, "_DESIGNS", ClearedAfterStore())
    assert T.preferred_backend("rope", H100) == "cuda"
    assert CF.preferred_design("clip_backward", H100) == "fused"


def _write_rope(root, config: triton.Config):
    kernel = T.all_kernels()["rope"]
    key = dict(HQ=28, HK=4, D=128, half=64, SOURCE=1, PAIRS=False, dtype="fp32")
    doc = {"format": 1, "kernel": kernel.name, "device": T.normalise_device_name(H100),
           "source": "tuned", "triton_version": triton.__version__,
           "source_hash": kernel.source_hash, "key": kernel.file_key,
           "configs": {kernel.bucket(kernel.key_from_mapping(key)):
                       {**config.kwargs, "num_warps": config.num_warps,
                        "num_stages": config.num_stages}}}  # fmt: skip
    path = root / T.normalise_device_name(H100) / "rope.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return key


def test_configs_loaded_while_the_tuner_writes_are_not_kept(config_dirs, monkeypatch):
    """Tuned configs read while the tuner's thread writes new ones and clears the caches:
    the next lookup reads the new file (the old configs stood until another clear)."""
    user, _ = config_dirs
    space = T.all_kernels()["rope"].space
    key = _write_rope(user, space[1])
    load = CF._load_layer

    def load_during_tuning(kernel, origin, path):
        layer = load(kernel, origin, path)
        if origin == "user":
            _write_rope(user, space[2])  # what the tuner does: write, then clear
            T.clear_cache()
        return layer

    monkeypatch.setattr(CF, "_load_layer", load_during_tuning)
    assert T.lookup("rope", key, device=H100) is space[1]
    monkeypatch.setattr(CF, "_load_layer", load)
    assert T.lookup("rope", key, device=H100) is space[2]


def test_launch_configs_and_default_backends_resolved_during_a_clear(config_dirs, monkeypatch):
    """The per-kernel config cache and the per-op default backend of CUDA tensors, filled
    from files that another thread replaced (and cleared the caches) meanwhile: not kept."""
    from vlmkernels.core import backend as B

    user, _ = config_dirs
    monkeypatch.setattr(CF, "_current_device", lambda: 0)
    monkeypatch.setattr(CF, "_raw_device_name", lambda index: H100)
    monkeypatch.setattr(B, "cuda_backend_status", lambda: (True, "built"))
    T.clear_cache()
    kernel = T.all_kernels()["rope"]
    monkeypatch.setattr(kernel, "interpreted", False)
    space = kernel.space
    key = _write_rope(user, space[1])
    T.record_preferred_backend("rope", "triton", H100, user)
    load, backend = CF._load_layer, CF._recorded_backend

    def load_during_tuning(kernel, origin, path):
        layer = load(kernel, origin, path)
        if origin == "user" and path.name == "rope.json":
            _write_rope(user, space[2])
            T.clear_cache()
        return layer

    def read_during_tuning(op, device):
        found = backend(op, device)
        T.record_preferred_backend("rope", "cuda", H100, user)
        return found

    monkeypatch.setattr(CF, "_load_layer", load_during_tuning)
    monkeypatch.setattr(CF, "_recorded_backend", read_during_tuning)
    args, kwargs = (torch.zeros(1),), {k: v for k, v in key.items() if k != "dtype"}
    cuda = torch.device("cuda", 0)
    assert kernel.config(args, kwargs) is space[1]
    assert B.cuda_default("rope", cuda) == "triton"
    monkeypatch.setattr(CF, "_load_layer", load)
    monkeypatch.setattr(CF, "_recorded_backend", backend)
    assert kernel.config(args, kwargs) is space[2]
    assert B.cuda_default("rope", cuda) == "cuda"


# -------------------------------------------- torch.compile in another thread


def test_eager_calls_while_another_thread_compiles():
    """torch.compiler.is_compiling() is process-wide in recent PyTorch: true in every
    thread while one thread compiles. An eager call in another thread must not take the
    traced path: an inference-mode positions tensor was then not copied before autograd
    saved it (RuntimeError); a mean loss was divided outside the op (equal here)."""
    import vlmkernels

    inside, release = threading.Event(), threading.Event()

    def held_backend(gm, example_inputs):
        inside.set()
        release.wait(10)
        return gm.forward

    compiled = torch.compile(lambda t: t.sin() + 1, backend=held_backend)
    with torch.inference_mode():
        positions = torch.randint(0, 5, (3, 1, 5))
    q = torch.randn(1, 2, 5, 16, requires_grad=True)
    k = torch.randn(1, 1, 5, 16, requires_grad=True)
    inv_freq, x, y = torch.rand(4), torch.randn(6, 8), torch.randn(6, 8)
    expected = vlmkernels.clip_loss(x, y, 5.0)

    worker = threading.Thread(target=compiled, args=(torch.randn(4),))
    worker.start()
    try:
        assert inside.wait(60)
        shared = torch.compiler.is_compiling()  # the flag, seen from this thread
        rotated = vlmkernels.mrope_from_positions(q, k, positions, inv_freq, [2, 1, 1])
        sum(t.sum() for t in rotated).backward()
        loss = vlmkernels.clip_loss(x, y, 5.0)
    finally:
        release.set()
        worker.join()
    assert q.grad is not None and k.grad is not None
    assert torch.equal(loss, expected)
    if not shared:
        pytest.skip("this PyTorch keeps is_compiling() to the compiling thread")


# ------------------------------------------------------- IDEFICS mask ranges memo


def test_idefics_mask_ranges_memo_is_per_thread(monkeypatch):
    """Threads serving one IDEFICS model, each with its own image attention mask: one
    thread's read does not evict the other's memo (every gated layer then read the mask
    on the host again, a device wait per layer)."""
    from vlmkernels.integrations.tables import attention as A

    reads = []
    original = A._mask_ranges
    monkeypatch.setattr(A, "_mask_ranges", lambda *a, **kw: reads.append(1) or original(*a, **kw))
    mine = torch.ones(1, 1, 3, 4, dtype=torch.bool)
    theirs = torch.ones(1, 1, 3, 4, dtype=torch.bool)
    first, second = torch.nn.Identity(), torch.nn.Identity()  # two gated layers
    ranges = A.mask_ranges(mine, 2, 3, 4, reader=first)
    other = threading.Thread(target=A.mask_ranges, args=(theirs, 2, 3, 4), kwargs={"reader": first})
    other.start()
    other.join()
    assert len(reads) == 2
    assert A.mask_ranges(mine, 2, 3, 4, reader=second) is ranges  # this forward's second layer
    assert len(reads) == 2


# ------------------------------------------------------------------ the tuner


def test_tuner_benchmark_leaves_recorded_tensors_alone():
    """The tuner records launches process-wide while its workload runs (CUDA backwards run
    on autograd's threads), so a serving thread's launch is recorded too; benchmarking it
    relaunched the kernel into that thread's own output tensors, hundreds of times."""
    import vlmkernels
    from vlmkernels.core import tuner as TU

    inside, done, recorded = threading.Event(), threading.Event(), []

    def tuner():
        with T._record() as calls:
            inside.set()
            done.wait(10)
            recorded.extend(calls)

    worker = threading.Thread(target=tuner)
    worker.start()
    try:
        assert inside.wait(10)
        q, k = torch.randn(1, 3, 2, 16), torch.randn(1, 3, 1, 16)
        cos, sin = torch.randn(1, 3, 16), torch.randn(1, 3, 16)
        with vlmkernels.use_backend("triton"):
            out, _ = vlmkernels.rope(q, k, cos, sin, 2)  # the serving thread's call
    finally:
        done.set()
        worker.join()
    assert [c.kernel.name for c in recorded] == ["rope"]
    out.zero_()  # the serving thread reuses its buffer
    TU._bench_call(recorded[0], lambda fn: fn() or 1.0, lambda *a: None)
    assert not out.any()


# ------------------------------------------- prepared launches across a clear_cache


class _Jit:
    """Stands in for a JITFunction (records its launches)."""

    arg_names = ["x_ptr", "n", "BM"]

    def __init__(self):
        self.launches = []

        def kernel(x_ptr, n, BM):  # noqa: N803
            return BM

        self.fn = kernel

    def run(self, *args, grid, warmup, **kwargs):
        self.launches.append((grid, kwargs["BM"]))


_SPACE = [triton.Config({"BM": 64}, num_warps=4), triton.Config({"BM": 128}, num_warps=8)]


@pytest.fixture
def fake_kernel(config_dirs, monkeypatch):
    """(a compiled-path kernel on a fake CUDA device 0, write(config): its config file)."""
    from vlmkernels.core import runtime

    user, _ = config_dirs
    monkeypatch.setattr(CF, "_current_device", lambda: 0)
    monkeypatch.setattr(CF, "_raw_device_name", lambda index: H100)
    monkeypatch.setattr(runtime, "AUTOTUNE", False)
    kernel = T.TunedKernel("threads_fake", _Jit(), _SPACE, ["n"], ["n"], interpreted=False)

    def write(config):
        bucket = kernel.bucket((1000, "fp32"))
        doc = {"format": 1, "kernel": kernel.name, "device": T.normalise_device_name(H100),
               "source": "tuned", "triton_version": triton.__version__,
               "source_hash": kernel.source_hash, "key": kernel.file_key,
               "configs": {bucket: {**config.kwargs, "num_warps": config.num_warps,
                                    "num_stages": config.num_stages}}}  # fmt: skip
        path = user / T.normalise_device_name(H100) / f"{kernel.name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc))

    write(_SPACE[1])
    T.clear_cache()
    yield kernel, write
    T._REGISTRY.pop("threads_fake", None)


def test_a_launch_prepared_across_a_clear_takes_one_config(fake_kernel, monkeypatch):
    """A family computes a grid from config() and then prepares the launch, which resolves
    the config again: another thread's clear_cache in between, with new tuned files, paired
    a grid of the old config with a launch of the new one (programs missing), and the plan
    was cached. The launch now goes unprepared (one config for both) and is not cached."""
    kernel, write = fake_kernel
    x = torch.zeros(4)
    args, kwargs = (x, 1000), {}
    cache = T.prepared_cache()
    resolve = T._resolve

    def resolve_then_tune(*a):
        found = resolve(*a)
        write(_SPACE[0])  # the tuner's thread: new files (smaller blocks), then clear_cache
        T.clear_cache()
        monkeypatch.setattr(T, "_resolve", resolve)
        return found

    assert cache.get("layout") is None
    monkeypatch.setattr(T, "_resolve", resolve_then_tune)
    run, prepared = kernel.launcher(lambda meta: (triton.cdiv(1000, meta["BM"]),), args, kwargs)
    run(x)
    assert not prepared  # (so not cached: families store prepared launches only)
    # grid and block of one config (before: 8 programs of the old 128 rows, with blocks of
    # the new 64: rows 512 to 999 never computed)
    assert kernel.fn.launches[-1] == ((16,), 64)

    # a plan prepared before the clear and stored after it is not kept either
    assert cache.get("layout") is None
    launch = kernel.prepare((16,), args, kwargs)
    write(_SPACE[1])
    T.clear_cache()
    cache["layout"] = launch
    assert "layout" not in cache
    # without a clear: prepared and kept
    assert cache.get("layout") is None
    run, prepared = kernel.launcher(lambda meta: (triton.cdiv(1000, meta["BM"]),), args, kwargs)
    cache["layout"] = run
    assert prepared and cache.get("layout") is run


def test_a_prepared_launch_reports_its_own_config(fake_kernel, monkeypatch):
    """The whole-loss plans size their buffers by the config of a prepared launch: asked
    again after preparing, another thread's clear_cache in between answered the new
    files' config, not the one the launch runs."""
    from vlmkernels.ops.contrastive.whole_loss import _prepared

    kernel, write = fake_kernel
    args, kwargs = (torch.zeros(4), 1000), {}
    prepare = kernel.prepare

    def prepare_then_tune(*a):
        launch = prepare(*a)
        write(_SPACE[0])  # the tuner's thread
        T.clear_cache()
        return launch

    monkeypatch.setattr(kernel, "prepare", prepare_then_tune)
    run, config = _prepared(kernel, (8,), args, kwargs)
    assert config is _SPACE[1] and run.config is _SPACE[1]
    run(torch.zeros(4))
    assert kernel.fn.launches[-1] == ((8,), 128)


def test_a_bounded_cache_over_its_bound_comes_back_to_it():
    """Threads storing into a full prepared-launch cache at once can drop the same oldest
    entry and each add one: one entry over the bound each time. A store dropped one entry
    only, so the excess added up with every such collision (a test storing from 4 threads
    saw 13 entries in a cache of 8); it now drops down to the bound."""
    from vlmkernels.core.configs import BoundedCache

    cache = BoundedCache(8)
    for i in range(12):  # the state colliding stores leave: 4 over the bound
        dict.__setitem__(cache, i, i)
    cache[12] = 12
    assert list(cache) == [5, 6, 7, 8, 9, 10, 11, 12]

"""Persisted launch configs (vlmkernels.core.tuning, configs, tuner): file lookup order,
nearest bucket, stale files, the fallback warning, the interpreter path, tune's pipeline
with a fake benchmark, the preferred backend and resolve_backend, and compile_check's view
of the config spaces.

CPU-only: devices are names ("NVIDIA H100 80GB HBM3") or monkeypatched CUDA indices; the
kernels run through Triton's interpreter (tests/conftest.py) where they run at all.
"""

import json
import os
import pathlib
import subprocess
import sys
import types
import warnings

import pytest
import torch
import triton

import vlmkernels
from vlmkernels.core import backend as _backend
from vlmkernels.core import configs as CF
from vlmkernels.core import family as fam
from vlmkernels.core import runtime as _common
from vlmkernels.core import tuner as TU
from vlmkernels.core import tuning as T
from vlmkernels.ops.contrastive import kernels as C
from vlmkernels.ops.rope import kernels as R

H100 = "NVIDIA H100 80GB HBM3"
H100_DIR = "NVIDIA_H100_80GB_HBM3"
ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def fake_cuda(monkeypatch):
    """CUDA device 0 is an H100 as far as the lookup is concerned."""
    monkeypatch.setattr(CF, "_current_device", lambda: 0)
    monkeypatch.setattr(CF, "_raw_device_name", lambda index: H100)
    T.clear_cache()


def entry(cfg: triton.Config, **extra) -> dict:
    return {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages, **extra}


def stats_key(d=768, n=32768, rows=1, cols=1, ids=0, smooth=0, teacher=0, dtype="bf16"):
    return dict(D=d, n_bucket=n, ROWS=rows, COLS=cols, IDS=ids, SMOOTH=smooth,
                TEACHER=teacher, dtype=dtype)  # fmt: skip


def write(root, kernel_name, configs, device=H100_DIR, **overrides) -> pathlib.Path:
    """A valid config file of ``kernel_name`` ({key mapping or bucket str: entry})."""
    k = T.all_kernels()[kernel_name]
    doc = {
        "format": 1,
        "kernel": k.name,
        "device": device,
        "source": "tuned",
        "triton_version": triton.__version__,
        "source_hash": k.source_hash,
        "key": k.file_key,
        "configs": {
            (b if isinstance(b, str) else k.bucket(k.key_from_mapping(b))): e for b, e in configs
        },
    }
    doc.update(overrides)
    path = root / device / f"{kernel_name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


STATS = T.all_kernels()["clip_stats"]
SPACE = STATS.space


def test_device_names_are_normalised():
    assert T.normalise_device_name(H100) == H100_DIR
    assert T.normalise_device_name("NVIDIA H100-PCIe") == "NVIDIA_H100_PCIe"
    assert T.normalise_device_name(" NVIDIA  H200 NVL ") == "NVIDIA_H200_NVL"
    assert T.device_name(H100) == H100_DIR


def test_kernels_keys_and_spaces():
    ks = T.all_kernels()
    assert {"clip_stats", "clip_grad", "siglip", "rope"} <= set(ks)  # and the other families'
    assert ks["siglip"].file_key == ["D", "n_bucket", "WRITE_GRAD", "dtype"]
    assert ks["rope"].file_key == ["HQ", "HK", "D", "half", "SOURCE", "PAIRS", "dtype"]
    assert ks["rope"].space == list(R._GPU_CONFIGS)
    assert SPACE == list(C._GPU_CONFIGS) and STATS.default is C._GPU_CONFIGS[0]
    # the decorated objects keep what scripts/compile_check.py reads
    assert C._clip_stats_kernel is STATS and STATS.fn.fn is not None
    assert STATS.configs == ([C._INTERPRETER_CONFIG] if _common.INTERPRETED else SPACE)


def test_untuned_default_per_dtype(config_dirs):
    """Without a tuned entry, fp32 launches of the statistics and SigLIP loss passes take
    their fp32 default (128 x 128 x 32: no spill), those writing a gradient tile (clip_grad,
    SigLIP's gradient pass) 128 x 64 x 32 (no spill), the other dtypes the first config
    (clip_grad: 128 x 128 x 32); a tuned entry still wins; a default outside the space is
    refused."""
    key = dict(D=768, n_bucket=32768, WRITE_GRAD=1)
    fp32_default, fp32_gradient = C._GPU_CONFIGS[1], C._GPU_CONFIGS[4]
    assert fp32_gradient.kwargs == {"BM": 128, "BN": 64, "BK": 32}
    with pytest.warns(T.DefaultConfigWarning):
        assert T.lookup("siglip", key, device=H100, dtype="fp32") is fp32_gradient
    assert T.lookup("siglip", dict(key, WRITE_GRAD=0), device=H100, dtype="fp32") is fp32_default
    assert T.lookup("siglip", key, device=H100, dtype="bf16") is C._GPU_CONFIGS[0]
    assert T.all_kernels()["clip_grad"].default_for(torch.float32) is fp32_gradient
    assert T.all_kernels()["clip_grad"].default_for(torch.bfloat16) is fp32_default
    assert STATS.default_for("fp32") is fp32_default
    user, _ = config_dirs
    write(user, "siglip", [(dict(key, dtype="fp32"), entry(SPACE[2]))])
    T.clear_cache()
    assert T.lookup("siglip", key, device=H100, dtype="fp32") is SPACE[2]
    with pytest.raises(ValueError, match="fp32 default must be a config of the space"):
        T.tuned("odd", configs=list(SPACE), key=["D"], sizes=["D"],
                defaults={"fp32": triton.Config({"BM": 16})})(C._siglip_kernel.fn)  # fmt: skip


def test_untuned_default_per_variant(config_dirs):
    """The CLIP kernels' variants with targets (ids, smoothing, a teacher) default to their
    own config (128 x 64 x 32, 8 warps) in both dtypes, except clip_stats with 16-bit
    inputs (64 x 128 x 32, 8 warps: no spill with Triton 3.6); the plain variants take the
    dtype's; a tuned entry still wins."""
    targets, stats16 = C._GPU_CONFIGS[4], C._GPU_CONFIGS[5]
    assert targets.kwargs == {"BM": 128, "BN": 64, "BK": 32} and targets.num_warps == 8
    assert stats16.kwargs == {"BM": 64, "BN": 128, "BK": 32} and stats16.num_warps == 8
    with pytest.warns(T.DefaultConfigWarning):
        assert T.lookup("clip_stats", stats_key(ids=1), device=H100) is stats16
    for flags in (dict(smooth=1), dict(teacher=1, dtype="fp16"), dict(teacher=1, dtype="fp32")):
        fp32 = flags.get("dtype") == "fp32"
        assert T.lookup("clip_stats", stats_key(**flags), device=H100) is (
            targets if fp32 else stats16
        )
        assert T.lookup("clip_grad", stats_key(**flags), device=H100) is targets
    assert T.lookup("clip_stats", stats_key(), device=H100) is SPACE[0]
    assert T.lookup("clip_grad", stats_key(), device=H100) is SPACE[1]
    user, _ = config_dirs
    write(user, "clip_stats", [(stats_key(ids=1), entry(SPACE[2]))])
    T.clear_cache()
    assert T.lookup("clip_stats", stats_key(ids=1), device=H100) is SPACE[2]


def test_lookup_order_user_over_package_over_default(config_dirs):
    user, package = config_dirs
    key = stats_key()
    with pytest.warns(T.DefaultConfigWarning, match="clip_stats"):
        assert T.lookup("clip_stats", key, device=H100) is SPACE[0]
    write(package, "clip_stats", [(key, entry(SPACE[2]))])
    T.clear_cache()
    assert T.lookup("clip_stats", key, device=H100) is SPACE[2]
    write(user, "clip_stats", [(key, entry(SPACE[1], ms=1.0))])
    T.clear_cache()
    assert T.lookup("clip_stats", key, device=H100) is SPACE[1]
    assert T._resolve(STATS, H100_DIR, STATS.key_from_mapping(key))[1] == "user"
    # another device has no file: the default
    with pytest.warns(T.DefaultConfigWarning):
        assert T.lookup("clip_stats", key, device="NVIDIA A100-SXM4-80GB") is SPACE[0]


def test_user_file_without_the_variant_defers_to_the_package(config_dirs):
    user, package = config_dirs
    write(user, "clip_stats", [(stats_key(teacher=1), entry(SPACE[1]))])
    write(package, "clip_stats", [(stats_key(d=512, n=8192), entry(SPACE[3]))])
    assert T.lookup("clip_stats", stats_key(), device=H100) is SPACE[3]
    assert T.lookup("clip_stats", stats_key(teacher=1, d=64), device=H100) is SPACE[1]


def test_nearest_bucket(config_dirs):
    user, _ = config_dirs
    write(user, "clip_stats", [
        (stats_key(d=512, n=8192), entry(SPACE[1])),
        (stats_key(d=1024, n=65536), entry(SPACE[2])),
        (stats_key(d=768, n=16384, cols=0), entry(SPACE[3])),  # another variant
        (stats_key(d=768, n=16384, dtype="fp16"), entry(SPACE[0])),  # another dtype
    ])  # fmt: skip
    # exact
    assert T.lookup("clip_stats", stats_key(d=512, n=8192), device=H100) is SPACE[1]
    # |log2 768 - 9| + |14 - 13| = 1.58 against 0.42 + 2 = 2.42
    assert T.lookup("clip_stats", stats_key(d=768, n=16384), device=H100) is SPACE[1]
    assert T.lookup("clip_stats", stats_key(d=1152, n=32768), device=H100) is SPACE[2]
    # flags and dtype must match: the exact-size entries of other variants are not used
    assert T.lookup("clip_stats", stats_key(d=768, n=16384, cols=0), device=H100) is SPACE[3]
    assert T.lookup("clip_stats", stats_key(cols=0, n=1 << 20), device=H100) is SPACE[3]
    with warnings.catch_warnings():  # found in the file, not the default's fallback
        warnings.simplefilter("error", T.DefaultConfigWarning)
        assert T.lookup("clip_stats", stats_key(dtype=torch.float16), device=H100) is SPACE[0]
    with pytest.warns(T.DefaultConfigWarning):
        assert T.lookup("clip_stats", stats_key(dtype="fp32"), device=H100) is SPACE[1]


def test_nearest_bucket_ties_go_to_the_larger_sizes(config_dirs):
    user, _ = config_dirs
    write(user, "siglip", [
        (dict(D=512, n_bucket=8192, WRITE_GRAD=1, dtype="bf16"), entry(SPACE[1])),
        (dict(D=2048, n_bucket=8192, WRITE_GRAD=1, dtype="bf16"), entry(SPACE[2])),
    ])  # fmt: skip
    key = dict(D=1024, n_bucket=8192, WRITE_GRAD=1, dtype="bf16")
    assert T.lookup("siglip", key, device=H100) is SPACE[2]


@pytest.mark.parametrize(
    "overrides, reason",
    [
        ({"triton_version": "2.3.1"}, "tuned with triton 2.3.1"),
        ({"source_hash": "0123456789abcdef"}, "source changed"),
        ({"key": ["D", "n_bucket"]}, "key"),
        ({"kernel": "clip_grad"}, "for kernel 'clip_grad'"),
    ],
)
def test_stale_files_are_ignored_with_a_warning(config_dirs, overrides, reason):
    user, package = config_dirs
    key = stats_key()
    write(user, "clip_stats", [(key, entry(SPACE[1]))], **overrides)
    write(package, "clip_stats", [(key, entry(SPACE[2]))])
    with pytest.warns(T.StaleConfigWarning, match=reason):
        assert T.lookup("clip_stats", key, device=H100) is SPACE[2]
    with warnings.catch_warnings():  # once per file
        warnings.simplefilter("error")
        assert T.lookup("clip_stats", stats_key(d=512), device=H100) is SPACE[2]


def test_a_config_warning_raised_as_an_error_is_raised_again(config_dirs):
    """Under a filter that turns the config warnings into errors (``-W error``, pytest's
    ``filterwarnings = error``), every lookup that would warn raises, not only the first:
    the file or kernel was marked as warned before the warning was issued, so the first
    launch raised and the same launch retried (the next test of a suite) went on silently
    with the stale file ignored or the default config. Warned once per file and kernel
    where the warning is shown."""
    user, package = config_dirs
    key = stats_key()
    write(user, "clip_stats", [(key, entry(SPACE[1]))], source_hash="stale")
    write(package, "clip_stats", [(key, entry(SPACE[2]))])
    with warnings.catch_warnings():
        warnings.simplefilter("error", T.StaleConfigWarning)
        for _ in range(2):
            with pytest.raises(T.StaleConfigWarning, match="source changed"):
                T.lookup("clip_stats", key, device=H100)
    with warnings.catch_warnings():
        warnings.simplefilter("error", T.DefaultConfigWarning)
        for _ in range(2):
            with pytest.raises(T.DefaultConfigWarning, match="'clip_grad'"):
                T.lookup("clip_grad", key, device=H100)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(2):
            assert T.lookup("clip_stats", key, device=H100) is SPACE[2]
            T.lookup("clip_grad", key, device=H100)
    assert [w.category for w in seen] == [T.StaleConfigWarning, T.DefaultConfigWarning]


def test_same_triton_minor_version_is_current(config_dirs):
    user, _ = config_dirs
    major, minor = triton.__version__.split(".")[:2]
    write(user, "clip_stats", [(stats_key(), entry(SPACE[1]))],
          triton_version=f"{major}.{minor}.99+local")  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert T.lookup("clip_stats", stats_key(), device=H100) is SPACE[1]


def test_entries_outside_the_space_and_broken_files(config_dirs):
    user, package = config_dirs
    odd = {"BM": 256, "BN": 256, "BK": 128, "num_warps": 8, "num_stages": 2}
    write(user, "clip_stats", [(stats_key(), odd), (stats_key(d=512), entry(SPACE[1]))])
    with pytest.warns(T.StaleConfigWarning, match="not in the config space"):
        # the valid entry of the file is still the nearest
        assert T.lookup("clip_stats", stats_key(), device=H100) is SPACE[1]
    bad = package / H100_DIR / "siglip.json"
    bad.parent.mkdir(parents=True)
    bad.write_text("{not json")
    key = dict(D=768, n_bucket=32768, WRITE_GRAD=1, dtype="bf16")
    with pytest.warns(T.StaleConfigWarning, match="does not parse"):
        with pytest.warns(T.DefaultConfigWarning):
            assert T.lookup("siglip", key, device=H100) is T.all_kernels()["siglip"].default


DEEP = "[" * 100_000 + "]" * 100_000  # json.loads raises RecursionError on it


@pytest.mark.parametrize(
    "text, reason",
    [
        (DEEP, "nested too deeply"),
        ("[1, 2]", "JSON list, not an object"),
        (b"\xff\xfe{", "does not parse"),
        ('{"configs": [1]}', "'configs' is a JSON list"),
    ],
)
def test_malformed_config_files_fall_back_with_a_warning(config_dirs, text, reason):
    user, package = config_dirs
    key = stats_key()
    path = user / H100_DIR / "clip_stats.json"
    path.parent.mkdir(parents=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    elif text.startswith('{"configs"'):
        doc = json.loads(write(user, "clip_stats", []).read_text())
        path.write_text(json.dumps({**doc, "configs": [1]}))
    else:
        path.write_text(text)
    write(package, "clip_stats", [(key, entry(SPACE[2]))])
    with pytest.warns(T.MalformedConfigWarning, match=reason) as seen:
        assert T.lookup("clip_stats", key, device=H100) is SPACE[2]
    assert str(path) in str(seen[0].message)
    assert issubclass(T.MalformedConfigWarning, T.StaleConfigWarning)
    files = T.lookup_report(H100)["clip_stats"]["files"]
    assert [(f["origin"], f["buckets"]) for f in files] == [("user", 0), ("package", 1)]
    assert reason in files[0]["problems"][0]


def test_malformed_entries_are_ignored_one_by_one(config_dirs):
    user, package = config_dirs
    write(package, "clip_stats", [(stats_key(d=64), entry(SPACE[3]))])
    good = entry(SPACE[1])
    path = write(
        user,
        "clip_stats",
        [
            (stats_key(), 5),  # not an object
            (stats_key(d=1024), {**good, "num_warps": "8"}),  # a string
            (stats_key(d=2048), {**good, "BM": [128]}),  # unhashable
            (stats_key(d=4096), {**good, "num_stages": True}),  # a bool is not a count
            ("D768", good),  # not name=value pairs
            ("D=768,dtype=bf16", good),  # another key
            (stats_key(d="768x"), good),  # a size that is not a number
            (stats_key(d=512), good),
        ],
    )
    with pytest.warns(T.MalformedConfigWarning) as seen:
        # the one valid entry of the user file is the nearest bucket of every size
        for d in (768, 1024, 2048, 4096, 64):
            assert T.lookup("clip_stats", stats_key(d=d), device=H100) is SPACE[1]
    assert len(seen) == 1  # once per file
    message = str(seen[0].message)
    assert f"ignoring entries of {path}" in message and "is not an object" in message
    problems = T.lookup_report(H100)["clip_stats"]["files"][0]["problems"]
    assert len(problems) == 7, problems
    assert any("a size is not a non-negative integer" in q for q in problems)
    assert any("num_warps='8' is not an integer" in q for q in problems)
    assert any("BM=[128]" in q for q in problems)
    assert any("num_stages=True" in q for q in problems)
    assert sum("does not follow the key" in q for q in problems) == 2


def test_write_winners_drops_malformed_entries_of_the_old_file(config_dirs):
    user, _ = config_dirs
    kept = stats_key(d=512)
    write(user, "clip_stats", [(kept, entry(SPACE[1])), (stats_key(d=64), "junk"),
                               ("D64", entry(SPACE[1]))])  # fmt: skip
    lines = []
    key = STATS.key_from_mapping(stats_key())
    path = T._write_winners(STATS, H100_DIR, {key: entry(SPACE[2])}, user, lines.append)
    configs = json.loads(path.read_text())["configs"]
    assert list(configs) == [STATS.bucket(STATS.key_from_mapping(kept)), STATS.bucket(key)]
    assert len([line for line in lines if line.startswith("dropping")]) == 2, lines
    path.write_text(DEEP)
    path = T._write_winners(STATS, H100_DIR, {key: entry(SPACE[2])}, user, lines.append)
    assert list(json.loads(path.read_text())["configs"]) == [STATS.bucket(key)]
    assert "nested too deeply" in lines[-1]


def test_default_warning_once_per_device(config_dirs):
    """A patched model's first step launches about ten kernels without a tuned entry: one
    DefaultConfigWarning for the device, not one per kernel; another device warns again."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for d in (64, 128, 768):
            T.lookup("clip_stats", stats_key(d=d), device=H100)
        T.lookup("clip_grad", stats_key(), device=H100)
        T.lookup("siglip", dict(D=768, n_bucket=32768, WRITE_GRAD=1, dtype="bf16"), device=H100)
        T.lookup("clip_grad", stats_key(), device="NVIDIA H200")
        T.lookup("clip_stats", stats_key(), device="NVIDIA H200")
    fallback = [str(w.message) for w in seen if issubclass(w.category, T.DefaultConfigWarning)]
    assert len(fallback) == 2, fallback
    assert "'clip_stats'" in fallback[0] and "H100" in fallback[0]
    assert "vlmkernels tune" in fallback[0] and "vlmkernels info" in fallback[0]
    assert "'clip_grad'" in fallback[1] and "H200" in fallback[1]


def test_lookup_needs_the_whole_key(config_dirs):
    with pytest.raises(KeyError, match="dtype"):
        T.lookup("clip_stats", dict(D=1, n_bucket=1, ROWS=1, COLS=1, IDS=0, SMOOTH=0,
                                    TEACHER=0), device=H100)  # fmt: skip
    with pytest.raises(ValueError, match="unknown kernel"):
        T.lookup("nope", {}, device=H100)


# ------------------------------------------------------------------ launches


class FakeJit:
    """Stands in for a JITFunction: records how it is launched."""

    arg_names = ["x_ptr", "D", "n_bucket", "FLAG", "BM"]

    def __init__(self):
        self.launches = []

        def fake_kernel(x_ptr, D, n_bucket, FLAG, BM):  # noqa: N803
            return BM

        self.fn = fake_kernel

    def run(self, *args, grid, warmup, **kwargs):
        self.launches.append((grid, args, kwargs))


SPACE_FAKE = _common.autotune_configs(
    [triton.Config({"BM": 64}, num_warps=4, num_stages=3),
     triton.Config({"BM": 128}, num_warps=8, num_stages=4)],
    triton.Config({"BM": 16}, num_warps=1, num_stages=1),
)  # fmt: skip


def fake_kernel(interpreted=False):
    jit = FakeJit()
    k = T.TunedKernel("fake_test", jit, SPACE_FAKE, ["D", "n_bucket", "FLAG"],
                      ["D", "n_bucket"], interpreted=interpreted)  # fmt: skip
    return k, jit


@pytest.fixture
def fake_registered():
    yield
    T._REGISTRY.pop("fake_test", None)


def fake_file(user, k, key, cfg):
    doc = dict(format=1, kernel=k.name, device=H100_DIR, source="tuned",
               triton_version=triton.__version__, source_hash=k.source_hash, key=k.file_key,
               configs={k.bucket(key): entry(cfg)})  # fmt: skip
    (user / H100_DIR).mkdir(parents=True, exist_ok=True)
    (user / H100_DIR / "fake_test.json").write_text(json.dumps(doc))


def test_launch_takes_the_looked_up_config_and_caches_it(config_dirs, fake_cuda, fake_registered,
                                                        monkeypatch):  # fmt: skip
    user, _ = config_dirs
    monkeypatch.setattr(_common, "AUTOTUNE", False)
    k, jit = fake_kernel()
    x = torch.zeros(4, dtype=torch.bfloat16)
    fake_file(user, k, (768, 4096, 1, "bf16"), k.space[1])
    calls = []
    resolve = T._resolve
    monkeypatch.setattr(T, "_resolve", lambda *a: calls.append(a) or resolve(*a))
    for _ in range(3):
        k[lambda meta: (triton.cdiv(1000, meta["BM"]), 2)](x, 768, 4096, FLAG=True)
    assert len(calls) == 1  # cached per (kernel, device, key)
    grid, args, kwargs = jit.launches[-1]
    assert grid == (8, 2) and args == (x, 768, 4096)
    assert kwargs["BM"] == 128 and kwargs["num_warps"] == 8 and kwargs["num_stages"] == 4
    assert kwargs["FLAG"] is True
    # another variant: the default, warned once
    with pytest.warns(T.DefaultConfigWarning, match="fake_test"):
        k[(3,)](x, 768, 4096, FLAG=False)
    assert jit.launches[-1][0] == (3,) and jit.launches[-1][2]["BM"] == 64


def test_launch_config_cache_is_bounded(config_dirs, fake_cuda, fake_registered, monkeypatch):
    """The per-(device, key) config lookups of a CUDA launch keep at most PREPARED_LAYOUTS
    keys, dropping the oldest: a kernel keyed on a size that changes every call (attention's
    max_lk, ToMe's token count, serving prompts of every length) cannot grow it without end,
    as the prepared launches built on it cannot."""
    monkeypatch.setattr(_common, "AUTOTUNE", False)
    monkeypatch.setattr(T, "PREPARED_LAYOUTS", 16)
    k, jit = fake_kernel()
    x = torch.zeros(4, dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", T.DefaultConfigWarning)
        for n in range(1, 41):
            k[(1,)](x, 64, n, FLAG=True)
    assert len(jit.launches) == 40 and len(k._cache) == 16
    assert (0, (64, 40, 1, "bf16")) in k._cache and (0, (64, 1, 1, "bf16")) not in k._cache


def test_interpreted_launch_uses_the_interpreter_config_without_lookup(config_dirs, fake_registered,
                                                                       monkeypatch):  # fmt: skip
    k, jit = fake_kernel(interpreted=True)
    monkeypatch.setattr(T, "_resolve", lambda *a: pytest.fail("no lookup under the interpreter"))
    monkeypatch.setattr(_common, "AUTOTUNE", True)  # the interpreter wins over the opt-in
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        k[(1,)](torch.zeros(1), 768, 4096, FLAG=True)
    assert jit.launches[-1][2]["BM"] == 16 and jit.launches[-1][2]["num_warps"] == 1


def test_opt_in_autotune_delegates_to_triton_autotune(config_dirs, fake_cuda, fake_registered,
                                                      monkeypatch):  # fmt: skip
    k, jit = fake_kernel()
    made = []

    class StubAutotuner:
        def __init__(self, fn, configs, key, restore_value):
            self.fn, self.configs, self.key = fn, configs, key

        def run(self, *args, grid, warmup, **kwargs):
            made.append((self.configs, self.key, grid, args, kwargs))

    def autotune(configs, key, restore_value=None):
        return lambda fn: StubAutotuner(fn, configs, key, restore_value)

    monkeypatch.setattr(_common, "AUTOTUNE", True)
    monkeypatch.setattr(T.triton, "autotune", autotune)
    monkeypatch.setattr(T, "_resolve", lambda *a: pytest.fail("no lookup when autotuning"))
    k[(2,)](torch.zeros(1), 768, 4096, FLAG=True)
    k[(2,)](torch.zeros(1), 768, 4096, FLAG=True)
    assert len(made) == 2 and made[0][0] == k.space and made[0][1] == ["D", "n_bucket", "FLAG"]
    assert not jit.launches  # the autotuner launches


def test_every_launch_path_asks_for_fp_fusion(config_dirs, fake_cuda, fake_registered,
                                              monkeypatch):  # fmt: skip
    """Triton 3.9 warns that its default for FMA contraction turns to off in 3.10: a looked-up
    launch, a prepared one, the opt-in autotuner and the inspection's compile all ask for it
    explicitly; where the process sets TRITON_DEFAULT_FP_FUSION, none does (the user's
    choice applies)."""
    from vlmkernels.core import inspection

    monkeypatch.delenv("TRITON_DEFAULT_FP_FUSION", raising=False)
    monkeypatch.setattr(_common, "AUTOTUNE", False)
    k, jit = fake_kernel()
    x = torch.zeros(4)
    made = []

    class StubAutotuner:
        def __init__(self, fn):
            self.fn = fn

        def run(self, *args, grid, warmup, **kwargs):
            made.append(kwargs)

    monkeypatch.setattr(
        T.triton, "autotune", lambda configs, key, restore_value=None: StubAutotuner
    )

    def launch_every_way():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", T.DefaultConfigWarning)
            k[(1,)](x, 768, 4096, FLAG=True)
            T._BUILDING.since = None  # a plan begins, as at a prepared cache's miss
            k.prepare((1,), (x, 768, 4096), {"FLAG": True})(x)
        monkeypatch.setattr(_common, "AUTOTUNE", True)
        k[(1,)](x, 768, 4096, FLAG=True)
        monkeypatch.setattr(_common, "AUTOTUNE", False)
        return [kw.get("enable_fp_fusion") for _, _, kw in jit.launches[-2:]] + [
            made[-1].get("enable_fp_fusion"),
            inspection.compile_options(k.space[0]).get("enable_fp_fusion"),
        ]

    assert launch_every_way() == [True] * 4
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "0")
    assert launch_every_way() == [None] * 4


def test_real_kernels_under_the_interpreter_skip_the_lookup(config_dirs, monkeypatch):
    user, _ = config_dirs
    # a stale file that would warn if it were read
    write(user, "rope", [], device=H100_DIR, triton_version="0.1")
    monkeypatch.setattr(CF, "_raw_device_name", lambda index: H100)
    if not _common.INTERPRETED:
        pytest.skip("the kernels are compiled here")
    q, k = torch.randn(1, 5, 3, 16), torch.randn(1, 5, 2, 16)
    cos, sin = torch.randn(1, 1, 5, 16), torch.randn(1, 1, 5, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", T.ConfigWarning)
        with vlmkernels.use_backend("triton"):
            vlmkernels.rope(q.transpose(1, 2), k.transpose(1, 2), cos[0], sin[0])
            x = torch.randn(40, 24)
            vlmkernels.clip_loss(x, x.flip(0), 10.0)
    assert all(not kk._cache for kk in T.all_kernels().values())


def test_launch_with_an_explicit_config_interpreted():
    """What tune benchmarks: a recorded launch replayed with another config of the space
    gives the same result (rope: BLOCK_H=16 heads at a time instead of the interpreter's 4)."""
    if not _common.INTERPRETED:
        pytest.skip("needs the interpreter on the CPU")
    q, k = torch.randn(2, 3, 7, 32), torch.randn(2, 3, 5, 32)
    cos, sin = torch.randn(3, 2, 3, 32), torch.randn(3, 2, 3, 32)
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    with T._record() as calls:
        R.launch(q, k, qo, ko, table=(cos, sin), mode=R.CHUNKED, sections=(4, 6, 6))
    (call,) = calls
    assert call.key == (7, 5, 32, 16, R.TABLE, False, "fp32")  # PAIRS off
    expected_q, expected_k = qo.clone(), ko.clone()
    qo.zero_(), ko.zero_()
    call.kernel.launch(call.kernel.space[2], call.grid, call.args, call.kwargs)
    assert torch.equal(qo, expected_q) and torch.equal(ko, expected_k)


# ------------------------------------------------------------------ report


def test_lookup_report(config_dirs, monkeypatch):
    user, package = config_dirs
    write(user, "clip_stats", [(stats_key(), entry(SPACE[1]))])
    write(package, "clip_stats", [(stats_key(), entry(SPACE[2]))])
    write(package, "clip_grad", [(stats_key(), entry(SPACE[2]))], source="default")
    write(user, "siglip", [], triton_version="0.1")
    for kk in T.all_kernels().values():
        monkeypatch.setattr(kk, "interpreted", False)
    with pytest.warns(T.StaleConfigWarning):
        report = T.lookup_report(H100)
    assert set(report) == set(T.all_kernels())
    assert report["clip_stats"]["source"] == "user" and report["clip_stats"]["buckets"] == 1
    assert report["clip_stats"]["path"] == str(user / H100_DIR / "clip_stats.json")
    assert [f["origin"] for f in report["clip_stats"]["files"]] == ["user", "package"]
    assert report["clip_grad"]["source"] == "package" and report["clip_grad"]["label"] == "default"
    assert report["siglip"]["source"] == "default" and report["siglip"]["path"] is None
    assert "triton 0.1" in report["siglip"]["files"][0]["problems"][0]
    assert report["rope"]["source"] == "default" and report["rope"]["files"] == []
    rope = T.all_kernels()["rope"]
    assert report["rope"]["defaults"] == {d: entry(rope.default_for(d)) for d in
                                          ("bf16", "fp16", "fp32")}  # fmt: skip
    grad = T.all_kernels()["clip_grad"]  # its defaults differ by dtype
    assert report["clip_grad"]["defaults"]["fp32"] == entry(grad.default_for("fp32"))
    assert grad.default_for("fp32") is not grad.default
    monkeypatch.setattr(_common, "AUTOTUNE", True)
    assert T.lookup_report(H100)["rope"]["source"] == "autotune"


def test_lookup_report_without_cuda_under_the_interpreter(config_dirs):
    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    report = T.lookup_report()
    expected = "interpreter" if _common.INTERPRETED else "default"
    assert all(r["source"] == expected and r["device"] is None for r in report.values())


# ------------------------------------------------------------------ tune


def test_tune_needs_cuda_and_known_names():
    with pytest.raises(ValueError, match="unknown kernel or op 'nope'"):
        TU.tune(["nope"])
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        TU.tune()
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        TU.tune(["clip_loss", "mrope"], shapes={"rope": []})


def test_tune_that_fails_after_writing_a_file_clears_the_caches(config_dirs, fake_cuda,
                                                                 monkeypatch):  # fmt: skip
    """A tune that raises after it wrote a kernel's file (the next kernel's file
    unwritable, an interrupt) still empties the in-process caches: the workloads' launches
    filled them from the files before, and this process went on launching the old configs
    that the file on disk (read by every other process) no longer holds."""
    import contextlib

    key = stats_key(d=24, n=64, dtype="fp32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", T.DefaultConfigWarning)
        default = T.lookup("clip_stats", key, device=H100)  # cached: no file yet
    assert default is not SPACE[-1]
    bucket = STATS.key_from_mapping(key)
    monkeypatch.setattr(TU.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(TU.torch.cuda, "device", lambda dev: contextlib.nullcontext())
    monkeypatch.setattr(TU.runtime, "INTERPRETED", False)
    monkeypatch.setattr(TU, "_tune_buckets", lambda names, *a: {
        n: {bucket: entry(SPACE[-1], ms=1.0)} for n in names})  # fmt: skip
    write = TU._write_winners

    def write_winners(kernel, *args):
        if kernel.name == "clip_grad":
            raise OSError(28, "No space left on device")
        return write(kernel, *args)

    monkeypatch.setattr(TU, "_write_winners", write_winners)
    with pytest.raises(OSError, match="No space left"):
        TU.tune(["clip_stats", "clip_grad"], device=0, log=lambda line: None)
    assert (config_dirs[0] / H100_DIR / "clip_stats.json").is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert T.lookup("clip_stats", key, device=H100) is SPACE[-1]


def test_kernel_name_aliases():
    from vlmkernels.core.family import families

    declared = [name for family in families().values() for name in family.kernel_names]
    assert sorted(TU.kernel_names(None)) == sorted(declared)
    assert {"clip_stats", "clip_grad", "siglip", "rope"} <= set(declared)
    assert TU.kernel_names(["clip_loss", "siglip_loss", "vision_rope", "mrope"]) == [
        "clip_stats", "clip_grad", "siglip", "rope"]  # fmt: skip
    assert TU.kernel_names("rope") == ["rope"]


def test_default_shapes_cover_the_issue_buckets():
    contrastive = TU.default_shapes()["contrastive"]
    assert {(s["N"], s["d"]) for s in contrastive} == {
        (n, d) for n in (8192, 16384, 32768, 65536) for d in (512, 768, 1024, 1152)
    }
    rope = TU.default_shapes()["rope"]
    assert {(s["heads_q"], s["heads_k"], s["head_dim"]) for s in rope} >= {
        (28, 4, 128), (32, 8, 128), (16, 16, 80), (16, 16, 72)}  # fmt: skip
    assert {s["source"] for s in rope} == {"table", "positions"}


def test_tune_pipeline_with_a_fake_benchmark(config_dirs, monkeypatch):
    """Workloads -> recorded launches -> one timing per config -> winners -> merged files
    -> lookup, on the CPU: the interpreter runs the workloads and a fake benchmark, which
    prefers the space's last config, stands in for do_bench."""
    if not _common.INTERPRETED:
        pytest.skip("runs the workloads through the interpreter")
    user, _ = config_dirs
    launched, benchmarking = [], []
    original = T.TunedKernel.launch

    def launch(self, config, *args, **kwargs):
        if not benchmarking:  # the workloads themselves run for real (interpreted)
            return original(self, config, *args, **kwargs)
        launched.append((self, config))

    def bench(fn):
        benchmarking.append(True)
        try:
            fn()
        finally:
            benchmarking.pop()
        kernel, config = launched[-1]
        return 10.0 - kernel.space.index(config)  # the last config is the fastest

    monkeypatch.setattr(T.TunedKernel, "launch", launch)

    shapes = {
        "contrastive": [{"N": 40, "d": 24, "dtype": "fp32"}],
        "rope": [{"heads_q": 3, "heads_k": 2, "head_dim": 16, "mode": "chunked",
                  "sections": (2, 3, 3), "source": "positions", "tokens": 6, "dtype": "fp32"}],
    }  # fmt: skip
    names = ["clip_stats", "clip_grad", "siglip", "rope"]
    lines = []
    winners = TU._tune_buckets(names, shapes, torch.device("cpu"), bench, lines.append)
    assert set(winners) == set(names)
    stats_bucket = (24, 64, 1, 1, 0, 0, 0, "fp32")
    assert list(winners["clip_stats"]) == [stats_bucket]
    assert list(winners["clip_grad"]) == [stats_bucket]
    assert sorted(winners["siglip"]) == [(24, 64, 0, "fp32"), (24, 64, 1, "fp32")]
    assert list(winners["rope"]) == [(3, 2, 16, 8, R.POSITIONS, False, "fp32")]
    best = winners["clip_stats"][stats_bucket]
    fastest = 10.0 - (len(SPACE) - 1)
    assert best == {**entry(SPACE[-1]), "ms": fastest, "default_ms": 10.0}
    assert any(f"x{10.0 / fastest:.2f} over the default" in line for line in lines)

    ks = T.all_kernels()
    for name in names:
        T._write_winners(ks[name], H100_DIR, winners[name], user, lines.append)
    T.clear_cache()
    doc = json.loads((user / H100_DIR / "clip_stats.json").read_text())
    assert doc["source"] == "tuned" and doc["triton_version"] == triton.__version__
    assert doc["source_hash"] == STATS.source_hash and doc["key"] == STATS.file_key
    assert list(doc["configs"]) == ["D=24,n_bucket=64,ROWS=1,COLS=1,IDS=0,SMOOTH=0,TEACHER=0,"
                                    "dtype=fp32"]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert T.lookup("clip_stats", stats_key(d=24, n=64, dtype="fp32"), device=H100) is (
            SPACE[-1])  # fmt: skip
        assert T.lookup("rope", dict(HQ=28, HK=4, D=128, half=64, SOURCE=1, PAIRS=False,
                                     dtype="fp32"),
                        device=H100) is ks["rope"].space[-1]  # fmt: skip

    # merging: a new bucket joins the file, the old one stays, a re-tuned one is replaced
    new = {(48, 128, 1, 1, 0, 0, 0, "fp32"): entry(SPACE[1], ms=1.0),
           stats_bucket: entry(SPACE[2], ms=2.0)}  # fmt: skip
    T._write_winners(STATS, H100_DIR, new, user, lines.append)
    configs = json.loads((user / H100_DIR / "clip_stats.json").read_text())["configs"]
    assert list(configs.values()) == [entry(SPACE[2], ms=2.0), entry(SPACE[1], ms=1.0)]
    # a stale file is replaced, not merged
    path = write(user, "siglip", [("D=1,n_bucket=1,WRITE_GRAD=0,dtype=fp32", entry(SPACE[0]))],
                 source_hash="stale")  # fmt: skip
    T._write_winners(ks["siglip"], H100_DIR, {(2, 2, 0, "fp32"): entry(SPACE[1])}, user,
                     lines.append)  # fmt: skip
    assert list(json.loads(path.read_text())["configs"]) == [
        "D=2,n_bucket=2,WRITE_GRAD=0,dtype=fp32"
    ]
    assert any(line.startswith("replacing") for line in lines)


def test_bench_call_skips_configs_that_fail(config_dirs, monkeypatch):
    call = T._Call(STATS, (1, 1, 1, 1, 0, 0, 0, "bf16"), (1,), (), {})
    times = iter([RuntimeError("out of resources: shared memory"), 3.0, 2.0, 5.0, 4.0])

    def bench(fn):
        t = next(times)
        if isinstance(t, Exception):
            raise t
        return t

    lines = []
    best = TU._bench_call(call, bench, lines.append)
    assert best == {**entry(SPACE[2]), "ms": 2.0}  # no default_ms: the default failed
    assert "skipped (RuntimeError: out of resources" in lines[0]
    with pytest.raises(RuntimeError, match="no config"):
        TU._bench_call(call, lambda fn: 1 / 0, lines.append)


def test_space_for_a_variant_leaves_out_what_cannot_launch(config_dirs):
    """``tuned(fits=)``: the connector GEMM with fp32 inputs and the norm prologue keeps only
    BK 32 or 64 x 64 tiles (the others overflow an sm_90 block's shared memory or spill);
    fp32 without a norm leaves out the 4-warp 64 x 128 / 128 x 64 tiles at BK 64 (they
    spill); bf16 keeps the whole space. The tuner skips the others without launching
    them, and the inspection compiles only what remains."""
    from vlmkernels.ops.connectors import kernels as K

    gemm = T.all_kernels()["connector_gemm"]
    full = list(K._GPU_CONFIGS)
    assert gemm.space == full or T.runtime.INTERPRETED
    norm = dict(M_bucket=1024, N=1024, K=1024, XSIDE=1, GATHER=1, NORM=1, FOLD=0, ACT=1, SCATTER=0)
    kept = [c for c in full if gemm.allows(c, "fp32", norm)]
    assert [(c.kwargs["BM"], c.kwargs["BN"], c.kwargs["BK"]) for c in kept] == [
        (128, 128, 32), (64, 64, 64)]  # fmt: skip
    assert all(gemm.allows(c, "bf16", norm) for c in full)
    plain = [c for c in full if gemm.allows(c, torch.float32, dict(norm, NORM=0))]
    assert [(c.kwargs["BM"], c.kwargs["BN"], c.kwargs["BK"]) for c in plain] == [
        (128, 128, 32), (128, 128, 64), (64, 64, 64)]  # fmt: skip
    assert gemm.allows(gemm.default_for("fp32", norm), "fp32", norm)
    assert T.all_kernels()["clip_stats"].space_for("fp32") == STATS.space  # no fits: all

    class Space(list):  # the GPU space whatever the interpreter says
        space = full
        interpreter = full[0]

    try:
        sizes = ["M_bucket", "N", "K"]
        kernel = T.TunedKernel("fits_demo", gemm.fn, Space(full), gemm.key_names, sizes,
                               fits=K._gemm_fits, interpreted=False)  # fmt: skip
    finally:
        T._REGISTRY.pop("fits_demo", None)  # not a kernel of any family
    call = T._Call(kernel, (*norm.values(), "fp32"), (1,), (), {})
    timed, lines = [], []
    best = TU._bench_call(call, lambda fn: timed.append(fn) or float(len(timed)), lines.append)
    assert len(timed) == 2 and best["ms"] == 1.0
    assert sum("not in the space" in line for line in lines) == len(full) - 2


def test_compare_backends_records_the_faster(config_dirs, monkeypatch):
    if not _common.INTERPRETED:
        pytest.skip("runs the Triton launcher through the interpreter")
    user, _ = config_dirs
    from vlmkernels.ops.rope import cuda as _cuda

    ran = []

    def cuda_launch(q, k, qo, ko, **kwargs):
        if q.shape[-1] == 24:
            raise NotImplementedError("head dim 24")
        ran.append("cuda")

    def bench(fn):
        before = len(ran)
        fn()
        return 1.0 if len(ran) > before else 2.0  # the CUDA launcher is the faster

    monkeypatch.setattr(_cuda, "rope_launch", cuda_launch)
    monkeypatch.setattr(_backend, "cuda_backend_status", lambda: (False, "not built"))
    spec = dict(heads_q=2, heads_k=1, head_dim=16, mode="plain", source="table", tokens=3,
                dtype="fp32")  # fmt: skip
    shapes = {"rope": [spec, {**spec, "head_dim": 24}, spec]}
    lines = []
    cpu = torch.device("cpu")
    assert TU._compare_backends(shapes, cpu, H100_DIR, bench, user, lines.append) == {}
    assert "not compared (not built)" in lines[-1]
    monkeypatch.setattr(_backend, "cuda_backend_status", lambda: (True, "built"))
    written = TU._compare_backends(shapes, cpu, H100_DIR, bench, user, lines.append)
    assert written == {"backends": user / H100_DIR / "backends.json"}
    doc = json.loads(written["backends"].read_text())
    assert doc["backends"]["rope"] == {"backend": "cuda", "triton_ms": 4.0, "cuda_ms": 2.0,
                                       "shapes": 2}  # fmt: skip
    assert any("head dim 24" in line for line in lines)
    assert T.preferred_backend("rope", H100) == "cuda"


# ------------------------------------------------------------------ preferred backend


def fake_cuda_tensor(dtype=torch.bfloat16, index=0):
    return types.SimpleNamespace(dtype=dtype, device=torch.device("cuda", index), is_cuda=True,
                                 is_cpu=False)  # fmt: skip


def test_preferred_backend_and_resolve_backend(config_dirs, fake_cuda, monkeypatch):
    user, package = config_dirs
    assert T.preferred_backend("rope", H100) is None
    T.record_preferred_backend("rope", "cuda", H100, package, triton_ms=2.0, cuda_ms=1.5)
    T.record_preferred_backend("clip_loss", "triton", H100, package)
    doc = json.loads((package / H100_DIR / "backends.json").read_text())
    assert doc["backends"]["rope"] == {"backend": "cuda", "triton_ms": 2.0, "cuda_ms": 1.5}
    assert T.preferred_backend("rope", H100) == "cuda"
    assert T.preferred_backend("rope", torch.device("cuda", 0)) == "cuda"
    assert T.preferred_backend("rope", "NVIDIA H200") is None
    assert T.preferred_backend("clip_loss", None) == "triton"
    # the user directory comes first
    T.record_preferred_backend("rope", "triton", 0, user)
    assert T.preferred_backend("rope", 0) == "triton"
    (user / H100_DIR / "backends.json").unlink()
    T.clear_cache()
    with pytest.raises(ValueError, match="'triton' or 'cuda'"):
        T.record_preferred_backend("rope", "torch", H100, user)

    t = fake_cuda_tensor()
    monkeypatch.setattr(_backend, "cuda_backend_status", lambda: (True, "built"))
    assert _backend.cuda_default("rope", t.device) == "cuda"
    assert _backend.resolve_backend("rope", t) == "cuda"
    assert _backend.resolve_backend("clip_loss", t) == "triton"
    assert _backend.resolve_backend("siglip_loss", t) == "triton"  # nothing recorded
    assert _backend.resolve_backend("rope", fake_cuda_tensor(torch.float64)) == "torch"
    with vlmkernels.use_backend("triton"):
        assert _backend.resolve_backend("rope", t) == "triton"
    # recorded but not available here: Triton
    monkeypatch.setattr(_backend, "cuda_backend_status", lambda: (False, "not built"))
    assert _backend.resolve_backend("rope", t) == "triton"


def test_a_failed_write_leaves_the_file_and_no_temporary(config_dirs, monkeypatch):
    """A record whose write fails part-way (a measurement JSON cannot hold, an interrupt or
    a full disk while the file is written) leaves the file as it was and no half-written
    temporary beside it: each failure left a ``backends.json*.tmp`` in the user's config
    folder. The choice recorded before still holds."""
    user, _ = config_dirs
    T.record_preferred_backend("rope", "cuda", H100, user, triton_ms=2.0, cuda_ms=1.5)
    folder = user / H100_DIR
    reference = user / "reference"
    reference.write_text("")  # the permissions any new file gets (the umask's)
    mode = (folder / "backends.json").stat().st_mode & 0o777
    assert mode == reference.stat().st_mode & 0o777  # not mkstemp's owner-only 0600
    reference.unlink()
    before = (folder / "backends.json").read_text()
    with pytest.raises(TypeError, match="not JSON serializable"):
        T.record_preferred_backend("rope", "triton", H100, user, triton_ms=torch.tensor(1.0))
    real_dump = CF.json.dump

    def interrupted(doc, f, **kwargs):
        f.write(json.dumps(doc)[:10])
        raise KeyboardInterrupt

    monkeypatch.setattr(CF.json, "dump", interrupted)
    with pytest.raises(KeyboardInterrupt):
        T.record_preferred_design("clip_backward", "fused", H100, user, fused_ms=1.0)
    monkeypatch.setattr(CF.json, "dump", real_dump)
    assert sorted(p.name for p in folder.iterdir()) == ["backends.json"]
    assert (folder / "backends.json").read_text() == before
    assert T.preferred_backend("rope", H100) == "cuda"
    assert T.preferred_design("clip_backward", H100) is None
    (folder / "backends.json").chmod(0o644)  # a replaced file keeps its permissions
    T.record_preferred_backend("rope", "triton", H100, user)
    assert (folder / "backends.json").stat().st_mode & 0o777 == 0o644
    assert T.preferred_backend("rope", H100) == "triton"


def test_unrecorded_or_odd_backend_entries_mean_triton(config_dirs, fake_cuda, monkeypatch):
    _, package = config_dirs
    (package / H100_DIR).mkdir(parents=True)
    (package / H100_DIR / "backends.json").write_text(
        json.dumps({"backends": {"rope": "torch", "clip_loss": {"backend": "cuda"}}})
    )
    monkeypatch.setattr(_backend, "cuda_backend_status", lambda: (True, "built"))
    with pytest.warns(T.MalformedConfigWarning, match="'torch' is not 'triton' or 'cuda'"):
        assert T.preferred_backend("rope", H100) is None
    assert _backend.resolve_backend("rope", fake_cuda_tensor()) == "triton"
    assert T.preferred_backend("clip_loss", H100) == "cuda"


@pytest.mark.parametrize(
    "text, reason",
    [
        (json.dumps({"backends": ["rope"]}), "'backends' is a JSON list"),
        (json.dumps({"backends": "cuda"}), "'backends' is a JSON str"),
        (json.dumps(["rope"]), "JSON list, not an object"),
        (DEEP, "nested too deeply"),
        ("{", "does not parse"),
    ],
)
def test_malformed_backends_file_falls_back_with_a_warning(config_dirs, fake_cuda, monkeypatch,
                                                           text, reason):  # fmt: skip
    user, package = config_dirs
    T.record_preferred_backend("rope", "cuda", H100, package)
    bad = user / H100_DIR / "backends.json"
    bad.parent.mkdir(parents=True)
    bad.write_text(text)
    monkeypatch.setattr(_backend, "cuda_backend_status", lambda: (True, "built"))
    with pytest.warns(T.MalformedConfigWarning, match=reason) as seen:
        assert T.preferred_backend("rope", H100) == "cuda"  # the package's file
        assert _backend.resolve_backend("rope", fake_cuda_tensor()) == "cuda"
        assert T.preferred_backend("clip_loss", H100) is None
    assert len(seen) == 1 and str(bad) in str(seen[0].message)
    # recording over the malformed file replaces it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", T.ConfigWarning)
        T.record_preferred_backend("siglip_loss", "triton", H100, user)
    doc = json.loads(bad.read_text())
    assert doc["backends"] == {"siglip_loss": {"backend": "triton"}}


def test_odd_backend_entries_are_ignored_one_by_one(config_dirs, fake_cuda):
    _, package = config_dirs
    (package / H100_DIR).mkdir(parents=True)
    path = package / H100_DIR / "backends.json"
    path.write_text(json.dumps({"backends": {"rope": ["cuda"], "siglip_loss": {"backend": 3},
                                             "clip_loss": "cuda"}}))  # fmt: skip
    with pytest.warns(T.MalformedConfigWarning, match="entry 'rope'") as seen:
        assert T.preferred_backend("rope", H100) is None
        assert T.preferred_backend("siglip_loss", H100) is None
        assert T.preferred_backend("clip_loss", H100) == "cuda"
    assert len(seen) == 1 and "entry 'siglip_loss': backend 3" in str(seen[0].message)


# ------------------------------------------------------------------ compile_check


def test_compile_check_still_finds_the_config_spaces():
    code = (
        "from vlmkernels.ops.contrastive import kernels as C; "
        "from vlmkernels.ops.rope import kernels as R; import triton; "
        "ks = [C._clip_stats_kernel, C._clip_grad_kernel, C._siglip_kernel, R._rope_kernel]; "
        "jit_of = lambda k: k if isinstance(k, triton.runtime.jit.JITFunction) else jit_of(k.fn); "
        "assert all(isinstance(jit_of(k), triton.runtime.jit.JITFunction) for k in ks); "
        "print([len(k.configs) for k in ks], C._siglip_kernel.configs[0] is C._GPU_CONFIGS[0])"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr
    n = len(C._GPU_CONFIGS)
    assert out.stdout.strip() == f"[{n}, {n}, {n}, {len(R._GPU_CONFIGS)}] True"


# ------------------------------------------------------------------ preferred design


def test_compare_designs_records_the_fastest_and_the_clip_backward_follows(
    config_dirs, fake_cuda, monkeypatch
):
    """The tuner times the contrastive family's CLIP backward designs (here with a fake
    timer on the CPU) and records the fastest in designs.json; a CUDA device then runs it
    unless $VLMKERNELS_CLIP_BACKWARD or an argument says otherwise; CPU tensors keep
    "chunked"; a malformed file or entry, or a design it does not know, is ignored with a
    warning."""
    from vlmkernels.ops.contrastive import fused_backward

    user, package = config_dirs
    if not _common.INTERPRETED:
        pytest.skip("runs the losses through the interpreter")
    monkeypatch.delenv(fused_backward.ENV_DESIGN, raising=False)
    calls = []

    def bench(fn):  # the fused design is the faster
        design = os.environ.get(fused_backward.ENV_DESIGN)
        calls.append(design)
        fn()
        return 1.0 if design == "fused" else 3.0

    shapes = {"contrastive": [dict(N=24, d=16, dtype="fp32")]}
    lines = []
    families = {"contrastive": fam.families()["contrastive"]}
    written = TU._compare_designs(shapes, torch.device("cpu"), H100_DIR, bench, user,
                                  lines.append, families)  # fmt: skip
    assert written == {"designs": user / H100_DIR / "designs.json"}
    assert calls == ["chunked", "fused"]
    doc = json.loads(written["designs"].read_text())
    assert doc["designs"]["clip_backward"] == {"design": "fused", "shapes": 1,
                                               "chunked_ms": 3.0, "fused_ms": 1.0}  # fmt: skip
    assert "clip_backward" in lines[-1] and lines[-1].endswith("fused")
    cuda0 = torch.device("cuda", 0)
    assert fused_backward.clip_backward_design(None, cuda0) == "fused"
    assert fused_backward.clip_backward_design(None, torch.device("cpu")) == "chunked"
    assert fused_backward.clip_backward_design("chunked", cuda0) == "chunked"
    monkeypatch.setenv(fused_backward.ENV_DESIGN, "fused_deterministic")
    assert fused_backward.clip_backward_design(None, cuda0) == "fused_deterministic"
    monkeypatch.delenv(fused_backward.ENV_DESIGN)
    # a design this version does not know (a file of another version): ignored, warned
    T.record_preferred_design("clip_backward", "sideways", H100, user)
    with pytest.warns(T.MalformedConfigWarning, match="design 'sideways' is not one of"):
        assert fused_backward.clip_backward_design(None, cuda0) == "chunked"
    (user / H100_DIR / "designs.json").write_text('{"designs": {"clip_backward": 3}}')
    T.clear_cache()
    with pytest.warns(T.MalformedConfigWarning, match="no design name"):
        assert T.preferred_design("clip_backward", H100) is None
    assert fused_backward.clip_backward_design(None, cuda0) == "chunked"


def test_prepared_launches_step_aside_while_the_tuner_records():
    """The ops that cache prepared launches per layout (the whole-loss path, the attention
    forward and backward, the Q-Former's add + LayerNorm, rope) launch through the tuned
    kernels while the tuner records, even where a launch of that layout was prepared
    before: each launch is seen. Before, a cached plan bypassed the recording."""
    from vlmkernels.ops.attention.qformer import add_layernorm

    x, y = torch.randn(6, 16), torch.randn(6, 16)
    q, k = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 7, 16)
    h, w, b = torch.randn(4, 16), torch.randn(16), torch.randn(16)
    qr, kr = torch.randn(1, 5, 2, 16), torch.randn(1, 5, 2, 16)
    cos, sin = torch.randn(1, 5, 16), torch.randn(1, 5, 16)
    qg, hg = q.clone().requires_grad_(), h.clone().requires_grad_()
    calls = {
        "clip_stats": lambda: vlmkernels.clip_loss(x, y, 10.0),
        "attention_fwd_fp32": lambda: vlmkernels.attention(q, k, k),
        "attention_bwd_q_fp32": lambda: vlmkernels.attention(qg, k, k).sum().backward(),
        "qformer_add_ln_fwd": lambda: add_layernorm(h, h, w, b),
        "qformer_add_ln_bwd": lambda: add_layernorm(hg, h, w, b).sum().backward(),
        "rope": lambda: vlmkernels.rope(qr, kr, cos, sin, 2),
    }
    for name, call in calls.items():
        call()  # prepares and caches this layout's launches
        with T._record() as recorded:
            call()
        assert name in {c.kernel.name for c in recorded}, name


def test_prepared_caches_are_bounded():
    """A prepared-launch cache keeps at most PREPARED_LAYOUTS layouts, dropping the oldest:
    shapes that change every call cannot grow it without end."""
    cache = T.prepared_cache()
    for i in range(T.PREPARED_LAYOUTS + 5):
        cache[i] = i
    assert len(cache) == T.PREPARED_LAYOUTS
    assert 0 not in cache and 4 not in cache and 5 in cache and cache.get(T.PREPARED_LAYOUTS + 4)
    cache[5] = "again"  # replacing a key drops nothing
    assert len(cache) == T.PREPARED_LAYOUTS and 6 in cache
    with T._record():  # nothing is found while the tuner records (it must see each launch)
        assert cache.get(5) is None and cache.get(5, "default") == "default"
    assert cache.get(5) == "again"
    T.clear_cache()
    assert not cache


def test_bounded_cache_from_several_threads():
    """Threads storing into a full cache at once never fail (each may drop an entry the
    others dropped already) and the bound holds."""
    import threading

    from vlmkernels.core.configs import BoundedCache

    cache = BoundedCache(8)
    errors = []

    def store(offset):
        try:
            for i in range(20000):
                cache[(offset, i)] = i
        except Exception as exc:  # noqa: BLE001 - recorded for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=store, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(cache) <= 8 + len(threads)


def test_kernels_that_add_into_their_outputs_restore_them_when_autotuned():
    """VLMKERNELS_AUTOTUNE=1 runs each config on the call's own tensors: a kernel that adds
    into an output (atomics, read-modify-write partials, an in-place update) must have the
    autotuner restore it between trials, or the first call's result holds several sums."""
    from vlmkernels.ops.connectors import kernels as CK
    from vlmkernels.ops.contrastive import fused_backward as FB

    accumulating = {
        FB._clip_fused_grad_kernel: {"dx_ptr", "dy_ptr"},
        CK._norm_grad_kernel: {"part_w_ptr", "part_b_ptr"},
        CK._deepstack_kernel: {"h_ptr"},
        R._rope_kernel: {"qo_ptr", "ko_ptr"},
    }
    for kernel, outputs in accumulating.items():
        assert outputs <= set(kernel.restore_value or ()), kernel.name
        assert outputs <= set(kernel.fn.arg_names), kernel.name


def test_config_warnings_point_at_the_caller(config_dirs):
    """The config warnings name the caller's line, not a frame inside vlmkernels or
    pytest (their fixed stacklevel pointed one frame past ``lookup``'s caller)."""
    user, package = config_dirs
    key = stats_key()
    with pytest.warns(T.DefaultConfigWarning) as record:
        T.lookup("clip_stats", key, device=H100)
    assert [w.filename for w in record] == [__file__]
    write(user, "clip_stats", [(key, entry(SPACE[1]))], source_hash="stale")
    T.clear_cache()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        T.lookup("clip_stats", key, device=H100)  # the stale file, then the default
    assert {w.category for w in record} == {T.StaleConfigWarning, T.DefaultConfigWarning}
    assert {w.filename for w in record} == {__file__}

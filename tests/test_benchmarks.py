"""Smoke tests of the benchmark harness (``python -m benchmarks``), a few seconds on a CPU.

One tiny case (N=64, d=32) per provider available here runs through the real CLI into a
temporary ``--out`` directory; the CSV must hold every expected row with positive, finite
values, and ``benchmarks/results/`` must stay untouched.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlmkernels.cli import load_benchmarks

REPO = Path(__file__).resolve().parent.parent
# `benchmarks` is a folder of the checkout, not an installed package: imported from its
# location, as `vlmkernels bench` does
load_benchmarks(REPO)

from benchmarks import (  # noqa: E402
    bench_connectors,
    bench_contrastive,
    bench_rope,
    bench_tokens,
    bench_tokens_pool,
    targets,
)
from benchmarks.env import Environment  # noqa: E402
from benchmarks.harness import MODES, Case, Record  # noqa: E402
from benchmarks.report import COLUMNS, CsvSink, table  # noqa: E402

RESULTS_CSV = REPO / "benchmarks" / "results" / "contrastive.csv"
ON_GPU = torch.cuda.is_available()
PROVIDERS = {
    "clip_loss": ["vlmkernels", "eager", "compile"],
    "siglip_loss": ["vlmkernels", "eager", "compile"],
}
RATE_METRICS = ("tflops", "gbps", "pct_matmul_ceiling", "pct_copy_ceiling")


def _positive(text: str) -> bool:
    return text != "" and math.isfinite(float(text)) and float(text) > 0


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    before = RESULTS_CSV.stat() if RESULTS_CSV.exists() else None
    proc = subprocess.run(
        [
            sys.executable, "-m", "benchmarks", "contrastive",
            "--shape", "N=64", "--shape", "d=32",
            "--modes", "fwd,bwd,fwd+bwd",
            "--compile-backend", "aot_eager",  # Inductor's first compile alone takes ~20 s
            "--out", str(out),
        ],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        # as `python -m benchmarks` runs: conftest's TRITON_INTERPRET is for the op tests
        env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
    )  # fmt: skip
    after = RESULTS_CSV.stat() if RESULTS_CSV.exists() else None
    with (out / "contrastive.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    return proc, rows, before, after, sorted(p.name for p in out.iterdir())


def _rows(rows, **match):
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


def test_cli_runs_and_leaves_results_dir_alone(smoke):
    proc, _, before, after, files = smoke
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert files == ["contrastive.csv"]
    assert (before is None) == (after is None)
    if before is not None:
        assert (before.st_mtime_ns, before.st_size) == (after.st_mtime_ns, after.st_size)
    if not ON_GPU:
        assert "No CUDA device found: running the CPU sweep" in proc.stdout
    assert "Targets (N=32768" in proc.stdout and "not measured" in proc.stdout


def test_csv_has_expected_rows(smoke):
    _, rows, *_ = smoke
    assert rows and list(rows[0]) == COLUMNS
    for r in rows:
        assert r["torch"] and r["triton"] and r["python"] and r["vlmkernels"] and r["device"]
    assert len({r["run_id"] for r in rows}) == 1
    for metric in ("copy_gbps", "matmul_tflops"):
        (ceil,) = _rows(rows, op="ceiling", metric=metric)
        assert _positive(ceil["p50"])
    for op, providers in PROVIDERS.items():
        for provider in providers:
            for mode in ("fwd", "fwd+bwd"):
                case = dict(op=op, provider=provider, mode=mode, shape="N=64,d=32")
                (ms,) = _rows(rows, **case, metric="ms")
                assert ms["status"] == "ok", ms
                assert ms["x_name"] == "N" and ms["x_value"] == "64" and ms["dtype"]
                p20, p50, p80 = (float(ms[k]) for k in ("p20", "p50", "p80"))
                assert 0 < p20 <= p50 <= p80 and math.isfinite(p80)
                for metric in RATE_METRICS:
                    (rate,) = _rows(rows, **case, metric=metric)
                    assert all(_positive(rate[k]) for k in ("p50", "p20", "p80")), rate
                (mem,) = _rows(rows, **case, metric="peak_mem_mb")
                if ON_GPU:
                    assert mem["status"] == "ok" and _positive(mem["p50"])
                else:
                    assert mem["status"] == "not_measured" and mem["p50"] == ""
            (bwd,) = _rows(rows, op=op, provider=provider, mode="bwd", metric="ms")
            assert bwd["status"] in ("ok", "below_noise"), bwd
            if bwd["status"] == "ok":
                assert _positive(bwd["p50"])
        for other in providers[1:]:
            for mode in ("fwd", "bwd", "fwd+bwd"):
                found = _rows(rows, op=op, provider="vlmkernels", mode=mode,
                              metric=f"speedup_vs_{other}")  # fmt: skip
                bwd_noisy = mode == "bwd" and len(found) == 0
                assert bwd_noisy or (len(found) == 1 and _positive(found[0]["p50"]))


def test_providers_compute_the_same_loss(smoke):
    _, rows, *_ = smoke
    for op, providers in PROVIDERS.items():
        losses = {r["provider"]: float(r["p50"]) for r in _rows(rows, op=op, metric="loss")}
        assert sorted(losses) == sorted(providers + (["inf_cl"] if "inf_cl" in losses else []))
        ref = losses["eager"]
        assert all(math.isclose(v, ref, rel_tol=2e-2 if ON_GPU else 1e-4) for v in losses.values())


def test_unavailable_provider_is_recorded(smoke):
    _, rows, *_ = smoke
    inf = _rows(rows, op="clip_loss", provider="inf_cl")
    if bench_contrastive.inf_cl_available(torch.device("cuda" if ON_GPU else "cpu")) is None:
        assert any(r["status"] == "ok" for r in inf)
    else:
        (row,) = inf
        assert row["status"] == "unavailable" and row["note"]


def test_eager_baselines_match_open_clip(open_clip_loss):
    loss = open_clip_loss
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(48, 16, generator=g), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(48, 16, generator=g), dim=-1)
    s, b = torch.tensor(14.3), torch.tensor(-3.0)
    torch.testing.assert_close(
        bench_contrastive.clip_eager(x, y, s), loss.ClipLoss()(x, y, s), rtol=0, atol=0
    )
    torch.testing.assert_close(
        bench_contrastive.clip_eager(x, y, s, b), loss.ClipLoss()(x, y, s, b), rtol=0, atol=0
    )
    torch.testing.assert_close(
        bench_contrastive.siglip_eager(x, y, s, b), loss.SigLipLoss()(x, y, s, b), rtol=0, atol=0
    )


def test_cost_models():
    shape = {"N": 1024, "d": 768}
    assert bench_contrastive.flops(shape, "fwd") == 2 * 1024**2 * 768
    assert bench_contrastive.flops(shape, "fwd+bwd") == 6 * 1024**2 * 768
    assert bench_contrastive.nbytes(shape, "bwd", 2) == 4 * 1024 * 768 * 2
    assert bench_contrastive.inf_cl_head_dim(1152) == 128
    assert bench_contrastive.inf_cl_head_dim(768) == 256
    # a projector's least traffic: X, W read and Y written forward; backward dY and X read,
    # dX written, W read and dW written (every weight is a leaf)
    m, k, n = 4608, 1024, 4096
    x, y, w = m * k, m * n, k * n + n * n
    llava = bench_connectors._bytes("llava_projector")
    assert llava({"M": m, "K": k, "N": n}, "fwd", 2) == (x + y + w) * 2
    assert llava({"M": m, "K": k, "N": n}, "fwd+bwd", 2) == (x + y + w + y + 2 * x + 2 * w) * 2
    f, s, c = 32, 27, 3584
    x, w = f * 26 * 26 * 1152, c * (1152 + c)  # avg2x2 pools the even 26 x 26 grid
    pooled = bench_tokens_pool._projector_model("proj_pool_avg2x2")[1]
    y = pooled({"F": f, "S": s, "K": 1152, "C": c}, "fwd", 1) - x - w
    assert pooled({"F": f, "S": s, "K": 1152, "C": c}, "fwd+bwd", 1) == 2 * y + 3 * x + 3 * w
    assert bench_tokens.tome_flops({"B": 2, "N": 9, "C": 4}, "bwd") == 0.0


def test_csv_sink_merges_an_older_header(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("timestamp,op,legacy\n2020-01-01T00:00:00Z,old_op,42\n")
    env = Environment(*(["e"] * len(Environment.__dataclass_fields__)))
    sink = CsvSink(path, "x", "N", "run", env)
    sink([Record(Case("new_op", "p", "fwd", (("N", 8),), "float32"), "ms", 1.5, 1.0, 2.0)])
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == COLUMNS + ["legacy"]
    assert rows[0]["op"] == "old_op" and rows[0]["legacy"] == "42"
    assert rows[1]["op"] == "new_op" and rows[1]["x_value"] == "8" and rows[1]["p50"] == "1.5"


def test_csv_sink_merge_interrupted_keeps_the_old_rows(tmp_path, monkeypatch):
    """Merging an older header rewrites the file: interrupted part-way (Ctrl-C, a full
    disk), the file keeps its rows as they were, and the next run merges it. The rewrite
    truncated the file first, so an interruption lost every result it held."""
    import benchmarks.report as report

    path = tmp_path / "x.csv"
    old = "timestamp,op,legacy\n" + "".join(
        f"2020-01-01T00:00:00Z,old_op{i},{i}\n" for i in range(50))  # fmt: skip
    path.write_text(old)
    path.chmod(0o640)
    env = Environment(*(["e"] * len(Environment.__dataclass_fields__)))

    class Interrupted(csv.DictWriter):
        def writerows(self, rows):
            for i, row in enumerate(rows):
                if i == 3:
                    raise KeyboardInterrupt
                self.writerow(row)

    monkeypatch.setattr(report.csv, "DictWriter", Interrupted)
    with pytest.raises(KeyboardInterrupt):
        CsvSink(path, "x", "N", "run", env)
    monkeypatch.undo()
    assert path.read_text() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.csv"]
    CsvSink(path, "x", "N", "run", env)
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 50 and rows[-1]["op"] == "old_op49" and rows[-1]["legacy"] == "49"
    assert path.stat().st_mode & 0o777 == 0o640


class _FakeNvml:
    """Stands in for pynvml: SM clock 1980 MHz, power-capped on the second sample."""

    NVML_CLOCK_SM, NVML_CLOCK_MEM, NVML_TEMPERATURE_GPU = 1, 2, 0

    def __init__(self):
        self.calls = 0

    def nvmlDeviceGetHandleByIndex(self, index):
        return f"gpu{index}"

    def nvmlDeviceGetClockInfo(self, handle, kind):
        return {1: 1980, 2: 2619}[kind]

    def nvmlDeviceGetTemperature(self, handle, sensor):
        return 41

    def nvmlDeviceGetPowerUsage(self, handle):
        return 312_500

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle):
        self.calls += 1
        return 0x1 if self.calls == 1 else 0x4

    def nvmlDeviceGetViolationStatus(self, handle, policy):
        raise RuntimeError("not supported")  # optional counters may fail: ignored


def test_gpu_monitor_reads_nvml_and_flags_throttling(monkeypatch):
    from benchmarks import env

    fake = _FakeNvml()
    monkeypatch.setattr(env, "nvml", lambda: fake)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: 1 / 0)
    monitor = env.GpuMonitor(torch.device("cuda", 0))
    assert monitor.available
    before, after = monitor.sample(), monitor.sample()
    assert before["sm_clock_mhz"] == 1980 and before["power_w"] == 312.5
    assert before["throttle_reasons"] == "gpu_idle"
    assert after["throttle_reasons"] == "sw_power_cap"
    assert env.GpuMonitor.throttled(before, before) == "no"
    assert env.GpuMonitor.throttled(before, after) == "yes"
    grown = dict(before, _power_violation_ns=10)
    assert env.GpuMonitor.throttled(dict(before, _power_violation_ns=0), grown) == "yes"
    cpu = env.GpuMonitor(torch.device("cpu"))
    assert not cpu.available and env.GpuMonitor.throttled(cpu.sample(), cpu.sample()) == ""


def _toy_suite():
    """A one-op suite whose providers succeed, run out of memory, skip or are missing."""
    from benchmarks.harness import OpSpec, Prepared, Provider, Skip, Suite

    def ok(args):
        w = torch.randn(args.shape["n"], args.shape["n"], requires_grad=True)
        return Prepared(lambda: (w @ w).square().mean(), (w,), "toy")

    def oom_at_build(args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    class _OomBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.sum()

        @staticmethod
        def backward(ctx, g):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory in backward")

    def oom_in_backward(args):
        w = torch.randn(args.shape["n"], requires_grad=True)
        return Prepared(lambda: _OomBackward.apply(w), (w,))

    def skip(args):
        raise Skip("not for this shape")

    providers = (
        Provider("ref", ok),
        Provider("oom_build", oom_at_build),
        Provider("oom_bwd", oom_in_backward),
        Provider("skipper", skip),
        Provider("missing", ok, available=lambda device: "no such library"),
        Provider("capped", ok, limit=lambda shape: "too big" if shape["n"] > 8 else None),
    )
    op = OpSpec("toy", providers, lambda s, m: 2.0 * s["n"] ** 3, lambda s, m, e: 3.0 * s["n"] ** 2)
    return Suite("toy", (op,), lambda profile: {"n": [8, 16]}, x_name="n", reference="ref")


def test_runner_records_oom_skip_and_unavailable_and_goes_on():
    from benchmarks.ceilings import Ceilings
    from benchmarks.env import GpuMonitor
    from benchmarks.harness import RunConfig, Runner
    from benchmarks.timing import Timing

    suite = _toy_suite()
    cpu = torch.device("cpu")
    cfg = RunConfig(device=cpu, dtype=torch.float32, profile="cpu", modes=MODES)
    t = Timing(1.0, 1.0, 1.0)
    ceil = Ceilings(10.0, 1 << 20, 1.0, 64, torch.float32, t, t)
    written = []
    results = Runner(suite, cfg, ceil, GpuMonitor(cpu), written.extend).run(suite.ops)
    assert written == results.records

    def status(provider, n, mode="fwd+bwd"):
        rec = results.find(Case("toy", provider, mode, (("n", n),), "float32"), "ms")
        return rec.status if rec is not None else None

    for n in (8, 16):
        assert status("ref", n) == "ok" and status("ref", n, "bwd") in ("ok", "below_noise")
        assert status("oom_build", n) == "oom" and status("oom_build", n, "fwd") == "oom"
        assert status("oom_bwd", n, "fwd") == "ok" and status("oom_bwd", n) == "oom"
        assert status("oom_bwd", n, "bwd") == "oom"
        assert status("skipper", n) == "skipped"
    assert status("capped", 8) == "ok" and status("capped", 16) == "skipped"
    assert results.unavailable == {("toy", "missing"): "no such library"}
    ref16 = Case("toy", "ref", "fwd+bwd", (("n", 16),), "float32")
    assert results.find(ref16, "speedup_vs_capped") is None  # capped did not run at n=16
    assert results.find(ref16, "speedup_vs_oom_bwd") is None
    assert results.get(Case("toy", "oom_build", "fwd+bwd", (("n", 8),), "float32"), "ms").reason
    tflops = results.find(ref16, "tflops")
    ms = results.find(ref16, "ms")
    assert math.isclose(tflops.p50, 2.0 * 16**3 / (ms.p50 * 1e-3) / 1e12)
    assert math.isclose(tflops.p20, 2.0 * 16**3 / (ms.p80 * 1e-3) / 1e12)


def test_provider_in_its_own_dtype_gets_its_rows_bytes_and_ceiling():
    """A provider that computes in fp32 within a bf16 run (the Q-Former's fp32 modules):
    its rows say float32, its byte model takes 4-byte elements, its % of matmul ceiling
    the fp32 ceiling (asked for once), and it is still compared with the reference."""
    from benchmarks.ceilings import Ceilings
    from benchmarks.env import GpuMonitor
    from benchmarks.harness import OpSpec, Prepared, Provider, RunConfig, Runner, Suite
    from benchmarks.timing import Timing

    def ok(args):
        w = torch.randn(8, 8, requires_grad=True)
        return Prepared(lambda: (w @ w).square().mean(), (w,), "toy")

    providers = (Provider("ref", ok), Provider("wide", ok, dtype=torch.float32))
    op = OpSpec("toy", providers, lambda s, m: 2.0 * s["n"] ** 3, lambda s, m, e: e * 1e6)
    suite = Suite("toy", (op,), lambda profile: {"n": [8]}, x_name="n", reference="ref")
    cpu = torch.device("cpu")
    cfg = RunConfig(device=cpu, dtype=torch.bfloat16, profile="cpu", modes=("fwd",))
    t = Timing(1.0, 1.0, 1.0)
    asked = []

    def ceilings_of(dtype):
        asked.append(dtype)
        return Ceilings(10.0, 1 << 20, 4.0, 64, dtype, t, t)

    bf16 = Ceilings(10.0, 1 << 20, 100.0, 64, torch.bfloat16, t, t)
    runner = Runner(suite, cfg, bf16, GpuMonitor(cpu), lambda records: None, ceilings_of)
    results = runner.run(suite.ops)
    ref = Case("toy", "ref", "fwd", (("n", 8),), "bfloat16")
    wide = Case("toy", "wide", "fwd", (("n", 8),), "float32")
    for case, itemsize, ceiling in ((ref, 2, 100.0), (wide, 4, 4.0)):
        ms = results.find(case, "ms").p50
        assert math.isclose(results.find(case, "gbps").p50, itemsize * 1e6 / (ms * 1e-3) / 1e9)
        pct = results.find(case, "pct_matmul_ceiling").p50
        assert math.isclose(pct, 100 * 2.0 * 8**3 / (ms * 1e-3) / 1e12 / ceiling)
    assert asked == [torch.float32]
    assert results.find(ref, "speedup_vs_wide") is not None
    assert "x" in table(results, "toy", "ref").splitlines()[-1]


def test_cuda_timer_asks_do_bench_for_quantiles(monkeypatch):
    import triton.testing

    from benchmarks import timing

    calls = []

    def fake_do_bench(fn, warmup, rep, grad_to_none, quantiles):
        calls.append((warmup, rep, grad_to_none, quantiles))
        return [2.0, 1.5, 3.0]

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    w = torch.zeros(1, requires_grad=True)
    fast = timing.time_cuda(lambda: None, (w,), estimate_ms=1.0)
    slow = timing.time_cuda(lambda: None, (), estimate_ms=400.0)
    assert (fast.p50, fast.p20, fast.p80) == (2.0, 1.5, 3.0)
    assert calls[0] == (25, 100, [w], [0.5, 0.2, 0.8])
    assert calls[1] == (1, 1200.0, None, [0.5, 0.2, 0.8]) and slow.reps is None


# --------------------------------------------------------------------------------------
# M-RoPE suite (benchmarks/bench_rope.py)
# --------------------------------------------------------------------------------------

ROPE_CSV = REPO / "benchmarks" / "results" / "rope.csv"
ROPE_PROVIDERS = ["vlmkernels", "vlmkernels_positions", "eager", "compile"]
ROPE_SHAPE = "B=1,S=48"


@pytest.fixture(scope="module")
def rope_smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_rope")
    before = ROPE_CSV.stat() if ROPE_CSV.exists() else None
    proc = subprocess.run(
        [
            sys.executable, "-m", "benchmarks", "rope", "--shape", "S=48",
            "--modes", "fwd,bwd,fwd+bwd", "--compile-backend", "aot_eager", "--out", str(out),
        ],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        # one thread: on a shared 2-core machine, 2-thread tiny ops stall on the busy core
        env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        | {"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    after = ROPE_CSV.stat() if ROPE_CSV.exists() else None
    with (out / "rope.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    return proc, rows, before, after, sorted(p.name for p in out.iterdir())


def test_rope_cli_runs_and_prints_targets(rope_smoke):
    proc, _, before, after, files = rope_smoke
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert files == ["rope.csv"]
    if before is not None:
        assert (before.st_mtime_ns, before.st_size) == (after.st_mtime_ns, after.st_size)
    assert "Targets (mrope: Qwen2-VL-7B" in proc.stdout
    assert "% of copy ceiling: target >= 90" in proc.stdout
    assert "ms / compile ms: target <= 1/3" in proc.stdout
    if not ON_GPU:
        assert proc.stdout.count(": not measured (") == 12


def test_rope_csv_has_expected_rows(rope_smoke):
    _, rows, *_ = rope_smoke
    assert rows and list(rows[0]) == COLUMNS
    assert len({r["run_id"] for r in rows}) == 1
    for op in bench_rope.CONFIGS:
        for provider in ROPE_PROVIDERS:
            for mode in ("fwd", "fwd+bwd"):
                case = dict(op=op, provider=provider, mode=mode, shape=ROPE_SHAPE)
                (ms,) = _rows(rows, **case, metric="ms")
                assert ms["status"] == "ok", ms
                assert ms["x_name"] == "S" and ms["x_value"] == "48"
                for metric in RATE_METRICS:
                    (rate,) = _rows(rows, **case, metric=metric)
                    assert all(_positive(rate[k]) for k in ("p50", "p20", "p80")), rate
                (pct,) = _rows(rows, **case, metric="pct_copy_ceiling")
                (gbps,) = _rows(rows, **case, metric="gbps")
                nbytes = bench_rope.byte_model(op)({"B": 1, "S": 48}, mode, 4)
                assert math.isclose(
                    float(gbps["p50"]), nbytes / float(ms["p50"]) / 1e6, rel_tol=1e-4
                )
                assert float(pct["p50"]) > 0
            (bwd,) = _rows(rows, op=op, provider=provider, mode="bwd", metric="ms")
            assert bwd["status"] in ("ok", "below_noise"), bwd
        for other in ROPE_PROVIDERS[1:]:
            for mode in ("fwd", "fwd+bwd"):
                (s,) = _rows(rows, op=op, provider="vlmkernels", mode=mode, shape=ROPE_SHAPE,
                             metric=f"speedup_vs_{other}")  # fmt: skip
                (ref,) = _rows(rows, op=op, provider="vlmkernels", mode=mode, metric="ms",
                               shape=ROPE_SHAPE)  # fmt: skip
                (oth,) = _rows(rows, op=op, provider=other, mode=mode, metric="ms",
                               shape=ROPE_SHAPE)  # fmt: skip
                assert math.isclose(
                    float(s["p50"]), float(oth["p50"]) / float(ref["p50"]), rel_tol=1e-4
                )
        for provider in ("vlmkernels_cuda", "vlmkernels_cuda_positions"):
            found = _rows(rows, op=op, provider=provider)
            reason = bench_rope.cuda_available(op)(torch.device("cuda" if ON_GPU else "cpu"))
            if reason is None:
                assert any(r["status"] == "ok" and "backend=cuda" in r["note"] for r in found)
            else:
                (row,) = found
                assert row["status"] == "unavailable" and row["note"] == reason
        liger = _rows(rows, op=op, provider="liger")
        reason = bench_rope.liger_available(op)(torch.device("cuda" if ON_GPU else "cpu"))
        if reason is None:
            assert any(r["status"] == "ok" for r in liger)
        else:
            (row,) = liger
            assert row["status"] == "unavailable" and row["note"] == reason


def test_rope_providers_compute_the_same_checksum(rope_smoke):
    """L = <q_out, G_q> + <k_out, G_k> sums n products of unit normals: its scale is sqrt(n)
    and it may sit near 0, so differences are judged against sqrt(n), not against L."""
    _, rows, *_ = rope_smoke
    for op in bench_rope.CONFIGS:
        losses = {r["provider"]: float(r["p50"]) for r in _rows(rows, op=op, metric="loss")}
        assert set(ROPE_PROVIDERS) <= set(losses), losses
        scale = math.sqrt(bench_rope.qk_elements(op, {"B": 1, "S": 48}))
        tol = 2e-2 if ON_GPU else 1e-4  # bf16 on a GPU (eager rounds 3 times), fp32 here
        ref = losses["eager"]
        assert all(abs(v - ref) <= tol * scale for v in losses.values()), (op, losses)


def test_rope_backend_comparison_judges_cuda_against_triton():
    """The summary's CUDA C++ / Triton lines at S = 16384: a ratio and a verdict where both
    were measured, the reason where one was not."""
    from benchmarks.harness import Record, Results

    results = Results()
    s = targets.ROPE_BACKENDS[0].shape_dict["S"]
    for provider, ms in (
        ("vlmkernels", 2.0),
        ("vlmkernels_cuda", 1.5),
        ("vlmkernels_positions", 2.0),
        ("vlmkernels_cuda_positions", 2.5),
    ):
        results.add([Record(bench_rope._case("mrope", provider, "fwd", s), "ms", p50=ms)])
    lines = bench_rope._backend_comparison(results)
    assert lines[0].startswith(f"CUDA C++ / Triton time at S={s}")

    def line(label):
        (found,) = [x for x in lines if x.startswith(f"  {label}: ")]
        return found.removeprefix(f"  {label}: ")

    assert line("mrope fwd vlmkernels_cuda / vlmkernels") == "0.750 (1.5 / 2 ms): HIT"
    pos = line("mrope fwd vlmkernels_cuda_positions / vlmkernels_positions")
    assert pos == "1.250 (2.5 / 2 ms): MISS by 25.0 %"
    assert line("mrope bwd vlmkernels_cuda / vlmkernels").startswith("not measured (")
    assert line("vision_rope fwd+bwd vlmkernels_cuda / vlmkernels").startswith("not measured (")


def test_rope_cost_models():
    shape = {"B": 1, "S": 1024}
    qk = (28 + 4) * 1024 * 128
    assert bench_rope.byte_model("mrope")(shape, "fwd", 2) == 2 * qk * 2
    assert bench_rope.byte_model("mrope")(shape, "bwd", 2) == 2 * qk * 2
    assert bench_rope.byte_model("mrope")(shape, "fwd+bwd", 2) == 4 * qk * 2
    assert bench_rope.flop_model("mrope")(shape, "fwd") == 6 * qk
    vision = (16 + 16) * 16384 * 80
    assert bench_rope.byte_model("vision_rope")({"B": 1, "S": 16384}, "fwd", 2) == 2 * vision * 2
    assert bench_rope.table_bytes("mrope", shape, 2) == 2 * 1024 * 128 * 2
    assert bench_rope.table_bytes("vision_rope", shape, 2) == 2 * 1024 * 80 * 4
    # Qwen3.5: q, k moved over the whole head (256 lanes, 192 of them copied), the table and
    # the arithmetic over the 64 rotated lanes
    partial = (16 + 4) * 1024 * 256
    assert bench_rope.byte_model("mrope_partial")(shape, "fwd", 2) == 2 * partial * 2
    assert bench_rope.byte_model("mrope_partial")(shape, "fwd+bwd", 2) == 4 * partial * 2
    assert bench_rope.flop_model("mrope_partial")(shape, "fwd") == 6 * partial // 4
    assert bench_rope.table_bytes("mrope_partial", shape, 2) == 2 * 1024 * 64 * 2
    # GLM-4V: the same over its 128-lane head, of which the first 64 rotate (in pairs)
    pairs = (32 + 2) * 1024 * 128
    assert bench_rope.byte_model("mrope_pairs")(shape, "fwd", 2) == 2 * pairs * 2
    assert bench_rope.byte_model("mrope_pairs")(shape, "fwd+bwd", 2) == 4 * pairs * 2
    assert bench_rope.flop_model("mrope_pairs")(shape, "fwd") == 6 * pairs // 2
    assert bench_rope.table_bytes("mrope_pairs", shape, 2) == 2 * 1024 * 64 * 2


def test_rope_family_targets_cover_every_suite_op():
    """The targets set for the whole rotary family name every op of the suite: issue 11's
    host budget all of them, issue 5's CUDA C++ / Triton comparison every op the CUDA C++
    kernels take (not GLM-4V's paired lanes, whose CUDA C++ providers are unavailable)."""
    assert targets.ROPE_OPS == tuple(bench_rope.CONFIGS)
    cuda_ops = [op for op in bench_rope.CONFIGS if op not in bench_rope.CUDA_MISSING]
    assert targets.ROPE_CUDA_OPS == tuple(cuda_ops) and set(bench_rope.CUDA_MISSING) == {
        "mrope_pairs"
    }
    for issue, want in ((5, cuda_ops), (11, bench_rope.CONFIGS)):
        ops = {t.op for t in targets.for_suite("rope") if t.issue == issue}
        assert ops == set(want), issue


def test_rope_partial_tables_match_qwen3_5_rotary_class():
    """mrope_partial's inputs as Qwen3.5 builds them: 32 frequencies of theta 1e7, and the
    eager recomposition of the (3, B, S, 64) tables equal to Qwen3_5TextRotaryEmbedding's
    cos/sin (the installed transformers'; skipped where it has no Qwen3.5)."""
    mod = pytest.importorskip("transformers.models.qwen3_5.modeling_qwen3_5")
    from benchmarks.harness import BuildArgs

    cfg = bench_rope.CONFIGS["mrope_partial"]
    text = mod.Qwen3_5TextConfig()
    heads = (text.num_attention_heads, text.num_key_value_heads, text.head_dim)
    assert (cfg.heads_q, cfg.heads_k, cfg.head_dim) == heads
    rope = dict(text.rope_parameters, rope_theta=cfg.theta, mrope_section=list(cfg.section))
    rotary = mod.Qwen3_5TextRotaryEmbedding(mod.Qwen3_5TextConfig(rope_parameters=rope))
    args = BuildArgs("mrope_partial", {"B": 2, "S": 40}, torch.float32, torch.device("cpu"), 0, {})
    inp = bench_rope.make_inputs(args)
    assert inp.cos.shape == (3, 2, 40, cfg.rotary_dim) and inp.inv_freq.shape == (32,)
    torch.testing.assert_close(inp.inv_freq, rotary.inv_freq, rtol=0, atol=0)
    cos, sin = rotary(torch.zeros(1), inp.positions)
    merge = bench_rope.merge_interleaved
    torch.testing.assert_close(merge(inp.cos, cfg.section), cos, rtol=0, atol=0)
    torch.testing.assert_close(merge(inp.sin, cfg.section), sin, rtol=0, atol=0)
    # the eager baseline passes the lanes past the rotary dim through
    q, k = inp.views()
    fn, note = bench_rope.eager_function("mrope_partial", cfg.section)
    out_q, out_k = fn(q, k, inp.cos, inp.sin)
    assert "qwen3_5 apply_rotary_pos_emb" in note
    assert torch.equal(out_q[..., cfg.rotary_dim :], q[..., cfg.rotary_dim :])
    assert torch.equal(out_k[..., cfg.rotary_dim :], k[..., cfg.rotary_dim :])


def test_rope_pairs_tables_match_glm4v_rotary_class():
    """mrope_pairs' inputs as GLM-4V builds them: the heads of the default Glm4vTextConfig,
    its rotary class's default section and theta, 32 frequencies (partial_rotary_factor
    0.5), and the eager recomposition of the pair-ordered (3, B, S, 64) tables equal to
    Glm4vTextRotaryEmbedding's cos/sin in the order the installed function takes (the
    installed transformers'; skipped where it has no GLM-4V)."""
    mod = pytest.importorskip("transformers.models.glm4v.modeling_glm4v")
    from benchmarks.harness import BuildArgs

    cfg = bench_rope.CONFIGS["mrope_pairs"]
    assert cfg.pairs and not cfg.interleaved and cfg.rotary_dim == cfg.head_dim // 2
    text = mod.Glm4vTextConfig()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    assert (cfg.heads_q, cfg.heads_k, cfg.head_dim) == (
        text.num_attention_heads, text.num_key_value_heads, head_dim
    )  # fmt: skip
    assert text.rope_parameters["rope_theta"] == cfg.theta
    assert mod.Glm4vTextRotaryEmbedding(text).mrope_section == list(cfg.section)
    rope = dict(text.rope_parameters, partial_rotary_factor=cfg.rotary_dim / cfg.head_dim,
                mrope_section=list(cfg.section))  # fmt: skip
    rotary = mod.Glm4vTextRotaryEmbedding(mod.Glm4vTextConfig(rope_parameters=rope))
    args = BuildArgs("mrope_pairs", {"B": 2, "S": 40}, torch.float32, torch.device("cpu"), 0, {})
    inp = bench_rope.make_inputs(args)
    assert inp.cos.shape == (3, 2, 40, cfg.rotary_dim) and inp.inv_freq.shape == (32,)
    torch.testing.assert_close(inp.inv_freq, rotary.inv_freq, rtol=0, atol=0)
    assert torch.equal(inp.cos[..., 0::2], inp.cos[..., 1::2])  # each frequency twice
    cos, sin = rotary(torch.zeros(1), inp.positions)
    fn, order, _ = bench_rope.hf_pairs_function()
    assert fn is mod.apply_rotary_pos_emb and order in ("pairs", "halves")
    merge = bench_rope.merge_pairs
    torch.testing.assert_close(merge(inp.cos, cfg.section, order), cos, rtol=0, atol=0)
    torch.testing.assert_close(merge(inp.sin, cfg.section, order), sin, rtol=0, atol=0)
    # the eager baseline rotates pairs of the first 64 lanes and passes the rest through
    q, k = inp.views()
    fn, note = bench_rope.eager_function("mrope_pairs", cfg.section)
    out_q, out_k = fn(q, k, inp.cos, inp.sin)
    assert "glm4v apply_rotary_pos_emb" in note
    assert torch.equal(out_q[..., cfg.rotary_dim :], q[..., cfg.rotary_dim :])
    assert torch.equal(out_k[..., cfg.rotary_dim :], k[..., cfg.rotary_dim :])
    want = bench_rope._paired_rope_formula(q, k, merge(inp.cos, cfg.section),
                                           merge(inp.sin, cfg.section))  # fmt: skip
    torch.testing.assert_close((out_q, out_k), want, rtol=0, atol=0)


def test_rope_pairs_providers_agree_on_a_tiny_size():
    """The vlmkernels providers (PyTorch path, and the Triton kernel through the
    interpreter) compute GLM-4V's formula's q_out, k_out, checksum and gradients from the
    suite's inputs (8 tokens: text, image, text). The formula is eager's, written out (the
    test above checks it against transformers'; the CLI smoke run, every provider's
    checksum)."""
    import vlmkernels
    from benchmarks.harness import BuildArgs

    args = BuildArgs("mrope_pairs", {"B": 1, "S": 8}, torch.float32, torch.device("cpu"), 0, {})

    def build_formula(args):
        inp = bench_rope.make_inputs(args)
        section = bench_rope.CONFIGS["mrope_pairs"].section
        fn = lambda q, k: bench_rope.mrope_pairs_eager(q, k, inp.cos, inp.sin, section)
        return bench_rope._prepared(inp, fn, "formula")

    def run(build, backend=None):
        prepared = build(args)
        with vlmkernels.use_backend(backend) if backend else contextlib.nullcontext():
            outs = prepared.call()
            loss = prepared.fn().item()  # L, back-propagating G_q, G_k to the leaves
        return outs, loss, [leaf.grad for leaf in prepared.leaves]

    ref = run(build_formula)
    for build in (bench_rope.build_vlmkernels, bench_rope.build_vlmkernels_positions):
        for backend in ("torch", "triton"):
            got = run(build, backend)
            torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
            assert math.isclose(got[1], ref[1], rel_tol=1e-5, abs_tol=1e-3)
            torch.testing.assert_close(got[2], ref[2], rtol=1e-5, atol=1e-5)


def test_rope_pairs_cuda_providers_unavailable_with_the_reason():
    """The CUDA C++ kernels rotate halves only: the suite's reason, wherever it runs, and
    what the launcher says of a paired call (fits is False, a forced launch raises)."""
    from vlmkernels.ops.rope import CHUNKED, cuda
    from vlmkernels.ops.rope.kernels import PAIRS

    for device in (torch.device("cpu"), torch.device("cuda")):
        reason = bench_rope.cuda_available("mrope_pairs")(device)
        assert reason == bench_rope.CUDA_MISSING["mrope_pairs"] and "halves only" in reason
    assert bench_rope.cuda_available("mrope")(torch.device("cpu")) == (
        bench_rope.cuda_extension_available(torch.device("cpu"))
    )
    q, k = torch.zeros(1, 4, 2, 8), torch.zeros(1, 4, 1, 8)
    table = (torch.ones(3, 1, 4, 4), torch.zeros(3, 1, 4, 4))
    kw = dict(table=table, mode=CHUNKED | PAIRS, sections=(1, 1, 0))
    assert not cuda.fits(q, k, q, k, **kw)
    with pytest.raises(RuntimeError, match="halves only"):
        cuda.rope_launch(q, k, q, k, **kw)


def test_rope_pairs_tuning_workload_is_the_suite_shape():
    """vlmkernels tune covers mrope_pairs' shape (table and positions), and its workload
    launches the paired-lane kernel (here through the interpreter, 4 tokens, fp32)."""
    from vlmkernels.ops.rope import family, kernels, reference

    cfg = bench_rope.CONFIGS["mrope_pairs"]
    specs = [s for s in family.TUNE_SHAPES if s.get("pairs")]
    assert sorted(s["source"] for s in specs) == ["positions", "table"]
    for spec in specs:
        shape = (spec["heads_q"], spec["heads_k"], spec["head_dim"], spec["rotary_dim"])
        assert shape == (cfg.heads_q, cfg.heads_k, cfg.head_dim, cfg.rotary_dim)
        assert (spec["mode"], tuple(spec["sections"])) == ("chunked", cfg.section)
        q, k, qo, ko, options = family.tune_inputs(
            dict(spec, tokens=4, dtype="fp32"), torch.device("cpu")
        )
        mode = options["mode"]
        assert mode == kernels.CHUNKED | kernels.PAIRS
        kernels.launch(q, k, qo, ko, **options)
        if "table" in options:
            cos, sin = (reference.table_lanes(t, mode, cfg.section) for t in options["table"])
        else:
            cos, sin = reference.position_lanes(
                options["positions"], options["inv_freq"], mode, cfg.section, 1.0
            )
        for x, out in ((q, qo), (k, ko)):
            want = reference.rotate(x, cos, sin, False, mode)
            torch.testing.assert_close(out, want.to(out.dtype), rtol=1e-5, atol=1e-5)


def test_rope_positions_are_a_vl_sequence():
    pos = bench_rope.text_vision_positions(2, 64)  # 8 text, 48 image (width 7), 8 text
    assert pos.shape == (3, 2, 64) and pos.dtype == torch.int64
    assert torch.equal(pos[:, 0], pos[:, 1])
    text_before, image, text_after = pos[:, 0, :8], pos[:, 0, 8:56], pos[:, 0, 56:]
    assert torch.equal(text_before, torch.arange(8).expand(3, 8))
    assert torch.equal(image[0], torch.full((48,), 8))
    assert torch.equal(image[1], 8 + torch.arange(48) // 7)
    assert torch.equal(image[2], 8 + torch.arange(48) % 7)
    assert torch.equal(text_after, (image.max() + 1 + torch.arange(8)).expand(3, 8))
    hw = bench_rope.vision_positions(20)  # 6 x 6 grid in 2x2 merge order
    assert hw.shape == (20, 2)
    assert hw[:6].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3]]
    assert len({tuple(p) for p in bench_rope.vision_positions(36).tolist()}) == 36


def test_rope_eager_table_merges_follow_the_lane_rules():
    from vlmkernels.ops.rope import CHUNKED, INTERLEAVED
    from vlmkernels.ops.rope.reference import lane_axes

    for op, mode in (
        ("mrope", CHUNKED), ("mrope_interleaved", INTERLEAVED), ("mrope_partial", INTERLEAVED),
        ("mrope_pairs", CHUNKED),
    ):  # fmt: skip
        cfg = bench_rope.CONFIGS[op]
        half = cfg.rotary_dim // 2
        table = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 2, 5, cfg.rotary_dim)
        merge = bench_rope.merge_interleaved if cfg.interleaved else bench_rope.merge_chunked
        axes = lane_axes(half, mode, cfg.section).float()
        # paired lanes: frequency j on lanes 2j, 2j + 1; else on j and j + R / 2
        want = (axes.repeat_interleave(2) if cfg.pairs else axes.repeat(2)).expand(2, 5, -1)
        if cfg.pairs:
            merge = bench_rope.merge_pairs
        torch.testing.assert_close(merge(table, cfg.section), want, rtol=0, atol=0)
        assert table[0].eq(0).all()  # out of place


def _fake_liger(monkeypatch, with_vision: bool):
    """liger_kernel stand-ins whose functions are the eager formulas (Liger's signatures)."""
    import importlib.machinery
    import types

    def module(name, **attrs):
        m = types.ModuleType(name)
        m.__spec__ = importlib.machinery.ModuleSpec(name, None)
        m.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, m)
        return m

    calls = []

    def mrope(q, k, cos, sin, mrope_section, unsqueeze_dim=1):
        calls.append(("mrope", tuple(cos.shape), list(mrope_section)))
        return bench_rope.mrope_eager(q, k, cos, sin, mrope_section)

    def rope(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
        calls.append(("rope", tuple(cos.shape)))
        return bench_rope._rope_formula(q, k, cos, sin, unsqueeze_dim)

    def rope_vision(q, k, cos, sin):
        calls.append(("vision", tuple(cos.shape)))
        return bench_rope._vision_formula(q, k, cos, sin)

    module("liger_kernel", __version__="0.0.fake")
    module("liger_kernel.transformers")
    module("liger_kernel.transformers.qwen2vl_mrope", liger_multimodal_rotary_pos_emb=mrope)
    extra = {"liger_rotary_pos_emb_vision": rope_vision} if with_vision else {}
    module("liger_kernel.transformers.rope", liger_rotary_pos_emb=rope, **extra)
    return calls


def test_rope_liger_wiring_with_a_stand_in(monkeypatch):
    from benchmarks.harness import BuildArgs, Skip

    _fake_liger(monkeypatch, with_vision=False)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert bench_rope.liger_available("mrope")(cpu) == "Liger's Triton kernels need CUDA"
    assert bench_rope.liger_available("mrope")(cuda) is None
    assert "liger_rotary_pos_emb_vision missing in liger_kernel 0.0.fake" in (
        bench_rope.liger_available("vision_rope")(cuda)
    )
    calls = _fake_liger(monkeypatch, with_vision=True)
    # Liger has no partial-rotary or paired-lane function: unavailable whatever is
    # installed, with why
    assert set(bench_rope.LIGER_MISSING) == {"mrope_partial", "mrope_pairs"}
    for op, what in (("mrope_partial", "partial-rotary"), ("mrope_pairs", "paired-lane")):
        for device in (cpu, cuda):
            reason = bench_rope.liger_available(op)(device)
            assert reason == bench_rope.LIGER_MISSING[op] and what in reason
        args = BuildArgs(op, {"B": 1, "S": 40}, torch.float32, cpu, 0, {})
        with pytest.raises(Skip, match=what):
            bench_rope.build_liger(args)
    for op in [op for op in bench_rope.CONFIGS if op not in bench_rope.LIGER_MISSING]:
        args = BuildArgs(op, {"B": 1, "S": 40}, torch.float32, cpu, 0, {})
        liger, eager = bench_rope.build_liger(args), bench_rope.build_eager(args)
        assert liger.note
        torch.testing.assert_close(liger.fn(), eager.fn())
    assert [c[0] for c in calls] == ["mrope", "rope", "vision"]
    assert calls[0][1:] == ((3, 1, 40, 128), [16, 24, 24])  # the (3, B, S, D) tables
    assert calls[1][1] == (1, 40, 128)  # recomposed first, as Liger's Qwen3-VL patch runs
    assert calls[2][1] == (40, 80)


# --------------------------------------------------------------------------------------
# get_rope_index suite (benchmarks/bench_rope_index.py)
# --------------------------------------------------------------------------------------


def test_rope_index_suite_runs_and_providers_agree(tmp_path):
    pytest.importorskip("transformers")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "rope_index", "--shape", "B=2",
         "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        | {"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Target (B=8, forward): transformers ms / vlmkernels ms >= 50" in proc.stdout
    with (tmp_path / "rope_index.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    for op in ("get_rope_index_qwen2_vl", "get_rope_index_qwen3_vl"):
        times = {
            r["provider"]: float(r["p50"]) for r in rows if r["op"] == op and r["metric"] == "ms"
        }
        assert set(times) == {"vlmkernels", "transformers"} and min(times.values()) > 0
        # both return the last position of row 0: the same number
        losses = {r["provider"]: r["p50"] for r in rows if r["op"] == op and r["metric"] == "loss"}
        assert losses["vlmkernels"] == losses["transformers"], losses


def test_rope_index_batch_layout_matches_grids():
    from benchmarks.bench_rope_index import IMAGES, VIDEO, make_batch

    for model_type in ("qwen2_vl", "qwen3_vl"):
        _, types, mask, images, videos = make_batch(model_type, 3, torch.device("cpu"))
        assert images.shape == (2 * 3, 3) and videos.shape == (3, 3)
        vision = sum(t * h * w // 4 for t, h, w in (*IMAGES, VIDEO))
        assert ((types > 0) & (mask > 0)).sum(1).tolist() == [vision] * 3
        assert mask.sum(1).tolist() == sorted(mask.sum(1).tolist(), reverse=True)


# --------------------------------------------------------------------------------------
# Modes per suite, the CPU sweeps, the default output folder
# --------------------------------------------------------------------------------------


def _listed(capsys, *argv) -> dict[str, set[str]]:
    """{op: the modes --list gives its cases} of ``python -m benchmarks ARGV --list``."""
    from benchmarks.__main__ import main

    assert main([*argv, "--list"]) == 0
    out = {}
    for line in capsys.readouterr().out.splitlines():
        parts = line.split()
        if len(parts) == 5:
            out.setdefault(parts[0], set()).add(parts[4])
    return out


def test_each_suite_times_its_own_default_modes(capsys):
    listed = _listed(capsys, "get_rope_index_qwen2_vl", "mrope", "clip_loss")
    assert listed == {
        "get_rope_index_qwen2_vl": {"fwd"},
        "mrope": {"fwd,bwd,fwd+bwd"},
        "clip_loss": {"fwd,fwd+bwd"},
    }


def test_requested_modes_are_filtered_per_suite(capsys):
    from benchmarks.__main__ import main

    assert main(["rope_index", "mrope", "--modes", "fwd+bwd,fwd", "--list"]) == 0
    out = capsys.readouterr().out
    assert "rope_index: times fwd only; skips fwd+bwd (--modes fwd+bwd,fwd)" in out
    assert main(["rope_index", "clip_loss", "--modes", "bwd", "--list"]) == 0
    out = capsys.readouterr().out
    assert "rope_index: times fwd only; is left out (--modes bwd)" in out
    assert "get_rope_index" not in out.replace("rope_index:", "")
    assert main(["--modes", "fwd,sideways", "--list"]) == 2
    assert "python -m benchmarks: --modes: unknown mode(s) ['sideways']" in capsys.readouterr().err


@pytest.mark.skipif(ON_GPU, reason="the CPU sweeps")
def test_quick_on_a_cpu_is_one_shape_per_suite(capsys):
    from benchmarks import suites
    from benchmarks.__main__ import main

    assert main(["--quick", "--providers", "vlmkernels", "--list"]) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    for suite in suites().values():
        for op in suite.ops:
            shapes = {parts[2] for parts in lines if parts[0] == op.name}
            # the distributed suite: one shape of each of its two groups
            assert len(shapes) == (2 if suite.name == "contrastive_dist" else 1), (op, shapes)
    full = {s.name: len(s.shapes("cpu", {})) for s in suites().values()}
    assert full["contrastive"] == 2 and full["rope"] == 1  # the CPU sweep within 3 minutes


def _tracked_results() -> tuple[str, dict[str, bytes]]:
    status = subprocess.run(
        ["git", "status", "--porcelain", "--", "benchmarks/results"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    files = {p.name: p.read_bytes() for p in (REPO / "benchmarks" / "results").iterdir()}
    return status, files


@pytest.mark.skipif(not (REPO / ".git").exists(), reason="needs the git checkout")
def test_bench_writes_to_the_untracked_output_folder(tmp_path):
    """The entry point of ``make bench`` on a tiny case, all modes asked: each suite times
    what it can, the CSVs land in $VLMKERNELS_RESULTS_DIR and benchmarks/results/ (the
    committed CSVs) is untouched."""
    before = _tracked_results()
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "rope_index", "mrope", "--shape", "B=1",
         "--shape", "S=16", "--providers", "vlmkernels", "--modes", "fwd,bwd,fwd+bwd"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        | {"OMP_NUM_THREADS": "1", "VLMKERNELS_RESULTS_DIR": str(out)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _tracked_results() == before
    assert sorted(p.name for p in out.iterdir()) == ["rope.csv", "rope_index.csv"]
    assert "rope_index: times fwd only; skips bwd,fwd+bwd" in proc.stdout
    assert "ERROR" not in proc.stdout
    with (out / "rope_index.csv").open(newline="") as f:
        index_rows = [r for r in csv.DictReader(f) if r["metric"] == "ms" and r["mode"]]
    assert {r["mode"] for r in index_rows} == {"fwd"}
    assert {r["status"] for r in index_rows} == {"ok"}
    with (out / "rope.csv").open(newline="") as f:
        modes = {r["mode"] for r in csv.DictReader(f) if r["op"] == "mrope" and r["metric"] == "ms"}
    assert modes == {"fwd", "bwd", "fwd+bwd"}
    if not ON_GPU:
        from benchmarks.__main__ import CPU_NOTE

        assert proc.stdout.count(CPU_NOTE) == 2  # at the start and at the end
    assert f"results in {out}" in proc.stdout


def test_default_output_folder_is_git_ignored(monkeypatch):
    import benchmarks

    monkeypatch.delenv(benchmarks.OUTPUT_ENV, raising=False)
    assert benchmarks.output_dir() == Path("bench-results")
    monkeypatch.setenv(benchmarks.OUTPUT_ENV, "~/elsewhere")
    assert benchmarks.output_dir() == Path.home() / "elsewhere"
    if (REPO / ".git").exists():
        for path in ("bench-results/rope.csv", "benchmarks/bench-results/profile/x.json"):
            check = subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO)
            assert check.returncode == 0, f"{path} is not git-ignored"


def test_bad_out_folder_fails_before_measuring(tmp_path, monkeypatch, capsys):
    import benchmarks.__main__ as bench_main

    def measured(*args):
        raise AssertionError("the ceilings were measured before --out was checked")

    monkeypatch.setattr(bench_main, "measure", measured)
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert bench_main.main(["clip_loss", "--out", str(a_file)]) == 2
    assert capsys.readouterr().err == (
        f"python -m benchmarks: --out {a_file}: is a file, expected a folder\n"
    )
    assert bench_main.main(["clip_loss", "--out", str(a_file / "sub")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"python -m benchmarks: --out {a_file / 'sub'}: cannot write there")


# --------------------------------------------------------------------------------------
# Distributed contrastive suite (benchmarks/bench_contrastive_dist.py) and scaling model
# --------------------------------------------------------------------------------------

DIST_CSV = REPO / "benchmarks" / "results" / "contrastive_dist.csv"
RING_FILE = REPO / "vlmkernels" / "distributed" / "ring.py"
DIST_RING = "N=64,d=32"
DIST_QUEUE = "b=16,Q=48,d=32"


@pytest.fixture(scope="module")
def dist_smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_dist")
    before = DIST_CSV.stat() if DIST_CSV.exists() else None
    proc = subprocess.run(
        [
            sys.executable, "-m", "benchmarks", "contrastive_dist",
            "--shape", "N=64", "--shape", "d=32", "--shape", "b=16", "--shape", "Q=48",
            "--modes", "fwd,bwd,fwd+bwd", "--compile-backend", "aot_eager", "--out", str(out),
        ],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        | {"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    after = DIST_CSV.stat() if DIST_CSV.exists() else None
    with (out / "contrastive_dist.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    return proc, rows, before, after, sorted(p.name for p in out.iterdir())


def _assert_timed(rows, **case):
    (ms,) = _rows(rows, **case, metric="ms")
    assert ms["status"] == "ok", ms
    p20, p50, p80 = (float(ms[k]) for k in ("p20", "p50", "p80"))
    assert 0 < p20 <= p50 <= p80 and math.isfinite(p80)
    for metric in RATE_METRICS:
        (rate,) = _rows(rows, **case, metric=metric)
        assert all(_positive(rate[k]) for k in ("p50", "p20", "p80")), rate


def test_dist_cli_runs_and_prints_summary(dist_smoke):
    proc, _, before, after, files = dist_smoke
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert files == ["contrastive_dist.csv"]
    if before is not None:
        assert (before.st_mtime_ns, before.st_size) == (after.st_mtime_ns, after.st_size)
    assert "Ring overhead" in proc.stdout and "ALBEF/BLIP one direction" in proc.stdout
    for op in ("albef_itc", "albef_itc_distill", "blip_itc_ids"):
        assert f"  {op} {DIST_QUEUE}: eager / vlmkernels = " in proc.stdout


def test_dist_csv_rows(dist_smoke):
    from benchmarks import bench_contrastive_dist as bd

    _, rows, *_ = dist_smoke
    assert rows and list(rows[0]) == COLUMNS and len({r["run_id"] for r in rows}) == 1
    for op in bd.RING_OPS:
        for mode in ("fwd", "fwd+bwd"):
            _assert_timed(rows, op=op, provider="vlmkernels", mode=mode, shape=DIST_RING)
            ring = dict(op=op, provider="vlmkernels_ring", mode=mode, shape=DIST_RING)
            if RING_FILE.exists():
                _assert_timed(rows, **ring)
            else:  # skipped only for a missing ring module, with the reason recorded
                (row,) = _rows(rows, op=op, provider="vlmkernels_ring")
                assert row["status"] == "unavailable" and "missing" in row["note"]
        # the other group's shape is skipped with its reason, never run
        for r in _rows(rows, op=op, shape=DIST_QUEUE, metric="ms"):
            assert r["status"] == "skipped" and "not a shape of this op" in r["note"]
    for op in bd.QUEUE_OPS:
        for provider in ("vlmkernels", "eager", "compile"):
            for mode in ("fwd", "fwd+bwd"):
                _assert_timed(rows, op=op, provider=provider, mode=mode, shape=DIST_QUEUE)
        for r in _rows(rows, op=op, shape=DIST_RING, metric="ms"):
            assert r["status"] == "skipped" and "not a shape of this op" in r["note"]


def test_dist_providers_compute_the_same_loss(dist_smoke):
    from benchmarks import bench_contrastive_dist as bd

    _, rows, *_ = dist_smoke
    for op in (*bd.RING_OPS, *bd.QUEUE_OPS):
        losses = {r["provider"]: float(r["p50"]) for r in _rows(rows, op=op, metric="loss")}
        want = 2 if op in bd.RING_OPS and RING_FILE.exists() else 1 if op in bd.RING_OPS else 3
        assert len(losses) == want, (op, losses)
        ref = next(iter(losses.values()))
        assert all(math.isclose(v, ref, rel_tol=2e-2 if ON_GPU else 1e-4) for v in losses.values())


def test_dist_eager_formula_is_the_cross_entropy():
    from benchmarks.bench_contrastive_dist import itc_eager

    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(6 + 10, 8, generator=g), dim=-1)
    s = torch.tensor(14.0)
    want = torch.nn.functional.cross_entropy(q @ k.T * s, torch.arange(6))
    torch.testing.assert_close(itc_eager(q, k, s), want)
    ids = torch.tensor([0, 1, 1, 2, 3, 3])
    k_ids = torch.cat([ids, torch.tensor([1, 9, 9, 9, 0, 9, 9, 9, 9, 9])])
    pos = (ids[:, None] == k_ids[None]).float()
    want = -(torch.log_softmax(q @ k.T * s, 1) * pos / pos.sum(1, keepdim=True)).sum(1).mean()
    torch.testing.assert_close(itc_eager(q, k, s, query_ids=ids, key_ids=k_ids), want)


def test_dist_cost_models_and_shapes():
    from benchmarks import bench_contrastive_dist as bd

    shape = {"b": 256, "Q": 65536, "d": 256}
    mkd = 2 * 256 * 65792 * 256
    assert bd.queue_flops("albef_itc")(shape, "fwd") == mkd
    assert bd.queue_flops("albef_itc_distill")(shape, "fwd") == 2 * mkd
    assert bd.queue_flops("blip_itc_ids")(shape, "fwd+bwd") == 3 * mkd
    assert bd.queue_nbytes("albef_itc")(shape, "fwd", 2) == (256 + 65792) * 256 * 2
    assert bd.queue_nbytes("albef_itc_distill")(shape, "bwd", 2) == (512 + 65792) * 256 * 2
    assert bd.shape_list("quick", {}) == [
        {"N": 8192, "d": 768}, {"N": 32768, "d": 768}, {"b": 256, "Q": 65536, "d": 256},
    ]  # fmt: skip
    assert bd.shape_list("cpu", {"d": [8], "N": [4]}) == [
        {"N": 4, "d": 8}, {"b": 64, "Q": 2048, "d": 8},
    ]  # fmt: skip
    with pytest.raises(KeyError):
        bd.shape_list("cpu", {"S": [1]})


def test_dist_single_rank_group_is_created_and_destroyed():
    import torch.distributed as dist

    from benchmarks.bench_contrastive_dist import _Group

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no default group in this process")
    group = _Group()
    pg = group.get(torch.device("cpu"))
    assert dist.is_initialized() and dist.get_world_size(pg) == 1 and group.backend == "gloo"
    assert group.get(torch.device("cpu")) is pg
    group.release()
    assert not dist.is_initialized() and group.tmpdir is None


def test_scaling_model_by_hand():
    from benchmarks import scaling_model as sm

    a = sm.Assumptions(
        nvlink=sm.Link("NVLink", 1.0, 0.0), efficiency=1.0, d=100, elem=2,
        assumed_tflops=1.0, assumed_hbm_gbs=1.2,
    )  # fmt: skip
    rate = sm.load_rate(None, a)
    assert not rate.measured and "ASSUMED 1 TFLOP/s" in rate.describe()
    r = sm.time_row(8, 8000, a, rate)  # b = 1000
    assert r.b == 1000 and r.link == "NVLink"
    # compute: 2 b^2 d / 1e12 s = 200 us; bwd 6 b^2 d -> 600 us + 12 b d B / 1.2 GB/s = 1000 us
    assert math.isclose(r.fwd_compute_us, 200) and math.isclose(r.bwd_compute_us, 1600)
    # packets: b d e + 12 b = 212 kB -> 212 us; b d e + 24 b + 4 b d = 624 kB -> 624 us
    assert math.isclose(r.fwd_comm_us, 212) and math.isclose(r.bwd_comm_us, 624)
    assert not r.fwd_hidden and r.bwd_hidden
    # fwd 200 + 7 x 212 + 12 (stats home); bwd 1600 + 7 x 1600 + 400 (dY home)
    assert math.isclose(r.ring_ms, (200 + 7 * 212 + 12 + 1600 + 7 * 1600 + 400) / 1e3)
    assert math.isclose(r.exposed_ms, r.ring_ms - 8 * 1.8)
    assert math.isclose(r.open_clip_comm_ms, 4 * 7 * 1000 * 100 * 2 / 1e9 * 1e3)
    assert math.isclose(r.breakeven_gbs, 624e3 / 1600e-6 / 1e9)
    m = sm.memory_row(8, 8000, a)
    ring = 3 * 2 * 1000 * 100 * 2 + 4 * 1000 * 100 + 12 * 1000 * 100 + 2_000_000 + 120 * 1000
    assert math.isclose(m.ring_mib * sm.MIB, ring) and math.isclose(m.ring_chunk_mib * sm.MIB, 2e6)
    assert math.isclose(m.open_clip_local_mib * sm.MIB, 8e5 + 3.2e6 + 3.2e7)
    assert math.isclose(m.open_clip_plain_mib * sm.MIB, 8e5 + 3.2e6 + 8000**2 * 2)
    assert sm.time_row(64, 64000, a, rate).link == "InfiniBand"


def test_scaling_model_reads_measured_cuda_rows(tmp_path, capsys):
    from benchmarks import scaling_model as sm

    path = tmp_path / "contrastive.csv"
    base = dict(timestamp="2026-01-01T00:00:00Z", run_id="r1", op="clip_loss",
                provider="vlmkernels", dtype="bfloat16", metric="ms", status="ok",
                device="NVIDIA H100", device_type="cuda")  # fmt: skip
    rows = [
        dict(base, mode="fwd", shape="N=8192,d=768", p50="1.0"),
        dict(base, mode="fwd+bwd", shape="N=8192,d=768", p50="4.0"),
    ]
    ceiling = dict(op="ceiling", provider="torch", mode="", shape="bytes=1", dtype="uint8")
    rows.append(dict(base, **ceiling, metric="copy_gbps", p50="2000"))
    rows.append(dict(base, device_type="cpu", run_id="r0", mode="fwd+bwd", p50="9",
                     shape="N=4096,d=768"))  # fmt: skip
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    rate = sm.load_rate(path, sm.Assumptions())
    assert rate.measured and rate.hbm_measured and rate.hbm_gbs == 2000
    assert "MEASURED" in rate.describe() and "ASSUMED" not in rate.describe()
    fwd, bwd, below = rate.block_seconds(4096, 768)  # a quarter of the FLOPs of N=8192
    assert math.isclose(fwd, 0.25e-3) and math.isclose(bwd, 0.75e-3) and below
    assert rate.block_seconds(8192, 384)[:2] == pytest.approx((0.5e-3, 1.5e-3))
    assert not rate.block_seconds(16384, 768)[2]
    assert sm.main(["--csv", str(tmp_path / "missing.csv")]) == 0
    out = capsys.readouterr().out
    assert "ASSUMED 550 TFLOP/s" in out and "does not exist" in out
    assert out.count("| 8 | NVLink |") == 6 and out.count("| 64 | InfiniBand |") == 6


def test_dist_ring_provider_is_unavailable_only_when_the_module_is_missing(monkeypatch):
    from benchmarks import bench_contrastive_dist as bd

    cpu = torch.device("cpu")
    if RING_FILE.exists():
        assert bd.ring_available(cpu) is None
    monkeypatch.setitem(sys.modules, bd.RING_MODULE, None)  # as if ring.py were absent
    assert "is missing (the ring mode has not landed)" in bd.ring_available(cpu)


# --------------------------------------------------------------------------------------
# Targets file and the host-time mode
# --------------------------------------------------------------------------------------


def test_targets_name_real_suites_ops_and_providers():
    """Every target of benchmarks/targets.py names a suite, an op of it, providers of that
    op and a mode the suite can time, and cites its issue."""
    from benchmarks import suites

    found = suites()
    for t in targets.TARGETS:
        assert t.suite in found, t
        ops = {op.name: op for op in found[t.suite].ops}
        assert t.op in ops, t
        names = {p.name for p in ops[t.op].providers}
        assert {t.provider, t.baseline or t.provider, t.beside or t.provider} <= names, t
        assert t.mode in found[t.suite].modes and t.issue > 0, t
        if t.metric == "host_us":
            assert found[t.suite].host_shape is not None and t.beside == "eager", t
    budgets = {(t.op, t.mode): t.bound for t in targets.TARGETS if t.metric == "host_us"}
    assert budgets[("mrope", "fwd")] == 25 and budgets[("clip_loss", "fwd+bwd")] == 60


def test_a_target_judges_ratios_levels_and_says_what_is_missing():
    from benchmarks.harness import Record, Results

    t = targets.for_suite("contrastive", metric="ms", provider="vlmkernels", op="clip_loss")[0]
    results = Results()
    results.add([Record(t.case(), "ms", p50=0.85)])
    missing = t.evaluate(results)
    assert not missing.measured and "compile" in missing.reason
    results.add([Record(t.case("compile"), "ms", p50=1.0)])
    verdict = t.evaluate(results)
    assert verdict.value == pytest.approx(0.85) and verdict.hit and t.text == "<= 0.9"
    speed = targets.for_suite("rope", metric="ms", baseline="compile")[0]
    assert speed.text == "<= 1/3" and not speed.hit(0.34) and speed.hit(0.33)


def test_host_mode_times_one_op_beside_the_eager_formula(tmp_path):
    """``--modes host`` on one tiny case: positive host times per call for vlmkernels and the
    eager formula, the budget and verdict columns, the rows in host.csv."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "mrope", "--modes", "host", "--providers",
         "vlmkernels,eager", "--host-calls", "20", "--shape", "S=4", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["host.csv"]
    with (tmp_path / "host.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and list(rows[0]) == COLUMNS
    host = {r["provider"]: r for r in rows if r["metric"] == "host_us" and r["op"] == "mrope"}
    assert sorted(host) == ["eager", "vlmkernels"] and len(rows) == 5
    (scale,) = [r for r in rows if r["op"] == "torch_add"]  # one torch op: the scale
    (bare,) = [r for r in rows if r["op"] == "custom_op"]  # issue 11's unit
    (floor,) = [r for r in rows if r["op"] == "autograd_fn"]  # autograd's share of a loss
    for r in (scale, bare, floor):
        assert r["status"] == "ok" and r["suite"] == "host" and float(r["p50"]) > 0, r
    assert floor["mode"] == "fwd+bwd" and floor["shape"] == "N=8,d=32"
    assert float(floor["p50"]) > float(scale["p50"])  # a forward and a backward at least
    assert "Scale: one torch op (x.add(1) on a 1-element tensor) took " in proc.stdout
    assert "A bare torch.library.custom_op call took " in proc.stdout
    assert "An autograd.Function that does nothing took " in proc.stdout
    assert "issue 11 set the budgets where it took 10-15 us" in proc.stdout
    for r in host.values():
        assert r["status"] == "ok" and r["op"] == "mrope" and r["mode"] == "fwd", r
        assert r["shape"] == "B=1,S=4" and r["dtype"] == "float32" and r["suite"] == "rope"
        p20, p50, p80 = (float(r[k]) for k in ("p20", "p50", "p80"))
        assert 0 < p20 <= p50 <= p80 and math.isfinite(p80)
    note = host["vlmkernels"]["note"]
    assert "1 Triton launches per call (stubbed)" in note  # the Triton path, its launch stubbed
    assert "budget 25 us (issue 11): " in note
    header = next(line for line in proc.stdout.splitlines() if line.startswith("op "))
    assert header.split() == ["op", "mode", "shape", "provider", "host", "us", "eager", "us",
                              "budget", "us", "verdict"]  # fmt: skip
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("mrope ")]
    cells = line.split()
    assert cells[:4] == ["mrope", "fwd", "B=1,S=4", "vlmkernels"]
    assert float(cells[4]) > 0 and float(cells[5]) > 0 and cells[6] == "25"
    assert cells[7] in ("PASS", "MISS")


def test_host_mode_runs_alone_and_only_where_there_is_a_budget(capsys):
    from benchmarks.__main__ import main

    assert main(["mrope", "--modes", "host,fwd", "--list"]) == 2
    assert "--modes host runs alone" in capsys.readouterr().err
    assert main(["rope_index", "clip_loss", "--modes", "host", "--list"]) == 0
    out = capsys.readouterr().out
    assert "rope_index: no host-time budget in benchmarks/targets.py; not timed" in out
    assert "clip_loss vlmkernels N=8,d=32 float32 host fwd+bwd" in out
    assert "clip_loss eager N=8,d=32 float32 host fwd+bwd" in out
    # a provider host mode does not time is refused, as in the other modes
    assert main(["clip_loss", "--modes", "host", "--providers", "vlmkernel", "--list"]) == 2
    assert "--providers: ['vlmkernel'] not timed by --modes host" in capsys.readouterr().err


def test_every_suite_module_belongs_to_a_declared_family():
    """The suites run are the op families' (``Family.bench_suite`` and its ``_<part>``
    modules): a bench_*.py no family claims would never run."""
    import benchmarks
    from benchmarks.profile import find_op, triton_kernels

    modules = benchmarks.suite_modules()
    claimed = sorted(m for ms in modules.values() for m in ms)
    assert claimed == sorted(p.stem for p in (REPO / "benchmarks").glob("bench_*.py"))
    assert modules["rope"] == ["bench_rope", "bench_rope_index"]
    assert benchmarks.suite_family("contrastive_dist") == "contrastive"
    # profile names the family's kernels for Nsight Compute, none for torch-only ops
    assert triton_kernels("rope", find_op("mrope")[1]) == ["_rope_kernel"]
    assert triton_kernels("rope_index", find_op("get_rope_index_qwen2_vl")[1]) == []


def test_providers_that_disagree_fail_the_run(tmp_path, monkeypatch, capsys):
    """Every provider computes the same loss of the same inputs: each one's is compared
    with the reference provider's (loss_diff_vs_<p> rows); a provider off by more than
    rounding (here vlmkernels made to return twice the loss) is an error, exit 1."""
    import vlmkernels
    from benchmarks.__main__ import main

    args = ["clip_loss", "--shape", "N=32", "--shape", "d=16", "--providers",
            "vlmkernels,eager", "--modes", "fwd", "--no-progress"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "fine")]) == 0
    with (tmp_path / "fine" / "contrastive.csv").open(newline="") as f:
        diffs = [r for r in csv.DictReader(f) if r["metric"] == "loss_diff_vs_eager"]
    assert len(diffs) == 1 and diffs[0]["status"] == "ok" and float(diffs[0]["p50"]) < 1e-4
    real = vlmkernels.clip_loss
    monkeypatch.setattr(vlmkernels, "clip_loss", lambda *a, **k: 2 * real(*a, **k))
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "broken")]) == 1
    out = capsys.readouterr().out
    assert "DISAGREE" in out and "ERROR clip_loss vlmkernels fwd" in out
    # the same loss with twice its gradients: caught by the gradient checksums
    monkeypatch.setattr(vlmkernels, "clip_loss",
                        lambda *a, **k: (lambda l: 2 * l - l.detach())(real(*a, **k)))  # fmt: skip
    grads = [*args[:-2], "fwd+bwd", "--no-progress"]
    assert main([*grads, "--out", str(tmp_path / "backward")]) == 1
    out = capsys.readouterr().out
    assert "gradients differ from" in out and "loss" not in out.split("DISAGREE")[1][:30]
    monkeypatch.setattr(vlmkernels, "clip_loss", real)
    assert main([*grads, "--out", str(tmp_path / "grads_fine")]) == 0
    with (tmp_path / "grads_fine" / "contrastive.csv").open(newline="") as f:
        diffs = [r for r in csv.DictReader(f) if r["metric"] == "grad_diff_vs_eager"]
    assert len(diffs) == 1 and diffs[0]["status"] == "ok" and float(diffs[0]["p50"]) < 1e-4


def test_empty_providers_and_bad_time_budgets_are_refused(capsys):
    """``--providers ,`` is not 'every provider'; a time budget is a positive number."""
    from benchmarks.__main__ import main

    for args, message in (
        (["--providers", ","], "--providers: wants comma-separated names"),
        (["--time-budget", "-1"], "--time-budget: wants a positive number of seconds"),
        (["--time-budget", "nan"], "--time-budget: wants a positive number of seconds"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(["clip_loss", *args, "--list"])
        assert exc.value.code == 2 and message in capsys.readouterr().err


def test_forced_cuda_backend_without_the_extension_is_refused(monkeypatch, capsys):
    from benchmarks.__main__ import main
    from vlmkernels.core.backend import cuda_backend_status

    if cuda_backend_status()[0]:
        pytest.skip("the CUDA C++ extension is built here")
    monkeypatch.setenv("VLMKERNELS_BACKEND", "cuda")
    assert main(["clip_loss", "--list"]) == 2
    assert "VLMKERNELS_BACKEND=cuda: the CUDA C++ backend is unavailable" in capsys.readouterr().err


def test_cost_models_count_what_the_ops_move():
    """Hand counts of the byte and FLOP models the benchmark audit corrected."""
    from benchmarks import (
        bench_attention_media,
        bench_connectors,
        bench_rope_index,
        bench_tokens,
        bench_tokens_pool,
    )

    s = {"B": 4, "N": 196, "C": 256, "r": 16}
    k = bench_tokens.keep_of(s)
    assert bench_tokens.select_bytes(s, "bwd", 4) == (k + 196) * 4 * 256 * 4
    assert bench_tokens.select_bytes(s, "fwd+bwd", 2) == (3 * k + 196) * 4 * 256 * 2
    (deepstack,) = (op for op in bench_connectors.OPS if op.name == "deepstack")
    assert deepstack.nbytes({"B": 2, "L": 64, "D": 32}, "fwd", 2) == 2.5 * 2 * 64 * 32 * 2
    media = {"B": 1, "H": 2, "T": 256, "M": 5, "L": 8, "D": 16}
    loc = bench_attention_media.media_locations(media, "cpu")
    seeing = 256 - int(loc[0].nonzero()[0])
    assert bench_attention_media.flops(media, "fwd") == 4.0 * 2 * seeing * 8 * 16
    for op in bench_rope_index.OPS:
        ids, types, mask, images, videos = bench_rope_index.make_batch(
            bench_rope_index._model_type(op.name), 3, torch.device("cpu"))  # fmt: skip
        moved = types.nbytes + mask.nbytes + images.nbytes + videos.nbytes + 3 * ids.nbytes
        assert op.nbytes({"B": 3}, "fwd", 8) == moved + 3 * 8
    pools = {op.name: op for op in bench_tokens_pool.OPS}
    shape = {"F": 2, "S": 6, "C": 8}
    assert pools["pool_avg2x2"].flops(shape, "fwd") * 2 == pools["pool_bilinear"].flops(
        {"F": 2, "S": 5, "C": 8}, "fwd")  # fmt: skip
    # projector + pooling: the least work, the second GEMM on the 3 x 3 pooled rows (a
    # rate over the unpooled count had the fused provider past 100 % of the matmul ceiling)
    proj = {op.name: op for op in bench_tokens_pool.OPS}["proj_pool_bilinear"]
    shape = {"F": 2, "S": 5, "C": 8, "K": 6}
    gemms = 2 * 2 * (25 * 6 * 8 + 9 * 8 * 8)
    pool = pools["pool_bilinear"].flops(shape, "fwd")
    assert proj.flops(shape, "fwd") == gemms + pool
    assert proj.flops(shape, "fwd+bwd") == 3 * gemms + 2 * pool


def test_connector_timed_calls_run_the_op_alone():
    """A connectors provider's timed forward runs the op and nothing else (its checksum is
    exact on the first call only, as the other suites'): a loss (out * G).sum() added a
    cast, a product and a sum to every timed call, understating GB/s and speedups."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from benchmarks.harness import BuildArgs

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    shape = {"B": 2, "L": 6, "D": 8}
    args = BuildArgs("deepstack", shape, torch.float32, torch.device("cpu"), 0, {})
    prepared = bench_connectors.build_eager(args)
    exact = prepared.fn()
    assert exact.isfinite() and exact != 0
    with Ops() as op_alone:
        prepared.call()
    with Ops() as timed:
        prepared.fn()
    assert timed.seen[: len(op_alone.seen)] == op_alone.seen
    extra = timed.seen[len(op_alone.seen) :]
    assert not {"mul", "sum", "_to_copy"} & set(extra), extra

"""The ``vlmkernels`` command on the present device, each subcommand in a subprocess as a user
runs it (about a minute on 2 CPU cores), and the pytest-benchmark collection of the suites
run once (``--benchmark-disable``) on a tiny subset so it cannot rot.

Subprocesses run without the ``TRITON_INTERPRET`` that tests/conftest.py sets, and with a
fresh ceilings cache (``VLMKERNELS_CACHE_DIR``); nothing is written to
``benchmarks/results/``. Then the user errors: each is one line, ``vlmkernels <command>:
<message>``, exit status 2, no traceback.
"""

from __future__ import annotations

import ast
import csv
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vlmkernels
from vlmkernels import cli

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
ON_GPU = torch.cuda.is_available()
HAS_MPL = importlib.util.find_spec("matplotlib") is not None
TINY = ["--shape", "N=64", "--shape", "d=32"]


def run(*args: str, cache: Path, cwd: Path = REPO, timeout: int = 300):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["VLMKERNELS_CACHE_DIR"] = str(cache)
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def _ok(proc) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


# ``import benchmarks`` as ``vlmkernels bench`` does: from the checkout's folder, by location
cli.load_benchmarks(REPO)


def test_help_lists_every_command(cache, capsys):
    out = _ok(run("-m", "vlmkernels", "--help", cache=cache))
    for command in ("info", "bench", "tune", "profile", "report"):
        assert command in out
    script = Path(sys.executable).parent / "vlmkernels"
    if script.exists():  # the console script of pyproject.toml
        proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and "profile" in proc.stdout
    # a subcommand's help: the same parser, in-process (a subprocess costs ~4 s)
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--help"])
    assert exc.value.code == 0
    bench_help = capsys.readouterr().out
    assert "usage: vlmkernels bench" in bench_help and "--plot" in bench_help
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"vlmkernels {vlmkernels.__version__}\n"


def test_unknown_option_is_blamed_on_its_command(capsys):
    """argparse lets a subcommand's unknown option fall to the top parser ("usage:
    vlmkernels [-h] COMMAND ..."); the error names the command and shows its usage."""
    for command in ("info", "tune", "inspect"):
        with pytest.raises(SystemExit) as exc:
            cli.main([command, "--bogus"])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert f"usage: vlmkernels {command}" in err
        assert f"vlmkernels {command}: error: unrecognized arguments: --bogus" in err


def test_info_measures_once_then_reads_the_cache(cache, monkeypatch, capsys):
    first = _ok(run("-m", "vlmkernels", "info", cache=cache))
    assert "device:" in first and "backends:" in first and "cuda (C++)" in first
    assert "ceilings (measured now" in first and "matmul" in first and "copy" in first
    data = json.loads((cache / cli.CACHE_FILE).read_text())
    assert len(data) == 1
    entry = next(iter(data.values()))
    assert entry["copy_gbps"] > 0
    assert set(entry["matmul"]) == ({"bf16", "fp16", "tf32"} if ON_GPU else {"fp32"})
    # read back in-process (a second subprocess costs ~5 s): the cache must not be measured
    monkeypatch.setattr(cli, "measure_ceilings", lambda *a: pytest.fail("measured again"))
    monkeypatch.setenv("VLMKERNELS_CACHE_DIR", str(cache))
    assert cli.main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ceilings"] == entry


def test_info_names_transformers_and_what_patches_on_it(capsys):
    transformers = pytest.importorskip("transformers")
    import vlmkernels.integrations.transformers as vt

    assert cli.main(["info", "--no-ceilings"]) == 0
    out = capsys.readouterr().out
    assert f"transformers {transformers.__version__} (vlmkernels.patch tested with" in out
    for arch in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe",
                 "glm4v", "glm4v_moe", "glm_ocr", "paddleocr_vl"):  # fmt: skip
        # positions is patch(angles="positions"), not a keyword of its own
        want = "patches rope, vision, positions (angles='positions'), rope_index"
        assert re.search(rf"^  {arch} +{re.escape(want)}$", out, re.M), arch
    # transformers 5.16's Qwen2.5-Omni vision function is the older (tensor, freqs) one
    vision = "vision, " if vt.support()["qwen2_5_omni"]["vision"] == "ok" else ""
    rows = {
        "qwen2_5_omni": f"rope, {vision}positions (angles='positions')",
        "qwen3_omni_moe": "rope, vision",
        "glm46v": "rope_index",  # its towers are GLM-4V's rows
        "cohere_compass": "rope, vision, rope_index",  # no per-layer-type angles
        "qwen4_exp": "rope, vision, rope_index",  # its indexer reads the tables too
        "cosmos3_omni": "rope_index",  # its towers are Qwen3-VL's rows
        "ernie4_5_vl_moe": "rope, vision",  # its own rope index and section rule
        "cosmos3_edge": "rope",  # the text rotary alone
        "glm_image": "rope",
    }
    for arch, parts in rows.items():
        assert re.search(rf"^  {arch} +patches {re.escape(parts)}$", out, re.M), arch
    # one column for the verdicts, however long the names
    starts = {line.index("patches ") for line in out.splitlines() if " patches " in line}
    assert len(starts) == 1, starts
    assert cli.main(["info", "--no-ceilings", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)["transformers"]
    assert found["version"] == transformers.__version__
    assert found["models"]["qwen2_vl"]["rope"] == "ok"


def test_bench_tiny_case_with_plot(tmp_path, cache):
    out_dir = tmp_path / "out"
    args = ["-m", "vlmkernels", "bench", "clip_loss", *TINY, "--providers", "vlmkernels,eager"]
    out = _ok(run(*args, "--out", str(out_dir), "--plot", cache=cache))
    if not ON_GPU:
        assert "No CUDA device found: running the CPU sweep" in out
    assert "[2/2] clip_loss N=64,d=32 eager" in out  # the counter (stderr is not a tty)
    assert "vlmkernels speed-up" in out and "%mm" in out
    with (out_dir / "contrastive.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    ms = [r for r in rows if r["metric"] == "ms" and r["op"] == "clip_loss"]
    assert {(r["provider"], r["mode"]) for r in ms} == {
        (p, m) for p in ("vlmkernels", "eager") for m in ("fwd", "fwd+bwd")
    }
    assert all(r["status"] == "ok" and float(r["p50"]) > 0 for r in ms)
    pngs = sorted(p.name for p in out_dir.glob("*.png"))
    if HAS_MPL:
        assert len(pngs) == 1 and pngs[0].startswith("clip_loss_"), pngs
    else:
        assert not pngs and "matplotlib is not installed" in out


@pytest.mark.skipif(ON_GPU, reason="on a GPU tune really tunes")
def test_tune_without_gpu_exits_2_with_a_message(cache):
    proc = run("-m", "vlmkernels", "tune", cache=cache)
    assert proc.returncode == 2
    assert "no CUDA GPU" in proc.stderr and "Traceback" not in proc.stderr


def test_closed_stdout_ends_quietly(cache):
    """`vlmkernels info | head -1`: the reader closes the pipe before the output comes; the
    command stops with status 141 (SIGPIPE's), no traceback."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["VLMKERNELS_CACHE_DIR"] = str(cache)
    command = [sys.executable, "-m", "vlmkernels", "info", "--no-ceilings"]
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with subprocess.Popen(command, cwd=REPO, env=env, **pipes) as proc:
        proc.stdout.close()  # before the interpreter has started: every write finds no reader
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=300) == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_matmul_ceiling_under_the_new_tf32_api():
    """A process that set TF32 through torch's new API (transformers'
    ``TrainingArguments(tf32=True)`` does ``torch.backends.fp32_precision = "tf32"``) can
    measure the matmul ceiling: reading the legacy ``allow_tf32`` there raised
    RuntimeError ("mix of the legacy and new APIs"); the setting is left as it was."""
    backends, matmul = torch.backends, torch.backends.cuda.matmul
    before = backends.fp32_precision, matmul.fp32_precision
    try:
        backends.fp32_precision = "tf32"
        want = matmul.fp32_precision
        for tf32 in (None, True, False):
            rate, n, _ = cli.measure_matmul(torch.device("cpu"), torch.float32,
                                            timer=lambda fn: (1.0, None), tf32=tf32)  # fmt: skip
            assert rate > 0 and n in cli.MATMUL_SIZES["cpu"]
            assert matmul.fp32_precision == want
    finally:
        backends.fp32_precision, matmul.fp32_precision = before


def test_closed_stdout_leaves_no_descriptor_open(tmp_path, monkeypatch):
    """main() called in-process when the reader has gone: stdout is pointed at devnull
    without leaving the devnull descriptor it opened for that open (one per call)."""

    def gone(argv):
        raise BrokenPipeError

    monkeypatch.setattr(cli, "_run", gone)
    with open(tmp_path / "stdout", "w") as out:
        monkeypatch.setattr(sys, "stdout", out)
        fds = set(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
        assert cli.main(["info"]) == 141
        if fds is not None:
            assert set(os.listdir("/proc/self/fd")) == fds


def test_cache_folders_from_the_environment_expand_the_home(monkeypatch):
    monkeypatch.setenv("VLMKERNELS_CACHE_DIR", "~/vk-cache")
    assert cli.cache_dir() == Path.home() / "vk-cache"
    monkeypatch.delenv("VLMKERNELS_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", "~/xdg")
    assert cli.cache_dir() == Path.home() / "xdg" / "vlmkernels"


def test_tune_refuses_bad_arguments_before_timing(tmp_path, monkeypatch, capsys):
    """On a GPU machine (CUDA faked here), an unknown op, an --out (or
    VLMKERNELS_CONFIG_DIR) that is a file and Triton's interpreter are one-line errors, exit
    2, before any kernel is timed (tune is never called)."""
    from vlmkernels.core import runtime, tuner

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(runtime, "INTERPRETED", False)
    monkeypatch.setattr(tuner, "tune", lambda **kw: pytest.fail("tuned after all"))
    a_file = tmp_path / "file"
    a_file.write_text("")
    monkeypatch.setenv("VLMKERNELS_CONFIG_DIR", str(a_file))
    cases = [
        (["tune", "clip_los"], "unknown kernel or op 'clip_los'"),
        (["tune", "clip_loss", "--out", str(a_file)], f"--out {a_file}: is a file"),
        (["tune", "clip_loss"], f"VLMKERNELS_CONFIG_DIR {a_file}: is a file"),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"vlmkernels tune: {message}") and err.count("\n") == 1, err
    monkeypatch.setattr(runtime, "INTERPRETED", True)
    assert cli.main(["tune", "--out", str(tmp_path / "out")]) == 2
    assert "interpreter" in capsys.readouterr().err


def test_profile_writes_a_trace_and_prints_ncu(tmp_path, cache):
    out_dir = tmp_path / "prof"
    args = ["-m", "vlmkernels", "profile", "clip_loss", *TINY, "--iters", "2"]
    out = _ok(run(*args, "--out", str(out_dir), cache=cache))
    traces = list(out_dir.glob("*.trace.json"))
    assert len(traces) == 1
    assert json.loads(traces[0].read_text())["traceEvents"]
    with next(out_dir.glob("*.kernels.csv")).open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(float(r["total_ms"]) >= 0 for r in rows)
    assert "whole call, p50" in out
    ncu = next(line.strip() for line in out.splitlines() if line.strip().startswith("ncu "))
    assert ncu.startswith("ncu --set full --target-processes all")
    assert "-k 'regex:" in ncu and "python -m vlmkernels profile clip_loss" in ncu
    assert "--shape N=64 --shape d=32" in ncu and ncu.endswith("--bare")


def test_report_on_the_committed_csvs(tmp_path, cache):
    target = tmp_path / "SUMMARY.md"
    out = _ok(run("-m", "vlmkernels", "report", "--out", str(target), cache=cache))
    text = target.read_text()
    assert text.startswith("# Benchmark summary")
    for op in ("clip_loss", "siglip_loss", "mrope", "get_rope_index_qwen2_vl"):
        assert f"\n## {op}: " in text
    assert "| shape | mode | vlmkernels ms |" in text
    assert "\n## Host time per call: " in text  # the committed host-time rows, no chart
    op_tables = text.count("\n## ") - text.count("\n## Host time per call: ")
    assert len(list(tmp_path.glob("*.png"))) == (op_tables if HAS_MPL else 0), out
    assert (RESULTS / "SUMMARY.md").exists(), "run `vlmkernels report` and commit SUMMARY.md"


@pytest.mark.skipif(
    importlib.util.find_spec("pytest_benchmark") is None, reason="pytest-benchmark not installed"
)
def test_pytest_benchmark_collection_runs_once(cache):
    """``pytest benchmarks --benchmark-disable`` on one tiny shape per suite."""
    proc = run(
        "-m", "pytest", "benchmarks", "--benchmark-disable", "-q", "-p", "no:cacheprovider",
        "--bench-ops", "clip_loss,siglip_loss,clip_loss_dist,albef_itc,mrope,vision_rope,"
        "get_rope_index_qwen2_vl",
        "--bench-providers", "vlmkernels,vlmkernels_ring,eager,transformers",
        *[f"--bench-shape={s}" for s in ("N=64", "d=32", "b=8", "Q=64", "S=64", "B=1")],
        cache=cache,
    )  # fmt: skip
    tail = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and "failed" not in proc.stdout, tail


# --------------------------------------------------------------------------------------
# In-process: behaviour that needs no subprocess
# --------------------------------------------------------------------------------------


def test_bench_outside_a_checkout_says_so(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(cli, "_repo_candidates", lambda: [tmp_path])
    assert cli.main(["bench"]) == 2
    assert "checkout" in capsys.readouterr().err


def test_bench_finds_the_families_suites_without_changing_sys_path(tmp_path, cache):
    """From outside the checkout (found next to the package): the suites the op families
    declare, ``benchmarks`` imported from the checkout's folder, ``sys.path`` unchanged."""
    code = (
        "import sys; from vlmkernels import cli; path = list(sys.path); "
        "rc = cli.main(['bench', '--list', '--providers', 'vlmkernels']); "
        "import benchmarks; from vlmkernels.core.family import families; "
        "print('PATH', sys.path == path, 'FROM', benchmarks.__file__); "
        "print('SUITES', sorted(benchmarks.suites())); "
        "print('DECLARED', sorted(f.bench_suite for f in families().values() if f.bench_suite)); "
        "sys.exit(rc)"
    )
    out = _ok(run("-c", code, cache=cache, cwd=tmp_path))
    assert f"PATH True FROM {REPO / 'benchmarks' / '__init__.py'}" in out
    suites = ast.literal_eval(out.split("SUITES ", 1)[1].splitlines()[0])
    declared = ast.literal_eval(out.split("DECLARED ", 1)[1].splitlines()[0])
    assert {"contrastive", "contrastive_dist", "rope", "rope_index"} <= set(suites)
    assert {"bench_contrastive", "bench_rope"} <= set(declared)
    # every suite is a declared family's (bench_<suite>) or one of its parts (<suite>_<part>)
    for suite in suites:
        assert any(f"bench_{suite}" == d or suite.startswith(d[6:] + "_") for d in declared)
    listed = {line.split()[0] for line in out.splitlines() if " vlmkernels " in line}
    assert {"clip_loss", "mrope", "get_rope_index_qwen2_vl", "albef_itc"} <= listed


def test_bench_refuses_another_benchmarks_package(tmp_path, cache):
    other = tmp_path / "benchmarks"
    other.mkdir()
    (other / "__init__.py").write_text("")
    code = "import sys, benchmarks; from vlmkernels import cli; sys.exit(cli.main(['bench']))"
    proc = run("-c", code, cache=cache, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("vlmkernels bench: another `benchmarks` module is already")


def _row(run_id, stamp, provider, mode, metric, p50, status="ok", throttled=""):
    return {
        "timestamp": stamp, "run_id": run_id, "suite": "s", "op": "op", "provider": provider,
        "mode": mode, "shape": "N=8", "x_name": "N", "x_value": "8", "dtype": "bfloat16",
        "metric": metric, "unit": "", "p50": str(p50), "p20": "", "p80": "", "status": status,
        "note": "", "device": "GPU", "torch": "t", "triton": "tr", "cuda": "c", "driver": "d",
        "git_commit": "abc", "throttled": throttled,
    }  # fmt: skip


def test_report_takes_the_latest_run_and_flags_throttling():
    from benchmarks.report import summary_markdown

    old = [_row("r1", "2026-01-01T00:00:00Z", "vlmkernels", "fwd", "ms", 9.0)]
    new = [
        _row("r2", "2026-02-01T00:00:00Z", "vlmkernels", "fwd", "ms", 1.0, throttled="yes"),
        _row("r2", "2026-02-01T00:00:00Z", "eager", "fwd", "ms", 3.0),
        _row("r2", "2026-02-01T00:00:00Z", "eager", "fwd", "ms", 0, status="oom"),
        _row("r2", "2026-02-01T00:00:00Z", "vlmkernels", "fwd", "speedup_vs_eager", 3.0),
        _row("r2", "2026-02-01T00:00:00Z", "vlmkernels", "fwd", "pct_matmul_ceiling", 42.0),
    ]
    new[2]["shape"] = "N=16"
    text = summary_markdown(old + new)
    assert "Run `r2`" in text and "Run `r1`" not in text
    assert "| N=8 | fwd | 1.00* | 3.00 | 3.00x | 42.0 |" in text
    assert "| N=16 | fwd |  | oom |" in text
    assert "clocks throttled" in text


def test_report_keeps_the_latest_run_of_each_dtype():
    """A later bf16 run does not hide the fp32 one (it did: one table per op and device)."""
    from benchmarks.report import summary_markdown

    fp32 = _row("r1", "2026-01-01T00:00:00Z", "vlmkernels", "fwd", "ms", 9.0)
    fp32["dtype"] = "float32"
    bf16 = _row("r2", "2026-02-01T00:00:00Z", "vlmkernels", "fwd", "ms", 1.0)
    text = summary_markdown([fp32, bf16])
    assert "## op: GPU, float32" in text and "## op: GPU, bfloat16" in text, text
    assert "Run `r1`" in text and "Run `r2`" in text


# --------------------------------------------------------------------------------------
# Default output folders, and user errors as one line
# --------------------------------------------------------------------------------------


def test_profile_writes_into_the_output_folder_by_default(tmp_path, cache):
    args = ["-m", "vlmkernels", "profile", "clip_loss", *TINY, "--iters", "1", "--warmup", "0"]
    _ok(run(*args, cache=cache, cwd=tmp_path))
    assert len(list((tmp_path / "bench-results" / "profile").glob("*.trace.json"))) == 1
    assert {p.name for p in tmp_path.iterdir()} <= {"bench-results", "cache"}


def test_profile_of_a_provider_in_its_own_dtype_counts_its_bytes(tmp_path, capsys, monkeypatch):
    """The Q-Former's fp32 providers compute in fp32 whatever --dtype says: the label, the
    byte model (4-byte elements) and the ncu line are fp32's, as in the bench rows."""
    from benchmarks.bench_attention_qformer import nbytes

    monkeypatch.setenv("VLMKERNELS_CACHE_DIR", str(tmp_path / "cache"))
    shape = {"B": 1, "L": 1, "Hd": 64, "Lq": 4, "N": 5, "E": 16}
    args = ["profile", "qformer", "--provider", "transformers_fp32", "--dtype", "bf16",
            "--mode", "fwd", "--iters", "1", "--warmup", "0", "--out", str(tmp_path)]  # fmt: skip
    args += [a for k, v in shape.items() for a in ("--shape", f"{k}={v}")]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "--dtype bf16: provider transformers_fp32 computes in float32" in out
    assert " float32 fwd" in out and " bfloat16 fwd" not in out
    assert f"{nbytes(shape, 'fwd', 4) / 1e6:.4g} MB per call" in out
    ncu = next(line for line in out.splitlines() if line.strip().startswith("ncu "))
    assert "--dtype fp32" in ncu


def test_pytest_benchmark_cases_take_the_providers_own_dtype():
    """``pytest benchmarks``: a provider with its own dtype gets it (its rows' dtype and
    byte model), the others the run's."""
    from benchmarks.conftest import collect_cases

    class Config:
        def getoption(self, name):
            return {"bench_ops": "qformer", "bench_dtype": "bf16"}.get(name)

    cases = collect_cases(Config())
    dtypes = {c.provider.name: c.dtype for c in cases}
    assert dtypes["vlmkernels_fp32"] == dtypes["transformers_fp32"] == torch.float32
    assert dtypes["vlmkernels"] == dtypes["transformers"] == torch.bfloat16


def test_report_reads_the_committed_csvs_and_writes_into_the_output_folder(
    tmp_path, monkeypatch, capsys
):
    out = tmp_path / "results"
    monkeypatch.setenv("VLMKERNELS_RESULTS_DIR", str(out))
    before = (RESULTS / "SUMMARY.md").stat()
    assert cli.main(["report", "--no-charts"]) == 0
    text = (out / "SUMMARY.md").read_text()
    assert "from\n`benchmarks/results/*.csv`;" in text and "\n## clip_loss: " in text
    after = (RESULTS / "SUMMARY.md").stat()
    assert (before.st_mtime_ns, before.st_size) == (after.st_mtime_ns, after.st_size)
    assert f"wrote {out / 'SUMMARY.md'}" in capsys.readouterr().out


def _one_line_error(capsys, command: str, *needles: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith(f"vlmkernels {command}: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


def test_info_with_a_bad_forced_backend(monkeypatch, capsys):
    monkeypatch.setenv("VLMKERNELS_BACKEND", "junk")
    assert cli.main(["info", "--no-ceilings"]) == 2
    _one_line_error(capsys, "info", "VLMKERNELS_BACKEND must be one of", "'junk'")


def test_info_on_an_amd_gpu_says_the_triton_kernels_do_not_run(monkeypatch):
    """On a ROCm build of torch (AMD GPUs as "cuda" devices) the ops take the PyTorch
    reference (vlmkernels.core.backend.ROCM): info's triton line says so, not "compiled"."""
    from vlmkernels.core import backend

    nvidia = cli.backends({"device_type": "cuda", "arch": "sm_90"})["triton"]
    assert nvidia.startswith("compiled for sm_90")
    monkeypatch.setattr(backend, "ROCM", True)
    amd = cli.backends({"device_type": "cuda", "arch": "sm_94"})["triton"]
    assert amd.startswith("unavailable: vlmkernels' Triton kernels are written for NVIDIA GPUs")
    assert amd.endswith("GPU tensors take the PyTorch path")


def test_bench_with_a_bad_forced_backend_fails_before_measuring(monkeypatch, capsys):
    import benchmarks.__main__ as bench_main

    monkeypatch.setenv("VLMKERNELS_BACKEND", "junk")
    monkeypatch.setattr(bench_main, "measure", lambda *a: pytest.fail("measured"))
    assert cli.main(["bench", "clip_loss"]) == 2
    _one_line_error(capsys, "bench", "VLMKERNELS_BACKEND must be one of")


@pytest.mark.parametrize("command", ["bench", "profile", "report"])
def test_out_that_is_a_file_or_unwritable(tmp_path, monkeypatch, capsys, command):
    """Checked first: bench measures nothing, profile builds nothing."""
    import benchmarks.__main__ as bench_main
    import benchmarks.profile as profile

    monkeypatch.setattr(bench_main, "measure", lambda *a: pytest.fail("measured"))
    monkeypatch.setattr(profile, "_run", lambda *a: pytest.fail("profiled"))
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    args = {"bench": ["clip_loss"], "profile": ["clip_loss"], "report": []}[command]
    assert cli.main([command, *args, "--out", str(a_file)]) == 2
    _one_line_error(capsys, command, f"--out {a_file}: is a file, expected a folder")
    # the variable that chose the folder is blamed where --out was not given
    monkeypatch.setenv("VLMKERNELS_RESULTS_DIR", str(a_file))
    assert cli.main([command, *args]) == 2
    where = a_file / "profile" if command == "profile" else a_file
    _one_line_error(capsys, command, f"VLMKERNELS_RESULTS_DIR {where}: ")
    monkeypatch.delenv("VLMKERNELS_RESULTS_DIR")
    below_a_file = a_file / "sub" / ("SUMMARY.md" if command == "report" else "")
    assert cli.main([command, *args, "--out", str(below_a_file)]) == 2
    _one_line_error(capsys, command, f"--out {below_a_file}", "cannot write there")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert cli.main([command, *args, "--out", str(locked)]) == 2
        _one_line_error(capsys, command, f"--out {locked}: cannot write there")


def test_profile_rejects_counts_below_one(capsys):
    for option, value in (("--iters", "-3"), ("--iters", "0"), ("--warmup", "-1")):
        with pytest.raises(SystemExit) as exc:
            cli.main(["profile", "clip_loss", option, value])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert f"vlmkernels profile: error: argument {option}: wants an integer" in err
        assert repr(value) in err


def test_profile_rejects_sizes_below_one_and_keys_of_another_shape_group(capsys):
    """--shape sizes are positive (as bench's); a key of the suite's other shape group (the
    distributed suite's CLIP keys for an ALBEF op) is refused, not silently dropped."""
    for value in ("N=0", "N=-3", "=4"):
        with pytest.raises(SystemExit) as exc:
            cli.main(["profile", "clip_loss", "--shape", value])
        assert exc.value.code == 2
        assert "wants KEY=INT, a positive size" in capsys.readouterr().err
    assert cli.main(["profile", "albef_itc", "--shape", "N=64"]) == 2
    _one_line_error(capsys, "profile", "--shape N: albef_itc takes the keys")


def test_profile_of_a_mode_the_suite_cannot_time(capsys):
    assert cli.main(["profile", "get_rope_index_qwen2_vl", "--mode", "fwd+bwd"]) == 2
    _one_line_error(capsys, "profile", "--mode fwd+bwd: get_rope_index_qwen2_vl times fwd only")


def test_report_on_a_csv_without_the_columns(tmp_path, capsys):
    results = tmp_path / "csvs"
    results.mkdir()
    (results / "odd.csv").write_text("op,provider,ms\nclip_loss,vlmkernels,1.0\n")
    args = ["report", "--results", str(results), "--out", str(tmp_path / "out")]
    assert cli.main(args) == 2
    _one_line_error(capsys, "report", f"{results / 'odd.csv'}: not a benchmark results CSV",
                    "missing the column(s) timestamp, run_id, mode")  # fmt: skip
    (results / "odd.csv").write_bytes(b"\xff\xfe\x00garbage")
    assert cli.main(args) == 2
    _one_line_error(capsys, "report", f"{results / 'odd.csv'}: cannot read it")
    (results / "odd.csv").unlink()
    assert cli.main(args) == 2
    _one_line_error(capsys, "report", f"no CSV files in {results}")


def test_report_on_a_measured_cell_that_is_not_a_number(tmp_path, capsys):
    """A p50 that is not a number is the one-line error; nan and inf (which a run may
    write) are shown as they are."""
    results = tmp_path / "csvs"
    results.mkdir()
    with (RESULTS / "rope_index.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        row = next(r for r in reader if r["metric"] == "ms" and r["status"] == "ok" and r["mode"])
        columns = reader.fieldnames
    args = ["report", "--results", str(results), "--out", str(tmp_path), "--no-charts"]
    for value, status in (("12;5", 2), ("nan", 0), ("inf", 0)):
        with (results / "rope_index.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, columns)
            writer.writeheader()
            writer.writerow({**row, "p50": value})
        assert cli.main(args) == status
        if status:
            _one_line_error(capsys, "report", "line 2: not a benchmark results CSV",
                            "p50='12;5' is not a number")  # fmt: skip
        else:
            assert f"| {value} |" in (tmp_path / "SUMMARY.md").read_text()


def test_report_reads_a_truncated_last_row(tmp_path, capsys):
    """A run killed while appending leaves a short last row: its missing cells are empty."""
    results = tmp_path / "csvs"
    results.mkdir()
    lines = (RESULTS / "rope_index.csv").read_text().splitlines()
    (results / "rope_index.csv").write_text("\n".join(lines[:40] + [lines[40][:30]]) + "\n")
    assert (
        cli.main(["report", "--results", str(results), "--out", str(tmp_path), "--no-charts"]) == 0
    )
    assert "## get_rope_index_qwen2_vl" in (tmp_path / "SUMMARY.md").read_text()


MALFORMED_CACHES = {
    "nested too deeply": "[" * 100_000 + "]" * 100_000,
    "not an object": "[1, 2]",
    "does not parse": "{",
    "the entry is a JSON str": None,  # this device's entry: a string
    "copy_gbps, matmul.fp32 missing": None,  # this device's entry: wrong fields
}


@pytest.mark.parametrize("problem", list(MALFORMED_CACHES))
def test_malformed_ceilings_cache_is_measured_again(tmp_path, monkeypatch, capsys, problem):
    monkeypatch.setenv("VLMKERNELS_CACHE_DIR", str(tmp_path))
    fresh = {"copy_gbps": 10.0, "copy_bytes": 1 << 20, "matmul": {"fp32": {"tflops": 1.0, "n": 8}}}
    monkeypatch.setattr(cli, "measure_ceilings", lambda device_type: dict(fresh))
    facts = cli.device_facts()
    key = cli.cache_key(facts)
    text = MALFORMED_CACHES[problem]
    if text is None:
        entry = "junk" if "str" in problem else {"copy_gbps": "fast", "copy_bytes": 1,
                                                  "matmul": {"fp32": {"n": 8}}}  # fmt: skip
        text = json.dumps({key: entry, "other device": fresh})
    (tmp_path / cli.CACHE_FILE).write_text(text)
    assert cli.cached_ceilings(facts) is None  # what profile reads: none, not a crash
    assert cli.main(["info"]) == 0
    out, err = capsys.readouterr()
    assert "ceilings (measured now" in out and "Traceback" not in err
    assert (
        err.startswith(f"vlmkernels info: ignoring the ceilings cache {tmp_path}")
        and problem in err
    )
    data = json.loads((tmp_path / cli.CACHE_FILE).read_text())
    assert data[key]["copy_gbps"] == 10.0
    assert cli.cached_ceilings(facts) == data[key]
    assert cli.main(["info"]) == 0
    out, err = capsys.readouterr()
    assert "ceilings (cached" in out and err == ""


def test_unreadable_ceilings_cache_is_named_unreadable(tmp_path, monkeypatch, capsys):
    """A cache folder that is a file: the message says the cache cannot be read (not that
    it does not parse), and info still measures and exits 0."""
    folder = tmp_path / "a file"
    folder.write_text("")
    monkeypatch.setenv("VLMKERNELS_CACHE_DIR", str(folder))
    fresh = {"copy_gbps": 10.0, "copy_bytes": 1 << 20, "matmul": {"fp32": {"tflops": 1.0, "n": 8}}}
    monkeypatch.setattr(cli, "measure_ceilings", lambda device_type: dict(fresh))
    assert cli.main(["info"]) == 0
    out, err = capsys.readouterr()
    assert "ceilings (measured now" in out
    assert "it cannot be read (NotADirectoryError" in err and "does not parse" not in err


def test_ceilings_cache_keeps_entries_written_while_measuring(tmp_path, monkeypatch):
    """Several jobs sharing one cache folder: an entry another process stored while this
    one measured survives this one's write, which goes through a file of its own (a shared
    'ceilings.tmp' let one process rename another's half-written file into place)."""
    monkeypatch.setenv("VLMKERNELS_CACHE_DIR", str(tmp_path))
    fresh = {"copy_gbps": 10.0, "copy_bytes": 1 << 20, "matmul": {"fp32": {"tflops": 1.0, "n": 8}}}
    path = tmp_path / cli.CACHE_FILE
    temporaries = []

    def measure(device_type):  # meanwhile, another process stores its device's entry
        path.write_text(json.dumps({"other device": fresh}))
        return dict(fresh)

    real_mkstemp = cli.tempfile.mkstemp

    def mkstemp(**kwargs):
        fd, name = real_mkstemp(**kwargs)
        temporaries.append(name)
        return fd, name

    monkeypatch.setattr(cli, "measure_ceilings", measure)
    monkeypatch.setattr(cli.tempfile, "mkstemp", mkstemp)
    facts = cli.device_facts()
    entry, cached = cli.ceilings(facts)
    assert not cached and entry["copy_gbps"] == 10.0
    data = json.loads(path.read_text())
    assert set(data) == {"other device", cli.cache_key(facts)}
    assert len(temporaries) == 1 and temporaries[0].startswith(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == [cli.CACHE_FILE]


# ---- user errors of profile, bench --out, report and pytest benchmarks
def test_profile_with_a_bad_forced_backend_fails_before_building(monkeypatch, capsys, tmp_path):
    import benchmarks.profile as profile

    monkeypatch.setattr(profile, "_run", lambda *a: pytest.fail("profiled"))
    monkeypatch.setenv("VLMKERNELS_BACKEND", "junk")
    assert cli.main(["profile", "clip_loss", "--out", str(tmp_path)]) == 2
    _one_line_error(capsys, "profile", "VLMKERNELS_BACKEND must be one of")


def test_profile_of_a_shape_the_op_rejects_is_one_line(capsys, tmp_path):
    args = ["profile", "pool_avg2x2", "--shape", "S=1", "--out", str(tmp_path)]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("vlmkernels profile: ") and "S=1" in err, err


def test_pytest_bench_modes_refuses_bwd_and_unknown_names():
    from benchmarks.conftest import collect_cases

    for opts in ({"bench_modes": "bwd"}, {"bench_modes": "junk"},
                 {"bench_providers": "junk"}, {"bench_shape": ["Q=3"]},
                 {"bench_shape": ["N=abc"]}):  # fmt: skip

        class Config:
            def getoption(self, name, opts=opts):
                return {"bench_ops": "clip_loss", **opts}.get(name)

        with pytest.raises(pytest.UsageError):
            collect_cases(Config())


def test_pytest_bench_shape_repeated_merges_as_bench_shape():
    """``--bench-shape N=64 --bench-shape N=128`` sweeps both sizes, as bench's ``--shape``
    does (the second used to replace the first)."""
    from benchmarks.conftest import collect_cases

    class Config:
        def getoption(self, name):
            return {"bench_ops": "clip_loss", "bench_providers": "eager",
                    "bench_shape": ["N=64", "d=32", "N=128"]}.get(name)  # fmt: skip

    assert sorted({c.shape["N"] for c in collect_cases(Config())}) == [64, 128]


def test_bench_refuses_a_foreign_csv_in_out_before_measuring(tmp_path, monkeypatch, capsys):
    import benchmarks.__main__ as bench_main

    monkeypatch.setattr(bench_main, "measure", lambda *a: pytest.fail("measured"))
    foreign = tmp_path / "contrastive.csv"
    foreign.write_text("name,age\nbob,3\n")
    assert cli.main(["bench", "clip_loss", "--out", str(tmp_path)]) == 2
    _one_line_error(capsys, "bench", str(foreign), "not a benchmark results CSV")
    assert foreign.read_text() == "name,age\nbob,3\n"


def test_bench_appends_after_a_truncated_last_row(tmp_path):
    from benchmarks.env import collect
    from benchmarks.harness import Case, Record
    from benchmarks.report import COLUMNS, CsvSink, read_csvs

    path = tmp_path / "contrastive.csv"  # a run killed mid-row
    path.write_text(",".join(COLUMNS) + "\r\n" + "2026-01-01T00:00:00Z,run-a,contrastive,clip")
    sink = CsvSink(path, "contrastive", "N", "run-b", collect(torch.device("cpu")))
    sink([Record(Case("clip_loss", "vlmkernels", "fwd", (("N", 8),), "float32"), "ms", 1.0)])
    rows = read_csvs([path])
    assert rows[-1]["run_id"] == "run-b" and rows[-1]["p50"] == "1", rows


def test_report_on_a_csv_with_a_malformed_shape(tmp_path, capsys):
    from benchmarks.report import COLUMNS

    results = tmp_path / "csvs"
    results.mkdir()
    row = dict.fromkeys(COLUMNS, "")
    row |= dict(timestamp="2026-01-01T00:00:00Z", run_id="r", suite="contrastive",
                op="clip_loss", provider="vlmkernels", mode="fwd", shape="N=sixty",
                dtype="float32", metric="ms", p50="1.0", status="ok", device="cpu")  # fmt: skip
    with (results / "contrastive.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerow(row)
    assert cli.main(["report", "--results", str(results), "--out", str(tmp_path / "o")]) == 2
    _one_line_error(capsys, "report", "shape", "N=sixty")


def test_bench_names_the_ops_without_a_requested_provider(capsys):
    """siglip_loss has no inf_cl: it is left out with a note, not timed into an empty
    table."""
    assert cli.main(["bench", "contrastive", "--providers", "inf_cl", "--list"]) == 0
    out = capsys.readouterr().out
    assert "[siglip_loss] has none of --providers inf_cl" in out, out
    listed = [line.split()[0] for line in out.splitlines() if " inf_cl " in f" {line} "]
    assert "clip_loss" in listed and "siglip_loss" not in listed, out


def test_repeated_shape_options(capsys, tmp_path):
    """bench: a key given twice takes both lists, each size once (N=4,4 timed every case
    twice; a second --shape N replaced the first silently); profile times one size per key
    and refuses a repeated one."""
    args = ["bench", "clip_loss", "--providers", "vlmkernels", "--modes", "fwd", "--list"]
    assert cli.main([*args, "--shape", "N=16,16", "--shape", "N=8", "--shape", "d=32"]) == 0
    shapes = [line.split()[2] for line in capsys.readouterr().out.splitlines()
              if line.startswith("clip_loss ")]  # fmt: skip
    assert shapes == ["N=16,d=32", "N=8,d=32"], shapes
    args = ["profile", "clip_loss", "--shape", "N=16", "--shape", "N=8", "--out", str(tmp_path)]
    assert cli.main(args) == 2
    _one_line_error(capsys, "profile", "--shape: N given more than once")


def test_the_ncu_line_reruns_the_same_call():
    """The ncu command line carries --compile-backend and --seed (they were dropped: ncu
    profiled another backend's graph, or other inputs)."""
    import argparse

    from benchmarks.profile import ncu_command

    args = argparse.Namespace(op="clip_loss", provider="compile", compile_backend="aot_eager",
                              seed=3)  # fmt: skip
    line = ncu_command(args, {"N": 64}, torch.float32, "fwd", ["k"])
    assert "--provider compile --compile-backend aot_eager --seed 3 --iters 1" in line, line
    args = argparse.Namespace(op="clip_loss", provider="vlmkernels", compile_backend="inductor",
                              seed=0)  # fmt: skip
    line = ncu_command(args, {"N": 64}, torch.float32, "fwd", ["k"])
    assert "--compile-backend" not in line and "--seed" not in line, line

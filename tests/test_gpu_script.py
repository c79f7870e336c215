"""scripts/gpu.sh, the one prepared GPU run: its dry run (no GPU) finds every test file,
benchmark op, shape key, mode, target provider and kernel it names, and fails on a name that
does not exist; the real run's step and budget logic with a stand-in Python."""

import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu.sh"


def _run(*args, env=None, timeout=300):
    import sys

    full = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=full,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


@pytest.fixture(scope="module")
def dry_run():
    return _run("--dry-run")


def test_dry_run_passes_and_names_everything(dry_run):
    out = dry_run.stdout
    assert dry_run.returncode == 0, out + dry_run.stderr[-3000:]
    assert out.rstrip().endswith("dry run: ok")
    gpu_tests = sorted(p.relative_to(ROOT).as_posix() for p in ROOT.glob("tests/*_gpu.py"))
    for name in gpu_tests:
        assert f"ok   test file {name}" in out
    assert "ok   pytest collects" in out
    # every non-host target's op is benchmarked, with a check of its providers
    import importlib

    from vlmkernels.cli import load_benchmarks

    load_benchmarks(ROOT)
    targets = importlib.import_module("benchmarks.targets")
    ops = {(t.suite, t.op) for t in targets.TARGETS if t.metric != "host_us"}
    for suite, op in ops:
        assert f"ok   bench {suite}/{op}:" in out, (suite, op)
    assert "ok   vlmkernels tune, kernels:" in out
    assert "FAIL" not in out


def test_dry_run_fails_on_a_missing_test_file(tmp_path):
    """With a stand-in Python that succeeds silently (the Python steps are what
    test_dry_run_passes_and_names_everything checks), so the failure is the file check's."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/bash\nexit 0\n")
    fake.chmod(0o755)
    result = _run("--dry-run", env={"GPU_TESTS": "tests/test_no_such_gpu.py", "PYTHON": str(fake)})
    assert result.returncode != 0
    assert "FAIL test file tests/test_no_such_gpu.py missing" in result.stdout
    assert "dry run: FAILED" in result.stdout


def test_unknown_step_prints_usage():
    result = _run("no-such-step")
    assert result.returncode == 2
    assert "--dry-run" in result.stdout


def test_steps_are_time_boxed_and_recorded(tmp_path):
    """The whole run with a stand-in for python3 (it sleeps on pytest, succeeds otherwise)
    and no compute-sanitizer: each step's status lands in status.tsv, a failing or timed-out
    step does not stop the next, the exit status says that one failed, and the results are
    packed into at most 8 files."""
    fake = tmp_path / "python"
    fake.write_text(
        "#!/bin/bash\n"
        'case "$*" in\n'
        '  *"-m pytest"*) sleep 30 ;;\n'
        "  *families*) echo fam ;;\n"
        '  *"-m vlmkernels tune"*) mkdir -p "$OUT/configs/nvidia_h200"; '
        'echo "{}" > "$OUT/configs/nvidia_h200/k.json" ;;\n'
        "esac\n"
        "exit 0\n"
    )
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = {"PYTHON": str(fake), "OUT": str(out), "GPU_SH_BUDGET_S": "120",
           "BENCH_MIN_S": "5", "PATH": f"{tmp_path}:/usr/bin:/bin"}  # fmt: skip
    result = _run("gpu-tests", "tune", env={**env, "GPU_TESTS_S": "3"}, timeout=120)
    status = (out / "status.tsv").read_text().splitlines()
    assert status[0] == "step\tstatus\tseconds"
    steps = dict(line.split("\t")[:2] for line in status[1:])
    assert steps["setup"] == "ok"
    assert steps["gpu-tests"] == "timed out after 3s"
    assert steps["tune"] == "ok"
    assert "memcheck" not in steps and "bench" not in steps
    assert result.returncode == 1
    files = sorted(p.name for p in out.iterdir())
    assert files == ["configs.tar.gz", "gpu.log", "results.tar.gz", "status.tsv"]
    listing = subprocess.run(["tar", "-tzf", str(out / "configs.tar.gz")], capture_output=True,
                             text=True).stdout  # fmt: skip
    assert "vlmkernels/configs/nvidia_h200/k.json" in listing

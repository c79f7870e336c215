"""The source distribution and setup.py as users build them: the sdist carries what building
the CUDA extension from it needs (every csrc/ file, CMakeLists.txt) and the license, not the
tests (they need the checkout), and ``VLMKERNELS_BUILD_CUDA=1`` refuses to install without
the extension.

Each test works on a copy of the tracked files (``git ls-files``), so no build output lands
in the checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def _tracked() -> list[str]:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout (git ls-files)")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True)
    return [name for name in out.stdout.decode().split("\0") if name]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, list[str]]:
    """(a copy of the tracked files, their names)."""
    names = _tracked()
    root = tmp_path_factory.mktemp("source")
    for name in names:
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)
    return root, names


def _setup(root: Path, *args: str, build_cuda: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, VLMKERNELS_BUILD_CUDA=build_cuda)
    return subprocess.run([sys.executable, "setup.py", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def test_sdist_carries_the_cuda_sources_and_the_license(source, tmp_path):
    root, names = source
    proc = _setup(root, "-q", "sdist", "-d", str(tmp_path), build_cuda="0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (archive,) = tmp_path.glob("vlmkernels-*.tar.gz")
    with tarfile.open(archive) as tar:
        inside = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    wanted = [n for n in names if n.startswith("csrc/")] + ["CMakeLists.txt", "LICENSE"]
    assert any(n.endswith(".cu") for n in wanted) and any(n.endswith(".h") for n in wanted)
    assert not [n for n in wanted if n not in inside]
    assert "setup.py" in inside and "vlmkernels/core/version.py" in inside
    # no tests that need the checkout's benchmarks/ and scripts/, which it does not carry
    assert not [n for n in inside if n.startswith(("tests/", "benchmarks/", "scripts/"))]


@pytest.mark.skipif(bool(torch.version.cuda), reason="this torch can build the extension")
def test_required_extension_that_cannot_build_is_an_install_error(source):
    root, _ = source
    proc = _setup(root, "--name", build_cuda="1")
    assert proc.returncode != 0
    assert "VLMKERNELS_BUILD_CUDA=1 requires the CUDA C++ extension" in proc.stderr
    assert "has no CUDA" in proc.stderr
    assert _setup(root, "--name", build_cuda="").returncode == 0


# setup.py run as if torch were a CUDA 12.8 build: torch's build_ext then goes as far as
# comparing nvcc's version with torch's, before compiling anything
_FAKE_CUDA_TORCH = """
import runpy, sys
import torch
torch.version.cuda = "12.8"
torch.cuda._is_compiled = lambda: True
torch.cuda.is_available = lambda: False
sys.argv = ["setup.py", *sys.argv[1:]]
runpy.run_path("setup.py", run_name="__main__")
"""


def test_extension_that_torch_refuses_to_build_installs_without_it(source, tmp_path):
    """An nvcc of another CUDA major version than torch's (CUDA 13's nvcc, a CUDA 12 torch)
    is refused by torch's ``build_extensions`` before any extension builds, with a
    RuntimeError: the package installs without the extension, saying why, unless
    ``VLMKERNELS_BUILD_CUDA=1``."""
    root, _ = source
    nvcc = tmp_path / "cuda" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 99.0, V99.0.0'\n")
    nvcc.chmod(0o755)
    (tmp_path / "cuda" / "include").mkdir()
    (tmp_path / "cuda" / "include" / "cuda_runtime_api.h").write_text("")
    build = ["-c", _FAKE_CUDA_TORCH, "build_ext", "--build-temp", str(tmp_path / "temp"),
             "--build-lib", str(tmp_path / "lib")]  # fmt: skip
    for build_cuda in ("", "1"):
        env = dict(os.environ, CUDA_HOME=str(nvcc.parent.parent), VLMKERNELS_BUILD_CUDA=build_cuda)
        proc = subprocess.run([sys.executable, *build], cwd=root, env=env, capture_output=True,
                              text=True, timeout=300)  # fmt: skip
        if build_cuda:
            assert proc.returncode != 0 and "mismatches" in proc.stderr, proc.stderr[-3000:]
        else:
            assert proc.returncode == 0, proc.stderr[-3000:]
            said = "building vlmkernels._C failed, installing without it: The detected CUDA"
            assert f"{said} version (99.0) mismatches" in proc.stderr, proc.stderr[-3000:]


def test_toolkit_without_cuda_headers_installs_without_the_extension(source, tmp_path):
    """Without CUDA_HOME torch takes the folder above the nvcc on PATH as the toolkit: for a
    wrapper script or link elsewhere (/usr/local/bin/nvcc) that folder has no CUDA headers
    and the compile would fail on cuda_runtime_api.h. setup.py says so before building,
    naming the fix: the package installs without the extension, or with
    ``VLMKERNELS_BUILD_CUDA=1`` the install fails."""
    root, _ = source
    nvcc = tmp_path / "local" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text('#!/bin/sh\nexec /usr/local/cuda/bin/nvcc "$@"\n')
    nvcc.chmod(0o755)
    build = ["-c", _FAKE_CUDA_TORCH, "build_ext", "--build-temp", str(tmp_path / "temp"),
             "--build-lib", str(tmp_path / "lib")]  # fmt: skip
    said = (
        f"the CUDA toolkit torch found ({nvcc.parent.parent}, from {nvcc}) has no "
        "include/cuda_runtime_api.h: set CUDA_HOME to the toolkit's folder"
    )
    for build_cuda in ("", "1"):
        env = dict(os.environ, CUDA_HOME=str(nvcc.parent.parent), VLMKERNELS_BUILD_CUDA=build_cuda)
        proc = subprocess.run([sys.executable, *build], cwd=root, env=env, capture_output=True,
                              text=True, timeout=300)  # fmt: skip
        assert said in proc.stderr, proc.stderr[-3000:]
        if build_cuda:
            assert proc.returncode != 0 and "requires the CUDA C++ extension" in proc.stderr
        else:
            assert proc.returncode == 0, proc.stderr[-3000:]
            assert "installing without the CUDA C++ extension: " in proc.stderr
            assert not list((tmp_path / "lib").rglob("_C*.so"))

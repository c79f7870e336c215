"""Test set-up: without a GPU, the Triton kernels run through Triton's CPU interpreter.

TRITON_INTERPRET must be set before any kernel is defined, i.e. before vlmkernels is
imported, so it is set here, at collection time.
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def device() -> torch.device:
    """The device the tests run on: CUDA when present, else the CPU (Triton interpreted)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _open_clip_loss_path():
    """open_clip's loss.py: extracted by `make` into <venv>/open_clip (see
    scripts/open_clip_loss.py), else from an installed open_clip_torch; None if neither."""
    import importlib.util
    import pathlib
    import sys

    extracted = pathlib.Path(sys.prefix) / "open_clip" / "loss.py"
    if extracted.is_file():
        return extracted
    spec = importlib.util.find_spec("open_clip")
    if spec is not None and spec.submodule_search_locations:
        installed = pathlib.Path(next(iter(spec.submodule_search_locations))) / "loss.py"
        if installed.is_file():
            return installed
    return None


@pytest.fixture(scope="session")
def open_clip_loss():
    """open_clip's ``loss`` module, loaded by path (it imports only torch): ``ClipLoss``,
    ``SigLipLoss``. Skips the test when the file is not available."""
    import importlib.util

    path = _open_clip_loss_path()
    if path is None:
        pytest.skip("open_clip's loss.py is not available (make extracts it into .venv)")
    spec = importlib.util.spec_from_file_location("_open_clip_loss", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

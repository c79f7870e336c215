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


@pytest.fixture(scope="session")
def open_clip_loss():
    """open_clip's ``loss`` module, loaded by path (it imports only torch): ``ClipLoss``,
    ``SigLipLoss``. Skips the test when the file is not available."""
    from _open_clip import load_loss

    module = load_loss()
    if module is None:
        pytest.skip("open_clip's loss.py is not available (make extracts it into .venv)")
    return module


@pytest.fixture
def config_dirs(tmp_path, monkeypatch):
    """(user dir, package dir) of the tuned configs, both empty, with every cache cleared
    around the test."""
    from vlmkernels.core import configs, tuning

    user, package = tmp_path / "user", tmp_path / "package"
    monkeypatch.setenv(tuning.CONFIG_DIR_ENV, str(user))
    monkeypatch.setattr(configs, "PACKAGE_CONFIG_DIR", package)
    tuning.clear_cache()
    yield user, package
    tuning.clear_cache()


@pytest.fixture
def cpu_replicate(monkeypatch):
    """``torch.nn.parallel.replicate.replicate`` (what ``nn.DataParallel`` runs each step)
    on the CPU: its broadcast replaced by copies, device i's scaled by i + 1 so that the
    replicas' weights differ."""
    import importlib

    replicate = importlib.import_module("torch.nn.parallel.replicate")

    def broadcast(tensors, devices, detach=False):
        return [[(t.detach() if detach else t) * (i + 1.0) for t in tensors]
                for i, _ in enumerate(devices)]  # fmt: skip

    monkeypatch.setattr(replicate, "_broadcast_coalesced_reshape", broadcast)
    monkeypatch.setattr(replicate, "_get_device_index", lambda d, optional=False: 0)
    return replicate.replicate

"""Where open_clip's loss.py is: extracted by `make` into <venv>/open_clip (see
scripts/open_clip_loss.py), else in an installed open_clip_torch. The file imports only
torch, so the tests load it by path without importing open_clip."""

import importlib.util
import pathlib
import sys


def loss_path() -> pathlib.Path | None:
    extracted = pathlib.Path(sys.prefix) / "open_clip" / "loss.py"
    if extracted.is_file():
        return extracted
    spec = importlib.util.find_spec("open_clip")
    if spec is not None and spec.submodule_search_locations:
        installed = pathlib.Path(next(iter(spec.submodule_search_locations))) / "loss.py"
        if installed.is_file():
            return installed
    return None


def load_loss():
    """open_clip's ``loss`` module (``ClipLoss``, ``SigLipLoss``), or None."""
    path = loss_path()
    if path is None:
        return None
    spec = importlib.util.spec_from_file_location("_open_clip_loss", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

"""Put open_clip's ``loss.py`` into a folder, for the parity tests, without installing
open_clip_torch.

``python scripts/open_clip_loss.py DEST``: downloads the newest open_clip_torch wheel with
``pip download --no-deps`` and extracts ``open_clip/loss.py`` (it imports only torch) to
``DEST/loss.py``, with the wheel's version in ``DEST/VERSION``. Installing open_clip_torch
itself would pull torchvision and timm (a CUDA torch with them) or, with ``--no-deps``, leave
a package whose ``import open_clip`` fails. The tests load the file by path
(``tests/conftest.py``, fixture ``open_clip_loss``). Exits 1, saying why, when the wheel
cannot be downloaded (an offline machine).
"""

from __future__ import annotations

import pathlib
import subprocess
import sys
import tempfile
import zipfile


def main(dest: pathlib.Path) -> int:
    if (dest / "loss.py").is_file():
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
               "--no-deps", "--only-binary=:all:", "-d", tmp, "open_clip_torch"]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(pathlib.Path(tmp).glob("open_clip_torch-*.whl"))
        if done.returncode != 0 or not wheels:
            print(f"could not download open_clip_torch: {done.stderr.strip()[-300:]}")
            return 1
        with zipfile.ZipFile(wheels[-1]) as wheel:
            source = wheel.read("open_clip/loss.py")
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "loss.py").write_bytes(source)
        (dest / "VERSION").write_text(wheels[-1].name.split("-")[1] + "\n")
    print(f"open_clip {(dest / 'VERSION').read_text().strip()}: loss.py in {dest}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/open_clip_loss.py DEST")
    sys.exit(main(pathlib.Path(sys.argv[1])))

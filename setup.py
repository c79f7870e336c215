"""Build script: the vlmkernels package, plus the CUDA C++ extension ``vlmkernels._C`` (csrc/)
where it can be built.

The extension is built (torch's CUDAExtension, with ninja when present) when torch is
importable at build time and has CUDA (``torch.version.cuda``) and nvcc is found (CUDA_HOME,
PATH or /usr/local/cuda). Otherwise, or with ``VLMKERNELS_BUILD_CUDA=0``, the pure-Python
package installs and setup.py says why in one line; the ``cuda`` backend then reports itself
unavailable. A build that fails also installs the package without the extension (saying so),
unless ``VLMKERNELS_BUILD_CUDA=1`` requires it: then a failed or skipped build is an error.
On a GPU machine without a package registry:

    pip install -e . --no-deps --no-build-isolation

Targets: sm_80 and sm_90a by default; ``VLMKERNELS_CUDA_ARCHS="80;90a;100a"`` overrides them
(";", "," or spaces between; "+PTX" after one also embeds its PTX). No ``--use_fast_math``:
it would swap cosf/sinf for approximations and flush denormals, and the kernels must give
exactly the Triton kernels' results.
"""

from __future__ import annotations

import os
import re
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# Every family's kernels and binding (csrc/<family>/*.cu, *.cpp) and the module
# (csrc/common/module.cpp): a new family adds a folder, not a line here.
SOURCES = sorted(
    os.path.relpath(os.path.join(folder, name), ROOT)
    for folder, _, names in os.walk(os.path.join(ROOT, "csrc"))
    for name in names
    if name.endswith((".cu", ".cpp"))
)
DEFAULT_ARCHS = "80;90a"


def _log(message: str) -> None:
    print(f"vlmkernels: {message}", file=sys.stderr)


def _gencode(archs: str) -> tuple[list[str], list[str]]:
    """(-gencode flags, target names) for "80;90a+PTX"-style lists."""
    flags, names = [], []
    for item in filter(None, re.split(r"[;,\s]+", archs)):
        arch, ptx = item.removesuffix("+PTX"), item.endswith("+PTX")
        arch = arch.removeprefix("sm_").removeprefix("compute_").replace(".", "")
        if not re.fullmatch(r"\d{2,3}[af]?", arch):
            raise ValueError(f"VLMKERNELS_CUDA_ARCHS: cannot read {item!r} (e.g. 80;90a;100a)")
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
        names.append(f"sm_{arch}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{arch},code=compute_{arch}")
            names.append(f"compute_{arch}")
    if not flags:
        raise ValueError("VLMKERNELS_CUDA_ARCHS names no architecture")
    return flags, names


def _nvcc(cuda_home: str | None) -> str | None:
    if cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return os.path.join(cuda_home, "bin", "nvcc")
    return None


def _choice() -> str:
    return os.environ.get("VLMKERNELS_BUILD_CUDA", "").strip().lower()


def _required() -> bool:
    """``VLMKERNELS_BUILD_CUDA=1``: a failed or skipped build is an install error."""
    return _choice() in ("1", "true", "on")


def _extension():
    """(ext_modules, cmdclass, None) for the CUDA extension, or ([], {}, the reason why not)."""
    choice = _choice()
    if choice in ("0", "false", "off"):
        return [], {}, "VLMKERNELS_BUILD_CUDA=0"
    required = _required()
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return [], {}, "torch is not importable at build time (use --no-build-isolation)"
    if not torch.version.cuda:
        return [], {}, f"torch {torch.__version__} has no CUDA"
    nvcc = _nvcc(cpp_extension.CUDA_HOME)
    if nvcc is None:
        return [], {}, "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    # without CUDA_HOME torch takes the folder above the nvcc on PATH: a wrapper script or
    # link outside the toolkit (/usr/local/bin/nvcc) gives one without the CUDA headers
    if not os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "include", "cuda_runtime_api.h")):
        return [], {}, (f"the CUDA toolkit torch found ({cpp_extension.CUDA_HOME}, from {nvcc}) "
                        "has no include/cuda_runtime_api.h: set CUDA_HOME to the toolkit's "
                        "folder (e.g. /usr/local/cuda)")  # fmt: skip
    flags, names = _gencode(os.environ.get("VLMKERNELS_CUDA_ARCHS", DEFAULT_ARCHS))
    ext = cpp_extension.CUDAExtension(
        "vlmkernels._C",
        SOURCES,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={
            "cxx": ["-O3", f"-DVLMKERNELS_CUDA_ARCHS={'__'.join(names)}"],
            "nvcc": ["-O3", "-lineinfo", *flags],
        },
    )
    ext.optional = not required  # a failed build installs the package without it
    _log(f"building the CUDA C++ extension vlmkernels._C for {', '.join(names)} with {nvcc}")
    return [ext], {"build_ext": _build_command(cpp_extension, required)}, None


def _build_command(cpp_extension, required: bool):
    base = cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)

    class BuildExtension(base):
        # The whole build, not each extension's: torch's build_extensions checks nvcc
        # against torch's CUDA version and the host compiler against nvcc's bounds before
        # any extension builds, and raises RuntimeError (a CUDA 13 nvcc with a CUDA 12
        # torch), which setuptools' "optional" does not catch; nor ninja's failures.
        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as exc:
                if required:
                    raise
                _log(f"building vlmkernels._C failed, installing without it: {_reason(exc)}")

    return BuildExtension


def _reason(exc: Exception) -> str:
    """The exception's message; torch raises some as (format, *values) argument tuples."""
    args = exc.args
    if len(args) > 1 and isinstance(args[0], str) and "%" in args[0]:
        try:
            return args[0] % args[1:]
        except (TypeError, ValueError):
            pass
    return str(exc)


ext_modules, cmdclass, why_not = _extension()
if why_not and _required():
    sys.exit(f"vlmkernels: VLMKERNELS_BUILD_CUDA=1 requires the CUDA C++ extension: {why_not}")
if why_not:
    _log(f"installing without the CUDA C++ extension: {why_not}")

setup(ext_modules=ext_modules, cmdclass=cmdclass)

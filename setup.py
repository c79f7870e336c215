"""Build script.

The package is pure Python today (Triton kernels compile at run time). The CUDA C++
extension arrives with the csrc/ backend; until then setup.py only declares the package,
and installs offline with `pip install -e . --no-deps --no-build-isolation`.
"""

from setuptools import setup

setup()

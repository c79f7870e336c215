"""The package version (``vlmkernels.__version__``; pyproject.toml reads it from here)."""

__version__ = "0.1.0"

"""The op families, one package each (``vlmkernels/ops/<family>/``): kernels, reference,
op declarations, public functions, and ``family.py``, which registers what the shared tools
need (:mod:`vlmkernels.core.family`). Importing this package imports every family in it."""

import importlib
import pkgutil

FAMILIES = tuple(
    importlib.import_module(f"{__name__}.{module.name}")
    for module in pkgutil.iter_modules(__path__)
    if module.ispkg
)

"""The integrations' tables, one module (or package) per group of architectures (each
registers its :class:`..patching.Patcher`); importing this package imports every table
module in it."""

import importlib
import pkgutil

TABLES = tuple(
    importlib.import_module(f"{__name__}.{module.name}")
    for module in pkgutil.iter_modules(__path__)
)

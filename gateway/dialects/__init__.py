"""API dialects. Every module here that defines ``DIALECT`` is mounted by the app."""

from __future__ import annotations

import importlib
import pkgutil

from gateway.dialects.base import Dialect


def discover() -> list[type[Dialect]]:
    """Every dialect class defined in this package, in module-name order."""
    found: list[type[Dialect]] = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_") or info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        dialect = getattr(module, "DIALECT", None)
        if dialect is not None:
            found.append(dialect)
    return found

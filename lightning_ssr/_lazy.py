"""Lazy package attributes (PEP 562): a package names what it exports, imported on first use.

The command line answers ``--help`` and argument errors without importing torch, Lightning or
Avalanche; ``from lightning_ssr import SynapticScaling`` works as before.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(namespace: dict[str, Any], exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A package's ``__getattr__`` and ``__dir__``: each export is imported from its module on first use.

    Args:
        namespace: the package's ``globals()``; an export is cached there once imported.
        exports: each exported name and the module that defines it.

    Example:
        >>> ns = {"__name__": "pkg"}
        >>> getattr_, dir_ = lazy_exports(ns, {"sqrt": "math"})
        >>> getattr_("sqrt")(4.0), "sqrt" in ns
        (2.0, True)
        >>> getattr_("nope")
        Traceback (most recent call last):
        ...
        AttributeError: module 'pkg' has no attribute 'nope'
    """

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {namespace['__name__']!r} has no attribute {name!r}")
        value = namespace[name] = getattr(importlib.import_module(module), name)
        return value

    def __dir__() -> list[str]:
        return sorted(set(exports) | {k for k in namespace if not k.startswith("_")})

    return __getattr__, __dir__

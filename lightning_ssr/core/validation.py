"""Argument checks shared by every module: each error names the argument, what is allowed and
what was received."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional

from torch import nn

__all__ = ["check_bool", "check_choice", "check_int", "check_number", "check_layer_types", "check_patterns"]


def check_bool(name: str, value: Any) -> None:
    """Raise ``TypeError`` unless ``value`` is a bool.

    Example:
        >>> check_bool("resume", 1)
        Traceback (most recent call last):
        ...
        TypeError: `resume` must be a bool, got 1 of type int
    """
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool, got {value!r} of type {type(value).__name__}")


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``.

    Example:
        >>> check_choice("scenario", "online", ("task", "domain", "class"))
        Traceback (most recent call last):
        ...
        ValueError: `scenario` must be one of ['task', 'domain', 'class'], got 'online'
    """
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {list(choices)}, got {value!r}")


def check_int(name: str, value: Any, low: int, high: float = math.inf, optional: bool = False) -> None:
    """Raise unless ``value`` is an int (not a bool) in ``[low, high]`` (or ``None`` if optional).

    Example:
        >>> check_int("epochs", 0, 1)
        Traceback (most recent call last):
        ...
        ValueError: `epochs` must be >= 1, got 0
        >>> check_int("n_tasks", 2.0, 1, 100)
        Traceback (most recent call last):
        ...
        TypeError: `n_tasks` must be an int, got 2.0 of type float
    """
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        kind = "an int or None" if optional else "an int"
        raise TypeError(f"`{name}` must be {kind}, got {value!r} of type {type(value).__name__}")
    if not low <= value <= high:
        allowed = f">= {low}" if high == math.inf else f"in [{low}, {high}]"
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}")


def check_number(name: str, value: Any, low: float, high: float = math.inf, *, low_open: bool = False,
                 high_open: bool = False) -> None:
    """Raise unless ``value`` is a finite real number in the interval from ``low`` to ``high``.

    Example:
        >>> check_number("max_change", 1.0, 0.0, 1.0, low_open=True, high_open=True)
        Traceback (most recent call last):
        ...
        ValueError: `max_change` must be in (0.0, 1.0), got 1.0
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a number, got {value!r} of type {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be finite, got {value!r}")
    lo_ok = value > low if low_open else value >= low
    hi_ok = value < high if high_open else value <= high
    if not (lo_ok and hi_ok):
        raise ValueError(
            f"`{name}` must be in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}, got {value!r}"
        )


def check_layer_types(layer_types: Any) -> tuple[type[nn.Module], ...]:
    """Normalise ``layer_types`` (one module class or a sequence of them) to a tuple.

    Example:
        >>> check_layer_types(nn.Linear)
        (<class 'torch.nn.modules.linear.Linear'>,)
    """
    if isinstance(layer_types, type):
        layer_types = (layer_types,)
    types = tuple(layer_types) if isinstance(layer_types, Sequence) else ()
    if not types or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in types):
        raise TypeError(
            "`layer_types` must be a non-empty sequence of nn.Module subclasses (e.g. (nn.Linear, nn.Conv2d)), "
            f"got {layer_types!r}"
        )
    return types


def check_patterns(name: str, patterns: Any, optional: bool = False) -> Optional[tuple[str, ...]]:
    """Normalise name patterns: one ``fnmatch`` pattern (str) or a sequence of them.

    Example:
        >>> check_patterns("include", "encoder.*")
        ('encoder.*',)
        >>> check_patterns("include", [], optional=True)
        Traceback (most recent call last):
        ...
        ValueError: `include` is empty, so it would select no layer: give fnmatch patterns of layer names, or None ...
        >>> check_patterns("exclude", [3])
        Traceback (most recent call last):
        ...
        TypeError: `exclude` must be an fnmatch pattern (str) or a sequence of them, got [3]
    """
    if optional and patterns is None:
        return None
    if isinstance(patterns, str):
        return (patterns,)
    if not isinstance(patterns, Sequence) or not all(isinstance(p, str) for p in patterns):
        allowed = "an fnmatch pattern (str) or a sequence of them" + (" or None" if optional else "")
        raise TypeError(f"`{name}` must be {allowed}, got {patterns!r}")
    if optional and not patterns:
        raise ValueError(f"`{name}` is empty, so it would select no layer: give fnmatch patterns of layer names, "
                         f"or None for the default (every Linear/Conv layer but the output layer)")
    return tuple(patterns)

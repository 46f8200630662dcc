"""Distillation methods: one module per method, registered by decorator (``registry``).

    kdpipe.methods.get("cat_kd")            # the registry entry: class, options, sources
    kdpipe.methods.get_method("kd", temperature=4)   # a built Method
    kdpipe.methods.get_method("at+kd")      # a sum of methods (``composite``)
    kdpipe.methods.available()              # every registered name

``kdpipe.methods.base.Method`` is the interface; docs/ARCHITECTURE.md "Add a method" the steps.
"""

from __future__ import annotations

from typing import Any

from kdpipe.errors import KdpipeError
from kdpipe.methods.base import Method
from kdpipe.methods.composite import SEPARATOR, CompositeMethod, split_name
from kdpipe.methods.registry import MethodEntry, MethodOptions, entries, get, option, register

__all__ = [
    "get_method",
    "get",
    "available",
    "entries",
    "canonical_method_name",
    "Method",
    "MethodEntry",
    "MethodOptions",
    "CompositeMethod",
    "option",
    "register",
]


def available() -> list[str]:
    """Names ``get_method`` accepts (sums of them too: ``at+kd``)."""
    return list(entries())


def canonical_method_name(name: str) -> str:
    """``"AT + KD"`` -> ``"at+kd"``; each part checked against the registry."""
    return SEPARATOR.join(get(part).name for part in split_name(name))


def _part_options(part: str, parts: list[str], options: dict) -> dict:
    """A part's options of a sum: its own section (``{"kd": {...}}``) over the flat options it
    takes (a flat option applies to every part that has it)."""
    takes = get(part).infos()
    flat = {k: v for k, v in options.items() if k not in parts and k in takes}
    own = options.get(part) or {}
    if not isinstance(own, dict):
        raise KdpipeError(f"Method options for {part!r} of a sum must be a mapping, not {own!r}.")
    return {**flat, **own}


def get_method(name: str, **options: Any) -> Method:
    """Build a method (or a sum ``a+b``) by name; unknown names or options raise ``KdpipeError``.

    Options left at None are treated as not given (so CLI defaults pass through)."""
    parts = [get(p).name for p in split_name(name)]
    if len(parts) == 1:
        return get(parts[0]).build(**options)
    if len(set(parts)) != len(parts):
        raise KdpipeError(f"Method {name!r} names a method twice.")
    given = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(k for k in given if k not in parts and not any(k in get(p).infos() for p in parts))
    if unknown:
        raise KdpipeError(f"Method {name!r}: no part takes the option {', '.join(unknown)}.")
    return CompositeMethod([get(p).build(**_part_options(p, parts, given)) for p in parts])

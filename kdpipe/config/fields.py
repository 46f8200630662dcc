"""Typed config values: every field of a config dataclass checked against its annotation and
its range, before any work.

The configs come from the command line, YAML files (``--set`` values are YAML), the
references' files and saved run directories, so a value may be of any type. ``check_fields``
turns each into its field's type (the method options' converters of
``kdpipe.methods.registry``: ``"2"`` is 2, ``2.0`` is 2, ``"abc"`` is not an integer, NaN is
not a number) and refuses a value outside its field's range (``LIMITS``: a batch size of 0, a
seed beyond 2**63, a million epochs), in one sentence naming the key, the value and what it
must be.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from kdpipe.errors import KdpipeError
from kdpipe.methods.registry import _CONVERTERS

__all__ = ["LIMITS", "SEED_MAX", "check_fields", "check_section", "check_value", "describe"]

#: numpy's and torch's generators take seeds below 2**64; a seed is an int64 in stores and tensors
SEED_MAX = 2**63 - 1

#: field name -> (lowest, highest, lowest excluded); the same name means the same thing in every
#: config. The upper bounds are far above any real run and far below what cannot be allocated.
LIMITS: dict[str, tuple[float | None, float | None, bool]] = {
    "epochs": (1, 1_000_000, False),
    "lr": (0, None, True),
    "batch_size": (1, 1 << 20, False),
    "momentum": (0, 1, False),
    "weight_decay": (0, None, False),
    "seed": (0, SEED_MAX, False),
    "subset_seed": (0, SEED_MAX, False),
    "data_parallel": (1, 4096, False),
    "num_workers": (1, 4096, False),
    "shard_size": (1, 1 << 40, False),
    "k_penult": (1, 1 << 20, False),
    "k_inter": (1, 1 << 16, False),
    "lda_dims": (1, 1 << 16, False),
    "topk": (1, 1 << 16, False),
    "topk_mass": (0, 1, True),
    "temperature": (0, None, True),
    "max_fit_points": (1, 1 << 40, False),
    "niter": (1, 100_000, False),
    "subset_fraction": (0, 1, True),
    "lr_decay": (0, None, True),
    "reserved_classes": (1, 1 << 20, False),
    "reserved_rate": (0, 1, True),
}

#: fields whose command-line flag is not --<field-name>
_FLAGS = {"data_parallel": "--gpus", "native_cam": "--cam-res native", "online_teacher": "--online-teacher"}

_EXPECTED = {
    bool: "true or false",
    int: "an integer",
    float: "a finite number",
    str: "a string",
    tuple: "a list",
    list: "a list",
    dict: "a mapping",
}


def describe(name: str, base: type) -> str:
    """What a value of field ``name`` must be, in words ("an integer from 1 to 1048576")."""
    text = _EXPECTED.get(base, base.__name__)
    lo, hi, open_lo = LIMITS.get(name, (None, None, False))
    if lo is not None and hi is not None:
        text += f" {'above' if open_lo else 'from'} {lo} {'and at most' if open_lo else 'to'} {hi}"
    elif lo is not None:
        text += f" {'above' if open_lo else 'of at least'} {lo}"
    return text


def _bases(annotation: Any) -> tuple[tuple, bool]:
    """``int | None`` -> ((int,), True); ``str | tuple | None`` -> ((str, tuple), True)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = typing.get_args(annotation)
        return tuple(a for a in args if a is not type(None)), type(None) in args
    return (typing.get_origin(annotation) or annotation,), False


def _in_range(name: str, value) -> bool:
    lo, hi, open_lo = LIMITS.get(name, (None, None, False))
    if lo is not None and (value <= lo if open_lo else value < lo):
        return False
    return hi is None or value <= hi


def _convert(base: type, value: Any) -> Any:
    if base is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ValueError(value)  # a YAML number for a string field ("views: 4") is its text
        return value if isinstance(value, str) else str(value)
    if base in (tuple, list):
        if isinstance(value, (list, tuple)):
            return base(value)
        raise ValueError(value)
    if base is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ValueError(value)
    if isinstance(value, (list, tuple, dict)):
        raise ValueError(value)
    return _CONVERTERS[base](value)


def check_value(name: str, value: Any, bases: tuple, optional: bool, key: str) -> Any:
    """``value`` as one of ``bases`` within the range of field ``name``; one sentence naming
    ``key`` (how the user wrote it) otherwise."""
    if value is None:
        if optional:
            return None
        raise KdpipeError(f"{key} must be {describe(name, bases[0])}, not null.")
    for base in bases:
        try:
            converted = _convert(base, value)
        except (TypeError, ValueError, OverflowError):
            continue
        if base in (int, float) and not _in_range(name, converted):
            raise KdpipeError(f"{key} must be {describe(name, base)}, not {value!r}.")
        if name in ("milestones",) and not all(_is_count(m) for m in converted):
            raise KdpipeError(f"{key} must be a list of epochs (integers of at least 0), not {value!r}.")
        return converted
    expected = " or ".join(describe(name, b) for b in bases)
    raise KdpipeError(f"{key} must be {expected}, not {value!r}.")


def _is_count(value) -> bool:
    try:
        return _CONVERTERS[int](value) >= 0
    except (TypeError, ValueError, OverflowError):
        return False


def check_fields(cfg, section: str) -> None:
    """Convert every field of the dataclass instance ``cfg`` to its annotated type, in place;
    one sentence naming ``section.field``, the value and the expected type otherwise."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        bases, optional = _bases(hints[f.name])
        if not all(b in _EXPECTED for b in bases):
            continue
        value = getattr(cfg, f.name)
        flag = _FLAGS.get(f.name, "--" + f.name.replace("_", "-"))
        setattr(cfg, f.name, check_value(f.name, value, bases, optional, f"{section}.{f.name} ({flag})"))


def check_method_options(method: str, options: dict, section: str) -> dict:
    """Each method option typed as the registry declares it (a NaN weight, a word for a number:
    one sentence now, not after the store is read); options no method knows are left to the
    method, which names its own options."""
    from kdpipe.methods.composite import split_name
    from kdpipe.methods.registry import canonical_name, option_infos

    if not isinstance(method, str):
        return options
    parts = [canonical_name(p) for p in split_name(method)]
    infos = option_infos()
    out = {}
    for key, value in options.items():
        per_method = infos.get(key) or {}
        info = next((per_method[p] for p in parts if p in per_method), next(iter(per_method.values()), None))
        out[key] = value if info is None or value is None else info.convert(value, section)
    return out


def check_section(cls, values: dict, section: str) -> dict:
    """The values of a config file's section (keys already known to be fields of ``cls``),
    each checked against its field's type before the config is built; returned as written (the
    config converts them, and the section's hash names its store and target set)."""
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        bases, optional = _bases(hints[key])
        if all(b in _EXPECTED for b in bases):
            check_value(key, value, bases, optional, f"{section}.{key}")
    return dict(values)

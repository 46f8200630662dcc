"""The method registry: every method registers itself, with its typed options.

A method module declares (mdistiller's one-file distillers, plus what stage one must write):

- an options dataclass (subclass of ``MethodOptions``) whose fields are made with ``option()``:
  each carries its reference default, the reference file it comes from, its help text and the
  key it takes in mdistiller / CAT-KD YAML files;
- the ``Method`` subclass, decorated with ``@register("name", options=TheOptions, ...)``.

Everything that lists methods reads this registry: the CLI's method flags, ``--print-config``,
the reading of the references' YAML files, ``kdpipe methods`` and the docs table. Methods are
found by importing every module of ``kdpipe.methods`` and the modules named by the
``kdpipe.methods`` entry-point group of installed third-party packages.

    @dataclass
    class KDOptions(MethodOptions):
        temperature: float | None = option(4.0, source="mdistiller/engine/cfg.py CFG.KD.TEMPERATURE",
                                           help="temperature T", yaml="KD.TEMPERATURE")

    @register("kd", options=KDOptions, summary="Hinton KD on logits", yaml_names=("KD",))
    class KD(Method): ...
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import pkgutil
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdpipe.errors import KdpipeError
from kdpipe.methods.base import Method

__all__ = [
    "ENTRY_POINT_GROUP",
    "OptionInfo",
    "MethodOptions",
    "MethodEntry",
    "option",
    "register",
    "get",
    "names",
    "entries",
    "load_all",
    "canonical_name",
    "option_infos",
]

#: The entry-point group third-party packages name their method modules in.
ENTRY_POINT_GROUP = "kdpipe.methods"

_MISSING: Any = object()


@dataclass(frozen=True)
class OptionInfo:
    """What the registry knows of one method option (the metadata of its options field).

    ``default``: the value used where neither the user nor a per-pair reference table gives
    one (None: the method resolves it, e.g. from the architectures); ``source``: the reference
    file the default comes from; ``yaml``: the key of mdistiller / CAT-KD YAML files it is read
    from, with ``yaml_default`` where that file's defaults (mdistiller/engine/cfg.py) differ
    from ``default``; ``choices``: the allowed values of a string option; ``type``: float, int,
    bool or str (from the field's annotation)."""

    name: str
    default: Any
    source: str
    help: str
    yaml: str | None = None
    yaml_default: Any = _MISSING
    choices: tuple | None = None
    type: type = float

    @property
    def reference_yaml_default(self) -> Any:
        return self.default if self.yaml_default is _MISSING else self.yaml_default

    def convert(self, value: Any, where: str) -> Any:
        """``value`` as this option's type; one sentence naming the option otherwise."""
        if value is None:
            return None
        try:
            converted = _CONVERTERS[self.type](value)
        except (TypeError, ValueError):
            expected = {bool: "true or false", int: "an integer", float: "a finite number"}.get(self.type, "a string")
            raise KdpipeError(f"{where}: option {self.name} must be {expected}, not {value!r}.") from None
        if self.choices is not None and converted not in self.choices:
            raise KdpipeError(f"{where}: option {self.name} must be one of {', '.join(self.choices)}, not {value!r}.")
        return converted


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.strip().lower() in ("true", "yes", "1")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(value)


def _to_int(value: Any) -> int:
    if isinstance(value, bool) or float(value) != int(float(value)):
        raise ValueError(value)
    return int(float(value))


def _to_float(value: Any) -> float:
    if isinstance(value, bool) or not math.isfinite(float(value)):  # a NaN weight trains on NaN
        raise ValueError(value)
    return float(value)


# YAML and the CLI hand strings, ints and floats; a value of another type is one sentence
_CONVERTERS: dict[type, Callable[[Any], Any]] = {bool: _to_bool, int: _to_int, float: _to_float, str: str}


def option(
    default: Any,
    *,
    source: str,
    help: str,
    yaml: str | None = None,
    yaml_default: Any = _MISSING,
    choices: tuple | None = None,
) -> Any:
    """A field of a method's options dataclass. The field itself defaults to None ("not
    given"): the method resolves it against its per-pair reference tables, then ``default``."""
    meta = {"default": default, "source": source, "help": help, "yaml": yaml, "yaml_default": yaml_default}
    return field(default=None, metadata={"kdpipe": {**meta, "choices": choices}})


def _base_type(annotation: Any) -> type:
    """``float | None`` -> float."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = args[0]
    if annotation not in (float, int, bool, str):
        raise TypeError(f"method options are float, int, bool or str (optionally | None), not {annotation!r}")
    return annotation


@dataclass
class MethodOptions:
    """Base of every method's options dataclass (fields made with ``option``)."""

    @classmethod
    def infos(cls) -> dict[str, OptionInfo]:
        out = {}
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            meta = f.metadata.get("kdpipe")
            if meta is None:
                raise TypeError(f"{cls.__name__}.{f.name} is not made with kdpipe.methods.registry.option()")
            out[f.name] = OptionInfo(name=f.name, type=_base_type(hints[f.name]), **meta)
        return out

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """{option: its default} (the values used where nothing else gives one)."""
        return {name: info.default for name, info in cls.infos().items()}


@dataclass(frozen=True)
class MethodEntry:
    """One registered method: its name, class, options and where it comes from."""

    name: str
    cls: type[Method]
    options: type[MethodOptions]
    summary: str
    paper: str = ""
    fixed: Mapping[str, Any] = field(default_factory=dict)
    yaml_names: tuple[str, ...] = ()
    #: keys of the references' YAML files this method reads that are not one of its options
    #: (key -> the reference's default), handed to ``cls.options_from_reference``
    yaml_extra: Mapping[str, Any] = field(default_factory=dict)
    #: keys of those files that do not change a kdpipe run (key -> default): recorded only
    yaml_recorded: Mapping[str, Any] = field(default_factory=dict)
    #: the module the method lives in (``kdpipe methods`` shows it)
    module: str = ""

    def infos(self) -> dict[str, OptionInfo]:
        return self.options.infos()

    def build(self, **options: Any):
        """An instance with ``options`` (None = not given), each checked against its type."""
        infos = self.infos()
        given = {k: v for k, v in options.items() if v is not None}
        # values a run records for its rebuild (FitNet's probed shapes), not user options
        recorded = {k: given.pop(k) for k in getattr(self.cls, "recorded_options", ()) if k in given}
        unknown = sorted(set(given) - set(infos))
        if unknown:
            raise KdpipeError(
                f"Method {self.name!r} has no option {', '.join(unknown)}; its options are "
                f"{', '.join(infos) if infos else 'none'}."
            )
        where = f"Method {self.name!r}"
        typed = {k: infos[k].convert(v, where) for k, v in given.items()}
        try:
            return self.cls(**self.fixed, **typed, **recorded)
        except (TypeError, ValueError) as err:
            values = ", ".join(f"{k}={v!r}" for k, v in typed.items())
            raise KdpipeError(f"{where} cannot take {values} ({err}).") from None


_REGISTRY: dict[str, MethodEntry] = {}
_ALIASES: dict[str, str] = {}
_loaded = False


def register(
    name: str,
    *,
    options: type[MethodOptions],
    summary: str,
    paper: str = "",
    fixed: Mapping[str, Any] | None = None,
    yaml_names: tuple[str, ...] = (),
    yaml_extra: Mapping[str, Any] | None = None,
    yaml_recorded: Mapping[str, Any] | None = None,
    aliases: tuple[str, ...] = (),
) -> Callable[[type], type]:
    """Class decorator: register a ``Method`` subclass under ``name`` (stackable, e.g. one
    class as ``letkd1`` and ``letkd2`` with different ``fixed`` constructor arguments)."""

    def decorate(cls: type) -> type:
        key = canonical_name(name)
        existing = _REGISTRY.get(key)
        if existing is not None and existing.cls.__qualname__ != cls.__qualname__:
            raise KdpipeError(f"Two methods are registered as {key!r}: {existing.module} and {cls.__module__}.")
        _REGISTRY[key] = MethodEntry(
            name=key,
            cls=cls,
            options=options,
            summary=summary,
            paper=paper,
            fixed=dict(fixed or {}),
            yaml_names=tuple(yaml_names),
            yaml_extra=dict(yaml_extra or {}),
            yaml_recorded=dict(yaml_recorded or {}),
            module=cls.__module__,
        )
        for alias in aliases:
            _ALIASES[canonical_name(alias)] = key
        return cls

    return decorate


def canonical_name(name: str) -> str:
    """``CAT-KD`` -> ``cat_kd``: lower case, dashes as underscores, aliases resolved."""
    key = str(name).strip().lower().replace("-", "_")
    return _ALIASES.get(key, key)


def _iter_method_modules() -> list[str]:
    """The modules of this package (``kdpipe.methods``) that may hold methods."""
    package = __name__.rsplit(".", 1)[0]
    skip = {"registry", "base", "composite", "catalog"}
    return [
        f"{package}.{info.name}"
        for info in pkgutil.iter_modules([str(Path(__file__).parent)])
        if info.name not in skip and not info.name.startswith("_")
    ]


def _entry_point_modules() -> list:
    from importlib.metadata import entry_points

    return list(entry_points(group=ENTRY_POINT_GROUP))


def load_all() -> None:
    """Import every method module (kdpipe's and the entry points'), once."""
    global _loaded
    if _loaded:
        return
    for module in _iter_method_modules():
        importlib.import_module(module)
    for ep in _entry_point_modules():
        try:
            ep.load()
        except Exception as err:  # a broken plugin must not break kdpipe's own methods
            raise KdpipeError(
                f"The method plugin {ep.name!r} ({ep.value}, entry-point group {ENTRY_POINT_GROUP}) "
                f"cannot be imported: {err}."
            ) from None
    _loaded = True


def entries() -> dict[str, MethodEntry]:
    """Every registered method, by name, in alphabetical order (import order varies)."""
    load_all()
    return dict(sorted(_REGISTRY.items()))


def names() -> list[str]:
    return list(entries())


def get(name: str) -> MethodEntry:
    """The entry of one method; an unknown name is one sentence listing the known ones."""
    reg = entries()
    key = canonical_name(name)
    if key not in reg:
        raise KdpipeError(f"Unknown method {name!r}; choose one of {', '.join(reg)} (or a sum such as at+kd).")
    return reg[key]


def option_infos() -> dict[str, dict[str, OptionInfo]]:
    """{option name: {method name: its OptionInfo}} over every registered method."""
    out: dict[str, dict[str, OptionInfo]] = {}
    for entry in entries().values():
        for opt, info in entry.infos().items():
            out.setdefault(opt, {})[entry.name] = info
    return out

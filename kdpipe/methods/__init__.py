"""Distillation methods: pure losses, KD layers, and the `Method` objects behind them.

``get_method(name, **options)`` builds one of ``ce``, ``kd``, ``cat_kd``, ``letkd1``,
``letkd2`` and the comparison methods ``dkd``, ``at``, ``fitnet``, ``simkd``; see
``kdpipe.methods.base.Method`` for the interface.
"""

from __future__ import annotations

import inspect

from kdpipe.errors import KdpipeError
from kdpipe.methods.base import Method

__all__ = ["get_method", "available", "Method"]


def _registry():
    from kdpipe.methods.at import AT
    from kdpipe.methods.cat_kd import CatKD
    from kdpipe.methods.ce import CE
    from kdpipe.methods.dkd import DKD
    from kdpipe.methods.fitnet import FitNet
    from kdpipe.methods.kd import KD
    from kdpipe.methods.letkd import LetKD
    from kdpipe.methods.simkd import SimKD

    return {
        "ce": (CE, {}),
        "kd": (KD, {}),
        "cat_kd": (CatKD, {}),
        "letkd1": (LetKD, {"level": 1}),
        "letkd2": (LetKD, {"level": 2}),
        "dkd": (DKD, {}),
        "at": (AT, {}),
        "fitnet": (FitNet, {}),
        "simkd": (SimKD, {}),
    }


def available() -> list[str]:
    """Names ``get_method`` accepts."""
    return list(_registry())


def get_method(name: str, **options) -> Method:
    """Build a method by name; unknown names or options raise ``KdpipeError``.

    Options left at None are treated as not given (so CLI defaults pass through).
    """
    reg = _registry()
    key = str(name).strip().lower().replace("-", "_")
    if key == "catkd":
        key = "cat_kd"
    if key not in reg:
        raise KdpipeError(f"Unknown method {name!r}; choose one of {', '.join(reg)}.")
    cls, fixed = reg[key]
    options = {k: v for k, v in options.items() if v is not None}
    params = inspect.signature(cls.__init__).parameters
    accepted = [p for p in params if p not in ("self", *fixed)]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise KdpipeError(
            f"Method {key!r} has no option {', '.join(unknown)}; its options are "
            f"{', '.join(accepted) if accepted else 'none'}."
        )
    try:
        return cls(**fixed, **options)
    except (TypeError, ValueError) as err:  # e.g. beta="a": a value of the wrong type
        values = ", ".join(f"{k}={v!r}" for k, v in options.items())
        raise KdpipeError(f"Method {key!r} cannot take {values} ({err}).") from None

"""What commands print and tables aggregate: summaries, sizes, mean and spread over seeds."""

from __future__ import annotations

import math
import statistics

__all__ = ["format_summary", "human_bytes", "mean_std"]


def format_summary(title: str, items: dict) -> str:
    """A short aligned block for the end of a command."""
    width = max((len(k) for k in items), default=0)
    lines = [title]
    for k, v in items.items():
        if isinstance(v, float):
            v = f"{v:.2f}" if math.isfinite(v) else str(v)
        lines.append(f"  {k.ljust(width)}  {v}")
    return "\n".join(lines)


def human_bytes(nbytes: float) -> str:
    """1536 -> '1.5 KiB' (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{int(nbytes)} B" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return str(nbytes)


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (n-1; 0 for a single value) of the finite values;
    (nan, nan) when there are none."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def human_seconds(seconds: float) -> str:
    """3725 -> "1 h 2 min", 95 -> "1 min 35 s", 7.2 -> "7 s"."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60} min"
    if s >= 60:
        return f"{s // 60} min {s % 60} s"
    return f"{s} s"

"""Devices and memory: which device, how much memory is free, mixed precision.

Memory budgets are measured, never fixed: the device's free memory (``torch.cuda.mem_get_info``
after the model is on it) and the host's available memory (``MemAvailable`` of
/proc/meminfo, or the free physical pages where that file does not exist). Only a fraction
of either is handed out (``BUDGET_FRACTION``), so activations, the optimizer and the rest of
the machine keep room.
"""

from __future__ import annotations

import os

import torch

from kdpipe.errors import KdpipeError

__all__ = [
    "resolve_device",
    "device_free_bytes",
    "host_available_bytes",
    "memory_budget",
    "autocast",
    "make_grad_scaler",
    "BUDGET_FRACTION",
]

#: Share of the measured free memory that resident data and targets may take.
BUDGET_FRACTION = 0.5


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/"auto" -> cuda when available else cpu; "cuda" without CUDA -> one sentence."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise KdpipeError(f"--device must be cpu or cuda (or cuda:N), got {device!r}.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KdpipeError("--device cuda was asked for but this torch build sees no CUDA device; use --device cpu.")
    if dev.type not in ("cpu", "cuda"):
        raise KdpipeError(f"--device must be cpu or cuda, got {device!r}.")
    return dev


def host_available_bytes() -> int:
    """Memory the host can still give (Linux ``MemAvailable``), in bytes."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 4 << 30


def device_free_bytes(device: torch.device) -> int:
    """Free memory on ``device``: CUDA's free memory, or the host's available memory on CPU."""
    if device.type == "cuda":
        try:
            free, _total = torch.cuda.mem_get_info(device)
            return int(free)
        except Exception:  # pragma: no cover - no driver answer: assume nothing is free
            return 0
    return host_available_bytes()


def memory_budget(device: torch.device) -> int:
    """Bytes that resident data or targets may take on ``device`` (a fraction of its free
    memory, measured now)."""
    return int(device_free_bytes(device) * BUDGET_FRACTION)


def autocast(device: torch.device, amp: bool):
    """torch.autocast for --amp: float16 on CUDA (with a GradScaler), bfloat16 on CPU."""
    if not amp:
        return torch.autocast(device_type=device.type, enabled=False)
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(device: torch.device, amp: bool):
    enabled = bool(amp) and device.type == "cuda"
    return torch.amp.GradScaler("cuda", enabled=enabled)

"""Helpers shared by the benchmarks: a teacher with realistic activations, the machine, JSON."""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch


def calibrated_teacher(model, dataset, batch_size: int = 128, batches: int = 4):
    """Random weights with BN running statistics measured on the data (a few train-mode
    forward passes): activations then have the scale of a trained network's instead of
    growing through every residual block until they leave float16's range."""
    from kdpipe.data import normalize

    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # cumulative average over the calibration batches
    with torch.no_grad():
        for b in range(batches):
            idx = np.arange(b * batch_size, (b + 1) * batch_size) % len(dataset)
            model(normalize(dataset.get_batch(idx), dataset.mean, dataset.std))
    return model.eval()


def macs_per_image(model, image_size=(32, 32)) -> int:
    """Multiply-accumulates of one forward pass (convolutions and linear layers)."""
    total = 0

    def conv(m, inp, out):
        nonlocal total
        total += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear(m, inp, out):
        nonlocal total
        total += out.numel() * m.in_features

    hooks = [m.register_forward_hook(conv) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    hooks += [m.register_forward_hook(linear) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, *image_size))
    for h in hooks:
        h.remove()
    return int(total)


def peak_rss_bytes() -> dict:
    """Peak resident memory of this process and of its finished children (Linux: KiB units)."""
    me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {"self": int(me), "children": int(kids)}


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def write_json(path, result: dict, argv=None, script: str = "") -> Path:
    result.setdefault("command", f"python benchmarks/{script} " + " ".join(sys.argv[1:] if argv is None else argv))
    result.setdefault("date", time.strftime("%Y-%m-%d %H:%M:%S"))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return path

"""Top-1 / top-5 of any checkpoint on a data set's split (no augmentation, batched).

``evaluate(checkpoint, arch, data, split="test")`` loads the checkpoint with
``kdpipe.models.load_teacher`` (mdistiller's ``{"model": state_dict}`` or a bare state dict,
``module.`` prefixes stripped, ``weights_only=True``) and returns
``{"top1", "top5", "loss", "num_samples", ...}``.
Student checkpoints written by ``train-student`` hold KD-layer taps (letKD); pass
``method`` (and its options) so the same taps are installed before loading, or use a
run directory as ``checkpoint`` and both are read from its config.json.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from kdpipe import storage
from kdpipe.engine import loop
from kdpipe.engine.data import place_dataset
from kdpipe.engine.device import resolve_device
from kdpipe.errors import CheckpointError


def evaluate(
    checkpoint: str | Path,
    arch: str | None = None,
    data: str | None = None,
    split: str = "test",
    device: str | None = None,
    batch_size: int = 256,
    amp: bool = False,
) -> dict:
    """Accuracy of ``checkpoint`` (a .pth file, or a run directory: its best checkpoint, or
    its teacher checkpoint for teacher runs) on ``split`` of ``data``."""
    from kdpipe.config.fields import check_value
    from kdpipe.data import load_dataset
    from kdpipe.models import load_teacher

    batch_size = check_value("batch_size", batch_size, (int,), False, "--batch-size")
    t0 = time.perf_counter()
    path = storage.normalize(checkpoint)  # a local path or a URL (kdpipe.storage)
    model = None
    if storage.isdir(path):
        model, arch, data, path = _from_run_dir(path, arch, data, load_dataset)
    if arch is None or data is None:
        raise CheckpointError("evaluate needs --arch and --data unless --checkpoint is a kdpipe run directory.")
    if not storage.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist.")
    dev = resolve_device(device)
    dataset = load_dataset(data, split)
    if model is None:
        model = load_teacher(arch, str(path), dataset.num_classes)
    model = model.to(dev).eval()
    placed = place_dataset(dataset, dev)
    result = loop.evaluate_model(model, placed, batch_size=batch_size, amp=amp)
    return {
        "checkpoint": str(path),
        "arch": arch,
        "data": data,
        "split": split,
        "num_samples": len(dataset),
        "top1": result["top1"],
        "top5": result["top5"],
        "loss": result["loss"],
        "seconds": time.perf_counter() - t0,
    }


def _from_run_dir(path: str, arch, data, load_dataset):
    """Model, arch, data and checkpoint path from a kdpipe run directory (a URL one is
    downloaded to a local staging folder first: ``RunDir``)."""
    from kdpipe.runs.rundir import RunDir

    run = RunDir.open(path)
    try:
        cfg = run.config
    except ValueError:
        raise CheckpointError(
            f"The run directory {path} has a damaged config.json; pass a .pth with --arch and --data."
        ) from None
    own = cfg.get("arch") if cfg.get("stage") == "train-teacher" else cfg.get("student")
    if arch is not None and own is not None and str(arch) != str(own):
        raise CheckpointError(f"The run directory {path} holds a {own}, not a {arch}; drop --arch or name the run's.")
    if cfg.get("stage") == "train-teacher":
        from kdpipe.runs.paths import teacher_checkpoint_name

        arch = arch or cfg["arch"]
        data = data or cfg["data"]
        # the run's own location: a URL run's staging folder goes when ``run`` does
        return None, arch, data, run.url(teacher_checkpoint_name(cfg["arch"], cfg["epochs"]))
    # a student run: rebuild the student with its method's taps, then load best.pth
    from kdpipe.engine.student import build_student_from_config

    ckpt = run.checkpoint_dir / "best.pth"
    if not ckpt.is_file():
        ckpt = run.checkpoint_dir / "latest.pth"
    model = build_student_from_config(cfg)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    return model, arch or cfg["student"], data or cfg["data"], run.url("checkpoints", ckpt.name)

"""Train a teacher with cross-entropy (the reference recipe), into a run directory.

``train_teacher(arch, data, epochs, ...)``: SGD (momentum 0.9, weight decay 5e-4), lr 0.05,
batch 64, lr x0.1 at 150/180/210 of 240 epochs scaled to ``epochs``, random crop (+ flip where
the data set's policy flips) applied on the device, top-1/top-5 on the test split after every
epoch.

The run directory (``<out>/teacher-<arch>-<data>-<timestamp>``) holds config.json,
metrics.csv/.jsonl, curves.png, summary.json, ``checkpoints/latest.pth`` (full state, for
``resume``), ``checkpoints/best.pth``, and the teacher checkpoint itself in mdistiller's
layout and format::

    <run>/<arch>_vanilla/ckpt_epoch_<E>.pth      {"model": state_dict, "epoch": E, "best_acc": top1}

which ``kdpipe.models.load_teacher(arch, path, num_classes)`` (and mdistiller) load as is.
It holds the weights after the last epoch (as mdistiller's published teachers do).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from kdpipe.pipeline.rundir import RunDir, save_checkpoint_file
from kdpipe.stages import loop


def teacher_checkpoint_path(run_path, arch: str, epochs: int) -> Path:
    """Where ``train_teacher`` writes the teacher: ``<run>/<arch>_vanilla/ckpt_epoch_<E>.pth``."""
    return Path(run_path) / f"{arch}_vanilla" / f"ckpt_epoch_{int(epochs)}.pth"


def _data_slug(spec: str) -> str:
    name = str(spec).split(":", 1)[0]
    return name or "data"


def train_teacher(
    arch: str,
    data: str = "digits",
    epochs: int = 240,
    lr: float = 0.05,
    batch_size: int = 64,
    out: str | Path = "runs",
    seed: int = 0,
    device: str | None = None,
    amp: bool = False,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    resume: str | Path | None = None,
    progress: bool = True,
    data_path: str = "auto",
    num_workers: int = 2,
) -> dict:
    """Train ``arch`` on ``data`` (a ``kdpipe.data.load_dataset`` spec) with cross-entropy.

    Returns the summary dict (also written to summary.json): run_dir, checkpoint, top1, top5,
    best_top1, epochs, wall_seconds, img_per_s."""
    from kdpipe.data import load_dataset
    from kdpipe.models import build

    t_start = time.perf_counter()
    if resume is not None:
        run = RunDir.open(resume)
        cfg = run.config
        arch, data, epochs, lr, batch_size = cfg["arch"], cfg["data"], cfg["epochs"], cfg["lr"], cfg["batch_size"]
        seed, momentum, weight_decay = cfg["seed"], cfg["momentum"], cfg["weight_decay"]
        amp = cfg.get("amp", amp)
    epochs, batch_size = int(epochs), int(batch_size)
    if epochs < 1:
        from kdpipe.errors import KdpipeError

        raise KdpipeError(f"--epochs must be at least 1, got {epochs}.")
    if batch_size < 2:
        from kdpipe.errors import KdpipeError

        raise KdpipeError(f"--batch-size must be at least 2, got {batch_size}.")
    dev = loop.resolve_device(device)
    train_set = load_dataset(data, "train")
    test_set = load_dataset(data, "test")
    torch.manual_seed(seed)
    model = build(arch, num_classes=train_set.num_classes).to(dev)
    optimizer = loop.make_optimizer(model, lr, momentum, weight_decay)
    scheduler = loop.make_scheduler(optimizer, epochs)
    config = {
        "stage": "train-teacher",
        "arch": arch,
        "data": data,
        "num_classes": train_set.num_classes,
        "train_samples": len(train_set),
        "test_samples": len(test_set),
        "dataset_fingerprint": getattr(train_set, "fingerprint", None),
        "epochs": epochs,
        "lr": lr,
        "batch_size": batch_size,
        "momentum": momentum,
        "weight_decay": weight_decay,
        "milestones": loop.milestones(epochs),
        "lr_decay": 0.1,
        "seed": seed,
        "device": str(dev),
        "amp": bool(amp),
        "policy": getattr(train_set.policy, "name", str(train_set.policy)),
    }
    start_epoch, best, scaler_state = 0, None, None
    if resume is None:
        run = RunDir.create(out, f"teacher-{arch}-{_data_slug(data)}", config)
    else:
        start_epoch, best, scaler_state = loop.restore_training_state(run, model, optimizer, scheduler, dev)
    train = loop.place_dataset(train_set, dev, data_path=data_path)
    test = loop.place_dataset(test_set, dev, data_path=data_path)
    result = loop.fit(
        model=model, train=train, test=test,
        fns=loop.StepFns(views=loop.random_views(train_set.policy), loss=loop.ce_loss),
        policy=train_set.policy, epochs=epochs, batch_size=batch_size,
        optimizer=optimizer, scheduler=scheduler, run=run, seed=seed, amp=amp,
        start_epoch=start_epoch, best=best, progress=progress, desc=f"teacher {arch}",
        num_workers=num_workers, scaler_state=scaler_state,
    )
    final = result["final"] or (run.read_metrics()[-1] if run.read_metrics() else {})
    ckpt = teacher_checkpoint_path(run.path, arch, epochs)
    save_checkpoint_file(ckpt, {"model": model.state_dict(), "epoch": epochs,
                                "best_acc": float(final.get("test_top1", float("nan")))})
    wall = time.perf_counter() - t_start
    rows = run.read_metrics()
    summary = {
        "stage": "train-teacher",
        "run_dir": str(run.path),
        "checkpoint": str(ckpt),
        "arch": arch,
        "data": data,
        "epochs": epochs,
        "top1": final.get("test_top1"),
        "top5": final.get("test_top5"),
        "best_top1": max((r.get("test_top1") or 0.0) for r in rows) if rows else None,
        "best_epoch": max(rows, key=lambda r: r.get("test_top1") or 0.0)["epoch"] if rows else None,
        "wall_seconds": wall,
        "train_seconds": sum(r.get("epoch_seconds") or 0.0 for r in rows),
        "img_per_s": loop.mean_over_epochs(rows, "img_per_s"),
    }
    run.write_summary(summary)
    return summary

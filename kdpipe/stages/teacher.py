"""Train a teacher with cross-entropy (the reference recipe), into a run directory.

``train_teacher(arch, data, epochs, ...)``: SGD (momentum 0.9, weight decay 5e-4), lr 0.05,
batch 64, lr x0.1 at 150/180/210 of 240 epochs scaled to ``epochs``, random crop (+ flip where
the data set's policy flips) applied on the device, top-1/top-5 on the test split after every
epoch.

The run directory (``<out>/teacher-<arch>-<data>-<timestamp>``; ``out`` a path or a URL,
``kdpipe.runs.rundir``) holds config.json, metrics.csv/.jsonl, tensorboard/, curves.png,
summary.json, ``checkpoints/latest.pth`` (full state, for ``resume``), ``checkpoints/best.pth``,
and the teacher checkpoint itself in mdistiller's layout and format::

    <run>/<arch>_vanilla/ckpt_epoch_<E>.pth      {"model": state_dict, "epoch": E, "best_acc": top1}

which ``kdpipe.models.load_teacher(arch, path, num_classes)`` (and mdistiller) load as is.
It holds the weights after the last epoch (as mdistiller's published teachers do).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from kdpipe import storage
from kdpipe.config.configs import TeacherConfig, resume_run
from kdpipe.engine import loop
from kdpipe.engine.data import place_dataset
from kdpipe.engine.device import resolve_device
from kdpipe.engine.loggers import require_wandb
from kdpipe.engine.parallel import Workers
from kdpipe.engine.schedule import make_optimizer, make_scheduler, milestones
from kdpipe.engine.sources import NoTargets
from kdpipe.errors import KdpipeError
from kdpipe.runs.paths import absolute_spec, teacher_checkpoint_name
from kdpipe.runs.rundir import RunDir

__all__ = ["train_teacher", "teacher_checkpoint_name", "teacher_checkpoint_path"]


def teacher_checkpoint_path(run_path, arch: str, epochs: int) -> Path:
    """Where ``train_teacher`` writes the teacher in a local run directory (``run_path``)."""
    return Path(run_path) / teacher_checkpoint_name(arch, epochs)


def _data_slug(spec: str) -> str:
    name = str(spec).split(":", 1)[0]
    return name or "data"


def _check(cfg: TeacherConfig) -> None:
    if int(cfg.epochs) < 1:
        raise KdpipeError(f"--epochs must be at least 1, got {cfg.epochs}.")
    if int(cfg.batch_size) < 2:
        raise KdpipeError(f"--batch-size must be at least 2, got {cfg.batch_size}.")
    if not float(cfg.lr) > 0:
        raise KdpipeError(f"--lr must be positive, got {cfg.lr}.")
    if int(cfg.data_parallel) < 1 or int(cfg.batch_size) % int(cfg.data_parallel):
        raise KdpipeError(f"--gpus {cfg.data_parallel} must be at least 1 and divide the batch size {cfg.batch_size}.")


def train_teacher(
    cfg: TeacherConfig | None = None,
    *,
    resume=None,
    given: dict | None = None,
    out="runs",
    device=None,
    progress: bool = True,
    data_path: str = "auto",
    loader_workers: int | None = None,
    after_epoch=None,
    ray_address: str | None = None,
    wandb: str | None = None,
) -> dict:
    """Train ``cfg.arch`` on ``cfg.data`` (a ``kdpipe.data.load_dataset`` spec) with cross-entropy;
    on ``cfg.data_parallel`` Ray Train workers when it is above 1. ``out`` (and ``resume``) may
    be a URL (``kdpipe.runs.rundir``); ``wandb`` names a Weights & Biases project to log to.

    Returns the summary dict (also written to summary.json): run_dir, checkpoint, top1, top5,
    best_top1, epochs, wall_seconds, img_per_s."""
    from kdpipe.data import load_dataset

    t_start = time.perf_counter()
    run = None
    if resume is not None:
        run, cfg = resume_run(resume, "train-teacher", TeacherConfig, given)
    if cfg is None:
        raise KdpipeError("train_teacher needs a TeacherConfig or a run directory to resume.")
    _check(cfg)
    if wandb:
        require_wandb()  # before any work: one sentence when it is missing
    cfg = dataclasses.replace(cfg, data=absolute_spec(cfg.data))
    dev = resolve_device(device)
    train_set, test_set = load_dataset(cfg.data, "train"), load_dataset(cfg.data, "test")
    if run is None:
        run_config = _run_config(cfg, train_set, test_set, dev)
        run = RunDir.create(out, f"teacher-{cfg.arch}-{_data_slug(cfg.data)}", run_config)
    runtime = {"progress": progress, "data_path": data_path, "loader_workers": loader_workers, "wandb": wandb}
    if cfg.data_parallel > 1:
        from kdpipe.distributed.data_parallel import run_data_parallel

        payload = {
            "cfg": dataclasses.asdict(cfg),
            "run_dir": run.location,
            "resume": resume is not None,
            "runtime": runtime,
            "storage": storage.options(),
        }
        run_data_parallel(_teacher_worker, payload, cfg.data_parallel, str(run.path), device, ray_address)
        run.refresh()  # rank 0 wrote the run (through the URL, for a remote one)
    else:
        _train_here(
            cfg, train_set, test_set, run, resume is not None, Workers(), dev, after_epoch=after_epoch, **runtime
        )
    return _finish(run, cfg, t_start)


def _run_config(cfg: TeacherConfig, train_set, test_set, dev) -> dict:
    return {
        "stage": "train-teacher",
        "config": dataclasses.asdict(cfg),
        "arch": cfg.arch,
        "data": cfg.data,
        "num_classes": train_set.num_classes,
        "train_samples": len(train_set),
        "test_samples": len(test_set),
        "dataset_fingerprint": getattr(train_set, "fingerprint", None),
        "epochs": int(cfg.epochs),
        "lr": float(cfg.lr),
        "batch_size": int(cfg.batch_size),
        "momentum": cfg.momentum,
        "weight_decay": cfg.weight_decay,
        "milestones": milestones(cfg.epochs),
        "lr_decay": 0.1,
        "seed": cfg.seed,
        "device": str(dev),
        "amp": bool(cfg.amp),
        "data_parallel": cfg.data_parallel,
        "policy": getattr(train_set.policy, "name", str(train_set.policy)),
    }


def _teacher_worker(payload: dict) -> None:
    """One Ray Train worker of a data-parallel teacher run."""
    from kdpipe.data import load_dataset
    from kdpipe.distributed.data_parallel import worker_device

    storage.apply_options(payload.get("storage"))
    cfg = TeacherConfig(**payload["cfg"])
    _train_here(
        cfg,
        load_dataset(cfg.data, "train"),
        load_dataset(cfg.data, "test"),
        RunDir(payload["run_dir"]),
        payload["resume"],
        Workers.current(),
        worker_device(payload["use_gpu"]),
        **payload["runtime"],
    )


def _train_here(
    cfg: TeacherConfig,
    train_set,
    test_set,
    run,
    resume: bool,
    workers: Workers,
    dev,
    progress=True,
    data_path="auto",
    loader_workers=None,
    after_epoch=None,
    wandb=None,
) -> None:
    """The epochs of a teacher run in this process (alone, or as one data-parallel worker)."""
    from kdpipe.models import build

    if int(cfg.batch_size) % workers.world_size:
        raise KdpipeError(f"The batch size {cfg.batch_size} does not split over {workers.world_size} workers.")
    torch.manual_seed(cfg.seed)
    model = build(cfg.arch, num_classes=train_set.num_classes).to(dev)
    optimizer = make_optimizer(model, cfg.lr, cfg.momentum, cfg.weight_decay)
    scheduler = make_scheduler(optimizer, cfg.epochs)
    start_epoch, best, scaler_state = 0, None, None
    if resume:
        start_epoch, best, scaler_state = loop.restore_training_state(
            run, model, optimizer, scheduler, dev, truncate=workers.is_main
        )
    train = place_dataset(train_set, dev, data_path=data_path, workers=loader_workers)
    test = place_dataset(test_set, dev, data_path=data_path, workers=loader_workers)
    source = NoTargets(train_set.policy, getattr(train_set, "image_sizes", None) if not train.resident else None)
    loop.fit(
        loop.FitSpec(
            model=model,
            workers=workers,
            sync_bn=cfg.sync_bn,
            train=train,
            test=test,
            source=source,
            loss_fn=loop.ce_loss,
            policy=train_set.policy,
            epochs=int(cfg.epochs),
            batch_size=int(cfg.batch_size),
            optimizer=optimizer,
            scheduler=scheduler,
            run=run,
            seed=cfg.seed,
            amp=cfg.amp,
            start_epoch=start_epoch,
            best=best,
            progress=progress,
            desc=f"teacher {cfg.arch}",
            scaler_state=scaler_state,
            after_epoch=after_epoch,
            wandb=wandb,
        )
    )
    if workers.is_main:
        run.save_state(
            teacher_checkpoint_name(cfg.arch, cfg.epochs),
            {
                "model": model.state_dict(),
                "epoch": int(cfg.epochs),
                "best_acc": float((run.read_metrics() or [{}])[-1].get("test_top1", float("nan"))),
            },
        )


def _finish(run, cfg: TeacherConfig, t_start) -> dict:
    rows = run.read_metrics()
    final = rows[-1] if rows else {}
    ckpt = run.url(teacher_checkpoint_name(cfg.arch, cfg.epochs))
    best_row = max(rows, key=lambda r: r.get("test_top1") or 0.0) if rows else {}
    summary = {
        "stage": "train-teacher",
        "run_dir": run.location,
        "checkpoint": ckpt,
        "arch": cfg.arch,
        "data": cfg.data,
        "epochs": int(cfg.epochs),
        "top1": final.get("test_top1"),
        "top5": final.get("test_top5"),
        "best_top1": best_row.get("test_top1"),
        "best_epoch": best_row.get("epoch"),
        "wall_seconds": time.perf_counter() - t_start,
        "train_seconds": sum(r.get("epoch_seconds") or 0.0 for r in rows),
        "img_per_s": loop.mean_over_epochs(rows, "img_per_s"),
        "data_parallel": cfg.data_parallel,
    }
    run.write_summary(summary)
    return summary

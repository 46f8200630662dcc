"""Typed configurations of the stages: what a user sets, in one place per stage.

The CLI builds them; a stage function takes one; a run directory stores it (``config.json``
holds ``{"config": dataclasses.asdict(cfg), ...resolved values}``); resume is
``Config.from_saved(saved)``; a sweep point is ``dataclasses.replace(cfg, **point)``.
Runtime switches that do not change what is computed (progress bars, output folders,
plotting, test hooks) are arguments of the stage functions, not fields here.

Fields left at None take the reference's value when the stage resolves them (the method's
recipe, the data set's view policy, ...); the resolved values are recorded beside the
config in the run directory and the store manifest.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from kdpipe.config.fields import check_fields, check_method_options
from kdpipe.errors import KdpipeError
from kdpipe.recipes import CIFAR

__all__ = [
    "TeacherConfig",
    "ExtractConfig",
    "ClusterConfig",
    "StudentConfig",
    "from_saved",
    "saved_run_config",
    "resume_run",
    "differing_fields",
    "EXECUTORS",
    "check_executor",
]

EXECUTORS = ("ray", "inline")


def check_executor(executor: str) -> str:
    if executor not in EXECUTORS:
        raise KdpipeError(f"--executor must be ray or inline, not {executor!r}.")
    return executor


def _tupled(value) -> tuple:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(value)
    return (value,)


@dataclass
class TeacherConfig:
    """``kdpipe train-teacher``: cross-entropy training with the reference recipe."""

    arch: str
    data: str = "digits"
    epochs: int = CIFAR.epochs
    lr: float = CIFAR.lr
    batch_size: int = CIFAR.batch_size
    momentum: float = CIFAR.momentum
    weight_decay: float = CIFAR.weight_decay
    seed: int = 0
    amp: bool = False
    data_parallel: int = 1  # Ray Train workers (--gpus N)
    sync_bn: bool = False  # SyncBatchNorm across workers (CUDA)

    def __post_init__(self):
        check_fields(self, "teacher")


@dataclass
class ExtractConfig:
    """``kdpipe extract-teacher``: the teacher pass into a store."""

    teacher: str
    arch: str
    data: str
    out: str
    split: str = "train"
    views: str = "auto"  # auto (every view of a finite policy), all, 1, or K
    cam_res: tuple = (2,)  # pooled CAM sizes r stored for every view
    native_cam: bool = False  # also the native CAM (binarised CAT-KD), every view
    features: tuple = ("penult", "inter")
    feature_views: str = "identity"  # identity (letKD's fit set) or all
    methods: tuple = ()  # methods whose teacher arrays to add (at, fitnet, simkd, ...)
    pad_mode: str | None = None  # None: the data set's default (zero)
    shard_size: int | None = None
    batch_size: int | None = None  # None: 256, or the resumed store's own (stages/extract.py)
    seed: int = 0
    executor: str = "ray"
    ray_address: str | None = None
    num_workers: int | None = None
    device: str | None = None
    resume: bool = False
    overwrite: bool = False

    def __post_init__(self):
        self.cam_res = _tupled(self.cam_res)
        self.features = _tupled(self.features)
        self.methods = _tupled(self.methods)
        check_fields(self, "extract")


@dataclass
class ClusterConfig:
    """``kdpipe cluster``: letKD's fit (LDA, K-means, score matrix) and assignment pass."""

    store: str
    name: str = "default"
    k_penult: int = 4096
    k_inter: int = 8
    lda_dims: int | None = None  # None: the reference's count (min(60, C-1, D))
    topk: int = 16  # the most penultimate probabilities kept per location
    topk_mass: float = 0.999  # keep the smallest k holding this mass everywhere
    temperature: float = 1.0
    student_grid: str | tuple | None = None  # "HxW" or (H, W)
    max_fit_points: int | None = None  # None: every vector, as the reference
    fit_views: str = "identity"
    seed: int = 0
    niter: int = 20
    kmeans_backend: str = "auto"  # faiss, torch, or auto (kdpipe.methods.letkd.fit.clustering.resolve_kmeans_backend)
    teacher: str | None = None  # None: the checkpoint path the store records
    data: str | None = None  # None: the data set the store records
    drop_features: bool = False
    overwrite: bool = False
    resume: bool = False
    batch_size: int = 256
    executor: str = "ray"
    ray_address: str | None = None
    num_workers: int | None = None
    device: str | None = None

    def __post_init__(self):
        check_fields(self, "cluster")
        if self.student_grid is not None and not isinstance(self.student_grid, str):
            self.student_grid = tuple(self.student_grid)


@dataclass
class StudentConfig:
    """``kdpipe train-student``: one student run from a store (or the online teacher)."""

    store: str | None = None
    targets: str = "default"
    student: str = "resnet8x4"
    method: str = "cat_kd"
    method_options: dict = field(default_factory=dict)
    epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    nesterov: bool | None = None
    views: str = "replay"  # cached targets: replay (exact) or warp
    online_teacher: str | None = None  # a checkpoint: the teacher runs live (baseline)
    online_views: str = "fresh"  # online: fresh random views (references) or replay
    resident: str = "auto"  # cached targets: auto, device, host, shared, stream
    seed: int = 0
    amp: bool = False
    data: str | None = None
    subset_fraction: float | None = None
    subset_seed: int = 0
    data_parallel: int = 1  # Ray Train workers (--gpus N); 1 = this process
    sync_bn: bool = False  # SyncBatchNorm across workers (CUDA); else per worker
    head: str | None = None  # linear or cam; None: cam for cat_kd (the reference), else linear
    milestones: list | None = None  # lr steps; None: the recipe's (scaled to the epochs)
    lr_decay: float | None = None  # lr factor at each step; None: the recipe's (0.1)
    recipe: str | None = None  # cifar, imagenet or tinyimagenet; None: from the data set
    reserved_classes: int | None = None  # train on the first N classes only (CAT data reduction)
    reserved_rate: float = 1.0  # ... and on this share of each class's samples
    teacher_arch: str | None = None  # the teacher, where no store names it (--print-config)
    drop_last: bool | None = None  # drop an epoch's last incomplete batch; None: as the method's reference

    def __post_init__(self):
        if self.method_options is None:
            self.method_options = {}
        check_fields(self, "student")
        self.method_options = check_method_options(self.method, self.method_options, "student.method_options")
        if self.milestones is not None:
            self.milestones = [int(m) for m in self.milestones]

    def with_absolute_paths(self) -> StudentConfig:
        """The store, online teacher and data folder as absolute paths (Ray workers and resumed
        runs may start in another working directory)."""
        from kdpipe.runs.paths import absolute_path, absolute_spec

        return dataclasses.replace(
            self,
            store=absolute_path(self.store),
            online_teacher=absolute_path(self.online_teacher),
            data=absolute_spec(self.data),
        )


def saved_run_config(run, stage: str, cls):
    """The config a run directory was started with, for --resume: one sentence when the
    directory is another stage's or its config.json is damaged."""
    where = f"The run directory {run.path}"
    try:
        saved = run.config
    except (OSError, ValueError) as err:
        raise KdpipeError(
            f"{where} has an unreadable config.json ({type(err).__name__}); it cannot be resumed."
        ) from None
    if not isinstance(saved, dict) or saved.get("stage") != stage:
        found = saved.get("stage") if isinstance(saved, dict) else None
        raise KdpipeError(f"{run.path} is not a {stage} run directory (its stage is {found!r}).")
    return from_saved(cls, saved.get("config"), where)


def resume_run(resume, stage: str, cls, given: dict | None = None):
    """(run directory, its config) for ``--resume``; options the user passed beside it
    (``given``) that differ from the run's are refused, naming them."""
    from kdpipe.runs.rundir import RunDir

    run = RunDir.open(resume)
    cfg = saved_run_config(run, stage, cls)
    differ = differing_fields(cfg, dict(given or {}))
    if differ:
        raise KdpipeError(
            f"--resume continues the run as it was configured; these options differ from it: "
            f"{', '.join('--' + k.replace('_', '-') for k in differ)} (start a new run to change them)."
        )
    return run, cfg


def from_saved(cls, saved: Any, where: str):
    """``cls(**saved)`` for a run directory's stored config, one sentence when it is not one."""
    if not isinstance(saved, dict):
        raise KdpipeError(f"{where} holds no {cls.__name__} (its config.json is damaged).")
    known = {f.name for f in dataclasses.fields(cls)}
    try:
        return cls(**{k: v for k, v in saved.items() if k in known})
    except TypeError as err:
        raise KdpipeError(f"{where} holds a damaged {cls.__name__} ({err}).") from None


def differing_fields(saved, given: dict) -> list[str]:
    """The fields of ``given`` (options a user passed with --resume) whose values differ from
    the saved configuration's."""
    out = []
    for key, value in given.items():
        if value is None or not hasattr(saved, key):
            continue
        current = getattr(saved, key)
        if isinstance(current, tuple) and isinstance(value, list):
            value = tuple(value)
        if current != value:
            out.append(key)
    return out

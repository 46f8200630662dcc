"""Stage two: train a student from the store, teacher-free (``kdpipe train-student``).

``train_student(StudentConfig(store=..., student=..., method=...))``:

1. resolve and check (``resolve_student``), each failure one sentence: the store is complete
   and undamaged; the data set it is trained on has the store's fingerprint, class count and
   normalisation; the store was made from a training split; the method's target kinds are in
   the store (or the target set, for letKD); the recipe (the method's reference recipe, with
   the config's overrides);
2. build the student (``kdpipe.models.build``) and let the method install its KD layers;
3. run the shared epoch loop (``kdpipe.engine.loop.fit``) with a target source: cached
   (``views="replay"``: a stored view per sample per epoch, exact; ``"warp"``), or with
   ``online_teacher`` the teacher live on fresh random views (the references' training) or,
   with ``online_views="replay"``, on the store's views (parity checks);
4. checkpoint every epoch (``resume=RUN`` continues an interrupted run exactly), write the run
   directory and its summary.

``subset_fraction`` trains on ``kdpipe.data.subset_indices(labels, fraction, subset_seed)``
only (the data-reduction regime); evaluation is always on the full test split.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from kdpipe import storage
from kdpipe.config.configs import StudentConfig, resume_run
from kdpipe.engine import loop
from kdpipe.engine.device import resolve_device
from kdpipe.engine.loggers import require_wandb
from kdpipe.engine.parallel import Workers
from kdpipe.engine.rows import CONCURRENT_STUDENTS_ENV, concurrent_students
from kdpipe.engine.schedule import make_optimizer, make_scheduler, milestones
from kdpipe.engine.sources import ONLINE_VIEWS, VIEW_MODES, CachedTargets, NoTargets, OnlineTargets
from kdpipe.engine.student import (
    build_method,
    build_student_from_config,
    resolved_head,
    student_forward,
    student_loss_fn,
)
from kdpipe.errors import KdpipeError, StoreError
from kdpipe.recipes import CIFAR
from kdpipe.runs.paths import absolute_path
from kdpipe.runs.rundir import RunDir
from kdpipe.targets.base import KindContext

if TYPE_CHECKING:
    import numpy as np

    from kdpipe.artifacts import StoreReader
    from kdpipe.artifacts.target_set import TargetSet
    from kdpipe.data.base import Dataset
    from kdpipe.methods.base import Method
    from kdpipe.views import Policy

__all__ = [
    "train_student",
    "resolve_student",
    "resolve_offline",
    "StudentSetup",
    "build_method",
    "build_student_from_config",
    "student_loss_fn",
    "student_forward",
    "resolved_head",
    "make_target_source",
]


# ------------------------------------------------------------------------------ resolution
@dataclass
class StudentSetup:
    """A ``StudentConfig`` resolved against its store, data set and method's recipe."""

    cfg: StudentConfig
    reader: StoreReader | None  # None: CE without a store
    method: Method
    train_set: Dataset
    test_set: Dataset
    teacher_arch: str | None
    recipe: dict
    policy: Policy
    target_set: TargetSet | None
    subset: np.ndarray | None  # sample indices of --subset-fraction

    def resolved(self) -> dict:
        """The resolved configuration (config.json's keys; ``--print-config``)."""
        cfg, r = self.cfg, self.recipe
        return {
            "stage": "train-student",
            "config": dataclasses.asdict(cfg),
            "store": absolute_path(cfg.store),
            "targets": self.target_set.name if self.target_set else cfg.targets,
            "student": cfg.student,
            "method": self.method.name,
            "method_options": dict(cfg.method_options),
            "method_resolved": dict(self.method.options),
            "teacher_arch": self.teacher_arch,
            **r,
            "views": cfg.views,
            "target_source": "online" if cfg.online_teacher else ("cached" if self.method.kinds() else "none"),
            "online_teacher": absolute_path(cfg.online_teacher),
            "online_views": cfg.online_views,
            "resident": cfg.resident,
            "seed": int(cfg.seed),
            "amp": bool(cfg.amp),
            "data": cfg.data,
            "num_classes": self.train_set.num_classes,
            "dataset_fingerprint": self.train_set.fingerprint,
            "pad_mode": getattr(self.policy, "pad_mode", None),
            "head": resolved_head(cfg, self.method),
            "recipe": recipe_family(cfg),
            "reserved_classes": cfg.reserved_classes,
            "reserved_rate": cfg.reserved_rate,
            "subset_fraction": cfg.subset_fraction,
            "subset_seed": int(cfg.subset_seed),
            "train_samples": int(len(self.subset)) if self.subset is not None else len(self.train_set),
            "test_samples": len(self.test_set),
            "target_set": self.target_set.to_json() if self.target_set else None,
            "store_identity": store_identity(self.reader),
        }


def store_identity(reader) -> dict | None:
    """What makes a store's targets what they are (``kdpipe run`` reuses a finished student only
    when its store's identity equals the row's store's): the teacher's sha256, the data set's
    fingerprint and split, and the stored views."""
    if reader is None:
        return None
    m = reader.manifest
    return {
        "teacher_sha256": m.teacher.sha256,
        "teacher_arch": m.teacher.arch,
        "dataset_fingerprint": m.dataset.fingerprint,
        "dataset_split": m.dataset.split,
        "views": m.to_json()["views"],  # as JSON: recorded in the run's config.json
    }


def _check_config(cfg: StudentConfig) -> None:
    if cfg.views not in VIEW_MODES:
        raise KdpipeError(f"--views must be {' or '.join(VIEW_MODES)}, got {cfg.views!r}.")
    if cfg.online_views not in ONLINE_VIEWS:
        raise KdpipeError(f"--online-views must be {' or '.join(ONLINE_VIEWS)}, got {cfg.online_views!r}.")
    if cfg.subset_fraction is not None and cfg.reserved_classes is not None:
        raise KdpipeError("--subset-fraction and the reserved-classes reduction exclude each other.")
    if cfg.reserved_classes is not None and (int(cfg.reserved_classes) < 1 or not 0 < float(cfg.reserved_rate) <= 1):
        raise KdpipeError("The reserved-classes reduction needs at least 1 class and a rate in (0, 1].")
    if int(cfg.data_parallel) < 1:
        raise KdpipeError(f"--gpus must be at least 1, got {cfg.data_parallel}.")
    if int(cfg.data_parallel) > 1:
        storage.refuse_in_process_only([cfg.store, cfg.online_teacher], "the Ray Train workers of --gpus")
    if cfg.subset_fraction is not None and not 0 < float(cfg.subset_fraction) <= 1:
        raise KdpipeError(f"--subset-fraction must be in (0, 1], got {cfg.subset_fraction}.")
    if cfg.online_teacher is not None and not storage.isfile(cfg.online_teacher):
        raise KdpipeError(f"--online-teacher {cfg.online_teacher} does not exist.")


def _recipe(method, cfg: StudentConfig) -> dict:
    base = method.recipe(cfg.student)
    base_milestones = [int(m) for m in base.get("milestones", CIFAR.milestones)]
    r: dict[str, Any] = {
        "epochs": int(cfg.epochs if cfg.epochs is not None else base["epochs"]),
        "lr": float(cfg.lr if cfg.lr is not None else base["lr"]),
        "batch_size": int(cfg.batch_size if cfg.batch_size is not None else base["batch_size"]),
        "momentum": float(cfg.momentum if cfg.momentum is not None else base.get("momentum", 0.9)),
        "weight_decay": float(cfg.weight_decay if cfg.weight_decay is not None else base.get("weight_decay", 5e-4)),
        "nesterov": bool(cfg.nesterov if cfg.nesterov is not None else base.get("nesterov", False)),
        "lr_decay": float(cfg.lr_decay if cfg.lr_decay is not None else base.get("lr_decay", 0.1)),
        # letKD's reference drops the last incomplete batch, mdistiller / CAT-KD keep it
        "drop_last": bool(cfg.drop_last if cfg.drop_last is not None else method.reference_drop_last),
    }
    if r["epochs"] < 1:
        raise KdpipeError(f"--epochs must be at least 1, got {r['epochs']}.")
    method.scale_to_run(r["epochs"], int(base["epochs"]))
    if r["batch_size"] < 2:
        raise KdpipeError(f"--batch-size must be at least 2, got {r['batch_size']}.")
    if not r["lr"] > 0:
        raise KdpipeError(f"--lr must be positive, got {r['lr']}.")
    if r["batch_size"] % int(cfg.data_parallel):
        raise KdpipeError(
            f"The batch size {r['batch_size']} does not split over --gpus {cfg.data_parallel} workers; "
            "choose a batch size that is a multiple of it."
        )
    r["milestones"] = (
        list(cfg.milestones)
        if cfg.milestones is not None
        else milestones(r["epochs"], base_milestones, int(base["epochs"]))
    )
    return r


def _open_store(cfg: StudentConfig, method):
    from kdpipe.artifacts import open_store

    if cfg.store is None:
        if method.kinds() or cfg.online_teacher:
            raise StoreError(f"Method {method.name} needs a store (--store).")
        if cfg.data is None:
            raise KdpipeError("--data is needed when no --store is given.")
        return None
    reader = open_store(cfg.store)
    split = reader.manifest.dataset.split
    if split not in (None, "train"):
        raise StoreError(
            f"The store at {reader.path} was made from the {split} split; a student trained on it "
            "would be evaluated on the images it trained on. Extract the train split."
        )
    return reader


def recipe_family(cfg: StudentConfig) -> str:
    from kdpipe.recipes import dataset_family

    return cfg.recipe or dataset_family(cfg.data)


def reserved_subset(labels, classes: int, rate: float = 1.0):
    """CAT-KD's data-reduction experiment (mdistiller/dataset/cifar100.py ``reduce``): the first
    ``classes`` classes, the first ``rate`` share of each class's samples in index order (the
    reference orders samples with numpy's unstable argsort; kdpipe keeps the stable order)."""
    import numpy as np

    labels = np.asarray(labels)
    keep = []
    for c in range(classes):
        members = np.flatnonzero(labels == c)
        keep.append(members[: int(len(members) * rate)])
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


def resolve_offline(cfg: StudentConfig) -> dict:
    """The resolved settings of ``cfg`` from the config alone (no store, no data): the method
    bound to ``cfg.teacher_arch`` and the student, and the recipe (``--print-config``)."""
    _check_config(cfg)
    method = build_method(cfg.method, cfg.method_options, cfg.teacher_arch, cfg.student, recipe_family(cfg))
    r = _recipe(method, cfg)
    return {
        "stage": "train-student",
        "config": dataclasses.asdict(cfg),
        "store": absolute_path(cfg.store),
        "targets": cfg.targets,
        "teacher_arch": cfg.teacher_arch,
        "student": cfg.student,
        "method": method.name,
        "method_options": dict(cfg.method_options),
        "method_resolved": dict(method.options),
        **r,
        "views": cfg.views,
        "head": resolved_head(cfg, method),
        "recipe": recipe_family(cfg),
        "data": cfg.data,
        "seed": int(cfg.seed),
        "reserved_classes": cfg.reserved_classes,
        "reserved_rate": cfg.reserved_rate,
        "subset_fraction": cfg.subset_fraction,
    }


def print_config(cfg: StudentConfig, source: dict | None = None) -> dict:
    """``--print-config``: every setting once, resolved from the store when one is named, else
    from the config alone. A store that does not fit the config still gets the config printed
    (from the config alone), with why under ``store_mismatch``: the user asked to find out."""
    mismatch = None
    try:
        resolved = resolve_student(cfg.with_absolute_paths()).resolved() if cfg.store else resolve_offline(cfg)
    except KdpipeError as err:
        resolved, mismatch = resolve_offline(cfg), str(err)
    # the given settings, with each resolved value over its given one (lr None -> the recipe's)
    flat = {**resolved.pop("config"), **resolved}
    if source is not None:
        flat["config_file"] = source
    if mismatch is not None:
        flat["store_mismatch"] = mismatch
    return flat


def resolve_student(cfg: StudentConfig) -> StudentSetup:
    """Resolve and check ``cfg`` against its store, data set and recipe (no training)."""
    from kdpipe.data import load_dataset, subset_indices
    from kdpipe.engine.sources import resolve_target_set
    from kdpipe.views import with_pad_mode

    _check_config(cfg)
    reader = _open_store(cfg, build_method(cfg.method, cfg.method_options, None, cfg.student))
    split = "train"
    if reader is not None:
        d = reader.manifest.dataset
        cfg = dataclasses.replace(cfg, data=cfg.data or d.spec or d.name)
    if not cfg.data:
        raise KdpipeError("No data set: pass --data (a student without a store needs one).")
    train_set = load_dataset(cfg.data, split)
    if reader is not None:
        reader.check_dataset(train_set)
    teacher_arch = reader.manifest.teacher.arch if reader is not None else cfg.teacher_arch
    if reader is not None and cfg.teacher_arch not in (None, teacher_arch):
        raise KdpipeError(
            f"The config names teacher {cfg.teacher_arch}, but the store at {reader.path} holds a {teacher_arch}."
        )
    method = build_method(cfg.method, cfg.method_options, teacher_arch, cfg.student, recipe_family(cfg))
    if cfg.online_teacher is not None and reader is not None:
        reader.check_teacher(cfg.online_teacher)
    target_set = None
    if method.needs_target_set:
        target_set = reader.target_set(resolve_target_set(reader, cfg.targets))
    if method.kinds():
        method.attach_teacher(teacher_info(method, reader, cfg, train_set, teacher_arch))
    pad_mode = reader.manifest.views.pad_mode if reader is not None else None
    subset = None
    if cfg.subset_fraction is not None:
        subset = subset_indices(train_set.labels, float(cfg.subset_fraction), int(cfg.subset_seed))
    if cfg.reserved_classes is not None:
        subset = reserved_subset(train_set.labels, int(cfg.reserved_classes), float(cfg.reserved_rate))
    recipe = _recipe(method, cfg)
    _check_whole_batch(recipe, len(subset) if subset is not None else len(train_set))
    return StudentSetup(
        cfg=cfg,
        reader=reader,
        method=method,
        train_set=train_set,
        test_set=load_dataset(cfg.data, "test"),
        teacher_arch=teacher_arch,
        recipe=recipe,
        policy=with_pad_mode(train_set.policy, pad_mode),
        target_set=target_set,
        subset=subset,
    )


def _check_whole_batch(recipe: dict, samples: int) -> None:
    if recipe["drop_last"] and samples < recipe["batch_size"]:
        raise KdpipeError(
            f"drop_last keeps whole batches only, and the {samples} training images make no batch of "
            f"{recipe['batch_size']}; lower the batch size or set drop_last false."
        )


def teacher_info(method, reader, cfg: StudentConfig, train_set, teacher_arch: str | None):
    """What ``method`` knows of the teacher before the student is built (``TeacherInfo``): from
    the store when it holds the method's arrays, else from the online teacher on one image."""
    from kdpipe.methods.base import TeacherInfo

    kinds = [k for k in method.kinds() if k.cacheable and not k.needs_target_set]
    if reader is not None:
        arrays = reader.manifest.arrays
        ctx = KindContext(available=frozenset(reader.array_names()))
        paths = [p for k in kinds for p in k.bind(ctx).arrays()]
        if paths and all(p in arrays for p in paths):
            return TeacherInfo(
                shapes={p: tuple(arrays[p].shape[2:]) for p in paths},
                static={n: reader.static(n) for n in reader.static_names()},
                image_size=train_set.image_size,
                labels=train_set.labels,
            )
    if cfg.online_teacher is None:
        return TeacherInfo(
            image_size=train_set.image_size, labels=train_set.labels
        )  # the cached source names what is missing
    if teacher_arch is None:
        raise KdpipeError(
            "--online-teacher without --store needs the teacher's architecture (teacher_arch in a config file)."
        )
    return _probe_teacher_info(kinds, cfg, train_set, teacher_arch)


def _probe_teacher_info(kinds, cfg: StudentConfig, train_set, teacher_arch: str):
    """``TeacherInfo`` from the online teacher on the first training image (identity view)."""
    import numpy as np

    from kdpipe.data import normalize
    from kdpipe.distributed.teacher_pass import probe_rows
    from kdpipe.methods.base import TeacherInfo
    from kdpipe.models import load_teacher
    from kdpipe.targets.base import TeacherOutputs, needs_stages

    teacher = load_teacher(teacher_arch, str(cfg.online_teacher), train_set.num_classes).eval()
    policy = train_set.policy
    images = policy.apply_images(train_set.get_batch(np.arange(1)), torch.from_numpy(policy.identity()[None]))
    x = normalize(images, train_set.mean, train_set.std)
    labels = torch.as_tensor(np.asarray(train_set.labels[:1]), dtype=torch.int64)
    shapes = probe_rows(kinds, teacher, x, labels)
    with torch.inference_mode():
        out = TeacherOutputs.of(teacher, x, labels, stages=needs_stages(kinds))
        static = {n: a for k in kinds for n, (a, _) in k.static(teacher, out).items()}
    return TeacherInfo(shapes=shapes, static=static, image_size=train_set.image_size, labels=train_set.labels)


# ------------------------------------------------------------------------------ building
def make_target_source(setup: StudentSetup, device: torch.device):
    """Cached targets (store), the online teacher, or none: one interface for the loop."""
    cfg, method = setup.cfg, setup.method
    kinds = method.kinds()
    source: OnlineTargets | NoTargets | CachedTargets
    sizes = getattr(setup.train_set, "image_sizes", None) if getattr(setup.train_set, "images", None) is None else None
    if cfg.online_teacher:
        from kdpipe.models import load_teacher

        if setup.teacher_arch is None:
            raise KdpipeError(
                "--online-teacher without --store needs the teacher's architecture (teacher_arch in a config file)."
            )
        teacher = load_teacher(setup.teacher_arch, str(cfg.online_teacher), setup.train_set.num_classes)
        source = OnlineTargets(
            teacher,
            kinds,
            reader=setup.reader,
            target_set=cfg.targets if kinds else None,
            device=device,
            policy=setup.policy,
            views=cfg.online_views,
        )
    elif not kinds:
        source = NoTargets(setup.policy)
    else:
        source = CachedTargets(
            setup.reader,
            kinds,
            setup.target_set.name if setup.target_set else None,
            device=device,
            mode=cfg.views,
            policy=setup.policy,
            resident=cfg.resident,
            sharers=concurrent_students(),
        )
    source.image_sizes = sizes
    return source


# ------------------------------------------------------------------------------ the stage
@dataclass
class Runtime:
    """Switches of one run that do not change what is computed."""

    device: str | None = None
    progress: bool = True
    data_path: str = "auto"
    loader_workers: int | None = None  # DataLoader workers for decoded data (None: default_workers())
    plot: bool = True
    on_step: Callable[..., Any] | None = None  # called after every step (tests, benchmarks)
    after_epoch: Callable[..., Any] | None = None  # called after every epoch (fault tests)
    wandb: str | None = None  # a Weights & Biases project to log to (kdpipe.engine.loggers)


def train_student(
    cfg: StudentConfig | None = None,
    *,
    resume=None,
    given: dict | None = None,
    out="runs",
    device=None,
    progress: bool = True,
    data_path: str = "auto",
    loader_workers: int | None = None,
    run_prefix: str | None = None,
    plot: bool = True,
    on_step=None,
    after_epoch=None,
    ray_address: str | None = None,
    source: dict | None = None,
    wandb: str | None = None,
    ray_train: bool = False,
) -> dict:
    """Train a student (see the module docstring). ``out`` (and ``resume``) may be a URL
    (``kdpipe.runs.rundir``); ``wandb`` names a Weights & Biases project to log to. With
    ``resume`` the run's own config is used; ``given`` holds options the user passed beside it
    (refused when they differ). With ``cfg.data_parallel`` > 1 the epochs run on that many Ray
    Train workers (``kdpipe.distributed.data_parallel``); ``after_epoch`` then runs in every worker
    (tests use it to kill one) and ``on_step`` is not available. ``ray_train`` takes that path
    with one worker too (benchmarks/gpu_suite.py checks it on a one-GPU machine).

    Returns the summary (also in summary.json): run_dir, best_top1, final_top1, final_top5,
    epochs, wall_seconds, img_per_s, ..."""
    t_start = time.perf_counter()
    run = None
    if resume is not None:
        run, cfg = resume_run(resume, "train-student", StudentConfig, given)
    if cfg is None:
        raise KdpipeError("train_student needs a StudentConfig or a run directory to resume.")
    if wandb:
        require_wandb()  # before any work: one sentence when it is missing
    setup = resolve_student(cfg.with_absolute_paths())
    config = dict(setup.resolved(), device=str(resolve_device(device)))
    if source is not None:  # the config file it came from (--config), as that file said it
        config["config_file"] = source
    if run is None:
        run = RunDir.create(out, run_prefix or f"student-{setup.cfg.student}-{setup.method.name}", config)
    runtime = Runtime(device, progress, data_path, loader_workers, plot, on_step, after_epoch, wandb)
    if setup.cfg.data_parallel > 1 or ray_train:
        from kdpipe.distributed.data_parallel import run_data_parallel

        payload = {
            "cfg": dataclasses.asdict(setup.cfg),
            "run_dir": run.location,
            "resume": resume is not None,
            "runtime": dataclasses.asdict(dataclasses.replace(runtime, on_step=None)),
            "storage": storage.options(),
        }
        run_data_parallel(_student_worker, payload, setup.cfg.data_parallel, str(run.path), device, ray_address)
        run.refresh()  # rank 0 wrote the run (through the URL, for a remote one)
        source_tier = None
    else:
        source_tier = _train_here(setup, run, runtime, resume is not None, Workers(), resolve_device(device))
    return _write_summary(run, setup, config, source_tier, t_start)


def _student_worker(payload: dict) -> None:
    """One Ray Train worker of a data-parallel student run."""
    from kdpipe.distributed.data_parallel import worker_device

    storage.apply_options(payload.get("storage"))
    # every worker of the run on this machine reads the same targets (one shared copy on CPU)
    os.environ.setdefault(CONCURRENT_STUDENTS_ENV, str(max(1, int(payload["cfg"].get("data_parallel") or 1))))
    setup = resolve_student(StudentConfig(**payload["cfg"]))
    runtime = Runtime(**payload["runtime"])
    _train_here(
        setup,
        RunDir(payload["run_dir"]),
        runtime,
        payload["resume"],
        Workers.current(),
        worker_device(payload["use_gpu"]),
    )


def _train_here(setup: StudentSetup, run, runtime: Runtime, resume: bool, workers: Workers, dev) -> str | None:
    """Build the student, its optimiser and its target source on ``dev`` and run the epochs in
    this process (alone, or as one data-parallel worker). Returns the targets' tier."""
    from kdpipe.engine.data import place_dataset
    from kdpipe.models import build

    cfg, r = setup.cfg, setup.recipe
    if r["batch_size"] % workers.world_size:
        raise KdpipeError(f"The batch size {r['batch_size']} does not split over {workers.world_size} workers.")
    torch.manual_seed(cfg.seed)
    model = build(cfg.student, num_classes=setup.train_set.num_classes, head=resolved_head(cfg, setup.method))
    model = (setup.method.prepare_student(model, setup.target_set) or model).to(dev)
    optimizer = make_optimizer(model, r["lr"], r["momentum"], r["weight_decay"], r["nesterov"])
    scheduler = make_scheduler(optimizer, r["epochs"], r["milestones"], gamma=r["lr_decay"])
    start_epoch, best, scaler_state = 0, None, None
    if resume:
        start_epoch, best, scaler_state = loop.restore_training_state(
            run, model, optimizer, scheduler, dev, truncate=workers.is_main
        )
    source = make_target_source(setup, dev)
    train = place_dataset(
        setup.train_set, dev, indices=setup.subset, data_path=runtime.data_path, workers=runtime.loader_workers
    )
    test = place_dataset(setup.test_set, dev, data_path=runtime.data_path, workers=runtime.loader_workers)
    loop.fit(
        loop.FitSpec(
            model=model,
            workers=workers,
            sync_bn=cfg.sync_bn,
            train=train,
            test=test,
            source=source,
            loss_fn=student_loss_fn(model, setup.method),
            policy=setup.policy,
            epochs=r["epochs"],
            batch_size=r["batch_size"],
            drop_last=r["drop_last"],
            optimizer=optimizer,
            scheduler=scheduler,
            run=run,
            seed=int(cfg.seed),
            amp=cfg.amp,
            start_epoch=start_epoch,
            best=best,
            progress=runtime.progress,
            desc=f"{cfg.student} {setup.method.name}",
            plot=runtime.plot,
            on_step=runtime.on_step,
            after_epoch=runtime.after_epoch,
            scaler_state=scaler_state,
            wandb=runtime.wandb,
        )
    )
    return getattr(source, "tier", None)


def _write_summary(run, setup, config, tier, t_start) -> dict:
    rows = run.read_metrics()
    final = rows[-1] if rows else {}
    best_row = max(rows, key=lambda row: row.get("test_top1") or 0.0) if rows else {}
    summary = {
        "stage": "train-student",
        "run_dir": run.location,
        "student": setup.cfg.student,
        "method": setup.method.name,
        "method_options": dict(setup.method.options),
        "target_source": config["target_source"],
        "target_tier": tier,
        "data_parallel": setup.cfg.data_parallel,
        "views": setup.cfg.views,
        "seed": int(setup.cfg.seed),
        "epochs": setup.recipe["epochs"],
        "final_top1": final.get("test_top1"),
        "final_top5": final.get("test_top5"),
        "best_top1": best_row.get("test_top1"),
        "best_epoch": best_row.get("epoch"),
        "wall_seconds": time.perf_counter() - t_start,
        "train_seconds": sum(row.get("epoch_seconds") or 0.0 for row in rows),
        "img_per_s": loop.mean_over_epochs(rows, "img_per_s"),
        "train_samples": config["train_samples"],
        "checkpoint": run.url("checkpoints", "latest.pth"),
    }
    run.write_summary(summary)
    return summary

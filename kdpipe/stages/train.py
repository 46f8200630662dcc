"""Stage two: train a student from the store, teacher-free (``kdpipe train-student``).

``train_student(store, targets="default", student=..., method=..., ...)``:

1. checks first, each failure one sentence (``StoreError`` / ``DataError``): the store is
   complete; the data set it is trained on has the store's fingerprint, class count and
   normalisation (``reader.check_dataset``); the method's store artifacts (and the target
   set) are present;
2. builds the student (``kdpipe.models.build``) and lets the method install its KD layers
   (``method.prepare_student``);
3. hands the shared epoch loop (``kdpipe.stages.loop.fit``) a target source:
   ``CachedTargets`` (the store; ``views="replay"`` or ``"warp"``) or, with
   ``online_teacher=CKPT``, ``OnlineTargets`` (the teacher run live on the same augmented
   batch). The loop cannot tell them apart;
4. trains with the method's reference recipe (METHODS.md; ``lr``, ``batch_size``, ``epochs``
   override it), checkpoints every epoch (``resume=RUN`` continues an interrupted run
   exactly), logs top-1/top-5 each epoch, writes the run directory and its summary.

``subset_fraction`` trains on ``kdpipe.data.subset_indices(labels, fraction, subset_seed)``
only (the data-reduction regime where distillation matters); evaluation is always on the
full test split.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from kdpipe.errors import KdpipeError, StoreError
from kdpipe.pipeline.rundir import RunDir
from kdpipe.stages import loop

VIEW_MODES = ("replay", "warp")

#: Arguments of ``train_student`` recorded in config.json and restored by ``resume``.
RUN_ARGS = ("store", "targets", "student", "method", "method_options", "epochs", "lr", "batch_size",
            "views", "seed", "amp", "online_teacher", "data", "subset_fraction", "subset_seed",
            "momentum", "weight_decay", "nesterov")


def _manifest_data_spec(reader) -> tuple[str, str]:
    """(data spec, split) the store was extracted from, per its manifest."""
    d = reader.manifest.get("dataset") or {}
    spec = d.get("spec") or d.get("name")
    if not spec:
        raise StoreError(f"The store at {reader.path} does not record its data set; pass --data.")
    return str(spec), str(d.get("split") or "train")


def _target_set_sizes(reader, target_set: str, num_classes: int) -> dict:
    """K_penult and C*K_inter of a target set, for the letKD student's KD layers."""
    out = {}
    try:
        attrs = reader.target_attrs(target_set)
    except StoreError:
        return out
    name = f"targets/{target_set}/"
    if reader.has(name + "penult_centers"):
        out["num_penult_clusters"] = int(reader.array(name + "penult_centers").shape[0])
    elif attrs.get("K_penult") or attrs.get("k_penult"):
        out["num_penult_clusters"] = int(attrs.get("K_penult") or attrs.get("k_penult"))
    if reader.has(name + "subclass_scores"):
        out["num_subclasses"] = int(reader.array(name + "subclass_scores").shape[0])
    elif attrs.get("K_inter") or attrs.get("k_inter"):
        out["num_subclasses"] = int(num_classes) * int(attrs.get("K_inter") or attrs.get("k_inter"))
    return out


def check_store_for_method(reader, method, target_set: str) -> None:
    """Refuse, in one sentence, a store that lacks what ``method`` needs."""
    needed = list(method.store_artifacts(target_set))
    if any(a.startswith("targets/") for a in needed) and target_set not in reader.target_sets():
        have = ", ".join(reader.target_sets()) or "none"
        raise StoreError(
            f"The store at {reader.path} has no complete target set {target_set!r} (it has: {have}), "
            f"which method {method.name} needs; run `kdpipe cluster {reader.path} --name {target_set}` first.")
    missing = [a for a in needed if not reader.has(a)]
    if missing:
        raise StoreError(
            f"The store at {reader.path} lacks {', '.join(missing)}, which method {method.name} needs; "
            f"re-extract the teacher with those artifacts (or choose matching method options).")


def build_method(method: str, method_options: dict | None, teacher_arch: str | None, student: str):
    from kdpipe.methods import get_method

    m = get_method(method, **dict(method_options or {}))
    if hasattr(m, "bind") and teacher_arch:
        m.bind(teacher_arch, student)
    return m


def build_student_from_config(cfg: dict):
    """The student of a finished run, with the KD layers of its method (for evaluate)."""
    from kdpipe.models import build

    m = build_method(cfg["method"], cfg.get("method_options"), cfg.get("teacher_arch"), cfg["student"])
    model = build(cfg["student"], num_classes=int(cfg["num_classes"]))
    m.prepare_student(model, **(cfg.get("kd_layer_sizes") or {}))
    return model


class ReplayViews:
    """The stored views of a store, drawn as ``CachedTargets`` replay draws them (one
    stored view per sample per epoch, uniformly, from the loop's generator). Online training
    with ``views="replay"`` uses it, so the online teacher sees exactly the views cached
    training replays: the parity the tests check."""

    def __init__(self, reader):
        from kdpipe.stages.targets import _np_to_torch

        self.views = _np_to_torch(reader.array("views")[:]).to(torch.int32)  # [N, V, P]
        self.num_views = int(self.views.shape[1])

    def __call__(self, indices, epoch, generator):
        B = int(len(indices))
        view_idx = torch.randint(0, self.num_views, (B,), generator=generator).to(torch.int64)
        idx = torch.as_tensor(indices).to("cpu", torch.int64)
        return view_idx, self.views[idx, view_idx]


class OnlineSource:
    """``OnlineTargets`` with the view draws of ``views`` mode (replay: the store's views)."""

    def __init__(self, online, views_fn):
        self.online, self._views = online, views_fn
        self.mode = "online"

    def views_for(self, indices, epoch, generator):
        return self._views(indices, epoch, generator)

    def targets(self, indices, view_idx, params, images_normalized, labels=None):
        return self.online.targets(indices, view_idx, params, images_normalized, labels=labels)


def _make_target_source(*, reader, method, target_set, device, views, online_teacher, teacher_arch,
                        num_classes, policy, labels):
    """CachedTargets (store) or OnlineTargets (live teacher): the same interface for the loop."""
    from kdpipe.stages import targets as tmod

    if not method.target_keys and not online_teacher:
        return tmod.NoTargets(policy)
    if online_teacher:
        from kdpipe.models import load_teacher

        teacher = load_teacher(teacher_arch, str(online_teacher), num_classes).to(device).eval()
        online = tmod.OnlineTargets(teacher, method, target_set_reader=reader, policy=policy, device=device,
                                    target_set=target_set if _uses_target_set(method) else None, labels=labels)
        if views == "replay" and reader is not None and reader.has("views"):
            return OnlineSource(online, ReplayViews(reader))
        return OnlineSource(online, online.views_for)
    # The store's own view policy (its manifest: padding, pad mode) replays its views.
    return tmod.CachedTargets(reader, method, target_set if _uses_target_set(method) else None, device, views)


def _uses_target_set(method) -> bool:
    return any(a.startswith("targets/") for a in method.store_artifacts("x"))


def student_step_loss(model, method, source):
    """The loss of one student step: targets of the batch's views from ``source``, the student's
    forward, ``method.loss``. Returns ``fn(model, x, labels, idx, view_idx, params) -> (total,
    parts, logits)`` for ``loop.StepFns``."""
    # CE and logit KD need logits only: a plain forward, as plain training of the student does.
    use_features = len(model.taps) > 0 if hasattr(model, "taps") else True
    use_features = use_features or any(k != "logits" for k in method.target_keys)

    def step_loss(model, x, labels, idx, view_idx, params):
        tg = source.targets(idx, view_idx, params, x) if method.target_keys else {}
        if use_features:
            logits, feats = model.forward_features(x)
        else:
            logits, feats = model(x), {}
        total, parts = method.loss(logits, feats, tg, labels)
        return total, {k: v for k, v in parts.items() if k != "total"}, logits

    return step_loss


def train_student(
    store: str | Path | None = None,
    targets: str = "default",
    student: str = "resnet8x4",
    method: str = "cat_kd",
    method_options: dict | None = None,
    epochs: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    views: str = "replay",
    seed: int = 0,
    device: str | None = None,
    amp: bool = False,
    resume: str | Path | None = None,
    online_teacher: str | Path | None = None,
    data: str | None = None,
    subset_fraction: float | None = None,
    subset_seed: int = 0,
    out: str | Path = "runs",
    momentum: float | None = None,
    weight_decay: float | None = None,
    nesterov: bool | None = None,
    progress: bool = True,
    data_path: str = "auto",
    num_workers: int = 2,
    run_prefix: str | None = None,
    plot: bool = True,
    on_step=None,
) -> dict:
    """Train ``student`` with ``method`` from ``store`` (see the module docstring).

    Returns the summary (also in summary.json): run_dir, best_top1, final_top1, final_top5,
    epochs, wall_seconds, img_per_s, ..."""
    from kdpipe.artifacts import open_store
    from kdpipe.data import load_dataset, subset_indices
    from kdpipe.models import build

    t_start = time.perf_counter()
    run = None
    if resume is not None:
        run = RunDir.open(resume)
        cfg = run.config
        if cfg.get("stage") != "train-student":
            raise KdpipeError(f"{resume} is not a train-student run directory (its stage is {cfg.get('stage')!r}).")
        store, targets, student, method = cfg["store"], cfg["targets"], cfg["student"], cfg["method"]
        method_options, epochs, lr, batch_size = cfg["method_options"], cfg["epochs"], cfg["lr"], cfg["batch_size"]
        views, seed, amp, online_teacher = cfg["views"], cfg["seed"], cfg["amp"], cfg["online_teacher"]
        data, subset_fraction, subset_seed = cfg["data"], cfg["subset_fraction"], cfg["subset_seed"]
        momentum, weight_decay, nesterov = cfg["momentum"], cfg["weight_decay"], cfg["nesterov"]
    if views not in VIEW_MODES:
        raise KdpipeError(f"--views must be replay or warp, got {views!r}.")
    dev = loop.resolve_device(device)

    # ---- checks: store, data set, method artifacts -------------------------------------
    reader = open_store(store) if store is not None else None
    m0 = build_method(method, method_options, None, student)  # validates the options early
    if reader is None:
        if m0.target_keys or online_teacher:
            raise StoreError(f"method {m0.name} needs a store (--store).")
        if data is None:
            raise KdpipeError("--data is needed when no --store is given.")
        split = "train"
    else:
        spec, split = _manifest_data_spec(reader)
        data = data or spec
    train_set = load_dataset(data, split)
    if reader is not None:
        reader.check_dataset(train_set)
    test_set = load_dataset(data, "test")
    teacher_arch = ((reader.manifest.get("teacher") or {}).get("arch")) if reader is not None else None
    meth = build_method(method, method_options, teacher_arch, student)
    if reader is not None:
        check_store_for_method(reader, meth, targets)
    if online_teacher is not None:
        if not Path(online_teacher).is_file():
            raise KdpipeError(f"--online-teacher {online_teacher} does not exist.")
        if reader is not None and (reader.manifest.get("teacher") or {}).get("sha256"):
            reader.check_teacher(online_teacher)

    # ---- recipe ------------------------------------------------------------------------
    recipe = meth.recipe(student)
    epochs = int(epochs if epochs is not None else recipe["epochs"])
    lr = float(lr if lr is not None else recipe["lr"])
    batch_size = int(batch_size if batch_size is not None else recipe["batch_size"])
    momentum = float(momentum if momentum is not None else recipe.get("momentum", 0.9))
    weight_decay = float(weight_decay if weight_decay is not None else recipe.get("weight_decay", 5e-4))
    nesterov = bool(nesterov if nesterov is not None else recipe.get("nesterov", False))
    if epochs < 1:
        raise KdpipeError(f"--epochs must be at least 1, got {epochs}.")
    if batch_size < 2:
        raise KdpipeError(f"--batch-size must be at least 2, got {batch_size}.")
    if not lr > 0:
        raise KdpipeError(f"--lr must be positive, got {lr}.")

    # ---- student -----------------------------------------------------------------------
    kd_sizes = _target_set_sizes(reader, targets, train_set.num_classes) if reader is not None else {}
    torch.manual_seed(seed)
    model = build(student, num_classes=train_set.num_classes)
    model = meth.prepare_student(model, **kd_sizes) or model
    model = model.to(dev)
    optimizer = loop.make_optimizer(model, lr, momentum, weight_decay, nesterov)
    scheduler = loop.make_scheduler(optimizer, epochs)
    source = _make_target_source(reader=reader, method=meth, target_set=targets, device=dev, views=views,
                                 online_teacher=online_teacher, teacher_arch=teacher_arch,
                                 num_classes=train_set.num_classes, policy=train_set.policy,
                                 labels=train_set.labels)

    subset = None
    if subset_fraction is not None:
        f = float(subset_fraction)
        if not 0 < f <= 1:
            raise KdpipeError(f"--subset-fraction must be in (0, 1], got {subset_fraction}.")
        subset = subset_indices(train_set.labels, f, int(subset_seed))

    config = {
        "stage": "train-student",
        "store": _abs(store),  # absolute, so --resume works from any folder
        "targets": targets,
        "student": student,
        "method": meth.name,
        "method_options": dict(method_options or {}),
        "method_resolved": dict(meth.options),
        "teacher_arch": teacher_arch,
        "epochs": epochs, "lr": lr, "batch_size": batch_size,
        "momentum": momentum, "weight_decay": weight_decay, "nesterov": nesterov,
        "milestones": loop.milestones(epochs), "lr_decay": 0.1,
        "views": views, "seed": int(seed), "amp": bool(amp),
        "online_teacher": _abs(online_teacher),
        "target_source": type(source).__name__,
        "data": data, "num_classes": train_set.num_classes,
        "dataset_fingerprint": train_set.fingerprint,
        "subset_fraction": subset_fraction, "subset_seed": int(subset_seed),
        "train_samples": int(len(subset)) if subset is not None else len(train_set),
        "test_samples": len(test_set),
        "kd_layer_sizes": kd_sizes,
        "device": str(dev),
    }
    start_epoch, best, scaler_state = 0, None, None
    if run is None:
        prefix = run_prefix or f"student-{student}-{meth.name}"
        run = RunDir.create(out, prefix, config)
    else:
        start_epoch, best, scaler_state = loop.restore_training_state(run, model, optimizer, scheduler, dev)

    train = loop.place_dataset(train_set, dev, indices=subset, data_path=data_path)
    test = loop.place_dataset(test_set, dev, data_path=data_path)

    step_loss = student_step_loss(model, meth, source)

    result = loop.fit(
        model=model, train=train, test=test,
        fns=loop.StepFns(views=source.views_for, loss=step_loss),
        policy=getattr(source, "policy", None) or train_set.policy, epochs=epochs, batch_size=batch_size,
        optimizer=optimizer, scheduler=scheduler, run=run, seed=int(seed), amp=amp,
        start_epoch=start_epoch, best=best, progress=progress,
        desc=f"{student} {meth.name}", num_workers=num_workers, scaler_state=scaler_state, plot=plot, on_step=on_step,
    )
    rows = run.read_metrics()
    final = rows[-1] if rows else {}
    best_row = max(rows, key=lambda r: r.get("test_top1") or 0.0) if rows else {}
    summary = {
        "stage": "train-student",
        "run_dir": str(run.path),
        "student": student,
        "method": meth.name,
        "method_options": dict(meth.options),
        "target_source": type(source).__name__,
        "views": views,
        "seed": int(seed),
        "epochs": epochs,
        "final_top1": final.get("test_top1"),
        "final_top5": final.get("test_top5"),
        "best_top1": best_row.get("test_top1"),
        "best_epoch": best_row.get("epoch"),
        "wall_seconds": time.perf_counter() - t_start,
        "train_seconds": sum(r.get("epoch_seconds") or 0.0 for r in rows),
        "img_per_s": loop.mean_over_epochs(rows, "img_per_s"),
        "train_samples": config["train_samples"],
        "checkpoint": str(run.checkpoint_dir / "latest.pth"),
    }
    del result
    run.write_summary(summary)
    return summary


def _abs(path):
    if path is None:
        return None
    return str(path) if "://" in str(path) else str(Path(path).resolve())

"""Stage one, first half: run the teacher once over a data set into a chunked Zarr store.

    extract_teacher(ExtractConfig(teacher="ckpt.pth", arch="resnet32x4",
                                  data="cifar100:/data/cifar-100-python", out="stores/rn32x4.zarr"))

What is written (``kdpipe.artifacts.schema``), by default:

- ``views`` [N, V, P]: the parameters of every stored view. By default every view of a
  finite policy (CIFAR: 162 crop offsets x flips; digits: 81), so stage two replays exactly
  the references' fresh RandomCrop + flip; ``DEFAULT_INFINITE_VIEWS`` seeded views for
  infinite policies (ImageFolder's RandomResizedCrop).
- ``labels`` [N];
- the extraction kinds' arrays: ``logits`` [N, V, C] and ``cam_r{r}`` [N, V, C, r, r] for
  every view (what students read); ``cam`` [N, V, C, h, w] only with ``native_cam``;
  ``feat/<layer>`` [N, 1, D, h, w] for the identity view only (what ``cluster`` fits letKD
  on; ``feature_views="all"`` keeps every view).

How: the driver checks everything it can first (arguments, an existing store, the checkpoint
against the architecture, the data set), probes the output shapes, creates the store (or
opens it for resume), writes ``views`` and ``labels``, then hands the shards not yet done to
the teacher pass (``kdpipe.distributed.teacher_pass``) on Ray actors or in-process. ``complete``
is set only when every shard is done; a failure leaves it false and says how to resume.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time

import numpy as np
import torch

from kdpipe import storage
from kdpipe.config.configs import ExtractConfig, check_executor
from kdpipe.distributed.executor import KillWorkerOnce
from kdpipe.distributed.teacher_pass import PassSpec, identity_column, pass_summary, probe_rows, run_pass
from kdpipe.errors import KdpipeError, StoreError
from kdpipe.runs.paths import absolute_path, absolute_spec
from kdpipe.runs.report import human_bytes
from kdpipe.targets import Cam, Feature, Logits, NativeCam, TargetKind

__all__ = [
    "extract_teacher",
    "extraction_kinds",
    "parse_cam_res",
    "parse_features",
    "FEATURES",
    "auto_shard_size",
    "format_summary",
]

FEATURES = ("penult", "inter")
# A shard's uncompressed output is kept near this size when --shard-size is not given.
SHARD_TARGET_BYTES = 128 << 20
MAX_AUTO_SHARD = 1024


# ------------------------------------------------------------------------------ arguments
def parse_features(features) -> tuple[str, ...]:
    """ "penult,inter" / ["penult"] / "none" -> a tuple of layer names."""
    if features is None:
        return ()
    if isinstance(features, str):
        features = [f for f in features.replace(" ", "").split(",") if f]
    out = []
    for f in features:
        if f in ("none", ""):
            continue
        if f not in FEATURES:
            raise KdpipeError(
                f"Unknown feature map {f!r} in --features; choose from {', '.join(FEATURES)} (comma-separated) or none."
            )
        if f not in out:
            out.append(f)
    return tuple(out)


def parse_cam_res(cam_res) -> tuple[tuple[int, ...], bool]:
    """ "2,4" / "native,2" / 2 / "none" -> (pooled sizes, whether the native CAM is stored)."""
    if cam_res is None:
        return (), False
    if isinstance(cam_res, (int, np.integer)):
        cam_res = [cam_res]
    if isinstance(cam_res, str):
        cam_res = [c for c in cam_res.replace(" ", "").split(",") if c and c != "none"]
    sizes, native = [], False
    for r in cam_res:
        if str(r).lower() == "native":
            native = True
            continue
        try:
            r = int(r)
        except (TypeError, ValueError):
            raise KdpipeError(f"--cam-res takes comma-separated positive integers or 'native', not {r!r}.") from None
        if r < 1:
            raise KdpipeError(f"--cam-res takes positive integers, not {r}.")
        if r not in sizes:
            sizes.append(r)
    return tuple(sizes), native


def method_kinds(methods, teacher_arch: str | None = None) -> list[TargetKind]:
    """The kinds the teacher pass writes for the named methods (their kinds that extraction
    writes; letKD's come from ``cluster``), each method bound to the teacher."""
    from kdpipe.methods import get_method

    kinds: list[TargetKind] = []
    for name in methods:
        method = get_method(name)
        if teacher_arch is not None:
            method.bind(teacher_arch, None)
        kinds += [k for k in method.kinds() if k.writer == "extract" and k not in kinds]
    return kinds


def extraction_kinds(cfg: ExtractConfig) -> list[TargetKind]:
    """What the teacher pass writes: logits, pooled (and native) CAMs, raw features, and the
    kinds of the named methods (``--methods``) not among those."""
    kinds: list[TargetKind] = [Logits()]
    kinds += [Cam(r) for r in cfg.cam_res]
    if cfg.native_cam:
        kinds.append(NativeCam())
    kinds += [Feature(layer, views=cfg.feature_views) for layer in cfg.features]
    return kinds + [k for k in method_kinds(cfg.methods) if k not in kinds]


def static_arrays(kinds, teacher, probe, labels) -> dict:
    """The kinds' whole arrays (``TargetKind.static``: SimKD's teacher classifier), from the probe."""
    from kdpipe.targets.base import TeacherOutputs, needs_stages

    out = TeacherOutputs.of(teacher, probe, labels, stages=needs_stages(kinds))
    return {name: value for kind in kinds for name, value in kind.static(teacher, out).items()}


def auto_shard_size(bytes_per_sample: int, num_samples: int) -> int:
    """Shard size when none is given: output near SHARD_TARGET_BYTES, at most 1024 samples,
    and at least 8 shards when the data set is small enough to allow it."""
    size = max(1, min(MAX_AUTO_SHARD, SHARD_TARGET_BYTES // max(1, bytes_per_sample)))
    size = min(size, max(1, math.ceil(num_samples / 8)))
    if size >= 16:
        size -= size % 16  # a round number keeps chunk sizes friendly
    return max(1, size)


#: images per teacher forward pass unless given (and, for a resume, unless the store records one)
DEFAULT_BATCH_SIZE = 256
BATCH_SIZE_KEY = "extract_batch_size"


def _check_arguments(cfg: ExtractConfig) -> ExtractConfig:
    from kdpipe.artifacts import existing_store

    cfg.features = parse_features(cfg.features)
    sizes, native = parse_cam_res(cfg.cam_res)
    cfg.cam_res, cfg.native_cam = sizes, bool(cfg.native_cam or native)
    check_executor(cfg.executor)
    if cfg.executor == "ray":
        storage.refuse_in_process_only([cfg.out, cfg.teacher, cfg.data.split(":", 1)[-1]], "Ray workers")
    method_kinds(cfg.methods)  # an unknown method name is one sentence now
    if cfg.resume and cfg.overwrite:
        raise KdpipeError("--resume and --overwrite exclude each other: continue the store or replace it.")
    if cfg.shard_size is not None and int(cfg.shard_size) < 1:
        raise KdpipeError(f"--shard-size must be at least 1, not {cfg.shard_size}.")
    cfg.out = os.fspath(cfg.out)
    exists = existing_store(cfg.out)
    if exists and not (cfg.overwrite or cfg.resume):
        raise StoreError(
            f"A store already exists at {cfg.out}; pass --overwrite to replace it or --resume to continue it."
        )
    if cfg.resume and not exists:
        raise StoreError(f"There is no store at {cfg.out} to resume; run without --resume to create it.")
    cfg.batch_size = _batch_size(cfg)
    return cfg


def _batch_size(cfg: ExtractConfig) -> int:
    """The forward batch size: the given one, else (resume) the store's own, else the default.

    The teacher's outputs depend on the batch size in their last float16 bits (convolution
    algorithms differ by batch), so a store is continued with the batch size it was started
    with: another one is refused rather than leaving shards that differ from an unbroken run."""
    from kdpipe.artifacts import read_manifest

    existing = read_manifest(cfg.out) if cfg.resume else None
    recorded = existing.extra.get(BATCH_SIZE_KEY) if existing is not None else None
    if cfg.batch_size is None:
        return int(recorded or DEFAULT_BATCH_SIZE)
    if recorded is not None and int(cfg.batch_size) != int(recorded):
        raise KdpipeError(
            f"--resume continues the store with its batch size {recorded} (the teacher's float16 outputs "
            f"depend on it); leave out --batch-size {cfg.batch_size}, or pass --overwrite to start again."
        )
    return int(cfg.batch_size)


# ------------------------------------------------------------------------------ planning
def _probe(dataset, policy, teacher, cfg) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One identity-view image and its label, and the teacher's class count (checked against
    the data set's)."""
    from kdpipe.data import normalize

    identity = torch.from_numpy(policy.identity()[None])
    probe = normalize(policy.apply_images(dataset.get_batch(np.arange(1)), identity), dataset.mean, dataset.std)
    labels = torch.as_tensor(dataset.labels[:1], dtype=torch.int64)
    num_classes = int(teacher.forward_features(probe)[0].shape[1])
    if num_classes != dataset.num_classes:
        raise KdpipeError(
            f"The teacher has {num_classes} outputs but the data set {cfg.data} has {dataset.num_classes} classes."
        )
    return probe, labels, num_classes


def _check_cam_sizes(cfg, teacher, probe) -> None:
    """A pooled CAM only shrinks the teacher's map: a size above it stores copies of its cells
    (--cam-res 64 on an 8x8 CAM is a 64-fold larger store) and is refused before any work."""
    cam = teacher.forward_features(probe)[1].get("cam")
    if cam is None or not cfg.cam_res:
        return
    h, w = (int(x) for x in cam.shape[-2:])
    larger = [r for r in cfg.cam_res if r > min(h, w)]
    if larger:
        raise KdpipeError(
            f"--cam-res {','.join(map(str, larger))} is larger than the teacher's {h}x{w} CAM; pooled "
            f"sizes go up to {min(h, w)} (pass 'native' for the map itself)."
        )


def _array_specs(kinds, shapes: dict, n: int, num_views: int, param_dim: int) -> list:
    from kdpipe.artifacts.schema import ArraySpec

    views_meaning = "view parameters (policy-specific) of each stored view of each sample"
    specs = [
        ArraySpec("views", (n, num_views, param_dim), "int32", views_meaning),
        ArraySpec("labels", (n,), "int32", "class label of each sample"),
    ]
    for kind in kinds:
        for path, stored in kind.storage.items():
            v = num_views if stored.views == "all" else 1
            specs.append(ArraySpec(path, (n, v) + shapes[path], stored.dtype, stored.meaning))
    return specs


def _shard_size(cfg, specs: list, n: int) -> int:
    """The given shard size, else the resumed store's own, else one sized from the row bytes."""
    from kdpipe.artifacts import read_manifest

    shard_size = cfg.shard_size
    if shard_size is None and cfg.resume:
        old = read_manifest(cfg.out)
        shard_size = old.shard_size if old is not None else None  # continue with the store's own
    if shard_size is None:
        shard_size = auto_shard_size(sum(s.row_bytes() for s in specs), n)
    return int(min(int(shard_size), n))


def _manifest(cfg, dataset, views_entry: dict, num_classes: int, specs: list, shard_size: int):
    from kdpipe.artifacts import sha256_file
    from kdpipe.artifacts.manifest import build_manifest

    teacher = {
        "arch": cfg.arch,
        "sha256": sha256_file(cfg.teacher),
        "num_classes": num_classes,
        "path": absolute_path(cfg.teacher),
    }
    data = {
        "name": dataset.name,
        "spec": absolute_spec(getattr(dataset, "spec", cfg.data)),
        "split": dataset.split,
        "fingerprint": dataset.fingerprint,
        "num_samples": len(dataset),
        "num_classes": dataset.num_classes,
        "mean": list(dataset.mean),
        "std": list(dataset.std),
        "image_size": list(dataset.image_size),
    }
    manifest = build_manifest(
        teacher=teacher,
        dataset=data,
        views=views_entry,
        layers=list(cfg.features),
        specs=specs,
        shard_size=shard_size,
        num_samples=len(dataset),
    )
    # a resume continues with the batch size (_batch_size): kept among the manifest's extra keys
    return dataclasses.replace(manifest, extra={**manifest.extra, BATCH_SIZE_KEY: int(cfg.batch_size)})


def _store_layout(cfg, dataset, policy, teacher) -> dict:
    """Views table, kinds, array specs and manifest of the store this run makes."""
    from kdpipe.views import resolve_views, view_table

    n = len(dataset)
    mode = resolve_views(policy, cfg.views)
    table = view_table(policy, n, mode, cfg.seed)  # [N, V, P]
    num_views = int(table.shape[1])
    kinds = extraction_kinds(cfg)
    probe, labels, num_classes = _probe(dataset, policy, teacher, cfg)
    _check_cam_sizes(cfg, teacher, probe)
    specs = _array_specs(kinds, probe_rows(kinds, teacher, probe, labels), n, num_views, policy.param_dim)
    static = static_arrays(kinds, teacher, probe, labels)
    shard_size = _shard_size(cfg, specs, n)
    specs = [s.with_chunks(shard_size) for s in specs]
    views_entry = dict(policy.spec())
    views_entry.update(
        policy=policy.name,
        mode=mode,
        num_views=num_views,
        policy_num_views=policy.num_views,
        seed=int(cfg.seed),
        pad_mode=getattr(policy, "pad_mode", None),
        feature_views=cfg.feature_views,
        identity_index=identity_column(table, policy.identity()),
    )
    return {
        "table": table,
        "kinds": kinds,
        "specs": specs,
        "manifest": _manifest(cfg, dataset, views_entry, num_classes, specs, shard_size),
        "shard_size": shard_size,
        "static": static,
        "num_views": num_views,
        "num_classes": num_classes,
        "identity_index": views_entry["identity_index"],
    }


def _open_store(cfg, layout):
    """The writer, the shards to run and the shards already done (resume)."""
    from kdpipe.artifacts import StoreWriter
    from kdpipe.distributed.executor import plan

    shards = plan(layout["manifest"].num_samples, layout["shard_size"])
    if not cfg.resume:
        return StoreWriter.create(cfg.out, layout["manifest"], layout["specs"], overwrite=cfg.overwrite), shards, set()
    writer = StoreWriter.open_for_resume(cfg.out, layout["manifest"])
    done = writer.done_shards()
    if writer.manifest.complete and len(done) == len(shards):
        return writer, [], done
    return writer, [s for s in shards if s.shard_id not in done], done


# ------------------------------------------------------------------------------ the stage
def extract_teacher(
    cfg: ExtractConfig, progress: bool = True, verbose: bool = True, fault: KillWorkerOnce | None = None
) -> dict:
    """Run the teacher over the data set into the store at ``cfg.out``; return the summary.
    ``fault``: fault injection for tests (``kdpipe.distributed.executor.KillWorkerOnce``)."""
    from kdpipe.data import load_dataset
    from kdpipe.models import load_teacher
    from kdpipe.views import with_pad_mode

    t_start = time.perf_counter()
    cfg = _check_arguments(cfg)
    dataset = load_dataset(cfg.data, cfg.split)
    if len(dataset) == 0:
        raise KdpipeError(f"The data set {cfg.data} ({cfg.split}) has no images.")
    policy = with_pad_mode(dataset.policy, cfg.pad_mode)
    teacher = load_teacher(cfg.arch, cfg.teacher, dataset.num_classes).eval()
    with torch.inference_mode():
        layout = _store_layout(cfg, dataset, policy, teacher)
    del teacher
    writer, todo, done = _open_store(cfg, layout)
    spec = PassSpec(
        store=writer.path,
        teacher=absolute_path(cfg.teacher),
        arch=cfg.arch,
        data=absolute_spec(cfg.data),
        split=cfg.split,
        num_classes=layout["num_classes"],
        kinds=layout["kinds"],
        batch_size=_batch_size(cfg),
        device=cfg.device,
        fingerprint=dataset.fingerprint,
        pad_mode=cfg.pad_mode,
        identity_index=layout["identity_index"],
    )
    if verbose and cfg.resume:
        print(f"resuming {writer.path}: {len(done)} shards already done, {len(todo)} to go")
    if not cfg.resume or todo:
        # views and labels are written by the driver (idempotent, so a resume rewrites them)
        writer.write_rows("views", 0, layout["table"])
        writer.write_rows("labels", 0, dataset.labels.astype(np.int32))
        for name, (array, meaning) in layout["static"].items():
            writer.write_static(name, array, meaning)
    if progress:
        print(work_line(cfg.arch, todo, layout["num_views"]), flush=True)
    results, seconds = run_pass(
        writer,
        spec,
        todo,
        cfg,
        desc=f"extract {cfg.arch}",
        unit_scale=layout["num_views"],
        progress=progress,
        fault=fault,
        quick_trial="--views 8 (8 seeded views per image instead of every one)",
    )
    writer.finalize()
    run_summary = pass_summary(results, seconds, cfg.executor)
    writer.update_manifest(extraction=run_summary)
    summary = _summary(writer.path, layout, len(todo), run_summary, time.perf_counter() - t_start, cfg.executor)
    if verbose:
        print(format_summary(summary))
    return summary


def work_line(arch: str, todo, num_views: int) -> str:
    """What the pass will do, before it starts: images x views = teacher passes."""
    images = sum(int(getattr(s, "size", 1)) for s in todo)
    return (
        f"extract-teacher: {images:,} images x {num_views} views = {images * num_views:,} {arch} passes "
        f"in {len(todo)} shards (an estimate follows the first shard)"
    )


def _summary(path, layout, shards_run, run_summary, wall, executor) -> dict:
    from kdpipe.artifacts import open_store

    info = open_store(path).array_info()
    raw = sum(a["bytes"] for a in info)
    stored = sum(a["stored_bytes"] for a in info)
    m = layout["manifest"]
    return {
        "store": path,
        "samples": m.num_samples,
        "views": layout["num_views"],
        "classes": layout["num_classes"],
        "arrays": {a["name"]: list(a["shape"]) for a in info},
        "shards": m.num_shards,
        "shards_run": shards_run,
        "shard_size": layout["shard_size"],
        "bytes_raw": raw,
        "bytes_stored": stored,
        "compression_ratio": round(raw / stored, 3) if stored else None,
        "wall_s": round(wall, 3),
        **{
            k: run_summary[k]
            for k in ("img_per_s", "busy_img_per_s", "shard_seconds", "compute_s", "write_s", "executor")
        },
    }


def format_summary(s: dict) -> str:
    lines = [
        f"store      {s['store']} (complete)",
        f"samples    {s['samples']:,} x {s['views']} view(s), {s['classes']} classes; "
        f"{s['shards']} shards of {s['shard_size']} ({s['shards_run']} run now)",
    ]
    for name, shape in s["arrays"].items():
        lines.append(f"  {name:<16} {shape}")
    ratio = f"{s['compression_ratio']:.2f}x" if s["compression_ratio"] else "n/a"
    lines.append(
        f"size       {human_bytes(s['bytes_stored'])} on disk, {human_bytes(s['bytes_raw'])} raw, compression {ratio}"
    )
    rate = f"{s['img_per_s']:.1f} img/s" if s["img_per_s"] else "nothing to do"
    lines.append(f"speed      {rate} ({s['executor']}), wall time {s['wall_s']:.1f} s")
    return "\n".join(lines)

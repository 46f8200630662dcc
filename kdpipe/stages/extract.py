"""Stage one, first half: run the teacher once over a data set into a chunked Zarr store.

    extract_teacher(teacher="ckpt.pth", arch="resnet32x4", data="cifar100:/data/cifar-100-python",
                    out="stores/rn32x4-c100.zarr", views="1", cam_res=(2,),
                    features=("penult", "inter"))

What is written (see kdpipe.artifacts.schema): `views` [N, V, P] (the parameters of every
stored view), `labels` [N], `logits` [N, V, C], `cam` [N, V, C, h, w], `cam_r{R}`
[N, V, C, R, R] for each R in `cam_res` (adaptive average pooling of the float32 CAM) and
`feat/<layer>` [N, V, D, h, w] for each layer in `features`, all float16 but views/labels.

How: the driver checks everything it can first (arguments, an existing store, the
checkpoint against the architecture, the data set), probes the output shapes with one
image, creates the store (or opens it for --resume), writes `views` and `labels`, then hands
the shards not yet done to `kdpipe.pipeline.executor.run_shards`. Each worker (`ExtractWorker`,
one per Ray actor or one in-process) loads the teacher and the data set once; per shard it
reads the view parameters of its rows, applies each view to the images (`policy.apply_images`),
normalises, runs `forward_features` under `torch.inference_mode`, writes its rows of every
array and marks its shard done. The driver sets `complete` only when every shard is done; a
failure leaves it false and says the store can be resumed.
"""

from __future__ import annotations

import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from kdpipe.data import normalize
from kdpipe.errors import KdpipeError, StoreError
from kdpipe.stages.loop import resolve_device

FEATURES = ("penult", "inter")
DEFAULT_BATCH_SIZE = 256
# A shard's uncompressed output is kept near this size when --shard-size is not given.
SHARD_TARGET_BYTES = 128 << 20
MAX_AUTO_SHARD = 1024


# ------------------------------------------------------------------------------ arguments

def parse_features(features) -> tuple[str, ...]:
    if features is None:
        return ()
    if isinstance(features, str):
        features = [f for f in features.replace(" ", "").split(",") if f]
    out = []
    for f in features:
        if f in ("none", ""):
            continue
        if f not in FEATURES:
            raise KdpipeError(f"Unknown feature map {f!r} in --features; choose from {', '.join(FEATURES)} "
                              "(comma-separated) or none.")
        if f not in out:
            out.append(f)
    return tuple(out)


def parse_cam_res(cam_res) -> tuple[int, ...]:
    if cam_res is None:
        return ()
    if isinstance(cam_res, (int, np.integer)):
        cam_res = [cam_res]
    if isinstance(cam_res, str):
        cam_res = [c for c in cam_res.replace(" ", "").split(",") if c and c != "none"]
    out = []
    for r in cam_res:
        try:
            r = int(r)
        except (TypeError, ValueError):
            raise KdpipeError(f"--cam-res takes comma-separated positive integers, not {r!r}.") from None
        if r < 1:
            raise KdpipeError(f"--cam-res takes positive integers, not {r}.")
        if r not in out:
            out.append(r)
    return tuple(out)


def auto_shard_size(bytes_per_sample: int, num_samples: int) -> int:
    """Shard size when none is given: output near SHARD_TARGET_BYTES, at most 1024 samples,
    and at least 8 shards when the data set is small enough to allow it."""
    size = max(1, min(MAX_AUTO_SHARD, SHARD_TARGET_BYTES // max(1, bytes_per_sample)))
    size = min(size, max(1, math.ceil(num_samples / 8)))
    if size >= 16:
        size -= size % 16  # a round number keeps chunk sizes friendly
    return max(1, size)


def absolute_spec(data: str) -> str:
    """The data spec with a relative local folder made absolute, so Ray workers (whose working
    directory may differ) find the same folder: "cifar10:./c" -> "cifar10:/abs/c"."""
    kind, sep, rest = str(data).partition(":")
    if not sep or kind.strip().lower() not in ("cifar10", "cifar100", "imagefolder") or not rest:
        return data
    path, q, options = rest.partition("?")
    if "://" in path or os.path.isabs(path):
        return data
    return f"{kind}:{os.path.abspath(path)}{q}{options}"


# ------------------------------------------------------------------------------ the worker

class ExtractWorker:
    """Loads the teacher and the data set once; `run(shard)` writes that shard's rows."""

    def __init__(self, store, teacher, arch, data, split, num_classes, cam_res, features, batch_size,
                 device=None, fingerprint=None):
        from kdpipe.artifacts import StoreWriter
        from kdpipe.data import load_dataset
        from kdpipe.errors import DataError
        from kdpipe.models import load_teacher

        self.device = resolve_device(device)
        self.model = load_teacher(arch, teacher, num_classes).to(self.device).eval()
        self.dataset = load_dataset(data, split)
        if fingerprint is not None and self.dataset.fingerprint != fingerprint:
            raise DataError(f"The data set {data} seen by a worker differs from the driver's "
                            "(fingerprint mismatch); every worker must reach the same data.")
        self.policy = self.dataset.policy
        self.cam_res = tuple(cam_res)
        self.features = tuple(features)
        self.batch_size = int(batch_size)
        self.writer = StoreWriter.open(store)

    @torch.inference_mode()
    def compute(self, images: torch.Tensor, params: np.ndarray) -> dict[str, np.ndarray]:
        """Teacher outputs for images [B, 3, H, W] uint8 under views params [B, V, P].

        Returns float16 numpy arrays [B, V, ...] keyed by store array name.
        """
        b, v = params.shape[:2]
        flat = torch.from_numpy(np.ascontiguousarray(params.reshape(b * v, -1)))
        sample_of = torch.arange(b * v) // v
        out: dict[str, np.ndarray] = {}
        ds = self.dataset
        for s in range(0, b * v, self.batch_size):
            rows = slice(s, min(s + self.batch_size, b * v))
            # uint8 to the device first (4x less to move than float32), then view + normalise there
            x = images[sample_of[rows]].to(self.device, non_blocking=True)
            x = self.policy.apply_images(x, flat[rows].to(self.device))
            x = normalize(x, ds.mean, ds.std)
            logits, feats = self.model.forward_features(x)
            parts = {"logits": logits, "cam": feats["cam"]}
            for r in self.cam_res:
                parts[f"cam_r{r}"] = F.adaptive_avg_pool2d(feats["cam"].float(), r)
            for f in self.features:
                parts[f"feat/{f}"] = feats[f]
            for name, t in parts.items():
                t = t.to(torch.float16).cpu().numpy()
                if not np.isfinite(t).all():
                    raise KdpipeError(f"The teacher's {name} is NaN or beyond float16 range (|x| > 65504) "
                                      "for some images; check the checkpoint and the data normalisation.")
                if name not in out:
                    out[name] = np.empty((b * v,) + t.shape[1:], np.float16)
                out[name][rows] = t
        return {k: a.reshape((b, v) + a.shape[1:]) for k, a in out.items()}

    def run(self, shard) -> dict:
        t0 = time.perf_counter()
        params = np.asarray(self.writer.array("views")[shard.start:shard.stop])
        images = self.dataset.get_batch(np.arange(shard.start, shard.stop))
        t1 = time.perf_counter()
        outputs = self.compute(images, params)
        t2 = time.perf_counter()
        for name, block in outputs.items():
            self.writer.write_rows(name, shard.start, block)
        self.writer.mark_shard_done(shard.shard_id)
        t3 = time.perf_counter()
        return {"shard": shard.shard_id, "samples": shard.size, "images": int(params.shape[0] * params.shape[1]),
                "read_s": t1 - t0, "compute_s": t2 - t1, "write_s": t3 - t2, "pid": os.getpid()}


# ------------------------------------------------------------------------------ the stage

def _probe(model, dataset, policy, device) -> tuple[int, tuple, dict]:
    """Shapes of the teacher's outputs on one identity-view image: (C, cam hw, feature shapes)."""
    with torch.inference_mode():
        img = dataset.get_batch(np.arange(1))
        x = normalize(policy.apply_images(img, torch.from_numpy(policy.identity()[None])),
                         dataset.mean, dataset.std)
        logits, feats = model.forward_features(x)
    shapes = {k: tuple(int(s) for s in t.shape[1:]) for k, t in feats.items()}
    return int(logits.shape[1]), shapes["cam"][1:], shapes


def extract_teacher(teacher, arch, data, out, views="1", cam_res=(2,), features=FEATURES,
                    shard_size: int | None = None, executor: str = "ray", ray_address: str | None = None,
                    num_workers: int | None = None, resume: bool = False, overwrite: bool = False,
                    seed: int = 0, batch_size: int = DEFAULT_BATCH_SIZE, device=None, split: str = "train",
                    progress: bool = True, verbose: bool = True) -> dict:
    """Run the teacher over the data set into the store at `out`; return the summary dict."""
    from kdpipe.artifacts import StoreWriter, open_store, read_manifest, sha256_file, store_exists
    from kdpipe.artifacts.schema import build_manifest, extraction_specs, ArraySpec
    from kdpipe.data import load_dataset
    from kdpipe.models import load_teacher
    from kdpipe.pipeline.executor import WorkerLost, plan, run_shards
    from kdpipe.views import view_table

    t_start = time.perf_counter()
    # ---- arguments and an existing store: cheap checks first -----------------------------
    features = parse_features(features)
    cam_res = parse_cam_res(cam_res)
    if executor not in ("ray", "inline"):
        raise KdpipeError(f"--executor must be ray or inline, not {executor!r}.")
    if resume and overwrite:
        raise KdpipeError("--resume and --overwrite exclude each other: continue the store or replace it.")
    if shard_size is not None and int(shard_size) < 1:
        raise KdpipeError(f"--shard-size must be at least 1, not {shard_size}.")
    if int(batch_size) < 1:
        raise KdpipeError(f"--batch-size must be at least 1, not {batch_size}.")
    out = os.fspath(out)
    exists = store_exists(out)
    if exists and not (overwrite or resume):
        raise StoreError(f"A store already exists at {out}; pass --overwrite to replace it or --resume "
                         "to continue it.")
    if resume and not exists:
        raise StoreError(f"There is no store at {out} to resume; run without --resume to create it.")

    # ---- data, teacher, shapes -----------------------------------------------------------
    dataset = load_dataset(data, split)
    n = len(dataset)
    if n == 0:
        raise KdpipeError(f"The data set {data} ({split}) has no images.")
    model = load_teacher(arch, teacher, dataset.num_classes)
    policy = dataset.policy
    table = view_table(policy, n, views, seed)  # [N, V, P]; KdpipeError for a bad --views
    num_views = int(table.shape[1])
    num_classes, cam_hw, shapes = _probe(model, dataset, policy, "cpu")
    del model
    if num_classes != dataset.num_classes:
        raise KdpipeError(f"The teacher has {num_classes} outputs but the data set {data} has "
                          f"{dataset.num_classes} classes.")
    sha = sha256_file(teacher)

    # ---- plan ----------------------------------------------------------------------------
    specs = extraction_specs(n, num_views, policy.param_dim, num_classes, cam_hw, cam_res,
                             {f: shapes[f] for f in features})
    specs.append(ArraySpec("labels", (n,), "int32", "class label of each sample"))
    if shard_size is None and resume:
        shard_size = (read_manifest(out) or {}).get("shard_size")  # continue with the store's own
    if shard_size is None:
        per_sample = sum(s.row_bytes() for s in specs)
        shard_size = auto_shard_size(per_sample, n)
    shard_size = int(min(int(shard_size), n))
    specs = [s.with_chunks(shard_size) for s in specs]
    views_spec = dict(policy.spec())
    views_spec.update(policy=policy.name, mode=str(views).strip().lower(), num_views=num_views,
                      policy_num_views=policy.num_views, seed=int(seed),
                      pad_mode=getattr(policy, "pad_mode", None))
    manifest = build_manifest(
        teacher={"arch": arch, "sha256": sha, "num_classes": num_classes, "path": os.path.abspath(os.fspath(teacher))},
        dataset={"name": dataset.name, "spec": getattr(dataset, "spec", data), "split": dataset.split,
                 "fingerprint": dataset.fingerprint, "num_samples": n, "num_classes": dataset.num_classes,
                 "mean": list(dataset.mean), "std": list(dataset.std), "image_size": list(dataset.image_size)},
        views=views_spec, layers=list(features), specs=specs, shard_size=shard_size, num_samples=n)
    shards = plan(n, shard_size)

    if resume:
        writer = StoreWriter.open_for_resume(out, manifest)
        done = writer.done_shards()
        if writer.manifest.get("complete") and len(done) == len(shards):
            todo = []
        else:
            todo = [s for s in shards if s.shard_id not in done]
    else:
        writer = StoreWriter.create(out, manifest, specs, overwrite=overwrite)
        done, todo = set(), shards
    path = writer.path

    # ---- run -----------------------------------------------------------------------------
    worker_kwargs = dict(store=path, teacher=os.path.abspath(os.fspath(teacher)), arch=arch,
                         data=absolute_spec(data), split=split,
                         num_classes=num_classes, cam_res=cam_res, features=features, batch_size=int(batch_size),
                         device=device, fingerprint=dataset.fingerprint)
    if verbose and resume:
        print(f"resuming {path}: {len(done)} of {len(shards)} shards already done, {len(todo)} to go")
    t_run = time.perf_counter()
    try:
        if not resume or todo:
            # views and labels are written by the driver (idempotent, so a resume rewrites them)
            writer.write_rows("views", 0, table)
            writer.write_rows("labels", 0, dataset.labels.astype(np.int32))
        results = run_shards(ExtractWorker, worker_kwargs, todo, executor=executor, num_workers=num_workers,
                             ray_address=ray_address, desc=f"extract {arch}", unit="img", progress=progress,
                             unit_scale=num_views)
    except BaseException as err:
        failed_done = None
        try:
            failed_done = len(writer.mark_incomplete()["shards_done"])
        except Exception:  # noqa: BLE001 - the disk may still be full; the flag is already false
            pass
        count = f"{failed_done} of {len(shards)}" if failed_done is not None else f"some of {len(shards)}"
        if isinstance(err, WorkerLost):
            raise StoreError(f"{err}, so the store at {path} is incomplete ({count} shards written); "
                             "resume it with --resume.") from None
        if isinstance(err, KdpipeError) or not isinstance(err, OSError):
            raise
        reason = err.strerror or str(err) or type(err).__name__
        raise StoreError(f"Writing the store at {path} failed ({reason}); the store is incomplete "
                         f"({count} shards written) and can be resumed with --resume once that is fixed.") from None
    t_end_run = time.perf_counter()
    seconds = t_end_run - t_run
    images_done = sum(r["images"] for r in results)
    busy: dict = {}
    for r in results:
        busy[r.get("pid")] = busy.get(r.get("pid"), 0.0) + r["read_s"] + r["compute_s"] + r["write_s"]
    busiest = max(busy.values()) if busy else 0.0
    summary_run = {
        # images / the busiest worker's time in run(): throughput without worker start-up
        "busy_img_per_s": round(images_done / busiest, 2) if busiest > 0 and images_done else None,
        "samples_processed": int(sum(r["samples"] for r in results)),
        "images_processed": int(images_done),
        "shard_seconds": round(seconds, 3),
        "img_per_s": round(images_done / seconds, 2) if seconds > 0 and images_done else None,
        "compute_s": round(sum(r["compute_s"] for r in results), 3),
        "write_s": round(sum(r["write_s"] for r in results), 3),
        "executor": executor,
    }
    writer.finalize()
    writer.update_manifest(extraction=summary_run)

    # ---- summary -------------------------------------------------------------------------
    reader = open_store(path)
    info = reader.array_info()
    raw = sum(a["bytes"] for a in info)
    stored = sum(a["stored_bytes"] for a in info)
    wall = time.perf_counter() - t_start
    summary = {
        "store": path, "samples": n, "views": num_views, "classes": num_classes,
        "arrays": {a["name"]: list(a["shape"]) for a in info},
        "shards": len(shards), "shards_run": len(todo), "shard_size": shard_size,
        "bytes_raw": raw, "bytes_stored": stored, "compression_ratio": round(raw / stored, 3) if stored else None,
        "img_per_s": summary_run["img_per_s"], "wall_s": round(wall, 3), "executor": executor,
        "busy_img_per_s": summary_run["busy_img_per_s"],
        "shard_seconds": summary_run["shard_seconds"], "compute_s": summary_run["compute_s"],
        "write_s": summary_run["write_s"],
    }
    if verbose:
        print(format_summary(summary))
    return summary


def _human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    return str(nbytes)


def format_summary(s: dict) -> str:
    lines = [f"store      {s['store']} (complete)",
             f"samples    {s['samples']:,} x {s['views']} view(s), {s['classes']} classes; "
             f"{s['shards']} shards of {s['shard_size']} ({s['shards_run']} run now)"]
    for name, shape in s["arrays"].items():
        lines.append(f"  {name:<16} {shape}")
    ratio = f"{s['compression_ratio']:.2f}x" if s["compression_ratio"] else "n/a"
    lines.append(f"size       {_human(s['bytes_stored'])} on disk, {_human(s['bytes_raw'])} raw, "
                 f"compression {ratio}")
    rate = f"{s['img_per_s']:.1f} img/s" if s["img_per_s"] else "nothing to do"
    lines.append(f"speed      {rate} ({s['executor']}), wall time {s['wall_s']:.1f} s")
    return "\n".join(lines)

"""Stage one on the device, for benchmarks/gpu_suite.py: extraction against bare teacher
inference (inline and with Ray actors), cluster's fit and assignment pass, K-means at letKD's
CIFAR-100 shape (gpu_suite_context.py says what a part is)."""

from __future__ import annotations

import time

import numpy as np
import torch
from common import calibrated_teacher
from gpu_suite_context import Ctx, check, pipeline


# ----------------------------------------------------------------------------- helpers
def teacher_checkpoint(ctx: Ctx, arch: str, data: str) -> str:
    """A random teacher with BN statistics calibrated on the data (activations of a trained
    network's scale, benchmarks/common.py), saved as kdpipe reads checkpoints."""
    from kdpipe.data import load_dataset
    from kdpipe.models import build

    path = ctx.work / f"teacher_{arch}.pth"
    if not path.is_file():
        torch.manual_seed(0)
        model = build(arch, ctx.sizes.classes)
        calibrated_teacher(model, load_dataset(data, "train"), 128, ctx.sizes.calib_batches)
        torch.save({"model": model.state_dict()}, path)
    return str(path)


def bare_img_per_s(ctx: Ctx, model, dataset, table: np.ndarray, batch_size: int) -> float:
    """Bare teacher inference over the same images and views as extraction (the first
    ``bare_images`` of them: throughput needs seconds, not the whole store): the teacher pass's
    data path (kdpipe.distributed.teacher_pass: host gather, uint8 to the device, view applied and
    normalised there) and the forward pass, nothing computed from the outputs, nothing written."""
    from kdpipe.data import normalize

    n, v = table.shape[:2]
    total = min(n * v, ctx.sizes.bare_images)
    flat = torch.from_numpy(np.ascontiguousarray(table.reshape(n * v, -1)[:total]))
    sample_of = np.arange(total) // v
    ctx.sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, total, batch_size):
            rows = slice(s, min(s + batch_size, total))
            x = dataset.get_batch(sample_of[rows]).to(ctx.dev, non_blocking=True)
            x = dataset.policy.apply_images(x, flat[rows].to(ctx.dev))
            model(normalize(x, dataset.mean, dataset.std))
    ctx.sync()
    return total / (time.perf_counter() - t0)


def bracketed_extraction(ctx: Ctx, samples: int, out: str, made: dict | None = None, **extract_kw) -> dict:
    """Bare inference, then extract_teacher, then bare again, on the same images and views:
    the ratio pairs the extraction with the mean of the two bare runs around it."""
    from kdpipe.artifacts import open_store
    from kdpipe.data import load_dataset
    from kdpipe.models import load_teacher
    from kdpipe.stages.extract import extract_teacher
    from kdpipe.views import resolve_views, view_table

    s = ctx.sizes
    data = ctx.data(samples)
    ckpt = teacher_checkpoint(ctx, s.teacher, data)
    dataset = load_dataset(data, "train")
    table = view_table(dataset.policy, len(dataset), resolve_views(dataset.policy, s.views), seed=0)
    model = load_teacher(s.teacher, ckpt, s.classes).to(ctx.dev).eval()
    warm = table[: 2 * s.extract_batch // table.shape[1] + 1]  # two full batches: CUDA and cuDNN start-up
    bare_img_per_s(ctx, model, dataset, warm, s.extract_batch)
    bare = [bare_img_per_s(ctx, model, dataset, table, s.extract_batch)]
    cfg = pipeline().ExtractConfig(
        teacher=ckpt,
        arch=s.teacher,
        data=data,
        out=out,
        views=s.views,
        cam_res=(2,),
        batch_size=s.extract_batch,
        device=str(ctx.dev),
        overwrite=True,
        **extract_kw,
    )
    res = extract_teacher(cfg, progress=False, verbose=False)
    if made is not None:  # the store is there: later parts can use it even if a check below fails
        made.update(store=out, checkpoint=ckpt)
    bare.append(bare_img_per_s(ctx, model, dataset, table, s.extract_batch))
    reader = open_store(out)
    logits = np.asarray(reader.array("logits")[: min(samples, 64)], dtype=np.float32)
    check(reader.num_views == table.shape[1], f"the store holds {reader.num_views} views, not {table.shape[1]}")
    check(np.isfinite(logits).all(), "the stored logits hold NaN or infinite values")
    check(logits.shape[-1] == s.classes, f"the stored logits have {logits.shape[-1]} classes, not {s.classes}")
    bare_mean = sum(bare) / len(bare)
    return {
        "images": int(table.shape[0] * table.shape[1]),
        "views": int(table.shape[1]),
        "teacher": s.teacher,
        "executor": res.get("executor"),
        "extract_img_per_s": res.get("img_per_s"),
        "extract_busy_img_per_s": res.get("busy_img_per_s"),
        "bare_img_per_s_runs": [round(b, 1) for b in bare],
        "extract_over_bare": res["img_per_s"] / bare_mean,
        "extract_busy_over_bare": (res["busy_img_per_s"] or 0) / bare_mean,
        "wall_s": res.get("wall_s"),
        "bytes_stored": res.get("bytes_stored"),
        "checkpoint": ckpt,
        "bare_img_per_s": bare_mean,
    }


# ----------------------------------------------------------------------------- the parts
def part_extract(ctx: Ctx) -> dict:
    """The training store: extract_teacher (inline executor, on the device) with every view,
    CAMs pooled to 2x2, identity-view features; bare teacher inference before and after."""
    store = str(ctx.work / "store.zarr")
    fig = bracketed_extraction(ctx, ctx.sizes.samples, store, made=ctx.made, executor="inline")
    fig.pop("checkpoint")
    ctx.made["bare_img_per_s"] = fig["bare_img_per_s"]
    fig["bar_extract_over_bare"] = 0.95
    return fig


def part_cluster(ctx: Ctx) -> dict:
    """kdpipe cluster (inline executor): LDA + K-means fit (backend auto: faiss-gpu, else torch
    on the GPU) and the assignment pass (the teacher over every stored view)."""
    from kdpipe.artifacts import open_store
    from kdpipe.stages.cluster import cluster

    s = ctx.sizes
    summary = cluster(
        pipeline().ClusterConfig(
            store=ctx.made["store"],
            k_penult=s.k_penult,
            k_inter=s.k_inter,
            batch_size=s.extract_batch,
            executor="inline",
            device=str(ctx.dev),
            overwrite=True,
        ),
        progress=False,
        verbose=False,
    )
    ts = open_store(ctx.made["store"]).target_set("default")
    check(ts.k_penult == s.k_penult, f"the target set has K_penult {ts.k_penult}, not {s.k_penult}")
    ctx.made["targets"] = "default"
    check(np.isfinite(summary["retained_mass_mean"]), "the assignment pass recorded no retained top-k mass")
    assign = summary["assign"]
    bare = ctx.made.get("bare_img_per_s")
    return {
        "kmeans_backend": (ts.extra or {}).get("kmeans_backend"),
        "seconds": summary["seconds"],
        "assign_img_per_s": assign["img_per_s"],
        "assign_busy_img_per_s": assign["busy_img_per_s"],
        "assign_images": assign["images_processed"],
        "assign_over_bare": assign["img_per_s"] / bare if bare else None,
        "topk": summary["topk"],
        "retained_mass_min": summary["retained_mass_min"],
    }


# ----------------------------------------------------------------------------- K-means
def kmeans_data(ctx: Ctx, n: int, d: int, k: int, seed: int = 0) -> np.ndarray:
    """benchmarks/kmeans.py's data (vectors around 4k Gaussian blobs, scale 3, unit noise),
    drawn on the device: numpy would take most of a minute for 3.2M x 256."""
    g = torch.Generator(device=ctx.dev).manual_seed(seed)
    means = torch.randn(4 * k, d, generator=g, device=ctx.dev) * 3
    which = torch.randint(0, 4 * k, (n,), generator=g, device=ctx.dev)
    x = means[which] + torch.randn(n, d, generator=g, device=ctx.dev)
    return x.cpu().numpy()


def part_kmeans(ctx: Ctx) -> dict:
    """K-means with letKD's CIFAR-100 shape (4,096 centres, 3.2M x 256 vectors, 20 iterations):
    torch on the device, and faiss (GPU on CUDA, CPU otherwise) where it imports; same data and
    initial centres for both (benchmarks/kmeans.fit)."""
    from kmeans import fit

    from kdpipe.methods.letkd.fit.clustering import faiss_gpu_available, faiss_installed

    s = ctx.sizes
    t0 = time.perf_counter()
    x = kmeans_data(ctx, s.kmeans_n, s.kmeans_d, s.kmeans_k)
    data_s = time.perf_counter() - t0
    labels = ["torch-cuda" if ctx.cuda else "torch-cpu"]
    if ctx.cuda:
        faiss_note = "faiss-gpu ran" if faiss_gpu_available() else "faiss-gpu not importable with GPUs here: not run"
        if faiss_gpu_available():
            labels.append("faiss-gpu")
    else:
        faiss_note = "faiss-cpu ran" if faiss_installed() else "faiss not installed: not run"
        if faiss_installed():
            labels.append("faiss-cpu")
    warm = kmeans_data(ctx, 4096, 8, 16, seed=1)
    for label in labels:
        fit(warm, 16, 2, 0, label)  # CUDA context, faiss GPU resources
    res = {label: fit(x, s.kmeans_k, s.kmeans_niter, 0, label) for label in labels}
    for label, r in res.items():
        check(np.isfinite(r["objective_sum"]), f"{label}: the K-means objective is not finite")
    first = res[labels[0]]
    fig: dict = {
        "shape": [s.kmeans_n, s.kmeans_d],
        "k": s.kmeans_k,
        "niter": s.kmeans_niter,
        "ran": labels,
        "note": faiss_note,
        "data_seconds": data_s,
        "seconds": {label: r["seconds"] for label, r in res.items()},
        "objective_sum": {label: r["objective_sum"] for label, r in res.items()},
    }
    if len(labels) > 1:
        fig["objective_ratio_faiss_over_torch"] = res[labels[1]]["objective_sum"] / first["objective_sum"]
    fig["bars"] = {"torch K-means under 10 s": first["seconds"] < 10.0}
    return fig


# ----------------------------------------------------------------------------- with Ray actors
def part_extract_ray(ctx: Ctx) -> dict:
    """extract_teacher with Ray actors on the device (one per GPU), its own smaller store,
    bare inference before and after."""
    ray_start = ctx.ray_up()
    n = ctx.sizes.ray_samples
    fig = bracketed_extraction(ctx, n, str(ctx.work / "store-ray.zarr"), executor="ray")
    fig.pop("checkpoint")
    fig["ray_start_s"] = ray_start
    fig["bar_extract_over_bare"] = 0.95
    return fig

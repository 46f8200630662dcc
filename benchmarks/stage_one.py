"""Stage one at CIFAR-100 shape: every view, then cluster at the reference's K (full-views issue).

    python benchmarks/stage_one.py [--n 10000] [--executor inline] [--out bench-out/stage_one.json]

Synthetic 32x32 images (``synthetic:n=N,classes=100,size=32``), a resnet8 teacher with random
weights and BatchNorm statistics calibrated on the data (so its activations have a trained
network's scale), ``extract-teacher`` with every one of the 162 CIFAR views (the default
store: logits and CAMs pooled to 2x2 for every view, identity-view features), then
``cluster`` at K_penult 4096, K_inter 8 (fit on every identity-view vector; assignment pass
over every view). Reported: wall time of each pass (extraction; the cluster fit; the
assignment pass), peak resident memory of the process, the size (raw and stored) of every
array, and a projection to 50,000 images and a resnet32x4 teacher: array sizes from the
per-sample sizes and resnet32x4's shapes (exact: the stored dtypes times the shapes), times
from the per-image teacher cost in multiply-accumulates (an estimate: same hardware, same
efficiency).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import calibrated_teacher, machine, macs_per_image, peak_rss_bytes, write_json  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--arch", default="resnet8")
    p.add_argument("--views", default="auto")
    p.add_argument("--k-penult", type=int, default=4096)
    p.add_argument("--k-inter", type=int, default=8)
    p.add_argument("--executor", default="inline", choices=["inline", "ray"])
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--workdir", default="bench-out/stage_one")
    p.add_argument("--keep", action="store_true", help="keep the store afterwards")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="continue an interrupted run in --workdir: keep its complete store (and the extraction "
        "time it recorded) and resume the cluster stage's assignment pass (implies --keep)",
    )
    p.add_argument(
        "--assign-budget",
        type=float,
        default=None,
        help="stop the assignment pass after this many seconds and record its measured rate and the projected "
        "time of the whole pass (the pass is resumable: a later --reuse run finishes it)",
    )
    p.add_argument("--out", default="bench-out/stage_one.json")
    return p.parse_args(argv)


def projection(info: list, n: int, views: int, macs: dict, seconds: dict, target_n: int = 50_000) -> dict:
    """Array sizes for ``target_n`` images and resnet32x4's shapes; times scaled by teacher cost."""
    from kdpipe.models import build

    big = build("resnet32x4", num_classes=100).eval()
    with torch.no_grad():
        _, feats = big.forward_features(torch.zeros(1, 3, 32, 32))
    penult, inter = feats["penult"].shape[1:], feats["inter"].shape[1:]
    sizes = {}
    for a in info:
        shape = list(a["shape"])
        name = a["name"]
        if shape and shape[0] == n:
            shape[0] = target_n
        if name.startswith("feat/penult"):
            shape[2:] = list(penult)
        elif name.startswith("feat/inter"):
            shape[2:] = list(inter)
        elif name.endswith("penult_centers"):
            shape[1] = int(penult[0])
        elif name.endswith(("lda_scalings",)):
            shape = [int(inter[0])] * 2
        elif name.endswith("lda_xbar"):
            shape = [int(inter[0])]
        count = 1
        for s in shape:
            count *= int(s)
        itemsize = a["bytes"] // max(1, _count(a["shape"]))
        sizes[name] = {
            "shape": shape,
            "raw_bytes": int(count * itemsize),
            "stored_bytes_at_measured_ratio": int(count * itemsize / a["ratio"]) if a["ratio"] else None,
        }
    scale_images = target_n / n
    scale_teacher = macs["resnet32x4"] / macs["measured"]
    return {
        "target_samples": target_n,
        "views": views,
        "teacher": "resnet32x4",
        "arrays": sizes,
        "raw_total_bytes": sum(s["raw_bytes"] for s in sizes.values()),
        "teacher_macs_ratio": scale_teacher,
        "seconds_estimate_same_hardware": {
            "extract": seconds["extract"] * scale_images * scale_teacher,
            "assignment_pass_teacher_part": seconds["assign"] * scale_images * scale_teacher,
            "note": "the assignment pass also computes the top-k over K_penult centres per location; that part "
            "scales with images x locations x K x D (D 64 -> 256: x4), not with the teacher's cost",
        },
    }


def _count(shape) -> int:
    c = 1
    for s in shape:
        c *= int(s)
    return c


def _cluster_child(cfg) -> None:
    from kdpipe.stages.cluster import cluster

    cluster(cfg, progress=True, verbose=True)


def budgeted_cluster(cfg, store: str, budget: float) -> dict:
    """Run ``cluster`` in a child process; once its fit is recorded, let the assignment pass
    run ``budget`` seconds, stop it, and measure: the fit's own seconds (from the target set's
    record), the pass's shards done, its rate over the budget and the projected whole pass."""
    import multiprocessing as mp

    from kdpipe.artifacts import open_store

    child = mp.get_context("spawn").Process(target=_cluster_child, args=(cfg,))
    t0 = time.perf_counter()
    child.start()
    fit, t_fit = None, None
    while child.is_alive():
        time.sleep(5)
        reader = open_store(store, allow_incomplete=True)
        if "default" not in reader.target_sets(include_incomplete=True):
            continue
        record = reader.target_set("default", include_incomplete=True)
        if fit is None and (record.extra or {}).get("fit_done"):
            fit, t_fit = record.extra.get("seconds", {}), time.perf_counter()
            done_at_start = int(np.asarray(reader.array(record.array("shards_done"))[:]).sum())
        if t_fit is not None and time.perf_counter() - t_fit >= budget:
            break
    elapsed = time.perf_counter() - (t_fit or t0)
    child.terminate()
    child.join()
    reader = open_store(store, allow_incomplete=True)
    if fit is None:
        return {"fit_seconds": None, "wall_seconds": time.perf_counter() - t0, "note": "the fit did not finish"}
    record = reader.target_set("default", include_incomplete=True)
    done = np.asarray(reader.array(record.array("shards_done"))[:])
    shard_size = reader.manifest.shard_size
    shards_now = int(done.sum()) - done_at_start
    images = shards_now * shard_size * reader.num_views
    total = reader.num_samples * reader.num_views
    rate = images / elapsed if elapsed > 0 else float("nan")
    return {
        "fit_seconds": fit,
        "kmeans_objective_penult": record.kmeans_objective_penult,
        "topk": record.topk,
        "assign": {
            "budget_seconds": budget,
            "elapsed_seconds": elapsed,
            "shards_done": int(done.sum()),
            "shards_total": int(done.size),
            "images_in_budget": images,
            "img_per_s": rate,
            "projected_seconds_whole_pass": total / rate if rate > 0 else None,
        },
        "images": total,
        "peak_rss_bytes_driver": peak_rss_bytes(),
    }


def main(argv=None):
    args = parse_args(argv)
    from kdpipe.artifacts import open_store
    from kdpipe.config.configs import ClusterConfig, ExtractConfig
    from kdpipe.data import load_dataset
    from kdpipe.models import build
    from kdpipe.stages.cluster import cluster
    from kdpipe.stages.extract import extract_teacher

    work = Path(args.workdir)
    data = f"synthetic:n={args.n},classes=100,size=32,seed=0"
    store, ckpt, record = work / "store.zarr", work / "teacher.pth", work / "extract_record.json"
    reused = args.reuse and record.exists()
    if reused:
        extracted = json.loads(record.read_text())
    else:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        dataset = load_dataset(data, "train")
        torch.manual_seed(0)
        torch.save({"model": calibrated_teacher(build(args.arch, 100), dataset).state_dict()}, ckpt)
        t0 = time.perf_counter()
        ex = extract_teacher(
            ExtractConfig(
                teacher=str(ckpt),
                arch=args.arch,
                data=data,
                out=str(store),
                views=args.views,
                cam_res=(2,),
                batch_size=args.batch_size,
                executor=args.executor,
            ),
            progress=True,
            verbose=True,
        )
        extracted = {
            "seconds": time.perf_counter() - t0,
            "img_per_s": ex["img_per_s"],
            "peak_rss_bytes": peak_rss_bytes(),
        }
        record.write_text(json.dumps(extracted))
    t_extract, mem_extract = extracted["seconds"], extracted["peak_rss_bytes"]
    reader = open_store(str(store))
    finished = "default" in reader.target_sets()  # a finished cluster stage is measured again
    resume = reused and not finished and "default" in reader.target_sets(include_incomplete=True)
    cluster_cfg = ClusterConfig(
        store=str(store),
        k_penult=args.k_penult,
        k_inter=args.k_inter,
        resume=resume,
        overwrite=reused and finished,
        batch_size=args.batch_size,
        executor=args.executor,
    )
    if args.assign_budget is not None:
        partial = budgeted_cluster(cluster_cfg, str(store), args.assign_budget)
        result = {
            "benchmark": "stage_one",
            "partial": True,
            "machine": machine(),
            "data": data,
            "teacher": args.arch,
            "samples": args.n,
            "k_penult": args.k_penult,
            "k_inter": args.k_inter,
            "executor": args.executor,
            "extract": extracted,
            **partial,
        }
        print(f"[stage_one] partial: wrote {write_json(args.out, result, argv, 'stage_one.py')}")
        return
    cl = cluster(cluster_cfg, progress=True, verbose=True)
    mem_cluster = peak_rss_bytes()
    reader = open_store(str(store))
    info = reader.array_info()
    seconds = {
        "extract": t_extract,
        "fit_read": cl["seconds"].get("fit_read"),
        "fit": cl["seconds"].get("fit"),
        "assign": cl["seconds"]["assign"],
        "cluster_total": cl["seconds"]["total"],
    }
    macs = {"measured": macs_per_image(build(args.arch, 100)), "resnet32x4": macs_per_image(build("resnet32x4", 100))}
    result = {
        "benchmark": "stage_one",
        "machine": machine(),
        "data": data,
        "teacher": args.arch,
        "samples": args.n,
        "views": reader.num_views,
        "images": args.n * reader.num_views,
        "k_penult": args.k_penult,
        "k_inter": args.k_inter,
        "executor": args.executor,
        "seconds": seconds,
        "img_per_s": {"extract": extracted["img_per_s"], "assign": cl["assign"]["img_per_s"]},
        "resumed": {"extraction_reused": reused, "assignment_resumed": resume},
        "peak_rss_bytes": {"after_extract": mem_extract, "after_cluster": mem_cluster},
        "arrays": [{k: (list(v) if isinstance(v, tuple) else v) for k, v in a.items()} for a in info],
        "raw_total_bytes": sum(a["bytes"] for a in info),
        "stored_total_bytes": sum(a["stored_bytes"] for a in info),
        "target_set": reader.target_set("default").to_json(),
        "teacher_macs_per_image": macs,
    }
    result["projection_50k_resnet32x4"] = projection(info, args.n, reader.num_views, macs, seconds)
    path = write_json(args.out, result, argv, "stage_one.py")
    print(
        f"[stage_one] extract {t_extract:.0f} s, fit {seconds['fit_read'] + seconds['fit']:.0f} s, assignment pass "
        f"{seconds['assign']:.0f} s; stored {result['stored_total_bytes'] / 2**30:.2f} GiB; wrote {path}"
    )
    if not (args.keep or args.reuse):
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])

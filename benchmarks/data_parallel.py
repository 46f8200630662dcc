"""Images/s of a student trained by 1 and by 2 data-parallel workers on the CPU (Ray Train,
gloo), same global batch, and the ratio 2 workers / 1 worker (issue 12).

    python benchmarks/data_parallel.py [--epochs 6] [--rounds 3] [--out bench-out/data_parallel.json]

The store is made with the real stages, as the test suite's tiny store is: synthetic data
(``synthetic:n=512,classes=10,size=32``), a resnet8 teacher with random weights and BN
statistics calibrated on the data (timing does not depend on the weights), ``extract_teacher``
(inline executor, ``--views`` stored views, CAMs pooled to 2x2). Every run is
``kdpipe.stages.train.train_student`` with cached CAT-KD, ``StudentConfig(data_parallel=N)``:
N = 1 trains in this process, N = 2 starts a loopback-only local Ray
(``kdpipe.distributed.executor``) and two Ray Train workers on gloo, each taking half of every
batch (``kdpipe.distributed.data_parallel``).

Runs are interleaved (1, 2, 1, 2, ...) so a load change on the machine touches both alike.
Throughput per run: the median of the epochs' global images/s (the metrics rows count every
worker's images over rank 0's epoch time), the first epoch left out (warm-up: allocator, gloo's first
all-reduces); the wall time of the whole run (for N = 2 it includes starting Ray and the
workers) is reported beside it. Threads: each Ray worker gets cpus // N torch threads; the
1-worker run uses ``--threads`` (default: the same per-worker count, so the ratio is that of
adding a second worker, not of changing threads).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import calibrated_teacher, machine, write_json

DATA = "synthetic:n=512,classes=10,size=32"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=DATA)
    p.add_argument("--student", default="resnet8")
    p.add_argument("--method", default="cat_kd", help="a cached method: cat_kd or kd")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="data-parallel worker counts")
    p.add_argument("--epochs", type=int, default=6, help="epochs per run (the first is warm-up)")
    p.add_argument("--rounds", type=int, default=3, help="runs per worker count, interleaved")
    p.add_argument("--batch-size", type=int, default=64, help="global batch (split over the workers)")
    p.add_argument("--views", default="8", help="stored views per image")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the 1-worker run")
    p.add_argument("--workdir", default=None, help="store and runs (default: a temporary folder)")
    p.add_argument("--out", default="bench-out/data_parallel.json")
    return p.parse_args(argv)


def make_store(workdir: Path, data: str, views: str) -> tuple[str, float]:
    """A resnet8 teacher (random weights, calibrated BN) and its store, made by extract_teacher."""
    from kdpipe.config.configs import ExtractConfig
    from kdpipe.data import load_dataset
    from kdpipe.models import build
    from kdpipe.stages.extract import extract_teacher

    t0 = time.perf_counter()
    train = load_dataset(data, "train")
    torch.manual_seed(0)
    ckpt = workdir / "teacher_resnet8_random.pth"
    torch.save({"model": calibrated_teacher(build("resnet8", train.num_classes), train).state_dict()}, ckpt)
    store = workdir / "store.zarr"
    extract_teacher(
        ExtractConfig(
            teacher=str(ckpt),
            arch="resnet8",
            data=data,
            out=str(store),
            views=views,
            cam_res=(2,),
            executor="inline",
            overwrite=True,
        ),
        progress=False,
        verbose=False,
    )
    return str(store), time.perf_counter() - t0


def epoch_rows(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.csv"), newline="") as fh:
        return list(csv.DictReader(fh))


def one_run(args, store: str, workers: int, out: Path) -> dict:
    """One train_student run with ``workers`` data-parallel workers; its img/s and times."""
    from kdpipe.config.configs import StudentConfig
    from kdpipe.stages.train import train_student

    cfg = StudentConfig(
        store=store,
        student=args.student,
        method=args.method,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=0,
        data_parallel=workers,
    )
    t0 = time.perf_counter()
    summary = train_student(cfg, out=out, device="cpu", progress=False, plot=False)
    wall = time.perf_counter() - t0
    rows = epoch_rows(summary["run_dir"])
    # the row's img/s is global: rank 0 counts every worker's images (kdpipe.engine.loop)
    per_epoch = [float(r["img_per_s"]) for r in rows]
    steady = per_epoch[1:] or per_epoch
    return {
        "workers": workers,
        "img_per_s_per_epoch": per_epoch,
        "img_per_s": statistics.median(steady),
        "epoch_seconds": [float(r["epoch_seconds"]) for r in rows],
        "train_seconds": summary["train_seconds"],
        "wall_seconds": wall,
        "final_top1": summary["final_top1"],
        "loadavg_after": list(os.getloadavg()),
    }


def measure(args, store: str, workdir: Path) -> list[dict]:
    runs = []
    for r in range(args.rounds):
        for n in args.workers:  # interleaved: 1, 2, 1, 2, ...
            run = one_run(args, store, n, workdir / f"runs-{n}w-{r}")
            print(f"round {r} workers {n}: {run['img_per_s']:.0f} img/s, wall {run['wall_seconds']:.1f} s", flush=True)
            runs.append(dict(run, round=r))
    return runs


def summarise(args, runs: list[dict]) -> dict:
    by_n = {}
    for n in args.workers:
        mine = [r for r in runs if r["workers"] == n]
        by_n[str(n)] = {
            "img_per_s_median": statistics.median(r["img_per_s"] for r in mine),
            "img_per_s_runs": [r["img_per_s"] for r in mine],
            "wall_seconds_runs": [r["wall_seconds"] for r in mine],
            "train_seconds_runs": [r["train_seconds"] for r in mine],
        }
    first = by_n[str(args.workers[0])]
    for v in by_n.values():
        v["ratio_to_first"] = v["img_per_s_median"] / first["img_per_s_median"]
        v["wall_ratio_to_first"] = statistics.median(v["wall_seconds_runs"]) / statistics.median(
            first["wall_seconds_runs"]
        )
    return by_n


def main(argv=None) -> dict:
    args = parse_args(argv)
    cpus = os.cpu_count() or 1
    # the per-worker threads the 2-worker run gets (kdpipe.distributed.data_parallel._cpus_per_worker)
    torch.set_num_threads(args.threads or max(1, cpus // max(args.workers)))
    with tempfile.TemporaryDirectory(prefix="kdpipe-dp-bench-") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        store, store_seconds = make_store(workdir, args.data, args.views)
        load_before = list(os.getloadavg())
        runs = measure(args, store, workdir)
    by_n = summarise(args, runs)
    result = {
        "what": f"train_student img/s, cached {args.method}, data_parallel N (Ray Train, CPU, gloo)",
        "data": args.data,
        "student": args.student,
        "method": args.method,
        "views": args.views,
        "global_batch": args.batch_size,
        "epochs_per_run": args.epochs,
        "rounds": args.rounds,
        "threads_one_worker": torch.get_num_threads(),
        "threads_per_ray_worker": {str(n): max(1, cpus // n) for n in args.workers if n > 1},
        "store_seconds": store_seconds,
        "workers": by_n,
        "ratio_2_over_1": by_n["2"]["ratio_to_first"] if "2" in by_n and args.workers[0] == 1 else None,
        "runs": runs,
        "loadavg_before_runs": load_before,
        "machine": machine(),
        "note": (
            "img/s excludes each run's first epoch; wall time includes starting Ray and its workers "
            "for N > 1. The machine's 2 cores were shared with other jobs (load averages recorded)."
        ),
    }
    path = write_json(args.out, result, argv, "data_parallel.py")
    print(f"ratio 2/1 workers: {result['ratio_2_over_1']}; wrote {path}")
    return result


if __name__ == "__main__":
    main()

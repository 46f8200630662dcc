"""K-means backends on the same data: faiss-cpu against K-means in torch (and faiss-gpu /
torch on CUDA where there is a GPU).

Every backend fits the same float32 data (seeded Gaussian blobs) with the same K, the same
number of iterations and the same initial centres (``initial_centers(x, K, seed)``: faiss's
rule, a seeded sample of K vectors; faiss's own generator would draw another sample, and a
different start is a different local minimum, which would blur the comparison); runs are
interleaved (the backend order rotates each repeat) so a machine whose load changes during
the run affects every backend alike. Reported per backend and K: wall time of the fit (median
over repeats) and the final objective, the sum of
squared distances of every vector to its nearest final centre, computed by one function
(``kdpipe.methods.letkd.fit.clustering.kmeans_objective``) for all backends. Ratios are against
faiss-cpu measured in the same run.

    OMP_NUM_THREADS=2 python benchmarks/kmeans.py --n 100000 --d 64 --ks 256,1024
    python benchmarks/kmeans.py --n 3200000 --d 256 --ks 4096 --repeats 2   # letKD's CIFAR-100 shape, GPU
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_json  # noqa: E402

from kdpipe.methods.letkd.fit.clustering import (  # noqa: E402
    faiss_gpu_available,
    faiss_installed,
    initial_centers,
    kmeans,
    kmeans_objective,
)

# backend label -> (kdpipe backend, device)
BACKENDS = {
    "faiss-cpu": ("faiss", "cpu"),
    "torch-cpu": ("torch", "cpu"),
    "faiss-gpu": ("faiss", "cuda"),
    "torch-cuda": ("torch", "cuda"),
}


def make_data(n: int, d: int, k: int, seed: int) -> np.ndarray:
    """n vectors around 4k Gaussian blobs (as benchmarks/cluster.py): clustered, not separable."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(4 * k, d)).astype(np.float32) * 3
    return (means[rng.integers(0, 4 * k, n)] + rng.normal(size=(n, d))).astype(np.float32)


def available_backends(requested: str | None) -> list[str]:
    """The backends to time: those asked for, else every one this machine can run."""
    if requested:
        return [b.strip() for b in requested.split(",") if b.strip()]
    names = ["faiss-cpu"] if faiss_installed() else []
    names.append("torch-cpu")
    if faiss_gpu_available():
        names.append("faiss-gpu")
    if torch.cuda.is_available():
        names.append("torch-cuda")
    return names


def fit(x: np.ndarray, k: int, niter: int, seed: int, label: str) -> dict:
    """One timed fit from the shared start; the objective is evaluated after the clock stops,
    the same way for all."""
    backend, device = BACKENDS[label]
    init = initial_centers(x, k, seed)
    t = time.perf_counter()
    res = kmeans(
        x,
        k,
        niter=niter,
        seed=seed,
        backend=backend,
        device=device,
        init=init,
        gpu=(device == "cuda") if backend == "faiss" else None,
    )
    seconds = time.perf_counter() - t
    eval_device = "cuda" if torch.cuda.is_available() else "cpu"
    total = kmeans_objective(x, res.centers, device=eval_device) * x.shape[0]
    return {
        "seconds": seconds,
        "objective_sum": total,
        "last_iteration_objective_sum": res.objective * res.num_fit,
        "used": res.backend,
    }


def bench_k(x: np.ndarray, k: int, niter: int, seed: int, repeats: int, labels: list[str]) -> dict:
    runs: dict[str, list[dict]] = {b: [] for b in labels}
    for r in range(repeats):
        order = labels[r % len(labels) :] + labels[: r % len(labels)]  # rotate: interleaved
        for label in order:
            runs[label].append(fit(x, k, niter, seed, label))
            print(
                f"  K={k} repeat {r} {label}: {runs[label][-1]['seconds']:.2f} s, "
                f"objective {runs[label][-1]['objective_sum']:.6g}",
                flush=True,
            )
    summary = {
        b: {
            "median_seconds": statistics.median(e["seconds"] for e in v),
            "objective_sum": v[0]["objective_sum"],
            "runs": v,
        }
        for b, v in runs.items()
    }
    ref = summary.get("faiss-cpu")
    if ref is not None:
        for s in summary.values():
            s["time_ratio_over_faiss_cpu"] = s["median_seconds"] / ref["median_seconds"]
            s["objective_ratio_over_faiss_cpu"] = s["objective_sum"] / ref["objective_sum"]
    return {"k": k, "backends": summary}


def warm_up(labels: list[str]) -> None:
    """One small untimed fit per backend: CUDA contexts and faiss's GPU resources start here."""
    x = make_data(2048, 8, 16, 0)
    for label in labels:
        fit(x, 16, 2, 0, label)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--ks", default="256,1024", help="comma-separated K values")
    ap.add_argument("--niter", type=int, default=20, help="iterations (letKD's run_kmeans: 20)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backends", default=None, help="comma-separated subset of " + ", ".join(BACKENDS))
    ap.add_argument("--out", default="docs/results/kmeans.json")
    a = ap.parse_args(argv)
    threads = int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
    torch.set_num_threads(threads)
    if faiss_installed():
        import faiss

        faiss.omp_set_num_threads(threads)
    labels = available_backends(a.backends)
    warm_up(labels)
    x = make_data(a.n, a.d, max(int(k) for k in a.ks.split(",")), a.seed)
    print(f"K-means on {a.n:,} x {a.d}, {a.niter} iterations, seed {a.seed}, {threads} CPU threads: {labels}")
    t0 = time.perf_counter()
    results = [bench_k(x, int(k), a.niter, a.seed, a.repeats, labels) for k in a.ks.split(",")]
    for res in results:
        for b, s in res["backends"].items():
            print(
                f"K={res['k']:>5} {b:>10}: {s['median_seconds']:8.2f} s  objective {s['objective_sum']:.6g}"
                f"  time/faiss-cpu {s.get('time_ratio_over_faiss_cpu', float('nan')):.3f}"
                f"  objective/faiss-cpu {s.get('objective_ratio_over_faiss_cpu', float('nan')):.4f}"
            )
    mach = machine()
    mach["threads"] = threads
    if faiss_installed():
        import faiss

        mach["faiss"] = faiss.__version__
    out = {
        "benchmark": "kmeans",
        "n": a.n,
        "d": a.d,
        "niter": a.niter,
        "seed": a.seed,
        "repeats": a.repeats,
        "data": "4*max(K) seeded Gaussian blobs (scale 3) plus unit noise",
        "backends": labels,
        "init": "shared by every backend: kdpipe.methods.letkd.fit.clustering.initial_centers(x, K, seed)",
        "results": results,
        "machine": mach,
        "total_seconds": time.perf_counter() - t0,
    }
    print(f"wrote {write_json(a.out, out, argv, 'kmeans.py')}")
    return out


if __name__ == "__main__":
    main()

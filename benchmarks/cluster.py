"""Benchmark of the `kdpipe cluster` building blocks; JSON to --out (bench-out/cluster.json).

1. K-means: faiss (kdpipe.methods.letkd.fit.clustering.kmeans) vs scikit-learn KMeans on the same data,
   same K, same number of iterations (sklearn: n_init=1, init="random" like faiss, tol=0 so it
   runs every iteration), same thread count. Time and objective (mean squared distance of every
   vector to its nearest centre, computed the same way for both).
   Bar: faiss no slower than sklearn at equal or lower objective (1% slack on the objective:
   both are 20 Lloyd iterations from different random starts).
2. Top-k assignment throughput over 4096 centres (kdpipe.methods.letkd.fit.clustering.TopkAssigner:
   search="faiss" (separate faiss search + exact logsumexp over all K) and search="torch" (the
   CPU default: top-k on the same distance row)), vectors/s; letkd.penult_topk_targets (torch,
   full softmax) on the same data for comparison.
3. Streaming LDA (kdpipe.methods.letkd.fit.lda.LDAStats) over N growing 8x, data generated chunk by chunk
   (never all in memory): time and peak traced memory (tracemalloc). Bar: peak flat within 20%.
4. The whole stage on digits features (issue 4's bar): extract-teacher with a freshly
   initialised resnet8 teacher, --stage-views views (default 8), inline, then cluster the store
   inline with each --stage-k K_penult (k_inter 8, topk 16, default fit size). Both timed in
   the same run with the same threads (``--threads``; use ``--stage-threads 0`` to keep the
   library defaults for this part). Bar: cluster takes less time than the extraction that
   made the features. The JSON records extract and cluster seconds, their ratio, the phases
   and the command.

    python benchmarks/cluster.py [--out bench-out/cluster.json] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import tracemalloc

import numpy as np


def _objective(x, centers):
    from kdpipe.methods.letkd.fit.clustering import kmeans_objective

    return kmeans_objective(x, centers)


def bench_kmeans(n, d, k, niter, seed, repeats):
    import faiss  # noqa: F401
    from sklearn.cluster import KMeans

    from kdpipe.methods.letkd.fit.clustering import kmeans

    rng = np.random.default_rng(seed)
    # clustered data: 4k blobs in d dims
    blobs = rng.normal(size=(4 * k, d)).astype(np.float32) * 3
    x = (blobs[rng.integers(0, 4 * k, n)] + rng.normal(size=(n, d))).astype(np.float32)
    out = {"n": n, "d": d, "k": k, "niter": niter, "repeats": repeats, "faiss": [], "sklearn": []}
    for r in range(repeats):
        t = time.perf_counter()
        res = kmeans(x, k, niter=niter, seed=seed + r, backend="faiss")
        out["faiss"].append({"seconds": time.perf_counter() - t, "objective": _objective(x, res.centers)})
        t = time.perf_counter()
        km = KMeans(
            n_clusters=k, n_init=1, init="random", max_iter=niter, tol=0.0, random_state=seed + r, algorithm="lloyd"
        ).fit(x)
        out["sklearn"].append(
            {
                "seconds": time.perf_counter() - t,
                "objective": _objective(x, km.cluster_centers_.astype(np.float32)),
                "iterations": int(km.n_iter_),
            }
        )
    f_t = float(np.median([e["seconds"] for e in out["faiss"]]))
    s_t = float(np.median([e["seconds"] for e in out["sklearn"]]))
    f_o = float(np.mean([e["objective"] for e in out["faiss"]]))
    s_o = float(np.mean([e["objective"] for e in out["sklearn"]]))
    out.update(
        faiss_seconds=f_t,
        sklearn_seconds=s_t,
        speedup_faiss_over_sklearn=s_t / f_t,
        faiss_objective=f_o,
        sklearn_objective=s_o,
        objective_ratio_faiss_over_sklearn=f_o / s_o,
        bar_met=bool(f_t <= s_t and f_o <= s_o * 1.01),
    )
    return out


def bench_topk(n, d, k_centers, topk, seed):
    import torch

    from kdpipe.methods.letkd import penult_topk_targets
    from kdpipe.methods.letkd.fit.clustering import TopkAssigner

    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k_centers, d)).astype(np.float32)
    x = rng.normal(size=(n, d)).astype(np.float32)
    assigner = TopkAssigner(centers, topk, 1.0, search="faiss")
    assigner(x[:256])  # warm-up
    t = time.perf_counter()
    idx, val = assigner(x)
    t_kd = time.perf_counter() - t
    t = time.perf_counter()
    TopkAssigner(centers, topk, 1.0, search="torch")(x)
    t_tsearch = time.perf_counter() - t
    feat = torch.from_numpy(x.T.reshape(1, d, 1, n).copy())
    t = time.perf_counter()
    ti, tv = penult_topk_targets(feat, torch.from_numpy(centers), 1.0, topk)
    t_torch = time.perf_counter() - t
    agree = float((ti.reshape(n, topk).numpy() == idx).mean())
    return {
        "n": n,
        "d": d,
        "centers": k_centers,
        "topk": topk,
        "gpu": assigner.gpu,
        "seconds": t_kd,
        "vectors_per_s": n / t_kd,
        "torch_search_vectors_per_s": n / t_tsearch,
        "torch_full_softmax_seconds": t_torch,
        "torch_full_softmax_vectors_per_s": n / t_torch,
        "index_agreement_with_torch": agree,
        "max_abs_prob_diff_vs_torch": float(np.abs(tv.reshape(n, topk).numpy() - val).max()),
        "retained_mass_mean": float(val.sum(1).mean()),
    }


def bench_lda(sizes, d, c, chunk, seed):
    from kdpipe.methods.letkd.fit.lda import LDAStats

    means = np.random.default_rng(seed).normal(size=(c, d)) * 2
    rows = []
    for n in sizes:
        rng = np.random.default_rng(seed + 1)
        tracemalloc.start()
        t = time.perf_counter()
        stats = LDAStats(c, d)
        for s in range(0, n, chunk):
            m = min(chunk, n - s)
            y = rng.integers(0, c, m)
            x = (rng.normal(size=(m, d)) + means[y]).astype(np.float32)  # like float16->float32 features
            stats.update(x, y)
            del x, y
        res = stats.fit()
        secs = time.perf_counter() - t
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        rows.append(
            {
                "n": n,
                "seconds": secs,
                "peak_bytes": int(peak),
                "vectors_per_s": n / secs,
                "components": int(res.max_components),
            }
        )
    peaks = [r["peak_bytes"] for r in rows]
    return {
        "d": d,
        "classes": c,
        "chunk": chunk,
        "runs": rows,
        "growth": sizes[-1] / sizes[0],
        "peak_ratio_max_over_min": max(peaks) / min(peaks),
        "bar_met": bool(max(peaks) <= 1.2 * min(peaks)),
    }


def bench_stage(k_penults, seed, views="auto"):
    """Whole stage on digits: extract-teacher (resnet8, random weights: the timing does not
    depend on them; every view by default) then cluster with each K_penult (the fit on the
    identity-view features, then the assignment pass over every view); both inline."""
    import tempfile

    import torch

    from kdpipe.config.configs import ClusterConfig, ExtractConfig
    from kdpipe.models import build
    from kdpipe.stages.cluster import cluster as run_cluster
    from kdpipe.stages.extract import extract_teacher as run_extract

    def extract_teacher(ckpt, arch, data, out, **kw):
        return run_extract(
            ExtractConfig(teacher=ckpt, arch=arch, data=data, out=out, **kw), progress=False, verbose=False
        )

    def cluster(store, verbose=False, **kw):
        return run_cluster(ClusterConfig(store=store, **kw), progress=False, verbose=verbose)

    out = {"data": "digits", "teacher": "resnet8", "views": str(views), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(seed)
        torch.save({"model": build("resnet8", num_classes=10).state_dict()}, f"{tmp}/t.pth")
        t = time.perf_counter()
        s = extract_teacher(
            f"{tmp}/t.pth",
            "resnet8",
            "digits",
            f"{tmp}/d.zarr",
            views=str(views),
            cam_res=(2,),
            executor="inline",
            device="cpu",
        )
        out["extract_seconds"] = time.perf_counter() - t
        out["samples"] = int(s.get("samples", 0) or 0) if isinstance(s, dict) else None
        for k in k_penults:
            t = time.perf_counter()
            summ = cluster(f"{tmp}/d.zarr", name=f"k{k}", k_penult=k, executor="inline", verbose=False, seed=seed)
            secs = time.perf_counter() - t
            out["runs"].append(
                {
                    "k_penult": k,
                    "k_inter": 8,
                    "topk": 16,
                    "seconds": secs,
                    "extract_seconds": out["extract_seconds"],
                    "vectors": summ["fit_points_penult"],
                    "phases": summ["seconds"],
                    "kmeans_fit_points": int(summ.get("fit_points_penult") or 0) or None,
                    "ratio_cluster_over_extract": secs / out["extract_seconds"],
                    "bar_met": bool(secs < out["extract_seconds"]),
                }
            )
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench-out/cluster.json")
    ap.add_argument("--threads", type=int, default=1, help="BLAS/OpenMP threads for every method.")
    ap.add_argument("--kmeans-n", type=int, default=50000)
    ap.add_argument("--kmeans-d", type=int, default=64)
    ap.add_argument("--kmeans-k", type=int, default=256)
    ap.add_argument("--niter", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--topk-n", type=int, default=16384)
    ap.add_argument("--topk-d", type=int, default=256)
    ap.add_argument("--lda-n", type=int, default=50000, help="smallest N; runs N, 2N, 4N, 8N")
    ap.add_argument("--lda-d", type=int, default=64)
    ap.add_argument(
        "--stage-k", default="4096,256", help="K_penult values for the whole-stage timing on digits ('' to skip)"
    )
    ap.add_argument("--stage-views", default="8", help="views per sample of the digits store")
    ap.add_argument(
        "--stage-threads",
        type=int,
        default=0,
        help="threads for the whole-stage part (0, default: the library defaults, as "
        "`kdpipe extract-teacher` and `kdpipe cluster` run)",
    )
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)

    import faiss
    import torch
    from threadpoolctl import threadpool_limits

    faiss.omp_set_num_threads(a.threads)
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    with threadpool_limits(a.threads):
        km = bench_kmeans(a.kmeans_n, a.kmeans_d, a.kmeans_k, a.niter, a.seed, a.repeats)
        print(
            f"kmeans  n={km['n']} d={km['d']} K={km['k']} {km['niter']} it: faiss {km['faiss_seconds']:.2f} s "
            f"obj {km['faiss_objective']:.4f} | sklearn {km['sklearn_seconds']:.2f} s obj {km['sklearn_objective']:.4f}"
            f" -> faiss x{km['speedup_faiss_over_sklearn']:.2f}, bar {'met' if km['bar_met'] else 'NOT met'}"
        )
        tk = bench_topk(a.topk_n, a.topk_d, 4096, 16, a.seed)
        print(
            f"top-16 over 4096 centres, d={tk['d']}: {tk['vectors_per_s']:.0f} vectors/s "
            f"(search='torch' {tk['torch_search_vectors_per_s']:.0f}/s; "
            f"letkd full softmax {tk['torch_full_softmax_vectors_per_s']:.0f}/s; "
            f"agreement {tk['index_agreement_with_torch']:.4f})"
        )
        sizes = [a.lda_n * m for m in (1, 2, 4, 8)]
        ld = bench_lda(sizes, a.lda_d, 10, 4096, a.seed)
        for r in ld["runs"]:
            print(f"LDA n={r['n']:>8}: {r['seconds']:.2f} s, peak {r['peak_bytes'] / 2**20:.2f} MiB")
        print(
            f"LDA peak max/min over 8x N: {ld['peak_ratio_max_over_min']:.3f}, "
            f"bar {'met' if ld['bar_met'] else 'NOT met'}"
        )
    st = None
    ks = [int(k) for k in a.stage_k.split(",") if k.strip()]
    if ks:
        sth = a.stage_threads
        faiss.omp_set_num_threads(sth or os.cpu_count())
        torch.set_num_threads(sth or os.cpu_count())
        with threadpool_limits(sth or None):
            st = bench_stage(ks, a.seed, a.stage_views)
        st["threads"] = sth or "library defaults"
        print(
            f"digits extract (resnet8, {st['views']} views, {st.get('samples')} samples): {st['extract_seconds']:.2f} s"
        )
        for r in st["runs"]:
            print(
                f"  cluster K_penult={r['k_penult']}: {r['seconds']:.2f} s "
                f"(x{r['ratio_cluster_over_extract']:.2f} of extract; bar {'met' if r['bar_met'] else 'NOT met'}); "
                f"phases " + ", ".join(f"{k} {v:.1f}" for k, v in r["phases"].items())
            )
    out = {
        "benchmark": "cluster",
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "threads": a.threads,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "faiss": faiss.__version__,
            "torch": torch.__version__,
        },
        "kmeans": km,
        "topk": tk,
        "lda": ld,
        "stage_digits": st,
        "total_seconds": time.perf_counter() - t0,
    }
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {a.out} ({out['total_seconds']:.1f} s)")
    return out


if __name__ == "__main__":
    main()

"""Sweeps: a grid of student runs that all read the same store, as parallel Ray trials.

    kdpipe train-student --store S --student resnet8 --method cat_kd \\
        --sweep beta=10,50,100 --sweep seed=0,1

``parse_sweep(["beta=10,50,100", "seed=0,1"])`` -> {"beta": [10, 50, 100], "seed": [0, 1]};
``expand_grid`` gives the 6 trials; ``run_sweep`` runs them (Ray tasks with one CPU each, or
one GPU each on CUDA; ``executor="inline"`` runs them one after another in this process) and
writes, in ``<out>/sweep-<student>-<method>-<timestamp>/``:

- ``config.json``: the base arguments and the grid;
- one run directory per trial (``trial-<n>-<key>=<value>...``);
- ``results.csv``: one row per trial (swept values, final/best top-1, top-5, wall time, img/s,
  run directory, status);
- ``results.md``: one row per configuration (the swept values other than ``seed``) with the
  mean and standard deviation (sample std, n-1) of top-1 over seeds.

A sweep key is either an argument of ``kdpipe.stages.train.train_student`` (``seed``, ``lr``,
``epochs``, ``batch_size``, ``student``, ``method``, ``views``, ``subset_fraction``, ...) or a
method option (``beta``, ``resolution``, ``ce_weight``, ``temperature``, ``alpha_penult``,
...), with ``-`` and ``_`` interchangeable.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import math
import os
import time
from pathlib import Path

from kdpipe.errors import KdpipeError
from kdpipe.pipeline.report import mean_std
from kdpipe.pipeline.rundir import RunDir, atomic_write_text

RESULT_METRICS = ("final_top1", "best_top1", "final_top5", "wall_seconds", "img_per_s")


def _parse_value(text: str):
    t = text.strip()
    low = t.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(t)
        except ValueError:
            pass
    return t


def parse_sweep(items) -> dict:
    """["beta=10,50", "seed=0,1"] -> {"beta": [10, 50], "seed": [0, 1]} (order kept)."""
    grid: dict = {}
    for item in items or ():
        if "=" not in item:
            raise KdpipeError(f"--sweep takes key=v1,v2,... (e.g. beta=10,50,100), got {item!r}.")
        key, values = item.split("=", 1)
        key = key.strip().replace("-", "_")
        vals = [_parse_value(v) for v in values.split(",") if v.strip() != ""]
        if not key or not vals:
            raise KdpipeError(f"--sweep takes key=v1,v2,... (e.g. beta=10,50,100), got {item!r}.")
        if key in grid:
            raise KdpipeError(f"--sweep names {key} twice; give all its values in one --sweep {key}=...")
        grid[key] = vals
    return grid


def expand_grid(grid: dict) -> list[dict]:
    """The cartesian product of the grid, in the order the keys and values were given."""
    if not grid:
        return [{}]
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def trial_config(base, point: dict):
    """The StudentConfig of one grid point: a field of the config is set directly, every other
    key becomes a method option (``dataclasses.replace(base, **point)``)."""
    fields = {f.name for f in dataclasses.fields(base)}
    direct, opts = {}, dict(base.method_options)
    for k, v in point.items():
        if k == "method_options":
            raise KdpipeError("--sweep cannot vary method_options as a whole; sweep its options by name.")
        if k in fields:
            direct[k] = v
        else:
            opts[k] = v
    return dataclasses.replace(base, **direct, method_options=opts)


def _trial_name(n: int, point: dict) -> str:
    parts = [f"{k}={v}" for k, v in point.items()]
    return f"trial-{n:03d}" + ("-" + "-".join(parts) if parts else "")


def _run_trial(job: tuple, threads: int | None = None) -> dict:
    """One trial (in a Ray worker or inline): train_student, errors reported not raised."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    from kdpipe.stages.train import train_student

    cfg, runtime = job
    t0 = time.perf_counter()
    try:
        s = train_student(cfg, **runtime)
        return {"status": "ok", **{k: s.get(k) for k in RESULT_METRICS}, "run_dir": s.get("run_dir")}
    except KdpipeError as err:
        return {"status": f"error: {err}", "wall_seconds": time.perf_counter() - t0, "run_dir": None}


def run_sweep(base, grid: dict, executor: str = "ray", out="runs", ray_address: str | None = None,
              num_cpus: int | None = None, progress: bool = True) -> dict:
    """Run every grid point of ``grid``: ``train_student(trial_config(base, point))``.

    Returns {"sweep_dir", "results_csv", "results_md", "rows", "table"}. Raises KdpipeError
    when every trial failed (with the first trial's sentence)."""
    from tqdm.auto import tqdm

    if executor not in ("ray", "inline"):
        raise KdpipeError(f"--executor must be ray or inline, got {executor!r}.")
    points = expand_grid(grid)
    # Fail fast, before starting any trial, on options no trial could accept.
    from kdpipe.stages.train import build_method

    configs = [trial_config(base, p) for p in points]
    for c in configs:
        build_method(c.method, c.method_options, None, c.student)
    base = base.with_absolute_paths()  # Ray workers may not share this process's working directory
    sweep = RunDir.create(Path(out).resolve(), f"sweep-{base.student}-{base.method}",
                          {"stage": "sweep", "base": dataclasses.asdict(base), "grid": grid, "executor": executor,
                           "trials": len(points)})
    jobs = [(c.with_absolute_paths(), {"out": str(sweep.path), "progress": False, "run_prefix": _trial_name(n, p)})
            for n, (c, p) in enumerate(zip(configs, points))]

    results: list[dict] = [None] * len(jobs)  # type: ignore[list-item]
    bar = tqdm(total=len(jobs), desc="sweep", unit="trial", disable=not progress)
    if executor == "inline":
        for i, kw in enumerate(jobs):
            results[i] = _run_trial(kw)
            bar.update(1)
    else:
        from kdpipe.pipeline.executor import ray_cluster

        import torch

        cuda = torch.cuda.is_available()
        with ray_cluster(ray_address, num_cpus=num_cpus) as ray:
            opts = {"num_gpus": 1, "num_cpus": 1} if cuda else {"num_cpus": 1}
            remote = ray.remote(**opts)(_run_trial)
            refs = {remote.remote(kw, None if cuda else 1): i for i, kw in enumerate(jobs)}
            pending = list(refs)
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    i = refs[ref]
                    try:
                        results[i] = ray.get(ref)
                    except Exception as err:  # a crashed worker: record it, keep the others
                        results[i] = {"status": f"error: {type(err).__name__}: {err}".splitlines()[0],
                                      "run_dir": None}
                    bar.update(1)
    bar.close()

    rows = []
    for p, r in zip(points, results):
        row = dict(p)
        for k in RESULT_METRICS:
            row[k] = r.get(k)
        row["run_dir"] = r.get("run_dir")
        row["status"] = r.get("status")
        rows.append(row)
    keys = list(grid)
    columns = keys + list(RESULT_METRICS) + ["run_dir", "status"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns)
    w.writeheader()
    for row in rows:
        w.writerow(row)
    results_csv = sweep.path / "results.csv"
    atomic_write_text(results_csv, buf.getvalue())
    table = aggregate(rows, [k for k in keys if k != "seed"])
    results_md = sweep.path / "results.md"
    atomic_write_text(results_md, markdown_table(table, [k for k in keys if k != "seed"],
                                                 dataclasses.asdict(base), grid))
    ok = [r for r in rows if r["status"] == "ok"]
    sweep.write_summary({"trials": len(rows), "ok": len(ok), "results_csv": str(results_csv),
                         "results_md": str(results_md)})
    if not ok:
        raise KdpipeError(f"every trial of the sweep failed; the first: {rows[0]['status'].removeprefix('error: ')}")
    return {"sweep_dir": str(sweep.path), "results_csv": str(results_csv), "results_md": str(results_md),
            "rows": rows, "table": table}


def _mean_std(values):
    m, s = mean_std(values)
    return (None, None) if math.isnan(m) else (m, s)


def aggregate(rows: list[dict], group_keys: list[str]) -> list[dict]:
    """Mean and sample std of top-1 over the trials that share ``group_keys`` values (seeds)."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in group_keys), []).append(r)
    table = []
    for key, rs in groups.items():
        ok = [r for r in rs if r.get("status") == "ok"]
        entry = dict(zip(group_keys, key))
        entry["n"] = len(ok)
        entry["failed"] = len(rs) - len(ok)
        for metric in ("final_top1", "best_top1"):
            m, s = _mean_std([r.get(metric) for r in ok])
            entry[f"{metric}_mean"], entry[f"{metric}_std"] = m, s
        entry["seeds"] = [r.get("seed") for r in ok if "seed" in r]
        table.append(entry)
    return table


def markdown_table(table: list[dict], group_keys: list[str], base: dict, grid: dict) -> str:
    def fmt(m, s):
        return "-" if m is None else f"{m:.2f} ± {s:.2f}"

    head = group_keys + ["n", "final top-1 (%)", "best top-1 (%)"]
    lines = [
        f"# Sweep: {base.get('student')} / {base.get('method')} from {base.get('store')}",
        "",
        "Grid: " + ", ".join(f"{k} = {', '.join(map(str, v))}" for k, v in grid.items()) + ".",
        "Mean ± sample standard deviation over seeds (n trials that finished).",
        "",
        "| " + " | ".join(head) + " |",
        "| " + " | ".join("---" for _ in head) + " |",
    ]
    for e in table:
        cells = [str(e[k]) for k in group_keys] + [
            str(e["n"]) + (f" ({e['failed']} failed)" if e["failed"] else ""),
            fmt(e["final_top1_mean"], e["final_top1_std"]),
            fmt(e["best_top1_mean"], e["best_top1_std"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def default_num_cpus() -> int:
    return os.cpu_count() or 1

"""Sweeps: a grid of student runs that all read the same store, as Ray Tune trials.

    kdpipe train-student --store S --student resnet8 --method cat_kd \\
        --sweep beta=10,50,100 --sweep seed=0,1 [--gpus-per-trial 0.25] [--out SHARED]
    kdpipe train-student --resume SHARED/sweep-resnet8-cat_kd-<timestamp>

``parse_sweep(["beta=10,50,100", "seed=0,1"])`` -> {"beta": [10, 50, 100], "seed": [0, 1]};
``expand_grid`` gives the 6 trials; ``run_sweep`` runs them (a Ray Tune grid,
``kdpipe.workflows.sweep_tune``; ``executor="inline"`` runs them one after another in this
process) and writes, in ``<out>/sweep-<student>-<method>-<timestamp>/``:

- ``config.json``: the base arguments, the grid and the per-trial resources asked for;
- one kdpipe run directory per trial (``trial-<n>-<key>=<value>...-<timestamp>``), written by
  the trial itself straight into this folder (a shared path or URL on a cluster);
- ``tune/``: Ray Tune's experiment (what ``Tuner.restore`` reads);
- ``results.csv``: one row per trial (swept values, final/best top-1, top-5, wall time, img/s,
  run directory, status, whether a finished run was reused);
- ``results.md``: one row per configuration (the swept values other than ``seed``) with the
  mean and standard deviation (sample std, n-1) of top-1 over seeds.

``resume_sweep(SWEEP_DIR)`` continues an interrupted sweep: a trial whose run directory holds
a ``summary.json`` is finished and never run again (its summary is read back); one with a
checkpoint continues from its last epoch (``train_student(resume=...)``); the others start.
This check is kdpipe's own, made by each trial on the shared storage, because Tune's saved
experiment state can lag behind the trials (it is written periodically, not per trial). A
trial that ended in a kdpipe error (one sentence in its row) has no summary.json and is run
again, except under Tune when Tune's saved state already records it as ended.

A sweep key is either a field of ``StudentConfig`` (``seed``, ``lr``, ``epochs``,
``batch_size``, ``student``, ``method``, ``views``, ``subset_fraction``, ...) or a method option
(``beta``, ``resolution``, ``ce_weight``, ``temperature``, ``alpha_penult``, ...), with ``-``
and ``_`` interchangeable; ``trial_config`` is the one place a trial's config is built.

Fault injection (tests): ``SweepOptions(stop_after=n)`` stops the sweep abruptly
(``SweepKilled``, a BaseException as a kill would be) once ``n`` trials finished.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import math

from kdpipe import storage
from kdpipe.errors import KdpipeError
from kdpipe.runs.paths import absolute_path
from kdpipe.runs.report import mean_std
from kdpipe.runs.rundir import CONFIG, SUMMARY, RunDir
from kdpipe.workflows.sweep_trials import (  # noqa: F401 - the sweep's public names, defined with its trials
    RESULT_METRICS,
    PriorRun,
    SweepKilled,
    SweepOptions,
    check_fault,
    find_trial_run,
    join_path,
    read_json,
    run_trial,
    trial_config,
    trial_name,
    write_text,
)

SWEEP_STAGE = "sweep"


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
        repeated = [v for i, v in enumerate(vals) if v in vals[:i]]
        if repeated:  # a trial is found again (on --resume) by its values: they must be distinct
            raise KdpipeError(f"--sweep {key} lists {repeated[0]} twice; give each value once.")
        grid[key] = vals
    return grid


def expand_grid(grid: dict) -> list[dict]:
    """The cartesian product of the grid, in the order the keys and values were given."""
    if not grid:
        return [{}]
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def run_sweep(base, grid: dict, out="runs", options: SweepOptions | None = None) -> dict:
    """Run every grid point of ``grid`` (``trial_config(base, point)``) into a new sweep
    directory under ``out``; see the module docstring.

    Returns {"sweep_dir", "results_csv", "results_md", "markdown", "rows", "table",
    "unfinished"}. Raises KdpipeError when no trial finished (with the first trial's sentence)."""
    options = options or SweepOptions()
    _check_options(options)
    configs = _trial_configs(base, grid)
    base = base.with_absolute_paths()  # Ray workers may not share this process's working directory
    record = {
        "stage": SWEEP_STAGE,
        "base": dataclasses.asdict(base),
        "grid": grid,
        "trials": len(configs),
        "executor": options.executor,
        "gpus_per_trial": options.gpus_per_trial,
        "cpus_per_trial": options.cpus_per_trial,
    }
    sweep = RunDir.create(absolute_path(out), f"sweep-{base.student}-{base.method}", record)
    # Where RunDir takes URLs, ``location`` is the URL (``path`` then is a local staging folder,
    # which the trials on other nodes could not reach); for a local run directory both agree.
    return _execute(str(getattr(sweep, "location", sweep.path)), base, grid, options, restore=False)


def is_sweep_dir(path) -> bool:
    """Whether ``path`` is a sweep directory (its config.json says stage "sweep")."""
    try:
        return read_json(join_path(str(path), CONFIG)).get("stage") == SWEEP_STAGE
    except (KdpipeError, OSError, ValueError):
        return False


def resume_sweep(sweep_dir, options: SweepOptions | None = None, given: dict | None = None) -> dict:
    """Continue the sweep in ``sweep_dir`` with its own base config and grid; finished trials
    are not run again. ``given``: config options passed beside --resume (refused when they
    differ from the sweep's)."""
    from kdpipe.config.configs import StudentConfig, differing_fields, from_saved

    options = options or SweepOptions()
    _check_options(options)
    sweep_dir = absolute_path(sweep_dir)
    try:
        saved = read_json(join_path(sweep_dir, CONFIG))
    except FileNotFoundError:
        raise KdpipeError(f"{sweep_dir} is not a kdpipe sweep directory (no {CONFIG} in it).") from None
    if saved.get("stage") != SWEEP_STAGE:
        raise KdpipeError(f"{sweep_dir} is not a sweep directory (its config.json is of stage {saved.get('stage')}).")
    base = from_saved(StudentConfig, saved.get("base"), str(sweep_dir))
    differ = differing_fields(base, dict(given or {}))
    if differ:
        flags = ", ".join("--" + k.replace("_", "-") for k in differ)
        raise KdpipeError(
            f"--resume continues the sweep as it was configured; these options differ from it: "
            f"{flags} (start a new sweep to change them)."
        )
    grid = saved.get("grid") or {}
    _trial_configs(base, grid)
    return _execute(sweep_dir, base, grid, options, restore=True)


def _check_options(options: SweepOptions) -> None:
    if options.executor not in ("ray", "inline"):
        raise KdpipeError(f"--executor must be ray or inline, got {options.executor!r}.")


def _trial_configs(base, grid: dict) -> list:
    """Every trial's StudentConfig, checked before any trial starts: options no trial could
    accept fail here, once, rather than in every trial."""
    from kdpipe.stages.train import build_method

    configs = [trial_config(base, p) for p in expand_grid(grid)]
    for c in configs:
        build_method(c.method, c.method_options, None, c.student)
        if int(c.data_parallel) > 1:
            raise KdpipeError(
                "A sweep trains each trial on one device; leave out --gpus "
                "(use --gpus-per-trial for the trials' share of a GPU)."
            )
    return configs


def _execute(sweep_dir: str, base, grid: dict, options: SweepOptions, restore: bool) -> dict:
    points = expand_grid(grid)
    results: list[dict | None]
    if options.executor == "ray":  # the trials run in Ray Tune's processes
        storage.refuse_in_process_only([base.store, base.online_teacher, sweep_dir], "Ray Tune trials")
    if options.executor == "inline":
        results = _run_inline(sweep_dir, base, points, options)
    else:
        from kdpipe.distributed.executor import prepare_ray_import

        prepare_ray_import(options.ray_address)  # before ray.tune's import: a local Ray stays on loopback
        from kdpipe.workflows.sweep_tune import run_tune

        results = run_tune(sweep_dir, base, grid, points, options, restore=restore)
    return write_results(sweep_dir, base, grid, points, results)


def _run_inline(sweep_dir: str, base, points: list[dict], options: SweepOptions) -> list[dict | None]:
    """The trials one after another in this process (tests; a machine without Ray)."""
    from tqdm.auto import tqdm

    results: list[dict | None] = []
    with tqdm(total=len(points), desc="sweep", unit="trial", disable=not options.progress) as bar:
        for n, point in enumerate(points):
            results.append(run_trial(sweep_dir, n, point, trial_config(base, point), options.device))
            bar.update(1)
            check_fault(n + 1, options.stop_after)
    return results


def write_results(sweep_dir: str, base, grid: dict, points: list[dict], results: list[dict | None]) -> dict:
    """results.csv (one row per trial), results.md (mean ± std over seeds) and the sweep's
    summary.json; raises when no trial finished."""
    rows = []
    for p, r in zip(points, results):
        r = r or {"status": "unfinished"}
        rows.append(
            {
                **p,
                **{k: r.get(k) for k in RESULT_METRICS},
                "run_dir": r.get("run_dir"),
                "status": r.get("status"),
                "reused": bool(r.get("reused")),
            }
        )
    keys = list(grid)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys + list(RESULT_METRICS) + ["run_dir", "status", "reused"])
    w.writeheader()
    w.writerows(rows)
    results_csv = write_text(sweep_dir, "results.csv", buf.getvalue())
    group = [k for k in keys if k != "seed"]
    table = aggregate(rows, group)
    markdown = markdown_table(table, group, dataclasses.asdict(base), grid)
    results_md = write_text(sweep_dir, "results.md", markdown)
    ok = [r for r in rows if r["status"] == "ok"]
    unfinished = sum(r["status"] == "unfinished" for r in rows)
    write_text(
        sweep_dir,
        SUMMARY,
        json.dumps(
            {
                "trials": len(rows),
                "ok": len(ok),
                "unfinished": unfinished,
                "reused": sum(r["reused"] for r in rows),
                "results_csv": results_csv,
                "results_md": results_md,
            },
            indent=2,
            sort_keys=True,
        )
        + "\n",
    )
    if not ok:
        first = rows[0]["status"].removeprefix("error: ") if rows else "no trials"
        raise KdpipeError(f"No trial of the sweep in {sweep_dir} finished; the first: {first}")
    return {
        "sweep_dir": sweep_dir,
        "results_csv": results_csv,
        "results_md": results_md,
        "markdown": markdown,
        "rows": rows,
        "table": table,
        "unfinished": unfinished,
    }


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
        # an interrupted sweep's trials that never ran are unfinished (results.csv's word), not failed
        entry["unfinished"] = sum(r.get("status") == "unfinished" for r in rs)
        entry["failed"] = len(rs) - len(ok) - entry["unfinished"]
        for metric in ("final_top1", "best_top1"):
            m, s = _mean_std([r.get(metric) for r in ok])
            entry[f"{metric}_mean"], entry[f"{metric}_std"] = m, s
        entry["seeds"] = [r.get("seed") for r in ok if "seed" in r]
        table.append(entry)
    return table


def _not_ok(entry: dict) -> str:
    """ " (1 failed, 1 unfinished)": the trials of a row that did not finish, in results.csv's words."""
    parts = [f"{entry[k]} {k}" for k in ("failed", "unfinished") if entry.get(k)]
    return f" ({', '.join(parts)})" if parts else ""


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
            str(e["n"]) + _not_ok(e),
            fmt(e["final_top1_mean"], e["final_top1_std"]),
            fmt(e["best_top1_mean"], e["best_top1_std"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

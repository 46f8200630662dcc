"""``kdpipe run CONFIG...``: whole paper rows from config files, sharing teacher passes.

For every config file (``kdpipe.config.config_files``): a store for its teacher and data,
its letKD target set when it has a ``cluster`` section, then its student for every seed.

- **Stores are shared**: configs with the same teacher checkpoint (sha256), data set, views,
  feature views and padding share one store, extracted once with the union of their CAM
  sizes and feature maps. Its path under ``--stores`` names those settings
  (``<arch>-<sha8>-<data>-<settings hash>.zarr``), so a later call finds it; a complete store
  is reused, an interrupted one resumed.
- **Target sets are shared** the same way (named by a hash of their settings).
- **Students resume**: each (config, seed) has run directories ``<out>/<name>-s<seed>-*``;
  a finished one (summary.json) is reused and an interrupted one resumed only when its resolved
  configuration (store identity: teacher sha256, data fingerprint, views; target set) equals
  what the row resolves to now; otherwise a new run is trained.
- The end: ``<out>/results.md`` and ``results.csv``, one line per config (mean and sample
  std of the final and best top-1 over its seeds, beside the paper's number).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import time
from dataclasses import dataclass, field

from kdpipe import storage
from kdpipe.config.config_files import RowConfig, load_row
from kdpipe.config.configs import ClusterConfig, ExtractConfig
from kdpipe.errors import KdpipeError

__all__ = ["run_configs", "store_key"]


def _short_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


@dataclass
class StorePlan:
    """One store shared by the rows whose teacher, data and view settings agree."""

    key: tuple
    rows: list = field(default_factory=list)
    cam_res: set = field(default_factory=set)
    native_cam: bool = False
    features: set = field(default_factory=set)
    methods: set = field(default_factory=set)  # the rows' methods that add arrays (at, fitnet, simkd)
    path: str = ""


def adds_arrays(method: str) -> bool:
    """Whether ``method`` reads teacher arrays beyond the logits, CAMs and raw features that the
    extract section names (AT's maps, FitNet's hints, SimKD's last map)."""
    from kdpipe.stages.extract import method_kinds
    from kdpipe.targets import Cam, Feature, Logits, NativeCam

    return any(not isinstance(k, (Logits, Cam, NativeCam, Feature)) for k in method_kinds([method]))


def store_key(row: RowConfig, sha: str) -> tuple:
    e = row.extract
    return (
        sha,
        row.data,
        str(e.get("views", "auto")),
        e.get("feature_views", "identity"),
        e.get("pad_mode"),
        e.get("split", "train"),
        int(e.get("seed", 0)),
    )


def _plan_stores(rows: list[RowConfig], stores_dir: str) -> dict:
    from kdpipe.artifacts import sha256_file
    from kdpipe.stages.extract import parse_cam_res, parse_features

    plans: dict = {}
    shas: dict = {}
    for row in rows:
        path = storage.normalize(row.teacher_checkpoint)
        if not storage.isfile(path):
            raise KdpipeError(
                f"The teacher checkpoint {path} of {row.path} does not exist; point at it with "
                f"--set teacher.checkpoint=PATH, or with KDPIPE_TEACHERS where the config's path uses it."
            )
        sha = shas.setdefault(path, sha256_file(path))
        plan = plans.setdefault(store_key(row, sha), StorePlan(store_key(row, sha)))
        plan.rows.append(row)
        sizes, native = parse_cam_res(row.extract.get("cam_res", (2,)))
        plan.cam_res.update(sizes)
        plan.native_cam |= bool(row.extract.get("native_cam", False) or native)
        plan.features.update(parse_features(row.extract.get("features", ("penult", "inter"))))
        plan.methods.update(row.extract.get("methods") or ())  # named in the extract section
        if adds_arrays(row.student.method):
            plan.methods.add(row.student.method)
    for plan in plans.values():
        row = plan.rows[0]
        settings = [plan.key[1:], sorted(plan.cam_res), plan.native_cam, sorted(plan.features)]
        if plan.methods:  # only then: the stores of the other rows keep their names
            settings.append(sorted(plan.methods))
        data_name = row.data.split(":", 1)[0]
        plan.path = storage.join(
            stores_dir, f"{row.teacher_arch}-{plan.key[0][:8]}-{data_name}-{_short_hash(settings)}.zarr"
        )
    return plans


def _ensure_store(plan: StorePlan, executor: str, say) -> dict:
    from kdpipe.artifacts import existing_store, open_store
    from kdpipe.errors import StoreError
    from kdpipe.stages.extract import extract_teacher

    row = plan.rows[0]
    resume = False
    if existing_store(plan.path):
        try:
            open_store(plan.path)
            say(f"store {plan.path}: reused (its teacher pass is not run again)")
            return {"path": plan.path, "built": False}
        except StoreError as err:
            say(f"store {plan.path}: resuming ({err})")
            resume = True
    extract = {k: v for k, v in row.extract.items() if k not in ("cam_res", "native_cam", "features", "methods")}
    cfg = ExtractConfig(
        teacher=row.teacher_checkpoint,
        arch=row.teacher_arch,
        data=row.data,
        out=plan.path,
        cam_res=tuple(sorted(plan.cam_res)),
        native_cam=plan.native_cam,
        features=tuple(sorted(plan.features)),
        methods=tuple(sorted(plan.methods)),
        resume=resume,
        **{**extract, "executor": executor},
    )
    say(f"store {plan.path}: extracting {row.teacher_arch} over {row.data}")
    extract_teacher(cfg, progress=True, verbose=False)
    return {"path": plan.path, "built": True}


def _ensure_target_set(row: RowConfig, store: str, executor: str, say) -> str | None:
    from kdpipe.artifacts import open_store
    from kdpipe.stages.cluster import cluster

    if row.cluster is None:
        return None
    name = "ts-" + _short_hash(row.cluster)
    reader = open_store(store)
    if name in reader.target_sets():
        say(f"target set {name} of {store}: reused")
        return name
    entry = reader.manifest.targets.get(name)
    resume = entry is not None and bool((entry.attrs.get("extra") or {}).get("fit_done"))
    say(f"target set {name} of {store}: {'resuming' if resume else 'fitting'}")
    cluster(
        ClusterConfig(
            store=store,
            name=name,
            teacher=row.teacher_checkpoint,
            resume=resume,
            **{**row.cluster, "executor": executor},
        ),
        progress=True,
        verbose=False,
    )
    return name


def _run_dirs_of(out: str, prefix: str) -> list[str]:
    """The run directories ``<out>/<prefix>-*`` (paths or URLs), newest first."""
    if not storage.isdir(out):
        return []
    found = [storage.join(out, name) for name in storage.subfolders(out) if name.startswith(f"{prefix}-")]
    return [p for p in reversed(found) if storage.isfile(storage.join(p, "config.json"))]


#: config.json keys that do not change what a student run computes
_RUNTIME_KEYS = ("device", "config_file")


def _comparable(resolved: dict) -> str:
    """A resolved student configuration as canonical JSON, without the runtime-only keys."""
    return json.dumps({k: v for k, v in resolved.items() if k not in _RUNTIME_KEYS}, sort_keys=True, default=str)


def _matching_run(candidates: list[str], cfg) -> tuple[str | None, str | None]:
    """(a finished run, an interrupted run) among ``candidates`` whose resolved configuration,
    store identity (teacher sha256, data fingerprint, views) and target set included, equals
    what ``cfg`` resolves to now; a run of another teacher, store or config is never reused."""
    from kdpipe.stages.train import resolve_student

    if not candidates:
        return None, None
    want = _comparable(resolve_student(cfg.with_absolute_paths()).resolved())
    finished = interrupted = None
    for path in candidates:
        try:
            saved = json.loads(storage.read_bytes(storage.join(path, "config.json")))
        except (OSError, ValueError):
            continue
        if not isinstance(saved, dict) or _comparable(saved) != want:
            continue
        if storage.isfile(storage.join(path, "summary.json")):
            finished = finished or path
        elif storage.isfile(storage.join(path, "checkpoints", "latest.pth")):
            interrupted = interrupted or path
    return finished, interrupted


def _train_row(row: RowConfig, store: str, target_set: str | None, out: str, say) -> list[dict]:
    from kdpipe.stages.train import train_student

    results = []
    for seed in row.seeds:
        prefix = f"{row.name}-s{seed}"
        cfg = dataclasses.replace(row.student, store=store, seed=int(seed), targets=target_set or row.student.targets)
        candidates = _run_dirs_of(out, prefix)
        finished, interrupted = _matching_run(candidates, cfg)
        if finished is not None:
            say(f"{prefix}: done earlier ({finished})")
            results.append(json.loads(storage.read_bytes(storage.join(finished, "summary.json"))))
            continue
        if interrupted is not None:
            say(f"{prefix}: resuming {interrupted}")
            results.append(train_student(resume=interrupted))
            continue
        if candidates:
            say(f"{prefix}: {len(candidates)} earlier run(s) of another store or config; training a new one")
        say(f"{prefix}: training {cfg.student} with {cfg.method}")
        results.append(train_student(cfg, out=out, run_prefix=prefix))
    return results


def run_configs(paths, sets=(), out="runs", stores="stores", executor: str = "ray", verbose: bool = True) -> dict:
    """Run every config (see the module docstring); return the results table and its files."""
    from kdpipe.runs.report import mean_std

    def say(msg):
        if verbose:
            print(f"[run] {msg}", flush=True)

    t0 = time.perf_counter()
    rows = [load_row(p, sets) for p in paths]
    changed = overridden_keys(sets)
    names = [r.name for r in rows]
    if len(set(names)) != len(names):
        raise KdpipeError(f"Two configs share the name {max(set(names), key=names.count)!r}; names must differ.")
    out, stores_dir = storage.normalize(out), storage.normalize(stores)  # paths or URLs
    plans = _plan_stores(rows, stores_dir)
    built, table = 0, []
    for plan in plans.values():
        store = _ensure_store(plan, executor, say)
        built += int(store["built"])
        for row in plan.rows:
            summaries = _train_row(row, store["path"], _ensure_target_set(row, store["path"], executor, say), out, say)
            table.append(_table_row(row, summaries, mean_std, changed))
    results_md, results_csv = storage.join(out, "results.md"), storage.join(out, "results.csv")
    storage.write_bytes(results_md, _markdown(table).encode("utf-8"))
    storage.write_bytes(results_csv, _csv(table).encode("utf-8"))
    say(
        f"{len(rows)} config(s), {len(plans)} store(s) ({built} built now) in {time.perf_counter() - t0:.0f} s; "
        f"results in {results_md}"
    )
    return {
        "rows": table,
        "stores": [p.path for p in plans.values()],
        "stores_built": built,
        "results_md": results_md,
        "results_csv": results_csv,
    }


#: --set keys that leave a row the paper's experiment (more seeds, where the teacher file lies)
NEUTRAL_KEYS = ("seeds", "teacher.checkpoint")


def overridden_keys(sets) -> list[str]:
    """The --set keys that change a row's experiment: its paper number no longer applies."""
    keys = [str(s).partition("=")[0].strip() for s in sets or ()]
    return [k for k in keys if k not in NEUTRAL_KEYS]


def _table_row(row: RowConfig, summaries: list, mean_std, overridden=()) -> dict:
    final = mean_std([s.get("final_top1") for s in summaries])
    best = mean_std([s.get("best_top1") for s in summaries])
    return {
        "config": row.name,
        "overridden": ",".join(overridden),
        "teacher": row.teacher_arch,
        "student": row.student.student,
        "method": row.student.method,
        "seeds": len(summaries),
        "final_top1_mean": final[0],
        "final_top1_std": final[1],
        "best_top1_mean": best[0],
        "best_top1_std": best[1],
        "paper_top1": None if overridden else row.paper.get("top1"),  # another experiment than the paper's
        "run_dirs": [s.get("run_dir") for s in summaries],
    }


def _fmt(mean, std, n: int = 2) -> str:
    if mean != mean:
        return "-"
    return f"{mean:.2f} (1 seed)" if n == 1 else f"{mean:.2f} ± {std:.2f}"


def _markdown(table: list) -> str:
    lines = [
        "# kdpipe run: results",
        "",
        "Top-1 (%) on the test split, mean ± sample std over seeds; best = best epoch (the papers report it).",
        "",
        "| config | teacher | student | method | seeds | final top-1 | best top-1 | paper |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in table:
        name = r["config"] + (f" (overridden: {r['overridden']})" if r.get("overridden") else "")
        paper = "" if r.get("overridden") else (r["paper_top1"] or "-")
        lines.append(
            f"| {name} | {r['teacher']} | {r['student']} | {r['method']} | {r['seeds']} | "
            f"{_fmt(r['final_top1_mean'], r['final_top1_std'], r['seeds'])} | "
            f"{_fmt(r['best_top1_mean'], r['best_top1_std'], r['seeds'])} | {paper} |"
        )
    if any(r.get("overridden") for r in table):
        lines += ["", "Rows marked overridden ran with --set changes: the paper's number is not theirs."]
    return "\n".join(lines) + "\n"


def _csv(table: list) -> str:
    buf = io.StringIO()
    keys = [k for k in table[0] if k != "run_dirs"] if table else []
    writer = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    for r in table:
        writer.writerow(r)
    return buf.getvalue()

"""`kdpipe demo`: the whole pipeline on the embedded digits data set, with a report.

One teacher pass, many students: the demo trains a teacher on the full digits train split,
writes one store with `extract-teacher` (Ray, local; 8 seeded views of the 81, for time) and `cluster`,
then trains resnet8 students from that store on a seeded 10% subset of the train split (the
data-reduction regime where distillation visibly matters) with ce, kd, cat_kd, letkd1 and
letkd2 replaying a stored view per sample per epoch, plus cat_kd with the online teacher on
fresh random views: the references' training, which the store replaces. It writes ``<out>/report/``:
results.md, curves.png (test top-1 of every student), cams.png and subclasses.png.

A re-run reuses the teacher checkpoint, the store and its target set when their settings
match (that is the product's point) and says so; students are always retrained.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from kdpipe.errors import KdpipeError
from kdpipe.runs.plots import plot_student_curves
from kdpipe.runs.report import mean_std

DATA = "digits"
TARGET_SET = "demo"
#: The letKD ablation's second target set: the K-means fits on a seeded subsample of the
#: identity-view vectors instead of every one (the reference fits on every one).
SUBSAMPLED_SET = "demo-subfit"
SUBSAMPLED_FIT_POINTS = 8192


@dataclass(frozen=True)
class DemoSettings:
    teacher_arch: str = "resnet20"
    teacher_epochs: int = 20
    student_arch: str = "resnet8"
    student_epochs: int = 40
    subset_fraction: float = 0.1
    # 8 seeded views of digits' 81: every view (`--views all`, extract-teacher's default) costs
    # 10x the teacher passes, which takes make demo past its 10 minutes on 2 CPU cores
    # (docs/BENCHMARKS.md, "The demo and the test suite")
    views: str = "8"
    cam_res: tuple = (2,)
    k_penult: int = 512
    k_inter: int = 4
    max_fit_points: int | None = None
    # CAT loss scale on digits (resnet20 -> resnet8): beta near 1 keeps it in the authors'
    # advised range after the first epoch; 10 diverged in the prototype of the regime.
    cat_beta: float = 1.0
    kd_temperature: float = 4.0
    seeds: tuple = (0,)
    executor: str = "ray"
    batch_size: int = 64
    students: tuple = field(default=("ce", "kd", "cat_kd", "letkd1", "letkd2", "cat_kd_online"))
    #: further runs whose teacher arrays the store must hold (beside ``students``'), so runs
    #: split over several invocations (benchmarks/digits_accuracy.py --store-for) share one store
    store_students: tuple = ()


FULL = DemoSettings()
FAST = DemoSettings(teacher_arch="resnet8", teacher_epochs=10, student_epochs=15, views="8", k_penult=64, k_inter=2)

# The student runs a table can hold: label -> (method, options, target source, views mode
# [, target set]).
# "cached" reads the store (replay: a stored view per sample per epoch); "online" runs the
# teacher live on fresh random views (the references' training, the baseline the store
# replaces); "none" (CE) reads no targets and trains on fresh random views. Warp runs read a
# second store that holds the identity view only.
STUDENT_RUNS = {
    "ce": ("ce", {}, "none", "replay"),
    "kd": ("kd", {"temperature": None}, "cached", "replay"),
    "cat_kd": ("cat_kd", {"beta": None}, "cached", "replay"),
    "letkd1": ("letkd1", {}, "cached", "replay"),
    "letkd2": ("letkd2", {}, "cached", "replay"),
    "cat_kd_online": ("cat_kd", {"beta": None}, "online", "replay"),
    "kd_online": ("kd", {"temperature": None}, "online", "replay"),
    "letkd1_online": ("letkd1", {}, "online", "replay"),
    "letkd2_online": ("letkd2", {}, "online", "replay"),
    "cat_kd_warp": ("cat_kd", {"beta": None}, "cached", "warp"),
    # letKD ablation (full-views issue): the whole softmax over all K_penult centres online, as
    # the reference computes it, against the stored top-k; a subsampled fit against the full one.
    "letkd1_online_full": ("letkd1", {"penult_target": "full"}, "online", "replay"),
    "letkd2_online_full": ("letkd2", {"penult_target": "full"}, "online", "replay"),
    "letkd1_subfit": ("letkd1", {}, "cached", "replay", SUBSAMPLED_SET),
    "letkd2_subfit": ("letkd2", {}, "cached", "replay", SUBSAMPLED_SET),
}
#: The methods the demo's own rows show; every other registered method is a comparison method.
HEADLINE_METHODS = frozenset(spec[0] for spec in STUDENT_RUNS.values())


def _comparison_methods() -> tuple[str, ...]:
    """The registered methods beyond the headline ones (the papers' comparison methods), with
    their references' default settings."""
    from kdpipe.methods import available

    return tuple(name for name in available() if name not in HEADLINE_METHODS)


# Each comparison method cached and online, as the digits table compares them.
STUDENT_RUNS.update({m: (m, {}, "cached", "replay") for m in _comparison_methods()})
STUDENT_RUNS.update({f"{m}_online": (m, {}, "online", "replay") for m in _comparison_methods()})
ALL_STUDENTS = tuple(STUDENT_RUNS)
#: The runs of the digits accuracy table (benchmarks/digits_accuracy.py): cached and online.
TABLE_STUDENTS = (
    "ce",
    "kd",
    "cat_kd",
    "letkd1",
    "letkd2",
    "kd_online",
    "cat_kd_online",
    "letkd1_online",
    "letkd2_online",
    "cat_kd_warp",
)
ABLATION_STUDENTS = ("letkd1_online_full", "letkd2_online_full", "letkd1_subfit", "letkd2_subfit")
#: The comparison methods' runs of the digits table, cached and online.
COMPARISON_STUDENTS = _comparison_methods() + tuple(f"{m}_online" for m in _comparison_methods())


def store_methods(students) -> tuple[str, ...]:
    """The methods of ``students`` whose teacher arrays extraction must add (at, fitnet, simkd)."""
    from kdpipe.workflows.run import adds_arrays

    return tuple(sorted({_run_spec(label)[0] for label in students if adds_arrays(_run_spec(label)[0])}))


def _holds_method_arrays(reader, methods) -> bool:
    """Whether a store holds every array the named methods' kinds read."""
    from kdpipe.stages.extract import method_kinds
    from kdpipe.targets.base import KindContext

    names = frozenset(reader.array_names())
    kinds = [k.bind(KindContext(available=names)) for k in method_kinds(methods)]
    return all(k.arrays() and set(k.arrays()) <= names for k in kinds)


def _run_spec(label: str) -> tuple:
    """(method, options, source, views, target set) of a student run label."""
    method, options, source, views, *rest = STUDENT_RUNS[label]
    return method, options, source, views, (rest[0] if rest else TARGET_SET)


def _method_options(label: str, settings: DemoSettings) -> dict:
    options = _run_spec(label)[1]
    resolved = dict(options)
    if "beta" in resolved:
        resolved["beta"] = settings.cat_beta
    if "temperature" in resolved:
        resolved["temperature"] = settings.kd_temperature
    return resolved


def _say(msg: str, verbose: bool) -> None:
    if verbose:
        print(f"[demo] {msg}", flush=True)


def _teacher_stage(out: Path, s: DemoSettings, verbose: bool) -> tuple[Path, dict, bool]:
    """Train the teacher, or reuse the one an earlier run made with the same settings."""
    from kdpipe.config.configs import TeacherConfig
    from kdpipe.stages.teacher import train_teacher

    teacher_dir = out / "teacher"
    record_path = teacher_dir / "teacher.json"
    wanted = {"arch": s.teacher_arch, "epochs": s.teacher_epochs, "data": DATA, "seed": 0}
    if record_path.exists():
        record = json.loads(record_path.read_text())
        ckpt = Path(record.get("checkpoint", ""))
        if record.get("settings") == wanted and ckpt.exists():
            _say(f"reusing the teacher trained earlier: {ckpt} (top-1 {record['top1']:.2f}%)", verbose)
            return ckpt, record, True
    _say(f"training the teacher {s.teacher_arch} on the full {DATA} train split ({s.teacher_epochs} epochs)", verbose)
    summary = train_teacher(
        TeacherConfig(arch=s.teacher_arch, data=DATA, epochs=s.teacher_epochs, batch_size=s.batch_size, seed=0),
        out=teacher_dir / "runs",
        progress=verbose,
    )
    record = {
        "settings": wanted,
        "checkpoint": str(summary["checkpoint"]),
        "top1": summary["top1"],
        "top5": summary.get("top5"),
        "wall_seconds": summary["wall_seconds"],
        "run_dir": str(summary["run_dir"]),
    }
    teacher_dir.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(record, indent=2))
    return Path(summary["checkpoint"]), record, False


def _store_stage(
    store: Path, ckpt: Path, s: DemoSettings, views: str, verbose: bool, methods: tuple = ()
) -> tuple[Path, dict]:
    """Extract the teacher into the store, or reuse a complete store of this very teacher."""
    from kdpipe.artifacts import open_store, store_exists
    from kdpipe.config.configs import ExtractConfig
    from kdpipe.errors import StoreError
    from kdpipe.stages.extract import extract_teacher
    from kdpipe.views import resolve_views

    info: dict[str, bool | float | None] = {"reused": False, "extract_seconds": None}
    if store_exists(store):
        try:
            reader = open_store(store)
            reader.require_complete()
            reader.check_teacher(ckpt)
            stored = reader.manifest.views
            from kdpipe.data import load_dataset

            same_views = str(stored.mode) == resolve_views(load_dataset(DATA, "train").policy, views)
            if same_views and _holds_method_arrays(reader, methods):
                _say(f"reusing the store made earlier: {store} (the teacher is not run again)", verbose)
                info["reused"] = True
                return store, info
            why = f"views={stored.mode}, not {views}" if not same_views else f"not every array of {', '.join(methods)}"
            _say(f"the store at {store} holds {why}: re-extracting", verbose)
        except StoreError as err:
            _say(f"not reusing {store}: {err} Re-extracting.", verbose)
    _say(
        f"extract-teacher: {s.teacher_arch} over the {DATA} train split, views={views}, executor={s.executor}", verbose
    )
    t0 = time.perf_counter()
    extract_teacher(
        ExtractConfig(
            teacher=str(ckpt),
            arch=s.teacher_arch,
            data=DATA,
            out=str(store),
            views=views,
            cam_res=s.cam_res,
            features=("penult", "inter"),
            methods=methods,
            executor=s.executor,
            overwrite=True,
        ),
        progress=verbose,
        verbose=verbose,
    )
    info["extract_seconds"] = time.perf_counter() - t0
    return store, info


def _cluster_stage(
    store: Path,
    s: DemoSettings,
    store_reused: bool,
    verbose: bool,
    name: str = TARGET_SET,
    max_fit_points: int | None = None,
) -> dict:
    from kdpipe.artifacts import open_store
    from kdpipe.config.configs import ClusterConfig
    from kdpipe.stages.cluster import cluster

    reader = open_store(store)
    fit_points = s.max_fit_points if max_fit_points is None else max_fit_points
    if store_reused and name in reader.target_sets():
        record = reader.target_set(name)
        if (record.k_penult, record.k_inter, record.max_fit_points) == (s.k_penult, s.k_inter, fit_points):
            _say(f"reusing the target set {name!r} made earlier (K-means, LDA, sub-class scores)", verbose)
            return {"reused": True, "cluster_seconds": None}
    fit_on = "every identity-view vector" if fit_points is None else f"{fit_points} identity-view vectors"
    _say(
        f"cluster {name}: K_penult={s.k_penult}, K_inter={s.k_inter} (faiss K-means, streaming LDA, fit on "
        f"{fit_on}), then the assignment pass over every view",
        verbose,
    )
    t0 = time.perf_counter()
    cluster(
        ClusterConfig(
            store=str(store),
            name=name,
            k_penult=s.k_penult,
            k_inter=s.k_inter,
            max_fit_points=fit_points,
            seed=0,
            overwrite=True,
            executor=s.executor,
        ),
        progress=verbose,
        verbose=verbose,
    )
    return {"reused": False, "cluster_seconds": time.perf_counter() - t0}


def _student_runs(stores: dict, ckpt: Path, out: Path, s: DemoSettings, verbose: bool) -> list[dict]:
    from kdpipe.config.configs import StudentConfig
    from kdpipe.stages.train import train_student

    rows = []
    for label in s.students:
        method, _, source, views, target_set = _run_spec(label)
        online = source == "online"
        for seed in s.seeds:
            _say(
                f"student {s.student_arch} with {label} (seed {seed}, {s.student_epochs} epochs, "
                f"{int(s.subset_fraction * 100)}% of the train split)",
                verbose,
            )
            cfg = StudentConfig(
                store=str(stores[views]),
                targets=target_set,
                student=s.student_arch,
                method=method,
                method_options=_method_options(label, s),
                epochs=s.student_epochs,
                batch_size=s.batch_size,
                views=views,
                seed=seed,
                online_teacher=str(ckpt) if online else None,
                subset_fraction=s.subset_fraction,
                subset_seed=0,
            )
            summary = train_student(cfg, out=out / "students", progress=verbose, run_prefix=f"{label}-s{seed}")
            source_label = {"none": "none (fresh random views)", "online": "online teacher, fresh views"}.get(
                source, f"cached, {views}"
            )
            rows.append(
                {
                    "label": label,
                    "method": method,
                    "source": source_label,
                    "seed": seed,
                    "final_top1": summary["final_top1"],
                    "best_top1": summary["best_top1"],
                    "wall_seconds": summary["wall_seconds"],
                    "img_per_s": summary["img_per_s"],
                    "run_dir": summary["run_dir"],
                }
            )
    return rows


def _store_bytes(store: Path) -> int:
    return sum(p.stat().st_size for p in Path(store).rglob("*") if p.is_file())


def _curves_by_label(rows: list[dict]) -> dict:
    """Test top-1 per epoch of every run, grouped by student label (one list per seed)."""
    from kdpipe.runs.rundir import RunDir

    curves: dict = {}
    for r in rows:
        curves.setdefault(r["label"], []).append([m["test_top1"] for m in RunDir.open(r["run_dir"]).read_metrics()])
    return curves


def results_table(rows: list[dict]) -> list[dict]:
    """One line per student run label: mean/std of final top-1 over seeds, mean wall time."""
    table = []
    for label in dict.fromkeys(r["label"] for r in rows):
        mine = [r for r in rows if r["label"] == label]
        mean, std = mean_std([r["final_top1"] for r in mine])
        table.append(
            {
                "label": label,
                "source": mine[0]["source"],
                "seeds": len(mine),
                "top1_mean": mean,
                "top1_std": std,
                "wall_seconds": mean_std([r["wall_seconds"] for r in mine])[0],
                "img_per_s": mean_std([r["img_per_s"] or 0.0 for r in mine])[0],
            }
        )
    return table


def _write_report(
    report: Path,
    s: DemoSettings,
    teacher: dict,
    teacher_reused: bool,
    store_info: dict,
    cluster_info: dict,
    store_bytes: int,
    table: list[dict],
    wall: float,
) -> Path:
    lines = [
        "# kdpipe demo: one teacher pass, many students",
        "",
        f"Data: scikit-learn digits (32x32 RGB), teacher {s.teacher_arch} trained on the full train "
        f"split ({s.teacher_epochs} epochs){' (reused)' if teacher_reused else ''}: test top-1 "
        f"{teacher['top1']:.2f}%.",
        f"Students: {s.student_arch}, {s.student_epochs} epochs on a seeded {int(s.subset_fraction * 100)}% "
        f"subset of the train split; top-1 on the full test split; seeds {list(s.seeds)}.",
        f"Store: views={s.views}, CAM r={list(s.cam_res)}, K_penult={s.k_penult}, K_inter={s.k_inter}; "
        f"{store_bytes / 1e6:.1f} MB on disk"
        f"{' (reused)' if store_info['reused'] else ''}.",
        "",
        "| student run | targets | top-1 (%) | wall time (s) | img/s |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in table:
        top1 = f"{row['top1_mean']:.2f}" + (f" ± {row['top1_std']:.2f}" if row["seeds"] > 1 else "")
        lines.append(
            f"| {row['label']} | {row['source']} | {top1} | {row['wall_seconds']:.1f} | {row['img_per_s']:.0f} |"
        )
    lines += [
        "",
        f"Total demo wall time: {wall:.1f} s.",
        "",
        "Pictures: curves.png (test top-1 per epoch), cams.png (teacher CAMs of its top "
        "classes), subclasses.png (letKD sub-classes per location and score-matrix rows).",
    ]
    path = report / "results.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _check_settings(s: DemoSettings, out: Path) -> None:
    """Refuse, before any work, what would fail later: unknown runs, bad numbers, an --out
    that is a file."""
    from kdpipe.data import load_dataset
    from kdpipe.methods import get_method
    from kdpipe.views import resolve_views

    unknown = [label for label in s.students + s.store_students if label not in STUDENT_RUNS]
    if unknown:
        raise KdpipeError(f"Unknown demo student run {unknown[0]!r}; choose from {', '.join(STUDENT_RUNS)}.")
    from kdpipe.config.fields import check_value

    for name, field_name in (
        ("teacher_epochs", "epochs"),
        ("student_epochs", "epochs"),
        ("k_penult", "k_penult"),
        ("k_inter", "k_inter"),
        ("batch_size", "batch_size"),
    ):
        check_value(field_name, getattr(s, name), (int,), False, f"--{name.replace('_', '-')}")
    for seed in s.seeds:
        check_value("seed", seed, (int,), False, "--seeds")
    if not s.seeds:
        raise KdpipeError("--seeds needs at least one seed.")
    if out.exists() and not out.is_dir():
        raise KdpipeError(f"--out {out} is a file; the demo needs a folder (it creates it when missing).")
    train = load_dataset(DATA, "train")
    resolve_views(train.policy, s.views)  # a bad --views is one sentence now
    _check_cluster_sizes(s, train)
    for label in s.students:
        get_method(_run_spec(label)[0], **{k: v for k, v in _run_spec(label)[1].items() if v is not None})


def _check_cluster_sizes(s: DemoSettings, train) -> None:
    """K-means needs a vector per centre: --k-penult above the teacher's penult vectors of the
    fit set (every train image's identity view, each location of its map) and --k-inter above
    the smallest class's inter vectors are refused now, not after the teacher and the store."""
    import numpy as np
    import torch

    from kdpipe.models import build

    teacher = build(s.teacher_arch, num_classes=train.num_classes).eval()
    with torch.no_grad():
        _, feats = teacher.forward_features(torch.zeros((1, 3, *train.image_size)))
    penult = len(train) * int(np.prod(feats["penult"].shape[-2:]))
    if s.max_fit_points is not None:
        penult = min(penult, int(s.max_fit_points))
    smallest = int(np.bincount(np.asarray(train.labels)).min()) * int(np.prod(feats["inter"].shape[-2:]))
    if s.k_penult > penult:
        raise KdpipeError(
            f"--k-penult {s.k_penult} asks for more K-means centres than the {penult} penult vectors "
            f"the demo's fit set has; pass at most {penult}."
        )
    if s.k_inter > smallest:
        raise KdpipeError(
            f"--k-inter {s.k_inter} asks for more sub-classes than the {smallest} inter vectors of the "
            f"demo's smallest class; pass at most {smallest}."
        )


def _draw_pictures(store, ckpt, s: DemoSettings, rows: list, report: Path) -> dict:
    """The report's three pictures: students' curves, the teacher's CAMs, letKD's sub-classes."""
    from kdpipe.artifacts import open_store
    from kdpipe.data import load_dataset
    from kdpipe.models import load_teacher
    from kdpipe.stages.cluster import plot_subclasses
    from kdpipe.stages.inspect import plot_cams

    reader = open_store(store)
    train_set = load_dataset(DATA, "train")
    teacher_model = load_teacher(s.teacher_arch, str(ckpt), train_set.num_classes)
    return {
        "curves": str(plot_student_curves(_curves_by_label(rows), report / "curves.png")),
        "cams": str(plot_cams(reader, train_set, 8, report / "cams.png", teacher=teacher_model)),
        "subclasses": str(plot_subclasses(reader, TARGET_SET, 6, report / "subclasses.png", train_set)),
    }


def run_demo(
    out: str | Path = "kdpipe-demo",
    fast: bool = False,
    settings: DemoSettings | None = None,
    verbose: bool = True,
    **overrides,
) -> dict:
    """Run the demo into ``out``; return a summary with the results table and report paths.

    ``settings`` (or keyword ``overrides`` of DemoSettings fields) replace the FULL/FAST presets;
    tests use them to cut the demo down further."""
    s = settings or (FAST if fast else FULL)
    if overrides:
        s = replace(s, **overrides)
    out = Path(out)
    _check_settings(s, out)
    t0 = time.perf_counter()
    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)

    ckpt, teacher, teacher_reused = _teacher_stage(out, s, verbose)
    store, store_info = _store_stage(
        out / "store.zarr", ckpt, s, s.views, verbose, store_methods(s.students + s.store_students)
    )
    cluster_info = _cluster_stage(store, s, store_info["reused"], verbose)
    stores = {"replay": store}
    if any(_run_spec(label)[4] == SUBSAMPLED_SET for label in s.students):
        _cluster_stage(
            store, s, store_info["reused"], verbose, name=SUBSAMPLED_SET, max_fit_points=SUBSAMPLED_FIT_POINTS
        )
    if any(_run_spec(label)[3] == "warp" for label in s.students):
        # Warp draws fresh augmentations and warps the identity view's maps: a 1-view store.
        stores["warp"], _ = _store_stage(out / "store-1view.zarr", ckpt, s, "1", verbose)
    rows = _student_runs(stores, ckpt, out, s, verbose)
    pictures = _draw_pictures(store, ckpt, s, rows, report)
    table = results_table(rows)
    wall = time.perf_counter() - t0
    store_bytes = _store_bytes(store)
    results_md = _write_report(report, s, teacher, teacher_reused, store_info, cluster_info, store_bytes, table, wall)
    summary = {
        "settings": asdict(s),
        "teacher": teacher,
        "teacher_reused": teacher_reused,
        "store": str(store),
        "store_reused": store_info["reused"],
        "store_bytes": store_bytes,
        "extract_seconds": store_info["extract_seconds"],
        "cluster_reused": cluster_info["reused"],
        "cluster_seconds": cluster_info["cluster_seconds"],
        "runs": rows,
        "table": table,
        "wall_seconds": wall,
        "report": {"results": str(results_md), **pictures},
    }
    (report / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    if verbose:
        print((report / "results.md").read_text())
        print(f"[demo] report written to {report}/ in {wall:.1f} s")
    return summary

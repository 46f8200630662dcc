"""The digits accuracy table: what distillation buys in the data-reduction regime, cached
against the references' online training, and the letKD ablation.

Teacher (resnet20) trained on the full digits train split; resnet8 students trained on a
fixed, seeded 10% subset of it, same epochs for all, top-1 on the full test split; every
method from one default store (every one of the 81 views, replayed), kd, cat_kd, letkd1 and
letkd2 with the online teacher on fresh random views (the references' training), cat_kd from
a 1-view store with warp; mean and std over seeds. Bar: each cached method within noise of
its online counterpart (mean difference below the larger std, or below 1 point).

The comparison methods of both papers (every registered method beyond the headline ones; ``COMPARISON_STUDENTS``) run
cached and online too, with their references' default settings; ``--students`` picks the
runs (default: every table, ablation and comparison run).

letKD ablation (same seeds): the stored top-k against the whole softmax over all K_penult
centres computed online (``penult_target="full"``, as the reference computes it), and the
reference-exact fit (every identity-view vector) against a subsampled one.

    .venv/bin/python benchmarks/digits_accuracy.py --seeds 0,1,2 --out bench-out/digits_accuracy.json
    .venv/bin/python benchmarks/digits_accuracy.py --students comparison --seeds 0   # only the comparison runs

The store always holds the arrays of every run of ``--store-for`` (default: all), so the runs
can be split over processes that share one store and one teacher: start the second once the
first has made them (it prints "student ..."), then merge the JSON files:

    .venv/bin/python benchmarks/digits_accuracy.py --students table,ab,at --out a.json
    .venv/bin/python benchmarks/digits_accuracy.py --students fsp,fsp_online --out b.json
    .venv/bin/python benchmarks/digits_accuracy.py --merge a.json b.json --out digits_accuracy.json

It is `kdpipe demo` with every student run and several seeds, so a re-run reuses the teacher
and the stores in --work.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from kdpipe.runs.report import mean_std
from kdpipe.workflows.demo import ABLATION_STUDENTS, COMPARISON_STUDENTS, FULL, STUDENT_RUNS, TABLE_STUDENTS, run_demo

#: (cached, online) pairs of the bar; (stored top-k, variant) pairs of the ablation.
#: every cached run whose online twin (``<label>_online``) the demo defines: the headline
#: methods and every registered comparison method
PAIRS = tuple((label, f"{label}_online") for label in STUDENT_RUNS if f"{label}_online" in STUDENT_RUNS)
#: --students groups: each a tuple of demo student runs
GROUPS = {
    "table": TABLE_STUDENTS,
    "ablation": ABLATION_STUDENTS,
    "comparison": COMPARISON_STUDENTS,
    "all": TABLE_STUDENTS + ABLATION_STUDENTS + COMPARISON_STUDENTS,
}


def parse_students(text: str) -> tuple:
    """Comma-separated run labels and group names (table, ablation, comparison, all), in order."""
    chosen: list = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        for label in GROUPS.get(item, (item,)):
            if label not in STUDENT_RUNS:
                raise SystemExit(
                    f"unknown student run {label!r}; choose from {', '.join(GROUPS)} or {', '.join(STUDENT_RUNS)}"
                )
            if label not in chosen:
                chosen.append(label)
    return tuple(chosen)


ABLATION = (
    ("letkd1_online", "letkd1_online_full"),
    ("letkd2_online", "letkd2_online_full"),
    ("letkd1", "letkd1_subfit"),
    ("letkd2", "letkd2_subfit"),
)


def compare(rows: list, pairs) -> list:
    """Per pair: mean and std of final top-1 over seeds, the difference, and "within noise"
    (|difference| below the larger std, or below 1 point)."""
    out = []
    for a, b in pairs:
        ma, sa = mean_std([r["final_top1"] for r in rows if r["label"] == a])
        mb, sb = mean_std([r["final_top1"] for r in rows if r["label"] == b])
        diff = ma - mb
        out.append(
            {
                "a": a,
                "b": b,
                "a_mean": ma,
                "a_std": sa,
                "b_mean": mb,
                "b_std": sb,
                "difference": diff,
                "within_noise": bool(abs(diff) < max(sa, sb) or abs(diff) < 1.0),
            }
        )
    return out


def _present(pairs, students) -> tuple:
    """The pairs whose two runs were both run."""
    return tuple((a, b) for a, b in pairs if a in students and b in students)


def merge_results(parts: list[dict]) -> dict:
    """One results record from several runs of this benchmark on one teacher and one store:
    their runs side by side, the comparisons recomputed over all of them (a run label may come
    from several parts with other seeds: more seeds for it). Refuses parts whose settings
    (other than the runs and seeds) or teacher differ, or that ran a run with a seed twice."""
    first = parts[0]

    def same(part: dict) -> dict:
        return {k: v for k, v in part["settings"].items() if k not in ("students", "store_students", "seeds")}

    for part in parts[1:]:
        if same(part) != same(first) or part["teacher"]["checkpoint"] != first["teacher"]["checkpoint"]:
            raise SystemExit("the results to merge come from different settings or teachers")
    runs = [row for part in parts for row in part["runs"]]
    if len({(row["label"], row["seed"]) for row in runs}) != len(runs):
        raise SystemExit("the results to merge ran the same student run with the same seed twice")
    labels = list(dict.fromkeys(label for part in parts for label in part["settings"]["students"]))
    merged = dict(first)
    merged.update(
        {
            "command": " && ".join(part["command"] for part in parts),
            "settings": {
                **first["settings"],
                "students": labels,
                "seeds": sorted({row["seed"] for row in runs}),
            },
            "runs": runs,
            "cached_vs_online": compare(runs, _present(PAIRS, labels)),
            "letkd_ablation": compare(runs, _present(ABLATION, labels)),
            "table": [row for part in parts for row in part["table"]],
            "wall_seconds": [part["wall_seconds"] for part in parts],
            "merged_from": len(parts),
        }
    )
    return merged


def markdown_pairs(result: dict) -> str:
    """The cached-vs-online bar as the Markdown table docs/BENCHMARKS.md shows."""
    lines = [
        "| method | seeds | cached (store) | online teacher, fresh views | difference | within noise |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for pair in result["cached_vs_online"]:
        seeds = len({r["seed"] for r in result["runs"] if r["label"] == pair["a"]})
        lines.append(
            f"| {pair['a']} | {seeds} | {pair['a_mean']:.2f} ± {pair['a_std']:.2f} "
            f"| {pair['b_mean']:.2f} ± {pair['b_std']:.2f} "
            f"| {pair['difference']:+.2f} | {'yes' if pair['within_noise'] else '**no**'} |"
        )
    return "\n".join(lines)


def _write(result: dict, out: str) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2, default=str))
    print(markdown_pairs(result))
    print(f"wrote {out}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--student-epochs", type=int, default=FULL.student_epochs)
    parser.add_argument("--teacher-epochs", type=int, default=FULL.teacher_epochs)
    parser.add_argument("--executor", default="ray", choices=["ray", "inline"])
    parser.add_argument("--work", default="bench-out/digits")
    parser.add_argument("--out", default="bench-out/digits_accuracy.json")
    parser.add_argument(
        "--students", default="all", help="runs, comma-separated: labels or groups (table, ablation, comparison, all)"
    )
    parser.add_argument(
        "--store-for",
        default="all",
        help="runs whose teacher arrays the store holds (labels or groups), so split runs share one store",
    )
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="merge these results files into --out")
    args = parser.parse_args(argv)
    if args.merge:
        _write(merge_results([json.loads(Path(p).read_text()) for p in args.merge]), args.out)
        return
    students = parse_students(args.students)

    seeds = tuple(int(x) for x in args.seeds.split(","))
    t0 = time.perf_counter()
    summary = run_demo(
        out=args.work,
        students=students,
        seeds=seeds,
        executor=args.executor,
        student_epochs=args.student_epochs,
        teacher_epochs=args.teacher_epochs,
        views="auto",  # every one of the 81 views (the demo itself stores 8, for time)
        store_students=parse_students(args.store_for),
    )
    result = {
        "benchmark": "digits_accuracy",
        "command": "python benchmarks/digits_accuracy.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "device": "cpu",
        },
        "settings": summary["settings"],
        "teacher": summary["teacher"],
        "table": summary["table"],
        "cached_vs_online": compare(summary["runs"], _present(PAIRS, students)),
        "letkd_ablation": compare(summary["runs"], _present(ABLATION, students)),
        "runs": summary["runs"],
        "store_bytes": summary["store_bytes"],
        "wall_seconds": time.perf_counter() - t0,
    }
    _write(result, args.out)


if __name__ == "__main__":
    main()

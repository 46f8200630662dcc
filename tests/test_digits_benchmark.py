"""benchmarks/digits_accuracy.py's bookkeeping: run groups, the within-noise bar, and merging
results of runs split over processes that share one teacher and one store."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from kdpipe.errors import KdpipeError
from kdpipe.workflows.demo import COMPARISON_STUDENTS, DemoSettings, run_demo

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "digits_accuracy.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("digits_accuracy", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _part(students, rows, teacher="t.pth", epochs=40, seed=0):
    settings = {"student_epochs": epochs, "students": list(students), "store_students": ["x"], "seeds": [seed]}
    return {
        "command": f"python benchmarks/digits_accuracy.py --students {','.join(students)}",
        "settings": settings,
        "teacher": {"checkpoint": teacher},
        "table": [],
        "runs": [{"label": label, "seed": seed + i, "final_top1": top1} for i, (label, top1) in enumerate(rows)],
        "wall_seconds": 1.0,
    }


def test_groups_cover_every_method_cached_and_online(bench):
    students = bench.parse_students("all")
    pairs = bench._present(bench.PAIRS, students)
    from kdpipe.methods import available

    cached = {a for a, _ in pairs}
    assert set(available()) - {"ce"} <= cached  # every method but CE has a cached/online pair
    assert set(COMPARISON_STUDENTS) <= set(students)
    with pytest.raises(SystemExit, match="unknown student run"):
        bench.parse_students("kd,nope")


def test_within_noise_bar(bench):
    rows = [{"label": "a", "final_top1": v} for v in (80.0, 82.0, 84.0)]
    rows += [{"label": "b", "final_top1": v} for v in (78.0, 79.0, 80.0)]
    (result,) = bench.compare(rows, [("a", "b")])
    assert result["difference"] == pytest.approx(3.0) and result["a_std"] == pytest.approx(2.0)
    assert result["within_noise"] is False  # 3 points: above both the larger std (2) and 1 point
    rows[-1]["final_top1"] = 86.0  # b's spread now exceeds the difference
    assert bench.compare(rows, [("a", "b")])[0]["within_noise"] is True


def test_merge_recomputes_pairs_across_parts(bench):
    first = _part(["kd", "kd_online"], [("kd", 90.0), ("kd", 91.0), ("kd_online", 90.5), ("kd_online", 90.0)])
    second = _part(["at", "at_online"], [("at", 80.0), ("at", 82.0), ("at_online", 81.0), ("at_online", 81.5)])
    merged = bench.merge_results([first, second])
    assert merged["settings"]["students"] == ["kd", "kd_online", "at", "at_online"]
    assert len(merged["runs"]) == 8 and merged["merged_from"] == 2
    assert [(p["a"], p["b"]) for p in merged["cached_vs_online"]] == [("kd", "kd_online"), ("at", "at_online")]
    assert " && " in merged["command"]
    with pytest.raises(SystemExit, match="different settings or teachers"):
        bench.merge_results([first, _part(["at"], [("at", 1.0)], teacher="other.pth")])
    with pytest.raises(SystemExit, match="different settings or teachers"):
        bench.merge_results([first, _part(["at"], [("at", 1.0)], epochs=3)])
    with pytest.raises(SystemExit, match="same seed twice"):
        bench.merge_results([first, first])
    # more seeds for a run label: its rows join the pair
    more = _part(["kd", "kd_online"], [("kd", 92.0), ("kd_online", 91.0)], seed=10)
    merged = bench.merge_results([first, second, more])
    assert merged["settings"]["students"] == ["kd", "kd_online", "at", "at_online"]
    assert merged["cached_vs_online"][0]["a_mean"] == pytest.approx(91.0)


def test_store_for_names_known_runs(tmp_path):
    with pytest.raises(KdpipeError, match="Unknown demo student run 'nope'"):
        run_demo(out=tmp_path, settings=DemoSettings(students=("ce",), store_students=("nope",)), verbose=False)


def test_markdown_table_of_the_bar(bench):
    first = _part(["kd", "kd_online"], [("kd", 90.0), ("kd", 91.0), ("kd_online", 80.0), ("kd_online", 80.5)])
    table = bench.markdown_pairs(bench.merge_results([first]))
    assert "| kd | 2 | 90.50 ± 0.71 | 80.25 ± 0.35 | +10.25 | **no** |" in table

"""`kdpipe demo --fast` on a cut-down setting: the report is complete, and a re-run reuses the
teacher and the store instead of making them again."""

import json

import pytest

from kdpipe.cli import cli

pytestmark = pytest.mark.slow


def test_demo_fast_writes_report_and_reuses_teacher_and_store(cli_runner, tmp_path):
    out = tmp_path / "demo"
    args = [
        "demo",
        "--fast",
        "--out",
        str(out),
        "--executor",
        "inline",
        "--teacher-epochs",
        "1",
        "--student-epochs",
        "1",
        "--views",
        "1",
        "--k-penult",
        "16",
    ]
    first = cli_runner.invoke(cli, args)
    assert first.exit_code == 0, first.output
    report = out / "report"
    for name in ("results.md", "curves.png", "cams.png", "subclasses.png", "summary.json"):
        assert (report / name).stat().st_size > 0, name
    results = (report / "results.md").read_text()
    for label in ("ce", "kd", "cat_kd", "letkd1", "letkd2", "cat_kd_online"):
        assert f"| {label} |" in results
    summary = json.loads((report / "summary.json").read_text())
    assert not summary["teacher_reused"] and not summary["store_reused"]
    assert summary["store_bytes"] > 0

    second = cli_runner.invoke(cli, args)
    assert second.exit_code == 0, second.output
    assert "reusing the teacher" in second.output
    assert "reusing the store" in second.output
    again = json.loads((report / "summary.json").read_text())
    assert again["teacher_reused"] and again["store_reused"] and again["cluster_reused"]
    assert again["teacher"]["checkpoint"] == summary["teacher"]["checkpoint"]


def test_demo_rejects_bad_seeds(cli_runner, tmp_path):
    result = cli_runner.invoke(cli, ["demo", "--out", str(tmp_path), "--seeds", "a,b"])
    assert result.exit_code == 2
    assert "--seeds" in result.output

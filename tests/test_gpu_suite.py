"""benchmarks/gpu_suite.py in its CPU smoke mode: every part runs at toy size (or is skipped
with a note), the JSON has every part with a status and the figures the GPU run reports, and
the Markdown section is written. Keeps the suite from rotting before a GPU is lent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "benchmarks" / "gpu_suite.py"

# What each part reports when it runs (gpu_suite_stage_one.py, gpu_suite_stage_two.py); the headline table reads these.
EXPECTED = {
    "extract": {"extract_over_bare", "extract_img_per_s", "bare_img_per_s_runs", "executor"},
    "cluster": {"assign_img_per_s", "assign_over_bare", "kmeans_backend"},
    "train_methods": {
        "cached_kd_over_ce",
        "cached_dkd_over_ce",
        "cached_cat_kd_over_ce",
        "cached_letkd2_over_ce",
        "speedup_fraction_of_ideal_cat_kd",
        "ideal_speedup",
        "bars",
    },
    "train_tiers": {"host_over_device_cat_kd", "stream_over_device_letkd2", "tiers"},
    "amp": {"amp_cached_cat_kd_over_ce", "amp_over_fp32_ce"},
    "cli_training": {"img_per_s", "target_tier", "over_device"},
    "kmeans": {"seconds", "ran", "objective_sum"},
    "sweep": {"total_over_one", "one_trial_img_per_s", "how"},
    "extract_ray": {"extract_over_bare", "executor"},
    "ray_train": {"img_per_s", "final_top1"},
}
RAY_PARTS = {"extract_ray", "ray_train"}


def run_smoke(tmp_path: Path, *extra: str) -> tuple[dict, str]:
    out, md = tmp_path / "suite.json", tmp_path / "suite.md"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, str(SUITE), "--device", "cpu", "--smoke", "--out", str(out), "--md", str(md)]
    cmd += ["--budget-s", "1500", *extra]  # a loaded machine must not skip parts (a later --budget-s wins)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), md.read_text()


@pytest.mark.slow
def test_gpu_suite_smoke_on_cpu(tmp_path):
    res, md = run_smoke(tmp_path, "--no-ray")
    assert res["mode"] == "smoke" and res["device"] == "cpu"
    for key in ("date", "command", "torch", "cuda", "device_name", "packages", "total_seconds", "figures"):
        assert key in res, key
    assert list(res["parts"]) == list(EXPECTED)
    for name, entry in res["parts"].items():
        assert entry["status"] in ("ok", "skipped", "failed"), name
        assert isinstance(entry["seconds"], float), name
        if name in RAY_PARTS:  # --no-ray: skipped with a note saying why
            assert entry["status"] == "skipped" and "Ray" in entry["note"], entry
            continue
        assert entry["status"] == "ok", (name, entry.get("error"), entry.get("traceback"))
        assert EXPECTED[name] <= set(entry["figures"]), (name, sorted(entry["figures"]))
    assert res["parts"]["sweep"]["figures"]["how"] == "processes"
    assert res["failed"] == [] and set(res["skipped"]) == RAY_PARTS
    assert "train_methods.cached_cat_kd_over_ce" in res["figures"]
    assert md.startswith("### GPU suite: ") and "| cached CAT-KD step / CE step |" in md


@pytest.mark.slow
def test_gpu_suite_budget_skips_with_a_note(tmp_path):
    res, md = run_smoke(tmp_path, "--no-ray", "--budget-s", "1", "--only", "kmeans")
    entry = res["parts"]["kmeans"]
    assert entry["status"] == "skipped" and "budget" in entry["note"], entry
    assert res["parts"]["extract"]["note"] == "not asked for (--only)"
    assert "| kmeans | skipped |" in md


@pytest.mark.slow
@pytest.mark.ray
def test_gpu_suite_sweep_on_ray_tune_smoke(tmp_path):
    """The sweep part on Ray Tune (the other Ray parts, extract_ray and ray_train, call the stage
    functions the rest of the suite covers with executor="ray" / ray_train=True; running them
    too costs minutes of Ray start-up on 2 cores: run the smoke mode without --no-ray for them)."""
    pytest.importorskip("ray")
    res, _ = run_smoke(tmp_path, "--only", "sweep")
    entry = res["parts"]["sweep"]
    assert entry["status"] == "ok", (entry.get("error"), entry.get("traceback"))
    assert EXPECTED["sweep"] <= set(entry["figures"]) and entry["figures"]["how"] == "ray-tune"

"""RepDistiller's two-stage training (AB, FSP): the initialisation stage follows a shorter run
as the lr milestones do, unless it was given (kdpipe/methods/two_stage.py)."""

import pytest

from kdpipe.config.configs import StudentConfig
from kdpipe.methods import get_method
from kdpipe.stages.train import resolve_offline


def _resolved(method: str, **fields) -> dict:
    cfg = StudentConfig(store="store.zarr", teacher_arch="resnet20", student="resnet8", method=method, **fields)
    return resolve_offline(cfg)


@pytest.mark.parametrize("method", ["ab", "fsp"])
def test_shorter_runs_scale_an_unset_initialisation(method):
    full = _resolved(method)
    # RepDistiller: --init_epochs 30, then 240 epochs stepped at 150/180/210
    assert full["epochs"] == 270 and full["milestones"] == [180, 210, 240]
    assert full["method_resolved"]["init_epochs"] == 30
    short = _resolved(method, epochs=40)
    # the milestones scale to 40 * m / 270; so does the initialisation: round(30 * 40 / 270)
    assert short["milestones"] == [27, 31, 36] and short["method_resolved"]["init_epochs"] == 4
    given = _resolved(method, epochs=40, method_options={"init_epochs": 30})
    assert given["method_resolved"]["init_epochs"] == 30
    assert _resolved(method, epochs=540)["method_resolved"]["init_epochs"] == 60


def test_the_stage_switch_follows_the_scaled_initialisation():
    method = get_method("fsp")
    method.scale_to_run(40, 270)
    method.scale_to_run(40, 270)  # train-student and --print-config may both ask: same answer
    assert method.options["init_epochs"] == 4
    method.begin_epoch(3)
    assert method.initialising
    method.begin_epoch(4)
    assert not method.initialising
    assert method.recipe("resnet8")["epochs"] == 270  # the reference's length, whatever the run's


def test_a_sum_scales_its_parts():
    resolved = _resolved("ab+kd", epochs=40)["method_resolved"]
    assert resolved["ab"]["init_epochs"] == 4


def test_the_second_stage_restarts_the_optimizer_once():
    method = get_method("ab", init_epochs=3)
    assert [e for e in range(10) if method.restarts_optimizer(e)] == [3]
    assert not any(get_method("fsp", init_epochs=0).restarts_optimizer(e) for e in range(5))
    assert not any(get_method("kd").restarts_optimizer(e) for e in range(5))
    total = get_method("kd+fsp", fsp={"init_epochs": 2})
    assert [e for e in range(5) if total.restarts_optimizer(e)] == [2]

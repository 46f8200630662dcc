"""The shard executor: inline and Ray give the same results; a killed worker is retried."""

import os
import sys

import pytest

from kdpipe.errors import StoreError
from kdpipe.pipeline.executor import FAULT_ENV, plan, ray_cluster, run_shards

pytestmark = pytest.mark.ray


class SumWorker:
    """Built once per worker; returns the sum of its shard's sample indices and its pid."""

    def __init__(self, offset=0, fail_shard=None):
        self.offset = offset
        self.fail_shard = fail_shard
        self.built_pid = os.getpid()

    def run(self, shard):
        if shard.shard_id == self.fail_shard:
            raise StoreError("The disk is full.")
        return {"shard": shard.shard_id, "sum": sum(range(shard.start, shard.stop)) + self.offset,
                "pid": os.getpid()}


@pytest.fixture(scope="module")
def ray_local():
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    with ray_cluster(num_cpus=2) as ray:
        yield ray


def test_plan_is_contiguous():
    shards = plan(20, 8)
    assert [(s.start, s.stop) for s in shards] == [(0, 8), (8, 16), (16, 20)]
    assert sum(s.size for s in shards) == 20


def test_inline_runs_every_shard_in_order():
    seen = []
    out = run_shards(SumWorker, {"offset": 1}, plan(20, 8), executor="inline", progress=False,
                     on_result=lambda s, r: seen.append(s.shard_id))
    assert [r["sum"] for r in out] == [29, 93, 71]
    assert seen == [0, 1, 2]
    assert {r["pid"] for r in out} == {os.getpid()}


def test_ray_matches_inline_and_a_killed_worker_is_retried(ray_local, tmp_path, monkeypatch):
    shards = plan(48, 4)
    inline = run_shards(SumWorker, {"offset": 1}, shards, executor="inline", progress=False)
    marker = tmp_path / "killed"
    monkeypatch.setenv(FAULT_ENV, f"3:{marker}")
    remote = run_shards(SumWorker, {"offset": 1}, shards, executor="ray", progress=False)
    assert marker.exists()  # the worker running shard 3 died once, was restarted, shard 3 retried
    assert [r["sum"] for r in remote] == [r["sum"] for r in inline]
    assert len({r["pid"] for r in remote}) >= 2  # two actors on two CPU slots (+ a restarted one)
    # the local cluster listens on loopback only
    gcs = ray_local.get_runtime_context().gcs_address
    assert gcs.startswith("127.0.0.1:"), gcs
    assert ray_local.util.get_node_ip_address() == "127.0.0.1"
    for node in ray_local.nodes():
        assert node["NodeManagerAddress"] == "127.0.0.1"


def test_worker_error_reaches_driver_as_itself():
    # inline: raised as is; Ray: a RayTaskError is unwrapped to its cause (a one-sentence
    # KdpipeError stays one sentence, an OSError stays an OSError)
    with pytest.raises(StoreError, match=r"^The disk is full\.$"):
        run_shards(SumWorker, {"fail_shard": 2}, plan(32, 4), executor="inline", progress=False)
    from ray.exceptions import RayTaskError

    from kdpipe.pipeline.executor import _unwrap

    cause = OSError(28, "No space left on device")
    assert _unwrap(RayTaskError("run", "traceback", cause)) is cause

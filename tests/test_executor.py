"""The shard executor, inline. Its Ray side (two actors, a killed worker restarted and its shard
retried, loopback-only local cluster) is tested end to end in tests/test_extract.py, so the
suite starts Ray once."""

import os

import pytest

from kdpipe.distributed.executor import plan, run_shards
from kdpipe.errors import StoreError


class SumWorker:
    """Built once per worker; returns the sum of its shard's sample indices and its pid."""

    def __init__(self, offset=0, fail_shard=None):
        self.offset = offset
        self.fail_shard = fail_shard
        self.built_pid = os.getpid()

    def run(self, shard):
        if shard.shard_id == self.fail_shard:
            raise StoreError("The disk is full.")
        return {"shard": shard.shard_id, "sum": sum(range(shard.start, shard.stop)) + self.offset, "pid": os.getpid()}


def test_plan_is_contiguous():
    shards = plan(20, 8)
    assert [(s.start, s.stop) for s in shards] == [(0, 8), (8, 16), (16, 20)]
    assert sum(s.size for s in shards) == 20


def test_inline_runs_every_shard_in_order():
    seen = []
    out = run_shards(
        SumWorker,
        {"offset": 1},
        plan(20, 8),
        executor="inline",
        progress=False,
        on_result=lambda s, r: seen.append(s.shard_id),
    )
    assert [r["sum"] for r in out] == [29, 93, 71]
    assert seen == [0, 1, 2]
    assert {r["pid"] for r in out} == {os.getpid()}


def test_worker_error_reaches_driver_as_itself():
    # inline: raised as is; Ray: a RayTaskError is unwrapped to its cause (a one-sentence
    # KdpipeError stays one sentence, an OSError stays an OSError)
    with pytest.raises(StoreError, match=r"^The disk is full\.$"):
        run_shards(SumWorker, {"fail_shard": 2}, plan(32, 4), executor="inline", progress=False)
    from ray.exceptions import RayTaskError

    from kdpipe.distributed.executor import _unwrap

    cause = OSError(28, "No space left on device")
    assert _unwrap(RayTaskError("run", "traceback", cause)) is cause

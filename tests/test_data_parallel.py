"""Data-parallel students on Ray Train (2 CPU workers, gloo) from the session's tiny store.

The first step of 2 workers equals an independent computation: the global batch split as the
workers split it (every other position of the epoch plan), each half's loss and gradient with
its own BatchNorm statistics (per worker, as mdistiller's DataParallel), gradients averaged,
one SGD step. A run whose worker is killed resumes to the same weights as an unbroken one.
"""

import os

import pytest
import torch

from kdpipe.config.configs import StudentConfig
from kdpipe.errors import KdpipeError
from kdpipe.stages.train import train_student

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _cfg(store, **kw):
    base = dict(
        store=store["path"],
        student="resnet8",
        method="cat_kd",
        method_options={"beta": 1.0},
        epochs=1,
        batch_size=32,
        lr=0.01,
        seed=3,
        data_parallel=2,
    )
    base.update(kw)
    return StudentConfig(**base)


def _weights(run_dir):
    return torch.load(os.path.join(run_dir, "checkpoints", "latest.pth"), weights_only=True)["model"]


def _expected_first_step(cfg):
    """One step of the 2-worker run computed in this process, half batch by half batch."""
    from kdpipe.data import normalize
    from kdpipe.engine.parallel import Forward
    from kdpipe.engine.schedule import make_optimizer
    from kdpipe.models import build
    from kdpipe.stages.train import make_target_source, resolve_student, resolved_head, student_loss_fn

    setup = resolve_student(cfg.with_absolute_paths())
    r = setup.recipe
    torch.manual_seed(cfg.seed)
    head = resolved_head(cfg, setup.method)
    model = setup.method.prepare_student(build(cfg.student, setup.train_set.num_classes, head=head), setup.target_set)
    net = Forward(model).train()
    opt = make_optimizer(model, r["lr"], r["momentum"], r["weight_decay"], r["nesterov"])
    source = make_target_source(setup, torch.device("cpu"))
    plan = source.plan(torch.arange(len(setup.train_set)), cfg.seed, 0)
    loss_fn = student_loss_fn(model, setup.method)
    grads, losses, stats = [], [], None
    for rank in (0, 1):
        part = plan.shard(rank, 2)
        batch = next(part.batches(r["batch_size"] // 2))
        images = setup.policy.apply_images(setup.train_set.get_batch(batch.indices.numpy()), batch.params)
        x = normalize(images, setup.train_set.mean, setup.train_set.std)
        labels = torch.as_tensor(setup.train_set.labels[batch.indices.numpy()])
        source.begin_epoch(part, r["batch_size"] // 2)
        model.zero_grad(set_to_none=True)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        total, _, _ = loss_fn(net, x, labels, source.targets(batch, x, labels))
        total.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        losses.append(float(total.detach()))
        if rank == 0:  # rank 0's BatchNorm running statistics are the ones checkpointed
            stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
        model.load_state_dict(before)  # the second half starts from the same weights and buffers
    for p, g0, g1 in zip(model.parameters(), *grads):
        p.grad = (g0 + g1) / 2
    opt.step()
    state = model.state_dict()
    state.update(stats)
    return state, sum(losses) / 2


def test_two_workers_first_step_equals_the_split_batch_computation(tiny_store, tmp_path):
    cfg = _cfg(tiny_store)
    summary = train_student(cfg, out=tmp_path, progress=False, plot=False)
    assert summary["data_parallel"] == 2
    got = _weights(summary["run_dir"])
    want, loss = _expected_first_step(cfg)
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key].float(), want[key].float(), rtol=1e-4, atol=1e-5, msg=key)
    import csv

    with open(os.path.join(summary["run_dir"], "metrics.csv"), newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert float(row["train_loss"]) == pytest.approx(loss, rel=1e-4)  # the mean of the workers' losses


def test_a_killed_two_worker_run_resumes_to_the_unbroken_weights(tiny_store, tmp_path):
    cfg = _cfg(tiny_store, epochs=3, batch_size=16)
    unbroken = train_student(cfg, out=tmp_path / "unbroken", progress=False, plot=False)

    def kill_rank_1_after_epoch_1(epoch):
        from kdpipe.engine.parallel import Workers

        if epoch == 1 and Workers.current().rank == 1:
            os._exit(1)

    with pytest.raises(KdpipeError, match="--resume"):
        train_student(cfg, out=tmp_path / "killed", progress=False, plot=False, after_epoch=kill_rank_1_after_epoch_1)
    (run_dir,) = list((tmp_path / "killed").iterdir())
    assert torch.load(run_dir / "checkpoints" / "latest.pth", weights_only=True)["epoch"] == 1
    resumed = train_student(resume=str(run_dir), progress=False, plot=False)
    a, b = _weights(unbroken["run_dir"]), _weights(resumed["run_dir"])
    for key in a:
        torch.testing.assert_close(a[key].float(), b[key].float(), rtol=1e-5, atol=1e-6, msg=key)

"""The epoch loop shared by teacher training (``stages.teacher``) and student training
(``stages.train``).

Every epoch: the target source's plan (``kdpipe.engine.plan``: order, replayed views, view
parameters; a pure function of seed and epoch), images batch by batch in that order
(``kdpipe.engine.data``), the batch's targets from the source (``kdpipe.engine.sources``),
the method's loss, an SGD step. After every epoch: test top-1/top-5, one metrics row, the
checkpoint. A cached-KD step therefore differs from a CE step only by the method's loss and
a gather of its targets.

Reproducibility: each epoch's plan and the global torch RNG are seeded from ``(seed, epoch)``,
so a run resumed at an epoch boundary draws exactly what an unbroken run would; model,
optimizer, scheduler and RNG states come from the checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from kdpipe.data import normalize
from kdpipe.engine.device import autocast, make_grad_scaler
from kdpipe.engine.loggers import EpochLoggers
from kdpipe.engine.parallel import Workers, wrap_for_training
from kdpipe.engine.plan import SALT_TORCH, epoch_seed, steps_per_epoch
from kdpipe.errors import KdpipeError

#: ``loss_fn(net, images_normalized, labels, targets) -> (total, parts, logits)``, ``net`` the
#: loop's ``kdpipe.engine.parallel.Forward``: ``net(x)`` logits, ``net(x, features=True)``
#: (logits, feature dict)
LossFn = Callable


# ----------------------------------------------------------------------------- resume
def restore_training_state(
    run, model, optimizer, scheduler, device, truncate: bool = True
) -> tuple[int, dict, dict | None]:
    """Load a run's latest checkpoint into ``model``, ``optimizer``, ``scheduler`` and the RNGs,
    and (``truncate``: the one process that writes metrics) drop metric rows past it, so the
    resumed run continues exactly where it stopped.

    Returns (start_epoch, best {"top1", "epoch"}, grad-scaler state or None)."""
    from kdpipe.engine.state import load_scheduler_state, restore_rng_state

    state = run.load_checkpoint(map_location=device)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    load_scheduler_state(scheduler, state["scheduler"])
    restore_rng_state(state.get("rng", {}))
    start_epoch = int(state["epoch"])
    best = {"top1": float(state.get("best_top1", -1.0)), "epoch": int(state.get("best_epoch", 0))}
    if truncate:
        run.truncate_metrics(start_epoch)
    return start_epoch, best, state.get("scaler")


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_model(model: torch.nn.Module, data, batch_size: int = 256, amp: bool = False) -> dict:
    """Top-1 / top-5 (percent) and mean CE on ``data`` (a ``DeviceData``) without augmentation."""
    was_training = model.training
    model.eval()
    device = data.device
    correct1 = torch.zeros((), dtype=torch.int64, device=device)
    correct5 = torch.zeros((), dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    n = 0
    for idx, imgs in data.eval_batches(batch_size):
        labels = data.labels_of(idx)
        with autocast(device, amp):
            logits = model(normalize(imgs, data.mean, data.std))
        logits = logits.float()
        if logits.shape[1] <= int(labels.max()):
            raise KdpipeError(
                f"The model has {logits.shape[1]} outputs but the data set has labels up to "
                f"{int(labels.max())}; evaluate it on data with as many classes."
            )
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top.eq(labels[:, None])
        correct1 += hit[:, 0].sum()
        correct5 += hit.any(dim=1).sum()
        n += int(idx.numel())
    model.train(was_training)
    n = max(n, 1)
    return {"top1": 100.0 * correct1.item() / n, "top5": 100.0 * correct5.item() / n, "loss": loss_sum.item() / n}


# ----------------------------------------------------------------------------- training
class NonFiniteLoss(KdpipeError):
    """The loss became NaN or infinite."""


def train_step(model, loss_fn: LossFn, source, optimizer, scaler, train, batch, images, amp: bool = False):
    """One step on a batch: normalise the (already augmented) uint8 images, the batch's targets
    from ``source`` (outside autocast), the loss, backward, SGD step. Returns (loss, parts,
    logits, labels), nothing synchronised. ``fit`` and benchmarks/train_step.py use it."""
    device = train.device
    x = normalize(images, train.mean, train.std)
    labels = train.labels_of(batch.indices)
    targets = source.targets(batch, x, labels)
    with autocast(device, amp):
        total, parts, logits = loss_fn(model, x, labels, targets)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total).backward()
    scaler.step(optimizer)
    scaler.update()
    return total, parts, logits, labels


@dataclass
class FitSpec:
    """Everything one ``fit`` call trains with (teacher, student and data-parallel training).

    ``train``/``test``: ``DeviceData``; ``source``: a target source (``engine.sources``);
    ``loss_fn``: ``LossFn``; ``policy``: the data set's augmentation policy; ``run``: the run
    directory (``kdpipe.runs.rundir.RunDir`` or anything with its methods); ``workers``:
    data-parallel workers (None: this process alone); ``start_epoch``/``best``/``scaler_state``:
    where a resumed run continues; ``on_step(epoch, step, loss, parts)`` sees every step and
    ``after_epoch(epoch)`` runs after each epoch's checkpoint (tests use both); ``wandb``: a
    Weights & Biases project (``kdpipe.engine.loggers``)."""

    model: torch.nn.Module
    train: Any
    test: Any
    source: Any
    loss_fn: LossFn
    policy: Any
    epochs: int
    batch_size: int
    optimizer: Any
    scheduler: Any
    run: Any
    drop_last: bool = False  # drop each epoch's last incomplete batch (letKD's reference)
    workers: Workers | None = None
    sync_bn: bool = False
    seed: int = 0
    amp: bool = False
    start_epoch: int = 0
    best: dict | None = None
    progress: bool = True
    desc: str = "train"
    eval_batch_size: int = 256
    plot: bool = True
    on_step: Callable | None = None
    after_epoch: Callable | None = None
    scaler_state: dict | None = None
    wandb: str | None = None


def fit(spec: FitSpec) -> dict:
    """Train ``spec.model`` from ``spec.start_epoch`` to ``spec.epochs``; after every epoch:
    test top-1/top-5, one metrics row (metrics.csv, TensorBoard, W&B), ``checkpoints/latest.pth``
    (full state) and ``best.pth``; at the end the curves PNG (``spec.plot``). With
    ``spec.workers`` (data-parallel, ``kdpipe.engine.parallel``) every worker runs this with its
    share of each batch; rank 0 evaluates, logs and checkpoints. Returns {"best_top1",
    "best_epoch", "final": last metrics row, "images", "train_seconds"}."""
    workers = spec.workers or Workers()
    train, run, epochs, scheduler = spec.train, spec.run, spec.epochs, spec.scheduler
    scaler = make_grad_scaler(train.device, spec.amp)
    if spec.scaler_state and scaler.is_enabled():
        scaler.load_state_dict(spec.scaler_state)
    r = _FitRun(
        model=spec.model,
        net=wrap_for_training(
            spec.model,
            workers,
            train.device,
            spec.sync_bn,
            find_unused=bool(getattr(spec.loss_fn, "leaves_parameters_unused", False)),
        ),
        workers=workers,
        train=train,
        test=spec.test,
        source=spec.source,
        loss_fn=spec.loss_fn,
        policy=spec.policy,
        epochs=epochs,
        batch_size=spec.batch_size,
        drop_last=spec.drop_last,
        optimizer=spec.optimizer,
        scheduler=scheduler,
        scaler=scaler,
        run=run,
        seed=spec.seed,
        amp=spec.amp,
        progress=spec.progress and workers.is_main,
        desc=spec.desc,
        eval_batch_size=spec.eval_batch_size,
        on_step=spec.on_step,
        loggers=EpochLoggers.for_run(run, spec.start_epoch, spec.wandb) if workers.is_main else None,
    )
    if r.progress:
        _print_schedule(spec)
    best = dict(spec.best or {"top1": -1.0, "epoch": 0})
    images_seen, train_seconds, last_row = 0, 0.0, {}
    try:
        for epoch in range(spec.start_epoch, epochs):
            row, seen, dt = _train_epoch(r, epoch)
            scheduler.step()
            train_seconds += dt
            images_seen += seen
            if workers.is_main:
                row.update({"img_per_s": seen / dt if dt > 0 else float("nan"), "epoch_seconds": dt})
                best = _finish_epoch(r, row, best, epoch)
                last_row = row
                if epoch == 0:
                    warn_loss_scale(row, getattr(spec.loss_fn, "weight_options", ()))
                if epoch == spec.start_epoch and r.progress and epochs > epoch + 1:
                    _say_time_left(spec.desc, dt, epochs - epoch - 1, train.device)
            workers.barrier()
            if spec.after_epoch is not None:
                spec.after_epoch(epoch + 1)
    finally:
        spec.source.close()
        if r.loggers is not None:
            r.loggers.close()
    if spec.plot and workers.is_main:
        _plot_curves(run)
    return {
        "best_top1": best["top1"] if best["top1"] >= 0 else None,
        "best_epoch": best["epoch"],
        "final": last_row,
        "images": images_seen,
        "train_seconds": train_seconds,
    }


def _say_time_left(desc: str, epoch_seconds: float, epochs_left: int, device) -> None:
    """After the first epoch: the time left at its pace; hours on a CPU name the quick trial."""
    from tqdm.auto import tqdm

    left, fmt = epoch_seconds * epochs_left, tqdm.format_interval
    line = f"{desc}: an epoch takes {fmt(epoch_seconds)}; about {fmt(left)} of training left"
    if left >= 3600 and torch.device(device).type == "cpu":
        line += ". Hours on CPU: --subset-fraction 0.1 or fewer --epochs makes a quick trial"
    tqdm.write(line)


def _print_schedule(spec: FitSpec) -> None:
    """The resolved lr schedule, before the first epoch (scaled milestones surprise on short runs)."""
    from tqdm.auto import tqdm

    from kdpipe.engine.schedule import describe_schedule

    steps = getattr(spec.scheduler, "milestones", None)
    if steps is None:
        return
    base = spec.scheduler.base_lrs[0]
    tqdm.write(f"{spec.desc}: {describe_schedule(base, spec.epochs, steps.elements(), spec.scheduler.gamma)}")


#: how many times the CE term the rest of the loss may weigh in epoch 1 before kdpipe says so.
#: CAT-KD's default beta 15 on digits: 447 against CE 2.3 (193-fold; 21% top-1 after 15 epochs),
#: and 298 against a diverging CE of 6.1 (48-fold; 10% top-1 after 3); beta 1 trains to 96%.
LOSS_SCALE_WARNING = 20.0


def loss_scale_warning(row: dict, options=()) -> str | None:
    """The warning for an epoch whose distillation terms outweigh cross-entropy by orders of
    magnitude (from the row's ``train_loss`` and ``loss_ce``), naming the weight options."""
    ce, total = row.get("loss_ce"), row.get("train_loss")
    if not ce or total is None or not (ce > 0) or (total - ce) < LOSS_SCALE_WARNING * ce:
        return None
    flags = " or ".join("--" + name.replace("_", "-") for name in options) or "the distillation weight"
    return (
        f"kdpipe: warning: in epoch 1 the distillation term outweighs cross-entropy {(total - ce) / ce:.0f}-fold "
        f"(loss {total:.4g} against CE {ce:.3g}); a student may learn little that way: try a smaller {flags}."
    )


def warn_loss_scale(row: dict, options=()) -> None:
    message = loss_scale_warning(row, options)
    if message:
        from tqdm.auto import tqdm

        tqdm.write(message)


@dataclass
class _FitRun:
    """What every epoch of one ``fit`` call uses (built once by ``fit``)."""

    model: torch.nn.Module
    net: torch.nn.Module  # the model as trained (DDP-wrapped with several workers)
    workers: Workers
    train: Any
    test: Any
    source: Any
    loss_fn: LossFn
    policy: Any
    epochs: int
    batch_size: int
    optimizer: Any
    scheduler: Any
    scaler: Any
    run: Any
    seed: int
    amp: bool
    progress: bool
    desc: str
    eval_batch_size: int
    on_step: Callable | None
    loggers: EpochLoggers | None
    drop_last: bool = False


def _finish_epoch(r: _FitRun, row: dict, best: dict, epoch: int) -> dict:
    """Rank 0 after an epoch: test metrics into ``row``, the row logged, checkpoints written,
    the epoch line; returns the best so far."""
    if r.test is not None:
        ev = evaluate_model(r.model, r.test, r.eval_batch_size, r.amp)
        row.update({"test_loss": ev["loss"], "test_top1": ev["top1"], "test_top5": ev["top5"]})
    best = _log_and_checkpoint(
        r.run, r.loggers, r.model, r.optimizer, r.scheduler, r.scaler, row, best, epoch, r.test is not None
    )
    if r.progress:
        from tqdm.auto import tqdm

        tqdm.write(_epoch_message(r.desc, epoch, r.epochs, row))
    return best


def _plot_curves(run) -> None:
    try:
        run.plot_curves()
    except Exception as err:  # noqa: BLE001 - a plot must never lose a finished run
        print(f"kdpipe: warning: could not draw the curves ({type(err).__name__}: {err})")


def _train_epoch(r: _FitRun, epoch: int) -> tuple[dict, int, float]:
    """One epoch's steps: returns (metrics row without the test columns, images, seconds),
    the row summed over the workers."""
    from tqdm.auto import tqdm

    train, source, workers, seed = r.train, r.source, r.workers, r.seed
    device = train.device
    r.net.train()
    torch.manual_seed(epoch_seed(seed, epoch, SALT_TORCH) + workers.rank)
    plan = source.plan(train.sample_indices, seed, epoch)
    if r.drop_last:  # whole batches only (of the global batch size: every worker's share is whole)
        plan = plan.head(plan.num_samples - plan.num_samples % r.batch_size)
    plan = plan.shard(workers.rank, workers.world_size)
    local_batch = r.batch_size // workers.world_size
    source.begin_epoch(plan, local_batch)
    _begin_method_epoch(r, epoch)
    loss_buf = torch.zeros(steps_per_epoch(plan.num_samples, local_batch), dtype=torch.float32, device=device)
    part_sums: dict = {}
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen, checked, nsteps = 0, 0, 0
    lr = r.optimizer.param_groups[0]["lr"]
    bar = tqdm(
        total=plan.num_samples * workers.world_size,
        desc=f"{r.desc} {epoch + 1}/{r.epochs}",
        unit="img",
        unit_scale=True,
        disable=not r.progress,
        leave=False,
        dynamic_ncols=True,
        mininterval=0.5,
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for step, (batch, images) in enumerate(train.batches(plan, local_batch, r.policy)):
        total, parts, logits, labels = _guarded_step(r, batch, images, epoch, step)
        loss_buf[step] = total.detach().float()
        if r.on_step is not None:
            r.on_step(epoch, step, total.detach(), parts)
        for k, v in parts.items():
            part_sums[k] = part_sums.get(k, 0.0) + (v.detach().float() if torch.is_tensor(v) else float(v))
        correct += logits.detach().argmax(dim=1).eq(labels).sum()
        seen += batch.size
        nsteps = step + 1
        bar.update(batch.size * workers.world_size)
        if nsteps % 25 == 0:  # periodic sync: NaN check and progress display
            _check_finite(loss_buf, checked, nsteps, epoch, r.run)
            checked = nsteps
            bar.set_postfix(loss=f"{loss_buf[step].item():.4f}", lr=f"{lr:.3g}", refresh=False)
    _check_finite(loss_buf, checked, nsteps, epoch, r.run)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    bar.close()
    return (
        _epoch_row(epoch, lr, loss_buf[:nsteps], part_sums, correct, seen, nsteps, workers),
        seen * workers.world_size,
        dt,
    )


def _epoch_row(epoch, lr, losses, part_sums, correct, seen, nsteps, workers: Workers) -> dict:
    """The epoch's training metrics, averaged over every worker's steps."""
    device = losses.device
    keys = sorted(k for k in part_sums if k != "total")
    stacked = torch.stack(
        [
            losses.sum().double(),
            torch.tensor(float(nsteps), dtype=torch.float64, device=device),
            correct.double(),
            torch.tensor(float(seen), dtype=torch.float64, device=device),
        ]
        + [torch.as_tensor(part_sums[k], dtype=torch.float64, device=device) for k in keys]
    )
    totals: list[float] = workers.sum(stacked).tolist()
    steps = max(totals[1], 1.0)
    row = {
        "epoch": epoch + 1,
        "lr": lr,
        "train_loss": totals[0] / steps if totals[1] else float("nan"),
        "train_top1": 100.0 * totals[2] / max(totals[3], 1.0),
    }
    row.update({f"loss_{k}": v / steps for k, v in zip(keys, totals[4:])})
    return row


def _log_and_checkpoint(run, loggers, model, optimizer, scheduler, scaler, row, best, epoch, has_test) -> dict:
    """Log the epoch's metrics row (``loggers``: metrics.csv first), then ``best.pth`` (if improved) and ``latest.pth``.

    Metrics first, checkpoint last: a kill in between leaves a row past the checkpoint, which
    resume drops (``truncate_metrics``) and recomputes; never a missing row."""
    from kdpipe.engine.state import BEST, rng_state, scheduler_state

    improved = has_test and row["test_top1"] > best["top1"]
    if improved:
        best = {"top1": row["test_top1"], "epoch": epoch + 1}
    loggers.log(row)
    if improved:
        run.save_checkpoint({"model": model.state_dict(), "epoch": epoch + 1, "top1": row["test_top1"]}, BEST)
    run.save_checkpoint(
        {
            "model": model.state_dict(),
            "epoch": epoch + 1,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler_state(scheduler),
            "scaler": scaler.state_dict(),
            "rng": rng_state(),
            "best_top1": float(best["top1"]),
            "best_epoch": int(best["epoch"]),
        }
    )
    return best


def _epoch_message(desc, epoch, epochs, row) -> str:
    msg = f"{desc} epoch {epoch + 1}/{epochs}: loss {row['train_loss']:.4f}"
    if "test_top1" in row:
        msg += f", test top-1 {row['test_top1']:.2f}% top-5 {row['test_top5']:.2f}%"
    return msg + f", {row['img_per_s']:.0f} img/s"


def _check_finite(loss_buf: torch.Tensor, lo: int, hi: int, epoch: int, run) -> None:
    if hi <= lo:
        return
    chunk = loss_buf[lo:hi]
    bad = ~torch.isfinite(chunk)
    if bool(bad.any()):
        step = lo + int(bad.nonzero()[0, 0].item())
        value = chunk[step - lo].item()
        raise NonFiniteLoss(
            f"the loss became {value} at epoch {epoch + 1}, step {step + 1} (run {run.location}); "
            f"check the targets for NaN and try a smaller --beta or --lr."
        )


def _begin_method_epoch(r: _FitRun, epoch: int) -> None:
    """The method's epoch hooks: ``begin_epoch`` (DKD's warm-up, AB's stages) and the
    reference's fresh optimizer where the method restarts it (RepDistiller's second stage)."""
    begin = getattr(r.loss_fn, "begin_epoch", None)
    if begin is not None:
        begin(epoch)
    restarts = getattr(r.loss_fn, "restarts_optimizer", None)
    if restarts is not None and restarts(epoch):
        r.optimizer.state.clear()


def _guarded_step(r: _FitRun, batch, images, epoch: int, step: int):
    """``train_step``; a failure on weights an earlier step broke is reported as that."""
    try:
        return train_step(r.net, r.loss_fn, r.source, r.optimizer, r.scaler, r.train, batch, images, r.amp)
    except Exception as err:
        _raise_if_weights_broke(r.model, err, epoch, step, r.run)
        raise


def _raise_if_weights_broke(model, err: Exception, epoch: int, step: int, run) -> None:
    """A step that failed on a student whose weights are no longer finite (an earlier step's
    NaN gradient; an SVD, say, then refuses the NaN features) is reported as that, in one
    sentence, rather than as the failing operation's own error."""
    if all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        return
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
    raise NonFiniteLoss(
        f"the student's weights became non-finite before epoch {epoch + 1}, step {step + 1} "
        f"(run {run.location}; that step then failed: {reason}); the checkpoints of the finished "
        f"epochs are kept; try a smaller --lr or the method's loss weight."
    ) from err


def ce_loss(net, x, labels, targets):
    """Plain cross-entropy (teacher training, the CE baseline's loss function); ``net`` is the
    loop's ``Forward`` (or its DDP wrapper)."""
    logits = net(x)
    loss = F.cross_entropy(logits, labels)
    return loss, {"ce": loss.detach()}, logits


def mean_over_epochs(rows: list[dict], key: str):
    """Mean of ``key`` over the metric rows that have it, or None."""
    values = [float(r[key]) for r in rows if r.get(key) is not None]
    return sum(values) / len(values) if values else None

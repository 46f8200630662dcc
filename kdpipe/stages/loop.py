"""The epoch loop shared by teacher training (``stages.teacher``) and student training
(``stages.train``).

Data path (DESIGN.md, "Stage two data path"):

- **resident** (the default whenever the data set's images are in memory and fit on the
  device): the uint8 images and labels are moved to the device once; each epoch draws a
  seeded permutation; each batch is a gather on the device, augmented there with
  ``policy.apply_images`` (the view parameters come from ``views_fn``), normalised with
  ``kdpipe.data.normalize``, and fed to the model. No DataLoader, no worker processes, no
  per-step host I/O beyond the index vector.
- **streaming** (data sets that are not resident, e.g. ImageFolder): a ``torch.utils.data``
  DataLoader over an IterableDataset that reads contiguous chunks in a seeded order and
  shuffles through a buffer; batches go to the device and follow the same augment /
  normalise / step code.

Reproducibility: each epoch's permutation, view draws and global torch RNG are seeded from
``(seed, epoch)``, so a run resumed at an epoch boundary draws exactly what an unbroken run
would; model, optimizer and scheduler states come from the checkpoint.

Schedule: SGD (momentum 0.9, weight decay 5e-4), lr x0.1 at 150/180/210 of 240 epochs,
scaled to the run's epoch count (``milestones(epochs)``); no warm-up.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from kdpipe.data import normalize
from kdpipe.errors import KdpipeError

REFERENCE_EPOCHS = 240
REFERENCE_MILESTONES = (150, 180, 210)

#: Test hook: called as ``_after_epoch_hook(epoch)`` after each epoch's checkpoint is written.
#: Tests set it to simulate a run killed between epochs. Never set in normal use.
_after_epoch_hook: Callable[[int], None] | None = None


# ----------------------------------------------------------------------------- basics
def restore_training_state(run, model, optimizer, scheduler, device) -> tuple[int, dict, dict | None]:
    """Load a run's latest checkpoint into ``model``, ``optimizer``, ``scheduler`` and the RNGs,
    and drop metric rows past it, so the resumed run continues exactly where it stopped.

    Returns (start_epoch, best {"top1", "epoch"}, grad-scaler state or None)."""
    from kdpipe.pipeline.rundir import load_scheduler_state, restore_rng_state

    state = run.load_checkpoint(map_location=device)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    load_scheduler_state(scheduler, state["scheduler"])
    restore_rng_state(state.get("rng", {}))
    start_epoch = int(state["epoch"])
    best = {"top1": float(state.get("best_top1", -1.0)), "epoch": int(state.get("best_epoch", 0))}
    run.truncate_metrics(start_epoch)
    return start_epoch, best, state.get("scaler")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/"auto" -> cuda when available else cpu; "cuda" without CUDA -> one sentence."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise KdpipeError(f"--device must be cpu or cuda (or cuda:N), got {device!r}.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KdpipeError("--device cuda was asked for but this torch build sees no CUDA device; use --device cpu.")
    if dev.type not in ("cpu", "cuda"):
        raise KdpipeError(f"--device must be cpu or cuda, got {device!r}.")
    return dev


def milestones(epochs: int, reference=REFERENCE_MILESTONES, reference_epochs=REFERENCE_EPOCHS) -> list[int]:
    """The reference lr steps (150/180/210 of 240) scaled to ``epochs``: round(e * m / 240)."""
    return [max(1, int(round(epochs * m / reference_epochs))) for m in reference]


def make_optimizer(model: torch.nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4,
                   nesterov: bool = False) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)


def make_scheduler(optimizer, epochs: int, steps=None, gamma: float = 0.1):
    """MultiStepLR stepped once per epoch; ``steps`` defaults to ``milestones(epochs)``."""
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(steps or milestones(epochs)), gamma=gamma)


def epoch_seed(seed: int, epoch: int, salt: int = 0) -> int:
    """A 63-bit seed that is a pure function of (seed, epoch, salt)."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(epoch) * 0xBF58476D1CE4E5B9 + int(salt) * 0x94D049BB133111EB)
    x &= (1 << 64) - 1
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) & ((1 << 64) - 1)
    x ^= x >> 32
    return x & ((1 << 63) - 1)


def autocast(device: torch.device, amp: bool):
    """torch.autocast for --amp: float16 on CUDA (with a GradScaler), bfloat16 on CPU."""
    if not amp:
        return torch.autocast(device_type=device.type, enabled=False)
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(device: torch.device, amp: bool):
    enabled = bool(amp) and device.type == "cuda"
    return torch.amp.GradScaler("cuda", enabled=enabled)


# ----------------------------------------------------------------------------- data on the device
@dataclass
class DeviceData:
    """A data set's images (uint8) and labels, either resident on ``device`` or streamed.

    ``indices`` restricts training to a subset (e.g. ``subset_indices``); indices stay the
    data set's own, so cached targets are looked up by the sample's original index."""

    dataset: object
    device: torch.device
    resident: bool
    images: torch.Tensor | None = None  # uint8 [N, 3, H, W] on device when resident
    labels: torch.Tensor | None = None  # int64 [N] on device
    indices: torch.Tensor | None = None  # int64 [n] (CPU) subset of sample indices
    labels_cpu: torch.Tensor = field(default=None)
    mean: torch.Tensor | None = None  # float32 [3] on device (no host copy per step)
    std: torch.Tensor | None = None

    def __post_init__(self):
        self.mean = torch.as_tensor(self.dataset.mean, dtype=torch.float32).to(self.device)
        self.std = torch.as_tensor(self.dataset.std, dtype=torch.float32).to(self.device)

    @property
    def num_samples(self) -> int:
        return int(self.indices.numel()) if self.indices is not None else len(self.dataset)

    @property
    def sample_indices(self) -> torch.Tensor:
        if self.indices is not None:
            return self.indices
        return torch.arange(len(self.dataset), dtype=torch.int64)


def fits_on_device(nbytes: int, device: torch.device) -> bool:
    """Whether ``nbytes`` may be made resident on ``device``: always on the CPU; on CUDA at
    most half the free memory, so the model and its activations keep room."""
    if device.type != "cuda":
        return True
    try:
        free, _total = torch.cuda.mem_get_info(device)
    except Exception:  # pragma: no cover
        return False
    return nbytes <= free // 2


def place_dataset(dataset, device: torch.device, indices=None, data_path: str = "auto") -> DeviceData:
    """Put ``dataset`` on ``device`` when it fits (``data_path`` "auto"), or force
    "resident"/"stream". ``indices`` (sorted sample indices) restricts training to a subset."""
    if data_path not in ("auto", "resident", "stream"):
        raise KdpipeError(f"data_path must be auto, resident or stream, got {data_path!r}.")
    labels_cpu = torch.as_tensor(np.asarray(dataset.labels), dtype=torch.int64)
    idx = None if indices is None else torch.as_tensor(np.asarray(indices), dtype=torch.int64)
    images = getattr(dataset, "images", None)
    resident = data_path == "resident" or (data_path == "auto" and images is not None and fits_on_device(images.numel(), device))
    if data_path == "resident" and images is None:
        # Not resident in host memory: gather it once (small data sets only).
        images = dataset.get_batch(np.arange(len(dataset)))
    if resident:
        imgs = images.to(device, non_blocking=True).contiguous()
        return DeviceData(dataset, device, True, imgs, labels_cpu.to(device), idx, labels_cpu)
    return DeviceData(dataset, device, False, None, labels_cpu.to(device), idx, labels_cpu)


class _ChunkShuffleStream(torch.utils.data.IterableDataset):
    """Streams (index, image) pairs: contiguous chunks read in a seeded order, shuffled through
    a buffer. Each DataLoader worker takes every k-th chunk."""

    def __init__(self, dataset, indices: np.ndarray, seed: int, chunk: int = 256, buffer: int = 4096):
        self.dataset, self.indices, self.seed = dataset, np.asarray(indices), int(seed)
        self.chunk, self.buffer = int(chunk), int(buffer)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        rng = np.random.default_rng(self.seed)
        chunks = [self.indices[i:i + self.chunk] for i in range(0, len(self.indices), self.chunk)]
        order = rng.permutation(len(chunks))[wid::nw]
        buf_rng = np.random.default_rng(self.seed + 1 + wid)
        buf: list = []
        for c in order:
            ids = chunks[c]
            imgs = self.dataset.get_batch(ids)
            for i, im in zip(ids.tolist(), imgs):
                buf.append((i, im))
            while len(buf) >= self.buffer:
                j = int(buf_rng.integers(len(buf)))
                buf[j], buf[-1] = buf[-1], buf[j]
                yield buf.pop()
        buf_rng.shuffle(buf)
        yield from buf


def _collate(items):
    idx = torch.tensor([i for i, _ in items], dtype=torch.int64)
    return idx, torch.stack([im for _, im in items])


def iterate_batches(data: DeviceData, batch_size: int, seed: int, epoch: int, num_workers: int = 2
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yields (indices int64 CPU [B], images uint8 on device [B, 3, H, W]) for one epoch.

    Resident: a seeded permutation, gathered on the device. Streaming: DataLoader with a
    shuffle buffer. A trailing batch of one sample is dropped (BatchNorm cannot train on it)."""
    g = torch.Generator().manual_seed(epoch_seed(seed, epoch, salt=1))
    all_idx = data.sample_indices
    n = int(all_idx.numel())
    if data.resident:
        perm = all_idx[torch.randperm(n, generator=g)]
        perm_dev = perm.to(data.device, non_blocking=True)
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            if stop - start < 2 and n >= 2:
                break
            yield perm[start:stop], data.images.index_select(0, perm_dev[start:stop])
        return
    stream = _ChunkShuffleStream(data.dataset, all_idx.numpy(), seed=epoch_seed(seed, epoch, salt=2) % (2**32))
    loader = torch.utils.data.DataLoader(
        stream, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate,
        pin_memory=data.device.type == "cuda", persistent_workers=False,
    )
    for idx, imgs in loader:
        if idx.numel() < 2 and n >= 2:
            continue
        yield idx, imgs.to(data.device, non_blocking=True)


def steps_per_epoch(n: int, batch_size: int) -> int:
    full, rest = divmod(n, batch_size)
    return full + (1 if rest >= 2 or (rest and n < 2) else 0)


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_model(model: torch.nn.Module, data: DeviceData, batch_size: int = 256, amp: bool = False) -> dict:
    """Top-1 / top-5 (percent) and mean CE on ``data`` without augmentation, batched."""
    was_training = model.training
    model.eval()
    device = data.device
    ds = data.dataset
    mean, std = data.mean, data.std
    idx_all = data.sample_indices
    n = int(idx_all.numel())
    correct1 = torch.zeros((), dtype=torch.int64, device=device)
    correct5 = torch.zeros((), dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, n, batch_size):
        idx = idx_all[start:start + batch_size]
        if data.resident:
            imgs = data.images.index_select(0, idx.to(device))
        else:
            imgs = ds.get_batch(idx.numpy()).to(device, non_blocking=True)
        labels = data.labels.index_select(0, idx.to(device))
        with autocast(device, amp):
            logits = model(normalize(imgs, mean, std))
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top.eq(labels[:, None])
        correct1 += hit[:, 0].sum()
        correct5 += hit.any(dim=1).sum()
    model.train(was_training)
    n = max(n, 1)
    return {
        "top1": 100.0 * correct1.item() / n,
        "top5": 100.0 * correct5.item() / n,
        "loss": loss_sum.item() / n,
    }


# ----------------------------------------------------------------------------- training
class NonFiniteLoss(KdpipeError):
    """The loss became NaN or infinite."""


@dataclass
class StepFns:
    """What the loop needs from a training recipe.

    - ``views(indices_cpu [B], epoch, generator) -> (view_idx | None, params int32 [B, P])``:
      the augmentation views of the batch (random for CE/teacher; the target source's for
      students).
    - ``loss(model, images_normalized, labels, indices, view_idx, params) -> (total, parts,
      logits)``: ``parts`` a dict of scalar tensors or floats for the metrics."""

    views: Callable
    loss: Callable


def _to_device_params(params, device):
    if params is None:
        return None
    if not torch.is_tensor(params):
        params = torch.as_tensor(np.asarray(params))
    return params.to(device, non_blocking=True)


def train_step(model, fns: StepFns, policy, optimizer, scaler, train: DeviceData, idx, imgs, epoch: int,
               generator, amp: bool = False):
    """One training step on a batch (indices CPU [B], uint8 images on the device): views,
    crop/flip on the device, normalise, loss, backward, SGD step. Returns (loss, parts,
    logits, labels), nothing synchronised. ``fit`` and benchmarks/train_step.py use it."""
    device = train.device
    view_idx, params = fns.views(idx, epoch, generator)
    labels = train.labels.index_select(0, idx.to(device, non_blocking=True))
    if params is not None:
        imgs = policy.apply_images(imgs, _to_device_params(params, device))
    x = normalize(imgs, train.mean, train.std)
    with autocast(device, amp):
        total, parts, logits = fns.loss(model, x, labels, idx, view_idx, params)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total).backward()
    scaler.step(optimizer)
    scaler.update()
    return total, parts, logits, labels


def fit(
    *,
    model: torch.nn.Module,
    train: DeviceData,
    test: DeviceData | None,
    fns: StepFns,
    policy,
    epochs: int,
    batch_size: int,
    optimizer,
    scheduler,
    run,  # kdpipe.pipeline.rundir.RunDir
    seed: int = 0,
    amp: bool = False,
    start_epoch: int = 0,
    best: dict | None = None,
    progress: bool = True,
    desc: str = "train",
    eval_batch_size: int = 256,
    extra_state: Callable[[], dict] | None = None,
    num_workers: int = 2,
    plot: bool = True,
    on_step: Callable | None = None,
    scaler_state: dict | None = None,
) -> dict:
    """Train ``model`` from ``start_epoch`` to ``epochs``; after every epoch: test top-1/top-5,
    one metrics row, ``checkpoints/latest.pth`` (full state) and ``best.pth``; at the end the
    curves PNG (``plot``). ``on_step(epoch, step, loss, parts)`` sees every step. Returns
    {"best_top1", "best_epoch", "final": last metrics row, "images", "train_seconds"}."""
    from tqdm.auto import tqdm

    from kdpipe.pipeline.rundir import BEST, rng_state, scheduler_state

    device = train.device
    scaler = make_grad_scaler(device, amp)
    if scaler_state and scaler.is_enabled():
        scaler.load_state_dict(scaler_state)
    best = dict(best or {"top1": -1.0, "epoch": 0})
    n = train.num_samples
    total_steps = steps_per_epoch(n, batch_size)
    images_seen, train_seconds = 0, 0.0
    last_row: dict = {}
    for epoch in range(start_epoch, epochs):
        model.train()
        torch.manual_seed(epoch_seed(seed, epoch, salt=3))
        gen = torch.Generator().manual_seed(epoch_seed(seed, epoch, salt=4))
        loss_buf = torch.zeros(total_steps, dtype=torch.float32, device=device)
        part_sums: dict[str, torch.Tensor | float] = {}
        correct = torch.zeros((), dtype=torch.int64, device=device)
        seen = 0
        lr = optimizer.param_groups[0]["lr"]
        bar = tqdm(total=n, desc=f"{desc} {epoch + 1}/{epochs}", unit="img", unit_scale=True,
                   disable=not progress, leave=False, dynamic_ncols=True, mininterval=0.5)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        step = 0
        checked = 0
        for step, (idx, imgs) in enumerate(iterate_batches(train, batch_size, seed, epoch, num_workers)):
            total, parts, logits, labels = train_step(model, fns, policy, optimizer, scaler, train, idx, imgs,
                                                      epoch, gen, amp)
            loss_buf[step] = total.detach().float()
            if on_step is not None:  # tests and benchmarks: per-step losses
                on_step(epoch, step, total.detach(), parts)
            for k, v in parts.items():
                v = v.detach().float() if torch.is_tensor(v) else float(v)
                part_sums[k] = part_sums.get(k, 0.0) + v
            correct += logits.detach().argmax(dim=1).eq(labels).sum()
            seen += int(idx.numel())
            bar.update(int(idx.numel()))
            if (step + 1) % 25 == 0:  # periodic sync: NaN check and progress display
                _check_finite(loss_buf, checked, step + 1, epoch, run)
                checked = step + 1
                bar.set_postfix(loss=f"{loss_buf[step].item():.4f}", lr=f"{lr:.3g}", refresh=False)
        nsteps = step + 1 if seen else 0
        _check_finite(loss_buf, checked, nsteps, epoch, run)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        bar.close()
        scheduler.step()
        train_seconds += dt
        images_seen += seen
        row = {
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": float(loss_buf[:nsteps].mean().item()) if nsteps else float("nan"),
            "train_top1": 100.0 * correct.item() / max(seen, 1),
        }
        for k, v in part_sums.items():
            if k in ("total",):
                continue
            row[f"loss_{k}"] = float(v) / max(nsteps, 1)
        if test is not None:
            ev = evaluate_model(model, test, eval_batch_size, amp)
            row.update({"test_loss": ev["loss"], "test_top1": ev["top1"], "test_top5": ev["top5"]})
        row.update({"img_per_s": seen / dt if dt > 0 else float("nan"), "epoch_seconds": dt})
        improved = test is not None and row["test_top1"] > best["top1"]
        if improved:
            best = {"top1": row["test_top1"], "epoch": epoch + 1}
        state = {
            "model": model.state_dict(),
            "epoch": epoch + 1,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler_state(scheduler),
            "scaler": scaler.state_dict(),
            "rng": rng_state(),
            "best_top1": float(best["top1"]),
            "best_epoch": int(best["epoch"]),
        }
        if extra_state is not None:
            state.update(extra_state())
        # Metrics first, checkpoint last: a kill in between leaves a row past the checkpoint,
        # which resume drops (truncate_metrics) and recomputes; never a missing row.
        run.log_epoch(row)
        if improved:
            run.save_checkpoint({"model": state["model"], "epoch": epoch + 1, "top1": row["test_top1"]}, BEST)
        run.save_checkpoint(state)
        last_row = row
        msg = f"{desc} epoch {epoch + 1}/{epochs}: loss {row['train_loss']:.4f}"
        if test is not None:
            msg += f", test top-1 {row['test_top1']:.2f}% top-5 {row['test_top5']:.2f}%"
        msg += f", {row['img_per_s']:.0f} img/s"
        if progress:
            tqdm.write(msg)
        if _after_epoch_hook is not None:
            _after_epoch_hook(epoch + 1)
    try:
        if plot:
            run.plot_curves()
    except Exception as err:  # a plot must never lose a finished run
        print(f"kdpipe: warning: could not draw the curves ({type(err).__name__}: {err})")
    return {
        "best_top1": best["top1"] if best["top1"] >= 0 else None,
        "best_epoch": best["epoch"],
        "final": last_row,
        "images": images_seen,
        "train_seconds": train_seconds,
    }


def _check_finite(loss_buf: torch.Tensor, lo: int, hi: int, epoch: int, run) -> None:
    if hi <= lo:
        return
    chunk = loss_buf[lo:hi]
    bad = ~torch.isfinite(chunk)
    if bool(bad.any()):
        step = lo + int(bad.nonzero()[0, 0].item())
        value = chunk[step - lo].item()
        raise NonFiniteLoss(
            f"the loss became {value} at epoch {epoch + 1}, step {step + 1} (run {run.path}); "
            f"check the targets for NaN and try a smaller --beta or --lr."
        )


def random_views(policy):
    """``views`` function for plain training: fresh random views from the epoch generator."""

    def views(indices, epoch, generator):
        return None, policy.random(generator, int(indices.numel()))

    return views


def ce_loss(model, x, labels, indices, view_idx, params):
    logits = model(x)
    loss = F.cross_entropy(logits, labels)
    return loss, {"ce": loss.detach()}, logits


def mean_over_epochs(rows: list[dict], key: str):
    """Mean of ``key`` over the metric rows that have it, or None."""
    values = [r.get(key) for r in rows if r.get(key) is not None]
    return sum(values) / len(values) if values else None


def format_summary(title: str, items: dict) -> str:
    """A short aligned block for the end of a command."""
    width = max((len(k) for k in items), default=0)
    lines = [title]
    for k, v in items.items():
        if isinstance(v, float):
            v = f"{v:.2f}" if math.isfinite(v) else str(v)
        lines.append(f"  {k.ljust(width)}  {v}")
    return "\n".join(lines)

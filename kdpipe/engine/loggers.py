"""Where a run's per-epoch metrics go: metrics.csv/.jsonl, TensorBoard, Weights & Biases.

The epoch loop (``kdpipe.engine.loop``) hands every epoch's row to one ``EpochLoggers``; each
sink writes it its own way:

- ``CsvSink``: ``metrics.csv`` and ``metrics.jsonl`` of the run directory (what ``--resume``,
  the plots and the summaries read), always;
- ``TensorBoardSink``: event files in ``<run>/tensorboard/`` (``torch.utils.tensorboard``), always
  when the tensorboard package is installed (a dependency of kdpipe); the scalars are the
  row's: ``train/loss``, ``train/loss_<part>``, ``train/top1``, ``test/loss``, ``test/top1``,
  ``test/top5``, ``lr``, ``speed/img_per_s``, ``speed/epoch_seconds``, one point per epoch
  (TensorBoard's step = the epoch number). A resumed run purges the events past its checkpoint;
- ``WandbSink``: a Weights & Biases run when ``--wandb PROJECT`` is given (the same scalars and
  the run's config.json; its id is the run directory's name, so ``--resume`` continues it;
  ``WANDB_MODE=offline`` keeps it on disk).

Only the process that owns the run directory logs (rank 0 of a data-parallel run).
"""

from __future__ import annotations

import math
from typing import Protocol

from kdpipe.errors import KdpipeError

__all__ = ["EpochSink", "CsvSink", "TensorBoardSink", "WandbSink", "EpochLoggers", "scalar_tag", "require_wandb"]

#: row key -> TensorBoard / W&B tag (keys not here: ``train/<key>`` for loss parts, else the key)
_TAGS = {
    "train_loss": "train/loss",
    "train_top1": "train/top1",
    "test_loss": "test/loss",
    "test_top1": "test/top1",
    "test_top5": "test/top5",
    "lr": "lr",
    "img_per_s": "speed/img_per_s",
    "epoch_seconds": "speed/epoch_seconds",
}


def scalar_tag(key: str) -> str:
    """The tag a metrics-row key is logged under."""
    if key in _TAGS:
        return _TAGS[key]
    return f"train/{key}" if key.startswith("loss_") else key


def _scalars(row: dict) -> dict[str, float]:
    """The row's finite numbers by tag (the epoch is the step, not a scalar)."""
    out = {}
    for key, value in row.items():
        if key == "epoch" or isinstance(value, bool):
            continue
        value = value.item() if hasattr(value, "item") else value
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[scalar_tag(key)] = float(value)
    return out


class EpochSink(Protocol):
    def log(self, row: dict) -> None: ...

    def close(self) -> None: ...


class CsvSink:
    """metrics.csv and metrics.jsonl (``RunDir.log_epoch``)."""

    def __init__(self, run):
        self.run = run

    def log(self, row: dict) -> None:
        self.run.log_epoch(row)

    def close(self) -> None:
        pass


class TensorBoardSink:
    """TensorBoard event files in ``<run>/tensorboard``."""

    def __init__(self, run, start_epoch: int = 0):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        from kdpipe.engine.state import TENSORBOARD

        self.run = run
        # a resumed run rewrites the epochs after its checkpoint: drop their old events
        self.writer = SummaryWriter(
            log_dir=str(run.path / TENSORBOARD), purge_step=start_epoch + 1 if start_epoch else None
        )

    def log(self, row: dict) -> None:
        step = int(row["epoch"])
        for tag, value in _scalars(row).items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()
        self.run.sync()  # a run directory at a URL gets the events every epoch

    def close(self) -> None:
        self.writer.close()
        self.run.sync()


def require_wandb():
    """The wandb module, or one sentence saying how to get it."""
    try:
        import wandb
    except ImportError:
        raise KdpipeError(
            "--wandb needs the wandb package, which is not installed; install it "
            "(pip install 'kdpipe[wandb]') or drop --wandb."
        ) from None
    return wandb


class WandbSink:
    """One Weights & Biases run per run directory (resumed with it)."""

    def __init__(self, run, project: str):
        from kdpipe import storage

        wandb = require_wandb()
        name = storage.basename(run.location)
        run_id = "".join(c if c.isalnum() or c in "-_" else "-" for c in name)[-64:]
        self.wb = wandb.init(
            project=project, name=name, id=run_id, resume="allow", dir=str(run.path), config=run.config
        )

    def log(self, row: dict) -> None:
        self.wb.log(_scalars(row), step=int(row["epoch"]))

    def close(self) -> None:
        self.wb.finish()


class EpochLoggers:
    """Every sink of a run, fed the same rows in order (metrics.csv first: resume reads it)."""

    def __init__(self, sinks: list):
        self.sinks = list(sinks)

    @classmethod
    def for_run(cls, run, start_epoch: int = 0, wandb_project: str | None = None) -> EpochLoggers:
        sinks: list = [CsvSink(run)]
        try:
            sinks.append(TensorBoardSink(run, start_epoch))
        except ImportError:  # tensorboard is a dependency; a broken install must not stop training
            print(
                "kdpipe: warning: the tensorboard package is not installed; this run writes no "
                "TensorBoard event files (pip install tensorboard)."
            )
        if wandb_project:
            sinks.append(WandbSink(run, wandb_project))
        return cls(sinks)

    def log(self, row: dict) -> None:
        for sink in self.sinks:
            sink.log(row)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()

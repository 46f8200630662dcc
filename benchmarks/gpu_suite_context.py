"""What the parts of benchmarks/gpu_suite.py share: their sizes (full and smoke), the context
(device, work folder, what earlier parts made, the one local Ray), and ``check``.

A part (gpu_suite_stage_one.py, gpu_suite_stage_two.py) runs one of kdpipe's CUDA code paths
through kdpipe's own stage functions, engine or CLI, checks what it produced, and returns its
figures (a dict; ratios are measured inside the part, interleaved). A failed check raises
``CheckFailed`` with one sentence; the suite records it and goes on. A part that measured some
figures but not all returns them with ``errors`` (sentences): recorded as failed, figures kept.
``note`` in the figures becomes the part's note.

kdpipe is reached through its stable names (kdpipe.stages.*, kdpipe.engine.*, kdpipe.models,
kdpipe.artifacts.open_store, the ``kdpipe`` click group); the configuration dataclasses and Ray's
context manager are imported in ``pipeline()`` only.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch


class CheckFailed(Exception):
    """A part ran but what it produced is wrong (one sentence)."""


def check(ok, sentence: str) -> None:
    if not ok:
        raise CheckFailed(sentence)


def pipeline() -> SimpleNamespace:
    """The one place this suite imports the typed configs (kdpipe.config) and Ray's context
    manager (kdpipe.distributed)."""
    from kdpipe.config.configs import ClusterConfig, ExtractConfig, StudentConfig
    from kdpipe.distributed.executor import ray_cluster

    return SimpleNamespace(
        ExtractConfig=ExtractConfig, ClusterConfig=ClusterConfig, StudentConfig=StudentConfig, ray_cluster=ray_cluster
    )


# ----------------------------------------------------------------------------- sizes and context
@dataclass(frozen=True)
class Sizes:
    """How big every part is. ``FULL`` fits about 6 minutes of one H100 (estimates in
    gpu_suite.PARTS); ``SMOKE`` is toy size for the CPU test."""

    classes: int = 100  # CIFAR-100-shaped: synthetic 32x32 images of 100 classes
    samples: int = 2048  # training store: train images (the synthetic test split: samples // 4)
    views: str = "all"  # stored views per image: every one of the 162 (the default store)
    teacher: str = "resnet32x4"  # CAT-KD's and letKD's CIFAR-100 teacher, random weights
    student: str = "resnet8x4"
    batch_size: int = 64  # the student batch of mdistiller's CIFAR-100 configs (kdpipe's recipe default)
    extract_batch: int = 256  # kdpipe extract-teacher's --batch-size default (ExtractConfig)
    calib_batches: int = 4  # BN calibration batches of the random teacher (benchmarks/common.py)
    k_penult: int = 4096  # letKD's reference K (kdpipe cluster's default, ClusterConfig)
    k_inter: int = 8  # likewise
    rounds: int = 5  # interleaved epochs per train-step configuration (median over their steps)
    cli_epochs: int = 2  # epochs of each train-student CLI run
    ray_samples: int = 512  # extraction with Ray actors (its own small store)
    kmeans_n: int = 3_200_000  # letKD's CIFAR-100 fit: 50,000 images x 8x8 locations
    kmeans_d: int = 256
    kmeans_k: int = 4096
    kmeans_niter: int = 20  # letKD's run_kmeans (ClusterConfig.niter)
    sweep_trials: int = 4
    sweep_epochs: int = 20  # an epoch of 2,048 images is a fraction of a second on a GPU
    bare_images: int = 65536  # images of each bare-inference run (the first of the store's rows)


FULL = Sizes()
SMOKE = Sizes(
    classes=10,
    samples=64,
    views="2",
    teacher="resnet8",
    student="resnet8",
    batch_size=16,
    extract_batch=64,
    calib_batches=1,
    k_penult=16,
    k_inter=2,
    rounds=1,
    cli_epochs=1,
    ray_samples=32,
    kmeans_n=4096,
    kmeans_d=16,
    kmeans_k=32,
    kmeans_niter=4,
    sweep_trials=2,  # the same code as 4; each trial is a process start-up on the CPU
    sweep_epochs=2,
)


@dataclass
class Ctx:
    """What the parts share: the device, sizes, work folder, and what earlier parts made."""

    dev: torch.device
    sizes: Sizes
    work: Path
    smoke: bool
    ray: bool  # Ray importable and not switched off
    made: dict = field(default_factory=dict)  # checkpoint, store, bare img/s, ...
    _ray_stack: object = None

    @property
    def cuda(self) -> bool:
        return self.dev.type == "cuda"

    def data(self, samples: int | None = None) -> str:
        n = samples or self.sizes.samples
        return f"synthetic:n={n},classes={self.sizes.classes},size=32,seed=0"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.dev)

    def ray_up(self) -> float:
        """Start (once) the loopback-only local Ray every Ray part shares; seconds it took."""
        if self._ray_stack is not None:
            return 0.0
        import contextlib

        t0 = time.perf_counter()
        stack = contextlib.ExitStack()
        stack.enter_context(pipeline().ray_cluster())
        self._ray_stack = stack
        return time.perf_counter() - t0

    def close(self) -> None:
        if self._ray_stack is not None:
            self._ray_stack.close()  # type: ignore[attr-defined]
            self._ray_stack = None


def ray_importable() -> bool:
    try:
        return importlib.util.find_spec("ray") is not None
    except (ImportError, ValueError):  # a broken or blocked install
        return False

"""The public Python API for your own training loop: a store's batches and a method's loss,
without kdpipe's trainer (timm, Lightning, mdistiller or plain PyTorch scripts).

    import kdpipe

    store = kdpipe.open_store("stores/digits")
    training = store.training(method="cat_kd", student="resnet8", seed=0, epochs=2, device="cpu")
    model = training.build_student()
    optimizer = training.make_optimizer(model)
    scheduler = training.make_scheduler(optimizer)
    for epoch in range(training.epochs):
        model.train()
        for batch in training.batches(epoch):          # the replayed view applied, targets on the device
            logits, features = training.forward(model, batch.images)
            loss, parts = training.method.loss(logits, features, batch.targets, batch.labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()

The batches are exactly those ``kdpipe train-student`` trains on with the same settings (the
same plan of samples and views per epoch, the same seeds), so a loop like the one above ends
with the same weights, bit for bit (examples/own_loop.py; tests/test_api.py checks it).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from kdpipe.errors import KdpipeError

__all__ = ["open_store", "Store", "StudentTraining", "Batch"]


@dataclass
class Batch:
    """One training batch of a student run.

    ``images``: [B, 3, H, W] float32, the stored view replayed on each image and normalised, on
    the device; ``labels``: [B] int64; ``targets``: the method's targets by key (shapes in
    ``kdpipe.targets`` and the method's kinds), on the device; ``indices``: [B] sample indices."""

    images: torch.Tensor
    labels: torch.Tensor
    targets: dict[str, torch.Tensor]
    indices: torch.Tensor


@dataclass
class StudentTraining:
    """A student run's data and method, resolved as ``kdpipe train-student`` resolves them
    (``kdpipe.stages.train.resolve_student``): made by ``Store.training``."""

    setup: Any  # kdpipe.stages.train.StudentSetup
    device: torch.device
    _source: Any = field(repr=False)
    _train: Any = field(repr=False)
    _test: Any = field(repr=False)
    _forward: Any = field(default=None, repr=False)
    _optimizers: list = field(default_factory=list, repr=False)

    # ------------------------------------------------------------------ what the run is
    @property
    def method(self):
        """The bound ``kdpipe.methods.base.Method``: ``method.loss(logits, features, targets, labels)``."""
        return self.setup.method

    @property
    def recipe(self) -> dict:
        """The resolved training settings: lr, momentum, weight_decay, nesterov, batch_size,
        epochs, milestones, lr_decay."""
        return dict(self.setup.recipe)

    @property
    def epochs(self) -> int:
        return int(self.setup.recipe["epochs"])

    @property
    def batch_size(self) -> int:
        return int(self.setup.recipe["batch_size"])

    @property
    def seed(self) -> int:
        return int(self.setup.cfg.seed)

    # ------------------------------------------------------------------ building
    def build_student(self) -> torch.nn.Module:
        """The student with its method's modules (KD layers, regressors), on the device,
        initialised from the run's seed exactly as train-student initialises it."""
        from kdpipe.engine.student import resolved_head, student_forward
        from kdpipe.models import build

        setup = self.setup
        torch.manual_seed(self.seed)
        model = build(
            setup.cfg.student, num_classes=setup.train_set.num_classes, head=resolved_head(setup.cfg, setup.method)
        )
        model = (setup.method.prepare_student(model, setup.target_set) or model).to(self.device)
        self._forward = student_forward(model, setup.method)
        return model

    def make_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        """The recipe's SGD over the model's trainable parameters. ``batches`` clears its state
        at the epochs where the method's reference starts a fresh optimizer (AB's and FSP's
        second stage), as train-student does."""
        from kdpipe.engine.schedule import make_optimizer

        r = self.setup.recipe
        optimizer = make_optimizer(model, r["lr"], r["momentum"], r["weight_decay"], r["nesterov"])
        self._optimizers.append(optimizer)
        return optimizer

    def make_scheduler(self, optimizer: torch.optim.Optimizer):
        """The recipe's MultiStepLR (its milestones), stepped once per epoch."""
        from kdpipe.engine.schedule import make_scheduler

        r = self.setup.recipe
        return make_scheduler(optimizer, r["epochs"], r["milestones"], gamma=r["lr_decay"])

    # ------------------------------------------------------------------ an epoch
    def batches(self, epoch: int) -> Iterator[Batch]:
        """The batches of 0-based ``epoch``: its plan (order and replayed views, a function of
        the seed and the epoch), images augmented and normalised, targets gathered. Seeds
        torch's global RNG for the epoch as the trainer does, runs the method's epoch hook
        (DKD's warm-up), and clears the state of the optimizers ``make_optimizer`` made where
        the method restarts it."""
        from kdpipe.data import normalize
        from kdpipe.engine.plan import SALT_TORCH, epoch_seed

        if not 0 <= int(epoch):
            raise KdpipeError(f"Epochs count from 0, not {epoch}.")
        torch.manual_seed(epoch_seed(self.seed, int(epoch), SALT_TORCH))
        plan = self._source.plan(self._train.sample_indices, self.seed, int(epoch))
        if self.setup.recipe.get("drop_last"):  # whole batches only, as train-student (letKD's reference)
            plan = plan.head(plan.num_samples - plan.num_samples % self.batch_size)
        self._source.begin_epoch(plan, self.batch_size)
        self.method.begin_epoch(int(epoch))
        if self.method.restarts_optimizer(int(epoch)):
            for optimizer in self._optimizers:
                optimizer.state.clear()
        for batch, images in self._train.batches(plan, self.batch_size, self.setup.policy):
            x = normalize(images, self._train.mean, self._train.std)
            labels = self._train.labels_of(batch.indices)
            targets = self._source.targets(batch, x, labels)
            yield Batch(images=x, labels=labels, targets=targets, indices=batch.indices)

    def forward(self, model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """(logits, features) as the method needs them: the plain forward where its loss reads
        logits only, ``forward_features`` (CAMs, stage maps, KD-layer scores) otherwise."""
        if self._forward is None:
            raise KdpipeError(
                "Build the student with training.build_student() first (it installs the method's modules)."
            )
        from kdpipe.engine.parallel import Forward

        return self._forward(Forward(model), images)

    def evaluate(self, model: torch.nn.Module) -> dict:
        """Top-1 / top-5 (percent) and mean CE on the test split, no augmentation."""
        from kdpipe.engine.loop import evaluate_model

        return evaluate_model(model, self._test, 256, self.setup.cfg.amp)

    def close(self) -> None:
        self._source.close()


@dataclass
class Store:
    """A teacher-artifact store opened for students (``kdpipe.open_store``)."""

    path: str
    reader: Any  # kdpipe.artifacts.reader.StoreReader

    @property
    def manifest(self):
        return self.reader.manifest

    def training(
        self,
        *,
        method: str,
        student: str,
        seed: int = 0,
        device: str | None = None,
        targets: str = "default",
        method_options: dict | None = None,
        **settings: Any,
    ) -> StudentTraining:
        """A student run's data and method: ``settings`` are ``StudentConfig`` fields
        (epochs, lr, batch_size, views, resident, subset_fraction, ...), as train-student's
        options of the same names."""
        from kdpipe.config.configs import StudentConfig
        from kdpipe.engine.data import place_dataset
        from kdpipe.engine.device import resolve_device
        from kdpipe.stages.train import make_target_source, resolve_student

        try:
            cfg = StudentConfig(
                store=self.path,
                targets=targets,
                student=student,
                method=method,
                method_options=dict(method_options or {}),
                seed=int(seed),
                **settings,
            )
        except TypeError as err:
            raise KdpipeError(f"Store.training: {err}.") from None
        setup = resolve_student(cfg.with_absolute_paths())
        dev = resolve_device(device)
        source = make_target_source(setup, dev)
        train = place_dataset(setup.train_set, dev, indices=setup.subset)
        test = place_dataset(setup.test_set, dev)
        return StudentTraining(setup=setup, device=dev, _source=source, _train=train, _test=test)


def open_store(path: str) -> Store:
    """Open a store made by ``kdpipe extract-teacher`` (a local path or a URL) for students."""
    from kdpipe.artifacts import open_store as open_reader

    return Store(path=str(path), reader=open_reader(path))

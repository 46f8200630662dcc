"""RepDistiller's two-stage training, shared by AB and FSP: ``init_epochs`` epochs of the
method's own loss alone, then CE (RepDistiller ``train_student.py --init_epochs``,
``helper/pretrain.py``), run by kdpipe as one loop of ``init_epochs + 240`` epochs whose lr
milestones are moved by ``init_epochs``, so the first stage runs at the initial rate. The
second stage starts with the optimizer's state cleared (``restarts_optimizer``): RepDistiller
builds a new optimizer for it, so no momentum of the first stage's loss carries over.

Shorter runs (train-student's ``--epochs`` below the recipe's) scale the lr milestones
(``kdpipe.engine.schedule.milestones``); an ``init_epochs`` left unset scales with them,
round(init_epochs * epochs / (init_epochs + 240)), so the run keeps the reference's shape: a
40-epoch run initialises for 4 epochs and trains CE for 36, instead of initialising for 30 and
training CE for 10 epochs at rates already divided by 10 and 100. An ``init_epochs`` given
explicitly is kept as given.
"""

from __future__ import annotations

from kdpipe.methods.base import reference_recipe


class InitialisationStage:
    """Mixin for a Method (listed before it) whose loss is its own before ``init_epochs`` and
    CE after: the epoch counter, the recipe and the scaling above. ``options["init_epochs"]``
    is the initialisation this run uses (recorded with the run)."""

    options: dict
    dataset: str
    #: the first stage's loss does not reach the classifier, the second's not the connectors
    leaves_parameters_unused = True

    def _start_stages(self, init_epochs_given: int | None, default: int) -> None:
        """Call from ``__init__`` after ``options["init_epochs"]`` is set."""
        self._init_given = init_epochs_given is not None
        self._reference_init = int(default if init_epochs_given is None else init_epochs_given)
        self._epoch = 0

    def begin_epoch(self, epoch: int) -> None:
        self._epoch = int(epoch)

    @property
    def initialising(self) -> bool:
        """True during the first stage (0-based epochs below ``options["init_epochs"]``)."""
        return self._epoch < self.options["init_epochs"]

    def restarts_optimizer(self, epoch: int) -> bool:
        # RepDistiller builds the second stage's optimizer afresh (train_student.py after
        # init(...)): no momentum carried over from the first stage's loss
        return 0 < self.options["init_epochs"] == int(epoch)

    def recipe(self, student_arch: str) -> dict:
        recipe = reference_recipe(student_arch, nesterov=False, dataset=self.dataset)
        init = self._reference_init
        recipe.update(epochs=recipe["epochs"] + init, milestones=[m + init for m in recipe["milestones"]])
        return recipe

    def scale_to_run(self, epochs: int, reference_epochs: int) -> None:
        if self._init_given:
            return
        scaled = round(self._reference_init * int(epochs) / int(reference_epochs))
        self.options["init_epochs"] = int(max(0, min(scaled, int(epochs))))

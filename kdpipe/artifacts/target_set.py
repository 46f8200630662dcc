"""What a letKD target set (``targets/<name>/``, written by ``kdpipe cluster``) is: one typed record.

``cluster`` writes a ``TargetSet`` into the manifest (``manifest["targets"][name]["attrs"]``)
with exactly these field names; every reader gets it back through
``StoreReader.target_set(name)``. Nothing else reads the attrs dict, so nothing guesses key
spellings. Unknown keys in a stored record are ignored (a newer kdpipe may add fields);
a missing or mistyped required field is one sentence.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from kdpipe.errors import StoreError

#: The group holding target sets inside a store.
TARGETS_PREFIX = "targets/"


def _grid(value) -> tuple[int, int] | None:
    if value is None:
        return None
    h, w = (int(v) for v in value)
    return (h, w)


@dataclass(frozen=True)
class TargetSet:
    """A target set's settings and fit statistics (see ``kdpipe.stages.cluster``)."""

    name: str
    num_classes: int
    k_penult: int  # K-means centres of the penultimate vectors
    k_inter: int  # sub-classes per class (intermediate layer)
    lda_dims: int  # d, LDA components kept
    topk: int  # k stored per location (<= topk_cap)
    topk_cap: int  # --topk: the most k may be
    topk_mass: float  # --topk-mass: the softmax mass k is chosen to hold
    temperature: float  # T in softmax(-T * ||f - rho||^2)
    penult_grid: tuple[int, int]  # (h, w) of the penultimate targets
    inter_grid: tuple[int, int]  # (h, w) of the intermediate targets
    student_grid: tuple[int, int] | None = None  # --student-grid pooling, or None
    fit_views: str = "identity"  # which stored views the fit used
    fit_points_penult: int = 0
    fit_points_inter: int = 0
    max_fit_points: int | None = None
    kmeans_niter: int = 20
    kmeans_objective_penult: float | None = None
    retained_mass_min: float | None = None  # over every stored (sample, view, location)
    retained_mass_mean: float | None = None
    lda_ridge: float = 0.0
    empty_subclasses: int = 0
    seed: int = 0
    teacher_sha256: str | None = None
    created: str | None = None
    extra: dict = field(default_factory=dict)  # stage timings and other free-form facts

    @property
    def prefix(self) -> str:
        """``targets/<name>/``: the path prefix of this set's arrays."""
        return f"{TARGETS_PREFIX}{self.name}/"

    def array(self, short_name: str) -> str:
        """The store path of one of this set's arrays, e.g. ``array("subclass_idx")``."""
        return self.prefix + short_name

    @property
    def num_subclasses(self) -> int:
        """M = C * K_inter, the intermediate KD layer's width."""
        return self.num_classes * self.k_inter

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        for key in ("penult_grid", "inter_grid", "student_grid"):
            if out[key] is not None:
                out[key] = list(out[key])
        return out

    @classmethod
    def from_json(cls, name: str, record: dict | None, where: str = "the store") -> TargetSet:
        if not isinstance(record, dict):
            raise StoreError(f"Target set {name!r} of {where} has no settings record; re-run `kdpipe cluster` for it.")
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in record.items() if k in known}
        values["name"] = name
        try:
            for key in ("penult_grid", "inter_grid", "student_grid"):
                values[key] = _grid(values.get(key))
            info = cls(**values)
            _check_types(info)
        except (TypeError, ValueError) as err:
            raise StoreError(
                f"Target set {name!r} of {where} has a damaged settings record "
                f"({err}); re-run `kdpipe cluster --overwrite` for it."
            ) from None
        return info


_INT_FIELDS = ("num_classes", "k_penult", "k_inter", "lda_dims", "topk", "topk_cap")


def _check_types(info: TargetSet) -> None:
    for key in _INT_FIELDS:
        value = getattr(info, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a positive integer, not {value!r}")
    for key in ("penult_grid", "inter_grid"):
        if getattr(info, key) is None:
            raise ValueError(f"{key} is missing")
    if not float(info.temperature) > 0:
        raise ValueError(f"temperature must be positive, not {info.temperature!r}")


def check_arrays(info: TargetSet, shapes: dict[str, tuple], num_classes: int, where: str = "the store") -> None:
    """Refuse a settings record that disagrees with the set's own arrays (``shapes``: short
    name -> shape as recorded) or with the store's class count: one sentence, so an edited
    ``k_penult`` or grid never reaches an index error in training."""
    m = info.num_subclasses
    want: dict[str, tuple] = {
        "penult_centers": (info.k_penult, None),
        "subclass_scores": (m, m),
        "subclass_centers": (m, info.lda_dims),
        "subclass_prototypes": (m, info.lda_dims),
    }
    problems = []
    if info.num_classes != num_classes:
        problems.append(f"num_classes {info.num_classes}, the store has {num_classes}")
    for short, dims in want.items():
        shape = shapes.get(short)
        if shape is not None and any(d is not None and (len(shape) <= i or shape[i] != d) for i, d in enumerate(dims)):
            problems.append(f"{short} has shape {list(shape)}, the settings make {[d for d in dims if d is not None]}")
    for short, shape in shapes.items():
        if short.startswith("penult_topk") and tuple(shape[-3:]) != (*info.penult_grid, info.topk):
            problems.append(
                f"{short} has shape {list(shape)}, the settings make [..., {info.penult_grid}, {info.topk}]"
            )
        if short == "subclass_idx" and tuple(shape[-2:]) != tuple(info.inter_grid):
            problems.append(f"{short} has shape {list(shape)}, the settings make a {info.inter_grid} grid")
    if problems:
        raise StoreError(
            f"Target set {info.name!r} of {where} disagrees with its arrays ({problems[0]}); "
            "re-run `kdpipe cluster --overwrite` for it."
        )

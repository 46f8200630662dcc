"""The interface every target kind implements, and what the kinds compute from.

A *target kind* is one kind of teacher target a student method consumes: the logits, a CAM
pooled to r x r, the native CAM, a raw feature map, letKD's penultimate top-k or its
intermediate sub-class probabilities. Each is written once, as a small class that knows

- ``arrays()``: the per-sample store arrays holding it (paths such as ``"cam_r2"`` or
  ``"targets/default/subclass_idx"``), each [N, V, ...] with one row per (sample, view);
- ``storage``: each array's dtype in the store and its meaning (stage one writes them);
- ``online(out)``: its rows computed from the teacher's outputs on a batch, in stored form
  (before the float16 cast): stage one writes exactly these rows, and the online teacher
  source uses them directly, so cached and online targets differ by float16 rounding alone;
- ``targets(rows)``: stored rows -> the tensors handed to ``Method.loss`` (``target_keys``);
- ``warp(rows, policy, params)``: identity-view rows moved to another view (ReLabel-style);
- ``compare(cached, online)``: the tensors fidelity is measured on.

A method declares the kinds it needs (``Method.kinds()``); extraction, cluster's assignment
pass, the cached and online target sources and ``inspect --fidelity`` are loops over kinds.

Kinds that need fitted parameters (letKD's centres, LDA, score matrix) are bound to a store's
target set with ``bind(ctx)`` before use; the rest need no binding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from kdpipe.artifacts.target_set import TargetSet
from kdpipe.errors import KdpipeError

__all__ = [
    "TeacherOutputs",
    "KindContext",
    "TargetKind",
    "StoredArray",
    "pool_to",
    "warp_channels_last",
    "needs_stages",
    "StoreContents",
    "kind_classes",
    "NumberedArrays",
]


@dataclass
class TeacherOutputs:
    """The teacher's outputs on one batch of (augmented, normalised) images.

    ``logits`` [B, C]; ``feats`` as ``KDModel.forward_features`` returns them (``"inter"``
    [B, Di, hi, wi], ``"penult"`` [B, D, h, w], ``"cam"`` [B, C, h, w]); ``labels`` int64 [B]
    (only letKD's intermediate targets need them: the sub-class is label-constrained).
    """

    logits: torch.Tensor
    feats: dict
    labels: torch.Tensor | None = None

    @classmethod
    @torch.no_grad()
    def of(
        cls, teacher, images_normalized: torch.Tensor, labels: torch.Tensor | None = None, stages: bool = False
    ) -> TeacherOutputs:
        """``stages``: also the stage outputs, ``feats["stages"]`` (kinds with ``needs_stages``)."""
        logits, feats = teacher.forward_features(images_normalized, stages=stages)
        return cls(logits, feats, labels)

    def select(self, keep: torch.Tensor) -> TeacherOutputs:
        """The rows ``keep`` (a boolean or index tensor) of every output (lists: of each entry)."""
        feats = {k: [t[keep] for t in v] if isinstance(v, list) else v[keep] for k, v in self.feats.items()}
        return TeacherOutputs(self.logits[keep], feats, None if self.labels is None else self.labels[keep])


@dataclass(frozen=True)
class StoredArray:
    """One per-sample store array of a kind: its dtype in the store and what it holds."""

    dtype: str
    meaning: str
    views: str = "all"  # "all": one row per stored view; "identity": the identity view only


@dataclass
class KindContext:
    """What binding a kind may need: the target set's record, a loader of the store's whole
    (static) arrays by path, and the device the bound tensors live on."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    target_set: TargetSet | None = None
    load: Callable[[str], np.ndarray] | None = None
    available: frozenset = frozenset()  # the store's per-sample array paths, where known

    def tensor(self, path: str) -> torch.Tensor:
        """A static array as a float32 tensor on the context's device."""
        if self.load is None:
            raise KdpipeError(f"Binding needs the store array {path}, but no store is given.")
        return torch.as_tensor(np.asarray(self.load(path)), dtype=torch.float32).to(self.device)


@dataclass(frozen=True)
class StoreContents:
    """What a store holds, as kinds ask it (``TargetKind.in_store``): its per-sample array
    paths, the views its feature arrays cover, and the chosen target set (or None)."""

    names: frozenset
    feature_views: str = "identity"
    target_set: TargetSet | None = None
    #: whether the store has an array at a path (target-set arrays are not among ``names``)
    has: Callable[[str], bool] | None = None

    def has_target_array(self, name: str) -> bool:
        """Whether the chosen target set has its array ``name`` (e.g. ``subclass_idx``)."""
        if self.target_set is None:
            return False
        path = self.target_set.array(name)
        return self.has(path) if self.has is not None else path in self.names


#: every TargetKind subclass, in definition order (kinds register by being defined: shared
#: ones in this package, a method's own in its module)
_KIND_CLASSES: list[type[TargetKind]] = []


def kind_classes() -> list[type[TargetKind]]:
    """Every defined kind class, by ``listing_order`` (import the method modules first to
    include their kinds)."""
    return sorted(_KIND_CLASSES, key=lambda cls: cls.listing_order)


class TargetKind:
    """Base class of the target kinds (see the module docstring)."""

    #: where reports and ``inspect --fidelity`` list the kind: the shared kinds first
    #: (logits 0, CAMs 10, features 20, stage maps 30), a method's own kinds after (100)
    listing_order: int = 100

    #: a base class of kinds, not a kind (set in the base's own body): not listed
    abstract: bool = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not cls.__name__.startswith("_") and not cls.__dict__.get("abstract", False):
            _KIND_CLASSES.append(cls)

    @classmethod
    def in_store(cls, contents: StoreContents) -> list[TargetKind]:
        """The instances of this kind a store holds (``inspect --fidelity`` compares each);
        default: none (online-only kinds)."""
        return []

    #: who writes its arrays: "extract" (the teacher pass), "cluster" (the assignment pass),
    #: or None for kinds that exist only online (no store arrays)
    writer: str | None = "extract"
    #: whether ``bind`` needs a target set
    needs_target_set: bool = False
    #: whether ``online`` reads the teacher's stage outputs (``feats["stages"]``: AT, FitNet)
    needs_stages: bool = False
    #: whether the method also needs each batch's data-set sample indices: the sources then
    #: add them as ``targets["sample_index"]`` int64 [B] (CRD's memory bank is indexed by them)
    needs_sample_index: bool = False

    # Read-only here: a kind gives them as class attributes, or as properties where they
    # depend on its parameters (Feature's layer, Cam's r).
    @property
    def name(self) -> str:
        """Short identifier (fidelity reports, error messages)."""
        return "kind"

    @property
    def target_keys(self) -> tuple[str, ...]:
        """Keys this kind adds to the per-batch target dict."""
        return ()

    # ------------------------------------------------------------------ the store side
    @property
    def storage(self) -> dict[str, StoredArray]:
        """Per-sample store arrays of this kind: path -> dtype and meaning."""
        return {}

    def arrays(self) -> tuple[str, ...]:
        return tuple(self.storage)

    @property
    def cacheable(self) -> bool:
        """Whether the kind can be read from a store (kinds without a writer are online only)."""
        return self.writer is not None

    def bind(self, ctx: KindContext) -> TargetKind:
        """Load what ``online``/``targets`` need from the store (default: nothing)."""
        return self

    def static(self, teacher, out: TeacherOutputs) -> dict[str, tuple[np.ndarray, str]]:
        """Whole arrays extraction writes once (``static/<name>``), from the teacher model and
        its outputs on a probe batch: ``{name: (array, meaning)}``; most kinds have none."""
        return {}

    # ------------------------------------------------------------------ computations
    def online(self, out: TeacherOutputs) -> dict[str, torch.Tensor]:
        """Rows [B, ...] of every array in ``storage`` from the teacher's outputs (float32 or
        int64, before the store's dtype cast)."""
        raise NotImplementedError

    def targets(self, rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rows (as stored, or from ``online``) -> ``{key: tensor}`` for ``target_keys``."""
        raise NotImplementedError

    def online_targets(self, out: TeacherOutputs) -> dict[str, torch.Tensor]:
        """The targets of the online teacher: ``targets(online(out))``."""
        return self.targets(self.online(out))

    def warp(self, rows: dict[str, torch.Tensor], policy, params: torch.Tensor) -> dict:
        """Identity-view rows warped to the views ``params`` [B, P] (default: unchanged)."""
        return rows

    def row_stats(self, rows: dict) -> dict:
        """Statistics of written rows (numpy, as stored) the pass reports, as
        ``{name: (min, sum, count)}``; most kinds have none."""
        return {}

    def compare(self, cached: dict, online: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Fidelity: ``{label: (cached [B, ...], online [B, ...])}`` to compare per sample."""
        if len(self.target_keys) == 1:
            key = self.target_keys[0]
            return {self.name: (cached[key], online[key])}
        return {f"{self.name}:{k}": (cached[k], online[k]) for k in self.target_keys}

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and repr(self) == repr(other)

    def __hash__(self) -> int:
        return hash(repr(self))


class NumberedArrays(TargetKind):
    """Base of the kinds that store one array per teacher stage (or pair of maps), numbered
    from 1: arrays ``<name>/<part>1`` ... ``<name>/<part>n``, target keys ``<key>1`` ...
    ``<key>n`` [B, ...] float32 (AB's signs, OFD's pre-ReLU maps, VID's stage maps, FSP's
    matrices). ``count`` None: read from the store when bound, else from the teacher's first
    outputs (``_numbered``). Subclasses set ``name``, ``key``, ``part``, ``dtype`` and
    ``describe``, and compute their rows in ``online``."""

    abstract = True
    needs_stages = True
    #: the numbered part of the array paths ("stage" or "pair")
    part: str = "stage"
    #: the target keys' prefix
    key: str = ""
    #: the stored dtype
    dtype: str = "float16"

    def __init__(self, count: int | None = None):
        self.count = None if count is None else int(count)

    def describe(self, number: int) -> str:
        """What array ``number`` holds (the store's description of it)."""
        raise NotImplementedError

    @classmethod
    def in_store(cls, contents: StoreContents) -> list[TargetKind]:
        prefix = f"{cls.name}/{cls.part}"
        return [cls()] if any(n.startswith(prefix) for n in contents.names) else []

    def _paths(self) -> list[tuple[str, str]]:
        return [(f"{self.name}/{self.part}{i}", f"{self.key}{i}") for i in range(1, (self.count or 0) + 1)]

    @property
    def target_keys(self) -> tuple[str, ...]:
        return tuple(key for _, key in self._paths())

    @property
    def storage(self) -> dict[str, StoredArray]:
        return {path: StoredArray(self.dtype, self.describe(i)) for i, (path, _) in enumerate(self._paths(), start=1)}

    def bind(self, ctx: KindContext) -> TargetKind:
        if self.count is None and ctx.available:
            prefix = f"{self.name}/{self.part}"
            self.count = sum(1 for p in ctx.available if p.startswith(prefix)) or None
        return self

    def _numbered(self, rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """``rows`` (one per stage, in order) under this kind's array paths; the first call of
        an unbound kind takes its count from them."""
        if self.count is None:
            self.count = len(rows)
        return {path: rows[i] for i, (path, _) in enumerate(self._paths())}

    def targets(self, rows):
        return {key: rows[path].float() for path, key in self._paths()}


# ------------------------------------------------------------------------------ helpers
def needs_stages(kinds) -> bool:
    """Whether any of ``kinds`` reads the teacher's stage outputs (``TeacherOutputs.of(stages=)``)."""
    return any(getattr(k, "needs_stages", False) for k in kinds)


def pool_to(x: torch.Tensor, grid) -> torch.Tensor:
    """Adaptive average pooling of [B, C, h, w] to ``grid`` (h', w'); identity when equal."""
    grid = (int(grid[0]), int(grid[1]))
    return x if tuple(x.shape[-2:]) == grid else F.adaptive_avg_pool2d(x, grid)


def warp_channels_last(maps: torch.Tensor, policy, params, mode: str) -> torch.Tensor:
    """Warp [B, h, w, k] maps (channels last) with ``policy.apply_maps``."""
    moved = maps.permute(0, 3, 1, 2).contiguous()
    return policy.apply_maps(moved, params, mode=mode).permute(0, 2, 3, 1).contiguous()

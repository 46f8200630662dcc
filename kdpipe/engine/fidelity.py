"""How close stored targets are to the online teacher, kind by kind (``kdpipe inspect --fidelity``).

``measure_fidelity`` draws ``num_samples`` samples (seeded) and, per sample,

- ``mode="replay"``: one of its stored views; the image gets exactly that view's parameters,
  and the stored rows of that view are compared as they are: the exact path, whose error is
  float16 rounding alone;
- ``mode="warp"`` (stores whose view 0 is the identity view): a fresh random view; the stored
  identity-view rows are warped to it (``kind.warp``) and compared.

The teacher runs on the augmented, normalised image and each kind computes its online
targets from those outputs (``kind.online_targets``); ``kind.compare`` says what is compared
(letKD's top-k: densified distributions over all K). Identity-only arrays (raw features) are
compared on the identity view in replay mode.

Returns ``{label: {"cosine": mean per-sample cosine similarity, "rel_error":
||cached - online|| / ||online|| over all samples, "num_samples": n}}``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from kdpipe.engine.rows import to_torch
from kdpipe.engine.sources import bind_kinds, kind_context
from kdpipe.errors import KdpipeError, StoreError
from kdpipe.targets import TeacherOutputs
from kdpipe.targets.base import StoreContents, kind_classes, needs_stages

__all__ = ["store_kinds", "measure_fidelity", "FIDELITY_MODES"]

FIDELITY_MODES = ("replay", "warp")


def store_kinds(reader, target_set: str | None = None) -> list:
    """Every kind the store holds (each kind class says what it finds: ``TargetKind.in_store``),
    with the target set ``target_set`` (or the store's only one) for the kinds that need one."""
    from kdpipe.methods.registry import load_all

    load_all()  # a method's own kinds are defined in its module
    sets = reader.target_sets()
    chosen = target_set if target_set is not None else (sets[0] if len(sets) == 1 else None)
    contents = StoreContents(
        names=frozenset(reader.array_names()),
        feature_views=reader.manifest.views.feature_views,
        target_set=reader.target_set(chosen) if chosen is not None else None,
        has=reader.has,
    )
    kinds: list = []
    for cls in kind_classes():
        kinds += [k for k in cls.in_store(contents) if k not in kinds]
    return kinds


class _Stats:
    """Per-label running sums: cosine similarities, squared error, squared online norm."""

    def __init__(self):
        self.cos: dict[str, list] = {}
        self.se: dict[str, float] = {}
        self.norm: dict[str, float] = {}

    def add(self, label: str, cached: torch.Tensor, online: torch.Tensor) -> None:
        a = cached.reshape(cached.shape[0], -1).double()
        b = online.reshape(online.shape[0], -1).double().to(a.device)
        self.cos.setdefault(label, []).extend(F.cosine_similarity(a, b, dim=1, eps=1e-12).tolist())
        self.se[label] = self.se.get(label, 0.0) + float(((a - b) ** 2).sum())
        self.norm[label] = self.norm.get(label, 0.0) + float((b**2).sum())

    def result(self, n: int) -> dict:
        return {
            label: {
                "cosine": float(np.mean(c)) if c else float("nan"),
                "rel_error": float(np.sqrt(self.se[label] / self.norm[label]))
                if self.norm[label] > 0
                else float("nan"),
                "num_samples": n,
            }
            for label, c in self.cos.items()
        }


def _stored_rows(reader, path: str, idx: np.ndarray, view: np.ndarray | None, device) -> torch.Tensor:
    """Rows of ``idx`` at each sample's ``view`` (or view 0)."""
    block = np.asarray(reader.array(path).get_orthogonal_selection((idx, slice(None))))
    picked = block[np.arange(len(idx)), view] if view is not None else block[:, 0]
    return to_torch(picked).to(device)


class _TeacherOn:
    """The teacher's outputs on given samples of the data set under given view parameters."""

    def __init__(self, teacher, dataset, policy, device, stages: bool = False):
        self.teacher, self.dataset, self.policy, self.device = teacher, dataset, policy, device
        self.stages = stages  # also the stage outputs (AT, FitNet kinds)
        self.labels = torch.as_tensor(np.asarray(dataset.labels), dtype=torch.int64)

    def __call__(self, idx: np.ndarray, params: torch.Tensor) -> TeacherOutputs:
        from kdpipe.data import normalize

        images = self.policy.apply_images(self.dataset.get_batch(idx), params)
        x = normalize(images, self.dataset.mean, self.dataset.std).to(self.device)
        return TeacherOutputs.of(self.teacher, x, self.labels[idx].to(self.device), stages=self.stages)


def _check_mode(mode: str, num_samples: int) -> None:
    if mode not in FIDELITY_MODES:
        raise KdpipeError(f"Fidelity mode must be replay or warp, not {mode!r}.")
    if int(num_samples) < 1:
        raise KdpipeError(f"Fidelity needs at least one sample, not {num_samples}.")


class _Once:
    """A zero-argument function evaluated on the first call only (the identity-view teacher
    pass, needed by identity-only kinds alone)."""

    def __init__(self, compute):
        self.compute, self.value = compute, None

    def __call__(self):
        if self.value is None:
            self.value = self.compute()
        return self.value


def _compare_kind(kind, reader, stats: _Stats, idx, view, params, mode: str, out, identity_out, policy) -> None:
    """Add one kind's cached-vs-online rows of one batch to ``stats``. Identity-only arrays
    (raw features) are compared on the identity view in replay mode (``identity_out()``)."""
    dev = out.logits.device
    identity_only = any(s.views == "identity" for s in kind.storage.values())
    if mode == "replay" and identity_only:
        rows = {p: _stored_rows(reader, p, idx, None, dev) for p in kind.arrays()}
        out = identity_out()
    else:
        rows = {p: _stored_rows(reader, p, idx, None if identity_only else view, dev) for p in kind.arrays()}
        if mode == "warp":
            rows = kind.warp(rows, policy, params.to(dev))
    for label, (cached, online) in kind.compare(kind.targets(rows), kind.online_targets(out)).items():
        stats.add(label, cached, online)


@torch.no_grad()
def measure_fidelity(
    reader,
    teacher,
    dataset,
    num_samples: int = 256,
    seed: int = 0,
    mode: str | None = None,
    target_set: str | None = None,
    device="cpu",
    batch_size: int = 64,
    policy=None,
    kinds=None,
) -> dict:
    """See the module docstring. ``mode`` None: replay for stores with several views, warp
    for 1-view stores. ``kinds`` None: every kind the store holds (``store_kinds``)."""
    dev = torch.device(device)
    mode = mode or ("replay" if reader.num_views > 1 else "warp")
    _check_mode(mode, num_samples)
    policy = policy if policy is not None else dataset.policy
    kinds = kinds if kinds is not None else store_kinds(reader, target_set)
    kinds = bind_kinds(kinds, kind_context(reader, kinds, target_set, dev))
    views = np.asarray(reader.array("views")[...])
    ident = np.asarray(policy.identity())
    rng = np.random.default_rng(seed)
    n = min(int(num_samples), reader.num_samples)
    chosen = np.sort(rng.choice(reader.num_samples, size=n, replace=False))
    if mode == "warp" and not (views[chosen, 0] == ident).all():
        raise StoreError(
            f"Warp fidelity needs a store whose view 0 is the identity view (--views 1); "
            f"the store at {reader.path} holds other views: use replay."
        )
    gen = torch.Generator().manual_seed(int(seed))
    teacher_on = _TeacherOn(teacher.to(dev).eval(), dataset, policy, dev, stages=needs_stages(kinds))
    stats = _Stats()
    for start in range(0, n, batch_size):
        idx = chosen[start : start + batch_size]
        if mode == "replay":
            view = rng.integers(0, views.shape[1], size=len(idx))
            params = torch.as_tensor(views[idx, view])
        else:
            view, params = None, policy.random(gen, len(idx), device="cpu")
        out = teacher_on(idx, params)
        identity = _Once(lambda idx=idx: teacher_on(idx, torch.as_tensor(np.repeat(ident[None], len(idx), 0))))
        for kind in kinds:
            _compare_kind(kind, reader, stats, idx, view, params, mode, out, identity, policy)
    return stats.result(n)

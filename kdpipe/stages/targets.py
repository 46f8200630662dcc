"""Target sources: what the student loop gets as teacher targets for a batch.

One interface, three sources; the training loop cannot tell them apart:

    src.mode                                  # "replay" | "warp" | "online" | "none"
    view_idx, params = src.views_for(indices, epoch, generator)
    targets = src.targets(indices, view_idx, params, images_normalized, labels=None)

``indices`` int64 [B] are the data set's own sample indices (CPU or device);
``views_for`` returns ``view_idx`` int64 [B] (the stored view replayed) or None, and the view
parameters int32 [B, P] the loop applies to the images (``policy.apply_images``) before
normalising them; ``targets`` returns ``{key: tensor}`` for exactly ``method.target_keys``,
float32 (indices int64), on the source's device (shapes: ``kdpipe.methods.base``).
``labels`` is only used by the online source of letKD-2 (the sub-class assignment is
label-constrained); it may also be given at construction (``labels=dataset.labels``).

- ``NoTargets(policy)``: plain CE: fresh random views, no targets.
- ``CachedTargets(reader, method, target_set, device, mode)``: from a store.
  * replay: per sample per epoch one of its V stored views is drawn (uniformly, from the
    loop's generator); the loop applies exactly that view's stored parameters and the
    targets are the stored ones: equal to the online teacher's up to float16.
  * warp: for stores whose view 0 is the identity view (``views=1``): a fresh random view
    (``policy.random``) is drawn; dense maps are warped with ``policy.apply_maps`` bilinear
    (CAMs; the native CAM is warped and then pooled to r when the store has it, else the
    pooled map is warped), discrete maps nearest (top-k indices and their values together,
    sub-class indices). Logits are not spatial and are used unchanged (the identity view's
    logits); how far all this is from the online teacher is measured by ``warp_fidelity``.
  * Residency: the arrays a method needs (all views for replay, view 0 for warp) are loaded
    once onto the device when their total size is at most ``max_resident_bytes`` (default
    ``RESIDENT_BYTES`` = 2 GiB) and, on CUDA, at most half of the free device memory;
    otherwise each batch is read from zarr (whole chunks, sample axis).
  * Refusals (StoreError, one sentence): an array the method needs is missing, a target
    array holds NaN or infinite values (checked once, at construction), warp on a store
    whose view 0 is not the identity view.
- ``OnlineTargets(teacher, method, target_set_reader, policy, device, cam_resolution)``: the
  teacher runs live (eval mode, no_grad) on the same augmented, normalised batch and the same
  dict is computed: logits; CAM pooled at r (native for binarised CAT-KD); for letKD the
  top-k of softmax_K(-T * ||f - rho||^2) over the target set's ``penult_centers`` and the
  label-constrained sub-class of (f - lda_xbar) @ lda_scalings[:, :d] among the image
  label's ``subclass_centers``, its row of ``subclass_scores`` as ``inter_probs``. Teacher
  maps are average-pooled (adaptive) to the student's grid (the target set's array shapes)
  before any assignment.

``warp_fidelity(reader, teacher, dataset, num_samples, seed)`` measures warped stored targets
against the online teacher on random views (``kdpipe inspect --fidelity``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from kdpipe.errors import KdpipeError, StoreError
from kdpipe.stages.loop import fits_on_device

__all__ = [
    "TargetSource", "NoTargets", "CachedTargets", "OnlineTargets", "warp_fidelity",
    "RESIDENT_BYTES", "resolve_target_set", "target_set_info",
]

#: Arrays up to this many bytes in total are loaded onto the device once (see module doc).
RESIDENT_BYTES = 2 << 30

_TARGET_PREFIX = "targets/"


# ------------------------------------------------------------------------------ helpers
def _device(device) -> torch.device:
    return torch.device(device if device is not None else "cpu")


def _np_to_torch(a: np.ndarray) -> torch.Tensor:
    """numpy -> torch, widening unsigned ints torch handles poorly (uint16/32/64)."""
    a = np.asarray(a)
    if a.dtype.kind == "u" and a.dtype.itemsize > 1:
        a = a.astype(np.int64)
    elif a.dtype.kind == "b":
        a = a.astype(np.uint8)
    return torch.from_numpy(np.ascontiguousarray(a))


def _cpu_long(indices) -> np.ndarray:
    if torch.is_tensor(indices):
        return indices.detach().to("cpu", torch.int64).numpy()
    return np.asarray(indices, dtype=np.int64)


def resolve_target_set(reader, target_set: str | None) -> str:
    """The target set to use: the one named, or the store's only complete one."""
    sets = reader.target_sets()
    if target_set is not None:
        if target_set not in sets:
            raise StoreError(f"The store at {reader.path} has no complete target set "
                             f"{target_set!r} (it has: {', '.join(sets) or 'none'}); run "
                             "`kdpipe cluster` first.")
        return target_set
    if len(sets) == 1:
        return sets[0]
    if not sets:
        raise StoreError(f"The store at {reader.path} has no target set; run `kdpipe cluster` "
                         "first.")
    raise StoreError(f"The store at {reader.path} has several target sets "
                     f"({', '.join(sets)}); name one.")


def _attr(attrs: dict, *names, default=None):
    for n in names:
        if n in attrs and attrs[n] is not None:
            return attrs[n]
    return default


def target_set_info(reader, target_set: str) -> dict:
    """What the letKD sources need to know about a target set, from its arrays' shapes and
    attrs: K, k, temperature, penult grid (h, w), and for letKD-2 M, K_inter, d, inter grid."""
    attrs = reader.target_attrs(target_set)
    base = f"{_TARGET_PREFIX}{target_set}/"
    info = {"attrs": attrs}
    for key, names in (("penult_grid", ("penult_grid", "student_grid")),
                       ("inter_grid", ("inter_grid", "student_grid"))):
        g = _attr(attrs, *names)
        if g is not None:
            info[key] = (int(g[0]), int(g[1]))
    if _attr(attrs, "topk", "k") is not None:
        info["k"] = int(_attr(attrs, "topk", "k"))
    if _attr(attrs, "K_penult", "K") is not None:
        info["K"] = int(_attr(attrs, "K_penult", "K"))
    if reader.has(base + "penult_topk_idx"):
        shp = reader.array(base + "penult_topk_idx").shape           # [N, V, h, w, k]
        info["penult_grid"] = (int(shp[2]), int(shp[3]))
        info["k"] = int(shp[4])
    if reader.has(base + "penult_centers"):
        info["K"] = int(reader.array(base + "penult_centers").shape[0])
    info["temperature"] = float(_attr(attrs, "temperature", "T", default=1.0))
    if reader.has(base + "subclass_idx"):
        shp = reader.array(base + "subclass_idx").shape              # [N, V, h, w]
        info["inter_grid"] = (int(shp[2]), int(shp[3]))
    if reader.has(base + "subclass_scores"):
        info["M"] = int(reader.array(base + "subclass_scores").shape[0])
    if reader.has(base + "subclass_centers"):
        m, d = reader.array(base + "subclass_centers").shape
        info["d"] = int(d)
        C = int(reader.manifest["dataset"]["num_classes"])
        info["K_inter"] = int(_attr(attrs, "K_inter", "k_inter", "K_sub", default=m // C))
    return info


def _pool_to(x: torch.Tensor, grid) -> torch.Tensor:
    grid = (int(grid[0]), int(grid[1]))
    return x if tuple(x.shape[-2:]) == grid else F.adaptive_avg_pool2d(x, grid)


def _warp_last_k(maps: torch.Tensor, policy, params, mode: str) -> torch.Tensor:
    """Warp [B, h, w, k] maps (channels last) with policy.apply_maps."""
    return policy.apply_maps(maps.permute(0, 3, 1, 2).contiguous(), params,
                             mode=mode).permute(0, 2, 3, 1).contiguous()


# ------------------------------------------------------------------------------ sources
class TargetSource:
    """Base class of the target sources (see the module docstring)."""

    mode: str = "none"
    keys: tuple[str, ...] = ()

    def views_for(self, indices, epoch: int, generator: torch.Generator):
        raise NotImplementedError

    def targets(self, indices, view_idx, params, images_normalized, labels=None) -> dict:
        raise NotImplementedError


class NoTargets(TargetSource):
    """Plain training: a fresh random view per sample, no targets."""

    mode = "none"
    keys = ()

    def __init__(self, policy):
        self.policy = policy

    def views_for(self, indices, epoch, generator):
        return None, self.policy.random(generator, int(len(indices)))

    def targets(self, indices, view_idx, params, images_normalized, labels=None) -> dict:
        return {}


class CachedTargets(TargetSource):
    """Targets read from a store (replay or warp; see the module docstring)."""

    def __init__(self, reader, method, target_set: str | None = None, device="cpu",
                 mode: str = "replay", policy=None, max_resident_bytes: int = RESIDENT_BYTES,
                 check_finite: bool = True):
        if mode not in ("replay", "warp"):
            raise KdpipeError(f"Cached targets mode must be 'replay' or 'warp', got {mode!r}.")
        self.reader = reader
        self.method = method
        self.mode = mode
        self.device = _device(device)
        self.keys = tuple(method.target_keys)
        needs_set = any(a.startswith(_TARGET_PREFIX) for a in method.store_artifacts("x"))
        self.target_set = resolve_target_set(reader, target_set) if needs_set else target_set
        self.policy = policy if policy is not None else self._policy_from_manifest()

        self.num_views = int(reader.array("views").shape[1]) if reader.has("views") else 1
        self._plan = self._plan_arrays()
        self._views_cpu = _np_to_torch(reader.array("views")[:]).to(torch.int32) \
            if reader.has("views") else None
        if mode == "warp":
            self._check_identity_view()

        # Residency: the per-sample arrays (all views for replay, view 0 for warp).
        nbytes = 0
        for name in self._sample_arrays():
            arr = reader.array(name)
            per_view = int(np.prod(arr.shape[2:], dtype=np.int64)) * arr.dtype.itemsize
            nbytes += arr.shape[0] * per_view * (arr.shape[1] if mode == "replay" else 1)
        self.resident_bytes = int(nbytes)
        self.resident = nbytes <= max_resident_bytes and fits_on_device(nbytes, self.device)
        self._data: dict[str, torch.Tensor] = {}
        if self.resident:
            for name in self._sample_arrays():
                arr = reader.array(name)
                a = arr[:] if mode == "replay" else arr[:, 0]
                t = _np_to_torch(a)
                if check_finite:
                    self._check_finite_tensor(name, t)
                self._data[name] = t.to(self.device)
        elif check_finite:
            for name in self._sample_arrays():
                self._check_finite_zarr(name)
        # small whole arrays (sub-class score matrix) are always resident
        self._static: dict[str, torch.Tensor] = {}
        if "inter_probs" in self.keys:
            name = self._plan["subclass_scores"]
            t = _np_to_torch(reader.array(name)[:]).float()
            if check_finite:
                self._check_finite_tensor(name, t)
            self._static["subclass_scores"] = t.to(self.device)

    # ------------------------------------------------------------------ planning
    def _policy_from_manifest(self):
        from kdpipe.views import get_policy

        v = self.reader.manifest.get("views") or {}
        d = self.reader.manifest.get("dataset") or {}
        name = v.get("policy")
        if isinstance(name, dict):
            spec = dict(name)
            name = spec.get("policy")
        else:
            spec = dict(v)
        opts = {}
        if name in ("cifar", "digits"):
            for key in ("padding", "pad_mode"):
                if spec.get(key) is not None:
                    opts[key] = spec[key]
        size = spec.get("image_size") or d.get("image_size")
        try:
            return get_policy(name, image_size=tuple(size) if size else None, **opts)
        except Exception:  # noqa: BLE001 - only warp needs it; refused there
            return None

    def _need(self, name: str, why: str) -> str:
        if not self.reader.has(name):
            hint = ("run `kdpipe cluster` to build it" if name.startswith(_TARGET_PREFIX)
                    else "extract the store with it")
            raise StoreError(f"The store at {self.reader.path} lacks {name}, which method "
                             f"{self.method.name} needs for {why}; {hint}.")
        return name

    def _plan_arrays(self) -> dict:
        """Which store array feeds each target key."""
        plan = {}
        keys = set(self.keys)
        ts = f"{_TARGET_PREFIX}{self.target_set}/"
        if "logits" in keys:
            plan["logits"] = self._need("logits", "its logits")
        if "cam" in keys:
            r = getattr(self.method, "cam_resolution", None)
            pooled = f"cam_r{r}" if r is not None else None
            if r is None:
                plan["cam"] = self._need("cam", "the native CAM")
            elif self.mode == "warp" and self.reader.has("cam"):
                plan["cam"] = "cam"          # warp the native map, then pool
            elif pooled and self.reader.has(pooled):
                plan["cam"] = pooled
            elif self.reader.has("cam"):
                plan["cam"] = "cam"          # pool the native map per batch
            else:
                self._need(pooled, f"CAMs at {r}x{r}")
        if "penult_topk_idx" in keys or "penult_topk_val" in keys:
            plan["penult_topk_idx"] = self._need(ts + "penult_topk_idx", "penultimate targets")
            plan["penult_topk_val"] = self._need(ts + "penult_topk_val", "penultimate targets")
        if "inter_probs" in keys:
            plan["subclass_idx"] = self._need(ts + "subclass_idx", "intermediate targets")
            plan["subclass_scores"] = self._need(ts + "subclass_scores", "intermediate targets")
        for name in self.method.store_artifacts(self.target_set):
            if name.startswith(_TARGET_PREFIX):
                self._need(name, "its targets")
        return plan

    def _sample_arrays(self) -> list[str]:
        return [v for k, v in self._plan.items() if k != "subclass_scores"]

    def _check_identity_view(self):
        if self.policy is None:
            raise StoreError(f"Warp needs the store's view policy, which kdpipe cannot rebuild "
                             f"from the manifest of {self.reader.path}; pass the policy.")
        if self._views_cpu is None:
            return
        ident = torch.as_tensor(self.policy.identity(), dtype=torch.int32)
        if not bool((self._views_cpu[:, 0] == ident).all()):
            raise StoreError(f"Warp needs a store whose view 0 is the identity view (views=1); "
                             f"the store at {self.reader.path} holds other views: use replay.")

    def _refuse_nonfinite(self, name: str):
        raise StoreError(f"The store array {name} at {self.reader.path} holds NaN or infinite "
                         "values; re-extract or re-cluster it.")

    def _check_finite_tensor(self, name: str, t: torch.Tensor):
        if t.dtype.is_floating_point and not bool(torch.isfinite(t).all()):
            self._refuse_nonfinite(name)

    def _check_finite_zarr(self, name: str):
        arr = self.reader.array(name)
        if arr.dtype.kind != "f":
            return
        step = max(1, int(arr.chunks[0]))
        for s in range(0, arr.shape[0], step):
            block = arr[s:s + step] if self.mode == "replay" else arr[s:s + step, 0]
            if not np.isfinite(block).all():
                self._refuse_nonfinite(name)

    # ------------------------------------------------------------------ interface
    def views_for(self, indices, epoch, generator):
        B = int(len(indices))
        if self.mode == "warp":
            return None, self.policy.random(generator, B, device="cpu")
        gen_device = generator.device if generator is not None else torch.device("cpu")
        view_idx = torch.randint(0, self.num_views, (B,), generator=generator,
                                 device=gen_device).to("cpu", torch.int64)
        idx = torch.as_tensor(_cpu_long(indices))
        if self._views_cpu is None:
            params = torch.as_tensor(self.policy.identity())[None].expand(B, -1).clone()
        else:
            params = self._views_cpu[idx, view_idx]
        return view_idx, params

    def _rows(self, name: str, idx_np: np.ndarray, view_idx) -> torch.Tensor:
        """Rows of array `name` for the batch, on the device: [B, ...] (the chosen view)."""
        if self.resident:
            data = self._data[name]
            idx = torch.as_tensor(idx_np, device=data.device)
            if self.mode == "replay":
                return data[idx, view_idx.to(data.device)]
            return data[idx]
        arr = self.reader.array(name)
        uniq, inverse = np.unique(idx_np, return_inverse=True)
        if self.mode == "replay":
            # only the views drawn in this batch: [u, nv, ...] with nv <= min(B, V)
            v = _cpu_long(view_idx)
            uviews, vpos = np.unique(v, return_inverse=True)
            block = arr.get_orthogonal_selection((uniq, uviews))
            rows = block[inverse, vpos]
        else:
            block = arr.get_orthogonal_selection((uniq, 0))       # [u, ...]
            rows = block[inverse]
        return _np_to_torch(rows).to(self.device)

    def targets(self, indices, view_idx, params, images_normalized=None, labels=None) -> dict:
        idx_np = _cpu_long(indices)
        if self.mode == "replay" and view_idx is None:
            raise KdpipeError("Replayed targets need the view indices views_for returned.")
        if self.mode == "warp":
            params = torch.as_tensor(params).to(self.device)
        out = {}
        keys = set(self.keys)
        if "logits" in keys:
            out["logits"] = self._rows(self._plan["logits"], idx_np, view_idx).float()
        if "cam" in keys:
            cam = self._rows(self._plan["cam"], idx_np, view_idx).float()
            if self.mode == "warp":
                cam = self.policy.apply_maps(cam, params, mode="bilinear")
            r = getattr(self.method, "cam_resolution", None)
            out["cam"] = cam if r is None else _pool_to(cam, (r, r))
        if "penult_topk_idx" in keys or "penult_topk_val" in keys:
            ti = self._rows(self._plan["penult_topk_idx"], idx_np, view_idx).long()
            tv = self._rows(self._plan["penult_topk_val"], idx_np, view_idx).float()
            if self.mode == "warp":
                ti = _warp_last_k(ti, self.policy, params, "nearest")
                tv = _warp_last_k(tv, self.policy, params, "nearest")
            out["penult_topk_idx"], out["penult_topk_val"] = ti, tv
        if "inter_probs" in keys:
            sub = self._rows(self._plan["subclass_idx"], idx_np, view_idx).long()
            if self.mode == "warp":
                sub = self.policy.apply_maps(sub[:, None], params, mode="nearest")[:, 0]
            out["inter_probs"] = self._static["subclass_scores"][sub]
        return {k: out[k] for k in self.keys}


class OnlineTargets(TargetSource):
    """The teacher live on the student's batch (see the module docstring)."""

    mode = "online"

    def __init__(self, teacher, method, target_set_reader=None, policy=None, device="cpu",
                 cam_resolution: int | None = None, target_set: str | None = None,
                 labels=None):
        self.device = _device(device)
        self.teacher = teacher.to(self.device).eval()
        self.method = method
        self.policy = policy
        self.keys = tuple(method.target_keys)
        if cam_resolution is None:
            cam_resolution = getattr(method, "cam_resolution", None)
        self.cam_resolution = cam_resolution
        self.labels = None if labels is None else torch.as_tensor(np.asarray(labels),
                                                                  dtype=torch.int64)
        keys = set(self.keys)
        self.info = None
        if keys & {"penult_topk_idx", "penult_topk_val", "inter_probs"}:
            if target_set_reader is None:
                raise KdpipeError(f"Online targets for {method.name} need the store's target "
                                  "set (cluster centres, LDA, score matrix).")
            reader = target_set_reader
            ts = resolve_target_set(reader, target_set)
            self.target_set = ts
            self.info = target_set_info(reader, ts)
            base = f"{_TARGET_PREFIX}{ts}/"

            def load(name):
                if not reader.has(base + name):
                    raise StoreError(f"The store at {reader.path} lacks {base + name}, which "
                                     f"online targets for {method.name} need.")
                return _np_to_torch(reader.array(base + name)[:]).to(self.device)

            self.centers = load("penult_centers").float()
            if "inter_probs" in keys:
                self.lda_scalings = load("lda_scalings").float()
                self.lda_xbar = load("lda_xbar").float().reshape(-1)
                self.subclass_centers = load("subclass_centers").float()
                self.subclass_scores = load("subclass_scores").float()

    def views_for(self, indices, epoch, generator):
        return None, self.policy.random(generator, int(len(indices)), device="cpu")

    @torch.no_grad()
    def targets(self, indices, view_idx, params, images_normalized, labels=None) -> dict:
        from kdpipe.methods.letkd import assign_subclasses, penult_topk_targets

        keys = set(self.keys)
        x = images_normalized.to(self.device)
        logits, feats = self.teacher.forward_features(x)
        out = {}
        if "logits" in keys:
            out["logits"] = logits.float()
        if "cam" in keys:
            cam = feats["cam"].float()
            r = self.cam_resolution
            out["cam"] = cam if r is None else _pool_to(cam, (r, r))
        if "penult_topk_idx" in keys or "penult_topk_val" in keys:
            info = self.info
            f = _pool_to(feats["penult"].float(), info.get("penult_grid", feats["penult"].shape[-2:]))
            ti, tv = penult_topk_targets(f, self.centers, info["temperature"], info["k"])
            out["penult_topk_idx"], out["penult_topk_val"] = ti, tv
        if "inter_probs" in keys:
            if labels is None:
                if self.labels is None:
                    raise KdpipeError("Online letKD-2 targets need the images' labels.")
                labels = self.labels[torch.as_tensor(_cpu_long(indices))]
            info = self.info
            f = _pool_to(feats["inter"].float(), info.get("inter_grid", feats["inter"].shape[-2:]))
            sub = assign_subclasses(f, torch.as_tensor(labels).to(self.device), self.lda_xbar,
                                    self.lda_scalings, self.subclass_centers, info["K_inter"])
            out["inter_probs"] = self.subclass_scores[sub]
        return {k: out[k] for k in self.keys}


# ------------------------------------------------------------------------------ fidelity
def _compare(warped: torch.Tensor, online: torch.Tensor) -> tuple[list, float, float]:
    """Per-sample cosine similarities, sum of squared errors, sum of squared online norm."""
    a = warped.reshape(warped.shape[0], -1).double()
    b = online.reshape(online.shape[0], -1).double()
    cos = F.cosine_similarity(a, b, dim=1, eps=1e-12)
    return cos.tolist(), float(((a - b) ** 2).sum()), float((b ** 2).sum())


@torch.no_grad()
def warp_fidelity(reader, teacher, dataset, num_samples: int = 256, seed: int = 0,
                  target_set: str | None = None, device="cpu", batch_size: int = 64,
                  policy=None, mode: str = "warp") -> dict:
    """How close stored targets are to the online teacher on the views a student would see.

    ``mode="warp"`` (stores with the identity view only): draws ``num_samples`` samples
    (seeded) and one fresh random view each (``policy.random`` from a generator seeded with
    ``seed``), warps the store's identity-view arrays to that view (dense maps bilinear,
    discrete maps nearest, logits unchanged) and compares them with the teacher run on the
    augmented image. ``mode="replay"``: picks one stored view per sample (seeded), applies
    exactly its parameters to the image and compares the stored targets of that view as they
    are: the exact path, whose error is float16 rounding alone. Artifacts: ``logits``, ``cam``, ``cam_rR``,
    ``feat/<layer>`` (those stored) and, with a target set, ``penult_topk`` (densified,
    renormalised distributions over the K clusters) and ``inter_probs``.

    Returns ``{artifact: {"cosine": mean per-sample cosine similarity, "rel_error":
    ||warped - online|| / ||online|| over all samples, "num_samples": n}}``.
    """
    from kdpipe.data import normalize
    from kdpipe.methods.letkd import assign_subclasses, densify_topk, penult_topk_targets

    dev = _device(device)
    teacher = teacher.to(dev).eval()
    policy = policy if policy is not None else dataset.policy
    N = reader.num_samples
    views = reader.array("views")
    ident = np.asarray(policy.identity())
    rng = np.random.default_rng(seed)
    n = min(int(num_samples), N)
    idx_all = np.sort(rng.choice(N, size=n, replace=False))
    if mode not in ("warp", "replay"):
        raise KdpipeError(f"Fidelity mode must be warp or replay, not {mode!r}.")
    replay = mode == "replay"
    if not replay and not (np.asarray(views.get_orthogonal_selection((idx_all, 0))) == ident).all():
        raise StoreError(f"Warp fidelity needs a store whose view 0 is the identity view "
                         f"(views=1); the store at {reader.path} holds other views.")
    gen = torch.Generator().manual_seed(int(seed))

    names = [a for a in ("logits", "cam") if reader.has(a)]
    names += sorted(a for a in reader.array_names() if a.startswith("cam_r"))
    names += sorted(a for a in reader.array_names() if a.startswith("feat/"))
    sets = reader.target_sets()
    ts = target_set if target_set is not None else (sets[0] if len(sets) == 1 else None)
    info = target_set_info(reader, ts) if ts is not None else None
    tsd = {}
    if info is not None:
        base = f"{_TARGET_PREFIX}{ts}/"
        for a in ("penult_centers", "lda_scalings", "lda_xbar", "subclass_centers",
                  "subclass_scores", "penult_topk_idx", "penult_topk_val", "subclass_idx"):
            if reader.has(base + a):
                tsd[a] = reader.array(base + a)
    C = int(reader.manifest["dataset"]["num_classes"])
    stats: dict[str, list] = {}

    def add(name, warped, online):
        cos, se, norm = _compare(warped, online)
        s = stats.setdefault(name, [[], 0.0, 0.0])
        s[0].extend(cos)
        s[1] += se
        s[2] += norm

    static = {k: _np_to_torch(tsd[k][:]).float().to(dev) for k in
              ("penult_centers", "lda_scalings", "lda_xbar", "subclass_centers",
               "subclass_scores") if k in tsd}
    def stored_of(array, idx, view):
        """The stored rows of ``idx`` at view 0 (warp) or at each sample's own view (replay)."""
        if view is None:
            return _np_to_torch(array.get_orthogonal_selection((idx, 0)))
        rows = np.asarray(array.get_orthogonal_selection((idx, slice(None))))
        return _np_to_torch(rows[np.arange(len(idx)), view])

    def transform(maps, params, how):
        return maps if replay else policy.apply_maps(maps, params, mode=how)

    for s in range(0, n, batch_size):
        idx = idx_all[s:s + batch_size]
        B = len(idx)
        if replay:
            view = rng.integers(0, reader.num_views, size=B)
            params = stored_of(views, idx, view).to(torch.int32)
        else:
            view = None
            params = policy.random(gen, B, device="cpu")
        images = policy.apply_images(dataset.get_batch(idx), params)
        x = normalize(images, dataset.mean, dataset.std).to(dev)
        logits, feats = teacher.forward_features(x)
        params_d = params.to(dev)
        for name in names:
            stored = stored_of(reader.array(name), idx, view).float().to(dev)
            if name == "logits":
                add(name, stored, logits.float())
                continue
            warped = transform(stored, params_d, "bilinear")
            if name == "cam":
                online = feats["cam"]
            elif name.startswith("cam_r"):
                online = _pool_to(feats["cam"].float(), warped.shape[-2:])
            else:
                online = feats[name.split("/", 1)[1]]
            add(name, warped, _pool_to(online.float(), warped.shape[-2:]))
        if info is not None and "penult_topk_idx" in tsd and "penult_centers" in static:
            ti = stored_of(tsd["penult_topk_idx"], idx, view).long().to(dev)
            tv = stored_of(tsd["penult_topk_val"], idx, view).float().to(dev)
            if not replay:
                ti = _warp_last_k(ti, policy, params_d, "nearest")
                tv = _warp_last_k(tv, policy, params_d, "nearest")
            f = _pool_to(feats["penult"].float(), info["penult_grid"])
            oi, ov = penult_topk_targets(f, static["penult_centers"], info["temperature"],
                                         info["k"])
            K = static["penult_centers"].shape[0]
            add("penult_topk", densify_topk(ti, tv, K), densify_topk(oi, ov, K))
        if info is not None and "subclass_idx" in tsd and "subclass_centers" in static:
            sub = stored_of(tsd["subclass_idx"], idx, view).long().to(dev)
            sub = transform(sub[:, None], params_d, "nearest")[:, 0]
            f = _pool_to(feats["inter"].float(), info["inter_grid"])
            labels = torch.as_tensor(np.asarray(dataset.labels)[idx], device=dev)
            osub = assign_subclasses(f, labels, static["lda_xbar"].reshape(-1),
                                     static["lda_scalings"], static["subclass_centers"],
                                     info.get("K_inter", static["subclass_centers"].shape[0] // C))
            S = static["subclass_scores"]
            add("inter_probs", S[sub], S[osub])
    return {name: {"cosine": float(np.mean(v[0])) if v[0] else float("nan"),
                   "rel_error": float(np.sqrt(v[1] / v[2])) if v[2] > 0 else float("nan"),
                   "num_samples": n}
            for name, v in stats.items()}

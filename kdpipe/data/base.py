"""The Dataset every loader returns, and the helpers shared by all data sets.

Images travel as uint8 [B, 3, H, W] until the last moment; `normalize` is the only place
where they become normalised float32, so the teacher pass, the student loop and the online
teacher all see exactly the same numbers.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from kdpipe.errors import DataError, KdpipeError
from kdpipe.views import Policy

# How many images (evenly spaced over the data set) the fingerprint hashes: enough to tell
# data sets apart, few enough that a lazily loaded ImageFolder opens them in a blink.
FINGERPRINT_SAMPLES = 64

SPLITS = ("train", "test")


def canonical_split(split: str) -> str:
    """ "train" or "test"; "val" (ImageNet's word) is accepted for the held-out split."""
    text = str(split).strip().lower()
    if text in ("test", "val", "validation"):
        return "test"
    if text == "train":
        return "train"
    raise DataError(f"split must be 'train' or 'test' (or 'val'); got {split!r}.")


def _as_index_array(indices) -> np.ndarray:
    if torch.is_tensor(indices):
        indices = indices.detach().cpu().numpy()
    return np.asarray(indices, dtype=np.int64).reshape(-1)


class Dataset:
    """A labelled image data set, resident (all images in one uint8 tensor) or lazy.

    Attributes:
        name: the data set kind ("digits", "cifar10", "cifar100", "imagefolder", "synthetic").
        split: "train" or "test".
        num_classes: number of classes C.
        labels: np.int64 [N].
        image_size: (H, W) of every image `get_batch` returns.
        mean, std: per-channel 3-tuples for `normalize` (unit-range pixel scale).
        policy: the `kdpipe.views.Policy` that augments this data set in training.
        images: torch.uint8 [N, 3, H, W] when resident, else None.
        class_names: list of C names, or None where the data set has none.
        spec: the spec string it was loaded from.
    """

    def __init__(
        self,
        *,
        name: str,
        split: str,
        num_classes: int,
        labels,
        image_size,
        mean,
        std,
        policy: Policy,
        images: torch.Tensor | None = None,
        class_names=None,
        spec: str | None = None,
        source: str | None = None,
    ):
        self.name = name
        self.split = split
        self.num_classes = int(num_classes)
        self.labels = np.ascontiguousarray(np.asarray(labels, dtype=np.int64))
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.policy = policy
        self.images = images
        self.class_names = list(class_names) if class_names is not None else None
        self.spec = spec if spec is not None else name
        self.source = source
        self._fingerprint: str | None = None
        if images is not None:
            expected = (len(self.labels), 3) + self.image_size
            if tuple(images.shape) != expected or images.dtype != torch.uint8:
                raise ValueError(f"images must be uint8 {expected}, got {images.dtype} {tuple(images.shape)}")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def resident(self) -> bool:
        return self.images is not None

    def get_batch(self, indices) -> torch.Tensor:
        """Images `indices` (int [B], any order, repeats allowed): torch.uint8 [B, 3, H, W]."""
        index = _as_index_array(indices)
        if index.size and (index.min() < -len(self) or index.max() >= len(self)):
            raise IndexError(f"index out of range for a data set of {len(self)} images")
        if self.images is None:
            return self._load_images(index)
        return self.images[torch.from_numpy(index)]

    def _load_images(self, index: np.ndarray) -> torch.Tensor:
        raise NotImplementedError("a lazy Dataset must implement _load_images")

    @property
    def fingerprint(self) -> str:
        """sha256 hex of N, H, W, the labels and the pixels of 64 evenly spaced images.

        Stores record it; a store made from another data set (other labels, other pixels, a
        different split or subset) is refused by its reader.
        """
        if self._fingerprint is None:
            self._fingerprint = compute_fingerprint(self.labels, self.get_batch, self.image_size)
        return self._fingerprint

    def describe(self) -> str:
        """One line for logs and summaries."""
        height, width = self.image_size
        storage = f"resident ({self.images.numel() / 1e6:.1f} MB)" if self.images is not None else "loaded lazily"
        views = self.policy.num_views if self.policy.num_views is not None else "infinite"
        return (
            f"{self.name} {self.split}: {len(self):,} images {height}x{width}, "
            f"{self.num_classes} classes, {storage}, policy {self.policy.name} "
            f"({views} views)"
        )

    def __repr__(self) -> str:
        return f"<Dataset {self.describe()}>"


def sample_positions(n: int, count: int = FINGERPRINT_SAMPLES) -> np.ndarray:
    """`count` evenly spaced indices in 0..n-1 (all of them when n <= count)."""
    if n <= count:
        return np.arange(n, dtype=np.int64)
    return np.unique(np.linspace(0, n - 1, count).round().astype(np.int64))


def compute_fingerprint(labels: np.ndarray, get_batch, image_size) -> str:
    """sha256 hex of N, H, W, labels (int64 little-endian) and sampled pixel bytes."""
    labels = np.asarray(labels, dtype="<i8")
    digest = hashlib.sha256()
    digest.update(np.asarray([len(labels), image_size[0], image_size[1]], dtype="<i8").tobytes())
    digest.update(labels.tobytes())
    positions = sample_positions(len(labels))
    if positions.size:
        pixels = get_batch(positions)
        digest.update(pixels.contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 [.., 3, H, W] (0..255) or unit float (0..1) -> float32 (x - mean) / std.

    The only place normalisation happens. Works on any device; mean/std are per channel.
    """
    if images.dtype == torch.uint8:
        unit = images.to(torch.float32).div_(255.0)
    elif images.dtype.is_floating_point:
        unit = images.to(torch.float32)
    else:
        raise ValueError(f"normalize takes uint8 or unit float images, got {images.dtype}")
    if unit.dim() < 3 or unit.shape[-3] != len(mean):
        raise ValueError(f"images must be [..., {len(mean)}, H, W], got {tuple(images.shape)}")
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=unit.device).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=unit.device).view(-1, 1, 1)
    return (unit - mean_t) / std_t


def stratified_pick(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Per class, round(fraction * n_c) (at least 1) indices drawn with PCG64(seed); sorted.

    numpy's Generator with an explicit PCG64 seed gives the same stream on every platform
    and numpy version, so the picks are fixed for a given (labels, fraction, seed).
    """
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.Generator(np.random.PCG64(int(seed)))
    picked = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        count = min(len(members), max(1, int(round(fraction * len(members)))))
        picked.append(rng.permutation(members)[:count])
    if not picked:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate(picked)).astype(np.int64)


def subset_indices(labels, fraction: float, seed: int = 0) -> np.ndarray:
    """A stratified subset: sorted int64 indices, round(fraction * n_c) per class, at least 1.

    Deterministic for (labels, fraction, seed). fraction in (0, 1]; 1 returns every index.
    """
    fraction = float(fraction)
    if not 0.0 < fraction <= 1.0:
        raise KdpipeError(f"the subset fraction must be in (0, 1]; got {fraction}.")
    labels = np.asarray(labels, dtype=np.int64)
    if fraction == 1.0:
        return np.arange(len(labels), dtype=np.int64)
    return stratified_pick(labels, fraction, seed)

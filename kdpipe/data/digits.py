"""scikit-learn's bundled handwritten digits: the default data set, no download needed.

1,797 8x8 grey images with values 0..16 are scaled to 0..255, upscaled to 32x32 with bilinear
interpolation (align_corners=False) and repeated over three channels, so CIFAR models run on
them unchanged. The split is fixed: per class, round(25 %) of the images drawn with
PCG64(seed 0) form the test split (450 images), the other 1,347 the train split.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from kdpipe.data.base import Dataset, stratified_pick
from kdpipe.views import DigitsPolicy

DIGITS_IMAGE_SIZE = (32, 32)
DIGITS_TEST_FRACTION = 0.25
DIGITS_SPLIT_SEED = 0
# Per-channel statistics of the train split (unit scale), computed once with
# `digits_statistics()` and fixed here so they never drift with the code.
DIGITS_MEAN = (0.3057, 0.3057, 0.3057)
DIGITS_STD = (0.3239, 0.3239, 0.3239)


def _read_digits_csv() -> tuple[np.ndarray, np.ndarray]:
    """The bundled digits as (float [N, 8, 8] in 0..16, int64 [N]).

    Reads scikit-learn's own data file (what `load_digits` reads) without importing
    sklearn.datasets, which costs seconds on a busy machine; falls back to `load_digits`
    where the file is not where it has always been.
    """
    import gzip
    import importlib.util
    import os

    spec = importlib.util.find_spec("sklearn")
    if spec is not None and spec.origin:
        path = os.path.join(os.path.dirname(spec.origin), "datasets", "data", "digits.csv.gz")
        if os.path.isfile(path):
            with gzip.open(path, "rt") as handle:
                table = np.loadtxt(handle, delimiter=",")
            return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target.astype(np.int64)


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[torch.Tensor, np.ndarray]:
    """All 1,797 images as uint8 [N, 3, 32, 32] and their labels int64 [N]."""
    pixels, labels = _read_digits_csv()
    grey = torch.from_numpy(pixels.astype(np.float32) * (255.0 / 16.0))[:, None]
    upscaled = F.interpolate(grey, size=DIGITS_IMAGE_SIZE, mode="bilinear", align_corners=False)
    images = upscaled.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return images, labels


def digits_split_indices(split: str) -> np.ndarray:
    """Sorted indices of the fixed train ("train") or test ("test") split into all 1,797."""
    _, labels = _digits_arrays()
    test = stratified_pick(labels, DIGITS_TEST_FRACTION, DIGITS_SPLIT_SEED)
    if split == "test":
        return test
    return np.setdiff1d(np.arange(len(labels)), test).astype(np.int64)


def digits_statistics() -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of the train split, unit scale (how the constants were made)."""
    images, _ = _digits_arrays()
    train = images[torch.from_numpy(digits_split_indices("train"))].double() / 255.0
    mean = train.mean(dim=(0, 2, 3))
    std = train.std(dim=(0, 2, 3))
    return tuple(mean.tolist()), tuple(std.tolist())


def load_digits_dataset(split: str, spec: str = "digits") -> Dataset:
    """The digits data set, resident: train 1,347 or test 450 images, 10 classes."""
    images, labels = _digits_arrays()
    index = digits_split_indices(split)
    return Dataset(
        name="digits",
        split=split,
        num_classes=10,
        labels=labels[index],
        image_size=DIGITS_IMAGE_SIZE,
        mean=DIGITS_MEAN,
        std=DIGITS_STD,
        policy=DigitsPolicy(image_size=DIGITS_IMAGE_SIZE),
        images=images[torch.from_numpy(index)].contiguous(),
        class_names=[str(d) for d in range(10)],
        spec=spec,
        source="sklearn.datasets.load_digits",
    )

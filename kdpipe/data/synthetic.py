"""A synthetic, learnable image data set for tests and demos: no files at all.

Spec: ``synthetic[:n=256,classes=10,size=32,seed=0]``. Every class has its own pattern, a
sinusoidal grating with a class-specific orientation, frequency and colour; each image is its
class's grating at a random phase plus Gaussian noise. A small CNN learns it in a few epochs,
random crops and flips keep it learnable, and everything is a pure function of the spec.

The train split has n images, the test split max(classes, n // 4); labels are balanced
(i mod classes, shuffled). Patterns depend on (classes, size, seed); the two splits draw
their phases, noise and label order from different PCG64 streams of the same seed.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from kdpipe.data.base import Dataset
from kdpipe.errors import DataError
from kdpipe.views import CifarPolicy

SYNTHETIC_DEFAULTS = {"n": 256, "classes": 10, "size": 32, "seed": 0}
# Per-channel statistics of the default spec's train split (unit scale), computed once with
# `synthetic_statistics()` and fixed here; other specs use them too (they are close enough
# for normalisation, and a constant can never drift between stage one and stage two).
SYNTHETIC_MEAN = (0.4991, 0.5003, 0.4989)
SYNTHETIC_STD = (0.1659, 0.1858, 0.1608)

_NOISE_STD = 0.12
# Generated in memory: more than this is a typo (n=1e12), refused before any allocation.
MAX_CLASSES = 100_000
MAX_SIZE = 1024
MAX_GB = 8
_SPLIT_STREAM = {"train": 1, "test": 2}


def parse_synthetic_options(text: str) -> dict:
    """ "n=256,classes=10,size=32,seed=0" (any subset, any order) -> dict of ints."""
    options = dict(SYNTHETIC_DEFAULTS)
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in SYNTHETIC_DEFAULTS:
            raise DataError(
                f"synthetic options are n=, classes=, size= and seed= separated by "
                f"commas (e.g. synthetic:n=256,classes=10,size=32,seed=0); got {item!r}."
            )
        try:
            options[key] = int(value)
        except ValueError:
            raise DataError(f"synthetic option {key} must be an integer; got {value!r}.") from None
    if options["n"] < 1 or options["classes"] < 2 or options["size"] < 8 or options["seed"] < 0:
        raise DataError(f"synthetic needs n >= 1, classes >= 2, size >= 8 and seed >= 0; got {options}.")
    if options["classes"] > MAX_CLASSES or options["size"] > MAX_SIZE or options["seed"] >= 2**63:
        raise DataError(
            f"synthetic takes classes <= {MAX_CLASSES}, size <= {MAX_SIZE} and seed < 2**63; got {options}."
        )
    both = options["n"] + max(options["classes"], options["n"] // 4)  # the train and test splits' images
    gigabytes = both * 3 * options["size"] ** 2 / 1e9
    if gigabytes > MAX_GB:
        raise DataError(
            f"synthetic:n={options['n']},classes={options['classes']},size={options['size']} would hold "
            f"{gigabytes:,.0f} GB of images in memory; at most {MAX_GB} GB (lower n or size)."
        )
    return options


def synthetic_arrays(n: int, classes: int, size: int, seed: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, 3, size, size] and labels int64 [N] of one synthetic split."""
    pattern_rng = np.random.Generator(np.random.PCG64([seed, 0]))
    angles = math.pi * np.arange(classes) / classes + pattern_rng.uniform(0, 0.1, classes)
    frequencies = 1.5 + (np.arange(classes) % 3)  # cycles across the image
    colours = pattern_rng.uniform(-1.0, 1.0, (classes, 3))
    colours /= np.linalg.norm(colours, axis=1, keepdims=True)

    rng = np.random.Generator(np.random.PCG64([seed, _SPLIT_STREAM[split]]))
    count = n if split == "train" else max(classes, n // 4)
    labels = rng.permutation(np.arange(count) % classes).astype(np.int64)
    phases = rng.uniform(0.0, 2.0 * math.pi, count)
    coords = (np.arange(size) + 0.5) / size
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    direction = np.cos(angles[labels])[:, None, None] * xx + np.sin(angles[labels])[:, None, None] * yy
    grating = np.sin(2 * math.pi * frequencies[labels][:, None, None] * direction + phases[:, None, None])
    unit = 0.5 + 0.3 * grating[:, None] * colours[labels][:, :, None, None]
    unit = unit + rng.normal(0.0, _NOISE_STD, unit.shape)
    images = np.clip(np.rint(unit * 255.0), 0, 255).astype(np.uint8)
    return images, labels


def synthetic_statistics(**options) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of a train split (how the constants were made)."""
    spec = dict(SYNTHETIC_DEFAULTS, **options)
    images, _ = synthetic_arrays(spec["n"], spec["classes"], spec["size"], spec["seed"], "train")
    unit = images.astype(np.float64) / 255.0
    return tuple(unit.mean(axis=(0, 2, 3)).tolist()), tuple(unit.std(axis=(0, 2, 3)).tolist())


def load_synthetic(options_text: str, split: str, spec: str | None = None) -> Dataset:
    """A synthetic split from its option string, resident."""
    options = parse_synthetic_options(options_text)
    images, labels = synthetic_arrays(options["n"], options["classes"], options["size"], options["seed"], split)
    size = (options["size"], options["size"])
    return Dataset(
        name="synthetic",
        split=split,
        num_classes=options["classes"],
        labels=labels,
        image_size=size,
        mean=SYNTHETIC_MEAN,
        std=SYNTHETIC_STD,
        policy=CifarPolicy(image_size=size),
        images=torch.from_numpy(images),
        class_names=[f"pattern_{c}" for c in range(options["classes"])],
        spec=spec or "synthetic:" + ",".join(f"{k}={v}" for k, v in options.items()),
        source="synthetic",
    )

"""ImageFolder data sets (ImageNet layout) read with PIL, lazily, without torchvision.

Spec: ``imagefolder:/path[?size=64]``. /path holds train/ and val/, each with one folder per
class (the same class folders on both sides; val may lack some). Classes are the sorted
folder names of train/, as torchvision's ImageFolder orders them; files are those with the
extensions torchvision accepts, sorted.

Images are decoded in `get_batch`, converted to RGB, their shorter side resized to `size`
(bilinear, PIL) and centre-cropped to size x size: every image keeps its aspect ratio and the
batch is one uint8 [B, 3, size, size] tensor. Augmentation (RandomResizedCrop + flip) then
works on that stored-size image (`kdpipe.views.ImageNetPolicy`).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from kdpipe.data.base import Dataset
from kdpipe.errors import DataError
from kdpipe.views import ImageNetPolicy

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 64
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_SPLIT_FOLDERS = {"train": "train", "test": "val"}


def _expectation() -> str:
    return ("imagefolder expects a folder with train/ and val/, each holding one sub-folder "
            "of images per class")


def parse_imagefolder_spec(rest: str) -> tuple[str, int]:
    """"/path?size=64" -> (path, size)."""
    path, _, query = rest.partition("?")
    size = DEFAULT_IMAGE_SIZE
    for item in filter(None, query.split("&")):
        key, _, value = item.partition("=")
        if key.strip() != "size":
            raise DataError(f"imagefolder takes one option, size (e.g. imagefolder:/data?size=64); "
                            f"got {item!r}.")
        try:
            size = int(value)
        except ValueError:
            raise DataError(f"imagefolder size must be an integer; got {value!r}.") from None
        if size < 8:
            raise DataError(f"imagefolder size must be at least 8 pixels; got {size}.")
    return os.path.expanduser(path), size


def _class_folders(folder: str) -> list[str]:
    return sorted(entry.name for entry in os.scandir(folder)
                  if entry.is_dir() and not entry.name.startswith("."))


def _scan(split_folder: str, classes: list[str]) -> tuple[list[str], np.ndarray]:
    """Image paths and labels under split_folder/<class>/ (walked recursively, sorted)."""
    paths, labels = [], []
    for label, name in enumerate(classes):
        class_folder = os.path.join(split_folder, name)
        if not os.path.isdir(class_folder):
            continue
        found = []
        for root, _, files in os.walk(class_folder, followlinks=True):
            found.extend(os.path.join(root, f) for f in files
                         if f.lower().endswith(IMAGE_EXTENSIONS))
        found.sort()
        paths.extend(found)
        labels.extend([label] * len(found))
    return paths, np.asarray(labels, dtype=np.int64)


def load_image(path: str, size: int) -> np.ndarray:
    """One image file -> uint8 [3, size, size]: RGB, shorter side to size, centre crop."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            width, height = image.size
            scale = size / min(width, height)
            new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
            if (new_w, new_h) != (width, height):
                image = image.resize((new_w, new_h), Image.BILINEAR)
            left, top = (new_w - size) // 2, (new_h - size) // 2
            image = image.crop((left, top, left + size, top + size))
            array = np.asarray(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise DataError(f"imagefolder could not read the image {path} ({error}).") from None
    return np.ascontiguousarray(array.transpose(2, 0, 1))


class ImageFolderDataset(Dataset):
    """A lazily loaded ImageFolder split: `images` is None; `get_batch` decodes with PIL."""

    def __init__(self, *, paths: list[str], size: int, **kwargs):
        super().__init__(images=None, **kwargs)
        self.paths = paths
        self.size = size

    def _load_images(self, index: np.ndarray) -> torch.Tensor:
        batch = np.empty((len(index), 3, self.size, self.size), dtype=np.uint8)
        for row, i in enumerate(index):
            batch[row] = load_image(self.paths[int(i)], self.size)
        return torch.from_numpy(batch)


def load_imagefolder(rest: str, split: str, spec: str | None = None) -> Dataset:
    """An ImageFolder split ("train" from train/, "test" from val/), loaded lazily."""
    root, size = parse_imagefolder_spec(rest)
    if not root:
        raise DataError(f"{_expectation()}; give its path as imagefolder:/path/to/folder.")
    if not os.path.isdir(root):
        raise DataError(f"{_expectation()}; {root} is not a folder.")
    train_folder = os.path.join(root, "train")
    split_folder = os.path.join(root, _SPLIT_FOLDERS[split])
    for needed in (train_folder, split_folder):
        if not os.path.isdir(needed):
            raise DataError(f"{_expectation()}; {root} has no folder "
                            f"'{os.path.basename(needed)}'.")
    classes = _class_folders(train_folder)
    if not classes:
        raise DataError(f"{_expectation()}; {train_folder} has no class folders.")
    if split_folder != train_folder:
        unknown = sorted(set(_class_folders(split_folder)) - set(classes))
        if unknown:
            raise DataError(f"{_expectation()}; {split_folder} has class folders that train/ "
                            f"lacks: {', '.join(unknown[:5])}.")
    paths, labels = _scan(split_folder, classes)
    if not paths:
        raise DataError(f"{_expectation()}; {split_folder} has no images "
                        f"({', '.join(IMAGE_EXTENSIONS)}).")
    return ImageFolderDataset(
        paths=paths, size=size, name="imagefolder", split=split, num_classes=len(classes),
        labels=labels, image_size=(size, size), mean=IMAGENET_MEAN, std=IMAGENET_STD,
        policy=ImageNetPolicy(image_size=(size, size)), class_names=classes,
        spec=spec or f"imagefolder:{root}?size={size}", source=os.path.abspath(root),
    )

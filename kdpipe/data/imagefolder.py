"""ImageFolder data sets (ImageNet layout) read with PIL, lazily, without torchvision.

Spec: ``imagefolder:/path[?size=224&resize=256]``; /path may be a URL (``s3://bucket/imagenet``,
``kdpipe.storage``: images are then read over the network every epoch). /path holds train/ and val/, each with one
folder per class (the same class folders on both sides; val may lack some). Classes are the
sorted folder names of train/, as torchvision's ImageFolder orders them; files are those
with the extensions torchvision accepts, sorted.

The ImageNet protocol of torchvision's reference recipe, mdistiller and CAT-KD
(mdistiller/dataset/imagenet.py), on the decoded full-resolution image (PIL, RGB):

- training views (`get_views`): RandomResizedCrop(size) + horizontal flip. The view
  parameters (`kdpipe.views.ImageNetPolicy`) are the crop box in the original image's pixels;
  the box is cut out and resized to size x size with PIL's bilinear filter (antialiased), as
  torchvision's `F.resized_crop` does for a PIL image (crop, then resize);
- test view (`get_test`, and `get_batch`, which fingerprints, probes and evaluation read):
  Resize(resize) (shorter side to `resize`, PIL bilinear, the longer side truncated as
  torchvision computes it) + CenterCrop(size).

`size` defaults to 224 and `resize` to 256 (mdistiller/dataset/imagenet.py); a `size` given
alone gets resize = round(size * 256 / 224), the same crop fraction.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from kdpipe import storage
from kdpipe.data.base import Dataset, _as_index_array
from kdpipe.errors import DataError
from kdpipe.views import ImageNetPolicy

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# mdistiller/dataset/imagenet.py: RandomResizedCrop(224); Resize(256) + CenterCrop(224).
DEFAULT_IMAGE_SIZE = 224
DEFAULT_RESIZE = 256
MIN_IMAGE_SIZE = 8
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Below this many images the header scan runs in-process (a pool costs more than it saves).
PARALLEL_SIZE_SCAN_MIN = 4096
_SPLIT_FOLDERS = {"train": "train", "test": "val"}
_OPTIONS = ("size", "resize")


class ImageFolderSpec(NamedTuple):
    """A parsed ``imagefolder:`` spec: the folder, output size and test resize."""

    root: str
    size: int
    resize: int


def _expectation() -> str:
    return "imagefolder expects a folder with train/ and val/, each holding one sub-folder of images per class"


def _option_value(key: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise DataError(f"imagefolder {key} must be an integer; got {value!r}.") from None
    if number < MIN_IMAGE_SIZE:
        raise DataError(f"imagefolder {key} must be at least {MIN_IMAGE_SIZE} pixels; got {number}.")
    return number


def parse_imagefolder_spec(rest: str) -> ImageFolderSpec:
    """ "/path?size=224&resize=256" -> ImageFolderSpec(path, 224, 256)."""
    path, _, query = rest.partition("?")
    options: dict[str, int] = {}
    for item in filter(None, query.split("&")):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in _OPTIONS:
            raise DataError(
                f"imagefolder takes the options size and resize (e.g. "
                f"imagefolder:/data?size=224&resize=256); got {item!r}."
            )
        options[key] = _option_value(key, value.strip())
    size = options.get("size", DEFAULT_IMAGE_SIZE)
    resize = options.get("resize", int(round(size * DEFAULT_RESIZE / DEFAULT_IMAGE_SIZE)))
    if resize < size:
        raise DataError(
            f"imagefolder resize ({resize}) must be at least size ({size}): the test "
            f"view is a size x size centre crop of the image resized to resize."
        )
    return ImageFolderSpec(storage.normalize(path) if path else "", size, resize)


def _class_folders(folder: str) -> list[str]:
    return storage.subfolders(folder)


def _scan(split_folder: str, classes: list[str]) -> tuple[list[str], np.ndarray]:
    """Image paths and labels under split_folder/<class>/ (walked recursively, sorted)."""
    paths, labels = [], []
    for label, name in enumerate(classes):
        class_folder = storage.join(split_folder, name)
        if not storage.isdir(class_folder):
            continue
        found = [f for f in storage.files_under(class_folder) if f.lower().endswith(IMAGE_EXTENSIONS)]
        paths.extend(found)
        labels.extend([label] * len(found))
    return paths, np.asarray(labels, dtype=np.int64)


# --- image sizes (headers only) -------------------------------------------------------------


def _unreadable(path: str, error: Exception) -> DataError:
    return DataError(f"imagefolder could not read the image {path} ({error}).")


def read_image_size(path: str) -> tuple[int, int]:
    """(H, W) of one image file from its header; the pixels are not decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with storage.open_file(path) as fh, Image.open(fh) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise _unreadable(path, error) from None
    return height, width


def _read_sizes_chunk(paths: list[str]) -> np.ndarray:
    return np.asarray([read_image_size(p) for p in paths], dtype=np.int32).reshape(-1, 2)


def read_image_sizes(paths: list[str], workers: int = 0, chunk: int = 2048) -> np.ndarray:
    """(H, W) of every image: np.int32 [N, 2], read from the headers with PIL.

    workers > 0 reads chunks of `chunk` files in that many processes (order kept).
    """
    if workers <= 0 or len(paths) <= chunk:
        return _read_sizes_chunk(paths)
    from concurrent.futures import ProcessPoolExecutor

    chunks = [paths[i : i + chunk] for i in range(0, len(paths), chunk)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        parts = list(pool.map(_read_sizes_chunk, chunks))
    return np.concatenate(parts, axis=0)


# --- the transforms, on PIL images ----------------------------------------------------------


def open_rgb(path: str):
    """The decoded full-resolution image as a PIL RGB image (torchvision's pil_loader)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with storage.open_file(path) as fh, Image.open(fh) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise _unreadable(path, error) from None


def resized_crop(image, box, size: int):
    """RandomResizedCrop's resize of one box: crop (y0, x0, h, w), then resize to size x size
    with PIL bilinear, as torchvision's F.resized_crop does for a PIL image (the crop comes
    first, so no pixel outside the box enters the filter)."""
    from PIL import Image

    y0, x0, h, w = (int(v) for v in box)
    crop = image.crop((x0, y0, x0 + w, y0 + h))
    if crop.size == (size, size):
        return crop
    # Pillow sets its module-level filter names through globals(), out of its type hints'
    # sight; Image.Resampling would need Pillow 9.1 and kdpipe allows 9.0.
    return crop.resize((size, size), Image.BILINEAR)  # type: ignore[attr-defined]


def resize_shorter(image, resize: int):
    """torchvision's Resize(resize) for a PIL image: the shorter side to `resize`, the longer
    to int(resize * long / short) (truncated, as torchvision computes it), PIL bilinear."""
    from PIL import Image

    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = resize, int(resize * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    if (new_w, new_h) == (width, height):
        return image
    return image.resize((new_w, new_h), Image.BILINEAR)  # type: ignore[attr-defined]  # as above


def center_crop(image, size: int):
    """torchvision's CenterCrop(size) for an image at least size x size: offsets
    int(round((side - size) / 2)) (round half to even, as Python's round)."""
    width, height = image.size
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def to_chw(image) -> np.ndarray:
    """A PIL RGB image -> uint8 [3, H, W]."""
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))


def center_view(image, size: int, resize: int) -> np.ndarray:
    """Resize(resize) + CenterCrop(size): uint8 [3, size, size]."""
    return to_chw(center_crop(resize_shorter(image, resize), size))


def crop_view(image, params, size: int) -> np.ndarray:
    """RandomResizedCrop box (y0, x0, h, w) resized to size, flipped where flip == 1:
    uint8 [3, size, size]. The box must lie inside the image."""
    y0, x0, h, w, flip = (int(v) for v in params)
    pixels = to_chw(resized_crop(image, (y0, x0, h, w), size))
    if flip:
        pixels = np.ascontiguousarray(pixels[:, :, ::-1])
    return pixels


# --- the data set ---------------------------------------------------------------------------


class ImageFolderDataset(Dataset):
    """A lazily loaded ImageFolder split (`images` is None); PIL decodes every batch.

    Beyond `Dataset`:
        paths: the N image files, in sample order.
        size, resize: the output side and the test view's resize (`imagefolder:?size=&resize=`).
        image_sizes: np.int32 [N, 2], (H, W) of every original image (read lazily from the
            headers on first use, kept in memory only).
        get_views(indices, params): training views, torch.uint8 [B, 3, size, size].
        get_test(indices): test views, torch.uint8 [B, 3, size, size]; `get_batch` is this.
    """

    def __init__(self, *, paths: list[str], size: int, resize: int, **kwargs):
        super().__init__(images=None, **kwargs)
        self.paths = paths
        self.size = int(size)
        self.resize = int(resize)
        self._image_sizes: np.ndarray | None = None

    # ------------------------------------------------------------------ sizes
    @property
    def image_sizes(self) -> np.ndarray:
        """(H, W) of every original image: np.int32 [N, 2], read from the image headers with
        PIL (no pixel decoding) on first use, in `default_workers()` processes for large
        folders, and kept in memory (nothing is written next to the data)."""
        if self._image_sizes is None:
            workers = 0
            if len(self.paths) >= PARALLEL_SIZE_SCAN_MIN:
                from kdpipe.data.loader import default_workers

                workers = default_workers()
            self._image_sizes = read_image_sizes(self.paths, workers=workers)
        return self._image_sizes

    # ------------------------------------------------------------------ decoding
    def _checked_index(self, indices) -> np.ndarray:
        index = _as_index_array(indices)
        if index.size and (index.min() < -len(self) or index.max() >= len(self)):
            raise IndexError(f"index out of range for a data set of {len(self)} images")
        return index

    def get_views(self, indices, params) -> torch.Tensor:
        """Training views: torch.uint8 [B, 3, size, size].

        indices: int [B]; params: int [B, 5] (y0, x0, h, w, flip), `ImageNetPolicy` boxes in
        each original image's pixels. Each image is decoded at full resolution, converted to
        RGB, the box cut out and resized to size x size (PIL bilinear, antialiased: crop,
        then resize, as torchvision's RandomResizedCrop on a PIL image), flipped where
        flip == 1. A box outside its image is a DataError (views made for other images).
        """
        index = self._checked_index(indices)
        params = np.asarray(params.cpu() if torch.is_tensor(params) else params, dtype=np.int64)
        if params.shape != (len(index), 5):
            raise ValueError(f"params must be [B, 5] with B = {len(index)}, got {params.shape}")
        batch = np.empty((len(index), 3, self.size, self.size), dtype=np.uint8)
        for row, (i, view) in enumerate(zip(index.tolist(), params)):
            path = self.paths[i]
            image = open_rgb(path)
            self._check_box(path, image.size, view)
            batch[row] = crop_view(image, view, self.size)
        return torch.from_numpy(batch)

    @staticmethod
    def _check_box(path: str, image_wh: tuple[int, int], view: np.ndarray) -> None:
        width, height = image_wh
        y0, x0, h, w = (int(v) for v in view[:4])
        if h < 1 or w < 1 or y0 < 0 or x0 < 0 or y0 + h > height or x0 + w > width:
            raise DataError(
                f"the view box (y0 {y0}, x0 {x0}, h {h}, w {w}) lies outside the "
                f"{width}x{height} image {path}: the views were made for other "
                f"images."
            )

    def get_test(self, indices) -> torch.Tensor:
        """Test views: Resize(resize) + CenterCrop(size), torch.uint8 [B, 3, size, size]."""
        return self._load_images(self._checked_index(indices))

    def _load_images(self, index: np.ndarray) -> torch.Tensor:
        batch = np.empty((len(index), 3, self.size, self.size), dtype=np.uint8)
        for row, i in enumerate(index.tolist()):
            batch[row] = center_view(open_rgb(self.paths[i]), self.size, self.resize)
        return torch.from_numpy(batch)


def load_imagefolder(rest: str, split: str, spec: str | None = None) -> Dataset:
    """An ImageFolder split ("train" from train/, "test" from val/), loaded lazily."""
    root, size, resize = parse_imagefolder_spec(rest)
    if not root:
        raise DataError(f"{_expectation()}; give its path as imagefolder:/path/to/folder.")
    if not storage.isdir(root):
        raise DataError(f"{_expectation()}; {root} is not a folder.")
    train_folder = storage.join(root, "train")
    split_folder = storage.join(root, _SPLIT_FOLDERS[split])
    for needed in (train_folder, split_folder):
        if not storage.isdir(needed):
            raise DataError(f"{_expectation()}; {root} has no folder '{storage.basename(needed)}'.")
    classes = _class_folders(train_folder)
    if not classes:
        raise DataError(f"{_expectation()}; {train_folder} has no class folders.")
    if split_folder != train_folder:
        unknown = sorted(set(_class_folders(split_folder)) - set(classes))
        if unknown:
            raise DataError(
                f"{_expectation()}; {split_folder} has class folders that train/ lacks: {', '.join(unknown[:5])}."
            )
    paths, labels = _scan(split_folder, classes)
    if not paths:
        raise DataError(f"{_expectation()}; {split_folder} has no images ({', '.join(IMAGE_EXTENSIONS)}).")
    return ImageFolderDataset(
        paths=paths,
        size=size,
        resize=resize,
        name="imagefolder",
        split=split,
        num_classes=len(classes),
        labels=labels,
        image_size=(size, size),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        policy=ImageNetPolicy(image_size=(size, size)),
        class_names=classes,
        spec=spec or f"imagefolder:{root}?size={size}&resize={resize}",
        source=root,
    )

"""CIFAR-10 and CIFAR-100 from the user's own copy of the "python version" pickles.

Layout (as unpacked from the CIFAR page's cifar-10-python.tar.gz / cifar-100-python.tar.gz):

- cifar-10-batches-py/: data_batch_1 .. data_batch_5 (train, 50,000), test_batch (10,000),
  batches.meta (b"label_names"); each batch a dict with b"data" uint8 [N, 3072] and b"labels".
- cifar-100-python/: train (50,000), test (10,000), meta (b"fine_label_names"); each a dict
  with b"data" uint8 [N, 3072] and b"fine_labels".

A row of b"data" is 1,024 red, then 1,024 green, then 1,024 blue bytes, each plane row-major,
so it reshapes directly to [3, 32, 32]. The files are the user's own data and are read with
pickle (encoding="bytes"), as the CIFAR page prescribes.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass

import numpy as np
import torch

from kdpipe import storage
from kdpipe.data.base import Dataset
from kdpipe.errors import DataError
from kdpipe.views import CifarPolicy

CIFAR_IMAGE_SIZE = (32, 32)
# mdistiller's CIFAR-100 statistics (the references' normalisation).
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
# CIFAR-10 train-set statistics. (The often-quoted std (0.2023, 0.1994, 0.2010) is a mean of
# per-image stds, not the data set's; these are the data set's.)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@dataclass(frozen=True)
class _Layout:
    """Where one CIFAR variant keeps its files and what its pickles hold."""

    folder: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    label_key: bytes
    meta: str
    names_key: bytes
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def files(self, split: str) -> tuple[str, ...]:
        """The batch files of ``split`` ("train" or "test")."""
        return {"train": self.train, "test": self.test}[split]


_LAYOUTS = {
    "cifar10": _Layout(
        folder="cifar-10-batches-py",
        train=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test=("test_batch",),
        label_key=b"labels",
        meta="batches.meta",
        names_key=b"label_names",
        num_classes=10,
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
    ),
    "cifar100": _Layout(
        folder="cifar-100-python",
        train=("train",),
        test=("test",),
        label_key=b"fine_labels",
        meta="meta",
        names_key=b"fine_label_names",
        num_classes=100,
        mean=CIFAR100_MEAN,
        std=CIFAR100_STD,
    ),
}


def _expectation(kind: str) -> str:
    layout = _LAYOUTS[kind]
    files = layout.train + layout.test
    listed = "data_batch_1..5 and test_batch" if kind == "cifar10" else " and ".join(files)
    return f"{kind} expects the folder '{layout.folder}' with files {listed} (the python version from the CIFAR page)"


class ForbiddenGlobal(pickle.UnpicklingError):
    """A pickle named a global that CIFAR files never use."""


class CifarUnpickler(pickle.Unpickler):
    """Reads CIFAR's python pickles and nothing else: a pickle may name any importable global,
    and loading calls it, so only the few globals the format uses (numpy arrays and their
    dtypes; dicts, lists, bytes, str and int need none) are admitted."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),  # protocol 2 pickles spell bytes this way
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise ForbiddenGlobal(f"it names {module}.{name}, which a CIFAR file never does (refused, not run)")


def _read_pickle(kind: str, path: str) -> dict:
    try:
        with storage.open_file(path, "rb") as handle:
            content = CifarUnpickler(handle, encoding="bytes").load()
    except ForbiddenGlobal as error:
        raise DataError(f"{_expectation(kind)}; {path} is not a CIFAR pickle: {error}.") from None
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        ImportError,
        IndexError,
        KeyError,
        UnicodeDecodeError,
    ) as error:
        raise DataError(
            f"{_expectation(kind)}; {path} is not a readable CIFAR pickle ({type(error).__name__})."
        ) from None
    except OSError as error:
        raise DataError(f"{_expectation(kind)}; {path} cannot be read ({error.strerror}).") from None
    if not isinstance(content, dict):
        raise DataError(f"{_expectation(kind)}; {path} holds a {type(content).__name__}, not a CIFAR batch dict.")
    return content


def _read_batch(kind: str, path: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR batch file -> (uint8 [N, 3, 32, 32], int64 [N])."""
    layout = _LAYOUTS[kind]
    content = _read_pickle(kind, path)
    label_key = layout.label_key
    if b"data" not in content or label_key not in content:
        found = ", ".join(repr(k) for k in list(content)[:6]) or "nothing"
        raise DataError(f"{_expectation(kind)}; {path} lacks b'data' or {label_key!r} (it has {found}).")
    data = np.asarray(content[b"data"])
    labels = np.asarray(content[label_key], dtype=np.int64).reshape(-1)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{_expectation(kind)}; {path} has b'data' of {data.dtype} {data.shape}, not uint8 [N, 3072].")
    if len(labels) != len(data):
        raise DataError(f"{_expectation(kind)}; {path} has {len(data)} images but {len(labels)} labels.")
    if len(labels) and (labels.min() < 0 or labels.max() >= layout.num_classes):
        raise DataError(f"{_expectation(kind)}; {path} has labels outside 0..{layout.num_classes - 1}.")
    return data.reshape(-1, 3, 32, 32), labels


def _read_class_names(kind: str, folder: str) -> list[str] | None:
    """Class names from the meta file, or None when it is absent (it is not needed)."""
    layout = _LAYOUTS[kind]
    path = storage.join(folder, layout.meta)
    if not storage.isfile(path):
        return None
    content = _read_pickle(kind, path)
    names = content.get(layout.names_key)
    if names is None or len(names) != layout.num_classes:
        return None
    return [n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in names]


def load_cifar(kind: str, folder: str, split: str, spec: str | None = None) -> Dataset:
    """CIFAR-10 ("cifar10") or CIFAR-100 ("cifar100") `split` from `folder`, resident."""
    layout = _LAYOUTS[kind]
    if not folder:
        raise DataError(f"{_expectation(kind)}; give its path as {kind}:/path/to/{layout.folder}.")
    folder = storage.normalize(folder)  # a local path or a URL (s3://...: kdpipe.storage)
    if not storage.isdir(folder):
        raise DataError(f"{_expectation(kind)}; {folder} is not a folder.")
    for name in layout.files(split):
        if not storage.isfile(storage.join(folder, name)):
            raise DataError(f"{_expectation(kind)}; {folder} has no file '{name}'.")
    parts = [_read_batch(kind, storage.join(folder, name)) for name in layout.files(split)]
    images = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    labels = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    return Dataset(
        name=kind,
        split=split,
        num_classes=layout.num_classes,
        labels=labels,
        image_size=CIFAR_IMAGE_SIZE,
        mean=layout.mean,
        std=layout.std,
        policy=CifarPolicy(image_size=CIFAR_IMAGE_SIZE),
        images=torch.from_numpy(np.ascontiguousarray(images)),
        class_names=_read_class_names(kind, folder),
        spec=spec or f"{kind}:{folder}",
        source=folder,
    )

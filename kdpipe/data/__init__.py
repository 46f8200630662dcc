"""Data sets: sklearn digits (the embedded default), CIFAR-10/100 pickles, ImageFolder, synthetic.

`load_dataset(spec, split)` is the one entry point. Specs:

- ``digits``: scikit-learn's bundled 8x8 digits upscaled to 32x32 RGB (no files needed).
- ``cifar10:/path/to/cifar-10-batches-py``, ``cifar100:/path/to/cifar-100-python``.
- ``imagefolder:/path[?size=224&resize=256]``: /path/train/<class>/*, /path/val/<class>/*.
- ``synthetic[:n=256,classes=10,size=32,seed=0]``: generated, learnable patterns.

split is "train" or "test" ("val" is accepted for "test").
"""

from __future__ import annotations

from kdpipe.data.base import (
    FINGERPRINT_SAMPLES,
    Dataset,
    canonical_split,
    compute_fingerprint,
    normalize,
    subset_indices,
)
from kdpipe.errors import DataError

__all__ = [
    "Dataset",
    "load_dataset",
    "dataset_spec_name",
    "dataset_kinds",
    "normalize",
    "subset_indices",
    "compute_fingerprint",
    "FINGERPRINT_SAMPLES",
]

_VALID_FORMS = (
    "digits, cifar10:/path/to/cifar-10-batches-py, "
    "cifar100:/path/to/cifar-100-python, imagefolder:/path (with train/ and val/) "
    "or synthetic[:n=256,classes=10,size=32,seed=0]"
)
_KINDS = ("digits", "cifar10", "cifar100", "imagefolder", "synthetic")


def dataset_kinds() -> list[str]:
    """The data set kinds a spec may name."""
    return list(_KINDS)


def _split_spec(spec: str) -> tuple[str, str]:
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"the data set must be one of {_VALID_FORMS}; got {spec!r}.")
    kind, _, rest = spec.strip().partition(":")
    kind = kind.strip().lower()
    if kind not in _KINDS:
        raise DataError(f"unknown data set {spec!r}; expected one of {_VALID_FORMS}.")
    return kind, rest.strip()


def dataset_spec_name(spec: str) -> str:
    """The data set kind a spec names: "cifar100:/data/x" -> "cifar100" (DataError if unknown)."""
    return _split_spec(spec)[0]


def load_dataset(spec: str, split: str = "train") -> Dataset:
    """Load split "train" or "test" of the data set `spec` (see the module docstring).

    Raises DataError with one sentence for an unknown spec, a missing or malformed folder.
    """
    kind, rest = _split_spec(spec)
    split = canonical_split(split)
    spec = spec.strip()
    if kind == "digits":
        if rest:
            raise DataError(f"digits takes no path or options (it is bundled with scikit-learn); got {spec!r}.")
        from kdpipe.data.digits import load_digits_dataset

        return load_digits_dataset(split, spec=spec)
    if kind in ("cifar10", "cifar100"):
        from kdpipe.data.cifar import load_cifar

        return load_cifar(kind, rest, split, spec=spec)
    if kind == "imagefolder":
        from kdpipe.data.imagefolder import load_imagefolder

        return load_imagefolder(rest, split, spec=spec)
    from kdpipe.data.synthetic import load_synthetic

    return load_synthetic(rest, split, spec=spec)

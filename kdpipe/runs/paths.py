"""Paths that travel: made absolute so Ray workers and resumed runs find the same files.

URLs (``s3://...``) pass through unchanged, ``file://`` URLs become local paths, local paths
become absolute (``kdpipe.storage.normalize``); a data spec's local folder
(``cifar100:./data``) becomes absolute too.
"""

from __future__ import annotations

import os

import json

from kdpipe import storage
from kdpipe.errors import CheckpointError
from kdpipe.storage import is_url, normalize

__all__ = ["absolute_path", "absolute_spec", "checkpoint_in", "is_url", "teacher_checkpoint_name"]

_FOLDER_SPECS = ("cifar10", "cifar100", "imagefolder")


def absolute_path(path):
    """A local path made absolute, a ``file://`` URL made local; None and other URLs unchanged."""
    return None if path is None else normalize(path)


def absolute_spec(data):
    """The data spec with a relative local folder made absolute ("cifar10:./c" -> "cifar10:/abs/c")."""
    if data is None:
        return None
    kind, sep, rest = str(data).partition(":")
    if not sep or kind.strip().lower() not in _FOLDER_SPECS or not rest:
        return data
    path, q, options = rest.partition("?")
    if is_url(path):
        return f"{kind}:{normalize(path)}{q}{options}"
    if os.path.isabs(path):
        return data
    return f"{kind}:{absolute_path(path)}{q}{options}"


def teacher_checkpoint_name(arch: str, epochs: int) -> str:
    """The teacher checkpoint's path inside its run directory: ``<arch>_vanilla/ckpt_epoch_<E>.pth``."""
    return f"{arch}_vanilla/ckpt_epoch_{int(epochs)}.pth"


def checkpoint_in(path):
    """A checkpoint given as a kdpipe run directory, as ``evaluate --checkpoint`` takes one: a
    teacher run's ``<arch>_vanilla/ckpt_epoch_<E>.pth``, a student run's best (else latest)
    checkpoint. A file, a missing path or None comes back unchanged (the loader says what is wrong)."""
    if path is None or not storage.isdir(normalize(path)):
        return path
    root = normalize(path)
    config = storage.join(root, "config.json")
    if not storage.isfile(config):
        raise CheckpointError(f"{root} is a folder but not a kdpipe run directory (no config.json); pass a .pth file.")
    cfg = json.loads(storage.read_bytes(config))
    if cfg.get("stage") == "train-teacher":
        found = [storage.join(root, teacher_checkpoint_name(cfg["arch"], cfg["epochs"]))]
    else:
        found = [storage.join(root, "checkpoints", name) for name in ("best.pth", "latest.pth")]
    for ckpt in found:
        if storage.isfile(ckpt):
            return ckpt
    raise CheckpointError(f"The run directory {root} holds no checkpoint yet ({found[0]} is missing); is it finished?")

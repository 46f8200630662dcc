"""Paths that travel: made absolute so Ray workers and resumed runs find the same files.

URLs (``s3://...``, ``file://...``) pass through unchanged; local paths become absolute; a
data spec's local folder (``cifar100:./data``) becomes absolute too.
"""

from __future__ import annotations

import os

__all__ = ["absolute_path", "absolute_spec", "is_url"]

_FOLDER_SPECS = ("cifar10", "cifar100", "imagefolder")


def is_url(path) -> bool:
    return "://" in str(path)


def absolute_path(path):
    """A local path made absolute; None and URLs unchanged."""
    if path is None or is_url(path):
        return None if path is None else str(path)
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


def absolute_spec(data):
    """The data spec with a relative local folder made absolute ("cifar10:./c" -> "cifar10:/abs/c")."""
    if data is None:
        return None
    kind, sep, rest = str(data).partition(":")
    if not sep or kind.strip().lower() not in _FOLDER_SPECS or not rest:
        return data
    path, q, options = rest.partition("?")
    if is_url(path) or os.path.isabs(path):
        return data
    return f"{kind}:{absolute_path(path)}{q}{options}"

"""Fingerprints that tie a store to the teacher checkpoint it was made from.

The dataset fingerprint lives with the data sets (`Dataset.fingerprint`); this module hashes
checkpoint files: sha256 over the file's bytes, read in streaming chunks so a multi-GB
ImageNet checkpoint never sits in memory at once.
"""

from __future__ import annotations

import hashlib
import os

from kdpipe.errors import CheckpointError

_CHUNK = 4 << 20  # 4 MiB


def sha256_file(path: str | os.PathLike, chunk_size: int = _CHUNK) -> str:
    """Hex sha256 of a file (a local path or any fsspec URL), read `chunk_size` bytes at a time."""
    from kdpipe.storage import open_file

    path = os.fspath(path)
    h = hashlib.sha256()
    try:
        with open_file(path, "rb") as f:
            while True:
                block = f.read(chunk_size)
                if not block:
                    break
                h.update(block)
    except FileNotFoundError:
        raise CheckpointError(f"The checkpoint file {path} does not exist.") from None
    except IsADirectoryError:
        raise CheckpointError(f"The checkpoint path {path} is a directory, not a checkpoint file.") from None
    except OSError as err:
        raise CheckpointError(f"The checkpoint file {path} cannot be read ({err.strerror or err}).") from None
    return h.hexdigest()

"""The teacher-artifact store: one zarr v3 group per teacher x data-set split.

Readers: `open_store(path)` -> `StoreReader` (read-only). Writers: `StoreWriter` (driver and
shard workers during extraction; `open_for_targets` for `kdpipe cluster`). Layout and
manifest: `kdpipe.artifacts.schema`; checkpoint hashing: `kdpipe.artifacts.fingerprint`.
"""

from kdpipe.artifacts.fingerprint import sha256_file
from kdpipe.artifacts.reader import StoreReader, open_store
from kdpipe.artifacts.schema import SCHEMA_VERSION, ArraySpec
from kdpipe.artifacts.writer import StoreWriter, existing_store, read_manifest, remove_store, store_exists

__all__ = [
    "open_store",
    "StoreReader",
    "StoreWriter",
    "ArraySpec",
    "SCHEMA_VERSION",
    "sha256_file",
    "read_manifest",
    "remove_store",
    "store_exists",
    "existing_store",
]

"""The teacher-artifact store: one zarr v3 group per teacher x data-set split.

Readers: `open_store(path)` -> `StoreReader` (read-only). Writers: `StoreWriter` (driver and
shard workers during extraction; `open_for_targets` for `kdpipe cluster`). Layout:
`kdpipe.artifacts.schema`; the manifest (one typed record): `kdpipe.artifacts.manifest`;
integrity: `kdpipe.artifacts.integrity`; checkpoint hashing: `kdpipe.artifacts.fingerprint`.
"""

from kdpipe.artifacts.fingerprint import sha256_file
from kdpipe.artifacts.manifest import Manifest
from kdpipe.artifacts.reader import StoreReader, open_store
from kdpipe.artifacts.schema import SCHEMA_VERSION, ArraySpec
from kdpipe.artifacts.writer import StoreWriter, existing_store, read_manifest, remove_store, store_exists

__all__ = [
    "open_store",
    "StoreReader",
    "StoreWriter",
    "Manifest",
    "ArraySpec",
    "SCHEMA_VERSION",
    "sha256_file",
    "read_manifest",
    "remove_store",
    "store_exists",
    "existing_store",
]

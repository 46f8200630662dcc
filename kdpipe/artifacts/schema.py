"""What a kdpipe store holds: array specs, the schema version and the manifest.

A store is one zarr v3 group per teacher x data-set split. Its manifest is one typed record,
``kdpipe.artifacts.manifest.Manifest``, stored as JSON in `group.attrs["kdpipe"]`. Per-sample
arrays are chunked along the sample axis only (a chunk holds `chunk_rows` whole samples, a
divisor of the shard size, so a shard of extraction work owns whole chunks and no two writers
ever touch the same chunk).
Tensors are float16, view parameters int32, all Blosc/zstd with byte shuffle. Per-view
arrays [N, V, ...] (not ``views``) of new stores are zarr shards of that chunk shape whose
inner chunks are one (sample, view) row, Blosc/LZ4HC (``kdpipe.artifacts.writer.row_layout``,
``kdpipe.artifacts.row_reads``).

Array names (paths inside the group):

    views                [N, V, P]        int32    view parameters of each stored view
    logits               [N, V, C]        float16  teacher logits
    cam                  [N, V, C, h, w]  float16  native class activation maps (no bias)
    cam_r{R}             [N, V, C, R, R]  float16  CAM adaptive-average-pooled to R x R
    feat/{layer}         [N, V, D, h, w]  float16  teacher feature map ("penult", "inter")
    shards_done          [S]              uint8    1 where shard s is fully written (chunk 1)
    targets/{name}/...   written by `kdpipe cluster` (see kdpipe.artifacts.writer)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Final, Literal

import numpy as np

# 2: every view by default, identity-view features [N, 1, ...], typed target sets, chunk
# checksums and digests (kdpipe.artifacts.integrity).
SCHEMA_VERSION = 2
MANIFEST_ATTR = "kdpipe"
SHARDS_DONE = "shards_done"
TARGETS_GROUP = "targets"
#: Group of the whole (not per-sample) arrays extraction writes once, e.g. the teacher's
#: classifier for SimKD (``static/teacher/classifier_weight``); listed in manifest["static"].
STATIC_GROUP = "static"

# The upper bound on the uncompressed size of one chunk: chunk_rows is the largest divisor of
# the shard size whose chunk stays below it (at least one sample per chunk).
MAX_CHUNK_BYTES = 32 << 20

BLOSC_CNAME: Final[Literal["zstd"]] = "zstd"
# Level 1: on teacher activations (float16, byte shuffle) it compresses as well as level 3
# (1.25x vs 1.24x on resnet56 features) in about half the time, which is the store's share of
# extraction time (benchmarks/extract.py).
BLOSC_CLEVEL = 1

MEANINGS = {
    "views": "view parameters (policy-specific) of each stored view of each sample",
    "logits": "teacher logits on the image with that view applied",
    "cam": "native class activation map: classifier weight as 1x1 conv on the last map, no bias",
    "cam_r": "class activation map adaptive-average-pooled to {R}x{R}",
    "feat": "teacher feature map '{layer}' (before any tap)",
}


def compressors(dtype, cname: Literal["zstd", "lz4hc"] = BLOSC_CNAME) -> list:
    """The zarr v3 compressor list for an array of `dtype`: Blosc (zstd unless ``cname``) with
    byte shuffle, then a crc32c checksum of the encoded chunk (``kdpipe.artifacts.integrity``)."""
    from zarr.codecs import BloscCodec, Crc32cCodec

    return [
        BloscCodec(cname=cname, clevel=BLOSC_CLEVEL, shuffle="shuffle", typesize=np.dtype(dtype).itemsize),
        Crc32cCodec(),
    ]


def chunk_rows(shard_size: int, row_bytes: int, max_chunk_bytes: int = MAX_CHUNK_BYTES) -> int:
    """The number of samples per chunk: the largest divisor of shard_size within the size cap."""
    best = 1
    for d in range(1, int(math.isqrt(shard_size)) + 1):
        if shard_size % d:
            continue
        for cand in (d, shard_size // d):
            if cand * row_bytes <= max_chunk_bytes and cand > best:
                best = cand
    return best


@dataclass
class ArraySpec:
    """One per-sample array of the store: name, full shape (sample axis first), dtype, meaning."""

    name: str
    shape: tuple
    dtype: str
    meaning: str
    chunks: tuple = field(default=())

    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def with_chunks(self, shard_size: int) -> ArraySpec:
        rows = chunk_rows(shard_size, self.row_bytes())
        return ArraySpec(
            self.name,
            tuple(self.shape),
            self.dtype,
            self.meaning,
            (min(rows, max(1, self.shape[0])),) + tuple(self.shape[1:]),
        )

    def to_json(self) -> dict:
        return {
            "shape": list(map(int, self.shape)),
            "dtype": self.dtype,
            "meaning": self.meaning,
            "chunks": list(map(int, self.chunks)),
        }


def plan_shards(num_samples: int, shard_size: int) -> list[tuple[int, int]]:
    """Contiguous sample ranges [start, stop) of shard_size samples (the last may be shorter)."""
    return [(s, min(s + shard_size, num_samples)) for s in range(0, num_samples, shard_size)]

"""Store cost of methods' own arrays: measured per view on a store, projected to CIFAR-100.

    .venv/bin/python benchmarks/method_store_cost.py --methods crd,vid \
        --store bench-out/digits/store-methods.zarr --out bench-out/method_store_cost.json

For each method named: the arrays its kinds write (``Method.kinds()``), their raw bytes per
sample and view (in the dtype stage one writes them) for the teacher of the first store, and
where a store (``--store``, repeatable) holds them the stored (compressed) bytes per sample
and view; then the projection
for a CIFAR-100 resnet32x4 teacher (row shapes from the kinds on kdpipe's own resnet32x4, 50,000
samples) with every view (162) and with ``--views 8``. Raw bytes are an upper bound: real
features compress differently from digits.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from kdpipe.artifacts import open_store
from kdpipe.distributed.teacher_pass import probe_rows
from kdpipe.methods import get_method
from kdpipe.models import build

FLOAT16 = 2
CIFAR100 = {"arch": "resnet32x4", "num_classes": 100, "num_samples": 50_000, "views": {"all (162)": 162, "8": 8}}


def row_bytes(kinds, teacher, image_size) -> dict[str, int]:
    """Raw bytes per sample and view of each array the kinds write (in their store dtype)."""
    x = torch.zeros(2, 3, *image_size)
    shapes = probe_rows(kinds, teacher.eval(), x, torch.zeros(2, dtype=torch.int64))
    dtypes = {path: np.dtype(stored.dtype).itemsize for kind in kinds for path, stored in kind.storage.items()}
    return {path: int(np.prod(shape)) * dtypes.get(path, FLOAT16) for path, shape in shapes.items()}


def measured(store_path: str, paths) -> dict:
    reader = open_store(store_path)
    info = {a["name"]: a for a in reader.array_info()}
    n, v = reader.num_samples, reader.num_views
    return {
        p: {"stored_per_view": info[p]["stored_bytes"] / (n * v), "raw_per_view": info[p]["bytes"] / (n * v)}
        for p in paths
        if p in info
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", required=True, help="Comma-separated method names.")
    parser.add_argument("--store", action="append", default=[], help="Stores holding these methods' arrays (measured).")
    parser.add_argument("--out", default="bench-out/method_store_cost.json")
    args = parser.parse_args(argv)

    reader = open_store(args.store[0]) if args.store else None
    store_teacher = None
    if reader is not None:
        t = reader.manifest["teacher"]
        store_teacher = build(t["arch"], num_classes=int(t["num_classes"]))
        image_size = tuple(reader.manifest["dataset"]["image_size"])
    cifar_teacher = build(CIFAR100["arch"], num_classes=CIFAR100["num_classes"])
    result: dict = {"benchmark": "method_store_cost", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "methods": {}}
    if reader is not None:
        result["stores"] = [
            {"path": p, "num_samples": open_store(p).num_samples, "num_views": open_store(p).num_views}
            for p in args.store
        ]
    for name in args.methods.split(","):
        kinds = get_method(name).kinds()
        cifar = row_bytes(get_method(name).kinds(), cifar_teacher, (32, 32))
        per_view = sum(cifar.values())
        entry = {
            "cifar100_resnet32x4_bytes_per_view": cifar,
            "cifar100_resnet32x4_projection_GiB": {
                views: per_view * CIFAR100["num_samples"] * count / 2**30 for views, count in CIFAR100["views"].items()
            },
        }
        if reader is not None and store_teacher is not None:
            raw = row_bytes(kinds, store_teacher, image_size)
            entry["store_raw_bytes_per_view"] = raw
            entry["store_measured"] = {k: v for p in args.store for k, v in measured(p, raw).items()}
        result["methods"][name] = entry
        print(name, json.dumps(entry, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Bytes per view of each method's store arrays: from the method's own kinds on kdpipe's real
models (exact row shapes, float16 as stored), projected to whole stores, and measured on a
real store where one is given.

    .venv/bin/python benchmarks/method_store_bytes.py --methods pkt,rkd,sp,nst,kdsvd \
        --store bench-out/digits/store-methods.zarr --out bench-out/method_store_bytes.json

Shapes: each method's ``kinds()`` run on the teacher's outputs (``TeacherOutputs.of``) for a
probe batch of random images at the data set's size: the digits teacher resnet20 on 32 x 32
images (1,347 training samples, 81 views) and resnet32x4 on CIFAR-100 (50,000 samples, every
one of the 162 views, and ``--views 8``). Raw bytes (an upper bound of the stored size:
Blosc compresses, digits' mostly black images best). ``--store``: the stored (compressed)
and raw bytes of the methods' arrays in a real store, per sample and view.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from kdpipe.methods import get_method
from kdpipe.models import build
from kdpipe.targets.base import TeacherOutputs, needs_stages

GIB = 1024**3

#: (teacher, classes, image side, training samples, view counts) of each projection
SETTINGS = {
    "digits resnet20": ("resnet20", 10, 32, 1347, {"every view (81)": 81}),
    "CIFAR-100 resnet32x4": ("resnet32x4", 100, 32, 50000, {"every view (162)": 162, "--views 8": 8}),
}


def method_arrays(method: str, teacher_arch: str, classes: int, side: int) -> dict[str, int]:
    """{store array: raw bytes per sample and view} of ``method``'s kinds on ``teacher_arch``."""
    torch.manual_seed(0)
    teacher = build(teacher_arch, classes).eval()
    kinds = get_method(method).bind(teacher_arch, None).kinds()
    out = TeacherOutputs.of(
        teacher, torch.randn(2, 3, side, side), torch.zeros(2, dtype=torch.int64), needs_stages(kinds)
    )
    sizes = {}
    for kind in kinds:
        rows = kind.online(out)
        for path, stored in kind.storage.items():
            sizes[path] = int(rows[path][0].numel()) * np.dtype(stored.dtype).itemsize
    return sizes


def measured(store: str, methods: list[str]) -> dict:
    """Stored and raw bytes per sample and view of each method's arrays in ``store``."""
    from kdpipe.artifacts import open_store

    reader = open_store(store)
    info = {a["name"]: a for a in reader.array_info()}
    per_view = reader.num_samples * reader.num_views
    out = {}
    for method in methods:
        names = [n for n in info if n in method_arrays(method, reader.manifest["teacher"]["arch"], 10, 32)]
        out[method] = {
            "arrays": names,
            "stored_bytes": sum(info[n]["stored_bytes"] for n in names),
            "raw_bytes": sum(info[n]["bytes"] for n in names),
            "stored_per_view": sum(info[n]["stored_bytes"] for n in names) / per_view,
            "raw_per_view": sum(info[n]["bytes"] for n in names) / per_view,
        }
    return {"store": store, "num_samples": reader.num_samples, "num_views": reader.num_views, "methods": out}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="pkt,rkd,sp,nst,kdsvd", help="comma-separated registered methods")
    parser.add_argument("--store", default=None, help="also measure these methods' arrays in this store")
    parser.add_argument("--out", default="bench-out/method_store_bytes.json")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    start = time.time()
    command = " ".join(["python", "benchmarks/method_store_bytes.py", *(sys.argv[1:] if argv is None else argv)])
    result: dict = {"benchmark": "method_store_bytes", "command": command, "methods": methods, "projections": {}}
    for label, (arch, classes, side, samples, views) in SETTINGS.items():
        rows = {}
        for method in methods:
            arrays = method_arrays(method, arch, classes, side)
            per_view = sum(arrays.values())
            rows[method] = {
                "arrays": arrays,
                "bytes_per_view": per_view,
                "gib": {name: samples * count * per_view / GIB for name, count in views.items()},
            }
        result["projections"][label] = {"teacher": arch, "samples": samples, "views": views, "methods": rows}
    if args.store:
        result["measured"] = measured(args.store, methods)
    result["seconds"] = round(time.time() - start, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    for label, proj in result["projections"].items():
        print(label)
        for method, row in proj["methods"].items():
            gib = ", ".join(f"{k}: {v:.2f} GiB" for k, v in row["gib"].items())
            print(f"  {method:8s} {row['bytes_per_view']:>9,d} B/view  {gib}")
    if "measured" in result:
        for method, row in result["measured"]["methods"].items():
            print(f"  measured {method:8s} stored {row['stored_per_view']:,.0f} B/view, raw {row['raw_per_view']:,.0f}")
    return result


if __name__ == "__main__":
    main()

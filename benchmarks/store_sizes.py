"""Store sizes per method and view mode: measured on real stores, projected to CIFAR-100 and
ImageNet from per-sample sizes.

    .venv/bin/python benchmarks/store_sizes.py --store bench-out/digits/store.zarr \
        --store bench-out/digits/store-1view.zarr --out bench-out/store_sizes.json

Measured: for each store given, the stored (compressed) and raw bytes of every array, and the
bytes per sample and view. Projected: what each method needs per sample and view (float16
tensors, int16 indices, as the store writes them), times N and the view count, for a CIFAR-100
teacher (resnet32x4; shapes read off kdpipe's own model) and an ImageNet ResNet-50 teacher
(C=1000, 7x7 maps, 2048 channels). Projections are raw bytes (an upper bound): compression
ratios of real data differ from digits, whose images are mostly black.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from kdpipe.artifacts import open_store

FLOAT16 = 2
INDEX = 2  # int16 indices while K fits, as the cluster stage writes them


def measure(path: str) -> dict:
    reader = open_store(path)
    n, v = reader.num_samples, reader.num_views
    arrays = {
        a["name"]: {"shape": list(a["shape"]), "dtype": a["dtype"], "raw": a["bytes"], "stored": a["stored_bytes"]}
        for a in reader.array_info()
    }
    return {
        "store": str(path),
        "num_samples": n,
        "num_views": v,
        "arrays": arrays,
        "stored_total": sum(a["stored"] for a in arrays.values()),
        "raw_total": sum(a["raw"] for a in arrays.values()),
        "stored_per_sample_view": {k: a["stored"] / (n * v) for k, a in arrays.items() if a["shape"][:2] == [n, v]},
    }


def method_bytes_per_view(C: int, h: int, w: int, D_penult: int, D_inter: int, topk: int = 16, cam_r: int = 2) -> dict:
    """Bytes per sample and view each method reads from the store (plus stage one's features)."""
    return {
        "ce": 0,
        "kd (logits)": C * FLOAT16,
        f"cat_kd (cam_r{cam_r})": C * cam_r * cam_r * FLOAT16,
        "cat_kd native cam (binarize)": C * h * w * FLOAT16,
        f"letkd1 (top-{topk} idx+val)": h * w * topk * (INDEX + FLOAT16),
        f"letkd2 (top-{topk} + sub-class idx)": h * w * (topk * (INDEX + FLOAT16) + INDEX),
        "features penult+inter, every view (--feature-views all)": (D_penult + D_inter) * h * w * FLOAT16,
    }


#: Arrays stored once per sample whatever the view count (the default identity-view features).
def per_sample_bytes(C: int, h: int, w: int, D_penult: int, D_inter: int, **_) -> dict:
    return {"features penult+inter, identity view (default; --drop-features)": (D_penult + D_inter) * h * w * FLOAT16}


def cifar100_shapes() -> dict:
    from kdpipe.models import build

    model = build("resnet32x4", num_classes=100).eval()
    with torch.no_grad():
        _, feats = model.forward_features(torch.zeros(1, 3, 32, 32))
    _, D, h, w = feats["penult"].shape
    return {"C": 100, "h": h, "w": w, "D_penult": D, "D_inter": feats["inter"].shape[1]}


def project(shapes: dict, n: int, view_counts: dict) -> dict:
    per_view = method_bytes_per_view(**shapes)
    once = per_sample_bytes(**shapes)
    return {
        mode: {
            **{method: per * n * count for method, per in per_view.items()},
            **{name: per * n for name, per in once.items()},
        }
        for mode, count in view_counts.items()
    } | {"per_sample_view_bytes": per_view}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", action="append", default=[], help="A store to measure (repeatable).")
    parser.add_argument("--out", default="bench-out/store_sizes.json")
    args = parser.parse_args(argv)

    result = {
        "benchmark": "store_sizes",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "measured": [measure(p) for p in args.store],
        "projected": {
            "cifar100_resnet32x4": {"num_samples": 50_000, "shapes": cifar100_shapes()},
            "imagenet_resnet50": {
                "num_samples": 1_281_167,
                "shapes": {"C": 1000, "h": 7, "w": 7, "D_penult": 2048, "D_inter": 2048},
            },
        },
    }
    views = {
        "cifar100_resnet32x4": {"views=1": 1, "views=8": 8, "views=all (162)": 162},
        "imagenet_resnet50": {"views=1": 1, "views=8": 8},
    }
    for key, spec in result["projected"].items():
        spec["bytes"] = project(spec["shapes"], spec["num_samples"], views[key])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    for m in result["measured"]:
        print(
            f"{m['store']}: {m['num_samples']} samples x {m['num_views']} views, "
            f"{m['stored_total'] / 2**20:.1f} MiB stored ({m['raw_total'] / 2**20:.1f} MiB raw)"
        )
    for key, spec in result["projected"].items():
        print(key)
        for mode, sizes in spec["bytes"].items():
            if mode == "per_sample_view_bytes":
                continue
            print(f"  {mode}: " + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in sizes.items()))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

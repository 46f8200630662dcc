"""What bound chunk digests (digest form 2) cost against the older bare crc32c digests (form 1).

    .venv/bin/python benchmarks/store_integrity.py [--n 4096] [--views 4] [--classes 100]
        [--shard-size 256] [--repeats 3] [--out bench-out/store_integrity.json]

Two stores of the same random float16 arrays (logits [N, V, C], cam [N, V, C, 4, 4]) in a
temporary folder, one per digest form, made and read by the same code: the older form is what
``StoreWriter.create`` makes from a manifest without a store id. Rounds alternate the two
forms (--repeats), so a change in machine load hits both alike; medians are reported.

- write: every shard of both arrays written (``write_rows``: encode, write, record digests;
  form 2 reads each chunk object back to hash it) and ``finalize`` (form 2: the digests' root);
- open: ``open_store`` with its check (manifest, metadata, one 4-byte read per chunk, root);
- first read: the whole cam array through a fresh reader (form 2: each chunk's content digest
  checked on first touch, one extra read of the chunk object);
- verify: ``inspect --verify``'s check (every chunk read and decoded; form 2 also hashed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import numpy as np


def _manifest(n: int, v: int, c: int, shard_size: int, bound: bool):
    from kdpipe.artifacts.manifest import build_manifest
    from kdpipe.artifacts.schema import ArraySpec

    specs = [
        ArraySpec("views", (n, v, 3), "int32", "view parameters"),
        ArraySpec("logits", (n, v, c), "float16", "logits"),
        ArraySpec("cam", (n, v, c, 4, 4), "float16", "cam"),
    ]
    specs = [s.with_chunks(shard_size) for s in specs]
    m = build_manifest(
        teacher={"arch": "resnet8", "sha256": "0" * 64, "num_classes": c},
        dataset={"name": "synthetic", "split": "train", "fingerprint": "f", "num_samples": n, "num_classes": c},
        views={"num_views": v},
        layers=[],
        specs=specs,
        shard_size=shard_size,
        num_samples=n,
    )
    doc = m.to_json()
    if not bound:  # what the release before digest form 2 wrote
        for key in ("store_id", "digest_form"):
            doc.pop(key)
    return doc, specs


def _write(path: str, data: dict, n: int, v: int, c: int, shard_size: int, bound: bool) -> float:
    from kdpipe.artifacts import StoreWriter
    from kdpipe.artifacts.schema import plan_shards

    doc, specs = _manifest(n, v, c, shard_size, bound)
    t0 = time.perf_counter()
    w = StoreWriter.create(path, doc, specs)
    for sid, (a, b) in enumerate(plan_shards(n, shard_size)):
        for name, array in data.items():
            w.write_rows(name, a, array[a:b])
        w.mark_shard_done(sid)
    w.finalize()
    return time.perf_counter() - t0


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    from kdpipe.artifacts import open_store

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench-out/store_integrity.json")
    args = ap.parse_args()
    n, v, c = args.n, args.views, args.classes
    rng = np.random.default_rng(0)
    data = {
        "views": rng.integers(0, 10, (n, v, 3)).astype(np.int32),
        "logits": rng.standard_normal((n, v, c)).astype(np.float16),
        "cam": rng.standard_normal((n, v, c, 4, 4)).astype(np.float16),
    }
    times: dict[str, dict[str, list[float]]] = {f: {} for f in ("form2", "form1")}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for form, bound in (("form2", True), ("form1", False)):
                path = os.path.join(tmp, f"{form}-{r}.zarr")
                t = times[form]
                t.setdefault("write_s", []).append(_write(path, data, n, v, c, args.shard_size, bound))
                t.setdefault("open_s", []).append(_timed(lambda path=path: open_store(path)))
                reader = open_store(path)
                t.setdefault("first_read_cam_s", []).append(_timed(lambda reader=reader: reader["cam"][...]))
                t.setdefault("second_read_cam_s", []).append(_timed(lambda reader=reader: reader["cam"][...]))
                t.setdefault("verify_s", []).append(_timed(lambda reader=reader: reader.damage(decode=True)))
    med = {form: {k: round(statistics.median(v), 4) for k, v in t.items()} for form, t in times.items()}
    ratios = {k: round(med["form2"][k] / med["form1"][k], 3) for k in med["form2"]}
    raw = sum(a.nbytes for a in data.values())
    out = {
        "args": vars(args),
        "raw_bytes": int(raw),
        "median": med,
        "ratio_form2_over_form1": ratios,
        "all": times,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load": os.getloadavg()},
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps({"median": med, "ratio_form2_over_form1": ratios, "raw_MB": round(raw / 2**20, 1)}, indent=2))


if __name__ == "__main__":
    main()

"""Reader-only throughput of every target tier, bytes decoded per byte used, memory of 1 and 4
concurrent trials, and the time to make the shared copy (issue 20; DESIGN.md "Stage two data
path").

    python benchmarks/target_reader.py --samples 2048 --out bench-out/target_reader.json

Stores: CIFAR-100-shaped, every view (162), 64 samples per chunk (per shard in the row
layout), written through the real ``StoreWriter`` with the real codecs (Blosc zstd + crc32c,
digests, manifest, target set): CAT-KD's ``cam_r2`` [N, 162, 100, 2, 2] float16 and letKD-2's
``targets/T/penult_topk_idx`` int16 / ``penult_topk_val`` float16 [N, 162, 8, 8, 16] and
``subclass_idx`` int16 [N, 162, 16, 16]. Their values are synthetic with the statistics of real
ones (indices uniform over K=4096, probabilities sorted and decreasing, sub-classes y*8+k):
running the real extract and cluster stages over 162 views of N images takes tens of minutes
on this 2-core machine, and the reader's work depends on the shapes, dtypes and codecs, not
on the teacher. The same arrays are written twice: in the row layout new stores use and in
the old (samples, every view, ...) chunks, to measure the old stream as it was.

Tiers, reader only (no training step), letKD-2's three arrays per batch of ``--batch-size``
(plus CAT-KD's ``cam_r2`` for the stream alone, ``catkd_stream_img_s``):

- ``device`` / ``host``: ``MemoryRows`` (on a CPU machine both gather in host memory);
- ``shared``: ``SharedRows`` over the machine's shared copy (memory-mapped, page cache);
- ``stream``: ``RowStream`` on the row layout (only the rows used, threads);
- ``stream_old``: ``StreamRows`` on the old layout (every view of every block).

Each round times one epoch of every tier, in an order rotated every round; img/s is the
median over rounds. ``decoded_per_used`` and ``read_per_used``: bytes decoded and bytes read
from shard files (rows and indices) per byte of rows handed over, by the stream tier on
letKD-2. Memory: ``--trials`` reader processes at once, each touching every row of the
letKD-2 arrays (as many epochs would), its PSS (``/proc/<pid>/smaps_rollup``) read while all
are alive; a trial's target memory is its PSS minus its PSS before the targets; the ratio is
the sum over the concurrent trials over one trial alone, for the shared tier and (contrast)
for the device tier, whose every trial holds its own copy (here a private copy of the same
arrays, read from the shared copy's files rather than decoded from the store: the same
memory, minutes less on this machine).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

V = 162  # every stored view of a CIFAR image (DESIGN.md)
CLASSES = 100
K_PENULT, TOPK, K_INTER = 4096, 16, 8  # letKD references' K=4096 centres, top-16, 8 sub-classes
PENULT_GRID, INTER_GRID = (8, 8), (16, 16)  # resnet32x4's penult and inter maps on CIFAR
CHUNK = 64  # samples per chunk, as the measurement
LETKD = ("targets/T/penult_topk_idx", "targets/T/penult_topk_val", "targets/T/subclass_idx")
CATKD = ("cam_r2",)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeat", type=int, default=8, help="epochs per tier per round (the old stream: 1)")
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--workdir", default="bench-out/target_reader")
    p.add_argument("--out", default="bench-out/target_reader.json")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # a memory trial: tier,index,count
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------ the stores
def _rows(name: str, lo: int, hi: int, labels: np.ndarray, rng) -> np.ndarray:
    n = hi - lo
    if name.endswith("penult_topk_idx"):
        return rng.integers(0, K_PENULT, (n, V, *PENULT_GRID, TOPK), dtype=np.int16)
    if name.endswith("penult_topk_val"):
        logits = np.sort(rng.standard_exponential((n, V, *PENULT_GRID, TOPK)), axis=-1)[..., ::-1]
        p = np.exp(logits)
        return (p / (p.sum(-1, keepdims=True) * 1.05)).astype(np.float16)
    if name.endswith("subclass_idx"):
        k = rng.integers(0, K_INTER, (n, V, *INTER_GRID))
        return (labels[lo:hi, None, None, None] * K_INTER + k).astype(np.int16)
    if name == "cam_r2":
        return rng.standard_normal((n, V, CLASSES, 2, 2)).astype(np.float16)
    return np.zeros((n, V, 4), dtype=np.int32)  # views


def make_store(path: Path, n: int, row_layout: bool) -> float:
    from kdpipe.artifacts import StoreWriter, open_store
    from kdpipe.artifacts import writer as writer_mod
    from kdpipe.artifacts.manifest import build_manifest
    from kdpipe.artifacts.schema import ArraySpec

    if path.exists():
        try:
            open_store(path)
            return 0.0
        except Exception:  # noqa: BLE001 - remade below
            shutil.rmtree(path)
    t0 = time.perf_counter()
    writer_mod.ROW_CHUNKS = row_layout
    try:
        specs = [
            ArraySpec("views", (n, V, 4), "int32", "view parameters", (CHUNK, V, 4)),
            ArraySpec("cam_r2", (n, V, CLASSES, 2, 2), "float16", "CAM 2x2", (CHUNK, V, CLASSES, 2, 2)),
        ]
        manifest = build_manifest(
            teacher={"sha256": "0" * 64, "arch": "resnet32x4", "num_classes": CLASSES},
            dataset={
                "name": "synthetic",
                "split": "train",
                "fingerprint": "bench",
                "num_samples": n,
                "num_classes": CLASSES,
                "mean": [0.5, 0.5, 0.5],
                "std": [0.25, 0.25, 0.25],
                "image_size": [32, 32],
            },
            views={"policy": "cifar", "mode": "all", "num_views": V, "seed": 0, "pad_mode": "constant"},
            layers=[],
            specs=specs,
            shard_size=CHUNK,
            num_samples=n,
        )
        w = StoreWriter.create(path, manifest, specs, overwrite=True)
        rng = np.random.default_rng(0)
        labels = rng.integers(0, CLASSES, n)
        for shard, lo in enumerate(range(0, n, CHUNK)):
            hi = min(lo + CHUNK, n)
            for spec in specs:
                w.write_rows(spec.name, lo, _rows(spec.name, lo, hi, labels, rng))
            w.mark_shard_done(shard)
        w.finalize()
        t = StoreWriter.open_for_targets(path)
        shapes = {
            "penult_topk_idx": ((n, V, *PENULT_GRID, TOPK), "int16"),
            "penult_topk_val": ((n, V, *PENULT_GRID, TOPK), "float16"),
            "subclass_idx": ((n, V, *INTER_GRID), "int16"),
        }
        for short, (shape, dtype) in shapes.items():
            t.create_target_array("T", short, shape, dtype, CHUNK, short)
            for lo in range(0, n, CHUNK):
                t.write_rows(f"targets/T/{short}", lo, _rows(short, lo, min(lo + CHUNK, n), labels, rng))
        t.set_target_attrs("T", {"benchmark": True})
        t.finish_target_set("T")
    finally:
        writer_mod.ROW_CHUNKS = True
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------ tiers
def uses(names):
    from kdpipe.engine.rows import ArrayUse

    return [ArrayUse(p, True) for p in names]


def plan_of(n: int, seed: int, epoch: int, blocks: bool):
    from kdpipe.engine import plan as plans

    idx = torch.arange(n)
    if blocks:
        order, bl, ranks = plans.block_order(idx, CHUNK, 16384, seed, epoch)
    else:
        order, bl, ranks = plans.uniform_order(idx, seed, epoch), None, None
    views = plans.draw_views(order, V, seed, epoch)
    return plans.EpochPlan(order, torch.zeros(len(order), 1, dtype=torch.int32), views, ranks, bl)


def run_epoch(source, n: int, batch: int, epoch: int, blocks: bool = False) -> tuple[float, float, int]:
    """(seconds for the epoch, seconds to the first batch, rows checksum)."""
    plan = plan_of(n, 7, epoch, blocks)
    t0 = time.perf_counter()
    source.begin_epoch(plan, batch)
    first = None
    check = 0
    for b in plan.batches(batch):
        rows = source.rows(b)
        if first is None:
            first = time.perf_counter() - t0
        check += sum(int(v.reshape(-1)[0].float()) for v in rows.values())
    total = time.perf_counter() - t0
    source.close()
    return total, float(first or 0.0), check


def throughput(args, row_store: Path, old_store: Path, shared_dir: Path) -> dict:
    from kdpipe.artifacts import open_store
    from kdpipe.engine.row_stream import RowStream, row_readers
    from kdpipe.engine.rows import MemoryRows, SharedRows, StreamRows
    from kdpipe.engine.shared_copy import SharedCopy

    cpu = torch.device("cpu")
    n, batch = args.samples, args.batch_size
    new, old = open_store(row_store), open_store(old_store)
    out: dict = {}
    shutil.rmtree(shared_dir, ignore_errors=True)
    copy = SharedCopy.open(new, uses(LETKD), shared_dir=shared_dir)
    out["shared_make_s"] = round(copy.seconds, 3)
    out["shared_copy_bytes"] = copy.nbytes
    again = SharedCopy.open(new, uses(LETKD), shared_dir=shared_dir)
    out["shared_open_checked_s"] = round(again.seconds, 3)
    del again
    t0 = time.perf_counter()
    sources = {
        "device": MemoryRows(new, uses(LETKD), cpu, "device"),
        "host": MemoryRows(new, uses(LETKD), cpu, "host"),
    }
    out["host_load_s"] = round((time.perf_counter() - t0) / 2, 3)
    sources["shared"] = SharedRows(copy, uses(LETKD), cpu)
    readers = row_readers(new, uses(LETKD))
    sources["stream"] = RowStream(new, uses(LETKD), cpu, readers)
    sources["stream_old"] = StreamRows(old, uses(LETKD), cpu, CHUNK)
    cat_readers = row_readers(new, uses(CATKD))
    sources["catkd_stream"] = RowStream(new, uses(CATKD), cpu, cat_readers)
    names = list(sources)
    times: dict = {k: [] for k in names}
    firsts: dict = {k: [] for k in names}
    sums: dict = {}
    for r in range(args.rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            if name == "stream":
                for rr in readers.values():
                    rr.stats.read = rr.stats.decoded = rr.stats.rows = 0
            reps = 1 if name == "stream_old" else args.repeat
            seconds, first, check = 0.0, 0.0, 0
            for e in range(reps):  # the same epochs for every tier: equal rows
                sec, fst, chk = run_epoch(sources[name], n, batch, r * 1000 + e, blocks=name == "stream_old")
                seconds, check = seconds + sec / reps, check + chk
                first = fst if e == 0 else first
            times[name].append(seconds)
            firsts[name].append(first)
            if name == "stream":
                used = sum(rr.stats.rows * rr.row_bytes for rr in readers.values())
                out["decoded_per_used"] = round(sum(rr.stats.decoded for rr in readers.values()) / used, 3)
                out["read_per_used"] = round(sum(rr.stats.read for rr in readers.values()) / used, 3)
            if name in ("device", "host", "shared", "stream"):
                sums.setdefault(r, {})[name] = check
    for name in names:
        out[f"{name}_img_s"] = round(n / statistics.median(times[name]), 1)
        out[f"{name}_first_batch_s"] = round(statistics.median(firsts[name]), 4)
        out[f"{name}_epoch_s"] = [round(t, 4) for t in times[name]]
    out["same_rows_every_tier"] = all(len(set(v.values())) == 1 for v in sums.values())
    out["shared_over_host"] = round(out["shared_img_s"] / out["host_img_s"], 3)
    out["stream_over_stream_old"] = round(out["stream_img_s"] / out["stream_old_img_s"], 1)
    # the old stream reads every view of every block of every array: V bytes decoded per byte used
    out["decoded_per_used_old"] = float(V)
    for s in sources.values():
        s.close()
    del sources, copy
    gc.collect()
    return out


# ------------------------------------------------------------------------------------ memory
def pss_bytes() -> int:
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


def child(args) -> None:
    from kdpipe.artifacts import open_store
    from kdpipe.engine.rows import SharedRows
    from kdpipe.engine.shared_copy import SharedCopy

    tier, index, count = args.child.split(",")
    index, count = int(index), int(count)
    work = Path(args.workdir)
    barrier = work / f"barrier-{tier}-{count}"
    reader = open_store(work / "row.zarr")
    gc.collect()
    before = pss_bytes()
    copy = SharedCopy.open(reader, uses(LETKD), shared_dir=work / "shared")
    if tier == "shared":
        tensors = SharedRows(copy, uses(LETKD), torch.device("cpu")).tensors
    else:  # the device tier's memory: a private copy per trial (read from the copy's files: fast)
        tensors = {p: torch.from_numpy(np.array(a)) for p, a in copy.arrays.items()}
    del copy
    touched = 0
    for t in tensors.values():  # every row, as many epochs would
        flat = t.reshape(-1).view(torch.uint8) if t.dtype != torch.uint8 else t.reshape(-1)
        for lo in range(0, flat.numel(), 1 << 26):
            touched += int(flat[lo : lo + (1 << 26)][::4096].sum())
    (barrier / f"ready-{index}").write_text("1")
    while len(list(barrier.glob("ready-*"))) < count:
        time.sleep(0.05)
    time.sleep(0.3)
    after = pss_bytes()
    (barrier / f"pss-{index}.json").write_text(json.dumps({"before": before, "after": after, "touched": touched}))
    while len(list(barrier.glob("pss-*.json"))) < count:
        time.sleep(0.05)


def trials_memory(args, tier: str, count: int) -> dict:
    work = Path(args.workdir)
    barrier = work / f"barrier-{tier}-{count}"
    shutil.rmtree(barrier, ignore_errors=True)
    barrier.mkdir(parents=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, __file__, "--workdir", str(work), "--samples", str(args.samples)]
    procs = [subprocess.Popen(cmd + ["--child", f"{tier},{i},{count}"], env=env) for i in range(count)]
    for p in procs:
        if p.wait() != 0:
            raise SystemExit(f"a {tier} memory trial failed (exit {p.returncode})")
    rows = [json.loads((barrier / f"pss-{i}.json").read_text()) for i in range(count)]
    shutil.rmtree(barrier, ignore_errors=True)
    return {"target_pss_bytes": sum(r["after"] - r["before"] for r in rows), "per_trial": rows}


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    if args.child:
        child(args)
        return
    from common import machine, write_json

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    load_before = list(os.getloadavg())
    row_store, old_store, shared_dir = work / "row.zarr", work / "old.zarr", work / "shared"
    result: dict = {"samples": args.samples, "views": V, "batch_size": args.batch_size, "chunk_samples": CHUNK}
    result["store_write_s"] = {
        "row_layout": round(make_store(row_store, args.samples, True), 2),
        "old_layout": round(make_store(old_store, args.samples, False), 2),
    }
    result.update(throughput(args, row_store, old_store, shared_dir))
    from kdpipe.artifacts import open_store
    from kdpipe.engine.shared_copy import SharedCopy

    SharedCopy.open(open_store(row_store), uses(LETKD), shared_dir=shared_dir)  # made before the trials
    gc.collect()
    memory = {}
    for tier in ("shared", "device"):
        one = trials_memory(args, tier, 1)
        many = trials_memory(args, tier, args.trials)
        memory[tier] = {"one": one, f"trials{args.trials}": many}
        ratio = many["target_pss_bytes"] / max(1, one["target_pss_bytes"])
        key = f"trials{args.trials}_memory_ratio" + ("" if tier == "shared" else "_device")
        result[key] = round(ratio, 3)
    result["memory"] = memory
    result["machine"] = machine()
    result["loadavg_before"] = load_before
    path = write_json(args.out, result, argv, script="target_reader.py")
    keys = [
        "stream_img_s",
        "catkd_stream_img_s",
        "stream_old_img_s",
        "host_img_s",
        "device_img_s",
        "shared_img_s",
        "shared_over_host",
        "decoded_per_used",
        "read_per_used",
        "trials4_memory_ratio",
        "trials4_memory_ratio_device",
        "shared_make_s",
        "stream_first_batch_s",
        "same_rows_every_tier",
    ]
    print(json.dumps({k: result.get(k) for k in keys}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

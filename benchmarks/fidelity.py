"""Fidelity of cached targets against the online teacher: replay (exact) vs warp (approximate).

    .venv/bin/python benchmarks/fidelity.py --teacher <ckpt> --replay-store <multi-view store> \
        --warp-store <1-view store> --out bench-out/fidelity.json

Both stores come from the same teacher (the digits accuracy run makes them under
bench-out/digits/). Replay: one stored view per sample, applied exactly to the image, stored
targets as they are. Warp: a fresh random augmentation, identity-view maps warped to it
(ReLabel-style). Per artifact: mean per-sample cosine similarity and relative error against
the teacher run on the same augmented image (`kdpipe inspect --fidelity` prints the same).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from kdpipe.artifacts import open_store
from kdpipe.engine.fidelity import measure_fidelity
from kdpipe.models import load_teacher
from kdpipe.stages.inspect import _dataset_for, _store_policy


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--replay-store", required=True)
    parser.add_argument("--warp-store", required=True)
    parser.add_argument("--num-samples", type=int, default=512)
    parser.add_argument("--out", default="bench-out/fidelity.json")
    args = parser.parse_args(argv)

    result = {
        "benchmark": "fidelity",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": "python benchmarks/fidelity.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "num_samples": args.num_samples,
    }
    for mode, path in (("replay", args.replay_store), ("warp", args.warp_store)):
        reader = open_store(path)
        reader.check_teacher(args.teacher)
        t = reader.manifest.teacher
        teacher = load_teacher(t.arch, args.teacher, t.num_classes)
        dataset = _dataset_for(reader)
        result[mode] = {
            "store": str(path),
            "num_views": reader.num_views,
            "artifacts": measure_fidelity(
                reader, teacher, dataset, args.num_samples, seed=0, mode=mode, policy=_store_policy(reader, dataset)
            ),
        }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    names = list(result["replay"]["artifacts"])
    print(f"{'artifact':<14} {'replay cos':>10} {'replay err':>10} {'warp cos':>9} {'warp err':>9}")
    for name in names:
        r, w = result["replay"]["artifacts"][name], result["warp"]["artifacts"].get(name, {})
        print(
            f"{name:<14} {r['cosine']:>10.4f} {r['rel_error']:>10.4f} {w.get('cosine', float('nan')):>9.4f} "
            f"{w.get('rel_error', float('nan')):>9.4f}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

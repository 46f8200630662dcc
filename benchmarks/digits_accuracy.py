"""The digits accuracy table of issue 5: what distillation buys in the data-reduction regime.

Teacher (resnet20) trained on the full digits train split; resnet8 students trained on a
fixed, seeded 10% subset of it, same epochs for all, top-1 on the full test split; every
method from one store (cached, replay views), cat_kd and letkd2 with the online teacher, and
cat_kd from a 1-view store with warp; mean and std over seeds.

    .venv/bin/python benchmarks/digits_accuracy.py --seeds 0,1,2 --out bench-out/digits_accuracy.json

It is `kdpipe demo` with every student run and several seeds, so a re-run reuses the teacher
and the stores in --work.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from kdpipe.stages.demo import ALL_STUDENTS, FULL, run_demo


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--student-epochs", type=int, default=FULL.student_epochs)
    parser.add_argument("--teacher-epochs", type=int, default=FULL.teacher_epochs)
    parser.add_argument("--executor", default="ray", choices=["ray", "inline"])
    parser.add_argument("--work", default="bench-out/digits")
    parser.add_argument("--out", default="bench-out/digits_accuracy.json")
    args = parser.parse_args(argv)

    seeds = tuple(int(x) for x in args.seeds.split(","))
    t0 = time.perf_counter()
    summary = run_demo(out=args.work, students=ALL_STUDENTS, seeds=seeds, executor=args.executor,
                       student_epochs=args.student_epochs, teacher_epochs=args.teacher_epochs)
    result = {
        "benchmark": "digits_accuracy",
        "command": "python benchmarks/digits_accuracy.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "device": "cpu"},
        "settings": summary["settings"],
        "teacher": summary["teacher"],
        "table": summary["table"],
        "runs": summary["runs"],
        "store_bytes": summary["store_bytes"],
        "wall_seconds": time.perf_counter() - t0,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

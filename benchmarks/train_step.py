"""Images/s of one student training step: CE only, cached CAT-KD / letKD-2, online CAT-KD /
letKD-2, and the teacher's forward alone, all in one run (issue 5, DESIGN.md "Stage two data
path").

    python benchmarks/train_step.py [--device cpu|cuda] [--amp] [--out bench-out/train_step.json]

Same student (resnet8x4), teacher (resnet32x4), batch (64), on synthetic CIFAR-100-shaped
data (``synthetic:n=N,classes=100,size=32``). At start a small store is made with the real
stages: ``extract_teacher`` (1 view, CAMs pooled to 2x2, penult/inter features) and
``cluster`` (letKD target set). The teacher has random weights (timing does not depend on
them). Every step is ``kdpipe.stages.loop.train_step``, the exact code ``train-student``
runs: batch gathered from device-resident uint8 images, view parameters from the target
source, crop/flip on the device, normalise, targets, forward, loss, backward, SGD step.

Configurations are interleaved step by step (each round times one step of every
configuration, in an order rotated each round) so machine drift hits all of them alike;
``--warmup`` untimed steps each first; every step is synchronised on CUDA; the report takes
the median step time over ``--steps x --repeats`` rounds. Ratios (all from this one run):

- ``cached_catkd_over_ce`` = img/s(cached CAT-KD) / img/s(CE): bar >= 0.9;
- ``online_over_cached_catkd`` = t_online / t_cached (per step) against its ideal
  (t_CE + t_teacher_fwd) / t_CE; ``speedup_fraction_of_ideal_catkd`` = their quotient, bar >= 0.9;
- the same for letKD-2 (its ideal there counts the KD layers: (t_cached + t_teacher) / t_cached,
  and the CE-based ideal is reported too).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--amp", action="store_true", help="torch.autocast (float16 on CUDA)")
    p.add_argument("--student", default="resnet8x4")
    p.add_argument("--teacher", default="resnet32x4")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-samples", type=int, default=256, help="synthetic train images in the store")
    p.add_argument("--k-penult", type=int, default=4096, help="letKD penultimate K-means centres (reference 4096)")
    p.add_argument("--k-inter", type=int, default=8, help="letKD sub-classes per class (reference 8)")
    p.add_argument("--topk", type=int, default=16, help="stored top-k of the penultimate targets")
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration and repeat")
    p.add_argument("--repeats", type=int, default=4, help="repeats (rounds = steps x repeats; median taken)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration first")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--workdir", default="bench-out/train_step", help="teacher checkpoint and store")
    p.add_argument("--out", default="bench-out/train_step.json")
    return p.parse_args(argv)


def make_store(args, workdir: Path, data: str, num_classes: int) -> dict:
    from kdpipe.artifacts import open_store
    from kdpipe.models import build
    from kdpipe.stages import cluster, extract

    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = workdir / f"{args.teacher}_random.pth"
    store = workdir / f"{args.teacher}-synthetic{args.num_samples}-k{args.k_penult}.zarr"
    t0 = time.perf_counter()
    if not ckpt.is_file():
        torch.manual_seed(0)
        torch.save({"model": build(args.teacher, num_classes=num_classes).state_dict()}, ckpt)
    made = False
    try:
        reader = open_store(store)
        ok = "default" in reader.target_sets()
    except Exception:
        ok = False
    if not ok:
        extract.extract_teacher(ckpt, args.teacher, data, store, views="1", cam_res=(2,), executor="inline",
                                overwrite=True, progress=True, verbose=False, device=args.device)
        cluster.cluster(store, name="default", k_penult=args.k_penult, k_inter=args.k_inter, topk=args.topk,
                        executor="inline", verbose=False)
        made = True
    return {"checkpoint": str(ckpt), "store": str(store), "made_now": made,
            "seconds": time.perf_counter() - t0}


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from kdpipe.data import load_dataset, normalize
    from kdpipe.models import build, load_teacher
    from kdpipe.artifacts import open_store
    from kdpipe.stages import loop
    from kdpipe.stages.train import _make_target_source, _target_set_sizes, build_method, student_step_loss

    dev = loop.resolve_device(args.device)
    args.device = str(dev)
    num_classes = 100
    data = f"synthetic:n={args.num_samples},classes={num_classes},size=32,seed=0"
    print(f"[train_step] device {dev}, threads {torch.get_num_threads()}, building the store ...", flush=True)
    info = make_store(args, Path(args.workdir), data, num_classes)
    reader = open_store(info["store"])
    ds = load_dataset(data, "train")
    reader.check_dataset(ds)
    train = loop.place_dataset(ds, dev)
    teacher_arch = reader.manifest["teacher"]["arch"]

    configs = {}

    def add(name, method, online, options=None):
        m = build_method(method, options or {}, teacher_arch, args.student)
        torch.manual_seed(0)
        model = build(args.student, num_classes=num_classes)
        model = m.prepare_student(model, **_target_set_sizes(reader, "default", num_classes)) or model
        model = model.to(dev)
        source = _make_target_source(reader=reader, method=m, target_set="default", device=dev, views="replay",
                                     online_teacher=info["checkpoint"] if online else None,
                                     teacher_arch=teacher_arch, num_classes=num_classes, policy=ds.policy,
                                     labels=ds.labels)
        loss = student_step_loss(model, m, source)
        opt = loop.make_optimizer(model, 0.01, 0.9, 5e-4, nesterov=m.recipe(args.student).get("nesterov", False))
        configs[name] = {"kind": "step", "model": model, "opt": opt, "scaler": loop.make_grad_scaler(dev, args.amp),
                         "fns": loop.StepFns(views=source.views_for, loss=loss),
                         "policy": getattr(source, "policy", None) or ds.policy, "source": type(source).__name__}

    add("ce", "ce", False)
    add("cached_catkd", "cat_kd", False)
    add("cached_letkd2", "letkd2", False)
    add("online_catkd", "cat_kd", True)
    add("online_letkd2", "letkd2", True)
    teacher = load_teacher(teacher_arch, info["checkpoint"], num_classes).to(dev).eval()
    configs["teacher_fwd"] = {"kind": "teacher", "model": teacher}

    B = args.batch_size
    gen = torch.Generator().manual_seed(0)
    perm_g = torch.Generator().manual_seed(1)

    def batch():
        idx = torch.randperm(len(ds), generator=perm_g)[:B]
        return idx, train.images.index_select(0, idx.to(dev))

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def run_once(cfg):
        idx, imgs = batch()
        if cfg["kind"] == "teacher":
            with torch.no_grad(), loop.autocast(dev, args.amp):
                params = ds.policy.random(gen, B).to(dev)
                x = normalize(ds.policy.apply_images(imgs, params), train.mean, train.std)
                cfg["model"].forward_features(x)
            return
        loop.train_step(cfg["model"], cfg["fns"], cfg["policy"], cfg["opt"], cfg["scaler"], train, idx, imgs,
                        0, gen, args.amp)

    def timed(cfg):
        sync()
        t0 = time.perf_counter()
        run_once(cfg)
        sync()
        return time.perf_counter() - t0

    names = list(configs)
    for n in names:  # warm-up: first-call allocations, lazy initialisation
        for _ in range(args.warmup):
            run_once(configs[n])
    # Interleaved at the step level: each round times one step of every configuration, in an
    # order rotated every round, so drift (other jobs on the machine) hits all of them alike.
    times = {n: [] for n in names}
    rounds = args.repeats * args.steps
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            times[n].append(timed(configs[n]))
        if (r + 1) % args.steps == 0:
            print(f"[train_step] round {r + 1}/{rounds}: median so far " +
                  ", ".join(f"{n} {B / statistics.median(times[n]):.1f} img/s" for n in names), flush=True)

    t = {n: statistics.median(v) for n, v in times.items()}
    ips = {n: B / t[n] for n in names}
    ideal_ce = (t["ce"] + t["teacher_fwd"]) / t["ce"]
    res = {
        "benchmark": "train_step",
        "command": "python benchmarks/train_step.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "amp": bool(args.amp),
        "student": args.student, "teacher": args.teacher, "batch_size": B,
        "data": data, "k_penult": args.k_penult, "k_inter": args.k_inter, "topk": args.topk,
        "steps": args.steps, "repeats": args.repeats, "warmup": args.warmup, "rounds": args.steps * args.repeats,
        "store": info,
        "sources": {n: c.get("source") for n, c in configs.items()},
        "seconds_per_step_median": t,
        "seconds_per_step_all": times,
        "images_per_second": ips,
        "ratios": {
            "cached_catkd_over_ce": ips["cached_catkd"] / ips["ce"],
            "cached_letkd2_over_ce": ips["cached_letkd2"] / ips["ce"],
            "online_over_cached_catkd": t["online_catkd"] / t["cached_catkd"],
            "online_over_cached_letkd2": t["online_letkd2"] / t["cached_letkd2"],
            "ideal_speedup_ce_based": ideal_ce,
            "speedup_fraction_of_ideal_catkd": (t["online_catkd"] / t["cached_catkd"]) / ideal_ce,
            "speedup_fraction_of_ideal_letkd2_ce_based": (t["online_letkd2"] / t["cached_letkd2"]) / ideal_ce,
            "ideal_speedup_letkd2_own": (t["cached_letkd2"] + t["teacher_fwd"]) / t["cached_letkd2"],
            "speedup_fraction_of_ideal_letkd2_own":
                (t["online_letkd2"] / t["cached_letkd2"]) / ((t["cached_letkd2"] + t["teacher_fwd"]) / t["cached_letkd2"]),
        },
        "bars": {"cached_catkd_over_ce >= 0.9": None, "speedup_fraction_of_ideal_catkd >= 0.9": None},
    }
    res["bars"]["cached_catkd_over_ce >= 0.9"] = res["ratios"]["cached_catkd_over_ce"] >= 0.9
    res["bars"]["speedup_fraction_of_ideal_catkd >= 0.9"] = res["ratios"]["speedup_fraction_of_ideal_catkd"] >= 0.9
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({"images_per_second": ips, "ratios": res["ratios"], "bars": res["bars"]}, indent=2))
    print(f"[train_step] wrote {out}")
    return res


if __name__ == "__main__":
    main()

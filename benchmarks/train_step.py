"""Images/s of one student training step, every target path in one run: CE only; cached CAT-KD
and letKD-2 with targets on the device, in host memory and streamed from the store; online
CAT-KD and letKD-2; the teacher's forward alone (DESIGN.md "Stage two data path").

    python benchmarks/train_step.py [--device cpu|cuda] [--amp] [--out bench-out/train_step.json]

The store is made with the real stages on synthetic CIFAR-100-shaped data
(``synthetic:n=N,classes=100,size=32``): ``extract_teacher`` with every one of the 162 views
(the default store), CAMs pooled to 2x2, identity-view features; ``cluster`` (letKD target
set, K_penult 4096, K_inter 8). The teacher has random weights (timing does not depend on
them); ``--teacher resnet8x4`` (default) has resnet32x4's output shapes (100 classes,
256 x 8 x 8 maps, so the same target sizes) at about a sixth of its cost, which keeps the
162-view teacher pass within minutes on a CPU; the online configurations run that teacher.

Every step is ``kdpipe.engine.loop.train_step``, the code ``train-student`` runs, on batches of
an epoch plan drawn by the configuration's own target source: images gathered from
device-resident uint8, crop/flip on the device, normalise, targets, forward, loss, backward,
SGD step. Targets: ``device`` and ``host`` load every view once; ``stream`` reads the store's
blocks in the plan's block order on a background thread while the steps run (the budget is
set below the targets' size, so ``--resident auto`` would choose it).

Configurations are interleaved by epochs: each round runs one whole epoch of every
configuration (``--num-samples / --batch-size`` steps), in an order rotated every round; the
first step of each epoch is untimed for every configuration alike (the stream's reader start
is reported separately as ``stream_first_step_seconds``); the median step time over all
rounds is reported. Ratios (all from this one run):

- ``stream_over_device_catkd`` / ``_letkd2``: img/s streamed / img/s on the device (bar >= 0.9);
- ``cached_catkd_over_ce`` = img/s(cached CAT-KD) / img/s(CE): bar >= 0.9;
- ``speedup_fraction_of_ideal_catkd``: (t_online / t_cached) / ((t_CE + t_teacher) / t_CE).
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
    p.add_argument("--teacher", default="resnet8x4")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-samples", type=int, default=512, help="synthetic train images in the store")
    p.add_argument("--views", default="all", help="stored views per image (default: every view)")
    p.add_argument("--k-penult", type=int, default=4096, help="letKD penultimate K-means centres (reference 4096)")
    p.add_argument("--k-inter", type=int, default=8, help="letKD sub-classes per class (reference 8)")
    p.add_argument("--topk", type=int, default=16, help="the most penultimate probabilities stored")
    p.add_argument("--rounds", type=int, default=4, help="epochs per configuration (median over their steps)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--workdir", default="bench-out/train_step", help="teacher checkpoint and store")
    p.add_argument("--out", default="bench-out/train_step.json")
    return p.parse_args(argv)


def make_store(args, workdir: Path, data: str, num_classes: int) -> dict:
    from common import calibrated_teacher

    from kdpipe.artifacts import open_store
    from kdpipe.config.configs import ClusterConfig, ExtractConfig
    from kdpipe.data import load_dataset
    from kdpipe.models import build
    from kdpipe.stages.cluster import cluster
    from kdpipe.stages.extract import extract_teacher

    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = workdir / f"{args.teacher}_random.pth"
    store = workdir / f"{args.teacher}-synthetic{args.num_samples}-v{args.views}-k{args.k_penult}.zarr"
    t0 = time.perf_counter()
    if not ckpt.is_file():
        teacher = calibrated_teacher(build(args.teacher, num_classes), load_dataset(data, "train"))
        torch.save({"model": teacher.state_dict()}, ckpt)
    try:
        ok = "default" in open_store(store).target_sets()
    except Exception:  # noqa: BLE001 - any problem: rebuild it
        ok = False
    if not ok:
        extract_teacher(
            ExtractConfig(
                teacher=str(ckpt),
                arch=args.teacher,
                data=data,
                out=str(store),
                views=args.views,
                cam_res=(2,),
                executor="inline",
                overwrite=True,
                device=args.device,
            ),
            progress=True,
            verbose=False,
        )
        cluster(
            ClusterConfig(
                store=str(store),
                k_penult=args.k_penult,
                k_inter=args.k_inter,
                topk=args.topk,
                executor="inline",
                overwrite=True,
                device=args.device,
            ),
            progress=True,
            verbose=False,
        )
    return {"checkpoint": str(ckpt), "store": str(store), "made_now": not ok, "seconds": time.perf_counter() - t0}


def build_configs(args, reader, info, ds, dev):
    """name -> {model, opt, scaler, source, loss_fn} (or the teacher for ``teacher_fwd``)."""
    from kdpipe.engine.device import make_grad_scaler
    from kdpipe.engine.parallel import Forward
    from kdpipe.engine.schedule import make_optimizer
    from kdpipe.engine.sources import CachedTargets, NoTargets, OnlineTargets
    from kdpipe.models import build, load_teacher
    from kdpipe.stages.train import build_method, student_loss_fn

    teacher_arch = reader.manifest.teacher.arch
    ts = reader.target_set("default")
    teacher = load_teacher(teacher_arch, info["checkpoint"], ds.num_classes).to(dev).eval()
    configs = {}

    def add(name, method, source_kind, tier=None):
        m = build_method(method, {}, teacher_arch, args.student)
        torch.manual_seed(0)
        model = m.prepare_student(build(args.student, num_classes=ds.num_classes), ts).to(dev)
        if source_kind == "none":
            source = NoTargets(ds.policy)
        elif source_kind == "online":
            source = OnlineTargets(
                teacher, m.kinds(), reader=reader, target_set="default", device=dev, policy=ds.policy
            )
        else:
            nbytes = None
            if tier == "stream":  # a budget below the targets' size: what auto would stream
                probe = CachedTargets(reader, m.kinds(), "default", device=dev, policy=ds.policy, resident="stream")
                nbytes = probe.resident_bytes
            source = CachedTargets(
                reader,
                m.kinds(),
                "default",
                device=dev,
                policy=ds.policy,
                resident="auto" if tier == "stream" else tier,
                budget=None if nbytes is None else nbytes // 2,
            )
            assert source.tier == tier, (name, source.tier)
        opt = make_optimizer(model, 0.01, 0.9, 5e-4, nesterov=m.recipe(args.student).get("nesterov", False))
        configs[name] = {
            "model": model,
            "net": Forward(model),
            "opt": opt,
            "scaler": make_grad_scaler(dev, args.amp),
            "source": source,
            "loss_fn": student_loss_fn(model, m),
            "tier": getattr(source, "tier", None),
            "target_bytes": getattr(source, "resident_bytes", 0),
        }

    add("ce", "ce", "none")
    for method, short in (("cat_kd", "catkd"), ("letkd2", "letkd2")):
        add(f"cached_{short}_device", method, "cached", "device")
        add(f"cached_{short}_host", method, "cached", "host")
        add(f"cached_{short}_stream", method, "cached", "stream")
        add(f"online_{short}", method, "online")
    configs["teacher_fwd"] = {"teacher": teacher}
    return configs


def run_epoch(cfg, train, ds, dev, args, seed, sync) -> tuple[list, float]:
    """One epoch of a configuration: (seconds of steps 2.., seconds of step 1). A step's time
    runs from the end of the previous step, so the batch's image gather and augmentation and
    any wait for streamed targets count."""
    from kdpipe.data import normalize
    from kdpipe.engine.device import autocast
    from kdpipe.engine.loop import train_step
    from kdpipe.engine.sources import NoTargets

    source = cfg.get("source") or NoTargets(ds.policy)
    plan = source.plan(train.sample_indices, seed, 0)
    times = []
    sync()
    t0 = time.perf_counter()
    source.begin_epoch(plan, args.batch_size)
    for batch, imgs in train.batches(plan, args.batch_size, ds.policy):
        if "teacher" in cfg:
            with torch.no_grad(), autocast(dev, args.amp):
                cfg["teacher"].forward_features(normalize(imgs, train.mean, train.std))
        else:
            train_step(cfg["net"], cfg["loss_fn"], source, cfg["opt"], cfg["scaler"], train, batch, imgs, args.amp)
        sync()
        t1 = time.perf_counter()
        times.append(t1 - t0)
        t0 = t1
    source.close()
    return times[1:], times[0]


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from kdpipe.artifacts import open_store
    from kdpipe.data import load_dataset
    from kdpipe.engine.data import place_dataset
    from kdpipe.engine.device import resolve_device

    dev = resolve_device(args.device)
    args.device = str(dev)
    num_classes = 100
    data = f"synthetic:n={args.num_samples},classes={num_classes},size=32,seed=0"
    print(f"[train_step] device {dev}, threads {torch.get_num_threads()}, building the store ...", flush=True)
    info = make_store(args, Path(args.workdir), data, num_classes)
    reader = open_store(info["store"])
    ds = load_dataset(data, "train")
    reader.check_dataset(ds)
    train = place_dataset(ds, dev)
    configs = build_configs(args, reader, info, ds, dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    names = list(configs)
    for n in names:  # warm-up epoch: first-call allocations, lazy initialisation
        run_epoch(configs[n], train, ds, dev, args, 999, sync)
    times = {n: [] for n in names}
    first = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            steps, step1 = run_epoch(configs[n], train, ds, dev, args, r, sync)
            times[n].extend(steps)
            first[n].append(step1)
        print(
            f"[train_step] round {r + 1}/{args.rounds}: "
            + ", ".join(f"{n} {args.batch_size / statistics.median(times[n]):.1f}" for n in names)
            + " img/s",
            flush=True,
        )
    report(args, argv, dev, info, reader, configs, times, first, data)


def report(args, argv, dev, info, reader, configs, times, first, data):
    B = args.batch_size
    t = {n: statistics.median(v) for n, v in times.items()}
    ips = {n: B / t[n] for n in t}
    ideal = (t["ce"] + t["teacher_fwd"]) / t["ce"]
    ratios = {
        "stream_over_device_catkd": ips["cached_catkd_stream"] / ips["cached_catkd_device"],
        "stream_over_device_letkd2": ips["cached_letkd2_stream"] / ips["cached_letkd2_device"],
        "host_over_device_catkd": ips["cached_catkd_host"] / ips["cached_catkd_device"],
        "host_over_device_letkd2": ips["cached_letkd2_host"] / ips["cached_letkd2_device"],
        "cached_catkd_over_ce": ips["cached_catkd_device"] / ips["ce"],
        "cached_letkd2_over_ce": ips["cached_letkd2_device"] / ips["ce"],
        "online_over_cached_catkd": t["online_catkd"] / t["cached_catkd_device"],
        "online_over_cached_letkd2": t["online_letkd2"] / t["cached_letkd2_device"],
        "ideal_speedup_ce_based": ideal,
        "speedup_fraction_of_ideal_catkd": (t["online_catkd"] / t["cached_catkd_device"]) / ideal,
    }
    bars = {
        "stream_over_device_catkd >= 0.9": ratios["stream_over_device_catkd"] >= 0.9,
        "stream_over_device_letkd2 >= 0.9": ratios["stream_over_device_letkd2"] >= 0.9,
        "cached_catkd_over_ce >= 0.9": ratios["cached_catkd_over_ce"] >= 0.9,
        "speedup_fraction_of_ideal_catkd >= 0.9": ratios["speedup_fraction_of_ideal_catkd"] >= 0.9,
    }
    res = {
        "benchmark": "train_step",
        "command": "python benchmarks/train_step.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "amp": bool(args.amp),
        "student": args.student,
        "teacher": args.teacher,
        "batch_size": B,
        "data": data,
        "views": reader.num_views,
        "k_penult": args.k_penult,
        "k_inter": args.k_inter,
        "topk": reader.target_set("default").topk,
        "rounds": args.rounds,
        "store": info,
        "tiers": {n: c.get("tier") for n, c in configs.items()},
        "target_bytes": {n: c.get("target_bytes") for n, c in configs.items()},
        "seconds_per_step_median": t,
        "stream_first_step_seconds": {n: statistics.median(v) for n, v in first.items() if "stream" in n},
        "first_step_seconds_median": {n: statistics.median(v) for n, v in first.items()},
        "images_per_second": ips,
        "ratios": ratios,
        "bars": bars,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({"images_per_second": ips, "ratios": ratios, "bars": bars}, indent=2))
    print(f"[train_step] wrote {out}")
    return res


if __name__ == "__main__":
    main()

"""Stage two on the device, for benchmarks/gpu_suite.py: student steps of every method, target
tier and precision (interleaved, benchmarks/train_step.py's way), `kdpipe train-student` end to
end, concurrent trials on one GPU, Ray Train (gpu_suite_context.py says what a part is)."""

from __future__ import annotations

import csv
import glob
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from gpu_suite_context import CheckFailed, Ctx, check, pipeline


# ----------------------------------------------------------------------------- steps
def _load_training(ctx: Ctx):
    from kdpipe.artifacts import open_store
    from kdpipe.data import load_dataset
    from kdpipe.engine.data import place_dataset
    from kdpipe.models import load_teacher

    reader = open_store(ctx.made["store"])
    ds = load_dataset(ctx.data(), "train")
    reader.check_dataset(ds)
    teacher_arch = reader.manifest["teacher"]["arch"]
    teacher = load_teacher(teacher_arch, ctx.made["checkpoint"], ds.num_classes).to(ctx.dev).eval()
    return reader, ds, place_dataset(ds, ctx.dev), teacher


def step_config(ctx: Ctx, reader, ds, teacher, method: str, source: str, tier: str = "device", amp=False) -> dict:
    """One configuration of benchmarks/train_step.py's kind: the student, optimizer and target
    source train-student would build (cached with ``--resident tier``, online, or none)."""
    from kdpipe.engine.device import make_grad_scaler
    from kdpipe.engine.parallel import Forward
    from kdpipe.engine.schedule import make_optimizer
    from kdpipe.engine.sources import CachedTargets, NoTargets, OnlineTargets
    from kdpipe.models import build
    from kdpipe.stages.train import build_method, student_loss_fn

    s = ctx.sizes
    m = build_method(method, {}, reader.manifest["teacher"]["arch"], s.student)
    torch.manual_seed(0)
    head = "cam" if m.name == "cat_kd" else "linear"  # kdpipe.stages.train.resolved_head's default
    ts = reader.target_set("default")
    model = build(s.student, num_classes=ds.num_classes, head=head)
    model = (m.prepare_student(model, ts) or model).to(ctx.dev)
    if source == "none":
        src = NoTargets(ds.policy)
    elif source == "online":
        src = OnlineTargets(teacher, m.kinds(), reader=reader, target_set="default", device=ctx.dev, policy=ds.policy)
    else:
        src = CachedTargets(reader, m.kinds(), "default", device=ctx.dev, policy=ds.policy, resident=tier)
        check(src.tier == tier, f"--resident {tier} gave the {src.tier} tier")
    return {
        "net": Forward(model),
        "opt": make_optimizer(model, 0.01, 0.9, 5e-4, nesterov=m.recipe(s.student).get("nesterov", False)),
        "scaler": make_grad_scaler(ctx.dev, amp),
        "source": src,
        "loss_fn": student_loss_fn(model, m),
        "amp": amp,
        "target_bytes": getattr(src, "resident_bytes", 0),
    }


def interleaved_steps(ctx: Ctx, configs: dict, train, ds) -> dict:
    """Median seconds per step of every configuration: one warm-up epoch each, then
    ``rounds`` epochs each in an order rotated every round (benchmarks/train_step.run_epoch:
    a step's time includes the image gather and augmentation and any wait for targets)."""
    from train_step import run_epoch

    names = list(configs)
    times: dict = {n: [] for n in names}

    def epoch(n, seed):
        opts = SimpleNamespace(batch_size=ctx.sizes.batch_size, amp=configs[n].get("amp", False))
        return run_epoch(configs[n], train, ds, ctx.dev, opts, seed, ctx.sync)

    for n in names:
        epoch(n, 999)
    for r in range(ctx.sizes.rounds):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            times[n].extend(epoch(n, r)[0])
    for n, v in times.items():
        check(v, f"the configuration {n} ran no timed step (too few samples for the batch size)")
    for n, c in configs.items():
        if "net" in c:
            check(
                all(torch.isfinite(p).all() for p in c["net"].parameters()),
                f"{n}: the student's weights are no longer finite after training",
            )
    return {n: statistics.median(v) for n, v in times.items()}


def _ips(ctx: Ctx, t: dict) -> dict:
    return {n: ctx.sizes.batch_size / v for n, v in t.items()}


def part_train_methods(ctx: Ctx) -> dict:
    """Cached CE / KD / DKD / CAT-KD / letKD-2 steps (targets on the device), online CAT-KD and
    KD steps, and the teacher's forward alone, interleaved (benchmarks/train_step.py's way)."""
    reader, ds, train, teacher = _load_training(ctx)
    configs = {"ce": step_config(ctx, reader, ds, teacher, "ce", "none")}
    for m in ("kd", "dkd", "cat_kd", "letkd2"):
        configs[f"cached_{m}"] = step_config(ctx, reader, ds, teacher, m, "cached")
    for m in ("cat_kd", "kd"):
        configs[f"online_{m}"] = step_config(ctx, reader, ds, teacher, m, "online")
    configs["teacher_fwd"] = {"teacher": teacher}
    t = interleaved_steps(ctx, configs, train, ds)
    ips = _ips(ctx, t)
    ideal = (t["ce"] + t["teacher_fwd"]) / t["ce"]
    fig: dict = {"images_per_second": ips, "seconds_per_step_median": t, "ideal_speedup": ideal}
    for m in ("kd", "dkd", "cat_kd", "letkd2"):
        fig[f"cached_{m}_over_ce"] = ips[f"cached_{m}"] / ips["ce"]
    for m in ("cat_kd", "kd"):
        speedup = t[f"online_{m}"] / t[f"cached_{m}"]
        fig[f"online_over_cached_{m}"] = speedup
        fig[f"speedup_fraction_of_ideal_{m}"] = speedup / ideal
    fig["bars"] = {"cached_cat_kd_over_ce >= 0.98": fig["cached_cat_kd_over_ce"] >= 0.98}
    fig["bars"]["cached_kd_over_ce >= 0.98"] = fig["cached_kd_over_ce"] >= 0.98
    return fig


def resident_tiers() -> list[str]:
    """The --resident tiers train-student offers (the shared-copy tier where this tree has it)."""
    from kdpipe.cli import cli

    param = next(p for p in cli.commands["train-student"].params if p.name == "resident")
    return [c for c in param.type.choices if c != "auto"]  # type: ignore[attr-defined]


def part_train_tiers(ctx: Ctx) -> dict:
    """Cached CAT-KD and letKD-2 steps with the targets in each tier (--resident device, host,
    stream, and the shared copy where it exists), interleaved; each tier over device."""
    reader, ds, train, teacher = _load_training(ctx)
    tiers = resident_tiers()
    configs, errors = {}, []
    for m in ("cat_kd", "letkd2"):
        configs[f"{m}_device"] = step_config(ctx, reader, ds, teacher, m, "cached", "device")
        for tier in [x for x in tiers if x != "device"]:
            try:  # one tier that cannot be built (a new one, say) leaves the others measured
                configs[f"{m}_{tier}"] = step_config(ctx, reader, ds, teacher, m, "cached", tier)
            except Exception as err:  # noqa: BLE001 - recorded as this part's error
                errors.append(f"{m} --resident {tier}: {type(err).__name__}: {str(err).strip()[:300]}")
    t = interleaved_steps(ctx, configs, train, ds)
    ips = _ips(ctx, t)
    fig: dict = {"tiers": tiers, "images_per_second": ips, "errors": errors}
    for name in configs:
        m, _, tier = name.rpartition("_")
        if tier != "device":
            fig[f"{tier}_over_device_{m}"] = ips[name] / ips[f"{m}_device"]
    if "shared" not in tiers:
        fig["note"] = "this tree has no shared-copy tier (--resident offers " + ", ".join(tiers) + "): not measured"
    return fig


def part_amp(ctx: Ctx) -> dict:
    """CE and cached CAT-KD steps with and without AMP (float16 autocast + GradScaler on CUDA,
    bfloat16 on CPU), interleaved."""
    reader, ds, train, teacher = _load_training(ctx)
    configs = {}
    for amp in (False, True):
        tag = "amp" if amp else "fp32"
        configs[f"ce_{tag}"] = step_config(ctx, reader, ds, teacher, "ce", "none", amp=amp)
        configs[f"cat_kd_{tag}"] = step_config(ctx, reader, ds, teacher, "cat_kd", "cached", amp=amp)
    t = interleaved_steps(ctx, configs, train, ds)
    ips = _ips(ctx, t)
    return {
        "images_per_second": ips,
        "amp_cached_cat_kd_over_ce": ips["cat_kd_amp"] / ips["ce_amp"],
        "amp_over_fp32_ce": ips["ce_amp"] / ips["ce_fp32"],
        "amp_over_fp32_cat_kd": ips["cat_kd_amp"] / ips["cat_kd_fp32"],
        "autocast_dtype": "float16" if ctx.cuda else "bfloat16",
    }


# ----------------------------------------------------------------------------- CLI runs
def run_cli(args: list[str]) -> str:
    """``kdpipe ARGS`` in this process (click's CliRunner); its output. A non-zero exit is a
    CheckFailed with kdpipe's own sentence."""
    from click.testing import CliRunner

    from kdpipe.cli import cli

    res = CliRunner().invoke(cli, args, catch_exceptions=True)
    if res.exit_code != 0:
        if res.exception is not None and not isinstance(res.exception, SystemExit):
            raise res.exception
        lines = [ln for ln in (res.output or "").splitlines() if ln.strip()]
        raise CheckFailed(f"kdpipe {args[0]} exited {res.exit_code}: {lines[-1] if lines else 'no output'}")
    return res.output


def steady_img_per_s(per_epoch: list[float], drop_last: bool = False) -> float | None:
    """Median img/s over the epochs after the first (warm-up); ``drop_last``: and before the
    last (concurrent trials: the first to finish leaves the others a less loaded device)."""
    inner = per_epoch[1:-1] if drop_last else per_epoch[1:]
    chosen = inner or per_epoch[1:] or per_epoch
    return statistics.median(chosen) if chosen else None


def run_summary(out: Path, drop_last: bool = False) -> dict:
    """summary.json and the per-epoch img/s of the one run directory under ``out``."""
    found = sorted(glob.glob(str(out / "*" / "summary.json")))
    check(len(found) == 1, f"expected one run directory with a summary under {out}, found {len(found)}")
    summary = json.loads(Path(found[0]).read_text())
    with open(Path(found[0]).parent / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    per_epoch = [float(r["img_per_s"]) for r in rows if r.get("img_per_s")]
    summary["steady_img_per_s"] = steady_img_per_s(per_epoch, drop_last)
    summary["device"] = json.loads((Path(found[0]).parent / "config.json").read_text()).get("device")
    return summary


def student_args(ctx: Ctx, method: str, out: Path, *extra: str, epochs: int | None = None) -> list[str]:
    s = ctx.sizes
    return [
        "train-student",
        "--store",
        ctx.made["store"],
        "--student",
        s.student,
        "--method",
        method,
        "--epochs",
        str(epochs or s.cli_epochs),
        "--batch-size",
        str(s.batch_size),
        "--device",
        str(ctx.dev),
        "--out",
        str(out),
        *extra,
    ]


def part_cli_training(ctx: Ctx) -> dict:
    """`kdpipe train-student` end to end (store, targets, epochs, evaluation, run directory):
    cached CAT-KD with each --resident tier, online CAT-KD (--online-teacher), --amp, and
    --gpus 1 (one data-parallel worker: trains in this process)."""
    runs: dict = {}
    root = ctx.work / "cli"
    for tier in resident_tiers():
        runs[f"cached_cat_kd_{tier}"] = (["--resident", tier], tier)
    runs["online_cat_kd"] = (["--online-teacher", ctx.made["checkpoint"]], None)
    runs["cached_cat_kd_amp"] = (["--amp"], None)
    runs["cached_cat_kd_gpus1"] = (["--gpus", "1"], None)
    fig: dict = {"img_per_s": {}, "target_tier": {}, "final_top1": {}, "errors": []}
    for name, (extra, tier) in runs.items():
        try:  # one failing run leaves the others checked
            s = _cli_run(ctx, name, root / name, extra, tier)
        except Exception as err:  # noqa: BLE001 - recorded as this part's error
            fig["errors"].append(f"{name}: {err if isinstance(err, CheckFailed) else repr(err)}"[:400])
            continue
        fig["img_per_s"][name] = s["steady_img_per_s"]
        fig["target_tier"][name] = s.get("target_tier")
        fig["final_top1"][name] = s["final_top1"]
    dev_ips = fig["img_per_s"].get("cached_cat_kd_device")
    fig["over_device"] = {n: v / dev_ips for n, v in fig["img_per_s"].items() if v and dev_ips}
    return fig


def _cli_run(ctx: Ctx, name: str, out: Path, extra: list[str], tier: str | None) -> dict:
    run_cli(student_args(ctx, "cat_kd", out, *extra))
    s = run_summary(out)
    check(s.get("final_top1") is not None, "the run recorded no test accuracy")
    check(s["device"] == str(ctx.dev), f"the run trained on {s['device']}, not {ctx.dev}")
    if tier is not None:
        got = s.get("target_tier")
        check(got == tier, f"--resident {tier} trained from the {got} tier")
    return s


# ----------------------------------------------------------------------------- Ray Train and sweeps
def part_ray_train(ctx: Ctx) -> dict:
    """train_student on Ray Train with one worker (--gpus 1 alone trains in this process; this is
    the path --gpus N takes, NCCL on CUDA, gloo on CPU)."""
    from kdpipe.stages.train import train_student

    ray_start = ctx.ray_up()
    s = ctx.sizes
    cfg = pipeline().StudentConfig(
        store=ctx.made["store"], student=s.student, method="cat_kd", epochs=s.cli_epochs, batch_size=s.batch_size
    )
    out = ctx.work / "ray-train"
    summary = train_student(cfg, out=str(out), device=str(ctx.dev), progress=False, plot=False, ray_train=True)
    s2 = run_summary(out)
    check(summary.get("final_top1") is not None, "the Ray Train run recorded no test accuracy")
    check(s2["device"] == str(ctx.dev), f"the Ray Train run trained on {s2['device']}, not {ctx.dev}")
    return {"img_per_s": s2["steady_img_per_s"], "final_top1": summary["final_top1"], "ray_start_s": ray_start}


def _sweep_ray(ctx: Ctx, trials: int, out: Path) -> list[dict]:
    """`kdpipe train-student --sweep seed=0..trials-1` on Ray Tune, every trial a fraction of the
    GPU (or of the CPUs); the trials' summaries."""
    s = ctx.sizes
    if ctx.cuda:
        share = ["--gpus-per-trial", str(1 / s.sweep_trials), "--cpus-per-trial", "2"]
    else:
        share = ["--cpus-per-trial", str((os.cpu_count() or 1) / s.sweep_trials)]
    seeds = ",".join(str(i) for i in range(trials))
    run_cli(student_args(ctx, "kd", out, "--sweep", f"seed={seeds}", *share, epochs=s.sweep_epochs))
    found = glob.glob(str(out / "sweep-*" / "results.csv"))
    check(len(found) == 1, f"the sweep wrote {len(found)} results.csv files under {out}")
    with open(found[0], newline="") as fh:
        rows = list(csv.DictReader(fh))
    check(len(rows) == trials and all(r.get("status") == "ok" for r in rows), f"sweep trials not all ok: {rows}")
    summaries = []
    for r in rows:
        with open(Path(r["run_dir"]) / "metrics.csv", newline="") as fh:
            per_epoch = [float(x["img_per_s"]) for x in csv.DictReader(fh) if x.get("img_per_s")]
        summaries.append({"steady_img_per_s": steady_img_per_s(per_epoch, drop_last=True)})
    return summaries


def _trial_process(args: list[str], log: str, device: str, barrier) -> None:
    """One train-student process of the no-Ray sweep: imports and CUDA start-up first, then a
    barrier, so the trials' epochs overlap (their start-up takes seconds and varies)."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)  # progress bars go to the log
    from kdpipe.cli import main

    if device.startswith("cuda"):
        torch.zeros(1, device=device)
    barrier.wait(timeout=120)  # a sibling that died before it: BrokenBarrierError, not a hang
    try:
        code = main(args)
    except SystemExit as stop:
        code = stop.code
    sys.exit(code if isinstance(code, int) else 1)


def _sweep_processes(ctx: Ctx, trials: int, out: Path) -> list[dict]:
    """Without Ray: ``trials`` train-student processes on the one device at once (what Ray
    Tune's fractional trials are, without its scheduling); their summaries."""
    import multiprocessing

    s = ctx.sizes
    threads = str(max(1, (os.cpu_count() or 1) // max(trials, 1)))
    # CUDA cannot be used in a forked child of a process that has started it; on the CPU a fork
    # saves each child the seconds of importing torch and kdpipe again
    mp = multiprocessing.get_context("spawn" if ctx.cuda else "fork")
    barrier = mp.Barrier(trials)
    out.mkdir(parents=True, exist_ok=True)
    procs = []
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = threads  # the children's torch threads: a fair share of the CPUs
    try:
        for i in range(trials):
            args = student_args(ctx, "kd", out / f"trial{i}", "--seed", str(i), epochs=s.sweep_epochs)
            proc = mp.Process(target=_trial_process, args=(args, str(out / f"trial{i}.log"), str(ctx.dev), barrier))
            proc.start()
            procs.append(proc)
        errors = []
        for i, proc in enumerate(procs):
            proc.join()
            if proc.exitcode != 0:
                lines = [ln for ln in (out / f"trial{i}.log").read_text().splitlines() if ln.strip()]
                errors.append(f"trial {i} exited {proc.exitcode}: {lines[-1] if lines else ''}")
        check(not errors, "; ".join(errors))
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old
        for proc in procs:
            if proc.is_alive():  # interrupted (the part's time limit): stop what this part started
                proc.kill()
                proc.join()
    return [run_summary(out / f"trial{i}", drop_last=True) for i in range(trials)]


def part_sweep(ctx: Ctx) -> dict:
    """A sweep of 4 trials sharing one GPU (--gpus-per-trial 0.25, Ray Tune) and one trial alone:
    total img/s of the 4 over the one's. Without Ray, the same students as concurrent
    `kdpipe train-student` processes (no Tune scheduling, same sharing of the device)."""
    s = ctx.sizes
    how = "ray-tune" if ctx.ray else "processes"
    runner = _sweep_ray if ctx.ray else _sweep_processes
    fig: dict = {"how": how}
    if ctx.ray:
        fig["ray_start_s"] = ctx.ray_up()
    else:
        fig["note"] = "Ray not importable (or --no-ray): trials run as concurrent train-student processes"
    t0 = time.perf_counter()
    one = runner(ctx, 1, ctx.work / "sweep-1")
    t1 = time.perf_counter()
    many = runner(ctx, s.sweep_trials, ctx.work / f"sweep-{s.sweep_trials}")
    t2 = time.perf_counter()
    one_ips = one[0]["steady_img_per_s"]
    total = sum(r["steady_img_per_s"] for r in many)
    fig.update(
        trials=s.sweep_trials,
        epochs=s.sweep_epochs,
        one_trial_img_per_s=one_ips,
        trial_img_per_s=[r["steady_img_per_s"] for r in many],
        total_img_per_s=total,
        total_over_one=total / one_ips,
        wall_s={"one": t1 - t0, "many": t2 - t1},
        wall_throughput_ratio=(s.sweep_trials * (t1 - t0)) / (t2 - t1),
    )
    return fig

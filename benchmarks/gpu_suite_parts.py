"""The parts of benchmarks/gpu_suite.py: each one runs one of kdpipe's CUDA code paths through
kdpipe's own stage functions, engine or CLI, checks what it produced, and returns its figures
(a dict; ratios are measured inside the part, interleaved). A failed check raises
``CheckFailed`` with one sentence; the suite records it and goes on. A part that measured
some figures but not all returns them with ``errors`` (sentences): recorded as failed, figures
kept. ``note`` in the figures becomes the part's note.

kdpipe is reached through its stable names (kdpipe.stages.*, kdpipe.engine.*, kdpipe.models,
kdpipe.artifacts.open_store, the ``kdpipe`` click group); the configuration dataclasses and Ray's
context manager, which are moving out of kdpipe.pipeline, are imported in ``pipeline()`` only.
"""

from __future__ import annotations

import csv
import glob
import importlib.util
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from common import calibrated_teacher

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent


class CheckFailed(Exception):
    """A part ran but what it produced is wrong (one sentence)."""


def check(ok, sentence: str) -> None:
    if not ok:
        raise CheckFailed(sentence)


def pipeline() -> SimpleNamespace:
    """The one place this suite imports kdpipe.pipeline.* (configs and Ray's context manager are
    moving to kdpipe.config / kdpipe.distributed; the newer module is tried first)."""
    try:
        from kdpipe.config.configs import ClusterConfig, ExtractConfig, StudentConfig  # type: ignore
    except ImportError:
        from kdpipe.pipeline.configs import ClusterConfig, ExtractConfig, StudentConfig
    try:
        from kdpipe.distributed.executor import ray_cluster  # type: ignore
    except ImportError:
        from kdpipe.pipeline.executor import ray_cluster
    return SimpleNamespace(
        ExtractConfig=ExtractConfig, ClusterConfig=ClusterConfig, StudentConfig=StudentConfig, ray_cluster=ray_cluster
    )


# ----------------------------------------------------------------------------- sizes and context
@dataclass(frozen=True)
class Sizes:
    """How big every part is. ``FULL`` fits about 5 minutes of one H100 (estimates in
    gpu_suite.PARTS); ``SMOKE`` is toy size for the CPU test."""

    classes: int = 100  # CIFAR-100-shaped: synthetic 32x32 images of 100 classes
    samples: int = 2048  # training store: train images (the synthetic test split: samples // 4)
    views: str = "all"  # stored views per image: every one of the 162 (the default store)
    teacher: str = "resnet32x4"  # CAT-KD's and letKD's CIFAR-100 teacher, random weights
    student: str = "resnet8x4"
    batch_size: int = 64  # the student batch of mdistiller's CIFAR-100 configs (kdpipe's recipe default)
    extract_batch: int = 256  # kdpipe extract-teacher's --batch-size default (ExtractConfig)
    calib_batches: int = 4  # BN calibration batches of the random teacher (benchmarks/common.py)
    k_penult: int = 4096  # letKD's reference K (kdpipe cluster's default, ClusterConfig)
    k_inter: int = 8  # likewise
    rounds: int = 5  # interleaved epochs per train-step configuration (median over their steps)
    cli_epochs: int = 2  # epochs of each train-student CLI run
    ray_samples: int = 512  # extraction with Ray actors (its own small store)
    kmeans_n: int = 3_200_000  # letKD's CIFAR-100 fit: 50,000 images x 8x8 locations
    kmeans_d: int = 256
    kmeans_k: int = 4096
    kmeans_niter: int = 20  # letKD's run_kmeans (ClusterConfig.niter)
    sweep_trials: int = 4
    sweep_epochs: int = 20  # an epoch of 2,048 images is a fraction of a second on a GPU
    bare_images: int = 65536  # images of each bare-inference run (the first of the store's rows)


FULL = Sizes()
SMOKE = Sizes(
    classes=10,
    samples=64,
    views="2",
    teacher="resnet8",
    student="resnet8",
    batch_size=16,
    extract_batch=64,
    calib_batches=1,
    k_penult=16,
    k_inter=2,
    rounds=1,
    cli_epochs=1,
    ray_samples=32,
    kmeans_n=4096,
    kmeans_d=16,
    kmeans_k=32,
    kmeans_niter=4,
    sweep_trials=2,  # the same code as 4; each trial is a process start-up on the CPU
    sweep_epochs=2,
)


@dataclass
class Ctx:
    """What the parts share: the device, sizes, work folder, and what earlier parts made."""

    dev: torch.device
    sizes: Sizes
    work: Path
    smoke: bool
    ray: bool  # Ray importable and not switched off
    made: dict = field(default_factory=dict)  # checkpoint, store, bare img/s, ...
    _ray_stack: object = None

    @property
    def cuda(self) -> bool:
        return self.dev.type == "cuda"

    def data(self, samples: int | None = None) -> str:
        n = samples or self.sizes.samples
        return f"synthetic:n={n},classes={self.sizes.classes},size=32,seed=0"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.dev)

    def ray_up(self) -> float:
        """Start (once) the loopback-only local Ray every Ray part shares; seconds it took."""
        if self._ray_stack is not None:
            return 0.0
        import contextlib

        t0 = time.perf_counter()
        stack = contextlib.ExitStack()
        stack.enter_context(pipeline().ray_cluster())
        self._ray_stack = stack
        return time.perf_counter() - t0

    def close(self) -> None:
        if self._ray_stack is not None:
            self._ray_stack.close()  # type: ignore[attr-defined]
            self._ray_stack = None


def ray_importable() -> bool:
    try:
        return importlib.util.find_spec("ray") is not None
    except (ImportError, ValueError):  # a broken or blocked install
        return False


# ----------------------------------------------------------------------------- shared helpers
def teacher_checkpoint(ctx: Ctx, arch: str, data: str) -> str:
    """A random teacher with BN statistics calibrated on the data (activations of a trained
    network's scale, benchmarks/common.py), saved as kdpipe reads checkpoints."""
    from kdpipe.data import load_dataset
    from kdpipe.models import build

    path = ctx.work / f"teacher_{arch}.pth"
    if not path.is_file():
        torch.manual_seed(0)
        model = build(arch, ctx.sizes.classes)
        calibrated_teacher(model, load_dataset(data, "train"), 128, ctx.sizes.calib_batches)
        torch.save({"model": model.state_dict()}, path)
    return str(path)


def bare_img_per_s(ctx: Ctx, model, dataset, table: np.ndarray, batch_size: int) -> float:
    """Bare teacher inference over the same images and views as extraction (the first
    ``bare_images`` of them: throughput needs seconds, not the whole store): the teacher pass's
    data path (kdpipe.pipeline.teacher_pass: host gather, uint8 to the device, view applied and
    normalised there) and the forward pass, nothing computed from the outputs, nothing written."""
    from kdpipe.data import normalize

    n, v = table.shape[:2]
    total = min(n * v, ctx.sizes.bare_images)
    flat = torch.from_numpy(np.ascontiguousarray(table.reshape(n * v, -1)[:total]))
    sample_of = np.arange(total) // v
    ctx.sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, total, batch_size):
            rows = slice(s, min(s + batch_size, total))
            x = dataset.get_batch(sample_of[rows]).to(ctx.dev, non_blocking=True)
            x = dataset.policy.apply_images(x, flat[rows].to(ctx.dev))
            model(normalize(x, dataset.mean, dataset.std))
    ctx.sync()
    return total / (time.perf_counter() - t0)


def bracketed_extraction(ctx: Ctx, samples: int, out: str, made: dict | None = None, **extract_kw) -> dict:
    """Bare inference, then extract_teacher, then bare again, on the same images and views:
    the ratio pairs the extraction with the mean of the two bare runs around it."""
    from kdpipe.artifacts import open_store
    from kdpipe.data import load_dataset
    from kdpipe.models import load_teacher
    from kdpipe.stages.extract import extract_teacher
    from kdpipe.views import resolve_views, view_table

    s = ctx.sizes
    data = ctx.data(samples)
    ckpt = teacher_checkpoint(ctx, s.teacher, data)
    dataset = load_dataset(data, "train")
    table = view_table(dataset.policy, len(dataset), resolve_views(dataset.policy, s.views), seed=0)
    model = load_teacher(s.teacher, ckpt, s.classes).to(ctx.dev).eval()
    warm = table[: 2 * s.extract_batch // table.shape[1] + 1]  # two full batches: CUDA and cuDNN start-up
    bare_img_per_s(ctx, model, dataset, warm, s.extract_batch)
    bare = [bare_img_per_s(ctx, model, dataset, table, s.extract_batch)]
    cfg = pipeline().ExtractConfig(
        teacher=ckpt,
        arch=s.teacher,
        data=data,
        out=out,
        views=s.views,
        cam_res=(2,),
        batch_size=s.extract_batch,
        device=str(ctx.dev),
        overwrite=True,
        **extract_kw,
    )
    res = extract_teacher(cfg, progress=False, verbose=False)
    if made is not None:  # the store is there: later parts can use it even if a check below fails
        made.update(store=out, checkpoint=ckpt)
    bare.append(bare_img_per_s(ctx, model, dataset, table, s.extract_batch))
    reader = open_store(out)
    logits = np.asarray(reader.array("logits")[: min(samples, 64)], dtype=np.float32)
    check(reader.num_views == table.shape[1], f"the store holds {reader.num_views} views, not {table.shape[1]}")
    check(np.isfinite(logits).all(), "the stored logits hold NaN or infinite values")
    check(logits.shape[-1] == s.classes, f"the stored logits have {logits.shape[-1]} classes, not {s.classes}")
    bare_mean = sum(bare) / len(bare)
    return {
        "images": int(table.shape[0] * table.shape[1]),
        "views": int(table.shape[1]),
        "teacher": s.teacher,
        "executor": res.get("executor"),
        "extract_img_per_s": res.get("img_per_s"),
        "extract_busy_img_per_s": res.get("busy_img_per_s"),
        "bare_img_per_s_runs": [round(b, 1) for b in bare],
        "extract_over_bare": res["img_per_s"] / bare_mean,
        "extract_busy_over_bare": (res["busy_img_per_s"] or 0) / bare_mean,
        "wall_s": res.get("wall_s"),
        "bytes_stored": res.get("bytes_stored"),
        "checkpoint": ckpt,
        "bare_img_per_s": bare_mean,
    }


# ----------------------------------------------------------------------------- stage one
def part_extract(ctx: Ctx) -> dict:
    """The training store: extract_teacher (inline executor, on the device) with every view,
    CAMs pooled to 2x2, identity-view features; bare teacher inference before and after."""
    store = str(ctx.work / "store.zarr")
    fig = bracketed_extraction(ctx, ctx.sizes.samples, store, made=ctx.made, executor="inline")
    fig.pop("checkpoint")
    ctx.made["bare_img_per_s"] = fig["bare_img_per_s"]
    fig["bar_extract_over_bare"] = 0.95
    return fig


def part_cluster(ctx: Ctx) -> dict:
    """kdpipe cluster (inline executor): LDA + K-means fit (backend auto: faiss-gpu, else torch
    on the GPU) and the assignment pass (the teacher over every stored view)."""
    from kdpipe.artifacts import open_store
    from kdpipe.stages.cluster import cluster

    s = ctx.sizes
    summary = cluster(
        pipeline().ClusterConfig(
            store=ctx.made["store"],
            k_penult=s.k_penult,
            k_inter=s.k_inter,
            batch_size=s.extract_batch,
            executor="inline",
            device=str(ctx.dev),
            overwrite=True,
        ),
        progress=False,
        verbose=False,
    )
    ts = open_store(ctx.made["store"]).target_set("default")
    check(ts.k_penult == s.k_penult, f"the target set has K_penult {ts.k_penult}, not {s.k_penult}")
    ctx.made["targets"] = "default"
    check(np.isfinite(summary["retained_mass_mean"]), "the assignment pass recorded no retained top-k mass")
    assign = summary["assign"]
    bare = ctx.made.get("bare_img_per_s")
    return {
        "kmeans_backend": (ts.extra or {}).get("kmeans_backend"),
        "seconds": summary["seconds"],
        "assign_img_per_s": assign["img_per_s"],
        "assign_busy_img_per_s": assign["busy_img_per_s"],
        "assign_images": assign["images_processed"],
        "assign_over_bare": assign["img_per_s"] / bare if bare else None,
        "topk": summary["topk"],
        "retained_mass_min": summary["retained_mass_min"],
    }


# ----------------------------------------------------------------------------- stage two: steps
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


# ----------------------------------------------------------------------------- stage two: CLI runs
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


# ----------------------------------------------------------------------------- K-means
def kmeans_data(ctx: Ctx, n: int, d: int, k: int, seed: int = 0) -> np.ndarray:
    """benchmarks/kmeans.py's data (vectors around 4k Gaussian blobs, scale 3, unit noise),
    drawn on the device: numpy would take most of a minute for 3.2M x 256."""
    g = torch.Generator(device=ctx.dev).manual_seed(seed)
    means = torch.randn(4 * k, d, generator=g, device=ctx.dev) * 3
    which = torch.randint(0, 4 * k, (n,), generator=g, device=ctx.dev)
    x = means[which] + torch.randn(n, d, generator=g, device=ctx.dev)
    return x.cpu().numpy()


def part_kmeans(ctx: Ctx) -> dict:
    """K-means with letKD's CIFAR-100 shape (4,096 centres, 3.2M x 256 vectors, 20 iterations):
    torch on the device, and faiss (GPU on CUDA, CPU otherwise) where it imports; same data and
    initial centres for both (benchmarks/kmeans.fit)."""
    from kmeans import fit

    from kdpipe.methods.clustering import faiss_gpu_available, faiss_installed

    s = ctx.sizes
    t0 = time.perf_counter()
    x = kmeans_data(ctx, s.kmeans_n, s.kmeans_d, s.kmeans_k)
    data_s = time.perf_counter() - t0
    labels = ["torch-cuda" if ctx.cuda else "torch-cpu"]
    if ctx.cuda:
        faiss_note = "faiss-gpu ran" if faiss_gpu_available() else "faiss-gpu not importable with GPUs here: not run"
        if faiss_gpu_available():
            labels.append("faiss-gpu")
    else:
        faiss_note = "faiss-cpu ran" if faiss_installed() else "faiss not installed: not run"
        if faiss_installed():
            labels.append("faiss-cpu")
    warm = kmeans_data(ctx, 4096, 8, 16, seed=1)
    for label in labels:
        fit(warm, 16, 2, 0, label)  # CUDA context, faiss GPU resources
    res = {label: fit(x, s.kmeans_k, s.kmeans_niter, 0, label) for label in labels}
    for label, r in res.items():
        check(np.isfinite(r["objective_sum"]), f"{label}: the K-means objective is not finite")
    first = res[labels[0]]
    fig: dict = {
        "shape": [s.kmeans_n, s.kmeans_d],
        "k": s.kmeans_k,
        "niter": s.kmeans_niter,
        "ran": labels,
        "note": faiss_note,
        "data_seconds": data_s,
        "seconds": {label: r["seconds"] for label, r in res.items()},
        "objective_sum": {label: r["objective_sum"] for label, r in res.items()},
    }
    if len(labels) > 1:
        fig["objective_ratio_faiss_over_torch"] = res[labels[1]]["objective_sum"] / first["objective_sum"]
    fig["bars"] = {"torch K-means under 10 s": first["seconds"] < 10.0}
    return fig


# ----------------------------------------------------------------------------- Ray parts
def part_extract_ray(ctx: Ctx) -> dict:
    """extract_teacher with Ray actors on the device (one per GPU), its own smaller store,
    bare inference before and after."""
    ray_start = ctx.ray_up()
    n = ctx.sizes.ray_samples
    fig = bracketed_extraction(ctx, n, str(ctx.work / "store-ray.zarr"), executor="ray")
    fig.pop("checkpoint")
    fig["ray_start_s"] = ray_start
    fig["bar_extract_over_bare"] = 0.95
    return fig


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

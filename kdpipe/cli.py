"""The `kdpipe` command: one thin command per stage. Parse, call a stage function, report.

Logic lives in kdpipe/stages/. A KdpipeError becomes one sentence on stderr and exit code 2.
"""

from __future__ import annotations

import json
import sys

import click

from kdpipe.cli_method_options import MethodOptionsCommand, method_options_given
from kdpipe.errors import KdpipeError
from kdpipe.recipes import CIFAR
from kdpipe.runs.report import format_summary
from kdpipe.version import __version__


class _Group(click.Group):
    """Turns user-facing errors into one sentence and exit status 2: kdpipe's own, and the
    file system's (a read-only folder, a full disk, a file where a folder should be)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KdpipeError as err:
            _abandon_pending_io()
            click.echo(f"kdpipe: error: {err}", err=True)
            ctx.exit(2)
        except OSError as err:
            _abandon_pending_io()
            click.echo(f"kdpipe: error: {os_error_sentence(err)}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            # one line instead of a traceback and Ray's own notes (kdpipe --verbose shows those)
            click.echo(
                "kdpipe: interrupted; what finished is kept (shards, epochs, trials): the same command "
                "with --resume continues it.",
                err=True,
            )
            ctx.exit(130)


def _abandon_pending_io() -> None:
    """After a clear error the process exits with zarr / fsspec reads or writes still queued on
    their event loop (the siblings of the one that failed); asyncio would log each of them as
    "Task was destroyed but it is pending!" at exit. They are abandoned on purpose: the store
    and run directory resume from what was finished, so the one sentence stays the only line."""
    import logging

    logging.getLogger("asyncio").setLevel(logging.CRITICAL + 1)


def os_error_sentence(err: OSError) -> str:
    """One sentence for a file-system error: what failed, where, and that nothing finished
    was lost (run directories and stores are written atomically and resume)."""
    reason = err.strerror or str(err) or type(err).__name__
    where = f" ({err.filename})" if getattr(err, "filename", None) else ""
    return (
        f"A file could not be written or read{where}: {reason}; fix that (free space, a writable "
        "folder) and run again, with --resume where the command has it."
    )


def _probe_ray_address(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--ray-address: a cluster that cannot be reached is one sentence now, not after the
    stage's preparations and minutes of Ray's connection retries."""
    if value:
        from kdpipe.distributed.executor import check_ray_address

        check_ray_address(value)
    return value


def _checkpoint(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A checkpoint option: a .pth file, or a kdpipe run directory (its teacher or best checkpoint)."""
    from kdpipe.runs.paths import checkpoint_in

    return checkpoint_in(value)


def given_options(ctx: click.Context, names) -> dict:
    """The options among ``names`` the user typed (not click defaults): what --resume compares."""
    from click.core import ParameterSource

    return {
        n: ctx.params[n]
        for n in names
        if ctx.get_parameter_source(n) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    }


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kdpipe")
@click.option("--verbose", is_flag=True, help="Also show Ray's and Tune's own log messages (hidden by default).")
def cli(verbose):
    """Knowledge distillation in two stages: one teacher pass into a Zarr store
    (extract-teacher, cluster), then any number of teacher-free student runs (train-student)."""
    if verbose:
        import os

        os.environ["KDPIPE_VERBOSE"] = "1"  # kdpipe.distributed.executor.VERBOSE_ENV, read where Ray starts


_WANDB_HELP = (
    "Also log every epoch to this Weights & Biases project (needs wandb; WANDB_MODE=offline "
    "keeps it on disk). TensorBoard event files are always written to <run>/tensorboard."
)


def _training_workers_options(command):
    """--gpus, --sync-bn and --workers, shared by train-teacher and train-student."""
    options = [
        click.option(
            "--gpus",
            "data_parallel",
            default=1,
            show_default=True,
            type=int,
            help="Data-parallel workers on Ray Train (one per GPU; CPU workers with gloo where there is no GPU).",
        ),
        click.option("--sync-bn", is_flag=True, help="With --gpus: BatchNorm statistics over all workers (CUDA)."),
        click.option(
            "--workers",
            "loader_workers",
            default=None,
            type=click.IntRange(min=0),
            help="DataLoader workers decoding images of folder data sets (default: CPUs - 1, at most 8).",
        ),
    ]
    for option in reversed(options):  # decorators apply bottom-up: keep --gpus first in --help
        command = option(command)
    return command


#: train-teacher parameters that are TeacherConfig fields as they are.
TEACHER_FIELD_PARAMS = ("arch", "data", "epochs", "lr", "batch_size", "seed", "amp", "data_parallel", "sync_bn")


@cli.command("train-teacher")
@click.option("--arch", default=None, help="Model name as in mdistiller (resnet8, resnet32x4, wrn_40_2, ...).")
@click.option(
    "--data",
    default="digits",
    show_default=True,
    help="Data set spec: digits, cifar100:/path, cifar10:/path, imagefolder:/path, synthetic[:n=..].",
)
@click.option(
    "--epochs",
    default=CIFAR.epochs,
    show_default=True,
    type=int,
    help=f"Epochs; the lr steps ({'/'.join(map(str, CIFAR.milestones))} of {CIFAR.epochs}) scale with it.",
)
@click.option(
    "--lr",
    default=CIFAR.lr,
    show_default=True,
    type=float,
    help=f"Initial learning rate (SGD, momentum {CIFAR.momentum:g}, wd {CIFAR.weight_decay:g}).",
)
@click.option("--batch-size", default=64, show_default=True, type=int)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
@click.option("--amp", is_flag=True, help="Mixed precision (torch.autocast; float16 on CUDA).")
@click.option(
    "--out",
    default="runs",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Parent folder of the run directory (a local path or a URL: s3://bucket/runs).",
)
@_training_workers_options
@click.option(
    "--ray-address",
    default=None,
    callback=_probe_ray_address,
    help="With --gpus: join this Ray cluster instead of a local one.",
)
@click.option(
    "--resume",
    default=None,
    metavar="RUN",
    help="Continue an interrupted teacher run directory (a path or URL) from its last epoch (its config is reused).",
)
@click.option("--wandb", default=None, metavar="PROJECT", help=_WANDB_HELP)
@click.pass_context
def train_teacher(ctx, **opts):
    """Train a teacher with cross-entropy (reference recipe) into a run directory."""
    from kdpipe.config.configs import TeacherConfig
    from kdpipe.stages.teacher import train_teacher as run_stage

    runtime = {k: opts[k] for k in ("device", "ray_address", "loader_workers", "wandb")}
    if opts["resume"]:
        s = run_stage(resume=opts["resume"], given=given_options(ctx, TEACHER_FIELD_PARAMS), **runtime)
    else:
        if not opts["arch"]:
            raise KdpipeError("train-teacher needs --arch (or --resume RUN).")
        cfg = TeacherConfig(**{k: opts[k] for k in TEACHER_FIELD_PARAMS})
        s = run_stage(cfg, out=opts["out"], **runtime)
    summary = {
        "test top-1 (%)": s["top1"],
        "test top-5 (%)": s["top5"],
        "best top-1 (%)": s["best_top1"],
        "epochs": s["epochs"],
        "wall time (s)": s["wall_seconds"],
        "img/s (train)": s["img_per_s"],
        "checkpoint": s["checkpoint"],
        "run directory": s["run_dir"],
    }
    click.echo(format_summary("train-teacher: done", summary))


@cli.command("evaluate")
@click.option(
    "--checkpoint",
    required=True,
    help="A .pth checkpoint ({'model': state_dict} or bare), or a kdpipe run directory (a path or URL).",
)
@click.option("--arch", default=None, help="Its architecture (read from the run directory when omitted).")
@click.option("--data", default=None, help="Data set spec (read from the run directory when omitted).")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "test"]))
@click.option("--batch-size", default=256, show_default=True, type=int)
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
@click.option("--amp", is_flag=True, help="Mixed precision (torch.autocast).")
def evaluate(checkpoint, arch, data, split, batch_size, device, amp):
    """Top-1/top-5 of a checkpoint on a data set's test split."""
    from kdpipe.stages.evaluate import evaluate as run_stage

    r = run_stage(checkpoint, arch=arch, data=data, split=split, device=device, batch_size=batch_size, amp=amp)
    click.echo(
        format_summary(
            f"evaluate: {r['arch']} on {r['data']} ({r['split']}, {r['num_samples']} images)",
            {"top-1 (%)": r["top1"], "top-5 (%)": r["top5"], "loss (CE)": r["loss"], "checkpoint": r["checkpoint"]},
        )
    )


@cli.command("extract-teacher")
@click.option(
    "--teacher",
    required=True,
    type=click.Path(),
    callback=_checkpoint,
    help="Teacher checkpoint ({'model': sd} or a state dict; a local path or a URL: s3://bucket/t.pth) "
    "or a train-teacher run directory.",
)
@click.option("--arch", required=True, help="Teacher architecture (mdistiller name, e.g. resnet32x4).")
@click.option("--data", required=True, help="Data set spec, e.g. cifar100:/path/to/cifar-100-python.")
@click.option("--split", default="train", show_default=True, help="Data set split to run over.")
@click.option(
    "--out",
    required=True,
    type=click.Path(),
    help="Store path (a local path or a URL: s3://bucket/store.zarr, gs://..., file:///...).",
)
@click.option(
    "--views",
    default="auto",
    show_default=True,
    help="auto (every view of CIFAR/digits, 8 seeded views of ImageFolder), all, 1, or K seeded views.",
)
@click.option(
    "--cam-res",
    default="2",
    show_default=True,
    help="Pooled CAM sizes stored for every view, comma-separated; 'native' adds the native CAM; none.",
)
@click.option(
    "--features", default="penult,inter", show_default=True, help="Raw feature maps for cluster (penult, inter, none)."
)
@click.option(
    "--feature-views",
    type=click.Choice(["identity", "all"]),
    default="identity",
    show_default=True,
    help="Store the raw features of the identity view only (letKD's fit set) or of every view.",
)
@click.option(
    "--methods",
    default="",
    help="Also store what these methods read, comma-separated: at (attention "
    "maps), fitnet (hint features), simkd (last map and classifier).",
)
@click.option(
    "--pad-mode",
    type=click.Choice(["zero", "reflect"]),
    default=None,
    help="Crop padding of the views (default: the data set's, zero; letKD's reference uses reflect).",
)
@click.option("--shard-size", default=None, type=int, help="Samples per shard (default: about 128 MB of output).")
@click.option(
    "--batch-size",
    default=None,
    type=int,
    help="Images per teacher forward pass (default: 256; with --resume: the store's own, and no other).",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the view parameters (views=K).")
@click.option("--executor", default="ray", show_default=True, type=click.Choice(["ray", "inline"]))
@click.option(
    "--ray-address",
    default=None,
    callback=_probe_ray_address,
    help="Join this Ray cluster instead of starting a local one.",
)
@click.option("--num-workers", default=None, type=int, help="Ray actors (default: one per GPU, else per CPU).")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
@click.option("--resume", is_flag=True, help="Continue an interrupted store: skip the shards already done.")
@click.option("--overwrite", is_flag=True, help="Replace an existing store.")
def extract_teacher(
    teacher,
    arch,
    data,
    split,
    out,
    views,
    cam_res,
    features,
    feature_views,
    methods,
    pad_mode,
    shard_size,
    batch_size,
    seed,
    executor,
    ray_address,
    num_workers,
    device,
    resume,
    overwrite,
):
    """Stage one: run the teacher once over the data set into a Zarr store."""
    from kdpipe.config.configs import ExtractConfig
    from kdpipe.stages.extract import extract_teacher as run_stage
    from kdpipe.stages.extract import parse_cam_res, parse_features

    sizes, native = parse_cam_res(cam_res)
    run_stage(
        ExtractConfig(
            teacher=teacher,
            arch=arch,
            data=data,
            out=out,
            split=split,
            views=views,
            cam_res=sizes,
            native_cam=native,
            features=parse_features(features),
            feature_views=feature_views,
            methods=tuple(m.strip() for m in methods.split(",") if m.strip()),
            pad_mode=pad_mode,
            shard_size=shard_size,
            batch_size=batch_size,
            seed=seed,
            executor=executor,
            ray_address=ray_address,
            num_workers=num_workers,
            device=device,
            resume=resume,
            overwrite=overwrite,
        )
    )


#: cluster parameters that --resume compares with the interrupted pass (ClusterConfig fields).
CLUSTER_FIT_PARAMS = (
    "k_penult", "k_inter", "lda_dims", "topk", "topk_mass", "temperature", "student_grid", "max_fit_points",
    "fit_views", "seed", "niter", "kmeans_backend", "batch_size",
)  # fmt: skip


@cli.command("cluster")
@click.argument("store", type=click.Path())
@click.option("--name", default="default", show_default=True, help="Target set name (targets/<name>/).")
@click.option("--k-penult", default=4096, show_default=True, type=int, help="K-means centres, penultimate layer.")
@click.option("--k-inter", default=8, show_default=True, type=int, help="Sub-classes per class, intermediate layer.")
@click.option("--lda-dims", default=None, type=int, help="LDA dimensions d (default: the reference's, min(60, C-1)).")
@click.option(
    "--topk", default=16, show_default=True, type=int, help="The most penultimate probabilities stored per location."
)
@click.option(
    "--topk-mass",
    default=0.999,
    show_default=True,
    type=float,
    help="Store the smallest k that holds this softmax mass at every fit location (capped by --topk).",
)
@click.option("--temperature", default=1.0, show_default=True, type=float, help="T in softmax(-T * d^2).")
@click.option("--student-grid", default=None, help="HxW: average-pool teacher maps to the student's grid first.")
@click.option(
    "--max-fit-points",
    default=None,
    type=int,
    help="Fit K-means on a seeded subsample of this many vectors (default: all, as the reference).",
)
@click.option(
    "--fit-views",
    type=click.Choice(["identity", "all"]),
    default="identity",
    show_default=True,
    help="Fit on the identity view's features (the reference) or on every stored view's.",
)
@click.option(
    "--teacher",
    default=None,
    type=click.Path(),
    callback=_checkpoint,
    help="Teacher checkpoint for the assignment pass (default: the one the store records).",
)
@click.option("--data", default=None, help="Data set spec (default: the one the store records).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--niter", default=20, show_default=True, type=int, help="K-means iterations.")
@click.option(
    "--kmeans-backend",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "faiss", "torch"]),
    help="K-means by faiss or by torch; auto: faiss-gpu if faiss sees a GPU, else torch on CUDA, else faiss-cpu.",
)
@click.option("--batch-size", default=256, show_default=True, type=int, help="Images per teacher forward pass.")
@click.option("--drop-features", is_flag=True, help="Delete feat/* once the targets are written.")
@click.option("--overwrite", is_flag=True, help="Replace an existing target set of the same name.")
@click.option("--resume", is_flag=True, help="Continue an interrupted assignment pass (its fit is kept).")
@click.option("--executor", default="ray", show_default=True, type=click.Choice(["ray", "inline"]))
@click.option(
    "--ray-address", default=None, callback=_probe_ray_address, help="Join this Ray cluster instead of a local one."
)
@click.option("--num-workers", default=None, type=int, help="Ray actors (default: one per GPU, else per CPU).")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
@click.pass_context
def cluster(
    ctx,
    store,
    name,
    k_penult,
    k_inter,
    lda_dims,
    topk,
    topk_mass,
    temperature,
    student_grid,
    max_fit_points,
    fit_views,
    teacher,
    data,
    seed,
    niter,
    kmeans_backend,
    batch_size,
    drop_features,
    overwrite,
    resume,
    executor,
    ray_address,
    num_workers,
    device,
):
    """Stage one: letKD's fit (LDA, K-means, sub-class scores), then the targets of every view."""
    from kdpipe.config.configs import ClusterConfig
    from kdpipe.stages.cluster import cluster as run_stage

    run_stage(
        ClusterConfig(
            store=store,
            name=name,
            k_penult=k_penult,
            k_inter=k_inter,
            lda_dims=lda_dims,
            topk=topk,
            topk_mass=topk_mass,
            temperature=temperature,
            student_grid=student_grid,
            max_fit_points=max_fit_points,
            fit_views=fit_views,
            seed=seed,
            niter=niter,
            kmeans_backend=kmeans_backend,
            teacher=teacher,
            data=data,
            drop_features=drop_features,
            overwrite=overwrite,
            resume=resume,
            batch_size=batch_size,
            executor=executor,
            ray_address=ray_address,
            num_workers=num_workers,
            device=device,
        ),
        given=set(given_options(ctx, CLUSTER_FIT_PARAMS)),
    )


#: train-student parameters that are StudentConfig fields as they are.
STUDENT_FIELD_PARAMS = (
    "store", "targets", "student", "method", "epochs", "lr", "batch_size", "views", "resident", "seed", "amp",
    "online_teacher", "online_views", "data", "subset_fraction", "subset_seed", "data_parallel", "sync_bn", "head",
    "drop_last",
)  # fmt: skip


@cli.command("train-student", cls=MethodOptionsCommand)
@click.option("--store", default=None, type=click.Path(), help="The teacher-artifact store (extract-teacher).")
@click.option("--targets", default="default", show_default=True, help="Target set of the store (cluster --name).")
@click.option("--student", default=None, help="Student architecture (resnet8x4, ShuffleV1, ...).")
@click.option(
    "--method",
    default=None,
    help="A registered method (`kdpipe methods` lists them) or a sum of them, e.g. at+kd. "
    "Its options are the flags under 'Method options' (a flag applies to every part of a sum that takes it).",
)
@click.option(
    "--epochs",
    type=int,
    default=None,
    help=f"Epochs (default: the recipe's, {CIFAR.epochs} on CIFAR; lr steps scale with it).",
)
@click.option("--lr", type=float, default=None, help="Initial lr (default: the recipe's, 0.05 or 0.01).")
@click.option("--batch-size", type=int, default=None, help="Batch size (default: the recipe's 64).")
@click.option(
    "--views",
    type=click.Choice(["replay", "warp"]),
    default="replay",
    show_default=True,
    help="replay: a stored view per sample (exact); warp: fresh views, targets warped (1-view stores).",
)
@click.option(
    "--resident",
    type=click.Choice(["auto", "device", "host", "shared", "stream"]),
    default="auto",
    show_default=True,
    help="Where cached targets live: auto (by measured free memory), the device, "
    "host memory, the machine's one shared memory-mapped copy ($KDPIPE_SHARED_DIR), "
    "or streamed from the store.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
@click.option("--amp", is_flag=True, help="Mixed precision (torch.autocast; float16 on CUDA).")
@click.option(
    "--resume",
    default=None,
    metavar="RUN",
    help="Continue an interrupted run directory (a path or URL) from its last epoch (its config is reused), "
    "or an interrupted sweep directory (finished trials are not run again).",
)
@click.option(
    "--online-teacher",
    type=click.Path(),
    callback=_checkpoint,
    default=None,
    help="Run this teacher checkpoint live instead of reading cached targets (the references' baseline).",
)
@click.option(
    "--online-views",
    type=click.Choice(["fresh", "replay"]),
    default="fresh",
    show_default=True,
    help="Online teacher: fresh random views every epoch (the references) or the store's views.",
)
@click.option("--data", default=None, help="Data set spec (default: the one the store was made from).")
@click.option(
    "--subset-fraction", type=float, default=None, help="Train on a stratified, seeded fraction of the train split."
)
@click.option("--subset-seed", type=int, default=0, show_default=True)
@click.option(
    "--sweep",
    "sweeps",
    multiple=True,
    metavar="KEY=V1,V2",
    help="Run a grid (repeatable): e.g. --sweep beta=10,50,100 --sweep seed=0,1.",
)
@click.option(
    "--executor",
    type=click.Choice(["ray", "inline"]),
    default="ray",
    show_default=True,
    help="Sweeps: a Ray Tune grid (parallel trials), or one trial after another in this process.",
)
@click.option(
    "--gpus-per-trial",
    type=float,
    default=None,
    help="Sweeps on Ray: each trial's share of a GPU (0.25 packs four students on one GPU; "
    "default: 1 where the Ray cluster has GPUs, else 0).",
)
@click.option(
    "--cpus-per-trial",
    type=float,
    default=1.0,
    show_default=True,
    help="Sweeps on Ray: CPUs reserved for each trial (also its torch threads).",
)
@_training_workers_options
@click.option(
    "--ray-address",
    default=None,
    callback=_probe_ray_address,
    help="Sweeps and --gpus: join this Ray cluster instead of a local one.",
)
@click.option(
    "--out",
    default="runs",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Parent folder of the run (or sweep) directory (a local path or a URL: s3://bucket/runs).",
)
@click.option(
    "--head",
    type=click.Choice(["linear", "cam"]),
    default=None,
    help="Student classifier: cam (CAT-KD's bias-free 1x1 conv, the default for cat_kd) or linear.",
)
@click.option(
    "--drop-last/--keep-last",
    "drop_last",
    default=None,
    help="Drop (or keep) each epoch's last incomplete batch (default: as the method's reference: letKD drops "
    "it, mdistiller / CAT-KD keep it).",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="A kdpipe config file (configs/) or a mdistiller / CAT-KD YAML file; options given here win.",
)
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="With --config: override a value of the file.")
@click.option("--print-config", is_flag=True, help="Print the resolved run configuration as JSON and exit.")
@click.option("--wandb", default=None, metavar="PROJECT", help=_WANDB_HELP)
@click.pass_context
def train_student(ctx, **opts):
    """Stage two: train a student from the store, teacher-free.

    --store, --student and --method are required, except with --config FILE (which gives
    them) or --resume RUN (which reuses the run's configuration)."""
    from kdpipe.stages.train import train_student as run_stage

    options = method_options_given(opts)
    fields = {name: opts[name] for name in STUDENT_FIELD_PARAMS}
    fields["method_options"] = {k: v for k, v in options.items() if v is not None}
    resume, sweeps, device, ray_address = opts["resume"], opts["sweeps"], opts["device"], opts["ray_address"]
    loader_workers, out, wandb = opts["loader_workers"], opts["out"], opts["wandb"]
    config_file, sets, print_config = opts["config_file"], opts["sets"], opts["print_config"]
    executor, gpus_per_trial, cpus_per_trial = opts["executor"], opts["gpus_per_trial"], opts["cpus_per_trial"]
    sweep_options = _sweep_options(executor, ray_address, gpus_per_trial, cpus_per_trial, device)
    if resume is not None:
        given = given_options(ctx, [k for k in fields if k != "method_options"])
        if any(v is not None for v in options.values()):
            given["method_options"] = fields["method_options"]
        if _resume_sweep(resume, sweeps, given, sweep_options):
            return
        s = run_stage(
            resume=resume,
            given=given,
            device=device,
            ray_address=ray_address,
            loader_workers=loader_workers,
            wandb=wandb,
        )
    else:
        cfg, record = _student_config(ctx, fields, options, config_file, sets, print_config)
        if print_config:
            from kdpipe.stages.train import print_config as resolved

            settings = resolved(cfg, record)
            click.echo(json.dumps(settings, indent=2, sort_keys=True, default=str))
            if settings.get("store_mismatch"):
                raise KdpipeError(f"The store does not fit this configuration: {settings['store_mismatch']}")
            return
        if sweeps:
            from kdpipe.workflows.sweep import parse_sweep, run_sweep

            _echo_sweep(run_sweep(cfg, parse_sweep(sweeps), out=out, options=sweep_options))
            return
        s = run_stage(
            cfg,
            out=out,
            device=device,
            ray_address=ray_address,
            source=record,
            loader_workers=loader_workers,
            wandb=wandb,
        )
    click.echo(
        format_summary(
            f"train-student: {s['student']} with {s['method']} ({s['target_source']}) done",
            {
                "final top-1 (%)": s["final_top1"],
                "final top-5 (%)": s["final_top5"],
                "best top-1 (%)": s["best_top1"],
                "best epoch": s["best_epoch"],
                "epochs": s["epochs"],
                "wall time (s)": s["wall_seconds"],
                "img/s (train)": s["img_per_s"],
                "run directory": s["run_dir"],
            },
        )
    )


def _student_config(ctx, fields: dict, options: dict, config_file, sets, print_config: bool):
    """The StudentConfig of the command line, or of --config FILE with the typed options on top."""
    from kdpipe.config.configs import StudentConfig

    if config_file is None:
        if sets:
            raise KdpipeError("--set changes a config file's values: pass --config FILE with it.")
        needed = (("--student", "student"), ("--method", "method")) + (() if print_config else (("--store", "store"),))
        missing = [flag for flag, key in needed if not fields[key]]
        if missing:
            raise KdpipeError(f"train-student needs {', '.join(missing)} (or --config FILE, or --resume RUN).")
        return StudentConfig(**fields), None
    from kdpipe.config.config_files import student_from_file

    overrides = given_options(ctx, [k for k in fields if k != "method_options"])
    if any(v is not None for v in options.values()):
        overrides["method_options"] = fields["method_options"]
    return student_from_file(config_file, sets, overrides)


def _sweep_options(executor, ray_address, gpus_per_trial, cpus_per_trial, device):
    from kdpipe.workflows.sweep import SweepOptions

    return SweepOptions(
        executor=executor,
        ray_address=ray_address,
        gpus_per_trial=gpus_per_trial,
        cpus_per_trial=cpus_per_trial,
        device=device,
    )


def _resume_sweep(resume, sweeps, given: dict, sweep_options) -> bool:
    """--resume SWEEP_DIR: continue the sweep (True), or False when RUN is a single run."""
    from kdpipe.workflows.sweep import is_sweep_dir, resume_sweep

    if not is_sweep_dir(resume):
        if sweeps:
            raise KdpipeError("--resume RUN continues one run; --sweep cannot be added to it.")
        return False
    if sweeps:
        raise KdpipeError("--resume SWEEP_DIR continues the sweep with its own grid; leave out --sweep.")
    _echo_sweep(resume_sweep(resume, sweep_options, given))
    return True


def _echo_sweep(r: dict) -> None:
    click.echo(r["markdown"].rstrip())
    items = {
        "trials": len(r["rows"]),
        "finished": sum(x["status"] == "ok" for x in r["rows"]),
        "reused (finished before)": sum(bool(x.get("reused")) for x in r["rows"]),
        "results (CSV)": r["results_csv"],
        "results (Markdown)": r["results_md"],
    }
    title = "train-student sweep: done"
    if r.get("unfinished"):
        # interrupted (Ctrl-C) or stopped: one kdpipe line says how to continue
        title = f"train-student sweep: stopped with {r['unfinished']} of {len(r['rows'])} trials unfinished"
        items["continue with"] = f"kdpipe train-student --resume {r['sweep_dir']}"
    click.echo(format_summary(title, items))


@cli.command("methods")
@click.option("--markdown", is_flag=True, help="Print docs/METHODS.md's table of methods and options instead.")
@click.option(
    "--write-docs",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Rewrite the methods table of this Markdown file (between its methods-table markers).",
)
def methods(markdown, write_docs):
    """Every registered method with its options, defaults and where each default comes from."""
    from kdpipe.methods.catalog import methods_markdown, methods_text, replace_docs_table

    if write_docs:
        from pathlib import Path

        path = Path(write_docs)
        try:
            path.write_text(replace_docs_table(path.read_text()))
        except ValueError as err:
            raise KdpipeError(f"{path}: {err}.") from None
        click.echo(f"kdpipe methods: the table in {path} is up to date.")
        return
    click.echo(methods_markdown() if markdown else methods_text())


@cli.command("run")
@click.argument("configs", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a value in every config (e.g. student.epochs=2, seeds=[0,1,2]).",
)
@click.option(
    "--out",
    default="runs",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Folder of the student run directories and the results table (a path or URL).",
)
@click.option(
    "--stores",
    default="stores",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Folder of the stores, shared by every config with the same teacher and data (a path or URL).",
)
@click.option(
    "--executor",
    type=click.Choice(["ray", "inline"]),
    default="ray",
    show_default=True,
    help="Stage one on a local Ray cluster or in-process.",
)
def run(configs, sets, out, stores, executor):
    """Whole paper rows from config files: stores (shared), target sets, students, one table."""
    from kdpipe import storage
    from kdpipe.workflows.run import run_configs

    result = run_configs(configs, sets=sets, out=out, stores=stores, executor=executor)
    click.echo(storage.read_bytes(result["results_md"]).decode("utf-8").rstrip())


@cli.command("inspect")
@click.argument("store", type=click.Path())
@click.option("--cams", default=0, type=int, help="Draw the top-class CAMs of N images (needs --png).")
@click.option("--subclasses", default=0, type=int, help="Draw the sub-class maps of N images (needs --png).")
@click.option("--target", default=None, help="Target set for --subclasses / --fidelity.")
@click.option("--png", default=None, type=click.Path(), help="Where to write the picture.")
@click.option("--fidelity", is_flag=True, help="Measure warped targets against the online teacher.")
@click.option(
    "--teacher",
    default=None,
    type=click.Path(),
    callback=_checkpoint,
    help="Teacher checkpoint (or run) for --fidelity.",
)
@click.option("--data", default=None, help="Data set spec (default: the one the store names).")
@click.option("--num-samples", default=256, show_default=True, type=int, help="Samples for --fidelity.")
@click.option("--verify", is_flag=True, help="Decode every chunk and report each damaged one (exit 1 if any).")
def inspect(store, cams, subclasses, target, png, fidelity, teacher, data, num_samples, verify):
    """Show a store: manifest, arrays, sizes; verify its chunks; draw CAMs and sub-class maps."""
    from kdpipe.stages.inspect import inspect_store

    result = inspect_store(
        store,
        cams=cams,
        png=png,
        subclasses=subclasses,
        target=target,
        fidelity=fidelity,
        teacher=teacher,
        data=data,
        num_samples=num_samples,
        verify=verify,
    )
    if result["damage"]:
        raise KdpipeError(
            f"{len(result['damage'])} damaged chunk(s) or array(s) in {store} (listed above); "
            "re-extract or re-cluster the store."
        )


@cli.command("demo")
@click.option(
    "--out",
    default="kdpipe-demo",
    show_default=True,
    type=click.Path(),
    help="Folder for the teacher, the store, the student runs and the report.",
)
@click.option("--fast", is_flag=True, help="A smaller teacher, fewer views and epochs (under 3 minutes).")
@click.option(
    "--executor",
    type=click.Choice(["ray", "inline"]),
    default="ray",
    show_default=True,
    help="Run stage one on a local Ray cluster or in-process.",
)
@click.option("--seeds", default="0", show_default=True, help="Student seeds, comma-separated (e.g. 0,1,2).")
@click.option("--teacher-epochs", default=None, type=int, help="Override the preset's teacher epochs.")
@click.option("--student-epochs", default=None, type=int, help="Override the preset's student epochs.")
@click.option("--views", default=None, help="Override the preset's stored views (1, K or all).")
@click.option("--k-penult", default=None, type=int, help="Override the preset's penultimate K-means centres.")
@click.option(
    "--students",
    default=None,
    help="Student runs, comma-separated, or 'all' (ce, kd, cat_kd, letkd1, letkd2, cat_kd_online, "
    "letkd2_online, cat_kd_warp, dkd, at, fitnet, simkd and their _online runs). Default: the first six.",
)
def demo(out, fast, executor, seeds, teacher_epochs, student_epochs, views, k_penult, students):
    """The whole pipeline on the embedded digits data set: teacher, store, students, report.

    A re-run reuses the teacher and the store it already made."""
    from kdpipe.workflows.demo import run_demo

    try:
        seed_list = tuple(int(x) for x in seeds.split(",") if x.strip())
    except ValueError:
        raise KdpipeError(f"--seeds takes comma-separated integers, not {seeds!r}.") from None
    overrides = {
        key: value
        for key, value in (
            ("teacher_epochs", teacher_epochs),
            ("student_epochs", student_epochs),
            ("views", views),
            ("k_penult", k_penult),
        )
        if value is not None
    }
    if students:
        from kdpipe.workflows.demo import ALL_STUDENTS

        overrides["students"] = (
            ALL_STUDENTS if students == "all" else tuple(x.strip() for x in students.split(",") if x.strip())
        )
    run_demo(out=out, fast=fast, executor=executor, seeds=seed_list, **overrides)


def main(argv=None):
    return cli.main(args=argv, prog_name="kdpipe")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

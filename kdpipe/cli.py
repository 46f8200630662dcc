"""The `kdpipe` command: one thin command per stage. Parse, call a stage function, report.

Logic lives in kdpipe/stages/. A KdpipeError becomes one sentence on stderr and exit code 2.
"""

from __future__ import annotations

import sys

import click

from kdpipe import __version__
from kdpipe.errors import KdpipeError


class _Group(click.Group):
    """Turns user-facing errors into one sentence and exit status 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KdpipeError as err:
            click.echo(f"kdpipe: error: {err}", err=True)
            ctx.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kdpipe")
def cli():
    """Knowledge distillation in two stages: one teacher pass into a Zarr store
    (extract-teacher, cluster), then any number of teacher-free student runs (train-student)."""


def _not_built(issue: int, what: str):
    raise KdpipeError(f"`kdpipe {what}` is not built yet: it arrives with roadmap issue #{issue}.")


@cli.command("train-teacher")
@click.option("--arch", required=True, help="Model name as in mdistiller (resnet8, resnet32x4, wrn_40_2, ...).")
@click.option("--data", default="digits", show_default=True,
              help="Data set spec: digits, cifar100:/path, cifar10:/path, imagefolder:/path, synthetic[:n=..].")
@click.option("--epochs", default=240, show_default=True, type=int,
              help="Epochs; the lr steps (150/180/210 of 240) scale with it.")
@click.option("--lr", default=0.05, show_default=True, type=float, help="Initial learning rate (SGD, momentum 0.9, wd 5e-4).")
@click.option("--batch-size", default=64, show_default=True, type=int)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
@click.option("--amp", is_flag=True, help="Mixed precision (torch.autocast; float16 on CUDA).")
@click.option("--out", default="runs", show_default=True, type=click.Path(file_okay=False),
              help="Parent folder of the run directory.")
@click.option("--resume", default=None, type=click.Path(exists=True, file_okay=False),
              help="Continue an interrupted teacher run directory from its last epoch.")
def train_teacher(arch, data, epochs, lr, batch_size, seed, device, amp, out, resume):
    """Train a teacher with cross-entropy (reference recipe) into a run directory."""
    from kdpipe.stages.loop import format_summary
    from kdpipe.stages.teacher import train_teacher as run_stage

    s = run_stage(arch=arch, data=data, epochs=epochs, lr=lr, batch_size=batch_size, out=out,
                  seed=seed, device=device, amp=amp, resume=resume)
    click.echo(format_summary("train-teacher: done", {
        "test top-1 (%)": s["top1"], "test top-5 (%)": s["top5"], "best top-1 (%)": s["best_top1"],
        "epochs": s["epochs"], "wall time (s)": s["wall_seconds"], "img/s (train)": s["img_per_s"],
        "checkpoint": s["checkpoint"], "run directory": s["run_dir"]}))


@cli.command("evaluate")
@click.option("--checkpoint", required=True, type=click.Path(exists=True),
              help="A .pth checkpoint ({'model': state_dict} or bare), or a kdpipe run directory.")
@click.option("--arch", default=None, help="Its architecture (read from the run directory when omitted).")
@click.option("--data", default=None, help="Data set spec (read from the run directory when omitted).")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "test"]))
@click.option("--batch-size", default=256, show_default=True, type=int)
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
@click.option("--amp", is_flag=True, help="Mixed precision (torch.autocast).")
def evaluate(checkpoint, arch, data, split, batch_size, device, amp):
    """Top-1/top-5 of a checkpoint on a data set's test split."""
    from kdpipe.stages.evaluate import evaluate as run_stage
    from kdpipe.stages.loop import format_summary

    r = run_stage(checkpoint, arch=arch, data=data, split=split, device=device, batch_size=batch_size, amp=amp)
    click.echo(format_summary(f"evaluate: {r['arch']} on {r['data']} ({r['split']}, {r['num_samples']} images)", {
        "top-1 (%)": r["top1"], "top-5 (%)": r["top5"], "loss (CE)": r["loss"], "checkpoint": r["checkpoint"]}))


@cli.command("extract-teacher")
def extract_teacher():
    """Stage one: run the teacher once over the data set into a Zarr store. [roadmap issue #3]"""
    _not_built(3, "extract-teacher")


@cli.command("cluster")
@click.argument("store", type=click.Path())
@click.option("--name", default="default", show_default=True, help="Target set name (targets/<name>/).")
@click.option("--k-penult", default=4096, show_default=True, type=int, help="K-means centres, penultimate layer.")
@click.option("--k-inter", default=8, show_default=True, type=int, help="Sub-classes per class, intermediate layer.")
@click.option("--lda-dims", default=None, type=int, help="LDA dimensions d <= C-1 (default C-1).")
@click.option("--topk", default=16, show_default=True, type=int, help="Penultimate probabilities kept per location.")
@click.option("--temperature", default=1.0, show_default=True, type=float, help="T in softmax(-T * d^2).")
@click.option("--student-grid", default=None, help="HxW: average-pool teacher maps to the student's grid first.")
@click.option("--max-fit-points", default=1 << 20, show_default=True, type=int,
              help="K-means fit subsample (seeded) of location vectors.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--drop-features", is_flag=True, help="Delete feat/* once the targets are written.")
@click.option("--overwrite", is_flag=True, help="Replace an existing target set of the same name.")
@click.option("--dataset", default=None, help="Data set spec, only for a store without a labels array.")
@click.option("--ray-address", default=None, help="Join this Ray cluster instead of a local one.")
@click.option("--executor", default="ray", show_default=True, type=click.Choice(["ray", "inline"]))
def cluster(store, name, k_penult, k_inter, lda_dims, topk, temperature, student_grid, max_fit_points, seed,
            drop_features, overwrite, dataset, ray_address, executor):
    """Stage one: letKD targets (LDA, K-means, sub-class scores) into the store."""
    from kdpipe.stages.cluster import cluster as run_stage

    run_stage(store, name=name, k_penult=k_penult, k_inter=k_inter, lda_dims=lda_dims, topk=topk,
              temperature=temperature, student_grid=student_grid, max_fit_points=max_fit_points, seed=seed,
              drop_features=drop_features, overwrite=overwrite, dataset=dataset, executor=executor,
              ray_address=ray_address)


@cli.command("train-student")
def train_student():
    """Stage two: train a student from the store, teacher-free. [roadmap issue #5]"""
    _not_built(5, "train-student")


@cli.command("inspect")
def inspect():
    """Show a store: manifest, arrays, sizes; draw CAMs and sub-class maps. [roadmap issue #3]"""
    _not_built(3, "inspect")


@cli.command("demo")
def demo():
    """The whole pipeline on the embedded digits data set, with a report. [roadmap issue #6]"""
    _not_built(6, "demo")


def main(argv=None):
    return cli.main(args=argv, prog_name="kdpipe")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

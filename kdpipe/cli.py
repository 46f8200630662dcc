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
def train_teacher():
    """Train a teacher with cross-entropy (reference recipe). [roadmap issue #2]"""
    _not_built(2, "train-teacher")


@cli.command("evaluate")
def evaluate():
    """Top-1/top-5 of a checkpoint on a data set's test split. [roadmap issue #2]"""
    _not_built(2, "evaluate")


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

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
def cluster():
    """Stage one: letKD targets (LDA, K-means, sub-class scores) into the store. [roadmap issue #4]"""
    _not_built(4, "cluster")


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

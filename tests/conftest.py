"""Shared test fixtures: tiny data, tiny models, no downloads."""

import os

import pytest
import torch

# Tests run on 2 CPU cores next to each other; keep torch from oversubscribing them.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def cli_runner():
    from click.testing import CliRunner

    return CliRunner()

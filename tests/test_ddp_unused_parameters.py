"""Data-parallel students whose method leaves parameters without gradient in some steps (SimKD's
unused own classifier, AB's and FSP's stages): DDP must be told to look for them, or it refuses
the second step. One gloo process (world size 1) stands for the workers: DDP's reducer checks
the same thing there."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kdpipe.methods import available, get_method

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import os, sys, torch, torch.distributed as dist
    from kdpipe.engine.parallel import Workers, wrap_for_training
    from kdpipe.engine.student import student_loss_fn
    from kdpipe.methods import get_method
    from kdpipe.models import build

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
    dist.init_process_group("gloo", rank=0, world_size=1)
    torch.manual_seed(0)
    method = get_method("simkd", teacher_channels=64, teacher_side=8)
    model = method.prepare_student(build("resnet8", 10))
    loss_fn = student_loss_fn(model, method)
    find_unused = sys.argv[1] == "flag" and loss_fn.leaves_parameters_unused
    net = wrap_for_training(model, Workers(0, 2), torch.device("cpu"), find_unused=find_unused)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    targets = {"penult_map": torch.randn(4, 64, 8, 8)}
    try:
        for step in range(3):
            total, _, _ = loss_fn(net, torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]), targets)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
        print("trained")
    except RuntimeError as err:
        print("refused:", str(err)[:80])
    dist.destroy_process_group()
    """
)


@pytest.mark.parametrize("mode,port,expected", [("flag", "29611", "trained"), ("noflag", "29612", "refused")])
def test_ddp_finds_the_unused_parameters_the_method_declares(tmp_path, mode, port, expected):
    script = tmp_path / "ddp.py"
    script.write_text(SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), mode, port],
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().startswith(expected), done.stdout


def test_which_methods_declare_unused_parameters():
    declared = {name for name in available() if get_method(name).leaves_parameters_unused}
    assert declared == {"ab", "fsp", "simkd"}
    assert get_method("ab+kd").leaves_parameters_unused and not get_method("at+kd").leaves_parameters_unused

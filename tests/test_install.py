"""The Dockerfile's install line resolves against its base image's torch without replacing it.

The requirement set is read from the Dockerfile (its `pip install ... ".[extras]"`) and from
pyproject.toml, then resolved by `pip install --dry-run --report` for the image's Python (3.11,
manylinux x86-64, wheels only) with the image's torch, torchvision, triton and CUDA packages as
constraints (tests/data/pytorch-2.5.1-cuda12.4-constraints.txt), against PyPI. Skipped, with the
reason, where PyPI cannot be reached.
"""

import json
import re
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "tests" / "data" / "pytorch-2.5.1-cuda12.4-constraints.txt"
INDEX_HOST, INDEX_URL = "pypi.org", "https://pypi.org/simple"
# the image's Python and what its glibc (Ubuntu 22.04: 2.35) accepts; torch 2.5.1's wheel is
# tagged manylinux1, faiss-gpu-cu12's manylinux2014 / manylinux_2_28
TARGET = ["--python-version", "3.11", "--only-binary=:all:"] + [
    arg
    for tag in ("manylinux_2_35_x86_64", "manylinux_2_28_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")
    for arg in ("--platform", tag)
]


def dockerfile_extras() -> list[str]:
    """The extras of the Dockerfile's `pip install ... ".[a,b]"`, which must use the constraints."""
    text = (ROOT / "Dockerfile").read_text()
    line = next(cmd for cmd in re.split(r"\n(?=RUN )", text.replace("\\\n", " ")) if "pip install" in cmd)
    assert re.search(r"pip install\b.*\s-c\s+\S+", line), "the Dockerfile's pip install must pin the image's packages"
    return re.search(r'"\.\[([^\]]*)\]"', line).group(1).split(",")


def requirements(extras: list[str]) -> list[str]:
    """kdpipe's dependencies plus those of ``extras``, as pip would read them from pyproject."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project["optional-dependencies"][extra.strip()]
    return reqs


def constraints() -> dict[str, str]:
    pins = [line.split("==") for line in CONSTRAINTS.read_text().splitlines() if line and not line.startswith("#")]
    return {name.lower(): version for name, version in pins}


def index_reachable(timeout: float = 3.0) -> str | None:
    """None when PyPI answers a TCP connect, else why not."""
    try:
        socket.create_connection((INDEX_HOST, 443), timeout=timeout).close()
        return None
    except OSError as err:
        return f"{INDEX_HOST}:443 not reachable ({err})"


def test_dockerfile_line_is_parsed():
    extras = dockerfile_extras()
    assert "gpu" in extras
    assert any(r.startswith("faiss-gpu-cu12") for r in requirements(extras))


@pytest.mark.slow
def test_dockerfile_install_keeps_the_image_torch(tmp_path):
    why = index_reachable()
    if why:
        pytest.skip(f"no package index reachable: {why}")
    report = tmp_path / "report.json"
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--isolated",
        "--dry-run",
        "--ignore-installed",
        "--quiet",
        "--report",
        str(report),
        "--index-url",
        INDEX_URL,
        *TARGET,
        "-c",
        str(CONSTRAINTS),
        *requirements(dockerfile_extras()),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, (
        f"the Dockerfile's requirements do not resolve next to torch 2.5.1:\n{res.stderr[-3000:]}"
    )
    chosen = {
        i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]
    }
    assert chosen.get("torch", "2.5.1") == "2.5.1"
    for name, version in constraints().items():
        assert chosen.get(name, version) == version, f"{name} {chosen[name]} would replace the image's {version}"
    assert "faiss-gpu-cu12" in chosen and "faiss-cpu" not in chosen

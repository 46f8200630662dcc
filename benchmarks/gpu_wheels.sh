#!/usr/bin/env bash
# Here (a machine with network): download into .whl/ the wheels benchmarks/gpu_suite.sh installs
# on the lent GPU machine (Python 3.12, x86-64, no network): kdpipe's dependencies its image
# lacks, at the versions this venv has. Ray (about 70 MB) does not fit the 64 MiB the device tool
# carries; without it the suite's Ray parts skip or fall back (docs/BENCHMARKS.md, GPU suite).
#
#   PY=.venv/bin/python bash benchmarks/gpu_wheels.sh && echo /.whl/ >> .git/info/exclude
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PY:-.venv/bin/python}
pkgs=""
for name in zarr numcodecs donfig crc32c google-crc32c; do
    version=$("$py" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" 2>/dev/null) || continue
    pkgs="$pkgs $name==$version"
done
platforms=""
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms="$platforms --platform $p"
done
# shellcheck disable=SC2086  # word splitting intended: one argument per package and platform
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    $platforms -d .whl $pkgs
du -ch .whl/*.whl | tail -1

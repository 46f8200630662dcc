#!/usr/bin/env bash
# benchmarks/gpu_suite.py on a lent GPU machine: python3 there has torch with CUDA but not
# zarr/numcodecs (nor Ray or faiss-gpu), and nothing can be downloaded there. Wheels carried in
# .whl/ (made here by benchmarks/gpu_wheels.sh) are installed into /tmp/site first. Writes
# gpu_suite.json, gpu_suite.md and gpu_suite.log into $OUT (the device tool's folder that comes
# back), or bench-out/ where $OUT is unset. Extra arguments go to gpu_suite.py.
#
#   bash benchmarks/gpu_suite.sh [--budget-s 480] [--only PART,...]
set -uo pipefail
cd "$(dirname "$0")/.."
wheels=${WHEELS:-.whl}
dest=${OUT:-bench-out}
mkdir -p "$dest"
if compgen -G "$wheels/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$wheels"/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv 2>&1 | tee "$dest/gpu_suite.log"
python3 benchmarks/gpu_suite.py --device cuda --out "$dest/gpu_suite.json" --md "$dest/gpu_suite.md" \
    --workdir /tmp/gpu-suite-work "$@" 2>&1 | tee -a "$dest/gpu_suite.log"

#!/usr/bin/env bash
# Everything a session with a CUDA GPU should run, in one call (about 10 minutes on an H200):
# the CUDA tests (`pytest -m cuda`), then benchmarks/gpu.py. Logs and tables go to $OUT (the
# device tool's folder) or /tmp/gpu-check. Paste the tables into docs/benchmarks.md.
#   bash scripts/gpu_check.sh            # from the repository root
set -o pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
python=${PYTHON:-python3}
if [ -d .whl ]; then  # carried wheels (e.g. vector-quantize-pytorch) for a machine offline
  $python -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
    export PYTHONPATH=src:/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$out/gpu.txt"
timeout 240 $python -m pytest -q -m cuda -p no:cacheprovider tests 2>&1 | tee "$out/cuda-tests.log"
timeout 480 $python benchmarks/gpu.py "$@" 2>&1 | tee "$out/gpu-bench.md"

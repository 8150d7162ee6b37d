#!/usr/bin/env bash
# GPU benchmarks on a machine with an NVIDIA GPU and PyTorch (Python 3.12 there). The service's pure-Python
# dependencies missing on such a machine travel as wheels in .whl/ (bench/gpu_wheels.sh downloads them); the
# project runs from the source tree. Writes reports/bench/gpu-<device>.json (or under --out DIR),
# rewritten after every step: on a lent machine, `bash bench/gpu.sh --out $OUT`.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/service:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -m bench.gpu "$@"

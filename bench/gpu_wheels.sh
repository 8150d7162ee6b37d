#!/usr/bin/env bash
# Fill .whl/ with the Python 3.12 wheels that bench/gpu.sh installs on a lent GPU machine (PyTorch is there, the
# service's pure-Python dependencies are not, and it has no network), pinned to the versions in this checkout's
# .venv so that the GPU run uses the code paths the tests cover. About 25 MiB; .whl/ is git-ignored and travels
# with `carry: [".whl"]`. resemblyzer is there for its encoder weights only (installed without its dependencies).
set -euo pipefail
cd "$(dirname "$0")/.."
PKGS="fastapi starlette pydantic pydantic-core pydantic-settings python-dotenv uvicorn httptools uvloop
python-multipart annotated-types annotated-doc typing-inspection typing-extensions opentelemetry-api mlxtend
resemblyzer pyspng"
# shellcheck disable=SC2086
PINS=$(.venv/bin/python - $PKGS <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version

pins = []
for name in sys.argv[1:]:
    try:
        pins.append(f"{name}=={version(name)}")
    except PackageNotFoundError:
        pins.append(name)
print(" ".join(pins))
PY
)
rm -rf .whl
mkdir .whl
# shellcheck disable=SC2086
.venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d .whl $PINS
echo "$(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1) in .whl/: $PINS"

#!/usr/bin/env bash
# Wheels for bench/gpu.sh on a GPU machine without a package index (Python 3.12, x86-64 Linux, torch already
# there): the packages peftrun needs beyond such an image's torch/transformers/accelerate/peft, into .whl/
# (ignored by git; bench/gpu.sh installs them first). About 51 MB; --deepspeed adds DeepSpeed (built here from
# its sdist, needs torch here) and hjson for the ZeRO-3 row.
#
#   bench/gpu_wheels.sh [--deepspeed]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
mkdir -p .whl
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection typing-extensions importlib-metadata \
  datasets==5.2.0 dill multiprocess diffusers==0.42.1 bitsandbytes==0.50.2
if [ "${1:-}" = "--deepspeed" ]; then
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: -d .whl hjson
  DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
fi
du -sh .whl

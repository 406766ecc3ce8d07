#!/usr/bin/env bash
# GPU figures on one CUDA GPU (issue #18 item 6, issue #17): the bench on CUDA, the seed's memory lines, bitsandbytes
# 8/4-bit LoRA steps, the seed's T0_3B rows and the SD v1-4 DreamBooth rows, each beside the seed's figures and
# `peftrun estimate`'s (bench/gpu.py says what each part runs). Under 8 minutes on one H200. Without CUDA every
# part prints a one-line skip and it exits 0.
#
#   bench/gpu.sh [--dry-run] [--parts bench,memory,bnb,t0,sd] [--steps N] [--out DIR]
#
# PYTHON picks the interpreter (default: .venv/bin/python if present, else python3). A machine without a package
# index can take wheels from .whl/ (pydantic, datasets, diffusers, bitsandbytes, deepspeed...): they are
# installed into /tmp/peftrun-gpu-site first and put on PYTHONPATH. Output also goes to $OUT (default out/gpu).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
SITE=/tmp/peftrun-gpu-site
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || echo "warning: installing .whl/ failed; the parts that need those packages will say so"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-$PWD/out/gpu}"
mkdir -p "$OUT"
"$PYTHON" bench/gpu.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu.log"
exit "${PIPESTATUS[0]}"

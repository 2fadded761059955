#!/usr/bin/env bash
# The JPEG input benchmark (benchmarks/jpeg_pipeline.py) on a many-core host, e.g. the 16-core
# host of a lent GPU machine: images/s of the training and evaluation recipes and of tf.data
# on 1, 2, 4, 8 and 16 cores (each a fresh process pinned to that many cores), to see how the
# platform's pipeline scales past the 2 cores of the development machine. Needs no GPU.
# Builds shapes_jpeg first (a few seconds). Writes the "JPEG pipeline at 224 px vs tf.data"
# section of --results (default: print only, so the 2-core numbers are not replaced; pass
# --results benchmarks/RESULTS_gpu_host.md to keep a copy).
#
#   bash benchmarks/gpu_host_input.sh [--cores 1,2,4,8,16] [--batches 12] [--results FILE]
#   PYTHON=python3 bash benchmarks/gpu_host_input.sh     # default .venv/bin/python, else python3
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
cores="$(nproc)"
list="1"
for k in 2 4 8 16 32 64; do
  if [ "$k" -le "$cores" ]; then list="$list,$k"; fi
done
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export JAX_PLATFORMS=cpu
timeout "${GPU_HOST_INPUT_TIMEOUT_S:-540}" "$PY" benchmarks/jpeg_pipeline.py --cores "$list" \
  --results '' "$@"

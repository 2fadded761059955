#!/usr/bin/env bash
# CLIP ViT-B/16 training steps on this machine's GPU, in one go and within 5 minutes: the
# largest batch that fits, images/s, step time and MFU (benchmarks/gpu_clip.py does the work;
# its docstring says what is measured). Updates the "CLIP ViT-B/16 train step (GPU)" section
# of benchmarks/RESULTS.md and ends with one GPU_CLIP_SUMMARY line.
#
#   bash benchmarks/gpu.sh                   # any extra arguments go to gpu_clip.py:
#   bash benchmarks/gpu.sh --remat           #   per-block remat (bigger batches)
#   bash benchmarks/gpu.sh --scan            #   nn.scan over blocks (faster compiles)
#   bash benchmarks/gpu.sh --results ''      #   print only, RESULTS.md untouched
#   PYTHON=python3 bash benchmarks/gpu.sh    # which Python (default .venv/bin/python, else
#                                            # python3); it needs a CUDA jaxlib and the
#                                            # project's dependencies (pip install -e .)
#   GPU_SH_TIMEOUT_S=290                     # hard limit for the Python run (default 290 s)
#   GPU_SH_WHEELS=DIR                        # first install DIR/*.whl (--no-deps) into a
#                                            # temporary site dir: for a GPU machine whose
#                                            # Python has a CUDA jax but no network
#
# On a machine whose Python already has a CUDA jax (e.g. jax 0.11 + jax-cuda13-plugin, flax,
# optax, chex, orbax), the project needs these too; checked with jax 0.11.2 on Python 3.12
# (smoke mode): ml-collections==1.1.0 grain==0.2.18 tensorflow-datasets==4.9.10
# array_record==0.8.6 tensorboardX==2.6.5 and their dependencies dm-tree immutabledict
# promise simple-parsing tensorflow-metadata termcolor toml docstring-parser
# googleapis-common-protos importlib_resources portpicker (11 MB of wheels; promise has no
# wheel on PyPI: build it with `pip wheel --no-deps promise==2.3`). Do not `pip install -e .`
# there: setup.py pins jax==0.10.2 and would replace the CUDA jax. The repo root goes on
# PYTHONPATH here, so the project itself needs no install.
#
# Environment it sets (each only when unset): XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 (the
# largest batch needs more than JAX's default 75% preallocation), a persistent compilation
# cache (a rerun on the same machine skips most compiles), and XLA flags for H100s:
#   --xla_gpu_enable_latency_hiding_scheduler=true  schedules async work (collectives,
#       copies) to overlap compute (NVIDIA's JAX images set it);
#   --xla_gpu_enable_triton_gemm=false  cuBLAS for every GEMM: no Triton GEMM autotuning,
#       which shortens the compile of each batch size tried.
# XLA aborts on a flag its version does not know, so a preflight checks them first and drops
# them (with a warning) rather than failing.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
TIMEOUT_S="${GPU_SH_TIMEOUT_S:-290}"
BUDGET_S=$((TIMEOUT_S - 45))  # gpu_clip.py stops trying new batch sizes before the kill.
GPU_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_triton_gemm=false"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/jax_cache_gpu_clip}"
export PYTHONUNBUFFERED=1 GPU_SH=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

fail() {
  echo "GPU_CLIP_SUMMARY status=FAILED $*"
  exit 2
}

# ---- Preflight: Python, the project's imports, and the XLA flags (one short process).
command -v "$PY" >/dev/null 2>&1 || fail "no Python at PYTHON=$PY"
if [ -n "${GPU_SH_WHEELS:-}" ]; then
  site="$(mktemp -d)"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" \
    "$GPU_SH_WHEELS"/*.whl || fail "could not install the wheels in $GPU_SH_WHEELS"
  export PYTHONPATH="$PYTHONPATH:$site"  # After the system's: never shadow its CUDA jax.
fi
# shellcheck disable=SC2016  # Python source: nothing in it is for the shell to expand.
preflight='
import importlib, sys
need = ["jax", "flax", "optax", "chex", "ml_collections", "grain", "tensorflow_datasets",
        "array_record", "orbax.checkpoint", "tensorboardX", "PIL", "sklearn", "absl",
        "jax_transfer.methods.contrastive"]
missing = []
for m in need:
  try:
    importlib.import_module(m)
  except Exception as e:
    missing.append(f"{m} ({type(e).__name__})")
if missing:
  print("missing Python packages: " + ", ".join(missing) + "; see the list at the top of "
        "benchmarks/gpu.sh (or pip install -e . where jax may be the pinned 0.10.2)",
        file=sys.stderr)
  sys.exit(3)
import jax
jax.numpy.zeros(1).block_until_ready()
print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.devices()}")
'
pre_log="$(mktemp)"
XLA_FLAGS="${XLA_FLAGS:-} $GPU_FLAGS" timeout 120 "$PY" -c "$preflight" >"$pre_log" 2>&1
pre_rc=$?
if [ "$pre_rc" -ne 0 ] && grep -q "Unknown flag" "$pre_log"; then
  echo "gpu.sh: warning: this XLA does not know one of: $GPU_FLAGS; running without them"
  grep "Unknown flag" "$pre_log" | head -1
  GPU_FLAGS=""
  XLA_FLAGS="${XLA_FLAGS:-}" timeout 120 "$PY" -c "$preflight" >"$pre_log" 2>&1
  pre_rc=$?
fi
cat "$pre_log"
[ "$pre_rc" -eq 0 ] || fail "preflight (rc $pre_rc): $(tail -1 "$pre_log")"
export XLA_FLAGS="${XLA_FLAGS:-} $GPU_FLAGS"

# ---- The benchmark, under a hard timeout (SIGTERM first: it reports what it measured).
log="$(mktemp)"
timeout -k 20 "$TIMEOUT_S" "$PY" benchmarks/gpu_clip.py --budget-s "$BUDGET_S" "$@" 2>&1 \
  | tee "$log" | grep -v '^GPU_CLIP_SUMMARY'
rc=${PIPESTATUS[0]}
summary="$(grep '^GPU_CLIP_SUMMARY' "$log" | tail -1)"
if [ -z "$summary" ]; then
  reason="exit code $rc"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then reason="killed at the ${TIMEOUT_S} s timeout"; fi
  summary="GPU_CLIP_SUMMARY status=FAILED ($reason; full log: $log)"
fi
echo "$summary"
exit "$rc"

#!/usr/bin/env bash
# Creates a TPU VM (a single host or a pod slice such as v4-32 = 4 hosts x 4 chips).
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
Usage: $SCRIPT_NAME --name NAME --zone ZONE [--accelerator-type v4-32] [--version RUNTIME]
                 [--spot | --preemptible] [--project PROJECT] [--dry-run]
Creates the TPU VM slice NAME.
$TPU_HELP
  --accelerator-type TYPE  e.g. v4-32, v5litepod-16, v5p-32, v6e-16 (default: v4-32)
  --version RUNTIME  TPU software version (default by generation: v2/v3/v4 tpu-ubuntu2204-base,
                     v5litepod v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e)
  --spot             a Spot slice (cheaper, can be reclaimed at any time)
  --preemptible      a preemptible slice (the older kind of Spot)
A reclaimed slice loses its disks: the run resumes from its workdir in the bucket (README.md).
USAGE
}

OPT_ACCELERATOR_TYPE=v4-32 OPT_VERSION="" OPT_SPOT=0 OPT_PREEMPTIBLE=0
parse_args "$TPU_SPEC accelerator-type= version= spot preemptible" "$@"
require_tpu
if ((OPT_SPOT && OPT_PREEMPTIBLE)); then die "--spot and --preemptible exclude each other"; fi

if [[ -z $OPT_VERSION ]]; then
  case $OPT_ACCELERATOR_TYPE in
    v2-* | v3-* | v4-*) OPT_VERSION=tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) OPT_VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) OPT_VERSION=v2-alpha-tpuv5 ;;
    v6e-*) OPT_VERSION=v2-alpha-tpuv6e ;;
    *) die "no default --version for --accelerator-type '$OPT_ACCELERATOR_TYPE'; pass --version" ;;
  esac
fi

flags=("--accelerator-type=$OPT_ACCELERATOR_TYPE" "--version=$OPT_VERSION")
if ((OPT_SPOT)); then flags+=(--spot); fi
if ((OPT_PREEMPTIBLE)); then flags+=(--preemptible); fi
tpu create "$OPT_NAME" "${flags[@]}"

#!/usr/bin/env bash
# Deletes a TPU VM slice (its disks go with it; workdirs in the mounted bucket stay).
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
Usage: $SCRIPT_NAME --name NAME --zone ZONE [--quiet] [--project PROJECT] [--dry-run]
Deletes the TPU VM slice NAME.
$TPU_HELP
  --quiet            do not ask for confirmation
USAGE
}

OPT_QUIET=0
parse_args "$TPU_SPEC quiet" "$@"
require_tpu
flags=()
if ((OPT_QUIET)); then flags+=(--quiet); fi
tpu delete "$OPT_NAME" "${flags[@]}"

#!/usr/bin/env bash
# Shows the training log that launch.sh writes on the workers (worker 0 by default: process 0
# prints the progress and eval lines; the other workers' logs matter when one of them failed).
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
Usage: $SCRIPT_NAME --name NAME --zone ZONE [--worker 0|N|all] [--lines 100] [--no-follow]
                 [--project PROJECT] [--dry-run]
Tails ~/$REMOTE_LOG on a worker of NAME and follows it (Ctrl-C stops following; the run goes on).
$TPU_HELP
  --worker W         worker number or 'all' (default 0)
  --lines N          lines of history to show first (default 100)
  --no-follow        print them and exit
USAGE
}

OPT_WORKER=0 OPT_LINES=100 OPT_NO_FOLLOW=0
parse_args "$TPU_SPEC worker= lines= no-follow" "$@"
require_tpu
[[ $OPT_WORKER =~ ^([0-9]+|all)$ ]] || die "--worker must be a number or 'all', got '$OPT_WORKER'"
[[ $OPT_LINES =~ ^[0-9]+$ ]] || die "--lines must be a number, got '$OPT_LINES'"
follow=" -F"
if ((OPT_NO_FOLLOW)); then follow=""; fi
on_workers "$OPT_WORKER" "tail -n $OPT_LINES$follow ~/$REMOTE_LOG"

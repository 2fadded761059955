#!/usr/bin/env bash
# Copies this checkout (uncommitted edits included) to every worker of a TPU VM slice, as one
# tarball: .git, .venv, workdirs and caches stay behind. Workers keep their .venv across copies,
# so after a code change only this script needs re-running, not setup.sh.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
Usage: $SCRIPT_NAME --name NAME --zone ZONE [--project PROJECT] [--dry-run]
Copies this checkout to ~/$REMOTE_DIR on every worker of NAME (files deleted here stay there).
$TPU_HELP
USAGE
}

parse_args "$TPU_SPEC" "$@"
require_tpu

tarball=${TMPDIR:-/tmp}/jax_transfer-code-$OPT_NAME.tar.gz
remote_tarball=/tmp/jax_transfer-code.tar.gz
run tar -czf "$tarball" --exclude=.git --exclude=.venv --exclude=./workdirs --exclude=./tmp \
  --exclude=__pycache__ '--exclude=*.egg-info' --exclude=.pytest_cache -C "$REPO_ROOT" .
tpu scp "$tarball" "$OPT_NAME:$remote_tarball" --worker=all
on_workers all "mkdir -p $REMOTE_DIR && tar -xzf $remote_tarball -C $REMOTE_DIR && rm -f $remote_tarball"
run rm -f "$tarball"

#!/usr/bin/env bash
# Starts a training run on every worker of a TPU VM slice, detached (nohup): every host runs the
# same `python -m jax_transfer.main` command. No JAX_COORDINATOR_ADDRESS is needed: the TPU
# runtime sets TPU_WORKER_HOSTNAMES on each worker, jax_transfer/parallel.py sees it and calls
# jax.distributed.initialize(), which finds the coordinator (worker 0) and the process ids itself.
# Relaunching with the same workdir resumes from its newest checkpoint, e.g. on a new slice after
# a Spot/preemptible one was reclaimed.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
Usage: $SCRIPT_NAME --name NAME --zone ZONE --config CONFIG --bucket BUCKET [--run RUN]
                 [--workdir DIR] [--data-dir DIR] [--restart] [--config.a.b=value ...]
                 [--project PROJECT] [--dry-run]
Runs jax_transfer.main on every worker of NAME (in ~/$REMOTE_DIR, log in ~/$REMOTE_LOG).
$TPU_HELP
  --config CONFIG    ml_collections_configs/<method>/<name>.py[:args] (required)
  --bucket BUCKET    the bucket setup.sh mounted at $GCS_MOUNT/BUCKET, for the workdir and the
                     TFDS data (required unless both --workdir and --data-dir are given)
  --run RUN          run name (default: the TPU name)
  --workdir DIR      default $GCS_MOUNT/BUCKET/workdirs/RUN; a local path (no gs://) that every
                     worker sees the same
  --data-dir DIR     TFDS data_dir (default $GCS_MOUNT/BUCKET/tfds): --config.input.data_dir
                     and TFDS_DATA_DIR
  --restart          stop this script's previous run on the workers first (otherwise a
                     still-running one is an error: two runs cannot share the TPU)
  --config.a.b=value passed through to jax_transfer.main, in order
USAGE
}

OPT_CONFIG="" OPT_BUCKET="" OPT_RUN="" OPT_WORKDIR="" OPT_DATA_DIR="" OPT_RESTART=0
ALLOW_CONFIG_OVERRIDES=1
parse_args "$TPU_SPEC config= bucket= run= workdir= data-dir= restart" "$@"
require_tpu
require config
[[ -n $OPT_BUCKET || (-n $OPT_WORKDIR && -n $OPT_DATA_DIR) ]] ||
  die "missing required argument --bucket (or both --workdir and --data-dir) (see --help)"
[[ -z $OPT_BUCKET ]] || check_bucket "$OPT_BUCKET"
check_local_path workdir "$OPT_WORKDIR" tpu
check_local_path data-dir "$OPT_DATA_DIR" tpu
check_config_file "$OPT_CONFIG"
workdir=${OPT_WORKDIR:-$GCS_MOUNT/$OPT_BUCKET/workdirs/${OPT_RUN:-$OPT_NAME}}
data_dir=${OPT_DATA_DIR:-$GCS_MOUNT/$OPT_BUCKET/tfds}
if [[ $workdir != "$GCS_MOUNT"/?* ]]; then
  echo "$SCRIPT_NAME: warning: --workdir $workdir is not under $GCS_MOUNT (the bucket mounts of" \
    "setup.sh); every worker must see the same directory (a shared mount), or checkpoints" \
    "cannot be restored" >&2
fi

# On each worker, first: the buckets the paths under $GCS_MOUNT lie in must be mounted, or the
# run would write its checkpoints to that worker's own disk (lost with the slice) and read no data.
mounted="" check_mounts=""
for dir in "$workdir" "$data_dir"; do
  [[ $dir == "$GCS_MOUNT"/?* ]] || continue
  bucket=${dir#"$GCS_MOUNT"/}
  bucket=${bucket%%/*}
  mnt=$(quote "$GCS_MOUNT/$bucket")
  [[ " $mounted " != *" $mnt "* ]] || continue
  mounted+=" $mnt"
  check_mounts+="if ! mountpoint -q $mnt; then printf '%s: %s is not mounted (tpu_scripts/setup.sh"
  check_mounts+=" --bucket=%s mounts it)\n' \"\$(hostname)\" $mnt $(quote "$bucket") >&2; exit 1; fi; "
done

main=(.venv/bin/python -m jax_transfer.main "--config=$OPT_CONFIG" "--workdir=$workdir"
  "--config.input.data_dir=$data_dir" ${CONFIG_OVERRIDES[@]+"${CONFIG_OVERRIDES[@]}"})
# On each worker: refuse (or with --restart, stop) a run this script started before, then start
# the new one detached, appending to the log, and record its pid.
running="running() { pid=\$(cat ~/$REMOTE_PID 2>/dev/null) && ps -p \"\$pid\" -o args= | grep -q jax_transfer.main; }"
if ((OPT_RESTART)); then
  previous="if running; then kill \"\$pid\"; while running; do sleep 1; done; fi"
else
  previous="if running; then echo \"\$(hostname): a run is still going (pid \$pid); relaunch with --restart to stop it\" >&2; exit 1; fi"
fi
start="cd $REMOTE_DIR; export TFDS_DATA_DIR=$(quote "$data_dir")"
start+="; echo \"=== \$(date -u): launch.sh starts a run\" >> ~/$REMOTE_LOG"
start+="; nohup $(quote "${main[@]}") >> ~/$REMOTE_LOG 2>&1 < /dev/null & echo \$! > ~/$REMOTE_PID"
on_workers all "set -e; $check_mounts$running; $previous; $start"

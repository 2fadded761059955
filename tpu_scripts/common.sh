# shellcheck shell=bash disable=SC2034  # (the variables set here are read by the scripts)
# Shared by the tpu_scripts/*.sh launchers (sourced, never run): argument parsing, one-line
# errors, and `run`, which executes a command or, under --dry-run, prints it as one
# shell-quoted line (copy-pasteable, and what tests/test_tpu_scripts.py parses with shlex).

SCRIPT_NAME=${0##*/}
# Empty arrays under `set -u` need bash 4.4. macOS ships 3.2; `brew install bash` puts 5.x on PATH.
if ((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] < 404)); then
  printf '%s: error: needs bash >= 4.4, this is %s\n' "$SCRIPT_NAME" "$BASH_VERSION" >&2
  exit 2
fi
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Where the code lives on every TPU worker, relative to the login directory ($HOME): ssh
# commands start there, so no `~` needs quoting.
REMOTE_DIR=jax_transfer
# The training log and pid file of launch.sh on every worker; logs.sh reads the log.
REMOTE_LOG=jax_transfer.log
REMOTE_PID=jax_transfer.pid
# Where setup.sh mounts a bucket with gcsfuse on every worker: gs://BUCKET is $GCS_MOUNT/BUCKET.
# The Python code takes local paths only (no gs://), so workdirs and TFDS data go through it.
GCS_MOUNT=/mnt/gcs
DRY_RUN=0
ALLOW_CONFIG_OVERRIDES=0
CONFIG_OVERRIDES=()

die() {  # One line on stderr, exit status 2 (the platform's convention for usage errors).
  printf '%s: error: %s\n' "$SCRIPT_NAME" "$*" >&2
  exit 2
}

# parse_args SPEC ARGS...
#   SPEC: space-separated long option names. "zone=" takes a value (--zone=V or --zone V) and
#   sets OPT_ZONE; "spot" is a flag and sets OPT_SPOT=1. Dashes become underscores
#   (--accelerator-type -> OPT_ACCELERATOR_TYPE). The caller sets every OPT_* default first.
#   Always accepted: -h/--help (calls the caller's `usage`, exit 0) and --dry-run. With
#   ALLOW_CONFIG_OVERRIDES=1, --config.a.b=v arguments are collected, in order, in
#   CONFIG_OVERRIDES for jax_transfer.main.
parse_args() {
  local spec=" ${1//$'\n'/ } " arg key value has_value var
  shift
  while (($#)); do
    arg=$1 has_value=0 value=
    case $arg in
      -h | --help) usage; exit 0 ;;
      --dry-run) DRY_RUN=1; shift; continue ;;
      --config.*=*)
        ((ALLOW_CONFIG_OVERRIDES)) || die "unknown option ${arg%%=*} (see --help)"
        CONFIG_OVERRIDES+=("$arg"); shift; continue ;;
      --config.*)
        ((ALLOW_CONFIG_OVERRIDES)) || die "unknown option $arg (see --help)"
        die "write config overrides as --config.a.b=value, got '$arg'" ;;
      --*=*) key=${arg%%=*} value=${arg#*=} has_value=1; key=${key#--} ;;
      --*) key=${arg#--} ;;
      *) die "unexpected argument '$arg' (see --help)" ;;
    esac
    var=OPT_${key//-/_}
    var=${var^^}
    if [[ $spec == *" $key= "* ]]; then
      if ((!has_value)); then
        (($# >= 2)) || die "option --$key needs a value"
        value=$2
        shift
      fi
      printf -v "$var" '%s' "$value"
    elif [[ $spec == *" $key "* ]]; then
      ((!has_value)) || die "option --$key takes no value"
      printf -v "$var" '%s' 1
    else
      die "unknown option --$key (see --help)"
    fi
    shift
  done
}

# require KEY...: dies naming the first of these options that is unset or empty.
require() {
  local key var
  for key in "$@"; do
    var=OPT_${key//-/_}
    var=${var^^}
    [[ -n ${!var-} ]] || die "missing required argument --$key (see --help)"
  done
}

# quote ARGS...: prints the arguments as one line that a POSIX shell splits back into exactly
# these arguments (plain words stay bare, anything else is single-quoted).
quote() {
  local arg flag plain='^[A-Za-z0-9_./:=@%+,-]+$' option='^(--[A-Za-z0-9_.-]+=)(.*)$' out=()
  for arg in "$@"; do
    flag=
    if [[ ! $arg =~ $plain && $arg =~ $option ]]; then  # --flag='a b' reads better than '--flag=a b'.
      flag=${BASH_REMATCH[1]} arg=${BASH_REMATCH[2]}
    fi
    if [[ $arg =~ $plain ]]; then
      out+=("$flag$arg")
    else
      out+=("$flag'${arg//\'/\'\\\'\'}'")
    fi
  done
  printf '%s\n' "${out[*]}"
}

# run CMD ARGS...: under --dry-run prints the command on stdout; otherwise echoes it to stderr
# (so a log shows what ran) and runs it.
run() {
  if ((DRY_RUN)); then
    quote "$@"
  else
    printf '+ %s\n' "$(quote "$@")" >&2
    "$@"
  fi
}

# check_local_path OPTION VALUE [tpu]: jax_transfer.main and the TFDS array_record reader take
# local (or mounted) paths only, so a URL fails here rather than on every host after start-up.
# With "tpu", a gs:// path is answered with its path under setup.sh's mount.
check_local_path() {
  local rest
  case $2 in
    gs://*)
      rest=${2#gs://}
      [[ ${3-} == tpu ]] || die "--$1=$2: only local paths are supported; use a path on the" \
        "shared filesystem (or the bucket mounted with gcsfuse)"
      die "--$1=$2: only local paths are supported; use the mounted path $GCS_MOUNT/${rest%/}" \
        "(tpu_scripts/setup.sh --bucket=${rest%%/*} mounts gs://${rest%%/*} there)" ;;
    *://*) die "--$1=$2: only local paths are supported (mount the storage and pass its path)" ;;
  esac
}

# check_bucket NAME: a bare GCS bucket name (not gs://NAME, no slashes).
check_bucket() {
  [[ $1 =~ ^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$ ]] ||
    die "--bucket '$1' is not a bucket name (the bare name, no gs://: 3 or more lowercase" \
      "letters, digits, '-', '_' or '.')"
}

# ------------------------------------------------------------------ TPU VM (gcloud) helpers.
TPU_SPEC="name= zone= project="
OPT_NAME="" OPT_ZONE="" OPT_PROJECT=""
TPU_HELP="  --name NAME        TPU VM name (required)
  --zone ZONE        e.g. us-central2-b (required)
  --project PROJECT  GCP project (default: gcloud's configured project)
  --dry-run          print the commands, one per line, instead of running them
  -h, --help         this text"

require_tpu() {  # Checks --name/--zone and that the name is one GCP accepts.
  require name zone
  [[ $OPT_NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    die "--name '$OPT_NAME' is not a valid TPU name (lowercase letters, digits and dashes, starting with a letter)"
}

# tpu CMD ARGS...: runs `gcloud compute tpus tpu-vm CMD ARGS... --zone=Z [--project=P]`.
tpu() {
  local location=("--zone=$OPT_ZONE")
  [[ -z $OPT_PROJECT ]] || location+=("--project=$OPT_PROJECT")
  run gcloud compute tpus tpu-vm "$@" "${location[@]}"
}

# on_workers WORKER COMMAND: runs the shell COMMAND over ssh on worker WORKER (a number or all).
on_workers() {
  tpu ssh "$OPT_NAME" "--worker=$1" "--command=$2"
}

# check_config_file CONFIG: the config (file.py[:args]) must exist in this checkout, so a typo
# fails here rather than on every worker.
check_config_file() {
  local file=${1%%:*}
  [[ $file == /* ]] || file=$REPO_ROOT/$file
  [[ -f $file ]] || die "--config file '${1%%:*}' not found (paths are relative to the repo root)"
}

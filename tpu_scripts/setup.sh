#!/usr/bin/env bash
# Installs the project on every worker of a TPU VM slice: gcsfuse with the bucket mounted at
# $GCS_MOUNT/BUCKET (common.sh), a Python 3.11 .venv, the pinned dependencies (the project's
# setup_env.sh) and the TPU build of the pinned jax. Run it once per slice, after copy_code.sh;
# it is idempotent (gcsfuse is installed and the bucket mounted only when missing, setup_env.sh
# reinstalls only when setup.py changes). Re-run it after a worker reboots: mounts do not survive.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
Usage: $SCRIPT_NAME --name NAME --zone ZONE --bucket BUCKET [--python 3.11] [--project PROJECT]
                [--dry-run]
On every worker of NAME: installs gcsfuse if missing and mounts gs://BUCKET at
$GCS_MOUNT/BUCKET (unless mounted), then sets up ~/$REMOTE_DIR/.venv: setup_env.sh, then
jax[tpu] at the version setup.py pins (from the libtpu release index).
$TPU_HELP
  --bucket BUCKET    GCS bucket for workdirs and TFDS data (required); the slice's service
                     account needs read/write access to it
  --python VERSION   Python for a new .venv (default 3.11; TPU images ship 3.10, so uv
                     fetches it)
USAGE
}

OPT_BUCKET="" OPT_PYTHON=3.11
parse_args "$TPU_SPEC bucket= python=" "$@"
require_tpu
require bucket
check_bucket "$OPT_BUCKET"

# The TPU wheels must be the same jax release as the one the project pins (setup.py).
jax_version=$(sed -n 's/^ *"jax==\([^"]*\)",.*/\1/p' "$REPO_ROOT/setup.py")
[[ -n $jax_version ]] || die "could not read the pinned jax version (\"jax==...\") from setup.py"
libtpu_index=https://storage.googleapis.com/jax-releases/libtpu_releases.html

# gcsfuse from Google's apt repository, as its install page documents (the lock timeout: a fresh
# VM's unattended-upgrades may hold the dpkg lock for a few minutes).
keyring=/usr/share/keyrings/cloud.google.asc
apt_get="sudo DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout=600"
install="if ! command -v gcsfuse >/dev/null; then"
install+=" echo \"deb [signed-by=$keyring] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main\""
install+=" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null"
install+="; curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee $keyring >/dev/null"
install+="; $apt_get update; $apt_get install gcsfuse; fi"
# The mount belongs to the ssh user, who also runs training. --implicit-dirs: directories that
# exist only as object-name prefixes (e.g. uploaded with gcloud storage cp) are visible.
# --rename-dir-limit: orbax publishes a checkpoint by renaming its tmp directory to <step>; on a
# flat-namespace bucket gcsfuse renames a directory only with this flag, and not atomically (it
# copies each object, then deletes the old ones). A rename interrupted half-way (preemption, a
# crash) leaves an unreadable checkpoints/<step>. A single-host run detects that on restore
# (jax_transfer/checkpoint.py), moves it aside to <step>.damaged and resumes from the previous
# checkpoint; a multi-host run stops with the restore error instead (its hosts could disagree),
# and the damaged checkpoints/<step> must be moved aside by hand before relaunching.
# --metadata-cache-ttl-secs=0: every host sees a checkpoint another host just published (the
# default caches listings for a minute); process 0's view decides the resume step anyway.
mnt=$(quote "$GCS_MOUNT/$OPT_BUCKET")
mount="if ! mountpoint -q $mnt; then sudo mkdir -p $mnt; sudo chown \"\$(id -u):\$(id -g)\" $mnt"
mount+="; gcsfuse --implicit-dirs --rename-dir-limit=1000000 --metadata-cache-ttl-secs=0 $(quote "$OPT_BUCKET") $mnt; fi"

# setup_env.sh makes the .venv with `python3 -m venv` unless one exists. The TPU images' python3
# is 3.10 and the project needs >= 3.11, so the .venv comes from uv, which downloads a Python
# when the image has none (PIP_BREAK_SYSTEM_PACKAGES: newer images mark the system Python as
# externally managed; older pips ignore it).
venv="if [ ! -x .venv/bin/python ]; then PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q --user uv"
venv+=" && ~/.local/bin/uv venv --seed --python $(quote "$OPT_PYTHON") .venv; fi"
tpu_jax=$(quote .venv/bin/pip install -q "jax[tpu]==$jax_version" -f "$libtpu_index")
on_workers all "set -eo pipefail; $install; $mount; cd $REMOTE_DIR; $venv; bash setup_env.sh; $tpu_jax"

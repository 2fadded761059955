"""Faults a pod run meets: SIGTERM (preemption), SIGKILL at a random step (crash), damaged and
half-written checkpoints. Each relaunch must finish with the parameters and metrics of a run
that was never interrupted — bitwise on CPU, data position included."""
import glob
import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import tiny_vit_config
from jax_transfer import checkpoint, export as export_lib, metrics as metrics_lib, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 150
TIMING = ("steps_per_sec", "examples_per_sec", "perf/mfu")


def _cli(workdir, data_dir):
  """The training CLI on 2 simulated devices, as a separate process (killable)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_TRANSFER_DATA_DIR=data_dir,
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  args = [sys.executable, "-m", "jax_transfer.main",
          "--config=ml_collections_configs/supervised/digits_vit.py:runlocal",
          f"--workdir={workdir}", "--config.model.variant=nano/2",
          "--config.input.global_batch_size=16", f"--config.total_steps={STEPS}",
          "--config.log_every_steps=1", "--config.eval_every_steps=50",
          "--config.checkpoint_every_steps=7", "--config.keep_checkpoints=2"]
  return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _finish(proc, timeout=300):
  out, _ = proc.communicate(timeout=timeout)
  return proc.returncode, out


def _logged_steps(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    return max((metrics_lib._step_of(line) or 0 for line in f), default=0)


def _checkpoint_steps(workdir):
  """Published checkpoints only (orbax writes into a tmp dir and renames it when complete)."""
  return [int(os.path.basename(p)) for p in glob.glob(f"{workdir}/checkpoints/[0-9]*")
          if os.path.basename(p).isdigit()]


def _interrupt_at(workdir, data_dir, step, sig, after_a_checkpoint=False):
  """Starts a run and sends `sig` once metrics.jsonl shows `step` done (and, if asked, once a
  checkpoint has been published: saves are asynchronous, so on a loaded machine the step-7 save
  can still be in flight several steps later)."""
  proc = _cli(workdir, data_dir)
  deadline = time.time() + 240
  while (_logged_steps(workdir) < step
         or (after_a_checkpoint and not _checkpoint_steps(workdir))):
    assert proc.poll() is None, f"run ended before step {step}: {proc.stdout.read()[-3000:]}"
    assert time.time() < deadline, "run too slow to reach the kill step"
    time.sleep(0.01)
  proc.send_signal(sig)
  return _finish(proc)


def _exported(workdir, tmp):
  out = os.path.join(tmp, os.path.basename(workdir) + "_export")
  assert export_lib.export_workdir(workdir, out) == STEPS
  return load_file(os.path.join(out, "params.safetensors"))


def _metrics(workdir):
  rows = [{k: v for k, v in m.items() if k not in TIMING}
          for m in metrics_lib.read_jsonl(workdir)]
  steps = [m["step"] for m in rows if "train/loss" in m]
  assert steps == sorted(set(steps)), "a step was logged twice"
  return rows


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  code, out = _finish(_cli(workdir, data_dir))
  assert code == 0, out[-3000:]
  return workdir, _exported(workdir, str(tmp_path_factory.mktemp("exp")))


def _assert_equals_reference(workdir, reference, tmp_path):
  ref_dir, ref_params = reference
  params = _exported(workdir, str(tmp_path))
  assert params.keys() == ref_params.keys()
  for k in params:  # Bitwise: same devices, same batches, same per-step keys.
    np.testing.assert_array_equal(params[k], ref_params[k], err_msg=k)
  assert _metrics(workdir) == _metrics(ref_dir)
  with open(os.path.join(workdir, "final_metrics.json")) as f, \
       open(os.path.join(ref_dir, "final_metrics.json")) as g:
    assert json.load(f) == json.load(g)


def test_sigterm_saves_at_step_boundary_and_relaunch_resumes(data_dir, tmp_path, reference):
  workdir = str(tmp_path / "preempted")
  code, out = _interrupt_at(workdir, data_dir, 20, signal.SIGTERM)
  assert code == 0, out[-3000:]
  assert "SIGTERM received" in out and "Preempted (SIGTERM) after step" in out
  stopped = int(out.split("Preempted (SIGTERM) after step ")[1].split(":")[0])
  # Saved at the boundary, not at the last periodic save.
  assert max(_checkpoint_steps(workdir)) == stopped
  assert not os.path.exists(os.path.join(workdir, "final_metrics.json"))
  code, out = _finish(_cli(workdir, data_dir))
  assert code == 0, out[-3000:]
  _assert_equals_reference(workdir, reference, tmp_path)


def test_sigkill_at_random_step_then_relaunch_equals_uninterrupted(data_dir, tmp_path,
                                                                   reference):
  kill_step = random.Random().randint(9, 100)  # Any step must do; printed on failure.
  workdir = str(tmp_path / "killed")
  code, out = _interrupt_at(workdir, data_dir, kill_step, signal.SIGKILL,
                            after_a_checkpoint=True)
  assert code == -signal.SIGKILL, f"kill at {kill_step}: {out[-2000:]}"
  # Whatever the kill interrupted (possibly a save in flight), the published checkpoints are
  # complete ones and nothing half-written is taken for one.
  steps = _checkpoint_steps(workdir)
  assert steps and max(steps) <= _logged_steps(workdir) + 7, (kill_step, steps)
  code, out = _finish(_cli(workdir, data_dir))
  assert code == 0, f"kill at {kill_step}: {out[-3000:]}"
  assert not glob.glob(f"{workdir}/checkpoints/*tmp*")  # Leftovers cleaned on start-up.
  _assert_equals_reference(workdir, reference, tmp_path)


# ------------------------------------------------------------------ Damaged checkpoints.

def _config(data_dir):
  c = tiny_vit_config(data_dir)
  c.total_steps, c.log_every_steps, c.eval_every_steps = 12, 4, 12
  c.checkpoint_every_steps, c.keep_checkpoints = 4, 3
  return c


def _run(config, workdir, **kw):
  return train.train_and_evaluate(config, workdir, devices=jax.devices()[:2], **kw)


def _damage(workdir, step, how):
  files = [f for f in glob.glob(f"{workdir}/checkpoints/{step}/state/**/*", recursive=True)
           if os.path.isfile(f)]
  if how == "truncate":  # The biggest array file cut in half (a disk filled up, a copy died).
    biggest = max(files, key=os.path.getsize)
    with open(biggest, "r+b") as f:
      f.truncate(os.path.getsize(biggest) // 2)
  else:  # A partially written checkpoint whose array index never made it to disk.
    for f in files:
      if os.path.basename(f) == "manifest.ocdbt":
        os.remove(f)


@pytest.fixture(scope="module")
def reference_12(data_dir, tmp_path_factory):
  state, _ = _run(_config(data_dir), str(tmp_path_factory.mktemp("ref12")))
  return checkpoint.flatten(jax.device_get(state.params))


@pytest.mark.parametrize("how", ["truncate", "partial"])
def test_damaged_latest_checkpoint_falls_back_to_previous(data_dir, tmp_path, reference_12,
                                                          how, caplog):
  workdir = str(tmp_path / "w")
  _run(_config(data_dir), workdir, stop_after_step=10)  # Checkpoints 4, 8, 10.
  _damage(workdir, 10, how)
  with caplog.at_level("WARNING"):
    state, _ = _run(_config(data_dir), workdir)
  assert "Checkpoint step 10 is unreadable" in caplog.text
  assert "resumed from step 8" in caplog.text
  assert os.path.isdir(f"{workdir}/checkpoints/10.damaged")  # Kept for inspection.
  assert int(state.step) == 12
  params = checkpoint.flatten(jax.device_get(state.params))
  for k in params:
    np.testing.assert_array_equal(params[k], reference_12[k], err_msg=k)


def test_no_readable_checkpoint_is_an_error_and_moves_nothing(data_dir, tmp_path):
  workdir = str(tmp_path / "w")
  c = _config(data_dir)
  c.total_steps, c.keep_checkpoints = 8, 2
  _run(c, workdir)  # Checkpoints 4, 8.
  for step in (4, 8):
    _damage(workdir, step, "truncate")
  with pytest.raises(RuntimeError, match="no checkpoint in .* could be restored; newest: step 8"):
    _run(c, workdir)
  assert sorted(os.listdir(f"{workdir}/checkpoints")) == ["4", "8"]


def test_half_written_checkpoint_is_ignored_and_cleaned(data_dir, tmp_path):
  """A run killed while orbax wrote step 12 leaves `12.orbax-checkpoint-tmp-*`: never taken
  for a checkpoint, removed on the next start."""
  workdir = str(tmp_path / "w")
  _run(_config(data_dir), workdir, stop_after_step=8)
  tmp = f"{workdir}/checkpoints/12.orbax-checkpoint-tmp-1234"
  os.makedirs(f"{tmp}/state")
  with open(f"{tmp}/state/partial", "wb") as f:
    f.write(b"\0" * 100)
  state, _ = _run(_config(data_dir), workdir)
  assert int(state.step) == 12 and not os.path.exists(tmp)

"""A real multi-process run: 2 JAX processes on localhost (CPU, gloo collectives,
jax.distributed with a coordinator on 127.0.0.1), 4 simulated devices each, train the contrastive
default and give the losses of one process with 8 devices. Each process builds only its own
slice of every global batch (parallel.global_batch would reject a whole batch per process).
Preemption the way a pod sees it: SIGTERM reaches one host (process 1); JAX's preemption sync
makes both stop at the same step and write one shared checkpoint; relaunching both restores it
and the finished run still equals the single-process one."""
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from jax_transfer import metrics as metrics_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--config=ml_collections_configs/contrastive/shapes_clip.py:clip,runlocal",
        "--config.model.image_variant=nano/8", "--config.model.text_width=32",
        "--config.model.text_depth=1", "--config.model.embed_dim=32",
        "--config.input.global_batch_size=16", "--config.eval.batch_size=256",
        "--config.log_every_steps=1", "--config.eval_every_steps=1000",
        "--config.checkpoint_every_steps=100", "--config.total_steps=40", "--config.contrastive.retrieval_limit=0",
        "--config.contrastive.probe_train_limit=0"]  # Zero-shot is the evaluator checked.


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(workdir, data_dir, num_processes, devices_per_process):
  port = _free_port()
  procs = []
  for pid in range(num_processes):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_TRANSFER_DATA_DIR=data_dir,
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")
    if num_processes > 1:
      env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                 JAX_NUM_PROCESSES=str(num_processes), JAX_PROCESS_ID=str(pid))
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "jax_transfer.main", f"--workdir={workdir}", *ARGS],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  return procs


def _wait(procs):
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  return outs


def _losses(workdir):
  if not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
    return {}
  return {m["step"]: m["train/loss"] for m in metrics_lib.read_jsonl(workdir)
          if "train/loss" in m}


def test_two_processes_equal_one_process_share_checkpoints_and_stop_together(data_dir,
                                                                             tmp_path):
  single = str(tmp_path / "single")
  _wait(_start(single, data_dir, num_processes=1, devices_per_process=8))

  multi = str(tmp_path / "multi")
  procs = _start(multi, data_dir, num_processes=2, devices_per_process=4)
  deadline = time.time() + 400
  while max(_losses(multi), default=0) < 5:  # Process 0 writes the metrics.
    assert all(p.poll() is None for p in procs), procs[0].stdout.read()[-3000:]
    assert time.time() < deadline
    time.sleep(0.01)
  procs[1].send_signal(signal.SIGTERM)  # One host gets the notice, as on a pod.
  outs = _wait(procs)
  assert any("process 1 of 2, 8 global devices" in o for o in outs), outs[1][-2000:]
  stopped = [int(o.split("Preempted (SIGTERM) after step ")[1].split(":")[0]) for o in outs]
  assert stopped[0] == stopped[1] < 40, outs[0][-3000:]
  steps = sorted(int(d) for d in os.listdir(f"{multi}/checkpoints") if d.isdigit())
  assert steps == [stopped[0]]
  # Both processes wrote their data-iterator position into the shared checkpoint.
  assert sorted(os.listdir(f"{multi}/checkpoints/{stopped[0]}/data")) == [
      "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]

  outs = _wait(_start(multi, data_dir, num_processes=2, devices_per_process=4))
  assert all(f"Restored checkpoint at step {stopped[0]}" in o for o in outs), outs[0][-2000:]
  a, b = _losses(single), _losses(multi)
  assert sorted(a) == sorted(b) == list(range(1, 41))
  # Same math on a different process layout: gloo's cross-process reductions sum in another
  # order than the in-process ones, so equal to float32 rounding, not bitwise.
  np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=1e-5)

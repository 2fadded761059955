"""A real multi-process run: 2 JAX processes on localhost (CPU, gloo collectives,
jax.distributed with a coordinator on 127.0.0.1), 4 simulated devices each, train the contrastive
default and give the losses of one process with 8 devices. Each process builds only its own
slice of every global batch (parallel.global_batch would reject a whole batch per process).
Half-way both stop, both write the shared checkpoint, and a relaunch of both restores it."""
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from jax_transfer import metrics as metrics_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Constant learning rate: stopping at step 4 and relaunching with total_steps=8 then follows the
# same trajectory as an 8-step run (a cosine schedule depends on total_steps).
ARGS = ["--config=ml_collections_configs/contrastive/shapes_clip.py:clip,runlocal",
        "--config.model.image_variant=nano/8", "--config.model.text_width=32",
        "--config.model.text_depth=1", "--config.model.embed_dim=32",
        "--config.input.global_batch_size=16", "--config.eval.batch_size=256",
        "--config.schedule.name=constant", "--config.schedule.warmup_steps=0",
        "--config.log_every_steps=1", "--config.eval_every_steps=1000",
        "--config.checkpoint_every_steps=4", "--config.contrastive.retrieval_limit=0",
        "--config.contrastive.probe_train_limit=0"]  # Zero-shot is the evaluator checked.


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(workdir, data_dir, steps, num_processes, devices_per_process):
  port = _free_port()
  procs = []
  for pid in range(num_processes):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_TRANSFER_DATA_DIR=data_dir,
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")
    if num_processes > 1:
      env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                 JAX_NUM_PROCESSES=str(num_processes), JAX_PROCESS_ID=str(pid))
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "jax_transfer.main", f"--workdir={workdir}", *ARGS,
         f"--config.total_steps={steps}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True))
  outs = []
  for p in procs:
    out, _ = p.communicate(timeout=600)
    outs.append(out)
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  return outs


def _losses(workdir):
  return {m["step"]: m["train/loss"] for m in metrics_lib.read_jsonl(workdir)
          if "train/loss" in m}


def test_two_processes_equal_one_process_and_share_checkpoints(data_dir, tmp_path):
  single = str(tmp_path / "single")
  _launch(single, data_dir, 8, num_processes=1, devices_per_process=8)

  multi = str(tmp_path / "multi")
  outs = _launch(multi, data_dir, 4, num_processes=2, devices_per_process=4)
  assert any("process 1 of 2, 8 global devices" in o for o in outs), outs[1][-2000:]
  steps = sorted(int(d) for d in os.listdir(f"{multi}/checkpoints") if d.isdigit())
  assert steps[-1] == 4
  # Both processes wrote their data-iterator position into the shared checkpoint.
  assert sorted(os.listdir(f"{multi}/checkpoints/4/data")) == [
      "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]

  outs = _launch(multi, data_dir, 8, num_processes=2, devices_per_process=4)
  assert all("Restored checkpoint at step 4" in o for o in outs), outs[0][-2000:]
  a, b = _losses(single), _losses(multi)
  assert sorted(a) == sorted(b) == list(range(1, 9))
  # Same math on a different process layout: gloo's cross-process reductions sum in another
  # order than the in-process ones, so equal to float32 rounding, not bitwise.
  np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=1e-5)

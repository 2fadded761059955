"""Metric sinks: workdir/metrics.jsonl (one JSON object per line with `step`) and TensorBoard
event files (tensorboardX, no TensorFlow). Only process 0 writes."""
from __future__ import annotations

import json
import logging
import math
import os
import time

import jax


class MetricWriter:

  def __init__(self, workdir: str, resume_step: int | None = None):
    """resume_step: the step the run (re)starts from. Lines a killed run wrote after it are
    dropped first (atomically), so a resumed run's metrics.jsonl equals an uninterrupted one's:
    no step appears twice."""
    self.active = jax.process_index() == 0
    if not self.active:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "metrics.jsonl")
    if resume_step is not None and os.path.exists(path):
      with open(path) as f:  # A half-written last line has no step and is dropped.
        kept = [line for line in f if (step := _step_of(line)) is not None
                and step <= resume_step]
      with open(path + ".tmp", "w") as f:
        f.writelines(kept)
      os.replace(path + ".tmp", path)
    self._jsonl = open(path, "a")
    from tensorboardX import SummaryWriter  # Imported lazily: only process 0 needs it.
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict) -> None:
    if not self.active:
      return
    scalars = {k: float(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
    self._jsonl.flush()
    for k, v in scalars.items():
      self._tb.add_scalar(k, v, int(step))
    self._tb.flush()

  def close(self) -> None:
    if self.active:
      self._jsonl.close()
      self._tb.close()


def _step_of(line: str) -> int | None:
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return None


def read_jsonl(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class Progress:
  """Progress line: step, step/s, examples/s, ETA — measured between log points."""

  def __init__(self, total_steps: int, global_batch_size: int, first_step: int):
    self.total, self.batch = total_steps, global_batch_size
    self._t, self._step = time.perf_counter(), first_step

  def measure(self, step: int) -> dict:
    now = time.perf_counter()
    dt, ds = now - self._t, step - self._step
    self._t, self._step = now, step
    sps = ds / dt if dt > 0 and ds > 0 else math.nan
    return {"steps_per_sec": sps, "examples_per_sec": sps * self.batch}

  def line(self, step: int, metrics: dict, speed: dict) -> str:
    sps = speed["steps_per_sec"]
    eta = (self.total - step) / sps if sps == sps and sps > 0 else math.nan
    shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if not k.startswith("train/lr"))
    mfu = f" MFU {speed['perf/mfu']:.1%}" if "perf/mfu" in speed else ""
    return (f"[{step}/{self.total}] {shown} | {sps:.2f} step/s "
            f"{speed['examples_per_sec']:.0f} ex/s{mfu} ETA {_hms(eta)}")


def _hms(seconds: float) -> str:
  if seconds != seconds:
    return "?"
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f"{h}:{m:02d}:{s:02d}"


class _QuietLibraries(logging.Filter):
  """Drops INFO chatter of orbax / grain / tfds (dozens of lines per checkpoint)."""
  NOISY = ("/orbax/", "/grain/", "/tensorflow_datasets/", "/jax/_src/")

  def filter(self, record):
    return record.levelno >= logging.WARNING or not any(
        n in record.pathname for n in self.NOISY)


def setup_logging(level: int = logging.INFO):
  """absl's handler on the root logger, library chatter filtered, at `level` (the CLI logs
  INFO progress lines; experiment scripts pass WARNING: their printed table is the output)."""
  from absl import logging as absl_logging
  absl_logging.use_absl_handler()
  logging.getLogger().setLevel(level)
  for handler in logging.getLogger().handlers:
    handler.addFilter(_QuietLibraries())

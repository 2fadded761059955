"""Metric sinks: workdir/metrics.jsonl (one JSON object per line with `step`) and TensorBoard
event files (tensorboardX, no TensorFlow). Only process 0 writes."""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
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


class ProgressBar:
  """A live progress line for runs whose printed table is the output (experiment scripts,
  which silence the loop's INFO lines): step/total, loss, examples/s and ETA, fed by the loop
  with every loss it checks (train.train_and_evaluate(..., progress=...)).

  On a terminal it is one line redrawn in place (at most every `redraw_s`) and erased at the
  end, so the script's own output is what stays. Elsewhere (a CI log, a file) it writes at
  most one line every `every_s` seconds, plus a last one at the end when it wrote any: a run
  shorter than `every_s` writes nothing. Only process 0 draws. It only reads host floats the
  loop already fetched: metrics and results do not change."""

  def __init__(self, stream=None, *, desc: str | None = None, every_s: float = 30.0,
               redraw_s: float = 0.2, clock=time.monotonic):
    self._stream, self._desc = stream, desc
    self.every_s, self.redraw_s, self._clock = every_s, redraw_s, clock
    self.active = False

  def start(self, total_steps: int, global_batch_size: int, first_step: int, desc: str = ""):
    self.stream = self._stream or sys.stderr  # Looked up now: test runners swap sys.stderr.
    self.tty = self.stream.isatty()
    self.total, self.batch, self.desc = total_steps, global_batch_size, self._desc or desc
    self.active = jax.process_index() == 0 and first_step < total_steps
    self._t0 = None  # (time, step) of the first step completed in this run
    self._drawn = None  # the step drawn last
    self._last, self._width, self.lines = self._clock(), 0, 0

  def update(self, step: int, loss: float) -> None:
    if not self.active:
      return
    now = self._clock()
    if self._t0 is None:  # Rates count from the first completed step: start-up excluded.
      self._t0 = (now, step)
    if step == self._drawn or (step < self.total and now - self._last < (
        self.redraw_s if self.tty else self.every_s)):
      return
    if not self.tty and step >= self.total and not self.lines:
      return  # A short run stays out of the log.
    self._last, self._drawn = now, step
    dt, ds = now - self._t0[0], step - self._t0[1]
    sps = ds / dt if dt > 0 and ds > 0 else math.nan
    eta = 0.0 if step >= self.total else (self.total - step) / sps if sps > 0 else math.nan
    done = int(20 * step / self.total)
    speed = f"{sps * self.batch:.0f}" if sps == sps else "?"
    line = (f"{self.desc + ' ' if self.desc else ''}[{'#' * done}{'.' * (20 - done)}] "
            f"{step}/{self.total} loss {loss:.4g} {speed} ex/s ETA {_hms(eta)}")
    if self.tty:  # Cut to the terminal: a wrapped line cannot be redrawn.
      line = line[:shutil.get_terminal_size().columns - 1]
      self.stream.write("\r" + line.ljust(self._width))
      self._width = max(self._width, len(line))
    else:
      self.stream.write(line + "\n")
    self.lines += 1
    self.stream.flush()

  def close(self) -> None:
    if self.active and self.tty and self._width:
      self.stream.write("\r" + " " * self._width + "\r")
      self.stream.flush()
    self.active = False


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

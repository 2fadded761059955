"""Imported published checkpoints fine-tune end to end on the embedded data (shrunk models):
a Hugging Face SigLIP through the contrastive method (shapes_clip.py:siglip,init=DIR) and an
AugReg ViT .npz through the supervised method (shapes_finetune.py:init=DIR), on 8 simulated
devices: the runs start from the imported weights (a new zero-initialised head for the
classifier) and train with finite losses."""
import json
import os

import jax
import numpy as np
import pytest

import reference_checkpoints as refs

from jax_transfer import train  # noqa: E402
from jax_transfer.tools import import_checkpoint  # noqa: E402


def _import(fmt, name, tmp_path, *extra):
  reason = refs.missing(fmt)
  if reason:
    pytest.skip(reason)
  ref = refs.build(fmt, name, tmp_path / "src")
  out = str(tmp_path / "export")
  assert import_checkpoint.main(["--checkpoint", ref.path, "--out", out, *extra]) == 0
  return out


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_imported_siglip_finetunes_contrastive(data_dir, tmp_path):
  from ml_collections_configs.contrastive import shapes_clip
  export = _import("hf_siglip", next(iter(refs.GEOMETRIES["hf_siglip"])), tmp_path)
  c = shapes_clip.get_config(f"siglip,runlocal,init={export}")
  assert c.model.image_pool == "map" and c.model.text_pool == "last"
  assert c.init.export_dir == export and c.contrastive.loss == "siglip"
  c.input.data_dir = data_dir
  c.total_steps, c.log_every_steps, c.eval_every_steps = 6, 1, 6
  c.input.global_batch_size = 16
  c.contrastive.retrieval_limit = c.contrastive.probe_train_limit = 64
  workdir = str(tmp_path / "run")
  _, final = train.train_and_evaluate(c, workdir, devices=jax.devices())
  losses = [m["train/loss"] for m in _metrics(workdir) if "train/loss" in m]
  assert len(losses) == 6 and all(np.isfinite(losses))
  assert 0.0 <= final["zero_shot/mean_accuracy"] <= 1.0  # the imported model evaluated


def test_imported_augreg_finetunes_supervised(data_dir, tmp_path):
  from ml_collections_configs.supervised import shapes_finetune
  name = "w96h3_p8_px32"
  export = _import("augreg", name, tmp_path)
  c = shapes_finetune.get_config(f"runlocal,init={export}")
  assert c.model.num_classes == 6 and c.init.skip_regex == "^head/"
  assert c.input.image_size == 32 and c.model.width == 96
  c.input.data_dir = data_dir
  c.total_steps, c.log_every_steps = 10, 1
  workdir = str(tmp_path / "run")
  state, final = train.train_and_evaluate(c, workdir, devices=jax.devices())
  losses = [m["train/loss"] for m in _metrics(workdir) if "train/loss" in m]
  assert len(losses) == 10 and all(np.isfinite(losses))
  assert losses[0] == pytest.approx(np.log(6), abs=1e-4)  # the new zero-init 6-way head
  assert "eval/accuracy" in final
  # The backbone started from the import: after 10 small steps it is still close to it.
  from jax_transfer import checkpoint
  imported = checkpoint.flatten(checkpoint.load_export_params(export))
  trained = checkpoint.flatten(jax.device_get(state.params))
  k = "encoderblock_0/attn/qkv/kernel"
  assert np.abs(trained[k] - imported[k]).max() < 0.1 * np.abs(imported[k]).max()

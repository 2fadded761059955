"""The supervised method learns: a small ViT on the embedded digits beats a stated accuracy."""
import jax
import numpy as np

from conftest import tiny_vit_config
from jax_transfer import metrics as metrics_lib, train


def test_vit_learns_digits(data_dir, tmp_path):
  """All 10 digits, 'mu/2' ViT, 400 steps of batch 32 (~10 epochs): >= 90% test accuracy
  (measured 0.96-0.97 over seeds; chance is 10%, and an untrained model stays near it)."""
  c = tiny_vit_config(data_dir, arg="")
  c.input.classes = None
  c.model.num_classes = 10
  c.model.variant = "mu/2"
  c.input.global_batch_size = 32
  c.total_steps, c.eval_every_steps, c.log_every_steps = 400, 400, 100
  c.checkpoint_every_steps = 400
  _, final = train.train_and_evaluate(c, str(tmp_path / "learn"), devices=jax.devices()[:2])
  assert final["eval/accuracy"] >= 0.90, final
  losses = [m["train/loss"] for m in metrics_lib.read_jsonl(str(tmp_path / "learn"))
            if "train/loss" in m]
  assert losses[-1] < 0.5 * np.log(10)  # Started at ~ln(10) with the zero-initialised head.


def test_bf16_compute_trains_close_to_f32(data_dir, tmp_path):
  """bf16 compute with f32 master weights: params stay f32 and the loss tracks f32's."""
  runs = {}
  for dtype in ("float32", "bfloat16"):
    c = tiny_vit_config(data_dir)
    c.model.dtype = dtype
    c.total_steps, c.log_every_steps = 10, 1
    state, _ = train.train_and_evaluate(c, str(tmp_path / dtype), devices=jax.devices()[:1])
    assert state.params["head"]["kernel"].dtype == np.float32
    runs[dtype] = [m["train/loss"] for m in metrics_lib.read_jsonl(str(tmp_path / dtype))
                   if "train/loss" in m]
  np.testing.assert_allclose(runs["bfloat16"], runs["float32"], rtol=0.05)

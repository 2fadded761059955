"""Training from webdataset shards (input.shards) through the shared loop: a stopped and
resumed run equals an uninterrupted one, corrupt samples are skipped and counted, missing
shards are a config error before anything compiles."""
import json
import os
import shutil

import numpy as np
import pytest

from jax_transfer import config as config_lib, train
from jax_transfer.data import builders


def _cfg(data_dir, shards=None):
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "shapes_clip_cfg", os.path.join(os.path.dirname(__file__), "..", "ml_collections_configs",
                                      "contrastive", "shapes_clip.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("clip,wds,runlocal")
  c.input.data_dir = data_dir
  if shards:
    c.input.shards = shards
  c.total_steps, c.checkpoint_every_steps, c.eval_every_steps = 6, 3, 100
  c.input.global_batch_size = 16
  c.input.shuffle_buffer = 64
  c.contrastive.zero_shot = {}
  c.contrastive.retrieval_limit = 32
  c.contrastive.probe_train_limit = 0
  return c


def _params(state):
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.params))]


def test_stopped_and_resumed_equals_uninterrupted(data_dir, tmp_path):
  import jax
  devices = jax.devices()[:2]
  full, _ = train.train_and_evaluate(_cfg(data_dir), str(tmp_path / "full"), devices=devices)
  train.train_and_evaluate(_cfg(data_dir), str(tmp_path / "cut"), devices=devices,
                           stop_after_step=4)
  resumed, _ = train.train_and_evaluate(_cfg(data_dir), str(tmp_path / "cut"), devices=devices)
  for a, b in zip(_params(full), _params(resumed)):
    np.testing.assert_array_equal(a, b)


def test_corrupt_image_is_skipped_and_counted(data_dir, tmp_path):
  """Each shard's first JPEG overwritten with garbage of the same length: the run trains, and
  metrics.jsonl reports the skipped samples."""
  src = builders.ensure_shapes_wds(data_dir)
  dst = tmp_path / "shards"
  shutil.copytree(src, dst)
  for i in range(builders.WDS_SHARDS):  # Each shard's first JPEG becomes garbage.
    path = dst / f"shapes-{i:05d}.tar"
    raw = bytearray(path.read_bytes())
    start = raw.find(b"\xff\xd8\xff")
    raw[start:start + 64] = b"\x00" * 64
    path.write_bytes(bytes(raw))
  c = _cfg(data_dir, shards=str(dst / "shapes-{00000..00007}.tar"))
  c.log_every_steps = 1
  c.input.shuffle_buffer = 1  # Reading order: a shard's first sample comes first.
  import jax
  train.train_and_evaluate(c, str(tmp_path / "run"), devices=jax.devices()[:1])
  lines = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  skipped = [m["data/skipped"] for m in lines if "data/skipped" in m]
  assert skipped and max(skipped) >= 1


def test_missing_shard_is_a_config_error_before_compiling(data_dir, tmp_path):
  src = builders.ensure_shapes_wds(data_dir)
  c = _cfg(data_dir, shards=f"{src}/shapes-{{00000..00009}}.tar")  # 8 exist.
  with pytest.raises(config_lib.ConfigError, match=r"input.shards: .*shapes-00008.tar"):
    train.train_and_evaluate(c, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")  # Nothing written.

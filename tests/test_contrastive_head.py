"""contrastive.zero_shot_head (jax_transfer/methods/contrastive.py): fine-tuning a two-tower
model as a classifier on its frozen zero-shot head. The loss is the cross-entropy of
exp(t) zimg @ head.T with the head the evaluator's class embeddings; shapes_clip.py's `head=`
trains img/ and img_proj/ only (the text tower, hence the head, stays θ_0's) and the
zero-shot accuracy it is trained for rises; a head attribute without prompts is refused."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp

from jax_transfer import checkpoint, config as config_lib, export, methods, train
from jax_transfer.evaluators.zero_shot import class_embeddings
from test_contrastive import _config


def _flat(t):
  return flax.traverse_util.flatten_dict(t, sep="/")


def test_loss_is_cross_entropy_on_the_zero_shot_classifier(data_dir):
  c = _config(data_dir)
  c.contrastive.zero_shot = {"color": ["a {} circle", "a {} square"],
                             "size": ["a {} ring"]}
  c.contrastive.zero_shot_head = "color,size"
  mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
  m = methods.get_method("contrastive")(c, mesh)
  import flax.linen as nn
  params = nn.unbox(m.init_params(jax.random.key(0)))
  rng = np.random.default_rng(0)
  raw = {"image": rng.integers(0, 255, (8, 32, 32, 3)).astype(np.float32) / 127.5 - 1,
         "caption": ["unused"] * 8, "color": rng.integers(0, 8, 8), "size": rng.integers(0, 2, 8),
         "shape": rng.integers(0, 6, 8), "position": rng.integers(0, 9, 8)}
  batch = m.host_batch(raw)
  assert set(batch) == {"image", "color", "size"}  # no captions tokenised
  loss, (metrics, _) = m.loss_fn(params, None, jax.tree.map(jnp.asarray, batch),
                                 jax.random.key(1))
  zimg = np.asarray(m.encode_image(params, jnp.asarray(raw["image"])), np.float64)
  scale = np.exp(float(params["logit_scale"]))
  want, text_fn = [], jax.jit(m.encode_text)
  for key in ("color", "size"):
    head = class_embeddings(text_fn, params, m.tokenizer, m.attributes[key],
                            list(c.contrastive.zero_shot[key]))
    logits = scale * zimg @ head.T
    logp = logits - logsumexp(logits, axis=1, keepdims=True)
    want.append(-np.mean(logp[np.arange(8), raw[key]]))
    np.testing.assert_allclose(float(metrics[f"{key}_acc"]),
                               np.mean(logits.argmax(1) == raw[key]))
  np.testing.assert_allclose(float(loss), np.mean(want), rtol=1e-5)


def test_head_finetune_trains_the_image_tower_only_and_learns(data_dir, tmp_path):
  pre = _config(data_dir, steps=20)  # a weak base (nano towers), so the fine-tune has room
  _, before = train.train_and_evaluate(pre, str(tmp_path / "pre"), devices=jax.devices()[:1])
  base = str(tmp_path / "base")
  export.export_workdir(str(tmp_path / "pre"), base)
  from ml_collections_configs.contrastive import shapes_clip
  c = shapes_clip.get_config(f"clip,runlocal,init={base},head=color")
  assert c.optimizer.trainable_regex == "^img" and c.contrastive.zero_shot_head == "color"
  c.input.data_dir = data_dir
  c.input.global_batch_size = 64
  c.total_steps, c.eval_every_steps, c.checkpoint_every_steps = 30, 30, 30
  c.optimizer.lr = 2e-3
  c.contrastive.zero_shot = dict(pre.contrastive.zero_shot)  # the pretraining's evaluator
  c.contrastive.retrieval_limit = c.contrastive.probe_train_limit = 0
  state, after = train.train_and_evaluate(c, str(tmp_path / "ft"), devices=jax.devices()[:1])
  assert after["zero_shot/color_accuracy"] > before["zero_shot/color_accuracy"] + 0.05, (
      before, after)
  theta0 = _flat(checkpoint.load_export_params(base))
  got = _flat(jax.device_get(state.params))
  moved = {k for k in theta0 if not np.array_equal(np.asarray(got[k]), theta0[k])}
  assert moved and all(k.startswith(("img/", "img_proj/")) for k in moved), sorted(moved)
  assert any(k.startswith("img_proj/") for k in moved)
  export.export_workdir(str(tmp_path / "ft"), str(tmp_path / "ft_export"))
  assert checkpoint.load_export_config(str(tmp_path / "ft_export")).init.export_dir == base


def test_head_attribute_without_prompts_is_refused(data_dir):
  c = _config(data_dir)
  c.contrastive.zero_shot_head = "shape"  # zero_shot has only 'color' here
  with pytest.raises(config_lib.ConfigError, match="zero_shot_head"):
    config_lib.validate(c, 1)

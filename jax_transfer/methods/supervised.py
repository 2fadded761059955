"""Supervised image classification (ViT): pretraining, and transfer by fine-tuning or linear
probe (config.optimizer.trainable_regex='^head/') from an export (config.init)."""
from __future__ import annotations

import jax.numpy as jnp
import optax

from jax_transfer import config as config_lib, data, models
from jax_transfer.evaluators.classification import ClassificationEvaluator
from jax_transfer.methods.base import Method


def build_model(config):
  """The model named by config.model_name, with config.model's fields (dtype by name)."""
  return models.get_model(config.model_name, **config_lib.model_kwargs(config.model))


class Supervised(Method):

  @staticmethod
  def validate_config(config):
    c = config.input
    info = data.dataset_info(c.dataset, c.data_dir, label_key=c.label_key)
    n = info["num_classes"]
    if c.classes:
      bad = [k for k in c.classes if not 0 <= k < n]
      if bad:
        raise config_lib.ConfigError(f"input.classes has {bad}, outside 0..{n - 1} of "
                                     f"{c.dataset}:{c.label_key}")
      n = len(c.classes)
    if config.model.num_classes != n:
      raise config_lib.ConfigError(
          f"model.num_classes={config.model.num_classes} but the data has {n} classes "
          f"({c.dataset}:{c.label_key}{', input.classes' if c.classes else ''})")

  def __init__(self, config, mesh, workdir=None):
    super().__init__(config, mesh, workdir)
    self.model = build_model(config)
    self.image_shape = data.image_shape(config.input)

  def init_params(self, rng):
    dummy = jnp.zeros((1, *self.image_shape), jnp.float32)
    return self.model.init({"params": rng}, dummy, train=False)["params"]

  def loss_fn(self, params, extra, batch, rng):
    logits, _ = self.model.apply({"params": params}, batch["image"], train=True,
                                 rngs={"dropout": rng})
    labels = batch["label"]  # The pipeline's (remapped) input.label_key column.
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), labels).mean()
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return loss, ({"accuracy": accuracy}, extra)

  def predict(self, params, images):
    return self.model.apply({"params": params}, images, train=False)[0]

  def evaluators(self):
    c = self.config
    return [ClassificationEvaluator(self.predict, c.input, c.eval.split, c.eval.batch_size,
                                    self.mesh, c.eval_every_steps, name="eval")]

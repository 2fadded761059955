"""Supervised image classification (ViT): pretraining, and transfer by fine-tuning or linear
probe (config.optimizer.trainable_regex='^head/') from an export (config.init)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jax_transfer import data, models
from jax_transfer.evaluators.classification import ClassificationEvaluator
from jax_transfer.methods.base import Method


def build_model(config):
  """The model named by config.model_name, with config.model's fields (dtype by name)."""
  kwargs = config.model.to_dict()
  kwargs["dtype"] = jnp.dtype(kwargs.get("dtype", "float32"))
  return models.get_model(config.model_name, **kwargs)


class Supervised(Method):

  def __init__(self, config, mesh):
    super().__init__(config, mesh)
    self.model = build_model(config)
    info = data.dataset_info(config.input.dataset, config.input.data_dir)
    size = config.input.image_size
    h, w, c = info["image_shape"]
    self.image_shape = (size, size, c) if size else (h, w, c)

  def init_params(self, rng):
    dummy = jnp.zeros((1, *self.image_shape), jnp.float32)
    return self.model.init({"params": rng}, dummy, train=False)["params"]

  def loss_fn(self, params, extra, batch, rng):
    logits, _ = self.model.apply({"params": params}, batch["image"], train=True,
                                 rngs={"dropout": rng})
    labels = batch[self.config.input.label_key]
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), labels).mean()
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return loss, ({"accuracy": accuracy}, extra)

  def predict(self, params, images):
    return self.model.apply({"params": params}, images, train=False)[0]

  def evaluators(self):
    c = self.config
    return [ClassificationEvaluator(self.predict, c.input, c.eval.split, c.eval.batch_size,
                                    self.mesh, c.eval_every_steps, name="eval",
                                    label_key=c.input.label_key)]

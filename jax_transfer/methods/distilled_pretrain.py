"""KRR-ST's evaluation protocol, step 1: pretrain a fresh model on a small set (X, Y) by MSE
regression of its output onto the target representations Y (Lee et al. 2024, sec. 4).

The set is an export directory whose params are {'images' [n, H, W, C], 'targets' [n, D]}:
a distilled set (method=distill, exported), or a baseline written by experiments/distill
(random real subset or k-means-nearest subset, with g targets) in the same format, so every
arm pretrains through the same code. config.distill.set_export names it;
config.distill.pretrain_batch_size examples are drawn per step (without replacement within a
step; the whole set when it is smaller). The loop's input batch is not used: the set is tiny and
lives on the device as a constant of the step.

The model is config.model_name / config.model with num_classes = D; its export transfers to a
labelled task with the supervised method (init.skip_regex='^head/'). The evaluator is the
closed-form linear probe of the pre-head features on config.input's labels.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_transfer import checkpoint, config as config_lib
from jax_transfer.evaluators.linear_probe import label_probe
from jax_transfer.methods.base import Method
from jax_transfer.methods.distill import build_learner


def load_set(export_dir: str):
  params = checkpoint.load_export_params(export_dir)
  return np.asarray(params["images"], np.float32), np.asarray(params["targets"], np.float32)


class DistilledPretrain(Method):

  @staticmethod
  def validate_config(config):
    if "distill" not in config or not config.distill.get("set_export"):
      raise config_lib.ConfigError("method=distilled_pretrain needs distill.set_export (an "
                                   "export with params 'images' and 'targets')")

  def __init__(self, config, mesh, workdir=None):
    super().__init__(config, mesh, workdir)
    self.images, self.targets = load_set(config.distill.set_export)
    self.model = build_learner(config, self.targets.shape[-1])
    self.batch = min(config.distill.pretrain_batch_size, len(self.images))

  def init_params(self, rng):
    return self.model.init({"params": rng}, jnp.zeros((1, *self.images.shape[1:])),
                           train=False)["params"]

  def loss_fn(self, params, extra, batch, rng):
    del batch  # The set is the data.
    idx = jax.random.permutation(rng, len(self.images))[:self.batch]
    x, y = jnp.asarray(self.images)[idx], jnp.asarray(self.targets)[idx]
    pred, _ = self.model.apply({"params": params}, x, train=True)
    loss = jnp.mean((pred.astype(jnp.float32) - y) ** 2)
    return loss, ({"mse": loss}, extra)

  def features(self, params, images):
    return self.model.apply({"params": params}, images, train=False)[1]["pre_logits"]

  def evaluators(self):
    return label_probe(self.config, self.mesh, self.features, train_limit=4000,
                       shots=self.config.distill.get("probe_shots", ()) or ())

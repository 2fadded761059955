"""Barlow Twins self-supervised pretraining (Zbontar et al. 2021): KRR-ST's target model g.

Two augmented views of each unlabelled image (labels in the batch are ignored) go through the
backbone (config.model_name / config.model with num_classes=0: the ConvNet or the ViT) and a
projector MLP; losses.barlow_twins_loss decorrelates the projections. After training, g(x) is
the *backbone* output (the projector is discarded, as in KRR-ST, whose targets are the
ResNet's 512-d features).

Param tree: the backbone's params at the top level (so a supervised transfer config loads them
by the same paths, skip_regex='^head/') plus 'ssl_projector/...'.
config.distill.ssl: projector_dims, offdiag_weight, and the view distribution (min_scale, flip,
jitter, grayscale_prob, noise; see augment.py). The evaluator is a closed-form linear probe of
the backbone features on config.input.label_key (monitoring only: training never sees labels).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax_transfer import augment, config as config_lib, data, losses
from jax_transfer.evaluators.linear_probe import label_probe
from jax_transfer.methods.base import Method
from jax_transfer.methods.supervised import build_model

PROJECTOR = "ssl_projector"
P = nn.with_logical_partitioning


class Projector(nn.Module):
  """Barlow Twins projector: (Dense -> LayerNorm -> relu) x (len(dims) - 1) -> Dense. LayerNorm
  stands in for the paper's BatchNorm (no mutable batch statistics in the loop)."""
  dims: tuple

  @nn.compact
  def __call__(self, x):
    for i, d in enumerate(self.dims):
      x = nn.Dense(d, name=f"dense_{i}",
                   kernel_init=P(nn.initializers.lecun_normal(), ("features", "mlp")),
                   bias_init=P(nn.initializers.zeros, ("mlp",)))(x)
      if i < len(self.dims) - 1:
        x = nn.relu(nn.LayerNorm(name=f"norm_{i}",
                                 scale_init=P(nn.initializers.ones, ("mlp",)),
                                 bias_init=P(nn.initializers.zeros, ("mlp",)))(x))
    return x


def view_kwargs(ssl_cfg) -> dict:
  return dict(min_scale=ssl_cfg.min_scale, flip=ssl_cfg.flip, jitter=ssl_cfg.jitter,
              grayscale_prob=ssl_cfg.grayscale_prob, noise=ssl_cfg.noise)


class BarlowTwins(Method):

  @staticmethod
  def validate_config(config):
    if config.model.get("num_classes", 0):
      raise config_lib.ConfigError(
          f"model.num_classes={config.model.num_classes} must be 0 for method=ssl: g(x) is "
          "the backbone's feature vector")
    if "distill" not in config or "ssl" not in config.distill:
      raise config_lib.ConfigError("method=ssl needs the config.distill.ssl section")
    if not config.distill.ssl.projector_dims:
      raise config_lib.ConfigError("distill.ssl.projector_dims must be non-empty")

  def __init__(self, config, mesh, workdir=None):
    super().__init__(config, mesh, workdir)
    self.backbone = build_model(config)
    self.projector = Projector(tuple(config.distill.ssl.projector_dims))
    self.image_shape = data.image_shape(config.input)

  def init_params(self, rng):
    k1, k2 = jax.random.split(rng)
    dummy = jnp.zeros((1, *self.image_shape), jnp.float32)
    params = dict(self.backbone.init({"params": k1}, dummy, train=False)["params"])
    feats = jax.eval_shape(lambda p: self.backbone.apply({"params": nn.unbox(p)}, dummy)[0],
                           params)
    params[PROJECTOR] = self.projector.init(
        k2, jnp.zeros(feats.shape, jnp.float32))["params"]
    return params

  def features(self, params, images):
    """g(x): backbone output [B, F] (projector not used)."""
    backbone = {k: v for k, v in params.items() if k != PROJECTOR}
    return self.backbone.apply({"params": backbone}, images, train=False)[0]

  def loss_fn(self, params, extra, batch, rng):
    k1, k2, k_drop = jax.random.split(rng, 3)
    kw = view_kwargs(self.config.distill.ssl)
    images = batch["image"]
    views = jnp.concatenate([augment.augment(k1, images, **kw),
                             augment.augment(k2, images, **kw)])  # [2B, H, W, C]
    backbone = {k: v for k, v in params.items() if k != PROJECTOR}
    feats, _ = self.backbone.apply({"params": backbone}, views, train=True,
                                   rngs={"dropout": k_drop})
    z = self.projector.apply({"params": params[PROJECTOR]}, feats)
    z1, z2 = jnp.split(z, 2)
    loss, metrics = losses.barlow_twins_loss(z1, z2, self.config.distill.ssl.offdiag_weight)
    return loss, (metrics, extra)

  def evaluators(self):
    return label_probe(self.config, self.mesh, self.features, train_limit=2000)

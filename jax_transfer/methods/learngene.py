"""TLEG auxiliary model (Xia et al. 2024): learn a learngene (θ_A, θ_B) by distillation.

The trained params are the learngene (models/learngene.py); the model that sees data is its
expansion to depth L_aux = config.model's depth (block i = θ_A + (i/L_aux)·θ_B), a platform ViT
with pool='gap' and no class token, as the paper's auxiliary model. Loss: soft distillation
from a frozen teacher export (config.learngene.teacher_dir, any supervised export),
(1−α)·CE + α·τ²·KL(teacher_τ ‖ student_τ); the paper uses α = 1, τ = 1.

The teacher's params live in the train state's `extra` (sharded by their logical names,
checkpointed with the run); load_extra fills them from the export on a fresh start.
Exporting this run (`python -m jax_transfer.export`) exports the learngene; a supervised run
with `config.init.export_dir` set to it starts from the learngene expanded to its own depth.

config.learngene: teacher_dir (export dir), alpha (0..1), temperature (> 0).
"""
from __future__ import annotations

import jax.numpy as jnp

from jax_transfer import checkpoint, config as config_lib, losses
from jax_transfer.methods.supervised import Supervised
from jax_transfer.models import learngene

KEYS = {"teacher_dir", "alpha", "temperature"}


class Learngene(Supervised):
  """Supervised's data, model building and evaluator; learngene params and distillation."""

  @staticmethod
  def validate_config(config):
    Supervised.validate_config(config)
    lg = config.get("learngene")
    if lg is None:
      raise config_lib.ConfigError("method=learngene needs a `learngene` section with "
                                   f"{sorted(KEYS)}")
    unknown = set(lg.keys()) - KEYS
    if unknown:
      raise config_lib.ConfigError(f"unknown config key learngene.{sorted(unknown)[0]}; "
                                   f"allowed: {sorted(KEYS)}")
    if not lg.get("teacher_dir"):
      raise config_lib.ConfigError("learngene.teacher_dir must name a teacher export "
                                   "(python -m jax_transfer.export of a supervised run)")
    if not 0.0 <= lg.alpha <= 1.0:
      raise config_lib.ConfigError(f"learngene.alpha={lg.alpha} must be in [0, 1]")
    if not lg.temperature > 0:
      raise config_lib.ConfigError(f"learngene.temperature={lg.temperature} must be > 0")
    if config.model_name != "vit" or config.model.get("pool") != "gap":
      raise config_lib.ConfigError("learngene: the auxiliary model is a ViT with "
                                   "model.pool='gap' (no class token, as in TLEG)")

  def __init__(self, config, mesh, workdir=None):
    super().__init__(config, mesh, workdir)
    self.depth = self.model.depth  # L_aux
    self.stacked = self.model.scan_layers  # expand into the aux model's (scan) layout
    lg = config.learngene
    # Rebuilt from the export's own config, so any supervised export is a valid teacher.
    self.teacher, self._teacher_params, tcfg = checkpoint.load_pretrained(lg.teacher_dir)
    if tcfg.model.get("num_classes") != config.model.num_classes:
      raise ValueError(f"learngene.teacher_dir={lg.teacher_dir!r} predicts "
                       f"{tcfg.model.get('num_classes')} classes, model.num_classes is "
                       f"{config.model.num_classes}")

  def _dummy(self):
    return jnp.zeros((1, *self.image_shape), jnp.float32)

  def init_params(self, rng):
    return learngene.init_learngene(self.model, rng, self._dummy())

  def init_extra(self, rng, params):
    # Random teacher of the export's shapes: gives the loop shapes and logical names (so the
    # teacher shards like any ViT); load_extra replaces the values on a fresh start.
    return {"teacher": self.teacher.init({"params": rng}, self._dummy(),
                                         train=False)["params"]}

  def load_extra(self, extra):
    teacher = checkpoint.merge_pretrained(
        extra["teacher"], self._teacher_params,
        source=f"teacher {self.config.learngene.teacher_dir}")
    return {"teacher": teacher}

  def loss_fn(self, params, extra, batch, rng):
    lg = self.config.learngene
    logits, _ = self.model.apply({"params": learngene.expand(params, self.depth, self.stacked)},
                                 batch["image"], train=True, rngs={"dropout": rng})
    teacher_logits, _ = self.teacher.apply({"params": extra["teacher"]}, batch["image"],
                                           train=False)
    loss, metrics = losses.soft_distillation_loss(
        logits, teacher_logits, batch["label"], alpha=lg.alpha, temperature=lg.temperature)
    metrics["accuracy"] = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return loss, (metrics, extra)

  def predict(self, params, images):
    return self.model.apply({"params": learngene.expand(params, self.depth, self.stacked)},
                            images, train=False)[0]

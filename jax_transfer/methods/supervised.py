"""Supervised image classification (ViT): pretraining, and transfer by fine-tuning or linear
probe (config.optimizer.trainable_regex='^head/') from an export (config.init).

Optional batch-level mixup / cutmix and label smoothing (timm's Mixup, batch mode; see
augment.mixup_cutmix), off unless set:
  config.mixup = dict(mixup_alpha=0.0, cutmix_alpha=0.0, prob=1.0, switch_prob=0.5,
                      label_smoothing=0.0)
With any of them on, the train loss is softmax cross-entropy against the soft targets; the
mix is keyed by fold_in(step rng, MIXUP_SALT) (dropout keeps the step rng), so a resumed run
draws the same mixes. With both alphas and label_smoothing 0 the loss is the integer-label
one, unchanged. Train accuracy stays argmax(logits) == the batch's own labels.

BatchNorm models (models/resnet.py): the 'batch_stats' collection is the method state,
extra = {'batch_stats': ...} (init_extra; boxed like the channels' params, so it shards,
checkpoints and resumes with the train state). loss_fn applies the model with train=True and
mutable=['batch_stats']: it normalises by the (micro)batch's statistics and returns the updated
running ones as the new extra, so with grad_accum_steps the running stats update once per
microbatch, in order, as sequential BN would. The batch is sharded over the mesh's data axes
under one jit (no pmap), so the batch mean / var are those of the whole global batch (XLA
all-reduces the partial sums): cross-replica (synchronised) BN, the same statistics on any
number of devices (tests/test_resnet_bn.py: 8 devices = 1). predict and the evaluator use the
running averages (train=False). An export carries them (batch_stats.safetensors); a fine-tune
from init.export_dir starts from the export's running statistics (load_extra, init.load_regex
/ skip_regex applied to their paths; init.adapter_dir's when that adapter export has them),
or from mean 0 / var 1 when the export has none. Models
without BatchNorm keep extra None, unchanged.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import optax

from jax_transfer import augment, checkpoint, config as config_lib, data, models
from jax_transfer.evaluators.classification import ClassificationEvaluator
from jax_transfer.methods.base import Method


def build_model(config):
  """The model named by config.model_name, with config.model's fields (dtype by name)."""
  from jax_transfer import peft  # pylint: disable=g-import-not-at-top
  return peft.wrap(models.get_model(config.model_name, **config_lib.model_kwargs(config.model)),
                   config)


MIXUP_DEFAULTS = dict(mixup_alpha=0.0, cutmix_alpha=0.0, prob=1.0, switch_prob=0.5,
                      label_smoothing=0.0)
MIXUP_SALT = 0x6D6978  # 'mix': fold_in constant of the mixup key (the step rng is dropout's).


def mixup_config(config) -> dict:
  """config.mixup (absent: off) merged over MIXUP_DEFAULTS; raises ConfigError on unknown keys
  or out-of-range values."""
  section = config.get("mixup")
  if section is None:
    return dict(MIXUP_DEFAULTS)
  given = section.to_dict() if isinstance(section, ml_collections.ConfigDict) else dict(section)
  unknown = sorted(set(given) - set(MIXUP_DEFAULTS))
  if unknown:
    raise config_lib.ConfigError(f"unknown config key(s) mixup.{unknown[0]}; allowed keys "
                                 f"here: {sorted(MIXUP_DEFAULTS)}")
  c = {**MIXUP_DEFAULTS, **given}
  for k, v in c.items():
    if isinstance(v, bool) or not isinstance(v, (int, float)):
      raise config_lib.ConfigError(f"config key 'mixup.{k}' must be float, got {v!r}")
  for k in ("mixup_alpha", "cutmix_alpha"):
    if c[k] < 0:
      raise config_lib.ConfigError(f"mixup.{k}={c[k]} must be >= 0")
  for k in ("prob", "switch_prob"):
    if not 0 <= c[k] <= 1:
      raise config_lib.ConfigError(f"mixup.{k}={c[k]} must be in [0, 1]")
  if not 0 <= c["label_smoothing"] < 1:
    raise config_lib.ConfigError(f"mixup.label_smoothing={c['label_smoothing']} must be in "
                                 f"[0, 1)")
  return {k: float(v) for k, v in c.items()}


class Supervised(Method):

  @staticmethod
  def validate_config(config):
    mixup_config(config)
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
    self.mixup = mixup_config(config)

  def _init_variables(self, rng):
    dummy = jnp.zeros((1, *self.image_shape), jnp.float32)
    return self.model.init({"params": rng}, dummy, train=False)

  def init_params(self, rng):
    return self._init_variables(rng)["params"]

  @functools.cached_property
  def has_batch_stats(self) -> bool:
    """Whether the model keeps BatchNorm running statistics (shapes only: eval_shape)."""
    return "batch_stats" in jax.eval_shape(self._init_variables, jax.random.key(0))

  def init_extra(self, rng, params):
    if not self.has_batch_stats:
      return None
    return {"batch_stats": models.resnet.box_batch_stats(self._init_variables(rng))}

  def load_extra(self, extra):
    init = self.config.init
    if extra is None or not init.export_dir:
      return extra
    stats = checkpoint.merge_batch_stats(jax.device_get(extra["batch_stats"]), init.export_dir,
                                         init.load_regex, init.skip_regex,
                                         adapter_dir=init.get("adapter_dir"))
    return {**extra, "batch_stats": stats}

  def _variables(self, params, extra):
    if extra is not None and "batch_stats" in extra:
      return {"params": params, "batch_stats": extra["batch_stats"]}
    return {"params": params}

  def train_apply(self, params, extra, images, rng):
    """The model's train-mode forward: (its outputs, extra), a BN model's running statistics in
    extra updated from this batch."""
    if self.has_batch_stats:
      outputs, updated = self.model.apply(self._variables(params, extra), images, train=True,
                                          rngs={"dropout": rng}, mutable=["batch_stats"])
      return outputs, {**extra, "batch_stats": updated["batch_stats"]}
    return self.model.apply({"params": params}, images, train=True, rngs={"dropout": rng}), extra

  def loss_fn(self, params, extra, batch, rng):
    m = self.mixup
    labels = batch["label"]  # The pipeline's (remapped) input.label_key column.
    images, targets = batch["image"], None
    if m["mixup_alpha"] > 0 or m["cutmix_alpha"] > 0 or m["label_smoothing"] > 0:
      targets = augment.smooth_one_hot(labels, self.config.model.num_classes,
                                       m["label_smoothing"])
      if m["mixup_alpha"] > 0 or m["cutmix_alpha"] > 0:
        images, targets = augment.mixup_cutmix(
            jax.random.fold_in(rng, MIXUP_SALT), images, targets,
            mixup_alpha=m["mixup_alpha"], cutmix_alpha=m["cutmix_alpha"], prob=m["prob"],
            switch_prob=m["switch_prob"])
    (logits, _), extra = self.train_apply(params, extra, images, rng)
    if targets is None:
      loss = optax.softmax_cross_entropy_with_integer_labels(
          logits.astype(jnp.float32), labels).mean()
    else:
      loss = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return loss, ({"accuracy": accuracy}, extra)

  def apply_eval(self, params, images, extra=None):
    """(logits, aux) in eval mode, aux['pre_logits'] the head's input (the features), with
    the running statistics of `extra` (a BN model's; None: no BatchNorm)."""
    return self.model.apply(self._variables(params, extra), images, train=False)

  def predict(self, params, images, extra=None):
    """Logits with the running statistics of `extra` (a BN model's; None: no BatchNorm)."""
    return self.apply_eval(params, images, extra)[0]

  def evaluators(self):
    """'eval' on input.dataset's eval.split, and one 'eval_<dataset>' per eval.datasets (the
    shifted target domains: train on the source, evaluate on each target); with
    eval.transfer_score, also a label-free 'transfer_<dataset>' per eval.datasets."""
    c = self.config
    inputs = {"eval": c.input}
    inputs.update({f"eval_{name}": config_lib.eval_input(c.input, name)
                   for name in c.eval.get("datasets") or ()})
    evs = [ClassificationEvaluator(self.predict, input_cfg, c.eval.split, c.eval.batch_size,
                                   self.mesh, c.eval_every_steps, name=name,
                                   with_extra=self.has_batch_stats)
           for name, input_cfg in inputs.items()]
    if c.eval.get("transfer_score"):
      from jax_transfer.evaluators import transfer_score  # pylint: disable=g-import-not-at-top
      evs += [transfer_score.for_method(self, name) for name in c.eval.get("datasets") or ()]
    return evs

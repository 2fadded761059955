"""Contrastive image-text pretraining: CLIP, ALIGN (softmax) and SigLIP (sigmoid).

config.contrastive:
  loss            'clip' | 'align' | 'siglip'
  chunked_loss    True: the memory-flat shard_map loss (text blocks travel around the batch
                  axes); False: the dense loss, XLA places the collectives.
  tokenizer_path  optional tokenizer.json to reuse (a trained word tokenizer, or an imported
                  checkpoint's own: jax_transfer.tokenizer.load_tokenizer reads both);
                  otherwise one is trained from the training captions. Saved as
                  workdir/tokenizer.json (export copies it and its asset file).
  zero_shot       {attribute: [prompt templates with '{}']} for the zero-shot evaluator; class
                  names come from the dataset's ClassLabel names.
  retrieval_limit / probe_train_limit / probe_shots: evaluator sizes.
  zero_shot_head  '' (default): the contrastive loss above. Else comma-separated zero_shot
                  attributes, e.g. 'color': train a classifier of each instead (the mean of
                  their cross-entropies on the batch's label columns), whose head is the
                  zero-shot classifier itself: the text tower's embeddings of the attribute's
                  prompts (every class name in each of its zero_shot templates, averaged over
                  templates and re-normalised, as ZeroShotEvaluator), logits
                  exp(logit_scale) * zimg @ head.T. With the text tower frozen
                  (optimizer.trainable_regex='^img': image tower and its projection) this is
                  the frozen zero-shot head of task-vector fine-tuning (Ilharco et al. 2023);
                  with it trainable the head moves with the text tower. Captions are unused.
Negatives come from the whole global batch, across all devices, for every loss.
"""
from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from jax_transfer import config as config_lib, data, losses, models, peft
from jax_transfer.evaluators.linear_probe import LinearProbeEvaluator
from jax_transfer.evaluators.retrieval import RetrievalEvaluator
from jax_transfer.evaluators.zero_shot import ZeroShotEvaluator
from jax_transfer.methods.base import Method
from jax_transfer.data.pipeline import nested_get
from jax_transfer.tokenizer import Tokenizer, load_tokenizer

TOKENIZER_FILE = "tokenizer.json"


def train_captions(input_cfg, limit: int = 100_000) -> list[str]:
  """Up to `limit` captions of the training split, decoded (the tokenizer's training text;
  for web-scale data pass contrastive.tokenizer_path instead)."""
  source = data.get_source(input_cfg.dataset, input_cfg.train_split, input_cfg.data_dir)
  out = []
  for i in range(min(len(source), limit)):
    c = nested_get(source[i], input_cfg.caption_key)
    if isinstance(c, (list, tuple, np.ndarray)) and np.ndim(c):
      out.extend(c)
    elif c is not None:
      out.append(c)
  if not out:
    raise config_lib.ConfigError(f"input.caption_key={input_cfg.caption_key!r}: no captions "
                                 f"in {input_cfg.dataset}[{input_cfg.train_split}]")
  return [c.decode() if isinstance(c, bytes) else str(c) for c in out]


def get_tokenizer(config, workdir: str | None) -> Tokenizer:
  """The run's tokenizer: the workdir's (resume), the configured file, or a new one trained
  on the training captions and saved to the workdir."""
  path = os.path.join(workdir, TOKENIZER_FILE) if workdir else None
  if path and os.path.exists(path):
    return load_tokenizer(path)
  if config.contrastive.tokenizer_path:
    tok = load_tokenizer(config.contrastive.tokenizer_path)
  else:
    tok = Tokenizer.train(train_captions(config.input), vocab_size=config.model.vocab_size,
                          context_length=config.model.context_length)
    logging.info("Trained a %d-token vocabulary on the training captions", tok.vocab_size)
  if tok.vocab_size > config.model.vocab_size:
    raise config_lib.ConfigError(
        f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's "
        f"{tok.vocab_size} tokens")
  if path and jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    tok.save(path)
  return tok


def head_attributes(config) -> list[str]:
  """contrastive.zero_shot_head as a list ([] for the contrastive loss)."""
  return [a.strip() for a in (config.contrastive.get("zero_shot_head") or "").split(",")
          if a.strip()]


def zero_shot_logits(zimg, logit_scale, classifier):
  """exp(logit_scale) * zimg @ classifier.T: [B, E] unit image embeddings against a [C, E]
  zero-shot classifier (the zero_shot_head loss and apply_zero_shot alike)."""
  return jnp.exp(logit_scale) * zimg @ classifier.T


class Contrastive(Method):

  @staticmethod
  def validate_config(config):
    c = config.get("contrastive")
    if c is None:
      raise config_lib.ConfigError("method='contrastive' needs a 'contrastive' config section")
    if c.loss not in losses.CONTRASTIVE_LOSSES:
      raise config_lib.ConfigError(f"contrastive.loss={c.loss!r} is unknown; allowed: "
                                   f"{sorted(losses.CONTRASTIVE_LOSSES)}")
    if config.model_name != "two_towers":
      raise config_lib.ConfigError(f"method='contrastive' needs model_name='two_towers', got "
                                   f"{config.model_name!r}")
    info = data.dataset_info(config.input.dataset, config.input.data_dir)
    attributes = info.get("attributes") or {}
    for key in c.zero_shot.keys():
      if key not in attributes:
        raise config_lib.ConfigError(f"contrastive.zero_shot.{key}: {config.input.dataset} has"
                                     f" no such label; allowed: {sorted(attributes)}")
    for key in head_attributes(config):
      if key not in c.zero_shot:
        raise config_lib.ConfigError(f"contrastive.zero_shot_head: {key!r} is not one of "
                                     f"contrastive.zero_shot's attributes {sorted(c.zero_shot)}"
                                     f" (its prompts make the head)")

  def __init__(self, config, mesh, workdir=None):
    super().__init__(config, mesh, workdir)
    self.model = peft.wrap(models.get_model(config.model_name,
                                            **config_lib.model_kwargs(config.model)), config)
    self.tokenizer = get_tokenizer(config, workdir)
    info = data.dataset_info(config.input.dataset, config.input.data_dir)
    self.attributes = info.get("attributes") or {}
    self.image_shape = data.image_shape(config.input)
    self.loss = losses.get_contrastive_loss(config.contrastive.loss,
                                            chunked=config.contrastive.chunked_loss, mesh=mesh)
    # zero_shot_head: {attribute: (prompt tokens [C * T, L], T)}, class-major as the evaluator.
    self.heads = {}
    for key in head_attributes(config):
      templates = list(config.contrastive.zero_shot[key])
      prompts = [t.format(name) for name in self.attributes[key] for t in templates]
      self.heads[key] = (np.asarray(self.tokenizer.encode(prompts)), len(templates))

  def host_batch(self, batch):
    if self.heads:
      return {"image": batch["image"], **{k: np.asarray(batch[k], np.int32) for k in self.heads}}
    captions = [c.decode() if isinstance(c, bytes) else str(c) for c in batch["caption"]]
    return {"image": batch["image"], "tokens": self.tokenizer.encode(captions)}

  def init_params(self, rng):
    images = jnp.zeros((1, *self.image_shape), jnp.float32)
    tokens = jnp.zeros((1, self.config.model.context_length), jnp.int32)
    return self.model.init({"params": rng}, images, tokens)["params"]

  def zero_shot_head(self, params, key):
    """[C, E]: the zero-shot classifier of attribute `key` (contrastive.zero_shot_head)."""
    tokens, t = self.heads[key]
    z = self.encode_text(params, tokens)
    z = z.reshape(z.shape[0] // t, t, -1).mean(axis=1)
    return z * jax.lax.rsqrt(jnp.sum(z * z, axis=-1, keepdims=True))

  def loss_fn(self, params, extra, batch, rng):
    if self.heads:
      (zimg, _), aux = self.model.apply({"params": params}, batch["image"], None, train=True,
                                        rngs={"dropout": rng})
      metrics, total = {}, 0.0
      for key in self.heads:
        logits = zero_shot_logits(zimg, aux["logit_scale"], self.zero_shot_head(params, key))
        labels = batch[key]
        ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))
        metrics[f"{key}_acc"] = jnp.mean(jnp.argmax(logits, -1) == labels)
        total = total + ce / len(self.heads)
      return total, (metrics, extra)
    (zimg, ztxt), aux = self.model.apply({"params": params}, batch["image"], batch["tokens"],
                                         train=True, rngs={"dropout": rng})
    loss, metrics = self.loss(zimg, ztxt, aux["logit_scale"], aux["logit_bias"])
    return loss, (metrics, extra)  # metrics: i2t_acc, t2i_acc, scale (and bias for SigLIP).

  def after_update(self, params):
    # CLIP/ALIGN: keep exp(t) in [1, 100] after every update, as open_clip does.
    if self.config.contrastive.loss in ("clip", "align"):
      params = dict(params, logit_scale=losses.clamp_logit_scale(params["logit_scale"]))
    return params

  # ------------------------------------------------------------------------------ Evaluators.
  def encode_image(self, params, images):
    return self.model.apply({"params": params}, images, method=self.model.encode_image)

  def apply_zero_shot(self, params, images, classifier):
    """(logits [B, C], aux) of the zero-shot classifier `classifier` [C, E] (unit rows:
    zero_shot.class_embeddings): logits exp(logit_scale) * zimg @ classifier.T, as the
    zero_shot_head loss; aux['pre_logits'] the pooled image features before img_proj (what a
    classifier on the exported image tower, export.export_tower, takes as its head input)."""
    (zimg, _), aux = self.model.apply({"params": params}, images, None)
    logits = zero_shot_logits(zimg, aux["logit_scale"], jnp.asarray(classifier, zimg.dtype))
    return logits, {"pre_logits": aux["img_features"]}

  def encode_text(self, params, tokens):
    return self.model.apply({"params": params}, tokens, method=self.model.encode_text)

  def encode_pair(self, params, images, tokens):
    return jnp.stack([self.encode_image(params, images), self.encode_text(params, tokens)], 1)

  def evaluators(self):
    c, cc = self.config, self.config.contrastive
    common = dict(input_cfg=c.input, batch_size=c.eval.batch_size, mesh=self.mesh,
                  every_steps=c.eval_every_steps)
    evs = []
    if cc.zero_shot:
      attributes = {k: (self.attributes[k], list(v)) for k, v in cc.zero_shot.items()}
      evs.append(ZeroShotEvaluator(image_fn=self.encode_image, text_fn=self.encode_text,
                                   tokenizer=self.tokenizer, split=c.eval.split,
                                   attributes=attributes, **common))
    if cc.retrieval_limit:
      evs.append(RetrievalEvaluator(
          pair_fn=self.encode_pair, split=c.eval.split, limit=cc.retrieval_limit,
          tokenize=lambda caps: self.tokenizer.encode(
              [x.decode() if isinstance(x, bytes) else str(x) for x in caps]),
          relevance_keys=tuple(self.attributes), **common))
    if cc.probe_train_limit:
      evs.append(LinearProbeEvaluator(
          image_fn=self.encode_image, train_split=c.input.train_split, test_split=c.eval.split,
          label_keys={k: len(v) for k, v in self.attributes.items()},
          shots=tuple(cc.probe_shots), train_limit=cc.probe_train_limit, **common))
    return evs

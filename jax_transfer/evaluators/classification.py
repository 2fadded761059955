"""Top-1 accuracy and mean cross-entropy of a classifier over a whole eval split."""
from __future__ import annotations

import jax
import numpy as np

from jax_transfer.evaluators.common import embed_split


class ClassificationEvaluator:
  """Every example of `split` is counted once (padding is dropped by embed_split).

  predict_fn(params, images) -> logits [B, num_classes]; labels are the pipeline's 'label'
  column (input.label_key, remapped when input.classes is set). with_extra=True: the method
  state is passed on, predict_fn(params, images, extra) (a BatchNorm model's running
  statistics, extra['batch_stats']); run(params) then passes extra=None.
  """

  def __init__(self, predict_fn, input_cfg, split: str, batch_size: int, mesh, every_steps,
               name: str = "eval", with_extra: bool = False):
    self.name, self.every_steps = name, every_steps
    self._input, self._split, self._mesh, self._batch_size = input_cfg, split, mesh, batch_size
    self._with_extra = with_extra
    if with_extra:  # (params, extra) travel together as embed_split's `params`.
      self._logits = jax.jit(lambda pe, images: predict_fn(pe[0], images, pe[1]))
    else:
      self._logits = jax.jit(lambda p, images: predict_fn(p, images))

  def run(self, params, extra=None) -> dict:
    if self._with_extra:
      params = (params, extra)
    emb = embed_split(self._logits, params, self._input, self._split, self._batch_size,
                      self._mesh, inputs=lambda b: {"images": b["image"]}, keep=("label",))
    return accuracy_and_loss(emb["out"], emb["label"])


def accuracy_and_loss(logits, labels) -> dict:
  """{'accuracy', 'loss' (mean cross-entropy)} of logits [N, C] against int labels [N], in
  float64 on the host."""
  logits = np.asarray(logits, np.float64)
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  loss = logz - np.take_along_axis(logits, labels[:, None], -1)[:, 0]
  return {"accuracy": float(np.mean(logits.argmax(-1) == labels)), "loss": float(loss.mean())}

"""Top-1 accuracy and mean cross-entropy of a classifier over a whole eval split."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_transfer import data, parallel


class ClassificationEvaluator:
  """Every example of `split` is counted once: padded examples carry mask=False.

  predict_fn(params, images) -> logits [B, num_classes].
  """

  def __init__(self, predict_fn, input_cfg, split: str, batch_size: int, mesh, every_steps,
               name: str = "eval"):
    self.name, self.every_steps = name, every_steps
    self._input, self._split, self._mesh = input_cfg, split, mesh
    self._batch_size = batch_size

    def counts(params, batch):
      logits = predict_fn(params, batch["image"])
      labels, mask = batch["label"], batch["mask"]  # 'label': input.label_key, remapped.
      correct = (jnp.argmax(logits, -1) == labels) & mask
      loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
      return jnp.sum(correct), jnp.sum(jnp.where(mask, loss, 0.0)), jnp.sum(mask)
    self._counts = jax.jit(counts)

  def run(self, params, extra=None) -> dict:
    del extra
    total = np.zeros(3)
    for local in data.make_eval_iterator(
        self._input, self._split, batch_size=self._batch_size,
        process_index=jax.process_index(), process_count=jax.process_count()):
      local = {k: local[k] for k in ("image", "label", "mask")}
      batch = parallel.global_batch(local, self._mesh)
      total += np.array([float(x) for x in self._counts(params, batch)])
    correct, loss, n = total
    return {"accuracy": correct / n, "loss": loss / n}

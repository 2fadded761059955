"""Zero-shot classification with a two-tower model (CLIP-style prompt ensembles).

For each attribute (label key), every class name is put into each prompt template, the text
embeddings of a class are averaged over templates and re-normalised (Radford et al. 2021,
sec. 3.1.4), and an image is assigned the class with the highest cosine similarity.
"""
from __future__ import annotations

import jax
import numpy as np

from jax_transfer.evaluators.common import embed_split, to_host


def class_embeddings(text_fn, params, tokenizer, class_names, templates) -> np.ndarray:
  """[C, E]: mean over templates of the normalised prompt embeddings, re-normalised.
  text_fn: jitted (params, tokens [N, L]) -> [N, E]."""
  prompts = [t.format(name) for name in class_names for t in templates]
  z = to_host(text_fn(params, tokenizer.encode(prompts))).astype(np.float64)
  z = z.reshape(len(class_names), len(templates), -1).mean(axis=1)
  return z / np.linalg.norm(z, axis=-1, keepdims=True)


class ZeroShotEvaluator:
  """attributes: {label_key: (class_names, templates)}; reports `<label_key>_accuracy`
  (and `mean_accuracy`) on `split`."""

  def __init__(self, *, image_fn, text_fn, tokenizer, input_cfg, split, batch_size, mesh,
               attributes: dict, every_steps: int, name: str = "zero_shot", limit=None):
    self.name, self.every_steps = name, every_steps
    self._image_fn = jax.jit(lambda p, images: image_fn(p, images))
    self._text_fn, self._tokenizer = jax.jit(text_fn), tokenizer
    self._input, self._split, self._bs, self._mesh = input_cfg, split, batch_size, mesh
    self._attributes, self._limit = attributes, limit

  def run(self, params, extra=None) -> dict:
    del extra
    emb = embed_split(self._image_fn, params, self._input,
                      self._split, self._bs, self._mesh,
                      inputs=lambda b: {"images": b["image"]}, keep=tuple(self._attributes),
                      limit=self._limit)
    results = {}
    for key, (names, templates) in self._attributes.items():
      zc = class_embeddings(self._text_fn, params, self._tokenizer, names, templates)
      pred = np.argmax(emb["out"].astype(np.float64) @ zc.T, axis=-1)
      results[f"{key}_accuracy"] = float(np.mean(pred == emb[key]))
    results["mean_accuracy"] = float(np.mean(list(results.values())))
    return results

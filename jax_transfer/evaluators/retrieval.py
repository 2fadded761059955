"""Image->text and text->image retrieval recall@k over paired eval examples.

A retrieved item counts as correct when it is relevant to the query: by default only the
query's own pair; with `relevance_keys` (e.g. the shapes_captions attributes), any item whose
labels all equal the query's, because many images there share one description.
"""
from __future__ import annotations

import jax
import numpy as np

from jax_transfer.evaluators.common import embed_split

KS = (1, 5, 10)


def recall_at_k(sim: np.ndarray, relevant: np.ndarray, ks=KS) -> dict:
  """sim, relevant: [Q, N]. Fraction of queries with a relevant item among the top k."""
  order = np.argsort(-sim, axis=1, kind="stable")
  hits = np.take_along_axis(relevant, order, axis=1)
  return {k: float(np.mean(hits[:, :k].any(axis=1))) for k in ks}


class RetrievalEvaluator:

  def __init__(self, *, pair_fn, tokenize, input_cfg, split, batch_size, mesh, every_steps,
               relevance_keys=(), limit: int = 1000, name: str = "retrieval"):
    """pair_fn(params, images, tokens) -> [B, 2, E] (normalised image, text embeddings)."""
    self.name, self.every_steps = name, every_steps
    self._pair_fn, self._tokenize = jax.jit(pair_fn), tokenize
    self._input, self._split, self._bs, self._mesh = input_cfg, split, batch_size, mesh
    self._keys, self._limit = tuple(relevance_keys), limit

  def run(self, params, extra=None) -> dict:
    del extra
    emb = embed_split(self._pair_fn, params, self._input, self._split, self._bs, self._mesh,
                      inputs=lambda b: {"images": b["image"],
                                        "tokens": self._tokenize(b["caption"])},
                      keep=self._keys, limit=self._limit)
    zi, zt = emb["out"][:, 0].astype(np.float64), emb["out"][:, 1].astype(np.float64)
    n = len(zi)
    relevant = np.eye(n, dtype=bool)
    if self._keys:
      labels = np.stack([emb[k] for k in self._keys], axis=1)
      relevant = (labels[:, None, :] == labels[None, :, :]).all(-1)
    sim = zi @ zt.T
    out = {}
    for direction, s, r in (("i2t", sim, relevant), ("t2i", sim.T, relevant.T)):
      for k, v in recall_at_k(s, r).items():
        out[f"{direction}_R{k}"] = v  # R1 = recall@1 (TensorBoard rejects "@")
    return out

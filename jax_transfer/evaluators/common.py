"""Running a jitted function over a whole eval split and bringing the results to the host;
loading an export to evaluate."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jax_transfer import data, parallel


def to_host(x) -> np.ndarray:
  """A global jax.Array (sharded over processes or not) -> the whole value as numpy on every
  process. np.asarray alone fails for arrays other processes hold parts of."""
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def embed_split(jfn: Callable, params, input_cfg, split: str, batch_size: int, mesh, *,
                inputs: Callable[[dict], dict], keep: tuple[str, ...] = (),
                limit: int | None = None) -> dict[str, np.ndarray]:
  """Applies the jitted `jfn(params, **inputs(batch))` (global batches) to every example of
  `split`; returns {'out': [N, ...]} plus the numeric columns named in `keep` ('label',
  'shape', ...), padding removed, in dataset order, gathered from every process. `inputs`
  turns a host batch into the model's numeric inputs (e.g. tokenises captions). `limit` stops
  after that many examples. Callers jit `jfn` once (in their __init__), so repeated
  evaluations reuse the compiled function."""
  outs, cols, seen = [], {k: [] for k in keep}, 0
  normalise = data.normaliser(input_cfg, train=False)  # uint8 -> value range, on device.
  for local in data.make_eval_iterator(input_cfg, split, batch_size=batch_size,
                                       process_index=jax.process_index(),
                                       process_count=jax.process_count()):
    batch = normalise(parallel.global_batch(inputs(local), mesh))
    host = jax.tree.map(to_host, parallel.global_batch(
        {k: np.asarray(local[k]) for k in ("mask", *keep)}, mesh))
    mask = host["mask"]
    outs.append(to_host(jfn(params, **batch))[mask])
    for k in keep:
      cols[k].append(host[k][mask])
    seen += int(mask.sum())
    if limit is not None and seen >= limit:
      break
  result = {"out": np.concatenate(outs)[:limit]}
  result.update({k: np.concatenate(v)[:limit] for k, v in cols.items()})
  return result


class HeadOutputs:
  """The head's logits [N, C] and its input features [N, D] of every example of a split:
  apply_fn(params, images[, extra]) -> (logits, aux) with aux['pre_logits'] (models/vit.py,
  models/resnet.py; a supervised method's apply_eval); with_extra=True passes the method
  state (BN running statistics). Jitted once, at construction."""

  def __init__(self, apply_fn: Callable, with_extra: bool = False):
    def both(pe, images):
      logits, aux = apply_fn(pe[0], images, pe[1]) if with_extra else apply_fn(pe[0], images)
      return jnp.concatenate([logits.astype(jnp.float32),
                              aux["pre_logits"].astype(jnp.float32)], -1)
    self._both = jax.jit(both)

  def __call__(self, params, extra, num_classes: int, input_cfg, split: str, batch_size: int,
               mesh, keep: tuple[str, ...] = (), limit: int | None = None):
    """(logits, features, {column: [N]} of `keep`); only the image column is fed."""
    emb = embed_split(self._both, (params, extra), input_cfg, split, batch_size, mesh,
                      inputs=lambda b: {"images": b["image"]}, keep=keep, limit=limit)
    out = emb.pop("out")
    return out[:, :num_classes], out[:, num_classes:], emb


def load_export(export_dir: str, data_dir: str | None = None, devices=None):
  """(method, params, extra) of an export, for an evaluator to run: the method as
  merge.export_method builds it (per-block layout, the export's tokenizer, its data read from
  `data_dir` when given), on the export config's mesh over `devices`; extra is
  {'batch_stats': ...} for a BN model whose export has its running statistics, else None."""
  from jax_transfer import checkpoint, merge
  _, method = merge.export_method(export_dir, data_dir=data_dir, devices=devices)
  stats = checkpoint.load_export_batch_stats(export_dir)
  extra = {"batch_stats": stats} if method.has_batch_stats and stats is not None else None
  return method, checkpoint.load_export_params(export_dir), extra

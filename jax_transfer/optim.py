"""Optimisers and learning-rate schedules from the config (optax).

config.optimizer: name (adamw | sgd | lamb), lr, weight_decay, b1, b2, momentum,
  grad_clip_norm (0 = off), wd_exclude_regex (params matched get no weight decay: biases,
  norms, embeddings by default), trainable_regex (params not matched are frozen: a linear probe
  sets '^head/').
Both regexes are written against the canonical per-block paths ('encoderblock_{i}/...'), also
for a model.scan_layers=True model, whose stacked 'encoderblocks/...' leaves are matched block by
block: a regex must then select all of a stack's blocks or none (MaskError otherwise).
config.schedule: name (cosine | linear | constant), warmup_steps, end_lr_ratio.
"""
from __future__ import annotations

import re

import flax
import optax

from jax_transfer.models.vit import STACKED, block_name

OPTIMIZERS = ("adamw", "sgd", "lamb")
SCHEDULES = ("cosine", "linear", "constant")


def make_schedule(opt_cfg, sched_cfg, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to lr, then cosine / linear decay to lr * end_lr_ratio."""
  lr, warmup = opt_cfg.lr, min(sched_cfg.warmup_steps, total_steps)
  end = lr * sched_cfg.end_lr_ratio
  decay_steps = max(total_steps - warmup, 1)
  if sched_cfg.name == "cosine":
    decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=sched_cfg.end_lr_ratio)
  elif sched_cfg.name == "linear":
    decay = optax.linear_schedule(lr, end, decay_steps)
  else:
    decay = optax.constant_schedule(lr)
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


class MaskError(ValueError):
  """A mask regex that selects only some of the blocks of a scanned (stacked) subtree."""


def _block_paths(path: str, leaf) -> list[str]:
  """The canonical paths a '/'-joined param path stands for: itself, or for a leaf of a scanned
  stack ('.../encoderblocks/...', leading layer axis L) '.../encoderblock_{i}/...' for i < L.
  Leaves may be arrays, tracers, ShapeDtypeStructs or boxed (nn.Partitioned). One without a
  shape (optax's MaskedNode for a param another label owns) keeps its path: its answer is
  unused."""
  parts = path.split("/")
  if STACKED not in parts:
    return [path]
  if isinstance(leaf, flax.core.meta.AxisMetadata):
    leaf = leaf.unbox()
  shape = getattr(leaf, "shape", None)
  if not shape:
    return [path]
  return ["/".join(block_name(i) if p == STACKED else p for p in parts)
          for i in range(shape[0])]


def _path_mask(params, regex: str, match_value: bool, key: str = "regex",
               purpose: str = "selected"):
  """Pytree of bools: `match_value` where the '/'-joined param path matches `regex`. Paths are
  the canonical per-block ones: a scan-stacked leaf gets the answer all of its blocks give, and
  a regex that answers differently for different blocks of one stack raises MaskError (`key`
  and `purpose` word its message)."""
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  pattern = re.compile(regex)
  mask = {}
  for k, leaf in flat.items():
    hits = [bool(pattern.search(p)) for p in _block_paths(k, leaf)]
    if len(set(hits)) > 1:
      some = [i for i, hit in enumerate(hits) if hit]
      raise MaskError(
          f"{key}={regex!r} matches blocks {some} of the {len(hits)} stacked in {k!r} but not "
          f"the others; part of a scanned stack cannot be {purpose} separately: set "
          f"model.scan_layers=False for that, or select whole stacks")
    mask[k] = hits[0] == match_value
  return flax.traverse_util.unflatten_dict(mask, sep="/")


def trainable_paths(params, opt_cfg):
  """The '/'-paths of the params optimizer.trainable_regex trains, or None when it trains all
  (the default '.*'). The train step takes gradients with respect to these only, so frozen
  weights cost no backward pass (their weight gradients are never formed)."""
  if opt_cfg.trainable_regex in ("", ".*"):
    return None
  mask = _path_mask(params, opt_cfg.trainable_regex, True, key="optimizer.trainable_regex",
                    purpose="frozen")
  return frozenset(k for k, v in flax.traverse_util.flatten_dict(mask, sep="/").items() if v)


def make_optimizer(opt_cfg, sched_cfg, total_steps: int):
  """Returns (optax transformation, schedule). The transformation is a function of the param
  tree only through masks, built lazily so it works with abstract (eval_shape) params."""
  schedule = make_schedule(opt_cfg, sched_cfg, total_steps)
  wd_mask = lambda p: _path_mask(p, opt_cfg.wd_exclude_regex, match_value=False,
                                 key="optimizer.wd_exclude_regex",
                                 purpose="excluded from weight decay")
  if opt_cfg.name == "adamw":
    tx = optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2,
                     weight_decay=opt_cfg.weight_decay, mask=wd_mask)
  elif opt_cfg.name == "sgd":
    tx = optax.chain(optax.add_decayed_weights(opt_cfg.weight_decay, mask=wd_mask),
                     optax.sgd(schedule, momentum=opt_cfg.momentum or None, nesterov=False))
  elif opt_cfg.name == "lamb":
    tx = optax.lamb(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2,
                    weight_decay=opt_cfg.weight_decay, mask=wd_mask)
  else:
    raise ValueError(f"optimizer.name={opt_cfg.name!r} is unknown; allowed: {OPTIMIZERS}")
  parts = []
  if opt_cfg.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(opt_cfg.grad_clip_norm))
  parts.append(tx)
  tx = optax.chain(*parts)
  if opt_cfg.trainable_regex not in ("", ".*"):
    # Frozen params get zero updates and no optimiser state (optax.multi_transform).
    labels = lambda p: flax.traverse_util.unflatten_dict(
        {k: ("train" if v else "freeze") for k, v in flax.traverse_util.flatten_dict(
            _path_mask(p, opt_cfg.trainable_regex, True, key="optimizer.trainable_regex",
                       purpose="frozen"), sep="/").items()}, sep="/")
    tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
  return tx, schedule

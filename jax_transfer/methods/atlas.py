"""aTLAS (Zhang et al. 2024, "Knowledge Composition using Task Vectors with Learned Anisotropic
Scaling"): task vectors combined with one learned coefficient per parameter tensor per task,

  θ = θ_0 + Σ_t λ_t[p] · τ_t[p]     for every parameter tensor p,   τ_t = θ_t − θ_0,

the λ trained on the target task's data through the shared loop with the wrapped method's own
loss (config.atlas.method: 'supervised', 'contrastive', ...; the rest of the config is that
method's, its model the base export's). The coefficients are the ONLY trainable parameters
(init 0: training starts from θ_0); θ_0 and the stacked task vectors [T, ...] live in the
method's frozen state (`extra`), sharded like the parameters they belong to (the task axis
whole), checkpointed with the run, and read from the exports once, on a fresh start, shard by
shard. Parameters matching atlas.skip_regex (default the head: each task's head is its own)
are θ_0's. `python -m jax_transfer.export` of an aTLAS run writes the merged θ as a plain
export of the wrapped method (config.method = atlas.method), which any method loads.

Config (ml_collections_configs/merging/atlas.py builds one from exports):
  method = 'atlas'
  atlas.method      the wrapped method (default 'supervised')
  atlas.base        the pre-trained export θ_0
  atlas.tasks       the fine-tuned exports θ_t (a list; each fine-tuned from atlas.base)
  atlas.skip_regex  parameters taken from θ_0 and not composed (default '^head/')
"""
from __future__ import annotations

import re

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jax_transfer import config as config_lib
from jax_transfer.methods.base import Method


def _flat(tree):
  return flax.traverse_util.flatten_dict(tree, sep="/")


def _unflat(flat):
  return flax.traverse_util.unflatten_dict(flat, sep="/")


def inner_config(config):
  """The wrapped method's config: this one with method = atlas.method, without atlas."""
  import ml_collections
  c = ml_collections.ConfigDict(config.to_dict())
  c.method = config.atlas.get("method", "supervised")
  del c["atlas"]
  return c


def compose(extra, coef):
  """θ from θ_0 (extra['base']), the task vectors (extra['taus'], [T, ...] per composed path)
  and the coefficients (coef, [T] per composed path)."""
  base, taus, lam = _flat(extra["base"]), _flat(extra["taus"]), _flat(coef)
  out = dict(base)
  for k, tau in taus.items():
    out[k] = base[k] + jnp.tensordot(lam[k].astype(tau.dtype), tau, axes=1)
  return _unflat(out)


class _Composed:
  """An inner evaluator run on the composed θ."""

  def __init__(self, ev):
    self.ev, self.name, self.every_steps = ev, ev.name, ev.every_steps

  def run(self, params, extra=None):
    return self.ev.run(compose(extra, params), None)


class Atlas(Method):

  @staticmethod
  def validate_config(config) -> None:
    from jax_transfer import merge, methods
    a = config.get("atlas")
    if a is None:
      raise config_lib.ConfigError("method='atlas' needs a config.atlas section "
                                   "(ml_collections_configs/merging/atlas.py)")
    tasks = list(a.get("tasks") or [])
    if not a.get("base") or not tasks:
      raise config_lib.ConfigError(f"atlas.base={a.get('base')!r} and atlas.tasks={tasks!r}: "
                                   f"both are needed (the pre-trained export and >= 1 "
                                   f"fine-tuned export)")
    allowed = sorted(set(methods.METHODS) - {"atlas"})
    if a.get("method", "supervised") not in allowed:
      raise config_lib.ConfigError(f"atlas.method={a.get('method')!r}; allowed: {allowed}")
    if (config.get("peft") or {}).get("method", "none") != "none" or (
        config.optimizer.trainable_regex not in ("", ".*")):
      raise config_lib.ConfigError("method='atlas' trains its coefficients only: leave "
                                   "peft.method and optimizer.trainable_regex unset")
    try:
      re.compile(a.get("skip_regex", "^head/"))
      merge.check_mergeable(a.base, tasks, a.get("skip_regex", "^head/"))
    except (merge.MergeError, FileNotFoundError, re.error) as e:
      raise config_lib.ConfigError(f"atlas: {' '.join(str(e).split())}") from None
    inner = methods.get_method(a.get("method", "supervised"))
    inner.validate_config(inner_config(config))

  def __init__(self, config, mesh, workdir=None):
    super().__init__(config, mesh, workdir)
    from jax_transfer import methods
    self.inner = methods.get_method(config.atlas.get("method", "supervised"))(
        inner_config(config), mesh, workdir)
    self.tasks = list(config.atlas.tasks)
    self.skip = re.compile(config.atlas.get("skip_regex", "^head/"))

  def host_batch(self, batch):
    return self.inner.host_batch(batch)

  def _boxed(self, rng):
    return _flat(jax.eval_shape(self.inner.init_params, rng))

  def _composed_paths(self, boxed):
    return sorted(k for k in boxed if not self.skip.search(k))

  def init_params(self, rng):
    boxed = self._boxed(rng)
    t = len(self.tasks)
    return _unflat({k: nn.Partitioned(jnp.zeros((t,), jnp.float32), (None,))
                    for k in self._composed_paths(boxed)})

  def init_extra(self, rng, params):
    del params
    boxed = self._boxed(rng)
    t = len(self.tasks)

    def zeros(b, lead=()):
      names = b.names if isinstance(b, nn.Partitioned) else (None,) * len(b.value.shape)
      v = b.value if isinstance(b, nn.Partitioned) else b
      return nn.Partitioned(jnp.zeros(lead + tuple(v.shape), v.dtype), (None,) * len(lead)
                            + tuple(names))
    base = {k: zeros(b) for k, b in boxed.items()}
    taus = {k: zeros(boxed[k], (t,)) for k in self._composed_paths(boxed)}
    return {"base": _unflat(base), "taus": _unflat(taus)}

  def load_extra(self, extra):
    """θ_0 and the task vectors from the exports, each leaf read shard by shard onto the
    shardings of the zeros init_extra made."""
    from jax_transfer import merge
    base_flat, tau_flat = _flat(extra["base"]), _flat(extra["taus"])
    theta0 = merge.load_sharded(self.config.atlas.base, list(base_flat),
                                {k: v.sharding for k, v in base_flat.items()})
    theta0 = {k: v.astype(base_flat[k].dtype) for k, v in theta0.items()}
    def without_task_axis(sh):
      if isinstance(sh, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sh.mesh, jax.sharding.PartitionSpec(*sh.spec[1:]))
      return sh  # one device
    one_task = {k: without_task_axis(v.sharding) for k, v in tau_flat.items()}
    per_task = [merge.load_sharded(d, list(tau_flat), one_task) for d in self.tasks]
    taus = {}
    for k, v in tau_flat.items():
      diff = jax.jit(lambda b, *ts, dtype=v.dtype: jnp.stack([t - b for t in ts]).astype(dtype),
                     out_shardings=v.sharding)
      taus[k] = diff(theta0[k], *[p[k] for p in per_task])
    return {"base": _unflat(theta0), "taus": _unflat(taus)}

  def loss_fn(self, params, extra, batch, rng):
    loss, (metrics, _) = self.inner.loss_fn(compose(extra, params), None, batch, rng)
    lam = jnp.stack([v for v in jax.tree.leaves(params)])  # [P, T]
    metrics = dict(metrics, coef_mean=jnp.mean(lam), coef_abs_max=jnp.max(jnp.abs(lam)))
    return loss, (metrics, extra)

  def evaluators(self):
    return [_Composed(ev) for ev in self.inner.evaluators()]


def export_view(state, config):
  """(θ, config) of an aTLAS run's restored state for `python -m jax_transfer.export`: the
  composed parameters (host numpy) and the wrapped method's config, with `atlas_source`
  recording the base, the tasks and the learned coefficients' summary."""
  params, extra = state["params"], state["extra"]
  theta = jax.tree.map(np.asarray, jax.device_get(compose(extra, params)))
  c = inner_config(config)
  lam = np.stack([np.asarray(v) for v in jax.tree.leaves(jax.device_get(params))])  # [P, T]
  c.atlas_source = dict(base=config.atlas.base, tasks=list(config.atlas.tasks),
                        coef_mean_per_task=[float(x) for x in lam.mean(0)])
  return theta, c

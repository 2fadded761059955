"""Optimisers, schedules and masks from the config (jax_transfer/optim.py), without the loop."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jax_transfer import config as config_lib, optim


def _params():
  return {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones((3,))},
          "head": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones((2,))}}


def _loss(p):  # Minimum at 0 for every leaf.
  return sum(jnp.sum(x ** 2) for x in jax.tree.leaves(p))


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_each_optimizer_descends(name):
  c = config_lib.base_config()
  c.optimizer.name, c.optimizer.lr, c.schedule.warmup_steps = name, 0.05, 0
  tx, _ = optim.make_optimizer(c.optimizer, c.schedule, total_steps=50)
  p, state = _params(), None
  state = tx.init(p)
  start = float(_loss(p))
  for _ in range(20):
    updates, state = tx.update(jax.grad(_loss)(p), state, p)
    p = optax.apply_updates(p, updates)
  assert float(_loss(p)) < 0.8 * start


def test_warmup_then_cosine_schedule():
  c = config_lib.base_config()
  c.optimizer.lr, c.schedule.warmup_steps, c.schedule.end_lr_ratio = 1.0, 10, 0.1
  _, schedule = optim.make_optimizer(c.optimizer, c.schedule, total_steps=110)
  np.testing.assert_allclose([schedule(0), schedule(5), schedule(10), schedule(110)],
                             [0.0, 0.5, 1.0, 0.1], atol=1e-6)


def test_frozen_params_do_not_move_and_weight_decay_skips_biases():
  c = config_lib.base_config()
  c.optimizer.name, c.optimizer.lr, c.optimizer.weight_decay = "sgd", 0.1, 0.5
  c.optimizer.momentum, c.optimizer.grad_clip_norm = 0.0, 0.0
  c.optimizer.trainable_regex, c.schedule.warmup_steps = "^head/", 0
  c.schedule.name = "constant"
  tx, _ = optim.make_optimizer(c.optimizer, c.schedule, total_steps=10)
  p = _params()
  zero_grads = jax.tree.map(jnp.zeros_like, p)
  updates, _ = tx.update(zero_grads, tx.init(p), p)
  new = optax.apply_updates(p, updates)
  np.testing.assert_array_equal(new["dense"]["kernel"], p["dense"]["kernel"])  # Frozen.
  np.testing.assert_allclose(new["head"]["kernel"], 1 - 0.1 * 0.5)  # Decayed (zero grads).
  np.testing.assert_array_equal(new["head"]["bias"], p["head"]["bias"])  # No decay on biases.

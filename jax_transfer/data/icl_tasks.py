"""GPICL task sampler (Kirsch et al. 2022, sec. 3): classification tasks made from one base
dataset by a random linear projection of the inputs and a random permutation of the labels.

A task is (A, rho):
  A   [D_in, D_model], entries ~ N(0, 1/D_in). Variance 1/D_in, NOT standard deviation 1/D_in
      (two public reimplementations get this wrong): each coordinate of x @ A then has variance
      ||x||^2 / D_in ~= 1 for z-normalised x, and for a square A (D_in = D_model, the paper's
      N_x) E||x @ A||^2 = ||x||^2. Datasets of another input size (wine: 13 features) are
      projected to the model's D_model by the same rule, so their tokens look alike.
  rho [C], a permutation of the model's C labels; a dataset with n <= C classes uses rho[:n].
A task is a pure function of its key: a pool of 2^k tasks is `fold_in(pool_root, id)` for
id < 2^k, so no task is ever stored, and the same seed gives the same task on every host.

A sequence is L examples of one task. Token j = [x_j @ A, one_hot(rho(y_{j-1}))] (the label of
the *previous* example; zeros at j = 0), target j = rho(y_j): the learner predicts every label
from the examples before it, so the loss at position j measures learning from j examples.
Everything below runs inside jit; inputs are z-normalised on the host (`feature_stats`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def feature_stats(x: np.ndarray, eps: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
  """Per-feature mean and std of x [N, D] (the z-normalisation constants). Constant features
  (digits' always-blank border pixels) get std 1 instead of ~0, so they stay 0, not NaN."""
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  mean, std = x.mean(0), x.std(0)
  return mean.astype(np.float32), np.where(std < eps, 1.0, std).astype(np.float32)


def znormalise(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  """x [N, ...] -> [N, D] float32, flattened and z-normalised per feature."""
  return ((np.asarray(x, np.float32).reshape(len(x), -1) - mean) / std).astype(np.float32)


def sample_task(key: jax.Array, in_dim: int, out_dim: int, num_classes: int):
  """key -> (A [in_dim, out_dim] with entries ~ N(0, 1/in_dim), rho [num_classes] int32)."""
  key_a, key_rho = jax.random.split(key)
  a = jax.random.normal(key_a, (in_dim, out_dim), jnp.float32) * (1.0 / np.sqrt(in_dim))
  rho = jax.random.permutation(key_rho, num_classes).astype(jnp.int32)
  return a, rho


def pool_task_key(pool_root: jax.Array, task_id) -> jax.Array:
  """Task `task_id` of the finite pool rooted at `pool_root`."""
  return jax.random.fold_in(pool_root, task_id)


def sequence_task_keys(rng: jax.Array, num_sequences: int, pool_root: jax.Array,
                       num_tasks: int, fixed_task_fraction: float = 0.0) -> jax.Array:
  """One task key per sequence, [B] keys.

  num_tasks > 0: task ids drawn uniformly from the pool of `num_tasks` (the transition
  experiment's finite task set); num_tasks = 0: a fresh task per sequence ("unlimited").
  fixed_task_fraction: the first round(f * B) sequences all use pool task 0, the paper's
  intervention that removes the loss plateau (sec. 4.4): a single task is learnable by
  memorisation, and the gradient it provides breaks the symmetry that holds the loss flat.
  """
  if num_tasks > 0:
    ids = jax.random.randint(rng, (num_sequences,), 0, num_tasks)
    keys = jax.vmap(pool_task_key, (None, 0))(pool_root, ids)
  else:
    keys = jax.random.split(rng, num_sequences)
  num_fixed = int(round(fixed_task_fraction * num_sequences))
  if num_fixed:
    fixed = jnp.broadcast_to(pool_task_key(pool_root, 0), (num_fixed,))
    keys = jnp.concatenate([fixed, keys[num_fixed:]])
  return keys


def make_sequences(x: jax.Array, y: jax.Array, task_keys: jax.Array, model_dim: int,
                   num_classes: int):
  """Examples of one task per sequence -> learner tokens and targets.

  x: [B, L, D_in] z-normalised inputs; y: [B, L] int labels (< num_classes);
  task_keys: [B] keys. Returns tokens [B, L, model_dim + num_classes] float32,
  targets [B, L] int32 = rho(y), rho [B, num_classes].
  """
  b, length, in_dim = x.shape
  a, rho = jax.vmap(sample_task, (0, None, None, None))(task_keys, in_dim, model_dim,
                                                         num_classes)
  projected = jnp.einsum("bld,bde->ble", x.astype(jnp.float32), a)
  targets = jnp.take_along_axis(rho, y.astype(jnp.int32), axis=1)  # [B, L]
  # Label of example j-1 at position j; position 0 has seen no label (all zeros).
  previous = jax.nn.one_hot(targets[:, :-1], num_classes, dtype=jnp.float32)
  previous = jnp.concatenate([jnp.zeros((b, 1, num_classes), jnp.float32), previous], axis=1)
  tokens = jnp.concatenate([projected, previous], axis=-1)
  return tokens, targets, rho


def sample_indices(key: jax.Array, num_examples: int, num_sequences: int,
                   length: int) -> jax.Array:
  """[B, L] example indices, distinct within each sequence (so no query is ever in its own
  context) — used by meta-testing, where sequences are drawn from a held-out split."""
  keys = jax.random.split(key, num_sequences)
  return jax.vmap(lambda k: jax.random.choice(k, num_examples, (length,), replace=False))(keys)

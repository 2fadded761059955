"""GPICL invariants: projection variance, label permutations and task determinism, causality
of both learners, ln(C) loss at initialisation, chance accuracy before any example, and a
data-parallel meta-training run through the shared loop."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jax_transfer import parallel, train
from jax_transfer.data import icl_tasks
from jax_transfer.evaluators import icl_curves
from jax_transfer.methods.icl import ICL
from jax_transfer.models import seq_learner
from ml_collections_configs.icl import digits_gpicl


def _config(data_dir, **icl):
  c = digits_gpicl.get_config("paper,runlocal")  # the 10-way, 64-feature shape
  c.input.data_dir = data_dir
  c.icl.unseen_datasets = ()
  c.icl.baseline_sequences = 0
  for k, v in icl.items():
    c.icl[k] = v
  return c


def test_projection_preserves_norm_in_expectation():
  """A_ij ~ N(0, 1/N_x): E||xA||^2 = ||x||^2. Over 4000 tasks the mean ratio has std
  sqrt(2/64/4000) ~ 0.003; tolerance 0.02. (Std 1/N_x instead would give 1/64.)"""
  x = jax.random.normal(jax.random.key(0), (64,))
  keys = jax.random.split(jax.random.key(1), 4000)
  a, _ = jax.vmap(icl_tasks.sample_task, (0, None, None, None))(keys, 64, 64, 10)
  ratio = jnp.sum((x @ a) ** 2, -1) / jnp.sum(x ** 2)
  assert float(ratio.mean()) == pytest.approx(1.0, abs=0.02)
  # Another input size projected to 64: each output coordinate keeps variance ~1 (||x||^2/D_in).
  x13 = jax.random.normal(jax.random.key(2), (13,))
  a13, _ = jax.vmap(icl_tasks.sample_task, (0, None, None, None))(keys, 13, 64, 3)
  per_coord = jnp.mean((x13 @ a13) ** 2) / (jnp.sum(x13 ** 2) / 13)
  assert float(per_coord) == pytest.approx(1.0, abs=0.02)


def test_permutation_is_bijection_and_tasks_are_deterministic():
  root = jax.random.key(7)
  for task_id in range(50):
    _, rho = icl_tasks.sample_task(icl_tasks.pool_task_key(root, task_id), 8, 8, 10)
    assert sorted(np.asarray(rho).tolist()) == list(range(10))
  same = [icl_tasks.sample_task(icl_tasks.pool_task_key(jax.random.key(7), 3), 8, 8, 10)
          for _ in range(2)]
  np.testing.assert_array_equal(same[0][0], same[1][0])
  np.testing.assert_array_equal(same[0][1], same[1][1])
  other = icl_tasks.sample_task(icl_tasks.pool_task_key(root, 4), 8, 8, 10)
  assert not np.allclose(same[0][0], other[0])
  # A pool of 4 tasks: every sequence's key is one of the 4 pool keys; fixed fraction -> task 0.
  keys = icl_tasks.sequence_task_keys(jax.random.key(0), 64, root, 4, fixed_task_fraction=0.25)
  data = np.asarray(jax.random.key_data(keys))
  pool = np.asarray(jax.random.key_data(jax.vmap(icl_tasks.pool_task_key, (None, 0))(
      root, jnp.arange(4))))
  ids = [int(np.flatnonzero((pool == d).all(-1))[0]) for d in data]
  assert ids[:16] == [0] * 16 and len(set(ids[16:])) == 4


def test_sequence_layout():
  """Token j carries rho(y_{j-1}) (zeros at j = 0); the target at j is rho(y_j)."""
  x = jax.random.normal(jax.random.key(0), (3, 6, 5))
  y = jax.random.randint(jax.random.key(1), (3, 6), 0, 4)
  keys = jax.random.split(jax.random.key(2), 3)
  tokens, targets, rho = icl_tasks.make_sequences(x, y, keys, 7, 4)
  assert tokens.shape == (3, 6, 11)
  np.testing.assert_array_equal(targets, np.take_along_axis(np.asarray(rho), np.asarray(y), 1))
  labels = np.asarray(tokens[..., 7:])
  np.testing.assert_array_equal(labels[:, 0], 0)
  np.testing.assert_array_equal(labels[:, 1:].argmax(-1), targets[:, :-1])
  np.testing.assert_array_equal(labels.sum(-1)[:, 1:], 1)


@pytest.mark.parametrize("model", [
    seq_learner.SeqTransformer(num_classes=5, width=32, depth=2, num_heads=2, mlp_dim=64,
                               max_len=16),
    seq_learner.SeqLSTM(num_classes=5, width=32, depth=2)])
def test_learners_are_causal(model):
  tokens = jax.random.normal(jax.random.key(0), (2, 16, 12))
  params = model.init(jax.random.key(1), tokens)["params"]
  # Non-zero head, so the logits depend on the features at all.
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape),
                        params)
  changed = tokens.at[:, 9:].add(jax.random.normal(jax.random.key(3), (2, 7, 12)))
  a = model.apply({"params": params}, tokens)[0]
  b = model.apply({"params": params}, changed)[0]
  np.testing.assert_allclose(a[:, :9], b[:, :9], atol=1e-5)
  assert float(jnp.abs(a[:, 9:] - b[:, 9:]).max()) > 1e-3
  assert seq_learner.state_size(model, 16) == (2 * 2 * 16 * 32 if isinstance(
      model, seq_learner.SeqTransformer) else 2 * 2 * 32)


def _method_and_batch(data_dir, **icl):
  c = _config(data_dir, **icl)
  mesh = parallel.make_mesh(c.mesh, jax.devices()[:1])
  method = ICL(c, mesh)
  from jax_transfer import data
  batch = method.host_batch(next(data.make_train_iterator(c.input, seed=0)))
  return c, method, batch


def test_loss_at_init_is_log_num_classes(data_dir):
  c, method, batch = _method_and_batch(data_dir)
  params = jax.tree.map(lambda p: getattr(p, "value", p), method.init_params(jax.random.key(0)))
  loss, (metrics, _) = method.loss_fn(params, None, batch, jax.random.key(1))
  assert float(loss) == pytest.approx(math.log(c.model.num_classes), abs=1e-3)
  assert batch["x"].shape == (c.input.global_batch_size, 64)
  assert abs(float(batch["x"].mean())) < 0.2  # z-normalised


def test_position_zero_is_chance_on_unseen_tasks(data_dir):
  """Meta-train briefly with 90% of every batch from one fixed task, so the learner acquires a
  strong label prior; before any example it still cannot beat chance on unseen tasks.
  2000 sequences: std sqrt(0.1*0.9/2000) = 0.0067; tolerance 0.03 (4.5 sigma)."""
  c, method, batch = _method_and_batch(data_dir, fixed_task_fraction=0.9)
  import flax.linen as nn
  params = nn.unbox(method.init_params(jax.random.key(0)))
  tx = optax.adam(3e-3)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, rng):
    grads, _ = jax.grad(method.loss_fn, has_aux=True)(params, None, batch, rng)
    updates, opt = tx.update(grads, opt)
    return optax.apply_updates(params, updates), opt

  for i in range(30):
    params, opt = step(params, opt, jax.random.key(i))
  suites = method.meta_test_suites(unseen_datasets=())
  curves = icl_curves.ICLCurves(
      method.apply, {"unseen": suites["unseen"]}, seq_len=4, model_dim=64, num_classes=10,
      num_sequences=2000, every_steps=1, eval_seed=0).curves(params)
  assert float(curves["unseen"][0]) == pytest.approx(0.1, abs=0.03)


def test_meta_training_through_shared_loop(data_dir, tmp_path):
  """8-way data parallel (one sequence per device), through train_and_evaluate: the loss
  starts at ln 10, stays finite, and meta-test curves are written."""
  c = _config(data_dir)
  c.total_steps, c.eval_every_steps, c.log_every_steps, c.checkpoint_every_steps = 4, 4, 1, 4
  c.input.global_batch_size = 8 * c.icl.seq_len
  c.icl.eval_sequences = 8
  _, final = train.train_and_evaluate(c, str(tmp_path), devices=jax.devices()[:8])
  assert set(final) >= {"icl/seen/acc_k0", "icl/unseen/acc_k15", "icl/unseen/acc_mean"}
  assert (tmp_path / "icl_curves.png").exists() and (tmp_path / "icl_curves.json").exists()


def test_resample_sequences_validation(data_dir):
  from jax_transfer import config as config_lib
  for value, match in ((-1, "resample_sequences=-1 must be >= 0"),
                       (8, "needs >= icl.seq_len=16 base examples")):
    c = _config(data_dir, resample_sequences=value)
    if value > 0:
      c.input.global_batch_size = 16
      c.grad_accum_steps = 2  # 8 examples per microbatch < seq_len
    with pytest.raises(config_lib.ConfigError, match=match):
      ICL.validate_config(c)
  c = _config(data_dir, resample_sequences=3)
  mesh = parallel.make_mesh(c.mesh, jax.devices()[:2])
  with pytest.raises(config_lib.ConfigError, match="multiple of the data-parallel size 2"):
    ICL(c, mesh)


def test_resample_sequences_draws_distinct_batch_examples(data_dir):
  """icl.resample_sequences=R: R sequences per step, each seq_len distinct examples of the
  (host) batch, with the usual token layout; loss at init is still ln C."""
  c, method, batch = _method_and_batch(data_dir, resample_sequences=24)
  n = batch["y"].shape[0]
  # Example i carries i + 1 in feature 0 only: its projection has norm (i + 1) * ||A[0]||, so
  # within a sequence (one A) equal norms mean the same example.
  marked = {"x": np.zeros_like(batch["x"]), "y": batch["y"]}
  marked["x"][:, 0] = np.arange(1, n + 1)
  tokens, targets = method.sequences(marked, jax.random.key(3))
  assert tokens.shape == (24, c.icl.seq_len, 64 + 10) and targets.shape == (24, c.icl.seq_len)
  norms = np.linalg.norm(np.asarray(tokens[..., :64]), axis=-1)
  ratios = norms / norms[:, :1]
  for row in np.round(ratios * 1e3):
    assert len(set(row)) == c.icl.seq_len  # distinct within a sequence
  labels = np.asarray(tokens[..., 64:])
  np.testing.assert_array_equal(labels[:, 0], 0)
  np.testing.assert_array_equal(labels[:, 1:].argmax(-1), np.asarray(targets)[:, :-1])
  params = jax.tree.map(lambda p: getattr(p, "value", p), method.init_params(jax.random.key(0)))
  loss, _ = method.loss_fn(params, None, batch, jax.random.key(1))
  assert float(loss) == pytest.approx(math.log(10), abs=1e-3)


def test_default_config_is_the_generalising_setting():
  """The default is the measured setting (`gen` is kept as an alias); `paper` the 10-way one."""
  from jax_transfer import config as config_lib
  c = digits_gpicl.get_config("tasks=64")
  assert c.to_dict() == digits_gpicl.get_config("gen,tasks=64").to_dict()
  config_lib.validate(c, num_devices=1)
  paper = digits_gpicl.get_config("paper")
  assert paper.model.num_classes == 10 and paper.icl.resample_sequences == 0
  assert c.icl.resample_sequences == 128 and c.input.image_size == 4
  assert c.model.num_classes == len(c.input.classes) == 5

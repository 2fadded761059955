"""Test-time BN (jax_transfer/evaluators/test_time.py): alpha-BN's two ends are the source
eval and train-mode BN, the mixed statistics of one layer against the formula, padding rows
never enter the statistics, TENT adapts only the BN affine params and lowers the entropy, the
evaluator's source column is the plain eval, and 8 devices give what 1 does."""
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_vit_config
from jax_transfer import methods, parallel
from jax_transfer.data import builders
from jax_transfer.evaluators import test_time as tt

DATASET = "digits_rotated"


def _config(data_dir):
  from ml_collections_configs.supervised import digits_resnet
  c = digits_resnet.get_config("tiny,runlocal")
  c.input.data_dir = data_dir
  c.eval.batch_size = 64
  c.eval.datasets = (DATASET,)
  return c


def _perturbed(tree, seed, lo, hi):
  flat = flax.traverse_util.flatten_dict(tree, sep="/")
  rng = np.random.default_rng(seed)
  return flax.traverse_util.unflatten_dict(
      {k: np.asarray(v) + rng.uniform(lo, hi, np.shape(v)).astype(np.float32)
       for k, v in flat.items()}, sep="/")


@pytest.fixture(scope="module")
def model_state(data_dir):
  """A tiny BN ResNet whose running statistics are NOT the digits' (so source != test),
  with a random head (so predictions differ between the arms)."""
  builders.ensure_embedded(DATASET, data_dir)
  c = _config(data_dir)
  method = methods.get_method(c.method)(c, parallel.make_mesh(c.mesh, jax.devices()[:1]))
  key = jax.random.key(0)
  params = jax.device_get(nn.unbox(method.init_params(key)))
  params = _perturbed(params, 1, -0.3, 0.3)
  stats = jax.device_get(nn.unbox(method.init_extra(key, params)["batch_stats"]))
  flat = flax.traverse_util.flatten_dict(stats, sep="/")
  stats = flax.traverse_util.unflatten_dict(
      {k: np.asarray(v) + np.random.default_rng(2).uniform(
          -0.5 if k.endswith("mean") else 0.5, 1.0, v.shape).astype(np.float32)
       for k, v in flat.items()}, sep="/")
  return c, method, params, stats


def _images(n, seed=0):
  return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, (n, 8, 8, 1)), jnp.float32)


def test_ends_are_source_eval_and_train_mode_bn(model_state):
  _, method, params, stats = model_state
  x, mask = _images(24), jnp.ones(24, bool)
  variables = {"params": params, "batch_stats": stats}
  source = method.model.apply(variables, x, train=False)[0]
  np.testing.assert_allclose(tt.apply_calibrated(method.model, variables, x, mask, 0.0)[0],
                             source, rtol=1e-5, atol=1e-5)
  (train_mode, _), _ = method.model.apply(variables, x, train=True, mutable=["batch_stats"])
  test_bn = tt.apply_calibrated(method.model, variables, x, mask, 1.0, unbiased=False)[0]
  np.testing.assert_allclose(test_bn, train_mode, rtol=1e-4, atol=1e-4)
  assert np.abs(np.asarray(test_bn) - np.asarray(source)).max() > 1e-2  # The arms differ.


def test_one_layer_against_formula():
  x = np.random.default_rng(0).standard_normal((6, 3, 3, 4)).astype(np.float32) * 2 + 1
  v = {"params": {"scale": np.full(4, 1.5, np.float32), "bias": np.full(4, 0.2, np.float32)},
       "batch_stats": {"mean": np.full(4, -0.5, np.float32), "var": np.full(4, 3.0, np.float32)}}

  class Wrap(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      return nn.BatchNorm(use_running_average=not train, epsilon=1e-5, name="bn")(x)
  alpha = 0.3
  mean_t, var_t = x.mean((0, 1, 2)), x.var((0, 1, 2), ddof=1)
  mean = (1 - alpha) * -0.5 + alpha * mean_t
  var = (1 - alpha) * 3.0 + alpha * var_t
  want = (x - mean) / np.sqrt(var + 1e-5) * 1.5 + 0.2
  got = tt.apply_calibrated(Wrap(), {k: {"bn": d} for k, d in v.items()}, jnp.asarray(x),
                            jnp.ones(6, bool), alpha)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_padding_rows_do_not_enter_the_statistics(model_state):
  _, method, params, stats = model_state
  variables = {"params": params, "batch_stats": stats}
  x = _images(20)
  padded = jnp.concatenate([x, 7.0 * jnp.ones((12, 8, 8, 1))])
  mask = jnp.arange(32) < 20
  for alpha in (0.5, 1.0):
    want = tt.apply_calibrated(method.model, variables, x, jnp.ones(20, bool), alpha)[0]
    got = tt.apply_calibrated(method.model, variables, padded, mask, alpha)[0][:20]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_tent_adapts_only_bn_affine_and_lowers_entropy(model_state):
  _, method, params, stats = model_state
  tent = tt.Tent(method.model, params, stats, lr=1e-2)
  assert tent.paths and all(p.rsplit("/", 1)[1] in ("scale", "bias") for p in tent.paths)
  assert not any(p.startswith("head/") for p in tent.paths)  # The head has no batch stats.
  x, mask = _images(32, seed=3), jnp.ones(32, bool)
  variables = {"params": params, "batch_stats": stats}
  test_bn = tt.apply_calibrated(method.model, variables, x, mask, 1.0, unbiased=False)[0]
  first = tent(x, mask)
  np.testing.assert_allclose(first, test_bn, rtol=1e-5, atol=1e-5)  # Before its update.
  for _ in range(20):
    last = tent(x, mask)
  ent = lambda z: float(tt._entropy(z).mean())  # pylint: disable=protected-access
  assert ent(last) < ent(first) - 1e-3
  before = flax.traverse_util.flatten_dict(params, sep="/")
  after = flax.traverse_util.flatten_dict(jax.device_get(tent.params), sep="/")
  assert before.keys() == after.keys()
  for k in before:
    same = np.array_equal(np.asarray(before[k]), np.asarray(after[k]))
    assert same == (k not in tent.paths), k
  tent.reset()
  np.testing.assert_allclose(tent(x, mask), test_bn, rtol=1e-5, atol=1e-5)


def test_evaluator_source_column_is_the_eval_and_8_devices_equal_1(model_state):
  c, method, params, stats = model_state
  extra = {"batch_stats": stats}
  ev = tt.for_method(method, DATASET, alphas=(0.5,))
  assert ev.name == f"test_time_{DATASET}"
  out = ev.run(params, extra)
  assert set(out) == {f"{a}/{m}" for a in ("source", "test_bn", "alpha_0.5", "tent")
                      for m in ("accuracy", "loss")}
  plain = {e.name: e for e in method.evaluators()}[f"eval_{DATASET}"].run(params, extra)
  assert out["source/accuracy"] == pytest.approx(plain["accuracy"])
  assert out["source/loss"] == pytest.approx(plain["loss"], rel=1e-5)

  method8 = methods.get_method(c.method)(c, parallel.make_mesh(c.mesh, jax.devices()))
  out8 = tt.for_method(method8, DATASET, alphas=(0.5,)).run(params, extra)
  assert out8.keys() == out.keys()
  for k in out:
    assert out8[k] == pytest.approx(out[k], abs=3e-3 if k.endswith("accuracy") else 1e-3), k


def test_bad_input_is_clear(model_state, data_dir):
  _, method, params, _ = model_state
  with pytest.raises(ValueError, match=r"alphas must be in \[0, 1\]"):
    tt.for_method(method, DATASET, alphas=(1.5,))
  with pytest.raises(ValueError, match="batch_stats"):
    tt.for_method(method, DATASET).run(params, None)
  with pytest.raises(ValueError, match="tent steps"):
    tt.Tent(method.model, params, {"x": 1}, steps=0)
  vit = methods.get_method("supervised")(tiny_vit_config(data_dir),
                                         parallel.make_mesh(method.config.mesh,
                                                            jax.devices()[:1]))
  with pytest.raises(ValueError, match="no BatchNorm statistics"):
    tt.for_method(vit, None)

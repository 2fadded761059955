"""DANN (methods/dann.py): the gradient reversal layer and its warm-start schedule, the domain
loss, the target stream (no target label reaches the step; exact resume), 8 devices = 1,
resume = uninterrupted, config errors before compiling, trade_off=0 = supervised."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_transfer import checkpoint, config as config_lib, metrics as metrics_lib, train
from jax_transfer.methods import dann
from ml_collections_configs.shift import digits_dann

STEPS = 4


def _config(data_dir, arg="tiny,runlocal", steps=STEPS):
  c = digits_dann.get_config(arg)
  c.input.data_dir = data_dir
  c.input.global_batch_size = 16
  c.eval.batch_size = 64
  c.total_steps, c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = (
      steps, 1, steps, 2)
  if "vit" in arg:
    c.model.variant = "nano/2"
  return c


def _leaves(tree):
  return {k: np.asarray(v) for k, v in checkpoint.flatten(jax.device_get(tree)).items()}


def _assert_same(a, b, **tol):
  la, lb = _leaves(a), _leaves(b)
  assert la.keys() == lb.keys()
  for k in la:
    np.testing.assert_allclose(la[k], lb[k], err_msg=k, **tol)


def _metric(workdir, key):
  return [m[key] for m in metrics_lib.read_jsonl(workdir) if key in m]


def test_grl_forward_identity_backward_negated():
  x = jnp.arange(6.0).reshape(2, 3)
  coeff = jnp.float32(0.3)
  np.testing.assert_array_equal(dann.grad_reverse(x, coeff), x)
  w = jnp.array([1.0, -2.0, 0.5])
  g = jax.grad(lambda x: jnp.sum(dann.grad_reverse(x, coeff) ** 2 * w))(x)
  np.testing.assert_allclose(g, -0.3 * 2 * x * w, rtol=1e-6)
  assert jax.grad(lambda c: jnp.sum(dann.grad_reverse(x, c)))(coeff) == 0.0


def test_schedule_is_tllib_and_ganin():
  for i in (0, 1, 10, 250, 999, 5000):  # tllib's defaults: alpha 10, lo 0, hi 1, max_iters 1000
    want = 2.0 * 1 / (1.0 + np.exp(-10 * i / 1000)) - 1 + 0
    assert float(dann.grl_coeff(i, max_iters=1000)) == pytest.approx(want, rel=1e-6, abs=1e-7)
  lo, hi = 0.1, 0.7  # another range: 2(hi-lo)/(1+exp(-a i/m)) - (hi-lo) + lo
  assert float(dann.grl_coeff(30, alpha=5, lo=lo, hi=hi, max_iters=100)) == pytest.approx(
      2 * (hi - lo) / (1 + math.exp(-5 * 0.3)) - (hi - lo) + lo, rel=1e-6)
  for p in (0.0, 0.1, 0.5, 1.0):  # Ganin: lambda_p = 2 / (1 + exp(-10 p)) - 1
    assert float(dann.grl_coeff(p * 400, max_iters=400)) == pytest.approx(
        2 / (1 + math.exp(-10 * p)) - 1, rel=1e-6, abs=1e-7)


def test_domain_loss_by_hand():
  d_s, d_t = jnp.array([2.0, -1.0]), jnp.array([0.5, -3.0, 0.0])
  sig = lambda z: 1 / (1 + math.exp(-z))
  want = 0.5 * (-(math.log(sig(2.0)) + math.log(sig(-1.0))) / 2
                - (math.log(1 - sig(0.5)) + math.log(1 - sig(-3.0)) + math.log(0.5)) / 3)
  loss, acc = dann.domain_adversarial_loss(d_s, d_t)
  assert float(loss) == pytest.approx(want, rel=1e-6)
  assert float(acc) == pytest.approx(0.5 * (1 / 2 + 1 / 3))  # d_t=0 counts as "source"


def test_target_stream_has_no_labels_and_resumes(data_dir):
  c = _config(data_dir)
  method = dann.DANN(c, None)
  it = method.train_iterator(seed=0)
  first = next(it)
  assert set(first) == {"image", "label", dann.TARGET_KEY}  # no target label, nothing else
  state = it.get_state()
  want = [next(it) for _ in range(2)]
  again = method.train_iterator(seed=0)
  again.set_state(state)
  for w in want:
    got = next(again)
    for k in w:
      np.testing.assert_array_equal(got[k], w[k])
  assert not np.array_equal(first["image"], first[dann.TARGET_KEY])  # another stream


@pytest.mark.parametrize("override,match", [
    ({"dann.target_dataset": ""}, r"dann.target_dataset is required"),
    ({"dann.target_dataset": "no_such_ds"}, r"dann.target_dataset='no_such_ds'"),
    ({"dann.target_dataset": "shapes_captions"}, r"dann.target_dataset='shapes_captions'"),
    ({"dann.target_split": "validation"}, r"dann.target_split='validation'"),
    ({"dann.trade_off": -1.0}, r"dann.trade_off=-1.0 must be >= 0"),
    ({"dann.hidden": 0}, r"dann.hidden=0 must be > 0"),
    ({"dann.grl.max_iters": 0}, r"dann.grl.max_iters=0 must be > 0"),
    ({"dann.grl.alpha": "x"}, r"'dann.grl.alpha' must be float"),
])
def test_bad_config_is_one_line_before_compiling(data_dir, override, match):
  c = _config(data_dir)
  if override.get("dann.grl.alpha") == "x":  # a type ml_collections itself would refuse
    c.dann.grl = dict(alpha="x")
  else:
    config_lib.with_overrides(c, **override)
  with pytest.raises(config_lib.ConfigError, match=match) as e:
    config_lib.validate(c, 1)
  assert "\n" not in str(e.value)


def test_unknown_key_and_missing_section(data_dir):
  c = _config(data_dir)
  c.dann.tradeoff = 1.0
  with pytest.raises(config_lib.ConfigError, match=r"dann.tradeoff"):
    config_lib.validate(c, 1)
  c = _config(data_dir)
  del c["dann"]
  with pytest.raises(config_lib.ConfigError, match=r"config.dann section"):
    config_lib.validate(c, 1)


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("dann_full"))
  state, final = train.train_and_evaluate(_config(data_dir), workdir, devices=jax.devices()[:1])
  return workdir, state, final


def test_runs_with_bn_and_schedule(uninterrupted):
  workdir, state, final = uninterrupted
  assert int(state.step) == STEPS and int(state.extra["grl_step"]) == STEPS
  assert "discriminator" in state.params and "batch_stats" in state.extra
  assert 0 <= final["eval_digits_rotated/accuracy"] <= 1
  np.testing.assert_allclose(_metric(workdir, "train/grl_coeff"),
                             [float(dann.grl_coeff(i, max_iters=STEPS)) for i in range(STEPS)],
                             rtol=1e-6, atol=1e-7)
  for key in ("train/transfer_loss", "train/domain_accuracy", "train/cls_loss"):
    assert np.all(np.isfinite(_metric(workdir, key)))


def test_8_devices_equal_1(data_dir, tmp_path, uninterrupted):
  full_dir, full, _ = uninterrupted
  c = _config(data_dir)
  c.mesh.data, c.mesh.fsdp = 4, 2
  state, _ = train.train_and_evaluate(c, str(tmp_path / "d8"), devices=jax.devices())
  _assert_same(state.params, full.params, rtol=1e-3, atol=1e-5)
  _assert_same(state.extra, full.extra, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(_metric(str(tmp_path / "d8"), "train/loss"),
                             _metric(full_dir, "train/loss"), rtol=1e-4)


def test_resume_equals_uninterrupted(data_dir, tmp_path, uninterrupted):
  full_dir, full, _ = uninterrupted
  workdir = str(tmp_path / "resumed")
  partial, _ = train.train_and_evaluate(_config(data_dir), workdir, devices=jax.devices()[:1],
                                        stop_after_step=3)
  assert int(partial.step) == 3
  state, _ = train.train_and_evaluate(_config(data_dir), workdir, devices=jax.devices()[:1])
  _assert_same(state.params, full.params, rtol=0, atol=0)
  _assert_same(state.extra, full.extra, rtol=0, atol=0)
  assert _metric(workdir, "train/loss") == _metric(full_dir, "train/loss")


def test_export_loads_in_a_plain_supervised_finetune(data_dir, tmp_path, uninterrupted):
  import jax_transfer
  from jax_transfer import export as export_lib
  workdir, state, _ = uninterrupted
  out = str(tmp_path / "export")
  export_lib.export_workdir(workdir, out)
  model, params, _, _, _ = jax_transfer.load_pretrained(out)
  stats = checkpoint.load_export_batch_stats(out)
  x = jnp.zeros((2, 8, 8, 1))
  assert model.apply({"params": params, "batch_stats": stats}, x)[0].shape == (2, 5)
  c = config_lib.init_from_export(_config(data_dir, steps=1), out, keep_head=True)
  c.method = "supervised"
  del c["dann"]
  ft, _ = train.train_and_evaluate(c, str(tmp_path / "ft"), devices=jax.devices()[:1])
  assert "discriminator" not in ft.params


def test_trade_off_zero_is_supervised_on_vit(data_dir, tmp_path):
  """No BatchNorm, trade_off=0: the same source batches, params init and loss trajectory as
  the supervised method (the discriminator gets zero gradients, so the clipped norm agrees)."""
  c = _config(data_dir, "vit,runlocal")
  c.dann.trade_off = 0.0
  _, _ = train.train_and_evaluate(c, str(tmp_path / "dann"), devices=jax.devices()[:1])
  s = _config(data_dir, "vit,runlocal")
  s.method = "supervised"
  del s["dann"]
  train.train_and_evaluate(s, str(tmp_path / "sup"), devices=jax.devices()[:1])
  np.testing.assert_allclose(_metric(str(tmp_path / "dann"), "train/loss"),
                             _metric(str(tmp_path / "sup"), "train/loss"), rtol=1e-5)
  np.testing.assert_allclose(_metric(str(tmp_path / "dann"), "train/grad_norm"),
                             _metric(str(tmp_path / "sup"), "train/grad_norm"), rtol=1e-4)

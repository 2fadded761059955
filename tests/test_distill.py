"""KRR-ST invariants: the closed-form KRR equals scikit-learn's KernelRidge, primal = dual,
gradients reach X_s and Y_s, the outer loss vanishes when the real batch is the synthetic set,
Barlow Twins behaves as its definition says, and a distill run (model pool in the state)
resumes to the same result as an uninterrupted one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.kernel_ridge import KernelRidge

from jax_transfer import checkpoint, losses, train

jax.config.update("jax_enable_x64", False)


def _features(seed, b=40, n=12, f=16, d=5):
  r = np.random.default_rng(seed)
  return (r.normal(size=(b, f)).astype(np.float32), r.normal(size=(n, f)).astype(np.float32),
          r.normal(size=(n, d)).astype(np.float32))


def test_krr_matches_sklearn_kernel_ridge():
  f_t, f_s, y_s = _features(0)
  pred = np.asarray(losses.krr_predict(f_t, f_s, y_s, reg_ratio=1e-2))
  # Same bias-augmented features; λ = 1e-2 · tr(K_ss) is sklearn's alpha (no 1/n factor).
  aug = lambda f: np.concatenate([f, np.ones((len(f), 1), np.float32)], 1).astype(np.float64)
  alpha = 1e-2 * np.trace(aug(f_s) @ aug(f_s).T)
  ref = KernelRidge(alpha=alpha, kernel="linear").fit(aug(f_s), y_s).predict(aug(f_t))
  np.testing.assert_allclose(pred, ref, rtol=1e-3, atol=1e-4)
  # The other λ convention (tr(K)/n, KIP/FRePo) gives a different answer: the check can fail.
  other = KernelRidge(alpha=alpha / len(f_s), kernel="linear").fit(aug(f_s), y_s).predict(
      aug(f_t))
  assert np.abs(pred - other).max() > 1e-3


@pytest.mark.parametrize("n,f", [(12, 16), (30, 8)])  # n < F+1 and n > F+1.
def test_primal_and_dual_agree(n, f):
  f_t, f_s, y_s = _features(1, n=n, f=f)
  dual = losses.krr_predict(f_t, f_s, y_s, reg_ratio=1e-3, form="dual")
  primal = losses.krr_predict(f_t, f_s, y_s, reg_ratio=1e-3, form="primal")
  np.testing.assert_allclose(np.asarray(dual), np.asarray(primal), rtol=1e-3, atol=1e-3)
  for form in ("dual", "primal"):  # The normal-equations reference computes the same function.
    np.testing.assert_allclose(np.asarray(losses.krr_predict_cholesky(
        f_t, f_s, y_s, reg_ratio=1e-3, form=form)), np.asarray(primal), rtol=1e-3, atol=1e-3)


# ---- float32 accuracy at KRR-ST's ridge (issue #16 item 3) ----------------------------------

def _learned_like(seed, n, f, b=128, d=16, spectrum="flat"):
  """ReLU features (a ConvNet's are >= 0): of Gaussians ('flat') or of a random map with
  singular values 1/k ('decay', like learned features), plus targets; float32."""
  r = np.random.default_rng(seed)
  x = r.normal(size=(n + b, f))
  if spectrum == "decay":
    x = x @ (r.normal(size=(f, f)) / np.arange(1, f + 1)[:, None])
  x = np.maximum(x, 0).astype(np.float32)
  return (x[n:], x[:n], r.normal(size=(n, d)).astype(np.float32),
          r.normal(size=(b, d)).astype(np.float32))


def _mse(predict):
  return lambda f_t, f_s, y_s, y_t: jnp.mean((predict(f_t, f_s, y_s) - y_t) ** 2)


def _float64_reference(f_t, f_s, y_s, y_t):
  """Prediction and d MSE / d (f_t, f_s, y_s) of the same ridge problem in float64 (primal
  normal equations: exact enough in float64 at cond ~1e6)."""
  with jax.enable_x64(True):
    def predict(f_t, f_s, y_s):
      aug = lambda f: jnp.concatenate([f, jnp.ones((f.shape[0], 1), f.dtype)], 1)
      ft, fs = aug(f_t), aug(f_s)
      gram = fs.T @ fs
      return ft @ jnp.linalg.solve(gram + 1e-6 * jnp.trace(gram) * jnp.eye(gram.shape[0]),
                                   fs.T @ y_s)
    args = [jnp.asarray(a, jnp.float64) for a in (f_t, f_s, y_s, y_t)]
    grads = jax.grad(_mse(predict), argnums=(0, 1, 2))(*args)
    return np.asarray(predict(*args[:3])), [np.asarray(g) for g in grads]


def _rel(a, ref):
  return float(np.linalg.norm(np.asarray(a, np.float64) - ref) / np.linalg.norm(ref))


def _errors(predict, f_t, f_s, y_s, y_t, ref):
  """Worst relative error of the prediction and of the three gradients vs the float64 ref."""
  pred, grads = jax.jit(lambda *a: (predict(*a[:3]),
                                    jax.grad(_mse(predict), argnums=(0, 1, 2))(*a)))(
                                        f_t, f_s, y_s, y_t)
  return _rel(pred, ref[0]), max(_rel(g, r) for g, r in zip(grads, ref[1]))


VALUE_TOL, GRAD_TOL = 1e-5, 5e-5


@pytest.mark.parametrize("n,f,spectrum,old_fails", [
    # n > F + 1: K_ss [n, n] is singular; the sizes of the issue (the last: the CPU benchmark's
    # 1000 synthetic images / 512 ConvNet features).
    (40, 9, "flat", True), (200, 64, "flat", True), (1000, 512, "flat", True),
    # n <= F + 1: the dual's regime; 1000 / 2048 is the CIFAR-100 pod config (width 128,
    # 4x4 after 3 pools). With a decaying spectrum K_ss is ill-conditioned there too.
    (40, 64, "flat", False), (200, 512, "flat", False), (1000, 2048, "decay", True),
])
def test_krr_float32_matches_float64_in_both_regimes(n, f, spectrum, old_fails):
  """krr_predict (the side krr_form picks, QR of the augmented matrix) vs float64: values and
  gradients w.r.t. f_t, f_s, y_s at λ = 1e-6·tr(K_ss). The former path (dual normal equations
  + Cholesky) fails the same tolerances where K_ss is singular or ill-conditioned."""
  args = _learned_like(0, n, f, spectrum=spectrum)
  ref = _float64_reference(*args)
  assert losses.krr_form(n, f + 1) == ("primal" if n > f + 1 else "dual")
  value_err, grad_err = _errors(losses.krr_predict, *args, ref)
  assert value_err < VALUE_TOL and grad_err < GRAD_TOL, (value_err, grad_err)
  old_value, old_grad = _errors(losses.krr_predict_cholesky, *args, ref)
  if old_fails:
    assert old_value > VALUE_TOL and old_grad > 10 * GRAD_TOL, (old_value, old_grad)


def test_krr_loss_under_jit_uses_the_shape_rule():
  """krr_loss = MSE of krr_predict's auto form, jitted (static shapes pick the side)."""
  f_t, f_s, y_s, y_t = _learned_like(1, 60, 20)  # n > F + 1: primal.
  loss = jax.jit(lambda *a: losses.krr_loss(*a)[0])(f_t, f_s, y_s, y_t)
  primal = _mse(lambda *a: losses.krr_predict(*a, form="primal"))(f_t, f_s, y_s, y_t)
  assert float(loss) == pytest.approx(float(primal), rel=1e-6)
  with pytest.raises(ValueError, match="krr form"):
    losses.krr_predict(f_t, f_s, y_s, form="cholesky")


@pytest.mark.parametrize("n,f", [(60, 20), (20, 40)])  # primal, dual.
def test_krr_loss_sharded_real_batch_equals_unsharded(n, f):
  """The real batch (f_t, y_t) split over 8 devices on the batch axes, X_s's side replicated,
  as in the distill step: same loss and gradients as on one device."""
  from jax.sharding import NamedSharding, PartitionSpec
  from jax_transfer import parallel
  mesh = parallel.make_mesh(dict(zip(parallel.MESH_AXES, (8, 1, 1))), jax.devices()[:8])
  f_t, f_s, y_s, y_t = _learned_like(2, n, f, b=64)
  rows = NamedSharding(mesh, PartitionSpec(parallel.BATCH_AXES, None))
  grad = jax.jit(jax.value_and_grad(lambda *a: losses.krr_loss(*a)[0], argnums=(1, 2)))
  ref = grad(f_t, f_s, y_s, y_t)
  out = grad(jax.device_put(f_t, rows), f_s, y_s, jax.device_put(y_t, rows))
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_outer_gradients_reach_images_and_targets():
  """Through a real feature map (ConvNet), d loss / d X_s and d loss / d Y_s are non-zero."""
  from jax_transfer.models.convnet import ConvNet
  import flax.linen as nn
  model = ConvNet(width=8, depth=1)
  r = np.random.default_rng(2)
  x_s = jnp.asarray(r.uniform(-1, 1, (6, 8, 8, 1)), jnp.float32)
  y_s = jnp.asarray(r.normal(size=(6, 4)), jnp.float32)
  x_t = jnp.asarray(r.uniform(-1, 1, (20, 8, 8, 1)), jnp.float32)
  y_t = jnp.asarray(r.normal(size=(20, 4)), jnp.float32)
  params = nn.unbox(model.init(jax.random.key(0), x_s)["params"])
  feats = lambda x: model.apply({"params": params}, x)[0]

  def loss(x_s, y_s):
    return losses.krr_loss(feats(x_t), feats(x_s), y_s, y_t)[0]
  gx, gy = jax.grad(loss, argnums=(0, 1))(x_s, y_s)
  assert np.all(np.isfinite(gx)) and np.all(np.isfinite(gy))
  assert float(jnp.abs(gx).max()) > 1e-6 and float(jnp.abs(gy).max()) > 1e-6


def test_outer_loss_vanishes_when_real_is_synthetic():
  """x_real = X_s, y_real = Y_s, λ -> 0: KRR interpolates its own support set."""
  _, f_s, y_s = _features(3, n=10, f=32)  # n < F: K_ss is full rank.
  loss_at = lambda r: float(losses.krr_loss(f_s, f_s, y_s, y_s, reg_ratio=r)[0])
  assert loss_at(1e-1) > 1e-2  # Not trivially zero with a large ridge...
  assert loss_at(1e-7) < 1e-5 * float(jnp.mean(y_s ** 2))  # ... and ~0 as λ -> 0.


def test_barlow_twins_loss_definition():
  r = np.random.default_rng(4)
  z = jnp.asarray(r.normal(size=(256, 8)), jnp.float32)
  same, m = losses.barlow_twins_loss(z, z, offdiag_weight=0.0)
  assert float(same) < 1e-3 and float(m["bt_mean_diag"]) > 0.999  # Identical views: C_ii = 1.
  indep = losses.barlow_twins_loss(z, jnp.asarray(r.normal(size=(256, 8)), jnp.float32),
                                   offdiag_weight=0.0)[0]
  assert float(indep) > 5.0  # Independent views: C_ii ~ 0, loss ~ D.


# -------------------------------------------------------------------- the method, end to end

def _export_ssl_target(data_dir, out):
  """A tiny g (ConvNet features) exported with the ssl method's param layout."""
  from ml_collections_configs.distill import digits_krr_st
  from jax_transfer.methods.ssl import BarlowTwins
  from jax_transfer import parallel
  import flax.linen as nn
  c = digits_krr_st.get_config("ssl,runlocal")
  c.input.data_dir = data_dir
  c.model.width, c.model.depth = 8, 1
  c.distill.ssl.projector_dims = (16,)
  m = BarlowTwins(c, parallel.make_mesh(c.mesh, jax.devices()[:1]))
  checkpoint.export(nn.unbox(m.init_params(jax.random.key(0))), c, out)
  return c


def _distill_config(data_dir, g_export, steps=8):
  from ml_collections_configs.distill import digits_krr_st
  c = digits_krr_st.get_config("runlocal")
  c.input.data_dir = data_dir
  c.model.width, c.model.depth = 8, 1
  c.distill.target_export = g_export
  c.distill.num_synthetic, c.distill.pool_size, c.distill.pool_reset_steps = 6, 3, 3
  c.input.global_batch_size = 16
  c.total_steps, c.log_every_steps, c.checkpoint_every_steps = steps, 1, 4
  c.eval_every_steps = steps
  c.optimizer.lr = 1e-2
  return c


@pytest.fixture(scope="module")
def g_export(data_dir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("g_export"))
  _export_ssl_target(data_dir, out)
  return out


def test_distill_resume_equals_uninterrupted(data_dir, g_export, tmp_path):
  devices = jax.devices()[:2]  # Real batch sharded over 2 data devices.
  full, _ = train.train_and_evaluate(_distill_config(data_dir, g_export),
                                     str(tmp_path / "full"), devices=devices)
  c0 = _distill_config(data_dir, g_export)
  from jax_transfer.methods.distill import Distill
  init_images = Distill(c0, None).init_images
  workdir = str(tmp_path / "resumed")
  part, _ = train.train_and_evaluate(c0, workdir, devices=devices, stop_after_step=5)
  assert int(part.step) == 5
  resumed, _ = train.train_and_evaluate(_distill_config(data_dir, g_export), workdir,
                                        devices=devices)
  for a, b in ((full.params, resumed.params), (full.extra, resumed.extra)):
    la, ta = jax.tree_util.tree_flatten_with_path(jax.device_get(a))
    lb, tb = jax.tree_util.tree_flatten_with_path(jax.device_get(b))
    assert ta == tb
    for (path, x), (_, y) in zip(la, lb):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))
  # It learned: X_s moved away from its real initialisation; ages cycle through resets
  # (8 steps, reset every 3, staggered start) and stay below the reset period.
  assert np.abs(np.asarray(full.params["images"]) - init_images).max() > 1e-3
  ages = np.asarray(full.extra["pool_age"])
  assert ages.max() < 3 and ages.shape == (3,)
  assert full.extra["pool_params"]["block_0_conv"]["kernel"].shape[0] == 3

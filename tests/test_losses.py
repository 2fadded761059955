"""Contrastive losses: REFERENCES.md invariants, a float64 numpy reference, chunked == dense.

Tolerances. Everything JAX computes here is float32. Against the float64 numpy reference the
error is float32 round-off of logits of size <= 15 and of sums over B <= 32 terms, a few 1e-6
relative, so losses use rtol=2e-5. Chunked vs dense differ only in reduction order (a streaming
logsumexp merged block by block vs one logsumexp over the row; per-device partial sums then
psum): measured differences are <= 1e-6 relative, so losses use rtol=1e-5 and gradients
atol=1e-5 * max|grad| (+ rtol=1e-4 elementwise). A real bug (a missing block, a transposed
block, a wrong direction weight, a lost hop) moves the loss or gradients at the 1e-2 level.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jax_transfer import losses, parallel

NAMES = ("clip", "align", "siglip")
MESHES = [(8, 1, 1), (2, 4, 1), (4, 2, 1)]
T_INIT = {"clip": math.log(1 / 0.07), "align": math.log(1 / 0.07), "siglip": math.log(10.0)}
B_INIT = -10.0


def _mesh(shape):
  devices = jax.devices()[:int(np.prod(shape))]
  return parallel.make_mesh(dict(zip(parallel.MESH_AXES, shape)), devices)


def _normalise(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _pairs(batch=32, dim=16, noise=0.8, seed=0):
  """Correlated image/text embeddings, float64 numpy, L2-normalised."""
  rng = np.random.default_rng(seed)
  x = _normalise(rng.normal(size=(batch, dim)))
  y = _normalise(x + noise * rng.normal(size=(batch, dim)))
  return x, y


# ---- float64 numpy reference ------------------------------------------------------------------

def _np_logsumexp(a, axis):
  m = a.max(axis=axis, keepdims=True)
  return (m + np.log(np.exp(a - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def np_loss(name, x, y, t, b=B_INIT):
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  n = x.shape[0]
  if name == "siglip":
    logits = math.exp(t) * x @ y.T + b
    z = 2 * np.eye(n) - 1
    return -np.sum(np.log(1 / (1 + np.exp(-z * logits)))) / n
  logits = min(math.exp(t), 100.0) * x @ y.T
  i2t = -np.mean(np.diag(logits) - _np_logsumexp(logits, 1))
  t2i = -np.mean(np.diag(logits) - _np_logsumexp(logits, 0))
  return (i2t + t2i) / 2 if name == "clip" else i2t + t2i


def _loss(name, mesh=None):
  return jax.jit(losses.get_contrastive_loss(name, chunked=mesh is not None, mesh=mesh))


def _put(mesh, *arrays):
  sh = NamedSharding(mesh, P(parallel.BATCH_AXES))
  return [jax.device_put(jnp.asarray(a, jnp.float32), sh) for a in arrays]


@pytest.fixture(scope="module")
def mesh8():
  return _mesh((8, 1, 1))


# ---- reference values and invariants (REFERENCES.md) -------------------------------------------

@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("name", ["clip", "align"])
def test_equal_logits_give_log_batch(name, chunked, mesh8):
  # All pairs identical -> every logit equal -> each direction's CE is ln B.
  x = np.tile(_normalise(np.ones((1, 16))), (32, 1))
  loss, metrics = _loss(name, mesh8 if chunked else None)(*_put(mesh8, x, x), T_INIT[name])
  per_direction = math.log(32)
  np.testing.assert_allclose(loss, per_direction * (1 if name == "clip" else 2), rtol=1e-6)
  assert metrics["i2t_acc"] == 0 and metrics["t2i_acc"] == 0  # ties are not hits


@pytest.mark.parametrize("chunked", [False, True])
def test_clip_orthonormal_pairs_reference(chunked, mesh8):
  x = np.eye(8)
  loss, metrics = _loss("clip", mesh8 if chunked else None)(*_put(mesh8, x, x), T_INIT["clip"])
  np.testing.assert_allclose(loss, 4.37e-6, rtol=5e-3)   # log(1 + 7 e^-14.2857)
  np.testing.assert_allclose(loss, np_loss("clip", x, x, T_INIT["clip"]), rtol=2e-3)
  assert metrics["i2t_acc"] == 1 and metrics["t2i_acc"] == 1


@pytest.mark.parametrize("chunked", [False, True])
def test_siglip_orthogonal_at_init_reference(chunked, mesh8):
  eye = np.eye(16)
  x, y = eye[:8], eye[8:]       # all cosines 0 -> every logit is the bias -10
  loss, _ = _loss("siglip", mesh8 if chunked else None)(*_put(mesh8, x, y), T_INIT["siglip"],
                                                        B_INIT)
  np.testing.assert_allclose(loss, 10.000363, rtol=1e-6)
  np.testing.assert_allclose(loss, np_loss("siglip", x, y, T_INIT["siglip"]), rtol=1e-6)


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_matches_float64_reference(name, chunked, mesh8):
  x, y = _pairs()
  loss, _ = _loss(name, mesh8 if chunked else None)(*_put(mesh8, x, y), T_INIT[name], B_INIT)
  np.testing.assert_allclose(loss, np_loss(name, x, y, T_INIT[name]), rtol=2e-5)


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_symmetric_and_permutation_invariant(name, chunked, mesh8):
  x, y = _pairs(seed=1)
  fn = _loss(name, mesh8 if chunked else None)
  loss, m = fn(*_put(mesh8, x, y), T_INIT[name], B_INIT)
  swapped, ms = fn(*_put(mesh8, y, x), T_INIT[name], B_INIT)
  np.testing.assert_allclose(swapped, loss, rtol=1e-5)
  assert (ms["i2t_acc"], ms["t2i_acc"]) == (m["t2i_acc"], m["i2t_acc"])
  perm = np.random.default_rng(0).permutation(len(x))
  permuted, mp = fn(*_put(mesh8, x[perm], y[perm]), T_INIT[name], B_INIT)
  np.testing.assert_allclose(permuted, loss, rtol=1e-5)
  assert (mp["i2t_acc"], mp["t2i_acc"]) == (m["i2t_acc"], m["t2i_acc"])
  # Permuting only one tower breaks the pairing: the loss must notice.
  broken, _ = fn(*_put(mesh8, x, y[perm]), T_INIT[name], B_INIT)
  assert broken > loss + 0.1


# ---- chunked == dense, values and gradients ----------------------------------------------------

@pytest.mark.parametrize("shape", MESHES)
@pytest.mark.parametrize("name", NAMES)
def test_chunked_equals_dense_with_gradients(name, shape):
  mesh = _mesh(shape)
  x, y = _pairs(seed=2)
  args = (*_put(mesh, x, y), jnp.float32(T_INIT[name]), jnp.float32(B_INIT))
  argnums = (0, 1, 2, 3) if name == "siglip" else (0, 1, 2)
  results = []
  for chunked in (False, True):
    fn = losses.get_contrastive_loss(name, chunked=chunked, mesh=mesh)
    results.append(jax.jit(jax.value_and_grad(fn, argnums=argnums, has_aux=True))(*args))
  ((loss_d, m_d), grads_d), ((loss_c, m_c), grads_c) = results
  np.testing.assert_allclose(loss_c, loss_d, rtol=1e-5)
  for k in m_d:
    np.testing.assert_allclose(m_c[k], m_d[k], rtol=1e-6)
  for g_d, g_c, what in zip(grads_d, grads_c, ("zimg", "ztxt", "logit_scale", "logit_bias")):
    assert g_c.shape == g_d.shape and g_c.dtype == g_d.dtype, what
    scale = float(jnp.max(jnp.abs(g_d)))
    assert scale > 1e-4, what  # a gradient that is ~0 would make the comparison vacuous
    np.testing.assert_allclose(g_c, g_d, rtol=1e-4, atol=1e-5 * scale, err_msg=what)


@pytest.mark.parametrize("name", NAMES)
def test_scalar_gradients_match_float64_finite_differences(name, mesh8):
  # Independent of JAX autodiff: d loss / d t (and d / d b) by central differences in float64.
  x, y = _pairs(seed=3)
  t, h = T_INIT[name], 1e-5
  argnums = (2, 3) if name == "siglip" else (2,)
  fn = losses.get_contrastive_loss(name, chunked=True, mesh=mesh8)
  grads = jax.jit(jax.grad(lambda *a: fn(*a)[0], argnums=argnums))(
      *_put(mesh8, x, y), jnp.float32(t), jnp.float32(B_INIT))
  fd_t = (np_loss(name, x, y, t + h) - np_loss(name, x, y, t - h)) / (2 * h)
  np.testing.assert_allclose(grads[0], fd_t, rtol=1e-4, atol=1e-6)
  if name == "siglip":
    fd_b = (np_loss(name, x, y, t, B_INIT + h) - np_loss(name, x, y, t, B_INIT - h)) / (2 * h)
    np.testing.assert_allclose(grads[1], fd_b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("chunked", [False, True])
def test_softmax_scale_clipped_at_100(chunked, mesh8):
  x, y = _pairs(seed=4)
  fn = losses.get_contrastive_loss("clip", chunked=chunked, mesh=mesh8)
  t = jnp.float32(math.log(200.0))
  (loss, metrics), dt = jax.jit(jax.value_and_grad(fn, argnums=2, has_aux=True))(
      *_put(mesh8, x, y), t)
  np.testing.assert_allclose(metrics["scale"], 100.0, rtol=1e-6)
  np.testing.assert_allclose(loss, np_loss("clip", x, y, math.log(100.0)), rtol=2e-5)
  assert dt == 0.0  # beyond the clip the temperature gets no gradient
  np.testing.assert_allclose(losses.clamp_logit_scale(jnp.array([-1.0, 2.0, 9.0])),
                             [0.0, 2.0, math.log(100.0)], rtol=1e-6)


def test_chunked_never_materialises_the_batch_by_batch_matrix(mesh8):
  # Per-device compiled programs: dense holds [b, B] logit slabs, chunked only [b, b] blocks.
  x, y = _pairs(batch=64)
  args = (*_put(mesh8, x, y), jnp.float32(1.0))

  def hlo(chunked):
    fn = losses.get_contrastive_loss("clip", chunked=chunked, mesh=mesh8)
    return jax.jit(jax.grad(lambda *a: fn(*a)[0], argnums=(0, 1))).lower(*args).compile().as_text()

  assert "f32[8,64]" in hlo(False)  # the check can see the slab where it exists
  chunked_text = hlo(True)
  assert "f32[8,8]" in chunked_text
  for shape in ("f32[8,64]", "f32[64,8]", "f32[64,64]"):
    assert shape not in chunked_text


def test_bfloat16_inputs_get_bfloat16_gradients(mesh8):
  x, y = _pairs()
  xb, yb = (a.astype(jnp.bfloat16) for a in _put(mesh8, x, y))
  fn = losses.get_contrastive_loss("siglip", chunked=True, mesh=mesh8)
  gx, gy = jax.jit(jax.grad(lambda *a: fn(*a)[0], argnums=(0, 1)))(xb, yb, 2.3, -10.0)
  assert gx.dtype == gy.dtype == jnp.bfloat16


def test_registry():
  assert set(losses.CONTRASTIVE_LOSSES) == set(NAMES)
  with pytest.raises(ValueError, match="align, clip, siglip"):
    losses.get_contrastive_loss("infonce")
  with pytest.raises(ValueError, match="mesh"):
    losses.get_contrastive_loss("clip", chunked=True)


def test_indivisible_batch_is_a_clear_error(mesh8):
  x, y = _pairs(batch=12)
  fn = losses.get_contrastive_loss("clip", chunked=True, mesh=mesh8)
  with pytest.raises(ValueError, match="not divisible"):
    fn(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), 1.0)

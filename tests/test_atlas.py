"""aTLAS (jax_transfer/methods/atlas.py): θ = θ_0 + Σ_t λ_t[p] τ_t[p] with the per-tensor
coefficients the only trainable parameters. At λ = 0 the wrapped method's loss is θ_0's; the
gradient w.r.t. λ_t[p] is <∂L/∂θ[p], τ_t[p]>; training on 8 simulated devices equals 1; the
export is the composed θ as a plain export of the wrapped method; bad configs fail early."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_transfer import checkpoint, config as config_lib, export, methods, train


def _config(exports, runlocal=True, **extra):
  from ml_collections_configs.merging import atlas
  arg = f"base={exports['base']},tasks={'+'.join(exports['models'][:2])}"
  c = atlas.get_config(arg + (",runlocal" if runlocal else ""))
  for k, v in extra.items():
    config_lib.with_overrides(c, **{k: v})
  return c


def _flat(t):
  return flax.traverse_util.flatten_dict(t, sep="/")


def test_loss_at_zero_is_the_base_and_the_gradient_is_the_projection(exports):
  c = _config(exports)
  mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
  m = methods.get_method("atlas")(c, mesh)
  import flax.linen as nn
  coef = nn.unbox(m.init_params(jax.random.key(0)))
  extra = m.load_extra(nn.unbox(m.init_extra(jax.random.key(0), coef)))
  theta0 = checkpoint.load_export_params(exports["base"])
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.normal(size=(8, 8, 8, 1)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 5, 8), jnp.int32)}
  key = jax.random.key(1)
  loss0, _ = m.loss_fn(coef, extra, batch, key)
  want, _ = m.inner.loss_fn(jax.tree.map(jnp.asarray, theta0), None, batch, key)
  np.testing.assert_allclose(float(loss0), float(want), rtol=1e-6)
  g_coef = jax.grad(lambda p: m.loss_fn(p, extra, batch, key)[0])(coef)
  g_theta = _flat(jax.grad(lambda p: m.inner.loss_fn(p, None, batch, key)[0])(
      jax.tree.map(jnp.asarray, theta0)))
  taus = _flat(extra["taus"])
  for k, g in _flat(g_coef).items():
    assert not k.startswith("head/")  # skipped: θ_0's head, no coefficient
    want_g = np.tensordot(np.asarray(taus[k]), np.asarray(g_theta[k]), axes=g_theta[k].ndim)
    np.testing.assert_allclose(np.asarray(g), want_g, rtol=1e-4, atol=1e-7, err_msg=k)
  ft = [_flat(checkpoint.load_export_params(d)) for d in exports["models"][:2]]
  base = _flat(theta0)
  for k, tau in taus.items():  # the frozen state holds τ_t = θ_t − θ_0, stacked
    np.testing.assert_allclose(np.asarray(tau), np.stack([f[k] - base[k] for f in ft]),
                               rtol=1e-6, atol=1e-6)


def test_training_on_8_devices_equals_1_moves_only_coefficients_and_exports(exports, tmp_path):
  runs = {}
  for n in (8, 1):
    c = _config(exports)
    if n == 8:
      c.mesh.data, c.mesh.fsdp = 2, 4
    state, final = train.train_and_evaluate(c, str(tmp_path / f"d{n}"),
                                            devices=jax.devices()[:n])
    runs[n] = (jax.device_get(state.params), jax.device_get(state.extra))
  p8, p1 = _flat(runs[8][0]), _flat(runs[1][0])
  assert all(v.shape == (2,) for v in p1.values())  # one coefficient per tensor per task
  assert any(np.abs(v).max() > 0 for v in p1.values())  # they trained
  for k in p1:
    np.testing.assert_allclose(p8[k], p1[k], rtol=1e-5, atol=1e-7, err_msg=k)
  base = _flat(checkpoint.load_export_params(exports["base"]))
  for k, v in _flat(runs[1][1]["base"]).items():  # θ_0 frozen
    np.testing.assert_array_equal(np.asarray(v), base[k])
  out = str(tmp_path / "export")
  export.export_workdir(str(tmp_path / "d1"), out)
  model, params, config = checkpoint.load_pretrained(out)
  assert config.method == "supervised" and "atlas" not in config
  got, taus = _flat(params), _flat(runs[1][1]["taus"])
  for k in base:
    want = base[k] + (np.tensordot(p1[k], np.asarray(taus[k]), axes=1) if k in p1 else 0)
    np.testing.assert_allclose(got[k], want, rtol=1e-5, atol=1e-6, err_msg=k)
  assert "eval/accuracy" in final


@pytest.mark.parametrize("change,pattern", [
    (dict(tasks="wide"), "not the architecture"),
    (dict(tasks=""), "atlas.tasks"),
    (dict(peft="lora"), "coefficients only"),
    (dict(method="atlas"), "atlas.method"),
])
def test_bad_atlas_configs_fail_before_compiling(exports, change, pattern):
  c = _config(exports)
  if "tasks" in change:
    c.atlas.tasks = [exports["wide"]] if change["tasks"] else []
  if "peft" in change:
    c.peft.method = change["peft"]
  if "method" in change:
    c.atlas.method = change["method"]
  with pytest.raises(config_lib.ConfigError, match=pattern):
    config_lib.validate(c, 1)

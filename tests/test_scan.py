"""nn.scan over Transformer blocks (model option scan_layers): the scanned model computes the
same function as the unrolled one, its stacked params convert losslessly to and from the
canonical per-block layout at every boundary (export, pretrained loading, learngene, a
sharded run), and the stacked 'layers' axis shards by the rules.

Tolerance: scan and unrolled compile to different XLA programs (one block body in a while
loop vs. depth inlined copies), so fusion and reduction order differ; outputs agree to f32
round-off (observed ~1e-6), far below what a wrong layer order or a mixed-up block gives.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import tiny_vit_config
from jax_transfer import checkpoint, export as export_lib, methods, metrics as metrics_lib
from jax_transfer import parallel, train
from jax_transfer.models import learngene, make_two_towers, make_vit
from jax_transfer.models.seq_learner import make_seq_transformer
from jax_transfer.models.vit import STACKED, stack_blocks, unstack_blocks

TOL = dict(rtol=1e-5, atol=1e-5)
X = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))


def _params(model, *args):
  return nn.unbox(model.init(jax.random.key(0), *args))["params"]


def _close(a, b):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, **TOL), a, b)


@pytest.mark.parametrize("remat,policy", [(False, "nothing_saveable"),
                                          (True, "nothing_saveable"), (True, "dots_saveable")])
def test_vit_scan_equals_unrolled_with_converted_params(remat, policy):
  kw = dict(num_classes=4, head_zero_init=False, remat=remat, remat_policy=policy)
  plain, scan = make_vit("nano/8", depth=3, **kw), make_vit("nano/8", depth=3,
                                                            scan_layers=True, **kw)
  params = _params(plain, X)
  stacked = stack_blocks(params)
  # The scan model's own init has exactly the converted tree's paths and shapes.
  own = jax.eval_shape(lambda: _params(scan, X))
  assert jax.tree.map(lambda x: x.shape, own) == jax.tree.map(lambda x: x.shape, stacked)
  assert stacked[STACKED]["mlp"]["fc1"]["kernel"].shape == (3, 32, 64)

  def loss(model, p):
    logits, aux = model.apply({"params": p}, X, train=True)
    return jnp.sum(logits ** 2) + jnp.sum(aux["tokens"] ** 2), logits
  (l0, y0), g0 = jax.jit(jax.value_and_grad(lambda p: loss(plain, p), has_aux=True))(params)
  (l1, y1), g1 = jax.jit(jax.value_and_grad(lambda p: loss(scan, p), has_aux=True))(stacked)
  np.testing.assert_allclose(y1, y0, **TOL)
  np.testing.assert_allclose(l1, l0, rtol=1e-5)
  _close(unstack_blocks(g1), g0)  # Gradients reach every layer, in the right order.
  assert np.abs(g0["encoderblock_2"]["attn"]["qkv"]["kernel"]).sum() > 0


def test_scan_params_carry_the_layers_axis_and_per_layer_init():
  boxed = make_vit("nano/8", depth=3, num_classes=4, scan_layers=True).init(
      jax.random.key(0), X)["params"]
  fc1 = boxed[STACKED]["mlp"]["fc1"]["kernel"]
  assert fc1.names == ("layers", "embed", "mlp")
  assert boxed["head"]["kernel"].names == ("embed", "classes")  # Only blocks are stacked.
  w = np.asarray(fc1.value)
  assert not np.array_equal(w[0], w[1]) and not np.array_equal(w[1], w[2])  # split rngs
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  spec = parallel.logical_to_pspec(fc1.names, w.shape, mesh, parallel.DEFAULT_RULES)
  assert spec == P(None, "fsdp", "tensor")  # As the per-block kernel, plus a whole layer axis.


def test_scan_dropout_follows_the_rng_and_train_flag():
  model = make_vit("nano/8", depth=2, num_classes=0, dropout=0.5, scan_layers=True)
  v = model.init(jax.random.key(0), X)
  run = jax.jit(lambda k: model.apply(v, X, train=True, rngs={"dropout": k})[1]["tokens"])
  a, b = run(jax.random.key(1)), run(jax.random.key(2))
  assert not np.allclose(a, b) and not np.allclose(a, model.apply(v, X)[1]["tokens"])


@pytest.mark.parametrize("remat", [False, True])
def test_two_towers_scan_equals_unrolled(remat):
  kw = dict(image_variant="nano/8", text_width=32, text_depth=3, text_heads=2, vocab_size=20,
            context_length=8, embed_dim=24, remat=remat)
  plain, scan = make_two_towers(**kw), make_two_towers(scan_layers=True, **kw)
  tokens = jnp.asarray(np.random.default_rng(0).integers(1, 20, (2, 8)), jnp.int32)
  params = _params(plain, X, tokens)
  stacked = stack_blocks(params)
  assert STACKED in stacked["img"] and STACKED in stacked["txt"]
  assert stacked["txt"][STACKED]["ln_1"]["scale"].shape == (3, 32)
  (zi0, zt0), _ = plain.apply({"params": params}, X, tokens)
  (zi1, zt1), _ = scan.apply({"params": stacked}, X, tokens)
  np.testing.assert_allclose(zi1, zi0, **TOL)
  np.testing.assert_allclose(zt1, zt0, **TOL)


def test_stack_unstack_round_trip_and_errors():
  params = _params(make_two_towers(image_variant="nano/8", text_width=32, text_depth=2,
                                   text_heads=2, vocab_size=20, context_length=8,
                                   embed_dim=24), X, jnp.ones((1, 8), jnp.int32))
  params = jax.device_get(params)
  stacked = stack_blocks(params)
  assert not any(k.startswith("encoderblock_") for k in stacked["img"])
  assert isinstance(stacked["img"][STACKED]["ln_1"]["scale"], np.ndarray)  # stays on host
  back = unstack_blocks(stacked)
  assert checkpoint.flatten(back).keys() == checkpoint.flatten(params).keys()
  jax.tree.map(np.testing.assert_array_equal, back, params)
  jax.tree.map(np.testing.assert_array_equal, stack_blocks(back), stacked)
  # Idempotent on the layout each already has; other trees pass through.
  jax.tree.map(np.testing.assert_array_equal, stack_blocks(stacked), stacked)
  jax.tree.map(np.testing.assert_array_equal, unstack_blocks(params), params)
  assert unstack_blocks({"images": 1}) == stack_blocks({"images": 1}) == {"images": 1}
  with pytest.raises(ValueError, match="cannot stack"):
    stack_blocks({"encoderblock_0": {"w": np.zeros(2)}, "encoderblock_2": {"w": np.zeros(2)}})


def test_export_is_per_block_and_loads_either_way(tmp_path):
  from ml_collections import ConfigDict
  plain = make_vit("nano/8", depth=3, num_classes=4, head_zero_init=False)
  params = jax.device_get(_params(plain, X))
  ref = plain.apply({"params": params}, X)[0]
  cfg = lambda scan: ConfigDict(dict(model_name="vit", model=dict(
      variant="nano/8", depth=3, num_classes=4, scan_layers=scan)))
  scan_init = jax.device_get(_params(plain.clone(scan_layers=True), X))  # other values

  # Scan model -> export: per-block names on disk; load_pretrained rebuilds the scan model.
  checkpoint.export(stack_blocks(params), cfg(True), str(tmp_path / "scan"))
  on_disk = checkpoint.load_export_params(str(tmp_path / "scan"))
  assert "encoderblock_2" in on_disk and STACKED not in on_disk
  model, loaded, _ = checkpoint.load_pretrained(str(tmp_path / "scan"))
  assert model.scan_layers and STACKED in loaded
  np.testing.assert_allclose(model.apply({"params": loaded}, X)[0], ref, **TOL)
  # ... and merges into an unrolled model (init.export_dir), exactly.
  merged = checkpoint.merge_pretrained(jax.device_get(_params(plain, X)), on_disk)
  jax.tree.map(np.testing.assert_array_equal, merged, params)

  # Unrolled export -> scan model, selecting blocks by their per-block names.
  checkpoint.export(params, cfg(False), str(tmp_path / "plain"))
  pre = checkpoint.load_export_params(str(tmp_path / "plain"))
  merged = checkpoint.merge_pretrained(scan_init, pre)
  assert STACKED in merged
  np.testing.assert_allclose(plain.clone(scan_layers=True).apply({"params": merged}, X)[0],
                             ref, **TOL)
  only_b1 = checkpoint.merge_pretrained(scan_init, pre, load_regex="^encoderblock_1/")
  w = only_b1[STACKED]["mlp"]["fc1"]["kernel"]
  np.testing.assert_array_equal(w[1], params["encoderblock_1"]["mlp"]["fc1"]["kernel"])
  np.testing.assert_array_equal(w[0], scan_init[STACKED]["mlp"]["fc1"]["kernel"][0])


def test_learngene_expands_into_a_scan_descendant():
  model = make_vit("nano/2", depth=3, num_classes=5, pool="gap", scan_layers=True)
  images = jax.random.normal(jax.random.key(2), (4, 8, 8, 1))
  lg = nn.unbox(learngene.init_learngene(model, jax.random.key(0), images[:1]))
  lg[learngene.B] = jax.tree.map(lambda x: x + 0.01, lg[learngene.B])
  lg["head"]["kernel"] = 0.1 * jax.random.normal(jax.random.key(4), lg["head"]["kernel"].shape)
  ref = model.clone(scan_layers=False).apply({"params": learngene.expand(lg, 3)}, images)[0]
  out = model.apply({"params": learngene.expand(lg, 3, stacked=True)}, images)[0]
  np.testing.assert_allclose(out, ref, **TOL)
  # Descendant init as Method.load_pretrained does it: depth read from the stacked tree.
  fresh = jax.device_get(_params(model.clone(depth=4), images[:1]))
  assert learngene.vit_depth(fresh) == 4
  loaded = checkpoint.merge_pretrained(fresh, learngene.expand_like(jax.device_get(lg), fresh))
  jax.tree.map(np.testing.assert_array_equal, unstack_blocks(loaded),
               jax.device_get(learngene.expand(lg, 4)))


def test_seq_transformer_scan_equals_unrolled():
  tokens = jax.random.normal(jax.random.key(3), (2, 6, 5))
  for remat in (False, True):
    plain = make_seq_transformer(num_classes=3, width=32, depth=3, num_heads=2, max_len=8,
                                 remat=remat)
    params = _params(plain, tokens)
    scan = plain.clone(scan_layers=True)
    y0 = plain.apply({"params": params}, tokens)[1]["features"]
    y1 = scan.apply({"params": stack_blocks(params)}, tokens)[1]["features"]
    np.testing.assert_allclose(y1, y0, **TOL)


def _run(data_dir, workdir, mesh):
  c = tiny_vit_config(data_dir)
  c.model.scan_layers = True
  c.total_steps, c.log_every_steps, c.eval_every_steps = 4, 1, 4
  c.checkpoint_every_steps = 4
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
  state, final = train.train_and_evaluate(c, workdir, devices=jax.devices()[:int(np.prod(mesh))])
  losses = [m["train/loss"] for m in metrics_lib.read_jsonl(workdir) if "train/loss" in m]
  return c, state, np.array(losses)


def test_sharded_scan_run_equals_one_device_and_exports_per_block(data_dir, tmp_path):
  """Tolerance as tests/test_parallel.py: the meshes sum in different orders."""
  c, state8, l8 = _run(data_dir, str(tmp_path / "m222"), (2, 2, 2))
  _, _, l1 = _run(data_dir, str(tmp_path / "m111"), (1, 1, 1))
  assert len(l1) == 4
  np.testing.assert_allclose(l8, l1, rtol=2e-4)
  fc1 = state8.params[STACKED]["mlp"]["fc1"]["kernel"]
  assert fc1.sharding.spec == P(None, "fsdp", "tensor")
  assert state8.opt_state[1][0].mu[STACKED]["mlp"]["fc1"]["kernel"].sharding.spec == \
      P(None, "fsdp", "tensor")

  # The scan run's export is per-block and initialises an unrolled model to the same function.
  out = str(tmp_path / "export")
  export_lib.export_workdir(str(tmp_path / "m222"), out)
  assert "encoderblock_0" in checkpoint.load_export_params(out)
  c.model.scan_layers, c.init.export_dir, c.init.skip_regex = False, out, "^$"
  mesh1 = parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  plain = methods.get_method("supervised")(c, mesh1)
  loaded = plain.load_pretrained(nn.unbox(plain.init_params(jax.random.key(1))))
  assert "encoderblock_0" in loaded
  images = jax.random.normal(jax.random.key(5), (4, 8, 8, 1))
  c.model.scan_layers = True
  scan = methods.get_method("supervised")(c, mesh1)
  np.testing.assert_allclose(plain.predict(loaded, images),
                             scan.predict(jax.device_get(state8.params), images), **TOL)

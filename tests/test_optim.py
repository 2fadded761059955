"""Optimisers, schedules and masks from the config (jax_transfer/optim.py), without the loop."""
import flax.linen as nn
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


# Regexes a scan model (model.scan_layers=True) must apply as the unrolled one does: paths are
# the canonical per-block ones, and these select whole blocks, the head, or every bias.
WHOLE_BLOCK_REGEXES = [r"encoderblock_\d+/|^head/", "^head/", "bias$", r"encoderblock_\d+/mlp/",
                       "^(cls|embedding)/?", r"(bias|scale|pos_embedding|cls)$"]


def _vit_params(scan):
  from jax_transfer.models import make_vit
  model = make_vit("nano/8", depth=3, num_classes=4, scan_layers=scan)
  return jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0),
                                                    jnp.zeros((1, 16, 16, 3))))["params"])


def _masks(params, regex):
  """(trainable mask, weight-decay mask) as make_optimizer builds them."""
  return (optim._path_mask(params, regex, True),
          optim._path_mask(params, regex, False, key="optimizer.wd_exclude_regex"))


@pytest.mark.parametrize("regex", WHOLE_BLOCK_REGEXES)
def test_scan_model_masks_the_same_params_as_the_unrolled_one(regex):
  from jax_transfer.models.vit import STACKED, has_stacked_blocks, unstack_blocks
  plain, scan = _vit_params(False), _vit_params(True)
  assert has_stacked_blocks(scan) and not has_stacked_blocks(plain)
  for plain_mask, scan_mask in zip(_masks(plain, regex), _masks(scan, regex)):
    # Each stacked leaf's bool, broadcast over its blocks, then in the per-block layout.
    per_layer = jax.tree.map(lambda m, p: np.full(p.shape[:1], m), scan_mask[STACKED],
                             scan[STACKED])
    scan_mask = unstack_blocks(dict(scan_mask, **{STACKED: per_layer}))
    assert jax.tree.map(bool, scan_mask) == plain_mask, regex
  assert any(jax.tree.leaves(_masks(plain, regex)[0]))


def test_scan_model_freezes_whole_blocks_through_the_optimizer():
  """A linear probe plus the blocks on a scan model: the stacked blocks train, the rest not."""
  c = config_lib.base_config()
  c.optimizer.name, c.optimizer.lr, c.optimizer.grad_clip_norm = "sgd", 0.1, 0.0
  c.optimizer.trainable_regex, c.schedule.warmup_steps = r"encoderblock_\d+/|^head/", 0
  tx, _ = optim.make_optimizer(c.optimizer, c.schedule, total_steps=10)
  p = jax.tree.map(lambda x: jnp.ones(x.shape, x.dtype), _vit_params(True))
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, p), tx.init(p), p)
  assert np.all(updates["encoderblocks"]["mlp"]["fc1"]["kernel"] != 0)
  assert np.all(updates["head"]["kernel"] != 0)
  assert np.all(updates["embedding"]["kernel"] == 0)  # Frozen.


@pytest.mark.parametrize("key,regex,word", [
    ("trainable_regex", r"encoderblock_2/|^head/", "frozen"),
    ("wd_exclude_regex", r"encoderblock_[01]/.*kernel$", "excluded from weight decay")])
def test_regex_splitting_a_scanned_stack_is_an_error(key, regex, word):
  c = config_lib.base_config()
  c.optimizer[key] = regex
  tx, _ = optim.make_optimizer(c.optimizer, c.schedule, total_steps=10)
  with pytest.raises(ValueError, match=rf"optimizer.{key}=.* 'encoderblocks/.*' .*cannot be "
                                       rf"{word} separately: set model.scan_layers=False") as e:
    jax.eval_shape(tx.init, _vit_params(True))
  assert "\n" not in str(e.value)
  jax.eval_shape(tx.init, _vit_params(False))  # The unrolled model takes it.


def test_two_tower_stacks_are_matched_per_block_in_each_tower():
  from jax_transfer.models import make_two_towers
  kw = dict(image_variant="nano/8", text_width=32, text_depth=2, text_heads=2, vocab_size=20,
            context_length=8, embed_dim=24)
  params = {}
  for scan in (False, True):
    model = make_two_towers(scan_layers=scan, **kw)
    params[scan] = jax.eval_shape(lambda m=model: nn.unbox(m.init(
        jax.random.key(0), jnp.zeros((1, 16, 16, 3)), jnp.ones((1, 8), jnp.int32)))["params"])
  mask = optim._path_mask(params[True], r"^txt/encoderblock_\d+/", True)
  assert mask["txt"]["encoderblocks"]["ln_1"]["scale"]
  assert not any(jax.tree.leaves(mask["img"]))
  with pytest.raises(optim.MaskError, match=r"'img/encoderblocks/"):
    optim._path_mask(params[True], r"^img/encoderblock_1/", True)
  assert optim._path_mask(params[False], r"^img/encoderblock_1/", True)["img"][
      "encoderblock_1"]["ln_1"]["scale"]


def _step_and_state(config):
  from jax_transfer import methods, parallel, train
  devices = jax.devices()[:1]
  config_lib.validate(config, 1)
  mesh = parallel.make_mesh(config.mesh, devices)
  rules = parallel.rules_from_config(config.sharding_rules)
  method = methods.get_method(config.method)(config, mesh, None)
  tx, schedule = optim.make_optimizer(config.optimizer, config.schedule, config.total_steps)
  state, state_sh = train.create_state(method, tx, mesh, rules, jax.random.key(0))
  step = train.jit_train_step(method, tx, schedule, config, state_sh, mesh)
  return step, state, mesh, rules


def test_frozen_params_cost_no_backward_pass():
  """A linear probe (optimizer.trainable_regex='^head/') differentiates the head only: its
  compiled step has well under 0.4x the FLOPs of full fine-tuning (the backbone runs forward
  only; it was 140.6 vs 141.0 GFLOP when the gradient of every weight was formed), and its
  update equals the full gradient's restricted to the head."""
  from ml_collections_configs.supervised import digits_vit
  from jax_transfer import parallel
  runs = {}
  for name, regex in (("full", ".*"), ("probe", "^head/")):
    c = digits_vit.get_config("runlocal")
    c.optimizer.trainable_regex = regex
    c.input.global_batch_size = 32
    step, state, mesh, rules = _step_and_state(c)
    rng = np.random.default_rng(0)
    batch = {"image": rng.standard_normal((32, 8, 8, 1)).astype(np.float32),
             "label": rng.integers(0, 5, 32).astype(np.int32)}
    batch = parallel.global_batch(batch, mesh)
    with jax.set_mesh(mesh), parallel.with_sharding_rules(rules):
      compiled = step.lower(state, batch).compile()
      flops = compiled.cost_analysis()["flops"]
      before = jax.device_get(state.params)
      new_state, _ = compiled(state, batch)
      new_state, _ = compiled(new_state, batch)  # step 0's warmup lr is 0
    runs[name] = (flops, before, jax.device_get(new_state.params))
  print("step GFLOP full %.4f probe %.4f" % (runs["full"][0] / 1e9, runs["probe"][0] / 1e9))
  assert runs["probe"][0] < 0.4 * runs["full"][0], (runs["probe"][0], runs["full"][0])
  full_before, full_after = runs["full"][1:]
  probe_before, probe_after = runs["probe"][1:]
  # Same init; the probe moves the head only, and by the full gradient's head part (AdamW's
  # update is per leaf; grad clipping differs: the probe clips its own, smaller, norm).
  assert jax.tree.all(jax.tree.map(np.array_equal, full_before, probe_before))
  for k in probe_after:
    if k != "head":
      assert jax.tree.all(jax.tree.map(np.array_equal, probe_after[k], probe_before[k])), k
  moved = np.abs(probe_after["head"]["kernel"] - probe_before["head"]["kernel"]).max()
  assert moved > 0

"""TLEG learngene (Xia et al. 2024): expansion invariants, the distillation loss, and the
auxiliary run through the shared loop (sharded on a (2, 2, 2) mesh) feeding a descendant."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_vit_config
from jax_transfer import checkpoint, export as export_lib, losses, methods, parallel, train
from jax_transfer.models import learngene, make_vit

IMAGES = jnp.zeros((1, 8, 8, 1), jnp.float32)


def _learngene(seed=0, depth=3):
  model = make_vit("nano/2", depth=depth, num_classes=5, pool="gap")
  boxed = learngene.init_learngene(model, jax.random.key(seed), IMAGES)
  lg = jax.tree.map(lambda x: x.unbox(), boxed,
                    is_leaf=lambda x: hasattr(x, "unbox"))
  # Non-zero θ_B everywhere (its init zeroes biases and norms), so the tests see every leaf.
  lg[learngene.B] = jax.tree.map(
      lambda x: x + 0.01 * jax.random.normal(jax.random.key(seed + 1), x.shape), lg[learngene.B])
  return model, lg


def _flat(tree):
  return checkpoint.flatten(jax.device_get(tree))


def test_init_follows_the_papers_code():
  boxed = learngene.init_learngene(make_vit("nano/2", num_classes=5, pool="gap"),
                                   jax.random.key(0), IMAGES)
  a = _flat(jax.tree.map(lambda x: x.unbox(), boxed[learngene.A],
                         is_leaf=lambda x: hasattr(x, "unbox")))
  b = _flat(jax.tree.map(lambda x: x.unbox(), boxed[learngene.B],
                         is_leaf=lambda x: hasattr(x, "unbox")))
  assert np.all(a["ln_1/scale"] == 1) and np.all(b["ln_1/scale"] == 0)
  for k in a:
    if k.endswith("bias"):
      assert not a[k].any() and not b[k].any(), k
    if k.endswith("kernel"):
      for v in (a[k], b[k]):
        assert 0.015 < v.std() < 0.025, (k, v.std())
  assert not np.array_equal(a["mlp/fc1/kernel"], b["mlp/fc1/kernel"])
  assert "cls" not in boxed  # gap pooling: no class token


@pytest.mark.parametrize("depth", [1, 2, 5, 8])
def test_block0_is_theta_a_and_blocks_step_by_theta_b_over_depth(depth):
  _, lg = _learngene()
  vit = _flat(learngene.expand(lg, depth))
  a, b = _flat(lg[learngene.A]), _flat(lg[learngene.B])
  assert learngene.vit_depth(learngene.expand(lg, depth)) == depth
  for k in a:
    np.testing.assert_array_equal(vit[f"encoderblock_0/{k}"], a[k])
    for i in range(1, depth):
      step = vit[f"encoderblock_{i}/{k}"] - vit[f"encoderblock_{i - 1}/{k}"]
      np.testing.assert_allclose(step, b[k] / depth, rtol=1e-4, atol=1e-6, err_msg=k)
  for k in ("embedding/kernel", "pos_embedding", "encoder_norm/scale", "head/kernel"):
    np.testing.assert_array_equal(vit[k], _flat(lg)[k])  # Shared, not expanded.


def test_learngene_size_does_not_depend_on_depth():
  sizes = {d: learngene.num_params(_learngene(depth=d)[1]) for d in (1, 3, 6)}
  assert len(set(sizes.values())) == 1, sizes
  vit_sizes = [learngene.num_params(learngene.expand(_learngene()[1], d)) for d in (2, 4)]
  assert vit_sizes[0] < vit_sizes[1]


def test_distillation_loss_zero_when_student_equals_teacher():
  logits = jax.random.normal(jax.random.key(0), (6, 5)) * 3
  labels = jnp.arange(6) % 5
  for tau in (1.0, 3.0):
    loss, m = losses.soft_distillation_loss(logits, logits, labels, alpha=1.0, temperature=tau)
    assert float(loss) == 0.0
  other = jax.random.normal(jax.random.key(1), (6, 5))
  loss, m = losses.soft_distillation_loss(other, logits, labels, alpha=1.0, temperature=1.0)
  assert float(loss) > 0
  # α = 0 is plain cross-entropy.
  loss, _ = losses.soft_distillation_loss(other, logits, labels, alpha=0.0, temperature=2.0)
  ce = -jnp.take_along_axis(jax.nn.log_softmax(other), labels[:, None], 1).mean()
  np.testing.assert_allclose(loss, ce, rtol=1e-6)


def test_gradients_flow_to_theta_a_and_theta_b():
  model, lg = _learngene(depth=3)
  images = jax.random.normal(jax.random.key(2), (4, 8, 8, 1))
  teacher = jax.random.normal(jax.random.key(3), (4, 5))
  lg["head"]["kernel"] = 0.1 * jax.random.normal(jax.random.key(4), lg["head"]["kernel"].shape)

  def loss(p):
    logits = model.apply({"params": learngene.expand(p, 3)}, images)[0]
    return losses.soft_distillation_loss(logits, teacher, jnp.zeros(4, jnp.int32), alpha=1.0,
                                         temperature=1.0)[0]
  grads = _flat(jax.grad(loss)(lg))
  for part in (learngene.A, learngene.B):
    for k in ("ln_1/scale", "attn/qkv/kernel", "attn/out/bias", "mlp/fc1/kernel",
              "mlp/fc2/bias", "ln_2/bias"):
      assert np.abs(grads[f"{part}/{k}"]).sum() > 0, (part, k)


@pytest.fixture(scope="module")
def teacher_export(data_dir, tmp_path_factory):
  c = tiny_vit_config(data_dir)
  c.total_steps, c.eval_every_steps, c.checkpoint_every_steps = 3, 3, 3
  workdir = str(tmp_path_factory.mktemp("teacher"))
  train.train_and_evaluate(c, workdir, devices=jax.devices()[:1])
  out = str(tmp_path_factory.mktemp("teacher_export"))
  export_lib.export_workdir(workdir, out)
  return out


def _aux_config(data_dir, teacher_dir):
  from ml_collections_configs.learngene import digits_aux
  c = digits_aux.get_config("runlocal")
  c.input.data_dir = data_dir
  c.model.variant, c.model.depth = "nano/2", 3
  c.input.global_batch_size, c.eval.batch_size = 16, 64
  c.total_steps, c.eval_every_steps, c.checkpoint_every_steps = 3, 3, 3
  c.learngene.teacher_dir = teacher_dir
  return c


def test_auxiliary_run_sharded_then_descendant_reproduces_it(data_dir, tmp_path,
                                                             teacher_export):
  c = _aux_config(data_dir, teacher_export)
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
  state, final = train.train_and_evaluate(c, str(tmp_path / "aux"), devices=jax.devices())
  assert np.isfinite(final["eval/accuracy"])

  # Learngene params shard exactly as the same-named ViT block params under the rules.
  mesh = parallel.make_mesh(c.mesh, jax.devices())
  rules = parallel.rules_from_config(c.sharding_rules)
  sup = methods.get_method("supervised")(c, mesh)
  vit_sh = _flat_specs(parallel.logical_to_shardings(
      jax.eval_shape(sup.init_params, jax.random.key(0)), mesh, rules))
  lg_specs = _flat_specs(jax.tree.map(lambda x: x.sharding, state.params))
  for k, spec in lg_specs.items():
    part, _, rest = k.partition("/")
    ref = vit_sh[f"encoderblock_0/{rest}"] if part in (learngene.A, learngene.B) else vit_sh[k]
    assert spec == ref, k
  assert lg_specs[f"{learngene.A}/mlp/fc1/kernel"] == ("fsdp", "tensor")
  # The teacher in `extra` is sharded too, and holds the exported values (not its init).
  teacher = state.extra["teacher"]["encoderblock_0"]["mlp"]["fc1"]["kernel"]
  assert tuple(teacher.sharding.spec) == ("fsdp", "tensor")
  np.testing.assert_array_equal(
      np.asarray(teacher),
      checkpoint.load_export_params(teacher_export)["encoderblock_0"]["mlp"]["fc1"]["kernel"])

  # Export the learngene; a supervised run of depth L_aux initialised from it reproduces the
  # auxiliary model's params and logits exactly.
  out = str(tmp_path / "learngene_export")
  export_lib.export_workdir(str(tmp_path / "aux"), out)
  d = _aux_config(data_dir, teacher_export)
  d.method = "supervised"
  d.init.export_dir, d.init.skip_regex = out, "^$"
  mesh1 = parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  desc = methods.get_method("supervised")(d, mesh1)
  fresh = jax.tree.map(lambda x: x.unbox(), desc.init_params(jax.random.key(1)),
                       is_leaf=lambda x: hasattr(x, "unbox"))
  loaded = desc.load_pretrained(fresh)
  aux_params = jax.device_get(state.params)
  expanded = _flat(learngene.expand(aux_params, 3))
  got = _flat(loaded)
  assert got.keys() == expanded.keys()
  for k in got:
    np.testing.assert_array_equal(got[k], expanded[k], err_msg=k)
  images = jax.random.normal(jax.random.key(5), (4, 8, 8, 1))
  aux = methods.get_method("learngene")(c, mesh1)
  np.testing.assert_array_equal(np.asarray(desc.predict(loaded, images)),
                                np.asarray(aux.predict(aux_params, images)))
  # Another depth works from the same export (only block count differs).
  d.model.depth = 5
  deeper = methods.get_method("supervised")(d, mesh1)
  fresh5 = jax.tree.map(lambda x: x.unbox(), deeper.init_params(jax.random.key(1)),
                        is_leaf=lambda x: hasattr(x, "unbox"))
  assert learngene.vit_depth(deeper.load_pretrained(fresh5)) == 5


def _flat_specs(shardings):
  return {k: tuple(s.spec) for k, s in checkpoint.flatten_keys(shardings).items()}


def test_pooled_gains_pair_arms_by_seed_and_average_depths():
  """experiments/learngene/pool.py: per seed, learngene - scratch averaged over depths; the
  paired t statistic is over seeds."""
  from experiments.learngene.pool import pooled_gains, t_statistic
  runs = lambda rows: {"runs": rows}
  summary = {"budgets": [25, 50], "accuracy_5to9": {
      "2": {"scratch": runs([[0.5, 0.6], [0.4, 0.5]]),
            "learngene": runs([[0.6, 0.7], [0.4, 0.4]])},
      "4": {"scratch": runs([[0.5, 0.5], [0.5, 0.5]]),
            "learngene": runs([[0.7, 0.5], [0.6, 0.8]])}}}
  np.testing.assert_allclose(pooled_gains(summary, 50), [[0.1, -0.1], [0.0, 0.3]])
  per_seed = pooled_gains(summary, 25).mean(0)  # seed 0: (0.1 + 0.2) / 2; seed 1: 0.05.
  np.testing.assert_allclose(per_seed, [0.15, 0.05])
  np.testing.assert_allclose(t_statistic(per_seed), 0.1 / (np.std([0.15, 0.05], ddof=1)
                                                           / np.sqrt(2)))

"""BatchNorm ResNets (models/resnet.py) and their running statistics as the supervised
method's state (extra['batch_stats']): torchvision's parameter counts, train / eval mode BN,
cross-replica statistics (8 devices = 1), resume = uninterrupted, export round trip and
fine-tuning from the export, sequential BN under gradient accumulation."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jax_transfer
from jax_transfer import checkpoint, config as config_lib, export as export_lib, methods
from jax_transfer import metrics as metrics_lib, models, parallel, train
from jax_transfer.models import resnet

STEPS = 6


def _leaves(tree):
  return {k: np.asarray(v) for k, v in checkpoint.flatten(jax.device_get(tree)).items()}


def _assert_same(a, b, **tol):
  la, lb = _leaves(a), _leaves(b)
  assert la.keys() == lb.keys()
  for k in la:
    np.testing.assert_allclose(la[k], lb[k], err_msg=k, **tol)


def _config(data_dir, steps=STEPS):
  from ml_collections_configs.supervised import digits_resnet
  c = digits_resnet.get_config("tiny,runlocal")
  c.input.data_dir = data_dir
  c.input.global_batch_size = 16
  c.eval.batch_size = 64
  c.total_steps, c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = (
      steps, 1, steps, 2)
  return c


def _losses(workdir):
  return {m["step"]: m["train/loss"] for m in metrics_lib.read_jsonl(workdir)
          if "train/loss" in m}


@pytest.mark.parametrize("name,want", [("resnet18", 11_689_512), ("resnet50", 25_557_032)])
def test_param_count_matches_torchvision(name, want):
  model = models.get_model(name, num_classes=1000)  # ImageNet stem (the default)
  assert resnet.param_count(model, (224, 224, 3)) == want  # shapes only: eval_shape


def test_bad_variant_and_stem_are_clear(data_dir):
  with pytest.raises(ValueError, match="Unknown ResNet variant"):
    models.get_model("resnet", variant="7")
  with pytest.raises(TypeError, match="variant is in the name"):
    models.get_model("resnet18", variant="50")
  c = _config(data_dir)
  c.model.stem = "imagnet"
  with pytest.raises(config_lib.ConfigError, match=r"model: Unknown stem 'imagnet'"):
    config_lib.validate(c, 1)


def test_bn_normalises_by_batch_in_train_and_running_in_eval():
  """train=True: (h - batch mean) / sqrt(batch var + eps) and ra <- 0.9 ra + 0.1 batch (flax's
  momentum convention; torch's momentum=0.1); train=False: the running statistics."""
  model = models.get_model("resnet_tiny", num_classes=3, stem="cifar", bn_momentum=0.9)
  x = jax.random.normal(jax.random.key(1), (6, 8, 8, 1))
  variables = jax.jit(model.init)(jax.random.key(0), x[:1])
  params = nn.unbox(variables["params"])
  ra = {k: v + 0.5 for k, v in variables["batch_stats"]["stem_bn"].items()}  # non-trivial ra
  stats = {**variables["batch_stats"], "stem_bn": ra}
  apply = jax.jit(model.apply, static_argnames=("train", "mutable", "capture_intermediates"))
  (_, _), state = apply({"params": params, "batch_stats": stats}, x, train=True,
                        mutable=("batch_stats", "intermediates"), capture_intermediates=True)
  h = state["intermediates"]["stem_conv"]["__call__"][0]
  out = state["intermediates"]["stem_bn"]["__call__"][0]
  mean, var = h.mean((0, 1, 2)), h.var((0, 1, 2))  # biased variance, as flax stores it
  bn = params["stem_bn"]
  np.testing.assert_allclose(out, (h - mean) / np.sqrt(var + 1e-5) * bn["scale"] + bn["bias"],
                             rtol=1e-4, atol=1e-5)
  new = state["batch_stats"]["stem_bn"]
  np.testing.assert_allclose(new["mean"], 0.9 * ra["mean"] + 0.1 * mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new["var"], 0.9 * ra["var"] + 0.1 * var, rtol=1e-5, atol=1e-6)
  _, ev = apply({"params": params, "batch_stats": stats}, x, train=False,
                mutable=("intermediates",), capture_intermediates=True)
  h = ev["intermediates"]["stem_conv"]["__call__"][0]
  np.testing.assert_allclose(ev["intermediates"]["stem_bn"]["__call__"][0],
                             (h - ra["mean"]) / np.sqrt(ra["var"] + 1e-5) * bn["scale"]
                             + bn["bias"], rtol=1e-4, atol=1e-5)


def test_grad_accumulation_updates_stats_per_microbatch(data_dir):
  """grad_accum_steps=2: the running statistics after one step are those of two sequential
  BN updates, on microbatch 0 (examples 0, 2, ...) and then microbatch 1."""
  c = _config(data_dir)
  mesh = parallel.make_mesh(c.mesh, jax.devices()[:1])
  method = methods.get_method(c.method)(c, mesh)
  tx = optax.sgd(0.1)
  state, _ = train.create_state(method, tx, mesh, parallel.rules_from_config(c.sharding_rules),
                               jax.random.key(0))
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.standard_normal((8, 8, 8, 1)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 5, 8), jnp.int32)}
  step = jax.jit(train.make_default_train_step(method, tx, lambda s: 0.1, 2))
  with jax.set_mesh(mesh):
    new, metrics = step(state, batch)
  bn_step = jax.jit(lambda p, s, x: method.model.apply(
      {"params": p, "batch_stats": s}, x, train=True, mutable=["batch_stats"])[1]["batch_stats"])
  stats = state.extra["batch_stats"]
  for i in range(2):
    stats = bn_step(state.params, stats, batch["image"][i::2])
  _assert_same(new.extra["batch_stats"], stats, rtol=1e-5, atol=1e-6)
  assert np.isfinite(float(metrics["train/loss"]))


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("bn_full"))
  state, final = train.train_and_evaluate(_config(data_dir), workdir,
                                          devices=jax.devices()[:1])
  return workdir, state, final


def test_runs_and_stats_move(uninterrupted):
  _, state, final = uninterrupted
  assert int(state.step) == STEPS and 0.0 <= final["eval/accuracy"] <= 1.0
  stem = _leaves(state.extra["batch_stats"])
  assert not np.allclose(stem["stem_bn/mean"], 0.0)  # updated from the init (0, 1)
  assert not np.allclose(stem["stem_bn/var"], 1.0)


def test_8_devices_equal_1_cross_replica(data_dir, tmp_path, uninterrupted):
  """Global-batch BN statistics under jit: the same losses, params and running statistics on
  an 8-device (data 4 x fsdp 2) mesh as on one device; the stats shard like their channels."""
  full_dir, full, _ = uninterrupted
  c = _config(data_dir)
  c.mesh.data, c.mesh.fsdp = 4, 2
  state, _ = train.train_and_evaluate(c, str(tmp_path / "d8"), devices=jax.devices())
  _assert_same(state.extra, full.extra, rtol=1e-4, atol=1e-5)
  _assert_same(state.params, full.params, rtol=1e-3, atol=1e-5)
  l8, l1 = _losses(str(tmp_path / "d8")), _losses(full_dir)
  assert l8.keys() == l1.keys()
  np.testing.assert_allclose([l8[k] for k in sorted(l8)], [l1[k] for k in sorted(l1)],
                             rtol=1e-4)
  mean = state.extra["batch_stats"]["stage2_block1"]["bn1"]["mean"]  # 16 channels
  assert mean.sharding.spec == jax.sharding.PartitionSpec("fsdp")


def test_stop_and_resume_equals_uninterrupted(data_dir, tmp_path, uninterrupted):
  full_dir, full, _ = uninterrupted
  workdir = str(tmp_path / "resumed")
  partial, _ = train.train_and_evaluate(_config(data_dir), workdir, devices=jax.devices()[:1],
                                        stop_after_step=3)  # between checkpoints 2 and 4
  assert int(partial.step) == 3
  state, _ = train.train_and_evaluate(_config(data_dir), workdir, devices=jax.devices()[:1])
  assert int(state.step) == STEPS
  _assert_same(state.params, full.params, rtol=0, atol=0)
  _assert_same(state.extra, full.extra, rtol=0, atol=0)
  assert _losses(workdir) == _losses(full_dir)


def test_export_round_trip_and_finetune_from_it(data_dir, tmp_path, uninterrupted):
  workdir, state, final = uninterrupted
  out = str(tmp_path / "export")
  assert export_lib.export_workdir(workdir, out) == STEPS
  assert checkpoint.BATCH_STATS_FILE in os.listdir(out)
  model, params, _, _, config = jax_transfer.load_pretrained(out)
  stats = checkpoint.load_export_batch_stats(out)
  _assert_same(params, state.params, rtol=0, atol=0)
  _assert_same(stats, state.extra["batch_stats"], rtol=0, atol=0)
  # The rebuilt model with the exported running statistics reproduces the run's eval.
  from jax_transfer.evaluators.classification import ClassificationEvaluator
  mesh = parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  ev = ClassificationEvaluator(
      lambda p, x, e: model.apply({"params": p, "batch_stats": e}, x, train=False)[0],
      config.input, "test", 64, mesh, 1, with_extra=True)
  got = ev.run(params, stats)
  assert got["accuracy"] == pytest.approx(final["eval/accuracy"], abs=1e-6)
  assert got["loss"] == pytest.approx(final["eval/loss"], rel=1e-5)

  # Fine-tuning from the export (init_from_export, head kept): extra starts from the
  # exported statistics (load_extra); bn_momentum=1 keeps them, so they must come back equal.
  probe = _config(data_dir, steps=2)
  probe.model.frozen_bn, probe.model.bn_momentum = True, 0.5
  probe = config_lib.init_from_export(probe, out, keep_head=True)
  assert (probe.model.frozen_bn, probe.model.bn_momentum) == (True, 0.5)  # the fine-tune's
  c = _config(data_dir, steps=2)
  c.model.bn_momentum = 1.0
  c = config_lib.init_from_export(c, out, keep_head=True)
  assert c.model.bn_momentum == 1.0 and not c.model.frozen_bn
  c.optimizer.lr = 1e-9
  ft, ft_eval = train.train_and_evaluate(c, str(tmp_path / "ft"), devices=jax.devices()[:1])
  _assert_same(ft.extra["batch_stats"], stats, rtol=0, atol=0)
  assert ft_eval["eval/accuracy"] == pytest.approx(final["eval/accuracy"], abs=1e-6)

  # An export without statistics (older, or imported) still loads; a fine-tune's BN starts
  # from mean 0 / var 1.
  os.remove(os.path.join(out, checkpoint.BATCH_STATS_FILE))
  assert checkpoint.load_export_batch_stats(out) is None
  _assert_same(jax_transfer.load_pretrained(out).params, state.params, rtol=0, atol=0)
  method = methods.get_method(c.method)(c, mesh)
  fresh = nn.unbox(method.init_extra(jax.random.key(0), None))
  _assert_same(method.load_extra(fresh), fresh, rtol=0, atol=0)


def test_probe_with_frozen_bn_keeps_the_exported_backbone_and_statistics(
    data_dir, tmp_path, uninterrupted):
  """digits_resnet `probe` (head only, model.frozen_bn): the backbone's params and running
  statistics come back exactly the export's, so the head trained on the features the
  evaluation sees; without frozen_bn the same head-only run re-estimates the statistics."""
  workdir, state, _ = uninterrupted
  out = str(tmp_path / "export")
  export_lib.export_workdir(workdir, out)
  from ml_collections_configs.supervised import digits_resnet

  def probe(frozen, name):
    c = digits_resnet.get_config("tiny,probe,runlocal")
    assert c.model.frozen_bn and c.optimizer.trainable_regex == "^head/"
    c.model.frozen_bn = frozen
    c.input.data_dir, c.init.export_dir, c.init.skip_regex = data_dir, out, "^head/"
    c.total_steps, c.eval_every_steps, c.checkpoint_every_steps = 4, 4, 4
    return train.train_and_evaluate(c, str(tmp_path / name), devices=jax.devices()[:1])[0]

  frozen = probe(True, "frozen")
  _assert_same(frozen.extra["batch_stats"], state.extra["batch_stats"], rtol=0, atol=0)
  got, want = _leaves(frozen.params), _leaves(state.params)
  for k in got:
    if not k.startswith("head/"):
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  assert not np.allclose(got["head/kernel"], 0.0)  # zero-init head trained
  moved = _leaves(probe(False, "unfrozen").extra["batch_stats"])
  assert not np.allclose(moved["stem_bn/mean"], _leaves(state.extra["batch_stats"])[
      "stem_bn/mean"])


def test_bitfit_adapter_export_carries_the_moved_statistics(data_dir, tmp_path, uninterrupted):
  """BitFit on a BN ResNet trains the BN biases in train mode, so the running statistics move:
  the adapter export (--adapter_only) writes them, load_pretrained(base, adapter) with
  checkpoint.adapter_batch_stats reproduces the run's evaluation, and a run from
  init.adapter_dir starts from them (load_extra)."""
  workdir, state, _ = uninterrupted
  base = str(tmp_path / "base")
  export_lib.export_workdir(workdir, base)
  c = _config(data_dir, steps=4)
  c.checkpoint_every_steps = 4
  c.init.export_dir, c.init.skip_regex = base, "^$"
  c.peft.method = "bitfit"
  run = str(tmp_path / "bitfit")
  bitfit, final = train.train_and_evaluate(c, run, devices=jax.devices()[:1])
  assert not np.allclose(_leaves(bitfit.extra["batch_stats"])["stem_bn/mean"],
                         _leaves(state.extra["batch_stats"])["stem_bn/mean"])
  adapter = str(tmp_path / "adapter")
  export_lib.export_workdir(run, adapter, adapter_only=True)
  assert checkpoint.BATCH_STATS_FILE in os.listdir(adapter)
  stats = checkpoint.adapter_batch_stats(base, adapter)
  _assert_same(stats, bitfit.extra["batch_stats"], rtol=0, atol=0)
  _assert_same(checkpoint.adapter_batch_stats(base), state.extra["batch_stats"], rtol=0, atol=0)

  model, params, config = checkpoint.load_pretrained(base, adapter)
  from jax_transfer.evaluators.classification import ClassificationEvaluator
  mesh = parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  ev = ClassificationEvaluator(
      lambda p, x, e: model.apply({"params": p, "batch_stats": e}, x, train=False)[0],
      config.input, "test", 64, mesh, 1, with_extra=True)
  assert ev.run(params, stats)["accuracy"] == pytest.approx(final["eval/accuracy"], abs=1e-6)

  c2 = _config(data_dir, steps=2)
  c2.init.export_dir, c2.init.adapter_dir, c2.init.skip_regex = base, adapter, "^$"
  c2.model.bn_momentum, c2.optimizer.lr = 1.0, 1e-9
  ft, _ = train.train_and_evaluate(c2, str(tmp_path / "ft"), devices=jax.devices()[:1])
  _assert_same(ft.extra["batch_stats"], stats, rtol=0, atol=0)

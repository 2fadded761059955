"""The shared loop: resume equals an uninterrupted run, restore onto another mesh, NaN guard,
export round trip, transfer initialisation, linear probe freezing, grad accumulation."""
import json
import os

import jax
import numpy as np
import pytest

import jax_transfer
from conftest import tiny_vit_config
from jax_transfer import checkpoint, export as export_lib, metrics as metrics_lib, train


def _leaves(params):
  return {k: np.asarray(v) for k, v in checkpoint.flatten(jax.device_get(params)).items()}


def _assert_same_params(a, b, **tol):
  la, lb = _leaves(a), _leaves(b)
  assert la.keys() == lb.keys()
  for k in la:
    np.testing.assert_allclose(la[k], lb[k], err_msg=k, **tol)


def _config(data_dir, steps=12):
  c = tiny_vit_config(data_dir)
  c.total_steps, c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = steps, 1, 6, 4
  return c


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("full"))
  state, final = train.train_and_evaluate(_config(data_dir), workdir,
                                          devices=jax.devices()[:2])
  return workdir, state, final


def test_stop_and_resume_equals_uninterrupted(data_dir, tmp_path, uninterrupted):
  _, full_state, _ = uninterrupted
  workdir = str(tmp_path / "resumed")
  # Stop after step 7: between checkpoints (4, 8), like a preemption with a forced save.
  partial, _ = train.train_and_evaluate(_config(data_dir), workdir, devices=jax.devices()[:2],
                                        stop_after_step=7)
  assert int(partial.step) == 7
  state, _ = train.train_and_evaluate(_config(data_dir), workdir, devices=jax.devices()[:2])
  assert int(state.step) == 12
  # Same devices, same data position, same per-step RNG: bitwise equal on CPU.
  _assert_same_params(state.params, full_state.params, rtol=0, atol=0)
  losses = {m["step"]: m["train/loss"] for m in metrics_lib.read_jsonl(workdir)
            if "train/loss" in m}
  full = {m["step"]: m["train/loss"] for m in metrics_lib.read_jsonl(uninterrupted[0])
          if "train/loss" in m}
  assert losses == full


def test_restore_onto_different_mesh(data_dir, tmp_path):
  workdir = str(tmp_path / "remesh")
  c = _config(data_dir)
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 2, 2
  saved, _ = train.train_and_evaluate(c, workdir, devices=jax.devices()[:4],
                                      stop_after_step=4)
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 8, 1, 1
  c.total_steps = 4  # Nothing left to train: restore and evaluate only.
  restored, _ = train.train_and_evaluate(c, workdir, devices=jax.devices())
  _assert_same_params(restored.params, saved.params, rtol=0, atol=0)
  kernel = restored.params["encoderblock_0"]["mlp"]["fc1"]["kernel"]
  assert kernel.sharding.mesh.shape["data"] == 8  # Lives on the new mesh.


def test_nan_loss_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path):
  workdir = str(tmp_path / "nan")
  c = _config(data_dir, steps=40)
  c.optimizer.name, c.optimizer.lr, c.optimizer.grad_clip_norm = "sgd", 1e30, 0.0
  c.schedule.warmup_steps = 0
  with pytest.raises(train.NonFiniteLossError, match=r"at step \d+") as err:
    train.train_and_evaluate(c, workdir, devices=jax.devices()[:1])
  step = int(str(err.value).split("at step ")[1].split(";")[0])
  mngr = checkpoint.checkpoint_manager(workdir, 3, 4)
  good = mngr.latest_step()
  mngr.close()
  assert good is None or good < step
  if good is not None:  # The checkpoint left behind holds finite parameters.
    out = str(tmp_path / "nan_export")
    export_lib.export_workdir(workdir, out)
    params = jax_transfer.load_pretrained(out).params
    assert all(np.isfinite(v).all() for v in _leaves(params).values())


def test_export_round_trip_and_load_pretrained(tmp_path, uninterrupted):
  workdir, state, final = uninterrupted
  out = str(tmp_path / "export")
  assert export_lib.export_workdir(workdir, out) == 12
  assert sorted(os.listdir(out)) == ["config.json", "params.msgpack", "params.safetensors"]
  model, params, _, _, config = jax_transfer.load_pretrained(out)
  _assert_same_params(params, state.params, rtol=0, atol=0)
  assert config.model.variant == "nano/2"
  # The rebuilt model reproduces the run's eval accuracy from the exported params.
  from jax_transfer.evaluators.classification import ClassificationEvaluator
  from jax_transfer import parallel
  mesh = parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  ev = ClassificationEvaluator(lambda p, x: model.apply({"params": p}, x)[0], config.input,
                               "test", 64, mesh, 1)
  assert ev.run(params)["accuracy"] == pytest.approx(final["eval/accuracy"], abs=1e-6)
  # No pickle anywhere: the msgpack holds the same arrays.
  import flax
  with open(os.path.join(out, "params.msgpack"), "rb") as f:
    restored = flax.serialization.msgpack_restore(f.read())
  _assert_same_params(restored, state.params, rtol=0, atol=0)


def test_export_dir_missing_files_is_clear(tmp_path):
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match=r"lacks \['params.safetensors'\]"):
    jax_transfer.load_pretrained(str(tmp_path))


def test_transfer_init_and_linear_probe_freeze_backbone(data_dir, tmp_path, uninterrupted):
  workdir, state, _ = uninterrupted
  out = str(tmp_path / "export")
  export_lib.export_workdir(workdir, out)
  c = _config(data_dir, steps=5)
  c.input.classes = (5, 6, 7)
  c.model.num_classes = 3
  c.init.export_dir = out
  c.optimizer.trainable_regex = "^head/"
  probe, _ = train.train_and_evaluate(c, str(tmp_path / "probe"), devices=jax.devices()[:1])
  pre, new = _leaves(state.params), _leaves(probe.params)
  backbone = [k for k in pre if not k.startswith("head/")]
  for k in backbone:  # Loaded, then frozen: identical to the pretrained values.
    np.testing.assert_array_equal(new[k], pre[k], err_msg=k)
  assert new["head/kernel"].shape == (32, 3)
  assert np.abs(new["head/kernel"]).sum() > 0  # The new head did train (it starts at zero).


def test_transfer_shape_mismatch_names_parameter(data_dir, tmp_path, uninterrupted):
  workdir, _, _ = uninterrupted
  out = str(tmp_path / "export")
  export_lib.export_workdir(workdir, out)
  c = _config(data_dir, steps=2)
  c.model.variant = "mu/2"  # Wider model: every block's params mismatch.
  c.init.export_dir = out
  with pytest.raises(ValueError, match=r"parameter '.*' has shape .*different architecture"):
    train.train_and_evaluate(c, str(tmp_path / "mismatch"), devices=jax.devices()[:1])


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_grad_accumulation_matches_full_batch(data_dir, tmp_path, peft):
  """Accumulating 4 microbatches of 4 = one batch of 16 (mean loss), to float round-off; with
  frozen leaves (LoRA) only the trainable leaves' grads are accumulated."""
  runs = {}
  for accum in (1, 4):
    c = _config(data_dir, steps=3)
    c.grad_accum_steps = accum
    c.peft.method = peft
    runs[accum], _ = train.train_and_evaluate(c, str(tmp_path / f"acc{accum}"),
                                              devices=jax.devices()[:1])
  _assert_same_params(runs[1].params, runs[4].params, rtol=1e-4, atol=1e-6)


def test_workdir_files(uninterrupted):
  workdir = uninterrupted[0]
  names = set(os.listdir(workdir))
  assert {"metrics.jsonl", "config.json", "checkpoints", "tensorboard",
          "final_metrics.json"} <= names
  assert any(f.startswith("events.out.tfevents") for f in
             os.listdir(os.path.join(workdir, "tensorboard")))
  rows = metrics_lib.read_jsonl(workdir)
  assert all("step" in r for r in rows)
  assert any("eval/accuracy" in r for r in rows)
  assert any("examples_per_sec" in r for r in rows)
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["model"]["variant"] == "nano/2"


def test_relaunch_of_a_finished_run_only_evaluates(data_dir, uninterrupted):
  workdir, full_state, final = uninterrupted
  state, again = train.train_and_evaluate(_config(data_dir), workdir, devices=jax.devices()[:2])
  assert int(state.step) == 12
  _assert_same_params(state.params, full_state.params, rtol=0, atol=0)
  assert again == final

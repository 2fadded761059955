"""PEFT export (peft.py "Merge and export", checkpoint.py "Adapter exports").

Invariants: merge_lora's plain model computes what the LoRA model does, scan-stacked, sharded
and under jit alike: in f32 within 1e-5 of the logits' scale (measured <= 6e-7); with bf16
compute the merged bf16 model is within 3e-2 of the f32 LoRA model, the same bound the
unmerged bf16 model meets (both measured <= 1.8e-2: merging costs no more than bf16 compute
itself; merged and unmerged bf16 differ from each other by up to 2.5e-2). A LoRA / BitFit
run's export is a plain model (config.peft.method 'none'); the export of a method that does
not merge keeps its params and loads wrapped, computing exactly what the trained model did;
an adapter export holds only the trained params and applies onto its own base only; a LoRA
run resumed equals an uninterrupted one.
"""
import json
import os

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_vit_config
from jax_transfer import (checkpoint, config as config_lib, export as export_lib, methods,
                          metrics as metrics_lib, models, parallel, peft, train)
from jax_transfer.methods.supervised import build_model

F32_TOL, BF16_TOL = 1e-5, 3e-2  # max |logits - reference| / max(1, max |reference|)


def _cfg(**fields):
  from ml_collections_configs.supervised import digits_vit
  c = digits_vit.get_config("runlocal")
  c.peft.update(fields)
  return c


def _flat(tree):
  return flax.traverse_util.flatten_dict(nn.unbox(jax.device_get(tree)), sep="/")


def _unflat(flat):
  return flax.traverse_util.unflatten_dict(flat, sep="/")


def _images(n=4, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(n, 8, 8, 1)), jnp.float32)


def _init_nonzero(model, seed=0):
  """model's params with every zero-initialised PEFT param (lora_b, adapter_up) and the
  (zero-initialised) head kernel random."""
  flat = _flat(model.init(jax.random.key(seed), _images())["params"])
  keys = jax.random.split(jax.random.key(seed + 1), len(flat))
  return _unflat({k: (0.1 * jax.random.normal(r, v.shape, v.dtype)
                      if k.endswith(("lora_b", "adapter_up", "head/kernel")) else v)
                  for r, (k, v) in zip(keys, flat.items())})


def _rel_err(got, want):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  return float(np.abs(got - want).max() / max(1.0, np.abs(want).max()))


@pytest.mark.parametrize("dtype,tol", [("float32", F32_TOL), ("bfloat16", BF16_TOL)])
@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("target,pool", [("", "cls"), (".*", "map")])
def test_merge_lora_equals_the_lora_model(dtype, tol, scan, target, pool):
  """Default target (fused qkv [D, 3, H, K], per-head out [H, K, D]) and every Dense /
  Projection ('.*': MLPs, the MAP head's sliced qkv, the classifier head)."""
  c = _cfg(method="lora", rank=4, alpha=8.0, target_regex=target)
  vit = lambda d: models.make_vit("mu/2", num_classes=5, pool=pool, dtype=jnp.dtype(d),
                                  scan_layers=scan)
  base, p = vit(dtype), peft.from_config(c)
  model = peft.wrap(base, c)
  params = _init_nonzero(model)
  merged = jax.jit(lambda t: peft.merge_lora(t, p))(params)
  base_keys = set(_flat(base.init(jax.random.key(0), _images())["params"]))
  assert set(_flat(merged)) == base_keys  # lora_a / lora_b gone, nothing else
  x = _images(seed=1)
  want = peft.wrap(vit("float32"), c).apply({"params": params}, x)[0]  # the f32 LoRA model
  err = _rel_err(base.apply({"params": merged}, x)[0], want)
  unmerged_err = _rel_err(model.apply({"params": params}, x)[0], want)
  print(f"merge_lora {dtype} scan={scan} target={target!r}: relative error {err:.2e} "
        f"(unmerged {unmerged_err:.2e})")
  assert err < tol and unmerged_err < tol
  unmerged_base = {k: v for k, v in _flat(params).items() if "lora_" not in k}
  assert _rel_err(base.apply({"params": _unflat(unmerged_base)}, x)[0], want) > 10 * tol


def test_merge_lora_on_sharded_params_equals_unsharded():
  c = _cfg(method="lora", rank=4)
  model = peft.wrap(models.make_vit("mu/2", num_classes=5), c)
  p = peft.from_config(c)
  boxed = model.init(jax.random.key(0), _images())["params"]
  mesh = parallel.make_mesh(config_lib.with_overrides(
      _cfg(), **{"mesh.data": 2, "mesh.fsdp": 4}).mesh, jax.devices())
  shardings = parallel.logical_to_shardings(
      boxed, mesh, parallel.rules_from_config(_cfg().sharding_rules))
  params = _init_nonzero(model)
  sharded = jax.device_put(params, shardings)
  assert not sharded["encoderblock_0"]["attn"]["qkv"]["kernel"].sharding.is_fully_replicated
  got, want = _flat(jax.jit(lambda t: peft.merge_lora(t, p))(sharded)), _flat(
      peft.merge_lora(params, p))
  assert got.keys() == want.keys()
  for k in got:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7, err_msg=k)


def _export_and_load(params, config, out):
  checkpoint.export(params, config, out)
  return checkpoint.load_pretrained(out)


@pytest.mark.parametrize("scan", [False, True])
def test_lora_export_is_a_plain_model(tmp_path, scan):
  c = _cfg(method="lora", rank=4, alpha=8.0)
  c.model.scan_layers = scan
  model = build_model(c)
  params = _init_nonzero(model)
  loaded, loaded_params, config = _export_and_load(params, c, str(tmp_path / "e"))
  assert not isinstance(loaded, peft.PeftModel) and config.peft.method == "none"
  assert c.peft.method == "lora"  # the caller's config is left alone
  assert not [k for k in _flat(loaded_params) if "lora_" in k]
  x = _images(seed=2)
  assert _rel_err(loaded.apply({"params": loaded_params}, x)[0],
                  model.apply({"params": params}, x)[0]) < F32_TOL


def test_bitfit_export_is_the_same_params_plainly(tmp_path):
  c = _cfg(method="bitfit")
  params = _init_nonzero(build_model(c))
  loaded, loaded_params, config = _export_and_load(params, c, str(tmp_path / "e"))
  assert not isinstance(loaded, peft.PeftModel) and config.peft.method == "none"
  a, b = _flat(params), _flat(loaded_params)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("method,scan", [("adapter", False), ("parallel_adapter", True)])
def test_unmergeable_export_keeps_peft_and_loads_wrapped(tmp_path, method, scan):
  c = _cfg(method=method, rank=4)
  c.model.scan_layers = scan
  model = build_model(c)
  params = _init_nonzero(model)
  loaded, loaded_params, config = _export_and_load(params, c, str(tmp_path / "e"))
  assert isinstance(loaded, peft.PeftModel) and config.peft.method == method
  assert any("adapter_up" in k for k in _flat(loaded_params))
  x = _images(seed=3)
  np.testing.assert_array_equal(np.asarray(loaded.apply({"params": loaded_params}, x)[0]),
                                np.asarray(model.apply({"params": params}, x)[0]))


# ------------------------------------------------------------------ A LoRA run from a base.

def _lora_config(data_dir, base_dir, steps=4):
  c = tiny_vit_config(data_dir)
  c.total_steps, c.checkpoint_every_steps, c.eval_every_steps, c.log_every_steps = (
      steps, 2, steps, 1)
  c.schedule.warmup_steps, c.optimizer.lr = 0, 1e-2  # LoRA moves visibly in 4 steps
  c.peft.method, c.peft.rank = "lora", 4
  c.init.export_dir = base_dir
  return c


@pytest.fixture(scope="module")
def base(data_dir, tmp_path_factory):
  """(workdir, export dir) of a 2-step plain run: the base the LoRA runs start from."""
  workdir = str(tmp_path_factory.mktemp("base_run"))
  c = tiny_vit_config(data_dir)
  c.total_steps, c.checkpoint_every_steps, c.eval_every_steps = 2, 2, 2
  train.train_and_evaluate(c, workdir, devices=jax.devices()[:1])
  out = str(tmp_path_factory.mktemp("base_export"))
  export_lib.export_workdir(workdir, out)
  return workdir, out


@pytest.fixture(scope="module")
def lora_run(data_dir, base, tmp_path_factory):
  """(config, workdir, final state) of an uninterrupted 4-step LoRA run from `base`."""
  workdir = str(tmp_path_factory.mktemp("lora_run"))
  c = _lora_config(data_dir, base[1])
  state, _ = train.train_and_evaluate(c, workdir, devices=jax.devices()[:1])
  return c, workdir, state


@pytest.fixture(scope="module")
def adapter(lora_run, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("adapter"))
  assert export_lib.export_workdir(lora_run[1], out, adapter_only=True) == 4
  return out


def _trained_logits(lora_run, x):
  c, _, state = lora_run
  return build_model(c).apply({"params": jax.device_get(state.params)}, x)[0]


def test_lora_run_resumed_equals_uninterrupted(data_dir, base, lora_run, tmp_path):
  c, full_dir, full = lora_run
  workdir = str(tmp_path / "resumed")
  partial, _ = train.train_and_evaluate(_lora_config(data_dir, base[1]), workdir,
                                        devices=jax.devices()[:1], stop_after_step=3)
  assert int(partial.step) == 3
  state, _ = train.train_and_evaluate(_lora_config(data_dir, base[1]), workdir,
                                      devices=jax.devices()[:1])
  assert int(state.step) == 4
  a, b = _flat(state.params), _flat(full.params)
  assert a.keys() == b.keys() and any("lora_b" in k for k in a)
  for k in a:  # same devices, data position and per-step rng: bitwise on CPU
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  losses = lambda w: {m["step"]: m["train/loss"] for m in metrics_lib.read_jsonl(w)
                      if "train/loss" in m}
  assert losses(workdir) == losses(full_dir)


def test_lora_run_exports_a_merged_plain_model(base, lora_run, tmp_path):
  out = str(tmp_path / "merged")
  export_lib.export_workdir(lora_run[1], out)
  model, params, config = checkpoint.load_pretrained(out)
  assert not isinstance(model, peft.PeftModel) and config.peft.method == "none"
  assert not [k for k in _flat(params) if "lora_" in k]
  x = _images(seed=4)
  want = _trained_logits(lora_run, x)
  err = _rel_err(model.apply({"params": params}, x)[0], want)
  print(f"merged export of a trained LoRA run: relative error {err:.2e}")
  assert err < F32_TOL
  bmodel, bparams, _ = checkpoint.load_pretrained(base[1])  # not vacuous: LoRA moved it
  head = {k: v for k, v in _flat(params).items() if k.startswith("head/")}
  other = _unflat({**_flat(bparams), **head})
  assert _rel_err(bmodel.apply({"params": other}, x)[0], want) > 100 * F32_TOL


def test_adapter_export_holds_the_trained_params_and_applies_onto_its_base(
    base, lora_run, adapter):
  from safetensors.numpy import load_file
  _, _, state = lora_run
  names = sorted(load_file(os.path.join(adapter, "params.safetensors")))
  want = sorted(k for k in _flat(state.params) if "lora_" in k or k.startswith("head/"))
  assert names == want
  with open(os.path.join(adapter, checkpoint.ADAPTER_BASE)) as f:
    record = json.load(f)
  assert record["base_dir"] == os.path.abspath(base[1]) and record["model"]["variant"] == "nano/2"
  with pytest.raises(ValueError, match=r"is an adapter export .*adapter_dir="):
    checkpoint.load_pretrained(adapter)
  pre = checkpoint.load_pretrained_all(base[1], adapter_dir=adapter)
  assert isinstance(pre.model, peft.PeftModel) and pre.config.peft.method == "lora"
  x = _images(seed=5)
  np.testing.assert_array_equal(np.asarray(pre.model.apply({"params": pre.params}, x)[0]),
                                np.asarray(_trained_logits(lora_run, x)))


def test_adapter_for_another_base_is_refused_naming_both_and_what_differs(
    base, adapter, tmp_path):
  flat = checkpoint.flatten(checkpoint.load_export_params(base[1]))
  flat["encoderblock_0/mlp/fc1/bias"] = flat["encoderblock_0/mlp/fc1/bias"] + 1.0
  other = str(tmp_path / "other")
  checkpoint.export(checkpoint.unflatten(flat), checkpoint.load_export_config(base[1]), other)
  with pytest.raises(checkpoint.AdapterError, match=(
      rf"adapter export '{adapter}' was trained on the base export '{base[1]}', not on "
      rf"'{other}': the same parameter names and shapes but other values")):
    checkpoint.load_pretrained(other, adapter_dir=adapter)
  c = _cfg()
  c.model.variant = "mu/2"
  wide = str(tmp_path / "wide")
  checkpoint.export(nn.unbox(build_model(c).init(jax.random.key(0), _images())["params"]), c,
                    wide)
  with pytest.raises(checkpoint.AdapterError, match=r"model.variant 'nano/2' vs 'mu/2'"):
    checkpoint.load_pretrained(wide, adapter_dir=adapter)
  with pytest.raises(checkpoint.AdapterError, match=r"is no adapter export"):
    checkpoint.load_pretrained(base[1], adapter_dir=other)


def test_init_adapter_dir_starts_a_run_from_the_adapted_model(data_dir, base, lora_run,
                                                              adapter):
  """Same PEFT: the LoRA params load as they are; no PEFT: the adapter is merged into the
  kernels (the merged export's params); another method: a one-line error."""
  _, _, state = lora_run
  mesh = parallel.make_mesh(tiny_vit_config(data_dir).mesh, jax.devices()[:1])

  def loaded(**peft_fields):
    c = _lora_config(data_dir, base[1])
    c.init.adapter_dir, c.init.skip_regex = adapter, "^$"
    c.peft.update(peft_fields)
    m = methods.get_method(c.method)(c, mesh)
    return _flat(m.load_pretrained(nn.unbox(m.init_params(jax.random.key(7)))))

  same, trained = loaded(), _flat(state.params)
  assert same.keys() == trained.keys()
  for k in same:
    np.testing.assert_array_equal(same[k], trained[k], err_msg=k)
  plain = loaded(method="none")
  c = _lora_config(data_dir, base[1])
  merged = _flat(peft.merge_lora(jax.device_get(state.params), peft.from_config(c)))
  assert plain.keys() == merged.keys()
  for k in plain:
    np.testing.assert_allclose(plain[k], merged[k], rtol=1e-6, atol=1e-7, err_msg=k)
  with pytest.raises(checkpoint.AdapterError, match=r"lora parameter .* this run's model lacks"):
    loaded(target_regex=r".*attn/qkv")


def test_adapter_only_needs_a_peft_run_from_an_export(base, tmp_path):
  with pytest.raises(ValueError, match=r"--adapter_only: the run has no config.peft method"):
    export_lib.export_workdir(base[0], str(tmp_path / "a"), adapter_only=True)
  assert not (tmp_path / "a").exists()


def test_frozen_bf16_run_exports_and_adapter_equal_the_trained_model(data_dir, base,
                                                                     tmp_path):
  """peft.frozen_dtype='bfloat16' (frozen leaves stored in bf16): the merged export and the
  adapter applied onto the f32 base (its frozen leaves rounded through bf16 as in training)
  compute what the trained model did."""
  c = _lora_config(data_dir, base[1], steps=2)
  c.peft.frozen_dtype = "bfloat16"
  workdir = str(tmp_path / "run")
  state, _ = train.train_and_evaluate(c, workdir, devices=jax.devices()[:1])
  assert _flat(state.params)["encoderblock_0/attn/qkv/kernel"].dtype == jnp.bfloat16
  x = _images(seed=6)
  want = build_model(c).apply({"params": jax.device_get(state.params)}, x)[0]
  export_lib.export_workdir(workdir, str(tmp_path / "merged"))
  model, params, config = checkpoint.load_pretrained(str(tmp_path / "merged"))
  assert config.peft.method == "none" and config.peft.frozen_dtype == ""
  assert _rel_err(model.apply({"params": params}, x)[0], want) < F32_TOL
  export_lib.export_workdir(workdir, str(tmp_path / "adapter"), adapter_only=True)
  model, params, _ = checkpoint.load_pretrained(base[1], adapter_dir=str(tmp_path / "adapter"))
  np.testing.assert_array_equal(np.asarray(model.apply({"params": params}, x)[0]),
                                np.asarray(want))

"""Bad input, table-driven, through the whole entry point: each row is one kind of mistake, and
`train.train_and_evaluate` must refuse it with a one-line ConfigError naming the key, file or
value — before XLA compiles anything and without changing a byte of what the workdir already
holds. (tests/test_config.py covers more config-only rows; README "Troubleshooting" lists them.)
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile

import jax
import ml_collections
import pytest
from jax._src import dispatch, monitoring

from conftest import tiny_vit_config
from jax_transfer import checkpoint, config as config_lib, export as export_lib, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
  """A finished 2-step nano run (workdir with checkpoints) and its export."""
  workdir = str(tmp_path_factory.mktemp("trained"))
  c = tiny_vit_config(data_dir)
  c.total_steps, c.checkpoint_every_steps, c.eval_every_steps = 2, 2, 2
  train.train_and_evaluate(c, workdir, devices=jax.devices())
  export = str(tmp_path_factory.mktemp("export"))
  export_lib.export_workdir(workdir, export)
  return workdir, export


def _set(**overrides):
  """The tiny config with dotted keys set, rebuilt from a plain dict: what a config file that
  misspells a key or gives a wrong type produces (ConfigDict itself would refuse both)."""
  def make(data_dir, tmp, trained):
    d = tiny_vit_config(data_dir).to_dict()
    for key, value in overrides.items():
      *parents, last = key.split(".")
      node = d
      for p in parents:
        node = node[p]
      node[last] = value
    return ml_collections.ConfigDict(d), str(tmp / "w")
  return make


def _other_architecture_workdir(data_dir, tmp, trained):
  workdir = str(tmp / "w")
  shutil.copytree(trained[0], workdir)
  return config_lib.with_overrides(tiny_vit_config(data_dir), **{"model.variant": "mu/2"}), \
      workdir


def _export_dir(make_dir):
  def make(data_dir, tmp, trained):
    path = make_dir(tmp, trained[1])
    return config_lib.with_overrides(tiny_vit_config(data_dir),
                                     **{"init.export_dir": path}), str(tmp / "w")
  return make


def _export_missing_file(tmp, export):
  path = str(tmp / "export")
  shutil.copytree(export, path)
  os.remove(os.path.join(path, "params.safetensors"))
  return path


def _workdir(path_of):
  def make(data_dir, tmp, trained):
    return tiny_vit_config(data_dir), path_of(tmp)
  return make


def _file_as_workdir(tmp):
  path = tmp / "w"
  path.write_text("not a directory")
  return str(path)


_ADAPTERS = {}


def _adapter_for_another_base(data_dir, tmp, trained):
  """A LoRA run's adapter export (trained on the `trained` export, built once) applied onto
  another export of the same architecture: one parameter differs."""
  if trained[1] not in _ADAPTERS:
    run, out = tempfile.mkdtemp(prefix="lora_run"), tempfile.mkdtemp(prefix="adapter")
    c = config_lib.with_overrides(tiny_vit_config(data_dir), **{
        "total_steps": 1, "peft.method": "lora", "init.export_dir": trained[1]})
    train.train_and_evaluate(c, run, devices=jax.devices()[:1])
    export_lib.export_workdir(run, out, adapter_only=True)
    _ADAPTERS[trained[1]] = out
  flat = checkpoint.flatten(checkpoint.load_export_params(trained[1]))
  flat["cls"] = flat["cls"] + 1.0
  other = str(tmp / "other_base")
  checkpoint.export(checkpoint.unflatten(flat), checkpoint.load_export_config(trained[1]), other)
  return config_lib.with_overrides(tiny_vit_config(data_dir), **{
      "peft.method": "lora", "init.export_dir": other,
      "init.adapter_dir": _ADAPTERS[trained[1]]}), str(tmp / "w")


def _unprepared(data_dir, tmp, trained):
  c = tiny_vit_config(data_dir)
  c.input.dataset, c.input.data_dir = "cifar10", str(tmp / "empty")
  return c, str(tmp / "w")


CASES = [
    ("unknown key", _set(optimzer=1), r"unknown config key 'optimzer'.*did you mean"),
    ("wrong type", _set(total_steps="ten"), r"'total_steps' must be int, got str"),
    ("impossible mesh", _set(**{"mesh.data": 3}), r"mesh: .* needs 3 devices, but 8 exist"),
    ("two -1 mesh axes", _set(**{"mesh.fsdp": -1}), r"at most one axis may be -1"),
    ("non-divisible batch", _set(**{"input.global_batch_size": 12}),
     r"global_batch_size=12 must be divisible by the data-parallel size"),
    ("non-divisible accumulation", _set(grad_accum_steps=3), r"grad_accum_steps=3"),
    ("unknown dataset", _set(**{"input.dataset": "nosuch"}),
     r"input.dataset: Dataset 'nosuch' is neither embedded"),
    ("unknown eval dataset", _set(**{"eval.datasets": ("digits", "nosuch")}),
     r"eval.datasets: 'nosuch': Dataset 'nosuch' is neither embedded"),
    ("eval dataset without the label", _set(**{"eval.datasets": ("shapes_captions",)}),
     r"eval.datasets: 'shapes_captions': 'shapes_captions' has no ClassLabel feature 'label'"),
    ("eval dataset of other images", _set(**{"eval.datasets": ("shapes_jpeg",)}),
     r"eval.datasets: 'shapes_jpeg' has image_shape \(None, None, 3\) but input.dataset "
     r"'digits' has \(8, 8, 1\)"),
    ("eval datasets as one string", _set(**{"eval.datasets": "digits_noisy"}),
     r"eval.datasets='digits_noisy' must be a tuple of dataset names"),
    ("unprepared dataset", _unprepared, r"'cifar10' is not prepared .*tfds build cifar10"),
    ("images of the wrong shape", _set(**{"input.image_size": 9}),
     r"images are 9x9 \(input.image_size\) but the model's patch size 2 does not divide"),
    ("negative learning rate", _set(**{"optimizer.lr": -1e-3}), r"optimizer.lr=-0.001 must be > 0"),
    ("negative weight decay", _set(**{"optimizer.weight_decay": -1.0}), r"must be >= 0"),
    ("negative warmup", _set(**{"schedule.warmup_steps": -5}),
     r"schedule.warmup_steps=-5 must be >= 0"),
    ("unknown optimiser", _set(**{"optimizer.name": "adagrad"}), r"optimizer.name='adagrad'"),
    ("unknown model", _set(model_name="densenet"), r"model_name='densenet' is unknown"),
    ("unknown variant", _set(**{"model.variant": "huge/2"}), r"Unknown ViT variant 'huge/2'"),
    ("unknown model field", _set(**{"model.widht": 3}), r"model: .*widht"),
    ("classes vs head", _set(**{"model.num_classes": 10}), r"model.num_classes=10 but the data"),
    ("class out of range", _set(**{"input.classes": (3, 12)}), r"input.classes has \[12\]"),
    ("unknown mesh axis in rules", _set(sharding_rules=[("embed", "model")]),
     r"maps to unknown mesh axis 'model'"),
    ("cuDNN attention off GPU", _set(**{"model.attention_impl": "cudnn"}),
     r"model.attention_impl='cudnn' needs a GPU"),
    ("unknown attention", _set(**{"model.attention_impl": "flash"}),
     r"model.attention_impl='flash' is unknown"),
    ("negative prefetch", _set(**{"input.device_prefetch": -1}), r"device_prefetch=-1"),
    ("checkpoint of another architecture", _other_architecture_workdir,
     r"checkpoint step 2 in .* has parameter '.*' of shape .*another architecture"),
    ("export dir missing files", _export_dir(_export_missing_file),
     r"init.export_dir: export dir .* lacks \['params.safetensors'\]"),
    ("export dir does not exist", _export_dir(lambda tmp, e: str(tmp / "nope")),
     r"init.export_dir: export dir .*nope' lacks"),
    ("export of another architecture", lambda d, t, tr: (config_lib.with_overrides(
        tiny_vit_config(d), **{"init.export_dir": tr[1], "model.variant": "mu/2"}),
        str(t / "w")), r"init.export_dir: export .* has shape .* the model needs"),
    ("load regex selecting nothing", lambda d, t, tr: (config_lib.with_overrides(
        tiny_vit_config(d), **{"init.export_dir": tr[1], "init.load_regex": "^nosuch/"}),
        str(t / "w")), r"init.load_regex='\^nosuch/' .* selects no parameter"),
    ("PEFT target matching no module", _set(**{"peft.method": "lora",
                                                "peft.target_regex": "nosuch"}),
     r"peft.target_regex='nosuch' matches no module that peft.method='lora' adds parameters "
     r"to .*module paths here: \['embedding', 'encoder_norm', 'encoderblock_0/attn/out', "),
    ("adapter without its base", _set(**{"init.adapter_dir": "/tmp/adapter"}),
     r"init.adapter_dir='/tmp/adapter' needs init.export_dir: the base export"),
    ("adapter export for another base", _adapter_for_another_base,
     r"init.adapter_dir: adapter export '.*adapter.*' was trained on the base export '.*', not "
     r"on '.*other_base': the same parameter names and shapes but other values"),
    ("trainable regex splitting scanned blocks", _set(**{
        "model.scan_layers": True, "optimizer.trainable_regex": "encoderblock_1/|^head/"}),
     r"optimizer.trainable_regex='encoderblock_1/\|\^head/' matches blocks \[1\] of the 2 "
     r"stacked in 'encoderblocks/.*cannot be frozen separately: set model.scan_layers=False"),
    ("workdir is a file", _workdir(_file_as_workdir), r"exists and is not a directory"),
    ("unwritable workdir", _workdir(lambda tmp: "/proc/jax_transfer_workdir"),
     r"--workdir='/proc/jax_transfer_workdir' cannot be created"),
    ("bucket URL as workdir", _workdir(lambda tmp: "gs://bucket/run"),
     r"only local paths are supported; mount the bucket with gcsfuse"),
]


def _snapshot(path):
  if not os.path.isdir(path):
    return os.path.exists(path) and open(path, "rb").read()
  out = {}
  for root, _, files in os.walk(path):
    for f in files:
      p = os.path.join(root, f)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, path)] = fh.read()
  return out


class _Compiles:
  """Records XLA compilations (and compilations served by the persistent cache) in a block."""

  def __enter__(self):
    self.events = []
    monitoring.register_event_duration_secs_listener(self._duration)
    monitoring.register_event_listener(self._event)
    return self

  def _duration(self, event, duration, **kwargs):
    if event == dispatch.BACKEND_COMPILE_EVENT:
      self.events.append(event)

  def _event(self, event, **kwargs):
    if event == "/jax/compilation_cache/compile_requests_use_cache":
      self.events.append(event)

  def __exit__(self, *exc):
    monitoring.unregister_event_duration_listener(self._duration)
    monitoring.unregister_event_listener(self._event)


def test_the_compile_detector_sees_a_good_run_compile(data_dir, tmp_path):
  c = tiny_vit_config(data_dir)
  c.total_steps = 1
  with _Compiles() as compiles:
    train.train_and_evaluate(c, str(tmp_path / "w"), devices=jax.devices())
  assert compiles.events


@pytest.mark.parametrize("name,make,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_before_compiling_and_writes_nothing(data_dir, tmp_path, trained,
                                                                     name, make, message):
  config, workdir = make(data_dir, tmp_path, trained)
  before = _snapshot(workdir)
  with _Compiles() as compiles:
    with pytest.raises(config_lib.ConfigError, match=message) as err:
      train.train_and_evaluate(config, workdir, devices=jax.devices())
  compiles = compiles.events
  assert "\n" not in str(err.value)
  assert not compiles, f"{name}: compiled before refusing"
  assert _snapshot(workdir) == before, f"{name}: changed the workdir"


def test_at_least_twenty_kinds():
  assert len(CASES) >= 20


def test_cli_turns_them_into_one_line_and_exit_2(data_dir, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_TRANSFER_DATA_DIR=data_dir)
  out = subprocess.run(
      [sys.executable, "-m", "jax_transfer.main",
       "--config=ml_collections_configs/supervised/digits_vit.py:runlocal",
       f"--workdir={tmp_path}/w", "--config.input.image_size=9"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 2
  assert out.stderr.startswith("error: images are 9x9") and out.stderr.count("\n") == 1


def test_torch_checkpoint_with_missing_keys(tmp_path, capsys):
  """The checkpoint importer (tools/import_checkpoint.py) names the missing keys, exit 2, no
  output."""
  import numpy as np
  from safetensors.numpy import save_file
  from jax_transfer.tools import import_checkpoint
  path = str(tmp_path / "clip.safetensors")
  save_file({"visual.conv1.weight": np.zeros((32, 3, 8, 8), np.float32),
             "token_embedding.weight": np.zeros((40, 32), np.float32)}, path)
  assert import_checkpoint.main(["--checkpoint", path, "--out", str(tmp_path / "x"),
                                 "--activation", "gelu"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("import_checkpoint: ") and err.count("\n") == 1, err
  assert "missing keys" in err and "visual.positional_embedding" in err, err
  assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("override,pattern", [
    ("--config.input.batchsize=3",
     r"unknown config key 'input.batchsize' .*config.input has \[.*\] \(did you mean "
     r"'global_batch_size'\?\)"),
    ("--config.model.widht=3", r"unknown config key 'model.widht' .*did you mean 'width'\?"),
    ("--config.eval.foo=1", r"unknown config key 'eval.foo' .*config.eval has \['batch_size', "
                            r"'datasets', 'split', 'transfer_score'\]"),
    ("--config.model.depth=2", r"'depth' is a field of the 'vit' model that this config does "
                               r"not list"),
    ("--config.optimzer.lr=1", r"unknown config key 'optimzer' .*did you mean 'optimizer'"),
    ("--config.total_steps.x=1", r"'total_steps' is a value \(20\), not a section"),
])
def test_override_typos_at_any_depth_name_key_place_and_closest(override, pattern):
  """A mistyped --config.* key at any depth names the full key, where it is, what is allowed
  there and the closest match (ml_collections' own message is a bare "'key'")."""
  from jax_transfer import main
  argv = ["main", "--config=ml_collections_configs/supervised/digits_vit.py:runlocal",
          "--workdir=/tmp/x", override]
  old = os.getcwd()
  os.chdir(ROOT)
  try:
    msg = main._explain_override(argv)
  finally:
    os.chdir(old)
  assert msg and re.search(pattern, msg), msg
  assert main._explain_override(argv[:3] + ["--config.input.global_batch_size=8"]) is None

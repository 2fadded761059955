"""Bad configs are rejected before anything compiles, with one line naming the key."""
import os
import subprocess
import sys

import ml_collections
import pytest

from conftest import tiny_vit_config
from jax_transfer import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "ml_collections_configs/supervised/digits_vit.py"


def _set(c, key, value):
  """The config with `key` set to `value`, rebuilt from a plain dict: what a config file that
  does not start from base_config() (or misspells a key) produces."""
  d = c.to_dict()
  *parents, last = key.split(".")
  node = d
  for p in parents:
    node = node[p]
  node[last] = value
  return ml_collections.ConfigDict(d)


BAD = [
    ("method", "nosuch", r"method='nosuch' is unknown; allowed: \[.*'supervised'"),
    ("optimzer", 1, r"unknown config key 'optimzer'.*did you mean 'optimizer'"),
    ("input.batch", 1, r"unknown config key 'input.batch'"),
    ("total_steps", "ten", r"'total_steps' must be int, got str"),
    ("input.global_batch_size", "64", r"'input.global_batch_size' must be int, got str"),
    ("optimizer.grad_clip_norm", True, r"'optimizer.grad_clip_norm' must be float, got bool"),
    ("total_steps", 0, r"total_steps=0 must be > 0"),
    ("optimizer.lr", -0.1, r"optimizer.lr=-0.1 must be > 0"),
    ("optimizer.weight_decay", -1.0, r"weight_decay=-1.0 must be >= 0"),
    ("optimizer.name", "adagrad", r"optimizer.name='adagrad' is unknown; allowed"),
    ("schedule.name", "step", r"schedule.name='step' is unknown; allowed"),
    ("model_name", "densenet", r"model_name='densenet' is unknown; allowed: \[.*'vit'"),
    ("model.variant", "huge/2", r"model: Unknown ViT variant 'huge/2'; allowed"),
    ("model.dtype", "float16", r"model.dtype='float16' is unknown; allowed"),
    ("model.num_classes", 10, r"model.num_classes=10 but the data has 5 classes"),
    ("input.classes", [3, 12], r"input.classes has \[12\], outside 0..9"),
    ("input.dataset", "nosuch_ds", r"input.dataset: Dataset 'nosuch_ds' is neither embedded"),
    ("input.dataset", "shapes_jpeg", r"shapes_jpeg's images vary in size and nothing resizes "
                                     r"them; set input.image_size"),
    ("input.global_batch_size", 12, r"global_batch_size=12 must be divisible by the "
                                    r"data-parallel size \(mesh.data\*mesh.fsdp=8\)"),
    ("grad_accum_steps", 3, r"divisible by .* times grad_accum_steps=3"),
    ("mesh.data", 3, r"mesh: .* needs 3 devices, but 8 exist"),
    ("mesh.tensor", 0, r"mesh.tensor: size must be a positive int or -1"),
    ("sharding_rules", [("embed", "model")], r"maps to unknown mesh axis 'model'"),
]


@pytest.mark.parametrize("key,value,message", BAD, ids=[b[0] for b in BAD])
def test_bad_config_is_one_clear_line(data_dir, key, value, message):
  c = _set(tiny_vit_config(data_dir), key, value)
  with pytest.raises(config_lib.ConfigError, match=message) as err:
    config_lib.validate(c, num_devices=8)
  assert "\n" not in str(err.value)


def test_default_config_is_valid(data_dir):
  config_lib.validate(tiny_vit_config(data_dir), num_devices=8)


@pytest.mark.parametrize("backend,error", [("gpu", r"'splash' is a TPU .* on GPU use 'auto'"),
                                           ("cpu", None), ("tpu", None)])
def test_splash_attention_is_refused_on_gpu_only(data_dir, monkeypatch, caplog, backend, error):
  """TPU: the kernel; CPU: Pallas interpret mode, with a warning; GPU: a clear error."""
  import jax
  c = _set(tiny_vit_config(data_dir), "model.attention_impl", "splash")
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  if error:
    with pytest.raises(config_lib.ConfigError, match=error):
      config_lib.validate(c, num_devices=8)
    return
  config_lib.validate(c, num_devices=8)
  assert ("interpret mode" in caplog.text) == (backend == "cpu")


def _cli(*args, env_extra=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu", **(env_extra or {}))
  return subprocess.run([sys.executable, "-m", "jax_transfer.main", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("override,message", [
    ("--config.optimzer.lr=1", "error: unknown config key 'optimzer' in "
                              "'--config.optimzer.lr': config has ["),
    ("--config.input.batchsize=3", "(did you mean 'global_batch_size'?)"),
    ("--config.optimizer.lr=abc", "could not convert string to float: 'abc'"),
    ("--config.model.variant=zz/2", "error: model: Unknown ViT variant 'zz/2'"),
])
def test_cli_rejects_bad_override_before_compiling(data_dir, tmp_path, override, message):
  out = _cli(f"--config={CONFIG}:runlocal", f"--workdir={tmp_path}/w", override,
             env_extra={"JAX_TRANSFER_DATA_DIR": data_dir})
  assert out.returncode != 0
  assert message in out.stderr
  assert "Traceback" not in out.stderr
  assert not os.path.exists(f"{tmp_path}/w/checkpoints")  # Nothing was trained or written.


def test_cli_config_arg_and_override_reach_the_run(data_dir, tmp_path):
  """`file.py:arg` selects the variant and --config.a.b overrides a field."""
  workdir = tmp_path / "w"
  out = _cli(f"--config={CONFIG}:probe,runlocal", f"--workdir={workdir}",
             "--config.total_steps=2", "--config.model.variant=nano/2",
             env_extra={"JAX_TRANSFER_DATA_DIR": data_dir})
  assert out.returncode == 0, out.stderr[-2000:]
  import json
  cfg = json.loads((workdir / "config.json").read_text())
  assert cfg["total_steps"] == 2 and cfg["optimizer"]["trainable_regex"] == "^head/"
  assert cfg["input"]["classes"] == [5, 6, 7, 8, 9]

"""Every config under ml_collections_configs/ validates for the hardware its docstring names,
and its `runlocal` variant is small enough for this CPU. Fast: no training, no compilation.

config.validate reads dataset metadata (class count, image shape). The catalogue datasets the
pod configs name cannot be prepared here, so their TFDS metadata is stubbed below; the
embedded ones are read for real."""
import importlib.util
import pathlib

import pytest

from jax_transfer import config as config_lib, data
from jax_transfer.data import builders
from jax_transfer.models import vit

CONFIG_ROOT = pathlib.Path(__file__).resolve().parents[1] / "ml_collections_configs"

# file -> [(documented args, device count the docstring targets)].
TARGETS = {
    "supervised/digits_vit.py": [("", 1), ("transfer", 1), ("probe", 1)],
    "supervised/imagenet_vit_b16.py": [  # TPU v4-32 = 16 devices; one 8-GPU host.
        ("", 16), ("ep90", 16), ("fsdp", 16), ("fsdp,ep90", 16),
        ("gpu8", 8), ("gpu8,ep90", 8), ("gpu8,fsdp", 8), ("lora", 16), ("gpu8,lora,ep90", 8)],
    "supervised/cifar10_vit_b16.py": [("", 8), ("", 16)],
    "shift/cifar10c_dann.py": [("", 16), ("", 8)],  # TPU v4-32; one 8-GPU host.
    "contrastive/coco_clip_b16.py": [  # TPU v4-64 = 32 devices; one 8x H100 host.
        ("", 32), ("siglip", 32), ("gpu8", 8), ("siglip,gpu8", 8), ("lora", 32),
        ("gpu8,lora", 8)],
}
# Configs built from exports given as arguments (base=DIR,...): validated on real tiny exports
# by their own tests (tests/test_atlas.py) and by tests/test_docs.py's documented commands.
FROM_EXPORTS = ("merging/atlas.py",)
# Device counts a config without an entry above may target (CPU, one host, pod slices).
ANY_TARGET = (1, 8, 16, 32, 64, 128, 256)
EMBEDDED = tuple(builders.EMBEDDED)  # digits, shapes_captions, shapes_jpeg
# TFDS catalogue metadata (tensorflow_datasets docs) of datasets the pod configs use:
# name -> (classes of 'label', image shape; None = varies per image).
CATALOGUE = {"imagenet2012": (1000, (None, None, 3)), "cifar10": (10, (32, 32, 3)),
             "mnist": (10, (28, 28, 1)), "fashion_mnist": (10, (28, 28, 1)),
             "cifar100": (100, (32, 32, 3)),
             "cifar10_corrupted/gaussian_noise_5": (10, (32, 32, 3)),
             "coco_captions": (None, (None, None, 3))}  # Image-text: no class label.
# Their splits where a config checks one (eval.datasets, dann.target_split).
SPLITS = {"cifar10": {"train": 50_000, "test": 10_000},
          "cifar10_corrupted/gaussian_noise_5": {"test": 10_000}}


@pytest.fixture(autouse=True)
def catalogue_metadata(monkeypatch, data_dir):
  """data.dataset_info for CATALOGUE datasets without preparing them; real otherwise."""
  real = data.dataset_info

  def dataset_info(name, data_dir=None, label_key=None):
    if name not in CATALOGUE:
      return real(name, data_dir, label_key)
    n, shape = CATALOGUE[name]
    names = [str(i) for i in range(n)] if n else None
    return {"num_classes": n, "class_names": names, "image_shape": shape,
            "num_examples": SPLITS.get(name, {}), "label_key": label_key or "label",
            "attributes": {"label": names} if n else {}}
  monkeypatch.setattr(data, "dataset_info", dataset_info)
  monkeypatch.setattr(data.pipeline, "dataset_info", dataset_info)  # data.image_shape's.


def _config_files():
  return sorted(str(p.relative_to(CONFIG_ROOT)) for p in CONFIG_ROOT.rglob("*.py")
                if p.name != "__init__.py")


def _get_config(rel, arg):
  spec = importlib.util.spec_from_file_location(
      "cfg_" + rel.replace("/", "_")[:-3], CONFIG_ROOT / rel)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_targets_name_existing_files():
  assert set(TARGETS) <= set(_config_files())


@pytest.mark.parametrize("rel", [f for f in _config_files() if f not in FROM_EXPORTS])
def test_config_validates_for_its_hardware(rel):
  for arg, devices in TARGETS.get(rel, []):
    config_lib.validate(_get_config(rel, arg), devices)
  if rel not in TARGETS:  # Unlisted config: its default must fit *some* plausible machine.
    validate_for_some(_get_config(rel, ""), ANY_TARGET, rel)


def validate_for_some(config, device_counts, what):
  """Passes when `config` validates for one of `device_counts`; fails naming every error."""
  errors = []
  for devices in device_counts:
    try:
      config_lib.validate(config, devices)
      return
    except config_lib.ConfigError as e:
      errors.append(f"{devices}: {e}")
  pytest.fail(f"{what} validates for none of {tuple(device_counts)} devices: {errors}")


@pytest.mark.parametrize("rel", [f for f in _config_files() if f not in FROM_EXPORTS])
def test_runlocal_is_small_and_runs_here(rel):
  base_args = sorted({a for a, _ in TARGETS.get(rel, [("", 1)])})
  for arg in base_args:
    c = _get_config(rel, ",".join(a for a in (arg, "runlocal") if a))
    for devices in (1, 8):  # This CPU, and the tests' 8 simulated devices.
      config_lib.validate(c, devices)
    assert c.total_steps <= 50, (rel, arg, c.total_steps)
    assert c.input.global_batch_size <= 64, (rel, arg)
    assert c.input.dataset in EMBEDDED, (rel, arg, c.input.dataset)  # No download needed.
    assert not c.input.image_size or c.input.image_size <= 64, (rel, arg)
    assert c.model.get("dtype", "float32") == "float32", (rel, arg)  # CPUs emulate bf16.
    if c.model_name == "vit":
      family = c.model.variant.split("/")[0]
      assert family in ("nano", "mu", "ti"), (rel, arg, c.model.variant)
    assert all(int(c.mesh[a]) in (-1, 1) for a in ("data", "fsdp", "tensor")), (rel, arg)


def test_imagenet_recipe():
  """The numbers the docstring promises: 300 / 90 epochs of ImageNet at batch 4096, 256
  images per v4 chip, bf16 + remat, and a mesh that refuses the wrong slice."""
  rel = "supervised/imagenet_vit_b16.py"
  for arg, epochs in (("", 300), ("ep90", 90)):
    c = _get_config(rel, arg)
    assert c.total_steps * c.input.global_batch_size / 1_281_167 == pytest.approx(epochs,
                                                                                  abs=0.01)
  c = _get_config(rel, "")
  assert (c.model.variant, c.input.image_size) == ("b/16", 224)
  assert (c.model.dtype, c.model.remat) == ("bfloat16", True)
  assert (c.optimizer.lr, c.optimizer.weight_decay, c.optimizer.grad_clip_norm,
          c.schedule.warmup_steps) == (1e-3, 0.1, 1.0, 10_000)
  # big_vision vit_i1k medium2: inception crop + flip + RandAugment(2, 15), mixup 0.5.
  assert c.input.pp.startswith("decode_jpeg_and_inception_crop(224)|flip_lr|randaug(2, 15)")
  assert c.input.pp_eval.startswith("decode|resize_small(256)|central_crop(224)")
  assert c.mixup.mixup_alpha == 0.5
  assert c.input.global_batch_size // (c.mesh.data * c.mesh.fsdp) == 256
  with pytest.raises(config_lib.ConfigError, match="mesh"):
    config_lib.validate(c, 8)  # A v4-32 config on an 8-device host must not run silently.
  with pytest.raises(config_lib.ConfigError, match="mesh"):
    config_lib.validate(_get_config(rel, "gpu8"), 16)


@pytest.mark.parametrize("arg", ["", "runlocal"])
def test_cifar10_transfer_matches_its_upstream(arg):
  """cifar10_vit_b16 loads everything but the head from an imagenet_vit_b16 export, so the
  two must build the same trunk: variant, pool and token count (image size / patch)."""
  down = _get_config("supervised/cifar10_vit_b16.py", arg)
  up = _get_config("supervised/imagenet_vit_b16.py", arg)
  assert (down.model.variant, down.model.pool) == (up.model.variant, up.model.pool)
  assert down.input.image_size == up.input.image_size
  if not arg:  # Channels: the runlocal pair reads the same dataset; ImageNet/CIFAR are RGB.
    assert (down.input.dataset, up.input.dataset) == ("cifar10", "imagenet2012")
  else:
    assert down.input.dataset == up.input.dataset
  assert down.init.skip_regex == "^head/"
  patch = vit.decode_variant(down.model.variant)["patch_size"]
  if down.input.image_size:
    assert down.input.image_size % patch == 0
  if not arg:  # big_vision's CIFAR-10 transfer recipe.
    assert (down.optimizer.name, down.optimizer.lr, down.optimizer.momentum,
            down.input.global_batch_size, down.total_steps) == ("sgd", 0.03, 0.9, 512, 10_000)


@pytest.mark.parametrize("rel,trained", [
    ("supervised/imagenet_vit_b16.py", r"^(encoderblock_\d+/attn/(qkv|out)/lora_[ab]|head/.*)$"),
    ("contrastive/coco_clip_b16.py", r"^img/encoderblock_\d+/attn/(qkv|out)/lora_[ab]$")])
def test_lora_arg_trains_what_its_docstring_says(rel, trained):
  """`lora` (also with runlocal): LoRA on the attention projections, and for CLIP on the
  image tower's only; the LoRA factors train (and the ViT's head), nothing else."""
  import re
  import jax
  from jax_transfer import methods, optim, parallel, peft
  import flax
  assert _get_config(rel, "lora").peft.to_dict() == _get_config(rel, "lora,runlocal").peft.to_dict()
  c = _get_config(rel, "lora,runlocal")
  mesh = parallel.make_mesh(c.mesh, jax.devices()[:1])
  method = methods.get_method(c.method)(c, mesh, None)
  params = jax.eval_shape(method.init_params, jax.random.key(0))  # traced only
  paths = flax.traverse_util.flatten_dict(params, sep="/").keys()
  trainable = optim.trainable_paths(params, peft.optimizer_config(c))
  assert trainable == {k for k in paths if re.match(trained, k)} and trainable
  assert any(k.startswith("txt/") for k in paths) == (c.model_name == "two_towers")

"""The platform's config schema and its validation.

`base_config()` lists every key the platform reads, with its default and type. Config files in
ml_collections_configs/ start from it (methods add their own section). `validate` runs before
anything is compiled: every problem is a one-line `ConfigError` naming the key and what is
allowed, which main.py prints and turns into a non-zero exit.
"""
from __future__ import annotations

import logging

import ml_collections

# Keys a method may add beyond the base (their sections are validated by the method).
METHOD_SECTIONS = ("contrastive", "icl", "learngene", "distill", "transfer_eval", "mixup",
                   "atlas", "dann")
# Sections whose keys depend on a choice (config.model: the model named by model_name);
# validate() checks them by building the model, whose constructor rejects unknown fields.
FREE_SECTIONS = ("model",)


class ConfigError(ValueError):
  """A bad config value; the message is one line naming the key."""


# config.peft's keys and defaults (their meaning: jax_transfer/peft.py).
PEFT_DEFAULTS = dict(method="none", target_regex="", rank=8, alpha=16.0, rslora=False,
                     dropout=0.0, init="kaiming", scale=4.0, train_regex=r"^head/",
                     length=0, deep=True,
                     frozen_dtype="")  # frozen params stored as: '' (init's) | 'bfloat16'
FROZEN_DTYPES = ("", "bfloat16")


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.method = "supervised"
  c.seed = 0
  c.total_steps = 1000
  c.log_every_steps = 50
  c.eval_every_steps = 200
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 3
  c.grad_accum_steps = 1

  # Parallelism: mesh axis sizes (-1 = the rest) and logical -> mesh axis rules.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.sharding_rules = [
      ("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"),
      ("heads", "tensor"), ("vocab", "tensor"), ("kv", None), ("length", None),
      ("classes", None), ("layers", None)]

  c.input = ml_collections.ConfigDict(dict(
      dataset="digits", data_dir=ml_collections.config_dict.placeholder(str),
      train_split="train", global_batch_size=64, label_key="label", caption_key="caption",
      classes=ml_collections.config_dict.placeholder(tuple),  # tuple: overridable as --config.input.classes="(5,6)"
      examples_per_class=ml_collections.config_dict.placeholder(int), subset_seed=0,
      image_size=ml_collections.config_dict.placeholder(int), num_workers=0, prefetch=2,
      device_prefetch=1,
      # Preprocessing recipes (jax_transfer/data/pp/, big_vision style pipe strings), for
      # training and for evaluation; "" = decode, resize to image_size, value_range(-1, 1).
      pp="", pp_eval="",
      # Web-scale image-text training data instead of `dataset`'s train split: webdataset /
      # img2dataset tars, 'DIR/{00000..00099}.tar', several sources joined by '::' (weighted
      # by shard_weights); num_samples: the epoch length in samples (jax_transfer/data/shards.py).
      shards="", shard_weights=ml_collections.config_dict.placeholder(tuple),
      num_samples=ml_collections.config_dict.placeholder(int), shuffle_buffer=1000,
      num_threads=8))
  # eval.datasets: more datasets of the same images and labels (e.g. the shifted domains
  # digits_rotated, ...) read at eval.split beside input.dataset, each an evaluator of its
  # own name (eval_<dataset>/...): train on the source, evaluate on the targets, one config.
  # eval.transfer_score: also score each of them WITHOUT its labels (Transfer Score,
  # evaluators/transfer_score.py: transfer_<dataset>/transfer_score, hopkins, ...), the
  # label-free model-selection signal beside the labelled accuracy it should track.
  c.eval = ml_collections.ConfigDict(dict(split="test", batch_size=256,
                                          datasets=ml_collections.config_dict.placeholder(tuple),
                                          transfer_score=False))

  c.model_name = "vit"
  # The model's constructor fields. Levers: dtype (compute; params stay f32), remat (+ optional
  # remat_policy), scan_layers (nn.scan over blocks; exports stay per-block), all per model.
  c.model = ml_collections.ConfigDict(dict(
      variant="mu/2", num_classes=10, pool="cls", dropout=0.0, dtype="float32",
      remat=False, scan_layers=False, attention_impl="auto"))

  c.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-3, weight_decay=1e-4, b1=0.9, b2=0.999, momentum=0.9,
      grad_clip_norm=1.0, wd_exclude_regex=r"(bias|scale|pos_embedding|cls)$",
      trainable_regex=".*"))
  c.schedule = ml_collections.ConfigDict(dict(name="cosine", warmup_steps=50,
                                              end_lr_ratio=0.0))

  # jax.profiler trace of steps start_step .. start_step+num_steps-1 into workdir/tensorboard
  # (TensorBoard's profile tab); start_step=0: off.
  c.profile = ml_collections.ConfigDict(dict(start_step=0, num_steps=3))

  # Initialise from an exported checkpoint (transfer): regex-selected subtrees.
  # Parameter-efficient transfer (jax_transfer/peft.py): 'none' | 'lora' | 'adapter' |
  # 'parallel_adapter' | 'bitfit', on any model, e.g. --config.peft.method=lora.
  c.peft = ml_collections.ConfigDict(dict(PEFT_DEFAULTS))
  # init.adapter_dir: an adapter export (`python -m jax_transfer.export --adapter_only`) applied
  # onto init.export_dir, which must be the base it was trained on (checked: base.json).
  c.init = ml_collections.ConfigDict(dict(
      export_dir=ml_collections.config_dict.placeholder(str),
      adapter_dir=ml_collections.config_dict.placeholder(str), load_regex=".*",
      skip_regex="^head/"))
  return c


DTYPES = ("float32", "bfloat16")


def with_overrides(config, **overrides):
  """Sets dotted keys, as --config.a.b=v does: with_overrides(c, **{"input.classes": (5,)}).
  Returns the same (mutated) config, for experiment scripts that sweep fields."""
  for key, value in overrides.items():
    node = config
    *parents, last = key.split(".")
    for part in parents:
      node = node[part]
    node[last] = value
  return config


def frozen_dtype(config) -> str:
  """config.peft.frozen_dtype, '' when the config (an older export's) has none."""
  return (config.get("peft") or {}).get("frozen_dtype", "")


def model_kwargs(model_cfg) -> dict:
  """config.model -> keyword arguments of the model constructor (dtype names -> dtypes)."""
  import jax.numpy as jnp
  kwargs = model_cfg.to_dict()
  if "dtype" in kwargs:
    kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
  return kwargs


def _check_keys(config, reference, prefix=""):
  """Every key of `config` must exist in `reference` with a compatible type."""
  for key in config.keys():
    name = f"{prefix}{key}"
    if prefix == "" and key in METHOD_SECTIONS + FREE_SECTIONS:
      continue
    if key not in reference:
      close = [k for k in reference.keys() if k[:3] == key[:3]]
      raise ConfigError(f"unknown config key {name!r}; allowed keys here: "
                        f"{sorted(reference.keys())}" + (f" (did you mean {close[0]!r}?)"
                                                          if close else ""))
    value, ref = config[key], reference[key]
    if isinstance(ref, ml_collections.ConfigDict):
      if not isinstance(value, ml_collections.ConfigDict):
        raise ConfigError(f"config key {name!r} must be a section, got {value!r}")
      _check_keys(value, ref, prefix=name + ".")
    elif ref is not None and value is not None:
      ok = (isinstance(value, type(ref)) or
            (isinstance(ref, float) and isinstance(value, int)) or
            (isinstance(ref, (list, tuple)) and isinstance(value, (list, tuple))))
      if isinstance(ref, bool) != isinstance(value, bool):
        ok = False
      if not ok:
        raise ConfigError(f"config key {name!r} must be {type(ref).__name__}, got "
                          f"{type(value).__name__} {value!r}")


def _positive(config, *keys):
  for key in keys:
    value = config
    for part in key.split("."):
      value = value[part]
    if not value > 0:
      raise ConfigError(f"{key}={value!r} must be > 0")


def _check_patches(config, model) -> None:
  """Images of a shape the model's patches do not tile are a config error, not a reshape
  failure deep inside the first compile."""
  from jax_transfer import data
  patch = getattr(model, "patch_size", None)
  if patch is None and hasattr(model, "image_geometry"):
    patch = model.image_geometry()["patch_size"]
  if not patch:
    return
  try:
    h, w, _ = data.image_shape(config.input)
  except (KeyError, TypeError, ValueError):  # Not an image dataset: nothing to tile.
    return
  if h is None or w is None:
    raise ConfigError(f"{config.input.dataset}'s images vary in size and nothing resizes them; "
                      "set input.image_size, or an input.pp recipe ending at a fixed size")
  if h % patch or w % patch:
    source = "input.image_size" if config.input.get("image_size") else f"{config.input.dataset}"
    raise ConfigError(f"images are {h}x{w} ({source}) but the model's patch size {patch} does "
                      f"not divide them; set input.image_size to a multiple of {patch}")


def _check_input(input_cfg) -> None:
  """Recipes that parse and agree on the image size; shards that exist."""
  from jax_transfer.data import preprocess
  from jax_transfer.data.pp.registry import PPError
  recipes = {}
  for key, train in (("pp", True), ("pp_eval", False)):
    try:
      recipes[key] = preprocess.get_recipe(input_cfg, train)
    except PPError as e:
      raise ConfigError(f"input.{key}: {e}") from None
  sizes = {k: r.out_size for k, r in recipes.items()}
  if sizes["pp"] != sizes["pp_eval"] and None not in sizes.values():
    raise ConfigError(f"input.pp makes {sizes['pp']} images but input.pp_eval makes "
                      f"{sizes['pp_eval']}; the model takes one size")
  channels = {k: r.out_channels for k, r in recipes.items()}
  if channels["pp"] != channels["pp_eval"]:
    pp, pp_eval = (channels[k] or "the dataset's" for k in ("pp", "pp_eval"))
    raise ConfigError(f"input.pp makes {pp} channels but input.pp_eval {pp_eval} (to_rgb in "
                      "one only); the model takes one channel count")
  for key, recipe in recipes.items():
    size = input_cfg.get("image_size")
    if size and recipe.out_size is not None and recipe.out_size != (size, size):
      raise ConfigError(f"input.image_size={size} but input.{key} makes {recipe.out_size} "
                        "images; unset image_size or make them agree")
  for key in ("num_workers", "num_threads", "shuffle_buffer"):
    if input_cfg.get(key, 0) < 0:
      raise ConfigError(f"input.{key}={input_cfg[key]} must be >= 0")
  if input_cfg.get("shards"):
    from jax_transfer.data import shards
    if recipes["pp"].out_size is None:
      raise ConfigError("input.shards needs input.pp ending at a fixed size (e.g. "
                        "'decode_jpeg_and_inception_crop(224)|flip_lr|value_range(-1, 1)'): "
                        "web images vary in size")
    if input_cfg.get("num_samples") is not None and input_cfg.num_samples <= 0:
      raise ConfigError(f"input.num_samples={input_cfg.num_samples} must be > 0")
    try:
      shards.check_shards(input_cfg.shards, input_cfg.get("shard_weights"))
    except ValueError as e:
      raise ConfigError(f"input.shards: {e}") from None


def validate(config, num_devices: int) -> None:
  """Checks shared by every method. Raises ConfigError (one line) on the first problem."""
  from jax_transfer import methods, models, optim, parallel  # Avoid import cycles.
  if config.get("method") not in methods.METHODS:
    raise ConfigError(f"method={config.get('method')!r} is unknown; allowed: "
                      f"{sorted(methods.METHODS)}")
  _check_keys(config, base_config())
  from jax_transfer import peft  # pylint: disable=g-import-not-at-top
  try:
    peft.optimizer_config(config)  # validates config.peft as well
  except ValueError as e:
    raise ConfigError(f"peft: {e}") from None
  if frozen_dtype(config) not in FROZEN_DTYPES:
    raise ConfigError(f"peft.frozen_dtype={frozen_dtype(config)!r} is unknown; allowed: "
                      f"{FROZEN_DTYPES}")
  if frozen_dtype(config) and peft.optimizer_config(config).trainable_regex in ("", ".*"):
    raise ConfigError(f"peft.frozen_dtype={frozen_dtype(config)!r} but nothing is frozen: set "
                      "peft.method or optimizer.trainable_regex")
  init = config.get("init") or {}
  if init.get("adapter_dir") and not init.get("export_dir"):
    raise ConfigError(f"init.adapter_dir={init.adapter_dir!r} needs init.export_dir: the base "
                      f"export the adapter was trained on")
  if config.model_name not in models.MODELS:
    raise ConfigError(f"model_name={config.model_name!r} is unknown; allowed: "
                      f"{sorted(models.MODELS)}")
  _positive(config, "total_steps", "log_every_steps", "eval_every_steps",
            "checkpoint_every_steps", "keep_checkpoints", "grad_accum_steps",
            "input.global_batch_size", "eval.batch_size", "optimizer.lr", "profile.num_steps")
  for key in ("input.device_prefetch", "profile.start_step", "schedule.warmup_steps"):
    section, name = key.split(".")
    if config[section][name] < 0:
      raise ConfigError(f"{key}={config[section][name]} must be >= 0")
  if config.optimizer.weight_decay < 0:
    raise ConfigError(f"optimizer.weight_decay={config.optimizer.weight_decay} must be >= 0")
  if config.optimizer.name not in optim.OPTIMIZERS:
    raise ConfigError(f"optimizer.name={config.optimizer.name!r} is unknown; allowed: "
                      f"{optim.OPTIMIZERS}")
  if config.schedule.name not in optim.SCHEDULES:
    raise ConfigError(f"schedule.name={config.schedule.name!r} is unknown; allowed: "
                      f"{optim.SCHEDULES}")
  if config.model.get("dtype", "float32") not in DTYPES:
    raise ConfigError(f"model.dtype={config.model.dtype!r} is unknown; allowed: {DTYPES}")
  try:
    shape = parallel.resolve_mesh_shape(config.mesh, num_devices)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  dp = shape[0] * shape[1]
  gbs, accum = config.input.global_batch_size, config.grad_accum_steps
  if gbs % (dp * accum):
    raise ConfigError(
        f"input.global_batch_size={gbs} must be divisible by the data-parallel size "
        f"(mesh.data*mesh.fsdp={dp}) times grad_accum_steps={accum}")
  if config.eval.batch_size % dp:
    raise ConfigError(f"eval.batch_size={config.eval.batch_size} must be divisible by the "
                      f"data-parallel size (mesh.data*mesh.fsdp={dp})")
  from jax_transfer import data
  try:
    data.dataset_info(config.input.dataset, config.input.data_dir)
  except ValueError as e:  # DatasetNotPreparedError included.
    raise ConfigError(f"input.dataset: {e}") from None
  _check_eval_datasets(config)
  _check_input(config.input)
  try:
    model = models.get_model(config.model_name, **model_kwargs(config.model))
  except (ValueError, TypeError) as e:
    raise ConfigError(f"model: {e}") from None
  _check_patches(config, model)
  impl = config.model.get("attention_impl")
  if impl is not None:
    from jax_transfer.models.vit import ATTENTION_IMPLS
    import jax
    if impl not in ATTENTION_IMPLS:
      raise ConfigError(f"model.attention_impl={impl!r} is unknown; allowed: {ATTENTION_IMPLS}")
    if impl == "cudnn" and jax.default_backend() != "gpu":
      raise ConfigError(f"model.attention_impl='cudnn' needs a GPU (backend here: "
                        f"{jax.default_backend()}); use 'auto'")
    if impl == "splash" and jax.default_backend() == "gpu":
      raise ConfigError("model.attention_impl='splash' is a TPU (Pallas Mosaic) kernel; on GPU "
                        "use 'auto' (cuDNN's fused attention)")
    if impl == "splash" and jax.default_backend() != "tpu":
      logging.warning("model.attention_impl='splash' off TPU runs the kernel in Pallas "
                      "interpret mode: correct but slow (meant for tests)")
  methods.get_method(config.method).validate_config(config)
  axes = set(parallel.MESH_AXES)
  for rule in config.sharding_rules:
    mesh_axes = rule[1] if isinstance(rule[1], (list, tuple)) else [rule[1]]
    bad = [a for a in mesh_axes if a is not None and a not in axes]
    if bad:
      raise ConfigError(f"sharding_rules: {rule[0]!r} maps to unknown mesh axis {bad[0]!r};"
                        f" allowed: {sorted(axes)}")


def eval_input(input_cfg: ml_collections.ConfigDict, dataset: str) -> ml_collections.ConfigDict:
  """`input_cfg` reading `dataset` instead of input.dataset (one of eval.datasets): the same
  label key, classes, preprocessing and data_dir."""
  c = input_cfg.copy_and_resolve_references()
  c.dataset = dataset
  return c


def like_input_dataset(input_cfg, name: str, where: str) -> dict:
  """dataset_info of `name` (read with input_cfg's data_dir and label_key) after checking that
  it is prepared (or embedded) and has input.dataset's image shape and class names, so the model
  and its head read it as they read the source; errors start with `where` (the config key)."""
  from jax_transfer import data
  c = input_cfg
  try:
    info = data.dataset_info(name, c.data_dir, label_key=c.label_key)
  except ValueError as e:
    raise ConfigError(f"{where}: {' '.join(str(e).split())}") from None
  source = data.dataset_info(c.dataset, c.data_dir, label_key=c.label_key)
  for key in ("image_shape", "class_names"):
    if info[key] != source[key]:
      raise ConfigError(f"{where} has {key} {info[key]} but input.dataset {c.dataset!r} has "
                        f"{source[key]}")
  return info


def _check_eval_datasets(config) -> None:
  """Each of eval.datasets is prepared (or embedded) and has input.dataset's image shape and
  class names (of input.label_key), so the model and its head read it as they read the source."""
  names = config.eval.get("datasets") or ()
  if isinstance(names, str):
    raise ConfigError(f"eval.datasets={names!r} must be a tuple of dataset names, e.g. "
                      f"--config.eval.datasets=\"('{names}',)\"")
  if not names:
    return
  for name in names:
    info = like_input_dataset(config.input, name, f"eval.datasets: {name!r}")
    if config.eval.split.split("[")[0] not in info["num_examples"]:
      raise ConfigError(f"eval.datasets: {name!r} has no split {config.eval.split!r} "
                        f"(eval.split); it has {sorted(info['num_examples'])}")


def use_export_tokenizer(c: ml_collections.ConfigDict, export_dir: str) -> None:
  """A contrastive config `c` reads the export's tokenizer.json (when it has one) instead of
  training a word tokenizer on the captions again."""
  import os  # pylint: disable=g-import-not-at-top
  tok = os.path.join(export_dir, "tokenizer.json")
  if c.get("contrastive") is not None and os.path.exists(tok):
    c.contrastive.tokenizer_path = tok


def _dataset_channels(input_cfg) -> "int | None":
  """The channels of input_cfg.dataset's images, None when the dataset is not prepared here
  (validate names the dataset then); any other failure propagates."""
  from jax_transfer import data  # pylint: disable=g-import-not-at-top
  try:
    return data.dataset_info(input_cfg.dataset, input_cfg.get("data_dir"))["image_shape"][2]
  except data.DatasetNotPreparedError:
    return None


# Model fields the fine-tune decides, not the export: they change neither the parameters nor
# what the exported function computes at evaluation, only how training treats the model
# (models/resnet.py: frozen_bn keeps BN on the running statistics, bn_momentum is how fast a
# training run moves them). init_from_export keeps the fine-tune config's values when the
# export is a ResNet (the only model with these fields).
FINE_TUNE_MODEL_FIELDS = ("frozen_bn", "bn_momentum")


def init_from_export(c: ml_collections.ConfigDict, export_dir: str, *,
                     keep_head: bool) -> ml_collections.ConfigDict:
  """Fine-tune an export (a run's, or an imported published checkpoint's) with config `c`:
  the model is the export's (its config.json; the fine-tune config's FINE_TUNE_MODEL_FIELDS
  are kept for a ResNet export), every parameter initialises from it
  (init.export_dir; the classifier head too when keep_head, else `^head/` is skipped and
  model.num_classes stays `c`'s), the images are resized to the export's image size and
  normalised as its recipe does, and a contrastive run reuses the export's tokenizer.
  Errors name the directory before anything is built."""
  import os  # pylint: disable=g-import-not-at-top
  from jax_transfer import checkpoint  # pylint: disable=g-import-not-at-top
  from jax_transfer.data import preprocess  # pylint: disable=g-import-not-at-top
  exported = checkpoint.load_export_config(export_dir)  # FileNotFoundError naming the files
  if exported.model_name != c.model_name and c.get("model_name"):
    raise ConfigError(f"init export {export_dir} holds a {exported.model_name!r} model; this "
                      f"config trains {c.model_name!r}")
  num_classes = c.model.get("num_classes")
  from jax_transfer.models import resnet  # pylint: disable=g-import-not-at-top
  is_resnet = exported.model_name == "resnet" or exported.model_name in resnet.NAMED
  kept = {k: c.model[k] for k in FINE_TUNE_MODEL_FIELDS if k in c.model and is_resnet}
  c.model_name = exported.model_name
  c.model = ml_collections.ConfigDict(exported.model.to_dict())
  if num_classes is not None and not keep_head:
    c.model.num_classes = num_classes
  c.model.update(kept)
  c.init.export_dir = export_dir
  c.init.load_regex = ".*"
  c.init.skip_regex = "^$" if keep_head else "^head/"
  size = exported.input.get("image_size")
  if size:
    c.input.image_size = size
  norm = preprocess.get_recipe(exported.input, train=False).ops[-1]
  grey_to_rgb = _dataset_channels(c.input) == 1 and checkpoint.input_channels(export_dir) == 3
  if norm.startswith(("value_range", "normalize")):
    resize = f'|resize({size}, "pil_bilinear")' if size else ""
    rgb = "|to_rgb" if grey_to_rgb else ""
    c.input.pp = f"decode{resize}{rgb}|{norm}" if size or rgb else ""
    c.input.pp_eval = c.input.pp
  use_export_tokenizer(c, export_dir)
  if exported.get("contrastive") is not None and c.get("contrastive") is not None:
    c.contrastive.loss = exported.contrastive.loss
  return c

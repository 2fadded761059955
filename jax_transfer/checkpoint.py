"""Checkpoints (orbax), exports (safetensors + msgpack + config JSON), pretrained loading.

Workdir layout: W/checkpoints/<step>/{state, data}/ — `state` is the sharded train state,
`data` the grain iterator position of every process, so a resumed run sees the same batches.
Export layout: DIR/params.safetensors, DIR/params.msgpack, DIR/config.json, and for a model
with BatchNorm DIR/batch_stats.safetensors (the running statistics, the train state's
extra['batch_stats'], flat '<module>/mean' / '<module>/var'; load_export_batch_stats): a
file of its own, so the params files and every reader of them are unchanged, and exports
without it load as before. Nothing is ever read with pickle.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from typing import Any, NamedTuple

import flax
import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from safetensors.numpy import load_file as st_load, save_file as st_save

from jax_transfer import config as config_lib

EXPORT_FILES = ("params.safetensors", "config.json")
BATCH_STATS_FILE = "batch_stats.safetensors"  # optional: a BatchNorm model's running stats
# Files a method writes into the workdir that belong with the parameters (the contrastive
# tokenizer's vocabulary); export copies them, load_pretrained's callers read them.
ASSET_FILES = ("tokenizer.json", "tokenizer_asset.json", "tokenizer_asset.model",
               "tokenizer_asset.txt.gz")  # + a PretrainedTokenizer's asset (tokenizer.ASSET_NAMES)


def checkpoint_manager(workdir: str, keep: int, save_every: int) -> ocp.CheckpointManager:
  """Async manager keeping the `keep` newest checkpoints. A checkpoint becomes visible only once
  fully written (orbax writes to a tmp dir and renames it, then deletes the oldest beyond
  `keep`), so no good checkpoint is deleted before a newer one is complete. Tmp dirs that a
  killed run left behind are removed on start-up (never a finished checkpoint)."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, save_interval_steps=save_every, create=True,
      enable_async_checkpointing=True, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(_ckpt_dir(workdir), options=options, item_names=("state", "data"))


def _ckpt_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def latest_step(workdir: str) -> int | None:
  """Newest published checkpoint step of `workdir`, read without creating anything (orbax
  publishes `checkpoints/<step>` by renaming its tmp dir, so a bare number is complete)."""
  try:
    names = os.listdir(_ckpt_dir(workdir))
  except FileNotFoundError:
    names = []
  step = max((int(n) for n in names if n.isdigit()), default=-1)
  if jax.process_count() > 1:  # One answer for all hosts, whatever their caches show.
    from jax.experimental import multihost_utils
    step = int(multihost_utils.broadcast_one_to_all(np.int64(step)))
  return None if step < 0 else step


def save(mngr: ocp.CheckpointManager, step: int, state, data_iter, force=False) -> bool:
  return mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(data_iter)), force=force)


class CheckpointMismatchError(ValueError):
  """The workdir's checkpoint holds another architecture than the config builds."""


def _path_shapes(tree, prefix: str) -> dict[str, tuple]:
  """'params/a/b' -> shape for the leaves under `prefix` (a TrainState or orbax metadata)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    if names and names[0] == prefix:
      out["/".join(names[1:])] = tuple(leaf.shape)
  return out


def check_compatible(workdir: str, step: int, abstract_state) -> None:
  """Raises CheckpointMismatchError (one line) when checkpoint `step` of `workdir` holds
  parameters of other names or shapes than `abstract_state`: reads only orbax's metadata, so it
  runs before anything compiles and before anything in the workdir is touched."""
  from etils import epath
  path = epath.Path(_ckpt_dir(workdir)) / str(step) / "state"
  try:
    meta = ocp.StandardCheckpointHandler().metadata(path)
  except Exception as e:  # Unreadable metadata: damaged; restore_latest deals with that.
    logging.warning("Cannot read the metadata of checkpoint %s: %s", path, e)
    return
  saved, wanted = _path_shapes(meta, "params"), _path_shapes(abstract_state, "params")
  differ = [k for k in sorted(wanted) if saved.get(k) != wanted[k]]  # First in path order.
  extra = sorted(set(saved) - set(wanted))
  if differ and differ[0] not in saved:
    what = f"has no parameter {differ[0]!r} that this config's model has"
  elif differ:
    k = differ[0]
    what = (f"has parameter {k!r} of shape {saved[k]}, this config's model needs "
            f"{wanted[k]}")
  elif extra:
    what = f"has parameter {extra[0]!r} that this config's model lacks"
  else:
    return
  raise CheckpointMismatchError(
      f"checkpoint step {step} in {workdir!r} {what} (another architecture?); use a new "
      f"--workdir, or the config that wrote it ({os.path.join(workdir, 'config.json')})")


def restore_latest(mngr: ocp.CheckpointManager, abstract_state, data_iter):
  """Restores the newest *readable* checkpoint onto the shardings in `abstract_state` (a tree of
  ShapeDtypeStructs with `.sharding`) — any mesh works, orbax reshards. Returns the state or
  None when the workdir has no checkpoint.

  When the newest checkpoints fail to read (a truncated or corrupted file) but an older one
  reads, the unreadable ones are moved aside to `checkpoints/<step>.damaged` — kept for
  inspection, never deleted — with a warning, and the run resumes from the older one: a crash
  or a disk error costs the steps since the previous good checkpoint, not the run. When none
  reads, nothing is moved and the error is raised (the cause is then more likely the code or
  the environment than the files)."""
  failed = []
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      restored = mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          data=grain.checkpoint.CheckpointRestore(data_iter)))
    except Exception as e:  # orbax / tensorstore raise many types for a damaged file.
      if jax.process_count() > 1:
        raise  # Hosts could disagree on the fallback; a person must look at it.
      failed.append((step, f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"))
      continue
    for bad, why in failed:
      src = os.path.join(str(mngr.directory), str(bad))
      logging.warning("Checkpoint step %d is unreadable (%s); moved it to %s.damaged and "
                      "resumed from step %d.", bad, why, src, step)
      os.replace(src, f"{src}.damaged")
    if failed:
      mngr.reload()
    logging.info("Restored checkpoint at step %d", step)
    return restored["state"]
  if failed:
    raise RuntimeError(f"no checkpoint in {mngr.directory} could be restored; newest: step "
                       f"{failed[0][0]}: {failed[0][1]}")
  return None


# ---------------------------------------------------------------------------- Export / import.

def flatten(params) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in
          flax.traverse_util.flatten_dict(params, sep="/").items()}


def unflatten(flat: dict[str, Any]):
  return flax.traverse_util.unflatten_dict(dict(flat), sep="/")


def export(params, config: ml_collections.ConfigDict, out_dir: str,
           assets_from: str | None = None, batch_stats=None) -> None:
  """Writes params as safetensors and msgpack plus the config as JSON (and `batch_stats`, a
  BatchNorm model's running statistics, as BATCH_STATS_FILE). Files are written
  under temporary names and renamed, so an interrupted export never leaves a half file
  under a final name. A LoRA / BitFit run's export is a plain model (LoRA merged into the
  kernels, config.peft.method 'none'); another PEFT method's keeps its parameters and
  config.peft (peft.for_export), and load_pretrained wraps the model again."""
  from jax_transfer import peft  # pylint: disable=g-import-not-at-top
  params, written = peft.for_export(params, config)
  flat = _export_flat(params, config)
  stats = None if batch_stats is None else flatten(jax.device_get(batch_stats))
  _write_export(out_dir, flat, written, assets_from, batch_stats=stats)


def batch_stats_of(extra):
  """A train state's extra -> its BatchNorm running statistics (None when it has none)."""
  return extra.get("batch_stats") if isinstance(extra, dict) else None


def load_export_batch_stats(export_dir: str):
  """The running statistics of a BatchNorm model's export (nested like the model's
  'batch_stats' collection), None for an export without them. A BN model loaded with
  load_pretrained predicts with
    model.apply({"params": params, "batch_stats": load_export_batch_stats(DIR)}, x,
                train=False)."""
  path = os.path.join(export_dir, BATCH_STATS_FILE)
  return unflatten(st_load(path)) if os.path.exists(path) else None


def merge_batch_stats(stats, export_dir: str, load_regex: str = ".*", skip_regex: str = "^$",
                      adapter_dir: str | None = None):
  """`stats` (a fresh BN model's 'batch_stats') with every leaf whose path matches load_regex
  (and not skip_regex) taken from the export's running statistics (with `adapter_dir`, the
  adapter export's when it has them: adapter_batch_stats): what a fine-tune from
  init.export_dir starts from, as merge_pretrained does for the params. An export without
  statistics (older, or imported) leaves `stats` as they are, with a warning; a selected
  statistic the export lacks, or of another shape, is a ValueError naming it."""
  pre = adapter_batch_stats(export_dir, adapter_dir)
  if pre is None:
    logging.warning("export %s has no %s: BatchNorm running statistics start from their init "
                    "(mean 0, var 1)", export_dir, BATCH_STATS_FILE)
    return stats
  flat, pre = flatten_keys(stats), flatten(pre)
  load, skip = re.compile(load_regex), re.compile(skip_regex)
  for k in [k for k in flat if load.search(k) and not skip.search(k)]:
    if k not in pre or tuple(pre[k].shape) != tuple(flat[k].shape):
      raise ValueError(f"export {export_dir} batch statistic {k!r} is "
                       f"{'missing' if k not in pre else f'of shape {pre[k].shape}'}; the "
                       f"model needs shape {tuple(flat[k].shape)} (different architecture?)")
    flat[k] = pre[k].astype(flat[k].dtype)
  return unflatten(flat)


def _export_flat(params, config) -> dict[str, np.ndarray]:
  """A run's params as an export holds them: per-block paths, f32 frozen leaves."""
  from jax_transfer.models.vit import unstack_blocks  # Exports are per-block, scan or not.
  flat = flatten(unstack_blocks(jax.device_get(params)))
  if config_lib.frozen_dtype(config):  # Frozen leaves stored in bf16 (train.store_frozen)
    flat = {k: v.astype(np.float32) if v.dtype == config_lib.frozen_dtype(config) else v
            for k, v in flat.items()}  # export as f32, the models' param_dtype.
  return flat


def _write_export(out_dir: str, flat, config, assets_from=None, extra=None,
                  batch_stats=None) -> None:
  """The export files of `flat` (+ `extra`: name -> JSON-able, e.g. an adapter's base.json;
  + `batch_stats`: flat running statistics), each written under a temporary name and
  renamed."""
  os.makedirs(out_dir, exist_ok=True)
  writes = {
      "params.safetensors": lambda p: st_save(flat, p),
      "params.msgpack": lambda p: open(p, "wb").write(
          flax.serialization.msgpack_serialize(unflatten(flat))),
      "config.json": lambda p: open(p, "w").write(config.to_json_best_effort(indent=2)),
  }
  for name, value in (extra or {}).items():
    writes[name] = lambda p, value=value: open(p, "w").write(json.dumps(value, indent=2))
  for name in ASSET_FILES:
    src = os.path.join(assets_from or "", name)
    if assets_from and os.path.exists(src):
      writes[name] = lambda p, src=src: shutil.copyfile(src, p)
  if batch_stats is not None:
    writes[BATCH_STATS_FILE] = lambda p: st_save(batch_stats, p)
  for name in (ADAPTER_BASE, BATCH_STATS_FILE):  # a full export over an adapter's; a model
    stale = os.path.join(out_dir, name)          # without BN over one with
    if name not in writes and os.path.exists(stale):
      os.remove(stale)
  for name, write in writes.items():
    tmp = os.path.join(out_dir, f".{name}.tmp")
    write(tmp)
    os.replace(tmp, os.path.join(out_dir, name))


def load_export_config(export_dir: str) -> ml_collections.ConfigDict:
  missing = [f for f in EXPORT_FILES if not os.path.exists(os.path.join(export_dir, f))]
  if missing:
    raise FileNotFoundError(f"export dir {export_dir!r} lacks {missing}; expected "
                            f"{list(EXPORT_FILES)} written by `python -m jax_transfer.export`")
  with open(os.path.join(export_dir, "config.json")) as f:
    return ml_collections.ConfigDict(json.load(f))


def _load_flat(export_dir: str) -> dict[str, np.ndarray]:
  load_export_config(export_dir)  # Checks the directory is complete.
  return st_load(os.path.join(export_dir, "params.safetensors"))


def export_shapes(export_dir: str) -> dict[str, tuple[int, ...]]:
  """{path: shape} of an export's parameters, from the safetensors header alone (no tensor is
  read: cheap for a ViT-H too)."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  load_export_config(export_dir)
  path = os.path.join(export_dir, "params.safetensors")
  try:
    with safe_open(path, framework="np") as f:
      return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
  except Exception as e:  # pylint: disable=broad-except  (SafetensorError: not a ValueError)
    raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def input_channels(export_dir: str) -> int | None:
  """The image channels an export's ViT (or two-tower image tower) patch embedding takes,
  None for other models."""
  shapes = export_shapes(export_dir)
  for key in ("embedding/kernel", "img/embedding/kernel"):
    if len(shapes.get(key, ())) == 4:
      return int(shapes[key][2])
  return None


def load_export_params(export_dir: str):
  """A (full) export's parameters, per-block; an adapter export is refused, naming the way
  to apply it."""
  if os.path.exists(os.path.join(export_dir, ADAPTER_BASE)):
    raise ValueError(f"{export_dir!r} is an adapter export (it has {ADAPTER_BASE}), not a "
                     f"whole model: apply it onto its base with init.export_dir=BASE "
                     f"init.adapter_dir={export_dir!r}, or load_pretrained(BASE, "
                     f"adapter_dir={export_dir!r})")
  return unflatten(_load_flat(export_dir))


def load_pretrained(export_dir: str, adapter_dir: str | None = None):
  """Export dir -> (model, params, config). The model is rebuilt by name from the config and
  wrapped by its config.peft (peft.wrap: the export of a method that does not merge keeps
  its PEFT parameters). adapter_dir: an `--adapter_only` export trained on `export_dir`,
  applied onto it (load_adapted; config is then the adapter's, i.e. the fine-tuned run's)."""
  from jax_transfer import models, peft  # Late import: models import nothing from here.
  if adapter_dir:
    params, config = load_adapted(export_dir, adapter_dir)
  else:
    config, params = load_export_config(export_dir), load_export_params(export_dir)
  model = peft.wrap(models.get_model(config.model_name, **config.model.to_dict()), config)
  if getattr(model, "scan_layers", False):  # Exports are per-block; a scan model stacks them.
    params = models.vit.stack_blocks(params)
  return model, params, config


# ------------------------------------------------------------------------- Adapter exports.
# An adapter export (`python -m jax_transfer.export --adapter_only`) holds only the params a
# PEFT run trained (peft.trainable_regex: the PEFT ones and peft.train_regex's, e.g. the head),
# the run's config.json and ADAPTER_BASE, a fingerprint of the base export (the run's
# init.export_dir): its model_name and config.model, every parameter's shape, and a sha256
# over the parameters' names, dtypes, shapes and bytes in name order (the loaded arrays, not
# the file, so a copy or a re-export of the same weights matches, and other weights of the
# same architecture do not). Applying it onto another base is an AdapterError saying what
# differs, raised before anything is built.

ADAPTER_BASE = "base.json"


class AdapterError(ValueError):
  """An adapter export that cannot be applied (another base, not an adapter, ...)."""


def params_sha256(flat: dict[str, np.ndarray]) -> str:
  h = hashlib.sha256()
  for k in sorted(flat):
    v = np.ascontiguousarray(flat[k])
    h.update(f"{k}\0{v.dtype.str}\0{v.shape}\0".encode())
    h.update(v.reshape(-1).view(np.uint8).data)
  return h.hexdigest()


def _fingerprint(export_dir: str, flat) -> dict:
  config = load_export_config(export_dir)
  return dict(base_dir=os.path.abspath(export_dir), model_name=config.model_name,
              model=json.loads(config.model.to_json_best_effort()),
              params_sha256=params_sha256(flat),
              shapes={k: list(flat[k].shape) for k in sorted(flat)})


def _through_frozen(flat, config):
  """Floating leaves rounded through config.peft.frozen_dtype, as training stores the frozen
  ones (train.store_frozen); unchanged without one."""
  dtype = config_lib.frozen_dtype(config)
  if not dtype:
    return flat
  dtype = jax.numpy.dtype(dtype)
  return {k: v.astype(dtype).astype(v.dtype) if v.dtype.kind == "f" else v
          for k, v in flat.items()}


def export_adapter(params, config: ml_collections.ConfigDict, out_dir: str,
                   assets_from: str | None = None, batch_stats=None) -> list[str]:
  """Writes the adapter export of a PEFT run's `params` (module comment above); returns the
  parameter names written. Every parameter left out must equal the base's (frozen and loaded
  from it), else applying the adapter would not give this model back: that is a ValueError
  naming it, as are a run without config.peft or without init.export_dir. A BatchNorm
  model's running statistics (`batch_stats`, the run's extra) are written whole: training
  moved them (BitFit on a ResNet, unless model.frozen_bn), so the base's would not give this
  model back; adapter_batch_stats reads them."""
  from jax_transfer import peft  # pylint: disable=g-import-not-at-top
  p = peft.from_config(config)
  base_dir = config.get("init", {}).get("export_dir")
  if p is None:
    raise ValueError("--adapter_only: the run has no config.peft method, so no adapter; "
                     "export the whole model")
  if not base_dir:
    raise ValueError("--adapter_only: the run has no init.export_dir, the base an adapter is "
                     "applied onto; export the whole model")
  flat, base = _export_flat(params, config), _load_flat(base_dir)
  regex = peft.trainable_regex(p)
  adapter = {k: v for k, v in flat.items() if re.search(regex, k)}
  stored = _through_frozen(base, config)
  for k, v in flat.items():
    if k not in adapter and not (k in base and base[k].shape == v.shape and np.array_equal(
        stored[k].astype(v.dtype), v)):
      raise ValueError(f"--adapter_only: parameter {k!r} is not trained ({regex!r}) but "
                       f"{'differs from' if k in base else 'is not in'} the base export "
                       f"{base_dir!r} (init.load_regex / skip_regex left it out?); the adapter "
                       f"would lose it: export the whole model")
  record = dict(_fingerprint(base_dir, base), unused=sorted(set(base) - set(flat)))
  stats = None if batch_stats is None else flatten(jax.device_get(batch_stats))
  _write_export(out_dir, adapter, config, assets_from, extra={ADAPTER_BASE: record},
                batch_stats=stats)
  return sorted(adapter)


def adapter_batch_stats(base_dir: str, adapter_dir: str | None = None):
  """The running statistics of the base export with the adapter export on top: the adapter's
  when it has them (a BatchNorm run's, export_adapter), else the base's; None when neither
  has any. The model load_pretrained(base_dir, adapter_dir) returns predicts with them."""
  stats = load_export_batch_stats(adapter_dir) if adapter_dir else None
  return load_export_batch_stats(base_dir) if stats is None else stats


def check_adapter_base(adapter_dir: str, base_dir: str, base=None) -> None:
  """Raises AdapterError naming both dirs and what differs when `adapter_dir` was not trained
  on the base export `base_dir` (`base`: its flat params, when already loaded)."""
  path = os.path.join(adapter_dir, ADAPTER_BASE)
  if not os.path.exists(path):
    load_export_config(adapter_dir)  # FileNotFoundError naming the files when incomplete
    raise AdapterError(f"{adapter_dir!r} is no adapter export (it lacks {ADAPTER_BASE}, which "
                       f"`python -m jax_transfer.export --adapter_only` writes)")
  with open(path) as f:
    want = json.load(f)
  got = _fingerprint(base_dir, _load_flat(base_dir) if base is None else base)
  if got["params_sha256"] == want["params_sha256"]:
    return
  fields = sorted(set(want["model"]) | set(got["model"]))
  if got["model_name"] != want["model_name"]:
    what = f"model_name {want['model_name']!r} vs {got['model_name']!r}"
  elif any(want["model"].get(k) != got["model"].get(k) for k in fields):
    what = ", ".join(f"model.{k} {want['model'].get(k)!r} vs {got['model'].get(k)!r}"
                     for k in fields if want["model"].get(k) != got["model"].get(k))
  elif want["shapes"] != got["shapes"]:
    k = next(k for k in sorted(set(want["shapes"]) | set(got["shapes"]))
             if want["shapes"].get(k) != got["shapes"].get(k))
    what = f"parameter {k!r} of shape {want['shapes'].get(k)} vs {got['shapes'].get(k)}"
  else:
    what = "the same parameter names and shapes but other values"
  what += f" (params sha256 {want['params_sha256'][:12]} vs {got['params_sha256'][:12]})"
  raise AdapterError(f"adapter export {adapter_dir!r} was trained on the base export "
                     f"{want['base_dir']!r}, not on {base_dir!r}: {what}")


def load_adapted(base_dir: str, adapter_dir: str, like=None):
  """(params, config) of the model an adapter export was trained as: the base export's
  parameters (per-block) with the adapter's on top, checked first (check_adapter_base), and
  the adapter's config. Frozen leaves go through the run's peft.frozen_dtype as in training.
  like: the params of the model they go into (any layout): a LoRA adapter is merged into the
  kernels when `like` has no LoRA parameters, and a PEFT parameter `like` lacks is an
  AdapterError."""
  from jax_transfer import peft  # pylint: disable=g-import-not-at-top
  if os.path.exists(os.path.join(base_dir, ADAPTER_BASE)):
    load_export_params(base_dir)  # the AdapterError for an adapter given as the base
  base = _load_flat(base_dir)
  check_adapter_base(adapter_dir, base_dir, base)
  config = load_export_config(adapter_dir)
  with open(os.path.join(adapter_dir, ADAPTER_BASE)) as f:
    unused = set(json.load(f)["unused"])
  adapter = _load_flat(adapter_dir)
  frozen = _through_frozen({k: v for k, v in base.items()
                            if k not in unused and k not in adapter}, config)
  params = unflatten({**frozen, **adapter})
  p = peft.from_config(config)
  if like is None or p is None:
    return params, config
  from jax_transfer.models.vit import unstack_blocks  # pylint: disable=g-import-not-at-top
  has = flatten_keys(unstack_blocks(like))
  if p.method == "lora" and not any(k.endswith("/lora_a") for k in has):
    params = peft.merge_lora(params, p)
  lacking = [k for k in flatten_keys(params) if k not in has and re.search(
      rf"(^|/){peft.ADDED}$", k)]
  if lacking:
    raise AdapterError(f"adapter export {adapter_dir!r} has {p.method} parameter "
                       f"{lacking[0]!r} that this run's model lacks; set config.peft as the "
                       f"adapter's config.json does (method {p.method!r}, target_regex "
                       f"{p.target!r})")
  return params, config


class Pretrained(NamedTuple):
  """What `jax_transfer.load_pretrained(dir)` returns (open_clip's create_model_and_transforms
  and get_tokenizer in one): the model (rebuilt by name), its params, the export's tokenizer
  (None when it has none), the image preprocessing and the export's config."""
  model: Any
  params: Any
  tokenizer: Any
  preprocess: Any
  config: ml_collections.ConfigDict


def load_pretrained_all(export_dir: str, adapter_dir: str | None = None) -> Pretrained:
  """Export dir (+ an adapter export trained on it) -> Pretrained(model, params, tokenizer,
  preprocess, config)."""
  from jax_transfer.data.preprocess import ImagePreprocess
  from jax_transfer.tokenizer import load_tokenizer
  model, params, config = load_pretrained(export_dir, adapter_dir)
  tok_path = os.path.join(export_dir, "tokenizer.json")
  tokenizer = load_tokenizer(tok_path) if os.path.exists(tok_path) else None
  return Pretrained(model, params, tokenizer, ImagePreprocess.from_config(config.input), config)


def _resample_if_posemb(key: str, pre, want_shape, flat_keys):
  """A pretrained position embedding for another image size, resampled to `want_shape`
  (bilinear, timm's loader's way); class-token rows kept. None when `key` is no posemb."""
  if not key.endswith("pos_embedding") or pre.ndim != 3 or len(want_shape) != 3 or (
      pre.shape[-1] != want_shape[-1]):
    return None
  from jax_transfer.models.vit import resample_posemb
  prefix = int(key[:-len("pos_embedding")] + "cls" in flat_keys)
  side = int(round((want_shape[1] - prefix) ** 0.5))
  if side * side != want_shape[1] - prefix:
    return None
  try:
    return resample_posemb(np.asarray(pre, np.float32), (side, side), prefix)
  except ValueError:
    return None


def merge_pretrained(params, pretrained, load_regex: str = ".*", skip_regex: str = "^$",
                     source: str = "pretrained", optional_regex: str = "^$"):
  """Returns `params` with every leaf whose path matches load_regex (and not skip_regex)
  replaced by the pretrained leaf of the same path. Shapes must agree; a selected path that
  the pretrained tree lacks is an error naming it, so a typo in a regex cannot silently load
  nothing. Either tree may hold scan-stacked blocks: paths and regexes are the per-block ones
  (encoderblock_{i}/...), and the result has the layout of `params`. A selected path matching
  optional_regex that the pretrained tree lacks keeps its value (the PEFT parameters of a run
  started from a plain export)."""
  from jax_transfer.models.vit import has_stacked_blocks, stack_blocks, unstack_blocks
  stacked = has_stacked_blocks(params)
  flat, pre = flatten_keys(unstack_blocks(params)), flatten(unstack_blocks(pretrained))
  load, skip = re.compile(load_regex), re.compile(skip_regex)
  selected = [k for k in flat if load.search(k) and not skip.search(k)]
  if not selected:
    raise ValueError(f"init.load_regex={load_regex!r} (skip {skip_regex!r}) selects no "
                     f"parameter; some paths: {sorted(flat)[:5]}")
  optional = re.compile(optional_regex)
  selected = [k for k in selected if k in pre or not optional.search(k)]
  for k in selected:
    if k not in pre:
      raise ValueError(f"{source} lacks parameter {k!r} selected by init.load_regex="
                       f"{load_regex!r}; it has e.g. {sorted(pre)[:5]}")
    if tuple(pre[k].shape) != tuple(flat[k].shape):
      resampled = _resample_if_posemb(k, pre[k], tuple(flat[k].shape), flat)
      if resampled is not None:  # Fine-tuning at another image size.
        logging.info("Resampled %s %s -> %s", k, tuple(pre[k].shape), resampled.shape)
        pre[k] = resampled
    if tuple(pre[k].shape) != tuple(flat[k].shape):
      raise ValueError(f"{source} parameter {k!r} has shape {tuple(pre[k].shape)}, the model "
                       f"needs {tuple(flat[k].shape)} (different architecture?)")
    flat[k] = pre[k].astype(flat[k].dtype)
  logging.info("Loaded %d of %d parameters from %s", len(selected), len(flat), source)
  return stack_blocks(unflatten(flat)) if stacked else unflatten(flat)


def flatten_keys(params) -> dict[str, Any]:
  return dict(flax.traverse_util.flatten_dict(params, sep="/"))


class OutputExistsError(FileExistsError):
  """An export's output directory is not empty and replacing it was not asked for."""


def check_output_dir(out: str, overwrite: bool = False) -> None:
  """OutputExistsError naming `out` when it is a non-empty directory and not to be replaced
  (callers with long work before the write check first)."""
  if os.path.exists(out) and os.listdir(out) and not overwrite:
    raise OutputExistsError(f"--out={out} exists and is not empty; pass --overwrite or "
                            f"choose another directory")


def write_dir_atomically(out: str, write, overwrite: bool = False) -> None:
  """Runs write(tmp) on a temporary sibling of `out`, then renames it into place, so a failed
  or interrupted write leaves `out` as it was. A non-empty `out` is refused (OutputExistsError
  naming it) unless overwrite, and then replaced only once the new one is complete."""
  import tempfile
  out = os.path.abspath(out)
  check_output_dir(out, overwrite)
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", dir=parent)
  try:
    write(tmp)
    old = None
    if os.path.exists(out):
      old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old.", dir=parent)
      os.replace(out, os.path.join(old, "x"))
    os.replace(tmp, out)
    if old:
      shutil.rmtree(old)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise

"""Checkpoints (orbax), exports (safetensors + msgpack + config JSON), pretrained loading.

Workdir layout: W/checkpoints/<step>/{state, data}/ — `state` is the sharded train state,
`data` the grain iterator position of every process, so a resumed run sees the same batches.
Export layout: DIR/params.safetensors, DIR/params.msgpack, DIR/config.json. Nothing is ever
read with pickle.
"""
from __future__ import annotations

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

EXPORT_FILES = ("params.safetensors", "config.json")
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
           assets_from: str | None = None) -> None:
  """Writes params as safetensors and msgpack plus the config as JSON. Files are written
  under temporary names and renamed, so an interrupted export never leaves a half file
  under a final name."""
  os.makedirs(out_dir, exist_ok=True)
  from jax_transfer.models.vit import unstack_blocks  # Exports are per-block, scan or not.
  flat = flatten(unstack_blocks(jax.device_get(params)))
  writes = {
      "params.safetensors": lambda p: st_save(flat, p),
      "params.msgpack": lambda p: open(p, "wb").write(
          flax.serialization.msgpack_serialize(unflatten(flat))),
      "config.json": lambda p: open(p, "w").write(config.to_json_best_effort(indent=2)),
  }
  for name in ASSET_FILES:
    src = os.path.join(assets_from or "", name)
    if assets_from and os.path.exists(src):
      writes[name] = lambda p, src=src: shutil.copyfile(src, p)
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


def load_export_params(export_dir: str):
  load_export_config(export_dir)  # Checks the directory is complete.
  return unflatten(st_load(os.path.join(export_dir, "params.safetensors")))


def load_pretrained(export_dir: str):
  """Export dir -> (model, params, config). The model is rebuilt by name from the config."""
  from jax_transfer import models  # Late import: models import nothing from here.
  config = load_export_config(export_dir)
  model = models.get_model(config.model_name, **config.model.to_dict())
  params = load_export_params(export_dir)
  if getattr(model, "scan_layers", False):  # Exports are per-block; a scan model stacks them.
    params = models.vit.stack_blocks(params)
  return model, params, config


class Pretrained(NamedTuple):
  """What `jax_transfer.load_pretrained(dir)` returns (open_clip's create_model_and_transforms
  and get_tokenizer in one): the model (rebuilt by name), its params, the export's tokenizer
  (None when it has none), the image preprocessing and the export's config."""
  model: Any
  params: Any
  tokenizer: Any
  preprocess: Any
  config: ml_collections.ConfigDict


def load_pretrained_all(export_dir: str) -> Pretrained:
  """Export dir -> Pretrained(model, params, tokenizer, preprocess, config)."""
  from jax_transfer.data.preprocess import ImagePreprocess
  from jax_transfer.tokenizer import load_tokenizer
  model, params, config = load_pretrained(export_dir)
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
                     source: str = "pretrained"):
  """Returns `params` with every leaf whose path matches load_regex (and not skip_regex)
  replaced by the pretrained leaf of the same path. Shapes must agree; a selected path that
  the pretrained tree lacks is an error naming it, so a typo in a regex cannot silently load
  nothing. Either tree may hold scan-stacked blocks: paths and regexes are the per-block ones
  (encoderblock_{i}/...), and the result has the layout of `params`."""
  from jax_transfer.models.vit import has_stacked_blocks, stack_blocks, unstack_blocks
  stacked = has_stacked_blocks(params)
  flat, pre = flatten_keys(unstack_blocks(params)), flatten(unstack_blocks(pretrained))
  load, skip = re.compile(load_regex), re.compile(skip_regex)
  selected = [k for k in flat if load.search(k) and not skip.search(k)]
  if not selected:
    raise ValueError(f"init.load_regex={load_regex!r} (skip {skip_regex!r}) selects no "
                     f"parameter; some paths: {sorted(flat)[:5]}")
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


def write_dir_atomically(out: str, write, overwrite: bool = False) -> None:
  """Runs write(tmp) on a temporary sibling of `out`, then renames it into place, so a failed
  or interrupted write leaves `out` as it was. A non-empty `out` is refused (OutputExistsError
  naming it) unless overwrite, and then replaced only once the new one is complete."""
  import tempfile
  out = os.path.abspath(out)
  if os.path.exists(out) and os.listdir(out) and not overwrite:
    raise OutputExistsError(f"--out={out} exists and is not empty; pass --overwrite or "
                            f"choose another directory")
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

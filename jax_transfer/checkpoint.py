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
from typing import Any

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
ASSET_FILES = ("tokenizer.json",)


def checkpoint_manager(workdir: str, keep: int, save_every: int) -> ocp.CheckpointManager:
  """Async manager keeping the `keep` newest checkpoints. A checkpoint becomes visible only once
  fully written (orbax writes to a tmp dir and renames), so an older one is never deleted
  before a newer one is complete."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, save_interval_steps=save_every, create=True,
      enable_async_checkpointing=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               options=options, item_names=("state", "data"))


def save(mngr: ocp.CheckpointManager, step: int, state, data_iter, force=False) -> bool:
  return mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(data_iter)), force=force)


def restore_latest(mngr: ocp.CheckpointManager, abstract_state, data_iter):
  """Restores the newest checkpoint onto the shardings in `abstract_state` (a tree of
  ShapeDtypeStructs with `.sharding`) — any mesh works, orbax reshards. Returns the state or
  None when the workdir has no checkpoint."""
  step = mngr.latest_step()
  if step is None:
    return None
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      data=grain.checkpoint.CheckpointRestore(data_iter)))
  logging.info("Restored checkpoint at step %d", step)
  return restored["state"]


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
  flat = flatten(jax.device_get(params))
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
  return model, load_export_params(export_dir), config


def merge_pretrained(params, pretrained, load_regex: str = ".*", skip_regex: str = "^$",
                     source: str = "pretrained"):
  """Returns `params` with every leaf whose path matches load_regex (and not skip_regex)
  replaced by the pretrained leaf of the same path. Shapes must agree; a selected path that
  the pretrained tree lacks is an error naming it, so a typo in a regex cannot silently load
  nothing."""
  flat, pre = flatten_keys(params), flatten(pretrained)
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
      raise ValueError(f"{source} parameter {k!r} has shape {tuple(pre[k].shape)}, the model "
                       f"needs {tuple(flat[k].shape)} (different architecture?)")
    flat[k] = pre[k].astype(flat[k].dtype)
  logging.info("Loaded %d of %d parameters from %s", len(selected), len(flat), source)
  return unflatten(flat)


def flatten_keys(params) -> dict[str, Any]:
  return dict(flax.traverse_util.flatten_dict(params, sep="/"))

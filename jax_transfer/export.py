"""python -m jax_transfer.export --workdir=W --out=DIR

Writes the newest checkpoint's parameters as DIR/params.safetensors + DIR/params.msgpack and
the run's config as DIR/config.json; `jax_transfer.load_pretrained(DIR)` reads them back.
"""
from __future__ import annotations

import json
import os
import sys

import ml_collections
import orbax.checkpoint as ocp
from absl import app, flags

from jax_transfer import checkpoint



def _define_flags():  # Only when run as a CLI, so importing this module defines no flags.
  flags.DEFINE_string("workdir", None, "Training workdir (holds checkpoints/).")
  flags.DEFINE_string("out", None, "Export directory to write.")
  flags.mark_flags_as_required(["workdir", "out"])


def export_workdir(workdir: str, out: str) -> int:
  """Exports the newest checkpoint of `workdir`; returns its step. Reads only the params
  subtree (no mesh needed: arrays restore onto the local device)."""
  ckpt_dir = os.path.join(os.path.abspath(workdir), "checkpoints")
  config_path = os.path.join(workdir, "config.json")
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"{config_path} not found: is {workdir!r} a training workdir?")
  mngr = ocp.CheckpointManager(ckpt_dir, item_names=("state", "data"),
                               options=ocp.CheckpointManagerOptions(read_only=True))
  step = mngr.latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint under {ckpt_dir}")
  state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  with open(config_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  checkpoint.export(state["state"]["params"], config, out, assets_from=workdir)
  mngr.close()
  return step


def main(argv):
  del argv
  try:
    step = export_workdir(flags.FLAGS.workdir, flags.FLAGS.out)
  except FileNotFoundError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"exported step {step} of {flags.FLAGS.workdir} to {flags.FLAGS.out}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)

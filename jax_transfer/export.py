"""python -m jax_transfer.export --workdir=W --out=DIR [--adapter_only]

Writes the newest checkpoint's parameters as DIR/params.safetensors + DIR/params.msgpack and
the run's config as DIR/config.json (a BatchNorm model's running statistics, the state's
extra['batch_stats'], as DIR/batch_stats.safetensors: checkpoint.load_export_batch_stats);
`jax_transfer.load_pretrained(DIR)` reads them back. A
LoRA / BitFit run exports a plain model (merged); another PEFT method's export keeps its
parameters and is loaded wrapped (checkpoint.export). --adapter_only: only the parameters the
PEFT run trained, plus DIR/base.json fingerprinting its base (init.export_dir); apply it with
`load_pretrained(BASE, adapter_dir=DIR)` or --config.init.adapter_dir (checkpoint.py's
"Adapter exports").
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
  flags.DEFINE_bool("adapter_only", False, "Write only the PEFT run's trained parameters "
                    "and a fingerprint of its base export (init.export_dir).")
  flags.mark_flags_as_required(["workdir", "out"])


def export_workdir(workdir: str, out: str, adapter_only: bool = False) -> int:
  """Exports the newest checkpoint of `workdir` (only its adapter with `adapter_only`:
  checkpoint.export_adapter); returns its step. Reads the params (and extra['batch_stats'])
  subtrees (no mesh needed: arrays restore onto the local device)."""
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
  mngr.close()
  with open(config_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  params, assets = state["state"]["params"], workdir
  if config.get("method") == "atlas":  # the composed θ, a plain export of the wrapped method
    from jax_transfer.methods import atlas
    params, config = atlas.export_view(state["state"], config)
    assets = config.atlas_source.base
  stats = checkpoint.batch_stats_of(state["state"].get("extra"))
  if adapter_only:
    checkpoint.export_adapter(params, config, out, assets_from=assets)
  else:
    checkpoint.export(params, config, out, assets_from=assets, batch_stats=stats)
  return step


def main(argv):
  del argv
  try:
    step = export_workdir(flags.FLAGS.workdir, flags.FLAGS.out, flags.FLAGS.adapter_only)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"exported step {step} of {flags.FLAGS.workdir} to {flags.FLAGS.out}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)

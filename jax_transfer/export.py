"""python -m jax_transfer.export --workdir=W --out=DIR [--adapter_only]
   python -m jax_transfer.export --from_export=CLIP_EXPORT --tower=img --out=DIR

Writes the newest checkpoint's parameters as DIR/params.safetensors + DIR/params.msgpack and
the run's config as DIR/config.json (a BatchNorm model's running statistics, the state's
extra['batch_stats'], as DIR/batch_stats.safetensors: checkpoint.load_export_batch_stats);
`jax_transfer.load_pretrained(DIR)` reads them back. A
LoRA / BitFit run exports a plain model (merged); another PEFT method's export keeps its
parameters and is loaded wrapped (checkpoint.export). --adapter_only: only the parameters the
PEFT run trained (and a BatchNorm model's running statistics), plus DIR/base.json
fingerprinting its base (init.export_dir); apply it with `load_pretrained(BASE,
adapter_dir=DIR)` (statistics: checkpoint.adapter_batch_stats) or --config.init.adapter_dir
(checkpoint.py's "Adapter exports").

--tower=img (export_tower): the image tower of a two-tower (CLIP / ALIGN / SigLIP) export,
yours or an imported checkpoint's, as a plain `vit` export without a head: big_vision's
`model_init='ckpt.npz:img'`. Its features are the tower's pooled output before img_proj (the
contrastive model's aux['img_features']), so config.init_from_export fine-tunes it as a
classifier (a new head on them) like any ViT export, or probes it.
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
  flags.DEFINE_string("from_export", None, "With --tower: a two-tower export to take the "
                      "tower from (instead of --workdir).")
  flags.DEFINE_string("tower", None, "'img': write --from_export's image tower as a plain "
                      "ViT export (export_tower).")
  flags.mark_flags_as_required(["out"])
  flags.register_validator(
      "workdir", lambda _: (flags.FLAGS.workdir is None) != (flags.FLAGS.from_export is None)
      and (flags.FLAGS.from_export is None) == (flags.FLAGS.tower is None),
      "give --workdir, or --from_export with --tower")


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
    checkpoint.export_adapter(params, config, out, assets_from=assets, batch_stats=stats)
  else:
    checkpoint.export(params, config, out, assets_from=assets, batch_stats=stats)
  return step


TOWERS = ("img",)


def export_tower(export_dir: str, out: str, tower: str = "img") -> ml_collections.ConfigDict:
  """Writes the `tower` of the two-tower export `export_dir` to `out` as a plain export of a
  headless `vit` (num_classes 0): the tower's parameters (img/... -> ...), its geometry and
  the TwoTowers fields it was built with (pooling, pre-norm, LayerNorm eps, GELU form, patch
  bias), method 'supervised', and the export's input section (image size, preprocessing
  recipe), so init_from_export resizes and normalises as the tower was trained. Returns the
  written config (config.tower_of names the source). Errors name the directory and the key
  before anything is written."""
  from jax_transfer import config as config_lib, models, peft  # pylint: disable=g-import-not-at-top
  if tower not in TOWERS:
    raise ValueError(f"--tower={tower!r}: only the image tower exports as a classifier "
                     f"backbone; allowed: {list(TOWERS)}")
  src = checkpoint.load_export_config(export_dir)
  if src.get("model_name") != "two_towers":
    raise ValueError(f"{export_dir}: model_name {src.get('model_name')!r} is not a two-tower "
                     "model; --tower takes a CLIP / ALIGN / SigLIP export")
  if peft.from_config(src) is not None:
    raise ValueError(f"{export_dir}: exported with peft.method {src.peft.method!r} (its PEFT "
                     "parameters are not part of a plain ViT); merge or re-export it first")
  tt = models.get_model("two_towers", **config_lib.model_kwargs(src.model))
  model = tt.image_vit_kwargs()
  for key in ("dtype", "param_dtype"):  # written as the export spelled them (a dtype name)
    del model[key]
    if key in src.model:
      model[key] = src.model[key]
  flat = checkpoint.flatten(checkpoint.load_export_params(export_dir))
  params = {k[len(tower) + 1:]: v for k, v in flat.items() if k.startswith(f"{tower}/")}
  if not params:
    raise ValueError(f"{export_dir}: no {tower}/ parameters")
  c = config_lib.base_config()
  c.method = "supervised"
  c.model_name = "vit"
  c.model = ml_collections.ConfigDict(model)
  c.input = ml_collections.ConfigDict(src.input.to_dict())
  c.tower_of = ml_collections.ConfigDict({"export_dir": os.path.abspath(export_dir),
                                          "tower": tower})
  checkpoint.export(checkpoint.unflatten(params), c, out)
  return c


def main(argv):
  del argv
  f = flags.FLAGS
  try:
    if f.tower:
      export_tower(f.from_export, f.out, f.tower)
      print(f"exported the {f.tower} tower of {f.from_export} to {f.out}")
      return
    step = export_workdir(f.workdir, f.out, f.adapter_only)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"exported step {step} of {f.workdir} to {f.out}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)

r"""aTLAS (jax_transfer/methods/atlas.py): learn one coefficient per parameter tensor per task
vector on the target task's data, starting from the base export's own training config.

Arguments (comma-separated): `base=DIR` (the pre-trained export θ_0), `tasks=A+B+...` (the
fine-tuned exports, '+'-separated), optional `method=supervised|contrastive` (default: the
base export's method), `runlocal` (a smoke-sized run). Everything else (data, model,
evaluation) is the base export's config; override the data with --config.input.* for the
target task.

Command:
  python -m jax_transfer.main \
    --config=ml_collections_configs/merging/atlas.py:base=/tmp/pre,tasks=/tmp/ft_a+/tmp/ft_b \
    --workdir=/tmp/atlas
  python -m jax_transfer.export --workdir=/tmp/atlas --out=/tmp/atlas_export  # the merged θ

The pod shape is the base's (its mesh, batch and model); the coefficients are a few hundred
scalars, the frozen state θ_0 + T task vectors is sharded like the parameters. No pod run was
made (no accelerator). Measured on the Intel Xeon (2 shared cores), through
experiments/merging/merge_clip.py with atlas.method='contrastive' on four shapes_captions
CLIP fine-tunes (220 coefficients, 100 steps of batch 128, 84-98 s per seed): test average
normalised accuracy 0.759 ± 0.011 over 2 seeds, against 0.755 ± 0.004 for task arithmetic
(experiments/RESULTS.md, "Merging CLIP fine-tunes").
"""
from jax_transfer import checkpoint, config as config_lib


def get_config(arg: str = ""):
  args = dict(a.split("=", 1) if "=" in a else (a, "") for a in arg.split(",") if a)
  if "base" not in args or "tasks" not in args:
    raise ValueError("merging/atlas.py needs base=DIR,tasks=A+B (the pre-trained export and "
                     "the fine-tuned ones)")
  c = checkpoint.load_export_config(args["base"])
  inner = args.get("method") or c.get("method", "supervised")
  for key in ("merge", "import_source"):
    if key in c:
      del c[key]
  c.method = "atlas"
  c.atlas = dict(method=inner, base=args["base"], tasks=[t for t in args["tasks"].split("+")
                                                         if t], skip_regex="^head/")
  c.init.export_dir = None
  config_lib.use_export_tokenizer(c, args["base"])  # the base's tokens, not a retrained one
  c.peft.method = "none"
  c.optimizer.trainable_regex = ".*"
  c.optimizer.name = "adamw"
  c.optimizer.lr = 1e-2
  c.optimizer.weight_decay = 0.0
  c.schedule.warmup_steps = 10
  c.total_steps = 200
  c.eval_every_steps = 100
  c.checkpoint_every_steps = 100
  if "runlocal" in args:
    c.total_steps = 4
    c.eval_every_steps = 4
    c.checkpoint_every_steps = 4
    c.log_every_steps = 2
    c.schedule.warmup_steps = 1
  return c

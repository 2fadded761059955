r"""TLEG auxiliary model on the embedded digits: learn a learngene by distillation.

The auxiliary model is a width-64 ViT (mu/2 blocks) of depth L_aux = 8 whose block i is
θ_A + (i/8)·θ_B, pool='gap' (no class token), distilled with α = 1, τ = 1 (TLEG's setting)
from a supervised teacher export trained on digits 0-4 (digits_vit.py, a ViT-mu/2, depth 4).

Arguments (comma-separated):
  (none)     distil on digits 0-4 (all training images), 600 steps, batch 64.
  runlocal   20 steps (smoke runs, tests).

Commands (the experiment script runs all of them; see experiments/learngene/README.md):
  python -m jax_transfer.main --config=ml_collections_configs/supervised/digits_vit.py \
    --workdir=workdirs/learngene/teacher
  python -m jax_transfer.export --workdir=workdirs/learngene/teacher \
    --out=workdirs/learngene/teacher_export
  python -m jax_transfer.main --config=ml_collections_configs/learngene/digits_aux.py \
    --workdir=workdirs/learngene/aux
  python -m jax_transfer.export --workdir=workdirs/learngene/aux \
    --out=workdirs/learngene/learngene_export
Hardware: 2 CPU cores. Measured (experiments/learngene/README.md and experiments/RESULTS.md):
the whole experiment, teacher to 80 descendant runs, takes 490-689 s per learngene with 8 seeds.
Result (experiments/learngene/run.py --seeds=8, --upstream_seed=0/1/2): the auxiliary model
reaches 0.956 / 0.960 / 0.903 test accuracy on digits 0-4 (teachers 0.960 / 0.969 / 0.969).
"""
from jax_transfer.config import base_config


def get_config(arg: str = ""):
  args = set(a for a in arg.split(",") if a)
  unknown = args - {"runlocal"}
  if unknown:
    raise ValueError(f"unknown config args {sorted(unknown)}; allowed: runlocal")
  c = base_config()
  c.method = "learngene"
  c.seed = 0
  c.total_steps = 600
  c.log_every_steps = 50
  c.eval_every_steps = 100
  c.checkpoint_every_steps = 200

  c.input.dataset = "digits"
  c.input.classes = (0, 1, 2, 3, 4)   # The teacher's (upstream) classes.
  c.input.global_batch_size = 64
  c.eval.batch_size = 256

  c.model.variant = "mu/2"            # width 64, 4 heads, mlp 128, patch 2.
  c.model.depth = 8                   # L_aux.
  c.model.pool = "gap"                # TLEG's auxiliary model: no class token.
  c.model.num_classes = 5

  c.learngene = dict(teacher_dir="workdirs/learngene/teacher_export", alpha=1.0,
                     temperature=1.0)

  c.optimizer.name = "adamw"
  c.optimizer.lr = 1e-3
  c.optimizer.weight_decay = 1e-4
  c.schedule.warmup_steps = 50

  if "runlocal" in args:
    c.total_steps = 20
    c.log_every_steps = 5
    c.eval_every_steps = 10
    c.checkpoint_every_steps = 10
    c.schedule.warmup_steps = 5
  return c

r"""A TLEG descendant: a supervised ViT of any depth, fine-tuned on a downstream task.

Downstream: digits 5-9 (never seen by teacher or auxiliary model) with 10 labels per class,
200 steps, batch 32, no warmup (TLEG's descendant recipe has none). The ViT is the auxiliary
model's architecture (width 64, pool='gap') at the chosen depth. Initialisation:
  init.export_dir = a learngene export  -> the learngene expanded to this depth (everything
                                           but the head, which is new); see methods/base.py
  init.export_dir unset                 -> random init (the from-scratch baseline)

Arguments (comma-separated): depth=N (default 4); runlocal (20 steps).

Command (descendant of depth 6):
  python -m jax_transfer.main \
    --config=ml_collections_configs/learngene/digits_descendant.py:depth=6 \
    --config.init.export_dir=workdirs/learngene/learngene_export --workdir=workdirs/lg_d6
Hardware: 2 CPU cores. Measured (experiments/learngene/README.md and experiments/RESULTS.md):
the whole experiment, teacher to 80 descendant runs, takes 490-689 s per learngene with 8 seeds.
Result (8 seeds, depths 2-8, 200 steps): scratch reaches 0.646-0.671 on digits 5-9; the three
learngenes change that by +0.031 / -0.021 / -0.087 on average over depths, so initialising
from a learngene is not reliably better than scratch here (experiments/RESULTS.md, TLEG).
"""
from jax_transfer.config import base_config


def get_config(arg: str = ""):
  args = [a for a in arg.split(",") if a]
  depth = 4
  for a in args:
    if a.startswith("depth="):
      depth = int(a.split("=", 1)[1])
    elif a != "runlocal":
      raise ValueError(f"unknown config arg {a!r}; allowed: depth=N, runlocal")
  c = base_config()
  c.method = "supervised"
  c.seed = 0
  c.total_steps = 200
  c.log_every_steps = 25
  c.eval_every_steps = 25
  c.checkpoint_every_steps = 200

  c.input.dataset = "digits"
  c.input.classes = (5, 6, 7, 8, 9)
  c.input.examples_per_class = 10
  c.input.global_batch_size = 32
  c.eval.batch_size = 256

  c.model.variant = "mu/2"
  c.model.depth = depth
  c.model.pool = "gap"
  c.model.num_classes = 5

  c.optimizer.name = "adamw"
  c.optimizer.lr = 5e-4
  c.optimizer.weight_decay = 1e-4
  c.schedule.warmup_steps = 0

  c.init.skip_regex = "^head/"        # The downstream head is new.

  if "runlocal" in args:
    c.total_steps = 20
    c.log_every_steps = 5
    c.eval_every_steps = 10
    c.checkpoint_every_steps = 10
  return c

r"""Supervised ViT on the embedded digits data: the platform's default experiment.

Arguments (comma-separated, e.g. `:transfer,runlocal`):
  (none)     pretrain a ViT-mu/2 on digits 0-4 (all training labels).
  transfer   fine-tune on digits 5-9 with 10 labels per class; set
             --config.init.export_dir=DIR to start from a pretrained export, or leave it
             unset for the from-scratch baseline at the same budget.
  probe      as transfer, but train only the head (linear probe of the pretrained features).
  runlocal   shrink to a few steps (smoke runs, tests).

Command:
  python -m jax_transfer.main \
    --config=ml_collections_configs/supervised/digits_vit.py --workdir=/tmp/digits_pre
Hardware: 2 CPU cores (AMD EPYC), jax 0.10.2 CPU. Measured through
experiments/supervised/transfer_digits.py at the final commit (87 s for all 16 runs):
  (none)    600 steps: digits 0-4 test accuracy 0.960.
  transfer  200 steps on 5-9, 10 labels/class, 5 seeds: 0.681 ± 0.031 from scratch,
            0.721 ± 0.024 from the 0-4 export (paired gain +0.039, 4/5 seeds).
  probe     0.570 ± 0.015 (head only on the frozen 0-4 features).
Tables: experiments/RESULTS.md.
"""
from jax_transfer.config import base_config


def get_config(arg: str = ""):
  args = set(a for a in arg.split(",") if a)
  c = base_config()
  c.method = "supervised"
  c.seed = 0
  c.total_steps = 600
  c.log_every_steps = 50
  c.eval_every_steps = 100
  c.checkpoint_every_steps = 200

  c.input.dataset = "digits"
  c.input.global_batch_size = 64
  c.input.classes = (0, 1, 2, 3, 4)
  c.eval.batch_size = 256

  c.model.variant = "mu/2"   # width 64, depth 4, 4 heads; 8x8 image -> 16 patches + cls.
  c.model.num_classes = 5
  c.model.pool = "cls"

  c.optimizer.name = "adamw"
  c.optimizer.lr = 1e-3
  c.optimizer.weight_decay = 1e-4
  c.schedule.warmup_steps = 50

  if "transfer" in args or "probe" in args:
    c.input.classes = (5, 6, 7, 8, 9)
    c.input.examples_per_class = 10
    c.input.global_batch_size = 32
    c.total_steps = 200
    c.eval_every_steps = 25
    c.checkpoint_every_steps = 200
    c.schedule.warmup_steps = 20
    c.optimizer.lr = 5e-4
  if "probe" in args:
    c.optimizer.trainable_regex = "^head/"
    c.optimizer.lr = 1e-2
  if "runlocal" in args:
    c.total_steps = 20
    c.log_every_steps = 5
    c.eval_every_steps = 10
    c.checkpoint_every_steps = 10
    c.schedule.warmup_steps = 5
  return c

r"""DANN (methods/dann.py; Ganin et al. 2016) from the embedded digits (source, labelled) to
rotated digits (target, unlabelled), with tllib's recipe shrunk to 8x8 images: a BatchNorm
ResNet-18 (CIFAR stem, models/resnet.py) whose BN statistics are over both domains, SGD
momentum 0.9, lr 0.01, weight decay 1e-3 (tllib's dann.py), trade_off 1, the warm-start GRL
coefficient of Ganin's schedule (alpha 10 over total_steps), a 1024-wide discriminator.
Evaluated on the source's test split ('eval/') and the target's ('eval_digits_rotated/'):
the target labels are read only there.

Arguments (comma-separated, e.g. `:tiny,runlocal`):
  (none)     digits 0-4 -> digits_rotated 0-4 (closed set: input.classes applies to both),
             1000 steps of 32 + 32 images.
  tiny       resnet_tiny (2 stages of one basic block, width 8), discriminator 32 wide: tests.
  vit        a ViT-mu/2 (no BatchNorm) instead of the ResNet, AdamW lr 1e-3.
  runlocal   shrink to 20 steps (smoke runs, tests).
Other targets: --config.dann.target_dataset=digits_noisy (or digits_inverted) together with
--config.eval.datasets="('digits_noisy',)".

Command:
  python -m jax_transfer.main --config=ml_collections_configs/shift/digits_dann.py \
    --workdir=/tmp/dann
Measured by experiments/shift/run.py (`tiny` at width 16, discriminator 256, 800 steps, each
target, 3 seeds; 2 CPU cores, Intel Xeon, 360 s for all 12 runs with the source-only ones):
digits 0-4 -> target test accuracy, DANN vs source-only, mean over seeds:
  digits_rotated 0.888 vs 0.673, digits_inverted 0.416 vs 0.299, digits_noisy 0.757 vs 0.664.
Tables: experiments/RESULTS.md, "Transfer under covariate shift". tests/test_dann.py runs
`tiny,runlocal` and `vit,runlocal`.
"""
import ml_collections

from jax_transfer.config import base_config
from jax_transfer.methods import dann

TARGET = "digits_rotated"


def get_config(arg: str = ""):
  args = set(a for a in arg.split(",") if a)
  unknown = args - {"tiny", "vit", "runlocal"}
  if unknown:
    raise ValueError(f"unknown config args {sorted(unknown)}; allowed: tiny, vit, runlocal")
  c = base_config()
  c.method = "dann"
  c.seed = 0
  c.total_steps = 1000
  c.log_every_steps = 50
  c.eval_every_steps = 200
  c.checkpoint_every_steps = 500

  c.input.dataset = "digits"
  c.input.classes = (0, 1, 2, 3, 4)
  c.input.global_batch_size = 32      # source; the target batch is as large (tllib: 32).
  c.eval.batch_size = 256
  c.eval.datasets = (TARGET,)
  c.dann = dann.section(target_dataset=TARGET, trade_off=1.0,
                        hidden=32 if "tiny" in args else 1024)

  if "vit" in args:
    c.model_name = "vit"
    c.model.variant = "mu/2"
    c.model.num_classes = 5
    c.optimizer.name = "adamw"
    c.optimizer.lr = 1e-3
    c.optimizer.weight_decay = 1e-4
  else:
    c.model_name = "resnet_tiny" if "tiny" in args else "resnet18"
    c.model = ml_collections.ConfigDict(dict(num_classes=5, stem="cifar", bn_momentum=0.9,
                                             dtype="float32"))
    c.optimizer.name = "sgd"
    c.optimizer.lr = 0.01
    c.optimizer.momentum = 0.9
    c.optimizer.weight_decay = 1e-3
  c.schedule.warmup_steps = 50

  if "runlocal" in args:
    c.total_steps = 20
    c.log_every_steps = 5
    c.eval_every_steps = 10
    c.checkpoint_every_steps = 10
    c.schedule.warmup_steps = 5
  return c

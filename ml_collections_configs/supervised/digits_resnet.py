r"""Supervised ResNet-18 with BatchNorm on the embedded digits data (the domain-adaptation
literature's backbone; models/resnet.py, CIFAR stem for the 8x8 images: conv3x3/1, no pool).
The BatchNorm running statistics are the method state (methods/supervised.py): checkpointed,
resumed, exported (batch_stats.safetensors) and cross-replica over the data axes.

Arguments (comma-separated, e.g. `:transfer,runlocal`):
  (none)     pretrain on digits 0-4 (all training labels).
  transfer   fine-tune on digits 5-9 with 10 labels per class; set
             --config.init.export_dir=DIR to start from a pretrained export (its params and
             running statistics; the head is skipped), or leave it unset for the baseline.
  tiny       resnet_tiny (2 stages of one basic block, width 8) instead of ResNet-18: tests.
  runlocal   shrink to a few steps (smoke runs, tests).

Command:
  python -m jax_transfer.main \
    --config=ml_collections_configs/supervised/digits_resnet.py --workdir=/tmp/digits_resnet
Not measured yet (accuracy or speed); tests/test_resnet_bn.py runs `tiny,runlocal`.
"""
import ml_collections

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

  c.model_name = "resnet_tiny" if "tiny" in args else "resnet18"
  # bn_momentum: flax's convention, 0.9 == torch's BatchNorm momentum=0.1.
  c.model = ml_collections.ConfigDict(dict(num_classes=5, stem="cifar", bn_momentum=0.9,
                                           dtype="float32"))

  c.optimizer.name = "sgd"
  c.optimizer.lr = 0.05
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 5e-4  # not on BN scale / bias (wd_exclude_regex)
  c.schedule.warmup_steps = 50

  if "transfer" in args:
    c.input.classes = (5, 6, 7, 8, 9)
    c.input.examples_per_class = 10
    c.input.global_batch_size = 32
    c.total_steps = 200
    c.eval_every_steps = 25
    c.checkpoint_every_steps = 200
    c.schedule.warmup_steps = 20
    c.optimizer.lr = 0.01
  if "runlocal" in args:
    c.total_steps = 20
    c.log_every_steps = 5
    c.eval_every_steps = 10
    c.checkpoint_every_steps = 10
    c.schedule.warmup_steps = 5
  return c

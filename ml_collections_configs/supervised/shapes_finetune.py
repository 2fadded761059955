r"""Fine-tune an exported or imported ViT classifier on the embedded shapes_jpeg data (JPEGs of
96-500 px, 6 shape classes, imagenet2012's record layout): the transfer recipe of a published
checkpoint (AugReg / big_vision / timm ViT imported by jax_transfer.tools.import_checkpoint).

Arguments (comma-separated): `init=DIR`, the export to start from (its model, image size and
normalisation, a new 6-class head: config.init_from_export); without it a ViT-mu/4 at 32 px
trains from scratch at the same budget (the baseline arm). `probe` trains the head only,
`runlocal` shrinks to a smoke-sized run.

Command:
  python -m jax_transfer.tools.import_checkpoint --checkpoint=ViT-B_16.npz --out=/tmp/augreg
  python -m jax_transfer.main \
    --config=ml_collections_configs/supervised/shapes_finetune.py:init=/tmp/augreg \
    --workdir=/tmp/shapes_ft
Tested end to end on randomly initialised imported checkpoints (tests/test_finetune_imported.py).
Measured, the from-scratch baseline, on 2 CPU cores (Intel Xeon, shared machine):
  python -m jax_transfer.main \
    --config=ml_collections_configs/supervised/shapes_finetune.py --workdir=/tmp/shapes_scratch
500 steps of batch 64 in 85 s wall, validation accuracy 0.330 (chance
0.167; 0.222 / 0.284 / 0.290 / 0.336 / 0.330 at steps 100-500). No published checkpoint could
be fine-tuned here (nothing downloads), so the fine-tuned arm is unmeasured.
"""
from jax_transfer.config import base_config, init_from_export


def get_config(arg: str = ""):
  args = [a for a in arg.split(",") if a]
  init = next((a[len("init="):] for a in args if a.startswith("init=")), None)
  c = base_config()
  c.method = "supervised"
  c.model_name = "vit"
  c.total_steps = 500
  c.log_every_steps = 50
  c.eval_every_steps = 100
  c.checkpoint_every_steps = 250
  c.input.dataset = "shapes_jpeg"
  c.eval.split = "validation"
  c.input.global_batch_size = 64
  c.eval.batch_size = 128
  c.model.num_classes = 6
  c.optimizer.name = "sgd"
  c.optimizer.lr = 0.01
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 0.0
  c.optimizer.grad_clip_norm = 1.0
  c.schedule.warmup_steps = 50
  if init:
    init_from_export(c, init, keep_head=False)
  else:  # From scratch: the baseline a fine-tuned import is compared with.
    c.model.variant = "mu/4"
    c.input.image_size = 32
  if "probe" in args:
    c.optimizer.trainable_regex = "^head/"
  if "runlocal" in args:
    c.total_steps = 10
    c.log_every_steps = 5
    c.eval_every_steps = 10
    c.checkpoint_every_steps = 10
    c.schedule.warmup_steps = 2
    c.input.global_batch_size = 16
    c.eval.batch_size = 32
  return c

r"""DANN pod config (methods/dann.py; Ganin et al. 2016): CIFAR-10 (labelled source) ->
CIFAR-10-C gaussian_noise severity 5 (unlabelled target, TFDS
'cifar10_corrupted/gaussian_noise_5'), a BatchNorm ResNet-50 with the CIFAR stem whose BN
statistics are over both domains and cross-replica over the data axis.

CIFAR-10-C has only a 'test' split, so the target stream reads it unlabelled
(dann.target_split='test') and the same images are evaluated with their labels
('eval_cifar10_corrupted/gaussian_noise_5/'): the transductive protocol of the
unsupervised-domain-adaptation benchmarks (tllib trains on the unlabelled target set it
reports). eval.transfer_score logs the label-free Transfer Score beside it.
Recipe: tllib's dann.py (SGD momentum 0.9, lr 0.01, weight decay 1e-3, trade_off 1,
discriminator 1024 wide, the warm-start GRL coefficient of Ganin's schedule over total_steps)
at batch 256 source + 256 target, 20k steps (~100 CIFAR-10 epochs), 500 warmup steps and
cosine decay, flip_lr on the source; compute in bfloat16.

Arguments (comma-separated):
  (none)    TPU v4-32 (16 devices) or any device count dividing 256: mesh data=-1 (pure data
            parallel, 16 + 16 images per device; the ResNet-50 train state is ~0.2 GB).
  runlocal  shrink to this CPU: embedded digits 0-4 -> digits_noisy, resnet_tiny, batch 32,
            20 steps, float32 (the same code path; a smoke run).
Command (TFDS cifar10 and cifar10_corrupted/gaussian_noise_5 prepared in $TFDS_DATA_DIR):
  python -m jax_transfer.main --config=ml_collections_configs/shift/cifar10c_dann.py \
    --config.input.data_dir=$TFDS_DATA_DIR --workdir=$WORKDIR
Hardware, wall time, result -- NOT MEASURED HERE (no accelerator was available).
"""
import ml_collections

from jax_transfer.config import base_config
from jax_transfer.methods import dann

TARGET = "cifar10_corrupted/gaussian_noise_5"


def get_config(arg: str = ""):
  args = set(a for a in arg.split(",") if a)
  unknown = args - {"runlocal"}
  if unknown:
    raise ValueError(f"unknown config args {sorted(unknown)}; allowed: runlocal")
  c = base_config()
  c.method = "dann"
  c.seed = 0
  c.total_steps = 20_000
  c.log_every_steps = 100
  c.eval_every_steps = 2000
  c.checkpoint_every_steps = 2000
  c.keep_checkpoints = 2
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1

  c.input.dataset = "cifar10"
  c.input.pp = "decode|flip_lr|value_range(-1, 1)"
  c.input.pp_eval = "decode|value_range(-1, 1)"
  c.input.global_batch_size = 256      # source; the target batch is as large.
  c.input.num_workers = 16
  c.eval.split = "test"
  c.eval.batch_size = 1024
  c.eval.datasets = (TARGET,)
  c.eval.transfer_score = True
  c.dann = dann.section(target_dataset=TARGET, target_split="test", trade_off=1.0,
                        hidden=1024)

  c.model_name = "resnet50"
  c.model = ml_collections.ConfigDict(dict(num_classes=10, stem="cifar", bn_momentum=0.9,
                                           dtype="bfloat16"))
  c.optimizer.name = "sgd"
  c.optimizer.lr = 0.01
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 1e-3
  c.schedule.name = "cosine"
  c.schedule.warmup_steps = 500

  if "runlocal" in args:
    c.input.dataset, c.input.classes = "digits", (0, 1, 2, 3, 4)
    c.input.pp = c.input.pp_eval = ""
    c.input.global_batch_size, c.input.num_workers = 32, 0
    c.eval.batch_size = 256
    c.eval.datasets = ("digits_noisy",)
    c.dann = dann.section(target_dataset="digits_noisy", trade_off=1.0, hidden=32)
    c.model_name = "resnet_tiny"
    c.model.num_classes, c.model.dtype = 5, "float32"
    c.total_steps, c.log_every_steps, c.eval_every_steps = 20, 5, 10
    c.checkpoint_every_steps, c.schedule.warmup_steps = 10, 5
  return c

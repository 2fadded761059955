r"""Supervised ResNet-18 with BatchNorm on the embedded digits data (the domain-adaptation
literature's backbone; models/resnet.py, CIFAR stem for the 8x8 images: conv3x3/1, no pool).
The BatchNorm running statistics are the method state (methods/supervised.py): checkpointed,
resumed, exported (batch_stats.safetensors) and cross-replica over the data axes.

Arguments (comma-separated, e.g. `:transfer,runlocal`):
  (none)     pretrain on digits 0-4 (all training labels).
  transfer   fine-tune on digits 5-9 with 10 labels per class; set
             --config.init.export_dir=DIR to start from a pretrained export (its params and
             running statistics; the head is skipped), or leave it unset for the baseline.
  probe      as transfer, but train only the head on the frozen backbone: model.frozen_bn
             keeps every BN on the export's running statistics (models/resnet.py), so the
             head trains on the features the evaluation sees.
  tiny       resnet_tiny (2 stages of one basic block, width 8) instead of ResNet-18: tests.
  runlocal   shrink to a few steps (smoke runs, tests).

Command:
  python -m jax_transfer.main \
    --config=ml_collections_configs/supervised/digits_resnet.py --workdir=/tmp/digits_resnet
Measured by `python experiments/supervised/transfer_digits.py --config=digits_resnet
--out=workdirs/transfer_digits_resnet` (RESULTS.md, "The same transfer with a BatchNorm
ResNet-18"; 1379 s for the pretraining and all 20 transfer runs on a 2-core AMD EPYC CPU, jax
CPU): 0-4 test accuracy 1.000; on 5-9 with 10 labels per
class, 5 seeds: 0.863 ± 0.017 from scratch, 0.890 ± 0.008 fine-tuned, probe 0.829 ± 0.024
(0.792 ± 0.043 without frozen_bn). tests/test_resnet_bn.py runs `tiny,runlocal`.
"""
import ml_collections

from ml_collections_configs.supervised import digits_vit


def get_config(arg: str = ""):
  """digits_vit.py's data, schedule, `transfer` and `runlocal` settings with a BatchNorm
  ResNet and SGD in place of the ViT and AdamW."""
  args = set(a for a in arg.split(",") if a)
  c = digits_vit.get_config(",".join(sorted(args & {"transfer", "probe", "runlocal"})))

  c.model_name = "resnet_tiny" if "tiny" in args else "resnet18"
  # bn_momentum: flax's convention, 0.9 == torch's BatchNorm momentum=0.1.
  c.model = ml_collections.ConfigDict(dict(num_classes=5, stem="cifar", bn_momentum=0.9,
                                           dtype="float32", frozen_bn="probe" in args))

  c.optimizer.name = "sgd"
  c.optimizer.lr = 0.01 if "transfer" in args else 0.05  # probe: 0.05 on the head only
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 5e-4  # not on BN scale / bias (wd_exclude_regex)
  return c

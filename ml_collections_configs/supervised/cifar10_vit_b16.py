r"""Transfer: fine-tune a pretrained ViT-B/16 export on CIFAR-10 at 224px.

Recipe: big_vision's transfer.py for CIFAR-10 (the ViT/AugReg fine-tuning protocol): SGD with
momentum 0.9, no weight decay, batch 512, 10k steps, 500 linear warmup steps then cosine decay,
gradients clipped to global norm 1.0, every parameter loaded from the export except the head,
which starts at zero (ViT's head_zero_init). big_vision sweeps lr in {0.001, 0.003, 0.01, 0.03}
and fine-tunes at 384px; here lr 0.03 at 224px, so the position embeddings of a 224px export
(14x14 patches + cls = 197) load unchanged. Input as big_vision's transfer configs
(jax_transfer/data/pp/recipes.py): decode|inception_crop(224)|flip_lr for training,
decode|resize(224) for evaluation. Compute in bfloat16.

Needs an export of a ViT-B/16 trained at 224 with pool='cls' and the same param layout, e.g.
from ml_collections_configs/supervised/imagenet_vit_b16.py:
  python -m jax_transfer.export --workdir=$I1K_WORKDIR --out=$EXPORT
Without --config.init.export_dir the run trains from scratch (a baseline, not a transfer).

Arguments (comma-separated):
  (none)    one host with 8 accelerators (8 GPUs, or a TPU slice with 8 devices): mesh
            data=-1 (pure data parallel, 64 images per device; the B/16 train state with SGD
            momentum is ~0.7 GB, no reason to shard it). Any device count dividing 512 works.
  runlocal  shrink to this CPU: the embedded 'digits' (8x8x1), classes 5-9, ViT-mu/2,
            batch 32, 20 steps, float32, mesh data=-1. Its upstream is
            imagenet_vit_b16.py:runlocal (digits 0-4, same architecture), so the two runlocal
            configs make a complete pretrain -> export -> transfer chain on a laptop.

Command (8-accelerator host; TFDS cifar10 prepared as array_record in $TFDS_DATA_DIR):
  python -m jax_transfer.main \
    --config=ml_collections_configs/supervised/cifar10_vit_b16.py \
    --config.init.export_dir=$EXPORT --config.input.data_dir=$TFDS_DATA_DIR \
    --workdir=$WORKDIR

Hardware, wall time, result -- NOT MEASURED HERE (no accelerator was available):
  The full fine-tune has not been run from this codebase. For orientation only: the ViT paper
  (Table 5) reports 98.13% CIFAR-10 test accuracy for an ImageNet-1k-pretrained B/16
  fine-tuned at 384px; expect somewhat less at 224px, and far
  less from a weaker upstream. 10k steps x 512 images x ~53 GFLOPs/image (fwd+bwd at 224)
  ~ 2.7e17 FLOPs: well under an hour on 8 modern accelerators if the input keeps up.
  Measured, runlocal only (2 CPU cores, AMD EPYC, jax 0.10.2 on CPU, shared machine):
    python -m jax_transfer.main \
      --config=ml_collections_configs/supervised/imagenet_vit_b16.py:runlocal \
      --workdir=/tmp/i1k_runlocal
    python -m jax_transfer.export --workdir=/tmp/i1k_runlocal --out=/tmp/i1k_export
    python -m jax_transfer.main \
      --config=ml_collections_configs/supervised/cifar10_vit_b16.py:runlocal \
      --config.init.export_dir=/tmp/i1k_export --workdir=/tmp/c10_transfer
  7.4 s wall (loads 54 of 56 params: all but head/kernel, head/bias), digits 5-9 test
  accuracy 0.47 (loss 1.29) after 20 steps; the same command without init.export_dir
  (from scratch, 7.0 s) reaches 0.46 (loss 1.38). 20 steps is a smoke test of the chain,
  not evidence of transfer; experiments/ holds the measured transfer comparisons.
"""
from jax_transfer.config import base_config
from jax_transfer.data.pp import recipes


def get_config(arg: str = ""):
  args = set(a for a in arg.split(",") if a)
  unknown = args - {"runlocal"}
  if unknown:
    raise ValueError(f"unknown config args {sorted(unknown)}; allowed: runlocal")
  c = base_config()
  c.method = "supervised"
  c.seed = 0
  c.total_steps = 10_000
  c.log_every_steps = 50
  c.eval_every_steps = 1000
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 2

  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1

  # ---- Input (big_vision: train[:98%] to train, train[98%:] as minival, test reported).
  c.input.dataset = "cifar10"
  c.input.train_split = "train[:98%]"
  c.input.image_size = 224
  c.input.pp = recipes.transfer_train(224)   # big_vision transfer: inception crop + flip.
  c.input.pp_eval = recipes.transfer_eval(224)
  c.input.global_batch_size = 512
  c.input.num_workers = 16
  c.input.prefetch = 4
  c.eval.split = "test"
  c.eval.batch_size = 1024

  # ---- Model: must match the export's architecture (variant, pool, image size).
  c.model.variant = "b/16"
  c.model.num_classes = 10
  c.model.pool = "cls"
  c.model.dtype = "bfloat16"
  c.model.remat = False           # 64 images per device at 224 fit without it.

  # ---- Transfer initialisation: everything but the head (fresh, zero-initialised).
  c.init.export_dir = None        # Placeholder: --config.init.export_dir=DIR.
  c.init.load_regex = ".*"
  c.init.skip_regex = "^head/"

  # ---- Optimiser (big_vision transfer.py: momentum_hp, wd None, clip 1.0).
  c.optimizer.name = "sgd"
  c.optimizer.lr = 0.03
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 0.0
  c.optimizer.grad_clip_norm = 1.0
  c.schedule.name = "cosine"
  c.schedule.warmup_steps = 500
  c.schedule.end_lr_ratio = 0.0

  if "runlocal" in args:
    c.total_steps = 20
    c.log_every_steps = 5
    c.eval_every_steps = 10
    c.checkpoint_every_steps = 10
    c.input.dataset = "digits"    # Fine-tune on the digits the upstream never saw.
    c.input.classes = (5, 6, 7, 8, 9)
    c.input.train_split = "train"
    c.input.image_size = None
    c.input.pp = c.input.pp_eval = ""  # digits are 8x8 tensors: the default recipe.
    c.input.global_batch_size = 32
    c.input.num_workers = 0
    c.input.prefetch = 2
    c.eval.split = "test"
    c.eval.batch_size = 256
    c.model.variant = "mu/2"      # Same architecture as imagenet_vit_b16.py:runlocal.
    c.model.num_classes = 5
    c.model.dtype = "float32"
    c.schedule.warmup_steps = 5
  return c

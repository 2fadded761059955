r"""TLEG Aux-S on ImageNet-1k: a learngene distilled from a ViT-B/16 teacher export (pod).

The auxiliary model is ViT-S/16 (width 384, 6 heads, mlp 1536) of depth L_aux = 12 whose
block i is θ_A + (i/12)·θ_B, pool='gap' (no class token), drop-path 0, trained by pure soft
distillation (α = 1, τ = 1) for 150 epochs with DeiT's defaults (AdamW lr 5e-4·B/512 = 1e-3
at batch 1024, weight decay 0.05, 5 warmup epochs, cosine) -- TLEG's Aux-S recipe
(REFERENCES.md). The paper's teacher is LeViT-384; here any supervised export works, e.g. the
ViT-B/16 of supervised/imagenet_vit_b16.py (exported with `python -m jax_transfer.export`).
Input: Inception crop + flip for training, resize_small(256)|central_crop(224) for evaluation
(jax_transfer/data/pp/recipes.py). DeiT's RandAugment, mixup / cutmix and random erasing are
not applied (the method's loss is distillation, whose soft targets mixup would need to mix
too), so expect lower numbers than the paper's.

Arguments (comma-separated):
  (none)    TPU v4-32, 16 devices: mesh data=16 (pure data parallel, 64 images per chip).
            The train state (learngene ~2x one S block + shared, AdamW) plus the frozen B/16
            teacher (86.6M params, f32) is < 0.5 GB per chip, so nothing needs FSDP.
  gpu8      one 8-GPU host: mesh data=8 (128 images per GPU).
  fsdp      shard params, optimiser state and the teacher over all devices instead.
  runlocal  this CPU: digits 0-4, auxiliary ViT mu/2 of depth 4, 20 steps; the teacher is the
            export of `supervised/imagenet_vit_b16.py:runlocal` (also digits 0-4, mu/2).

Commands:
  # Teacher (see supervised/imagenet_vit_b16.py), then its export:
  python -m jax_transfer.export --workdir=/mnt/gcs/$BUCKET/vit_b16_i1k \
    --out=/mnt/gcs/$BUCKET/exports/vit_b16_i1k
  # Auxiliary model (every host of the v4-32 runs it):
  python -m jax_transfer.main --config=ml_collections_configs/learngene/imagenet_aux_s.py \
    --config.learngene.teacher_dir=/mnt/gcs/$BUCKET/exports/vit_b16_i1k \
    --config.input.data_dir=/mnt/gcs/$BUCKET/tfds --workdir=/mnt/gcs/$BUCKET/tleg_aux_s
  # The learngene = its export; descendants set --config.init.export_dir to it.
  python -m jax_transfer.export --workdir=/mnt/gcs/$BUCKET/tleg_aux_s --out=/mnt/gcs/$BUCKET/exports/tleg_aux_s
  Run here (2 CPU cores):
  python -m jax_transfer.main --config=ml_collections_configs/supervised/imagenet_vit_b16.py:runlocal \
    --workdir=/tmp/i1k_runlocal && \
  python -m jax_transfer.export --workdir=/tmp/i1k_runlocal --out=/tmp/i1k_runlocal_export && \
  python -m jax_transfer.main --config=ml_collections_configs/learngene/imagenet_aux_s.py:runlocal \
    --config.learngene.teacher_dir=/tmp/i1k_runlocal_export --workdir=/tmp/aux_s_runlocal

Hardware, wall time, result -- NOT MEASURED HERE (no pod or GPU host was available); the
paper's Aux-S is trained for 150 epochs. runlocal: see experiments/learngene/README.md.
"""
from jax_transfer.config import base_config
from jax_transfer.data.pp import recipes

IMAGENET_TRAIN_EXAMPLES = 1_281_167
GLOBAL_BATCH = 1024
EPOCHS = 150


def _steps(epochs: float) -> int:
  return round(epochs * IMAGENET_TRAIN_EXAMPLES / GLOBAL_BATCH)


def get_config(arg: str = ""):
  args = set(a for a in arg.split(",") if a)
  unknown = args - {"gpu8", "fsdp", "runlocal"}
  if unknown:
    raise ValueError(f"unknown config args {sorted(unknown)}; allowed: gpu8, fsdp, runlocal")
  c = base_config()
  c.method = "learngene"
  c.seed = 0
  c.total_steps = _steps(EPOCHS)
  c.log_every_steps = 50
  c.eval_every_steps = 2500
  c.checkpoint_every_steps = 1000

  # ---- Mesh: explicit sizes so the wrong slice fails validation.
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 16, 1, 1
  if "gpu8" in args:
    c.mesh.data = 8
  if "fsdp" in args:
    c.mesh.data, c.mesh.fsdp = 1, 8 if "gpu8" in args else 16

  c.input.dataset = "imagenet2012"
  c.input.image_size = 224
  c.input.pp = recipes.imagenet_train(224, randaug=False)  # Inception crop + flip.
  c.input.pp_eval = recipes.imagenet_eval(224)
  c.input.global_batch_size = GLOBAL_BATCH
  c.input.num_workers = 32
  c.input.prefetch = 4
  c.eval.split = "validation"
  c.eval.batch_size = 1024

  c.model.variant = "s/16"
  c.model.depth = 12            # L_aux.
  c.model.pool = "gap"          # No class token in TLEG's auxiliary model.
  c.model.num_classes = 1000
  c.model.dtype = "bfloat16"
  c.model.remat = True

  c.learngene = dict(teacher_dir="exports/vit_b16_i1k", alpha=1.0, temperature=1.0)

  # DeiT defaults (TLEG trains with them): lr 5e-4 * batch / 512, wd 0.05, 5 warmup epochs.
  c.optimizer.name = "adamw"
  c.optimizer.lr = 5e-4 * GLOBAL_BATCH / 512
  c.optimizer.weight_decay = 0.05
  c.optimizer.grad_clip_norm = 0.0
  c.schedule.name = "cosine"
  c.schedule.warmup_steps = _steps(5)

  if "runlocal" in args:
    c.total_steps = 20
    c.log_every_steps = 5
    c.eval_every_steps = 10
    c.checkpoint_every_steps = 10
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1
    c.input.dataset = "digits"
    c.input.classes = (0, 1, 2, 3, 4)
    c.input.image_size = None
    c.input.pp = c.input.pp_eval = ""  # digits are 8x8 tensors: the default recipe.
    c.input.global_batch_size = 32
    c.input.num_workers = 0
    c.input.prefetch = 2
    c.eval.split = "test"
    c.eval.batch_size = 256
    c.model.variant = "mu/2"
    c.model.depth = 4
    c.model.num_classes = 5
    c.model.dtype = "float32"
    c.model.remat = False
    c.learngene.teacher_dir = "/tmp/i1k_runlocal_export"
    c.optimizer.lr = 1e-3
    c.optimizer.weight_decay = 1e-4
    c.schedule.warmup_steps = 5
  return c

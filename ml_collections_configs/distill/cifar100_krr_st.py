r"""KRR-ST pod config: distil CIFAR-100 (50k unlabelled train images) into 1000 synthetic
images and target representations (Lee et al. 2024, sec. 4 / REFERENCES.md).

Arguments (comma-separated):
  (none)    distill: n=1000, pool of 10 learners (SGD lr 0.1, momentum 0.9, wd 1e-3, reset
            every 1000 inner steps, offsets spread), real batch 1024 sharded over the data axes,
            AdamW lr 1e-4 with linear decay, 160k outer steps, λ = 1e-6·tr(K_ss).
  ssl       the target g: Barlow Twins ViT-s/4 on unlabelled CIFAR-100 (the paper uses a
            ResNet-18, which the platform does not have).
  runlocal  shrink to the embedded shapes_captions images (32x32x3, CIFAR's shape), n=20,
            a 10-step run on this CPU.

Command (TPU v4-32 / 8-GPU host: data=-1 takes every device; the pool and X_s are replicated,
'synthetic' and 'pool' are logical names a larger run can map to fsdp):
  python -m jax_transfer.main --config=ml_collections_configs/distill/cifar100_krr_st.py \
    --workdir=/mnt/gcs/BUCKET/krr_st_c100 --config.distill.target_export=/mnt/gcs/BUCKET/g_export
Hardware: written for a v4-32 slice or one 8-GPU host; not run at this scale (no accelerator
here). Wall time / result: not measured; the runlocal variant runs on 2 CPU cores in ~1 min.
Needs cifar100 prepared: tfds build cifar100 --file_format=array_record.
"""
import ml_collections

from jax_transfer.config import base_config
from jax_transfer.methods.distill import default_distill_config


def get_config(arg: str = ""):
  args = set(a for a in arg.split(",") if a)
  c = base_config()
  c.distill = default_distill_config()
  c.method = "distill"
  c.seed = 0
  c.input.dataset = "cifar100"
  c.input.global_batch_size = 1024
  c.eval.batch_size = 1024
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1
  c.sharding_rules = list(c.sharding_rules) + [("synthetic", None), ("pool", None),
                                               ("features", None), ("conv_in", None)]
  c.total_steps = 160_000
  c.log_every_steps = 100
  c.eval_every_steps = 10_000
  c.checkpoint_every_steps = 2_000
  c.model_name = "convnet"  # The learner / downstream backbone.
  c.model = ml_collections.ConfigDict(dict(num_classes=0, width=128, depth=3, norm="instance",
                                           pool="flatten"))
  c.distill.target_export = "/mnt/gcs/BUCKET/krr_st_c100_g_export"
  c.distill.num_synthetic = 1000
  c.distill.pool_size = 10
  c.distill.pool_reset_steps = 1000
  c.distill.inner_lr, c.distill.inner_momentum, c.distill.inner_weight_decay = 0.1, 0.9, 1e-3
  c.distill.reg_ratio = 1e-6
  c.optimizer.name, c.optimizer.lr, c.optimizer.weight_decay = "adamw", 1e-4, 0.0
  c.optimizer.grad_clip_norm = 0.0
  c.schedule.name, c.schedule.warmup_steps = "linear", 0

  if "ssl" in args:
    c.method = "ssl"
    c.total_steps = 200_000
    c.input.global_batch_size = 512
    c.model_name = "vit"
    c.model = base_config().model
    c.model.variant, c.model.num_classes, c.model.pool = "s/4", 0, "gap"
    c.distill.ssl.projector_dims = (2048, 2048)
    c.distill.ssl.flip, c.distill.ssl.grayscale_prob = True, 0.2
    c.optimizer.lr, c.optimizer.weight_decay = 1e-3, 1e-4
    c.schedule.name, c.schedule.warmup_steps = "cosine", 5_000

  if "runlocal" in args:
    c.input.dataset = "shapes_captions"
    c.input.label_key = "shape"
    c.total_steps, c.log_every_steps, c.eval_every_steps = 10, 5, 10
    c.checkpoint_every_steps = 10
    c.input.global_batch_size = 64
    c.eval.batch_size = 256
    c.distill.num_synthetic, c.distill.pool_size, c.distill.pool_reset_steps = 20, 4, 5
    c.distill.target_export = "workdirs/distill/shapes_g_export"
    c.model.width = 32
    if "ssl" in args:
      c.model.variant = "mu/4"
      c.distill.ssl.projector_dims = (128, 128)
  return c

r"""ViT-B/16 trained from scratch on ImageNet-1k (ILSVRC-2012) at 224px: a pod config.

Recipe: big_vision's vit_i1k.py ("medium2", Steiner et al. 2021's AugReg): AdamW (b1 0.9,
b2 0.999) with lr 1e-3 and weight decay 0.1 in optax's convention (optax multiplies it by the
lr: 0.1 x 1e-3 = big_vision's decoupled 1e-4), global batch 4096, 10k linear warmup steps then
cosine decay to 0, gradients clipped to global norm 1.0; 300 epochs (default) or 90 (`ep90`).
Input (jax_transfer/data/pp/recipes.py): decode_jpeg_and_inception_crop(224)|flip_lr|
randaug(2, 15) for training, resize_small(256)|central_crop(224) for evaluation, and mixup
with ratio ~ Beta(0.5, 0.5) on every batch. Compute in bfloat16 (params and optimiser state
stay float32), blocks rematerialised (activation memory ~ one block instead of twelve).

Arguments (comma-separated, e.g. `:gpu8,ep90`):
  (none)    TPU v4-32: 16 chips = 16 JAX devices (4 hosts x 4 chips; v4 chips are megacore,
            one device each). Mesh data=16, fsdp=1, tensor=1: pure data parallelism, 256
            images per chip. Why not FSDP: the whole B/16 train state (86.6M params + AdamW
            mu, nu, all float32) is ~1.0 GB, 3% of a v4 chip's 32 GiB HBM, so sharding it
            saves nothing that matters, while FSDP would all-gather every layer's weights
            in the forward pass and again in the rematerialised backward pass. One gradient
            all-reduce (~350 MB) per step is cheap over v4's ICI. Use `fsdp` for L/16+.
  gpu8      one host with 8 GPUs (e.g. 8x H100 80 GB): mesh data=8, 512 images per GPU
            (fits with remat + bf16: block-boundary activations ~2 GB per GPU).
  fsdp      shard params + optimiser state over all devices instead (mesh fsdp=16, or 8
            with gpu8): for larger variants or GPUs with less memory. Same global batch,
            same maths.
  ep90      90 epochs (28,151 steps) instead of 300 (93,835 steps).
  lora      LoRA fine-tuning (jax_transfer/peft.py) instead of training every weight:
            peft.method='lora' (r=8, alpha 16) on every block's attn/qkv and attn/out, the
            head trained, all else frozen (no gradient, no optimiser state). Start from a
            pretrained B/16 export, --config.init.export_dir=DIR (the head is not loaded:
            init.skip_regex='^head/'); --config.peft.frozen_dtype=bfloat16 also stores the
            frozen weights in bf16. The rest of the recipe is the from-scratch one (shorten
            it with ep90 or total_steps). Per-device memory next to full training's:
            benchmarks/RESULTS.md, "PEFT memory"
            (compiled on 8 simulated CPU devices; no LoRA run was trained on pod
            hardware: no accelerator was available). Works with every other argument.
  runlocal  shrink to something this CPU runs in seconds: the embedded 'digits' (8x8x1),
            classes 0-4, ViT-mu/2, batch 32, 20 steps, float32, no remat, mesh data=-1.

Data: prepare TFDS imagenet2012 as array_record once (needs the manual download):
  tfds build imagenet2012 --data_dir=$TFDS_DATA_DIR --file_format=array_record \
    --manual_dir=$IMAGENET_TARS

Command (every host of the v4-32 runs the same command; jax.distributed starts itself):
  gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=all --command="\
    cd jax_transfer && python -m jax_transfer.main \
      --config=ml_collections_configs/supervised/imagenet_vit_b16.py \
      --config.input.data_dir=/mnt/gcs/$BUCKET/tfds --workdir=/mnt/gcs/$BUCKET/vit_b16_i1k"
  One 8-GPU host: python -m jax_transfer.main \
      --config=ml_collections_configs/supervised/imagenet_vit_b16.py:gpu8 \
      --config.input.data_dir=$TFDS_DATA_DIR --workdir=$WORKDIR
  LoRA fine-tuning of an export on the 8-GPU host, frozen weights in bf16:
    python -m jax_transfer.main \
      --config=ml_collections_configs/supervised/imagenet_vit_b16.py:gpu8,lora,ep90 \
      --config.init.export_dir=$EXPORT_DIR --config.peft.frozen_dtype=bfloat16 \
      --config.input.data_dir=$TFDS_DATA_DIR --workdir=$WORKDIR

Hardware, wall time, result -- NOT MEASURED HERE (no pod or GPU host was available):
  The full runs (v4-32 and 8x GPU) have not been run from this codebase. For orientation
  only: AugReg reports ~79-80% ImageNet top-1 for B/16 with this medium2 recipe at 300
  epochs (the original ViT recipe without RandAugment/mixup: 77.9%), and ~3x the
  per-image FLOPs of B/16 at 224 x 384M images is ~2.7e19 FLOPs with remat, i.e. roughly
  7 h on a v4-32 at 50% MFU -- if the input pipeline keeps up: benchmarks/RESULTS.md ("JPEG
  pipeline at 224 px vs tf.data") gives images/s per host core for this recipe and the cores
  a host needs; raise input.num_workers until steps/s stops rising.
  Measured, runlocal only (2 CPU cores, AMD EPYC, jax 0.10.2 on CPU, shared machine):
    python -m jax_transfer.main \
      --config=ml_collections_configs/supervised/imagenet_vit_b16.py:runlocal \
      --workdir=/tmp/i1k_runlocal
  8.2 s wall for the whole process (data already built; ~3 s more the first time it builds
  digits), peak RSS 0.63 GB; 20 steps, digits 0-4 test accuracy 0.63 (loss 1.41) -- a smoke
  run, far from converged (the full digits_vit.py run is the converged reference).
"""
from jax_transfer.config import base_config
from jax_transfer.data.pp import recipes

IMAGENET_TRAIN_EXAMPLES = 1_281_167
GLOBAL_BATCH = 4096


def _steps(epochs: int) -> int:
  return round(epochs * IMAGENET_TRAIN_EXAMPLES / GLOBAL_BATCH)


def get_config(arg: str = ""):
  args = set(a for a in arg.split(",") if a)
  unknown = args - {"gpu8", "fsdp", "ep90", "lora", "runlocal"}
  if unknown:
    raise ValueError(f"unknown config args {sorted(unknown)}; allowed: gpu8, fsdp, ep90, "
                     "lora, runlocal")
  c = base_config()
  c.method = "supervised"
  c.seed = 0
  c.total_steps = _steps(90 if "ep90" in args else 300)
  c.log_every_steps = 50
  c.eval_every_steps = 2500      # ~10 min of training; the 50k-image eval takes ~1 min.
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3

  # ---- Mesh. v4-32 (default): 16 devices, pure data parallel; see the docstring.
  # Explicit sizes, so launching on the wrong slice fails validation instead of silently
  # changing the per-device batch.
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 16, 1, 1
  if "gpu8" in args:
    c.mesh.data = 8
  if "fsdp" in args:
    c.mesh.data, c.mesh.fsdp = 1, 8 if "gpu8" in args else 16

  # ---- Input.
  c.input.dataset = "imagenet2012"
  c.input.train_split = "train"
  c.input.image_size = 224
  c.input.pp = recipes.imagenet_train(224)   # Inception crop, flip, RandAugment(2, 15).
  c.input.pp_eval = recipes.imagenet_eval(224)  # resize_small(256)|central_crop(224).
  c.input.global_batch_size = GLOBAL_BATCH
  c.input.num_workers = 32         # Per host (benchmarks/RESULTS.md: cores needed per host).
  c.input.prefetch = 4
  c.eval.split = "validation"
  c.eval.batch_size = 1024
  # big_vision vit_i1k "medium2": mixup with ratio ~ Beta(0.5, 0.5) on every batch.
  c.mixup = dict(mixup_alpha=0.5)

  # ---- Model.
  c.model.variant = "b/16"
  c.model.num_classes = 1000
  c.model.pool = "cls"
  c.model.dtype = "bfloat16"
  c.model.remat = True

  # ---- Optimiser (ViT paper App. B.1; big_vision vit_i1k: warmup 10k, clip 1.0).
  c.optimizer.name = "adamw"
  c.optimizer.lr = 1e-3
  c.optimizer.weight_decay = 0.1    # x lr = big_vision's decoupled 1e-4.
  c.optimizer.b1, c.optimizer.b2 = 0.9, 0.999
  c.optimizer.grad_clip_norm = 1.0
  c.schedule.name = "cosine"
  c.schedule.warmup_steps = 10_000
  c.schedule.end_lr_ratio = 0.0
  if "lora" in args:  # LoRA on the attention projections; the head trains (peft defaults).
    c.peft.method = "lora"

  if "runlocal" in args:
    c.total_steps = 20
    c.log_every_steps = 5
    c.eval_every_steps = 10
    c.checkpoint_every_steps = 10
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1
    c.input.dataset = "digits"            # Embedded 8x8x1; pretrain on digits 0-4.
    c.input.classes = (0, 1, 2, 3, 4)
    c.input.train_split = "train"
    c.input.image_size = None
    c.input.pp = c.input.pp_eval = ""     # digits are 8x8 tensors: the default recipe.
    c.mixup = dict(mixup_alpha=0.0)
    c.input.global_batch_size = 32
    c.input.num_workers = 0
    c.input.prefetch = 2
    c.eval.split = "test"
    c.eval.batch_size = 256
    c.model.variant = "mu/2"               # width 64, depth 4: 4x4 patches + cls.
    c.model.num_classes = 5
    c.model.dtype = "float32"
    c.model.remat = False
    c.optimizer.lr = 1e-3
    c.optimizer.weight_decay = 1e-4
    c.schedule.warmup_steps = 5
  return c

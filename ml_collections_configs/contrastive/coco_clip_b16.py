r"""CLIP / SigLIP ViT-B/16 on a TFDS image-text dataset (coco_captions): a pod config.

Model: ViT-B/16 image tower at 224px (pre-LN, class token), 12-layer 512-wide text
Transformer (8 heads, context 77), 512-d embeddings -- open_clip's ViT-B-16 shapes, with
open_clip parity options (ln_pre, no patch bias, LN eps 1e-5, erf GELU) so a converted
open_clip checkpoint (jax_transfer.tools.import_checkpoint) initialises it through config.init.
Compute bf16, params/optimiser f32, per-block remat. AdamW lr 5e-4, wd 0.2, b2 0.98,
2k warmup, cosine (open_clip's recipe for B/16).

Global batch 32,768 via gradient accumulation. NOTE: the loss of each microbatch sees the
negatives of that microbatch only (8,192 on v4-64, 2,048 on 8 GPUs): accumulating gradients
is not the same objective as one 32k-batch contrastive loss. That needs a GradCache-style
two-pass step (embed all microbatches without gradients, then backprop per microbatch
against the cached embeddings), which this codebase does not implement yet.

Arguments (comma-separated): `clip` (default) | `siglip`;
  (none)    TPU v4-64: 32 chips = 32 devices, mesh data=32; microbatch 8192 (256 per chip),
            grad_accum_steps=4.
  gpu8      one 8x H100 host: mesh fsdp=8 (params + Adam state sharded), microbatch 2048
            (256 per GPU), grad_accum_steps=16.
  lora      LoRA on the image tower only (jax_transfer/peft.py): peft.method='lora' (r=8,
            alpha 16) with peft.target_regex='img/.*attn/(qkv|out)', only the LoRA factors
            train (peft.train_regex=''); the text tower, both projections and the
            temperature stay frozen (no gradient, no optimiser state). Start from a
            pretrained CLIP export (jax_transfer.tools.import_checkpoint) with
            --config.init.export_dir=DIR; --config.peft.frozen_dtype=bfloat16 also stores
            the frozen weights in bf16. Per-device memory next to full training's:
            benchmarks/RESULTS.md, "PEFT memory"
            (compiled on 8 simulated CPU devices; no LoRA run was trained on pod
            hardware: no accelerator was available). Works with the other arguments.
  runlocal  the embedded shapes_captions data, a mu/4 image tower and a 2-layer text tower,
            batch 32 as 2 microbatches of 16, 20 steps, float32, with remat on.

Data: prepare coco_captions as array_record once (its builder needs the [tf] extra):
  tfds build coco_captions --data_dir=$TFDS_DATA_DIR --file_format=array_record
Each image has ~5 captions under captions/text; the pipeline trains on the first
(input.caption_key='captions/text'). Train a tokenizer once or pass
--config.contrastive.tokenizer_path; otherwise one is trained from the first 100k captions.

Command (every host runs it; jax.distributed starts itself on TPU pods):
  python -m jax_transfer.main --config=ml_collections_configs/contrastive/coco_clip_b16.py \
    --config.input.data_dir=/mnt/gcs/$BUCKET/tfds --workdir=/mnt/gcs/$BUCKET/clip_b16_coco
LoRA on the image tower of an imported export, on the 8-GPU host, frozen weights in bf16:
  python -m jax_transfer.main \
    --config=ml_collections_configs/contrastive/coco_clip_b16.py:gpu8,lora \
    --config.init.export_dir=$EXPORT_DIR --config.peft.frozen_dtype=bfloat16 \
    --config.input.data_dir=$TFDS_DATA_DIR --workdir=$WORKDIR

Hardware, wall time, result -- NOT MEASURED HERE (no pod or GPU host was available).
Measured, runlocal only (2 CPU cores, jax 0.10.2 on CPU):
  python -m jax_transfer.main --config=ml_collections_configs/contrastive/coco_clip_b16.py:runlocal \
    --workdir=/tmp/coco_runlocal
  20 steps (2 accumulated microbatches each, remat on) in 22.6 s wall, loaded machine;
  zero-shot colour 0.45 (chance 0.125) after those 20 steps -- a smoke run.
"""
import math

import ml_collections

from jax_transfer.data.pp import recipes
from ml_collections_configs.contrastive import shapes_clip


def get_config(arg: str = ""):
  args = set(a for a in arg.split(",") if a)
  loss = "siglip" if "siglip" in args else "clip"
  if "runlocal" in args:
    c = shapes_clip.get_config(f"{loss},runlocal")
    c.grad_accum_steps = 2
    c.model.remat = True
  else:
    c = _pod_config(args, loss)
  if "lora" in args:  # The image tower's attention only; just the LoRA factors train.
    c.peft.update(dict(method="lora", target_regex=r"img/.*attn/(qkv|out)", train_regex=""))
  return c


def _pod_config(args, loss):
  c = shapes_clip.get_config(loss)
  c.total_steps = 20_000  # ~5.5 epochs of coco train at 32k, the pod-run budget.
  c.log_every_steps = 50
  c.eval_every_steps = 1000
  c.checkpoint_every_steps = 1000
  c.input.dataset = "coco_captions"
  c.input.caption_key = "captions/text"
  c.input.image_size = 224
  c.input.pp = recipes.clip_train(224)       # open_clip: random-resized crop 90-100 %, bicubic.
  c.input.pp_eval = recipes.clip_eval(224)
  c.input.global_batch_size = 32_768
  c.input.num_workers = 16
  c.eval.split = "val"
  c.eval.batch_size = 1024
  c.model = ml_collections.ConfigDict(dict(
      image_variant="b/16", image_pool="cls", text_width=512, text_depth=12, text_heads=8,
      vocab_size=49_408, context_length=77, embed_dim=512, dtype="bfloat16", remat=True,
      pre_norm=True, patch_bias=False, ln_eps=1e-5, gelu_approximate=False,
      logit_scale_init=math.log(10.0) if loss == "siglip" else math.log(1 / 0.07),
      logit_bias_init=-10.0 if loss == "siglip" else 0.0))
  c.optimizer.lr = 5e-4
  c.optimizer.weight_decay = 0.2
  c.optimizer.b2 = 0.98
  c.schedule.warmup_steps = 2000
  c.contrastive.zero_shot = {}       # coco has no attribute labels; retrieval only.
  c.contrastive.probe_train_limit = 0
  c.contrastive.retrieval_limit = 5000
  if "gpu8" in args:
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 8, 1
    c.grad_accum_steps = 16
  else:
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 32, 1, 1
    c.grad_accum_steps = 4
  return c

r"""Contrastive image-text pretraining on the embedded shapes_captions data.

Arguments (comma-separated): the loss, `clip` (default) | `align` | `siglip`; `dense` for the
plain loss instead of the chunked memory-flat one; `wds` to train from the embedded
webdataset shards (`shapes_wds`: 8 img2dataset-style tars of captioned shape JPEGs, 48-160 px,
built on first use) instead of the shapes_captions train split, evaluating on shapes_captions'
test split as usual; `runlocal` for a smoke-sized run; `init=DIR` to fine-tune an export,
e.g. a published CLIP / SigLIP checkpoint imported by jax_transfer.tools.import_checkpoint (its
model, loss, tokenizer, image size and normalisation; config.init_from_export); `head=ATTR`
(or `head=A+B`, with `init=`) to fine-tune the image tower only (optimizer.trainable_regex
'^img': img/ and img_proj/; the text tower frozen) as a classifier of that attribute on its
frozen zero-shot head (contrastive.zero_shot_head; the task-vector fine-tunes of
experiments/merging/merge_clip.py; measured there on the Intel Xeon, 2 shared cores: 100
steps of batch 64 per attribute, eight fine-tunes in 748 s, `head=shape` from its 300-step
base raising test shape accuracy from 0.270 to 0.445 ± 0.016 over 2 seeds: experiments/
RESULTS.md, "Merging CLIP fine-tunes"). Measured, `:clip,wds,runlocal`
(20 steps of batch 32 from the shards, 2 CPU cores, Intel Xeon, loaded machine): 33 s for
train_and_evaluate, zero-shot mean accuracy 0.378 (a smoke run, far from converged).

Command (the README's first command runs the CLIP one through
experiments/contrastive/shapes_demo.py):
  python -m jax_transfer.main --config=ml_collections_configs/contrastive/shapes_clip.py:clip \
    --workdir=/tmp/clip
Hardware: 2 CPU cores (AMD EPYC), jax 0.10.2 CPU. Measured (`:clip`, 1000 steps of batch 128,
via experiments/contrastive/shapes_demo.py): 187 s wall at load ~2;
held-out zero-shot accuracy shape 0.631 / colour 0.964 / size 0.936 / position 0.991 (chance
0.167 / 0.125 / 0.5 / 0.111); retrieval R@1 i2t 0.943, t2i 0.970 (chance 0.002). `:align`
gives the same to 3 digits; `:siglip` 0.412 / 0.841 / 0.577 / 0.849 at this budget.
Full tables: experiments/RESULTS.md (exact on that machine and versions; on another CPU or
seed expect its three-seed ranges, e.g. zero-shot shape 0.46-0.61 on an Intel Xeon).
"""
import math

import ml_collections

from jax_transfer.config import base_config, init_from_export

SHAPES = ("circle", "square", "triangle", "cross", "diamond", "ring")


def get_config(arg: str = ""):
  args = set(a for a in arg.split(",") if a)
  loss = next((a for a in ("clip", "align", "siglip") if a in args), "clip")
  c = base_config()
  c.method = "contrastive"
  c.seed = 0
  c.total_steps = 1000
  c.log_every_steps = 100
  c.eval_every_steps = 250
  c.checkpoint_every_steps = 500

  c.input.dataset = "shapes_captions"
  c.input.global_batch_size = 128
  c.eval.batch_size = 256

  c.model_name = "two_towers"
  c.model = ml_collections.ConfigDict(dict(
      image_variant="mu/4", image_pool="cls", text_width=64, text_depth=2, text_heads=4,
      vocab_size=64, context_length=16, embed_dim=64, dtype="float32", remat=False,
      logit_scale_init=math.log(10.0) if loss == "siglip" else math.log(1 / 0.07),
      logit_bias_init=-10.0 if loss == "siglip" else 0.0))

  c.optimizer.lr = 1e-3
  c.optimizer.weight_decay = 0.05
  c.optimizer.wd_exclude_regex = r"(bias|scale|pos_embedding|positional_embedding|cls|logit_scale|logit_bias|embedding/embedding)$"
  c.schedule.warmup_steps = 100

  c.contrastive = ml_collections.ConfigDict(dict(
      loss=loss, chunked_loss="dense" not in args,
      tokenizer_path=ml_collections.config_dict.placeholder(str),
      # Prompt ensembles: each class name in every template, embeddings averaged.
      zero_shot=dict(
          shape=["a {}", "a small {}", "a large {}"],
          color=[f"a {{}} {s}" for s in SHAPES],
          size=[f"a {{}} {s}" for s in SHAPES],
          position=[f"a {s} at the {{}}" for s in SHAPES]),
      retrieval_limit=1000, probe_train_limit=2000, probe_shots=[5],
      zero_shot_head=""))  # '' = the contrastive loss; see jax_transfer/methods/contrastive.py
  head = next((a[len("head="):] for a in args if a.startswith("head=")), None)
  if head:
    c.contrastive.zero_shot_head = head.replace("+", ",")
    c.optimizer.trainable_regex = "^img"

  if "wds" in args:
    from jax_transfer.data import builders  # pylint: disable=g-import-not-at-top
    shard_dir = builders.ensure_shapes_wds(c.input.data_dir)
    c.input.shards = f"{shard_dir}/shapes-{{00000..{builders.WDS_SHARDS - 1:05d}}}.tar"
    c.input.num_samples = builders.WDS_SHARDS * builders.WDS_PER_SHARD
    c.input.shuffle_buffer = 1000
    # Web images vary in size: decode at reduced DCT scale and resize to the 32 px the model
    # and the shapes_captions evaluation use.
    c.input.pp = "decode|resize(32)|value_range(-1, 1)"

  init = next((a[len("init="):] for a in args if a.startswith("init=")), None)
  if init:
    init_from_export(c, init, keep_head=True)

  if "runlocal" in args:
    c.total_steps = 20
    c.log_every_steps = 5
    c.eval_every_steps = 20
    c.checkpoint_every_steps = 10
    c.input.global_batch_size = 32
    c.schedule.warmup_steps = 5
    c.contrastive.retrieval_limit = 200
    c.contrastive.probe_train_limit = 200
  return c

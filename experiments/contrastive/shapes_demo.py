r"""Main job: contrastive image-text pretraining on the embedded shapes_captions data.

Trains the two-tower model with each requested loss through the shared loop (configs in
ml_collections_configs/contrastive/shapes_clip.py), then prints, per loss:
  zero-shot accuracy on the held-out test images for each attribute (vs chance),
  image->text / text->image retrieval recall@1/5/10 on 1000 test pairs (vs chance),
  ridge linear-probe accuracy on frozen image embeddings,
and writes summary.json and plots (curves.png: zero-shot accuracy and loss vs step) to --out.

  python experiments/contrastive/shapes_demo.py                       # CLIP (the README's job)
  python experiments/contrastive/shapes_demo.py --losses=clip,align,siglip --out=workdirs/losses
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time

import numpy as np

ATTRIBUTES = ("shape", "color", "size", "position")


def chance_levels(dataset_info, retrieval_n):
  """Chance accuracy per attribute (1 / classes) and chance recall@k for attribute-level
  relevance (the probability a random item shares all attributes, k draws)."""
  attrs = dataset_info["attributes"]
  chance = {a: 1.0 / len(attrs[a]) for a in ATTRIBUTES}
  p_rel = 1.0 / np.prod([len(attrs[a]) for a in ATTRIBUTES])
  recall = {k: 1 - (1 - p_rel) ** k + 1 / retrieval_n for k in (1, 5, 10)}  # + own pair
  return chance, recall


def plot(out, runs, chance):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from jax_transfer.metrics import read_jsonl
  fig, axes = plt.subplots(1, len(ATTRIBUTES) + 1, figsize=(4 * (len(ATTRIBUTES) + 1), 3.4))
  for loss in runs:
    rows = read_jsonl(os.path.join(out, loss))
    ev = [r for r in rows if "zero_shot/mean_accuracy" in r]
    tr = [r for r in rows if "train/loss" in r]
    for ax, attr in zip(axes, ATTRIBUTES):
      ax.plot([r["step"] for r in ev], [r[f"zero_shot/{attr}_accuracy"] for r in ev],
              marker="o", label=loss)
      ax.axhline(chance[attr], color="gray", linestyle="--", linewidth=1)
      ax.set_title(f"zero-shot {attr} (dashed: chance)")
      ax.set_xlabel("step")
      ax.set_ylim(0, 1)
    axes[-1].plot([r["step"] for r in tr], [r["train/loss"] for r in tr], label=loss)
    axes[-1].set_title("train loss")
    axes[-1].set_xlabel("step")
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(out, "curves.png"), dpi=110)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="workdirs/shapes_clip")
  parser.add_argument("--losses", default="clip")
  parser.add_argument("--steps", type=int, default=None, help="override total_steps")
  parser.add_argument("--seed", type=int, default=0,
                      help="config.seed: init, data order and augmentation (the README's "
                           "table is seed 0; experiments/RESULTS.md gives seeds 0-2)")
  args = parser.parse_args()

  from jax_transfer import data, train
  from jax_transfer.metrics import setup_logging
  from ml_collections_configs.contrastive import shapes_clip
  setup_logging(logging.WARNING)  # The printed table is the output; logs go to files.

  out = os.path.abspath(args.out)
  os.makedirs(out, exist_ok=True)
  summary = {}
  for loss in args.losses.split(","):
    c = shapes_clip.get_config(loss)
    if args.steps:
      c.total_steps = args.steps
    c.seed = args.seed
    print(f"training {loss} ({c.total_steps} steps, batch {c.input.global_batch_size})...",
          flush=True)
    t0 = time.time()
    _, final = train.train_and_evaluate(c, os.path.join(out, loss), progress=True)
    summary[loss] = dict(final, wall_time_s=time.time() - t0)
  info = data.dataset_info("shapes_captions")
  n = c.contrastive.retrieval_limit
  chance, recall = chance_levels(info, n)
  plot(out, list(summary), chance)
  with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump({"runs": summary, "chance": chance, "chance_recall": recall}, f, indent=2)

  cols = list(summary)
  print(f"\nshapes_captions test split (held-out images); retrieval over {n} test pairs, "
        "a caption/image counts when all its attributes match")
  print("| metric | chance | " + " | ".join(cols) + " |")
  print("|---|---|" + "---|" * len(cols))
  for a in ATTRIBUTES:
    print(f"| zero-shot {a} | {chance[a]:.3f} | " +
          " | ".join(f"{summary[l][f'zero_shot/{a}_accuracy']:.3f}" for l in cols) + " |")
  for d in ("i2t", "t2i"):
    for k in (1, 5, 10):
      print(f"| {d} R@{k} | {recall[k]:.3f} | " +
            " | ".join(f"{summary[l][f'retrieval/{d}_R{k}']:.3f}" for l in cols) + " |")
  for a in ATTRIBUTES:
    print(f"| linear probe {a} | {chance[a]:.3f} | " +
          " | ".join(f"{summary[l][f'linear_probe/{a}_accuracy']:.3f}" for l in cols) + " |")
  print("| wall time (s) | | " + " | ".join(f"{summary[l]['wall_time_s']:.0f}" for l in cols)
        + " |")
  print(f"\nplots: {out}/curves.png")


if __name__ == "__main__":
  main()

r"""KRR-ST on the embedded digits: distil the unlabelled train split into n synthetic images,
pretrain on them, and compare transfer with the paper's baselines at the same set size.

1. g: Barlow Twins ConvNet on the unlabelled digits train split (1347 images); exported.
   It is also the upper reference "SSL on the full source" (same architecture).
2. Per seed: the sets of n images (each with targets from g), all in one export format
     krr_st   KRR-ST distilled X_s, Y_s   (method=distill, X_s initialised from random reals)
     random   n random real images, Y = g(X)
     kmeans   the real image nearest to each of n KMeans centroids of g's features, Y = g(X)
   and a fresh ConvNet pretrained by MSE on each (method=distilled_pretrain).
3. Downstream on labelled digits (10 classes, test split of 450):
     probe       closed-form linear probe of the frozen features, all 1347 train labels
     probe_10    the same with 10 labels per class
     finetune_10 fine-tune the whole ConvNet with 10 labels per class (method=supervised)
   for every pretrained model, for a random init ("none") and for g ("full SSL").
Prints the table (mean ± std over seeds), writes summary.json and synthetic.png into --out.

Command:
  python experiments/distill/krr_st_digits.py --out=workdirs/distill_digits
Everything goes through the platform: train.train_and_evaluate with the configs of
ml_collections_configs/distill/digits_krr_st.py, and the export module.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time

import numpy as np

CFG = "ml_collections_configs/distill/digits_krr_st.py"


def config(arg, **overrides):
  from ml_collections_configs.distill import digits_krr_st
  from jax_transfer.config import with_overrides
  return with_overrides(digits_krr_st.get_config(arg), **overrides)


def save_set(out_dir, images, targets, cfg):
  from jax_transfer import checkpoint
  checkpoint.export({"images": images, "targets": targets}, cfg, out_dir)


def baseline_sets(c, g_export, n, seed):
  """(random, kmeans) sets of n real images with g targets."""
  import jax
  from sklearn.cluster import KMeans
  from jax_transfer import data
  from jax_transfer.methods.distill import load_target, read_images
  num = data.dataset_info(c.input.dataset, c.input.data_dir)["num_examples"]["train"]
  images = read_images(c.input, "train", np.arange(num))
  g_apply, g_params = load_target(g_export)
  feats = np.asarray(jax.jit(g_apply)(g_params, images))
  rand = np.sort(np.random.default_rng(1000 + seed).choice(num, n, replace=False))
  km = KMeans(n_clusters=n, n_init=3, random_state=seed).fit(feats)
  # Nearest real image to each centroid (distinct: a repeat takes the next-nearest free one).
  dist = ((feats[:, None] - km.cluster_centers_[None]) ** 2).sum(-1)  # [N, n]
  nearest, used = [], set()
  for j in range(n):
    for i in np.argsort(dist[:, j]):
      if i not in used:
        used.add(int(i)); nearest.append(int(i)); break
  nearest = np.array(nearest)
  return {"random": (images[rand], feats[rand]), "kmeans": (images[nearest], feats[nearest])}


def probe(c, feats, params):
  """Linear probes (all labels, 10 per class) of feats(params, images) -> [B, F]: the same
  evaluator (and l2) distilled_pretrain runs, for models that are not trained here."""
  from jax_transfer import parallel
  from jax_transfer.evaluators.linear_probe import LinearProbeEvaluator
  ev = LinearProbeEvaluator(image_fn=feats, input_cfg=c.input, train_split="train",
                            test_split="test", batch_size=c.eval.batch_size,
                            mesh=parallel.make_mesh(c.mesh), label_keys={"label": 10},
                            every_steps=1, shots=(10,), l2=1e-2, train_limit=4000)
  return ev.run(params)


def random_init_probe(c, seed):
  """Linear probes of a randomly initialised ConvNet (the 'no pretraining' row)."""
  import flax.linen as nn
  import jax
  from jax_transfer import models
  from jax_transfer.config import model_kwargs
  model = models.get_model(c.model_name, **model_kwargs(c.model))
  params = model.init(jax.random.key(seed), np.zeros((1, 8, 8, 1), np.float32))["params"]
  return probe(c, lambda p, x: model.apply({"params": p}, x)[1]["pre_logits"],
               nn.unbox(params))


def save_grid(path, sets, titles):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  n = len(sets[0])
  fig, axes = plt.subplots(len(sets), n, figsize=(n * 0.6, len(sets) * 0.75))
  for r, (images, title) in enumerate(zip(sets, titles)):
    for j in range(n):
      ax = axes[r, j]
      ax.imshow(np.clip(images[j, ..., 0], -1, 1), cmap="gray", vmin=-1, vmax=1)
      ax.set_xticks([]); ax.set_yticks([])
    axes[r, 0].set_ylabel(title, rotation=0, ha="right", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="workdirs/distill_digits")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--n", type=int, default=20, help="synthetic-set size")
  parser.add_argument("--ssl_steps", type=int, default=800)
  parser.add_argument("--distill_steps", type=int, default=400)
  parser.add_argument("--pretrain_steps", type=int, default=300)
  parser.add_argument("--transfer_steps", type=int, default=150)
  args = parser.parse_args()

  from jax_transfer import export as export_lib, train
  from jax_transfer.metrics import setup_logging
  setup_logging(logging.WARNING)  # The printed table is the output; logs go to files.

  t0 = time.time()
  out = os.path.abspath(args.out)
  os.makedirs(out, exist_ok=True)
  run = lambda c, name: train.train_and_evaluate(c, os.path.join(out, name), progress=True)[1]

  print(f"[1/3] g: Barlow Twins ConvNet on unlabelled digits ({args.ssl_steps} steps)", flush=True)
  g_eval = run(config("ssl", total_steps=args.ssl_steps, eval_every_steps=args.ssl_steps), "g")
  g_export = os.path.join(out, "g_export")
  export_lib.export_workdir(os.path.join(out, "g"), g_export)
  print(f"      g probe accuracy {g_eval['probe/label_accuracy']:.3f}", flush=True)

  rows = {a: {"probe": [], "probe_10": [], "finetune_10": []}
          for a in ("krr_st", "random", "kmeans", "none", "full_ssl")}
  grids = None
  for seed in range(args.seeds):
    print(f"[2/3] seed {seed}: sets of n={args.n}", flush=True)
    c = config("", **{"distill.target_export": g_export, "distill.num_synthetic": args.n,
                      "distill.init_seed": seed, "seed": seed,
                      "total_steps": args.distill_steps, "eval_every_steps": args.distill_steps})
    state, _ = train.train_and_evaluate(c, os.path.join(out, f"krr_st_seed{seed}"),
                                        progress=True)
    sets = {"krr_st": (np.asarray(state.params["images"]), np.asarray(state.params["targets"]))}
    sets.update(baseline_sets(c, g_export, args.n, seed))
    if seed == 0:
      from jax_transfer.methods.distill import Distill  # X_s at initialisation, for the grid.
      init_c = config("", **{"distill.target_export": g_export, "distill.num_synthetic": args.n})
      d = Distill(init_c, None)
      grids = ([d.init_images, sets["krr_st"][0], sets["random"][0], sets["kmeans"][0]],
               ["X_s init (real)", "KRR-ST X_s", "random", "k-means"])
    exports = {}
    for arm, (x, y) in sets.items():
      exports[arm] = os.path.join(out, f"set_{arm}_seed{seed}")
      save_set(exports[arm], x, y, c)
      pc = config("pretrain", **{"distill.set_export": exports[arm], "seed": seed,
                                 "total_steps": args.pretrain_steps,
                                 "eval_every_steps": args.pretrain_steps})
      ev = run(pc, f"pre_{arm}_seed{seed}")
      rows[arm]["probe"].append(ev["probe/label_accuracy"])
      rows[arm]["probe_10"].append(ev["probe/label_10shot_accuracy"])
      export_lib.export_workdir(os.path.join(out, f"pre_{arm}_seed{seed}"),
                                os.path.join(out, f"pre_{arm}_seed{seed}_export"))
      print(f"      {arm:7s} pretrained: probe {ev['probe/label_accuracy']:.3f} "
            f"10-shot {ev['probe/label_10shot_accuracy']:.3f}", flush=True)
    ev = random_init_probe(config("pretrain"), seed)
    rows["none"]["probe"].append(ev["label_accuracy"])
    rows["none"]["probe_10"].append(ev["label_10shot_accuracy"])
    print(f"[3/3] seed {seed}: fine-tune with 10 labels/class", flush=True)
    inits = {a: os.path.join(out, f"pre_{a}_seed{seed}_export") for a in sets}
    inits.update(none=None, full_ssl=g_export)
    for arm, init in inits.items():
      tc = config("transfer", **{"seed": seed, "input.subset_seed": seed,
                                 "init.export_dir": init, "total_steps": args.transfer_steps,
                                 "eval_every_steps": args.transfer_steps})
      acc = run(tc, f"ft_{arm}_seed{seed}")["eval/accuracy"]
      rows[arm]["finetune_10"].append(acc)
      print(f"      {arm:8s} fine-tuned: {acc:.3f}", flush=True)
  # g's own probes (full SSL reference): one model, so the same value for every seed.
  from jax_transfer.methods.distill import load_target
  g_apply, g_params = load_target(g_export)
  ev = probe(config("pretrain"), g_apply, g_params)
  rows["full_ssl"]["probe"] = [ev["label_accuracy"]] * args.seeds
  rows["full_ssl"]["probe_10"] = [ev["label_10shot_accuracy"]] * args.seeds

  save_grid(os.path.join(out, "synthetic.png"), *grids)
  summary = {"n": args.n, "seeds": args.seeds, "args": vars(args), "rows": rows,
             "wall_time_s": time.time() - t0}
  with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2, default=float)
  names = {"krr_st": f"KRR-ST distilled (n={args.n})", "random": f"random real subset (n={args.n})",
           "kmeans": f"k-means-nearest subset (n={args.n})", "none": "no pretraining",
           "full_ssl": "SSL on full source (1347 images)"}
  print(f"\nDigits, {args.seeds} seeds, mean ± std test accuracy (450 test images, chance 0.100)")
  print("| pretraining | linear probe, all labels | linear probe, 10/class | fine-tune, 10/class |")
  print("|---|---|---|---|")
  fmt = lambda v: "n/a" if np.all(np.isnan(v)) else f"{np.mean(v):.3f} ± {np.std(v):.3f}"
  for arm, r in rows.items():
    print(f"| {names[arm]} | {fmt(r['probe'])} | {fmt(r['probe_10'])} | {fmt(r['finetune_10'])} |")
  print("\nPaired by seed (the seed fixes the labelled draw and the pretraining init for every "
        "arm): mean difference, paired t over seeds, seeds where the first arm wins")
  for a, b in (("krr_st", "random"), ("random", "none"), ("krr_st", "none"),
               ("krr_st", "kmeans")):
    for key in ("finetune_10", "probe_10"):
      diff = np.asarray(rows[a][key]) - np.asarray(rows[b][key])
      t = diff.mean() / (diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else np.nan
      print(f"  {a} - {b}, {key}: {diff.mean():+.3f} (t = {t:+.2f}, "
            f"{int((diff > 0).sum())}/{len(diff)})")
  print(f"\nsynthetic images: {out}/synthetic.png; wall time {summary['wall_time_s']:.0f}s")


if __name__ == "__main__":
  main()

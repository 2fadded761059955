r"""TLEG on the embedded digits: teacher -> learngene (auxiliary model) -> descendants.

1. Teacher: supervised ViT-mu/2 (depth 4, cls) on digits 0-4 (digits_vit.py), exported.
2. Auxiliary model: learngene (θ_A, θ_B) expanded to depth L_aux = 8, width 64, gap pooling,
   distilled from the teacher on digits 0-4 (α = 1, τ = 1; learngene/digits_aux.py), exported.
3. Descendants of depths --depths on digits 5-9 with --shots labels per class
   (learngene/digits_descendant.py): initialised from the learngene expanded to that depth vs
   the same ViT from random init, same steps, same data, same seed.
4. Stored parameters needed to initialise every depth: the learngene once vs one pretrained
   backbone per depth (heads excluded in both: the downstream head is new).
Writes summary.json, curves.png (accuracy vs step per depth) and a markdown table to --out.

Command:
  python experiments/learngene/run.py --out=workdirs/learngene
Everything goes through the platform: train.train_and_evaluate and the export module.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import numpy as np

from jax_transfer.config import with_overrides as _set

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))))  # the repository root, for experiments.learngene.pool


def curves(workdir):
  from jax_transfer.metrics import read_jsonl
  rows = [r for r in read_jsonl(workdir) if "eval/accuracy" in r]
  return [r["step"] for r in rows], [r["eval/accuracy"] for r in rows]


def backbone_params(flat: dict) -> int:
  return sum(int(np.prod(v.shape)) for k, v in flat.items() if not k.startswith("head/"))


def expanded_upstream_accuracy(learngene_dir, depths):
  """Digits 0-4 test accuracy of the learngene expanded to each depth, with no training at
  all (its shared head included): do depths the auxiliary model never ran still work?"""
  import jax
  from jax_transfer import checkpoint, models, parallel
  from jax_transfer.evaluators.classification import ClassificationEvaluator
  from jax_transfer.models import learngene
  from ml_collections_configs.learngene import digits_aux
  cfg = digits_aux.get_config("")
  lg = checkpoint.load_export_params(learngene_dir)
  mesh = parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  out = {}
  for d in depths:
    model = models.get_model("vit", **dict(cfg.model.to_dict(), depth=d))
    ev = ClassificationEvaluator(lambda p, x, m=model: m.apply({"params": p}, x)[0],
                                 cfg.input, "test", 256, mesh, 1)
    out[d] = ev.run(learngene.expand(lg, d))["accuracy"]
  return out


def plot(out, depths, seeds):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(depths), figsize=(3.2 * len(depths), 3.2), sharey=True)
  for ax, d in zip(np.atleast_1d(axes), depths):
    for arm, color in (("scratch", "tab:gray"), ("learngene", "tab:blue")):
      for s in range(seeds):
        steps, acc = curves(os.path.join(out, f"d{d}_{arm}_seed{s}"))
        ax.plot(steps, acc, color=color, alpha=0.8, label=arm if s == 0 else None)
    ax.set_title(f"depth {d}")
    ax.set_xlabel("fine-tuning step")
    ax.grid(alpha=0.3)
  np.atleast_1d(axes)[0].set_ylabel("test accuracy, digits 5-9")
  np.atleast_1d(axes)[0].legend()
  fig.tight_layout()
  fig.savefig(os.path.join(out, "curves.png"), dpi=110)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="workdirs/learngene")
  parser.add_argument("--seeds", type=int, default=2)
  parser.add_argument("--depths", default="2,3,4,6,8")
  parser.add_argument("--shots", type=int, default=10, help="labels per class in 5-9")
  parser.add_argument("--teacher_steps", type=int, default=600)
  parser.add_argument("--aux_steps", type=int, default=600)
  parser.add_argument("--descendant_steps", type=int, default=200)
  parser.add_argument("--upstream_seed", type=int, default=0,
                      help="seed of the teacher and auxiliary runs: another learngene")
  args = parser.parse_args()
  depths = [int(d) for d in args.depths.split(",")]

  from jax_transfer import checkpoint, export as export_lib, train
  from jax_transfer.metrics import setup_logging
  from ml_collections_configs.learngene import digits_aux, digits_descendant
  from ml_collections_configs.supervised import digits_vit
  setup_logging(logging.WARNING)  # The printed table is the output; logs go to files.

  t0 = time.time()
  out = os.path.abspath(args.out)
  os.makedirs(out, exist_ok=True)
  teacher_dir = os.path.join(out, "teacher_export")
  learngene_dir = os.path.join(out, "learngene_export")
  times = {}

  print(f"[1/3] teacher: ViT-mu/2 on digits 0-4, {args.teacher_steps} steps", flush=True)
  t = time.time()
  _, ev = train.train_and_evaluate(_set(digits_vit.get_config(""),
                                        total_steps=args.teacher_steps,
                                        seed=args.upstream_seed),
                                   os.path.join(out, "teacher"), progress=True)
  export_lib.export_workdir(os.path.join(out, "teacher"), teacher_dir)
  teacher_acc, times["teacher_s"] = ev["eval/accuracy"], time.time() - t
  print(f"      digits 0-4 test accuracy {teacher_acc:.3f} ({times['teacher_s']:.0f}s)")

  print(f"[2/3] auxiliary model (learngene, L_aux=8) distilled, {args.aux_steps} steps",
        flush=True)
  t = time.time()
  _, ev = train.train_and_evaluate(
      _set(digits_aux.get_config(""), total_steps=args.aux_steps, seed=args.upstream_seed,
           **{"learngene.teacher_dir": teacher_dir}), os.path.join(out, "aux"), progress=True)
  export_lib.export_workdir(os.path.join(out, "aux"), learngene_dir)
  aux_acc, times["aux_s"] = ev["eval/accuracy"], time.time() - t
  print(f"      digits 0-4 test accuracy {aux_acc:.3f} ({times['aux_s']:.0f}s)")

  print(f"[3/3] descendants {depths} on digits 5-9, {args.shots} labels/class, "
        f"{args.descendant_steps} steps, {args.seeds} seeds", flush=True)
  t = time.time()
  vit_sizes = {}
  for seed in range(args.seeds):
    for d in depths:
      for arm, init in (("scratch", None), ("learngene", learngene_dir)):
        wd = os.path.join(out, f"d{d}_{arm}_seed{seed}")
        c = _set(digits_descendant.get_config(f"depth={d}"),
                 **{"seed": seed, "input.subset_seed": seed, "init.export_dir": init,
                    "input.examples_per_class": args.shots,
                    "total_steps": args.descendant_steps})
        state, ev = train.train_and_evaluate(c, wd, progress=True)
        vit_sizes[d] = backbone_params(checkpoint.flatten(state.params))
        print(f"      seed {seed} depth {d} {arm:9s} {ev['eval/accuracy']:.3f}", flush=True)
  times["descendants_s"] = time.time() - t
  plot(out, depths, args.seeds)

  budgets = curves(os.path.join(out, f"d{depths[0]}_scratch_seed0"))[0]
  acc = {d: {arm: np.array([curves(os.path.join(out, f"d{d}_{arm}_seed{s}"))[1]
                            for s in range(args.seeds)]) for arm in ("scratch", "learngene")}
         for d in depths}
  upstream = expanded_upstream_accuracy(learngene_dir, depths)
  lg_size = backbone_params(checkpoint.flatten(checkpoint.load_export_params(learngene_dir)))
  summary = {
      "teacher_accuracy_0to4": teacher_acc, "aux_accuracy_0to4": aux_acc,
      "shots": args.shots, "budgets": budgets, "seeds": args.seeds,
      "upstream_seed": args.upstream_seed,
      "expanded_untrained_accuracy_0to4": upstream,
      "accuracy_5to9": {d: {a: {"mean": v.mean(0).tolist(), "std": v.std(0).tolist(),
                                "runs": v.tolist()} for a, v in arms.items()}
                        for d, arms in acc.items()},
      "stored_params": {"learngene": lg_size, "per_depth_backbones": vit_sizes,
                        "per_depth_total": sum(vit_sizes.values())},
      "times_s": times, "wall_time_s": time.time() - t0}
  with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)

  show = [b for b in budgets if b in (25, 50, 100, args.descendant_steps)]
  idx = [budgets.index(b) for b in show]
  print(f"\nDigits 5-9, {args.shots} labels/class, {args.seeds} seeds (chance 0.200): "
        "test accuracy, mean ± std, after N steps")
  print("| depth | init | " + " | ".join(f"N={b}" for b in show) + " |")
  print("|---|---|" + "---|" * len(show))
  for d in depths:
    for arm in ("scratch", "learngene"):
      v = acc[d][arm]
      print(f"| {d} | {arm} | " + " | ".join(f"{v.mean(0)[i]:.3f} ± {v.std(0)[i]:.3f}"
                                             for i in idx) + " |")
    gain = acc[d]["learngene"] - acc[d]["scratch"]
    print(f"| {d} | gain | " + " | ".join(
        f"{gain.mean(0)[i]:+.3f} ({int((gain[:, i] > 0).sum())}/{args.seeds})" for i in idx)
          + " |")
  # Pooled over depths: one paired gain per seed (seeds are the independent units).
  from experiments.learngene.pool import pooled_gains, t_statistic
  final = pooled_gains(summary, budgets[-1])
  per_seed = final.mean(0)
  t_stat = t_statistic(per_seed)
  summary["pooled_final_gain"] = {"per_seed": per_seed.tolist(), "t": float(t_stat)}
  with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  print(f"\npooled over depths at N={budgets[-1]}: gain {per_seed.mean():+.3f}, positive on "
        f"{int((per_seed > 0).sum())}/{args.seeds} seeds, paired t = {t_stat:.2f} "
        f"(df {args.seeds - 1}); depth-seed pairs > 0: {int((final > 0).sum())}/{final.size}")
  print(f"\nstored params to initialise depths {depths} (heads excluded): learngene "
        f"{lg_size:,} vs one pretrained backbone per depth {sum(vit_sizes.values()):,} "
        f"({sum(vit_sizes.values()) / lg_size:.1f}x)")
  print("digits 0-4 accuracy of the learngene expanded to each depth, untrained: " +
        ", ".join(f"d={d}: {a:.3f}" for d, a in upstream.items()))
  print(f"wall time {summary['wall_time_s']:.0f}s ({times}); plot {out}/curves.png")


if __name__ == "__main__":
  main()

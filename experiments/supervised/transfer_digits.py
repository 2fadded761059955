r"""Does supervised pretraining help a held-out few-label task?

1. Pretrain on digits 0-4 (all their training labels) and export: ViT-mu/2
   (`--config=digits_vit`, the default) or the BatchNorm ResNet-18 (`--config=digits_resnet`;
   `--config_arg=tiny` for resnet_tiny).
2. Transfer to digits 5-9 with only `--shots` labels per class, same budget for every arm:
     scratch   — random init, full training            (the baseline)
     finetune  — init from the export (all but the head), full training
     probe     — init from the export, only the new head trained (linear probe); for a BN
                 model with model.frozen_bn (BN on the export's running statistics)
     probe_bn_updated — BN models only: the same head-only run without frozen_bn, so BN
                 re-estimates its running statistics on the few target labels (what a
                 head-only run did before frozen_bn existed)
   repeated over `--seeds` few-shot draws (different labelled examples and init seeds).
3. Print a table of mean ± std test accuracy on all of 5-9's test images at several budgets
   (fine-tuning steps 25 ... N, read from each run's metrics.jsonl), and write
   `summary.json` and plots (`curves.png`: test accuracy vs step per arm) into --out.

Commands (results: experiments/RESULTS.md, "Supervised transfer"):
  python experiments/supervised/transfer_digits.py --out=workdirs/transfer_digits
  python experiments/supervised/transfer_digits.py --config=digits_resnet \
    --out=workdirs/transfer_digits_resnet
Everything goes through the platform: train.train_and_evaluate with the configs of
ml_collections_configs/supervised/digits_vit.py / digits_resnet.py, and the export module.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time

import numpy as np

CONFIGS = ("digits_vit", "digits_resnet")


def run_arm(train, base_cfg, workdir, **overrides):
  from jax_transfer.config import with_overrides
  _, final = train.train_and_evaluate(with_overrides(base_cfg, **overrides), workdir,
                                    progress=True)
  return final["eval/accuracy"]


def curves(workdir):
  from jax_transfer.metrics import read_jsonl
  rows = [r for r in read_jsonl(workdir) if "eval/accuracy" in r]
  return [r["step"] for r in rows], [r["eval/accuracy"] for r in rows]


def plot(out, arms, seeds):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for arm, color in zip(arms, ("tab:gray", "tab:blue", "tab:orange", "tab:red")):
    for s in range(seeds):
      steps, acc = curves(os.path.join(out, f"{arm}_seed{s}"))
      ax.plot(steps, acc, color=color, alpha=0.8, label=arm if s == 0 else None)
  ax.set_xlabel("fine-tuning step")
  ax.set_ylabel("test accuracy, digits 5-9")
  ax.set_title("Transfer from digits 0-4 with few labels per class")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(out, "curves.png"), dpi=120)
  pre_steps, pre_acc = curves(os.path.join(out, "pretrain"))
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.plot(pre_steps, pre_acc, marker="o")
  ax.set_xlabel("step")
  ax.set_ylabel("test accuracy, digits 0-4")
  ax.set_title("Pretraining")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "pretrain.png"), dpi=120)


NAMES = {"scratch": "random init, train all", "finetune": "pretrained 0-4, train all",
         "probe": "pretrained 0-4, head only", "probe_bn_updated":
         "pretrained 0-4, head only, BN statistics updated"}
PAIRS = (("finetune", "scratch", "pretrained - scratch"),
         ("probe", "probe_bn_updated", "head only, frozen_bn - BN statistics updated"))


def report(summary) -> str:
  """The markdown table of summary.json: accuracy per arm at each budget, then the paired
  gains (per seed, the same labelled draw and init in both arms)."""
  acc = {a: np.array(v["runs"]) for a, v in summary["transfer_accuracy_5to9"].items()}
  budgets = summary["budgets"]
  seeds = len(acc["scratch"])
  names = dict(NAMES)
  if "probe_bn_updated" in acc:
    names["probe"] += " (frozen_bn)"
  lines = [f"Transfer to digits 5-9 ({summary.get('model_name', 'vit')}), {summary['shots']} "
           f"labels per class, {seeds} seeds (chance = 0.200): test accuracy (mean ± std) "
           "after N fine-tuning steps",
           "| init, trained params | " + " | ".join(f"N={b}" for b in budgets) + " |",
           "|---|" + "---|" * len(budgets)]
  for arm, v in acc.items():
    lines.append(f"| {names[arm]} | " + " | ".join(f"{m:.3f} ± {sd:.3f}"
                                                  for m, sd in zip(v.mean(0), v.std(0))) + " |")
  for a, b, label in PAIRS:
    if a in acc and b in acc:
      gain = acc[a] - acc[b]
      lines.append(f"| paired gain, {label} | " + " | ".join(
          f"{m:+.3f} ({int((g > 0).sum())}/{len(g)} seeds > 0)"
          for m, g in zip(gain.mean(0), gain.T)) + " |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="workdirs/transfer_digits")
  parser.add_argument("--seeds", type=int, default=5)
  parser.add_argument("--shots", type=int, default=10, help="labels per class in 5-9")
  parser.add_argument("--pretrain_steps", type=int, default=600)
  parser.add_argument("--transfer_steps", type=int, default=200)
  parser.add_argument("--config", choices=CONFIGS, default="digits_vit",
                      help="ml_collections_configs/supervised/<config>.py")
  parser.add_argument("--config_arg", default="",
                      help="extra config arguments, e.g. 'tiny' for digits_resnet")
  parser.add_argument("--report_only", action="store_true",
                      help="print the table of --out's summary.json, train nothing")
  args = parser.parse_args()
  if args.report_only:
    with open(os.path.join(args.out, "summary.json")) as f:
      print(report(json.load(f)))
    return

  from jax_transfer import export as export_lib, train
  from jax_transfer.metrics import setup_logging
  import importlib
  module = importlib.import_module(f"ml_collections_configs.supervised.{args.config}")

  def get_config(arg):
    return module.get_config(",".join(a for a in (arg, args.config_arg) if a))
  setup_logging(logging.WARNING)  # The printed table is the output; logs go to files.

  t0 = time.time()
  out = os.path.abspath(args.out)
  os.makedirs(out, exist_ok=True)
  pre_cfg = get_config("")
  print(f"[1/2] pretraining {pre_cfg.model_name} ({args.config}) on digits 0-4 "
        f"({args.pretrain_steps} steps)...", flush=True)
  pre_cfg.total_steps = args.pretrain_steps
  pre_acc = run_arm(train, pre_cfg, os.path.join(out, "pretrain"))
  export_dir = os.path.join(out, "pretrain_export")
  export_lib.export_workdir(os.path.join(out, "pretrain"), export_dir)
  print(f"      digits 0-4 test accuracy {pre_acc:.3f}; exported to {export_dir}", flush=True)

  # arm -> (config argument, init export, further overrides)
  arms = {"scratch": ("transfer", None, {}), "finetune": ("transfer", export_dir, {}),
          "probe": ("probe", export_dir, {})}
  if "frozen_bn" in pre_cfg.model:
    arms["probe_bn_updated"] = ("probe", export_dir, {"model.frozen_bn": False})
  print(f"[2/2] transfer to digits 5-9 with {args.shots} labels/class, "
        f"{args.transfer_steps} steps, {args.seeds} seeds...", flush=True)
  for seed in range(args.seeds):
    for arm, (cfg_arg, init, extra) in arms.items():
      c = get_config(cfg_arg)
      acc = run_arm(train, c, os.path.join(out, f"{arm}_seed{seed}"),
                    **{"seed": seed, "input.subset_seed": seed, "init.export_dir": init,
                       "input.examples_per_class": args.shots,
                       "total_steps": args.transfer_steps, **extra})
      print(f"      seed {seed} {arm:9s} test accuracy {acc:.3f}", flush=True)

  plot(out, list(arms), args.seeds)
  # Accuracy at each evaluated budget, per arm: [seeds, budgets].
  budgets = curves(os.path.join(out, "scratch_seed0"))[0]
  at_budget = {arm: np.array([curves(os.path.join(out, f"{arm}_seed{s}"))[1]
                              for s in range(args.seeds)]) for arm in arms}
  summary = {"config": args.config, "config_arg": args.config_arg,
             "model_name": pre_cfg.model_name, "pretrain_accuracy_0to4": pre_acc,
             "shots": args.shots, "transfer_steps": args.transfer_steps, "budgets": budgets,
             "transfer_accuracy_5to9": {
                 a: {"mean": v.mean(0).tolist(), "std": v.std(0).tolist(), "runs": v.tolist()}
                 for a, v in at_budget.items()},
             "wall_time_s": time.time() - t0}
  with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  print("\n" + report(summary))
  print(f"\nplots: {out}/curves.png, {out}/pretrain.png; wall time {summary['wall_time_s']:.0f}s")


if __name__ == "__main__":
  main()

r"""Pools TLEG runs (experiments/learngene/run.py outputs) into one table: for each learngene
(one run = one teacher + auxiliary model, `--upstream_seed`) and each fine-tuning budget N, the
learngene-minus-scratch test accuracy on digits 5-9, averaged over depths per downstream seed
(seeds are the paired, independent units), with the paired t statistic over seeds.

Command:
  python experiments/learngene/pool.py workdirs/learngene_8seeds workdirs/learngene_up1 ... \
    [--png=experiments/learngene/pooled_gain.png]
Reads only each run's summary.json; trains nothing. The PNG plots the pooled gain against the
fine-tuning step, one line per learngene, with ±1 standard error over seeds.
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np


def pooled_gains(summary: dict, budget: int) -> np.ndarray:
  """[depths, seeds] learngene - scratch accuracy at `budget` steps."""
  i = summary["budgets"].index(budget)
  lg, sc = "learngene", "scratch"
  return np.array([np.array(arms[lg]["runs"])[:, i] - np.array(arms[sc]["runs"])[:, i]
                   for arms in summary["accuracy_5to9"].values()])


def t_statistic(x: np.ndarray) -> float:
  return float(x.mean() / (x.std(ddof=1) / np.sqrt(len(x)))) if len(x) > 1 else float("nan")


def plot(summaries, names, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5.5, 3.6))
  for s, name in zip(summaries, names):
    per_seed = np.array([pooled_gains(s, b).mean(0) for b in s["budgets"]])  # [budgets, seeds]
    mean, se = per_seed.mean(1), per_seed.std(1, ddof=1) / np.sqrt(per_seed.shape[1])
    ax.plot(s["budgets"], mean, marker="o", label=name)
    ax.fill_between(s["budgets"], mean - se, mean + se, alpha=0.2)
  ax.axhline(0, color="k", lw=0.8)
  ax.set_xlabel("fine-tuning step (digits 5-9, 10 labels/class)")
  ax.set_ylabel("learngene − scratch accuracy\n(mean over depths, ±1 s.e. over seeds)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(run_dirs, png=None):
  budgets = (25, 50, 100, 200)
  summaries, names = [], []
  print("| learngene (upstream seed) | teacher / aux acc. 0-4 | " +
        " | ".join(f"N={b}" for b in budgets) + " |")
  print("|---|---|" + "---|" * len(budgets))
  for run in run_dirs:
    with open(os.path.join(run, "summary.json")) as f:
      s = json.load(f)
    summaries.append(s)
    names.append(f"upstream seed {s.get('upstream_seed', 0)}")
    cells = []
    for b in budgets:
      g = pooled_gains(s, b)
      per_seed = g.mean(0)
      cells.append(f"{per_seed.mean():+.3f} (t={t_statistic(per_seed):+.1f}, "
                   f"{int((per_seed > 0).sum())}/{len(per_seed)})")
    print(f"| {os.path.basename(os.path.normpath(run))} ({s.get('upstream_seed', 0)}) | "
          f"{s['teacher_accuracy_0to4']:.3f} / {s['aux_accuracy_0to4']:.3f} | "
          + " | ".join(cells) + " |")
  print("\ncells: gain averaged over depths per seed, mean over seeds (paired t over seeds, "
        "seeds with gain > 0)")
  if png:
    plot(summaries, names, png)
    print(f"plot {png}")


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("runs", nargs="+", help="run.py --out directories")
  parser.add_argument("--png", default=None)
  args = parser.parse_args()
  main(args.runs, args.png)

r"""The GPICL transition experiment (Kirsch et al. 2022, fig. 3), shrunk to 2 CPU cores: meta-train
the same learner at a fixed budget on pools of 2^k tasks (and unlimited tasks), then compare
accuracy on seen tasks (pool tasks, test-split digits) with unseen tasks (fresh projections and
permutations). Memorisation: seen >> unseen; generalisation: seen ~= unseen >> chance.

Shrunken setting (stated in README.md): digits 0-4 (5-way tasks, chance 0.2) resized 8x8 -> 4x4
(16 features; the ln 5 plateau at 64 features outlasts a CPU budget), sequences of 32,
128 sequences per step drawn on device from 256 base examples (icl.resample_sequences),
Transformer width 64, depth 2, 4 heads, lr 1e-3, `--steps` steps per point.

  python experiments/icl/transition.py --out=workdirs/icl_transition_v2 --steps=1500 \
      --tasks=4,16,64,256,1024,4096,16384,65536,0   (0 = unlimited)
  --lstm (the LSTM learner), --fixed=F (plateau intervention), --sequences=S (sequences per
  step), --image_size=0 (8x8, 64 features), --no_resample (cut the base batch into
  consecutive sequences: with --image_size=0 --sequences=32 --lr=2e-3 the first sweep)
Writes <out>/transition.{md,json,png} and one workdir per point (<out>/tasks_<n>[_...]/, with
its icl_curves.png); points already in <out>/transition.json are skipped (resumable).
"""
import argparse
import json
import os
import time


def run_point(num_tasks, steps, out, final_datasets, lstm=False, fixed=0.0, sequences=128,
              image_size=4, resample=True, batch_examples=256, lr=1e-3, seed=0):
  from jax_transfer import train
  from ml_collections_configs.icl import digits_gpicl
  c = digits_gpicl.get_config(f"tasks={num_tasks}" + (",lstm" if lstm else ""))
  c.total_steps = steps
  c.eval_every_steps = steps  # meta-test once, at the end
  c.checkpoint_every_steps = steps
  c.log_every_steps = 100
  c.optimizer.lr = lr
  c.seed = c.icl.task_seed = seed  # another init, data order and task pool
  c.input.classes = (0, 1, 2, 3, 4)
  c.model.num_classes = 5
  c.input.image_size = image_size or None  # 4: digits 8x8 -> 4x4 = 16 features
  c.icl.fixed_task_fraction = fixed
  if resample:  # `sequences` sequences drawn on device from `batch_examples` base examples
    c.input.global_batch_size = batch_examples
    c.icl.resample_sequences = sequences
  else:  # the batch cut into `sequences` consecutive sequences (the first sweep)
    c.input.global_batch_size = sequences * c.icl.seq_len
  c.icl.unseen_datasets = final_datasets
  workdir = os.path.join(out, f"tasks_{num_tasks}" + ("_lstm" if lstm else "")
                         + (f"_fixed{fixed}" if fixed else "")
                         + (f"_batch{sequences}" if sequences != 128 else ""))
  t = time.time()
  _, final = train.train_and_evaluate(c, workdir, progress=True)
  return final, time.time() - t


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--out", default="/tmp/icl_transition")
  p.add_argument("--steps", type=int, default=500)
  p.add_argument("--tasks", default="4,16,64,256,1024,4096,16384,65536,0")
  p.add_argument("--datasets", default="wine,iris,breast_cancer,shapes_captions:size")
  p.add_argument("--lstm", action="store_true", help="the LSTM learner instead")
  p.add_argument("--fixed", type=float, default=0.0, help="icl.fixed_task_fraction")
  p.add_argument("--sequences", type=int, default=128, help="sequences per step")
  p.add_argument("--image_size", type=int, default=4,
                 help="digits resized to SxS (4: 16 features); 0 = 8x8 (64 features)")
  p.add_argument("--no_resample", action="store_true",
                 help="cut the base batch into consecutive sequences (the first sweep) "
                      "instead of icl.resample_sequences")
  p.add_argument("--batch_examples", type=int, default=256,
                 help="base examples per step when resampling")
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--seed", type=int, default=0,
                 help="config.seed and icl.task_seed: another init, data order and task pool "
                      "(use one --out per seed)")
  p.add_argument("--combine", default="",
                 help="comma-separated --out dirs of sweeps with different seeds: write "
                      "<out>/seeds.{md,png} (mean and range over seeds) and exit")
  args = p.parse_args()
  if args.combine:
    combine(args.combine.split(","), args.out)
    return
  os.makedirs(args.out, exist_ok=True)
  datasets = tuple(d for d in args.datasets.split(",") if d)
  rows = []
  path = os.path.join(args.out, "transition.json")
  tag = (("lstm" if args.lstm else "transformer") + (f"+fixed{args.fixed}" if args.fixed else "")
         + (f"+batch{args.sequences}" if args.sequences != 128 else ""))
  if os.path.exists(path):  # Resume a partly done sweep.
    rows = json.load(open(path))
  done = {(r["num_tasks"], r.get("learner", "transformer")) for r in rows}
  for n in (int(t) for t in args.tasks.split(",")):
    if (n, tag) in done:
      continue
    final, wall = run_point(n, args.steps, args.out, datasets, args.lstm, args.fixed,
                            args.sequences, args.image_size, not args.no_resample,
                            args.batch_examples, args.lr, args.seed)
    rows.append({"num_tasks": n, "learner": tag, "wall_s": round(wall, 1), **final})
    json.dump(rows, open(path, "w"), indent=1)
    print(f"tasks={n or 'unlimited'} wall={wall:.0f}s seen={final['icl/seen/acc_mean']:.3f} "
          f"unseen={final['icl/unseen/acc_mean']:.3f}", flush=True)
  write_report(rows, args.out, datasets)


def write_report(rows, out, datasets):
  names = [d.replace(":", "_") for d in datasets]
  head = ("| tasks (learner) | seen acc (mean over k) | seen acc k=31 | unseen acc (mean) | unseen k=31 | "
          + " | ".join(f"{n} k=31" for n in names) + " | wall |")
  lines = [head, "|" + "---|" * (6 + len(names))]
  rows = sorted(rows, key=lambda r: (r.get("learner", "transformer"), r["num_tasks"] or 2 ** 40))
  for r in rows:
    label = "unlimited" if r["num_tasks"] == 0 else f"2^{r['num_tasks'].bit_length() - 1}"
    if r.get("learner", "transformer") != "transformer":
      label += f" ({r['learner']})"
    lines.append(f"| {label} | {r['icl/seen/acc_mean']:.3f} | {r['icl/seen/acc_k31']:.3f} | "
                 f"{r['icl/unseen/acc_mean']:.3f} | {r['icl/unseen/acc_k31']:.3f} | "
                 + " | ".join(f"{r.get(f'icl/{n}/acc_k31', float('nan')):.3f}" for n in names)
                 + f" | {r['wall_s']:.0f} s |")
  lr = rows[0]
  lines.append("| logreg (same examples) | | {:.3f} | | {:.3f} | ".format(
      lr.get("icl/seen/logreg_k31", float("nan")), lr.get("icl/unseen/logreg_k31", float("nan")))
      + " | ".join(f"{lr.get(f'icl/{n}/logreg_k31', float('nan')):.3f}" for n in names) + " | |")
  open(os.path.join(out, "transition.md"), "w").write("\n".join(lines) + "\n")
  print("\n".join(lines))
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = [r for r in rows if r.get("learner", "transformer") == "transformer"]
  xs = [r["num_tasks"] or 2 ** 18 for r in rows]  # unlimited drawn at 2^18
  fig, ax = plt.subplots(figsize=(6, 4))
  for key, label in (("seen", "seen tasks"), ("unseen", "unseen tasks")):
    ax.plot(xs, [r[f"icl/{key}/acc_mean"] for r in rows], "o-", label=label + " (mean over k)")
  ax.plot(xs, [r["icl/unseen/acc_k31"] for r in rows], "s--", color="C1", alpha=0.6,
          label="unseen tasks, k = 31")
  ax.axhline(0.2, color="gray", ls=":", label="chance")
  ax.set_xscale("log", base=2)
  ax.set_ylim(0, 1.02)
  ax.set_xlabel("number of meta-training tasks (2^18 = unlimited)")
  ax.set_ylabel("meta-test accuracy")
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(out, "transition.png"), dpi=100)


def combine(dirs, out):
  """Transformer rows of several seeds' sweeps -> mean and [min, max] over seeds per pool size
  (markdown table and plot with range bars)."""
  import numpy as np
  by_seed = []
  for d in dirs:
    with open(os.path.join(d, "transition.json")) as f:
      by_seed.append({r["num_tasks"]: r for r in json.load(f)
                      if r.get("learner", "transformer") == "transformer"})
  tasks = sorted(set.intersection(*(set(s) for s in by_seed)), key=lambda n: n or 2 ** 40)
  keys = (("icl/seen/acc_mean", "seen (mean over k)"), ("icl/unseen/acc_mean",
          "unseen (mean over k)"), ("icl/unseen/acc_k31", "unseen, k = 31"))
  label = lambda n: "unlimited" if n == 0 else f"2^{n.bit_length() - 1}"
  lines = [f"| tasks ({len(dirs)} seeds: mean [min, max]) | "
           + " | ".join(name for _, name in keys) + " |", "|---|" + "---|" * len(keys)]
  stats = {}
  for n in tasks:
    cells = []
    for key, _ in keys:
      v = np.array([s[n][key] for s in by_seed])
      stats[(n, key)] = v
      cells.append(f"{v.mean():.3f} [{v.min():.3f}, {v.max():.3f}]")
    lines.append(f"| {label(n)} | " + " | ".join(cells) + " |")
  os.makedirs(out, exist_ok=True)
  open(os.path.join(out, "seeds.md"), "w").write("\n".join(lines) + "\n")
  print("\n".join(lines))
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  xs = np.array([n or 2 ** 18 for n in tasks])  # unlimited drawn at 2^18
  fig, ax = plt.subplots(figsize=(6, 4))
  for (key, name), marker in zip(keys, ("o-", "o-", "s--")):
    v = np.array([stats[(n, key)] for n in tasks])  # [tasks, seeds]
    ax.errorbar(xs, v.mean(1), yerr=[v.mean(1) - v.min(1), v.max(1) - v.mean(1)], fmt=marker,
                capsize=3, label=name)
  ax.axhline(0.2, color="gray", ls=":", label="chance")
  ax.set_xscale("log", base=2)
  ax.set_ylim(0, 1.02)
  ax.set_xlabel("number of meta-training tasks (2^18 = unlimited)")
  ax.set_ylabel(f"meta-test accuracy ({len(dirs)} seeds, mean and range)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "seeds.png"), dpi=100)


if __name__ == "__main__":
  main()

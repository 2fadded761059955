r"""Transfer under covariate shift on the embedded digits (#17 item 7, the adaptation and
Transfer Score parts): a BatchNorm ResNet trained on digits 0-4 (source) and evaluated on
the shifted domains digits_rotated / digits_inverted / digits_noisy (targets).

Arms, per seed (the same seed = the same init and the same source batches in every arm):
  source    supervised on the source only (digits_dann.py's recipe with method='supervised':
            SGD 0.9, lr 0.01, wd 1e-3), evaluated with its running statistics;
  test_bn, alpha_a, tent
            that same model, its BN statistics recalibrated at test time
            (jax_transfer/evaluators/test_time.py; alpha weights the test side);
  dann      DANN (methods/dann.py) from the source to that target (its unlabelled train
            split), one run per target, the same recipe and steps.
Transfer Score: every run logs transfer_<target>/transfer_score beside
eval_<target>/accuracy at each evaluation (eval.transfer_score); over that pool of checkpoints
(source and DANN runs, every evaluation step, every seed) the Spearman / Kendall rank
correlation of the score with the target accuracy is the paper's claim at this scale.

Writes seed<N>.json (per seed, as it finishes), summary.json and table.md to --out and
experiments/shift/shift.png; --report_only redoes the tables and plot from summary.json.
Command (results: experiments/RESULTS.md, "Transfer under covariate shift"):
  python experiments/shift/run.py --out=workdirs/shift
Test-time arms against the test batch size (the same trained models, one run per batch):
  for b in 8 16 64; do
    python experiments/shift/run.py --out=workdirs/shift_b$b --test_batch=$b; done
  python experiments/shift/run.py \
    --batch_sweep=workdirs/shift_b8,workdirs/shift_b16,workdirs/shift_b64
(about 2 min per batch size on a 2-core AMD EPYC CPU; results in the same RESULTS section,
"Test-time BN against the test batch size").
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))))  # the repository root: experiments.*, as experiments/peft/transfer_peft.py
from experiments.shift import cached_json  # noqa: E402

DOMAINS = ("digits_rotated", "digits_inverted", "digits_noisy")
ALPHAS = (0.1, 0.3, 0.5, 0.7, 0.9)


def base(args, seed, target):
  from ml_collections_configs.shift import digits_dann
  c = digits_dann.get_config("tiny")
  c.seed = seed
  c.model.width = args.width
  c.dann.hidden = args.hidden
  c.dann.target_dataset = target
  c.total_steps = args.steps
  c.eval_every_steps = args.steps // args.evals
  c.checkpoint_every_steps = args.steps
  c.log_every_steps = args.steps // args.evals
  c.eval.transfer_score = True
  if args.data_dir:
    c.input.data_dir = args.data_dir
  return c


def records(workdir):
  """The run's evaluations, one per step (a resumed run evaluates its last step again: the
  latest record of a step is kept)."""
  from jax_transfer.metrics import read_jsonl
  by_step = {r["step"]: r for r in read_jsonl(workdir) if "eval/accuracy" in r}
  return [by_step[k] for k in sorted(by_step)]


def run_source(args, seed, out):
  import flax.linen as nn
  import jax
  from jax_transfer import methods, train
  from jax_transfer.evaluators import test_time
  c = base(args, seed, DOMAINS[0])
  c.method = "supervised"
  del c["dann"]
  c.eval.datasets = DOMAINS
  wd = os.path.join(out, f"source_s{seed}")
  state, _ = train.train_and_evaluate(c, wd)
  from jax_transfer import parallel
  method = methods.get_method("supervised")(c, parallel.make_mesh(c.mesh))
  params = jax.device_get(nn.unbox(state.params))
  extra = {"batch_stats": jax.device_get(nn.unbox(state.extra["batch_stats"]))}
  tta = {d: test_time.for_method(method, d, alphas=ALPHAS, batch_size=args.test_batch
                                 ).run(params, extra) for d in DOMAINS}
  return records(wd), tta


def run_dann(args, seed, target, out):
  from jax_transfer import train
  c = base(args, seed, target)
  c.eval.datasets = (target,)
  wd = os.path.join(out, f"dann_{target}_s{seed}")
  train.train_and_evaluate(c, wd)
  return records(wd)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--out", default="workdirs/shift")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--steps", type=int, default=800)
  p.add_argument("--evals", type=int, default=8)
  p.add_argument("--width", type=int, default=16)
  p.add_argument("--hidden", type=int, default=256)
  p.add_argument("--test_batch", type=int, default=64)
  p.add_argument("--data_dir", default="")
  p.add_argument("--report_only", action="store_true",
                 help="rewrite table.md and the plot from --out's summary.json; train nothing")
  p.add_argument("--batch_sweep", default="",
                 help="comma-separated --out dirs of runs that differ only in --test_batch: "
                      "print the test-time arms against the batch size; train nothing")
  args = p.parse_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  if args.batch_sweep:
    return print(batch_sweep(args.batch_sweep.split(","), seeds))
  os.makedirs(args.out, exist_ok=True)
  if args.report_only:
    with open(os.path.join(args.out, "summary.json")) as f:
      summary = json.load(f)
    summary["source"] = {int(k): v for k, v in summary["source"].items()}
    return write_report(summary, seeds, args.out)
  t0 = time.time()
  summary = {"args": vars(args), "source": {}, "dann": {}}
  key = {k: v for k, v in vars(args).items() if k not in ("out", "seeds", "report_only")}
  for s in seeds:
    # Each seed's results are saved as soon as they exist, so a stopped run resumes at the
    # next seed (a seed's file is reused only when its settings are the same).
    def one_seed(s=s):
      recs, tta = run_source(args, s, args.out)
      return {"source": {"records": recs, "test_time": tta},
              "dann": {f"{d}/{s}": run_dann(args, s, d, args.out) for d in DOMAINS}}
    rec = cached_json(os.path.join(args.out, f"seed{s}.json"), key, one_seed)
    summary["source"][s] = rec["source"]
    summary["dann"].update(rec["dann"])
  summary["wall_s"] = time.time() - t0
  with open(os.path.join(args.out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1, default=float)
  write_report(summary, seeds, args.out)


def batch_sweep(outs, seeds) -> str:
  """The test-time arms against the test batch size: one run.py --out per batch size (the
  same seeds and settings but --test_batch, so the same trained source models). Per target and
  batch: each arm's paired gain over source, and alpha-BN's over plain test-batch BN at
  alpha = 0.5 (fixed in advance) and at the best alpha (chosen on the test labels: an upper
  bound)."""
  runs = []
  for out in outs:
    with open(os.path.join(out, "summary.json")) as f:
      summary = json.load(f)
    runs.append((summary["args"]["test_batch"], summary))
  lines = ["| target | test batch | source | test_bn − source | α=0.5 − test_bn | "
           "best α − test_bn (α) | tent − test_bn |", "|---|---|---|---|---|---|---|"]
  runs.sort(key=lambda r: r[0])
  for dom in DOMAINS:
    for batch, summary in runs:
      tta = [summary["source"][str(s)]["test_time"][dom] for s in seeds]
      acc = lambda arm: np.array([t[f"{arm}/accuracy"] for t in tta])
      best = max(ALPHAS, key=lambda a: acc(f"alpha_{a:g}").mean())
      lines.append(f"| {dom} | {batch} | {acc('source').mean():.3f} | "
                   f"{paired_cell(acc('test_bn') - acc('source'))} | "
                   f"{paired_cell(acc('alpha_0.5') - acc('test_bn'))} | "
                   f"{paired_cell(acc(f'alpha_{best:g}') - acc('test_bn'))} ({best:g}) | "
                   f"{paired_cell(acc('tent') - acc('test_bn'))} |")
  return "\n".join(lines) + "\n"


def write_report(summary, seeds, out):
  table = report(summary, seeds)
  with open(os.path.join(out, "table.md"), "w") as f:
    f.write(table)
  print(table)


def paired_cell(diff) -> str:
  """'+0.081 (3/3)': the mean paired difference over seeds and the seeds it is positive on."""
  return f"{diff.mean():+.3f} ({int((diff > 0).sum())}/{len(diff)})"


def report(summary, seeds) -> str:
  from scipy import stats
  arms = ["source", "test_bn", *[f"alpha_{a:g}" for a in ALPHAS], "tent", "dann"]
  acc = {d: {a: [] for a in arms} for d in DOMAINS}
  src_acc = []
  pool = {d: [] for d in DOMAINS}
  for s in seeds:
    rec = summary["source"][s]["records"]
    src_acc.append(rec[-1]["eval/accuracy"])
    for d in DOMAINS:
      tta = summary["source"][s]["test_time"][d]
      for a in arms[:-1]:
        acc[d][a].append(tta[f"{a}/accuracy"])
      np.testing.assert_allclose(tta["source/accuracy"], rec[-1][f"eval_{d}/accuracy"],
                                 atol=1e-6)  # The evaluator's source column is the eval.
      drec = summary["dann"][f"{d}/{s}"]
      acc[d]["dann"].append(drec[-1][f"eval_{d}/accuracy"])
      for r in rec + drec:
        pool[d].append((r[f"transfer_{d}/transfer_score"], r[f"eval_{d}/accuracy"]))
  fmt = lambda v: f"{np.mean(v):.3f} ± {np.std(v):.3f}"
  lines = [f"Source (digits 0-4 test) accuracy of the source-only model: {fmt(src_acc)} "
           f"(seeds {seeds})", "",
           "| target | " + " | ".join(arms) + " |", "|---" * (len(arms) + 1) + "|"]
  for d in DOMAINS:
    lines.append(f"| {d} | " + " | ".join(fmt(acc[d][a]) for a in arms) + " |")
  lines += ["", "Paired differences vs source (mean over seeds, wins / seeds):", "",
            "| target | " + " | ".join(arms[1:]) + " |", "|---" * len(arms) + "|"]
  for d in DOMAINS:
    base_ = np.array(acc[d]["source"])
    cells = [paired_cell(np.array(acc[d][a]) - base_) for a in arms[1:]]
    lines.append(f"| {d} | " + " | ".join(cells) + " |")
  lines += ["", "Transfer Score vs target accuracy over the checkpoint pool (every evaluation "
            "of every source and DANN run):", "",
            "| target | checkpoints | Spearman ρ | Kendall τ |", "|---|---|---|---|"]
  summary["rank"] = {}
  for d in DOMAINS:
    x, y = np.array(pool[d]).T
    rho, tau = stats.spearmanr(x, y)[0], stats.kendalltau(x, y)[0]
    summary["rank"][d] = {"spearman": float(rho), "kendall": float(tau), "n": len(x)}
    lines.append(f"| {d} | {len(x)} | {rho:+.3f} | {tau:+.3f} |")
  # The paper's use: pick a run's checkpoint by the score, without target labels.
  lines += ["", "Checkpoint selection within each run (source and DANN runs, every seed): the "
            "target accuracy of the checkpoint with the highest Transfer Score, of the last "
            "checkpoint, and of the best one (an oracle that reads target labels):", "",
            "| target | runs | picked by Transfer Score | last | oracle best |",
            "|---|---|---|---|---|"]
  for d in DOMAINS:
    runs = [summary["source"][s]["records"] for s in seeds]
    runs += [summary["dann"][f"{d}/{s}"] for s in seeds]
    picked = [max(r, key=lambda x: x[f"transfer_{d}/transfer_score"])[f"eval_{d}/accuracy"]
              for r in runs]
    last = [r[-1][f"eval_{d}/accuracy"] for r in runs]
    best = [max(x[f"eval_{d}/accuracy"] for x in r) for r in runs]
    lines.append(f"| {d} | {len(runs)} | {fmt(picked)} | {fmt(last)} | {fmt(best)} |")
  plot(acc, pool, arms)
  return "\n".join(lines) + "\n"


def plot(acc, pool, arms):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
  w = 0.8 / len(DOMAINS)
  for i, d in enumerate(DOMAINS):
    m = [np.mean(acc[d][a]) for a in arms]
    e = [np.std(acc[d][a]) for a in arms]
    axes[0].bar(np.arange(len(arms)) + i * w, m, w, yerr=e, label=d)
  axes[0].set_xticks(np.arange(len(arms)) + w, arms, rotation=45, ha="right")
  axes[0].set_ylabel("target test accuracy")
  axes[0].legend()
  for d in DOMAINS:
    x, y = np.array(pool[d]).T
    axes[1].scatter(x, y, s=12, label=d)
  axes[1].set_xlabel("Transfer Score (no target labels)")
  axes[1].set_ylabel("target accuracy")
  axes[1].legend()
  fig.tight_layout()
  fig.savefig(os.path.join(os.path.dirname(__file__), "shift.png"), dpi=110)


if __name__ == "__main__":
  main()

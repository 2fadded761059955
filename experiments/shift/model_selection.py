r"""Choosing what to transfer (#17 item 7, the model-selection part): do the transferability
estimators (jax_transfer/evaluators/transferability.py: LogME, LEEP, H-score, shrunk H-score,
PED) rank a pool of exported models as their measured fine-tuning accuracy does?

Pool (every member trained and exported here, through train.train_and_evaluate and the export
module): a ViT-mu/2 (digits_vit.py) pretrained on digits 0-4 of each embedded domain (digits,
digits_rotated, digits_inverted, digits_noisy) for --short and --long steps, and a BatchNorm
resnet_tiny (shift/digits_dann.py's source recipe, method='supervised') on digits and
digits_noisy; and TLEG learngene descendants at init: the learngene (digits_aux.py, L_aux = 8,
distilled for --long steps from the pool's own ViT on digits, 600 steps) expanded to depths
LEARNGENE_DEPTHS and exported as plain ViTs (gap pooling, the 0-4 head the auxiliary model
learned); and CLIP image towers: a two-tower CLIP (shapes_clip.py:clip, ViT-mu/4 at 32 px) trained
contrastively on shapes_captions for each of --clip_steps, its image tower exported as a plain
ViT (export.export_tower). 14 models of four kinds, five source domains.

Target task: digits 5-9 (classes no member saw) with --shots labels per class, the few-shot
fine-tune of digits_vit.py:transfer from each export (config.init_from_export: everything but
the head), the same recipe and steps for every member, --seeds paired draws (seed s = the
same labelled examples and the same head init for every member). A CLIP tower reads the
digits as its own inputs: resized to 32 px and made 3-channel (pp op to_rgb).

Estimators score each export's frozen features (the head's input; LEEP: its own 5-way source
head's softmax; a CLIP tower's: its zero-shot classifier of the six shape names) on exactly
the labelled examples the fine-tune of that seed reads, and, as a
second column, on all of 5-9's training images with labels. Reported: each estimator's Kendall
tau (and Spearman rho) with the mean fine-tuned accuracy over the pool, the mean of the
per-seed tau (estimator and accuracy of the same draw), and as a label-free baseline the
member's own source-domain test accuracy (a CLIP tower's: zero-shot shape accuracy on
shapes_captions).

Writes models/<name>.json (per member, as it finishes; reused when the settings match),
summary.json and table.md to --out, and experiments/shift/model_selection.png.
Command (results: experiments/RESULTS.md, "Choosing what to transfer"):
  python experiments/shift/model_selection.py --out=workdirs/select
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))))  # the repository root: experiments.*, as experiments/peft/transfer_peft.py
from experiments.shift import cached_json  # noqa: E402

DOMAINS = ("digits", "digits_rotated", "digits_inverted", "digits_noisy")
LEARNGENE_DEPTHS = (4, 8)


def pool(args):
  """[(name, pretraining config)]: ViTs per domain x length, then the BN ResNets, then the
  learngene descendants (config None: built by learngene_member)."""
  from ml_collections_configs.shift import digits_dann
  from ml_collections_configs.supervised import digits_vit
  out = []
  for steps in (args.short, args.long):
    for d in DOMAINS:
      c = digits_vit.get_config("")
      c.input.dataset = d
      c.total_steps = steps
      c.checkpoint_every_steps = steps
      c.schedule.warmup_steps = min(50, steps // 4)
      out.append((f"vit_{d}_{steps}", c))
  for d in ("digits", "digits_noisy"):
    c = digits_dann.get_config("tiny")
    c.method = "supervised"
    del c["dann"]
    c.model.width = 16
    c.input.dataset = d
    c.eval.datasets = ()
    c.total_steps = args.long
    c.eval_every_steps = c.checkpoint_every_steps = args.long
    out.append((f"resnet_{d}_{args.long}", c))
  for _, c in out:
    c.seed = 0
    if args.data_dir:
      c.input.data_dir = args.data_dir
  out += [(f"learngene_d{d}_{args.long}", None) for d in LEARNGENE_DEPTHS]
  from ml_collections_configs.contrastive import shapes_clip
  for steps in clip_steps(args):
    c = shapes_clip.get_config("clip")
    c.total_steps = steps
    c.eval_every_steps = c.checkpoint_every_steps = steps
    c.schedule.warmup_steps = min(100, steps // 4)
    c.input.image_size = 32  # the export records it: the digits fine-tune resizes to it
    c.contrastive.retrieval_limit = c.contrastive.probe_train_limit = 0
    if args.data_dir:
      c.input.data_dir = args.data_dir
    out.append((f"clip_shapes_{steps}", c))
  return out


def clip_steps(args) -> list[int]:
  return [int(v) for v in args.clip_steps.split(",") if v]


def pretrain_member(cfg, wd, metric="eval/accuracy"):
  """Train `cfg` (resumed if its workdir has it) and export it: (export dir, its `metric`)."""
  from jax_transfer import export as export_lib, train
  _, final = train.train_and_evaluate(cfg, os.path.join(wd, "pretrain"))
  export_dir = os.path.join(wd, "export")
  if not os.path.exists(os.path.join(export_dir, "config.json")):
    export_lib.export_workdir(os.path.join(wd, "pretrain"), export_dir)
  return export_dir, final[metric]


CLIP_SOURCE_HEAD = "shape"  # the zero-shot classifier that is a CLIP tower's source head


def clip_member(cfg, wd):
  """The contrastive export, its image tower as a ViT export, its zero-shot shape accuracy."""
  from jax_transfer import export as export_lib
  export_dir, source_acc = pretrain_member(cfg, wd,
                                           f"zero_shot/{CLIP_SOURCE_HEAD}_accuracy")
  tower_dir = os.path.join(wd, "tower")
  if not os.path.exists(os.path.join(tower_dir, "config.json")):
    export_lib.export_tower(export_dir, tower_dir)
  return export_dir, tower_dir, source_acc


def learngene_member(args, depth, out, wd):
  """TLEG: the auxiliary model distilled from the pool's digits ViT (long), its learngene
  expanded to `depth` and exported as a supervised ViT (digits_descendant.py's architecture
  on the upstream classes 0-4); (export dir, its digits 0-4 test accuracy untrained)."""
  from jax_transfer import checkpoint
  from jax_transfer.evaluators.common import load_export
  from jax_transfer.models import learngene
  from ml_collections_configs.learngene import digits_aux, digits_descendant
  aux = digits_aux.get_config("")
  aux.total_steps = args.long
  aux.learngene.teacher_dir = os.path.join(out, f"vit_digits_{args.long}", "export")
  if args.data_dir:
    aux.input.data_dir = args.data_dir
  lg_dir, _ = pretrain_member(aux, os.path.join(out, f"learngene_{args.long}"))
  c = digits_descendant.get_config(f"depth={depth}")
  c.input.classes = aux.input.classes
  c.input.examples_per_class = None
  c.input.data_dir = aux.input.data_dir
  export_dir = os.path.join(wd, "export")
  if not os.path.exists(os.path.join(export_dir, "config.json")):
    params = learngene.expand(checkpoint.load_export_params(lg_dir), depth)
    checkpoint.export(params, c, export_dir)
  method, params, _ = load_export(export_dir)
  ev = next(e for e in method.evaluators() if e.name == "eval")
  return export_dir, ev.run(params)["accuracy"]


def fine_tune_config(args, export_dir, seed):
  from jax_transfer import config as config_lib
  from ml_collections_configs.supervised import digits_vit
  c = digits_vit.get_config("transfer")
  c.model_name = ""  # the export's (a ViT or a ResNet): init_from_export sets it
  config_lib.init_from_export(c, export_dir, keep_head=False)
  c.seed = seed
  c.input.subset_seed = seed
  c.input.examples_per_class = args.shots
  c.total_steps = args.steps
  c.eval_every_steps = c.checkpoint_every_steps = args.steps
  if args.data_dir:
    c.input.data_dir = args.data_dir
  return c


def run_member(args, name, cfg, out):
  from jax_transfer import train
  from jax_transfer.evaluators import transferability as T
  wd = os.path.join(out, name)
  zero_shot = None
  if cfg is None:
    export_dir, source_acc = learngene_member(args, int(name.split("_d")[1].split("_")[0]),
                                              out, wd)
    kind, source, steps = "learngene", "digits", args.long
    tune_dir = export_dir
  elif cfg.method == "contrastive":  # features and zero-shot head from the two-tower export
    export_dir, tune_dir, source_acc = clip_member(cfg, wd)
    kind, source, steps, zero_shot = "clip", cfg.input.dataset, cfg.total_steps, CLIP_SOURCE_HEAD
  else:
    export_dir, source_acc = pretrain_member(cfg, wd)
    kind, source, steps = cfg.model_name, cfg.input.dataset, cfg.total_steps
    tune_dir = export_dir
  rec = {"source_accuracy": source_acc, "fine_tune": [], "few_shot": [],
         "model": kind, "source": source, "steps": steps}
  # One pass over all labelled 5-9 training images; each seed's few-shot set is a subset of
  # those rows (the seeds differ only in subset_seed).
  f = T.export_features(export_dir, fine_tune_config(args, tune_dir, 0).input, "train",
                        zero_shot=zero_shot)
  for s in range(args.seeds):
    c = fine_tune_config(args, tune_dir, s)
    _, ft = train.train_and_evaluate(c, os.path.join(wd, f"fine_tune_s{s}"))
    rec["fine_tune"].append(ft["eval/accuracy"])
    rows = T.few_shot_rows(c.input, "train")
    rec["few_shot"].append(T.estimate_all(f["features"][rows], f["logits"][rows],
                                          f["label"][rows]))
  rec["all_labels"] = T.estimate_all(f["features"], f["logits"], f["label"])
  rec["num_all_labels"] = int(len(f["label"]))
  return rec


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--out", default="workdirs/select")
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument("--shots", type=int, default=10)
  p.add_argument("--steps", type=int, default=200, help="fine-tuning steps")
  p.add_argument("--short", type=int, default=100, help="short pretraining")
  p.add_argument("--long", type=int, default=600, help="long pretraining")
  p.add_argument("--clip_steps", default="250,1000",
                 help="comma-separated CLIP pretraining lengths (one pool member each)")
  p.add_argument("--data_dir", default="")
  p.add_argument("--report_only", action="store_true",
                 help="rewrite table.md and the plot from --out's summary.json")
  args = p.parse_args()
  from jax_transfer.metrics import setup_logging
  setup_logging(logging.WARNING)
  out = os.path.abspath(args.out)
  os.makedirs(os.path.join(out, "models"), exist_ok=True)
  if args.report_only:
    with open(os.path.join(out, "summary.json")) as f:
      return write_report(json.load(f), out)
  key = {k: v for k, v in vars(args).items() if k not in ("out", "report_only")}
  t0 = time.time()
  summary = {"args": key, "models": {}}
  for name, cfg in pool(args):
    # A member's resume key: the settings it depends on (--clip_steps only a CLIP tower's).
    member_key = {k: v for k, v in key.items()
                  if k != "clip_steps" or name.startswith("clip_")}
    rec = cached_json(os.path.join(out, "models", f"{name}.json"), member_key,
                      functools.partial(run_member, args, name, cfg, out))
    summary["models"][name] = rec
    print(f"{name}: source {rec['source_accuracy']:.3f} fine-tuned "
          f"{np.mean(rec['fine_tune']):.3f}", flush=True)
  summary["wall_s"] = time.time() - t0
  with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1, default=float)
  write_report(summary, out)


def report(summary) -> str:
  from scipy import stats
  from jax_transfer.evaluators.transferability import ESTIMATORS
  models = summary["models"]
  names = list(models)
  acc = np.array([np.mean(models[n]["fine_tune"]) for n in names])
  per_seed_acc = np.array([models[n]["fine_tune"] for n in names])          # [M, S]
  few = {e: np.array([[r[e] for r in models[n]["few_shot"]] for n in names]) for e in ESTIMATORS}
  full = {e: np.array([models[n]["all_labels"][e] for n in names]) for e in ESTIMATORS}
  a = summary["args"]
  lines = [f"Pool of {len(names)} exports; target digits 5-9, {a['shots']} labels per class, "
           f"{a['steps']} fine-tuning steps, {a['seeds']} paired seeds; accuracy on all 5-9 "
           f"test images (chance 0.200).", "",
           "| export | source acc. | fine-tuned acc. | " + " | ".join(ESTIMATORS) + " |",
           "|---" * (3 + len(ESTIMATORS)) + "|"]
  for i in np.argsort(-acc):
    n = names[i]
    lines.append(f"| {n} | {models[n]['source_accuracy']:.3f} | {acc[i]:.3f} ± "
                 f"{np.std(models[n]['fine_tune']):.3f} | "
                 + " | ".join(f"{few[e][i].mean():.3f}" for e in ESTIMATORS) + " |")
  n_all = models[names[0]]["num_all_labels"]
  lines += ["", "Rank agreement with the mean fine-tuned accuracy over the pool (Kendall τ; "
            "Spearman ρ in brackets). 'few-shot set': the estimator on the labelled examples "
            "the fine-tune reads (mean over seeds); 'per seed': mean ± std over seeds of τ "
            f"between the estimator and the accuracy of the same draw; 'all labels': on all "
            f"{n_all} labelled 5-9 training images.", "",
            "| predictor | τ, few-shot set | τ per seed | τ, all labels | τ, pretrained ViTs, "
            "few-shot set | τ, pretrained ViTs, all labels |", "|---|---|---|---|---|---|"]
  vit = np.array([models[n]["model"] == "vit" for n in names])
  kt = lambda x, y: stats.kendalltau(x, y)[0]
  summary["tau"] = {}
  rows = [("source accuracy (baseline)",
           np.array([models[n]["source_accuracy"] for n in names]), None, None)]
  rows += [(e, few[e].mean(1), few[e], full[e]) for e in ESTIMATORS]
  for label, score, seeds, all_ in rows:
    tau, rho = kt(score, acc), stats.spearmanr(score, acc)[0]
    cells = [f"{tau:+.3f} ({rho:+.3f})"]
    if seeds is None:
      cells += ["—", "—", f"{kt(score[vit], acc[vit]):+.3f}", "—"]
    else:
      ps = [kt(seeds[:, s], per_seed_acc[:, s]) for s in range(seeds.shape[1])]
      cells += [f"{np.mean(ps):+.3f} ± {np.std(ps):.3f}",
                f"{kt(all_, acc):+.3f} ({stats.spearmanr(all_, acc)[0]:+.3f})",
                f"{kt(score[vit], acc[vit]):+.3f}", f"{kt(all_[vit], acc[vit]):+.3f}"]
    summary["tau"][label] = cells
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  plot(names, acc, few, models)
  return "\n".join(lines) + "\n"


def write_report(summary, out):
  table = report(summary)
  with open(os.path.join(out, "table.md"), "w") as f:
    f.write(table)
  print(table)


def plot(names, acc, few, models):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(few), figsize=(3.3 * len(few), 3.3))
  colors = {"digits": "tab:blue", "digits_rotated": "tab:orange",
            "digits_inverted": "tab:green", "digits_noisy": "tab:red",
            "shapes_captions": "tab:purple"}
  for ax, (e, v) in zip(axes, few.items()):
    seen = set()
    for i, n in enumerate(names):
      m = models[n]
      ax.scatter(v[i].mean(), acc[i], color=colors[m["source"]],
                 marker="s" if m["model"].startswith("resnet") else "*" if
                 m["model"] == "learngene" else "D" if m["model"] == "clip" else
                 ("o" if m["steps"] == max(models[k]["steps"] for k in names
                                           if models[k]["model"] == "vit") else "^"),
                 label=m["source"] if m["source"] not in seen else None)
      seen.add(m["source"])
    ax.set_xlabel(f"{e} (few-shot set)")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("fine-tuned accuracy, digits 5-9")
  axes[-1].legend(fontsize=7, loc="center left",
                 title="source\no long, ^ short ViT\n■ ResNet, * learngene\n◆ CLIP tower",
                 title_fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(os.path.dirname(__file__), "model_selection.png"), dpi=110)


if __name__ == "__main__":
  main()

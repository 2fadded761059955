r"""Merging CLIP fine-tunes on shapes_captions: task arithmetic, TIES, Fisher, aTLAS, negation
and WiSE-FT, all through jax_transfer.merge (and the 'atlas' method) on the platform's exports.

1. Pretrain a CLIP (ml_collections_configs/contrastive/shapes_clip.py:clip) for a short budget
   (--pretrain_steps, default 300 of the main job's 1000, batch 128: a weaker zero-shot
   model, so that fine-tuning has room to help) on train[:9000] and export it: θ_0.
2. Fine-tune one model per attribute task (shape, colour, size, position) from θ_0 (default
   100 steps of batch 64, AdamW lr 5e-4, weight decay 0.1, cosine, 10 warmup steps), image
   tower only (optimizer.trainable_regex '^img': img/ and img_proj/; text tower, logit scale
   frozen), as a classifier on the frozen zero-shot head (shapes_clip.py's `head=TASK`,
   contrastive.zero_shot_head: cross-entropy of exp(t) zimg @ head.T, the head the text
   embeddings of the task's prompt ensemble, as Ilharco et al.'s task vectors), for --seeds
   seeds (seed = data order; paired: every merge of seed s uses the four seed-s fine-tunes).
   Each is exported with init.export_dir = θ_0.
3. Merge the four image towers (img/, img_proj/; everything else stays θ_0's: MERGE_SKIP)
   with jax_transfer.merge.merge_exports: average; task_arithmetic, λ in 0:1:0.1; ties,
   global and per-tensor, top_k 0.2, λ in 0.5:1.5:0.1; fisher, with diagonal Fishers from
   merge.diagonal_fisher of each fine-tune's zero-shot-head logits on the first 256 training
   images (the CLI's fisher needs supervised exports); aTLAS, when jax_transfer.methods has
   'atlas': per-tensor coefficients learned on the validation images with the four tasks'
   mean cross-entropy (--atlas_steps of batch 128, the atlas config's AdamW lr 1e-2).
   λ is chosen per seed on the validation split, train[9000:] (1,000 images held out of
   every training run; shapes_captions has no validation split), by the average normalised
   accuracy (acc / that task's own fine-tune's acc). A sweep is one merge at λ = 1 and the
   line θ_0 + λ (θ_1 − θ_0) (task arithmetic, TIES and WiSE-FT are all of that form: Line);
   the chosen λ is merged again by merge_exports, checked against its point of the line,
   written as an export under --out/merged/ and evaluated on the 2,000 test images.
4. Task negation: θ_0 − λ τ_task for each task, λ in {0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2}
   chosen on the validation split as the one lowering that task's accuracy most while the
   other three tasks' mean accuracy (the control) stays >= 95% of θ_0's.
5. WiSE-FT: (1 − α) θ_0 + α θ_shape, α in 0:1:0.1, shape accuracy on the test images and on
   three shifted copies made here from them: 'palette' (RGB channels rolled to GBR),
   'invert' (255 − x) and 'noise' (+ N(0, 40²) per pixel, seed 0, clipped).
Also: the task vectors' norms and cosines (task_vector_geometry).

Writes summary.json and plots (sweeps.png, negation.png, wise_ft.png) into --out, prints the
tables. Command (experiments/RESULTS.md, "Merging CLIP fine-tunes"):
  .venv/bin/python experiments/merging/merge_clip.py --out=workdirs/merge_clip
Measured there: 43 min on 2 shared CPU cores at load average 7-12 (pretrain 398 s, eight
fine-tunes 748 s, merging and evaluation 1447 s). Finished runs, exports and per-seed results
(--out/results_seed{s}.json) are reused, so a rerun only re-tabulates; delete them to measure
again. `--quick`: a smoke run (nano towers, a few steps, one seed, one scale per sweep; 106 s
at load 2).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time

import numpy as np

TASKS = ("shape", "color", "size", "position")
TRAIN_SPLIT, VAL_SPLIT, TEST_SPLIT = "train[:9000]", "train[9000:]", "test"
TA_SCALES = [round(0.1 * i, 2) for i in range(11)]
TIES_SCALES = [round(0.5 + 0.1 * i, 2) for i in range(11)]
NEG_SCALES = [0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0]
WISE_ALPHAS = [round(0.1 * i, 2) for i in range(11)]
CONTROL_KEEP = 0.95  # negation: control accuracy kept >= 95% of the zero-shot model's
# Merged: the image tower (img/, img_proj/), the only part the fine-tunes train; the rest (text
# tower, logit scale / bias) stays θ_0's, as the task-vector papers merge CLIP's image encoder
# (it matters for TIES' global top-k, whose count would otherwise include the frozen zeros).
MERGE_SKIP = r"^(?!img)"


# ---------------------------------------------------------------------- Distribution shifts.

def shift(images: np.ndarray, kind: str) -> np.ndarray:
  """uint8 [N, H, W, 3] -> the same images under a shift that keeps shape, size, position."""
  if kind == "palette":
    return images[..., [1, 2, 0]]
  if kind == "invert":
    return 255 - images
  if kind == "noise":
    noise = np.random.default_rng(0).normal(0, 40, images.shape)
    return np.clip(images + noise, 0, 255).astype(np.uint8)
  raise ValueError(kind)


SHIFTS = ("palette", "invert", "noise")


# ----------------------------------------------------------------------------- Configs.

def pretrain_config(steps, quick, out, eval_split=VAL_SPLIT):
  """The main job's CLIP config for `steps` steps on TRAIN_SPLIT, its tokenizer trained
  first into out/tokenizer/ and named by contrastive.tokenizer_path (the same vocabulary the
  run would train itself; merge.export_layout, which builds the base's method for every merge,
  then reads it instead of training it again from the captions)."""
  from jax_transfer.methods import contrastive
  from ml_collections_configs.contrastive import shapes_clip
  c = shapes_clip.get_config("clip" + (",runlocal" if quick else ""))
  c.total_steps = steps
  c.schedule.warmup_steps = min(c.schedule.warmup_steps, max(steps // 10, 1))
  c.input.train_split = TRAIN_SPLIT
  c.eval.split = eval_split
  c.eval_every_steps = c.checkpoint_every_steps = steps
  c.contrastive.probe_train_limit = 0
  if quick:
    c.model.image_variant, c.model.text_depth = "nano/8", 1
    c.input.global_batch_size = 16
    c.contrastive.retrieval_limit = 0
  tok_dir = os.path.join(out, "tokenizer")
  contrastive.get_tokenizer(c, tok_dir)
  c.contrastive.tokenizer_path = os.path.join(tok_dir, contrastive.TOKENIZER_FILE)
  return c


def finetune_config(base, task, seed, steps, lr, eval_split=VAL_SPLIT):
  from ml_collections_configs.contrastive import shapes_clip
  c = shapes_clip.get_config(f"clip,init={base},head={task}")
  c.seed = seed
  c.total_steps = steps
  c.input.train_split = TRAIN_SPLIT
  c.eval.split = eval_split
  c.log_every_steps = max(min(c.log_every_steps, steps // 4), 1)
  c.eval_every_steps = c.checkpoint_every_steps = steps
  c.optimizer.lr = lr
  c.optimizer.weight_decay = 0.1
  c.schedule.warmup_steps = max(steps // 10, 1)
  c.contrastive.zero_shot = {task: list(c.contrastive.zero_shot[task])}
  c.contrastive.retrieval_limit = c.contrastive.probe_train_limit = 0
  return c


def atlas_config(base, tasks, steps, quick, val_split=VAL_SPLIT):
  from ml_collections_configs.merging import atlas
  c = atlas.get_config(f"base={base},tasks={'+'.join(tasks)}" + (",runlocal" if quick else ""))
  c.atlas.method = "contrastive"
  c.atlas.skip_regex = MERGE_SKIP
  c.contrastive.zero_shot_head = ",".join(TASKS)
  c.contrastive.tokenizer_path = os.path.join(base, "tokenizer.json")
  c.contrastive.retrieval_limit = c.contrastive.probe_train_limit = 0
  c.input.train_split = val_split  # aTLAS learns its coefficients on the validation images
  c.eval.split = val_split
  c.total_steps = steps
  c.eval_every_steps = c.checkpoint_every_steps = steps
  c.log_every_steps = max(min(c.log_every_steps, steps // 4), 1)
  return c


def train_and_export(config, workdir, export_dir, devices):
  """Trains (unless the export exists) and exports; returns the wall time spent (s)."""
  from jax_transfer import export as export_lib, train
  if os.path.exists(os.path.join(export_dir, "params.safetensors")):
    return 0.0
  t0 = time.time()
  train.train_and_evaluate(config, workdir, devices=devices, progress=True)
  export_lib.export_workdir(workdir, export_dir)
  return time.time() - t0


# ------------------------------------------------------------------------- Evaluation.

class ZeroShot:
  """Zero-shot accuracy of the four attributes (the prompt ensembles of the base's config,
  as ZeroShotEvaluator) on cached image sets: {name: (uint8 images, {attr: labels})}."""

  def __init__(self, base, sets, devices):
    import jax
    from jax_transfer import checkpoint, data
    from jax_transfer.evaluators.zero_shot import class_embeddings
    from jax_transfer.tokenizer import load_tokenizer
    self.model, _, self.config = checkpoint.load_pretrained(base)
    self.tokenizer = load_tokenizer(os.path.join(base, "tokenizer.json"))
    self.names = data.dataset_info(self.config.input.dataset)["attributes"]
    self.templates = {a: list(self.config.contrastive.zero_shot[a]) for a in TASKS}
    self.sets, self.device = sets, devices[0]
    self.normalise = data.normaliser(self.config.input, train=False)
    self._image = jax.jit(lambda p, x: self.model.apply({"params": p}, x,
                                                        method=self.model.encode_image))
    self._text = jax.jit(lambda p, t: self.model.apply({"params": p}, t,
                                                       method=self.model.encode_text))
    self._class_embeddings = class_embeddings

  def heads(self, params) -> dict:
    return {a: self._class_embeddings(self._text, params, self.tokenizer, self.names[a],
                                      self.templates[a]) for a in TASKS}

  def embed(self, params, images, batch=500):
    out = [np.asarray(self._image(params, self.normalise({"image": images[i:i + batch]})[
        "image"])) for i in range(0, len(images), batch)]
    return np.concatenate(out).astype(np.float64)

  def __call__(self, params, only=None) -> dict:
    """{set name: {attr: accuracy}} (sets listed in `only`, default all)."""
    import jax
    params = jax.device_put(params, self.device)
    heads = self.heads(params)
    out = {}
    for name, (images, labels) in self.sets.items():
      if only is not None and name not in only:
        continue
      z = self.embed(params, images)
      out[name] = {a: float(np.mean(np.argmax(z @ heads[a].T, -1) == labels[a]))
                   for a in labels}
    return out


def load_set(input_cfg, split):
  from jax_transfer import data
  images, labels = [], {a: [] for a in TASKS}
  for b in data.make_eval_iterator(input_cfg, split, batch_size=500):
    m = np.asarray(b["mask"])
    images.append(np.asarray(b["image"])[m])
    for a in TASKS:
      labels[a].append(np.asarray(b[a])[m])
  return np.concatenate(images), {a: np.concatenate(v) for a, v in labels.items()}


def normalised(acc: dict, own: dict) -> dict:
  """{task: acc / own fine-tune's acc} and their mean ('avg')."""
  out = {t: acc[t] / own[t] for t in TASKS}
  return {**out, "avg": float(np.mean(list(out.values())))}


def with_avg(acc: dict) -> dict:
  return {**{t: acc[t] for t in TASKS}, "avg": float(np.mean([acc[t] for t in TASKS]))}


# ----------------------------------------------------------------------------- Merging.

def fisher_of(export_dir, task, examples, batches_from, devices):
  """Diagonal Fisher ({path: array}) of a fine-tune's classifier on its own task: the
  zero-shot-head logits exp(t) zimg @ head_task.T, expected over its predicted classes, on
  the first `examples` training images (eval preprocessing)."""
  import jax
  import jax.numpy as jnp
  from jax_transfer import checkpoint, merge
  _, params, _ = checkpoint.load_pretrained(export_dir)
  ev = batches_from
  head = jnp.asarray(ev.heads(params)[task], jnp.float32)
  images = ev.sets["train_fisher"][0][:examples]

  def logits(p, b):
    z = ev.model.apply({"params": p}, b["image"], method=ev.model.encode_image)
    return jnp.exp(p["logit_scale"]) * z @ head.T

  batches = ({"image": ev.normalise({"image": images[i:i + 16]})["image"]}
             for i in range(0, len(images), 16))
  f = merge.diagonal_fisher(logits, jax.device_put(params, devices[0]), batches, "expected")
  return checkpoint.flatten(jax.device_get(f))


def task_vector_geometry(base, fts) -> dict:
  """‖τ_t‖ / ‖θ_0‖ and the cosines cos(τ_s, τ_t) over the merged (image tower) entries."""
  import re
  from jax_transfer import checkpoint
  theta0 = checkpoint.flatten(checkpoint.load_export_params(base))
  keys = sorted(k for k in theta0 if not re.search(MERGE_SKIP, k))
  flat0 = np.concatenate([theta0[k].ravel() for k in keys]).astype(np.float64)
  taus = {}
  for t, d in fts.items():
    ft = checkpoint.flatten(checkpoint.load_export_params(d))
    taus[t] = np.concatenate([ft[k].ravel() for k in keys]).astype(np.float64) - flat0
  unit = {t: v / np.linalg.norm(v) for t, v in taus.items()}
  return dict(relative_norm={t: float(np.linalg.norm(v) / np.linalg.norm(flat0))
                             for t, v in taus.items()},
              cosine={s: {t: float(unit[s] @ unit[t]) for t in TASKS} for s in TASKS},
              entries=int(flat0.size))


def choose(rows, key=lambda r: r["val_norm"]["avg"]):
  """The row with the highest `key` (the first on ties: the smallest scale)."""
  return max(rows, key=key)


# ------------------------------------------------------------------------------- Plots.

def _finish(fig, ax, path, xlabel, ylabel, title, fontsize=8):
  ax.set_xlabel(xlabel)
  if ylabel:
    ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=fontsize)
  if path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot(out, summary):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  seeds = summary["seeds"]
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, color in (("task_arithmetic", "tab:blue"), ("ties_global", "tab:orange"),
                      ("ties_tensor", "tab:green")):
    sweeps = [summary["per_seed"][str(s)]["sweeps"][name] for s in seeds]
    scales = [r["scale"] for r in sweeps[0]]
    val = np.array([[r["val_norm"]["avg"] for r in sw] for sw in sweeps])
    ax.plot(scales, val.mean(0), marker="o", color=color, label=name)
    if len(seeds) > 1:
      ax.fill_between(scales, val.min(0), val.max(0), color=color, alpha=0.15)
  for name, ls in (("average", "--"), ("fisher", ":"), ("zeroshot", "-."), ("atlas", "-")):
    vals = [summary["per_seed"][str(s)]["rows"].get(name) for s in seeds]
    if all(vals):
      ax.axhline(np.mean([v["val_norm"]["avg"] for v in vals]), color="gray", ls=ls,
                 label=name)
  _finish(fig, ax, os.path.join(out, "sweeps.png"), "scale λ",
          "validation avg normalised accuracy", "Merging 4 CLIP fine-tunes (mean, band: seeds)")
  plt.close(fig)

  fig, axes = plt.subplots(1, len(TASKS), figsize=(4 * len(TASKS), 3.4))
  for ax, task in zip(axes, TASKS):
    sweeps = [summary["per_seed"][str(s)]["negation"][task]["sweep"] for s in seeds]
    scales = [0.0] + [r["scale"] for r in sweeps[0]]
    z = [summary["per_seed"][str(s)]["rows"]["zeroshot"]["val"] for s in seeds]
    tgt = np.array([[zz[task]] + [r["val"][task] for r in sw] for zz, sw in zip(z, sweeps)])
    ctl = np.array([[np.mean([zz[t] for t in TASKS if t != task])] +
                    [r["val_control"] for r in sw] for zz, sw in zip(z, sweeps)])
    ax.plot(scales, tgt.mean(0), marker="o", label=f"{task} (negated)")
    ax.plot(scales, ctl.mean(0), marker="s", label="control (other 3)")
    ax.axhline(CONTROL_KEEP * ctl[:, 0].mean(), color="gray", ls="--", lw=1,
               label="95% of zero-shot control")
    ax.set_ylim(0, 1)
    _finish(fig, ax, None, "λ in θ_0 − λ τ", None, f"negate {task} (validation)", 7)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "negation.png"), dpi=110)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(6, 4))
  alphas = summary["wise_alphas"]
  for name, color in (("test", "black"), *zip(SHIFTS, ("tab:red", "tab:purple", "tab:olive"))):
    acc = np.array([[r[name] for r in summary["per_seed"][str(s)]["wise_ft"]] for s in seeds])
    ax.plot(alphas, acc.mean(0), marker="o", color=color,
            label="in-distribution (test)" if name == "test" else f"shifted: {name}")
    if len(seeds) > 1:
      ax.fill_between(alphas, acc.min(0), acc.max(0), color=color, alpha=0.12)
  _finish(fig, ax, os.path.join(out, "wise_ft.png"), "α in (1 − α) θ_0 + α θ_shape",
          "shape accuracy", "WiSE-FT of the shape fine-tune (mean, band: seeds)")
  plt.close(fig)


# -------------------------------------------------------------------------------- Main.

class Line:
  """θ(λ) = θ_0 + λ (θ_1 − θ_0) for a merge θ_1 = merge_exports(..., scale=1): task
  arithmetic (θ_0 + λ Σ s_i τ_i), TIES (θ_0 + λ τ_m; trim, elect and mean do not depend on
  λ) and WiSE-FT are all of this form, so a sweep costs one merge; the λ a sweep chooses is
  merged again by merge_exports and checked against its point on the line."""

  def __init__(self, theta0: dict, theta1: dict):
    self.theta0 = theta0
    self.delta = {k: np.asarray(theta1[k], np.float32) - theta0[k] for k in theta0}

  def __call__(self, lam: float) -> dict:
    return {k: self.theta0[k] + np.float32(lam) * self.delta[k] for k in self.theta0}


def max_abs_diff(a: dict, b: dict) -> float:
  return float(max(np.max(np.abs(np.asarray(a[k]) - np.asarray(b[k]))) for k in a))


def run_seed(seed, base, fts, ev, args, devices, log):
  """Every merge of seed `seed`'s four fine-tunes: {'rows', 'sweeps', 'negation', 'wise_ft'}.
  Sweep points are evaluated on the validation images; the chosen ones (merged again by
  merge_exports, written as exports under --out/merged/) on validation and test."""
  from jax_transfer import checkpoint, merge, methods
  models = [fts[t] for t in TASKS]
  theta0 = checkpoint.flatten(checkpoint.load_export_params(base))
  own_val, own_test = {}, {}

  def measure(flat, only=("val", "test")):
    r = ev(checkpoint.unflatten(flat), only=only)
    return {k: with_avg(v) for k, v in r.items()}

  def merged(method, models, **kw):
    flat, config = merge.merge_exports(base, models, method, devices=devices,
                                       skip_regex=MERGE_SKIP, **kw)
    return {k: np.asarray(v) for k, v in flat.items()}, config

  def final(name, method, models, point=None, **kw):
    """The reported merge: merge_exports at the chosen options, written as an export."""
    flat, config = merged(method, models, **kw)
    out_dir = os.path.join(args.out, "merged", f"{name}_seed{seed}")
    merge.write(flat, config, base, out_dir, overwrite=True,
                provenance=dict(method=method, base=base, models=models, skip_regex=MERGE_SKIP,
                                **{k: v for k, v in kw.items() if k != "fishers"}))
    r = measure(flat)
    if point is not None:
      r["line_check_max_abs_diff"] = max_abs_diff(flat, point)
      assert r["line_check_max_abs_diff"] < 1e-4, (name, r["line_check_max_abs_diff"])
    return r

  rows = {"zeroshot": measure(theta0)}
  for t in TASKS:
    rows[f"ft_{t}"] = measure(checkpoint.flatten(checkpoint.load_export_params(fts[t])))
    own_val[t], own_test[t] = rows[f"ft_{t}"]["val"][t], rows[f"ft_{t}"]["test"][t]

  def add_norm(r):
    r = dict(r, val_norm=normalised(r["val"], own_val))
    if "test" in r:
      r["test_norm"] = normalised(r["test"], own_test)
    return r

  rows = {k: add_norm(v) for k, v in rows.items()}
  rows["average"] = add_norm(final("average", "average", models))
  log(f"seed {seed}: average val avg-norm {rows['average']['val_norm']['avg']:.3f}")

  sweeps = {}
  for name, method, scales, kw in (
      ("task_arithmetic", "task_arithmetic", args.ta_scales, {}),
      ("ties_global", "ties", args.ties_scales, dict(top_k=0.2, scope="global")),
      ("ties_tensor", "ties", args.ties_scales, dict(top_k=0.2, scope="tensor"))):
    line = Line(theta0, merged(method, models, scale=1.0, **kw)[0])
    sweeps[name] = [dict(add_norm(measure(line(s), only=("val",))), scale=s) for s in scales]
    lam = choose(sweeps[name])["scale"]
    rows[name] = dict(add_norm(final(name, method, models, line(lam), scale=lam, **kw)),
                      scale=lam)
    log(f"seed {seed}: {name} chose λ={lam} (val avg-norm {rows[name]['val_norm']['avg']:.3f})")

  t0 = time.time()
  fishers = [fisher_of(fts[t], t, args.fisher_examples, ev, devices) for t in TASKS]
  rows["fisher"] = add_norm(final("fisher", "fisher", models, fishers=fishers))
  rows["fisher"]["fisher_time_s"] = time.time() - t0
  log(f"seed {seed}: fisher val avg-norm {rows['fisher']['val_norm']['avg']:.3f} "
      f"({time.time() - t0:.0f} s)")

  if "atlas" in methods.METHODS:
    wd = os.path.join(args.out, f"atlas_seed{seed}")
    c = atlas_config(base, models, args.atlas_steps, args.quick, args.val_split)
    c.seed = seed
    wall = train_and_export(c, wd, wd + "_export", devices)
    rows["atlas"] = add_norm(measure(checkpoint.flatten(
        checkpoint.load_export_params(wd + "_export"))))
    rows["atlas"]["train_time_s"] = wall
    log(f"seed {seed}: atlas val avg-norm {rows['atlas']['val_norm']['avg']:.3f} ({wall:.0f} s)")

  negation = {}
  z = rows["zeroshot"]
  for t in TASKS:
    line = Line(theta0, merged("task_arithmetic", [fts[t]], scale=1.0, negate=[0])[0])
    sweep = []
    for s in args.neg_scales:
      r = measure(line(s), only=("val",))
      r["val_control"] = float(np.mean([r["val"][u] for u in TASKS if u != t]))
      sweep.append(dict(r, scale=s))
    z_ctl = {sp: float(np.mean([z[sp][u] for u in TASKS if u != t])) for sp in ("val", "test")}
    ok = [r for r in sweep if r["val_control"] >= CONTROL_KEEP * z_ctl["val"]]
    pick = None
    if ok:
      lam = min(ok, key=lambda r: r["val"][t])["scale"]
      pick = dict(final(f"negate_{t}", "task_arithmetic", [fts[t]], line(lam), scale=lam,
                        negate=[0]), scale=lam)
      pick["test_control"] = float(np.mean([pick["test"][u] for u in TASKS if u != t]))
      log(f"seed {seed}: negate {t} λ={lam}: test {t} {z['test'][t]:.3f} -> "
          f"{pick['test'][t]:.3f}, control {z_ctl['test']:.3f} -> {pick['test_control']:.3f}")
    negation[t] = dict(sweep=sweep, zeroshot_control=z_ctl, chosen=pick)

  line = Line(theta0, merged("wise_ft", [fts["shape"]], scale=1.0)[0])
  wise = []
  for a in args.wise_alphas:
    r = ev(checkpoint.unflatten(line(a)), only=("test", *SHIFTS))
    wise.append({"alpha": a, **{k: v["shape"] for k, v in r.items()}})
  check = max_abs_diff(merged("wise_ft", [fts["shape"]], scale=0.5)[0], line(0.5))
  assert check < 1e-4, check
  log(f"seed {seed}: wise_ft shape test " + " ".join(f"{r['test']:.3f}" for r in wise))
  return {"rows": rows, "sweeps": sweeps, "negation": negation, "wise_ft": wise}


def mean_sd(values):
  v = np.asarray(values, float)
  return f"{v.mean():.3f}" + (f" ± {v.std(ddof=1):.3f}" if len(v) > 1 else "")


ROW_NAMES = {"zeroshot": "zero-shot θ_0", **{f"ft_{t}": f"fine-tuned on {t}" for t in TASKS},
             "average": "average (model soup)", "task_arithmetic": "task arithmetic",
             "ties_global": "TIES (global top 20%)", "ties_tensor": "TIES (per-tensor top 20%)",
             "fisher": "Fisher-weighted", "atlas": "aTLAS (val-learned per-tensor λ)"}


def tables(summary) -> str:
  seeds = summary["seeds"]
  per = [summary["per_seed"][str(s)] for s in seeds]
  lines = [f"Test accuracy ({summary['n_test']:,} images), mean ± std over {len(seeds)} "
           "fine-tune seed(s); normalised = acc / that task's own fine-tune's acc; λ chosen per seed on the "
           "validation split by average normalised accuracy", "",
           "| model | λ (per seed) | " + " | ".join(TASKS) + " | avg | normalised " +
           " | ".join(TASKS) + " | normalised avg |",
           "|---|---|" + "---|" * (2 * len(TASKS) + 2)]
  for key, name in ROW_NAMES.items():
    if key not in per[0]["rows"]:
      if key == "atlas":
        lines.append(f"| {name} | aTLAS: not run (no 'atlas' method) |" + " |" * 10)
      continue
    rs = [p["rows"][key] for p in per]
    lam = ", ".join(str(r["scale"]) for r in rs) if "scale" in rs[0] else ""
    lines.append(f"| {name} | {lam} | " +
                 " | ".join(mean_sd([r["test"][t] for r in rs]) for t in (*TASKS, "avg")) +
                 " | " + " | ".join(mean_sd([r["test_norm"][t] for r in rs])
                                    for t in (*TASKS, "avg")) + " |")
  lines += ["", "Task negation θ_0 − λ τ_task (λ chosen on validation: the lowest task accuracy "
            f"with control >= {CONTROL_KEEP:.0%} of θ_0's); test accuracy", "",
            "| negated task | λ (per seed) | task acc θ_0 | task acc negated | control θ_0 | "
            "control negated | control kept |", "|---|---|---|---|---|---|---|"]
  for t in TASKS:
    negs = [p["negation"][t] for p in per]
    if not negs[0] or any(n["chosen"] is None for n in negs):
      lines.append(f"| {t} | none keeps the control | | | | | |")
      continue
    z = [p["rows"]["zeroshot"]["test"][t] for p in per]
    lines.append(
        f"| {t} | {', '.join(str(n['chosen']['scale']) for n in negs)} | {mean_sd(z)} | "
        f"{mean_sd([n['chosen']['test'][t] for n in negs])} | "
        f"{mean_sd([n['zeroshot_control']['test'] for n in negs])} | "
        f"{mean_sd([n['chosen']['test_control'] for n in negs])} | "
        f"{mean_sd([n['chosen']['test_control'] / n['zeroshot_control']['test'] for n in negs])}"
        " |")
  geo = [summary["task_vectors"][str(s)] for s in seeds]
  lines += ["", f"Task vectors over the {geo[0]['entries']:,} merged (image tower) entries: "
            "‖τ‖ / ‖θ_0‖ and cosines, mean over seeds", "",
            "| τ | ‖τ‖ / ‖θ_0‖ | " + " | ".join(f"cos with {t}" for t in TASKS) + " |",
            "|---|---|" + "---|" * len(TASKS)]
  for t in TASKS:
    lines.append(f"| {t} | {np.mean([g['relative_norm'][t] for g in geo]):.3f} | " + " | ".join(
        f"{np.mean([g['cosine'][t][u] for g in geo]):+.3f}" for u in TASKS) + " |")
  lines += ["", "WiSE-FT of the shape fine-tune: shape accuracy vs α (test; shifted test "
            "copies)", "", "| α | " + " | ".join(("test", *SHIFTS)) + " |",
            "|---|" + "---|" * (1 + len(SHIFTS))]
  for i, a in enumerate(summary["wise_alphas"]):
    lines.append(f"| {a} | " + " | ".join(mean_sd([p["wise_ft"][i][k] for p in per])
                                         for k in ("test", *SHIFTS)) + " |")
  return "\n".join(lines)


WISE_MARGIN = 0.01  # 'beats' an endpoint: by >= 20 of the 2,000 test images (~1 s.e.)


def wise_verdict(summary) -> str:
  """Does an intermediate α beat both endpoints on each shift by >= WISE_MARGIN, and how much
  of the in-distribution gain does it keep? (mean over seeds; α: the best shifted one, on test,
  so an optimistic choice.)"""
  per = [summary["per_seed"][str(s)] for s in summary["seeds"]]
  acc = {k: np.mean([[r[k] for r in p["wise_ft"]] for p in per], 0) for k in ("test", *SHIFTS)}
  out = []
  gain = acc["test"][-1] - acc["test"][0]
  for k in SHIFTS:
    i = int(np.argmax(acc[k][1:-1])) + 1 if len(acc[k]) > 2 else 0
    beats = acc[k][i] >= max(acc[k][0], acc[k][-1]) + WISE_MARGIN
    kept = (acc["test"][i] - acc["test"][0]) / gain if gain > 0 else float("nan")
    out.append(f"{k}: best intermediate α={summary['wise_alphas'][i]} shifted "
               f"{acc[k][i]:.3f} vs α=0 {acc[k][0]:.3f} / α=1 {acc[k][-1]:.3f} "
               f"({'beats both' if beats else f'does not beat both by {WISE_MARGIN}'}), "
               f"in-distribution "
               f"{acc['test'][i]:.3f} ({kept:.0%} of the fine-tuning gain "
               f"{acc['test'][0]:.3f} -> {acc['test'][-1]:.3f})")
  return "\n".join(out)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="workdirs/merge_clip")
  parser.add_argument("--seeds", type=int, default=2, help="fine-tune seeds (paired)")
  parser.add_argument("--pretrain_steps", type=int, default=300)
  parser.add_argument("--finetune_steps", type=int, default=100)
  parser.add_argument("--finetune_batch", type=int, default=64)
  parser.add_argument("--finetune_lr", type=float, default=5e-4)
  parser.add_argument("--fisher_examples", type=int, default=256)
  parser.add_argument("--atlas_steps", type=int, default=100)
  parser.add_argument("--quick", action="store_true", help="smoke run: tiny steps and sweeps")
  args = parser.parse_args(argv)
  args.ta_scales, args.ties_scales = TA_SCALES, TIES_SCALES
  args.neg_scales, args.wise_alphas = NEG_SCALES, WISE_ALPHAS
  args.val_split, args.test_split = VAL_SPLIT, TEST_SPLIT
  if args.quick:
    args.seeds, args.pretrain_steps, args.finetune_steps, args.finetune_batch = 1, 4, 2, 16
    args.fisher_examples, args.atlas_steps = 16, 2
    args.ta_scales, args.ties_scales, args.neg_scales = [0.3], [1.0], [0.5]
    args.wise_alphas = [0.0, 0.5, 1.0]
    args.val_split, args.test_split = "train[9000:9100]", "test[:100]"

  import jax
  from jax_transfer.metrics import setup_logging
  setup_logging(logging.WARNING)  # The printed tables are the output; logs go to files.
  devices = jax.devices()[:1]  # One device: the same numbers under any device count.
  t_start = time.time()
  out = args.out = os.path.abspath(args.out)
  os.makedirs(out, exist_ok=True)
  walls = {}

  def log(msg):
    print(f"[{time.time() - t_start:6.0f} s] {msg}", flush=True)

  base = os.path.join(out, "base")
  c = pretrain_config(args.pretrain_steps, args.quick, out, args.val_split)
  log(f"pretraining CLIP {args.pretrain_steps} steps of batch {c.input.global_batch_size}")
  walls["pretrain"] = train_and_export(c, os.path.join(out, "pretrain"), base, devices)
  fts = {}
  t0 = time.time()
  for seed in range(args.seeds):
    for task in TASKS:
      d = os.path.join(out, f"ft_{task}_seed{seed}")
      fc = finetune_config(base, task, seed, args.finetune_steps, args.finetune_lr,
                           args.val_split)
      fc.input.global_batch_size = args.finetune_batch
      log(f"fine-tuning {task} seed {seed} ({args.finetune_steps} steps)")
      train_and_export(fc, d, d + "_export", devices)
      fts[seed, task] = d + "_export"
  walls["finetunes"] = time.time() - t0

  t0 = time.time()
  in_cfg = c.input
  sets = {"val": load_set(in_cfg, args.val_split), "test": load_set(in_cfg, args.test_split)}
  sets["train_fisher"] = load_set(in_cfg, f"train[:{args.fisher_examples}]")
  for k in SHIFTS:
    sets[k] = (shift(sets["test"][0], k), sets["test"][1])
  ev = ZeroShot(base, sets, devices)
  per_seed = {}
  for seed in range(args.seeds):
    cached = os.path.join(out, f"results_seed{seed}.json")  # delete it to measure again
    if os.path.exists(cached):
      with open(cached) as f:
        per_seed[str(seed)] = json.load(f)
      continue
    t1 = time.time()
    per_seed[str(seed)] = run_seed(seed, base, {t: fts[seed, t] for t in TASKS}, ev, args,
                                   devices, log)
    per_seed[str(seed)]["wall_time_s"] = time.time() - t1
    with open(cached, "w") as f:
      json.dump(per_seed[str(seed)], f, indent=1)
  vectors = {str(s): task_vector_geometry(base, {t: fts[s, t] for t in TASKS})
             for s in range(args.seeds)}
  walls["merging_and_evaluation"] = time.time() - t0
  walls["total"] = time.time() - t_start
  summary = dict(quick=args.quick, seeds=list(range(args.seeds)), per_seed=per_seed,
                 task_vectors=vectors,
                 args={k: v for k, v in vars(args).items()}, wall_time_s=walls,
                 wise_alphas=args.wise_alphas, validation_split=args.val_split,
                 n_val=len(sets["val"][0]), n_test=len(sets["test"][0]),
                 train_split=TRAIN_SPLIT)
  with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  plot(out, summary)
  print()
  print(tables(summary))
  print()
  print(wise_verdict(summary))
  print("\nwall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in walls.items()))
  print(f"plots: {out}/sweeps.png, {out}/negation.png, {out}/wise_ft.png")
  return summary


if __name__ == "__main__":
  main()

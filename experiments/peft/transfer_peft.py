r"""Parameter-efficient transfer, measured (issue #14 item 5): every config.peft method against
full fine-tuning and a linear probe on the digits transfer task, the Unified View design
choices (He et al. 2022), and few-shot CLIP transfer to unseen colour words.

1. Digits (experiments/supervised/transfer_digits.py's setup: ViT-mu/2 pretrained on digits 0-4,
   exported, transferred to digits 5-9 with --shots labels per class, --transfer_steps steps of
   batch 32, configs `digits_vit.py:transfer` / `:probe`). Arms: full fine-tuning, linear probe,
   LoRA r=8 (attention), Houlsby adapters r=8, parallel adapter r=8 (s=4), prefix (length 8),
   VPT-deep and VPT-shallow (length 8), BitFit; and for the design study LoRA r=8 at the FFN,
   a Houlsby adapter at the FFN only and the parallel adapter with s=1.
   - Learning rate (--tune): each arm picks from a 3-point grid in the 1-3-10 series, grown by
     up to two steps past an edge while the best value sits on it (`tune`), by accuracy on a
     VALIDATION split carved from digits' train split (--tune_seeds draws per point, default
     1): the labelled shots are drawn from 'train[:60%]' and accuracy is read on 5-9's images
     of 'train[60%:]' (261 images). The test split is never used to choose anything. Without
     --tune the run uses the choices of the committed --tune run (TUNED_LRS).
   - Test runs: seeds 0..--seeds-1; seed s fixes the labelled draw (input.subset_seed) and the
     init / data order (config.seed) and is the same for every arm (paired).
   - Costs, per arm, from the train step train.py builds (benchmarks/harness.py), side by side
     in this process: trainable parameters, optimiser-state bytes (the opt_state leaves), XLA's
     compiled.memory_analysis() temp + argument bytes, and median step time (best of --rounds
     interleaved rounds).
2. CLIP few-shot (ml_collections_configs/contrastive/shapes_clip.py, `clip`): a short pretraining
   (--clip_pretrain_steps of batch 128) on shapes_captions WITHOUT two of the eight colours
   (white, orange: their images are dropped through input.label_key='color', input.classes;
   the tokenizer still knows the words, whose embeddings stay at their random init), exported;
   then --clip_shots labelled images per colour (all 8) fine-tune the export
   (config.init_from_export) with full FT, LoRA (both towers' attention), VPT (image tower),
   CoOp (text context) and BitFit, by --clip_loss: 'head' (default), cross-entropy of the colour
   label under the zero-shot head (contrastive.zero_shot_head: the text tower's embeddings of
   the colour prompts, CoOp's objective), or 'captions', the contrastive loss on their
   captions. Read: zero-shot colour accuracy (8-way, the config's prompt ensemble) on the test
   images of the held-out colours and of the seen ones, before (the export) and after.
   Learning rates (--tune): a 2-point grid per arm, grown by up to two steps past an edge, on
   a validation carve (one draw of shots from 'train[:80%]', read on 'train[80%:]'); then
   --clip_seeds paired seeds on the test split.

  python experiments/peft/transfer_peft.py --out=workdirs/transfer_peft     # stored lrs
  python experiments/peft/transfer_peft.py --tune --out=workdirs/transfer_peft   # grids too
  python experiments/peft/transfer_peft.py --quick --out=/tmp/peft_quick   # smoke run

Writes summary_<parts>.json and tables_<parts>.md to --out (e.g. summary_digits+clip_head.json)
and the plots digits_peft.png, unified_view.png and clip_fewshot_<loss>.png to --plots
(default: beside this script; --quick: --out). Finished runs are reused when the script runs
again with the same --out (each run's config.json must match).
Tables and their reading: experiments/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [REPO, os.path.join(REPO, "benchmarks")]  # experiments.*, harness

from experiments.supervised import transfer_digits  # noqa: E402

PEFT_GRID = (1e-3, 3e-3, 1e-2)
# name -> (digits_vit.py argument, overrides, lr grid, table label)
DIGITS_ARMS = {
    "full": ("transfer", {}, (3e-4, 1e-3, 3e-3), "full fine-tuning"),
    # transfer_digits.py's fine-tuning lr, a reference: not chosen here (a 1-point grid).
    "full_5e-4": ("transfer", {}, (5e-4,), "full fine-tuning at lr 5e-4 (reference)"),
    "probe": ("probe", {}, (1e-2, 3e-2, 1e-1), "linear probe (head only)"),
    "lora": ("transfer", {"peft.method": "lora", "peft.rank": 8}, PEFT_GRID,
             "LoRA r=8, attention qkv+out"),
    "adapter": ("transfer", {"peft.method": "adapter", "peft.rank": 8}, PEFT_GRID,
                "Houlsby adapters r=8, attention+FFN"),
    "parallel": ("transfer", {"peft.method": "parallel_adapter", "peft.rank": 8,
                              "peft.scale": 4.0}, PEFT_GRID, "parallel adapter r=8, s=4, FFN"),
    "prefix": ("transfer", {"peft.method": "prefix", "peft.length": 8}, PEFT_GRID,
               "prefix tuning, length 8"),
    "vpt_deep": ("transfer", {"peft.method": "vpt", "peft.length": 8, "peft.deep": True},
                 PEFT_GRID, "VPT-deep, 8 prompts"),
    "vpt_shallow": ("transfer", {"peft.method": "vpt", "peft.length": 8, "peft.deep": False},
                    PEFT_GRID, "VPT-shallow, 8 prompts"),
    "bitfit": ("transfer", {"peft.method": "bitfit"}, PEFT_GRID, "BitFit"),
    # The Unified View design study's extra arms.
    "lora_ffn": ("transfer", {"peft.method": "lora", "peft.rank": 8,
                              "peft.target_regex": r".*mlp/(fc1|fc2)"}, PEFT_GRID,
                 "LoRA r=8, FFN fc1+fc2"),
    "adapter_ffn": ("transfer", {"peft.method": "adapter", "peft.rank": 8,
                                 "peft.target_regex": r".*mlp"}, PEFT_GRID,
                    "Houlsby adapter r=8, FFN only"),
    "parallel_s1": ("transfer", {"peft.method": "parallel_adapter", "peft.rank": 8,
                                 "peft.scale": 1.0}, PEFT_GRID, "parallel adapter r=8, s=1, FFN"),
}
# The learning rates `--tune` chose on the validation splits (experiments/RESULTS.md shows its
# grids); the default run uses these, --tune chooses again.
TUNED_LRS = {
    "digits": {"full": 1e-3, "full_5e-4": 5e-4, "probe": 0.1, "lora": 1e-2, "adapter": 1e-2,
               "parallel": 3e-2, "prefix": 1e-2, "vpt_deep": 1e-2, "vpt_shallow": 3e-2,
               "bitfit": 0.1, "lora_ffn": 3e-2, "adapter_ffn": 1e-2, "parallel_s1": 3e-2},
    "clip": {"head": {"full": 3e-3, "lora": 3e-2, "vpt": 1e-2, "coop": 3e-3, "bitfit": 3e-2},
             "captions": {"full": 1e-3, "lora": 1e-2, "vpt": 1e-2, "coop": 3e-3, "bitfit": 1e-2}},
}
# (question, arm A, arm B): the paper's claim is that B is better.
DESIGN = (("placement: LoRA at attention vs at the FFN", "lora", "lora_ffn"),
          ("sequential vs parallel adapter at the FFN", "adapter_ffn", "parallel"),
          ("parallel adapter: unscaled s=1 vs scaled s=4", "parallel_s1", "parallel"))
VAL_SEEDS0 = 100  # validation draws use seeds 100, 101, ...: never a test seed
# --quick shrinks the models too (fewer, smaller programs to compile): main() sets these.
QUICK_MODELS = {"digits": {"model.variant": "nano/2"},
                "clip": {"model.image_variant": "nano/4", "model.text_width": 32,
                         "model.text_depth": 1, "model.text_heads": 2, "model.embed_dim": 32}}
MODELS = {"digits": {}, "clip": {}}

SEEN_COLORS, HELDOUT_COLORS = (0, 1, 2, 3, 4, 5), (6, 7)  # red..cyan | white, orange
CLIP_ARMS = {  # name -> (overrides, lr grid, label)
    "full": ({}, (1e-4, 3e-4), "full fine-tuning"),
    "lora": ({"peft.method": "lora", "peft.rank": 8}, (1e-3, 3e-3),
             "LoRA r=8, attention, both towers"),
    "vpt": ({"peft.method": "vpt", "peft.length": 8}, (1e-3, 3e-3),
            "VPT-deep, image tower, 8 prompts"),
    "coop": ({"peft.method": "coop", "peft.length": 4}, (1e-3, 3e-3), "CoOp, 4 context vectors"),
    "bitfit": ({"peft.method": "bitfit"}, (1e-3, 3e-3), "BitFit, both towers"),
}


# ------------------------------------------------------------------------------------ Runs.

def skip_added(skip: str) -> str:
  """init.skip_regex that also skips the parameters PEFT adds: a base export has none of them
  (checkpoint.merge_pretrained refuses a selected path the export lacks)."""
  from jax_transfer import peft
  added = rf"(^|/){peft.ADDED}$"
  return f"{skip}|{added}" if skip and skip != "^$" else added


def run(cfg, workdir, **overrides):
  """train.train_and_evaluate(cfg with overrides) -> (final state or None, final metrics),
  reusing a finished run of the same config in `workdir`."""
  from jax_transfer import train
  from jax_transfer.config import with_overrides
  cfg = with_overrides(cfg, **overrides)
  done = os.path.join(workdir, "final_metrics.json")
  if os.path.exists(done):
    with open(os.path.join(workdir, "config.json")) as f:
      if f.read() != cfg.to_json_best_effort(indent=2):
        raise SystemExit(f"{workdir} holds another config's run: use a fresh --out")
    with open(done) as f:
      return None, json.load(f)
  return train.train_and_evaluate(cfg, workdir, progress=True)


def digits_config(arm: str, lr: float, steps: int, export_dir: str):
  from ml_collections_configs.supervised import digits_vit
  from jax_transfer.config import with_overrides
  arg, overrides, _, _ = DIGITS_ARMS[arm]
  c = with_overrides(digits_vit.get_config(arg), **overrides, **MODELS["digits"])
  c.optimizer.lr = lr
  c.total_steps = steps
  c.eval_every_steps = c.checkpoint_every_steps = c.log_every_steps = steps
  c.init.export_dir = export_dir
  if c.peft.method != "none":
    c.init.skip_regex = skip_added(c.init.skip_regex)
  return c


def digits_accuracy(out, arm, lr, seed, args, export_dir, validation):
  c = digits_config(arm, lr, args.transfer_steps, export_dir)
  split = {"input.train_split": "train[:60%]", "eval.split": "train[60%:]"} if validation else {}
  name = f"{'val_' if validation else ''}{arm}_lr{lr:g}_seed{seed}"
  _, final = run(c, os.path.join(out, "digits", name), seed=seed,
                 **{"input.subset_seed": seed, "input.examples_per_class": args.shots, **split})
  return final["eval/accuracy"]


def next_lr(lr: float, up: bool) -> float:
  """The neighbour of `lr` in the 1-3-10 series (1e-3 -> 3e-3 -> 1e-2 ...)."""
  e = math.floor(math.log10(lr) + 1e-9)
  m = round(lr / 10 ** e)
  value = ((3 if m == 1 else 10) * 10.0 ** e if up else
           3 * 10.0 ** (e - 1) if m == 1 else 10.0 ** e)
  return float(f"{value:.1g}")


def tune(arms, grids, evaluate, seeds, extend: int = 2):
  """{arm: {lr: [metric per seed]}} and {arm: chosen lr}: the highest mean; while it is at an
  edge of the grid, the grid grows one 1-3-10 step past that edge (at most `extend` times),
  so a choice at an edge of the tried values means `extend` steps did not reach the optimum.
  A 1-point grid is taken as it is, without runs."""
  table, chosen = {}, {}
  for arm in arms:
    grid = sorted(grids[arm])
    if len(grid) == 1:
      chosen[arm] = grid[0]
      continue
    results = {}
    for _ in range(extend + 1):
      for lr in grid:
        if lr not in results:
          results[lr] = [evaluate(arm, lr, s) for s in seeds]
      best = max(grid, key=lambda lr: np.mean(results[lr]))
      if best == grid[-1]:
        grid.append(next_lr(grid[-1], up=True))
      elif best == grid[0]:
        grid.insert(0, next_lr(grid[0], up=False))
      else:
        break
    table[arm], chosen[arm] = dict(sorted(results.items())), best
    print(f"      {arm:12s} validation " + ", ".join(
        f"lr {lr:g}: {np.mean(v):.3f}" for lr, v in table[arm].items())
          + f" -> lr {best:g}", flush=True)
  return table, chosen


# ----------------------------------------------------------------------------------- Costs.

def count_params(params, cfg) -> tuple[int, int]:
  """(trainable, all) parameter counts of a (possibly abstract) param tree under `cfg`."""
  import flax
  from jax_transfer import optim, peft
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  trainable = optim.trainable_paths(params, peft.optimizer_config(cfg))
  size = lambda v: int(np.prod(v.shape))
  return (sum(size(v) for k, v in flat.items() if trainable is None or k in trainable),
          sum(size(v) for v in flat.values()))


def costs(configs: dict, args):
  """Per arm of `configs` ({arm: config}): trainable / all params, optimiser-state bytes,
  compiled temp and argument bytes, and the best over --rounds of the median step time (the
  arms interleaved, one process). Each step is the one train.py builds, fed one batch of its
  config's own train pipeline (images, labels, tokenised captions: method.host_batch)."""
  import jax
  import harness  # benchmarks/harness.py
  from jax_transfer import data
  built = {}
  for arm, c in configs.items():
    ts = harness.build_train_step(c, devices=jax.devices()[:1])
    local = ts.method.host_batch(next(data.make_train_iterator(c.input, seed=c.seed)))
    with ts.context():
      batch = ts.global_batch(local)
      compiled = ts.step.lower(ts.state, batch).compile()
    mem = compiled.memory_analysis()
    n_train, n_all = count_params(ts.state.params, c)
    built[arm] = (ts, compiled, batch, dict(
        n_train=n_train, n_all=n_all,
        opt_bytes=sum(x.nbytes for x in jax.tree.leaves(ts.state.opt_state)),
        temp_bytes=mem.temp_size_in_bytes, argument_bytes=mem.argument_size_in_bytes))
  times = {arm: [] for arm in configs}
  for _ in range(args.rounds):
    for arm, (ts, compiled, batch, _) in built.items():
      state = ts.fresh_state()  # outside ts.context(): under it train.abstract_state fails
      with ts.context():
        timing, _, _ = harness.time_step(compiled, state, batch, 5, args.time_steps)
      times[arm].append(timing["median_s"] * 1e3)
  return {arm: dict(b[3], step_ms=min(times[arm]), step_ms_rounds=times[arm])
          for arm, b in built.items()}


# ------------------------------------------------------------------------------------ CLIP.

def clip_config(steps: int, lr: float | None = None, export_dir: str | None = None,
                overrides: dict | None = None, loss: str = "head"):
  """Pretraining (no export_dir) or few-shot from `export_dir`: with loss 'head', cross-entropy
  of the colour labels under the zero-shot head (contrastive.zero_shot_head='color': the text
  tower's embeddings of the colour prompts; CoOp's objective), with 'captions' the contrastive
  loss on the image-caption pairs."""
  from ml_collections_configs.contrastive import shapes_clip
  from jax_transfer.config import init_from_export, with_overrides
  c = shapes_clip.get_config("clip")
  if export_dir:
    init_from_export(c, export_dir, keep_head=True)
    c.input.global_batch_size = 32
    c.schedule.warmup_steps = max(1, steps // 10)
  else:  # pretraining: room for CoOp's 4 context tokens in the longest caption (14 tokens)
    c.model.context_length = 20
    with_overrides(c, **MODELS["clip"])
    c.schedule.warmup_steps = min(c.schedule.warmup_steps, steps // 4)
  c.input.label_key = "color"
  c.total_steps = steps
  c.eval_every_steps = c.checkpoint_every_steps = steps
  c.log_every_steps = min(50, steps)
  # Only the zero-shot colour evaluator runs in the loop (final step; on the pretraining's seen
  # colours); ColourZeroShot reads the held-out and the seen colours after a few-shot run.
  c.contrastive.update(retrieval_limit=0, probe_train_limit=0)
  c.contrastive.zero_shot = {"color": colour_templates()}
  if export_dir and loss == "head":
    c.contrastive.zero_shot_head = "color"
  if lr is not None:
    c.optimizer.lr = lr
  c = with_overrides(c, **(overrides or {}))
  if c.peft.method != "none":
    c.init.skip_regex = skip_added(c.init.skip_regex)
  return c


class ColourZeroShot:
  """Zero-shot colour accuracy (8-way, the config's prompt ensemble) on the held-out and on the
  seen colours' images of `split`, for config `cfg`'s model (PEFT included): the platform's
  zero-shot steps (evaluators.zero_shot.class_embeddings, evaluators.common.embed_split), with
  the predictions split by colour. Built once per model, so its jitted encoders are reused."""

  def __init__(self, cfg, workdir, split):
    import jax
    from jax_transfer import data, methods, parallel
    self.cfg = cfg.copy_and_resolve_references()
    self.cfg.input.classes = self.cfg.input.examples_per_class = None
    self.split, self.mesh = split, parallel.make_mesh(cfg.mesh, jax.devices())
    self.rules = parallel.rules_from_config(cfg.sharding_rules)
    self.method = methods.get_method(cfg.method)(self.cfg, self.mesh, workdir)
    self.image_fn = jax.jit(lambda p, images: self.method.encode_image(p, images))
    self.text_fn = jax.jit(self.method.encode_text)
    self.names = data.dataset_info("shapes_captions")["attributes"]["color"]

  def __call__(self, params) -> dict:
    import jax
    from jax_transfer import parallel
    from jax_transfer.evaluators.common import embed_split
    from jax_transfer.evaluators.zero_shot import class_embeddings
    with jax.set_mesh(self.mesh), parallel.with_sharding_rules(self.rules):
      emb = embed_split(self.image_fn, params, self.cfg.input, self.split,
                        self.cfg.eval.batch_size, self.mesh,
                        inputs=lambda b: {"images": b["image"]}, keep=("color",))
      zc = class_embeddings(self.text_fn, params, self.method.tokenizer, self.names,
                            colour_templates())
    pred = np.argmax(emb["out"].astype(np.float64) @ zc.T, axis=-1)
    right, held = pred == emb["color"], np.isin(emb["color"], HELDOUT_COLORS)
    return {"heldout": float(right[held].mean()), "seen": float(right[~held].mean())}


def colour_templates() -> list[str]:
  from ml_collections_configs.contrastive import shapes_clip
  return list(shapes_clip.get_config().contrastive.zero_shot.color)


def clip_part(out, args):
  """Pretrain without the held-out colours, export, tune, few-shot runs: the CLIP summary."""
  from jax_transfer import checkpoint, export as export_lib
  root = os.path.join(out, "clip")
  pre_dir, export_dir = os.path.join(root, "pretrain"), os.path.join(root, "export")
  print(f"[CLIP 1/3] pretraining on shapes_captions without white and orange "
        f"({args.clip_pretrain_steps} steps of batch {args.clip_pretrain_batch})...", flush=True)
  pre_cfg = clip_config(args.clip_pretrain_steps)
  pre_cfg.input.global_batch_size = args.clip_pretrain_batch
  pre_cfg.input.classes = SEEN_COLORS
  run(pre_cfg, pre_dir)
  if not os.path.exists(os.path.join(export_dir, "config.json")):
    export_lib.export_workdir(pre_dir, export_dir)
  before = ColourZeroShot(pre_cfg, pre_dir, "test")(checkpoint.load_export_params(export_dir))
  print(f"      zero-shot colour accuracy of the export: held-out {before['heldout']:.3f}, "
        f"seen {before['seen']:.3f}", flush=True)

  scorers = {}  # (arm, split) -> ColourZeroShot, built once (its jitted encoders reused)

  def score(arm, lr, seed, validation):
    c = clip_config(args.clip_steps, lr, export_dir, CLIP_ARMS[arm][0], args.clip_loss)
    name = f"{'val_' if validation else ''}{arm}_lr{lr:g}_seed{seed}"
    workdir = os.path.join(root, args.clip_loss, name)
    split = "train[80%:]" if validation else "test"
    state, _ = run(c, workdir, seed=seed, **{
        "input.subset_seed": seed, "input.examples_per_class": args.clip_shots,
        **({"input.train_split": "train[:80%]"} if validation else {})})
    result = os.path.join(workdir, "colour_zero_shot.json")
    if state is None:  # a finished run, reused
      with open(result) as f:
        return json.load(f)
    if (arm, split) not in scorers:
      scorers[arm, split] = ColourZeroShot(c, workdir, split)
    r = scorers[arm, split](state.params)
    with open(result, "w") as f:
      json.dump(r, f)
    return r

  arms = ["full", "coop"] if args.quick else list(CLIP_ARMS)
  grids = {a: CLIP_ARMS[a][1][:1] if args.quick else CLIP_ARMS[a][1] for a in arms}
  print(f"[CLIP 2/3] learning rates on the validation carve ({args.clip_shots} pairs per "
        f"colour, {args.clip_steps} steps; metric: mean of held-out and seen)...", flush=True)
  if args.tune or args.quick:
    grid, lrs = tune(arms, grids, lambda a, lr, s: float(np.mean(list(
        score(a, lr, s, True).values()))), [VAL_SEEDS0])
  else:
    grid, lrs = {}, {a: TUNED_LRS["clip"][args.clip_loss][a] for a in arms}
    print(f"      the stored choices of --tune: {lrs}", flush=True)
  print(f"[CLIP 3/3] few-shot runs on the test split, {args.clip_seeds} paired seeds...",
        flush=True)
  runs = {a: [score(a, lrs[a], s, False) for s in range(args.clip_seeds)] for a in arms}
  for a in arms:
    print(f"      {a:8s} lr {lrs[a]:g}: held-out " +
          " ".join(f"{r['heldout']:.3f}" for r in runs[a]) + "  seen " +
          " ".join(f"{r['seen']:.3f}" for r in runs[a]), flush=True)
  print(f"      costs of each arm's train step ({args.rounds} interleaved rounds of "
        f"{args.time_steps} steps, batch 32 of its own pipeline)...", flush=True)
  cost = costs({a: clip_config(args.clip_steps, lrs[a], export_dir, CLIP_ARMS[a][0],
                               args.clip_loss) for a in arms}, args)
  return dict(loss=args.clip_loss, before=before, lrs=lrs, runs=runs, costs=cost,
              grid={a: {f"{lr:g}": v for lr, v in g.items()} for a, g in grid.items()})


def digits_part(out, args):
  """Pretrain (or reuse --export_dir), tune, test runs, costs: the digits summary."""
  from jax_transfer import export as export_lib, train
  from jax_transfer.config import with_overrides
  from ml_collections_configs.supervised import digits_vit
  export_dir = args.export_dir
  if not export_dir:  # transfer_digits.py's pretraining, as it runs it
    print(f"[digits 1/4] pretraining a ViT on digits 0-4 ({args.pretrain_steps} steps)...",
          flush=True)
    pre_cfg = with_overrides(digits_vit.get_config(""), **MODELS["digits"])
    pre_cfg.total_steps = args.pretrain_steps
    pre_dir, export_dir = os.path.join(out, "pretrain"), os.path.join(out, "pretrain_export")
    if not os.path.exists(os.path.join(pre_dir, "final_metrics.json")):
      transfer_digits.run_arm(train, pre_cfg, pre_dir)
    if not os.path.exists(os.path.join(export_dir, "config.json")):
      export_lib.export_workdir(pre_dir, export_dir)
  arms = ["full", "lora", "lora_ffn"] if args.quick else list(DIGITS_ARMS)
  grids = {a: DIGITS_ARMS[a][2][1:2] if args.quick else DIGITS_ARMS[a][2] for a in arms}
  val_seeds = range(VAL_SEEDS0, VAL_SEEDS0 + args.tune_seeds)
  print(f"[digits 2/4] learning rates on the validation split ({len(val_seeds)} draws per "
        "grid point)...", flush=True)
  if args.tune or args.quick:
    grid, lrs = tune(arms, grids, lambda a, lr, s: digits_accuracy(
        out, a, lr, s, args, export_dir, validation=True), val_seeds)
  else:
    grid, lrs = {}, {a: TUNED_LRS["digits"][a] for a in arms}
    print(f"      the stored choices of --tune: {lrs}", flush=True)
  print(f"[digits 3/4] test runs: {args.shots} labels/class, {args.transfer_steps} steps, "
        f"{args.seeds} paired seeds...", flush=True)
  acc = {}
  for a in arms:
    acc[a] = [digits_accuracy(out, a, lrs[a], s, args, export_dir, validation=False)
              for s in range(args.seeds)]
    print(f"      {a:12s} lr {lrs[a]:g}: " + " ".join(f"{x:.3f}" for x in acc[a]), flush=True)
  print(f"[digits 4/4] costs of each arm's train step ({args.rounds} interleaved rounds of "
        f"{args.time_steps} steps)...", flush=True)
  return dict(export_dir=export_dir, lrs=lrs, accuracy=acc, costs=costs(
      {a: digits_config(a, lrs[a], args.transfer_steps, None) for a in arms}, args),
              grid={a: {f"{lr:g}": v for lr, v in g.items()} for a, g in grid.items()})


# ---------------------------------------------------------------------------------- Tables.

def _ms(v) -> str:
  return f"{np.mean(v):.3f} ± {np.std(v):.3f}"


def _paired(a, b) -> str:
  d = np.asarray(b) - np.asarray(a)
  return f"{d.mean():+.3f} ({int((d > 0).sum())}/{len(d)})"


def grid_table(grid, lrs, labels, metric) -> list[str]:
  rows = [f"| arm | lr: {metric} | chosen |", "|---|---|---|"]
  for a, g in grid.items():
    rows.append(f"| {labels[a]} | " + ", ".join(f"{lr}: {np.mean(v):.3f}" for lr, v in g.items())
                + f" | {lrs[a]:g} |")
  return rows


def digits_tables(d) -> list[str]:
  acc, cost = d["accuracy"], d["costs"]
  rows = [f"| arm | lr | {COST_HEADER} | test accuracy | paired diff vs full "
          "(seeds better) |", "|---|---|---|---|---|---|---|---|"]
  for a in acc:
    rows.append(f"| {DIGITS_ARMS[a][3]} | {d['lrs'][a]:g} | {_cost_cells(cost[a])} | "
                f"{_ms(acc[a])} | " + ("—" if a == "full" else _paired(acc["full"], acc[a]))
                + " |")
  grid = grid_table(d["grid"], d["lrs"], {a: DIGITS_ARMS[a][3] for a in d["grid"]},
                    "validation accuracy (5-9 images of train[60%:])")
  design = ["| question | A | B | A accuracy | B accuracy | paired B − A (seeds B better) "
            "| trainable A / B |", "|---|---|---|---|---|---|---|"]
  for q, a, b in DESIGN:
    if a in acc and b in acc:
      design.append(f"| {q} | {DIGITS_ARMS[a][3]} | {DIGITS_ARMS[b][3]} | {_ms(acc[a])} | "
                    f"{_ms(acc[b])} | {_paired(acc[a], acc[b])} | {cost[a]['n_train']:,} / "
                    f"{cost[b]['n_train']:,} |")
  return rows + [""] + design + ([""] + grid if d["grid"] else [])


def _cost_cells(c) -> str:
  """trainable params (%) | optimiser state | peak memory (temp + args) | step time: the cost
  columns of one arm (costs())."""
  kib = lambda n: f"{n / 1024:,.1f} KiB"
  return (f"{c['n_train']:,} ({100 * c['n_train'] / c['n_all']:.2f}%) | {kib(c['opt_bytes'])} | "
          f"{kib(c['temp_bytes'] + c['argument_bytes'])} ({kib(c['temp_bytes'])} + "
          f"{kib(c['argument_bytes'])}) | {c['step_ms']:.2f}")


COST_HEADER = ("trainable params (% of model) | optimiser state | peak memory (temp + args) | "
               "step time (median ms)")


def clip_tables(c) -> list[str]:
  rows = [f"| arm | lr | {COST_HEADER} | held-out colours (white, orange) | "
          "seen colours | paired held-out gain vs full (seeds better) |",
          "|---|---|---|---|---|---|---|---|---|",
          f"| pretrained export, no few-shot | — | — | — | — | — | "
          f"{c['before']['heldout']:.3f} | {c['before']['seen']:.3f} | — |"]
  for a, runs in c["runs"].items():
    held, seen = [r["heldout"] for r in runs], [r["seen"] for r in runs]
    full = [r["heldout"] for r in c["runs"]["full"]]
    rows.append(f"| {CLIP_ARMS[a][2]} | {c['lrs'][a]:g} | {_cost_cells(c['costs'][a])} | "
                f"{_ms(held)} | {_ms(seen)} | " + ("—" if a == "full" else _paired(full, held))
                + " |")
  grid = grid_table(c["grid"], c["lrs"], {a: CLIP_ARMS[a][2] for a in c["grid"]},
                    "validation mean of held-out and seen colour accuracy (train[80%:])")
  return rows + ([""] + grid if c["grid"] else [])


# ----------------------------------------------------------------------------------- Plots.

def _save(fig, ax, path, xlabel, ylabel, title):
  ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def plots(summary, where):
  """digits_peft.png (accuracy vs trainable parameters), unified_view.png (the design study's
  paired differences) and clip_fewshot_<loss>.png (held-out / seen colour accuracy per arm)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  d = summary.get("digits")
  if d:
    acc, cost = d["accuracy"], d["costs"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for a, v in acc.items():
      n = cost[a]["n_train"]
      ax.scatter([n] * len(v), v, s=10, alpha=0.4)
      ax.errorbar([n], [np.mean(v)], yerr=[np.std(v)], fmt="o", capsize=3)
      ax.annotate(a, (n, np.mean(v)), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    _save(fig, ax, os.path.join(where, "digits_peft.png"), "trainable parameters (log)",
          "test accuracy, digits 5-9", "PEFT, digits 0-4 -> 5-9, 10 labels/class (dots: seeds)")
    pairs = [(a, b) for _, a, b in DESIGN if a in acc and b in acc]
    if pairs:
      fig, ax = plt.subplots(figsize=(7, 3.2))
      for i, (a, b) in enumerate(pairs):
        diff = np.asarray(acc[b]) - np.asarray(acc[a])
        ax.scatter(diff, [i] * len(diff), alpha=0.6)
        ax.plot([diff.mean()], [i], "k|", markersize=20)
      ax.axvline(0, color="gray", linestyle="--")
      ax.set_yticks(range(len(pairs)),
                    [f"{DIGITS_ARMS[b][3]}\n− {DIGITS_ARMS[a][3]}" for a, b in pairs],
                    fontsize=7)
      _save(fig, ax, os.path.join(where, "unified_view.png"),
            "paired test-accuracy difference (dots: seeds, bar: mean)", "",
            "Unified View design choices (> 0: the paper's choice is better)")
  c = summary.get("clip")
  if c:
    arms = list(c["runs"])
    fig, ax = plt.subplots(figsize=(7, 3.8))
    x = np.arange(len(arms))
    for off, key, label in ((-0.2, "heldout", "held-out colours"), (0.2, "seen", "seen colours")):
      v = [[r[key] for r in c["runs"][a]] for a in arms]
      ax.bar(x + off, [np.mean(u) for u in v], 0.4, yerr=[np.std(u) for u in v], capsize=3,
             label=label)
      ax.axhline(c["before"][key], color="C0" if key == "heldout" else "C1", linestyle=":",
                 linewidth=1)
    ax.set_xticks(x, arms)
    ax.set_ylim(0, 1)
    ax.legend()
    _save(fig, ax, os.path.join(where, f"clip_fewshot_{c['loss']}.png"), "",
          "zero-shot colour accuracy (8-way)",
          f"CLIP few-shot ({c['loss']} loss) to unseen colour words (dotted: before)")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="workdirs/transfer_peft")
  parser.add_argument("--plots", default=None, help="plot folder (default: this script's)")
  parser.add_argument("--parts", default="digits,clip")
  parser.add_argument("--quick", action="store_true",
                      help="smoke run: nano models, a few steps, 1 seed, 3 + 2 arms, no tuning")
  parser.add_argument("--tune", action="store_true",
                      help="choose every learning rate on the validation splits (default: "
                           "the stored choices of a --tune run, TUNED_LRS)")
  parser.add_argument("--export_dir", default=None,
                      help="a digits 0-4 export to reuse (transfer_digits.py's "
                           "pretrain_export); default: pretrain it as transfer_digits.py does")
  parser.add_argument("--seeds", type=int, default=5)
  parser.add_argument("--tune_seeds", type=int, default=1, help="validation draws per lr")
  parser.add_argument("--shots", type=int, default=10)
  parser.add_argument("--pretrain_steps", type=int, default=600)
  parser.add_argument("--transfer_steps", type=int, default=200)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--time_steps", type=int, default=50)
  parser.add_argument("--clip_pretrain_steps", type=int, default=400)
  parser.add_argument("--clip_pretrain_batch", type=int, default=128)
  parser.add_argument("--clip_shots", type=int, default=4, help="pairs per colour")
  parser.add_argument("--clip_steps", type=int, default=100)
  parser.add_argument("--clip_seeds", type=int, default=3)
  parser.add_argument("--clip_loss", default="head", choices=("head", "captions"),
                      help="few-shot objective: colour cross-entropy under the zero-shot head "
                           "(CoOp's), or the contrastive loss on the captions")
  args = parser.parse_args()
  if args.quick:
    args.seeds, args.tune_seeds, args.pretrain_steps, args.transfer_steps = 1, 1, 20, 10
    args.rounds, args.time_steps, args.clip_seeds = 1, 3, 1
    args.clip_pretrain_steps, args.clip_pretrain_batch, args.clip_steps = 10, 32, 5
    MODELS.update(QUICK_MODELS)

  import jax
  from jax_transfer.metrics import setup_logging
  setup_logging(logging.WARNING)  # The printed tables are the output; logs go to files.
  out = os.path.abspath(args.out)
  os.makedirs(out, exist_ok=True)
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # seeds of an arm compile the same step
    jax.config.update("jax_compilation_cache_dir", os.path.join(out, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  where = args.plots or (out if args.quick else HERE)
  os.makedirs(where, exist_ok=True)
  parts = args.parts.split(",")
  tag = "+".join(parts) + (f"_{args.clip_loss}" if "clip" in parts else "")  # output names
  t0 = time.time()
  summary = {"args": vars(args), "load_before": os.getloadavg()}
  if "digits" in parts:
    summary["digits"] = digits_part(out, args)
    summary["digits_wall_s"] = time.time() - t0
  if "clip" in parts:
    t1 = time.time()
    summary["clip"] = clip_part(out, args)
    summary["clip_wall_s"] = time.time() - t1
  summary["wall_time_s"] = time.time() - t0
  summary["cpu_time_s"] = time.process_time()  # this process's user + system time
  summary["load_after"] = os.getloadavg()
  with open(os.path.join(out, f"summary_{tag}.json"), "w") as f:
    json.dump(summary, f, indent=2)
  plots(summary, where)
  lines = []
  if "digits" in summary:
    lines += [f"Digits 0-4 -> 5-9, {args.shots} labels/class, {args.transfer_steps} steps, "
              f"{args.seeds} paired seeds ({summary['digits_wall_s']:.0f} s)", ""]
    lines += digits_tables(summary["digits"]) + [""]
  if "clip" in summary:
    lines += [f"CLIP few-shot ({args.clip_loss} loss), {args.clip_shots} images/colour, "
              f"{args.clip_steps} steps, "
              f"{args.clip_seeds} paired seeds ({summary['clip_wall_s']:.0f} s)", ""]
    lines += clip_tables(summary["clip"]) + [""]
  lines.append(f"wall time {summary['wall_time_s']:.0f} s (process CPU time "
               f"{summary['cpu_time_s']:.0f} s); load average "
               f"{summary['load_before'][0]:.1f} -> {summary['load_after'][0]:.1f}; plots in "
               f"{where}")
  with open(os.path.join(out, f"tables_{tag}.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n" + "\n".join(lines))


if __name__ == "__main__":
  main()

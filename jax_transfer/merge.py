r"""Weight-space transfer: merging exports of one architecture into a standard export.

  python -m jax_transfer.merge --base=PRETRAINED --models=FT_A,FT_B,... --method=METHOD \
      [--scale=1.0 | --scales=0:1:0.05 --val_split=SPLIT] [--out=DIR] [--skip_regex='^head/']
      [--overwrite] [method options]

Every merge is a jitted tree map over the parameters laid out on a device mesh (each leaf
sharded by the model's logical axes, `parallel.logical_to_shardings`), so no host ever holds
a whole model: exports are read leaf by leaf, shard by shard (safetensors slices); TIES'
whole-model threshold is found by bisection over counts, never by a sort of the concatenated
model. The result is written as a standard export (checkpoint.export) with the base's config
and assets, to a temporary sibling renamed into place: a failed merge leaves --out as it was.

Conventions (θ_0 the base / pre-trained or zero-shot parameters, θ_i the fine-tuned ones,
τ_i = θ_i − θ_0 the task vectors; parameters matching --skip_regex, by default the
classification head, are the base's in the output and take no part):
  average          model soup (Wortsman et al. 2022): θ = mean_i θ_i (the base not included).
  wise_ft          WiSE-FT (Wortsman et al. 2022): one fine-tuned model, θ = (1 − α) θ_0 + α θ_1
                   with α = --scale (α = 0: the zero-shot model; 1: the fine-tuned one).
  task_arithmetic  Ilharco et al. 2023: θ = θ_0 + λ Σ_i s_i τ_i, λ = --scale, s_i = +1 or −1
                   (--negate=i,j: forgetting tasks i, j by subtracting their vectors).
  ties             TIES-merging (Yadav et al. 2023), as the authors' code: (1) trim: keep each
                   τ_i's entries with |τ| >= its k-th smallest |τ|, k = d − int(d · top_k)
                   (top_k = --top_k, 0.2 = keep the top 20%) over the whole model (--scope=global,
                   the paper's code, d = the number of merged entries) or per tensor
                   (--scope=tensor, d = the tensor's size, as other libraries); (2) elect:
                   γ = sign(Σ_i trimmed τ_i), zeros resolved to the sign of Σ γ (majority) over
                   the same scope; (3) disjoint mean: over the i whose trimmed τ_i agrees with γ
                   (count clamped to 1); θ = θ_0 + λ τ_m.
  fisher           Fisher-weighted averaging (Matena & Raffel 2022), as their code:
                   θ = Σ_i w_i max(F_i, floor) θ_i / Σ_i w_i max(F_i, floor), w_i = 1 (or
                   --weights), floor = --fisher_floor (1e-6); --normalize_fishers divides w_i by
                   ‖F_i‖ (the l2 norm of model i's whole diagonal Fisher). F_i: the diagonal Fisher
                   `diagonal_fisher` computes from per-example gradients of the model's
                   log-likelihood on its own training data (--fisher_examples, --fisher_labels:
                   'expected' over the predicted class distribution, or 'sampled' labels).

--scales (wise_ft, task_arithmetic, ties) chooses the scale on validation data as the task-vector
papers do (`sweep_scales`): each model's task accuracy on --val_split, read by its own method's
evaluator with its own head (the --skip_regex parameters), divided by that fine-tune's own
accuracy there; the scale with the highest average normalised accuracy is merged and written,
the sweep recorded in the export's config (`merge.sweep`).
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
from typing import Callable, Optional, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

METHODS = ("average", "wise_ft", "task_arithmetic", "ties", "fisher")
MERGE_MESH = dict(data=1, fsdp=-1, tensor=1)


class MergeError(ValueError):
  """Exports that cannot be merged (another architecture, another base, bad options)."""


# ------------------------------------------------------------------------------ Formulas.
# Trees are dicts of arrays (any sharding); every function is jit-able.

def _map(fn, *trees):
  return jax.tree.map(fn, *trees)


def average(models: Sequence, weights: Optional[Sequence[float]] = None):
  w = np.full(len(models), 1 / len(models)) if weights is None else (
      np.asarray(weights) / np.sum(weights))
  return _map(lambda *xs: sum(wi * x for wi, x in zip(w, xs)), *models)


def wise_ft(zeroshot, finetuned, alpha: float):
  return _map(lambda a, b: (1 - alpha) * a + alpha * b, zeroshot, finetuned)


def task_vectors(base, models: Sequence):
  return [_map(jnp.subtract, m, base) for m in models]


def task_arithmetic(base, models: Sequence, scale: float, signs: Optional[Sequence[int]] = None):
  signs = [1] * len(models) if signs is None else list(signs)
  taus = task_vectors(base, models)
  return _map(lambda b, *ts: b + scale * sum(s * t for s, t in zip(signs, ts)), base, *taus)


def _kth_smallest_abs(leaves: Sequence[jax.Array], k) -> jax.Array:
  """The k-th smallest |x| (1-indexed) over all entries of `leaves`, exactly, by bisection on
  the float32 bit pattern (monotone for non-negative floats): 32 passes of counts, each a
  reduction over the sharded leaves, so nothing is gathered or sorted."""
  bits = [jax.lax.bitcast_convert_type(jnp.abs(x).astype(jnp.float32), jnp.int32)
          for x in leaves]
  k = jnp.asarray(k, jnp.int32)

  def count_le(b):
    return sum(jnp.sum(x <= b, dtype=jnp.int32) for x in bits)

  def body(_, lo_hi):
    lo, hi = lo_hi  # invariant: count_le(hi) >= k, count_le(lo - 1) < k
    mid = lo + (hi - lo) // 2
    ok = count_le(mid) >= k
    return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

  lo, _ = jax.lax.fori_loop(0, 32, body, (jnp.int32(0), jnp.int32(0x7F800000)))
  return jax.lax.bitcast_convert_type(lo, jnp.float32)


def _trim(tau_leaves, top_k: float):
  d = sum(x.size for x in tau_leaves)
  k = max(d - int(d * top_k), 1)
  t = _kth_smallest_abs(tau_leaves, k)
  return [jnp.where(jnp.abs(x).astype(jnp.float32) >= t, x, 0) for x in tau_leaves]


def _ties_merge_leaves(taus: Sequence[Sequence[jax.Array]], top_k: float):
  """taus[i][j]: task i's leaf j, one scope (the whole model or one tensor) -> merged leaves."""
  trimmed = [_trim(t, top_k) for t in taus]
  n = len(trimmed[0])
  total = [sum(t[j] for t in trimmed) for j in range(n)]
  gamma = [jnp.sign(x) for x in total]
  majority = jnp.sign(sum(jnp.sum(g) for g in gamma))
  gamma = [jnp.where(g == 0, majority, g) for g in gamma]
  out = []
  for j in range(n):
    agree = [jnp.where(gamma[j] > 0, t[j] > 0, t[j] < 0) for t in trimmed]
    selected = sum(jnp.where(a, t[j], 0) for a, t in zip(agree, trimmed))
    count = sum(a.astype(jnp.float32) for a in agree)
    out.append(selected / jnp.maximum(count, 1.0))
  return out


def ties(base, models: Sequence, scale: float = 1.0, top_k: float = 0.2,
         scope: str = "global"):
  if scope not in ("global", "tensor"):
    raise MergeError(f"--scope={scope!r}; allowed: global, tensor")
  if not 0 < top_k <= 1:
    raise MergeError(f"--top_k={top_k!r} must be in (0, 1] (the fraction of entries kept)")
  base_leaves, treedef = jax.tree.flatten(base)
  taus = [jax.tree.leaves(t) for t in task_vectors(base, models)]
  if scope == "global":
    merged = _ties_merge_leaves(taus, top_k)
  else:
    merged = [_ties_merge_leaves([[t[j]] for t in taus], top_k)[0]
              for j in range(len(base_leaves))]
  return jax.tree.unflatten(treedef, [b + scale * m for b, m in zip(base_leaves, merged)])


def fisher_merge(models: Sequence, fishers: Sequence, weights: Optional[Sequence[float]] = None,
                 floor: float = 1e-6, normalize: bool = False):
  w = [1.0] * len(models) if weights is None else [float(x) for x in weights]
  if normalize:
    norms = [jnp.sqrt(sum(jnp.sum(jnp.square(f)) for f in jax.tree.leaves(fi)))
             for fi in fishers]
    w = [wi / n for wi, n in zip(w, norms)]

  def one(*leaves):
    thetas, fs = leaves[:len(models)], leaves[len(models):]
    coeff = [wi * jnp.maximum(f, floor) for wi, f in zip(w, fs)]
    return sum(c * t for c, t in zip(coeff, thetas)) / sum(coeff)
  return _map(one, *models, *fishers)


def diagonal_fisher(logits_fn: Callable, params, batches, labels: str = "expected",
                    rng: Optional[jax.Array] = None):
  """Diagonal Fisher E_x E_{y ~ p(y|x)} [(∂ log p(y|x) / ∂θ)^2], per-example gradients by vmap.
  logits_fn(params, batch) -> [B, C] logits; batches: an iterable of batches (dicts).
  labels='expected': the exact expectation over the model's predicted classes (C gradients
  per example, Matena & Raffel's default); 'sampled': one label drawn per example from p."""
  if labels not in ("expected", "sampled"):
    raise MergeError(f"--fisher_labels={labels!r}; allowed: expected, sampled")
  rng = jax.random.key(0) if rng is None else rng

  def log_prob(p, example, y):
    one = jax.tree.map(lambda x: x[None], example)
    return jax.nn.log_softmax(logits_fn(p, one)[0])[y]

  grad = jax.grad(log_prob)

  @jax.jit
  def batch_fisher(p, batch, key):
    logits = logits_fn(p, batch)
    probs = jax.nn.softmax(logits)
    n, c = logits.shape
    if labels == "sampled":
      ys = jax.random.categorical(key, logits)
      g = jax.vmap(grad, in_axes=(None, 0, 0))(p, batch, ys)
      return jax.tree.map(lambda x: jnp.sum(jnp.square(x), 0), g), n

    def per_class(y):
      g = jax.vmap(grad, in_axes=(None, 0, None))(p, batch, y)
      return jax.tree.map(lambda x: jnp.einsum("b,b...->...", probs[:, y], jnp.square(x)), g)
    sums = jax.lax.map(per_class, jnp.arange(c))
    return jax.tree.map(lambda x: jnp.sum(x, 0), sums), n

  total, count = None, 0
  for i, batch in enumerate(batches):
    f, n = batch_fisher(params, batch, jax.random.fold_in(rng, i))
    total = f if total is None else jax.tree.map(jnp.add, total, f)
    count += n
  if total is None:
    raise MergeError("diagonal_fisher got no batch")
  return jax.tree.map(lambda x: x / count, total)


def export_fisher(export_dir: str, examples: int = 256, batch_size: int = 16,
                  labels: str = "expected", seed: int = 0) -> dict:
  """The diagonal Fisher ({path: array}, the export's layout) of a supervised export's
  classifier on the first `examples` examples of its own training split, with the eval
  preprocessing (no augmentation)."""
  from jax_transfer import checkpoint, data
  config = checkpoint.load_export_config(export_dir)
  if config.get("method") != "supervised":
    raise MergeError(f"{export_dir}: --method=fisher from the command line needs supervised "
                     f"exports (a classifier's log-likelihood), not method="
                     f"{config.get('method')!r}")
  model, params, _ = checkpoint.load_pretrained(export_dir)
  if getattr(model, "scan_layers", False):
    from jax_transfer.models.vit import unstack_blocks
    model, params = model.clone(scan_layers=False), unstack_blocks(params)
  normalise = data.normaliser(config.input, train=False)
  split = config.input.get("train_split", "train")

  def batches():
    seen = 0
    for b in data.make_eval_iterator(config.input, split, batch_size=batch_size):
      keep = np.asarray(b["mask"])[:max(examples - seen, 0)]
      if not keep.any():
        return
      images = normalise({"image": np.asarray(b["image"])[:len(keep)][keep]})["image"]
      seen += int(keep.sum())
      yield {"image": images}

  fisher = diagonal_fisher(lambda p, b: model.apply({"params": p}, b["image"])[0], params,
                           batches(), labels, jax.random.key(seed))
  return {k: np.asarray(v) for k, v in checkpoint.flatten(jax.device_get(fisher)).items()}


# ----------------------------------------------------------------------- Exports on a mesh.

def _flat(tree):
  return flax.traverse_util.flatten_dict(tree, sep="/")


def export_method(export_dir: str, mesh=None, eval_split: Optional[str] = None,
                  data_dir: Optional[str] = None, devices=None):
  """(export config, method object) of an export, its model in the export's per-block layout
  and its tokenizer the export's; `eval_split` replaces config.eval.split (its evaluators'),
  `data_dir` input.data_dir. mesh=None: the export config's mesh over `devices`."""
  from jax_transfer import checkpoint, config as config_lib, methods, parallel
  config = checkpoint.load_export_config(export_dir)
  probe = ml_collections.ConfigDict(config.to_dict())
  if "model" in probe and "scan_layers" in probe.model:
    probe.model.scan_layers = False  # exports are per-block
  config_lib.use_export_tokenizer(probe, export_dir)  # not a tokenizer trained again
  if eval_split is not None:
    probe.eval.split = eval_split
  if data_dir is not None:
    probe.input.data_dir = data_dir
  if mesh is None:
    mesh = parallel.make_mesh(probe.mesh, devices)
  return config, methods.get_method(probe.method)(probe, mesh)


def export_layout(export_dir: str, mesh, rules, built=None):
  """(config, {path: ShapeDtypeStruct}, {path: NamedSharding}) of an export's parameters, in
  the export's per-block layout, from the model rebuilt by its config (traced, nothing run);
  `built`: export_method's (config, method) when the caller has them."""
  from jax_transfer import parallel
  config, method = built or export_method(export_dir, mesh)
  boxed = jax.eval_shape(method.init_params, jax.random.key(0))
  shardings = _flat(parallel.logical_to_shardings(boxed, mesh, rules))
  abstract = _flat(nn.unbox(boxed))
  return config, abstract, shardings


def load_sharded(export_dir: str, keys: Sequence[str], shardings: dict, dtype=jnp.float32):
  """The export's leaves `keys` as arrays with `shardings`, each device's shard read from the
  safetensors file directly (a host never reads more than its devices' shards)."""
  from safetensors import safe_open
  out = {}
  with safe_open(os.path.join(export_dir, "params.safetensors"), framework="numpy") as f:
    for k in keys:
      sl = f.get_slice(k)
      shape = tuple(sl.get_shape())
      out[k] = jax.make_array_from_callback(
          shape, shardings[k], lambda idx, sl=sl: np.asarray(sl[idx], dtype))
  return out


def _shapes(export_dir: str) -> dict:
  from safetensors import safe_open
  with safe_open(os.path.join(export_dir, "params.safetensors"), framework="numpy") as f:
    return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def check_mergeable(base: str, models: Sequence[str], skip_regex: str) -> list[str]:
  """The parameter paths to merge; MergeError naming the export and the first differences
  when an export has another architecture or was fine-tuned from another base."""
  from jax_transfer import checkpoint
  skip = re.compile(skip_regex)
  want = _shapes(base)
  keys = sorted(k for k in want if not skip.search(k))
  if not keys:
    raise MergeError(f"--skip_regex={skip_regex!r} leaves no parameter of {base} to merge")
  for m in models:
    have = _shapes(m)
    missing = [k for k in keys if k not in have]
    wrong = [f"{k} {have[k]} vs {want[k]}" for k in keys if k in have and have[k] != want[k]]
    if missing or wrong:
      raise MergeError(
          f"{m} is not the architecture of --base={base}: "
          + (f"{len(missing)} parameters missing (e.g. {missing[:3]}); " if missing else "")
          + (f"{len(wrong)} of another shape (e.g. {wrong[:3]})" if wrong else "")
          + " (merge only fine-tunes of one model; --skip_regex leaves out task heads)")
    init = (checkpoint.load_export_config(m).get("init") or {}).get("export_dir")
    if init and os.path.realpath(init) != os.path.realpath(base):
      raise MergeError(f"{m} was fine-tuned from init.export_dir={init!r}, not from "
                       f"--base={base}: its task vector would not be θ_ft − θ_base")
  return keys


def merge_mesh(devices=None, mesh: Optional[dict] = None):
  """The merge's mesh: no batch, every device on 'fsdp', so each leaf is split by the base's
  sharding rules ('embed' -> fsdp by default) across all of them."""
  from jax_transfer import parallel
  devices = list(devices if devices is not None else jax.devices())
  return parallel.make_mesh(ml_collections.ConfigDict(mesh or MERGE_MESH), devices)


def _rules(config):
  from jax_transfer import parallel
  return parallel.rules_from_config(config.get("sharding_rules") or parallel.DEFAULT_RULES)


def merge_exports(base: str, models: Sequence[str], method: str, *, scale: float = 1.0,
                  skip_regex: str = r"^head/", negate: Sequence[int] = (), top_k: float = 0.2,
                  scope: str = "global", weights: Optional[Sequence[float]] = None,
                  fishers: Optional[Sequence[dict]] = None, fisher_floor: float = 1e-6,
                  normalize_fishers: bool = False, devices=None, mesh: Optional[dict] = None):
  """Merged parameters (flat {path: array}, all of the base's paths) on a mesh over `devices`
  (default all) laid out by the base model's logical axes, and the base's config."""
  from jax_transfer import parallel
  if method not in METHODS:
    raise MergeError(f"--method={method!r}; allowed: {', '.join(METHODS)}")
  if not models:
    raise MergeError("--models is empty")
  if method == "wise_ft" and len(models) != 1:
    raise MergeError(f"--method=wise_ft takes one fine-tuned model, got {len(models)}")
  if method == "fisher" and (fishers is None or len(fishers) != len(models)):
    raise MergeError("--method=fisher needs one Fisher per model")
  bad = [i for i in negate if not 0 <= i < len(models)]
  if bad:
    raise MergeError(f"--negate={list(negate)}: indices out of range for {len(models)} models")
  keys = check_mergeable(base, models, skip_regex)
  from jax_transfer import checkpoint
  cfg = checkpoint.load_export_config(base)
  mesh = merge_mesh(devices, mesh)
  _, abstract, shardings = export_layout(base, mesh, _rules(cfg))
  missing = [k for k in keys if k not in shardings]
  if missing:
    raise MergeError(f"{base}'s parameters {missing[:3]} are not those of its config's model")
  theta0 = load_sharded(base, list(_shapes(base)), shardings)
  thetas = [load_sharded(m, keys, shardings) for m in models]
  sub0 = {k: theta0[k] for k in keys}
  signs = [-1 if i in negate else 1 for i in range(len(models))]

  def run(sub0, thetas, fishers):
    if method == "average":
      return average(thetas, weights)
    if method == "wise_ft":
      return wise_ft(sub0, thetas[0], scale)
    if method == "task_arithmetic":
      return task_arithmetic(sub0, thetas, scale, signs)
    if method == "ties":
      return ties(sub0, thetas, scale, top_k, scope)
    return fisher_merge(thetas, fishers, weights, fisher_floor, normalize_fishers)

  fs = None
  if method == "fisher":
    fs = [{k: jax.device_put(jnp.asarray(f[k], jnp.float32), shardings[k]) for k in keys}
          for f in fishers]
  out_sh = {k: shardings[k] for k in keys}
  merged = jax.jit(run, out_shardings=out_sh)(sub0, thetas, fs)
  return {**theta0, **merged}, cfg


# ------------------------------------------------------------------------ Scale sweeps.

SCALED = ("wise_ft", "task_arithmetic", "ties")


def parse_scales(spec: str) -> list[float]:
  """'START:STOP:STEP' (START to STOP inclusive) or 'a,b,c' -> the scales, sorted."""
  try:
    if ":" in spec:
      start, stop, step = (float(x) for x in spec.split(":"))
      if step <= 0 or stop < start:
        raise ValueError
      out = [round(start + i * step, 10)
             for i in range(int(math.floor((stop - start) / step + 1e-9)) + 1)]
    else:
      out = [float(x) for x in spec.split(",") if x.strip()]
    if not out or not all(math.isfinite(x) for x in out):
      raise ValueError
  except ValueError:
    raise MergeError(f"--scales={spec!r}: expected START:STOP:STEP (STOP >= START, STEP > 0), "
                     "e.g. 0:1:0.05, or a comma-separated list") from None
  return sorted(set(out))


def task_metric(config, metric: Optional[str] = None) -> tuple[str, str]:
  """(evaluator name, result key) of the accuracy a fine-tune's task is read by: --val_metric
  'EVALUATOR/KEY', by default a supervised export's 'eval/accuracy' or, for a contrastive
  fine-tune with one contrastive.zero_shot_head A, 'zero_shot/A_accuracy'."""
  if metric:
    name, sep, key = metric.partition("/")
    if not (sep and name and key):
      raise MergeError(f"--val_metric={metric!r}: expected EVALUATOR/KEY, e.g. eval/accuracy")
    return name, key
  if config.method == "supervised":
    return "eval", "accuracy"
  if config.method == "contrastive":
    from jax_transfer.methods.contrastive import head_attributes
    heads = head_attributes(config)
    if len(heads) == 1:
      return "zero_shot", f"{heads[0]}_accuracy"
  raise MergeError(f"a method={config.method!r} export has no default task accuracy (a "
                   "supervised classifier or a contrastive fine-tune with one "
                   "contrastive.zero_shot_head has one): pass --val_metric=EVALUATOR/KEY")


class TaskAccuracy:
  """One fine-tune's task accuracy of any parameters of its architecture (flat, on the merge's
  mesh) on `split`, by its method's own evaluator, compiled once. The parameters matching
  `skip_regex` (the task head, which is not merged) are the fine-tune's own: each task is
  read with its own head, as the task-vector papers evaluate a merged encoder."""

  def __init__(self, export_dir: str, split: str, mesh, rules, skip_regex: str,
               metric: Optional[str] = None):
    from jax_transfer import data
    built = export_method(export_dir, mesh, eval_split=split)
    config, method = built
    self.name, self.key = task_metric(config, metric)
    evaluators = [e for e in method.evaluators() if e.name == self.name]
    if not evaluators:
      raise MergeError(f"--val_metric: {export_dir}'s method has no evaluator {self.name!r}")
    self.evaluator, self.mesh, self.rules, self.export_dir = evaluators[0], mesh, rules, export_dir
    try:  # a split the dataset lacks fails here, before any merge
      next(iter(data.make_eval_iterator(method.config.input, split,
                                        batch_size=method.config.eval.batch_size)))
    except Exception as e:  # pylint: disable=broad-except
      raise MergeError(f"--val_split={split!r} cannot be read from {export_dir}'s dataset "
                       f"{method.config.input.get('dataset')!r}: {e}") from e
    _, _, shardings = export_layout(export_dir, mesh, rules, built)
    self.own = load_sharded(export_dir, list(_shapes(export_dir)), shardings)
    skip = re.compile(skip_regex)
    self.head = {k: v for k, v in self.own.items() if skip.search(k)}

  def __call__(self, flat: dict) -> float:
    from jax_transfer import checkpoint, parallel
    with jax.set_mesh(self.mesh), parallel.with_sharding_rules(self.rules):
      result = self.evaluator.run(checkpoint.unflatten({**flat, **self.head}))
    if self.key not in result:
      raise MergeError(f"--val_metric: evaluator {self.name!r} reports {sorted(result)}, "
                       f"not {self.key!r}")
    return float(result[self.key])


def sweep_scales(base: str, models: Sequence[str], method: str, scales: Sequence[float],
                 val_split: str, *, val_metric: Optional[str] = None,
                 skip_regex: str = r"^head/", devices=None, mesh: Optional[dict] = None,
                 **merge_kw) -> tuple[float, dict]:
  """The scale of `method` chosen on validation data, as the task-vector papers choose it:
  every λ in `scales` on the line θ(λ) = θ_0 + λ (θ_1 − θ_0), θ_1 the merge at scale 1
  (wise_ft, task_arithmetic and ties are all of this form: TIES' trim, elect and mean do not
  depend on λ), so a sweep is one merge and one compiled line whatever its length. Each
  model's task accuracy on `val_split` (TaskAccuracy) is normalised by the fine-tune's own
  (acc / acc_finetuned); the chosen λ has the highest average normalised accuracy (the
  smallest such λ on ties). Returns (λ, {'own', 'rows', 'split', 'metric'})."""
  if method not in SCALED:
    raise MergeError(f"--scales: --method={method} has no scale (sweeps: {', '.join(SCALED)})")
  if not val_split:
    raise MergeError("--scales needs --val_split: a split of the fine-tunes' dataset to choose "
                     "the scale on (e.g. 'train[90%:]'), not the split results are reported on")
  from jax_transfer import checkpoint
  check_mergeable(base, models, skip_regex)
  mesh_obj = merge_mesh(devices, mesh)
  rules = _rules(checkpoint.load_export_config(base))
  tasks = [TaskAccuracy(m, val_split, mesh_obj, rules, skip_regex, val_metric) for m in models]
  own = [t(t.own) for t in tasks]
  for m, o in zip(models, own):
    if o <= 0:
      raise MergeError(f"{m} has accuracy 0 on --val_split={val_split!r}: nothing to "
                       "normalise by")
  theta1, _ = merge_exports(base, models, method, scale=1.0, skip_regex=skip_regex,
                            devices=devices, mesh=mesh, **merge_kw)
  theta0 = load_sharded(base, list(theta1), {k: v.sharding for k, v in theta1.items()})
  line = jax.jit(lambda t0, t1, lam: _map(lambda a, b: a + lam * (b - a), t0, t1))
  rows = []
  for lam in scales:
    flat = line(theta0, theta1, jnp.float32(lam))
    acc = [t(flat) for t in tasks]
    norm = [a / o for a, o in zip(acc, own)]
    rows.append(dict(scale=float(lam), accuracy=acc, normalised=norm,
                     avg_normalised=float(np.mean(norm))))
  best = max(rows, key=lambda r: r["avg_normalised"])  # max keeps the first: the smallest λ
  return best["scale"], dict(own=own, rows=rows, split=val_split,
                             metric=f"{tasks[0].name}/{tasks[0].key}")


def sweep_table(models: Sequence[str], sweep: dict, chosen: float) -> str:
  names = [os.path.basename(os.path.normpath(m)) for m in models]
  lines = [f"scale sweep on {sweep['split']} ({sweep['metric']}; fine-tunes' own: "
           + ", ".join(f"{n} {o:.4f}" for n, o in zip(names, sweep["own"])) + ")",
           "scale  " + "  ".join(f"{n:>10}" for n in names) + "  avg normalised"]
  for r in sweep["rows"]:
    lines.append(f"{r['scale']:<6g} " + "  ".join(f"{a:>10.4f}" for a in r["accuracy"])
                 + f"  {r['avg_normalised']:.4f}" + ("  <- chosen" if r["scale"] == chosen
                                                     else ""))
  return "\n".join(lines)


def write(merged_flat: dict, config, base: str, out: str, overwrite: bool = False,
          provenance: Optional[dict] = None) -> None:
  """A standard export of the merged parameters with the base's config (plus a `merge`
  section saying how it was made) and the base's assets (tokenizer)."""
  from jax_transfer import checkpoint
  config = ml_collections.ConfigDict(config.to_dict())
  if provenance:
    config.merge = provenance
  params = checkpoint.unflatten({k: np.asarray(jax.device_get(v)) for k, v in
                                 merged_flat.items()})
  checkpoint.write_dir_atomically(
      out, lambda tmp: checkpoint.export(params, config, tmp, assets_from=base), overwrite)


# ------------------------------------------------------------------------------------ CLI.

def build_parser(prog="python -m jax_transfer.merge"):
  p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
  p.add_argument("--base", required=True, help="the pre-trained / zero-shot export")
  p.add_argument("--models", required=True, help="comma-separated fine-tuned exports")
  p.add_argument("--method", required=True, choices=METHODS)
  p.add_argument("--out", required=True)
  p.add_argument("--scale", type=float, default=None,
                 help="wise_ft: alpha; task_arithmetic / ties: lambda (default 1)")
  p.add_argument("--scales", default="",
                 help="instead of --scale: a sweep START:STOP:STEP (or a,b,c), each scale "
                      "read on --val_split, the best average normalised accuracy chosen")
  p.add_argument("--val_split", default="", help="--scales: the split the scale is chosen on")
  p.add_argument("--val_metric", default="",
                 help="--scales: EVALUATOR/KEY of the task accuracy (default: eval/accuracy, "
                      "or zero_shot/A_accuracy for a contrastive zero_shot_head=A fine-tune)")
  p.add_argument("--skip_regex", default=r"^head/",
                 help="params taken from the base, not merged (default: the head)")
  p.add_argument("--negate", default="", help="task_arithmetic: indices of models to subtract")
  p.add_argument("--top_k", type=float, default=0.2, help="ties: fraction of entries kept")
  p.add_argument("--scope", default="global", choices=("global", "tensor"))
  p.add_argument("--weights", default="", help="average / fisher: per-model weights")
  p.add_argument("--fisher_floor", type=float, default=1e-6)
  p.add_argument("--normalize_fishers", action="store_true")
  p.add_argument("--fisher_examples", type=int, default=256,
                 help="fisher: training examples per model")
  p.add_argument("--fisher_labels", default="expected", choices=("expected", "sampled"))
  p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
  return p


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  models = [m for m in args.models.split(",") if m]
  try:
    fishers = None
    if args.method == "fisher":
      check_mergeable(args.base, models, args.skip_regex)  # before the Fisher passes
      fishers = [export_fisher(m, args.fisher_examples, labels=args.fisher_labels)
                 for m in models]
    negate = [int(i) for i in args.negate.split(",") if i]
    weights = [float(w) for w in args.weights.split(",") if w] or None
    scale, sweep = (1.0 if args.scale is None else args.scale), None
    if args.scales:
      if args.scale is not None:
        raise MergeError("give --scale or --scales, not both")
      from jax_transfer import checkpoint
      checkpoint.check_output_dir(os.path.abspath(args.out), args.overwrite)  # before the sweep
      scale, sweep = sweep_scales(
          args.base, models, args.method, parse_scales(args.scales), args.val_split,
          val_metric=args.val_metric or None, skip_regex=args.skip_regex, negate=negate,
          top_k=args.top_k, scope=args.scope)
      print(sweep_table(models, sweep, scale))
    merged, config = merge_exports(
        args.base, models, args.method, scale=scale, skip_regex=args.skip_regex,
        negate=negate, top_k=args.top_k, scope=args.scope, weights=weights,
        fishers=fishers, fisher_floor=args.fisher_floor,
        normalize_fishers=args.normalize_fishers)
    write(merged, config, args.base, args.out, args.overwrite,
          provenance=dict(method=args.method, base=os.path.abspath(args.base),
                          models=[os.path.abspath(m) for m in models], scale=scale,
                          skip_regex=args.skip_regex, negate=negate, top_k=args.top_k,
                          scope=args.scope, **({"sweep": sweep} if sweep else {})))
  except (MergeError, FileNotFoundError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"merged {len(models)} model(s) onto {args.base} by {args.method} at scale {scale:g} "
        f"-> {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

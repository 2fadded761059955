"""Meta-testing of in-context learners (GPICL): accuracy vs number of in-context examples.

Suites (each a pool of z-normalised examples + a way to choose tasks):
  seen       meta-training tasks (ids from the training pool) on the base TEST split: with few
             tasks a memorising learner scores here and nowhere else.
  unseen     fresh tasks (a different key root) on the base test split.
  <dataset>  fresh tasks on an unseen dataset (wine, iris, breast_cancer from scikit-learn; an
             attribute of the embedded shapes data), projected to the model's input size by the
             same A ~ N(0, 1/D_in) rule.
Position j's prediction has seen j labelled examples, so curve[j] = accuracy after j examples;
curve[0] is chance. For datasets with n < C classes the prediction is the argmax over the n
labels the task uses (rho[:n]): a user knows the label set, and chance stays 1/n.
Baseline: logistic regression fitted on the same j projected examples (the paper compares
with SGD on the same data); it does not depend on the learner, so it is computed once.

run() returns {suite}/acc_k{j} (accuracy after j examples) for a few j and {suite}/acc_mean, and writes the full curves to
<workdir>/icl_curves.json and .png (the latest evaluation).
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jax_transfer.data import icl_tasks


@dataclasses.dataclass
class Suite:
  x: np.ndarray  # [N, D_in] z-normalised
  y: np.ndarray  # [N] int in [0, num_classes)
  num_classes: int
  task_keys: object  # callable num_sequences -> [B] task keys


def sklearn_dataset(name: str):
  """Unseen tabular datasets that ship with scikit-learn: (x [N, D], y [N], classes)."""
  from sklearn import datasets
  loader = {"wine": datasets.load_wine, "iris": datasets.load_iris,
            "breast_cancer": datasets.load_breast_cancer}[name]
  d = loader()
  return d.data.astype(np.float32), d.target.astype(np.int32), int(d.target.max()) + 1


def load_split(input_cfg, split: str, label_key: str | None = None, limit: int | None = None):
  """All (or the first `limit`) examples of a split through the platform's eval pipeline:
  (x [N, D] flattened pipeline images, y [N])."""
  from jax_transfer import data
  cfg = input_cfg.copy_and_resolve_references()
  if label_key:
    with cfg.unlocked():
      cfg.label_key = label_key
      cfg.classes = None
  xs, ys, n = [], [], 0
  for b in data.make_eval_iterator(cfg, split, batch_size=256):
    m = b["mask"]
    xs.append(data.host_normalise(b["image"][m], cfg, train=False).reshape(int(m.sum()), -1))
    ys.append(b["label"][m])
    n += int(m.sum())
    if limit and n >= limit:
      break
  return np.concatenate(xs)[:limit], np.concatenate(ys)[:limit].astype(np.int32)


def unseen_dataset(spec: str, input_cfg, limit: int = 2000):
  """'wine' | 'iris' | 'breast_cancer' | 'DATASET:ATTRIBUTE' (an embedded image dataset's
  ClassLabel feature, e.g. 'shapes_captions:shape') -> (x z-normalised, y, classes)."""
  if ":" in spec:
    from jax_transfer import data
    name, key = spec.split(":")
    cfg = input_cfg.copy_and_resolve_references()
    with cfg.unlocked():
      cfg.dataset, cfg.image_size = name, None
    x, y = load_split(cfg, "test", label_key=key, limit=limit)
    n = data.dataset_info(name, cfg.get("data_dir"), label_key=key)["num_classes"]
  else:
    x, y, n = sklearn_dataset(spec)
  return icl_tasks.znormalise(x, *icl_tasks.feature_stats(x)), y, n


def logreg_curve(tokens, targets, rho, num_classes, model_dim, positions):
  """Logistic regression fitted on examples 0..j-1 of each sequence, scored on example j.
  tokens [B, L, model_dim + C], targets [B, L] -> {j: accuracy}."""
  from sklearn.linear_model import LogisticRegression
  out = {}
  for j in positions:
    correct = []
    for b in range(len(tokens)):
      allowed = np.asarray(rho[b, :num_classes])
      if j == 0:  # Nothing seen: a uniform guess over the task's labels.
        correct.append(1.0 / num_classes)
        continue
      xs, ys = tokens[b, :j, :model_dim], targets[b, :j]
      if len(np.unique(ys)) == 1:
        pred = ys[0]
      else:
        with warnings.catch_warnings():
          warnings.simplefilter("ignore")
          pred = LogisticRegression(max_iter=200).fit(xs, ys).predict(
              tokens[b, j:j + 1, :model_dim])[0]
      correct.append(float(pred == targets[b, j] and pred in allowed))
    out[j] = float(np.mean(correct))
  return out


class ICLCurves:

  def __init__(self, apply_fn, suites: dict, *, seq_len: int, model_dim: int,
               num_classes: int, num_sequences: int, every_steps: int, eval_seed: int,
               workdir: str | None = None, report_positions=(0, 1, 2, 4, 8, 16),
               baseline_sequences: int = 0, name: str = "icl"):
    self.name, self.every_steps, self._workdir = name, every_steps, workdir
    self._apply = jax.jit(apply_fn)
    self._positions = sorted({j for j in report_positions if j < seq_len} | {seq_len - 1})
    self._data, self._baseline = {}, {}
    root = jax.random.key(eval_seed)
    for i, (suite_name, s) in enumerate(suites.items()):
      k_idx, _ = jax.random.split(jax.random.fold_in(root, i))
      idx = np.asarray(icl_tasks.sample_indices(k_idx, len(s.x), num_sequences, seq_len))
      tokens, targets, rho = jax.jit(icl_tasks.make_sequences, static_argnums=(3, 4))(
          jnp.asarray(s.x[idx]), jnp.asarray(s.y[idx]), s.task_keys(num_sequences),
          model_dim, num_classes)
      tokens, targets, rho = (np.asarray(a) for a in (tokens, targets, rho))
      # Logits of labels outside the task's label set are masked (see module docstring).
      allowed = np.zeros((num_sequences, num_classes), bool)
      np.put_along_axis(allowed, rho[:, :s.num_classes], True, axis=1)
      self._data[suite_name] = (tokens, targets, allowed, s.num_classes)
      if baseline_sequences:
        nb = baseline_sequences
        self._baseline[suite_name] = logreg_curve(tokens[:nb], targets[:nb], rho[:nb],
                                                  s.num_classes, model_dim, self._positions)

  def curves(self, params) -> dict:
    """{suite: accuracy per position [L]} for the learner with `params`."""
    out = {}
    for suite_name, (tokens, targets, allowed, _) in self._data.items():
      logits = np.asarray(self._apply(params, tokens), np.float64)
      pred = np.where(allowed[:, None, :], logits, -np.inf).argmax(-1)
      out[suite_name] = (pred == targets).mean(0)
    return out

  def run(self, params, extra=None) -> dict:
    del extra
    curves = self.curves(params)
    metrics = {}
    for suite_name, curve in curves.items():
      metrics.update({f"{suite_name}/acc_k{j}": float(curve[j]) for j in self._positions})
      metrics[f"{suite_name}/acc_mean"] = float(curve.mean())
      for j, acc in self._baseline.get(suite_name, {}).items():
        metrics[f"{suite_name}/logreg_k{j}"] = acc
    if self._workdir and jax.process_index() == 0:
      self.save(curves, os.path.join(self._workdir, "icl_curves"))
    return metrics

  def save(self, curves: dict, path: str) -> None:
    """Writes path.json (curves + baseline) and path.png."""
    record = {"positions_baseline": self._positions,
              "curves": {k: [float(a) for a in v] for k, v in curves.items()},
              "chance": {k: 1.0 / d[3] for k, d in self._data.items()},
              "logreg": {k: {str(j): a for j, a in v.items()} for k, v in
                         self._baseline.items()}}
    with open(path + ".json", "w") as f:
      json.dump(record, f, indent=1)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (k, v) in enumerate(curves.items()):
      color = f"C{i}"
      ax.plot(np.arange(len(v)), v, color=color, label=k)
      if k in self._baseline:
        js = sorted(self._baseline[k])
        ax.plot(js, [self._baseline[k][j] for j in js], "--o", color=color, ms=3)
    ax.set_xlabel("number of in-context examples")
    ax.set_ylabel("accuracy (dashed: logistic regression)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path + ".png", dpi=100)
    plt.close(fig)

"""Transfer Score (Yang et al., ICLR 2024, "Can We Evaluate Domain Adaptation Models Without
Target-Domain Labels?"): an unsupervised score of a classifier on an UNLABELLED target domain,
for ranking checkpoints / hyper-parameters. Higher = better. Labels are never read.

Transcribes `get_transfer_score` (train.py) and `uniformity` (utils.py) of the authors' code,
github.com/sleepyseal/TransferScore (commit 8b5c521):

  score = H - IM / log(C) - U                                   (train.py, `score= H-...-u`)

- H, `hopkins`: Hopkins statistic of the target features (cluster tendency; 0.5 for uniform
  data, -> 1 for tight clusters: their convention, plain distances, not d-th powers).
- IM / log(C), `prediction_uncertainty`: per batch, mean per-example entropy minus the entropy
  of the batch-mean prediction (minus the mutual information), averaged over batches.
- U, `classifier_uniformity`: mean squared deviation of the pairwise angles between the head's
  class weight vectors from the regular-simplex angle arccos(-1/(C-1)).

Deviations: numpy float64 instead of torch float32; seeded `np.random.default_rng` draws instead
of the global numpy / `random` state; the cosines are clipped to [-1, 1] before arccos (the
reference gives NaN for collapsed class weights); target images take the eval preprocessing
(the reference reads its target loader with the train augmentation). `TransferScoreEvaluator`
is the loop's evaluator; `for_method` / `score_export` build it from a supervised method or an
export dir.
"""
from __future__ import annotations

import math

import flax.linen as nn
import numpy as np

from jax_transfer import config as config_lib
from jax_transfer.evaluators.common import HeadOutputs, load_export, to_host

REFERENCE_BATCH_SIZE = 32  # train.py's --batch-size default: the target loader's batches.


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
  return np.maximum(d, 0.0)


def hopkins(features, m: int | None = None, seed: int = 0) -> float:
  """Hopkins statistic of `features` [N, D], train.py lines 270-292:
    m = int(0.05 N) (their default, "Lawson and Jurs"); U = m points uniform in the features'
    bounding box [min, max] per dimension; S = m rows of X drawn without replacement;
    u_i = distance from U_i to its nearest row of X; w_i = distance from S_i to its nearest
    OTHER row of X (sklearn kneighbors(n_neighbors=2)[:, 1]);  H = Σu / (Σu + Σw).
  Euclidean distances, not raised to the power D. ~0.5 for uniform data, -> 1 clustered."""
  x = np.asarray(features, np.float64)
  if x.ndim != 2 or x.shape[0] < 2:
    raise ValueError(f"features must be [N >= 2, D], got shape {x.shape}")
  n = x.shape[0]
  m = int(n * 0.05) if m is None else int(m)
  if not 1 <= m <= n:
    raise ValueError(f"hopkins needs 1 <= m <= N={n}, got m={m} (default 5% of N: N >= 20)")
  rng = np.random.default_rng(seed)
  uniform = rng.uniform(x.min(0), x.max(0), (m, x.shape[1]))
  idx = rng.choice(n, m, replace=False)
  u = np.sqrt(_sq_dists(uniform, x).min(1))
  d = _sq_dists(x[idx], x)
  d[np.arange(m), idx] = np.inf  # Itself: kneighbors' first column.
  w = np.sqrt(d.min(1))
  return float(u.sum() / (u.sum() + w.sum()))


def classifier_uniformity(head_kernel) -> float:
  """utils.py `uniformity(weight)` for a flax Dense kernel [D, C] (torch's weight is its
  transpose): W_c = class c's weight / max(||.||, 1e-12) (F.normalize), θ_ij = arccos(W_i·W_j)
  for i != j, θ0 = arccos(-1 / (C - 1)); U = mean_{i != j} (θ_ij - θ0)² (their `u2_loss`).
  0 exactly for a regular simplex (equiangular) head; norms do not enter; orthogonal classes
  give (π/2 - θ0)², collapsed ones ~θ0². Cosines clipped to [-1, 1] (deviation, see top)."""
  w = np.asarray(head_kernel, np.float64)
  w = w.reshape(-1, w.shape[-1]).T  # [C, D]
  c = w.shape[0]
  if c < 2:
    raise ValueError(f"classifier_uniformity needs >= 2 classes, got kernel {w.T.shape}")
  w = w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
  theta = np.arccos(np.clip((w @ w.T)[~np.eye(c, dtype=bool)], -1.0, 1.0))
  return float(np.mean((theta - math.acos(-1.0 / (c - 1))) ** 2))


def _softmax(logits) -> np.ndarray:
  z = np.asarray(logits, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def entropy_terms(logits, batch_size: int | None = REFERENCE_BATCH_SIZE,
                  seed: int = 0) -> tuple[float, float]:
  """(mean per-example entropy, entropy of the batch-mean prediction), each / log C and
  averaged over batches, train.py lines 250-262: p = softmax(logits);
  H_b = mean_i Σ_c -p log(p + 1e-5);  G_b = Σ_c -p̄ log(p̄ + 1e-6), p̄ = mean_i p over batch b.
  Batches as their target loader (shuffle=True, drop_last=True): a seeded permutation cut
  into N // batch_size batches; batch_size None (or >= N): the whole set as one batch."""
  p = _softmax(logits)
  n, c = p.shape
  if c < 2:
    raise ValueError(f"logits must have >= 2 classes, got shape {p.shape}")
  if batch_size is None or batch_size >= n:
    batches = p[None]
  else:
    order = np.random.default_rng(seed).permutation(n)
    k = n // batch_size
    batches = p[order[:k * batch_size]].reshape(k, batch_size, c)
  ent = np.mean(np.sum(-batches * np.log(batches + 1e-5), -1), -1)
  pbar = batches.mean(1)
  gent = np.sum(-pbar * np.log(pbar + 1e-6), -1)
  return float(ent.mean() / math.log(c)), float(gent.mean() / math.log(c))


def prediction_uncertainty(logits, batch_size: int | None = REFERENCE_BATCH_SIZE,
                           seed: int = 0) -> float:
  """The reference's uncertainty term IM / log C = mean over batches of (H_b - G_b) / log C
  (see entropy_terms): in [-1, 1]; -1 for confident predictions spread evenly over the
  classes, 0 for uniform predictions (and for confident ones all of one class)."""
  ent, gent = entropy_terms(logits, batch_size, seed)
  return ent - gent


def transfer_score(features, logits, head_kernel, seed: int = 0, m: int | None = None,
                   batch_size: int | None = REFERENCE_BATCH_SIZE) -> dict[str, float]:
  """{'transfer_score': H - IM/log C - U, 'hopkins': H, 'uncertainty': IM/log C,
  'uniformity': U, 'mean_entropy', 'marginal_entropy'} (train.py line 294,
  `score= H-sum(im_loss)/len(im_loss)/math.log(num_classes)-u`). features [N, D] (the head's
  input), logits [N, C], head_kernel [D', C]."""
  logits = np.asarray(logits)
  c = np.shape(head_kernel)[-1]
  if logits.ndim != 2 or logits.shape[1] != c or len(logits) != len(features):
    raise ValueError(f"logits {logits.shape} must be [N={len(features)}, C={c}] (the head's "
                     f"classes)")
  h = hopkins(features, m, seed)
  ent, gent = entropy_terms(logits, batch_size, seed)
  u = classifier_uniformity(head_kernel)
  return {"transfer_score": h - (ent - gent) - u, "hopkins": h, "uncertainty": ent - gent,
          "uniformity": u, "mean_entropy": ent, "marginal_entropy": gent}


class TransferScoreEvaluator:
  """transfer_score of an unlabelled `split` of input_cfg's dataset (a target domain).

  apply_fn(params, images[, extra]) -> (logits, aux) with aux['pre_logits'] (models/vit.py,
  models/resnet.py); with_extra=True passes the method state (BN running statistics). Only
  the 'image' column is fed and no column is kept: labels are never read. The head kernel is
  params['head']['kernel']. `limit`: at most that many examples."""

  def __init__(self, apply_fn, input_cfg, split: str, batch_size: int, mesh, every_steps,
               name: str = "transfer_score", with_extra: bool = False, seed: int = 0,
               m: int | None = None, entropy_batch_size: int | None = REFERENCE_BATCH_SIZE,
               limit: int | None = None):
    self.name, self.every_steps = name, every_steps
    self._input, self._split, self._mesh, self._batch_size = input_cfg, split, mesh, batch_size
    self._with_extra, self._limit = with_extra, limit
    self._kw = dict(seed=seed, m=m, batch_size=entropy_batch_size)
    self._outputs = HeadOutputs(apply_fn, with_extra)

  def run(self, params, extra=None) -> dict:
    kernel = to_host(nn.unbox(params)["head"]["kernel"])
    logits, features, _ = self._outputs(params, extra, kernel.shape[-1], self._input,
                                        self._split, self._batch_size, self._mesh,
                                        limit=self._limit)
    return transfer_score(features, logits, kernel, **self._kw)


def for_method(method, dataset: str | None = None, split: str | None = None,
               **kwargs) -> TransferScoreEvaluator:
  """A supervised method's evaluator on `dataset` (one of config.eval.datasets; None: the
  source input.dataset), split default config.eval.split, named 'transfer_<dataset>'."""
  c = method.config
  input_cfg = c.input if dataset is None else config_lib.eval_input(c.input, dataset)
  kwargs.setdefault("name", f"transfer_{dataset or c.input.dataset}")
  return TransferScoreEvaluator(method.apply_eval, input_cfg, split or c.eval.split,
                                c.eval.batch_size, method.mesh, c.eval_every_steps,
                                with_extra=method.has_batch_stats, **kwargs)


def score_export(export_dir: str, dataset: str | None = None, split: str | None = None,
                 data_dir: str | None = None, devices=None, **kwargs) -> dict[str, float]:
  """transfer_score of a supervised export (params, and BN statistics when it has them) on
  `dataset`'s `split`: for ranking checkpoints without target labels."""
  method, params, extra = load_export(export_dir, data_dir, devices)
  return for_method(method, dataset, split, **kwargs).run(params, extra)

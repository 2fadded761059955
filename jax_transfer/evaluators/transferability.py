"""Transferability estimators: score a frozen model's features (or source-class probabilities)
on a labelled target set without fine-tuning. Higher = more transferable for every function.

- `logme`: LogME (You et al., ICML 2021), the fixed-point algorithm of thuml/LogME.
- `leep`: LEEP (Nguyen et al., ICML 2020).
- `h_score`: H-score (Bao et al., ICIP 2019), optionally shrunk (Ibrahim et al., ICLR 2022).
- `ped` / `ped_dynamics`: PED (Li et al., ICCV 2023), potential-energy descent of the class
  clusters before a standard score, as in lixiaotong97/PED (metrics.py).

Plain functions of arrays. Eagerly each returns a Python float; `leep`, `h_score` and
`ped_dynamics` are also jit-able (`jax.jit(leep, static_argnames="num_classes")`), and under
a trace return a JAX scalar/array; `num_classes` must then be given, and the label checks
that need values (range, number of classes) are skipped. `logme` (and so the scoring half of
`ped`) runs in numpy float64, like the reference.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def _traced(*xs) -> bool:
  return any(isinstance(x, jax.core.Tracer) for x in xs)


def _out(x):
  return x if _traced(x) else float(x)


def _check(x, labels, name: str, num_classes: int | None = None) -> int | None:
  """Rank, N and label checks shared by all estimators; returns the number of classes
  (labels.max() + 1 when not given, as the references do; None when traced and not given)."""
  labels = labels if _traced(labels) else np.asarray(labels)
  if x.ndim != 2:
    raise ValueError(f"{name} must be [N, D], got shape {tuple(x.shape)}")
  if labels.ndim != 1:
    raise ValueError(f"labels must be [N], got shape {tuple(labels.shape)}")
  if labels.shape[0] != x.shape[0]:
    raise ValueError(f"labels has {labels.shape[0]} entries but {name} has {x.shape[0]} rows")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
  if num_classes is not None and num_classes < 2:
    raise ValueError(f"num_classes must be at least 2, got {num_classes}")
  if _traced(labels):
    if num_classes is None:
      raise ValueError("labels: pass num_classes= (static) when calling under jax.jit")
    return num_classes
  y = np.asarray(labels)
  if y.size and (y.min() < 0 or (num_classes is not None and y.max() >= num_classes)):
    raise ValueError(f"labels out of range: [{y.min()}, {y.max()}] with num_classes="
                     f"{num_classes if num_classes is not None else 'labels.max() + 1'}")
  if len(np.unique(y)) < 2:
    raise ValueError(f"labels must contain at least 2 classes, got {len(np.unique(y))}")
  return int(y.max()) + 1 if num_classes is None else num_classes


def logme(features, labels) -> float:
  """LogME: per-class maximum log evidence of Bayesian linear regression from `features`
  [N, D] to the one-hot target of that class, averaged over classes, divided by N.

  Transcribes `LogME._fit_fixed_point` of thuml/LogME (the default there): float64, SVD of
  the features through the D x D Gram matrix fᵀf when N > D (rank-truncated at s > 1e-10),
  else a thin SVD of f; alpha = beta = 1, then at most 11 fixed-point updates, stopping when
  |λ' - λ| / λ <= 1e-3 (λ = alpha / beta); 1e-5 added to the m² and residual denominators;
  classes 0..labels.max(). The classes run side by side, each stopping on its own, which gives
  the reference's per-class loop exactly. Computed in numpy float64 (not jit-able) rather than
  with JAX x64, so nothing changes global JAX precision.
  """
  f, y = np.asarray(features, np.float64), np.asarray(labels)
  num_classes = _check(f, y, "features")
  n, d = f.shape
  if n > d:
    _, s2, vh = np.linalg.svd(f.T @ f)
    s = np.sqrt(s2)
    k = int(np.sum(s > 1e-10))
    s, vh = s[:k], vh[:k]
    u = (f @ vh.T) / s
  else:
    u, s, _ = np.linalg.svd(f, full_matrices=False)
  sigma = (s ** 2)[:, None]                                          # [k, 1]
  onehot = (y[:, None] == np.arange(num_classes)).astype(np.float64)  # [N, C]
  x2 = (u.T @ onehot) ** 2                                           # [k, C]
  res_x2 = onehot.sum(0) - x2.sum(0)  # residual energy outside the span of u
  alpha, beta = np.ones(num_classes), np.ones(num_classes)
  m2, res2 = np.zeros(num_classes), np.zeros(num_classes)
  active = np.ones(num_classes, bool)
  for _ in range(11):
    t = alpha / beta
    gamma = (sigma / (sigma + t)).sum(0)
    new_m2 = (sigma * x2 / (t + sigma) ** 2).sum(0)
    new_res2 = (x2 / (1 + sigma / t) ** 2).sum(0) + res_x2
    new_alpha, new_beta = gamma / (new_m2 + 1e-5), (n - gamma) / (new_res2 + 1e-5)
    alpha, beta = np.where(active, new_alpha, alpha), np.where(active, new_beta, beta)
    m2, res2 = np.where(active, new_m2, m2), np.where(active, new_res2, res2)
    active &= np.abs(new_alpha / new_beta - t) / t > 1e-3
    if not active.any():
      break
  evidence = (d / 2.0 * np.log(alpha) + n / 2.0 * np.log(beta)
              - 0.5 * np.log(alpha + beta * sigma).sum(0) - beta / 2.0 * res2
              - alpha / 2.0 * m2 - n / 2.0 * np.log(2 * np.pi))
  return float(np.mean(evidence / n))


def leep(source_probs, labels, *, num_classes: int | None = None):
  """LEEP: with source-class probabilities θ(x) [N, Z], the empirical joint
  P(y, z) = (1/N) Σ_i θ(x_i)_z [y_i = y], P(y | z) = P(y, z) / P(z), and
  score = (1/N) Σ_i log Σ_z P(y_i | z) θ(x_i)_z (<= 0; 0 for a source that identifies the
  target label, log(1/C) for an uninformative one on balanced classes). Source classes with
  P(z) = 0 contribute nothing (the reference divides 0 by 0 there)."""
  p = jnp.asarray(source_probs)
  num_classes = _check(p, labels, "source_probs", num_classes)
  return _out(_leep(p, jnp.asarray(labels), num_classes))


@functools.partial(jax.jit, static_argnames="num_classes")
def _leep(p, labels, num_classes):
  joint = jax.ops.segment_sum(p, labels, num_segments=num_classes) / p.shape[0]  # [C, Z]
  pz = joint.sum(0)
  cond = jnp.where(pz > 0, joint / jnp.where(pz > 0, pz, 1), 0)               # P(y | z)
  pred = jnp.take_along_axis(p @ cond.T, labels[:, None], axis=1)[:, 0]
  return jnp.mean(jnp.log(pred))


def _ledoit_wolf_shrinkage(fc):
  """sklearn's `ledoit_wolf_shrinkage` for centred [N, D] features."""
  n, d = fc.shape
  x2 = fc ** 2
  emp_trace = x2.sum(0) / n
  mu = emp_trace.sum() / d
  beta_ = jnp.sum(x2.T @ x2)
  delta_ = jnp.sum((fc.T @ fc) ** 2) / n ** 2
  beta = (beta_ / n - delta_) / (d * n)
  delta = (delta_ - 2 * mu * emp_trace.sum() + d * mu ** 2) / d
  beta = jnp.minimum(beta, delta)
  return jnp.where(delta > 0, beta / jnp.where(delta > 0, delta, 1), 0.0)


def h_score(features, labels, *, num_classes: int | None = None,
            shrinkage: float | str | None = None):
  """H-score: tr(cov(f)⁺ cov(E[f | y])), pseudo-inverse and (N - 1)-normalised covariances as
  in the common implementation (thuml/Transfer-Learning-Library `h_score`); `jnp.linalg.pinv`'s
  default cutoff (10·D·eps) replaces its rcond=1e-15, which is below float32 noise.

  `shrinkage` (off by default) is the regularised H-score of Ibrahim et al. (2022):
  tr(cov_α(f)⁻¹ (1 - α) cov(E[f | y])) with cov_α = (1 - α)·S + α·tr(S)/D·I, S the
  N-normalised covariance; `"ledoit_wolf"` estimates α as sklearn's LedoitWolf (their code),
  a float in [0, 1] fixes it. Both static under jit."""
  f = jnp.asarray(features)
  num_classes = _check(f, labels, "features", num_classes)
  if isinstance(shrinkage, str) and shrinkage != "ledoit_wolf":
    raise ValueError(f"shrinkage must be None, 'ledoit_wolf' or a float, got {shrinkage!r}")
  if shrinkage is not None and not isinstance(shrinkage, str) and not 0 <= shrinkage <= 1:
    raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage}")
  return _out(_h_score(f, jnp.asarray(labels), num_classes, shrinkage))


@functools.partial(jax.jit, static_argnames=("num_classes", "shrinkage"))
def _h_score(f, labels, num_classes, shrinkage):
  n, d = f.shape
  fc = f - f.mean(0)
  counts = jax.ops.segment_sum(jnp.ones(n, f.dtype), labels, num_segments=num_classes)
  means = jax.ops.segment_sum(fc, labels, num_segments=num_classes)
  means = means / jnp.maximum(counts, 1)[:, None]  # centred class means; empty classes weigh 0
  cov_g = (means.T * counts) @ means / (n - 1)
  if shrinkage is None:
    cov_f = fc.T @ fc / (n - 1)
  else:
    alpha = (_ledoit_wolf_shrinkage(fc) if isinstance(shrinkage, str)
             else jnp.asarray(shrinkage, f.dtype))
    emp = fc.T @ fc / n
    cov_f = (1 - alpha) * emp + alpha * jnp.trace(emp) / d * jnp.eye(d, dtype=f.dtype)
    cov_g = (1 - alpha) * cov_g
  return jnp.sum(jnp.linalg.pinv(cov_f, hermitian=True) * cov_g.T)


@functools.partial(jax.jit, static_argnames=("num_classes", "max_steps"))
def _ped_offsets(features, labels, num_classes, reference_features, time_step, nsigma,
                 constant, exit_ratio, max_steps, eps):
  """Total displacement of each class [C, D] (feature units) under PED's dynamics."""
  f = jnp.asarray(features)
  ref = f if reference_features is None else jnp.asarray(reference_features, f.dtype)
  mean, std = ref.mean(0), jnp.maximum(ref.std(0), eps)
  z = (f - mean) / std
  counts = jax.ops.segment_sum(jnp.ones(f.shape[0], f.dtype), labels, num_segments=num_classes)
  safe = jnp.maximum(counts, 1)[:, None]
  mu0 = jax.ops.segment_sum(z, labels, num_segments=num_classes) / safe
  var = jax.ops.segment_sum((z - mu0[labels]) ** 2, labels, num_segments=num_classes) / safe
  radius = jnp.sqrt(var.sum(1))  # sqrt of the trace of each class covariance
  present = counts > 0
  pair = present[:, None] & present[None, :] & ~jnp.eye(num_classes, dtype=bool)
  reach = abs(nsigma) * (radius[:, None] + radius[None, :])

  def shift(mu):
    """One step of the reference's `One_Step_PED` (distances via the [C, C] Gram matrix):
    class a moves away from each class b whose nsigma-spheres overlap it, along
    (μa - μb)/|μa - μb|, by min(½·dt²·constant·F, F), F = max(nsigma·(Ra + Rb) - |μa - μb|, 0)."""
    sq = (mu ** 2).sum(1)
    d = jnp.sqrt(jnp.maximum(sq[:, None] + sq[None, :] - 2 * mu @ mu.T, 0))
    force = jnp.maximum(reach - d, 0)
    step = jnp.minimum(0.5 * time_step ** 2 * constant * force, force)
    w = jnp.where(pair & (d > 0), step / jnp.where(d > 0, d, 1), 0)  # coincident: no force
    return w.sum(1)[:, None] * mu - w @ mu  # Σ_b w_ab (μa - μb)

  def body(i, carry):
    offset, first, moving = carry
    s = shift(mu0 + offset)
    change = jnp.abs(s).sum()
    first = jnp.where(i == 0, change, first)
    accept = moving & (jnp.where(first > 0, change / jnp.where(first > 0, first, 1), 0)
                       > exit_ratio)
    return offset + jnp.where(accept, s, 0), first, accept

  zero = jnp.zeros((), f.dtype)
  offset, _, _ = jax.lax.fori_loop(0, max_steps, body,
                                   (jnp.zeros_like(mu0), zero, jnp.array(True)))
  return offset * std


def _ped_inputs(features, labels, num_classes, reference_features):
  f = jnp.asarray(features)
  num_classes = _check(f, labels, "features", num_classes)
  if reference_features is not None and (jnp.ndim(reference_features) != 2 or
                                         jnp.shape(reference_features)[1] != f.shape[1]):
    raise ValueError(f"reference_features must be [M, {f.shape[1]}], got shape "
                     f"{tuple(jnp.shape(reference_features))}")
  return f, jnp.asarray(labels), num_classes


def ped_dynamics(features, labels, *, num_classes: int | None = None, reference_features=None,
                 time_step: float = 0.1, nsigma: float = 0.6, constant: float = 1.0,
                 exit_ratio: float = 0.5, max_steps: int = 6, eps: float = 1e-3):
  """PED's potential-energy descent (lixiaotong97/PED, `PED_Score` / `One_Step_PED`):
  `features` [N, D] moved by their class's displacement. Every class is a charged sphere at
  its mean with radius sqrt(tr cov) in standardised units ((x - mean) / max(std, eps) of
  `reference_features`); overlapping spheres of different classes repel (`_ped_offsets.shift`),
  all members of a class moving with it (so radii stay fixed). Up to `max_steps` (6, the
  reference's loop bound) steps of `time_step` (0.1); a step is kept only while its total
  |displacement| exceeds `exit_ratio` (0.5) times the first step's, the first failure ending
  the descent. `nsigma` = 0.6 and `constant` = 1 are the reference script's defaults (its
  function signature says nsigma = 2; the authors name 0.3 and 0.6 as candidates).

  Deviation: the reference standardises with the model's ImageNet-val features and requires
  them; with `reference_features=None` the target features' own statistics are used.
  Jit-able with `num_classes` and `max_steps` static."""
  f, labels, num_classes = _ped_inputs(features, labels, num_classes, reference_features)
  offsets = _ped_offsets(f, labels, num_classes, reference_features, time_step, nsigma,
                         constant, exit_ratio, max_steps, eps)
  return f + offsets[labels]


def ped(features, labels, *, score: Callable = logme, num_classes: int | None = None,
        reference_features=None, time_step: float = 0.1, nsigma: float = 0.6,
        constant: float = 1.0, exit_ratio: float = 0.5, max_steps: int = 6,
        eps: float = 1e-3) -> float:
  """PED: `score(moved_features, labels)` after the dynamics of `ped_dynamics` (same keywords
  and defaults). The reference offers SFDA (its default), NLEEP and LogME afterwards; LogME,
  which the paper also reports, is the default here, and any estimator of this module taking
  (features, labels) fits. The class displacements are added to the features in float64, so
  `max_steps=0` scores exactly the unmoved features. Not jit-able (the score runs eagerly)."""
  f, y, num_classes = _ped_inputs(features, labels, num_classes, reference_features)
  offsets = _ped_offsets(f, y, num_classes, reference_features, time_step, nsigma, constant,
                         exit_ratio, max_steps, eps)
  y = np.asarray(labels)
  moved = np.asarray(features, np.float64) + np.asarray(offsets, np.float64)[y]
  return float(score(moved, y))


# ------------------------------------------------------------------ Over an export's features.


def export_features(export_dir: str, input_cfg=None, split: str = "train", *,
                    few_shot: bool = False, data_dir: str | None = None, devices=None,
                    batch_size: int = 256, zero_shot: str | None = None
                    ) -> dict[str, np.ndarray]:
  """{'features' [N, D] (the head's input), 'logits' [N, Z] (the export's own head, over its
  source classes: LEEP's θ), 'label' [N]} of every example of `split` of input_cfg's dataset
  (the labelled target set; default the export's own input) through a supervised export, BN
  running statistics included. `few_shot`: only the input_cfg.examples_per_class examples
  (subset_seed) that a few-shot fine-tune with input_cfg reads. input_cfg's preprocessing
  is used as given: pass the fine-tune's (config.init_from_export resizes to the export's
  image size).

  A contrastive (two-tower) export: the features are its image tower's pooled output (the
  head input of a fine-tune of export.export_tower's ViT), the logits its zero-shot
  classifier of attribute `zero_shot` (required: one of its contrastive.zero_shot keys; the
  prompt-ensembled class names of its pretraining data) at its logit scale."""
  from jax_transfer.evaluators.common import HeadOutputs, load_export  # pylint: disable=g-import-not-at-top
  method, params, extra = load_export(export_dir, data_dir, devices)
  if method.config.method == "contrastive":
    apply_fn, num_classes = _zero_shot_head(method, params, zero_shot, export_dir)
  elif hasattr(method, "apply_eval") and "head" in params:
    apply_fn, num_classes = method.apply_eval, np.shape(params["head"]["kernel"])[-1]
  else:
    raise ValueError(f"{export_dir}: a {method.config.method!r} export is not a classifier "
                     f"with a head/ (supervised, dann) nor a two-tower model (contrastive)")
  input_cfg = method.config.input if input_cfg is None else input_cfg
  outputs = HeadOutputs(apply_fn, method.has_batch_stats)
  logits, features, cols = outputs(params, extra, num_classes,
                                   input_cfg, split, batch_size, method.mesh, keep=("label",))
  out = {"features": features, "logits": logits, "label": cols["label"].astype(np.int64)}
  if few_shot:
    out = {k: v[few_shot_rows(input_cfg, split)] for k, v in out.items()}
  return out


def _zero_shot_head(method, params, attribute, export_dir):
  """(apply_fn, number of classes) of a contrastive export's zero-shot classifier."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax_transfer.evaluators.zero_shot import class_embeddings  # pylint: disable=g-import-not-at-top
  prompts = method.config.contrastive.zero_shot
  if attribute not in prompts or attribute not in method.attributes:
    raise ValueError(f"{export_dir}: a contrastive export's source head is a zero-shot "
                     f"classifier; zero_shot={attribute!r} is not one of its "
                     f"contrastive.zero_shot attributes {sorted(prompts.keys())}")
  names = method.attributes[attribute]
  classifier = class_embeddings(jax.jit(method.encode_text), params, method.tokenizer, names,
                                list(prompts[attribute])).astype(np.float32)
  return (lambda p, images: method.apply_zero_shot(p, images, classifier)), len(names)


def few_shot_rows(input_cfg, split: str) -> np.ndarray:
  """bool [N] over export_features' rows of `split` (few_shot=False): True for the
  input_cfg.examples_per_class examples (subset_seed) a few-shot fine-tune reads. Seeds that
  differ only in subset_seed share one export_features call."""
  from jax_transfer.data import pipeline  # pylint: disable=g-import-not-at-top
  return np.isin(pipeline.select_indices(input_cfg, split, few_shot=False),
                 pipeline.select_indices(input_cfg, split, few_shot=True))


ESTIMATORS = ("logme", "leep", "h_score", "h_score_shrunk", "ped")


def estimate_all(features, source_logits, labels, num_classes: int | None = None
                 ) -> dict[str, float]:
  """Every estimator of this module on one labelled target set: LogME, LEEP (softmax of the
  source head's logits), H-score, H-score with Ledoit-Wolf shrinkage (Ibrahim et al.; stable
  when N is near or below D) and PED (its dynamics, then LogME)."""
  f = np.asarray(features, np.float64)
  z = np.asarray(source_logits, np.float64)
  probs = np.exp(z - z.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  kw = {"num_classes": num_classes}
  return {"logme": logme(f, labels), "leep": leep(probs.astype(np.float32), labels, **kw),
          "h_score": h_score(f.astype(np.float32), labels, **kw),
          "h_score_shrunk": h_score(f.astype(np.float32), labels, shrinkage="ledoit_wolf", **kw),
          "ped": ped(f.astype(np.float32), labels, **kw)}

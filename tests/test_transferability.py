"""Transferability estimators: defining properties, and agreement with numpy transcriptions of
the reference implementations (thuml/LogME `_fit_fixed_point`, lixiaotong97/PED
`One_Step_PED` / `PED_Score`, the common H-score) on small random data."""
import jax
import numpy as np
import pytest

from jax_transfer.evaluators import transferability as T


def _data(n=120, d=8, c=4, informative=True, seed=0):
  rng = np.random.default_rng(seed)
  y = np.arange(n) % c
  centres = 3.0 * rng.normal(size=(c, d))
  f = rng.normal(size=(n, d)) + (centres[y] if informative else 0)
  return f.astype(np.float32), y


def _reference_logme(f, y):
  """thuml/LogME LogME._fit_fixed_point, per-class loop, float64."""
  f = f.astype(np.float64)
  n, d = f.shape
  if n > d:
    _, s, vh = np.linalg.svd(f.T @ f)
    s = np.sqrt(s)
    k = np.sum(s > 1e-10)
    s, vh = s[:k].reshape(-1, 1), vh[:k]
    u = (f @ vh.T)[:, :k] / s.reshape(1, -1)
  else:
    u, s, vh = np.linalg.svd(f, full_matrices=False)
  s = s.reshape(-1, 1)
  sigma = s ** 2
  evidences = []
  for i in range(int(y.max() + 1)):
    y_ = (y == i).astype(np.float64).reshape(-1, 1)
    x = u.T @ y_
    x2 = x ** 2
    res_x2 = (y_ ** 2).sum() - x2.sum()
    alpha, beta = 1.0, 1.0
    for _ in range(11):
      t = alpha / beta
      gamma = (sigma / (sigma + t)).sum()
      m2 = (sigma * x2 / ((t + sigma) ** 2)).sum()
      res2 = (x2 / ((1 + sigma / t) ** 2)).sum() + res_x2
      alpha = gamma / (m2 + 1e-5)
      beta = (n - gamma) / (res2 + 1e-5)
      if abs(alpha / beta - t) / t <= 1e-3:
        break
    evidence = (d / 2.0 * np.log(alpha) + n / 2.0 * np.log(beta)
                - 0.5 * np.sum(np.log(alpha + beta * sigma)) - beta / 2.0 * res2
                - alpha / 2.0 * m2 - n / 2.0 * np.log(2 * np.pi))
    evidences.append(evidence / n)
  return np.mean(evidences)


def _reference_h_score(f, y):
  f = f.astype(np.float64)
  g = np.zeros_like(f)
  for i in range(int(y.max() + 1)):
    g[y == i] = f[y == i].mean(0)
  return np.trace(np.linalg.pinv(np.cov(f, rowvar=False), rcond=1e-15) @
                  np.cov(g, rowvar=False))


def _reference_ped(x, y, general, time_step=0.1, nsigma=0.6, constant=1.0, exit_ratio=0.5):
  """lixiaotong97/PED PED_Score's loop around One_Step_PED (float64, prints dropped)."""
  def one_step(x):
    smean, sstd = general.mean(0), np.maximum(general.std(0), 1e-3)
    x = (x - smean) / sstd
    c = int(y.max() + 1)
    means = np.stack([x[y == k].mean(0) for k in range(c)])
    radius = np.sqrt(np.stack([x[y == k].var(0) for k in range(c)]).sum(1))
    gi, gj = np.meshgrid(np.arange(c), np.arange(c))
    mask = np.triu(gi != gj, k=1)
    gi, gj = gi[mask], gj[mask]
    dist = means[gi] - means[gj]
    d = np.sqrt((dist ** 2).sum(1))
    force = np.maximum(nsigma * radius[gi] + nsigma * radius[gj] - d, 0).reshape(-1, 1)
    inter = np.zeros((c, c, x.shape[1]))
    inter[mask] = -dist / d[:, None] * np.minimum(0.5 * time_step ** 2 * constant * force,
                                                   force)
    overall = (inter - inter.transpose(1, 0, 2)).sum(1)
    return (x + overall[y]) * sstd + smean, np.abs(overall).sum()

  x = x.astype(np.float64)
  for step in range(6):
    new, change = one_step(x)
    first = change if step == 0 else first
    if change / first > exit_ratio:
      x = new
    else:
      break
  return x


@pytest.mark.parametrize("n,d", [(120, 8), (12, 30)])  # N > D (Gram SVD) and N < D
def test_logme_matches_reference_transcription(n, d):
  f, y = _data(n, d, informative=False, seed=n)
  assert T.logme(f, y) == pytest.approx(_reference_logme(f, y), rel=1e-9, abs=1e-9)


def test_logme_prefers_informative_features():
  assert T.logme(*_data()) > T.logme(*_data(informative=False))


def test_leep_perfect_and_uniform_source():
  _, y = _data(c=5)
  assert isinstance(T.leep(np.eye(5)[y], y), float)
  assert T.leep(np.eye(5)[y], y) == pytest.approx(0.0, abs=1e-6)
  # Extra source classes that never fire must not matter.
  assert T.leep(np.eye(7)[y], y) == pytest.approx(0.0, abs=1e-6)
  assert T.leep(np.full((len(y), 3), 1 / 3), y) == pytest.approx(np.log(1 / 5), abs=1e-5)


def test_h_score_matches_formula_and_prefers_informative():
  f, y = _data()
  assert T.h_score(f, y) == pytest.approx(_reference_h_score(f, y), rel=1e-4)
  assert T.h_score(f, y) > T.h_score(*_data(informative=False))
  # Shrinkage: alpha = 0 is the plain score up to the N/(N-1) of the biased cov(f).
  n = len(y)
  assert T.h_score(f, y, shrinkage=0.0) == pytest.approx(T.h_score(f, y) * n / (n - 1), rel=1e-4)
  lw = T.h_score(f, y, shrinkage="ledoit_wolf")
  assert np.isfinite(lw) and lw < T.h_score(f, y, shrinkage=0.0)


def test_ped():
  f, y = _data()
  score = T.ped(f, y)
  assert isinstance(score, float) and np.isfinite(score)
  assert score > T.ped(*_data(informative=False))
  assert T.ped(f, y, max_steps=0) == T.logme(f, y)
  assert T.ped(f, y, max_steps=0, score=T.h_score) == T.h_score(f.astype(np.float64), y)


def test_ped_dynamics_matches_reference_transcription():
  # Overlapping classes (small centre spread) so that the spheres repel.
  rng = np.random.default_rng(1)
  y = np.arange(90) % 3
  f = (rng.normal(size=(90, 6)) + 0.5 * rng.normal(size=(3, 6))[y]).astype(np.float32)
  general = rng.normal(size=(200, 6)) * 2 + 1
  ref = _reference_ped(f, y, general)
  assert np.abs(ref - f).max() > 1e-2  # it moved
  np.testing.assert_allclose(T.ped_dynamics(f, y, reference_features=general), ref,
                             rtol=1e-4, atol=1e-4)


def test_jit_matches_eager():
  f, y = _data()
  p = np.asarray(jax.nn.softmax(f[:, :5]))
  assert float(jax.jit(T.leep, static_argnames="num_classes")(p, y, num_classes=4)) == \
      pytest.approx(T.leep(p, y), rel=1e-5)
  hs = jax.jit(T.h_score, static_argnames=("num_classes", "shrinkage"))
  assert float(hs(f, y, num_classes=4)) == pytest.approx(T.h_score(f, y), rel=1e-4)
  assert float(hs(f, y, num_classes=4, shrinkage="ledoit_wolf")) == \
      pytest.approx(T.h_score(f, y, shrinkage="ledoit_wolf"), rel=1e-4)
  dyn = jax.jit(T.ped_dynamics, static_argnames=("num_classes", "max_steps"))
  np.testing.assert_allclose(dyn(f, y, num_classes=4), T.ped_dynamics(f, y), rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize("fn", [T.logme, T.leep, T.h_score, T.ped])
@pytest.mark.parametrize("args,match", [
    ((np.zeros((10,)), np.arange(10) % 2), r"(features|source_probs) must be \[N, D\]"),
    ((np.zeros((10, 3)), np.zeros((10, 1), int)), r"labels must be \[N\]"),
    ((np.zeros((10, 3)), np.arange(9) % 2), "labels has 9 entries but .* has 10 rows"),
    ((np.zeros((10, 3)), np.arange(10) - 1), "labels out of range"),
    ((np.zeros((10, 3)), np.zeros(10, int)), "at least 2 classes"),
    ((np.zeros((10, 3)), np.arange(10) / 2), "labels must be integers"),
])
def test_bad_input(fn, args, match):
  with pytest.raises(ValueError, match=match):
    fn(*args)


def test_bad_input_keywords():
  f, y = _data()
  with pytest.raises(ValueError, match="labels out of range"):
    T.leep(np.eye(4)[y], y, num_classes=3)
  with pytest.raises(ValueError, match="shrinkage"):
    T.h_score(f, y, shrinkage=2.0)
  with pytest.raises(ValueError, match="reference_features"):
    T.ped_dynamics(f, y, reference_features=np.zeros((5, 3)))
  with pytest.raises(ValueError, match="num_classes"):
    jax.jit(T.leep)(np.eye(4)[y], y)


def test_export_features_are_the_models_and_few_shot_is_the_fine_tunes_subset(exports,
                                                                                data_dir):
  """export_features of the base export on digits 5-9 (a target of other classes): the head's
  input and output as the model computes them, labels remapped to 0..4, and few_shot keeps
  exactly the examples_per_class draw a few-shot fine-tune reads; estimate_all scores them."""
  from conftest import tiny_vit_config
  from jax_transfer import checkpoint
  from jax_transfer import data
  from jax_transfer.data import pipeline
  from jax_transfer.evaluators.common import load_export
  target = tiny_vit_config(data_dir, "transfer,runlocal").input
  target.subset_seed = 3
  dev = jax.devices()[:1]
  full = T.export_features(exports["base"], target, "train", devices=dev)
  few = T.export_features(exports["base"], target, "train", few_shot=True, devices=dev)
  idx = pipeline.select_indices(target, "train", few_shot=False)
  assert full["features"].shape[0] == len(idx) == len(full["label"])
  assert set(np.unique(full["label"])) == set(range(5))
  assert few["features"].shape[0] == 5 * target.examples_per_class
  assert np.bincount(few["label"]).tolist() == [target.examples_per_class] * 5
  rows = np.isin(idx, pipeline.select_indices(target, "train", few_shot=True))
  np.testing.assert_array_equal(few["features"], full["features"][rows])

  method, params, _ = load_export(exports["base"], devices=dev)
  images = next(iter(pipeline.make_eval_iterator(target, "train", batch_size=8)))["image"]
  images = data.normaliser(target, train=False)({"image": images})["image"]
  logits, aux = method.apply_eval(params, images)
  np.testing.assert_allclose(full["logits"][:8], logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(full["features"][:8], aux["pre_logits"], rtol=1e-5, atol=1e-5)
  assert full["logits"].shape[1] == checkpoint.load_export_params(
      exports["base"])["head"]["kernel"].shape[-1]

  scores = T.estimate_all(few["features"], few["logits"], few["label"])
  assert list(scores) == list(T.ESTIMATORS) and all(np.isfinite(v) for v in scores.values())
  assert scores["logme"] == T.logme(few["features"], few["label"])
  assert -np.log(full["logits"].shape[1]) - 1e-6 <= scores["leep"] <= 0

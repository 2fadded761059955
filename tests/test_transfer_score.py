"""Transfer Score (jax_transfer/evaluators/transfer_score.py): its three terms at their known
values, the total against a transcription of sleepyseal/TransferScore, and the evaluator on a
target-domain split without reading labels."""
import math

import flax.linen as nn
import jax
import numpy as np
import pytest

from conftest import tiny_vit_config
from jax_transfer import checkpoint, methods, parallel
from jax_transfer.evaluators import common
from jax_transfer.evaluators import transfer_score as ts


def _simplex(c, d):
  """c unit vectors in R^d with all pairwise cosines -1/(c-1) (c <= d + 1)."""
  e = np.eye(c) - 1.0 / c
  q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((d, d)))
  return (q[:, :c] @ e) / np.linalg.norm(e, axis=0)  # [d, c]: columns are the classes.


def test_hopkins_uniform_and_clustered():
  rng = np.random.default_rng(123)  # Not hopkins's seeds: its draws would be the data.
  hs = [ts.hopkins(rng.uniform(size=(2000, 3)), seed=s) for s in range(5)]
  assert abs(np.mean(hs) - 0.5) < 0.05, hs
  centres = 10.0 * rng.standard_normal((5, 3))
  blobs = (centres[:, None] + 0.01 * rng.standard_normal((5, 400, 3))).reshape(-1, 3)
  assert ts.hopkins(blobs) > 0.95
  assert ts.hopkins(blobs, seed=3) == ts.hopkins(blobs, seed=3)  # Deterministic.
  with pytest.raises(ValueError, match="m"):
    ts.hopkins(rng.uniform(size=(10, 2)))  # 5% of 10 rounds to 0.


def test_uncertainty_extremes():
  c = 10
  onehot = 50.0 * np.eye(c)[np.arange(320) % c]
  ent, gent = ts.entropy_terms(onehot, batch_size=None)
  assert abs(ent) < 1e-3 and abs(gent - 1) < 1e-3
  assert abs(ts.prediction_uncertainty(onehot, batch_size=None) + 1) < 1e-3
  flat = np.zeros((320, c))
  ent, gent = ts.entropy_terms(flat)
  assert abs(ent - 1) < 1e-3 and abs(ts.prediction_uncertainty(flat)) < 1e-3
  assert abs(ts.prediction_uncertainty(50.0 * np.eye(c)[np.zeros(64, int)])) < 1e-3


def test_uniformity_simplex_best_collapsed_worst():
  c, d = 5, 16
  simplex = _simplex(c, d)
  assert ts.classifier_uniformity(simplex) < 1e-12
  scaled = simplex * np.arange(1, c + 1)  # Norms do not enter.
  assert abs(ts.classifier_uniformity(scaled)) < 1e-12
  ortho = np.eye(d)[:, :c] * 3.0
  u_ortho = ts.classifier_uniformity(ortho)
  assert abs(u_ortho - (math.pi / 2 - math.acos(-1 / (c - 1))) ** 2) < 1e-12
  v = np.random.default_rng(1).standard_normal((d, 1))
  collapsed = v + 1e-3 * np.random.default_rng(2).standard_normal((d, c))
  assert ts.classifier_uniformity(collapsed) > 2.0 > u_ortho
  assert np.isfinite(ts.classifier_uniformity(np.tile(v, (1, c))))  # Clipped, not NaN.


def _reference(x, logits, kernel, seed, bs):
  """train.py get_transfer_score / utils.py uniformity in numpy, with this module's draws."""
  weight = kernel.T
  wn = weight / np.maximum(np.linalg.norm(weight, axis=1, keepdims=True), 1e-12)
  cosine = wn @ wn.T
  n = cosine.shape[0]
  cosine = cosine.flatten()[:-1].reshape(n - 1, n + 1)[:, 1:]
  u = np.mean((np.arccos(cosine) - np.arccos(-1 / (n - 1))) ** 2)
  order = np.random.default_rng(seed).permutation(len(x))
  im_loss = []
  for i in range(len(x) // bs):
    y = logits[order[i * bs:(i + 1) * bs]]
    sm = np.exp(y - y.max(1, keepdims=True))
    sm /= sm.sum(1, keepdims=True)
    loss = np.mean(np.sum(-sm * np.log(sm + 1e-5), 1))
    ms = sm.mean(0)
    im_loss.append(loss - np.sum(-ms * np.log(ms + 1e-6)))
  size = int(x.shape[0] * 0.05)
  rng = np.random.default_rng(seed)
  unif = rng.uniform(x.min(axis=0), x.max(axis=0), (size, x.shape[1]))
  sample = x[rng.choice(len(x), size, replace=False)]
  dist = lambda a: np.sort(np.linalg.norm(a[:, None] - x[None], axis=-1), 1)
  u_sum, w_sum = dist(unif)[:, 0].sum(), dist(sample)[:, 1].sum()
  h = u_sum / (u_sum + w_sum)
  return h - sum(im_loss) / len(im_loss) / math.log(logits.shape[1]) - u


def test_total_matches_reference_transcription():
  rng = np.random.default_rng(0)
  x, logits = rng.standard_normal((300, 8)), 3 * rng.standard_normal((300, 6))
  kernel = rng.standard_normal((8, 6))
  for seed in (0, 1):
    out = ts.transfer_score(x, logits, kernel, seed=seed)
    np.testing.assert_allclose(out["transfer_score"], _reference(x, logits, kernel, seed, 32),
                               rtol=1e-9)
    np.testing.assert_allclose(
        out["transfer_score"], out["hopkins"] - out["uncertainty"] - out["uniformity"])


@pytest.fixture(scope="module")
def export(data_dir, tmp_path_factory):
  from jax_transfer.data import builders
  builders.ensure_embedded("digits_rotated", data_dir)
  c = tiny_vit_config(data_dir)
  c.eval.datasets = ("digits_rotated",)
  mesh = parallel.make_mesh(c.mesh, jax.devices()[:1])
  method = methods.get_method(c.method)(c, mesh)
  flat = checkpoint.flatten(jax.device_get(nn.unbox(method.init_params(jax.random.key(0)))))
  flat["head/kernel"] = np.random.default_rng(0).standard_normal(flat["head/kernel"].shape
                                                                 ).astype(np.float32)
  d = str(tmp_path_factory.mktemp("ts") / "export")
  checkpoint.export(checkpoint.unflatten(flat), c, d)
  return method, checkpoint.unflatten(flat), d


def test_evaluator_reads_no_labels(export, monkeypatch):
  method, params, export_dir = export
  ev = ts.for_method(method, "digits_rotated", limit=200)
  assert ev.name == "transfer_digits_rotated"
  out = ev.run(params)
  assert set(out) >= {"transfer_score", "hopkins", "uncertainty", "uniformity"}
  assert all(np.isfinite(v) for v in out.values())
  assert out["uniformity"] == ts.classifier_uniformity(params["head"]["kernel"])

  make = common.data.make_eval_iterator

  def no_labels(*a, **k):
    for batch in make(*a, **k):
      yield {key: v for key, v in batch.items() if key != "label"}
  monkeypatch.setattr(common.data, "make_eval_iterator", no_labels)
  assert ev.run(params) == out  # Unchanged with the label column gone.
  assert ts.score_export(export_dir, "digits_rotated", limit=200,
                         devices=jax.devices()[:1]) == pytest.approx(out)


def test_config_flag_adds_one_per_target(export):
  method = export[0]
  assert [e.name for e in method.evaluators()] == ["eval", "eval_digits_rotated"]
  c = method.config.copy_and_resolve_references()
  c.eval.transfer_score = True
  evs = methods.get_method(c.method)(c, method.mesh).evaluators()
  assert [e.name for e in evs] == ["eval", "eval_digits_rotated", "transfer_digits_rotated"]
  assert isinstance(evs[-1], ts.TransferScoreEvaluator)

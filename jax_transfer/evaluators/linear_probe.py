"""Linear probe on frozen image embeddings, solved in closed form (ridge regression to one-hot
targets, bias column unpenalised in effect by a tiny ridge). Optionally few-shot: `shots`
training examples per class, drawn with a fixed seed."""
from __future__ import annotations

import jax
import numpy as np

from jax_transfer.evaluators.common import embed_split


def ridge_fit_predict(x_train, y_train, x_test, num_classes: int, l2: float) -> np.ndarray:
  """Closed-form ridge: W = (XᵀX + λI)⁻¹ XᵀY with X = [x, 1]; returns predicted classes."""
  add_bias = lambda x: np.concatenate([x, np.ones((len(x), 1))], axis=1)
  x, xt = add_bias(x_train.astype(np.float64)), add_bias(x_test.astype(np.float64))
  y = np.eye(num_classes)[y_train]
  w = np.linalg.solve(x.T @ x + l2 * np.eye(x.shape[1]), x.T @ y)
  return np.argmax(xt @ w, axis=1)


def few_shot_indices(labels: np.ndarray, shots: int, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:shots]
                         for c in np.unique(labels)])


class LinearProbeEvaluator:
  """Reports `<label_key>_accuracy` (and `<label_key>_<shots>shot_accuracy`) on `test_split`
  for each label key, fitting on up to `train_limit` examples of `train_split`."""

  def __init__(self, *, image_fn, input_cfg, train_split, test_split, batch_size, mesh,
               label_keys: dict, every_steps: int, shots=(), l2: float = 1e-3,
               train_limit: int = 4000, test_limit=None, name: str = "linear_probe"):
    self.name, self.every_steps = name, every_steps
    self._fn = jax.jit(lambda p, images: image_fn(p, images))
    self._input, self._bs, self._mesh = input_cfg, batch_size, mesh
    self._train, self._test, self._keys = train_split, test_split, label_keys
    self._shots, self._l2 = tuple(shots), l2
    self._train_limit, self._test_limit = train_limit, test_limit

  def run(self, params, extra=None) -> dict:
    del extra
    embed = lambda split, limit: embed_split(
        self._fn, params, self._input, split, self._bs,
        self._mesh, inputs=lambda b: {"images": b["image"]}, keep=tuple(self._keys),
        limit=limit)
    tr, te = embed(self._train, self._train_limit), embed(self._test, self._test_limit)
    out = {}
    for key, num_classes in self._keys.items():
      pred = ridge_fit_predict(tr["out"], tr[key], te["out"], num_classes, self._l2)
      out[f"{key}_accuracy"] = float(np.mean(pred == te[key]))
      for shots in self._shots:
        idx = few_shot_indices(tr[key], shots)
        pred = ridge_fit_predict(tr["out"][idx], tr[key][idx], te["out"], num_classes,
                                 self._l2)
        out[f"{key}_{shots}shot_accuracy"] = float(np.mean(pred == te[key]))
    return out


def label_probe(config, mesh, image_fn, *, train_limit: int, shots=(), l2: float = 1e-2,
                name: str = "probe") -> list:
  """The ridge probe on the run's labelled eval data (the pipeline's 'label' column =
  input.label_key), as a one-element evaluator list; [] when the dataset has no labels.
  Shared by methods whose own loss is unsupervised (SSL, distilled-set pretraining)."""
  from jax_transfer import data
  c = config
  info = data.dataset_info(c.input.dataset, c.input.data_dir, label_key=c.input.label_key)
  if not info["num_classes"]:
    return []
  return [LinearProbeEvaluator(
      image_fn=image_fn, input_cfg=c.input, train_split=c.input.train_split,
      test_split=c.eval.split, batch_size=c.eval.batch_size, mesh=mesh,
      label_keys={"label": info["num_classes"]}, every_steps=c.eval_every_steps,
      shots=tuple(shots), l2=l2, train_limit=train_limit, name=name)]

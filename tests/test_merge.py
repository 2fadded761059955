"""jax_transfer/merge.py: the merge formulas against plain-numpy transcriptions of the papers'
reference code, the exact sharded TIES threshold, the diagonal Fisher against a closed form,
and the merge command over exports (8 simulated devices equal 1; bad input refused before
anything is written)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_transfer import checkpoint, merge


def _trees(n=3, seed=0):
  rng = np.random.default_rng(seed)
  shapes = {"a": (6, 5), "b": (7,), "c": (2, 3, 4)}
  base = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
  models = [{k: v + rng.standard_normal(v.shape).astype(np.float32) * (0.5 + i)
             for k, v in base.items()} for i in range(n)]
  models[0]["b"][:3] = base["b"][:3]  # exact zeros in a task vector
  return base, models


def _ties_reference(base, models, top_k, scale, scope):
  """TIES as the authors' code (ties_merging.py): rows = flattened task vectors."""
  keys = sorted(base)

  def flat(t):
    return np.concatenate([t[k].ravel() for k in keys])

  def merge_rows(m):  # m [n_tasks, d]
    d = m.shape[1]
    k = max(d - int(d * top_k), 1)  # top_k = 1 (keep all): the code would fail at k = 0
    kth = np.sort(np.abs(m), axis=1)[:, k - 1:k]  # torch.kthvalue(k) (1-indexed)
    m = m * (np.abs(m) >= kth)
    sign = np.sign(m.sum(0))
    sign[sign == 0] = np.sign(sign.sum())
    keep = np.where(sign > 0, m > 0, m < 0)
    sel = m * keep
    return sel.sum(0) / np.maximum((sel != 0).sum(0), 1)
  taus = [{k: m[k] - base[k] for k in keys} for m in models]
  if scope == "global":
    merged = merge_rows(np.stack([flat(t) for t in taus]))
    out, i = {}, 0
    for k in keys:
      out[k] = base[k] + scale * merged[i:i + base[k].size].reshape(base[k].shape)
      i += base[k].size
    return out
  return {k: base[k] + scale * merge_rows(np.stack([t[k].ravel() for t in taus])).reshape(
      base[k].shape) for k in keys}


@pytest.mark.parametrize("scope", ["global", "tensor"])
@pytest.mark.parametrize("top_k", [0.2, 0.5, 1.0])
def test_ties_equals_the_reference_code(scope, top_k):
  base, models = _trees()
  got = jax.jit(lambda b, ms: merge.ties(b, ms, 0.7, top_k, scope))(base, models)
  want = _ties_reference(base, models, top_k, 0.7, scope)
  for k in base:
    np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=1e-6, atol=1e-6, err_msg=k)


def test_kth_smallest_abs_is_exact_with_ties_and_zeros():
  rng = np.random.default_rng(3)
  leaves = [rng.standard_normal(50).astype(np.float32), np.zeros(7, np.float32),
            np.repeat(np.float32([1.5, -1.5]), 5)]
  every = np.sort(np.abs(np.concatenate(leaves)))
  for k in (1, 7, 8, 30, 57, 60, len(every)):
    assert float(merge._kth_smallest_abs([jnp.asarray(x) for x in leaves], k)) == every[k - 1]


def test_average_wise_ft_task_arithmetic_and_fisher():
  base, models = _trees()
  soup = merge.average(models)
  np.testing.assert_allclose(soup["a"], np.mean([m["a"] for m in models], 0), rtol=1e-6)
  for alpha in (0.0, 0.3, 1.0):
    w = merge.wise_ft(base, models[0], alpha)
    np.testing.assert_allclose(w["c"], (1 - alpha) * base["c"] + alpha * models[0]["c"],
                               rtol=1e-6, atol=1e-6)
  ta = merge.task_arithmetic(base, models, 0.5, signs=[1, -1, 1])
  want = base["a"] + 0.5 * ((models[0]["a"] - base["a"]) - (models[1]["a"] - base["a"])
                            + (models[2]["a"] - base["a"]))
  np.testing.assert_allclose(ta["a"], want, rtol=1e-5, atol=1e-6)
  ones = [{k: np.ones_like(v) for k, v in base.items()} for _ in models]
  np.testing.assert_allclose(merge.fisher_merge(models, ones)["b"], soup["b"], rtol=1e-6)
  rng = np.random.default_rng(1)
  fishers = [{k: np.abs(rng.standard_normal(v.shape)).astype(np.float32) for k, v in
              base.items()} for _ in models]
  fishers[1]["a"][:] = 0  # floored
  got = merge.fisher_merge(models, fishers, weights=[1, 2, 3], floor=1e-3, normalize=True)
  norms = [np.sqrt(sum(np.sum(f[k] ** 2) for k in f)) for f in fishers]
  w = [wi / n for wi, n in zip([1, 2, 3], norms)]
  for k in base:
    c = [wi * np.maximum(f[k], 1e-3) for wi, f in zip(w, fishers)]
    want = sum(ci * m[k] for ci, m in zip(c, models)) / sum(c)
    np.testing.assert_allclose(np.asarray(got[k]), want, rtol=1e-5, atol=1e-6, err_msg=k)


def test_diagonal_fisher_of_softmax_regression_equals_closed_form():
  """logits = x W: d log p(y|x) / dW = x (e_y - p)^T, so the expected Fisher is
  mean_x sum_y p_y (x (e_y - p)^T)^2; sampled labels estimate it without bias."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((40, 3)).astype(np.float32)
  w = rng.standard_normal((3, 4)).astype(np.float32)
  fn = lambda p, b: b["x"] @ p["w"]
  batches = [{"x": x[:25]}, {"x": x[25:]}]
  got = merge.diagonal_fisher(fn, {"w": w}, batches)["w"]
  logits = x @ w
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  want = np.zeros_like(w)
  for i in range(len(x)):
    for y in range(4):
      e = np.eye(4)[y]
      want += p[i, y] * np.square(np.outer(x[i], e - p[i]))
  want /= len(x)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
  many = [{"x": np.repeat(x, 50, 0)}]
  sampled = merge.diagonal_fisher(fn, {"w": w}, many, labels="sampled")["w"]
  np.testing.assert_allclose(np.asarray(sampled), want, rtol=0.15, atol=0.02)


# ------------------------------------------------------------------------------- Exports.

@pytest.mark.parametrize("method,kw", [("ties", dict(top_k=0.2)), ("task_arithmetic", {}),
                                       ("average", {})])
def test_merge_on_8_devices_equals_1_and_the_formula(exports, method, kw):
  base, models = exports["base"], exports["models"]
  m8, _ = merge.merge_exports(base, models, method, scale=0.6, **kw)
  m1, _ = merge.merge_exports(base, models, method, scale=0.6, devices=jax.devices()[:1])
  assert len(jax.devices()) == 8
  sharded = [k for k, v in m8.items() if len(v.sharding.device_set) == 8 and
             not v.sharding.is_fully_replicated]
  assert sharded  # the merge ran on sharded leaves
  for k in m1:
    np.testing.assert_allclose(np.asarray(m8[k]), np.asarray(m1[k]), rtol=1e-6, atol=1e-7,
                               err_msg=k)
  b = checkpoint.load_export_params(base)
  ms = [checkpoint.load_export_params(m) for m in models]
  keys = [k for k in checkpoint.flatten(b) if not k.startswith("head/")]
  bf = {k: checkpoint.flatten(b)[k] for k in keys}
  mf = [{k: checkpoint.flatten(m)[k] for k in keys} for m in ms]
  want = {"ties": lambda: _ties_reference(bf, mf, 0.2, 0.6, "global"),
          "task_arithmetic": lambda: merge.task_arithmetic(bf, mf, 0.6),
          "average": lambda: merge.average(mf)}[method]()
  for k in keys:
    np.testing.assert_allclose(np.asarray(m1[k]), np.asarray(want[k]), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(m1["head/kernel"]),
                                checkpoint.flatten(b)["head/kernel"])  # skipped: the base's


def test_cli_writes_a_loadable_export_and_refuses_bad_input(exports, tmp_path, capsys):
  base, models = exports["base"], exports["models"]
  out = str(tmp_path / "merged")
  assert merge.main([f"--base={base}", f"--models={models[0]}", "--method=wise_ft",
                     "--scale=0.5", f"--out={out}"]) == 0
  model, params, config = checkpoint.load_pretrained(out)
  assert config.merge.method == "wise_ft"
  b, f = (checkpoint.flatten(checkpoint.load_export_params(d)) for d in (base, models[0]))
  got = checkpoint.flatten(params)
  np.testing.assert_allclose(got["encoder_norm/scale"],
                             0.5 * b["encoder_norm/scale"] + 0.5 * f["encoder_norm/scale"],
                             rtol=1e-6)
  before = sorted(os.listdir(out))
  stamp = os.path.getmtime(os.path.join(out, "params.safetensors"))
  for argv, pattern in [
      ([f"--models={exports['wide']}", "--method=average"], "not the architecture"),
      ([f"--models={exports['other_base']}", "--method=average"], "fine-tuned from"),
      ([f"--models={','.join(models)}", "--method=wise_ft"], "one fine-tuned model"),
      ([f"--models={models[0]}", "--method=task_arithmetic", "--negate=3"], "out of range"),
      ([f"--models={models[0]}", "--method=ties", "--top_k=0"], "--top_k"),
      ([f"--models={models[0]}", "--method=average"], "exists and is not empty"),
  ]:
    assert merge.main([f"--base={base}", f"--out={out}", *argv]) == 2, argv
    assert pattern in capsys.readouterr().err, argv
  assert sorted(os.listdir(out)) == before  # nothing written over
  assert os.path.getmtime(os.path.join(out, "params.safetensors")) == stamp
  with open(os.path.join(out, "config.json")) as fh:
    assert json.load(fh)["merge"]["scale"] == 0.5


def test_cli_fisher_merge_equals_the_formula_on_each_models_fisher(exports, tmp_path):
  base, models = exports["base"], exports["models"][:2]
  out = str(tmp_path / "fisher")
  assert merge.main([f"--base={base}", f"--models={','.join(models)}", "--method=fisher",
                     "--fisher_examples=24", f"--out={out}"]) == 0
  fishers = [merge.export_fisher(m, 24) for m in models]
  assert all(np.all(f[k] >= 0) for f in fishers for k in f)
  assert all(np.any(f["encoderblock_0/mlp/fc1/kernel"] > 0) for f in fishers)
  thetas = [checkpoint.flatten(checkpoint.load_export_params(m)) for m in models]
  keys = [k for k in thetas[0] if not k.startswith("head/")]
  want = merge.fisher_merge([{k: t[k] for k in keys} for t in thetas],
                            [{k: f[k] for k in keys} for f in fishers])
  got = checkpoint.flatten(checkpoint.load_export_params(out))
  for k in keys:
    np.testing.assert_allclose(got[k], np.asarray(want[k]), rtol=1e-5, atol=1e-6, err_msg=k)


def test_cli_scale_sweep_chooses_by_average_normalised_accuracy(exports, tmp_path, capsys):
  """--scales: each λ's task accuracy (the merged encoder with each fine-tune's own head) on
  --val_split over the fine-tune's own, the best average written; equal on 1 and 8 devices."""
  from jax_transfer.evaluators.classification import ClassificationEvaluator
  base, models = exports["base"], exports["models"][:2]
  out, split = str(tmp_path / "swept"), "train[:64]"
  assert merge.main([f"--base={base}", f"--models={','.join(models)}",
                     "--method=task_arithmetic", "--scales=0:1:0.5", f"--val_split={split}",
                     f"--out={out}"]) == 0
  printed = capsys.readouterr().out
  config = checkpoint.load_export_config(out)
  sweep = config.merge.sweep.to_dict()
  assert [r["scale"] for r in sweep["rows"]] == [0.0, 0.5, 1.0]
  assert sweep["metric"] == "eval/accuracy" and "<- chosen" in printed

  def accuracy(flat, head_from):  # independently: the model's classifier on the split
    c = checkpoint.load_export_config(head_from)
    method = merge.export_method(head_from, merge.merge_mesh(jax.devices()[:1]), split)[1]
    ev = ClassificationEvaluator(method.predict, c.input, split, 64, method.mesh, 1)
    head = {k: v for k, v in checkpoint.flatten(checkpoint.load_export_params(head_from)).items()
            if k.startswith("head/")}
    return ev.run(checkpoint.unflatten({**flat, **head}))["accuracy"]

  own = [accuracy(checkpoint.flatten(checkpoint.load_export_params(m)), m) for m in models]
  np.testing.assert_allclose(sweep["own"], own)
  theta0 = checkpoint.flatten(checkpoint.load_export_params(base))
  np.testing.assert_allclose(sweep["rows"][0]["accuracy"], [accuracy(theta0, m) for m in models])
  for r in sweep["rows"]:
    np.testing.assert_allclose(r["normalised"], np.array(r["accuracy"]) / own)
    np.testing.assert_allclose(r["avg_normalised"], np.mean(r["normalised"]))
  best = max(sweep["rows"], key=lambda r: r["avg_normalised"])
  assert config.merge.scale == best["scale"]
  want, _ = merge.merge_exports(base, models, "task_arithmetic", scale=best["scale"])
  got = checkpoint.flatten(checkpoint.load_export_params(out))
  for k in want:
    np.testing.assert_allclose(got[k], np.asarray(want[k]), rtol=1e-6, atol=1e-7, err_msg=k)
  chosen1, sweep1 = merge.sweep_scales(base, models, "task_arithmetic", [0.0, 0.5, 1.0], split,
                                       devices=jax.devices()[:1])
  assert chosen1 == best["scale"]
  for r1, r8 in zip(sweep1["rows"], sweep["rows"]):
    np.testing.assert_allclose(r1["accuracy"], r8["accuracy"])

  bad = str(tmp_path / "bad")
  for argv, pattern in [
      (["--method=average", "--scales=0:1:0.5", f"--val_split={split}"], "has no scale"),
      (["--method=ties", "--scales=0:1", f"--val_split={split}"], "--scales='0:1'"),
      (["--method=ties", "--scales=1:0:0.1", f"--val_split={split}"], "START:STOP:STEP"),
      (["--method=ties", "--scales=0:1:0.5"], "needs --val_split"),
      (["--method=ties", "--scales=0:1:0.5", "--scale=1", f"--val_split={split}"], "not both"),
      (["--method=ties", "--scales=0:1:0.5", "--val_split=nosuch"], "--val_split='nosuch'"),
      (["--method=ties", "--scales=0:1:0.5", f"--val_split={split}", "--val_metric=eval"],
       "EVALUATOR/KEY"),
      (["--method=ties", "--scales=0:1:0.5", f"--val_split={split}", "--val_metric=zs/acc"],
       "no evaluator 'zs'"),
  ]:
    assert merge.main([f"--base={base}", f"--models={','.join(models)}", f"--out={bad}",
                       *argv]) == 2, argv
    assert pattern in capsys.readouterr().err, argv
  assert not os.path.exists(bad)
  assert merge.main([f"--base={base}", f"--models={models[0]}", f"--out={out}",
                     "--method=wise_ft", "--scales=0:1:0.5", f"--val_split={split}"]) == 2
  assert "exists and is not empty" in capsys.readouterr().err

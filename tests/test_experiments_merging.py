"""experiments/merging/merge_clip.py: the λ-line identity its sweeps rely on, the shifts, and a
--quick smoke run end to end (pretrain, four head fine-tunes, every merge through
jax_transfer.merge, aTLAS when the method exists, negation, WiSE-FT, tables and plots). The
smoke run trains six tiny models and compiles every merge: 141 s on 2 CPU cores at load ~2,
so it is marked slow (`pytest -m slow tests/test_experiments_merging.py`)."""
import os

import numpy as np
import pytest

from experiments.merging import merge_clip


def test_sweep_line_is_the_merge_formula():
  """θ_0 + λ (θ_1 − θ_0) with θ_1 the merge at λ = 1 equals task arithmetic / TIES at λ."""
  import jax.numpy as jnp
  from jax_transfer import merge
  rng = np.random.default_rng(0)
  base = {"a": rng.standard_normal((5, 4)).astype(np.float32),
          "b": rng.standard_normal(7).astype(np.float32)}
  models = [{k: v + rng.standard_normal(v.shape).astype(np.float32) for k, v in base.items()}
            for _ in range(3)]
  j = lambda t: {k: jnp.asarray(v) for k, v in t.items()}
  for fn in (lambda s: merge.task_arithmetic(j(base), [j(m) for m in models], s, [1, -1, 1]),
             lambda s: merge.ties(j(base), [j(m) for m in models], s, 0.4, "global"),
             lambda s: merge.wise_ft(j(base), j(models[0]), s)):
    line = merge_clip.Line(base, fn(1.0))
    for lam in (0.0, 0.3, 1.4):
      assert merge_clip.max_abs_diff(line(lam), fn(lam)) < 1e-5


def test_shifts_keep_shape_and_change_pixels():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (3, 8, 8, 3)).astype(np.uint8)
  for kind in merge_clip.SHIFTS:
    y = merge_clip.shift(x, kind)
    assert y.shape == x.shape and y.dtype == np.uint8 and not np.array_equal(x, y)
  np.testing.assert_array_equal(merge_clip.shift(merge_clip.shift(x, "invert"), "invert"), x)


@pytest.mark.slow
def test_quick_run_end_to_end(data_dir, tmp_path):
  from jax_transfer import checkpoint, methods
  summary = merge_clip.main(["--quick", f"--out={tmp_path}"])
  rows = summary["per_seed"]["0"]["rows"]
  want = {"zeroshot", "average", "task_arithmetic", "ties_global", "ties_tensor", "fisher",
          *(f"ft_{t}" for t in merge_clip.TASKS)}
  assert want <= set(rows)
  assert ("atlas" in rows) == ("atlas" in methods.METHODS)
  for t in merge_clip.TASKS:  # normalised by its own fine-tune
    assert rows[f"ft_{t}"]["test_norm"][t] == 1.0
    assert checkpoint.load_export_config(
        str(tmp_path / f"ft_{t}_seed0_export")).init.export_dir == str(tmp_path / "base")
  for name in ("ties_global", "task_arithmetic"):
    assert rows[name]["line_check_max_abs_diff"] < 1e-4
    merged = checkpoint.load_export_config(str(tmp_path / "merged" / f"{name}_seed0"))
    assert merged.merge.scale == rows[name]["scale"]
  assert set(summary["per_seed"]["0"]["negation"]) == set(merge_clip.TASKS)
  assert len(summary["per_seed"]["0"]["wise_ft"]) == len(summary["wise_alphas"])
  for plot in ("sweeps.png", "negation.png", "wise_ft.png"):
    assert os.path.getsize(tmp_path / plot) > 0
  text = merge_clip.tables(summary)
  assert "task arithmetic" in text and "WiSE-FT" in text

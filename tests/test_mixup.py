"""Batch mixup / cutmix (augment.mixup_cutmix, timm's Mixup in batch mode) and the supervised
method's use of it (config.mixup)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_vit_config
from jax_transfer import augment, config as config_lib, metrics as metrics_lib, parallel, train
from jax_transfer.methods import supervised

B, H, W, C, K = 8, 12, 10, 3, 5


def _batch(b=B, h=H, w=W):
  """Image i is the constant i (so every output pixel names its source image); labels i % K."""
  images = jnp.broadcast_to(jnp.arange(b, dtype=jnp.float32)[:, None, None, None],
                            (b, h, w, C))
  labels = jax.nn.one_hot(jnp.arange(b) % K, K)
  return images, labels


MIX = functools.partial(augment.mixup_cutmix, mixup_alpha=0.0, cutmix_alpha=0.0)


def test_cutmix_box_area_is_lambda():
  """Cutmix: each image keeps a fraction lam of its own pixels, the rest (one rectangle) from
  its flip partner, and its target is lam on its own label, 1 - lam on the partner's."""
  images, labels = _batch()
  seen_partial = 0
  for seed in range(40):
    key = jax.random.key(seed)
    out, y = augment.mixup_cutmix(key, images, labels, mixup_alpha=0.0, cutmix_alpha=1.0)
    p = augment.mixup_cutmix_params(key, (H, W), mixup_alpha=0.0, cutmix_alpha=1.0)
    lam = float(p["lam"])
    out, y = np.asarray(out), np.asarray(y)
    for i in range(B):
      own = out[i, ..., 0] == i
      partner = out[i, ..., 0] == B - 1 - i
      assert (own | partner).all()
      np.testing.assert_allclose(own.mean(), lam, atol=1e-6)
      # The partner's pixels are one rectangle: the box from the params.
      yl, yh, xl, xh = (int(v) for v in p["box"])
      box = np.zeros((H, W), bool)
      box[yl:yh, xl:xh] = True
      np.testing.assert_array_equal(partner, box)
      expect = lam * np.asarray(labels[i]) + (1 - lam) * np.asarray(labels[B - 1 - i])
      np.testing.assert_allclose(y[i], expect, atol=1e-6)
    seen_partial += 0 < lam < 1
    assert bool(p["use_cutmix"])
  assert seen_partial > 30


def test_cutmix_box_matches_timm_rand_bbox():
  """The box is timm's rand_bbox for the drawn Beta lam and centre: cut = int(side *
  sqrt(1 - lam)), centre -+ cut // 2, clipped; lam corrected to the clipped area."""
  for seed in range(30):
    key = jax.random.key(seed)
    p = augment.mixup_cutmix_params(key, (H, W), mixup_alpha=0.0, cutmix_alpha=0.7)
    _, _, _, k_cut, k_cy, k_cx = jax.random.split(key, 6)
    lam0 = float(jax.random.beta(k_cut, 0.7, 0.7))
    cy, cx = int(jax.random.randint(k_cy, (), 0, H)), int(jax.random.randint(k_cx, (), 0, W))
    ratio = np.sqrt(1 - np.float32(lam0))
    cut_h, cut_w = int(H * ratio), int(W * ratio)
    box = (np.clip(cy - cut_h // 2, 0, H), np.clip(cy + cut_h // 2, 0, H),
           np.clip(cx - cut_w // 2, 0, W), np.clip(cx + cut_w // 2, 0, W))
    assert tuple(int(v) for v in p["box"]) == tuple(int(v) for v in box)
    area = (box[1] - box[0]) * (box[3] - box[2])
    np.testing.assert_allclose(float(p["lam"]), 1 - area / (H * W), atol=1e-6)


def test_mixup_blend_and_lambda_distribution():
  images, labels = _batch()
  lams = []
  for seed in range(300):
    key = jax.random.key(seed)
    out, y = augment.mixup_cutmix(key, images, labels, mixup_alpha=0.4, cutmix_alpha=0.0)
    lam = float(augment.mixup_cutmix_params(key, (H, W), mixup_alpha=0.4,
                                            cutmix_alpha=0.0)["lam"])
    lams.append(lam)
    if seed < 10:
      i = np.arange(B)
      np.testing.assert_allclose(np.asarray(out)[:, 0, 0, 0], lam * i + (1 - lam) * i[::-1],
                                 rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(np.asarray(y), lam * labels + (1 - lam) * labels[::-1],
                                 atol=1e-6)
  lams = np.array(lams)
  # Beta(0.4, 0.4): mean 0.5, variance 1 / (4 * (2 * 0.4 + 1)) = 0.139.
  assert abs(lams.mean() - 0.5) < 0.07 and abs(lams.var() - 0.139) < 0.03


def test_switch_prob_chooses_cutmix():
  n = 400
  cut = sum(bool(augment.mixup_cutmix_params(jax.random.key(s), (H, W), mixup_alpha=0.8,
                                             cutmix_alpha=1.0, switch_prob=0.3)["use_cutmix"])
            for s in range(n))
  assert abs(cut / n - 0.3) < 0.07


def test_prob_applies_at_that_rate():
  n = 400
  applied = sum(bool(augment.mixup_cutmix_params(jax.random.key(s), (H, W), mixup_alpha=0.8,
                                                 cutmix_alpha=1.0, prob=0.6)["apply"])
                for s in range(n))
  assert abs(applied / n - 0.6) < 0.07


@pytest.mark.parametrize("alphas", [(0.8, 1.0), (0.8, 0.0), (0.0, 1.0)])
def test_soft_targets_sum_to_one(alphas):
  images, _ = _batch()
  labels = augment.smooth_one_hot(jnp.arange(B) % K, K, 0.1)
  np.testing.assert_allclose(labels.sum(-1), 1.0, atol=1e-6)
  assert float(labels.max()) == pytest.approx(0.9 + 0.1 / K) and float(
      labels.min()) == pytest.approx(0.1 / K)
  for seed in range(10):
    _, y = augment.mixup_cutmix(jax.random.key(seed), images, labels, mixup_alpha=alphas[0],
                                cutmix_alpha=alphas[1])
    np.testing.assert_allclose(np.asarray(y).sum(-1), 1.0, atol=1e-6)
    assert (np.asarray(y) >= 0).all()


@pytest.mark.parametrize("kw", [dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.0),
                                dict(mixup_alpha=0.0, cutmix_alpha=0.0)])
def test_identity_when_off(kw):
  images = jax.random.normal(jax.random.key(1), (B, H, W, C))
  labels = jax.nn.one_hot(jnp.arange(B) % K, K)
  for seed in range(5):
    out, y = augment.mixup_cutmix(jax.random.key(seed), images, labels, **kw)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(images))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(labels))


def test_deterministic_from_key():
  images = jax.random.normal(jax.random.key(1), (B, H, W, C))
  labels = jax.nn.one_hot(jnp.arange(B) % K, K)
  f = jax.jit(functools.partial(augment.mixup_cutmix, mixup_alpha=0.8, cutmix_alpha=1.0))
  a = f(jax.random.key(3), images, labels)
  b = f(jax.random.key(3), images, labels)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  c = f(jax.random.key(4), images, labels)
  assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))


@pytest.mark.parametrize("mesh_cfg", [{"data": 8, "fsdp": 1, "tensor": 1},
                                      {"data": 2, "fsdp": 4, "tensor": 1}])
def test_sharded_equals_single_device(mesh_cfg):
  """Under jit on a batch sharded over 8 devices: the same images and targets as on one."""
  b = 16
  images = np.asarray(jax.random.normal(jax.random.key(1), (b, H, W, C)))
  labels = np.asarray(jax.nn.one_hot(np.arange(b) % K, K))
  f = jax.jit(functools.partial(augment.mixup_cutmix, mixup_alpha=0.8, cutmix_alpha=1.0))
  mesh = parallel.make_mesh(mesh_cfg)
  g = parallel.global_batch({"image": images, "label": labels}, mesh)
  assert len(g["image"].sharding.device_set) == 8
  for seed in range(6):  # Both cutmix and mixup batches among these.
    key = jax.random.key(seed)
    ref = f(key, jax.device_put(images, jax.devices()[0]),
            jax.device_put(labels, jax.devices()[0]))
    assert len(ref[0].sharding.device_set) == 1
    with jax.set_mesh(mesh):
      out = f(key, g["image"], g["label"])
    assert len(out[0].sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(out[0]), np.asarray(ref[0]))
    np.testing.assert_array_equal(np.asarray(out[1]), np.asarray(ref[1]))


# ------------------------------------------------------------------ the supervised method


def test_mixup_config_defaults_and_errors():
  c = tiny_vit_config("/nonexistent")
  assert supervised.mixup_config(c) == supervised.MIXUP_DEFAULTS
  c.mixup = dict(cutmix_alpha=1.0)
  assert supervised.mixup_config(c)["cutmix_alpha"] == 1.0
  for bad, msg in [(dict(mixup_alpha=-1.0), "mixup.mixup_alpha"), (dict(prob=2.0), "mixup.prob"),
                   (dict(cutmx_alpha=1.0), "mixup.cutmx_alpha"),
                   (dict(label_smoothing=1.0), "mixup.label_smoothing")]:
    c.mixup = bad
    with pytest.raises(config_lib.ConfigError, match=msg):
      supervised.mixup_config(c)


@pytest.fixture
def mixup_section(monkeypatch):
  """config.mixup as an allowed top-level section (a no-op once config.METHOD_SECTIONS has it)."""
  if "mixup" not in config_lib.METHOD_SECTIONS:
    monkeypatch.setattr(config_lib, "METHOD_SECTIONS", config_lib.METHOD_SECTIONS + ("mixup",))


def _losses(workdir):
  return [m["train/loss"] for m in metrics_lib.read_jsonl(workdir) if "train/loss" in m]


def test_zero_alphas_loss_bitwise_unchanged(data_dir, tmp_path, mixup_section):
  """config.mixup with both alphas and label_smoothing 0 trains exactly as without it."""
  runs = {}
  for name in ("none", "zeros"):
    c = tiny_vit_config(data_dir)
    c.total_steps, c.log_every_steps, c.eval_every_steps = 3, 1, 3
    if name == "zeros":
      import ml_collections
      c.mixup = ml_collections.ConfigDict(supervised.MIXUP_DEFAULTS)
    train.train_and_evaluate(c, str(tmp_path / name), devices=jax.devices()[:2])
    runs[name] = _losses(str(tmp_path / name))
  assert runs["none"] == runs["zeros"] and len(runs["none"]) == 3


def test_loss_fn_zero_alphas_identical_jaxpr(data_dir):
  """Same program: the loss with mixup off lowers to the same jaxpr as with no section."""
  import ml_collections
  from jax_transfer.parallel import make_mesh
  c = tiny_vit_config(data_dir)
  mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  m1 = supervised.Supervised(c, mesh)
  c2 = tiny_vit_config(data_dir)
  c2.mixup = ml_collections.ConfigDict(supervised.MIXUP_DEFAULTS)
  m2 = supervised.Supervised(c2, mesh)
  from flax import linen as nn
  params = nn.unbox(m1.init_params(jax.random.key(0)))
  batch = {"image": jnp.zeros((4, *m1.image_shape)), "label": jnp.arange(4)}
  j1 = jax.make_jaxpr(m1.loss_fn)(params, None, batch, jax.random.key(1))
  j2 = jax.make_jaxpr(m2.loss_fn)(params, None, batch, jax.random.key(1))
  assert str(j1) == str(j2)


def test_supervised_trains_with_mixup_and_cutmix(data_dir, tmp_path, mixup_section):
  """A short run with mixup + cutmix + label smoothing on 2 devices: finite losses, unlike the
  plain run's; a resumed run draws the same mixes (the uninterrupted run's losses)."""
  import ml_collections
  def cfg():
    c = tiny_vit_config(data_dir)
    c.total_steps, c.log_every_steps, c.eval_every_steps = 8, 1, 8
    c.schedule.warmup_steps = 0  # Step 2 already sees a trained head (step 1: ln K anyway).
    c.checkpoint_every_steps = 4
    c.mixup = ml_collections.ConfigDict(dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0,
                                             switch_prob=0.5, label_smoothing=0.1))
    return c
  full = str(tmp_path / "full")
  _, final = train.train_and_evaluate(cfg(), full, devices=jax.devices()[:2])
  losses = _losses(full)
  assert len(losses) == 8 and np.isfinite(losses).all()
  assert "eval/accuracy" in final
  # Differs from the no-mixup run (the mix is really applied).
  c = tiny_vit_config(data_dir)
  c.total_steps, c.log_every_steps, c.eval_every_steps = 3, 1, 8
  c.schedule.warmup_steps = 0
  plain = str(tmp_path / "plain")
  train.train_and_evaluate(c, plain, devices=jax.devices()[:2])
  assert all(abs(a - b) > 1e-6 for a, b in zip(_losses(plain)[1:], losses[1:3])), (
      _losses(plain), losses)
  # Resume: stop after step 4, restart, and the rest of the losses match.
  resumed = str(tmp_path / "resumed")
  train.train_and_evaluate(cfg(), resumed, devices=jax.devices()[:2], stop_after_step=4)
  train.train_and_evaluate(cfg(), resumed, devices=jax.devices()[:2])
  np.testing.assert_allclose(_losses(resumed)[-4:], losses[-4:], rtol=1e-6)

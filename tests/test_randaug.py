"""RandAugment host op (jax_transfer/data/pp/randaug.py).

Each op is checked against the TF reference's code (tensorflow/tpu
models/official/efficientnet/autoaugment.py, as big_vision forks it), transcribed below onto
TF 2 ops as the oracle (tf.contrib.image / tfa transforms -> tf.raw_ops.
ImageProjectiveTransformV3, the kernel both call). Skipped where TensorFlow is not installed.
"""
import math
import time

import numpy as np
import pytest

from jax_transfer.data.pp import randaug as ra
from jax_transfer.data.pp import registry


def _images(seed=0, h=37, w=29):
  """Smooth-ish random RGB images with full range, flat regions and a constant channel."""
  rng = np.random.default_rng(seed)
  noise = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  ramp = np.broadcast_to(np.linspace(0, 255, w).astype(np.uint8)[None, :, None], (h, w, 3))
  low = (rng.integers(40, 90, (h, w, 3))).astype(np.uint8)  # Narrow range: autocontrast.
  flat = np.full((h, w, 3), 77, np.uint8)
  flat[5:12, 3:9] = 200
  const_ch = noise.copy()
  const_ch[..., 1] = 9
  return [noise, np.ascontiguousarray(ramp), low, flat, const_ch]


# ------------------------------------------------------------- the TF oracle (transcribed)

tf = None


@pytest.fixture(scope="module")
def tfm():
  global tf
  tf = pytest.importorskip("tensorflow")
  return tf


def tf_blend(image1, image2, factor):
  if factor == 0.0:
    return tf.convert_to_tensor(image1)
  if factor == 1.0:
    return tf.convert_to_tensor(image2)
  image1 = tf.cast(image1, tf.float32)
  image2 = tf.cast(image2, tf.float32)
  temp = image1 + factor * (image2 - image1)
  if 0.0 < factor < 1.0:
    return tf.cast(temp, tf.uint8)
  return tf.cast(tf.clip_by_value(temp, 0.0, 255.0), tf.uint8)


def tf_cutout(image, pad_size, cy, cx, replace=0):
  image_height = tf.shape(image)[0]
  image_width = tf.shape(image)[1]
  lower_pad = tf.maximum(0, cy - pad_size)
  upper_pad = tf.maximum(0, image_height - cy - pad_size)
  left_pad = tf.maximum(0, cx - pad_size)
  right_pad = tf.maximum(0, image_width - cx - pad_size)
  cutout_shape = [image_height - (lower_pad + upper_pad), image_width - (left_pad + right_pad)]
  padding_dims = [[lower_pad, upper_pad], [left_pad, right_pad]]
  mask = tf.pad(tf.zeros(cutout_shape, dtype=image.dtype), padding_dims, constant_values=1)
  mask = tf.tile(tf.expand_dims(mask, -1), [1, 1, 3])
  return tf.where(tf.equal(mask, 0), tf.ones_like(image, dtype=image.dtype) * replace, image)


def tf_solarize(image, threshold=128):
  return tf.where(image < threshold, image, 255 - image)


def tf_solarize_add(image, addition=0, threshold=128):
  added_image = tf.cast(image, tf.int64) + addition
  added_image = tf.cast(tf.clip_by_value(added_image, 0, 255), tf.uint8)
  return tf.where(image < threshold, added_image, image)


def tf_color(image, factor):
  degenerate = tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(image))
  return tf_blend(degenerate, image, factor)


def tf_contrast(image, factor):
  degenerate = tf.image.rgb_to_grayscale(image)
  degenerate = tf.cast(degenerate, tf.int32)
  hist = tf.histogram_fixed_width(degenerate, [0, 255], nbins=256)
  mean = tf.reduce_sum(tf.cast(hist, tf.float32)) / 256.0
  degenerate = tf.ones_like(degenerate, dtype=tf.float32) * mean
  degenerate = tf.clip_by_value(degenerate, 0.0, 255.0)
  degenerate = tf.image.grayscale_to_rgb(tf.cast(degenerate, tf.uint8))
  return tf_blend(degenerate, image, factor)


def tf_brightness(image, factor):
  return tf_blend(tf.zeros_like(image), image, factor)


def tf_posterize(image, bits):
  shift = 8 - bits
  return tf.bitwise.left_shift(tf.bitwise.right_shift(image, shift), shift)


def tf_autocontrast(image):
  def scale_channel(image):
    lo = tf.cast(tf.reduce_min(image), tf.float32)
    hi = tf.cast(tf.reduce_max(image), tf.float32)

    def scale_values(im):
      scale = 255.0 / (hi - lo)
      offset = -lo * scale
      im = tf.cast(im, tf.float32) * scale + offset
      return tf.cast(tf.clip_by_value(im, 0.0, 255.0), tf.uint8)
    return tf.cond(hi > lo, lambda: scale_values(image), lambda: image)
  return tf.stack([scale_channel(image[:, :, c]) for c in range(3)], 2)


def tf_sharpness(image, factor):
  orig_image = image
  image = tf.expand_dims(tf.cast(image, tf.float32), 0)
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=tf.float32,
                       shape=[3, 3, 1, 1]) / 13.
  kernel = tf.tile(kernel, [1, 1, 3, 1])
  degenerate = tf.nn.depthwise_conv2d(image, kernel, [1, 1, 1, 1], padding="VALID",
                                      dilations=[1, 1])
  degenerate = tf.clip_by_value(degenerate, 0.0, 255.0)
  degenerate = tf.squeeze(tf.cast(degenerate, tf.uint8), [0])
  mask = tf.ones_like(degenerate)
  padded_mask = tf.pad(mask, [[1, 1], [1, 1], [0, 0]])
  padded_degenerate = tf.pad(degenerate, [[1, 1], [1, 1], [0, 0]])
  result = tf.where(tf.equal(padded_mask, 1), padded_degenerate, orig_image)
  return tf_blend(result, orig_image, factor)


def tf_equalize(image):
  def scale_channel(im, c):
    im = tf.cast(im[:, :, c], tf.int32)
    histo = tf.histogram_fixed_width(im, [0, 255], nbins=256)
    nonzero = tf.where(tf.not_equal(histo, 0))
    nonzero_histo = tf.reshape(tf.gather(histo, nonzero), [-1])
    step = (tf.reduce_sum(nonzero_histo) - nonzero_histo[-1]) // 255

    def build_lut(histo, step):
      lut = (tf.cumsum(histo) + (step // 2)) // step
      lut = tf.concat([[0], lut[:-1]], 0)
      return tf.clip_by_value(lut, 0, 255)
    result = tf.cond(tf.equal(step, 0), lambda: im,
                     lambda: tf.gather(build_lut(histo, step), im))
    return tf.cast(result, tf.uint8)
  return tf.stack([scale_channel(image, c) for c in range(3)], 2)


def tf_invert(image):
  return 255 - tf.convert_to_tensor(image)


def tf_wrap(image):
  shape = tf.shape(image)
  return tf.concat([image, tf.ones([shape[0], shape[1], 1], image.dtype)], 2)


def tf_unwrap(image, replace):
  image_shape = tf.shape(image)
  flattened_image = tf.reshape(image, [-1, image_shape[2]])
  alpha_channel = flattened_image[:, 3]
  replace = tf.concat([replace, tf.ones([1], image.dtype)], 0)
  flattened_image = tf.where(tf.equal(alpha_channel, 0)[:, None],
                             tf.ones_like(flattened_image, dtype=image.dtype) * replace,
                             flattened_image)
  image = tf.reshape(flattened_image, image_shape)
  return tf.slice(image, [0, 0, 0], [image_shape[0], image_shape[1], 3])


def tf_transform(image, transform):
  """tfa.image.transform / tf.contrib.image.transform: nearest, constant fill 0."""
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=tf.reshape(tf.cast(transform, tf.float32), [1, 8]),
      output_shape=tf.shape(image)[:2], fill_value=0.0, interpolation="NEAREST",
      fill_mode="CONSTANT")
  return out[0]


def tf_rotate_transform(radians, h, w):
  """tfa.image.angles_to_projective_transforms, one angle."""
  angles = tf.reshape(tf.cast(radians, tf.float32), [1])
  image_height, image_width = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
  cos, sin = tf.math.cos(angles), tf.math.sin(angles)
  x_offset = ((image_width - 1) - (cos * (image_width - 1) - sin * (image_height - 1))) / 2.0
  y_offset = ((image_height - 1) - (sin * (image_width - 1) + cos * (image_height - 1))) / 2.0
  return tf.concat([cos, -sin, x_offset, sin, cos, y_offset, tf.zeros([2])], 0)


def tf_affine_op(image, name, arg, replace=(128, 128, 128)):
  replace = tf.constant(replace, tf.uint8)
  image = tf.convert_to_tensor(image)
  if name == "Rotate":
    # rotate(): radians = degrees * (pi / 180) on the float32 degrees tensor.
    radians = tf.constant(arg, tf.float32) * (math.pi / 180.0)
    t = tf_rotate_transform(radians, image.shape[0], image.shape[1])
  elif name == "TranslateX":
    t = [1., 0., -(-arg), 0., 1., 0., 0., 0.]  # translate(wrap(image), [-pixels, 0])
  elif name == "TranslateY":
    t = [1., 0., 0., 0., 1., -(-arg), 0., 0.]
  elif name == "ShearX":
    t = [1., arg, 0., 0., 1., 0., 0., 0.]
  else:  # ShearY
    t = [1., 0., 0., arg, 1., 0., 0., 0.]
  return tf_unwrap(tf_transform(tf_wrap(image), t), replace)


# ------------------------------------------------------------------------------- per op


def _assert_close(ours, ref, max_diff=0, max_frac=0.0):
  ours, ref = np.asarray(ours), np.asarray(ref)
  assert ours.shape == ref.shape and ours.dtype == ref.dtype == np.uint8
  diff = np.abs(ours.astype(int) - ref.astype(int))
  assert diff.max() <= max_diff, diff.max()
  assert np.mean(diff > 0) <= max_frac, np.mean(diff > 0)


@pytest.mark.parametrize("factor", [0.0, 0.1, 0.46, 1.0, 1.0000001, 1.54, 1.9, 2.8])
def test_blend_ops_match_reference(tfm, factor):
  for img in _images():
    _assert_close(ra.brightness(img, factor), tf_brightness(tf.constant(img), factor))
    _assert_close(ra.contrast(img, factor), tf_contrast(tf.constant(img), factor))
    _assert_close(ra.color(img, factor), tf_color(tf.constant(img), factor))
    _assert_close(ra.sharpness(img, factor), tf_sharpness(tf.constant(img), factor))


def _smooth_224(seed=3):
  """A 224 px image with smooth gradients and a flat block (the sharpness tables' cases)."""
  import cv2
  img = np.random.default_rng(seed).integers(0, 256, (224, 224, 3), dtype=np.uint8)
  img = cv2.normalize(cv2.GaussianBlur(img, (0, 0), 6), None, 0, 255, cv2.NORM_MINMAX)
  img[50:120, 30:150] = 40
  return img


@pytest.mark.parametrize("factor", [0.0, 0.1, 1.9])
def test_sharpness_224_matches_reference(tfm, factor):
  for img in (_smooth_224(), np.random.default_rng(4).integers(0, 256, (224, 224, 3),
                                                                dtype=np.uint8)):
    _assert_close(ra.sharpness(img, factor), tf_sharpness(tf.constant(img), factor))


def test_histogram_ops_match_reference(tfm):
  for img in _images():
    _assert_close(ra.autocontrast(img), tf_autocontrast(tf.constant(img)))
    _assert_close(ra.equalize(img), tf_equalize(tf.constant(img)))
    _assert_close(ra.invert(img), tf_invert(tf.constant(img)))


@pytest.mark.parametrize("magnitude", [0, 1, 3, 5, 7, 9, 10, 12, 15, 20, 30])
def test_threshold_ops_match_reference(tfm, magnitude):
  level = magnitude / ra.MAX_LEVEL
  bits, threshold, addition = int(level * 4), int(level * 256), int(level * 110)
  for img in _images():
    _assert_close(ra.posterize(img, bits), tf_posterize(tf.constant(img), bits))
    _assert_close(ra.solarize(img, threshold), tf_solarize(tf.constant(img), threshold))
    _assert_close(ra.solarize_add(img, addition),
                  tf_solarize_add(tf.constant(img), addition))


def test_reference_quirks_kept():
  """The surprising reference behaviours the module docstring lists, pinned without TF."""
  img = _images()[0]
  np.testing.assert_array_equal(ra.solarize(img, 256), 255 - img)  # M=10: wraps to 0.
  np.testing.assert_array_equal(ra.posterize(img, 0), img & 128)  # Shift clamped to 7.
  assert ra.contrast_degenerate(np.zeros((224, 224, 3), np.uint8)) == 196  # 50176 / 256.
  assert ra.contrast_degenerate(np.zeros((256, 256, 3), np.uint8)) == 255


@pytest.mark.parametrize("pad,cy,cx", [(0, 5, 5), (4, 0, 0), (4, 10, 20), (16, 36, 28),
                                       (40, 18, 14), (3, 36, 0)])
def test_cutout_matches_reference(tfm, pad, cy, cx):
  for img in _images():
    _assert_close(ra.cutout(img, pad, (cy, cx)),
                  tf_cutout(tf.constant(img), pad, cy, cx, replace=128))


AFFINE = {"Rotate": ra.rotate, "TranslateX": ra.translate_x, "TranslateY": ra.translate_y,
          "ShearX": ra.shear_x, "ShearY": ra.shear_y}


@pytest.mark.parametrize("name,arg", [
    ("Rotate", 0.0), ("Rotate", 9.0), ("Rotate", -21.0), ("Rotate", 30.0), ("Rotate", -45.0),
    ("TranslateX", 0.0), ("TranslateX", 7.0), ("TranslateX", -30.0), ("TranslateX", 100.0),
    ("TranslateY", 12.0), ("TranslateY", -3.5), ("TranslateY", 2.5),
    ("ShearX", 0.09), ("ShearX", -0.3), ("ShearX", 0.45), ("ShearY", 0.21), ("ShearY", -0.3)])
def test_affine_ops_match_reference(tfm, name, arg):
  """Nearest-neighbour sampling at the same float32 coordinates, rounded as TF's kernel
  rounds them: bit for bit, at the test size and at 224 px."""
  big = np.random.default_rng(5).integers(0, 256, (224, 224, 3), dtype=np.uint8)
  for img in _images() + [big]:
    _assert_close(AFFINE[name](img, arg), tf_affine_op(tf.constant(img), name, arg))


# --------------------------------------------------------------------- the op as a whole


def _example(img):
  return {"image": img, "label": np.int64(3)}


def test_registered_and_parses():
  assert "randaug" in registry.registered()
  pp = registry.Preprocess("randaug(2, 15)")
  assert pp.ops == ["randaug(2, 15)"]
  with pytest.raises(registry.PPError):
    registry.Preprocess("randaug(2, -1)")


@pytest.mark.parametrize("shape", [(37, 29, 3), (16, 16, 1), (16, 16), (224, 224, 3)])
@pytest.mark.parametrize("magnitude", [0, 5, 10, 15])
def test_shape_dtype_preserved(shape, magnitude):
  fn = ra.get_randaug(3, magnitude)
  rng = np.random.default_rng(0)
  for i in range(20):
    img = np.random.default_rng(i).integers(0, 256, shape, dtype=np.uint8)
    out = fn(_example(img), rng)
    assert out["image"].shape == shape and out["image"].dtype == np.uint8
    assert out["label"] == 3


@pytest.mark.parametrize("name", ra.OPS)
def test_every_op_keeps_shape(name):
  rng = np.random.default_rng(1)
  for shape in [(37, 29, 3), (20, 24, 1)]:
    img = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    for m in (0, 3, 10, 17):
      out = ra.apply_op(name, img, m, rng)
      assert out.shape == shape and out.dtype == np.uint8


IDENTITY_AT = {"Rotate": 0, "ShearX": 0, "ShearY": 0, "TranslateX": 0, "TranslateY": 0,
               "Cutout": 0, "SolarizeAdd": 0, "Color": 5, "Contrast": 5, "Brightness": 5,
               "Sharpness": 5, "Posterize": 20}


@pytest.mark.parametrize("name", sorted(IDENTITY_AT))
def test_identity_magnitude(name):
  """Each magnitude-scaled op is the identity where its argument is the neutral one."""
  rng = np.random.default_rng(0)
  for img in _images():
    np.testing.assert_array_equal(ra.apply_op(name, img, IDENTITY_AT[name], rng), img)
  # And is not the identity at a strong magnitude (sanity: the test can fail).
  if name != "Cutout":
    img = _images()[0]
    strong = 10 if IDENTITY_AT[name] != 20 else 4
    assert not np.array_equal(ra.apply_op(name, img, strong, rng), img)


def test_signed_ops_draw_both_signs():
  img = _images()[0]
  outs = {ra.apply_op("TranslateX", img, 1, np.random.default_rng(s)).tobytes()
          for s in range(16)}
  assert len(outs) == 2
  np.testing.assert_array_equal(ra.translate_x(img, 30)[:, :-30], img[:, 30:])
  assert (ra.translate_x(img, 30)[:, -30:] == 128).all()


def test_deterministic_given_rng_seed():
  fn = ra.get_randaug(2, 10)
  imgs = _images()
  a = [fn(_example(i), np.random.default_rng(7))["image"] for i in imgs]
  b = [fn(_example(i), np.random.default_rng(7))["image"] for i in imgs]
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  # Different seeds give different images (most of the time: 16^2 op pairs).
  c = [fn(_example(imgs[0]), np.random.default_rng(s))["image"].tobytes() for s in range(30)]
  assert len(set(c)) > 10


def test_ops_drawn_uniformly():
  """Every op is drawn and applied (prob=1: the reference applies the chosen op always)."""
  counts = dict.fromkeys(ra.OPS, 0)
  orig = ra.apply_op
  try:
    def counting(name, *a, **k):
      counts[name] += 1
      return orig(name, *a, **k)
    ra.apply_op = counting
    rng = np.random.default_rng(0)
    img = _images()[0]
    for _ in range(800):
      ra.distort_image_with_randaugment(img, 2, 10, rng)
  finally:
    ra.apply_op = orig
  assert sum(counts.values()) == 1600
  assert min(counts.values()) > 1600 / 16 * 0.6, counts


def test_prob_zero_is_identity():
  fn = ra.get_randaug(3, 10, prob=0.0)
  img = _images()[0]
  np.testing.assert_array_equal(fn(_example(img), np.random.default_rng(0))["image"], img)


def test_speed_224():
  """Reports ms per 224x224 RGB image for randaug(2, 10), over noise and smooth images (no
  pass/fail bound beyond a loose sanity limit; the number is printed for the record)."""
  fn = ra.get_randaug(2, 10)
  rng = np.random.default_rng(0)
  imgs = [np.random.default_rng(i).integers(0, 256, (224, 224, 3), dtype=np.uint8)
          for i in range(4)] + [_smooth_224(i) for i in range(4)]
  for i in imgs:
    fn(_example(i), rng)
  n = 400
  t0 = time.perf_counter()
  for k in range(n):
    fn(_example(imgs[k % 8]), rng)
  ms = (time.perf_counter() - t0) / n * 1e3
  per_op = {}
  for name in ra.OPS:
    t0 = time.perf_counter()
    for k in range(50):
      ra.apply_op(name, imgs[k % 8], 10, rng)
    per_op[name] = (time.perf_counter() - t0) / 50 * 1e3
  print(f"\nrandaug(2, 10) at 224x224: {ms:.3f} ms/image; per op (ms): "
        + ", ".join(f"{k}={v:.3f}" for k, v in per_op.items()))
  assert ms < 50

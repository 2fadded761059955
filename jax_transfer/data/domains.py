"""Shifted domains of the embedded datasets: deterministic covariate shifts of the images.

Each domain is the source dataset's examples (same splits, labels, captions, keys and record
order) with every image passed through one transform, seeded per example, so source and
target are paired record for record. The TFDS builders are `<dataset>_<domain>`
(builders.SHIFTED, e.g. `digits_rotated`): select one with `input.dataset='digits_rotated'`.

  digits (8x8x1, 0..255):
    rotated   rotated counter-clockwise by an angle drawn uniformly in [15, 45] degrees
              (fixed sign), bilinear, about the centre; zero outside the frame.
    inverted  255 - image (dark digit on a bright background); exact, no randomness.
    noisy     + Gaussian noise, sigma = 96 grey levels, clipped to 0..255.
  shapes_captions (32x32x3): every shift keeps the shape, colour, size and position labels
  (and so the caption) true; none moves or recolours the shape.
    textured     the dark noisy background replaced by a procedural texture: stripes (any
                 angle, period 3-8 px), a checkerboard (2-6 px cells) or smooth blobs, in
                 two muted tones (every channel < 130, below any shape colour's brightest
                 channel, >= 185); the shape's pixels are unchanged.
    blur         Gaussian blur, sigma drawn uniformly in [1.0, 1.6] px (reflected edges).
    lowcontrast  contrast towards mid-grey: 128 + c * (x - 128), c drawn uniformly in
                 [0.35, 0.5]; hue is kept (each colour keeps its channel order), white
                 becomes light grey.

For arrays outside TFDS (e.g. experiments/merging/merge_clip.py's shifts of uint8 batches):
`apply('shapes_captions', 'blur', images, seed=0)`; image i of the batch gets the generator
`np.random.default_rng([seed, i])` (or `[seed, keys[i]]` with `keys`).
"""

from __future__ import annotations

import math
import zlib
from typing import Callable

import numpy as np

Transform = Callable[[np.ndarray, np.random.Generator], np.ndarray]  # uint8 [H,W,C] -> same

# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------


def _to_uint8(x: np.ndarray) -> np.ndarray:
  return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def rotate(image: np.ndarray, degrees: float) -> np.ndarray:
  """uint8 [H, W, C] rotated counter-clockwise (as displayed, rows downwards) by `degrees`
  about the image centre: bilinear, zero outside the frame. float32 [H, W, C] out."""
  h, w = image.shape[:2]
  cy, cx = (h - 1) / 2, (w - 1) / 2
  t = math.radians(degrees)
  y, x = np.mgrid[0:h, 0:w].astype(np.float64)
  dy, dx = y - cy, x - cx
  # Inverse map: the source pixel of each output pixel is the output rotated by -t. With y
  # pointing down, a counter-clockwise turn on screen is (dx, dy) -> (c dx + s dy, -s dx + c dy).
  sx = cx + math.cos(t) * dx - math.sin(t) * dy
  sy = cy + math.sin(t) * dx + math.cos(t) * dy
  x0, y0 = np.floor(sx).astype(np.int64), np.floor(sy).astype(np.int64)
  fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]
  src = image.astype(np.float32)
  out = np.zeros(image.shape, np.float32)
  for oy, ox, wgt in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx),
                      (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
    yy, xx = y0 + oy, x0 + ox
    inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
    vals = src[np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)]
    out += np.where(inside[..., None], vals, 0.0) * wgt
  return out


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
  """Separable Gaussian blur of [H, W, C] (taps to 3 sigma, reflected edges as np.pad's
  'reflect' = scipy.ndimage's 'mirror'): float64 [H, W, C]. Elementwise adds in a fixed
  order (no BLAS), so the result is the same on every machine."""
  h, w = image.shape[:2]
  r = max(1, int(math.ceil(3 * sigma)))
  k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
  k /= k.sum()
  x = np.pad(image.astype(np.float64), ((r, r), (r, r), (0, 0)), mode='reflect')
  rows = k[0] * x[0:h]
  for t in range(1, 2 * r + 1):
    rows += k[t] * x[t:t + h]
  out = k[0] * rows[:, 0:w]
  for t in range(1, 2 * r + 1):
    out += k[t] * rows[:, t:t + w]
  return out


# ----------------------------------------------------------------------------
# digits
# ----------------------------------------------------------------------------

ROTATION_RANGE = (15.0, 45.0)  # Degrees, counter-clockwise.
DIGITS_NOISE_SIGMA = 96.0


def digits_rotated(image, rng):
  return _to_uint8(rotate(image, rng.uniform(*ROTATION_RANGE)))


def digits_inverted(image, rng):
  del rng
  return 255 - image


def digits_noisy(image, rng):
  return _to_uint8(image + rng.normal(0.0, DIGITS_NOISE_SIGMA, image.shape))


# ----------------------------------------------------------------------------
# shapes_captions
# ----------------------------------------------------------------------------

# A shapes_captions pixel belongs to the shape iff its brightest channel is >= this: shape
# colours (builders.COLORS +- 15) have a channel >= 185, the background's are all < 40 and
# the textures' < TEXTURE_MAX, so the mask is exact in the source and the textured domain.
FOREGROUND_THRESHOLD = 160
TEXTURE_MAX = 130  # Texture tones stay below it in every channel.
BLUR_SIGMA = (1.0, 1.6)
CONTRAST = (0.35, 0.5)


def foreground_mask(image: np.ndarray) -> np.ndarray:
  """bool [H, W]: the shape's pixels of a shapes_captions image."""
  return image.max(axis=-1) >= FOREGROUND_THRESHOLD


def texture(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
  """A procedural background, uint8 [h, w, 3]: stripes, checkerboard or smooth blobs in two
  muted tones (each channel < TEXTURE_MAX), plus a faint grain."""
  y, x = np.mgrid[0:h, 0:w].astype(np.float64)
  kind = int(rng.integers(3))
  if kind == 0:  # Stripes at any angle.
    angle, period = rng.uniform(0, math.pi), rng.uniform(3, 8)
    phase = rng.uniform(0, period)
    p = (((math.cos(angle) * x + math.sin(angle) * y + phase) % period) < period / 2)
  elif kind == 1:  # Checkerboard.
    cell = int(rng.integers(2, 7))
    oy, ox = (int(v) for v in rng.integers(0, cell, size=2))
    p = ((y + oy) // cell + (x + ox) // cell) % 2 == 1
  else:  # Smooth blobs: a coarse random grid, bilinearly upsampled.
    g = int(rng.integers(3, 7))
    coarse = rng.random((g + 1, g + 1))
    gy, gx = y / (h - 1) * g, x / (w - 1) * g
    iy, ix = np.minimum(gy.astype(np.int64), g - 1), np.minimum(gx.astype(np.int64), g - 1)
    fy, fx = gy - iy, gx - ix
    p = ((1 - fy) * (1 - fx) * coarse[iy, ix] + (1 - fy) * fx * coarse[iy, ix + 1]
         + fy * (1 - fx) * coarse[iy + 1, ix] + fy * fx * coarse[iy + 1, ix + 1])
  lo = rng.integers(0, 50, size=3)
  hi = rng.integers(70, TEXTURE_MAX - 10, size=3)
  tex = lo + p.astype(np.float64)[..., None] * (hi - lo)
  tex += rng.integers(0, 10, size=(h, w, 3))
  return _to_uint8(np.minimum(tex, TEXTURE_MAX - 1))


def shapes_textured(image, rng):
  mask = foreground_mask(image)
  return np.where(mask[..., None], image, texture(*image.shape[:2], rng)).astype(np.uint8)


def shapes_blur(image, rng):
  return _to_uint8(gaussian_blur(image, rng.uniform(*BLUR_SIGMA)))


def shapes_lowcontrast(image, rng):
  return _to_uint8(128.0 + rng.uniform(*CONTRAST) * (image.astype(np.float64) - 128.0))


# ----------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------

DOMAINS: dict[str, dict[str, Transform]] = {
    'digits': {'rotated': digits_rotated, 'inverted': digits_inverted,
               'noisy': digits_noisy},
    'shapes_captions': {'textured': shapes_textured, 'blur': shapes_blur,
                        'lowcontrast': shapes_lowcontrast},
}


def dataset_name(dataset: str, domain: str) -> str:
  """The TFDS name of a shifted domain: dataset_name('digits', 'rotated') = 'digits_rotated'."""
  _transform(dataset, domain)  # Validates.
  return f'{dataset}_{domain}'


def names() -> dict[str, tuple[str, str]]:
  """{TFDS name: (source dataset, domain)} of every shifted domain."""
  return {f'{d}_{k}': (d, k) for d, fns in DOMAINS.items() for k in fns}


def parse(name: str) -> tuple[str, str | None]:
  """'digits_rotated' -> ('digits', 'rotated'); any other name -> (name, None)."""
  return names().get(name, (name, None))


def _transform(dataset: str, domain: str) -> Transform:
  if dataset not in DOMAINS:
    raise ValueError(f'No shifted domains for {dataset!r}; datasets: {sorted(DOMAINS)}.')
  if domain not in DOMAINS[dataset]:
    raise ValueError(f'Unknown domain {domain!r} of {dataset!r}; '
                     f'choose from {sorted(DOMAINS[dataset])}.')
  return DOMAINS[dataset][domain]


def split_seed(dataset: str, domain: str, split: str) -> int:
  """The seed of one split of a built domain (stable across processes and platforms)."""
  return zlib.crc32(f'{dataset}/{domain}/{split}'.encode())


def transform(dataset: str, domain: str, image: np.ndarray,
              rng: np.random.Generator) -> np.ndarray:
  """One uint8 image [H, W, C] -> the same image in `domain` (uint8, same shape)."""
  return _transform(dataset, domain)(np.asarray(image, np.uint8), rng)


def apply(dataset: str, domain: str, images: np.ndarray, seed: int = 0,
          keys=None) -> np.ndarray:
  """uint8 [N, H, W, C] -> the images in `domain`; image i is transformed with
  `np.random.default_rng([seed, keys[i]])` (keys default: 0..N-1). With
  seed=split_seed(dataset, domain, split) and the examples' TFDS keys this is exactly what
  the builders write."""
  images = np.asarray(images, np.uint8)
  fn = _transform(dataset, domain)
  keys = range(len(images)) if keys is None else keys
  out = [fn(im, np.random.default_rng([seed, int(k)])) for im, k in zip(images, keys)]
  return np.stack(out) if out else images.copy()


def shift_examples(dataset: str, domain: str, split: str, examples):
  """(key, example) pairs of the source builder -> the same pairs with the image shifted
  (the builders' generator): example `key` uses rng [split_seed(...), key]."""
  fn = _transform(dataset, domain)
  seed = split_seed(dataset, domain, split)
  for key, ex in examples:
    ex = dict(ex)
    ex['image'] = fn(np.asarray(ex['image'], np.uint8), np.random.default_rng([seed, int(key)]))
    yield key, ex

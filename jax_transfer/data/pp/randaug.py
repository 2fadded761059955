"""RandAugment (Cubuk et al. 2019, arXiv:1909.13719) as a host op on uint8 images.

`randaug(num_layers=2, magnitude=10)` is `distort_image_with_randaugment` of the TF reference
(tensorflow/tpu models/official/efficientnet/autoaugment.py, which big_vision's
`pp/autoaugment.py` forks unchanged), re-implemented in numpy + OpenCV. Per layer: one of the
16 ops below is drawn uniformly and applied, always (the reference draws a `prob` in
[0.2, 0.8] per op but none of its RandAugment ops takes it, so it is unused; `prob` here, 1.0
by default, is an opt-in per-layer apply probability, timm-style, not in the reference).
All randomness comes from the `rng` the op is given. Magnitude M (any float >= 0; the
reference's scale has _MAX_LEVEL = 10, M > 10 extrapolates, big_vision uses up to 15-20).
Geometric ops fill uncovered pixels with 128 (the reference's replace value [128] * 3).

| op           | argument from magnitude M (reference's level_to_arg)  | random sign |
|--------------|-------------------------------------------------------|-------------|
| AutoContrast | none                                                  |             |
| Equalize     | none                                                  |             |
| Invert       | none                                                  |             |
| Rotate       | degrees = M/10 * 30                                   | yes         |
| Posterize    | bits = int(M/10 * 4); keeps the top bits              |             |
| Solarize     | threshold = int(M/10 * 256); invert pixels >= it      |             |
| Color        | factor = M/10 * 1.8 + 0.1; blend(gray, image)         |             |
| Contrast     | factor = M/10 * 1.8 + 0.1; blend(mean*, image)        |             |
| Brightness   | factor = M/10 * 1.8 + 0.1; blend(black, image)        |             |
| Sharpness    | factor = M/10 * 1.8 + 0.1; blend(smoothed, image)     |             |
| ShearX       | level = M/10 * 0.3: x_in = x + level * y              | yes         |
| ShearY       | level = M/10 * 0.3: y_in = y + level * x              | yes         |
| TranslateX   | pixels = M/10 * translate_const (100): x_in = x + px  | yes         |
| TranslateY   | pixels = M/10 * translate_const (100): y_in = y + px  | yes         |
| Cutout       | pad = int(M/10 * cutout_const (40)): a 2pad x 2pad    |             |
|              | square (clipped at the borders) around a uniformly    |             |
|              | drawn pixel is set to 128                             |             |
| SolarizeAdd  | addition = int(M/10 * 110): pixels < 128 get +add,    |             |
|              | clipped to 255                                        |             |

translate_const and cutout_const are absolute pixels, as in the reference (not scaled with
the image size as timm's `translate_pct` is); both are arguments here for small images.
Where an op is the identity: Rotate, ShearX/Y, TranslateX/Y, Cutout and SolarizeAdd at
M=0; Color, Contrast, Brightness, Sharpness at M=5 (factor exactly 1.0); Posterize at M=20
(8 bits); Solarize at no M (see below); AutoContrast, Equalize, Invert at none.

The reference's behaviour is kept where it is surprising, so this op draws the images a
big_vision run sees (each is how TF executes the reference's code):
- Solarize's threshold is compared with the uint8 image after TF converts it to uint8, which
  wraps: threshold 256 (M=10) becomes 0, inverting every pixel (= Invert); M=15 gives
  384 -> 128. Here: threshold % 256.
- Posterize shifts by 8 - bits with TF's bitwise shifts on uint8, which clamp the shift to
  7: M=0 (bits 0) keeps the top bit (0 or 128), not all zeros; and bits > 8 (M >= 22.5) make
  8 - bits negative, which wraps in uint8 and is clamped to 7 too. Only M in 20..22.4 (8
  bits) is the identity.
- Contrast's "mean" is sum(histogram) / 256 = H*W / 256 (the pixel count, not the mean grey
  level), clipped to 0..255 and truncated: a constant grey that depends on the image size only.
- Blends truncate (tf.cast) rather than round; greyscale is tf.image.rgb_to_grayscale's
  (weights 0.2989, 0.5870, 0.1140 on x/255, then * 255.5 truncated).
- Affine ops sample with nearest neighbour, TF's ImageProjectiveTransform kernel: the output
  pixel (x, y) reads input (round(a0 x + a1 y + a2), round(b0 x + b1 y + b2)), rounding half
  away from zero, in float32; Rotate is tfa.image.rotate's about ((W-1)/2, (H-1)/2).
- Sharpness's smoothing is TF's depthwise conv, float32 fused multiply-adds in row-major tap
  order, reproduced exactly (smooth_interior).
Every op equals the reference's code run by TF 2.21 bit for bit on RGB images
(tests/test_randaug.py transcribes it as the oracle). One-channel images: the greyscale of an
image is the image (Color is then the identity); channel counts other than 1 and 3 are
rejected, as the reference assumes RGB. Cost: about 1 ms per 224x224 image for
randaug(2, 10) on one core (tests/test_randaug.py::test_speed_224 prints it).
"""
from __future__ import annotations

import math

import cv2
import numpy as np

from jax_transfer.data.pp.registry import register

cv2.setNumThreads(1)  # Parallelism comes from reader threads / worker processes.

MAX_LEVEL = 10.0
REPLACE = 128
TRANSLATE_CONST = 100
CUTOUT_CONST = 40
OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "Color",
       "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY",
       "Cutout", "SolarizeAdd")  # The reference's `available_ops`, in its order.
_F32 = np.float32


# ----------------------------------------------------------------------- pixel-value ops


def blend(image1: np.ndarray, image2: np.ndarray, factor: float) -> np.ndarray:
  """image1 + factor * (image2 - image1) in float32; truncated, clipped when extrapolating."""
  if factor == 0.0:
    return image1
  if factor == 1.0:
    return image2
  f1 = image1.astype(_F32)
  temp = f1 + _F32(factor) * (image2.astype(_F32) - f1)
  if 0.0 < factor < 1.0:
    return temp.astype(np.uint8)
  return np.clip(temp, 0.0, 255.0).astype(np.uint8)


def grayscale(image: np.ndarray) -> np.ndarray:
  """tf.image.rgb_to_grayscale on uint8: [H, W, 3] -> [H, W, 1] (one channel: itself)."""
  if image.shape[-1] == 1:
    return image
  x = image.astype(_F32) * _F32(1.0 / 255)
  gray = x[..., 0] * _F32(0.2989) + x[..., 1] * _F32(0.5870) + x[..., 2] * _F32(0.1140)
  return (gray * _F32(255.5)).astype(np.uint8)[..., None]


_LEVELS = np.arange(256, dtype=np.uint8)


def apply_lut(image: np.ndarray, lut) -> np.ndarray:
  """A pointwise uint8 -> uint8 map as a 256-entry table, one table for every channel or one
  per channel ([C, 256]). The ops below that are pointwise are their own formula evaluated on
  the 256 levels, so the table gives the formula's pixels exactly, ~10x faster."""
  lut = np.asarray(lut, np.uint8)
  h, w, c = image.shape
  if lut.ndim == 2:  # cv2.LUT with a C-channel table maps each channel through its own.
    lut = np.ascontiguousarray(lut.T).reshape(256, 1, c) if c > 1 else lut[0]
  return cv2.LUT(np.ascontiguousarray(image), lut).reshape(h, w, c)


def _autocontrast_lut(lo, hi) -> np.ndarray:
  lo, hi = _F32(lo), _F32(hi)
  if not hi > lo:
    return _LEVELS
  scale = _F32(255.0) / (hi - lo)
  offset = -lo * scale
  return np.clip(_LEVELS.astype(_F32) * scale + offset, 0.0, 255.0).astype(np.uint8)


def autocontrast(image: np.ndarray) -> np.ndarray:
  """Per channel: min -> 0, max -> 255 (x * scale + offset in float32, truncated); constant
  channels unchanged."""
  channels = cv2.split(np.ascontiguousarray(image))
  return apply_lut(image, [_autocontrast_lut(*cv2.minMaxLoc(ch)[:2]) for ch in channels])


def _equalize_lut(channel: np.ndarray) -> np.ndarray:
  histo = np.bincount(channel.ravel(), minlength=256).astype(np.int64)
  nonzero = histo[histo != 0]
  step = (nonzero.sum() - nonzero[-1]) // 255
  if step == 0:
    return _LEVELS
  lut = (np.cumsum(histo) + step // 2) // step
  return np.clip(np.concatenate([[0], lut[:-1]]), 0, 255).astype(np.uint8)


def equalize(image: np.ndarray) -> np.ndarray:
  """PIL's ImageOps.equalize per channel, as the reference computes it."""
  return apply_lut(image, [_equalize_lut(ch) for ch in cv2.split(np.ascontiguousarray(image))])


def invert(image: np.ndarray) -> np.ndarray:
  return 255 - image


def _posterize_levels(levels: np.ndarray, bits: int) -> np.ndarray:
  shift = np.uint8(min((8 - int(bits)) % 256, 7))
  return (levels >> shift) << shift


def posterize(image: np.ndarray, bits: int) -> np.ndarray:
  """Keeps the top `bits` bits. As in TF: the shift 8 - bits is converted to uint8 (wrapping:
  bits > 8 gives 252..) and TF's shifts clamp it to 7, keeping the top bit."""
  return apply_lut(image, _posterize_levels(_LEVELS, bits))


def _solarize_levels(levels: np.ndarray, threshold: int) -> np.ndarray:
  return np.where(levels < int(threshold) % 256, levels, 255 - levels).astype(np.uint8)


def solarize(image: np.ndarray, threshold: int) -> np.ndarray:
  """Pixels >= threshold are inverted; the threshold is wrapped to uint8, as TF does."""
  return apply_lut(image, _solarize_levels(_LEVELS, threshold))


def _solarize_add_levels(levels: np.ndarray, addition: int, threshold: int) -> np.ndarray:
  added = np.clip(levels.astype(np.int64) + int(addition), 0, 255).astype(np.uint8)
  return np.where(levels < int(threshold) % 256, added, levels)


def solarize_add(image: np.ndarray, addition: int, threshold: int = 128) -> np.ndarray:
  """Pixels < threshold get + addition (clipped to 0..255)."""
  return apply_lut(image, _solarize_add_levels(_LEVELS, addition, threshold))


def color(image: np.ndarray, factor: float) -> np.ndarray:
  """PIL ImageEnhance.Color: blend from the greyscale image."""
  return blend(np.broadcast_to(grayscale(image), image.shape), image, factor)


def contrast_degenerate(image: np.ndarray) -> int:
  """The reference's Contrast target: sum(histogram of the grey image) / 256 = H*W / 256,
  clipped to 0..255 and truncated (its 'mean' is the pixel count over 256)."""
  h, w = image.shape[:2]
  return int(np.clip(_F32(h * w) / _F32(256.0), 0.0, 255.0))


def contrast(image: np.ndarray, factor: float) -> np.ndarray:
  """PIL ImageEnhance.Contrast as the reference implements it (see contrast_degenerate):
  a blend from a constant, so pointwise."""
  return apply_lut(image, blend(np.full(256, contrast_degenerate(image), np.uint8), _LEVELS,
                                factor))


def brightness(image: np.ndarray, factor: float) -> np.ndarray:
  """PIL ImageEnhance.Brightness: blend from black (pointwise)."""
  return apply_lut(image, blend(np.zeros(256, np.uint8), _LEVELS, factor))


_SMOOTH_INT = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], _F32)
# The reference's float32 kernel ([[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13), row-major.
_SMOOTH_K = (_SMOOTH_INT / _F32(13.0)).astype(np.float64).ravel()


def _smooth_chain(taps: list[np.ndarray]) -> np.ndarray:
  """TF's float32 FMA chain over the 9 taps (uint8 arrays, row-major), exactly: a float64
  multiply-add of a uint8 and a float32 is exact, and rounding it to float32 is the FMA."""
  acc = None
  for k, tap in enumerate(taps):
    prod = tap * _SMOOTH_K[k]
    acc = prod.astype(_F32) if acc is None else (acc + prod).astype(_F32)
  return np.clip(acc, 0.0, 255.0).astype(np.uint8)


_SMOOTH_FLAT = _smooth_chain([_LEVELS] * 9)  # A flat 3x3 neighbourhood of each level.


def smooth_interior(image: np.ndarray) -> np.ndarray:
  """uint8 [H, W, C] (H, W >= 3) -> uint8 [H-2, W-2, C]: the reference's truncated
  depthwise_conv2d(image, SMOOTH / 13, 'VALID'), bit for bit.

  TF accumulates the 9 taps in row-major order with fused multiply-adds in float32. Its
  result is within 1e-5 of the exact sum S / 13 (S = 5 * centre + the 8 neighbours, an
  integer), so the truncation is S // 13 except where 13 divides S; there (1 in 13 pixels of
  noise, every pixel of a flat region) the FMA chain is replayed (_smooth_chain): from a
  table for flat neighbourhoods, per pixel for the others."""
  h, w, c = image.shape
  s = cv2.filter2D(image.astype(_F32), -1, _SMOOTH_INT, borderType=cv2.BORDER_REPLICATE)
  # Exact integer sums S (<= 13 * 255) in float32; S * f32(1/13) floors to S // 13 exactly
  # (f32(1/13) > 1/13 by 2e-9, too little to reach the next integer), and its fraction is
  # below 1e-4 exactly where 13 divides S (elsewhere it is >= 1/13 - 1e-4).
  q = s.reshape(h, w, c)[1:-1, 1:-1] * _F32(1.0 / 13)
  whole = np.floor(q)
  out = whole.astype(np.uint8)
  ambiguous = (q - whole) < _F32(1e-4)
  if not ambiguous.any():
    return out
  # Flat neighbourhoods (3x3 max == min), the common ambiguous case: a table per level.
  box = np.ones((3, 3), np.uint8)
  flat = (cv2.dilate(image, box).reshape(h, w, c)[1:-1, 1:-1] ==
          cv2.erode(image, box).reshape(h, w, c)[1:-1, 1:-1])
  centre = image[1:-1, 1:-1]
  out = np.where(flat, _SMOOTH_FLAT[centre], out)
  rest = np.flatnonzero(ambiguous & ~flat)
  if rest.size:
    ys, rem = np.divmod(rest, (w - 2) * c)
    xs, cs = np.divmod(rem, c)
    base = (ys * w + xs) * c + cs  # Flat index of the top-left tap.
    pixels = image.reshape(-1)
    out.flat[rest] = _smooth_chain([pixels[base + (i * w + j) * c]
                                    for i in range(3) for j in range(3)])
  return out


def sharpness(image: np.ndarray, factor: float) -> np.ndarray:
  """PIL ImageEnhance.Sharpness: blend from PIL's SMOOTH filter (3x3, centre 5, /13), the
  one-pixel border keeping the original pixels."""
  if factor == 1.0:
    return image
  h, w, _ = image.shape
  degenerate = image.copy()
  if h >= 3 and w >= 3:
    degenerate[1:-1, 1:-1] = smooth_interior(image)
  return blend(degenerate, image, factor)


# ------------------------------------------------------------------------ geometric ops


def _round_half_away(v: np.ndarray) -> np.ndarray:
  """std::round (what TF's nearest interpolation uses), exactly, in float32."""
  t = np.trunc(v)
  return t + np.where(np.abs(v - t) >= _F32(0.5), np.sign(v), _F32(0.0))


def transform(image: np.ndarray, t, replace: int = REPLACE) -> np.ndarray:
  """TF's ImageProjectiveTransform with an affine t = (a0, a1, a2, b0, b1, b2), nearest
  neighbour: output (x, y) reads input (a0 x + a1 y + a2, b0 x + b1 y + b2); pixels that
  read outside the image get `replace`."""
  h, w, c = image.shape
  a0, a1, a2, b0, b1, b2 = (_F32(v) for v in t)
  x = np.arange(w, dtype=_F32)[None, :]
  y = np.arange(h, dtype=_F32)[:, None]
  map_x = _round_half_away(a0 * x + a1 * y + a2).astype(_F32)
  map_y = _round_half_away(b0 * x + b1 * y + b2).astype(_F32)
  map_x, map_y = np.broadcast_to(map_x, (h, w)), np.broadcast_to(map_y, (h, w))
  # The maps hold whole pixels, so nearest remapping reads exactly those; any outside the
  # image (including beyond cv2's short range, clipped to a value that is still outside).
  limit = _F32(max(h, w) + 1)
  out = cv2.remap(image, np.clip(map_x, -limit, limit), np.clip(map_y, -limit, limit),
                  cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT,
                  borderValue=(replace,) * 4)
  return out.reshape(h, w, c)


def rotate(image: np.ndarray, degrees: float, replace: int = REPLACE) -> np.ndarray:
  """tfa.image.rotate by `degrees` (counter-clockwise on screen for positive degrees)."""
  h, w = _F32(image.shape[0]), _F32(image.shape[1])
  radians = _F32(degrees) * _F32(math.pi / 180.0)
  cos, sin = np.cos(radians, dtype=_F32), np.sin(radians, dtype=_F32)
  x_offset = ((w - 1) - (cos * (w - 1) - sin * (h - 1))) / _F32(2.0)
  y_offset = ((h - 1) - (sin * (w - 1) + cos * (h - 1))) / _F32(2.0)
  return transform(image, (cos, -sin, x_offset, sin, cos, y_offset), replace)


def translate_x(image: np.ndarray, pixels: float, replace: int = REPLACE) -> np.ndarray:
  """Content moves left by `pixels` (output x reads input x + pixels)."""
  return transform(image, (1, 0, pixels, 0, 1, 0), replace)


def translate_y(image: np.ndarray, pixels: float, replace: int = REPLACE) -> np.ndarray:
  return transform(image, (1, 0, 0, 0, 1, pixels), replace)


def shear_x(image: np.ndarray, level: float, replace: int = REPLACE) -> np.ndarray:
  return transform(image, (1, level, 0, 0, 1, 0), replace)


def shear_y(image: np.ndarray, level: float, replace: int = REPLACE) -> np.ndarray:
  return transform(image, (1, 0, 0, level, 1, 0), replace)


def cutout(image: np.ndarray, pad_size: int, center: tuple[int, int],
           replace: int = REPLACE) -> np.ndarray:
  """Rows cy-pad..cy+pad-1 and columns cx-pad..cx+pad-1 (clipped) set to `replace`."""
  h, w = image.shape[:2]
  cy, cx = center
  top, bottom = max(0, cy - pad_size), min(h, cy + pad_size)
  left, right = max(0, cx - pad_size), min(w, cx + pad_size)
  if bottom <= top or right <= left:
    return image
  out = image.copy()
  out[top:bottom, left:right] = replace
  return out


# ----------------------------------------------------------------------------- the policy


def _negate(value: float, rng: np.random.Generator) -> float:
  return -value if rng.random() < 0.5 else value


def apply_op(name: str, image: np.ndarray, magnitude: float, rng: np.random.Generator, *,
             translate_const: float = TRANSLATE_CONST,
             cutout_const: float = CUTOUT_CONST) -> np.ndarray:
  """One RandAugment op at `magnitude` (the module docstring's table); draws from rng only
  the sign of the signed ops and Cutout's centre."""
  level = float(magnitude) / MAX_LEVEL
  enhance = level * 1.8 + 0.1
  if name == "AutoContrast":
    return autocontrast(image)
  if name == "Equalize":
    return equalize(image)
  if name == "Invert":
    return invert(image)
  if name == "Rotate":
    return rotate(image, _negate(level * 30.0, rng))
  if name == "Posterize":
    return posterize(image, int(level * 4))
  if name == "Solarize":
    return solarize(image, int(level * 256))
  if name == "Color":
    return color(image, enhance)
  if name == "Contrast":
    return contrast(image, enhance)
  if name == "Brightness":
    return brightness(image, enhance)
  if name == "Sharpness":
    return sharpness(image, enhance)
  if name == "ShearX":
    return shear_x(image, _negate(level * 0.3, rng))
  if name == "ShearY":
    return shear_y(image, _negate(level * 0.3, rng))
  if name == "TranslateX":
    return translate_x(image, _negate(level * float(translate_const), rng))
  if name == "TranslateY":
    return translate_y(image, _negate(level * float(translate_const), rng))
  if name == "Cutout":
    h, w = image.shape[:2]
    center = (int(rng.integers(h)), int(rng.integers(w)))
    return cutout(image, int(level * cutout_const), center)
  if name == "SolarizeAdd":
    return solarize_add(image, int(level * 110))
  raise ValueError(f"unknown RandAugment op {name!r}; ops: {OPS}")


def distort_image_with_randaugment(image: np.ndarray, num_layers: int, magnitude: float,
                                   rng: np.random.Generator, *, prob: float = 1.0,
                                   translate_const: float = TRANSLATE_CONST,
                                   cutout_const: float = CUTOUT_CONST) -> np.ndarray:
  """uint8 [H, W, C] (C in 1, 3) -> uint8 [H, W, C]: num_layers ops drawn uniformly from
  OPS, each applied (with probability `prob`; the reference: always) at `magnitude`."""
  for _ in range(num_layers):
    name = OPS[int(rng.integers(len(OPS)))]
    if prob < 1.0 and not rng.random() < prob:
      continue
    image = apply_op(name, image, magnitude, rng, translate_const=translate_const,
                     cutout_const=cutout_const)
  return image


@register("randaug")
def get_randaug(num_layers: int = 2, magnitude: float = 10, *, prob: float = 1.0,
                translate_const: float = TRANSLATE_CONST, cutout_const: float = CUTOUT_CONST):
  """RandAugment: `num_layers` ops at `magnitude` (big_vision's `randaug(2, 15)` et al.)."""
  if not (isinstance(num_layers, int) and num_layers >= 0):
    raise ValueError(f"num_layers={num_layers!r} must be an int >= 0")
  if not magnitude >= 0:
    raise ValueError(f"magnitude={magnitude!r} must be >= 0")
  if not 0.0 <= prob <= 1.0:
    raise ValueError(f"prob={prob!r} must be in [0, 1]")

  def randaug(example, rng):
    image = example["image"]
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
      raise ValueError("randaug needs a decoded uint8 image; put it after the decode op")
    squeeze = image.ndim == 2
    if squeeze:
      image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3):
      raise ValueError(f"randaug needs [H, W, 1 or 3] images, got shape {image.shape}")
    image = distort_image_with_randaugment(image, num_layers, magnitude, rng, prob=prob,
                                           translate_const=translate_const,
                                           cutout_const=cutout_const)
    out = dict(example)
    out["image"] = np.ascontiguousarray(image[..., 0] if squeeze else image)
    return out

  randaug.random = True  # Draws from the rng: never cached (registry.Preprocess.head).
  return randaug

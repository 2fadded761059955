"""Image ops on the host: decoding, crops, resizes, flips (uint8 in, uint8 out).

Conventions (big_vision's `pp/ops_image.py` names and arguments; the implementations are
numpy + OpenCV + simplejpeg, chosen by measurement, benchmarks/RESULTS.md "JPEG pipeline"):
- `image` is encoded bytes (JPEG, PNG, ...) before a decode op, uint8 [H, W, C] after.
- Sizes are `int` (square) or `(h, w)`.
- Random ops draw only from the `rng` they are given (one per example, from the seed and the
  example's stream position), so a resumed run draws the same crops and flips.
- Resize methods: 'bilinear' (cv2.INTER_LINEAR: tf.image.resize's bilinear, no antialias, as
  big_vision), 'area' (cv2.INTER_AREA: antialiased box filter), 'bicubic', 'nearest', and
  'pil_bilinear' (PIL's antialiased bilinear: what the pipeline used before recipes existed,
  kept so embedded configs produce the same pixels).

Decoding is cheap where the recipe allows: `decode` followed by `resize_small` or `resize`,
and `decode_jpeg_and_inception_crop`, use the JPEG decoder's DCT-domain downscaling (libjpeg-
turbo's M/8 scaling through simplejpeg) to decode at the smallest scale that still leaves the
needed region at least as large as the target, then crop, then resize what is left (crop
before resizing). simplejpeg and OpenCV release the GIL, so reader threads decode in parallel.
"""
from __future__ import annotations

import io
import math

import cv2
import numpy as np
import simplejpeg

from jax_transfer.data.pp.registry import MeanStd, register

cv2.setNumThreads(1)  # Parallelism comes from reader threads / worker processes, not OpenCV.

_CV2_METHODS = {"bilinear": cv2.INTER_LINEAR, "area": cv2.INTER_AREA,
                "bicubic": cv2.INTER_CUBIC, "nearest": cv2.INTER_NEAREST}
METHODS = tuple(_CV2_METHODS) + ("pil_bilinear",)


class CorruptImageError(ValueError):
  """Bytes that no decoder reads as an image."""


def _hw(size) -> tuple[int, int]:
  if isinstance(size, int):
    return size, size
  h, w = size
  return int(h), int(w)


def _check_method(method):
  if method not in METHODS:
    raise ValueError(f"resize method {method!r} is unknown; allowed: {METHODS}")


def _as_bytes(data) -> bytes:
  if isinstance(data, np.ndarray):  # tfds returns encoded images as a 0-d object array.
    data = data.item() if data.dtype == object else data.tobytes()
  return data


def is_jpeg(data: bytes) -> bool:
  return data[:3] == b"\xff\xd8\xff"


def jpeg_size(data: bytes) -> tuple[int, int] | None:
  """(height, width) from the JPEG header (microseconds), None if unreadable."""
  try:
    h, w, _, _ = simplejpeg.decode_jpeg_header(data)
    return h, w
  except ValueError:
    return None


def decode_bytes(data, channels: int = 3, min_hw: tuple[int, int] | None = None) -> np.ndarray:
  """Encoded image -> uint8 [H', W', channels].

  JPEG: simplejpeg (libjpeg-turbo); with `min_hw`, the smallest DCT scale M/8 whose output is
  at least min_hw, so H' <= H. Other formats (PNG, WebP, ...) and JPEGs libjpeg-turbo cannot
  convert (CMYK): OpenCV, then PIL, at full size. Raises CorruptImageError if none reads it.
  """
  data = _as_bytes(data)
  if is_jpeg(data):
    kw = {} if min_hw is None else {"min_height": int(min_hw[0]), "min_width": int(min_hw[1])}
    try:
      return simplejpeg.decode_jpeg(data, colorspace="GRAY" if channels == 1 else "RGB", **kw)
    except ValueError:
      pass  # CMYK / unusual JPEGs; truncated files are re-tried (and rejected) below.
  image = cv2.imdecode(np.frombuffer(data, np.uint8),
                       cv2.IMREAD_GRAYSCALE if channels == 1 else cv2.IMREAD_COLOR)
  if image is not None:
    return image[..., None] if channels == 1 else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
  try:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    with Image.open(io.BytesIO(data)) as im:
      return np.asarray(im.convert("L" if channels == 1 else "RGB")).reshape(
          im.height, im.width, channels)
  except Exception as e:  # pylint: disable=broad-except
    raise CorruptImageError(f"cannot decode image ({len(data)} bytes): {e}") from None


def resize_array(image: np.ndarray, hw: tuple[int, int], method: str) -> np.ndarray:
  """uint8 [H, W, C] -> [h, w, C]."""
  h, w = hw
  if image.shape[:2] == (h, w):
    return image
  if method == "pil_bilinear":
    from PIL import Image  # pylint: disable=g-import-not-at-top
    # Per channel ('L' images): PIL's RGB and per-band resizes give the same values, and
    # this handles any channel count.
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c])).resize(
        (w, h), Image.BILINEAR)) for c in range(image.shape[-1])], axis=-1)
  out = cv2.resize(image, (w, h), interpolation=_CV2_METHODS[method])
  return out[..., None] if out.ndim == 2 else out


def _downscale_method(src_hw, dst_hw, method):
  """'bilinear' downscaling by more than 2x aliases; area filtering does not."""
  if method == "bilinear" and min(s / d for s, d in zip(src_hw, dst_hw)) > 2:
    return "area"
  return method


def _image(example) -> np.ndarray:
  image = example["image"]
  if not isinstance(image, np.ndarray) or image.dtype == object:
    raise ValueError("pp: the image is still encoded; start the recipe with a decode op")
  return image[..., None] if image.ndim == 2 else image


def _with_image(example, image):
  out = dict(example)
  out["image"] = image
  return out


# ------------------------------------------------------------------------------- decode ops


@register("decode")
def get_decode(channels: int = 3):
  """Encoded bytes -> uint8 [H, W, channels]. An already decoded array passes unchanged
  (so one recipe serves datasets stored as tensors too)."""
  if channels not in (1, 3):
    raise ValueError(f"channels={channels} must be 1 or 3")

  def decode(example, rng):
    del rng
    image = example["image"]
    if isinstance(image, np.ndarray) and image.dtype != object:
      return _with_image(example, image[..., None] if image.ndim == 2 else image)
    return _with_image(example, decode_bytes(image, channels))

  decode.decode_channels = channels  # Lets the next op fuse decoding with its resize.
  return decode


def _decode_at_least(example, channels, needed_hw_of):
  """Decodes `example['image']` at the smallest DCT scale at which the region
  `needed_hw_of(H, W) -> (h, w)` (in full-size pixels) is still >= target; returns
  (image, scale_y, scale_x): decoded pixels per original pixel."""
  image = example["image"]
  if isinstance(image, np.ndarray) and image.dtype != object:
    image = image[..., None] if image.ndim == 2 else image
    return image, 1.0, 1.0
  data = _as_bytes(image)
  size = jpeg_size(data) if is_jpeg(data) else None
  if size is None:
    decoded = decode_bytes(data, channels)
    return decoded, 1.0, 1.0
  h, w = size
  min_hw = needed_hw_of(h, w)
  decoded = decode_bytes(data, channels, min_hw=min_hw)
  return decoded, decoded.shape[0] / h, decoded.shape[1] / w


# -------------------------------------------------------------------------------- resizes


@register("resize")
def get_resize(size, method: str = "bilinear"):
  """Resize to `size` (int: square; (h, w)), ignoring the aspect ratio."""
  hw = _hw(size)
  _check_method(method)

  def resize(example, rng):
    del rng
    image = _image(example)
    return _with_image(example, resize_array(image, hw, _downscale_method(
        image.shape[:2], hw, method)))

  def fused(channels):
    def decode_resize(example, rng):
      del rng
      image, _, _ = _decode_at_least(example, channels, lambda h, w: hw)
      return _with_image(example, resize_array(image, hw, _downscale_method(
          image.shape[:2], hw, method)))
    decode_resize.out_size = hw
    return decode_resize

  resize.out_size = hw
  resize.fuse_with_decode = fused
  return resize


def _small_hw(h, w, size):
  """(h, w) with the smaller side `size`, aspect kept (big_vision rounds the same way)."""
  ratio = size / min(h, w)
  return max(size, round(h * ratio)), max(size, round(w * ratio))


@register("resize_small")
def get_resize_small(size: int, method: str = "area"):
  """Resize so that the smaller side is `size`, keeping the aspect ratio (big_vision's
  resize_small; its default method is area)."""
  _check_method(method)

  def resize_small(example, rng):
    del rng
    image = _image(example)
    return _with_image(example, resize_array(image, _small_hw(*image.shape[:2], size), method))

  def fused(channels):
    def decode_resize_small(example, rng):
      del rng
      image, _, _ = _decode_at_least(example, channels, lambda h, w: _small_hw(h, w, size))
      return _with_image(example, resize_array(image, _small_hw(*image.shape[:2], size),
                                               method))
    return decode_resize_small

  resize_small.fuse_with_decode = fused
  return resize_small


# ---------------------------------------------------------------------------------- crops


def _check_fits(image, hw, op):
  if image.shape[0] < hw[0] or image.shape[1] < hw[1]:
    raise ValueError(f"pp {op}: image {image.shape[:2]} is smaller than the crop {hw}; "
                     "resize first (e.g. resize_small)")


@register("central_crop")
def get_central_crop(size):
  """The central `size` crop (big_vision rounds the offsets down)."""
  hw = _hw(size)

  def central_crop(example, rng):
    del rng
    image = _image(example)
    _check_fits(image, hw, "central_crop")
    top, left = (image.shape[0] - hw[0]) // 2, (image.shape[1] - hw[1]) // 2
    return _with_image(example, image[top:top + hw[0], left:left + hw[1]])

  central_crop.out_size = hw
  return central_crop


@register("random_crop")
def get_random_crop(size):
  """A uniformly placed `size` crop."""
  hw = _hw(size)

  def random_crop(example, rng):
    image = _image(example)
    _check_fits(image, hw, "random_crop")
    top = int(rng.integers(image.shape[0] - hw[0] + 1))
    left = int(rng.integers(image.shape[1] - hw[1] + 1))
    return _with_image(example, image[top:top + hw[0], left:left + hw[1]])

  random_crop.out_size = hw
  random_crop.random = True
  return random_crop


def sample_inception_crop(rng, h: int, w: int, area_range=(0.05, 1.0),
                          ratio_range=(3 / 4, 4 / 3), attempts: int = 10):
  """(top, left, height, width) of a random-resized (Inception) crop of an h x w image.

  As torchvision / timm's RandomResizedCrop.get_params: up to `attempts` draws of an area
  fraction ~ U(area_range) and an aspect ratio w/h ~ logU(ratio_range), the first that fits
  placed uniformly; otherwise the central crop with the ratio clamped to ratio_range.
  big_vision's default area range (area_min=5, area_max=100 percent) is (0.05, 1.0).
  """
  area = h * w
  log_lo, log_hi = math.log(ratio_range[0]), math.log(ratio_range[1])
  for _ in range(attempts):
    target = area * rng.uniform(*area_range)
    ratio = math.exp(rng.uniform(log_lo, log_hi))
    cw = int(round(math.sqrt(target * ratio)))
    ch = int(round(math.sqrt(target / ratio)))
    if 0 < cw <= w and 0 < ch <= h:
      top = int(rng.integers(h - ch + 1))
      left = int(rng.integers(w - cw + 1))
      return top, left, ch, cw
  in_ratio = w / h
  if in_ratio < ratio_range[0]:
    cw, ch = w, int(round(w / ratio_range[0]))
  elif in_ratio > ratio_range[1]:
    ch, cw = h, int(round(h * ratio_range[1]))
  else:
    cw, ch = w, h
  return (h - ch) // 2, (w - cw) // 2, ch, cw


def _inception(example, rng, hw, channels, area_range, ratio_range, method):
  """Shared by inception_crop (decoded input) and decode_jpeg_and_inception_crop."""
  image = example["image"]
  if isinstance(image, np.ndarray) and image.dtype != object:
    full_hw = image.shape[:2]
  else:
    data = _as_bytes(image)
    full_hw = (jpeg_size(data) if is_jpeg(data) else None)
    if full_hw is None:  # Not a JPEG: decode fully, then crop.
      image = decode_bytes(data, channels)
      full_hw = image.shape[:2]
  top, left, ch, cw = sample_inception_crop(rng, *full_hw, area_range, ratio_range)
  # The crop must keep >= hw pixels after DCT scaling: the whole image then needs
  # >= full * hw / crop pixels along each axis.
  needed = lambda h, w: (math.ceil(h * min(1.0, hw[0] / ch)), math.ceil(w * min(1.0, hw[1] / cw)))
  decoded, sy, sx = _decode_at_least(_with_image(example, image), channels, needed)
  y0, x0 = int(top * sy), int(left * sx)
  y1 = min(decoded.shape[0], max(y0 + 1, int(round((top + ch) * sy))))
  x1 = min(decoded.shape[1], max(x0 + 1, int(round((left + cw) * sx))))
  crop = decoded[y0:y1, x0:x1]
  return _with_image(example, resize_array(crop, hw, _downscale_method(crop.shape[:2], hw,
                                                                       method)))


def _inception_op(size, area_min, area_max, ratio_min, ratio_max, method, channels):
  hw = _hw(size)
  _check_method(method)
  if not 0 < area_min <= area_max <= 100:
    raise ValueError(f"need 0 < area_min <= area_max <= 100, got {area_min}, {area_max}")
  area_range, ratio_range = (area_min / 100, area_max / 100), (ratio_min, ratio_max)

  def inception_crop(example, rng):
    return _inception(example, rng, hw, channels, area_range, ratio_range, method)

  inception_crop.out_size = hw
  inception_crop.random = True
  return inception_crop


@register("inception_crop")
def get_inception_crop(size, area_min: float = 5, area_max: float = 100,
                       ratio_min: float = 3 / 4, ratio_max: float = 4 / 3,
                       method: str = "bilinear"):
  """Random-resized (Inception) crop, resized to `size`. area_min/max in percent, as
  big_vision. On encoded bytes it decodes as decode_jpeg_and_inception_crop does."""
  return _inception_op(size, area_min, area_max, ratio_min, ratio_max, method, 3)


@register("decode_jpeg_and_inception_crop")
def get_decode_jpeg_and_inception_crop(size, area_min: float = 5, area_max: float = 100,
                                       ratio_min: float = 3 / 4, ratio_max: float = 4 / 3,
                                       method: str = "bilinear", channels: int = 3):
  """Decode + Inception crop + resize to `size` (big_vision's op of this name). The crop is
  drawn from the JPEG header's size, then the image is decoded at the smallest DCT scale that
  keeps the crop >= size, cropped, and resized: never a full-resolution decode of a large
  image for a small crop's sake. Non-JPEG bytes are decoded fully first."""
  return _inception_op(size, area_min, area_max, ratio_min, ratio_max, method, channels)


# ------------------------------------------------------------------------------ channels


@register("to_rgb")
def get_to_rgb():
  """uint8 [H, W, 1] -> [H, W, 3], the grey value in every channel (PIL's convert('RGB') of an
  'L' image; tf.image.grayscale_to_rgb); an RGB image passes unchanged. Feeds greyscale data
  (the embedded digits) to a model trained on colour images."""
  def to_rgb(example, rng):
    del rng
    image = _image(example)
    if image.shape[-1] == 3:
      return example
    if image.shape[-1] != 1:
      raise ValueError(f"to_rgb: an image of {image.shape[-1]} channels is neither grey nor RGB")
    return _with_image(example, np.repeat(image, 3, axis=-1))

  to_rgb.out_channels = 3
  return to_rgb


# --------------------------------------------------------------------------- flips, values


@register("flip_lr")
def get_flip_lr(p: float = 0.5):
  """Horizontal flip with probability p."""
  def flip_lr(example, rng):
    image = _image(example)
    if rng.uniform() < p:
      flipped = cv2.flip(image, 1)
      image = flipped[..., None] if flipped.ndim == 2 else flipped
    return _with_image(example, image)

  flip_lr.random = True
  return flip_lr


@register("value_range")
def get_value_range(vmin: float = -1, vmax: float = 1):
  """Pixels 0..255 -> [vmin, vmax], float32. Runs on the device after the uint8 batch is
  there (registry.normalise); it must be a recipe's last op."""
  if not vmax > vmin:
    raise ValueError(f"value_range needs vmin < vmax, got ({vmin}, {vmax})")

  def value_range(example, rng):  # Not called by Preprocess; kept for direct use.
    del rng
    return example

  value_range.value_range = (vmin, vmax)
  return value_range


@register("normalize")
def get_normalize(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
  """Pixels 0..255 -> (x / 255 - mean) / std per channel, float32: the normalisation a
  published checkpoint states (open_clip / HF / timm: mean and std of [0, 1] pixels, e.g.
  OpenAI CLIP's normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258,
  0.27577711))). Runs on the device like value_range; it must be a recipe's last op."""
  mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
  if len(mean) != len(std) or not all(s > 0 for s in std):
    raise ValueError(f"normalize needs mean and std of one length and std > 0, got {mean}, "
                     f"{std}")

  def normalize(example, rng):  # Not called by Preprocess; kept for direct use.
    del rng
    return example

  normalize.value_range = MeanStd(mean, std)
  return normalize

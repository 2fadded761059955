"""Image augmentations as pure jax functions, run inside the jitted step on the
batch-sharded images ([B, H, W, C] float32 in [-1, 1]) and keyed from the step's rng, so a
resumed run draws the same views. Barlow Twins' view distribution (Zbontar et al. 2021,
after SimCLR), shrunk to what small images support: random resized crop, optional horizontal
flip (off for digits: a flipped 3 is not a 3), brightness / contrast / per-channel colour
jitter, optional grayscale, gaussian noise.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _resized_crop(key, image, min_scale: float):
  """One image: a crop covering min_scale..1 of the area (aspect 3/4..4/3), resized back."""
  h, w, _ = image.shape
  k1, k2, k3, k4 = jax.random.split(key, 4)
  area = jax.random.uniform(k1, (), minval=min_scale, maxval=1.0)
  log_ratio = jax.random.uniform(k2, (), minval=jnp.log(3 / 4), maxval=jnp.log(4 / 3))
  ch = jnp.clip(jnp.sqrt(area / jnp.exp(log_ratio)), 0.1, 1.0) * h
  cw = jnp.clip(jnp.sqrt(area * jnp.exp(log_ratio)), 0.1, 1.0) * w
  top = jax.random.uniform(k3, ()) * (h - ch)
  left = jax.random.uniform(k4, ()) * (w - cw)
  scale = jnp.array([h / ch, w / cw])
  translation = -jnp.array([top, left]) * scale
  return jax.image.scale_and_translate(image, image.shape, (0, 1), scale, translation,
                                       method="linear", antialias=False)


def _one(key, image, *, min_scale, flip, jitter, grayscale_prob, noise):
  keys = jax.random.split(key, 7)
  x = _resized_crop(keys[0], image, min_scale)
  if flip:
    x = jnp.where(jax.random.bernoulli(keys[1]), x[:, ::-1], x)
  if jitter:
    # Brightness (additive), contrast (scale about the mean), per-channel colour gain.
    x = x + jax.random.uniform(keys[2], (), minval=-jitter, maxval=jitter)
    mean = x.mean()
    x = mean + (x - mean) * jax.random.uniform(keys[3], (), minval=1 - jitter,
                                               maxval=1 + jitter)
    if x.shape[-1] == 3:
      x = x * jax.random.uniform(keys[4], (3,), minval=1 - jitter, maxval=1 + jitter)
  if grayscale_prob and x.shape[-1] == 3:
    gray = jnp.broadcast_to(x.mean(-1, keepdims=True), x.shape)
    x = jnp.where(jax.random.bernoulli(keys[5], grayscale_prob), gray, x)
  if noise:
    x = x + noise * jax.random.normal(keys[6], x.shape)
  return jnp.clip(x, -1.0, 1.0)


def augment(key, images, *, min_scale: float = 0.5, flip: bool = False, jitter: float = 0.3,
            grayscale_prob: float = 0.0, noise: float = 0.05):
  """images: [B, H, W, C] -> [B, H, W, C], an independent random view per image."""
  keys = jax.random.split(key, images.shape[0])
  one = lambda k, x: _one(k, x, min_scale=min_scale, flip=flip, jitter=jitter,
                          grayscale_prob=grayscale_prob, noise=noise)
  return jax.vmap(one)(keys, images)


# ------------------------------------------------------------------ mixup / cutmix (batch)


def mixup_cutmix_params(key, image_hw, *, mixup_alpha: float, cutmix_alpha: float,
                        prob: float = 1.0, switch_prob: float = 0.5) -> dict:
  """One batch's mix, drawn as timm's `Mixup._params_per_batch` + `cutmix_bbox_and_lam`
  (correct_lam=True, no cutmix_minmax), in jax from `key`. Returns scalars:
    apply: whether the batch is mixed at all (probability `prob`; both alphas 0: never);
    use_cutmix: cutmix (probability switch_prob when both alphas are > 0) or mixup;
    lam: the weight of the image itself: Beta(alpha, alpha) for mixup; for cutmix
      1 - (box area) / (H * W), the box's actual area after clipping; 1.0 when not applied;
    box: (yl, yh, xl, xh), rows yl..yh-1 and columns xl..xh-1 taken from the partner (empty
      unless cutmix is applied). timm: cut = int(side * sqrt(1 - lam_beta)), a centre drawn
      uniformly over the image, the box centre -+ cut // 2 clipped to the image.
  """
  if mixup_alpha < 0 or cutmix_alpha < 0:
    raise ValueError(f"mixup_alpha={mixup_alpha}, cutmix_alpha={cutmix_alpha} must be >= 0")
  h, w = image_hw
  k_apply, k_switch, k_mix, k_cut, k_cy, k_cx = jax.random.split(key, 6)
  enabled = mixup_alpha > 0 or cutmix_alpha > 0
  apply = jnp.asarray(enabled) & (jax.random.uniform(k_apply, ()) < prob)
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch, ()) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  lam_mix = (jax.random.beta(k_mix, mixup_alpha, mixup_alpha) if mixup_alpha > 0
             else jnp.float32(1.0))
  lam_beta = (jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0
              else jnp.float32(1.0))
  # The cutmix box (timm's rand_bbox, margin 0).
  ratio = jnp.sqrt(jnp.maximum(1.0 - lam_beta, 0.0))
  cut_h = jnp.floor(h * ratio).astype(jnp.int32)
  cut_w = jnp.floor(w * ratio).astype(jnp.int32)
  cy = jax.random.randint(k_cy, (), 0, h)
  cx = jax.random.randint(k_cx, (), 0, w)
  cutting = apply & use_cutmix
  yl = jnp.where(cutting, jnp.clip(cy - cut_h // 2, 0, h), 0)
  yh = jnp.where(cutting, jnp.clip(cy + cut_h // 2, 0, h), 0)
  xl = jnp.where(cutting, jnp.clip(cx - cut_w // 2, 0, w), 0)
  xh = jnp.where(cutting, jnp.clip(cx + cut_w // 2, 0, w), 0)
  lam_cut = 1.0 - ((yh - yl) * (xh - xl)).astype(jnp.float32) / jnp.float32(h * w)
  lam = jnp.where(apply, jnp.where(use_cutmix, lam_cut, lam_mix), 1.0).astype(jnp.float32)
  return dict(apply=apply, use_cutmix=use_cutmix & apply, lam=lam, box=(yl, yh, xl, xh))


def mixup_cutmix(key, images, labels_onehot, *, mixup_alpha: float, cutmix_alpha: float,
                 prob: float = 1.0, switch_prob: float = 0.5):
  """timm's Mixup in batch mode, as a pure jax function for the jitted step.

  images: [B, H, W, C] float (already normalised); labels_onehot: [B, K] (rows summing to 1,
  label smoothing already applied if wanted, as timm's mixup_target does). One mix per batch
  (mixup_cutmix_params): every image is mixed with its partner in the flipped batch
  x[::-1] -- mixup: lam * x + (1 - lam) * x[::-1]; cutmix: x with the box pasted from
  x[::-1] -- and the targets are lam * y + (1 - lam) * y[::-1], lam being cutmix's actual
  area ratio. Not applied (probability 1 - prob, or both alphas 0): both returned unchanged.
  Works on batch-sharded arrays under jit (the flip is a collective; the draws are scalars,
  the same on every device). Returns (images, soft targets), images in images' dtype.
  """
  _, h, w, _ = images.shape
  p = mixup_cutmix_params(key, (h, w), mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha,
                          prob=prob, switch_prob=switch_prob)
  lam, (yl, yh, xl, xh) = p["lam"], p["box"]
  flipped = images[::-1]
  rows = jnp.arange(h)[:, None]
  cols = jnp.arange(w)[None, :]
  in_box = (rows >= yl) & (rows < yh) & (cols >= xl) & (cols < xh)  # [H, W]
  cut = jnp.where(in_box[None, :, :, None], flipped, images)
  lam_x = lam.astype(images.dtype)
  mixed = lam_x * images + (1 - lam_x) * flipped
  out = jnp.where(p["apply"], jnp.where(p["use_cutmix"], cut, mixed), images)
  y = labels_onehot
  lam_y = lam.astype(y.dtype)
  targets = jnp.where(p["apply"], lam_y * y + (1 - lam_y) * y[::-1], y)
  return out, targets


def smooth_one_hot(labels, num_classes: int, smoothing: float = 0.0, dtype=jnp.float32):
  """Integer labels [B] -> [B, K]: 1 - smoothing + smoothing / K on the label, smoothing / K
  elsewhere (timm's mixup_target / one_hot)."""
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes, dtype=dtype) * (1.0 - smoothing) + off

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

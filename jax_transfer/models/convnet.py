"""Small ConvNet (the dataset-distillation benchmark network, Gidaris & Komodakis 2018 as
used by DC / KIP / KRR-ST): `depth` blocks of conv3x3 -> norm -> relu -> 2x2 avg-pool, then
flatten (or global average pool) and an optional linear head.

images: [B, H, W, C] -> (logits [B, num_classes], aux) with aux['pre_logits'] = the features
[B, F] (F = width * (H / 2^depth) * (W / 2^depth) for pool='flatten', width for 'gap'). With
num_classes=0 there is no head and the output is the features, like models/vit.py.

Norm: 'instance' (GroupNorm with one channel per group, the distillation literature's choice:
no batch statistics, so a model applied to 10 synthetic images behaves as on 1000 real ones),
'layer' or 'none'. No BatchNorm on purpose: it would need mutable state in every method.

Param layout and logical axis names (parallel.py maps them to mesh axes):
  block_{i}_conv/{kernel [3, 3, Cin, W] (None, None, 'conv_in', 'embed'), bias ['embed']}
  block_{i}_norm/{scale, bias} ['embed']
  head/{kernel [F, num_classes] ('features', 'classes'), bias ['classes']}
"""
from typing import Any

import chex
import flax.linen as nn
import jax.numpy as jnp

P = nn.with_logical_partitioning


class ConvNet(nn.Module):
  num_classes: int = 0
  width: int = 64
  depth: int = 3
  norm: str = 'instance'
  pool: str = 'flatten'  # 'flatten' (DC/KRR-ST ConvNet) or 'gap'
  dtype: Any = jnp.float32
  head_zero_init: bool = True

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    del train  # No dropout / batch statistics.
    if self.norm not in ('instance', 'layer', 'none'):
      raise ValueError(f'Unknown norm {self.norm!r}; allowed: instance, layer, none')
    if self.pool not in ('flatten', 'gap'):
      raise ValueError(f'Unknown pool {self.pool!r}; allowed: flatten, gap')
    b, h, w, _ = images.shape
    if h % (2 ** self.depth) or w % (2 ** self.depth):
      raise ValueError(f'Image size {(h, w)} is not divisible by 2^depth={2 ** self.depth}')
    dtype = jnp.dtype(self.dtype)
    x = images.astype(dtype)
    for i in range(self.depth):
      x = nn.Conv(self.width, (3, 3), padding='SAME', dtype=dtype, name=f'block_{i}_conv',
                  kernel_init=P(nn.initializers.lecun_normal(),
                                (None, None, 'conv_in', 'embed')),
                  bias_init=P(nn.initializers.zeros, ('embed',)))(x)
      norm_kw = dict(dtype=dtype, scale_init=P(nn.initializers.ones, ('embed',)),
                     bias_init=P(nn.initializers.zeros, ('embed',)), name=f'block_{i}_norm')
      if self.norm == 'instance':
        x = nn.GroupNorm(num_groups=None, group_size=1, **norm_kw)(x)
      elif self.norm == 'layer':
        x = nn.LayerNorm(**norm_kw)(x)
      x = nn.relu(x)
      x = nn.avg_pool(x, (2, 2), strides=(2, 2))
      x = nn.with_logical_constraint(x, ('batch', None, None, 'embed'))
    x = x.reshape(b, -1) if self.pool == 'flatten' else x.mean(axis=(1, 2))
    aux = {'pre_logits': x}
    if not self.num_classes:
      return x, aux
    kinit = nn.initializers.zeros if self.head_zero_init else nn.initializers.lecun_normal()
    logits = nn.Dense(self.num_classes, dtype=dtype, name='head',
                      kernel_init=P(kinit, ('features', 'classes')),
                      bias_init=P(nn.initializers.zeros, ('classes',)))(x)
    chex.assert_shape(logits, (b, self.num_classes))
    return logits, aux


def make_convnet(**kwargs) -> ConvNet:
  """make_convnet(width=32, depth=2, num_classes=10). Unknown fields raise TypeError."""
  return ConvNet(**kwargs)

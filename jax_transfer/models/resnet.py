"""ResNet with BatchNorm (He et al. 2016; torchvision's v1.5 layout: the stride of a
bottleneck block on its 3x3 conv), the backbone of the domain-adaptation literature.

images: [B, H, W, C] -> (logits [B, num_classes], aux) with aux['pre_logits'] = the globally
average-pooled features [B, F] (F = width * 8 for basic blocks, width * 32 for bottlenecks).
With num_classes=0 there is no head and the output is the features, like models/vit.py.

Variants (registry names resnet18 / resnet50 / resnet_tiny, or 'resnet' with variant=...):
  '18', '34' (basic blocks), '50', '101', '152' (bottlenecks), 'tiny' (2 stages of 1 basic
  block, width 8 by default: tests).
stem: 'imagenet' (conv7x7/2 + BN + relu + maxpool3x3/2, torchvision's: with 1000 classes
ResNet-18 / 50 have torchvision's 11,689,512 / 25,557,032 parameters, tests/test_resnet_bn.py)
or 'cifar' (conv3x3/1 + BN + relu, no pool: for the 32x32 and 8x8 embedded images).

BatchNorm: the running mean / var live in the 'batch_stats' collection (methods/supervised.py
carries it in the train state's `extra`). train=True normalises by the batch's statistics and
updates the running ones, train=False uses the running ones. Momentum is flax's convention:
ra = momentum * ra + (1 - momentum) * batch_stat, so bn_momentum=0.9 is torch's momentum=0.1;
the running var is the biased batch variance (torch keeps the unbiased one; the difference is
a factor n/(n-1) of the per-channel count n = B*H*W). Under jit with the batch sharded over the
mesh's data axes, the batch mean / var are over the *global* batch (XLA inserts the
all-reduce): cross-replica (synchronised) BN, no axis_name needed.
frozen_bn=True: every BN normalises by its running statistics in train mode too and never
updates them, a fixed per-channel affine map (the scale / bias still train unless the optimizer
freezes them). That is a frozen backbone as a linear probe means it: the head trains on the
features the evaluation sees, and the backbone's statistics stay the export's (timm's
freeze_batch_norm_2d; MoCo / SimCLR linear evaluation runs the backbone in eval mode).
Without it, a head-only run (optimizer.trainable_regex='^head/') still re-estimates every
running statistic on the target data.

Param layout and logical axis names (parallel.py maps them to mesh axes), as models/convnet.py:
  stem_conv/kernel (None, None, 'conv_in', 'embed'), stem_bn/{scale, bias} ['embed']
  stage{s}_block{b}/{conv1, conv2[, conv3], proj_conv}/kernel, .../{bn1, ..., proj_bn}/...
  head/{kernel [F, num_classes] ('features', 'classes'), bias ['classes']}
batch_stats/<module>/{mean, var} take the logical names of their module's scale
(`box_batch_stats`), so they shard like it.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import chex
import flax
import flax.linen as nn
import jax.numpy as jnp

P = nn.with_logical_partitioning

VARIANTS = {  # variant -> (blocks per stage, block type, default width)
    "tiny": ((1, 1), "basic", 8),
    "18": ((2, 2, 2, 2), "basic", 64),
    "34": ((3, 4, 6, 3), "basic", 64),
    "50": ((3, 4, 6, 3), "bottleneck", 64),
    "101": ((3, 4, 23, 3), "bottleneck", 64),
    "152": ((3, 8, 36, 3), "bottleneck", 64),
}
STEMS = ("imagenet", "cifar")


class _Layers:
  """Conv / BN factories shared by the stem and the blocks."""

  def _conv(self, features, kernel, strides, name):
    # torchvision's kaiming_normal_(mode='fan_out', nonlinearity='relu'): untruncated normal.
    pad = [(k // 2, k // 2) for k in kernel]
    return nn.Conv(features, kernel, strides, padding=pad, use_bias=False, dtype=self.dtype,
                   name=name, kernel_init=P(nn.initializers.variance_scaling(
                       2.0, "fan_out", "normal"), (None, None, "conv_in", "embed")))

  def _bn(self, train, name):
    return nn.BatchNorm(use_running_average=not train or self.frozen_bn,
                        momentum=self.bn_momentum,
                        epsilon=self.bn_epsilon, dtype=self.dtype, name=name,
                        scale_init=P(nn.initializers.ones, ("embed",)),
                        bias_init=P(nn.initializers.zeros, ("embed",)))


class Block(_Layers, nn.Module):
  """Basic (two 3x3) or bottleneck (1x1, 3x3, 1x1 x4) residual block, projection shortcut
  (1x1 conv + BN) when the shape changes."""
  features: int
  strides: int = 1
  kind: str = "basic"
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Any = jnp.float32
  frozen_bn: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    residual, f, s = x, self.features, self.strides
    if self.kind == "basic":
      convs, out = [(f, (3, 3), s), (f, (3, 3), 1)], f
    else:
      convs, out = [(f, (1, 1), 1), (f, (3, 3), s), (f * 4, (1, 1), 1)], f * 4
    for i, (c, k, st) in enumerate(convs, 1):
      x = self._conv(c, k, (st, st), f"conv{i}")(x)
      x = self._bn(train, f"bn{i}")(x)
      if i < len(convs):
        x = nn.relu(x)
    if s != 1 or residual.shape[-1] != out:
      residual = self._conv(out, (1, 1), (s, s), "proj_conv")(residual)
      residual = self._bn(train, "proj_bn")(residual)
    return nn.relu(x + residual)


class ResNet(_Layers, nn.Module):
  variant: str = "18"
  num_classes: int = 0
  width: int | None = None  # None: the variant's (64; 8 for 'tiny')
  stem: str = "imagenet"
  bn_momentum: float = 0.9  # flax convention (== torch momentum 0.1)
  bn_epsilon: float = 1e-5
  dtype: Any = jnp.float32
  head_zero_init: bool = True
  frozen_bn: bool = False  # BN always uses (and keeps) the running statistics: module doc

  def __post_init__(self):  # at construction, so config.validate reports it in one line
    if self.variant not in VARIANTS:
      raise ValueError(f"Unknown ResNet variant {self.variant!r}; allowed: "
                       f"{', '.join(VARIANTS)}")
    if self.stem not in STEMS:
      raise ValueError(f"Unknown stem {self.stem!r}; allowed: {', '.join(STEMS)}")
    super().__post_init__()

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    stages, kind, default_width = VARIANTS[self.variant]
    width = self.width or default_width
    b = images.shape[0]
    x = images.astype(jnp.dtype(self.dtype))
    if self.stem == "imagenet":
      x = self._conv(width, (7, 7), (2, 2), "stem_conv")(x)
    else:
      x = self._conv(width, (3, 3), (1, 1), "stem_conv")(x)
    x = nn.relu(self._bn(train, "stem_bn")(x))
    if self.stem == "imagenet":
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for s, n in enumerate(stages):
      for i in range(n):
        x = Block(width * 2 ** s, 2 if s > 0 and i == 0 else 1, kind, self.bn_momentum,
                  self.bn_epsilon, self.dtype, self.frozen_bn,
                  name=f"stage{s + 1}_block{i + 1}")(x, train)
      x = nn.with_logical_constraint(x, ("batch", None, None, None))
    x = x.mean(axis=(1, 2))
    aux = {"pre_logits": x}
    if not self.num_classes:
      return x, aux
    kinit = nn.initializers.zeros if self.head_zero_init else nn.initializers.lecun_normal()
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head",
                      kernel_init=P(kinit, ("features", "classes")),
                      bias_init=P(nn.initializers.zeros, ("classes",)))(x)
    chex.assert_shape(logits, (b, self.num_classes))
    return logits, aux


def box_batch_stats(variables):
  """model.init's variables -> their 'batch_stats' with each mean / var boxed in the logical
  names of its module's (boxed) scale param (bias when no scale), so parallel.py shards the
  statistics like the channels they describe; None when the model has no batch_stats."""
  stats = variables.get("batch_stats")
  if stats is None:
    return None
  params = flax.traverse_util.flatten_dict(variables["params"], sep="/")

  def box(path, value):
    module = path.rsplit("/", 1)[0]
    ref = params.get(f"{module}/scale", params.get(f"{module}/bias"))
    if isinstance(ref, nn.Partitioned) and len(ref.names) == value.ndim:
      return nn.Partitioned(value, ref.names)
    return value
  flat = flax.traverse_util.flatten_dict(nn.unbox(stats), sep="/")
  return flax.traverse_util.unflatten_dict({k: box(k, v) for k, v in flat.items()}, sep="/")


def make_resnet(variant: str = "18", **kwargs) -> ResNet:
  """make_resnet('50', num_classes=1000). Unknown fields raise TypeError."""
  return ResNet(variant=variant, **kwargs)


def _named(name_variant: str, /, **kwargs) -> ResNet:
  if "variant" in kwargs:
    raise TypeError(f"model resnet{name_variant}: the variant is in the name; drop "
                    f"model.variant (or use model_name='resnet' with model.variant)")
  return make_resnet(name_variant, **kwargs)


NAMED = {"resnet18": functools.partial(_named, "18"),
         "resnet50": functools.partial(_named, "50"),
         "resnet_tiny": functools.partial(_named, "tiny")}


def param_count(model: nn.Module, image_shape: Sequence[int]) -> int:
  """Number of parameters (batch statistics excluded), from shapes only (jax.eval_shape)."""
  import jax
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                             jnp.zeros((1, *image_shape)), train=False))
  return sum(int(jnp.prod(jnp.array(x.shape))) if x.shape else 1
             for x in jax.tree.leaves(nn.unbox(shapes["params"])))

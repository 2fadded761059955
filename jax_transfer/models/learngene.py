"""TLEG learngene: linearly expanded ViT layers (Xia et al., "Transformer as Linear Expansion
of Learngene", AAAI 2024).

A learngene holds two copies of one encoder block, θ_A and θ_B, plus the shared (not
expanded) params of models/vit.py: patch `embedding`, `pos_embedding`, `encoder_norm`, `head`
(no `cls`: the auxiliary model pools by average, REFERENCES.md). Block i of a depth-L ViT is

    θ_i = θ_A + (i / L) · θ_B          (eq. 1 of TLEG with the released code's i/L, 0-indexed)

for every per-block param: ln_1, attn/{qkv,out}, ln_2, mlp/{fc1,fc2}, kernels and biases.
`expand` turns a learngene into an ordinary ViT param tree of any depth, so descendants are
plain ViTs that any method fine-tunes unchanged (`stacked=True`: the layout of a ViT with
scan_layers=True; a learngene itself never depends on scan).

Param layout: {embedding, pos_embedding, encoder_norm, head,
               learngene_A: <one encoderblock>, learngene_B: <one encoderblock>}.
θ_A / θ_B are created by the ViT's own Block, so they carry the block's logical axis names and
shard by the same rules as any ViT block.
"""
from __future__ import annotations

import re

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from jax_transfer.models.vit import STACKED, block_name, stack_blocks

A, B = "learngene_A", "learngene_B"
_BLOCK = re.compile(r"encoderblock_(\d+)$")
# Shared params that a descendant ViT takes as they are.
SHARED = ("embedding", "pos_embedding", "encoder_norm", "head", "pre_logits", "ln_pre")


def _tleg_init(block, key, which: str):
  """Re-initialises a (boxed) block as θ_A or θ_B, keeping the logical-axis boxes.

  As the authors' code (DeiT's _init_weights on the expanded Linear / LayerNorm modules):
  linear kernels truncated-normal(0.02) for both θ_A and θ_B, linear biases 0; LayerNorm
  γ_A = 1, β_A = 0, γ_B = β_B = 0 (so at init every block has the same unit-gain norm).
  timm's trunc_normal_(std=.02) truncates at the *absolute* bounds ±2 (= ±100σ), i.e. it is
  effectively N(0, 0.02²); lower/upper = ±100 reproduce that with jax's σ-relative bounds.
  """
  flat = flax.traverse_util.flatten_dict(block)  # Boxes are leaves (not dicts).
  keys = jax.random.split(key, len(flat))
  out = {}
  for k, (path, leaf) in zip(keys, sorted(flat.items())):
    value = leaf.unbox() if isinstance(leaf, nn.Partitioned) else leaf
    is_ln = path[0] in ("ln_1", "ln_2")
    if is_ln and path[-1] == "scale" and which == "A":
      new = jnp.ones_like(value)
    elif path[-1] == "kernel":
      new = jax.random.truncated_normal(k, -100.0, 100.0, value.shape, value.dtype) * 0.02
    else:  # Linear biases, LayerNorm β, and γ_B.
      new = jnp.zeros_like(value)
    out[path] = leaf.replace_boxed(new) if isinstance(leaf, nn.Partitioned) else new
  return flax.traverse_util.unflatten_dict(out)


def init_learngene(model: nn.Module, rng, images):
  """Boxed learngene params for a ViT `model` (any depth; only its block shapes matter).
  images: a [1, H, W, C] dummy fixing the token count."""
  tpl_rng, a_rng, b_rng = jax.random.split(rng, 3)
  # A depth-1 unscanned ViT gives the shared params and one block's shapes and logical names.
  template = model.clone(depth=1, scan_layers=False)
  params = dict(template.init({"params": tpl_rng}, images, train=False)["params"])
  block = params.pop("encoderblock_0")
  params[A] = _tleg_init(block, a_rng, "A")
  params[B] = _tleg_init(block, b_rng, "B")
  return params


def is_learngene(params) -> bool:
  return A in params and B in params


def expand(learngene, depth: int, stacked: bool = False):
  """Learngene -> ViT params of `depth` blocks: block i = θ_A + (i/depth)·θ_B. Differentiable
  (the auxiliary model's loss goes through it) and works on numpy or jax leaves. stacked=True
  returns the blocks stacked for a ViT with scan_layers=True (the same values)."""
  if depth < 1:
    raise ValueError(f"depth={depth} must be >= 1")
  params = {k: v for k, v in learngene.items() if k not in (A, B)}
  for i in range(depth):
    coef = i / depth  # Python float: the same value in the auxiliary model and descendants.
    params[block_name(i)] = jax.tree.map(lambda a, b: a + coef * b,
                                               learngene[A], learngene[B])
  return stack_blocks(params) if stacked else params


def vit_depth(params) -> int:
  """Number of encoder blocks in a ViT param tree (per-block or scan-stacked)."""
  if STACKED in params:
    return jax.tree.leaves(params[STACKED])[0].shape[0]
  return sum(1 for k in params if _BLOCK.match(k))


def expand_like(learngene, params):
  """Learngene expanded to the depth of the ViT param tree `params` (descendant init)."""
  return expand(learngene, vit_depth(params))


def num_params(tree) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(tree))

"""timm VisionTransformer state dicts (.safetensors, or torch files read weights_only) -> ViT.

Keys (timm's names; torch Linear [out, in] -> our [in, out]):
  patch_embed.proj.{weight [D, C, p, p], bias}   -> embedding
  cls_token [1, 1, D]                            -> cls (class_token)
  pos_embed [1, N(+1), D]                        -> pos_embedding; with no_embed_class (the
                                                    table has no class-token row) a zero row
                                                    is prepended: cls + 0 = cls, exact
  norm_pre (CLIP-style towers)                   -> ln_pre (pre_norm)
  blocks.{i}.{norm1, attn.qkv [3D, D], attn.proj, norm2, mlp.fc1, mlp.fc2}
                                                 -> encoderblock_{i}/...
  norm                                           -> encoder_norm (token / map pools)
  fc_norm (global_pool='avg')                    -> fc_norm (LayerNorm after pooling)
  attn_pool.{latent, q, kv, proj, norm, mlp}     -> map_head (global_pool='map': SigLIP)
  head.{weight, bias}                            -> head
Not in the weights: heads (default width // 64, --vision_heads) and the pool when there is
both a class token and no fc_norm (default 'token'; --pool=gap for global_pool='avg' with
fc_norm=False). Refused with a message: LayerScale (ls1/ls2), register tokens, q/k norm,
patch-dropout / pooling variants timm adds beyond these.
"""
from __future__ import annotations

import re
from typing import Optional

import numpy as np

from jax_transfer.convert import core

TIMM_BLOCK = core.BlockLayout(
    sep=".", ln_1=("norm1.weight", "norm1.bias"), ln_2=("norm2.weight", "norm2.bias"),
    attn="torch_fused", qkv=("attn.qkv.weight", "attn.qkv.bias"), out="attn.proj",
    fc1="mlp.fc1", fc2="mlp.fc2")
UNSUPPORTED = ((r"\.ls[12]\.", "LayerScale (ls1 / ls2)"), (r"^reg_token$", "register tokens"),
               (r"\.attn\.(q_norm|k_norm)\.", "q/k normalisation"),
               (r"\.attn\.q_bias$|\.attn\.v_bias$", "BEiT-style split qkv biases"),
               (r"^(visual\.|text\.|token_embedding)", "an open_clip model (--format=open_clip)"))


def _refuse(sd):
  found = {what: sorted(k for k in sd if re.search(p, k)) for p, what in UNSUPPORTED}
  found = {w: k for w, k in found.items() if k}
  if found:
    raise core.CheckpointError("not representable by our ViT: " + "; ".join(
        f"{w} (keys {k[:3]}{' ...' if len(k) > 3 else ''})" for w, k in found.items()))


def add_attn_pool(km: core.KeyMap, sd: dict, d: int, heads: int):
  """timm AttentionPoolLatent (q Linear on the latent, kv Linear [2D, D]) -> map_head."""
  k = d // heads
  mlp = sd["attn_pool.mlp.fc1.weight"].shape[0]
  km.add("attn_pool.latent", (1, 1, d), "map_head/probe")
  km.add(("attn_pool.q.weight", "attn_pool.kv.weight"), ((d, d), (2 * d, d)),
         "map_head/attn/qkv/kernel",
         lambda q, kv: np.concatenate([q, kv]).T.reshape(d, 3, heads, k))
  km.add(("attn_pool.q.bias", "attn_pool.kv.bias"), ((d,), (2 * d,)),
         "map_head/attn/qkv/bias", lambda q, kv: np.concatenate([q, kv]).reshape(3, heads, k))
  km.add("attn_pool.proj.weight", (d, d), "map_head/attn/out/kernel",
         lambda w: w.T.reshape(heads, k, d))
  km.add("attn_pool.proj.bias", (d,), "map_head/attn/out/bias")
  km.ln("attn_pool.norm.weight", "attn_pool.norm.bias", "map_head/ln", d)
  km.linear("attn_pool.mlp.fc1", d, mlp, "map_head/mlp/fc1", True)
  km.linear("attn_pool.mlp.fc2", mlp, d, "map_head/mlp/fc2", True)
  return mlp


def convert(path_or_sd, heads: Optional[int] = None, pool: Optional[str] = None,
            activation: str = "gelu") -> core.Converted:
  """A timm ViT state dict (file or {key: array}) -> Converted (ViT). activation: 'gelu'
  (timm's default nn.GELU, exact), 'gelu_tanh' or 'quick_gelu'."""
  sd = core.read_state_dict(path_or_sd) if isinstance(path_or_sd, str) else dict(path_or_sd)
  _refuse(sd)
  core.require(sd, ["patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight"],
               "a timm VisionTransformer state dict")
  w = sd["patch_embed.proj.weight"]
  d, c, p = w.shape[0], w.shape[1], w.shape[2]
  depth = core.depth_of(sd, r"blocks\.(\d+)\.")
  mlp = sd["blocks.0.mlp.fc1.weight"].shape[0]
  heads = core.heads_for(d, heads, "image", "--vision_heads")
  cls = "cls_token" in sd
  n = sd["pos_embed"].shape[1]
  embed_class = cls and _is_square(n - 1)  # else timm's no_embed_class
  grid = core.grid_of(n - int(embed_class), "pos_embed")
  km = core.KeyMap()
  km.add("patch_embed.proj.weight", (d, c, p, p), "embedding/kernel", core.torch_conv)
  km.add("patch_embed.proj.bias", (d,), "embedding/bias")
  if cls:
    km.add("cls_token", (1, 1, d), "cls")
  if cls and not embed_class:  # no_embed_class: the class token gets no position
    km.add("pos_embed", (1, n, d), "pos_embedding",
           lambda x: np.concatenate([np.zeros_like(x[:, :1]), x], axis=1))
  else:
    km.add("pos_embed", (1, n, d), "pos_embedding")
  pre_norm = "norm_pre.weight" in sd
  if pre_norm:
    km.ln("norm_pre.weight", "norm_pre.bias", "ln_pre", d)
  core.add_blocks(km, TIMM_BLOCK, lambda i: f"blocks.{i}", "", depth, d, heads, mlp)
  fc_norm = "fc_norm.weight" in sd
  if fc_norm:
    km.ln("fc_norm.weight", "fc_norm.bias", "fc_norm", d)
  else:
    km.ln("norm.weight", "norm.bias", "encoder_norm", d)
  if "attn_pool.latent" in sd:
    if sd["attn_pool.mlp.fc1.weight"].shape[0] != mlp:
      raise core.CheckpointError("attn_pool.mlp width differs from the blocks' mlp width: "
                                 "our MAP head uses the model's mlp_dim")
    add_attn_pool(km, sd, d, heads)
    pool = "map"
  pool = pool or ("gap" if fc_norm or not cls else "cls")
  classes = sd["head.weight"].shape[0] if "head.weight" in sd else 0
  if classes:
    km.linear("head", d, classes, "head", True)
  flat = km.convert(sd, what=f"timm ViT {d}x{depth}, {heads} heads, patch {p}")
  acts = core.activation_kwargs(activation, tuple(core.ACTIVATIONS))
  kwargs = dict(width=d, depth=depth, mlp_dim=mlp, num_heads=heads, patch_size=p, pool=pool,
                class_token=cls, fc_norm=fc_norm, num_classes=classes, pre_norm=pre_norm,
                dtype="float32", ln_eps=1e-6, patch_bias=True, **acts)
  size = grid * p
  params = core.build_params(flat, "vit", kwargs, size, c)
  return core.Converted("vit", kwargs, params, size, (0.5,) * 3, (0.5,) * 3, "supervised",
                        notes=[f"heads={heads} (not in the weights)"])


def _is_square(n: int) -> bool:
  r = int(round(max(n, 0) ** 0.5))
  return r * r == n

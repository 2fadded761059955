"""AugReg / google-research vision_transformer (and big_vision ViT classifier) `.npz` -> ViT.

Layout (an optional 'params/' or 'opt/target/' root is stripped):
  embedding/{kernel [p, p, C, D], bias}              -> embedding
  cls [1, 1, D]                                      -> cls (pool 'cls'; absent: 'gap')
  Transformer/posembed_input/pos_embedding [1, N, D] (vision_transformer) or
  pos_embedding [1, N, D] (big_vision)               -> pos_embedding
  Transformer/encoderblock_{i}/ (or the stacked encoderblock/)
      vision_transformer: LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2,
      MlpBlock_3/Dense_{0,1};  big_vision: LayerNorm_0, MultiHeadDotProductAttention_0,
      LayerNorm_1, MlpBlock_0        (convert/big_vision.py flax_block)
  Transformer/encoder_norm                           -> encoder_norm
  MAPHead_0 (big_vision 'map' pool)                  -> map_head
  pre_logits/{kernel, bias} (i21k models)            -> pre_logits (representation_size, tanh)
  head/{kernel [D, classes], bias}                   -> head
The activation is not in the weights: 'gelu_tanh' (flax nn.gelu, what they were trained
with; the default) or 'gelu' (exact: what timm runs these weights with).
"""
from __future__ import annotations

from jax_transfer.convert import big_vision, core


def convert(path: str, activation: str = "gelu_tanh") -> core.Converted:
  sd = big_vision.normalise(core.read_npz(path))
  if any(k.startswith("txt/") for k in sd):
    raise core.CheckpointError(f"{path}: has a 'txt/' tower: a two-tower checkpoint "
                               f"(--format=big_vision_siglip)")
  vt = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel" in sd
  layout = big_vision.flax_block(1, 2, 3) if vt else big_vision.FLAX_BLOCK
  posemb = "Transformer/posembed_input/pos_embedding" if vt or (
      "pos_embedding" not in sd) else "pos_embedding"
  km = core.KeyMap()
  geo = big_vision.add_vit(km, sd, "", "", layout, posemb, "a ViT classifier .npz")
  d = geo["width"]
  rep = sd["pre_logits/kernel"].shape[1] if "pre_logits/kernel" in sd else None
  if rep:
    km.linear("pre_logits", d, rep, "pre_logits", False)
  classes = sd["head/kernel"].shape[1] if "head/kernel" in sd else 0
  if classes:
    km.linear("head", rep or d, classes, "head", False)
  flat = km.convert(sd, what=f"ViT {d}x{geo['depth']}, {geo['num_heads']} heads, patch "
                    f"{geo['patch_size']}")
  size, channels = geo.pop("image_size"), geo.pop("channels")
  kwargs = dict(geo, num_classes=classes, representation_size=rep, dtype="float32",
                ln_eps=1e-6, patch_bias=True, **big_vision.gelu_kwargs(activation))
  params = core.build_params(flat, "vit", kwargs, size, channels)
  return core.Converted("vit", kwargs, params, size, (0.5,) * 3, (0.5,) * 3, "supervised")

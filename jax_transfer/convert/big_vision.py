"""big_vision SigLIP / SigLIP 2 `.npz` -> TwoTowers, and the flax ViT tower both it and the
AugReg classifiers (convert/augreg.py) use.

Layout (an optional 'params/' or 'opt/target/' root is stripped; D width, H heads, K = D/H):
  img/embedding/{kernel [p, p, C, D], bias [D]}      -> img/embedding (flax: as is)
  img/pos_embedding [1, N, D]                        -> img/pos_embedding
  img/Transformer/encoderblock_{i}/...               -> img/encoderblock_{i}/  (FLAX_BLOCK)
  img/Transformer/encoderblock/... [depth, ...]      the scan-stacked form: unstacked first
  img/Transformer/encoder_norm                       -> img/encoder_norm
  img/MAPHead_0/{probe, MultiHeadDotProductAttention_0, LayerNorm_0, MlpBlock_0}
                                                     -> img/map_head/{probe, attn, ln, mlp}
  img/head/{kernel, bias}                            -> img_proj (with bias) when present
  txt/Embed_0/embedding [V, D]                       -> txt/token_embedding/embedding
  txt/pos_embedding [1, L, D]                        -> txt/positional_embedding [L, D]
  txt/Encoder_0/encoderblock_{i} (or encoderblock)   -> txt/encoderblock_{i}
  txt/Encoder_0/encoder_norm                         -> txt/ln_final
  txt/head/{kernel, bias}                            -> txt_proj (with bias)
  t [1], b [1]                                       -> logit_scale, logit_bias
Block (flax MultiHeadDotProductAttention): LayerNorm_0, MultiHeadDotProductAttention_0/
{query, key, value}/{kernel [D, H, K], bias [H, K]} + out/{kernel [H, K, D], bias [D]},
LayerNorm_1, MlpBlock_0/Dense_{0, 1}. Heads come from the kernels' shapes. Not in the
weights: the activation (big_vision's nn.gelu is the tanh approximation, the default here)
and the text tower's form: SigLIP's is bidirectional, pooled at the last token ('last').
"""
from __future__ import annotations

import re
from typing import Optional

import numpy as np

from jax_transfer.convert import core


def flax_block(mha: int = 0, ln2: int = 1, mlp: int = 0) -> core.BlockLayout:
  """big_vision names (0, 1, 0); google-research/vision_transformer (AugReg) (1, 2, 3)."""
  return core.BlockLayout(
      sep="/", ln_1=("LayerNorm_0/scale", "LayerNorm_0/bias"),
      ln_2=(f"LayerNorm_{ln2}/scale", f"LayerNorm_{ln2}/bias"), attn="flax_separate",
      qkv=tuple(f"MultiHeadDotProductAttention_{mha}/{n}" for n in ("query", "key", "value")),
      out=f"MultiHeadDotProductAttention_{mha}/out", fc1=f"MlpBlock_{mlp}/Dense_0",
      fc2=f"MlpBlock_{mlp}/Dense_1")


FLAX_BLOCK = flax_block()
MAP_ATTN = core.BlockLayout(sep="/", ln_1=(), ln_2=(), attn="flax_separate",
                            qkv=("query", "key", "value"), out="out", fc1="", fc2="")
ROOTS = ("params/", "opt/target/")
_STACKED = re.compile(r"(.*)/encoderblock/(.*)")


def normalise(sd: dict) -> dict:
  """Strip the root prefix and unstack scan-stacked 'encoderblock/' leaves [depth, ...] into
  per-block 'encoderblock_{i}/' keys (the same arrays, sliced)."""
  for root in ROOTS:
    if any(k.startswith(root) for k in sd):
      sd = {k[len(root):] if k.startswith(root) else k: v for k, v in sd.items()}
      break
  out = {}
  for k, v in sd.items():
    m = _STACKED.fullmatch(k)
    if m:
      for i in range(v.shape[0]):
        out[f"{m.group(1)}/encoderblock_{i}/{m.group(2)}"] = v[i]
    else:
      out[k] = v
  return out


def mlp_dim_of(sd: dict, block_prefix: str, layout: core.BlockLayout) -> int:
  return sd[f"{block_prefix}/{layout.fc1}/kernel"].shape[1]


def heads_of(sd: dict, block_prefix: str, layout: core.BlockLayout) -> int:
  return sd[f"{block_prefix}/{layout.qkv[0]}/kernel"].shape[1]


def add_map_head(km: core.KeyMap, prefix: str, dst: str, d: int, heads: int, mlp: int):
  km.add(f"{prefix}/probe", (1, 1, d), f"{dst}/probe")
  core.add_attention(km, MAP_ATTN,
                     lambda *a: "/".join((f"{prefix}/MultiHeadDotProductAttention_0",) + a),
                     f"{dst}/attn", d, heads)
  km.ln(f"{prefix}/LayerNorm_0/scale", f"{prefix}/LayerNorm_0/bias", f"{dst}/ln", d)
  km.linear(f"{prefix}/MlpBlock_0/Dense_0", d, mlp, f"{dst}/mlp/fc1", False)
  km.linear(f"{prefix}/MlpBlock_0/Dense_1", mlp, d, f"{dst}/mlp/fc2", False)


def add_vit(km: core.KeyMap, sd: dict, src: str, dst: str, layout: core.BlockLayout,
            posemb_key: str, what: str) -> dict:
  """A flax ViT tower at source prefix `src` ('' or 'img/') -> our `dst` ('' or 'img/').
  Returns its geometry as ViT fields (width, depth, mlp_dim, num_heads, patch_size, pool,
  class_token) plus 'image_size'."""
  core.require(sd, [f"{src}embedding/kernel", posemb_key,
                    f"{src}Transformer/encoderblock_0/{layout.ln_1[0]}"], what)
  kernel = sd[f"{src}embedding/kernel"]
  if kernel.ndim != 4 or kernel.shape[0] != kernel.shape[1]:
    raise core.CheckpointError(f"{src}embedding/kernel has shape {kernel.shape}; expected a "
                               f"square conv patch embedding [p, p, C, D]")
  p, _, c, d = kernel.shape
  blocks = f"{src}Transformer/encoderblock_"
  depth = core.depth_of(sd, re.escape(blocks) + r"(\d+)/")
  heads, mlp = heads_of(sd, f"{blocks}0", layout), mlp_dim_of(sd, f"{blocks}0", layout)
  cls = f"{src}cls" in sd
  map_head = f"{src}MAPHead_0/probe" in sd
  n = sd[posemb_key].shape[-2] - int(cls)
  grid = core.grid_of(n, posemb_key)
  km.add(f"{src}embedding/kernel", (p, p, c, d), f"{dst}embedding/kernel")
  km.add(f"{src}embedding/bias", (d,), f"{dst}embedding/bias")
  if cls:
    km.add(f"{src}cls", (1, 1, d), f"{dst}cls")
  km.add(posemb_key, (1, n + int(cls), d), f"{dst}pos_embedding")
  core.add_blocks(km, layout, lambda i: f"{blocks}{i}", dst.rstrip("/"), depth, d, heads, mlp)
  km.ln(f"{src}Transformer/encoder_norm/scale", f"{src}Transformer/encoder_norm/bias",
        f"{dst}encoder_norm", d)
  if map_head:
    add_map_head(km, f"{src}MAPHead_0", f"{dst}map_head", d, heads, mlp)
  pool = "map" if map_head else "cls" if cls else "gap"
  return dict(width=d, depth=depth, mlp_dim=mlp, num_heads=heads, patch_size=p, pool=pool,
              class_token=cls, image_size=grid * p, channels=c)


def gelu_kwargs(activation: str) -> dict:
  """--activation for flax checkpoints: 'gelu_tanh' (flax nn.gelu's default, what big_vision
  and vision_transformer trained with) or 'gelu' (exact erf, what timm runs them with)."""
  return core.activation_kwargs(activation, ("gelu_tanh", "gelu"))


def convert(path: str, activation: str = "gelu_tanh", tokenizer=None,
            text_pool: str = "last", text_causal: bool = False) -> core.Converted:
  """A big_vision SigLIP / SigLIP 2 .npz -> Converted (TwoTowers)."""
  sd = normalise(core.read_npz(path))
  if not any(k.startswith("txt/") for k in sd):
    raise core.CheckpointError(f"{path}: no 'txt/' tower: not a big_vision two-tower "
                               f"checkpoint (a ViT classifier? --format=augreg)")
  km = core.KeyMap()
  img = add_vit(km, sd, "img/", "img/", FLAX_BLOCK, "img/pos_embedding",
                "a big_vision SigLIP image tower")
  core.require(sd, ["txt/Embed_0/embedding", "txt/pos_embedding", "txt/head/kernel", "t"],
               "a big_vision SigLIP text tower")
  vocab, dt = sd["txt/Embed_0/embedding"].shape
  ctx = sd["txt/pos_embedding"].shape[-2]
  embed = sd["txt/head/kernel"].shape[1]
  blocks = "txt/Encoder_0/encoderblock_"
  tdepth = core.depth_of(sd, re.escape(blocks) + r"(\d+)/")
  theads, tmlp = heads_of(sd, f"{blocks}0", FLAX_BLOCK), mlp_dim_of(sd, f"{blocks}0",
                                                                       FLAX_BLOCK)
  km.add("txt/Embed_0/embedding", (vocab, dt), "txt/token_embedding/embedding")
  km.add("txt/pos_embedding", (1, ctx, dt), "txt/positional_embedding", lambda w: w[0])
  core.add_blocks(km, FLAX_BLOCK, lambda i: f"{blocks}{i}", "txt", tdepth, dt, theads, tmlp)
  km.ln("txt/Encoder_0/encoder_norm/scale", "txt/Encoder_0/encoder_norm/bias", "txt/ln_final",
        dt)
  km.linear("txt/head", dt, embed, "txt_proj", False)
  image_proj = "img/head/kernel" in sd
  if image_proj:
    km.linear("img/head", img["width"], embed, "img_proj", False)
  flat = km.convert(sd, ignore=("t", "b"), what=f"big_vision SigLIP image {img['width']}x"
                    f"{img['depth']}, text {dt}x{tdepth}")
  flat["logit_scale"] = np.asarray(sd["t"], np.float32).reshape(())
  flat["logit_bias"] = np.asarray(sd.get("b", 0.0), np.float32).reshape(())
  kwargs = dict(
      image_variant=None, image_width=img["width"], image_depth=img["depth"],
      image_mlp_dim=img["mlp_dim"], image_heads=img["num_heads"],
      image_patch_size=img["patch_size"], image_pool=img["pool"],
      image_class_token=img["class_token"], image_proj=image_proj, image_proj_bias=image_proj,
      text_proj_bias=True, text_width=dt, text_depth=tdepth, text_heads=theads,
      text_mlp_dim=tmlp, vocab_size=vocab, context_length=ctx, embed_dim=embed,
      text_pool=text_pool, text_causal=text_causal, dtype="float32", remat=False,
      pre_norm=False, patch_bias=True, ln_eps=1e-6, **gelu_kwargs(activation))
  params = core.build_params(flat, "two_towers", kwargs, img["image_size"], img["channels"],
                             ctx)
  return core.Converted("two_towers", kwargs, params, img["image_size"], (0.5,) * 3,
                        (0.5,) * 3, "contrastive", loss="siglip", tokenizer=tokenizer,
                        eval_resize="squash")


def is_big_vision_npz(keys) -> Optional[str]:
  """'big_vision_siglip' / 'augreg' / None from the key names of an .npz."""
  keys = {k for k in keys}
  for root in ("",) + ROOTS:
    if f"{root}txt/Embed_0/embedding" in keys:
      return "big_vision_siglip"
    if f"{root}embedding/kernel" in keys:
      return "augreg"
  return None

"""OpenAI CLIP / open_clip PyTorch state dicts -> TwoTowers.

Supported: open_clip's `CLIP` (and `CustomTextCLIP` with the standard text tower) with its own
VisionTransformer image tower and the causal argmax-pooled text transformer, any geometry.
The key table is in models/two_towers.py's docstring; the model is built with open_clip's
options (pre_norm when ln_pre is present, patch_bias=False, ln_eps=1e-5, exact GELU or
QuickGELU, image_pool='cls').

What the weights say, and what they do not:
  inferred from shapes, as OpenAI's `build_model`: image width (conv1), patch size, grid ->
    image size, depth (resblock count), MLP width, ln_pre present or not; embed dim
    (text_projection), context length, vocabulary, text width / depth / MLP width.
  not in the weights:
    heads         width // 64 (OpenAI's build_model, open_clip's head_width=64); other head
                  widths need --vision_heads / --text_heads.
    activation    required: 'gelu' (open_clip's default models) or 'quick_gelu' (OpenAI's
                  weights and open_clip's '-quickgelu' models). A state dict carrying
                  OpenAI's scalar entries (input_resolution, context_length, vocab_size) must
                  be 'quick_gelu'; those entries are checked, then dropped.
    image pool    open_clip's default 'tok' (class token); 'avg' is not representable.
Refused with one message naming the keys: ResNet / timm / HF towers, LayerScale, attentional
pooling, custom attention blocks, a text projection with bias, CoCa's text class token.
"""
from __future__ import annotations

import re

import numpy as np

from jax_transfer.convert import core

ACTIVATIONS = ("gelu", "quick_gelu")
IGNORED_KEYS = frozenset({"attn_mask", "visual.attn_mask"})  # non-persistent buffers
OPENAI_KEYS = ("input_resolution", "context_length", "vocab_size")
UNSUPPORTED = (
    (r"^visual\.(layer\d|attnpool)\.", "a ResNet image tower (ModifiedResNet, e.g. RN50)"),
    (r"^visual\.trunk\.", "a timm image tower"),
    (r"^text\.(transformer\.(embeddings|encoder)|proj)\.", "a Hugging Face text tower"),
    (r"\.ls_[12]\.", "LayerScale (ls_1 / ls_2)"),
    (r"^visual\.attn_pool", "attentional pooling"),
    (r"\.attn\.(ln_q|ln_k|ln_inner|logit_scale|head_scale)|\.ln_attn\.|\.mlp\.ln\.",
     "open_clip custom attention blocks (qk_norm / scaled cosine / scale_*)"),
    (r"^(text\.)?text_projection\.bias$", "a text projection with bias (proj_bias)"),
    (r"^(text\.)?cls_emb$", "a text class token (embed_cls, CoCa)"),
)
OPEN_CLIP_BLOCK = core.BlockLayout(
    sep=".", ln_1=("ln_1.weight", "ln_1.bias"), ln_2=("ln_2.weight", "ln_2.bias"),
    attn="torch_fused", qkv=("attn.in_proj_weight", "attn.in_proj_bias"), out="attn.out_proj",
    fc1="mlp.c_fc", fc2="mlp.c_proj")


def _refuse_unsupported(sd, activation):
  core.activation_kwargs(activation, ACTIVATIONS)  # ValueError naming the allowed ones
  openai = [k for k in OPENAI_KEYS if k in sd]
  if openai and activation != "quick_gelu":
    raise core.CheckpointError(
        f"keys {openai} mark OpenAI's original weights, which use QuickGELU: pass "
        f"--activation quick_gelu (converting them with {activation!r} would silently change "
        f"the function)")
  found = {}
  for pattern, what in UNSUPPORTED:
    keys = sorted(k for k in sd if re.search(pattern, k))
    if keys:
      found[what] = keys
  if found:
    parts = [f"{what} (keys {keys[:3]}{' ...' if len(keys) > 3 else ''}, {len(keys)} in all)"
             for what, keys in found.items()]
    raise core.CheckpointError("not representable by TwoTowers (ViT image tower + causal text "
                               "transformer): " + "; ".join(parts))


def _normalise_layout(sd):
  """CustomTextCLIP keeps the text tower under 'text.' and may hold text_projection as an
  nn.Linear; both become CLIP's layout. Non-persistent buffers are dropped."""
  out = {}
  for k, v in sd.items():
    if k in IGNORED_KEYS or k in OPENAI_KEYS:
      continue
    if k.startswith("text."):
      k = k[len("text."):]
    if k == "text_projection.weight":  # nn.Linear [E, D] -> CLIP's parameter [D, E]
      k, v = "text_projection", v.T
    out[k] = v
  return out


def convert(path_or_sd, activation: str, vision_heads=None, text_heads=None,
            tokenizer=None) -> core.Converted:
  """open_clip / OpenAI CLIP state dict (file or {key: array}) -> Converted."""
  sd = core.read_state_dict(path_or_sd) if isinstance(path_or_sd, str) else dict(path_or_sd)
  _refuse_unsupported(sd, activation)
  sd = _normalise_layout(sd)
  vb, tb = "visual.transformer.resblocks.", "transformer.resblocks."
  core.require(sd, ["visual.conv1.weight", "visual.positional_embedding",
                    "token_embedding.weight", "positional_embedding", "text_projection",
                    f"{vb}0.mlp.c_fc.weight", f"{tb}0.mlp.c_fc.weight"], "a CLIP ViT state dict")
  conv = sd["visual.conv1.weight"]
  if conv.ndim != 4 or conv.shape[2] != conv.shape[3]:
    raise core.CheckpointError(f"visual.conv1.weight has shape {conv.shape}; expected a square "
                               f"patch embedding [width, channels, p, p]")
  d, c, p = conv.shape[:3]
  n = sd["visual.positional_embedding"].shape[0] - 1
  grid = core.grid_of(n, "visual.positional_embedding (after the class token)")
  depth, tdepth = (core.depth_of(sd, re.escape(b) + r"(\d+)\.") for b in (vb, tb))
  mlp, tmlp = sd[f"{vb}0.mlp.c_fc.weight"].shape[0], sd[f"{tb}0.mlp.c_fc.weight"].shape[0]
  vocab, dt = sd["token_embedding.weight"].shape
  ctx, embed = sd["positional_embedding"].shape[0], sd["text_projection"].shape[-1]
  heads = core.heads_for(d, vision_heads, "image", "--vision_heads")
  theads = core.heads_for(dt, text_heads, "text", "--text_heads")
  pre_norm = "visual.ln_pre.weight" in sd or "visual.ln_pre.bias" in sd

  km = core.KeyMap()
  km.add("visual.conv1.weight", (d, c, p, p), "img/embedding/kernel", core.torch_conv)
  km.add("visual.class_embedding", (d,), "img/cls", lambda w: w.reshape(1, 1, d))
  km.add("visual.positional_embedding", (n + 1, d), "img/pos_embedding", lambda w: w[None])
  if pre_norm:
    km.ln("visual.ln_pre.weight", "visual.ln_pre.bias", "img/ln_pre", d)
  core.add_blocks(km, OPEN_CLIP_BLOCK, lambda i: f"{vb}{i}", "img", depth, d, heads, mlp)
  km.ln("visual.ln_post.weight", "visual.ln_post.bias", "img/encoder_norm", d)
  km.add("visual.proj", (d, embed), "img_proj/kernel")
  km.add("token_embedding.weight", (vocab, dt), "txt/token_embedding/embedding")
  km.add("positional_embedding", (ctx, dt), "txt/positional_embedding")
  core.add_blocks(km, OPEN_CLIP_BLOCK, lambda i: f"{tb}{i}", "txt", tdepth, dt, theads, tmlp)
  km.ln("ln_final.weight", "ln_final.bias", "txt/ln_final", dt)
  km.add("text_projection", (dt, embed), "txt_proj/kernel")
  flat = km.convert(sd, ignore=("logit_scale", "logit_bias"),
                    what=f"image {d}x{depth} ({heads} heads, patch {p}) at {grid * p}px, text "
                         f"{dt}x{tdepth}")
  if "logit_scale" not in sd:
    raise core.CheckpointError("missing keys ['logit_scale']")
  for k in ("logit_scale", "logit_bias"):
    if k in sd and sd[k].size != 1:
      raise core.CheckpointError(f"wrong shapes: {k}: {sd[k].shape}, expected a scalar")
  flat["logit_scale"] = np.asarray(sd["logit_scale"], np.float32).reshape(())
  flat["logit_bias"] = np.asarray(sd.get("logit_bias", 0.0), np.float32).reshape(())
  kwargs = dict(
      image_variant=None, image_width=d, image_depth=depth, image_mlp_dim=mlp,
      image_heads=heads, image_patch_size=p, image_pool="cls", text_width=dt,
      text_depth=tdepth, text_heads=theads, text_mlp_dim=tmlp, vocab_size=vocab,
      context_length=ctx, embed_dim=embed, dtype="float32", remat=False, pre_norm=pre_norm,
      patch_bias=False, ln_eps=1e-5, **core.activation_kwargs(activation, ACTIVATIONS))
  params = core.build_params(flat, "two_towers", kwargs, grid * p, c, ctx)
  return core.Converted("two_towers", kwargs, params, grid * p, core.OPENAI_MEAN,
                        core.OPENAI_STD,
                        "contrastive", loss="siglip" if "logit_bias" in sd else "clip",
                        tokenizer=tokenizer)

"""Hugging Face transformers `CLIPModel` and `SiglipModel` directories -> TwoTowers.

A directory holds config.json (model_type 'clip' or 'siglip'; the geometry is read from it,
not guessed) and model.safetensors (or sharded model-0000x-of-0000y.safetensors with
model.safetensors.index.json; pytorch_model.bin is read with weights_only=True), plus the
tokenizer files (tokenizer.json / spiece.model, read by jax_transfer.tokenizer).

Key mapping (prefix vision_model. -> img/, text_model. -> txt/; block i is
encoder.layers.{i}. -> encoderblock_{i}/, layout HF_BLOCK below):
  vision_model.embeddings.patch_embedding.{weight, bias}  -> img/embedding (bias: SigLIP only)
  vision_model.embeddings.class_embedding [D]             -> img/cls (CLIP only)
  vision_model.embeddings.position_embedding.weight       -> img/pos_embedding [1, N, D]
  vision_model.pre_layrnorm                               -> img/ln_pre (CLIP only)
  vision_model.post_layernorm                             -> img/encoder_norm
  vision_model.head.{probe, attention.in_proj_*, attention.out_proj, layernorm, mlp}
                                                          -> img/map_head/... (SigLIP)
  text_model.embeddings.{token, position}_embedding       -> txt/token_embedding, positional_
  text_model.final_layer_norm                             -> txt/ln_final
  visual_projection / text_projection (no bias, CLIP)     -> img_proj / txt_proj
  text_model.head.{weight, bias} (SigLIP)                 -> txt_proj (with bias)
  logit_scale, logit_bias (SigLIP) [1] or []              -> logit_scale, logit_bias
  q_proj, k_proj, v_proj [D, D] each                      -> attn/qkv [D, 3, H, K]
Model behaviour from config.json: hidden_act ('quick_gelu' -> quick_gelu, 'gelu' -> exact,
'gelu_pytorch_tanh' / 'gelu_new' -> tanh GELU), layer_norm_eps. CLIP's text is causal and
pooled at the first eos_token_id (argmax of the ids when eos_token_id == 2, HF's legacy
rule); SigLIP's is bidirectional and pooled at the last position, so its texts are padded
to the full length (the tokenizer does it). Both towers must share the activation and eps.
"""
from __future__ import annotations

import json
import os

import numpy as np

from jax_transfer.convert import core

HF_BLOCK = core.BlockLayout(
    sep=".", ln_1=("layer_norm1.weight", "layer_norm1.bias"),
    ln_2=("layer_norm2.weight", "layer_norm2.bias"), attn="torch_separate",
    qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), out="self_attn.out_proj",
    fc1="mlp.fc1", fc2="mlp.fc2")
MAP_ATTN = core.BlockLayout(sep=".", ln_1=(), ln_2=(), attn="torch_fused",
                            qkv=("in_proj_weight", "in_proj_bias"), out="out_proj", fc1="",
                            fc2="")
# config.json hidden_act -> core.ACTIVATIONS names.
HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                  "gelu_new": "gelu_tanh"}
MODEL_TYPES = ("clip", "siglip")


def is_hf_dir(path: str) -> bool:
  return os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json"))


def read_config(path: str) -> dict:
  with open(os.path.join(path, "config.json")) as f:
    cfg = json.load(f)
  if cfg.get("model_type") not in MODEL_TYPES:
    raise core.CheckpointError(
        f"{path}/config.json: model_type {cfg.get('model_type')!r} is not a two-tower model "
        f"this importer reads ({', '.join(MODEL_TYPES)}; ViT classifiers: --format=timm_vit)")
  return cfg


def read_weights(path: str) -> dict:
  """The model's tensors: model.safetensors, its shards, or pytorch_model.bin."""
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  elif os.path.exists(os.path.join(path, "model.safetensors")):
    files = ["model.safetensors"]
  elif os.path.exists(os.path.join(path, "pytorch_model.bin")):
    files = ["pytorch_model.bin"]
  else:
    raise core.CheckpointError(f"{path}: no model.safetensors, shard index or "
                               f"pytorch_model.bin")
  sd = {}
  for name in files:
    sd.update(core.read_state_dict(os.path.join(path, name)))
  return sd


def _activation(cfg: dict, path: str) -> dict:
  acts = {cfg["vision_config"].get("hidden_act"), cfg["text_config"].get("hidden_act")}
  eps = {cfg["vision_config"].get("layer_norm_eps"), cfg["text_config"].get("layer_norm_eps")}
  if len(acts) != 1 or len(eps) != 1:
    raise core.CheckpointError(f"{path}: the towers differ in hidden_act {acts} or "
                               f"layer_norm_eps {eps}; TwoTowers shares them")
  act = acts.pop()
  if act not in HF_ACTIVATIONS:
    raise core.CheckpointError(f"{path}: hidden_act {act!r} not supported; allowed: "
                               f"{sorted(HF_ACTIVATIONS)}")
  return dict(core.ACTIVATIONS[HF_ACTIVATIONS[act]], ln_eps=float(eps.pop()))


def convert(path: str, tokenizer=None) -> core.Converted:
  """A transformers CLIPModel / SiglipModel directory -> Converted. Raises CheckpointError
  naming every problem."""
  cfg = read_config(path)
  sd = read_weights(path)
  siglip = cfg["model_type"] == "siglip"
  v, t = cfg["vision_config"], cfg["text_config"]
  d, dt = v["hidden_size"], t["hidden_size"]
  p, size = v["patch_size"], v["image_size"]
  grid = size // p
  vh, th = v["num_attention_heads"], t["num_attention_heads"]
  vocab, ctx = t["vocab_size"], t["max_position_embeddings"]
  embed = (t.get("projection_size") or dt) if siglip else cfg.get("projection_dim", 512)
  km = core.KeyMap()
  km.add("vision_model.embeddings.patch_embedding.weight", (d, v.get("num_channels", 3), p, p),
         "img/embedding/kernel", core.torch_conv)
  n = grid * grid
  if siglip:
    km.add("vision_model.embeddings.patch_embedding.bias", (d,), "img/embedding/bias")
  else:
    km.add("vision_model.embeddings.class_embedding", (d,), "img/cls",
           lambda w: w.reshape(1, 1, d))
    km.ln("vision_model.pre_layrnorm.weight", "vision_model.pre_layrnorm.bias", "img/ln_pre", d)
    n += 1
  km.add("vision_model.embeddings.position_embedding.weight", (n, d), "img/pos_embedding",
         lambda w: w[None])
  core.add_blocks(km, HF_BLOCK, lambda i: f"vision_model.encoder.layers.{i}", "img",
                  v["num_hidden_layers"], d, vh, v["intermediate_size"])
  km.ln("vision_model.post_layernorm.weight", "vision_model.post_layernorm.bias",
        "img/encoder_norm", d)
  km.add("text_model.embeddings.token_embedding.weight", (vocab, dt),
         "txt/token_embedding/embedding")
  km.add("text_model.embeddings.position_embedding.weight", (ctx, dt),
         "txt/positional_embedding")
  core.add_blocks(km, HF_BLOCK, lambda i: f"text_model.encoder.layers.{i}", "txt",
                  t["num_hidden_layers"], dt, th, t["intermediate_size"])
  km.ln("text_model.final_layer_norm.weight", "text_model.final_layer_norm.bias",
        "txt/ln_final", dt)
  if siglip:
    h = "vision_model.head"
    km.add(f"{h}.probe", (1, 1, d), "img/map_head/probe")
    core.add_attention(km, MAP_ATTN, lambda *a: ".".join((f"{h}.attention",) + a),
                       "img/map_head/attn", d, vh)
    km.ln(f"{h}.layernorm.weight", f"{h}.layernorm.bias", "img/map_head/ln", d)
    km.linear(f"{h}.mlp.fc1", d, v["intermediate_size"], "img/map_head/mlp/fc1", True)
    km.linear(f"{h}.mlp.fc2", v["intermediate_size"], d, "img/map_head/mlp/fc2", True)
    km.linear("text_model.head", dt, embed, "txt_proj", True)
  else:
    km.linear("visual_projection", d, embed, "img_proj", True, bias=None)
    km.linear("text_projection", dt, embed, "txt_proj", True, bias=None)
  scalars = ("logit_scale", "logit_bias") if siglip else ("logit_scale",)
  flat = km.convert(sd, ignore=scalars + (r".*position_ids",),
                    what=f"HF {cfg['model_type']} image {d}x{v['num_hidden_layers']}, text "
                         f"{dt}x{t['num_hidden_layers']}")
  missing = [k for k in scalars if k not in sd]
  if missing:
    raise core.CheckpointError(f"{path}: missing keys {missing}")
  flat["logit_scale"] = np.asarray(sd["logit_scale"], np.float32).reshape(())
  flat["logit_bias"] = np.asarray(sd.get("logit_bias", 0.0), np.float32).reshape(())
  eos = t.get("eos_token_id")
  if siglip:
    text = dict(text_pool="last", text_causal=False)
  elif eos == 2 or eos is None:  # HF's legacy rule: argmax of the ids
    text = dict(text_pool="argmax")
  else:
    text = dict(text_pool="eot", text_eot_id=int(eos))
  kwargs = dict(
      image_variant=None, image_width=d, image_depth=v["num_hidden_layers"],
      image_mlp_dim=v["intermediate_size"], image_heads=vh, image_patch_size=p,
      image_pool="map" if siglip else "cls", image_proj=not siglip,
      text_proj_bias=siglip, text_width=dt, text_depth=t["num_hidden_layers"], text_heads=th,
      text_mlp_dim=t["intermediate_size"], vocab_size=vocab, context_length=ctx,
      embed_dim=embed, dtype="float32", remat=False, pre_norm=not siglip,
      patch_bias=siglip, **text, **_activation(cfg, path))
  params = core.build_params(flat, "two_towers", kwargs, size, v.get("num_channels", 3), ctx)
  mean, std = ((0.5,) * 3, (0.5,) * 3) if siglip else (core.OPENAI_MEAN, core.OPENAI_STD)
  return core.Converted("two_towers", kwargs, params, size, mean, std, "contrastive",
                        loss="siglip" if siglip else "clip", tokenizer=tokenizer,
                        eval_resize="squash" if siglip else "crop")

"""Offline reference checkpoints in published formats, with reference forward functions.

For the checkpoint importers' parity tests: each builder writes a tiny RANDOMLY initialised
checkpoint in one published format and returns the reference library's own forward functions
on it. Nothing here imports jax_transfer, so an importer can be tested against it but cannot
agree with itself: the npz formats (big_vision SigLIP, AugReg) are written with random values
in the published key layout and read back by a third-party loader (open_clip / timm); the
torch formats are random torch models (every parameter perturbed) saved by their library.

  ref = build("big_vision_siglip", "w96h3_p8_px32_stacked", tmp_path, seed=0)
  images, tokens = random_inputs(ref.geometry, batch=4, seed=1)
  zimg, ztxt = ref.image_embeds(images), ref.text_embeds(tokens)   # [B, E], unit norm
  logits = ref.logit_scale * zimg @ ztxt.T + ref.logit_bias       # == ref.logits_per_image

Formats (`FORMATS`) and what is written at `ref.path`:
  hf_clip            dir: transformers.CLIPModel.save_pretrained (config.json, model.safetensors)
  hf_siglip          dir: transformers.SiglipModel.save_pretrained
  big_vision_siglip  file: big_vision SigLIP .npz (`params/img/...`, `params/txt/...`,
                     `params/t`, `params/b`), per-block `encoderblock_{i}/` or scan-stacked
                     `encoderblock/` (geometry `stacked`); loaded by
                     open_clip.convert.load_big_vision_weights
  augreg             file: google-research/vision_transformer ViT classifier .npz; loaded by
                     timm.models.vision_transformer._load_weights
  timm_vit           file: timm VisionTransformer state dict (safetensors.torch.save_file)
  open_clip          file: open_clip CLIP state dict (torch.save)

Inputs follow OUR convention: images float32 NHWC (already normalised), tokens int32 [B, L];
the reference functions transpose / cast for torch and return numpy float32.

Returned `Reference` fields: path, format, geometry, model (the torch reference module, eval
mode), keys ({written key: shape}, read back from the file(s)), notes (pooling, activation,
LayerNorm eps, interpolation ...) and
  two-tower formats: image_embeds(images) -> [B, E], text_embeds(tokens) -> [B, E] (both L2-
    normalised), logit_scale (the multiplier the model applies: exp(stored)), raw_logit_scale
    (the stored log value), logit_bias (0.0 when the model has none), logits_per_image(images,
    tokens) -> [Bi, Bt] from the reference library's own logits code (model forward / loss
    get_logits), and where the reference exposes them image_features / text_features (the
    pooled features before the projection; None otherwise);
  classifier formats: logits(images) -> [B, num_classes], pre_logits(images) -> [B, D] (the
    head's input).

Geometry keys (`GEOMETRIES[format][name]`; every geometry also carries `format`):
  image tower: image_size (input pixels), patch_size, width, depth, heads, mlp_dim
  text tower (two-tower formats): text_width, text_depth, text_heads, text_mlp_dim,
    vocab_size, context_length; embed_dim (joint space; = width for the SigLIP formats, whose
    image tower has no projection and whose text head maps text_width -> width)
  hf_clip: hidden_act (both towers), ln_eps (both towers)
  hf_siglip: hidden_act, ln_eps
  big_vision_siglip: stacked (scan layout); GELU is tanh-approximated, LayerNorm eps 1e-6
  augreg: num_classes, representation_size (0: none; else a `pre_logits` Dense + tanh),
    checkpoint_image_size (the grid the npz position embedding is written at; timm resamples
    it when != image_size), gelu ('tanh': the source JAX model's nn.gelu; 'erf': timm's)
  timm_vit: num_classes, class_token, global_pool ('token' | 'avg'), fc_norm (bool)
  open_clip: quick_gelu, logit_bias (None, or the init value of a logit_bias parameter)

Token conventions (`random_inputs`): CLIP-style (hf_clip, open_clip): [sot = vocab-2, random
ids in [1, vocab-2), eot = vocab-1, 0 ...], EOT at a random position (row 0 at the last
one), so EOT is the largest id (open_clip's argmax pool) and the first occurrence of
eos_token_id = vocab-1 (HF CLIP's pool). SigLIP-style (hf_siglip, big_vision_siglip): random
ids in [2, vocab), then EOS = pad = 1 to the full length (row 0: EOS only at the last
position); the text is bidirectional and pooled at the LAST position, so padding matters.

Needs torch; hf_* need transformers, the others timm (open_clip formats also open_clip_torch).
`missing(format)` names what is absent (for pytest.skip). torchvision is stubbed
(tests/open_clip_shim.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import math
import os
import types
from typing import Any, Callable, Optional

import numpy as np

import open_clip_shim

FORMATS = ("hf_clip", "hf_siglip", "big_vision_siglip", "augreg", "timm_vit", "open_clip")
TWO_TOWER_FORMATS = ("hf_clip", "hf_siglip", "big_vision_siglip", "open_clip")
CLASSIFIER_FORMATS = ("augreg", "timm_vit")
SIGLIP_TOKEN_FORMATS = ("hf_siglip", "big_vision_siglip")
SIGLIP_EOS = SIGLIP_PAD = 1  # published SigLIP tokenizers: '</s>' = 1 is both EOS and pad
_REQUIRES = {"hf_clip": ("torch", "transformers", "safetensors"),
             "hf_siglip": ("torch", "transformers", "safetensors"),
             "big_vision_siglip": ("torch", "timm", "open_clip"),
             "augreg": ("torch", "timm"),
             "timm_vit": ("torch", "timm", "safetensors"),
             "open_clip": ("torch", "open_clip")}


def _tower(image_size, patch_size, width, depth, heads, mlp_dim):
  return dict(image_size=image_size, patch_size=patch_size, width=width, depth=depth,
              heads=heads, mlp_dim=mlp_dim)


def _text(width, depth, heads, mlp_dim, vocab_size, context_length):
  return dict(text_width=width, text_depth=depth, text_heads=heads, text_mlp_dim=mlp_dim,
              vocab_size=vocab_size, context_length=context_length)


# Tiny and deliberately off the standard variants: odd widths, head widths 8-32, mlp_dim
# 1.5-4x, patches 4 / 8 / 14, 28-56 px, depth 1-3, text width != image width. mlp_dim is an
# exact binary multiple of width (timm / open_clip take mlp_ratio and int() it).
GEOMETRIES = {
    "hf_clip": {
        "w96h3_p8_px32_quickgelu": dict(
            _tower(32, 8, 96, 2, 3, 144), **_text(64, 1, 2, 96, 64, 12),
            embed_dim=48, hidden_act="quick_gelu", ln_eps=1e-5),
        "w80h5_p4_px28_gelu": dict(
            _tower(28, 4, 80, 3, 5, 200), **_text(80, 2, 5, 320, 50, 9),
            embed_dim=32, hidden_act="gelu", ln_eps=1e-5),
        "w48h6_p14_px56_txt96_eps1e-6": dict(
            _tower(56, 14, 48, 1, 6, 120), **_text(96, 2, 6, 144, 40, 16),
            embed_dim=80, hidden_act="quick_gelu", ln_eps=1e-6),
    },
    "hf_siglip": {
        "w96h3_p8_px32_txt64": dict(
            _tower(32, 8, 96, 2, 3, 144), **_text(64, 1, 4, 128, 64, 10),
            embed_dim=96, hidden_act="gelu_pytorch_tanh", ln_eps=1e-6),
        "w80h5_p4_px28_gelu": dict(
            _tower(28, 4, 80, 1, 5, 200), **_text(80, 2, 5, 120, 50, 8),
            embed_dim=80, hidden_act="gelu", ln_eps=1e-6),
        "w48h6_p14_px42_txt96": dict(
            _tower(42, 14, 48, 3, 6, 96), **_text(96, 1, 3, 240, 70, 12),
            embed_dim=48, hidden_act="gelu_pytorch_tanh", ln_eps=1e-6),
    },
    "big_vision_siglip": {
        "w96h3_p8_px32": dict(
            _tower(32, 8, 96, 2, 3, 144), **_text(64, 2, 4, 128, 64, 10),
            embed_dim=96, stacked=False),
        "w80h5_p4_px28_stacked": dict(
            _tower(28, 4, 80, 1, 5, 200), **_text(48, 3, 3, 96, 50, 8),
            embed_dim=80, stacked=True),
        "w48h6_p14_px56_txt96": dict(
            _tower(56, 14, 48, 3, 6, 96), **_text(96, 1, 6, 240, 70, 12),
            embed_dim=48, stacked=False),
    },
    "augreg": {
        "w96h3_p8_px32": dict(
            _tower(32, 8, 96, 2, 3, 144), num_classes=10, representation_size=0,
            checkpoint_image_size=32, gelu="tanh"),
        "w80h5_p4_px28_pre_logits48": dict(
            _tower(28, 4, 80, 1, 5, 200), num_classes=7, representation_size=48,
            checkpoint_image_size=28, gelu="tanh"),
        # npz at 42 px (3x3 grid), model at 56 px (4x4): timm resamples the posemb.
        "w48h6_p14_px42_to_px56_erf": dict(
            _tower(56, 14, 48, 3, 6, 96), num_classes=5, representation_size=0,
            checkpoint_image_size=42, gelu="erf"),
    },
    "timm_vit": {
        "token_w96h3_p8_px32": dict(
            _tower(32, 8, 96, 2, 3, 144), num_classes=10, class_token=True,
            global_pool="token", fc_norm=False),
        # timm's default for 'avg' (MAE-style): norm -> Identity, LayerNorm after pooling.
        "avg_cls_fc_norm_w80h5_p4_px28": dict(
            _tower(28, 4, 80, 1, 5, 200), num_classes=7, class_token=True,
            global_pool="avg", fc_norm=True),
        "avg_no_cls_w48h6_p14_px56": dict(
            _tower(56, 14, 48, 3, 6, 96), num_classes=5, class_token=False,
            global_pool="avg", fc_norm=False),
    },
    "open_clip": {
        "w96h3_p8_px32": dict(
            _tower(32, 8, 96, 2, 3, 144), **_text(64, 1, 2, 128, 64, 12),
            embed_dim=48, quick_gelu=False, logit_bias=None),
        "w80h5_p4_px28_quickgelu": dict(
            _tower(28, 4, 80, 3, 5, 200), **_text(80, 2, 5, 200, 50, 9),
            embed_dim=32, quick_gelu=True, logit_bias=None),
        "w48h6_p14_px56_txt96_logit_bias": dict(
            _tower(56, 14, 48, 1, 6, 120), **_text(96, 2, 6, 144, 40, 16),
            embed_dim=80, quick_gelu=False, logit_bias=-5.0),
    },
}
# The first geometry scan-stacked: with the same seed it holds the same values.
GEOMETRIES["big_vision_siglip"]["w96h3_p8_px32_stacked"] = dict(
    GEOMETRIES["big_vision_siglip"]["w96h3_p8_px32"], stacked=True)
for _format, _geometries in GEOMETRIES.items():
  for _g in _geometries.values():
    _g["format"] = _format


@dataclasses.dataclass
class Reference:
  """One written checkpoint and its reference functions (see the module docstring)."""
  path: str
  format: str
  geometry: dict
  model: Any
  keys: dict
  notes: dict = dataclasses.field(default_factory=dict)
  image_embeds: Optional[Callable] = None
  text_embeds: Optional[Callable] = None
  logit_scale: Optional[float] = None
  raw_logit_scale: Optional[float] = None
  logit_bias: Optional[float] = None
  logits_per_image: Optional[Callable] = None
  image_features: Optional[Callable] = None
  text_features: Optional[Callable] = None
  logits: Optional[Callable] = None
  pre_logits: Optional[Callable] = None


def missing(format):
  """-> a skip reason naming the absent packages, or None when `format` can be built."""
  if format not in _REQUIRES:
    raise ValueError(f"unknown format {format!r}; known: {FORMATS}")
  absent = [m for m in _REQUIRES[format] if importlib.util.find_spec(m) is None]
  return f"{', '.join(absent)} not installed (bash setup_env.sh dev)" if absent else None


def random_inputs(geometry, batch, seed):
  """-> (images [batch, S, S, 3] float32 normal(0, 1), tokens int32 [batch, L] or None for
  classifier formats), tokens following the format's convention (module docstring)."""
  rng = np.random.default_rng(seed)
  s = geometry["image_size"]
  images = rng.standard_normal((batch, s, s, 3)).astype(np.float32)
  if geometry["format"] in CLASSIFIER_FORMATS:
    return images, None
  length, vocab = geometry["context_length"], geometry["vocab_size"]
  ends = rng.integers(1, length, size=batch)  # EOT / EOS position
  ends[0] = length - 1
  if geometry["format"] in SIGLIP_TOKEN_FORMATS:
    tokens = np.full((batch, length), SIGLIP_PAD, np.int32)
    for row, end in zip(tokens, ends):
      row[:end] = rng.integers(2, vocab, size=end)
      row[end] = SIGLIP_EOS
  else:
    tokens = np.zeros((batch, length), np.int32)
    for row, end in zip(tokens, ends):
      row[0] = vocab - 2
      row[1:end] = rng.integers(1, vocab - 2, size=end - 1)
      row[end] = vocab - 1
  return images, tokens


def perturb_parameters(module, seed, matrix_std=0.02, vector_std=0.2):
  """Adds normal noise to EVERY parameter of a torch module (std `vector_std` for scalars and
  vectors: LayerNorm scales, biases, class embeddings, logit scale / bias; `matrix_std` for the
  rest), so that a checkpoint mapping that drops or misplaces any tensor shows."""
  import torch
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for _, p in module.named_parameters():
      std = vector_std if p.ndim <= 1 else matrix_std
      p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
  return module


def build(format, name, tmp_path, seed=0):
  """Builds GEOMETRIES[format][name] under tmp_path/<format>-<name> -> Reference."""
  geometry = dict(GEOMETRIES[format][name])
  directory = os.path.join(str(tmp_path), f"{format}-{name}")
  os.makedirs(directory, exist_ok=True)
  return BUILDERS[format](directory, geometry, seed)


# ---------------------------------------------------------------------------------- helpers


def _torch_fn(fn):
  """numpy in (NHWC images / int tokens) -> torch (NCHW / long), no_grad, numpy float32 out."""
  import torch

  def convert(x):
    x = np.asarray(x)
    if x.dtype.kind == "f":
      return torch.from_numpy(np.ascontiguousarray(x.astype(np.float32).transpose(0, 3, 1, 2)))
    return torch.from_numpy(x.astype(np.int64))

  @functools.wraps(fn)
  def wrapped(*args):
    with torch.no_grad():
      return fn(*map(convert, args)).detach().float().numpy()
  return wrapped


def _unit(z):
  return z / z.norm(dim=-1, keepdim=True)


def _pooled(out):
  """transformers 5 get_*_features return an output object (projected pooler_output)."""
  return out if not hasattr(out, "pooler_output") else out.pooler_output


def _safetensors_shapes(path):
  from safetensors import safe_open
  with safe_open(path, "np") as f:
    return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _npz_shapes(path):
  with np.load(path) as w:
    return {k: tuple(w[k].shape) for k in w.files}


def _scalar(t):
  return float(t.detach().reshape(-1)[0])


def _two_tower_fields(scale_param, bias_param):
  raw = _scalar(scale_param)
  return dict(raw_logit_scale=raw, logit_scale=math.exp(raw),
              logit_bias=0.0 if bias_param is None else _scalar(bias_param))


def _open_clip_two_tower(path, fmt, geometry, model, keys, notes):
  """Reference for an open_clip CLIP / CustomTextCLIP: encode_*(normalize=True) and logits
  from open_clip's own loss get_logits."""
  oc = open_clip_shim.load_open_clip()
  loss = oc.loss.SigLipLoss() if model.logit_bias is not None else oc.loss.ClipLoss()

  def logits_per_image(images, tokens):
    img, txt = model.encode_image(images, True), model.encode_text(tokens, True)
    if model.logit_bias is not None:
      return loss.get_logits(img, txt, model.logit_scale.exp(), model.logit_bias)
    return loss.get_logits(img, txt, model.logit_scale.exp())[0]

  return Reference(
      path=path, format=fmt, geometry=geometry, model=model, keys=keys, notes=notes,
      image_embeds=_torch_fn(lambda x: model.encode_image(x, normalize=True)),
      text_embeds=_torch_fn(lambda t: model.encode_text(t, normalize=True)),
      logits_per_image=_torch_fn(logits_per_image),
      **_two_tower_fields(model.logit_scale, model.logit_bias))


# ------------------------------------------------------------------------ Hugging Face


def _hf_two_tower(path, fmt, geometry, model, notes, text_features):
  model.save_pretrained(path)
  keys = _safetensors_shapes(os.path.join(path, "model.safetensors"))
  return Reference(
      path=path, format=fmt, geometry=geometry, model=model, keys=keys, notes=notes,
      image_embeds=_torch_fn(lambda x: _unit(_pooled(model.get_image_features(
          pixel_values=x)))),
      text_embeds=_torch_fn(lambda t: _unit(_pooled(model.get_text_features(input_ids=t)))),
      logits_per_image=_torch_fn(lambda x, t: model(
          input_ids=t, pixel_values=x).logits_per_image),
      text_features=_torch_fn(text_features),
      **_two_tower_fields(model.logit_scale, getattr(model, "logit_bias", None)))


def _hf_tower_configs(g):
  vision = dict(hidden_size=g["width"], intermediate_size=g["mlp_dim"],
                num_hidden_layers=g["depth"], num_attention_heads=g["heads"],
                image_size=g["image_size"], patch_size=g["patch_size"],
                hidden_act=g["hidden_act"], layer_norm_eps=g["ln_eps"])
  text = dict(vocab_size=g["vocab_size"], hidden_size=g["text_width"],
              intermediate_size=g["text_mlp_dim"], num_hidden_layers=g["text_depth"],
              num_attention_heads=g["text_heads"], max_position_embeddings=g["context_length"],
              hidden_act=g["hidden_act"], layer_norm_eps=g["ln_eps"])
  return vision, text


def build_hf_clip(path, geometry, seed=0):
  """transformers.CLIPModel, random + perturbed, save_pretrained(path) (safetensors).

  Text pooling: HF CLIP pools at the FIRST position holding eos_token_id (it would use argmax
  only for the legacy eos_token_id == 2); the config sets eos_token_id = vocab_size - 1 (and
  bos = vocab_size - 2, pad = 0), matching random_inputs' rows. Causal text attention, no
  attention mask (padding after EOT cannot reach it). Image: CLS token after post_layernorm;
  pre_layrnorm before the blocks; no projection biases."""
  import torch
  import transformers
  g = geometry
  vision, text = _hf_tower_configs(g)
  text.update(eos_token_id=g["vocab_size"] - 1, bos_token_id=g["vocab_size"] - 2,
              pad_token_id=0)
  config = transformers.CLIPConfig(text_config=text, vision_config=vision,
                                   projection_dim=g["embed_dim"])
  torch.manual_seed(seed)
  model = perturb_parameters(transformers.CLIPModel(config).eval(), seed)
  notes = dict(activation=g["hidden_act"], ln_eps=g["ln_eps"], image_pool="cls",
               text_pool=f"first eos_token_id={g['vocab_size'] - 1}", causal_text=True)
  ref = _hf_two_tower(path, "hf_clip", geometry, model, notes,
                      lambda t: model.text_model(input_ids=t).pooler_output)
  ref.image_features = _torch_fn(lambda x: model.vision_model(pixel_values=x).pooler_output)
  return ref


def build_hf_siglip(path, geometry, seed=0):
  """transformers.SiglipModel, random + perturbed (vision MAP head, text head with bias,
  logit_scale / logit_bias of shape [1]), save_pretrained(path).

  Image: post_layernorm then the MAP head (torch.nn.MultiheadAttention with packed in_proj,
  LayerNorm, MLP of intermediate_size); its output IS the embedding (no projection), so
  image_features is None. Text: bidirectional (no mask), final_layer_norm, pooled at the LAST
  position (padding included), then `head` (text_width -> width, with bias); text_features is
  the pooled vector before the head. pad_token_id = eos_token_id = 1 (unused by forward)."""
  import torch
  import transformers
  g = geometry
  vision, text = _hf_tower_configs(g)
  text.update(projection_size=g["width"], pad_token_id=SIGLIP_PAD, eos_token_id=SIGLIP_EOS,
              bos_token_id=None)
  config = transformers.SiglipConfig(text_config=text, vision_config=vision)
  torch.manual_seed(seed)
  model = transformers.SiglipModel(config).eval()
  with torch.no_grad():  # published-like values; perturbed below
    model.logit_scale.fill_(math.log(10.0))
    model.logit_bias.fill_(-10.0)
  perturb_parameters(model, seed)
  notes = dict(activation=g["hidden_act"], ln_eps=g["ln_eps"], image_pool="map",
               text_pool="last", causal_text=False)
  return _hf_two_tower(path, "hf_siglip", geometry, model, notes,
                       lambda t: model.text_model(input_ids=t).last_hidden_state[:, -1])


# ------------------------------------------------------------------------- npz formats


def _normal(rng, shape, std):
  return (rng.standard_normal(shape) * std).astype(np.float32)


def _ln_arrays(rng, prefix, width):
  return {f"{prefix}scale": 1.0 + _normal(rng, (width,), 0.2),
          f"{prefix}bias": _normal(rng, (width,), 0.2)}


def _dense_arrays(rng, prefix, fan_in, fan_out):
  return {f"{prefix}kernel": _normal(rng, (fan_in, fan_out), fan_in ** -0.5),
          f"{prefix}bias": _normal(rng, (fan_out,), 0.2)}


def _mha_arrays(rng, prefix, width, heads):
  """flax MultiHeadDotProductAttention: {query,key,value}/kernel [D, H, Dh], bias [H, Dh];
  out/kernel [H, Dh, D], out/bias [D]."""
  dh = width // heads
  out = {}
  for n in ("query", "key", "value"):
    out[f"{prefix}{n}/kernel"] = _normal(rng, (width, heads, dh), width ** -0.5)
    out[f"{prefix}{n}/bias"] = _normal(rng, (heads, dh), 0.2)
  out[f"{prefix}out/kernel"] = _normal(rng, (heads, dh, width), width ** -0.5)
  out[f"{prefix}out/bias"] = _normal(rng, (width,), 0.2)
  return out


def _mlp_arrays(rng, prefix, width, mlp_dim):
  return dict(_dense_arrays(rng, f"{prefix}Dense_0/", width, mlp_dim),
              **_dense_arrays(rng, f"{prefix}Dense_1/", mlp_dim, width))


# Sub-module names inside one encoder block: (LayerNorm before attention, attention,
# LayerNorm before the MLP, MLP). big_vision (Linen) numbers them per type; the original
# vision_transformer checkpoints come from pre-Linen flax, which numbered a block's
# sub-modules in creation order across types (load time: checkpoints.convert_pre_linen).
BIG_VISION_BLOCK = ("LayerNorm_0", "MultiHeadDotProductAttention_0", "LayerNorm_1",
                    "MlpBlock_0")
AUGREG_BLOCK = ("LayerNorm_0", "MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3")


def _encoder_arrays(rng, prefix, g, names, stacked=False, text=False):
  """`{prefix}encoderblock_{i}/...` (or scan-stacked `{prefix}encoderblock/...` with a leading
  depth axis holding the same per-block values) and `{prefix}encoder_norm/`."""
  t = "text_" if text else ""
  width, heads, mlp_dim = g[f"{t}width"], g[f"{t}heads"], g[f"{t}mlp_dim"]
  ln0, mha, ln1, mlp = names
  blocks = []
  for _ in range(g[f"{t}depth"]):
    block = _ln_arrays(rng, f"{ln0}/", width)
    block.update(_mha_arrays(rng, f"{mha}/", width, heads))
    block.update(_ln_arrays(rng, f"{ln1}/", width))
    block.update(_mlp_arrays(rng, f"{mlp}/", width, mlp_dim))
    blocks.append(block)
  if stacked:
    out = {f"{prefix}encoderblock/{k}": np.stack([b[k] for b in blocks]) for k in blocks[0]}
  else:
    out = {f"{prefix}encoderblock_{i}/{k}": v for i, b in enumerate(blocks)
           for k, v in b.items()}
  out.update(_ln_arrays(rng, f"{prefix}encoder_norm/", width))
  return out


def _patch_embedding_arrays(rng, prefix, g):
  p, width = g["patch_size"], g["width"]
  return {f"{prefix}embedding/kernel": _normal(rng, (p, p, 3, width), (p * p * 3) ** -0.5),
          f"{prefix}embedding/bias": _normal(rng, (width,), 0.2)}


def big_vision_siglip_arrays(geometry, seed=0):
  """{key: array} of a big_vision SigLIP checkpoint with random values (module docstring of
  the format; `stacked` picks the scan layout, the values do not depend on it)."""
  g, rng = geometry, np.random.default_rng(seed)
  width, grid = g["width"], g["image_size"] // g["patch_size"]
  w = _patch_embedding_arrays(rng, "params/img/", g)
  w["params/img/pos_embedding"] = _normal(rng, (1, grid * grid, width), 0.2)
  w.update(_encoder_arrays(rng, "params/img/Transformer/", g, BIG_VISION_BLOCK, g["stacked"]))
  w["params/img/MAPHead_0/probe"] = _normal(rng, (1, 1, width), 0.5)
  w.update(_mha_arrays(rng, "params/img/MAPHead_0/MultiHeadDotProductAttention_0/", width,
                       g["heads"]))
  w.update(_ln_arrays(rng, "params/img/MAPHead_0/LayerNorm_0/", width))
  w.update(_mlp_arrays(rng, "params/img/MAPHead_0/MlpBlock_0/", width, g["mlp_dim"]))
  tw = g["text_width"]
  w["params/txt/Embed_0/embedding"] = _normal(rng, (g["vocab_size"], tw), 0.5)
  w["params/txt/pos_embedding"] = _normal(rng, (1, g["context_length"], tw), 0.2)
  w.update(_encoder_arrays(rng, "params/txt/Encoder_0/", g, BIG_VISION_BLOCK, g["stacked"],
                           text=True))
  w.update(_dense_arrays(rng, "params/txt/head/", tw, width))
  w["params/t"] = np.array([math.log(10.0)], np.float32) + _normal(rng, (1,), 0.2)
  w["params/b"] = np.array([-10.0], np.float32) + _normal(rng, (1,), 0.5)
  return w


@contextlib.contextmanager
def _timm_create_model_overrides(**overrides):
  """open_clip's TimmModel calls timm.create_model(name, num_classes=, global_pool=, ...) with
  no geometry: pass ours as entrypoint overrides (only inside open_clip.timm_model)."""
  module = importlib.import_module("open_clip.timm_model")
  timm = module.timm
  module.timm = types.SimpleNamespace(
      create_model=lambda *a, **kw: timm.create_model(*a, **dict(kw, **overrides)))
  try:
    yield
  finally:
    module.timm = timm


def build_big_vision_siglip(path, geometry, seed=0):
  """big_vision SigLIP .npz with random values -> open_clip CustomTextCLIP loaded by
  open_clip.convert.load_big_vision_weights (third party), which reads both layouts: it
  checks for `.../encoderblock/LayerNorm_0/scale` and then indexes the depth axis.

  The open_clip model follows open_clip's ViT-B-16-SigLIP config (image: timm
  `vit_base_patch16_siglip_224` trunk, class_token=False, global_pool='map', timm_proj
  'none'; text: no_causal_mask, pool_type 'last', proj_bias, LayerNorm eps 1e-6) at our
  geometry, but with big_vision's tanh-approximated GELU in both towers (timm
  act_layer='gelu_tanh', open_clip text act_kwargs approximate='tanh'; open_clip's own SigLIP
  configs use erf GELU, which moves these unit-norm embeddings by ~5e-5). The image position
  embedding must match the grid (the loader asserts; it never resamples)."""
  oc = open_clip_shim.load_open_clip()
  import torch
  g = geometry
  arrays = big_vision_siglip_arrays(g, seed)
  path = os.path.join(path, "siglip.npz")
  np.savez(path, **arrays)
  vision_cfg = dict(image_size=g["image_size"], timm_model_name="vit_base_patch16_siglip_224",
                    timm_model_pretrained=False, timm_pool="map", timm_proj="none")
  text_cfg = dict(context_length=g["context_length"], vocab_size=g["vocab_size"],
                  width=g["text_width"], heads=g["text_heads"], layers=g["text_depth"],
                  mlp_ratio=g["text_mlp_dim"] / g["text_width"], no_causal_mask=True,
                  proj_bias=True, pool_type="last", norm_kwargs=dict(eps=1e-6),
                  act_kwargs=dict(approximate="tanh"))
  torch.manual_seed(seed)
  with _timm_create_model_overrides(
      img_size=g["image_size"], patch_size=g["patch_size"], embed_dim=g["width"],
      depth=g["depth"], num_heads=g["heads"], mlp_ratio=g["mlp_dim"] / g["width"],
      act_layer="gelu_tanh"):
    model = oc.model.CustomTextCLIP(g["width"], vision_cfg, text_cfg, init_logit_bias=-10.0)
  oc.convert.load_big_vision_weights(model, path)
  model.eval()
  notes = dict(activation="gelu_tanh", ln_eps=1e-6, image_pool="map", text_pool="last",
               causal_text=False, loader="open_clip.convert.load_big_vision_weights")
  return _open_clip_two_tower(path, "big_vision_siglip", g, model, _npz_shapes(path), notes)


def augreg_arrays(geometry, seed=0):
  """{key: array} of a google-research/vision_transformer ViT classifier checkpoint (flat
  keys, no prefix) with random values, the posemb at checkpoint_image_size."""
  g, rng = geometry, np.random.default_rng(seed)
  width, grid = g["width"], g["checkpoint_image_size"] // g["patch_size"]
  w = _patch_embedding_arrays(rng, "", g)
  w["cls"] = _normal(rng, (1, 1, width), 0.5)
  w["Transformer/posembed_input/pos_embedding"] = _normal(rng, (1, 1 + grid * grid, width),
                                                          0.2)
  w.update(_encoder_arrays(rng, "Transformer/", g, AUGREG_BLOCK))
  features = width
  if g["representation_size"]:
    w.update(_dense_arrays(rng, "pre_logits/", width, g["representation_size"]))
    features = g["representation_size"]
  w.update(_dense_arrays(rng, "head/", features, g["num_classes"]))
  return w


def _timm_pre_logits(vit):
  return lambda x: vit.forward_head(vit.forward_features(x), pre_logits=True)


def _timm_vit(g, **kwargs):
  timm = open_clip_shim.load_timm()
  return timm.models.vision_transformer.VisionTransformer(
      img_size=g["image_size"], patch_size=g["patch_size"], embed_dim=g["width"],
      depth=g["depth"], num_heads=g["heads"], mlp_ratio=g["mlp_dim"] / g["width"],
      qkv_bias=True, **kwargs)


def build_augreg(path, geometry, seed=0):
  """AugReg / vision_transformer .npz with random values -> timm VisionTransformer
  (class_token, global_pool='token', qkv bias, LayerNorm eps 1e-6) loaded by
  timm.models.vision_transformer._load_weights (third party).

  GELU: geometry `gelu` 'tanh' is the source model's (flax nn.gelu defaults to the tanh
  approximation); 'erf' is what timm's vit_*_augreg models use on these weights.
  Position embedding: when checkpoint_image_size != image_size, _load_weights resamples the
  grid with resample_abs_pos_embed: F.interpolate(mode='bilinear', align_corners=False,
  antialias=False) on the [1, D, g, g] grid, the class token's row kept apart (the original
  code's load_pretrained uses scipy.ndimage.zoom(order=1) instead, which aligns corners);
  notes['pos_embed'] is the resampled [1, 1 + N, D] table timm ended with.
  pre_logits: timm dropped the representation layer and _load_weights ignores `pre_logits/*`,
  so with representation_size the reference is timm's CLS features -> torch Linear
  (pre_logits, loaded from the npz) -> tanh -> Linear (head); pre_logits() returns the tanh
  output (the head's input, [B, representation_size])."""
  import torch
  timm = open_clip_shim.load_timm()
  g = geometry
  arrays = augreg_arrays(g, seed)
  path = os.path.join(path, "augreg.npz")
  np.savez(path, **arrays)
  repr_size = g["representation_size"]
  vit = _timm_vit(g, class_token=True, global_pool="token",
                  num_classes=0 if repr_size else g["num_classes"],
                  act_layer="gelu_tanh" if g["gelu"] == "tanh" else "gelu")
  timm.models.vision_transformer._load_weights(vit, path)
  model, pre_logits, logits = vit.eval(), _timm_pre_logits(vit), vit
  if repr_size:
    layers = {}
    for name in ("pre_logits", "head"):
      kernel = torch.from_numpy(arrays[f"{name}/kernel"])
      layers[name] = torch.nn.Linear(*kernel.shape)
      with torch.no_grad():
        layers[name].weight.copy_(kernel.T)
        layers[name].bias.copy_(torch.from_numpy(arrays[f"{name}/bias"]))
    model = torch.nn.ModuleDict(dict(vit=vit, **layers)).eval()
    cls_features = pre_logits
    pre_logits = lambda x: torch.tanh(layers["pre_logits"](cls_features(x)))  # noqa: E731
    logits = lambda x: layers["head"](pre_logits(x))  # noqa: E731
  notes = dict(activation="gelu_tanh" if g["gelu"] == "tanh" else "gelu", ln_eps=1e-6,
               image_pool="cls", loader="timm.models.vision_transformer._load_weights",
               pos_embed=vit.pos_embed.detach().numpy().copy())
  if g["checkpoint_image_size"] != g["image_size"]:
    notes["posemb_resample"] = ("F.interpolate(mode='bilinear', align_corners=False, "
                                "antialias=False), class token row kept")
  return Reference(path=path, format="augreg", geometry=g, model=model,
                   keys=_npz_shapes(path), notes=notes, logits=_torch_fn(logits),
                   pre_logits=_torch_fn(pre_logits))


# --------------------------------------------------------------------- torch state dicts


def build_timm_vit(path, geometry, seed=0):
  """timm VisionTransformer (random + perturbed), state dict -> model.safetensors.

  global_pool 'token': CLS after `norm`; 'avg': mean over the patch tokens only (prefix
  tokens excluded), with fc_norm=True the LayerNorm moves after the pooling (`norm` is
  Identity and absent from the file, `fc_norm.*` present). GELU erf, LayerNorm eps 1e-6.
  pre_logits = forward_head(forward_features(x), pre_logits=True)."""
  import torch
  from safetensors.torch import save_file
  g = geometry
  torch.manual_seed(seed)
  model = _timm_vit(g, class_token=g["class_token"], global_pool=g["global_pool"],
                    fc_norm=g["fc_norm"], num_classes=g["num_classes"])
  perturb_parameters(model.eval(), seed)
  path = os.path.join(path, "model.safetensors")
  save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
  notes = dict(activation="gelu", ln_eps=1e-6, image_pool=g["global_pool"])
  return Reference(
      path=path, format="timm_vit", geometry=g, model=model, keys=_safetensors_shapes(path),
      notes=notes, logits=_torch_fn(model), pre_logits=_torch_fn(_timm_pre_logits(model)))


def build_open_clip(path, geometry, seed=0):
  """open_clip.model.CLIP (random + perturbed), torch.save(state_dict) -> open_clip.pt.

  open_clip's own ViT (conv1 without bias, class_embedding, ln_pre, ln_post on the CLS token,
  `proj` matrix) and text tower (causal mask, argmax pooling = EOT as the largest id,
  text_projection matrix); LayerNorm eps 1e-5; GELU erf or QuickGELU (quick_gelu)."""
  oc = open_clip_shim.load_open_clip()
  import torch
  g = geometry
  vision_cfg = dict(layers=g["depth"], width=g["width"], head_width=g["width"] // g["heads"],
                    mlp_ratio=g["mlp_dim"] / g["width"], patch_size=g["patch_size"],
                    image_size=g["image_size"])
  text_cfg = dict(context_length=g["context_length"], vocab_size=g["vocab_size"],
                  width=g["text_width"], heads=g["text_heads"], layers=g["text_depth"],
                  mlp_ratio=g["text_mlp_dim"] / g["text_width"])
  torch.manual_seed(seed)
  model = oc.model.CLIP(g["embed_dim"], vision_cfg, text_cfg, quick_gelu=g["quick_gelu"],
                        init_logit_bias=g["logit_bias"]).eval()
  perturb_parameters(model, seed)
  path = os.path.join(path, "open_clip.pt")
  torch.save(model.state_dict(), path)
  keys = {k: tuple(v.shape) for k, v in torch.load(path, weights_only=True).items()}
  notes = dict(activation="quick_gelu" if g["quick_gelu"] else "gelu", ln_eps=1e-5,
               image_pool="cls", text_pool="argmax", causal_text=True)
  return _open_clip_two_tower(path, "open_clip", g, model, keys, notes)


BUILDERS = {"hf_clip": build_hf_clip, "hf_siglip": build_hf_siglip,
            "big_vision_siglip": build_big_vision_siglip, "augreg": build_augreg,
            "timm_vit": build_timm_vit, "open_clip": build_open_clip}

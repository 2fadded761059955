r"""Import an OpenAI CLIP / open_clip PyTorch checkpoint as a TwoTowers export.

  python -m jax_transfer.tools.import_clip --checkpoint FILE --out DIR --activation gelu \
      [--vision_heads H] [--text_heads H]

then `model, params, config = jax_transfer.load_pretrained(DIR)`. FILE is a `.safetensors`
state dict, or a torch file read with `torch.load(..., weights_only=True)` (no pickled code
runs): a bare state dict or {'state_dict': ...}; a DDP 'module.' prefix is stripped. Supported:
open_clip's `CLIP` (and `CustomTextCLIP` with the standard text tower) with a ViT image tower
and the causal argmax-pooled text transformer. The weight mapping is documented in
jax_transfer/models/two_towers.py; the model is built with its open_clip parity options
(pre_norm, patch_bias=False, ln_eps=1e-5, exact GELU, image_pool='cls').

What the weights say, and what they do not:
  inferred from shapes, as OpenAI's `build_model`: image width (conv1), patch size, grid ->
    image size, depth (resblock count), MLP width, ln_pre present or not; embed dim
    (text_projection), context length (positional_embedding), vocabulary (token_embedding),
    text width / depth / MLP width.
  not in the weights:
    heads         width // 64 (OpenAI's build_model, open_clip's head_width=64); other head
                  widths need --vision_heads / --text_heads.
    activation    --activation is required on the command line: 'gelu' (open_clip's default
                  models) or 'quick_gelu' (x * sigmoid(1.702 x): OpenAI's weights and
                  open_clip's '-quickgelu' models; built with quick_gelu=True). A state dict
                  carrying OpenAI's scalar entries (input_resolution, context_length,
                  vocab_size) must be 'quick_gelu'; those entries are checked, then dropped.
    image pool    open_clip's default 'tok' (class token) is assumed; 'avg' is not
                  representable. open_clip's final_ln_after_pool does not matter: LayerNorm
                  is per token, so normalise-then-pool equals pool-then-normalise.
Our image tower is a named ViT variant (models/vit.py VARIANTS), so the inferred (width,
depth, mlp_dim, heads) must be one of them: 'b' is ViT-B/*, 'l' is ViT-L/14.
Any other mismatch (missing or unexpected keys, wrong shapes, ResNet / timm / HF towers,
LayerScale, custom attention blocks) is one `CheckpointError` naming every offending key.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
from typing import Callable

import ml_collections
import numpy as np

ACTIVATIONS = ("gelu", "quick_gelu")
# Non-persistent buffers that some versions put into state dicts: not parameters.
IGNORED_KEYS = frozenset({"attn_mask", "visual.attn_mask"})
# Only OpenAI's own (TorchScript-derived) state dicts carry these scalars; OpenAI's CLIP is
# QuickGELU. They are dropped before the mapping (the shapes say the same).
OPENAI_KEYS = ("input_resolution", "context_length", "vocab_size")
# (key pattern, what it is): architectures and features our TwoTowers cannot represent.
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


class CheckpointError(ValueError):
  """The checkpoint cannot be represented by TwoTowers; the message names every reason."""


# ------------------------------------------------------------------------------- Reading.

def _to_numpy(t) -> np.ndarray:
  """torch.Tensor -> numpy; floating tensors (bf16/f16 included) become float32."""
  return (t.detach().float() if t.is_floating_point() else t.detach()).cpu().numpy()


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """FILE -> {torch key: array}. Never unpickles code: safetensors, or torch.load with
  weights_only=True (tensors and plain containers only)."""
  if path.endswith(".safetensors"):
    try:
      from safetensors.numpy import load_file
      raw = load_file(path)
    except (TypeError, ValueError):  # bf16 has no numpy dtype: go through torch
      from safetensors.torch import load_file
      raw = {k: _to_numpy(v) for k, v in load_file(path).items()}
  else:
    try:
      import torch
    except ImportError:
      raise ImportError("reading a torch checkpoint needs torch: pip install -e '.[torch]' "
                        "(or convert the state dict to .safetensors)") from None
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
      obj = obj["state_dict"]
    if not isinstance(obj, dict):
      raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    bad = sorted(k for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if bad:
      raise CheckpointError(f"{path}: entries that are not tensors (not a state dict?): {bad}")
    raw = {k: _to_numpy(v) for k, v in obj.items()}
  return {k[len("module."):] if k.startswith("module.") else k: np.asarray(v)
          for k, v in raw.items()}


# ---------------------------------------------------------------------------- Conversion.

def _refuse_unsupported(sd, activation):
  if activation not in ACTIVATIONS:
    raise ValueError(f"activation={activation!r}; allowed: {ACTIVATIONS}")
  openai = [k for k in OPENAI_KEYS if k in sd]
  if openai and activation != "quick_gelu":
    raise CheckpointError(
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
    raise CheckpointError("not representable by TwoTowers (ViT image tower + causal text "
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


def _depth(sd, prefix) -> int:
  """Resblock count: 1 + the largest index present (a gap shows up as missing keys)."""
  idx = [int(m.group(1)) for k in sd for m in [re.match(re.escape(prefix) + r"(\d+)\.", k)]
         if m]
  return max(idx) + 1 if idx else 0


def _mlp_dim(sd, prefix, depth):
  for i in range(depth):
    w = sd.get(f"{prefix}{i}.mlp.c_fc.weight")
    if w is not None:
      return w.shape[0]
  return None


def _infer(sd, vision_heads, text_heads) -> dict:
  """Architecture from tensor shapes. Raises CheckpointError naming every key it needed."""
  from jax_transfer.models.vit import VARIANTS
  anchors = ("visual.conv1.weight", "visual.positional_embedding", "token_embedding.weight",
             "positional_embedding", "text_projection")
  missing = [k for k in anchors if k not in sd]
  vdepth, tdepth = _depth(sd, "visual.transformer.resblocks."), _depth(sd, "transformer.resblocks.")
  vmlp = _mlp_dim(sd, "visual.transformer.resblocks.", vdepth)
  tmlp = _mlp_dim(sd, "transformer.resblocks.", tdepth)
  if vmlp is None:
    missing.append("visual.transformer.resblocks.0.mlp.c_fc.weight")
  if tmlp is None:
    missing.append("transformer.resblocks.0.mlp.c_fc.weight")
  if missing:
    raise CheckpointError(f"not a CLIP ViT state dict: missing keys {sorted(missing)} "
                          f"(needed to infer the architecture)")
  conv = sd["visual.conv1.weight"]  # [D, C, p, p]
  if conv.ndim != 4 or conv.shape[2] != conv.shape[3]:
    raise CheckpointError(f"visual.conv1.weight has shape {conv.shape}; expected a square "
                          f"patch embedding [width, channels, p, p]")
  width, channels, patch = conv.shape[0], conv.shape[1], conv.shape[2]
  n = sd["visual.positional_embedding"].shape[0] - 1
  grid = math.isqrt(max(n, 0))
  if grid * grid != n:
    raise CheckpointError(f"visual.positional_embedding has {n + 1} rows: {n} patches are not "
                          f"a square grid (plus the class token)")
  vocab, text_width = sd["token_embedding.weight"].shape
  arch = dict(width=width, channels=channels, patch=patch, image_size=grid * patch,
              depth=vdepth, mlp_dim=vmlp, heads=vision_heads or width // 64,
              text_width=text_width, text_depth=tdepth, text_mlp_dim=tmlp,
              text_heads=text_heads or text_width // 64, vocab=vocab,
              context_length=sd["positional_embedding"].shape[0],
              embed_dim=sd["text_projection"].shape[-1],
              pre_norm="visual.ln_pre.weight" in sd or "visual.ln_pre.bias" in sd)
  for tower, w, h, flag in (("image", width, arch["heads"], "--vision_heads"),
                            ("text", text_width, arch["text_heads"], "--text_heads")):
    if h <= 0 or w % h:
      raise CheckpointError(f"{tower} width {w} is not divisible into {h} heads of 64 "
                            f"(OpenAI's convention); pass the true head count with {flag}")
  want = (width, vdepth, vmlp, arch["heads"])
  names = [name for name, v in VARIANTS.items() if v == want]
  if not names:
    raise CheckpointError(
        f"image tower (width, depth, mlp_dim, heads) = {want} is no ViT variant of "
        f"models/vit.py (TwoTowers builds its image tower from a named variant): "
        f"{VARIANTS}; pass --vision_heads if the head count "
        f"is not width // 64")
  arch["variant"] = names[0]
  return arch


def _mapping(arch) -> dict[str, tuple[tuple, str, Callable]]:
  """{torch key: (torch shape, our '/'-path, torch array -> our array)} for every parameter
  (the table in models/two_towers.py's docstring)."""
  m = {}
  same = lambda w: w  # noqa: E731

  def add(src, shape, dst, fn=same):
    m[src] = (tuple(shape), dst, fn)

  def ln(src, dst, d):
    add(f"{src}.weight", (d,), f"{dst}/scale")
    add(f"{src}.bias", (d,), f"{dst}/bias")

  def block(src, dst, d, heads, mlp):
    k = d // heads
    ln(f"{src}.ln_1", f"{dst}/ln_1", d)
    ln(f"{src}.ln_2", f"{dst}/ln_2", d)
    add(f"{src}.attn.in_proj_weight", (3 * d, d), f"{dst}/attn/qkv/kernel",
        lambda w: w.T.reshape(d, 3, heads, k))  # rows [q; k; v], each head-major
    add(f"{src}.attn.in_proj_bias", (3 * d,), f"{dst}/attn/qkv/bias",
        lambda b: b.reshape(3, heads, k))
    add(f"{src}.attn.out_proj.weight", (d, d), f"{dst}/attn/out/kernel",
        lambda w: w.T.reshape(heads, k, d))
    add(f"{src}.attn.out_proj.bias", (d,), f"{dst}/attn/out/bias")
    add(f"{src}.mlp.c_fc.weight", (mlp, d), f"{dst}/mlp/fc1/kernel", lambda w: w.T)
    add(f"{src}.mlp.c_fc.bias", (mlp,), f"{dst}/mlp/fc1/bias")
    add(f"{src}.mlp.c_proj.weight", (d, mlp), f"{dst}/mlp/fc2/kernel", lambda w: w.T)
    add(f"{src}.mlp.c_proj.bias", (d,), f"{dst}/mlp/fc2/bias")

  d, p, c, e = arch["width"], arch["patch"], arch["channels"], arch["embed_dim"]
  n = (arch["image_size"] // p) ** 2 + 1
  add("visual.conv1.weight", (d, c, p, p), "img/embedding/kernel",
      lambda w: w.transpose(2, 3, 1, 0))  # [D, C, p, p] -> [p, p, C, D]
  add("visual.class_embedding", (d,), "img/cls", lambda w: w.reshape(1, 1, d))
  add("visual.positional_embedding", (n, d), "img/pos_embedding", lambda w: w[None])
  if arch["pre_norm"]:
    ln("visual.ln_pre", "img/ln_pre", d)
  for i in range(arch["depth"]):
    block(f"visual.transformer.resblocks.{i}", f"img/encoderblock_{i}", d, arch["heads"],
          arch["mlp_dim"])
  ln("visual.ln_post", "img/encoder_norm", d)
  add("visual.proj", (d, e), "img_proj/kernel")

  dt = arch["text_width"]
  add("token_embedding.weight", (arch["vocab"], dt), "txt/token_embedding/embedding")
  add("positional_embedding", (arch["context_length"], dt), "txt/positional_embedding")
  for i in range(arch["text_depth"]):
    block(f"transformer.resblocks.{i}", f"txt/encoderblock_{i}", dt, arch["text_heads"],
          arch["text_mlp_dim"])
  ln("ln_final", "txt/ln_final", dt)
  add("text_projection", (dt, e), "txt_proj/kernel")
  return m


def _model_kwargs(arch, activation: str) -> dict:
  """Config-ready TwoTowers fields (dtype as a name, as config.model holds it)."""
  return dict(
      image_variant=f"{arch['variant']}/{arch['patch']}", image_pool="cls",
      text_width=arch["text_width"], text_depth=arch["text_depth"],
      text_heads=arch["text_heads"], text_mlp_dim=arch["text_mlp_dim"],
      vocab_size=arch["vocab"], context_length=arch["context_length"],
      embed_dim=arch["embed_dim"], dtype="float32", remat=False,
      # open_clip parity (models/two_towers.py).
      pre_norm=arch["pre_norm"], patch_bias=False, ln_eps=1e-5, gelu_approximate=False,
      quick_gelu=activation == "quick_gelu")


def convert_state_dict(state_dict: dict[str, np.ndarray], *, vision_heads: int | None = None,
                       text_heads: int | None = None, activation: str = "gelu"):
  """open_clip / OpenAI CLIP state dict {key: array} -> (model_kwargs, params).

  model_kwargs: TwoTowers fields as config.model holds them (dtype 'float32'; build with
  `models.get_model('two_towers', **config.model_kwargs(ConfigDict(model_kwargs)))`).
  params: nested dict of float32 arrays, the tree `model.init(...)['params']` has.
  activation: what the checkpoint was trained with, 'gelu' (open_clip's default models) or
  'quick_gelu' (OpenAI's weights). Raises CheckpointError naming every problem.
  """
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from flax import traverse_util
  from jax_transfer import config as config_lib, models

  sd = {k: np.asarray(v) for k, v in state_dict.items()}
  _refuse_unsupported(sd, activation)
  sd = _normalise_layout(sd)
  arch = _infer(sd, vision_heads, text_heads)
  mapping = _mapping(arch)
  optional = ("logit_scale", "logit_bias")  # logit_bias: SigLIP-style models only
  missing = sorted(set(mapping) - set(sd) | ({"logit_scale"} - set(sd)))
  unexpected = sorted(set(sd) - set(mapping) - set(optional))
  wrong = sorted(f"{k}: {sd[k].shape}, expected {shape}" for k, (shape, _, _) in
                 mapping.items() if k in sd and sd[k].shape != shape)
  wrong += [f"{k}: {sd[k].shape}, expected a scalar" for k in optional
            if k in sd and sd[k].size != 1]
  if missing or unexpected or wrong:
    summary = (f"image ViT-{arch['variant']}/{arch['patch']} at {arch['image_size']}px, text "
               f"width {arch['text_width']} x {arch['text_depth']} layers")
    parts = [f"{name} {keys}" for name, keys in (("missing keys", missing), ("unexpected keys",
             unexpected), ("wrong shapes", wrong)) if keys]
    raise CheckpointError(f"checkpoint does not match the architecture inferred from it "
                          f"({summary}): " + "; ".join(parts))

  flat = {dst: np.ascontiguousarray(fn(sd[src]), np.float32)
          for src, (_, dst, fn) in mapping.items()}
  flat["logit_scale"] = sd["logit_scale"].reshape(()).astype(np.float32)
  flat["logit_bias"] = np.asarray(sd["logit_bias"] if "logit_bias" in sd else 0.0,
                                  np.float32).reshape(())
  params = traverse_util.unflatten_dict(flat, sep="/")

  # Self-check against the model's own tree: a mapping bug fails here, not at load time.
  kwargs = _model_kwargs(arch, activation)
  model = models.get_model("two_towers", **config_lib.model_kwargs(
      ml_collections.ConfigDict(kwargs)))
  images = jax.ShapeDtypeStruct((1, arch["image_size"], arch["image_size"], arch["channels"]),
                                jnp.float32)
  tokens = jax.ShapeDtypeStruct((1, arch["context_length"]), jnp.int32)
  abstract = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), images, tokens)["params"])
  want = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(abstract, sep="/").items()}
  got = {k: v.shape for k, v in flat.items()}
  if want != got:
    raise AssertionError(f"import_clip mapping bug, paths/shapes differ: "
                         f"{sorted(set(want.items()) ^ set(got.items()))}")
  return kwargs, params


def image_size_of(params, model_kwargs) -> int:
  """Side of the square images the imported image tower was trained at (from its posemb)."""
  n = params["img"]["pos_embedding"].shape[1] - 1
  return math.isqrt(n) * int(model_kwargs["image_variant"].split("/")[1])


def export_config(model_kwargs: dict, image_size: int,
                  loss: str = "clip") -> ml_collections.ConfigDict:
  """A contrastive config (as ml_collections_configs/contrastive/shapes_clip.py) around the
  imported model, so `load_pretrained` rebuilds it and `init.export_dir` can fine-tune it."""
  from jax_transfer.config import base_config
  c = base_config()
  c.method = "contrastive"
  c.model_name = "two_towers"
  c.model = ml_collections.ConfigDict(model_kwargs)
  c.input.image_size = image_size
  c.optimizer.wd_exclude_regex = (r"(bias|scale|pos_embedding|positional_embedding|cls|"
                                  r"logit_scale|logit_bias|embedding/embedding)$")
  c.contrastive = ml_collections.ConfigDict(dict(
      loss=loss, chunked_loss=True,
      tokenizer_path=ml_collections.config_dict.placeholder(str),
      zero_shot={}, retrieval_limit=0, probe_train_limit=0, probe_shots=[]))
  return c


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m jax_transfer.tools.import_clip",
      description="OpenAI CLIP / open_clip PyTorch checkpoint -> jax_transfer export dir.")
  parser.add_argument("--checkpoint", required=True,
                      help=".safetensors, or a torch state dict (.pt/.bin, weights_only load)")
  parser.add_argument("--out", required=True, help="export directory to write")
  parser.add_argument("--activation", required=True, choices=ACTIVATIONS,
                      help="MLP activation the checkpoint was trained with: 'gelu' for "
                           "open_clip's default models; OpenAI weights and '-quickgelu' "
                           "models are 'quick_gelu'")
  parser.add_argument("--vision_heads", type=int, default=None,
                      help="image heads (default: width // 64)")
  parser.add_argument("--text_heads", type=int, default=None,
                      help="text heads (default: width // 64)")
  args = parser.parse_args(argv)
  try:
    sd = load_state_dict(args.checkpoint)
    kwargs, params = convert_state_dict(sd, vision_heads=args.vision_heads,
                                        text_heads=args.text_heads,
                                        activation=args.activation)
  except CheckpointError as e:
    print(f"import_clip: {e}", file=sys.stderr)
    return 2
  from jax_transfer import checkpoint
  size = image_size_of(params, kwargs)
  config = export_config(kwargs, size, loss="siglip" if "logit_bias" in sd else "clip")
  checkpoint.export(params, config, args.out)
  n = sum(int(np.prod(v.shape)) for v in checkpoint.flatten(params).values())
  print(f"wrote {os.path.abspath(args.out)}: two_towers {kwargs['image_variant']} at {size}px, "
        f"text {kwargs['text_width']}x{kwargs['text_depth']}, embed {kwargs['embed_dim']}, "
        f"{n:,} parameters")
  return 0


if __name__ == "__main__":
  sys.exit(main())

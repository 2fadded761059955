r"""Import a published checkpoint as a jax_transfer export (one command for every format).

  python -m jax_transfer.tools.import_checkpoint --checkpoint=PATH --out=DIR \
      [--format=auto|open_clip|hf|big_vision_siglip|augreg|timm_vit] [--activation=...] \
      [--vision_heads=H] [--text_heads=H] [--pool=cls|gap] [--image_size=S] \
      [--tokenizer=FILE] [--tokenizer_family=clip|hf_clip|siglip|siglip2]

then `pretrained = jax_transfer.load_pretrained(DIR)` (model, params, tokenizer, preprocess,
config), or fine-tune with `--config.init.export_dir=DIR`.

Formats (jax_transfer/convert/, one module each over the shared core):
  open_clip          OpenAI CLIP / open_clip state dict (.pt/.bin/.safetensors)
  hf                 a Hugging Face transformers CLIPModel / SiglipModel directory
  big_vision_siglip  big_vision SigLIP / SigLIP 2 .npz (per-block or scan-stacked)
  augreg             google-research vision_transformer / AugReg / big_vision ViT .npz
  timm_vit           a timm VisionTransformer state dict
--format=auto (the default) picks by what PATH is: a directory with config.json -> hf; an
.npz with a txt/ tower -> big_vision_siglip, else augreg; a state dict with visual.conv1 ->
open_clip, with patch_embed.proj -> timm_vit. --image_size resamples the position
embeddings to another resolution (bilinear, as timm's loader does).

Safety: nothing is unpickled; every missing / unexpected / wrong-shaped key is named in one
error (exit 2); the export is written to a temporary directory beside --out and renamed into
place only after the whole conversion succeeded, so --out is never half written. An existing
non-empty --out is refused unless --overwrite.
"""
from __future__ import annotations

import argparse
import os
import sys

import ml_collections
import numpy as np

from jax_transfer.convert import core

FORMATS = ("auto", "open_clip", "hf", "big_vision_siglip", "augreg", "timm_vit")
TOKENIZER_FILE = "tokenizer.json"


def detect_format(path: str) -> str:
  """The format of PATH from its kind and key names; CheckpointError when ambiguous."""
  from jax_transfer.convert import big_vision, hugging_face
  if os.path.isdir(path):
    if hugging_face.is_hf_dir(path):
      return "hf"
    raise core.CheckpointError(f"{path} is a directory without config.json (a Hugging Face "
                               f"model directory has one)")
  if not os.path.exists(path):
    raise core.CheckpointError(f"--checkpoint={path!r} does not exist")
  if path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as f:
      kind = big_vision.is_big_vision_npz(f.files)
    if kind:
      return kind
    raise core.CheckpointError(f"{path}: an .npz without embedding/kernel or txt/Embed_0: not "
                               f"a big_vision / AugReg checkpoint")
  keys = set(_keys(path))
  strip = lambda k: k[len("module."):] if k.startswith("module.") else k  # noqa: E731
  keys = {strip(k) for k in keys}
  if "visual.conv1.weight" in keys or "visual.trunk.patch_embed.proj.weight" in keys:
    return "open_clip"
  if "patch_embed.proj.weight" in keys:
    return "timm_vit"
  raise core.CheckpointError(f"{path}: cannot tell the format (no visual.conv1.weight, "
                             f"patch_embed.proj.weight); pass --format. Keys: "
                             f"{sorted(keys)[:8]}")


def _keys(path: str):
  if path.endswith(".safetensors"):
    from safetensors import safe_open
    with safe_open(path, "np") as f:
      return list(f.keys())
  return list(core.read_state_dict(path))


def _tokenizer(args, fmt: str):
  """The checkpoint's own tokenizer: --tokenizer, or the HF directory's files."""
  from jax_transfer import tokenizer as tok_lib
  if args.tokenizer:
    return tok_lib.PretrainedTokenizer.from_file(args.tokenizer, family=args.tokenizer_family)
  if fmt == "hf":
    names = ("tokenizer.json", "spiece.model", "tokenizer.model", "vocab.json")
    if any(os.path.exists(os.path.join(args.checkpoint, n)) for n in names):
      return tok_lib.PretrainedTokenizer.from_hf_dir(args.checkpoint)
  return None


def convert(args) -> tuple[str, core.Converted]:
  from jax_transfer.convert import augreg, big_vision, hugging_face, open_clip, timm_vit
  fmt = detect_format(args.checkpoint) if args.format == "auto" else args.format
  tok = None
  if fmt in ("open_clip", "hf", "big_vision_siglip"):
    tok = _tokenizer(args, fmt)
  act = args.activation
  if fmt == "open_clip":
    if act is None:
      raise core.CheckpointError("--activation is required for open_clip / OpenAI weights "
                                 "(not in the weights): 'gelu' for open_clip's default models, "
                                 "'quick_gelu' for OpenAI's and '-quickgelu' models")
    c = open_clip.convert(args.checkpoint, act, args.vision_heads, args.text_heads, tok)
  elif fmt == "hf":
    if act:
      raise core.CheckpointError("--activation is read from config.json for --format=hf")
    c = hugging_face.convert(args.checkpoint, tok)
  elif fmt == "big_vision_siglip":
    c = big_vision.convert(args.checkpoint, act or "gelu_tanh", tok)
  elif fmt == "augreg":
    c = augreg.convert(args.checkpoint, act or "gelu_tanh")
  elif fmt == "timm_vit":
    c = timm_vit.convert(args.checkpoint, args.vision_heads, args.pool, act or "gelu")
  else:
    raise ValueError(f"--format={fmt!r}; allowed: {FORMATS}")
  if args.image_size and args.image_size != c.image_size:
    c = resize_image(c, args.image_size)
  return fmt, c


def resize_image(c: core.Converted, size: int) -> core.Converted:
  """The image tower at another resolution: position embeddings resampled (bilinear)."""
  from jax_transfer.models.vit import resample_posemb
  import dataclasses
  tower = c.params.get("img", c.params)
  geo = c.model_kwargs
  patch = geo.get("image_patch_size") or geo.get("patch_size")
  if size % patch:
    raise core.CheckpointError(f"--image_size={size} is not a multiple of the patch size "
                               f"{patch}")
  prefix = int("cls" in tower)
  tower["pos_embedding"] = resample_posemb(tower["pos_embedding"], (size // patch,) * 2,
                                           prefix)
  return dataclasses.replace(c, image_size=size,
                             notes=c.notes + [f"position embeddings resampled to {size}px"])


def pp_recipes(c: core.Converted) -> tuple[str, str]:
  """(train, eval) recipes with the checkpoint's normalisation and its family's eval resize:
  'crop' as open_clip / timm (short side to the size, bicubic, central crop), 'squash' as
  big_vision's and HF's SigLIP (resize to size x size, bilinear); training: an inception crop
  (90-100 % of the area) and a flip."""
  s = c.image_size
  norm = ("value_range(-1, 1)" if c.mean == (0.5,) * 3 and c.std == (0.5,) * 3
          else f"normalize({tuple(c.mean)}, {tuple(c.std)})")
  resize = (f'resize({s}, "bilinear")' if c.eval_resize == "squash"
            else f'resize_small({s}, "bicubic")|central_crop({s})')
  return (f"decode_jpeg_and_inception_crop({s}, 90, 100)|flip_lr|{norm}",
          f"decode|{resize}|{norm}")


def export_config(c: core.Converted, fmt: str, source: str) -> ml_collections.ConfigDict:
  """A config around the imported model (contrastive or supervised), so `load_pretrained`
  rebuilds it and `init.export_dir` can fine-tune it."""
  from jax_transfer.config import base_config
  cfg = base_config()
  cfg.method = c.method
  cfg.model_name = c.model_name
  cfg.model = ml_collections.ConfigDict(c.model_kwargs)
  cfg.input.image_size = c.image_size
  cfg.input.pp, cfg.input.pp_eval = pp_recipes(c)
  cfg.optimizer.wd_exclude_regex = (r"(bias|scale|pos_embedding|positional_embedding|cls|"
                                    r"probe|logit_scale|logit_bias|embedding/embedding)$")
  if c.method == "contrastive":
    cfg.contrastive = ml_collections.ConfigDict(dict(
        loss=c.loss, chunked_loss=True,
        tokenizer_path=TOKENIZER_FILE if c.tokenizer is not None else
        ml_collections.config_dict.placeholder(str),
        zero_shot={}, retrieval_limit=0, probe_train_limit=0, probe_shots=[]))
  cfg.import_source = ml_collections.ConfigDict(dict(format=fmt, checkpoint=source))
  return cfg


def write_export(c: core.Converted, fmt: str, source: str, out: str, overwrite: bool = False):
  """Writes the export to a temporary sibling of `out`, then renames it into place."""
  from jax_transfer import checkpoint

  def write(tmp):
    checkpoint.export(c.params, export_config(c, fmt, source), tmp)
    if c.tokenizer is not None:
      c.tokenizer.save(os.path.join(tmp, TOKENIZER_FILE))
  try:
    checkpoint.write_dir_atomically(out, write, overwrite)
  except checkpoint.OutputExistsError as e:
    raise core.CheckpointError(str(e)) from None


def build_parser(prog="python -m jax_transfer.tools.import_checkpoint"):
  p = argparse.ArgumentParser(prog=prog, description="Published checkpoint -> jax_transfer "
                              "export directory (see the module docstring).")
  p.add_argument("--checkpoint", required=True, help="file or Hugging Face directory")
  p.add_argument("--out", required=True, help="export directory to write")
  p.add_argument("--format", default="auto", choices=FORMATS)
  p.add_argument("--activation", default=None,
                 help="MLP activation (not in the weights): open_clip 'gelu' | 'quick_gelu' "
                      "(required); big_vision / augreg 'gelu_tanh' (default) | 'gelu'; timm "
                      "'gelu' (default) | 'gelu_tanh' | 'quick_gelu'; hf: from config.json")
  p.add_argument("--vision_heads", type=int, default=None,
                 help="image heads when not in the weights (default: width // 64)")
  p.add_argument("--text_heads", type=int, default=None,
                 help="text heads (open_clip; default: width // 64)")
  p.add_argument("--pool", default=None, choices=("cls", "gap"),
                 help="timm_vit: the pool of a model with a class token and no fc_norm")
  p.add_argument("--image_size", type=int, default=None,
                 help="resample the position embeddings to this image size")
  p.add_argument("--tokenizer", default=None,
                 help="tokenizer file (tokenizer.json, SentencePiece .model, OpenAI "
                      "bpe_simple_vocab_16e6.txt.gz); HF directories carry their own")
  p.add_argument("--tokenizer_family", default=None,
                 help="clip | hf_clip | siglip | siglip2 (default: from the file)")
  p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
  return p


def summary(c: core.Converted, fmt: str, out: str) -> str:
  from jax_transfer import checkpoint
  n = sum(int(np.prod(v.shape)) for v in checkpoint.flatten(c.params).values())
  m = c.model_kwargs
  if c.model_name == "two_towers":
    geo = (f"image {m['image_width']}x{m['image_depth']} ({m['image_heads']} heads, patch "
           f"{m['image_patch_size']}, pool {m['image_pool']}), text {m['text_width']}x"
           f"{m['text_depth']}, embed {m['embed_dim']}")
  else:
    geo = (f"ViT {m['width']}x{m['depth']} ({m['num_heads']} heads, patch {m['patch_size']}, "
           f"pool {m['pool']}), {m['num_classes']} classes")
  tok = f", tokenizer {c.tokenizer!r}" if c.tokenizer is not None else ""
  notes = "".join(f"; {n}" for n in c.notes)
  return (f"wrote {out}: {fmt} -> {c.model_name}, {geo} at {c.image_size}px, {n:,} "
          f"parameters{tok}{notes}")


def main(argv=None, prog=None) -> int:
  args = build_parser(prog or "python -m jax_transfer.tools.import_checkpoint").parse_args(argv)
  try:
    fmt, c = convert(args)
    write_export(c, fmt, os.path.abspath(args.checkpoint), args.out, args.overwrite)
  except (core.CheckpointError, ValueError, FileNotFoundError) as e:
    print(f"import_checkpoint: {e}", file=sys.stderr)
    return 2
  print(summary(c, fmt, os.path.abspath(args.out)))
  return 0


if __name__ == "__main__":
  sys.exit(main())

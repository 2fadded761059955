"""The mapping core every checkpoint format shares: reading files safely, a key map from the
source's keys to our '/'-paths with the array transforms, one error for every mismatch, and
the self-check against the model's own parameter tree.

A format module (convert/open_clip.py, hf_clip.py, ...) infers the architecture from the
tensors, builds a `KeyMap` with the block helpers below (no block path is written literally
there) and returns a `Converted`. Layout conventions of the sources:
  torch Linear weight [out, in] -> our kernel [in, out] (`torch_linear`); torch conv
  [D, C, p, p] -> flax [p, p, C, D] (`torch_conv`); flax sources are already [in, out].
  Attention q, k, v come fused ([3D, D] torch in_proj / timm qkv), as three torch Linears
  (HF) or as three flax [D, H, K] kernels (big_vision, AugReg); all become our fused
  attn/qkv/kernel [D, 3, H, K] (q, k, v on axis 1, head-major), bias [3, H, K].
Nothing is unpickled: safetensors, `np.load(allow_pickle=False)`, torch.load(weights_only).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Optional, Sequence

import numpy as np


class CheckpointError(ValueError):
  """The checkpoint cannot be converted; the message names every offending key or reason."""


# ------------------------------------------------------------------------------- Reading.

def _to_numpy(t) -> np.ndarray:
  """torch.Tensor -> numpy; floating tensors (bf16/f16 included) become float32."""
  return (t.detach().float() if t.is_floating_point() else t.detach()).cpu().numpy()


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  try:
    from safetensors.numpy import load_file
    return dict(load_file(path))
  except (TypeError, ValueError):  # bf16 has no numpy dtype: go through torch
    from safetensors.torch import load_file
    return {k: _to_numpy(v) for k, v in load_file(path).items()}


def read_torch(path: str) -> dict[str, np.ndarray]:
  """A torch state dict file, read with weights_only=True (tensors and plain containers only:
  no pickled code runs). {'state_dict': ...} / {'model': ...} wrappers are unwrapped."""
  try:
    import torch
  except ImportError:
    raise ImportError("reading a torch checkpoint needs torch: pip install -e '.[torch]' "
                      "(or convert the state dict to .safetensors)") from None
  obj = torch.load(path, map_location="cpu", weights_only=True)
  for key in ("state_dict", "model", "module"):
    if isinstance(obj, dict) and isinstance(obj.get(key), dict):
      obj = obj[key]
  if not isinstance(obj, dict):
    raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
  bad = sorted(k for k, v in obj.items() if not isinstance(v, torch.Tensor))
  if bad:
    raise CheckpointError(f"{path}: entries that are not tensors (not a state dict?): {bad}")
  return {k: _to_numpy(v) for k, v in obj.items()}


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """FILE (.safetensors, or a torch .pt/.bin/.pth) -> {key: array}; a DDP 'module.' prefix
  is stripped."""
  raw = read_safetensors(path) if path.endswith(".safetensors") else read_torch(path)
  return {k[len("module."):] if k.startswith("module.") else k: np.asarray(v)
          for k, v in raw.items()}


def read_npz(path: str) -> dict[str, np.ndarray]:
  """A flax / big_vision .npz: {'a/b/c': array}, allow_pickle=False (an object array is a
  CheckpointError). bfloat16 stored as raw 2-byte 'V2' is widened to float32."""
  try:
    with np.load(path, allow_pickle=False) as f:
      out = {k: f[k] for k in f.files}
  except ValueError as e:
    raise CheckpointError(f"{path}: {e} (object arrays are refused: nothing is unpickled)")
  for k, v in out.items():
    if v.dtype == np.dtype("V2"):
      out[k] = (v.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
  return out


# ------------------------------------------------------------ Facts the weights do not hold.

# OpenAI CLIP's image normalisation (open_clip, HF CLIPImageProcessor); SigLIP, AugReg and
# timm's ViTs use 0.5 / 0.5 ([-1, 1]).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# MLP activation name -> the model fields that implement it.
ACTIVATIONS = {"gelu": dict(gelu_approximate=False, quick_gelu=False),  # exact erf GELU
               "gelu_tanh": dict(gelu_approximate=True, quick_gelu=False),  # flax nn.gelu
               "quick_gelu": dict(gelu_approximate=False, quick_gelu=True)}  # x sigmoid(1.702x)


def activation_kwargs(name: str, allowed: Sequence[str]) -> dict:
  """--activation `name` (one of `allowed`, a subset of ACTIVATIONS) -> model fields."""
  if name not in allowed:
    raise ValueError(f"activation={name!r}; allowed: {sorted(allowed)}")
  return dict(ACTIVATIONS[name])


# ----------------------------------------------------------------------------- Transforms.

def torch_linear(w):
  return w.T


def torch_conv(w):
  return w.transpose(2, 3, 1, 0)  # [D, C, p, p] -> [p, p, C, D]


def same(w):
  return w


# -------------------------------------------------------------------------------- KeyMap.

@dataclasses.dataclass
class Rule:
  srcs: tuple            # source keys (several for fused tensors, e.g. q, k, v)
  shapes: tuple          # their expected shapes
  dst: str               # our '/'-path
  fn: Callable           # (*source arrays) -> our array


class KeyMap:
  """{source key(s) -> (expected shape(s), our path, transform)} for every parameter."""

  def __init__(self):
    self.rules: list[Rule] = []

  def add(self, src, shape, dst: str, fn: Callable = same):
    srcs = (src,) if isinstance(src, str) else tuple(src)
    shapes = (tuple(shape),) if isinstance(src, str) else tuple(tuple(s) for s in shape)
    self.rules.append(Rule(srcs, shapes, dst, fn))

  def ln(self, scale: str, bias: str, dst: str, d: int):
    self.add(scale, (d,), f"{dst}/scale")
    self.add(bias, (d,), f"{dst}/bias")

  def linear(self, src: str, d_in: int, d_out: int, dst: str, torch: bool,
             bias: Optional[str] = "bias", kernel: str = "weight"):
    """A dense layer: torch {src}.weight [out, in] (transposed) or flax {src}/kernel."""
    sep = "." if torch else "/"
    if torch:
      self.add(f"{src}{sep}{kernel}", (d_out, d_in), f"{dst}/kernel", torch_linear)
    else:
      self.add(f"{src}{sep}kernel", (d_in, d_out), f"{dst}/kernel")
    if bias:
      self.add(f"{src}{sep}{bias}", (d_out,), f"{dst}/bias")

  @property
  def sources(self) -> set[str]:
    return {s for r in self.rules for s in r.srcs}

  def convert(self, sd: dict, *, ignore: Sequence[str] = (), what: str = "") -> dict:
    """sd {source key: array} -> {our path: float32 array}. Every missing, unexpected
    (unless matched by an `ignore` regex) and wrong-shaped key is named in ONE error."""
    sources = self.sources
    missing = sorted(sources - set(sd))
    unexpected = sorted(k for k in set(sd) - sources
                        if not any(re.fullmatch(p, k) for p in ignore))
    wrong = sorted(f"{s}: {tuple(sd[s].shape)}, expected {shape}" for r in self.rules
                   for s, shape in zip(r.srcs, r.shapes)
                   if s in sd and tuple(sd[s].shape) != shape)
    if missing or unexpected or wrong:
      parts = [f"{name} {keys}" for name, keys in (
          ("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong))
               if keys]
      raise CheckpointError(f"checkpoint does not match the architecture inferred from it"
                            f"{f' ({what})' if what else ''}: " + "; ".join(parts))
    return {r.dst: np.ascontiguousarray(r.fn(*(sd[s] for s in r.srcs)), np.float32)
            for r in self.rules}


# ------------------------------------------------------------------------- Block helpers.

@dataclasses.dataclass(frozen=True)
class BlockLayout:
  """How one source format names and stores a pre-LN transformer block. Names are relative
  to the block prefix; `sep` joins them ('.' torch, '/' flax)."""
  sep: str
  ln_1: tuple            # (scale key, bias key)
  ln_2: tuple
  attn: str              # 'torch_fused' | 'torch_separate' | 'flax_separate'
  qkv: tuple             # fused: (weight, bias); separate: (q, k, v) module names
  out: str               # attention output projection module
  fc1: str
  fc2: str

  @property
  def torch(self) -> bool:
    return self.sep == "."


def add_block(km: KeyMap, layout: BlockLayout, src: str, dst: str, d: int, heads: int,
              mlp: int):
  """One encoder block at source prefix `src` (no trailing separator) -> our `dst`."""
  j = lambda *parts: layout.sep.join((src,) + parts)  # noqa: E731

  km.ln(j(layout.ln_1[0]), j(layout.ln_1[1]), f"{dst}/ln_1", d)
  km.ln(j(layout.ln_2[0]), j(layout.ln_2[1]), f"{dst}/ln_2", d)
  add_attention(km, layout, j, f"{dst}/attn", d, heads)
  km.linear(j(layout.fc1), d, mlp, f"{dst}/mlp/fc1", layout.torch)
  km.linear(j(layout.fc2), mlp, d, f"{dst}/mlp/fc2", layout.torch)



def add_attention(km: KeyMap, layout: BlockLayout, j: Callable, dst: str, d: int, heads: int):
  """Self-attention (or MAP cross-attention: same parameters) -> dst/{qkv, out}."""
  k = d // heads
  if layout.attn == "torch_fused":  # rows [q; k; v], each head-major
    km.add(j(layout.qkv[0]), (3 * d, d), f"{dst}/qkv/kernel",
           lambda w: w.T.reshape(d, 3, heads, k))
    km.add(j(layout.qkv[1]), (3 * d,), f"{dst}/qkv/bias", lambda b: b.reshape(3, heads, k))
  elif layout.attn == "torch_separate":
    km.add([j(n, "weight") for n in layout.qkv], [(d, d)] * 3, f"{dst}/qkv/kernel",
           lambda *w: np.stack([x.T for x in w], 1).reshape(d, 3, heads, k))
    km.add([j(n, "bias") for n in layout.qkv], [(d,)] * 3, f"{dst}/qkv/bias",
           lambda *b: np.stack(b).reshape(3, heads, k))
  elif layout.attn == "flax_separate":
    km.add([j(n, "kernel") for n in layout.qkv], [(d, heads, k)] * 3, f"{dst}/qkv/kernel",
           lambda *w: np.stack(w, 1))
    km.add([j(n, "bias") for n in layout.qkv], [(heads, k)] * 3, f"{dst}/qkv/bias",
           lambda *b: np.stack(b))
  else:
    raise ValueError(f"unknown attention layout {layout.attn!r}")
  if layout.torch:
    km.add(j(layout.out, "weight"), (d, d), f"{dst}/out/kernel",
           lambda w: w.T.reshape(heads, k, d))
    km.add(j(layout.out, "bias"), (d,), f"{dst}/out/bias")
  else:
    km.add(j(layout.out, "kernel"), (heads, k, d), f"{dst}/out/kernel")
    km.add(j(layout.out, "bias"), (d,), f"{dst}/out/bias")


def add_blocks(km: KeyMap, layout: BlockLayout, src: Callable[[int], str], dst: str,
               depth: int, d: int, heads: int, mlp: int):
  """`depth` blocks: source prefix src(i) -> our {dst}/encoderblock_{i}."""
  from jax_transfer.models.vit import block_name
  for i in range(depth):
    add_block(km, layout, src(i), f"{dst}/{block_name(i)}" if dst else block_name(i), d,
              heads, mlp)


# ------------------------------------------------------------------------------ Inference.

def block_indices(keys, pattern: str) -> list[int]:
  """Sorted distinct integers captured by `pattern` (one group) over the keys."""
  rx = re.compile(pattern)
  return sorted({int(m.group(1)) for k in keys for m in [rx.match(k)] if m})


def depth_of(keys, pattern: str) -> int:
  """Block count: 1 + the largest index (a gap shows up later as missing keys)."""
  idx = block_indices(keys, pattern)
  return idx[-1] + 1 if idx else 0


def grid_of(n: int, what: str) -> int:
  side = math.isqrt(max(n, 0))
  if side * side != n:
    raise CheckpointError(f"{what}: {n} patch positions are not a square grid")
  return side


def heads_for(width: int, given: Optional[int], tower: str, flag: str,
              head_dim: int = 64) -> int:
  """Head count: the flag's, or width // head_dim (what the weights cannot tell)."""
  heads = given or width // head_dim
  if heads <= 0 or width % heads:
    raise CheckpointError(f"{tower} width {width} is not divisible into {heads} heads"
                          f"{'' if given else f' of {head_dim}'}; pass the true head count "
                          f"with {flag}")
  return heads


def require(sd: dict, keys: Sequence[str], what: str):
  missing = [k for k in keys if k not in sd]
  if missing:
    raise CheckpointError(f"not {what}: missing keys {sorted(missing)} (needed to infer the "
                          f"architecture); it has e.g. {sorted(sd)[:8]}")


# ------------------------------------------------------------------------------- Result.

@dataclasses.dataclass
class Converted:
  """What every format returns; tools/import_checkpoint.py turns it into an export.

  model_name / model_kwargs: as config.model_name / config.model hold them (dtype a name).
  params: nested float32 arrays, the tree model.init(...)['params'] has.
  image_size: the side the image tower was trained at. mean / std: the image normalisation
  (pixels in [0, 1]: (x - mean) / std), the family's. method: 'contrastive' or 'supervised'.
  loss: the contrastive loss ('clip' | 'siglip'); num_classes for classifiers.
  tokenizer: a jax_transfer.tokenizer object or None. notes: lines for the import summary.
  eval_resize: how the family's eval transform resizes (see tools/import_checkpoint.py).
  """
  model_name: str
  model_kwargs: dict
  params: dict
  image_size: int
  mean: tuple
  std: tuple
  method: str
  loss: Optional[str] = None
  tokenizer: Any = None
  notes: list = dataclasses.field(default_factory=list)
  eval_resize: str = "crop"  # 'crop': short side + central crop (CLIP, timm); 'squash': SigLIP


def build_params(flat: dict, model_name: str, model_kwargs: dict, image_size: int,
                 channels: int = 3, context_length: Optional[int] = None) -> dict:
  """flat {path: array} -> nested params, checked against the model's own abstract tree, so a
  mapping bug fails here and not at load time."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import ml_collections
  from flax import traverse_util
  from jax_transfer import config as config_lib, models
  model = models.get_model(model_name, **config_lib.model_kwargs(
      ml_collections.ConfigDict(model_kwargs)))
  images = jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)
  args = (images,) if context_length is None else (
      images, jax.ShapeDtypeStruct((1, context_length), jnp.int32))
  abstract = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), *args)["params"])
  want = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(abstract, sep="/").items()}
  got = {k: tuple(v.shape) for k, v in flat.items()}
  if want != got:
    raise AssertionError(f"checkpoint mapping bug, paths/shapes differ from the model's: "
                         f"{sorted(set(want.items()) ^ set(got.items()))}")
  return traverse_util.unflatten_dict(dict(flat), sep="/")

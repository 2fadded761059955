"""Preprocessing ops by name, big_vision style (`big_vision/pp/registry.py`).

A recipe is a pipe string of op calls, or a list of them:

  'decode_jpeg_and_inception_crop(224)|flip_lr|randaug(2, 15)|value_range(-1, 1)'
  ['decode', 'resize_small(256)', 'central_crop(224)', 'value_range(-1, 1)']

Each op is a registered factory: called with the recipe's arguments (Python literals), it
returns `fn(example, rng) -> example`, where `example` is a dict of numpy values (`image`:
encoded bytes before `decode`, then uint8 [H, W, C]) and `rng` is a `numpy.random.Generator`
drawn for this example from (seed, stream position), so a resumed run draws the same views.
Ops run on the host, per example, in grain workers / reader threads; images stay uint8.

A factory may set attributes on the function it returns:
  out_size: (h, w) the op's output image size (the recipe's is that of its last such op);
  out_channels: the op's output channel count (to_rgb: 3; likewise the last one counts);
  random: True for ops that draw from `rng` (ops before the first random one are
    deterministic: their results may be cached);
  value_range: (lo, hi) for `value_range`, which runs on the device instead (the host keeps
    uint8 until the batch is there: 4x fewer bytes to build and move); it must be the last op.
"""
from __future__ import annotations

import ast
import dataclasses
from typing import Callable

import numpy as np

OpFn = Callable[[dict, np.random.Generator], dict]
_REGISTRY: dict[str, Callable[..., OpFn]] = {}
_OP_MODULES = ("ops_image", "randaug")  # Each registers its ops on import.


def register(name: str):
  """Decorator: registers an op factory under `name` (one name, one factory)."""
  def wrap(factory):
    if name in _REGISTRY and _REGISTRY[name] is not factory:
      raise ValueError(f"pp op {name!r} is registered twice")
    _REGISTRY[name] = factory
    return factory
  return wrap


def registered() -> list[str]:
  _import_ops()
  return sorted(_REGISTRY)


def _import_ops():
  # The op modules register themselves on import.
  import importlib  # pylint: disable=g-import-not-at-top
  for module in _OP_MODULES:
    importlib.import_module(f"jax_transfer.data.pp.{module}")


class PPError(ValueError):
  """A recipe that does not parse, or names an unknown op, or calls one with bad arguments."""


def parse_call(call: str) -> tuple[str, tuple, dict]:
  """'resize_small(256, method="area")' -> ('resize_small', (256,), {'method': 'area'})."""
  call = call.strip()
  try:
    node = ast.parse(call, mode="eval").body
  except SyntaxError as e:
    raise PPError(f"pp op {call!r} does not parse: {e.msg}") from None
  if isinstance(node, ast.Name):
    return node.id, (), {}
  if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
    raise PPError(f"pp op {call!r} must be a name or a call name(args)")
  try:
    args = tuple(ast.literal_eval(a) for a in node.args)
    kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
  except ValueError:
    raise PPError(f"pp op {call!r}: arguments must be Python literals") from None
  return node.func.id, args, kwargs


def split_recipe(recipe) -> list[str]:
  """A pipe string or a list of op strings -> the op strings (empty entries dropped)."""
  if isinstance(recipe, str):
    parts = recipe.split("|")
  else:
    parts = list(recipe)
  return [p.strip() for p in parts if p and p.strip()]


def _fuse_decodes(fns):
  """`decode` followed by an op that can decode at reduced size (resize, resize_small) ->
  that op's fused decode-and-resize (DCT-domain downscaling, ops_image._decode_at_least)."""
  out = []
  for fn in fns:
    prev = out[-1] if out else None
    if (prev is not None and getattr(prev, "decode_channels", None) is not None
        and getattr(fn, "fuse_with_decode", None) is not None):
      out[-1] = fn.fuse_with_decode(prev.decode_channels)
    else:
      out.append(fn)
  return out


class Preprocess:
  """A parsed recipe: `self(example, rng)` applies every host op in order.

  Attributes: ops (the op strings), out_size ((h, w) or None), out_channels (int or None: the
  dataset's), value_range ((lo, hi) or None: the device-side normalisation), random (whether
  any op draws from the rng), head_out_size and head_out_channels (of the cacheable head).
  `head(example)` runs the deterministic leading ops, `tail(example, rng)` the rest.
  """

  def __init__(self, recipe):
    _import_ops()
    self.ops = split_recipe(recipe)
    self.value_range = None
    self.out_size = self.out_channels = None
    self._fns = []
    for i, call in enumerate(self.ops):
      name, args, kwargs = parse_call(call)
      if name not in _REGISTRY:
        raise PPError(f"unknown pp op {name!r} in {call!r}; registered: {sorted(_REGISTRY)}")
      try:
        fn = _REGISTRY[name](*args, **kwargs)
      except (TypeError, ValueError) as e:
        raise PPError(f"pp op {call!r}: {e}") from None
      if getattr(fn, "value_range", None) is not None:
        if i != len(self.ops) - 1:
          raise PPError(f"pp op {call!r} must be the last op (it runs on the device, after "
                        f"the batch is there); recipe: {'|'.join(self.ops)}")
        vr = fn.value_range
        self.value_range = vr if isinstance(vr, MeanStd) else tuple(float(v) for v in vr)
        continue
      if getattr(fn, "out_size", None) is not None:
        self.out_size = tuple(int(v) for v in fn.out_size)
      if getattr(fn, "out_channels", None) is not None:
        self.out_channels = int(fn.out_channels)
      self._fns.append(fn)
    self._fns = _fuse_decodes(self._fns)
    randoms = [i for i, fn in enumerate(self._fns) if getattr(fn, "random", False)]
    self._first_random = randoms[0] if randoms else len(self._fns)
    self.random = bool(randoms)  # Does any op draw from the rng?
    # Output size of the deterministic head (what a cache of its results holds), or None.
    sizes = [fn.out_size for fn in self._fns[:self._first_random]
             if getattr(fn, "out_size", None) is not None]
    self.head_out_size = tuple(sizes[-1]) if sizes else None
    channels = [fn.out_channels for fn in self._fns[:self._first_random]
                if getattr(fn, "out_channels", None) is not None]
    self.head_out_channels = int(channels[-1]) if channels else None

  def __call__(self, example: dict, rng: np.random.Generator) -> dict:
    return self.tail(self.head(example), rng)

  def head(self, example: dict) -> dict:
    """The deterministic leading ops (up to the first random one): cacheable."""
    for fn in self._fns[:self._first_random]:
      example = fn(example, None)
    return example

  def tail(self, example: dict, rng: np.random.Generator) -> dict:
    """The ops from the first random one on."""
    for fn in self._fns[self._first_random:]:
      example = fn(example, rng)
    return example

  def __repr__(self):
    return f"Preprocess({'|'.join(self.ops)!r})"


@dataclasses.dataclass(frozen=True)
class MeanStd:
  """Per-channel normalisation (x / 255 - mean) / std, the form published checkpoints state
  (torchvision / open_clip / HF image processors: mean and std of pixels in [0, 1])."""
  mean: tuple
  std: tuple


def normalise(images, value_range):
  """uint8 images -> float32 (elementwise; numpy or jax arrays alike). value_range (lo, hi):
  x / (255 / (hi - lo)) + lo, which for (-1, 1) is x / 127.5 - 1. A MeanStd: per channel
  (last axis) (x / 255 - mean) / std, as x / (255 std) - mean / std."""
  if isinstance(value_range, MeanStd):
    scale = np.float32(255.0) * np.asarray(value_range.std, np.float32)
    shift = np.asarray(value_range.mean, np.float32) / np.asarray(value_range.std, np.float32)
    return images.astype(np.float32) / scale - shift
  lo, hi = value_range
  return images.astype(np.float32) / np.float32(255.0 / (hi - lo)) + np.float32(lo)

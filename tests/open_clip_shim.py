"""Imports open_clip's model / transformer / loss modules without torchvision.

open_clip's package `__init__` (and its utils.py) import torchvision, which has no CPU wheel
for the pinned torch and would pull a CUDA torch. Only its ResNet path (freezing BatchNorm)
uses torchvision, so this registers `open_clip` as a bare package (its `__init__` not run)
and, when torchvision is absent, a stub `torchvision.ops.misc.FrozenBatchNorm2d` that fails
if it is ever called.

  oc = load_open_clip()   # None when torch or open_clip_torch is not installed
  model = oc.model.CLIP(embed_dim, vision_cfg, text_cfg); loss = oc.loss.ClipLoss()

Used by tests/test_import_clip.py and benchmarks/open_clip_step.py.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types


def _stub_torchvision():
  if importlib.util.find_spec("torchvision") is not None or "torchvision" in sys.modules:
    return

  class FrozenBatchNorm2d:  # noqa: D401 - placeholder, never constructed by ViT models
    def __init__(self, *args, **kwargs):
      raise RuntimeError("torchvision is not installed (stubbed by tests/open_clip_shim.py)")

  names = ("torchvision", "torchvision.ops", "torchvision.ops.misc")
  mods = {n: types.ModuleType(n) for n in names}
  mods["torchvision"].ops = mods["torchvision.ops"]
  mods["torchvision.ops"].misc = mods["torchvision.ops.misc"]
  mods["torchvision.ops.misc"].FrozenBatchNorm2d = FrozenBatchNorm2d
  sys.modules.update(mods)


def load_open_clip():
  """-> namespace(model=open_clip.model, transformer=..., loss=..., torch=torch), or None."""
  if importlib.util.find_spec("torch") is None:
    return None
  spec = importlib.util.find_spec("open_clip")  # a top-level spec: runs nothing
  if spec is None or not spec.submodule_search_locations:
    return None
  if "open_clip" not in sys.modules:
    pkg = types.ModuleType("open_clip")
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__spec__ = spec
    pkg.__file__ = spec.origin
    sys.modules["open_clip"] = pkg
  _stub_torchvision()
  import torch
  return types.SimpleNamespace(
      torch=torch,
      model=importlib.import_module("open_clip.model"),
      transformer=importlib.import_module("open_clip.transformer"),
      loss=importlib.import_module("open_clip.loss"))

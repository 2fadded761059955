"""Imports open_clip's modules and timm without torchvision.

torchvision has no CPU wheel for the pinned torch (it would pull a CUDA torch), but open_clip
(its package `__init__`, utils.py) and timm (datasets, transforms.InterpolationMode,
ops.misc.FrozenBatchNorm2d ...) import it at module level. None of the ViT / text code paths
use it, so when torchvision is absent a `sys.meta_path` finder serves `torchvision` and every
`torchvision.*` module as a stub: any attribute is a placeholder class whose own attributes
are distinct cached sub-placeholders (so `{InterpolationMode.BILINEAR: ..,
InterpolationMode.NEAREST: ..}` keeps two keys) and calling any of them raises
RuntimeError("torchvision is not installed (stubbed)").

transformers decides whether torchvision is available once, when
`transformers.utils.import_utils` is first imported, and then uses torchvision-backed image
processors that fail on the stub; so that module is imported before the stub goes in.
open_clip is registered as a bare package (its `__init__`, which imports tokenizers, hub
clients and more, is not run).

  oc = load_open_clip()   # None when torch or open_clip_torch is not installed
  model = oc.model.CLIP(embed_dim, vision_cfg, text_cfg); loss = oc.loss.ClipLoss()
  timm = load_timm()      # None when torch or timm is not installed

Used by tests/test_import_open_clip.py, tests/reference_checkpoints.py and
benchmarks/open_clip_step.py.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

_STUB_MESSAGE = "torchvision is not installed (stubbed)"


class _Placeholder(type):
  """Metaclass of the stub's placeholder classes: attributes are cached sub-placeholders,
  calling one raises (subclassing one gives a class that raises too)."""

  def __getattr__(cls, name):
    if name.startswith("__"):
      raise AttributeError(name)
    sub = _Placeholder(f"{cls.__name__}.{name}", (), {"__module__": cls.__module__})
    type.__setattr__(cls, name, sub)
    return sub

  def __call__(cls, *args, **kwargs):
    raise RuntimeError(_STUB_MESSAGE)


class _StubModule(types.ModuleType):

  def __getattr__(self, name):
    if name.startswith("__"):
      raise AttributeError(name)
    sub = sys.modules.get(f"{self.__name__}.{name}")  # an already imported stub submodule
    if sub is None:
      sub = _Placeholder(name, (), {"__module__": self.__name__})
    setattr(self, name, sub)
    return sub


class _TorchvisionStubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):

  def find_spec(self, fullname, path=None, target=None):
    if fullname == "torchvision" or fullname.startswith("torchvision."):
      return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
    return None

  def create_module(self, spec):
    module = _StubModule(spec.name)
    module.__path__ = []
    return module

  def exec_module(self, module):
    pass


def _stub_torchvision():
  """Installs the stub finder once, unless a real torchvision is importable."""
  if any(isinstance(f, _TorchvisionStubFinder) for f in sys.meta_path):
    return
  if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is not None:
    return
  if importlib.util.find_spec("transformers") is not None:
    importlib.import_module("transformers.utils.import_utils")  # before the stub, see above
  import torch  # noqa: F401  (torch itself probes for torchvision in places: before too)
  sys.meta_path.insert(0, _TorchvisionStubFinder())


def _has(name):
  return importlib.util.find_spec(name) is not None  # a top-level spec: runs nothing


def load_timm():
  """-> the timm module (torchvision stubbed when absent), or None without torch / timm."""
  if not (_has("torch") and _has("timm")):
    return None
  _stub_torchvision()
  return importlib.import_module("timm")


def load_open_clip():
  """-> namespace(model=open_clip.model, transformer=..., loss=..., convert=..., torch=torch),
  or None."""
  if not _has("torch"):
    return None
  spec = importlib.util.find_spec("open_clip")
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
      loss=importlib.import_module("open_clip.loss"),
      convert=importlib.import_module("open_clip.convert"))

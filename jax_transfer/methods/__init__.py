"""Methods by name. Each module defines one `Method` subclass (see base.py)."""
from __future__ import annotations

import importlib

# name -> "module:Class", imported on use so a method's extra dependencies load only when run.
METHODS = {
    "supervised": "jax_transfer.methods.supervised:Supervised",
    "contrastive": "jax_transfer.methods.contrastive:Contrastive",
    "ssl": "jax_transfer.methods.ssl:BarlowTwins",
    "distill": "jax_transfer.methods.distill:Distill",
    "distilled_pretrain": "jax_transfer.methods.distilled_pretrain:DistilledPretrain",
    "learngene": "jax_transfer.methods.learngene:Learngene",
    "icl": "jax_transfer.methods.icl:ICL",
    "atlas": "jax_transfer.methods.atlas:Atlas",
    "dann": "jax_transfer.methods.dann:DANN",
}


def get_method(name: str):
  if name not in METHODS:
    raise ValueError(f"method={name!r} is unknown; allowed: {sorted(METHODS)}")
  module, cls = METHODS[name].split(":")
  return getattr(importlib.import_module(module), cls)

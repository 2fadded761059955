"""Model registry: configs choose a model by name (`config.model_name`), big_vision style.

Each entry is a factory `(**kwargs) -> nn.Module`. Other model files register themselves by
adding to MODELS (e.g. MODELS['two_towers'] = make_two_towers) — the registry stays open.
"""
from typing import Callable

import flax.linen as nn

from jax_transfer.models.convnet import ConvNet, make_convnet
from jax_transfer.models import resnet as _resnet
from jax_transfer.models.resnet import ResNet, make_resnet
from jax_transfer.models.seq_learner import make_seq_lstm, make_seq_transformer
from jax_transfer.models.two_towers import TwoTowers, make_two_towers
from jax_transfer.models.vit import ViT, decode_variant, make_vit

MODELS: dict[str, Callable[..., nn.Module]] = {'vit': make_vit, 'two_towers': make_two_towers,
                                               'convnet': make_convnet}
MODELS.update(seq_transformer=make_seq_transformer, seq_lstm=make_seq_lstm)  # ICL learners
MODELS.update(resnet=make_resnet, **_resnet.NAMED)  # BatchNorm ResNets: resnet18/50/_tiny


def get_model(name: str, **kwargs) -> nn.Module:
  """get_model('vit', variant='b/16', num_classes=1000) -> ViT."""
  if name not in MODELS:
    raise ValueError(f'Unknown model {name!r}; allowed: {", ".join(sorted(MODELS))}')
  return MODELS[name](**kwargs)


__all__ = ['ConvNet', 'MODELS', 'ResNet', 'TwoTowers', 'ViT', 'decode_variant', 'get_model',
           'make_convnet', 'make_resnet', 'make_two_towers', 'make_vit']

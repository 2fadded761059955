"""Sequence learners for in-context learning (GPICL): tokens [B, L, F] -> logits [B, L, C].

Two learners with the same input embedding and output head, so they differ only in how the
past is stored (the paper's point, sec. 4.3: the accessible *state size*, not the parameter
count, limits in-context learning):
  SeqTransformer  causal pre-LN Transformer (the ViT `Block`, causal=True). At position L its
                  accessible state is the key/value cache: 2 * depth * L * width floats.
  SeqLSTM         stacked LSTM; state 2 * depth * hidden floats whatever L is.
`state_size(model, length)` returns these numbers; experiments report them beside the
parameter counts.

Param layout (logical names in brackets):
  embed/{kernel [F, D] ('features', 'embed'), bias [D]}
  pos_embedding [max_len, D] ('posemb_len', 'embed')                 Transformer only
  encoderblock_{i}/...  ViT Block (models/vit.py)                    Transformer only
                        (scan_layers=True: encoderblocks/..., stacked as in the ViT)
  lstm_{i}/...          flax OptimizedLSTMCell (replicated)          LSTM only
  encoder_norm, head/{kernel [D, C] ('embed', 'classes'), bias [C]}
"""
from typing import Any

import chex
import flax.linen as nn
import jax.numpy as jnp

from jax_transfer.models.vit import ACT, P, encoder_blocks, ln

Dtype = Any


def _embed(width, kw):
  return nn.Dense(width, name='embed',
                  kernel_init=P(nn.initializers.lecun_normal(), ('features', 'embed')),
                  bias_init=P(nn.initializers.zeros, ('embed',)), **kw)


def _head(num_classes, kw):
  # Zero head: the loss at initialisation is exactly ln(num_classes) at every position.
  return nn.Dense(num_classes, name='head',
                  kernel_init=P(nn.initializers.zeros, ('embed', 'classes')),
                  bias_init=P(nn.initializers.zeros, ('classes',)), **kw)


class SeqTransformer(nn.Module):
  """Causal Transformer learner. tokens [B, L, F] (L <= max_len) -> (logits [B, L, C],
  {'features': [B, L, D]}). Prediction j depends on tokens 0..j only."""
  num_classes: int
  width: int = 128
  depth: int = 4
  num_heads: int = 4
  mlp_dim: int = 256
  max_len: int = 128
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False
  remat_policy: str = 'nothing_saveable'
  scan_layers: bool = False  # nn.scan over blocks (see models/vit.py)
  attention_impl: str = 'auto'  # see models/vit.py attention_implementation

  @nn.compact
  def __call__(self, tokens, *, train: bool = False):
    b, n, _ = tokens.shape
    if n > self.max_len:
      raise ValueError(f'sequence length {n} exceeds max_len {self.max_len}')
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = _embed(self.width, kw)(tokens)
    pos = self.param('pos_embedding',
                     P(nn.initializers.normal(self.width ** -0.5), ('posemb_len', 'embed')),
                     (self.max_len, self.width), self.param_dtype)
    x = nn.with_logical_constraint(x + pos[:n].astype(x.dtype), ACT)
    x = encoder_blocks(x, train, depth=self.depth, scan=self.scan_layers, remat=self.remat,
                       remat_policy=self.remat_policy, mlp_dim=self.mlp_dim,
                       num_heads=self.num_heads, dropout=self.dropout, causal=True,
                       attention_impl=self.attention_impl, **kw)
    x = ln('encoder_norm', **kw)(x)
    logits = _head(self.num_classes, kw)(x)
    chex.assert_shape(logits, (b, n, self.num_classes))
    return logits, {'features': x}


class SeqLSTM(nn.Module):
  """Stacked-LSTM learner, same embedding and head as SeqTransformer.
  tokens [B, L, F] -> (logits [B, L, C], {'features': [B, L, hidden]})."""
  num_classes: int
  width: int = 256  # LSTM hidden size (and embedding width)
  depth: int = 2
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens, *, train: bool = False):
    b, n, _ = tokens.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = _embed(self.width, kw)(tokens)
    for i in range(self.depth):
      x = nn.RNN(nn.OptimizedLSTMCell(self.width, **kw), name=f'lstm_{i}')(x)
    x = ln('encoder_norm', **kw)(x)
    logits = _head(self.num_classes, kw)(x)
    chex.assert_shape(logits, (b, n, self.num_classes))
    return logits, {'features': x}


def state_size(model: nn.Module, length: int) -> int:
  """Floats of past information the learner can read when predicting position `length`-1."""
  if isinstance(model, SeqTransformer):
    return 2 * model.depth * length * model.width  # keys + values of every layer
  if isinstance(model, SeqLSTM):
    return 2 * model.depth * model.width  # (c, h) of every layer
  raise TypeError(f'no state size for {type(model).__name__}')


def make_seq_transformer(**kwargs) -> SeqTransformer:
  kwargs.setdefault('mlp_dim', 2 * kwargs.get('width', SeqTransformer.width))
  return SeqTransformer(**kwargs)


def make_seq_lstm(**kwargs) -> SeqLSTM:
  return SeqLSTM(**kwargs)

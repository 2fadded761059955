"""Causal text Transformer: the text tower of CLIP-style two-tower models (open_clip layout).

tokens [B, L] int32 -> token_embedding + positional_embedding -> depth x ViT Block with
causal attention -> ln_final -> features at the end-of-text token.

Pooling (`pool`), as each family does it:
  'argmax'  OpenAI CLIP / open_clip: the EOT token has the largest id in the vocabulary, so its
            position is argmax(tokens, axis=-1). jax_transfer.tokenizer guarantees this.
  'eot'     the first position holding `eot_id` (Hugging Face CLIPTextTransformer with
            eos_token_id != 2); the same as 'argmax' when EOT is the largest id.
  'last'    the last position (SigLIP, big_vision and HF: texts are padded to the full
            context length, so the pooled token is a pad / EOS token that attends to all).
  'first'   position 0.
With causal attention (`causal`, the CLIP default) the EOT features depend only on the tokens
up to EOT, so padding after it never matters (and no padding mask is needed). SigLIP's text
tower is bidirectional (causal=False), without a padding mask either: padding is part of its
input, which is why its tokenizer pads to the full length.

Param layout (logical names in brackets):
  token_embedding/embedding [V, D]     ('vocab', 'embed')
  positional_embedding [L, D]          ('posemb_len', 'embed')
  encoderblock_{i}/...                 the ViT Block (models/vit.py), causal=True
                                       (scan_layers=True: encoderblocks/... stacked, as the ViT)
  ln_final/{scale, bias} [D]           ('embed',)
"""
from typing import Any, Optional

import chex
import flax.linen as nn
import jax.numpy as jnp

from jax_transfer.models.vit import ACT, P, Hook, encoder_blocks, ln

Dtype = Any
TEXT_POOLS = ('argmax', 'eot', 'last', 'first')


class TextTransformer(nn.Module):
  """tokens [B, L] int32 (L <= context_length) -> (pooled [B, D], aux {'tokens': [B, L, D]}).

  `pooled` is ln_final(x) at the EOT position; aux['tokens'] is ln_final(x) for all positions.
  """
  vocab_size: int
  context_length: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False
  remat_policy: str = 'nothing_saveable'
  scan_layers: bool = False  # nn.scan over blocks (see models/vit.py)
  attention_impl: str = 'auto'  # see models/vit.py attention_implementation
  ln_eps: float = 1e-6
  gelu_approximate: bool = True
  quick_gelu: bool = False
  dropout: float = 0.0
  pool: str = 'argmax'  # 'argmax' | 'eot' | 'last' | 'first' (module docstring)
  eot_id: Optional[int] = None  # pool='eot' only
  causal: bool = True

  @nn.compact
  def __call__(self, tokens, *, train: bool = False):
    b, n = tokens.shape
    if self.pool not in TEXT_POOLS:
      raise ValueError(f'Unknown text pool {self.pool!r}; allowed: {", ".join(TEXT_POOLS)}')
    if (self.pool == 'eot') != (self.eot_id is not None):
      raise ValueError(f"text pool 'eot' needs eot_id (and only it uses one): pool="
                       f"{self.pool!r}, eot_id={self.eot_id!r}")
    if n > self.context_length:
      raise ValueError(f'{n} tokens exceed context_length {self.context_length}')
    d = self.width
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    # std 0.02 / 0.01 as open_clip's TextTransformer.init_parameters.
    x = nn.Embed(self.vocab_size, d, name='token_embedding',
                 embedding_init=P(nn.initializers.normal(0.02), ('vocab', 'embed')),
                 **kw)(tokens)  # [B, L, D]
    # CoOp's hook (peft.py): learned context vectors after the start token, ids shifted.
    x, tokens = Hook(name='context_in')(x, tokens)
    pos = self.param('positional_embedding',
                     P(nn.initializers.normal(0.01), ('posemb_len', 'embed')),
                     (self.context_length, d), self.param_dtype)
    x = nn.with_logical_constraint(x + pos[:n].astype(x.dtype), ACT)  # as open_clip: [:L]
    x = nn.Dropout(self.dropout, deterministic=not train)(x)

    x = encoder_blocks(x, train, depth=self.depth, scan=self.scan_layers, remat=self.remat,
                       remat_policy=self.remat_policy, mlp_dim=self.mlp_dim,
                       num_heads=self.num_heads, dropout=self.dropout, ln_eps=self.ln_eps,
                       gelu_approximate=self.gelu_approximate, quick_gelu=self.quick_gelu,
                       causal=self.causal, attention_impl=self.attention_impl, **kw)
    x = ln('ln_final', epsilon=self.ln_eps, **kw)(x)
    if self.pool == 'argmax':
      eot = jnp.argmax(tokens, axis=-1)  # [B]: EOT is the largest id (first one on ties)
    elif self.pool == 'eot':
      eot = jnp.argmax(tokens == self.eot_id, axis=-1)  # the first EOT (0 if none)
    else:
      eot = jnp.full((b,), n - 1 if self.pool == 'last' else 0, jnp.int32)
    pooled = jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0]  # [B, D]
    chex.assert_shape(pooled, (b, d))
    return pooled, {'tokens': x}

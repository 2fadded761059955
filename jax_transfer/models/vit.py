"""Vision Transformer (Dosovitskiy et al. 2021) in pure flax.linen, used by every method.

Pre-LN encoder: x + MHA(LN(x)); x + MLP(LN(x)); final LayerNorm. Initialisation follows
big_vision. Position embeddings follow the original ViT: added *after* the class token is
prepended, so 'b/16' at 224 with 1000 classes has the reference 86,567,656 parameters.

Param layout (paths are a contract: checkpoint import and learngene map params by path):
  embedding/{kernel [p, p, C, D], bias [D]}     Conv patch embedding (bias only if patch_bias)
  cls [1, 1, D]                                 class_token (default: only when pool='cls')
  pos_embedding [1, N, D]                       N = patches (+1 with cls); fixed at init
                                                (resample_posemb for another image size)
  ln_pre                                        only when pre_norm (open_clip's ln_pre)
  encoderblock_{i}/ln_1, attn/{qkv, out}, ln_2, mlp/{fc1, fc2}
      attn/qkv/kernel [D, 3, H, K], bias [3, H, K]   fused q, k, v: one matmul, split on axis 1
      attn/out/kernel [H, K, D],    bias [D]
  encoder_norm                                  LayerNorm on all tokens before pooling, or
  fc_norm                                       with fc_norm=True after pooling (timm 'avg')
  map_head/{probe, attn, ln, mlp}               only when pool='map' (MAPHead: SigLIP)
  pre_logits (only if representation_size), head (only if num_classes > 0)
Geometry is free-form (width, depth, mlp_dim, num_heads, patch_size); VARIANTS are shorthands.
Blocks are per-block subtrees: this is the canonical layout (exports, learngene, checkpoint import).
With scan_layers=True the blocks run under nn.scan and live in memory as ONE subtree
  encoderblocks/...   every leaf stacked on a leading [depth] axis, logical name 'layers'
`stack_blocks` / `unstack_blocks` convert between the two; checkpoint.export always writes the
per-block layout and loading stacks it again, so either model loads either's export. The same
Block (with causal=True) is the text tower's and SeqTransformer's block, run by `encoder_blocks`.

open_clip parity options (defaults keep the big_vision behaviour): pre_norm=True,
ln_eps=1e-5, gelu_approximate=False, patch_bias=False give open_clip's VisionTransformer
(pool='cls'); the weight mapping is in models/two_towers.py.

Logical axis names (rules in parallel.py map them to mesh axes 'data' / 'fsdp' / 'tensor'):
  params:      'embed' (D: conv out, LN, cls, posemb, qkv/out/fc in-out, head in)
               'mlp' (MLP hidden; pre_logits out)   'heads' (H)   'kv' (K = D / H)
               'qkv' (the fused size-3 axis: never shard -> None)
               'patch_h', 'patch_w', 'channels' (conv kernel; never shard -> None)
               'posemb_len' (position axis of pos_embedding)   'classes' (head out)
               'layers' (leading axis of scan-stacked block params; replicated by default)
               None for the broadcast dims of cls / pos_embedding.
  activations: ('batch', 'length', 'embed') at embedding output and every block boundary;
               ('batch', 'length', 'heads', 'kv') for q, k, v; ('batch', 'length', 'mlp').
  Rule order matters: flax assigns a mesh axis once per array, so put ('batch', ('data',
  'fsdp')) before ('embed', 'fsdp') and activations keep 'embed' replicated.
"""
import functools
import re
from collections.abc import Mapping
from typing import Any, Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
P = nn.with_logical_partitioning
ACT = ('batch', 'length', 'embed')

# (width, depth, mlp_dim, num_heads), as in big_vision; 'nano' is for tests only.
VARIANTS = {
    'nano': (32, 2, 64, 2),
    'mu': (64, 4, 128, 4),
    'ti': (192, 12, 768, 3),
    's': (384, 12, 1536, 6),
    'm': (512, 12, 2048, 8),
    'b': (768, 12, 3072, 12),
    'l': (1024, 24, 4096, 16),
    'h': (1280, 32, 5120, 16),
    'g': (1408, 40, 6144, 16),  # ViT-g/14 (open_clip, big_vision 'g')
    'G': (1664, 48, 8192, 16),  # big_vision 'G'
    'bigG': (1664, 48, 8192, 16),  # open_clip ViT-bigG-14 (the same geometry as 'G')
    'So400m': (1152, 27, 4304, 16),  # SigLIP's shape-optimised ViT (Alabdulmohsin et al. 2023)
}


def decode_variant(variant: str) -> dict:
  """'b/16' -> dict(width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=16)."""
  m = re.fullmatch(r'(\w+?)(?:/(\d+))?', variant)
  if not m or m.group(1) not in VARIANTS:
    raise ValueError(f'Unknown ViT variant {variant!r}; allowed: {sorted(VARIANTS)} [/patch]')
  width, depth, mlp_dim, num_heads = VARIANTS[m.group(1)]
  out = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads)
  if m.group(2):
    out['patch_size'] = int(m.group(2))
  return out


def _qkv_init(key, shape, dtype=jnp.float32):
  """[D, 3, H, K] kernel, xavier-uniform per projection, as if q, k, v were three separate
  [D, D] kernels (big_vision); a plain xavier on the fused kernel would use fan_out = 3D."""
  d, _, h, k = shape
  w = nn.initializers.xavier_uniform(in_axis=1, out_axis=2, batch_axis=0)(
      key, (3, d, h * k), dtype)  # [3, D, H * K]
  return jnp.transpose(w, (1, 0, 2)).reshape(shape)


def _out_init(key, shape, dtype=jnp.float32):
  """[H, K, D] kernel initialised as the [D, D] xavier matrix it flattens to (big_vision)."""
  h, k, d = shape
  return nn.initializers.xavier_uniform()(key, (h * k, d), dtype).reshape(shape)


class Projection(nn.Module):
  """y = einsum(spec, x, kernel) + bias with the kernel declared at its full N-d shape.

  Used instead of nn.DenseGeneral: DenseGeneral initialises a flat kernel and reshapes it, and
  under a mesh flax then applies the N-d logical constraint to the 2-D value (also during the
  shape check flax runs in apply), which fails.
  """
  spec: str
  kernel_shape: tuple
  kernel_names: tuple
  bias_names: tuple
  kernel_init: Any
  dtype: Dtype
  param_dtype: Dtype

  @nn.compact
  def __call__(self, x, take: Optional[slice] = None):
    """take: a slice of the kernel's axis 1 (and the bias' axis 0) to use, e.g. the q or
    the k, v parts of a fused [D, 3, H, K] kernel (cross-attention in MAPHead)."""
    bias_shape = self.kernel_shape[-len(self.bias_names):]
    kernel = self.param('kernel', P(self.kernel_init, self.kernel_names), self.kernel_shape,
                        self.param_dtype)
    bias = self.param('bias', P(nn.initializers.zeros, self.bias_names), bias_shape,
                      self.param_dtype)
    if take is not None:
      kernel, bias = kernel[:, take], bias[take]
    return (jnp.einsum(self.spec, x.astype(self.dtype), kernel.astype(self.dtype))
            + bias.astype(self.dtype))


class Hook(nn.Module):
  """Identity, without parameters: a named point where jax_transfer.peft's token methods add
  learned tokens through flax method interception ('prefix' in Attention: keys / values;
  'prompt_in' / 'prompt_out' in ViT and 'prompt' in its Blocks: VPT; 'context_in' in
  TextTransformer: CoOp). Keyword arguments are static facts for the method (e.g. fan_in
  for VPT's init). Without PEFT the model computes exactly what it would without the hook."""

  @nn.compact
  def __call__(self, *xs, **info):
    del info
    return xs[0] if len(xs) == 1 else xs


class Attention(nn.Module):
  """Multi-head self-attention through jax.nn.dot_product_attention (cuDNN-eligible on GPU).

  One fused qkv kernel [D, 3, H, K] does a single matmul; q, k, v are kernel[:, 0], [:, 1],
  [:, 2] when converting to/from separate query/key/value layouts.
  """
  num_heads: int
  dtype: Dtype
  param_dtype: Dtype
  causal: bool = False  # token i attends to tokens <= i (text tower)
  attention_impl: str = 'auto'  # see attention_implementation()

  @nn.compact
  def __call__(self, x, kv=None):
    """x: [B, N, D] -> [B, N, D]. kv [B, S, D]: cross-attention (queries from x, keys and
    values from kv, through the same fused kernel's q and k, v parts), as MAPHead needs."""
    d = x.shape[-1]
    if d % self.num_heads:
      raise ValueError(f'width {d} is not divisible by num_heads {self.num_heads}')
    h, hd = self.num_heads, d // self.num_heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    qkv_proj = Projection('bnd,dthk->bnthk', (d, 3, h, hd), ('embed', 'qkv', 'heads', 'kv'),
                          ('qkv', 'heads', 'kv'), _qkv_init, name='qkv', **kw)
    if kv is None:
      qkv = qkv_proj(x)  # [B, N, 3, H, K]
      parts = [qkv[:, :, i] for i in range(3)]
    else:
      q, kvp = qkv_proj(x, take=slice(0, 1)), qkv_proj(kv, take=slice(1, 3))
      parts = [q[:, :, 0], kvp[:, :, 0], kvp[:, :, 1]]
    q, k, v = (nn.with_logical_constraint(t, ('batch', 'length', 'heads', 'kv')) for t in parts)
    k, v = Hook(name='prefix')(k, v)  # identity; peft 'prefix' prepends learned keys / values
    # Softmax runs in f32 inside dot_product_attention even for bf16 inputs.
    impl = attention_implementation(self.attention_impl, q.dtype, hd)
    if impl == 'splash' and (kv is not None or k.shape[1] != q.shape[1]):
      impl = 'xla'  # The splash wrapper is self-attention only (equal q / kv lengths).
    if impl == 'xla' and jax.default_backend() == 'cpu':
      y = cpu_attention(q, k, v, self.causal)  # [B, N, H, K]
    elif impl == 'splash':
      y = splash_attention(q, k, v, self.causal)  # [B, N, H, K]
    elif self.causal and k.shape[1] != q.shape[1]:  # a key prefix: explicit shifted mask
      y = jax.nn.dot_product_attention(q, k, v, mask=causal_mask(q.shape[1], k.shape[1]),
                                       implementation=impl)
    else:
      y = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal,
                                       implementation=impl)  # [B, N, H, K]
    return Projection('bnhk,hkd->bnd', (h, hd, d), ('heads', 'kv', 'embed'), ('embed',),
                      _out_init, name='out', **kw)(y)


def causal_mask(n_q: int, n_k: int):
  """[n_q, n_k] bool: query i sees keys j <= i + (n_k - n_q). Keys beyond the queries' length
  are a prefix (prefix tuning's learned keys, jax_transfer.peft) that every query sees."""
  return jnp.tril(jnp.ones((n_q, n_k), bool), n_k - n_q)


def cpu_attention(q, k, v, causal: bool):
  """softmax(q k^T / sqrt(K)) v as two einsums, softmax in f32: q, k, v [B, N, H, K] ->
  [B, N, H, K]. The XLA path on CPU. jax.nn.dot_product_attention's XLA path computes the
  same values, but its vmap over head groups (size 1 here) and constants broadcast to the
  [B, H, N, N] logits make its forward + backward ~2-3x slower on XLA:CPU, where attention
  is the largest part of the CLIP step (benchmarks/RESULTS.md, 'Where the step time goes').
  The scale is applied to q ([N, K]) instead of the logits ([N, N])."""
  q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  logits = jnp.einsum('bqhk,bshk->bhqs', q, k, preferred_element_type=jnp.float32)
  if causal:
    logits = jnp.where(causal_mask(q.shape[1], k.shape[1]), logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum('bhqs,bshk->bqhk', probs, v)


def splash_attention(q, k, v, causal: bool):
  """softmax(q k^T / sqrt(K)) v through the Pallas splash-attention kernel (TPU's flash
  attention: blockwise, no [N, N] logits in HBM, fused backward): q, k, v [B, N, H, K] ->
  [B, N, H, K].

  The kernel runs per device, so under a mesh (jax.set_mesh, as in the training loop) it is
  wrapped in shard_map over the batch and heads axes the logical rules give ('batch', 'heads');
  a sequence or head-dim sharding is gathered first. N is padded to a multiple of 128 (the
  kernel's block) and the padding is kept out by segment ids, so ViT lengths such as 197 work.
  Off TPU the same kernel runs in Pallas interpret mode: slow, for tests (equal to the XLA path
  in values and gradients on 8 simulated devices, tests/test_vit.py)."""
  mesh = jax.sharding.get_abstract_mesh()
  local = functools.partial(_splash_per_device, causal=causal)
  if mesh.empty:
    return local(q, k, v)
  from jax_transfer import parallel  # Imported here: parallel is not a model dependency.
  spec = parallel.logical_to_pspec(('batch', None, 'heads', None), q.shape, mesh,
                                   nn.get_logical_axis_rules())
  return jax.shard_map(local, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)(q, k, v)


def _splash_per_device(q, k, v, causal: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import (
      splash_attention_kernel as splash, splash_attention_mask as masks)
  _, n, h, d = q.shape
  padded = -(-n // 128) * 128
  block = next(b for b in (512, 256, 128) if padded % b == 0)
  one = masks.CausalMask((padded, padded)) if causal else masks.FullMask((padded, padded))
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                            block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                            block_q_dq=block, block_kv_dq=block)
  kernel = splash.make_splash_mha(masks.MultiHeadMask([one] * h), head_shards=1,
                                  q_seq_shards=1, block_sizes=sizes,
                                  interpret=jax.default_backend() != 'tpu')
  segments = (jnp.arange(padded) >= n).astype(jnp.int32)  # 0 = token, 1 = padding.
  to_kernel = lambda x: jnp.pad(x, ((0, 0), (0, padded - n), (0, 0), (0, 0))).transpose(
      0, 2, 1, 3)  # [B, H, N_pad, K]
  q = q * jnp.asarray(d ** -0.5, q.dtype)  # The kernel does not scale.
  y = jax.vmap(kernel, in_axes=(0, 0, 0, None))(
      to_kernel(q), to_kernel(k), to_kernel(v), splash.SegmentIds(q=segments, kv=segments))
  return y.transpose(0, 2, 1, 3)[:, :n]


ATTENTION_IMPLS = ('auto', 'xla', 'cudnn', 'splash')


def attention_implementation(choice: str, dtype, head_dim: int) -> str:
  """model.attention_impl -> jax.nn.dot_product_attention's `implementation`.

  'auto' picks cuDNN's fused (flash) attention on GPU when cuDNN can run it — bf16/fp16
  inputs and a head dim that is a multiple of 8 up to 128 — and XLA's otherwise (CPU, TPU,
  f32 on GPU). jax's own default (None) is always XLA, so 'auto' is what makes the fused
  kernel reachable. 'cudnn' forces it (an error off GPU), 'xla' forces the plain path.
  'splash' runs the Pallas splash-attention kernel (`splash_attention`): TPU's flash attention,
  opt-in, because at ViT/CLIP lengths (<= 257 tokens, padded to 128-blocks) nothing measured
  here says it beats XLA's attention on TPU; it pays off for long sequences."""
  if choice not in ATTENTION_IMPLS:
    raise ValueError(f'Unknown attention_impl {choice!r}; allowed: {ATTENTION_IMPLS}')
  if choice != 'auto':
    return choice
  eligible = (jax.default_backend() == 'gpu' and
              jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and
              head_dim % 8 == 0 and head_dim <= 128)
  return 'cudnn' if eligible else 'xla'


def ln(name, dtype, param_dtype, epsilon=1e-6):
  """LayerNorm with logically named scale/bias. Statistics are computed in f32 by flax."""
  return nn.LayerNorm(name=name, dtype=dtype, param_dtype=param_dtype, epsilon=epsilon,
                      scale_init=P(nn.initializers.ones, ('embed',)),
                      bias_init=P(nn.initializers.zeros, ('embed',)))


class MLP(nn.Module):
  """Dense(mlp_dim) -> gelu -> Dense(D), big_vision init. x: [B, N, D] -> [B, N, D]."""
  mlp_dim: int
  dropout: float
  dtype: Dtype
  param_dtype: Dtype
  gelu_approximate: bool = True  # tanh GELU (big_vision); False = exact erf GELU (torch)
  quick_gelu: bool = False  # x * sigmoid(1.702 x): OpenAI's CLIP weights (overrides the above)

  @nn.compact
  def __call__(self, x, train: bool = False):
    def dense(features, names, name):  # xavier kernels, normal(1e-6) biases
      return nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
                      kernel_init=P(nn.initializers.xavier_uniform(), names),
                      bias_init=P(nn.initializers.normal(1e-6), names[1:]))
    h = dense(self.mlp_dim, ('embed', 'mlp'), 'fc1')(x)
    h = (h * jax.nn.sigmoid(1.702 * h) if self.quick_gelu
         else nn.gelu(h, approximate=self.gelu_approximate))
    h = nn.with_logical_constraint(h, ('batch', 'length', 'mlp'))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    return dense(x.shape[-1], ('mlp', 'embed'), 'fc2')(h)


class Block(nn.Module):
  """Pre-LN encoder block: x + MHA(LN(x)); x + MLP(LN(x)). x: [B, N, D] -> [B, N, D]."""
  mlp_dim: int
  num_heads: int
  dropout: float
  dtype: Dtype
  param_dtype: Dtype
  ln_eps: float = 1e-6
  gelu_approximate: bool = True
  quick_gelu: bool = False
  causal: bool = False
  attention_impl: str = 'auto'
  prompt_fan_in: int = 0  # > 0: a 'prompt' Hook at the block input (ViT: deep VPT, peft.py)

  @nn.compact
  def __call__(self, x, train: bool = False):  # `train` positional: static under nn.remat
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    drop = nn.Dropout(self.dropout, deterministic=not train)
    if self.prompt_fan_in:
      x = Hook(name='prompt')(x, fan_in=self.prompt_fan_in)
    x = nn.with_logical_constraint(x, ACT)
    attn = Attention(self.num_heads, causal=self.causal, attention_impl=self.attention_impl,
                     name='attn', **kw)
    x = x + drop(attn(ln('ln_1', epsilon=self.ln_eps, **kw)(x)))
    mlp = MLP(self.mlp_dim, self.dropout, gelu_approximate=self.gelu_approximate,
              quick_gelu=self.quick_gelu, name='mlp', **kw)
    y = mlp(ln('ln_2', epsilon=self.ln_eps, **kw)(x), train)
    return nn.with_logical_constraint(x + drop(y), ACT)


class MAPHead(nn.Module):
  """Multihead attention pooling (Lee et al. 2019; SigLIP's image head, big_vision MAPHead):
  a learned probe token attends to all tokens, then a residual MLP on its LayerNorm:
    p = MHA(probe, x);  out = p + MLP(LN(p))        x [B, N, D] -> [B, D]
  Params: probe [1, 1, D], attn/{qkv, out} (the fused layout of Attention: q from the probe,
  k and v from the tokens), ln, mlp/{fc1, fc2}. The MLP width and activation are the
  model's (big_vision passes the ViT's mlp_dim; HF's SiglipMultiheadAttentionPoolingHead uses
  the vision config's intermediate_size and hidden_act)."""
  mlp_dim: int
  num_heads: int
  dtype: Dtype
  param_dtype: Dtype
  ln_eps: float = 1e-6
  gelu_approximate: bool = True
  quick_gelu: bool = False

  @nn.compact
  def __call__(self, x):
    b, _, d = x.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    probe = self.param('probe', P(nn.initializers.xavier_uniform(), (None, None, 'embed')),
                       (1, 1, d), self.param_dtype)
    p = Attention(self.num_heads, attention_impl='xla', name='attn', **kw)(
        jnp.tile(probe.astype(x.dtype), (b, 1, 1)), kv=x)  # [B, 1, D]
    y = ln('ln', epsilon=self.ln_eps, **kw)(p)
    p = p + MLP(self.mlp_dim, 0.0, gelu_approximate=self.gelu_approximate,
                quick_gelu=self.quick_gelu, name='mlp', **kw)(y)
    return p[:, 0]


def block_class(remat: bool, remat_policy: str = 'nothing_saveable', prevent_cse: bool = True):
  """Block, or Block under nn.remat (recompute activations in the backward pass).
  prevent_cse=False is safe (and faster) only inside nn.scan, as in big_vision / MaxText."""
  if not remat:
    return Block
  # static_argnums=(2,): argnum 2 of Block.__call__(self, x, train) is `train`.
  return nn.remat(Block, static_argnums=(2,), prevent_cse=prevent_cse,
                  policy=getattr(jax.checkpoint_policies, remat_policy))


STACKED = 'encoderblocks'  # the scanned blocks' subtree; per-block names are block_name(i)
_BLOCK = re.compile(r'encoderblock_(\d+)')


def block_name(i: int) -> str:
  """The canonical name of block i (a path contract: exports, learngene, checkpoint import, the
  optimizer's and init's regexes)."""
  return f'encoderblock_{i}'


def encoder_blocks(x, train: bool, *, depth: int, scan: bool = False, remat: bool = False,
                   remat_policy: str = 'nothing_saveable', **block_kwargs):
  """`depth` Blocks over x [B, N, D] -> [B, N, D]. Call it inside a parent's nn.compact method:
  the blocks become the parent's children 'encoderblock_{i}', or with scan=True one nn.scan'd
  child 'encoderblocks' whose params are stacked on a leading 'layers' axis (one block is
  traced and compiled once, whatever the depth). remat composes: nn.remat(Block) is the scanned
  body. Each layer gets its own init and dropout rngs in both forms."""
  block = block_class(remat, remat_policy, prevent_cse=not scan)
  if not scan:
    for i in range(depth):
      x = block(**block_kwargs, name=block_name(i))(x, train)
    return x
  scanned = nn.scan(lambda mdl, carry, _: (mdl(carry, train), None),
                    variable_axes={'params': 0}, split_rngs={'params': True, 'dropout': True},
                    length=depth, metadata_params={nn.PARTITION_NAME: 'layers'})
  x, _ = scanned(block(**block_kwargs, name=STACKED), x, None)
  return x


def _stack(*xs):
  """numpy leaves (host-side loading) stay numpy on the host; others become jax arrays."""
  if all(isinstance(x, np.ndarray) for x in xs):
    return np.stack(xs)
  return jnp.stack(xs)


def stack_blocks(params):
  """Per-block -> scan layout, at every level of a plain (unboxed) param tree: sibling subtrees
  encoderblock_0..encoderblock_{L-1} become 'encoderblocks' with every leaf [L, ...]. A tree
  without per-block subtrees (or already stacked) comes back unchanged. Inverse of
  unstack_blocks. Used where per-block params enter a scan model (checkpoint.load_pretrained,
  merge_pretrained, learngene.expand)."""
  if not isinstance(params, Mapping):
    return params
  out = {k: stack_blocks(v) for k, v in params.items() if not _BLOCK.fullmatch(k)}
  idx = sorted(int(_BLOCK.fullmatch(k).group(1)) for k in params if _BLOCK.fullmatch(k))
  if idx:
    if idx != list(range(len(idx))) or STACKED in params:
      raise ValueError(f'cannot stack blocks {idx} (need 0..L-1, no {STACKED!r} beside them)')
    out[STACKED] = jax.tree.map(_stack, *(params[block_name(i)] for i in idx))
  return out


def unstack_blocks(params):
  """Scan -> per-block layout (the canonical one, written by export): every 'encoderblocks'
  subtree with leaves [L, ...] becomes encoderblock_0..encoderblock_{L-1}. A tree without
  stacked blocks comes back unchanged. Inverse of stack_blocks."""
  if not isinstance(params, Mapping):
    return params
  out = {k: unstack_blocks(v) for k, v in params.items() if k != STACKED}
  if STACKED in params:
    depth = {x.shape[0] for x in jax.tree.leaves(params[STACKED])}
    if len(depth) != 1:
      raise ValueError(f'{STACKED!r} leaves have different leading (layer) sizes {depth}')
    for i in range(depth.pop()):
      out[block_name(i)] = jax.tree.map(lambda x, i=i: x[i], params[STACKED])
  return out


def has_stacked_blocks(params) -> bool:
  """True when a param tree holds scan-stacked blocks anywhere."""
  return isinstance(params, Mapping) and (
      STACKED in params or any(has_stacked_blocks(v) for v in params.values()))


POOLS = ('cls', 'gap', 'map')


def resample_posemb(posemb, grid: tuple[int, int], num_prefix: int = 0,
                    old_grid: Optional[tuple[int, int]] = None, method: str = 'bilinear',
                    antialias: bool = False):
  """Position embeddings [1, P + N, D] (P prefix tokens, N = old grid) -> [1, P + gh*gw, D]
  for a new patch grid, resampled as an image, the way timm's `resample_abs_pos_embed` and
  its .npz loader do (F.interpolate, align_corners=False; the .npz loader and this default use
  bilinear without antialiasing; timm's function defaults to bicubic with antialias=True, both
  available here). Prefix (class-token) rows are kept as they are. old_grid: default square.
  method: 'bilinear' (any antialias) or 'bicubic' (antialias=True only: without it torch uses
  the a=-0.75 cubic kernel, jax.image.resize the a=-0.5 one). Equal to timm's function to
  ~1e-6 (tests/test_vit.py). Runs on numpy or jax arrays and returns the same kind."""
  methods = {'bilinear': 'bilinear', 'bicubic': 'cubic'}
  if method not in methods or (method == 'bicubic' and not antialias):
    raise ValueError(f'posemb resampling method={method!r}, antialias={antialias}: allowed '
                     f"'bilinear', or 'bicubic' with antialias=True")
  n = posemb.shape[1] - num_prefix
  if old_grid is None:
    side = int(round(n ** 0.5))
    if side * side != n:
      raise ValueError(f'{n} position embeddings are not a square grid; pass old_grid')
    old_grid = (side, side)
  if old_grid[0] * old_grid[1] != n:
    raise ValueError(f'old_grid {old_grid} does not hold the {n} position embeddings')
  if tuple(old_grid) == tuple(grid):
    return posemb
  is_numpy = isinstance(posemb, np.ndarray)
  prefix, tokens = posemb[:, :num_prefix], posemb[:, num_prefix:]
  d = posemb.shape[-1]
  img = jnp.asarray(tokens, jnp.float32).reshape(old_grid + (d,))
  out = jax.image.resize(img, tuple(grid) + (d,), method=methods[method], antialias=antialias)
  out = jnp.concatenate([jnp.asarray(prefix, jnp.float32),
                         out.reshape(1, grid[0] * grid[1], d)], axis=1).astype(posemb.dtype)
  return np.asarray(out) if is_numpy else out


class ViT(nn.Module):
  """ViT classifier. images: [B, H, W, C] -> (logits [B, num_classes], aux).

  aux: 'tokens' [B, N, D] (encoder output after encoder_norm, before pooling; N includes the
  class token when pool='cls'), 'pre_logits' [B, D] (or [B, representation_size]).
  With num_classes=0 there is no head and logits = pre_logits. H and W must be divisible by
  patch_size; the position-embedding length is fixed by the image size seen at init.
  """
  num_classes: int
  patch_size: int
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  pool: str = 'cls'  # 'cls' (class token) | 'gap' (mean over patch tokens) | 'map' (MAPHead)
  class_token: Optional[bool] = None  # None: only when pool == 'cls' (timm keeps one for 'gap')
  fc_norm: bool = False  # the final LayerNorm after pooling ('fc_norm', timm's avg pool)
  posemb: str = 'learn'
  dropout: float = 0.0
  dtype: Dtype = jnp.float32  # compute dtype; params stay param_dtype
  param_dtype: Dtype = jnp.float32
  remat: bool = False
  remat_policy: str = 'nothing_saveable'  # any name in jax.checkpoint_policies
  scan_layers: bool = False  # nn.scan over blocks: stacked params, one compiled block
  attention_impl: str = 'auto'  # 'auto' (cuDNN fused on GPU for bf16) | 'xla' | 'cudnn'
  head_zero_init: bool = True
  representation_size: Optional[int] = None
  # open_clip parity (see the module docstring); defaults are big_vision's.
  pre_norm: bool = False  # LayerNorm 'ln_pre' after the position embeddings
  ln_eps: float = 1e-6
  gelu_approximate: bool = True
  quick_gelu: bool = False  # OpenAI CLIP's activation
  patch_bias: bool = True

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    if self.pool not in POOLS:
      raise ValueError(f'Unknown pool {self.pool!r}; allowed: {", ".join(POOLS)}')
    cls_token = self.pool == 'cls' if self.class_token is None else self.class_token
    if self.pool == 'cls' and not cls_token:
      raise ValueError("pool='cls' needs the class token (class_token=False given)")
    if self.posemb != 'learn':
      raise ValueError(f'Unknown posemb {self.posemb!r}; allowed: learn')
    b, h, w, _ = images.shape
    p, d = self.patch_size, self.width
    if h % p or w % p:
      raise ValueError(f'Image size {(h, w)} is not divisible by patch_size {p}')
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

    x = nn.Conv(d, (p, p), strides=(p, p), padding='VALID', name='embedding',
                use_bias=self.patch_bias,
                kernel_init=P(nn.initializers.lecun_normal(),
                              ('patch_h', 'patch_w', 'channels', 'embed')),
                bias_init=P(nn.initializers.zeros, ('embed',)), **kw)(images)
    x = jnp.reshape(x, (b, (h // p) * (w // p), d))  # [B, N, D], patches in row-major order
    if cls_token:
      cls = self.param('cls', P(nn.initializers.zeros, (None, None, 'embed')), (1, 1, d),
                       self.param_dtype)
      x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), (b, 1, 1)), x], axis=1)
    # Added after the class token, as in the original ViT (and its parameter count).
    pos = self.param('pos_embedding',
                     P(nn.initializers.normal(stddev=d ** -0.5), (None, 'posemb_len', 'embed')),
                     (1, x.shape[1], d), self.param_dtype)
    x = nn.with_logical_constraint(x + pos.astype(x.dtype), ACT)
    if self.pre_norm:
      x = ln('ln_pre', epsilon=self.ln_eps, **kw)(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)

    # VPT's hooks (peft.py): prompt tokens appended after the position embedding, stripped
    # before the final norm and pooling. fan_in: the patch embedding's, for VPT's init.
    fan_in = p * p * images.shape[-1]
    x = Hook(name='prompt_in')(x, fan_in=fan_in)
    x = encoder_blocks(x, train, depth=self.depth, scan=self.scan_layers, remat=self.remat,
                       remat_policy=self.remat_policy, mlp_dim=self.mlp_dim,
                       num_heads=self.num_heads, dropout=self.dropout, ln_eps=self.ln_eps,
                       gelu_approximate=self.gelu_approximate, quick_gelu=self.quick_gelu,
                       attention_impl=self.attention_impl, prompt_fan_in=fan_in, **kw)
    x = Hook(name='prompt_out')(x)
    if not self.fc_norm:
      x = ln('encoder_norm', epsilon=self.ln_eps, **kw)(x)
    aux = {'tokens': x}

    if self.pool == 'cls':
      x = x[:, 0]  # [B, D]
    elif self.pool == 'gap':
      x = jnp.mean(x[:, int(cls_token):], axis=1)  # patch tokens only, as timm / big_vision
    else:
      x = MAPHead(self.mlp_dim, self.num_heads, ln_eps=self.ln_eps,
                  gelu_approximate=self.gelu_approximate, quick_gelu=self.quick_gelu,
                  name='map_head', **kw)(x)
    if self.fc_norm:
      x = ln('fc_norm', epsilon=self.ln_eps, **kw)(x)
    if self.representation_size:
      x = nn.tanh(nn.Dense(self.representation_size, name='pre_logits',
                           kernel_init=P(nn.initializers.lecun_normal(), ('embed', 'mlp')),
                           bias_init=P(nn.initializers.zeros, ('mlp',)), **kw)(x))
    aux['pre_logits'] = x
    if not self.num_classes:
      return x, aux
    # A zero head makes the initial loss log(num_classes) and fine-tuning starts neutral.
    kinit = nn.initializers.zeros if self.head_zero_init else nn.initializers.lecun_normal()
    logits = nn.Dense(self.num_classes, name='head',
                      kernel_init=P(kinit, ('embed', 'classes')),
                      bias_init=P(nn.initializers.zeros, ('classes',)), **kw)(x)
    chex.assert_shape(logits, (b, self.num_classes))
    return logits, aux


def make_vit(variant: Optional[str] = None, **overrides) -> ViT:
  """make_vit('b/16', num_classes=1000, pool='gap'): a named variant plus field overrides."""
  kwargs = decode_variant(variant) if variant else {}
  kwargs.update(overrides)
  kwargs.setdefault('num_classes', 0)
  return ViT(**kwargs)

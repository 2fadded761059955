"""Two-tower image-text model for CLIP / ALIGN / SigLIP: ViT image tower, causal text tower,
linear projections into a shared embedding space, and the learned logit scale / bias.

  images [B, H, W, C] -> img (ViT, num_classes=0) -> img_proj -> L2 norm -> zimg [B, E]
  tokens [B, L] int32 -> txt (TextTransformer)    -> txt_proj -> L2 norm -> ztxt [B, E]

Losses (losses.py) use logits = exp(logit_scale) * zimg @ ztxt.T (+ logit_bias for SigLIP);
this module only holds the two scalars. Init: CLIP logit_scale_init = log(1/0.07),
logit_bias_init = 0; SigLIP log(10) and -10.

Param layout (logical names in brackets; D = tower width, E = embed_dim):
  img/...                 ViT params (models/vit.py), no head; geometry from image_variant
                          and/or the free-form image_width / _depth / _mlp_dim / _heads /
                          _patch_size; image_pool 'map' adds img/map_head (SigLIP)
  txt/...                 TextTransformer params (models/text.py); text_pool / text_causal
  img_proj/kernel [Di, E] ('embed', 'proj_embed')   bias [E] if image_proj_bias;
                          absent with image_proj=False (SigLIP: the MAP output is zimg)
  txt_proj/kernel [Dt, E] ('embed', 'proj_embed')   bias [E] if text_proj_bias (SigLIP)
  logit_scale []          ()   log of the temperature's inverse, as open_clip
  logit_bias []           ()   always created (unused by the CLIP loss)

open_clip -> jax_transfer weight mapping (exact for open_clip's `CLIP` with its own
`VisionTransformer` and text transformer, pool_type 'tok' for the image and 'argmax' for the
text, no LayerScale, erf GELU; build ours with pre_norm=True, patch_bias=False, ln_eps=1e-5,
gelu_approximate=False, image_pool='cls'). Torch Linear weights are [out, in]; ours are
[in, ...]. Prefix `visual.` -> `img/`; text keys sit at the top level in `CLIP` (and under
`text.` in `CustomTextCLIP`) -> `txt/`. Block i: `transformer.resblocks.{i}.` ->
`encoderblock_{i}/`. D = width, H = heads, K = D // H, p = patch, C = channels.

  visual.conv1.weight [D, C, p, p]      -> img/embedding/kernel [p, p, C, D]
                                           w.transpose(2, 3, 1, 0)
                                           (no bias: patch_bias=False)
  visual.class_embedding [D]            -> img/cls [1, 1, D]                    w.reshape(1, 1, D)
  visual.positional_embedding [N+1, D]  -> img/pos_embedding [1, N+1, D]        w[None]
  visual.ln_pre.{weight, bias}          -> img/ln_pre/{scale, bias}
  visual.ln_post.{weight, bias}         -> img/encoder_norm/{scale, bias}
  visual.proj [D, E]                    -> img_proj/kernel [D, E]               as is (x @ proj)
  token_embedding.weight [V, D]         -> txt/token_embedding/embedding [V, D] as is
  positional_embedding [L, D]           -> txt/positional_embedding [L, D]      as is
  ln_final.{weight, bias}               -> txt/ln_final/{scale, bias}
  text_projection [D, E]                -> txt_proj/kernel [D, E]               as is (x @ proj)
      (nn.Linear form in CustomTextCLIP: weight [E, D] -> w.T)
  logit_scale []                        -> logit_scale []                       as is (a log)
  logit_bias [] (SigLIP-style models)   -> logit_bias []                        else 0
  In every resblock (image and text alike):
  ln_1.{weight, bias}, ln_2.{...}       -> ln_1/{scale, bias}, ln_2/{scale, bias}
  attn.in_proj_weight [3D, D]           -> attn/qkv/kernel [D, 3, H, K]
                                           w.T.reshape(D, 3, H, K)
      (rows are [q; k; v], each head-major: row t*D + h*K + k)
  attn.in_proj_bias [3D]                -> attn/qkv/bias [3, H, K]              b.reshape(3, H, K)
  attn.out_proj.weight [D, D]           -> attn/out/kernel [H, K, D]            w.T.reshape(H, K, D)
  attn.out_proj.bias [D]                -> attn/out/bias [D]
  mlp.c_fc.{weight [M, D], bias [M]}    -> mlp/fc1/{kernel [D, M] = w.T, bias}
  mlp.c_proj.{weight [D, M], bias [D]}  -> mlp/fc2/{kernel [M, D] = w.T, bias}
Inputs: open_clip takes NCHW images (normalised by its preprocess); ours are NHWC, so feed
images.transpose(0, 2, 3, 1). Patches are flattened row-major in both. Attention scale is
1/sqrt(K) in both; the text mask is causal in both; both pool the text at argmax(tokens).
QuickGELU (OpenAI weights and '-quickgelu' configs) is quick_gelu=True. Not representable
here (conversion must refuse them): LayerScale (ls_1/ls_2), open_clip pool_type 'avg' (it keeps a class
token; our 'gap' has none), attentional pooling, timm image towers, text pool 'last'/'first'
or without the causal mask (open_clip's SigLIP text towers), and HF text towers.
"""
import math
from typing import Any, Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from jax_transfer.models.text import TextTransformer
from jax_transfer.models.vit import P, decode_variant, make_vit

Dtype = Any


def l2_normalize(x):
  """x [B, E] -> x / ||x|| in f32 (the norm of bf16 activations is too coarse for the loss);
  a zero vector stays zero, as torch's F.normalize (eps 1e-12 on the norm)."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))


class TwoTowers(nn.Module):
  """encode_image(images [B, H, W, C]) -> [B, E]; encode_text(tokens [B, L]) -> [B, E];
  __call__(images, tokens) -> ((zimg, ztxt), aux). Embeddings are f32 and unit-norm.

  aux: 'logit_scale' (the raw log parameter: the loss uses exp of it), 'logit_bias',
  'img_features' [B, Di] / 'txt_features' [B, Dt] (pooled, before projection; for probes).
  Either input of __call__ may be None; its embedding and features are then None.
  """
  image_variant: Optional[str] = 'b/16'  # shorthand; the image_* fields below override it
  image_width: Optional[int] = None
  image_depth: Optional[int] = None
  image_mlp_dim: Optional[int] = None
  image_heads: Optional[int] = None
  image_patch_size: Optional[int] = None
  image_pool: str = 'cls'  # 'cls' | 'gap' | 'map' (SigLIP's MAPHead)
  image_class_token: Optional[bool] = None  # None: only with image_pool='cls'
  image_proj: bool = True  # False: the pooled image features are the embedding (SigLIP)
  image_proj_bias: bool = False
  text_proj_bias: bool = False  # SigLIP's text head has a bias
  text_pool: str = 'argmax'  # 'argmax' | 'eot' | 'last' | 'first' (models/text.py)
  text_eot_id: Optional[int] = None  # text_pool='eot'
  text_causal: bool = True  # False: SigLIP's bidirectional text tower
  text_width: int = 512
  text_depth: int = 12
  text_heads: int = 8
  text_mlp_dim: Optional[int] = None  # None: 4 * text_width
  vocab_size: int = 49408
  context_length: int = 77
  embed_dim: int = 512
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False
  remat_policy: str = 'nothing_saveable'
  scan_layers: bool = False  # nn.scan over the blocks of both towers (stacked params)
  attention_impl: str = 'auto'  # both towers; see models/vit.py attention_implementation
  logit_scale_init: float = math.log(1 / 0.07)  # CLIP; SigLIP: log(10)
  logit_bias_init: float = 0.0  # SigLIP: -10
  # open_clip parity (see the module docstring), passed to both towers.
  ln_eps: float = 1e-6
  gelu_approximate: bool = True
  quick_gelu: bool = False  # OpenAI's weights and open_clip '-quickgelu' models
  pre_norm: bool = False
  patch_bias: bool = True

  def _block_kwargs(self) -> dict:
    """The fields both towers' transformers are built with."""
    return dict(dtype=self.dtype, param_dtype=self.param_dtype, remat=self.remat,
                remat_policy=self.remat_policy, scan_layers=self.scan_layers,
                ln_eps=self.ln_eps, attention_impl=self.attention_impl,
                gelu_approximate=self.gelu_approximate, quick_gelu=self.quick_gelu)

  def image_vit_kwargs(self) -> dict:
    """make_vit's keyword arguments for the image tower (a headless ViT): its geometry, pooling
    and the shared block fields. setup builds `img` from them and export.export_tower writes
    them as a plain vit config, so the two cannot drift apart."""
    return dict(num_classes=0, pool=self.image_pool, class_token=self.image_class_token,
                pre_norm=self.pre_norm, patch_bias=self.patch_bias, **self.image_geometry(),
                **self._block_kwargs())

  def setup(self):
    kw = self._block_kwargs()
    self.img = make_vit(None, **self.image_vit_kwargs())
    self.txt = TextTransformer(
        vocab_size=self.vocab_size, context_length=self.context_length,
        width=self.text_width, depth=self.text_depth, num_heads=self.text_heads,
        mlp_dim=self.text_mlp_dim or 4 * self.text_width, pool=self.text_pool,
        eot_id=self.text_eot_id, causal=self.text_causal, **kw)

    def proj(name, width, bias):  # open_clip init: normal(width ** -0.5)
      return nn.Dense(self.embed_dim, use_bias=bias, name=name, dtype=self.dtype,
                      param_dtype=self.param_dtype,
                      kernel_init=P(nn.initializers.normal(width ** -0.5),
                                    ('embed', 'proj_embed')),
                      bias_init=P(nn.initializers.zeros, ('proj_embed',)))
    self.img_proj = (proj('img_proj', self.img.width, self.image_proj_bias) if self.image_proj
                     else lambda x: x)
    self.txt_proj = proj('txt_proj', self.text_width, self.text_proj_bias)
    self.logit_scale = self.param(
        'logit_scale', P(nn.initializers.constant(self.logit_scale_init), ()), (),
        self.param_dtype)
    self.logit_bias = self.param(
        'logit_bias', P(nn.initializers.constant(self.logit_bias_init), ()), (),
        self.param_dtype)

  def image_geometry(self) -> dict:
    """The image ViT's width, depth, mlp_dim, num_heads, patch_size: image_variant's, each
    overridden by the image_* field given."""
    return image_geometry(self)

  def _image(self, images, train):
    features, _ = self.img(images, train=train)  # [B, Di]
    return l2_normalize(self.img_proj(features)), features

  def _text(self, tokens, train):
    features, _ = self.txt(tokens, train=train)  # [B, Dt]
    return l2_normalize(self.txt_proj(features)), features

  def encode_image(self, images, *, train: bool = False):
    """images [B, H, W, C] -> zimg [B, E], f32, unit-norm."""
    z, _ = self._image(images, train)
    chex.assert_shape(z, (images.shape[0], self.embed_dim))
    return z

  def encode_text(self, tokens, *, train: bool = False):
    """tokens [B, L] int32 -> ztxt [B, E], f32, unit-norm."""
    z, _ = self._text(tokens, train)
    chex.assert_shape(z, (tokens.shape[0], self.embed_dim))
    return z

  def __call__(self, images, tokens, *, train: bool = False):
    zimg = fimg = ztxt = ftxt = None
    if images is not None:
      zimg, fimg = self._image(images, train)
    if tokens is not None:
      ztxt, ftxt = self._text(tokens, train)
    aux = {'logit_scale': self.logit_scale, 'logit_bias': self.logit_bias,
           'img_features': fimg, 'txt_features': ftxt}
    return (zimg, ztxt), aux


_GEOMETRY = (('width', 'image_width'), ('depth', 'image_depth'), ('mlp_dim', 'image_mlp_dim'),
             ('num_heads', 'image_heads'), ('patch_size', 'image_patch_size'))


def image_geometry(model_cfg) -> dict:
  """TwoTowers fields (the module or config.model) -> the image ViT's geometry kwargs."""
  get = (model_cfg.get if hasattr(model_cfg, 'get')
         else lambda k, d=None: getattr(model_cfg, k, d))
  variant = get('image_variant', 'b/16')
  out = decode_variant(variant) if variant else {}
  for key, field in _GEOMETRY:
    if get(field) is not None:
      out[key] = get(field)
  missing = [field for key, field in _GEOMETRY if key not in out]
  if missing:
    raise ValueError(f'image tower geometry incomplete: image_variant={variant!r} leaves '
                     f'{missing} unset (a variant needs a patch size, e.g. "b/16")')
  return out


def make_two_towers(**kwargs) -> TwoTowers:
  """make_two_towers(image_variant='mu/4', text_width=64, ...) -> TwoTowers; or a free-form
  image tower: image_variant=None, image_width=96, image_depth=3, image_mlp_dim=200,
  image_heads=3, image_patch_size=8.

  Checks what can be checked before init (config validation builds the model, never inits it).
  """
  from jax_transfer.models.text import TEXT_POOLS
  from jax_transfer.models.vit import POOLS
  model = TwoTowers(**kwargs)
  geo = image_geometry(model)  # ValueError if the variant is unknown or incomplete
  if model.image_pool not in POOLS:
    raise ValueError(f'Unknown image_pool {model.image_pool!r}; allowed: {", ".join(POOLS)}')
  if model.text_pool not in TEXT_POOLS:
    raise ValueError(f'Unknown text_pool {model.text_pool!r}; allowed: {", ".join(TEXT_POOLS)}')
  for tower, width, heads in (('image', geo['width'], geo['num_heads']),
                              ('text', model.text_width, model.text_heads)):
    if width % heads:
      raise ValueError(f'{tower} width {width} is not divisible by its {heads} heads')
  if not model.image_proj and geo['width'] != model.embed_dim:
    raise ValueError(f'image_proj=False needs image width {geo["width"]} == embed_dim '
                     f'{model.embed_dim}')
  return model

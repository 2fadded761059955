"""Two-tower model (ViT + causal text Transformer) and the offline caption tokenizer."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_transfer import config as config_lib
from jax_transfer.models import get_model, make_two_towers
from jax_transfer.models.text import TextTransformer
from jax_transfer.tokenizer import Tokenizer

IMG, L, V = 16, 8, 20
TINY = dict(image_variant='nano/8', text_width=32, text_depth=2, text_heads=2, vocab_size=V,
            context_length=L, embed_dim=24)
CAPTIONS = ['A red square', 'a blue circle!', 'A red circle on the left', 'blue, blue square']


def _tokens(rng, n=3):
  """[n, L] with a random EOT position per row (EOT = V - 1, the largest id), zero padding."""
  toks = np.zeros((n, L), np.int32)
  for row, eot in zip(toks, rng.integers(2, L, size=n)):
    row[0] = 2
    row[1:eot] = rng.integers(3, V - 1, size=eot - 1)
    row[eot] = V - 1
  return toks


@pytest.fixture(scope='module')
def tiny():
  model = make_two_towers(**TINY)
  rng = np.random.default_rng(0)
  images = jax.random.normal(jax.random.PRNGKey(1), (3, IMG, IMG, 3))
  tokens = _tokens(rng)
  variables = model.init(jax.random.PRNGKey(0), images[:1], tokens[:1])
  return model, variables, images, tokens


def test_shapes_unit_norm_and_methods_agree(tiny):
  model, variables, images, tokens = tiny
  (zimg, ztxt), aux = model.apply(variables, images, tokens)
  assert zimg.shape == ztxt.shape == (3, 24) and zimg.dtype == ztxt.dtype == jnp.float32
  np.testing.assert_allclose(np.linalg.norm(zimg, axis=-1), 1, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(ztxt, axis=-1), 1, rtol=1e-5)
  assert aux['img_features'].shape == (3, 32) and aux['txt_features'].shape == (3, 32)
  np.testing.assert_allclose(aux['logit_scale'], math.log(1 / 0.07), rtol=1e-6)
  assert float(aux['logit_bias']) == 0.0
  np.testing.assert_allclose(model.apply(variables, images, method=model.encode_image), zimg,
                             atol=1e-6)
  np.testing.assert_allclose(model.apply(variables, tokens, method=model.encode_text), ztxt,
                             atol=1e-6)
  # Different inputs must give different embeddings (the normalisation is not degenerate).
  assert not np.allclose(zimg[0], zimg[1], atol=1e-3)
  assert not np.allclose(ztxt[0], ztxt[1], atol=1e-3)


def test_text_pools_at_eot_causally(tiny):
  model, variables, _, tokens = tiny
  encode = jax.jit(lambda t: model.apply(variables, t, method=model.encode_text))
  tokens = np.zeros_like(tokens)
  tokens[:, :3] = [[2, 4, 6], [2, 9, 10], [2, 15, 3]]
  tokens[:, 3] = V - 1  # EOT at position 3 in every row, then padding
  ref = encode(tokens)
  after = tokens.copy()
  after[:, 4:] = np.array([7, 8, 9, 3])  # tokens after EOT (ids < EOT) do not matter
  np.testing.assert_allclose(encode(after), ref, atol=1e-6)
  before = tokens.copy()
  before[:, 2] = np.where(before[:, 2] == 11, 12, 11)  # a token before EOT does
  assert np.all(np.abs(encode(before) - ref).max(axis=-1) > 1e-4)


def test_logit_init_and_registry_from_config_dtype(tiny):
  _, variables, images, tokens = tiny
  model = get_model('two_towers', **config_lib.model_kwargs(_model_cfg(
      dtype='bfloat16', logit_scale_init=math.log(10), logit_bias_init=-10.0)))
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), images, tokens)
  assert jax.tree.structure(shapes) == jax.tree.structure(variables)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nn.unbox(shapes)))
  init = nn.unbox(model.init(jax.random.PRNGKey(0), images, tokens,
                             method=lambda m, *_: (m.logit_scale, m.logit_bias)))['params']
  np.testing.assert_allclose(init['logit_scale'], math.log(10), rtol=1e-6)
  assert float(init['logit_bias']) == -10.0
  (zimg, ztxt), aux = model.apply(variables, images, tokens)  # bf16 compute, f32 params
  assert zimg.dtype == ztxt.dtype == jnp.float32 and aux['img_features'].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.linalg.norm(ztxt, axis=-1), 1, rtol=1e-5)
  with pytest.raises(ValueError, match='allowed'):
    make_two_towers(**dict(TINY, image_pool='tok'))


def _model_cfg(**overrides):
  import ml_collections
  return ml_collections.ConfigDict(dict(TINY, **overrides))


def test_param_tree_and_logical_names(tiny):
  _, variables, _, _ = tiny
  params = nn.unbox(variables)['params']
  assert set(params) == {'img', 'txt', 'img_proj', 'txt_proj', 'logit_scale', 'logit_bias'}
  assert 'head' not in params['img'] and 'bias' not in params['img_proj']
  assert params['txt']['token_embedding']['embedding'].shape == (V, 32)
  assert params['txt']['positional_embedding'].shape == (L, 32)
  assert params['txt']['encoderblock_1']['attn']['qkv']['kernel'].shape == (32, 3, 2, 16)
  leaves = jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  specs = jax.tree.leaves(nn.get_partition_spec(variables),
                          is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  assert len(specs) == len(leaves)
  for box, spec in zip(leaves, specs):
    assert len(spec) == box.value.ndim, (box.names, box.value.shape)


def test_open_clip_parity_options(tiny):
  """pre_norm adds ln_pre, patch_bias=False drops the conv bias; ln_eps / exact GELU change
  the function slightly; nothing else in the tree moves."""
  base, variables, images, tokens = tiny
  oc = make_two_towers(**TINY, pre_norm=True, patch_bias=False, ln_eps=1e-5,
                       gelu_approximate=False)
  pb = nn.unbox(variables)['params']
  po = nn.unbox(jax.eval_shape(oc.init, jax.random.PRNGKey(0), images, tokens))['params']
  assert po['img']['ln_pre']['scale'].shape == (32,) and 'ln_pre' not in pb['img']
  assert 'bias' in pb['img']['embedding'] and 'bias' not in po['img']['embedding']
  del po['img']['ln_pre']
  pb_img = dict(pb['img'], embedding={'kernel': pb['img']['embedding']['kernel']})
  assert jax.tree.structure(po) == jax.tree.structure(dict(pb, img=pb_img))
  zb = base.apply(variables, tokens, method=base.encode_text)
  zo = oc.apply(variables, tokens, method=oc.encode_text)  # the text trees are identical
  assert 0 < np.abs(zb - zo).max() < 1e-2


def test_text_tower_matches_reference_causal_attention():
  """The causal Block equals attention with an explicit lower-triangular mask (1 layer)."""
  model = TextTransformer(vocab_size=V, context_length=L, width=8, depth=1, num_heads=2,
                          mlp_dim=16)
  tokens = _tokens(np.random.default_rng(3), 2)
  v = nn.unbox(model.init(jax.random.PRNGKey(0), tokens))['params']
  _, aux = model.apply({'params': v}, tokens)
  v = jax.tree.map(np.asarray, v)

  def lnorm(x, p):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-6) * p['scale'] + p['bias']

  x = np.asarray(v['token_embedding']['embedding'])[tokens] + v['positional_embedding'][:L]
  b = v['encoderblock_0']
  qkv = np.einsum('bnd,dthk->bnthk', lnorm(x, b['ln_1']), b['attn']['qkv']['kernel'])
  qkv = qkv + b['attn']['qkv']['bias']
  q, k, vv = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  s = np.einsum('bqhk,bshk->bhqs', q, k) / np.sqrt(4)
  s = np.where(np.tril(np.ones((L, L), bool)), s, -np.inf)
  a = np.exp(s - s.max(-1, keepdims=True))
  a = a / a.sum(-1, keepdims=True)
  y = np.einsum('bhqs,bshk->bqhk', a, vv)
  x = x + np.einsum('bqhk,hkd->bqd', y, b['attn']['out']['kernel']) + b['attn']['out']['bias']
  h = lnorm(x, b['ln_2']) @ b['mlp']['fc1']['kernel'] + b['mlp']['fc1']['bias']
  h = jax.nn.gelu(h, approximate=True)
  x = x + h @ b['mlp']['fc2']['kernel'] + b['mlp']['fc2']['bias']
  np.testing.assert_allclose(aux['tokens'], lnorm(x, v['ln_final']), atol=1e-4)


# ------------------------------------------------------------------------------- tokenizer

def test_tokenizer_vocabulary_order_and_round_trip():
  tok = Tokenizer.train(CAPTIONS, context_length=8)
  # a x3, blue x3, circle / red / square x2, left / on / the x1: ties alphabetical.
  assert tok.words == ['a', 'blue', 'circle', 'red', 'square', 'left', 'on', 'the']
  assert tok.words == Tokenizer.train(CAPTIONS[::-1], context_length=8).words
  assert tok.vocab_size == 3 + len(tok.words) + 1 and tok.eot == tok.vocab_size - 1
  ids = tok.encode(CAPTIONS)
  assert ids.dtype == np.int32 and ids.shape == (4, 8)
  assert np.all(ids.max(axis=1) == tok.eot) and np.all(ids.argmax(axis=1) == [4, 4, 7, 4])
  assert list(ids[0]) == [2, tok._ids['a'], tok._ids['red'], tok._ids['square'], tok.eot,
                          0, 0, 0]
  assert tok.decode(ids) == ['a red square', 'a blue circle', 'a red circle on the left',
                             'blue blue square']
  assert tok.decode(tok.encode(['a green square'])) == ['a <unk> square']


def test_tokenizer_truncation_and_vocab_size():
  tok = Tokenizer.train(CAPTIONS, vocab_size=6, context_length=4)
  assert tok.vocab_size == 6 and tok.words == ['a', 'blue']
  ids = tok.encode(['a red circle on the left', 'blue'])
  assert list(ids[0]) == [2, 3, 1, 5] and list(ids[1]) == [2, 4, 5, 0]  # red -> unk (1)
  assert ids.max() == tok.eot == 5


def test_tokenizer_json_save_load(tmp_path):
  for level in ('word', 'char'):
    tok = Tokenizer.train(CAPTIONS, context_length=12, level=level)
    path = str(tmp_path / f'{level}.json')
    tok.save(path)
    back = Tokenizer.load(path)
    assert back == tok and np.array_equal(back.encode(CAPTIONS), tok.encode(CAPTIONS))
  assert tok.decode(tok.encode(['red square'])) == ['red square']  # char level, 10 chars
  (tmp_path / 'bad.json').write_text('{"format": "other"}')
  with pytest.raises(ValueError, match='not a'):
    Tokenizer.load(str(tmp_path / 'bad.json'))


def test_documented_open_clip_mapping_for_attention_and_patches():
  """The in_proj / out_proj / conv1 rules in two_towers.py's docstring, against numpy versions
  of torch's nn.MultiheadAttention and NCHW Conv2d math on torch-layout weights."""
  from jax_transfer.models.vit import Attention
  rng = np.random.default_rng(4)
  b, n, d, h, c, p = 2, 5, 8, 2, 3, 4
  k = d // h
  x = rng.normal(size=(b, n, d)).astype(np.float32)
  w_in, b_in = rng.normal(size=(3 * d, d)), rng.normal(size=(3 * d,))
  w_out, b_out = rng.normal(size=(d, d)), rng.normal(size=(d,))
  q, kk, v = np.split(x @ w_in.T + b_in, 3, axis=-1)  # torch: x W^T + b, then chunk(3)
  heads = lambda t: t.reshape(b, n, h, k)  # noqa: E731  torch splits each of q/k/v by head
  s = np.einsum('bqhk,bshk->bhqs', heads(q), heads(kk)) / np.sqrt(k)
  a = np.exp(s - s.max(-1, keepdims=True))
  y = np.einsum('bhqs,bshk->bqhk', a / a.sum(-1, keepdims=True), heads(v)).reshape(b, n, d)
  ref = y @ w_out.T + b_out
  params = {'qkv': {'kernel': w_in.T.reshape(d, 3, h, k), 'bias': b_in.reshape(3, h, k)},
            'out': {'kernel': w_out.T.reshape(h, k, d), 'bias': b_out}}
  ours = Attention(h, jnp.float32, jnp.float32).apply({'params': params}, x)
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)

  imgs = rng.normal(size=(b, c, 2 * p, 2 * p)).astype(np.float32)  # NCHW, 2x2 patches
  w_conv = rng.normal(size=(d, c, p, p))
  patches = imgs.reshape(b, c, 2, p, 2, p).transpose(0, 2, 4, 1, 3, 5)  # [B, gh, gw, C, p, p]
  ref = np.einsum('bijcuv,dcuv->bijd', patches, w_conv).reshape(b, 4, d)  # row-major patches
  conv = nn.Conv(d, (p, p), strides=(p, p), padding='VALID', use_bias=False)
  ours = conv.apply({'params': {'kernel': w_conv.transpose(2, 3, 1, 0)}},
                    imgs.transpose(0, 2, 3, 1)).reshape(b, 4, d)
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)

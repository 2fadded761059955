"""ViT: shapes, logical-axis annotations, reference param count, dtypes, remat, equivariance."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_transfer.models import decode_variant, get_model, make_vit

IMG = 32  # nano/8 at 32px: 16 patches


def _init(model, img=IMG, seed=0):
  return model.init(jax.random.PRNGKey(seed), jnp.zeros((2, img, img, 3)))


@pytest.mark.parametrize('pool,num_classes,tokens', [('cls', 10, 17), ('gap', 10, 16),
                                                     ('cls', 0, 17), ('gap', 0, 16)])
def test_output_shapes(pool, num_classes, tokens):
  model = make_vit('nano/8', num_classes=num_classes, pool=pool)
  variables = _init(model)
  logits, aux = model.apply(variables, jnp.ones((3, IMG, IMG, 3)))
  assert aux['tokens'].shape == (3, tokens, 32)
  assert aux['pre_logits'].shape == (3, 32)
  assert logits.shape == ((3, num_classes) if num_classes else (3, 32))
  assert ('head' in variables['params']) == bool(num_classes)


def test_non_square_image_and_representation():
  model = make_vit('nano/8', num_classes=5, representation_size=12)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 40, 3)))
  logits, aux = model.apply(variables, jnp.ones((2, 16, 40, 3)))
  assert aux['tokens'].shape == (2, 1 + 2 * 5, 32)
  assert aux['pre_logits'].shape == (2, 12) and logits.shape == (2, 5)


def test_every_param_has_logical_names():
  variables = _init(make_vit('nano/8', num_classes=10, representation_size=8))
  leaves = jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  specs = jax.tree.leaves(nn.get_partition_spec(variables),
                          is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  assert len(specs) == len(leaves)
  for box, spec in zip(leaves, specs):
    assert len(spec) == box.value.ndim, (box.names, box.value.shape)


def test_vit_b16_param_count():
  model = make_vit('b/16', num_classes=1000)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(shapes)))
  assert count == 86_567_656


def test_init_statistics():
  params = nn.unbox(_init(make_vit('mu/8', num_classes=10)))['params']
  assert np.all(params['head']['kernel'] == 0)  # head_zero_init
  np.testing.assert_allclose(np.std(params['pos_embedding']), 64 ** -0.5, rtol=0.1)
  # Each of q, k, v is xavier on [D, D]: std = sqrt(2 / (D + D)) = 1/8.
  q = params['encoderblock_0']['attn']['qkv']['kernel'][:, 0]
  np.testing.assert_allclose(np.std(q), 1 / 8, rtol=0.1)
  assert 0 < np.abs(params['encoderblock_0']['mlp']['fc1']['bias']).max() < 1e-4


def test_bf16_compute_keeps_f32_params():
  model = make_vit('nano/8', num_classes=10, dtype=jnp.bfloat16, head_zero_init=False)
  variables = _init(model)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nn.unbox(variables)))
  logits, aux = model.apply(variables, jnp.ones((2, IMG, IMG, 3)))
  assert logits.dtype == aux['tokens'].dtype == aux['pre_logits'].dtype == jnp.bfloat16


def test_remat_matches_no_remat():
  x = jax.random.normal(jax.random.PRNGKey(1), (2, IMG, IMG, 3))
  kw = dict(num_classes=10, head_zero_init=False)
  plain, remat = make_vit('nano/8', **kw), make_vit('nano/8', remat=True, **kw)
  variables = _init(plain)
  assert jax.tree.structure(variables) == jax.tree.structure(_init(remat))  # same paths

  def loss(model, v):
    logits, _ = model.apply(v, x, train=True)
    return jnp.sum(logits ** 2)

  # Both jitted: recomputation may fuse differently, so compare to float tolerance.
  l0, g0 = jax.jit(jax.value_and_grad(lambda v: loss(plain, v)))(variables)
  l1, g1 = jax.jit(jax.value_and_grad(lambda v: loss(remat, v)))(variables)
  np.testing.assert_allclose(l0, l1, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               nn.unbox(g0), nn.unbox(g1))


def test_dropout_uses_rng_only_when_training():
  model = make_vit('nano/8', num_classes=10, dropout=0.5)
  variables = _init(model)
  x = jnp.ones((2, IMG, IMG, 3))
  _, a = model.apply(variables, x)  # eval: deterministic, no rng needed
  _, b = model.apply(variables, x, train=True, rngs={'dropout': jax.random.PRNGKey(1)})
  _, c = model.apply(variables, x, train=True, rngs={'dropout': jax.random.PRNGKey(2)})
  assert not np.allclose(a['tokens'], b['tokens']) and not np.allclose(b['tokens'], c['tokens'])


def test_gap_without_posemb_is_patch_permutation_equivariant():
  model = make_vit('nano/8', num_classes=0, pool='gap')
  variables = nn.unbox(_init(model))
  variables['params']['pos_embedding'] = jnp.zeros_like(variables['params']['pos_embedding'])
  x = jax.random.normal(jax.random.PRNGKey(3), (2, IMG, IMG, 3))
  g = IMG // 8
  # [B, H, W, C] -> [B, g*g, 8, 8, C] in the row-major patch order the model uses.
  patches = x.reshape(2, g, 8, g, 8, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, g * g, 8, 8, 3)
  perm = jax.random.permutation(jax.random.PRNGKey(4), g * g)
  x_perm = patches[:, perm].reshape(2, g, g, 8, 8, 3).transpose(0, 1, 3, 2, 4, 5)
  x_perm = x_perm.reshape(x.shape)
  out, aux = model.apply(variables, x)
  out_p, aux_p = model.apply(variables, x_perm)
  np.testing.assert_allclose(aux_p['tokens'], aux['tokens'][:, perm], atol=1e-5)
  np.testing.assert_allclose(out_p, out, atol=1e-5)  # mean pooling is invariant
  assert not np.allclose(aux_p['tokens'], aux['tokens'], atol=1e-3)  # the check has teeth


def test_decode_variant_and_registry_errors():
  assert decode_variant('b/16') == dict(patch_size=16, width=768, depth=12, mlp_dim=3072,
                                        num_heads=12)
  with pytest.raises(ValueError, match='allowed'):
    decode_variant('xl/16')
  with pytest.raises(ValueError, match=r"Unknown model 'densenet'; allowed: .*vit"):
    get_model('densenet')
  assert isinstance(get_model('vit', variant='nano/8', num_classes=3), nn.Module)


def test_attention_implementation_choice():
  """'auto' reaches cuDNN's fused kernel only on GPU with bf16/fp16 and an eligible head dim;
  elsewhere (this CPU) XLA. jax's own default (None) would never pick cuDNN."""
  import jax.numpy as jnp
  from jax_transfer.models.vit import attention_implementation
  assert attention_implementation("auto", jnp.bfloat16, 64) == (
      "cudnn" if jax.default_backend() == "gpu" else "xla")
  assert attention_implementation("auto", jnp.float32, 64) == "xla"
  assert attention_implementation("xla", jnp.bfloat16, 64) == "xla"
  assert attention_implementation("splash", jnp.bfloat16, 64) == "splash"  # Opt-in only.
  with pytest.raises(ValueError, match="Unknown attention_impl 'flash'"):
    attention_implementation("flash", jnp.float32, 64)


@pytest.mark.parametrize("causal", [False, True])
def test_cpu_attention_matches_dot_product_attention(causal):
  """The einsum attention used on CPU gives jax.nn.dot_product_attention's values and
  gradients (f32), with and without the causal mask."""
  from jax_transfer.models.vit import cpu_attention
  q, k, v, ct = (jax.random.normal(key, (3, 7, 2, 8))
                 for key in jax.random.split(jax.random.key(0), 4))
  ref = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal)
  ours = lambda q, k, v: cpu_attention(q, k, v, causal)
  np.testing.assert_allclose(ours(q, k, v), ref(q, k, v), atol=1e-6)
  for g, g_ref in zip(jax.vjp(ours, q, k, v)[1](ct), jax.vjp(ref, q, k, v)[1](ct)):
    np.testing.assert_allclose(g, g_ref, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_splash_attention_matches_xla_on_a_mesh(causal):
  """The Pallas splash-attention path (TPU's flash attention; Pallas interpret mode here) gives
  the XLA path's values and gradients: 17 tokens padded to the kernel's 128-block and masked by
  segment ids, shard_map over batch (data x fsdp = 4) and heads (tensor = 2) on 8 devices."""
  from jax_transfer import parallel
  from jax_transfer.models.vit import cpu_attention, splash_attention
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  q, k, v, ct = (jax.random.normal(key, (4, 17, 2, 8))
                 for key in jax.random.split(jax.random.key(1), 4))

  def vjp(fn):
    with jax.set_mesh(mesh), parallel.with_sharding_rules(parallel.DEFAULT_RULES):
      y, back = jax.jit(lambda q, k, v: jax.vjp(lambda *a: fn(*a, causal), q, k, v))(q, k, v)
      return y, back(ct)
  (y, grads), (y_ref, grads_ref) = vjp(splash_attention), vjp(cpu_attention)
  np.testing.assert_allclose(y, y_ref, atol=1e-5)
  for g, g_ref in zip(grads, grads_ref):
    np.testing.assert_allclose(g, g_ref, atol=1e-4)


def test_splash_attention_in_a_scanned_vit_equals_xla():
  """attention_impl='splash' inside a scan + remat ViT, jitted under the training loop's mesh
  context: same logits and parameter gradients as 'xla'."""
  from jax_transfer import parallel
  mesh = parallel.make_mesh({"data": 4, "fsdp": 1, "tensor": 2})
  x = jax.random.normal(jax.random.key(0), (8, 8, 8, 3))
  models = {impl: get_model("vit", variant="nano/2", num_classes=5, num_heads=2, depth=2,
                            scan_layers=True, remat=True, attention_impl=impl)
            for impl in ("xla", "splash")}
  params = models["xla"].init(jax.random.key(1), x, train=False)

  def loss_and_grad(model):
    loss = lambda p: (model.apply(p, x, train=False)[0] ** 2).mean()
    with jax.set_mesh(mesh), parallel.with_sharding_rules(parallel.DEFAULT_RULES):
      return jax.jit(jax.value_and_grad(loss))(params)
  (l, g), (l_ref, g_ref) = loss_and_grad(models["splash"]), loss_and_grad(models["xla"])
  np.testing.assert_allclose(l, l_ref, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), g, g_ref)


@pytest.mark.parametrize("old,new,prefix,method,antialias", [
    ((7, 7), (10, 10), 1, "bilinear", False), ((8, 8), (5, 5), 0, "bilinear", False),
    ((6, 6), (9, 4), 1, "bilinear", True), ((4, 4), (6, 6), 1, "bicubic", True)])
def test_resample_posemb_matches_timm(old, new, prefix, method, antialias):
  """vit.resample_posemb equals timm's resample_abs_pos_embed on the same array (up- and
  down-sampling, a non-square target, a class-token row kept)."""
  import open_clip_shim
  timm = open_clip_shim.load_timm()
  if timm is None:
    pytest.skip("torch / timm not installed (bash setup_env.sh dev)")
  import torch
  from jax_transfer.models.vit import resample_posemb
  pe = np.random.default_rng(0).normal(size=(1, prefix + old[0] * old[1], 12)).astype(
      np.float32)
  want = timm.layers.resample_abs_pos_embed(
      torch.from_numpy(pe), list(new), list(old), num_prefix_tokens=prefix,
      interpolation=method, antialias=antialias).numpy()
  got = resample_posemb(pe, new, prefix, old, method=method, antialias=antialias)
  assert isinstance(got, np.ndarray) and got.shape == want.shape
  np.testing.assert_allclose(got, want, atol=5e-6, rtol=0)
  np.testing.assert_array_equal(got[:, :prefix], pe[:, :prefix])


def test_merge_pretrained_resamples_posemb_for_another_image_size():
  """Fine-tuning an export at another resolution: init resamples pos_embedding (keeping the
  class-token row) instead of failing on the shape."""
  from jax_transfer import checkpoint
  from jax_transfer.models.vit import resample_posemb
  small, large = make_vit("nano/4", num_classes=3), make_vit("nano/4", num_classes=3)
  p16 = nn.unbox(small.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"])
  p32 = nn.unbox(large.init(jax.random.key(1), jnp.zeros((1, 32, 32, 3)))["params"])
  merged = checkpoint.merge_pretrained(p32, p16)
  want = resample_posemb(np.asarray(p16["pos_embedding"]), (8, 8), 1)
  np.testing.assert_allclose(merged["pos_embedding"], want, rtol=0, atol=0)
  np.testing.assert_array_equal(merged["encoderblock_0"]["attn"]["qkv"]["kernel"],
                                p16["encoderblock_0"]["attn"]["qkv"]["kernel"])


@pytest.mark.parametrize("variant,timm_name,kwargs", [
    ("h/14", "vit_huge_patch14_224", dict(num_classes=1000)),
    ("g/14", "vit_giant_patch14_224", dict(num_classes=1000)),
    ("bigG/14", "vit_gigantic_patch14_224", dict(num_classes=1000)),
    ("So400m/14", "vit_so400m_patch14_siglip_224", dict(num_classes=0, pool="map"))])
def test_large_variants_have_timms_parameter_count(variant, timm_name, kwargs):
  """The h / g / bigG / So400m shorthands are the published geometries: the parameter count
  at 224 px equals timm's model of that name (built on torch's meta device: no memory), the
  So400m one with SigLIP's MAP head."""
  import open_clip_shim
  timm = open_clip_shim.load_timm()
  if timm is None:
    pytest.skip("torch / timm not installed (bash setup_env.sh dev)")
  import torch
  with torch.device("meta"):
    ref = timm.create_model(timm_name, pretrained=False, num_classes=kwargs["num_classes"])
  model = make_vit(variant, **kwargs)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
  ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(shapes["params"])))
  assert ours == sum(p.numel() for p in ref.parameters())

"""config.peft (jax_transfer/peft.py): one PEFT mechanism for every model, by interception.

Invariants: LoRA (B = 0) and zero-initialised adapters leave the model's function unchanged at
init and the base parameters bitwise equal; LoRA adds r * (d_in + d_out) parameters per
matrix; under scan_layers the PEFT parameters stack on the layers axis like their block;
training moves only the PEFT parameters and the head; 8 simulated devices equal 1.
"""
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import tiny_vit_config
from jax_transfer import config as config_lib, peft, train
from jax_transfer.models import make_vit, make_two_towers


def _cfg(**peft_fields):
  from ml_collections_configs.supervised import digits_vit
  c = digits_vit.get_config("runlocal")
  c.peft.update(peft_fields)
  return c


def _flat(tree):
  return flax.traverse_util.flatten_dict(nn.unbox(tree), sep="/")


@pytest.mark.parametrize("method", ["lora", "adapter", "parallel_adapter"])
@pytest.mark.parametrize("scan", [False, True])
def test_init_equals_base_model_and_base_params(method, scan):
  base = make_vit("mu/2", num_classes=0, scan_layers=scan)
  model = peft.wrap(base, _cfg(method=method))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 8, 8, 1)), jnp.float32)
  params, base_params = (_flat(m.init(jax.random.key(0), x)["params"]) for m in (model, base))
  added = {k: v for k, v in params.items() if k not in base_params}
  assert added and all(("lora_" in k or "adapter_" in k) for k in added)
  assert set(params) - set(added) == set(base_params)
  if not scan:  # the base draws the same init (under nn.scan the layers' rngs are split
    for k, v in base_params.items():  # over every param drawn, so the added ones shift it)
      np.testing.assert_array_equal(params[k], v)
  else:  # stacked like the block they belong to
    assert all(k.startswith("encoderblocks/") and v.shape[0] == 4 for k, v in added.items())
  got = model.apply({"params": flax.traverse_util.unflatten_dict(params, sep="/")}, x)[0]
  base_only = {k: v for k, v in params.items() if k not in added}
  want = base.apply({"params": flax.traverse_util.unflatten_dict(base_only, sep="/")}, x)[0]
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_lora_parameter_count_and_axes():
  """qkv [D, 3, H, K]: r (D + 3D); out [H, K, D]: r (D + D); A takes the kernel's input
  logical axes, B its output axes; the scale is alpha / r (rsLoRA alpha / sqrt r)."""
  d, r = 64, 4
  model = peft.wrap(make_vit("mu/2", num_classes=0), _cfg(method="lora", rank=r))
  boxed = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
  flat = flax.traverse_util.flatten_dict(boxed, sep="/")
  n = {k: int(np.prod(nn.unbox(v).shape)) for k, v in flat.items() if "lora_" in k}
  qkv = n["encoderblock_0/attn/qkv/lora_a"] + n["encoderblock_0/attn/qkv/lora_b"]
  out = n["encoderblock_0/attn/out/lora_a"] + n["encoderblock_0/attn/out/lora_b"]
  assert (qkv, out) == (r * (d + 3 * d), r * (d + d))
  assert sum(n.values()) == 4 * (qkv + out)  # 4 blocks, attention projections only
  assert flat["encoderblock_0/attn/qkv/lora_a"].names == ("embed", None)
  assert flat["encoderblock_0/attn/qkv/lora_b"].names == (None, "qkv", "heads", "kv")
  assert flat["encoderblock_0/attn/out/lora_a"].names == ("heads", "kv", None)
  assert peft.from_config(_cfg(method="lora", rank=4, alpha=8)).lora_scale == 2.0
  assert peft.from_config(_cfg(method="lora", rank=4, alpha=8, rslora=True)).lora_scale == 4.0


def test_lora_matches_a_dense_reference():
  """One matched Dense (regex full match on its path): with B != 0 its output is
  x W + b + (alpha / r) (x A) B, computed here by hand through a second model whose fc1 kernel
  is W + (alpha / r) A B (the merged LoRA weight)."""
  target = r"encoderblock_1/mlp/fc1"
  model = peft.wrap(make_vit("mu/2", num_classes=0),
                    _cfg(method="lora", rank=2, alpha=6, target_regex=target))
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 8, 8, 1)), jnp.float32)
  params = nn.unbox(model.init(jax.random.key(0), x)["params"])
  added = [k for k in _flat(params) if "lora_" in k]
  assert added == [f"{target}/lora_a", f"{target}/lora_b"]
  fc1 = params["encoderblock_1"]["mlp"]["fc1"]
  fc1["lora_b"] = 0.1 * jax.random.normal(jax.random.key(3), fc1["lora_b"].shape)
  merged = jax.tree.map(lambda v: v, params)
  merged["encoderblock_1"]["mlp"]["fc1"] = {
      "kernel": fc1["kernel"] + 3.0 * fc1["lora_a"] @ fc1["lora_b"], "bias": fc1["bias"]}
  y = model.apply({"params": params}, x)[0]
  y_merged = make_vit("mu/2", num_classes=0).apply({"params": merged}, x)[0]
  np.testing.assert_allclose(np.asarray(y), np.asarray(y_merged), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method,trains", [
    ("lora", r"(lora_a|lora_b)$|^head/"), ("bitfit", r"(bias|scale)$|^head/"),
    ("prefix", r"(prefix_k|prefix_v)$|^head/"), ("vpt", r"vpt_prompt$|^head/")])
def test_training_moves_only_peft_params_and_head(data_dir, tmp_path, method, trains):
  import re
  c = tiny_vit_config(data_dir)
  c.total_steps = 3
  c.peft.method = method
  state, _ = train.train_and_evaluate(c, str(tmp_path / method), devices=jax.devices()[:1])
  after = _flat(jax.device_get(state.params))
  moved = [k for k in after if not re.search(trains, k)]
  assert moved  # frozen params exist
  # Frozen leaves keep their initial values: equal in two runs of different lengths.
  c.total_steps = 1
  state1, _ = train.train_and_evaluate(c, str(tmp_path / f"{method}1"),
                                       devices=jax.devices()[:1])
  one = _flat(jax.device_get(state1.params))
  for k in after:
    if not re.search(trains, k):
      np.testing.assert_array_equal(after[k], one[k], err_msg=k)
  assert any(not np.array_equal(after[k], one[k]) for k in after if re.search(trains, k))


def test_lora_on_8_devices_equals_1(data_dir, tmp_path):
  c = tiny_vit_config(data_dir)
  c.total_steps = 3
  c.peft.method = "lora"
  c.mesh.data, c.mesh.fsdp = 2, 4
  s8, _ = train.train_and_evaluate(c, str(tmp_path / "d8"), devices=jax.devices())
  c1 = tiny_vit_config(data_dir)
  c1.total_steps = 3
  c1.peft.method = "lora"
  s1, _ = train.train_and_evaluate(c1, str(tmp_path / "d1"), devices=jax.devices()[:1])
  a, b = _flat(jax.device_get(s8.params)), _flat(jax.device_get(s1.params))
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_lora_alone_works_on_two_towers_and_bad_keys_are_clear():
  from ml_collections_configs.contrastive import shapes_clip
  c = shapes_clip.get_config("runlocal")
  c.peft.method = "lora"
  config_lib.validate(c, 1)
  model = peft.wrap(make_two_towers(image_variant="nano/4", text_width=32, text_depth=1,
                                    text_heads=2, vocab_size=20, context_length=6,
                                    embed_dim=16), c)
  params = _flat(model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)),
                            jnp.zeros((1, 6), jnp.int32))["params"])
  assert any(k.startswith("img/") and "lora_a" in k for k in params)
  assert any(k.startswith("txt/") and "lora_a" in k for k in params)
  for key, value, pattern in (("method", "lorra", "peft.method='lorra'"),
                              ("rank", 0, "peft.rank=0"), ("init", "xavier", "peft.init")):
    bad = shapes_clip.get_config("runlocal")
    bad.peft.method = "lora"
    bad.peft[key] = value
    with pytest.raises(config_lib.ConfigError, match=pattern):
      config_lib.validate(bad, 1)
  both = shapes_clip.get_config("runlocal")
  both.peft.method = "lora"
  both.optimizer.trainable_regex = "^img/"
  with pytest.raises(config_lib.ConfigError, match="both choose the trainable"):
    config_lib.validate(both, 1)


def test_lora_forward_equals_hugging_face_peft():
  """A timm ViT with HF peft's LoRA on its fused qkv Linear (random non-zero B, alpha / r
  scaling) and our import of the same weights with config.peft LoRA on attn/qkv: the same
  logits. peft's lora_A.weight [r, D] is our qkv/lora_a [D, r] transposed; lora_B.weight
  [3D, r] is our lora_b [r, 3, H, K]. Skipped without torch / timm / peft."""
  import open_clip_shim
  timm = open_clip_shim.load_timm()
  hf_peft = pytest.importorskip("peft")
  if timm is None:
    pytest.skip("torch / timm not installed (bash setup_env.sh dev)")
  import torch
  from jax_transfer.convert import timm_vit
  torch.manual_seed(0)
  d, heads, r, alpha = 48, 3, 4, 12.0
  base = timm.models.vision_transformer.VisionTransformer(
      img_size=16, patch_size=4, embed_dim=d, depth=2, num_heads=heads, mlp_ratio=2.0,
      num_classes=5).eval()
  with torch.no_grad():
    for p in base.parameters():
      p.add_(0.05 * torch.randn_like(p))
  sd = {k: v.numpy().copy() for k, v in base.state_dict().items()}
  model = hf_peft.get_peft_model(base, hf_peft.LoraConfig(r=r, lora_alpha=alpha,
                                                          target_modules=["qkv"])).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_B" in name:
        p.normal_(0.0, 0.1)
  images = np.random.default_rng(0).standard_normal((2, 16, 16, 3)).astype(np.float32)
  with torch.no_grad():
    want = model(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()

  c = timm_vit.convert(sd, heads=heads)
  cfg = _cfg(method="lora", rank=r, alpha=alpha, target_regex=r".*attn/qkv")
  ours = peft.wrap(make_vit(None, **config_lib.model_kwargs(
      ml_collections.ConfigDict(c.model_kwargs))), cfg)
  params = nn.unbox(ours.init(jax.random.key(0), jnp.asarray(images))["params"])
  for k, v in _flat(c.params).items():  # the imported base
    node = params
    *parents, leaf = k.split("/")
    for part in parents:
      node = node[part]
    node[leaf] = v
  lora = {n: p.detach().numpy() for n, p in model.named_parameters() if "lora_" in n}
  for i in range(2):
    a = lora[f"base_model.model.blocks.{i}.attn.qkv.lora_A.default.weight"]  # [r, D]
    b = lora[f"base_model.model.blocks.{i}.attn.qkv.lora_B.default.weight"]  # [3D, r]
    qkv = params[f"encoderblock_{i}"]["attn"]["qkv"]
    qkv["lora_a"] = a.T
    qkv["lora_b"] = b.T.reshape(r, 3, heads, d // heads)
  got = np.asarray(ours.apply({"params": params}, jnp.asarray(images))[0])
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * max(1.0, np.abs(want).max()))
  for i in range(2):  # not vacuous: without the LoRA branch the logits differ
    params[f"encoderblock_{i}"]["attn"]["qkv"]["lora_b"] *= 0
  no_lora = np.asarray(ours.apply({"params": params}, jnp.asarray(images))[0])
  assert np.abs(no_lora - want).max() > 100 * 2e-5 * max(1.0, np.abs(want).max())

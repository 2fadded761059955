"""The token PEFT methods of jax_transfer/peft.py: prefix tuning, VPT (shallow / deep), CoOp.

Each is checked against a hand-written reference of its paper's definition:
  prefix  one attention layer with `length` learned keys / values prepended equals softmax
          attention over [prefix; keys] computed by hand, and a causal text tower stays causal
          (every query sees the prefix, no query sees a later token);
  vpt     the ViT with prompts equals a forward written from the ViT's own submodules that
          inserts the prompts right after the class token, VPT's order (shallow: once; deep:
          each block's input prompts replaced by its own), so appending them after the
          patches changes nothing;
  coop    context vectors set to the token embeddings of words w_1..w_M give the text
          features of the hand-written prompt [SOT, w_1..w_M, caption...];
and the parameter counts, the scan stacking (scan equals per-block with the same params) and
the default targets (VPT only on the image tower, CoOp only on the text tower).
"""
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_transfer import config as config_lib, peft, train
from jax_transfer.models import make_two_towers, make_vit
from jax_transfer.models import vit as vit_lib
from jax_transfer.models.text import TextTransformer
from test_peft import _cfg, _flat  # digits_vit:runlocal with config.peft; unboxed flat params


def _unflat(flat):
  return flax.traverse_util.unflatten_dict(flat, sep="/")


def _images(n=3):
  return jnp.asarray(np.random.default_rng(0).normal(size=(n, 8, 8, 1)), jnp.float32)


def _randomise(flat, names, seed=1, scale=0.5):
  """The PEFT params set to random values, so a test cannot pass by their zero init."""
  rng = np.random.default_rng(seed)
  return {k: (scale * rng.standard_normal(v.shape)).astype(np.float32)
          if any(n in k for n in names) else v for k, v in flat.items()}


@pytest.mark.parametrize("causal", [False, True])
def test_prefix_attention_equals_hand_written_reference(causal):
  b, n, d, h, length = 2, 5, 16, 2, 3
  attn = vit_lib.Attention(h, dtype=jnp.float32, param_dtype=jnp.float32, causal=causal)
  model = peft.PeftModel(attn, peft.from_config(_cfg(method="prefix", length=length,
                                                     target_regex=".*")))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(b, n, d)), jnp.float32)
  flat = _randomise(_flat(model.init(jax.random.key(0), x)["params"]), ["prefix_"])
  assert flat["prefix/prefix_k"].shape == (length, h, d // h)
  got = model.apply({"params": _unflat(flat)}, x)

  qkv = jnp.einsum("bnd,dthk->bnthk", x, flat["qkv/kernel"]) + flat["qkv/bias"]
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  k = jnp.concatenate([jnp.broadcast_to(flat["prefix/prefix_k"], (b, length, h, d // h)), k], 1)
  v = jnp.concatenate([jnp.broadcast_to(flat["prefix/prefix_v"], (b, length, h, d // h)), v], 1)
  logits = jnp.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(d // h)
  if causal:  # query i sees the whole prefix and real tokens j <= i
    allowed = np.concatenate([np.ones((n, length), bool), np.tril(np.ones((n, n), bool))], 1)
    logits = jnp.where(allowed, logits, -jnp.inf)
  y = jnp.einsum("bhqs,bshk->bqhk", jax.nn.softmax(logits, -1), v)
  want = jnp.einsum("bnhk,hkd->bnd", y, flat["out/kernel"]) + flat["out/bias"]
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  base = attn.apply({"params": _unflat({k: v for k, v in flat.items() if "prefix" not in k})}, x)
  assert np.abs(np.asarray(base - got)).max() > 1e-3  # the prefix is not a no-op


def test_prefix_keeps_a_causal_text_tower_causal():
  tower = TextTransformer(vocab_size=20, context_length=6, width=16, depth=2, num_heads=2,
                          mlp_dim=32)
  model = peft.PeftModel(tower, peft.from_config(_cfg(method="prefix", length=2)))
  tokens = jnp.asarray([[1, 5, 7, 19, 0, 0]], jnp.int32)
  params = model.init(jax.random.key(0), tokens)["params"]
  assert sum("prefix_" in k for k in _flat(params)) == 4  # 2 layers x (k, v)
  later = tokens.at[0, 4:].set(jnp.asarray([3, 4]))
  a = model.apply({"params": params}, tokens)[1]["tokens"]
  b = model.apply({"params": params}, later)[1]["tokens"]
  np.testing.assert_allclose(np.asarray(a[:, :4]), np.asarray(b[:, :4]), rtol=1e-6, atol=1e-6)


def _vit_reference(vit, flat, images, prompts, deep):
  """ViT forward from its own submodules with VPT's token order [cls, prompts, patches]."""
  kw = dict(dtype=jnp.float32, param_dtype=jnp.float32)
  sub = lambda prefix: _unflat({k[len(prefix) + 1:]: v for k, v in flat.items()
                                if k.startswith(prefix + "/")})
  x = nn.Conv(vit.width, (vit.patch_size,) * 2, strides=(vit.patch_size,) * 2,
              padding="VALID").apply({"params": sub("embedding")}, images)
  x = x.reshape(x.shape[0], -1, vit.width)
  b, length = x.shape[0], prompts[0].shape[0]
  x = jnp.concatenate([jnp.broadcast_to(flat["cls"], (b, 1, vit.width)), x], 1)
  x = x + flat["pos_embedding"]
  x = jnp.concatenate([x[:, :1], jnp.broadcast_to(prompts[0], (b, length, vit.width)),
                       x[:, 1:]], 1)
  for i in range(vit.depth):
    if deep:
      x = x.at[:, 1:1 + length].set(jnp.broadcast_to(prompts[i], (b, length, vit.width)))
    x = vit_lib.Block(vit.mlp_dim, vit.num_heads, 0.0, **kw).apply(
        {"params": sub(f"encoderblock_{i}")}, x)
  x = jnp.concatenate([x[:, :1], x[:, 1 + length:]], 1)  # prompts removed
  x = nn.LayerNorm(epsilon=1e-6).apply({"params": sub("encoder_norm")}, x)[:, 0]
  return nn.Dense(vit.num_classes).apply({"params": sub("head")}, x)


@pytest.mark.parametrize("deep", [False, True])
def test_vpt_equals_prompts_after_the_class_token(deep):
  vit = make_vit("mu/2", num_classes=5)
  model = peft.wrap(vit, _cfg(method="vpt", deep=deep, length=3))
  x = _images()
  flat = _randomise(_flat(model.init(jax.random.key(0), x)["params"]),
                    ["vpt_prompt", "head/"])  # the head is zero-initialised
  added = {k: v.shape for k, v in flat.items() if "vpt_prompt" in k}
  if deep:
    assert added == {f"encoderblock_{i}/prompt/vpt_prompt": (3, 64) for i in range(4)}
    prompts = [flat[f"encoderblock_{i}/prompt/vpt_prompt"] for i in range(4)]
  else:
    assert added == {"prompt_in/vpt_prompt": (3, 64)}
    prompts = [flat["prompt_in/vpt_prompt"]]
  got = model.apply({"params": _unflat(flat)}, x)[0]
  want = _vit_reference(vit, flat, x, prompts, deep)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)
  base = vit.apply({"params": _unflat({k: v for k, v in flat.items() if "vpt" not in k})}, x)[0]
  assert np.abs(np.asarray(base - got)).max() > 1e-3


@pytest.mark.parametrize("method", ["prefix", "vpt"])
def test_token_methods_stack_under_scan_and_equal_per_block(method):
  x = _images()
  per_block = peft.wrap(make_vit("mu/2", num_classes=5), _cfg(method=method))
  scanned = peft.wrap(make_vit("mu/2", num_classes=5, scan_layers=True), _cfg(method=method))
  flat = _randomise(_flat(per_block.init(jax.random.key(0), x)["params"]),
                    ["prefix_", "vpt_prompt", "head/"])
  stacked = vit_lib.stack_blocks(_unflat(flat))
  added = [k for k, v in _flat(stacked).items() if ("prefix_" in k or "vpt_" in k)]
  want_init = _flat(scanned.init(jax.random.key(0), x)["params"])
  assert all(k.startswith("encoderblocks/") and want_init[k].shape[0] == 4 for k in added)
  assert set(_flat(stacked)) == set(want_init)
  np.testing.assert_allclose(np.asarray(scanned.apply({"params": stacked}, x)[0]),
                             np.asarray(per_block.apply({"params": _unflat(flat)}, x)[0]),
                             rtol=1e-5, atol=1e-5)


def test_coop_context_of_word_embeddings_equals_the_hand_written_prompt():
  tower = TextTransformer(vocab_size=20, context_length=8, width=16, depth=2, num_heads=2,
                          mlp_dim=32)
  model = peft.PeftModel(tower, peft.from_config(_cfg(method="coop", length=3)))
  caption = jnp.asarray([[1, 9, 12, 19, 0, 0, 0, 0]], jnp.int32)  # SOT, 'cls', '.', EOT = 19
  params = nn.unbox(model.init(jax.random.key(0), caption)["params"])
  assert params["context_in"]["coop_ctx"].shape == (3, 16)
  words = jnp.asarray([4, 5, 6])  # "a photo of"
  params["context_in"]["coop_ctx"] = params["token_embedding"]["embedding"][words]
  got = model.apply({"params": params}, caption)[0]
  prompt = jnp.asarray([[1, 4, 5, 6, 9, 12, 19, 0]], jnp.int32)
  base = {k: v for k, v in params.items() if k != "context_in"}
  want = tower.apply({"params": base}, prompt)[0]
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_default_targets_on_two_towers_and_parameter_counts():
  tt = make_two_towers(image_variant="nano/4", text_width=32, text_depth=1, text_heads=2,
                       vocab_size=20, context_length=8, embed_dim=16)
  args = (jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 8), jnp.int32))
  counts = {}
  for method in ("prefix", "vpt", "coop"):
    params = _flat(peft.wrap(tt, _cfg(method=method)).init(jax.random.key(0), *args)["params"])
    added = {k: int(np.prod(v.shape)) for k, v in params.items()
             if k.rsplit("/", 1)[-1] in ("prefix_k", "prefix_v", "vpt_prompt", "coop_ctx")}
    counts[method] = added
  img_width = 32
  assert all(k.startswith("img/") for k in counts["vpt"])  # VPT: the image tower only
  assert sum(counts["vpt"].values()) == len(counts["vpt"]) * 8 * img_width
  assert list(counts["coop"]) == ["txt/context_in/coop_ctx"]  # CoOp: the text tower only
  assert counts["coop"]["txt/context_in/coop_ctx"] == 4 * 32
  per_layer = {k.rsplit("/", 3)[0] for k in counts["prefix"]}  # prefix: 2 L D per layer
  assert {k.split("/")[0] for k in per_layer} == {"img", "txt"}
  assert sum(counts["prefix"].values()) == len(per_layer) * 2 * 8 * 32


def test_bad_token_and_rank_values_are_clear():
  with pytest.raises(config_lib.ConfigError, match="peft.length"):
    config_lib.validate(_cfg(method="vpt", length=-1), 1)
  model = peft.wrap(make_vit("mu/2", num_classes=5), _cfg(method="lora", rank=65))
  with pytest.raises(ValueError, match=r"peft.rank=65 exceeds .*encoderblock_0/attn/qkv"):
    model.init(jax.random.key(0), _images(1))


@pytest.mark.parametrize("method", ["prefix", "vpt"])
def test_token_methods_on_8_devices_equal_1(data_dir, tmp_path, method):
  from conftest import tiny_vit_config
  runs = {}
  for n in (8, 1):
    c = tiny_vit_config(data_dir)
    c.total_steps = 3
    c.peft.method = method
    if n == 8:
      c.mesh.data, c.mesh.fsdp = 2, 4
    state, _ = train.train_and_evaluate(c, str(tmp_path / f"{method}{n}"),
                                        devices=jax.devices()[:n])
    runs[n] = _flat(jax.device_get(state.params))
  for k in runs[8]:
    np.testing.assert_allclose(runs[8][k], runs[1][k], rtol=1e-5, atol=1e-6, err_msg=k)
  assert any(("prefix_" in k or "vpt_prompt" in k) for k in runs[1])

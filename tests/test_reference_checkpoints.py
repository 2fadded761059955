"""Self-test of tests/reference_checkpoints.py (the reference side of the importer parity
tests): every format x geometry builds, writes the published key layout, and its reference
functions run with the documented shapes and conventions. Independent of jax_transfer.
Cases skip when torch / transformers / timm / open_clip_torch are absent."""
import importlib.util
import os

import numpy as np
import pytest

import open_clip_shim
import reference_checkpoints as rc

CASES = [(f, n) for f in rc.FORMATS for n in rc.GEOMETRIES[f]]
BATCH = 3


def _needs(format):
  reason = rc.missing(format)
  if reason:
    pytest.skip(reason)


def _hf_layout(g, fmt):
  d, dt, p = g["width"], g["text_width"], g["patch_size"]
  grid, last, tlast = (g["image_size"] // p) ** 2, g["depth"] - 1, g["text_depth"] - 1
  v, t = "vision_model.", "text_model."
  keys = {f"{v}embeddings.patch_embedding.weight": (d, 3, p, p),
          f"{v}encoder.layers.{last}.self_attn.q_proj.weight": (d, d),
          f"{v}encoder.layers.{last}.mlp.fc1.weight": (g["mlp_dim"], d),
          f"{v}post_layernorm.bias": (d,),
          f"{t}embeddings.token_embedding.weight": (g["vocab_size"], dt),
          f"{t}embeddings.position_embedding.weight": (g["context_length"], dt),
          f"{t}encoder.layers.{tlast}.self_attn.out_proj.bias": (dt,),
          f"{t}encoder.layers.{tlast}.mlp.fc2.weight": (dt, g["text_mlp_dim"]),
          f"{t}final_layer_norm.weight": (dt,)}
  if fmt == "hf_clip":
    e = g["embed_dim"]
    keys.update({f"{v}embeddings.class_embedding": (d,),
                 f"{v}embeddings.position_embedding.weight": (grid + 1, d),
                 f"{v}pre_layrnorm.weight": (d,), "visual_projection.weight": (e, d),
                 "text_projection.weight": (e, dt), "logit_scale": ()})
    return keys, [f"{v}encoder.layers.{last + 1}.layer_norm1.weight", "logit_bias"]
  keys.update({f"{v}embeddings.patch_embedding.bias": (d,),
               f"{v}embeddings.position_embedding.weight": (grid, d),
               f"{v}head.probe": (1, 1, d), f"{v}head.attention.in_proj_weight": (3 * d, d),
               f"{v}head.mlp.fc1.weight": (g["mlp_dim"], d), f"{t}head.weight": (d, dt),
               f"{t}head.bias": (d,), "logit_scale": (1,), "logit_bias": (1,)})
  return keys, [f"{v}embeddings.class_embedding", "visual_projection.weight"]


def _flax_block_layout(prefix, width, heads, mlp_dim, depth, names, stacked):
  """Two per-block keys of each kind at the LAST block (or stacked), as the module writes."""
  ln0, mha, ln1, mlp = names
  block = {f"{ln0}/scale": (width,), f"{mha}/query/kernel": (width, heads, width // heads),
           f"{mha}/value/bias": (heads, width // heads),
           f"{mha}/out/kernel": (heads, width // heads, width), f"{ln1}/bias": (width,),
           f"{mlp}/Dense_0/kernel": (width, mlp_dim), f"{mlp}/Dense_1/bias": (width,)}
  if stacked:
    return ({f"{prefix}encoderblock/{k}": (depth,) + s for k, s in block.items()},
            [f"{prefix}encoderblock_0/{ln0}/scale"])
  return ({f"{prefix}encoderblock_{depth - 1}/{k}": s for k, s in block.items()},
          [f"{prefix}encoderblock_{depth}/{ln0}/scale", f"{prefix}encoderblock/{ln0}/scale"])


def _big_vision_layout(g):
  d, p, dt = g["width"], g["patch_size"], g["text_width"]
  img, txt = "params/img/", "params/txt/"
  keys, absent = _flax_block_layout(f"{img}Transformer/", d, g["heads"], g["mlp_dim"],
                                    g["depth"], rc.BIG_VISION_BLOCK, g["stacked"])
  tkeys, tabsent = _flax_block_layout(f"{txt}Encoder_0/", dt, g["text_heads"],
                                      g["text_mlp_dim"], g["text_depth"], rc.BIG_VISION_BLOCK,
                                      g["stacked"])
  keys.update(tkeys)
  keys.update({f"{img}embedding/kernel": (p, p, 3, d), f"{img}embedding/bias": (d,),
               f"{img}pos_embedding": (1, (g["image_size"] // p) ** 2, d),
               f"{img}Transformer/encoder_norm/scale": (d,),
               f"{img}MAPHead_0/probe": (1, 1, d),
               f"{img}MAPHead_0/MultiHeadDotProductAttention_0/key/kernel":
                   (d, g["heads"], d // g["heads"]),
               f"{img}MAPHead_0/LayerNorm_0/bias": (d,),
               f"{img}MAPHead_0/MlpBlock_0/Dense_1/kernel": (g["mlp_dim"], d),
               f"{txt}Embed_0/embedding": (g["vocab_size"], dt),
               f"{txt}pos_embedding": (1, g["context_length"], dt),
               f"{txt}Encoder_0/encoder_norm/bias": (dt,), f"{txt}head/kernel": (dt, d),
               f"{txt}head/bias": (d,), "params/t": (1,), "params/b": (1,)})
  return keys, absent + tabsent + [f"{img}cls", f"{img}head/kernel"]


def _augreg_layout(g):
  d, p, r = g["width"], g["patch_size"], g["representation_size"]
  keys, absent = _flax_block_layout("Transformer/", d, g["heads"], g["mlp_dim"], g["depth"],
                                    rc.AUGREG_BLOCK, False)
  keys.update({"embedding/kernel": (p, p, 3, d), "embedding/bias": (d,), "cls": (1, 1, d),
               "Transformer/posembed_input/pos_embedding":
                   (1, 1 + (g["checkpoint_image_size"] // p) ** 2, d),
               "Transformer/encoder_norm/scale": (d,),
               "head/kernel": (r or d, g["num_classes"]), "head/bias": (g["num_classes"],)})
  if r:
    keys.update({"pre_logits/kernel": (d, r), "pre_logits/bias": (r,)})
  else:
    absent.append("pre_logits/kernel")
  return keys, absent


def _timm_layout(g):
  d, p, grid = g["width"], g["patch_size"], (g["image_size"] // g["patch_size"]) ** 2
  last = g["depth"] - 1
  keys = {"patch_embed.proj.weight": (d, 3, p, p), "patch_embed.proj.bias": (d,),
          "pos_embed": (1, grid + g["class_token"], d),
          f"blocks.{last}.attn.qkv.weight": (3 * d, d), f"blocks.{last}.attn.qkv.bias": (3 * d,),
          f"blocks.{last}.mlp.fc1.weight": (g["mlp_dim"], d),
          "head.weight": (g["num_classes"], d), "head.bias": (g["num_classes"],)}
  absent = [f"blocks.{last + 1}.norm1.weight"]
  keys.update({"fc_norm.weight": (d,)} if g["fc_norm"] else {"norm.weight": (d,)})
  absent.append("norm.weight" if g["fc_norm"] else "fc_norm.weight")
  if g["class_token"]:
    keys["cls_token"] = (1, 1, d)
  else:
    absent.append("cls_token")
  return keys, absent


def _open_clip_layout(g):
  d, dt, e, p = g["width"], g["text_width"], g["embed_dim"], g["patch_size"]
  grid = (g["image_size"] // p) ** 2
  keys = {"visual.conv1.weight": (d, 3, p, p), "visual.class_embedding": (d,),
          "visual.positional_embedding": (grid + 1, d), "visual.proj": (d, e),
          f"visual.transformer.resblocks.{g['depth'] - 1}.attn.in_proj_weight": (3 * d, d),
          f"visual.transformer.resblocks.{g['depth'] - 1}.mlp.c_fc.weight": (g["mlp_dim"], d),
          "token_embedding.weight": (g["vocab_size"], dt),
          "positional_embedding": (g["context_length"], dt), "text_projection": (dt, e),
          f"transformer.resblocks.{g['text_depth'] - 1}.mlp.c_proj.weight":
              (dt, g["text_mlp_dim"]),
          "ln_final.weight": (dt,), "logit_scale": ()}
  absent = [f"visual.transformer.resblocks.{g['depth']}.ln_1.weight"]
  if g["logit_bias"] is None:
    absent.append("logit_bias")
  else:
    keys["logit_bias"] = ()
  return keys, absent


LAYOUTS = {"hf_clip": lambda g: _hf_layout(g, "hf_clip"),
           "hf_siglip": lambda g: _hf_layout(g, "hf_siglip"),
           "big_vision_siglip": _big_vision_layout, "augreg": _augreg_layout,
           "timm_vit": _timm_layout, "open_clip": _open_clip_layout}


def _check_varies(x):
  assert np.isfinite(x).all()
  assert np.abs(x[0] - x[1]).max() > 1e-3  # depends on the input (not a constant)


@pytest.mark.parametrize("format,name", CASES)
def test_fixture_writes_layout_and_reference_runs(format, name, tmp_path):
  _needs(format)
  ref = rc.build(format, name, tmp_path, seed=0)
  g = ref.geometry
  assert ref.format == format and g == rc.GEOMETRIES[format][name]
  assert os.path.exists(ref.path)
  if format.startswith("hf_"):
    assert os.path.isfile(os.path.join(ref.path, "config.json"))
  expected, absent = LAYOUTS[format](g)
  assert {k: ref.keys.get(k) for k in expected} == expected
  assert not set(absent) & set(ref.keys)
  if format in ("big_vision_siglip", "augreg"):  # the third-party loader filled every param
    n_written = sum(int(np.prod(s)) for s in ref.keys.values())
    n_model = sum(p.numel() for p in ref.model.parameters())
    resampled = 0
    if format == "augreg":
      resampled = ((g["image_size"] // g["patch_size"]) ** 2 -
                   (g["checkpoint_image_size"] // g["patch_size"]) ** 2) * g["width"]
    assert n_model == n_written + resampled
  images, tokens = rc.random_inputs(g, BATCH, seed=1)
  assert images.shape == (BATCH, g["image_size"], g["image_size"], 3)
  assert images.dtype == np.float32
  if format in rc.CLASSIFIER_FORMATS:
    assert tokens is None
    logits, pre = ref.logits(images), ref.pre_logits(images)
    assert logits.shape == (BATCH, g["num_classes"]) and logits.dtype == np.float32
    assert pre.shape == (BATCH, g.get("representation_size") or g["width"])
    _check_varies(logits)
    _check_varies(pre)
    return
  assert tokens.shape == (BATCH, g["context_length"]) and tokens.dtype == np.int32
  zimg, ztxt = ref.image_embeds(images), ref.text_embeds(tokens)
  for z in (zimg, ztxt):
    assert z.shape == (BATCH, g["embed_dim"]) and z.dtype == np.float32
    _check_varies(z)
    np.testing.assert_allclose(np.linalg.norm(z, axis=-1), 1.0, rtol=1e-5)
  # logit_scale / logit_bias are what the library's own logits apply.
  np.testing.assert_allclose(ref.logits_per_image(images, tokens),
                             ref.logit_scale * zimg @ ztxt.T + ref.logit_bias,
                             rtol=1e-5, atol=1e-4)
  assert np.isclose(ref.logit_scale, np.exp(ref.raw_logit_scale))
  assert (ref.logit_bias != 0.0) == (format in rc.SIGLIP_TOKEN_FORMATS or
                                     g.get("logit_bias") is not None)
  if ref.image_features is not None:
    assert ref.image_features(images).shape == (BATCH, g["width"])
  if ref.text_features is not None:
    assert ref.text_features(tokens).shape == (BATCH, g["text_width"])


def test_big_vision_stacked_holds_the_per_block_values(tmp_path):
  """Same seed, same geometry: the scan-stacked npz is the per-block one stacked, and
  open_clip's loader gives the same model from both."""
  _needs("big_vision_siglip")
  per_block = rc.build("big_vision_siglip", "w96h3_p8_px32", tmp_path)
  stacked = rc.build("big_vision_siglip", "w96h3_p8_px32_stacked", tmp_path)
  with np.load(per_block.path) as a, np.load(stacked.path) as b:
    for key in b.files:
      if "/encoderblock/" in key:
        depth = b[key].shape[0]
        np.testing.assert_array_equal(b[key], np.stack([
            a[key.replace("/encoderblock/", f"/encoderblock_{i}/")] for i in range(depth)]))
      else:
        np.testing.assert_array_equal(b[key], a[key])
  images, tokens = rc.random_inputs(stacked.geometry, BATCH, seed=2)
  np.testing.assert_array_equal(stacked.image_embeds(images), per_block.image_embeds(images))
  np.testing.assert_array_equal(stacked.text_embeds(tokens), per_block.text_embeds(tokens))


def test_augreg_posemb_is_resampled_bilinear_without_corner_alignment(tmp_path):
  """What timm's _load_weights does to a 3x3 grid loaded at 4x4 (notes['posemb_resample'])."""
  _needs("augreg")
  import torch
  import torch.nn.functional as F
  ref = rc.build("augreg", "w48h6_p14_px42_to_px56_erf", tmp_path)
  with np.load(ref.path) as w:
    old = torch.from_numpy(w["Transformer/posembed_input/pos_embedding"])
  d = old.shape[-1]
  grid = old[:, 1:].reshape(1, 3, 3, d).permute(0, 3, 1, 2)
  new = ref.notes["pos_embed"]
  assert new.shape == (1, 1 + 16, d)
  np.testing.assert_array_equal(new[:, :1], old[:, :1].numpy())  # class token row kept
  for align_corners, matches in ((False, True), (True, False)):
    resized = F.interpolate(grid, size=(4, 4), mode="bilinear", align_corners=align_corners)
    resized = resized.permute(0, 2, 3, 1).reshape(1, 16, d).numpy()
    assert np.allclose(new[:, 1:], resized, atol=1e-6) == matches


@pytest.mark.parametrize("format", ["open_clip", "hf_siglip"])
def test_random_inputs_token_conventions(format):
  g = next(iter(rc.GEOMETRIES[format].values()))
  _, tokens = rc.random_inputs(g, 16, seed=3)
  vocab, length = g["vocab_size"], g["context_length"]
  assert tokens.min() >= 0 and tokens.max() < vocab
  if format == "open_clip":  # [sot, ids < eot, eot = vocab - 1, 0 ...]
    assert (tokens[:, 0] == vocab - 2).all() and tokens[0, -1] == vocab - 1
    for row in tokens:
      eot = int(np.argmax(row))
      assert row[eot] == vocab - 1 and (row == vocab - 1).sum() == 1
      assert (row[1:eot] > 0).all() and (row[1:eot] < vocab - 2).all()
      assert (row[eot + 1:] == 0).all()
  else:  # [ids >= 2, EOS, pad ...] with EOS = pad = 1 reaching the last position
    assert (tokens[:, -1] == rc.SIGLIP_EOS).all()
    assert (tokens[0, :-1] >= 2).all()
    for row in tokens:
      end = int(np.argmax(row == rc.SIGLIP_EOS))
      assert end >= 1 and (row[:end] >= 2).all() and (row[end:] == rc.SIGLIP_PAD).all()


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None,
                    reason="a real torchvision is installed")
def test_torchvision_stub():
  if open_clip_shim.load_timm() is None:
    pytest.skip("torch / timm not installed")
  import torchvision.transforms
  from torchvision.ops.misc import FrozenBatchNorm2d
  mode = torchvision.transforms.InterpolationMode
  assert mode is torchvision.transforms.InterpolationMode
  assert mode.BILINEAR is mode.BILINEAR and mode.BILINEAR is not mode.BICUBIC
  assert len({mode.BILINEAR: 0, mode.BICUBIC: 1, mode.NEAREST: 2}) == 3
  for placeholder in (FrozenBatchNorm2d, mode.BILINEAR):
    with pytest.raises(RuntimeError, match="torchvision is not installed"):
      placeholder()
  if importlib.util.find_spec("transformers") is not None:  # not fooled by the stub
    from transformers.utils import import_utils
    assert not import_utils.is_torchvision_available()

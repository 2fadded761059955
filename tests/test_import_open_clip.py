"""open_clip -> TwoTowers import (jax_transfer/convert/open_clip.py, the import_checkpoint
command's --format=open_clip) against open_clip itself.

Randomly initialised open_clip models (LayerNorm scales/biases and every bias randomised too,
so each tensor's mapping matters) are converted and must give the same L2-normalised image
and text embeddings as open_clip's encode_image / encode_text(normalize=True) on the same
random inputs. Skipped when torch or open_clip_torch is absent (`bash setup_env.sh dev`
installs both).

Tolerance: atol 2e-6 (rtol 0) on unit-norm float32 embeddings. Both sides compute in float32
and differ only in summation order (XLA:CPU vs torch's CPU kernels): the worst difference
measured over these four models x 3 seeds x 8 inputs was 5e-7, so 2e-6 leaves 4x margin. It
has to be that tight to test the parity options at all: the same weights run with tanh GELU
(big_vision's default) move the embeddings by only 1.5e-5-4e-5, and with ln_eps 1e-6 by
1.5e-5-3e-5 (image) / 3e-3-1e-2 (text); a mapping error (a wrong transpose, head split,
missing LayerNorm or bias) moves them by ~1e-2 or more.
"""
import math
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import open_clip_shim

oc = open_clip_shim.load_open_clip()
if oc is None:
  pytest.skip("torch / open_clip_torch not installed (bash setup_env.sh dev)",
              allow_module_level=True)
torch = oc.torch

from jax_transfer import load_pretrained, models  # noqa: E402
from jax_transfer.convert import core, open_clip  # noqa: E402
from jax_transfer.convert.core import CheckpointError  # noqa: E402
from jax_transfer.tools import import_checkpoint  # noqa: E402


def convert_state_dict(sd, activation="gelu", vision_heads=None, text_heads=None):
  c = open_clip.convert(sd, activation, vision_heads, text_heads)
  return c.model_kwargs, c.params

ATOL = 2e-6
# name -> (open_clip class, embed_dim, vision_cfg, text_cfg, head overrides, CLIP kwargs).
# Any geometry: widths that are no named variant (96), head widths != 64, odd MLP widths.
ARCHS = {
    "nano8_px32": ("CLIP", 24,
                   dict(layers=2, width=32, head_width=16, mlp_ratio=2.0, patch_size=8,
                        image_size=32),
                   dict(context_length=12, vocab_size=50, width=48, heads=3, layers=1),
                   dict(vision_heads=2, text_heads=3), {}),
    "mu4_px16_shapes_clip": ("CLIP", 64,
                             dict(layers=4, width=64, head_width=16, mlp_ratio=2.0,
                                  patch_size=4, image_size=16),
                             dict(context_length=16, vocab_size=64, width=64, heads=1,
                                  layers=2),
                             dict(vision_heads=4), {}),  # text heads: 64 // 64 = 1 (default)
    "ti16_px48_no_ln_pre_logit_bias": ("CLIP", 96,
                                       dict(layers=12, width=192, head_width=64, mlp_ratio=4.0,
                                            patch_size=16, image_size=48, no_ln_pre=True),
                                       dict(context_length=20, vocab_size=300, width=128,
                                            heads=2, layers=2, mlp_ratio=2.0),
                                       {}, dict(init_logit_bias=-3.0)),
    # OpenAI's weights (and open_clip '-quickgelu' models) use QuickGELU.
    "quickgelu_nano8_px32": ("CLIP", 24,
                             dict(layers=2, width=32, head_width=16, mlp_ratio=2.0,
                                  patch_size=8, image_size=32),
                             dict(context_length=12, vocab_size=50, width=48, heads=3,
                                  layers=1),
                             dict(vision_heads=2, text_heads=3, activation="quick_gelu"),
                             dict(quick_gelu=True)),
    # No named variant: width 96 in 3 heads of 32, MLP 2.5x; text 80 wide in 5 heads.
    "w96_h3_px24": ("CLIP", 40,
                    dict(layers=2, width=96, head_width=32, mlp_ratio=2.5, patch_size=8,
                         image_size=24),
                    dict(context_length=10, vocab_size=60, width=80, heads=5, layers=2,
                         mlp_ratio=3.0),
                    dict(vision_heads=3, text_heads=5), {}),
    "custom_text_nano4_px16": ("CustomTextCLIP", 16,
                               dict(layers=2, width=32, head_width=16, mlp_ratio=2.0,
                                    patch_size=4, image_size=16),
                               dict(context_length=8, vocab_size=40, width=32, heads=2,
                                    layers=2),
                               dict(vision_heads=2, text_heads=2), {}),
}


def _open_clip_model(name, seed=0):
  cls, embed, vcfg, tcfg, _, kw = ARCHS[name]
  torch.manual_seed(seed)
  model = getattr(oc.model, cls)(embed, vcfg, tcfg, **kw).eval()
  with torch.no_grad():  # open_clip inits LN to (1, 0) and most biases to 0: randomise them
    for key, p in model.named_parameters():
      if p.ndim == 1 and key.endswith("weight"):
        p.normal_(1.0, 0.2)
      elif key.endswith("bias") and p.ndim == 1:
        p.normal_(0.0, 0.2)
    model.logit_scale.fill_(2.5)
  return model


def _inputs(name, n=4, seed=0):
  """images NCHW normal(0, 1); tokens [n, L] with EOT = vocab - 1 (the largest id, so both
  argmax pools find it) at a random position, random ids before it and 0 after."""
  _, _, vcfg, tcfg, _, _ = ARCHS[name]
  rng = np.random.default_rng(seed)
  s, length, vocab = vcfg["image_size"], tcfg["context_length"], tcfg["vocab_size"]
  images = rng.standard_normal((n, 3, s, s)).astype(np.float32)
  tokens = np.zeros((n, length), np.int64)
  for row, eot in zip(tokens, rng.integers(1, length, size=n)):
    row[:eot] = rng.integers(1, vocab - 1, size=eot)
    row[eot] = vocab - 1
  tokens[0, -1] = vocab - 1  # one row with EOT at the last position
  tokens[0, :-1] = rng.integers(1, vocab - 1, size=length - 1)
  return images, tokens


def _reference(model, images, tokens):
  with torch.no_grad():
    return (model.encode_image(torch.from_numpy(images), normalize=True).numpy(),
            model.encode_text(torch.from_numpy(tokens), normalize=True).numpy())


def _ours(model, params, images, tokens):
  zimg = model.apply({"params": params}, jnp.asarray(images.transpose(0, 2, 3, 1)),
                     method=model.encode_image)  # NCHW -> NHWC
  ztxt = model.apply({"params": params}, jnp.asarray(tokens, jnp.int32),
                     method=model.encode_text)
  return np.asarray(zimg), np.asarray(ztxt)


def _state_dict(model):
  return {k: v.numpy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", [n for n in ARCHS if n != "mu4_px16_shapes_clip"])
def test_embeddings_match_open_clip(name, tmp_path):
  """safetensors file -> load_state_dict -> convert_state_dict -> same embeddings."""
  from safetensors.torch import save_file
  ref_model = _open_clip_model(name)
  path = str(tmp_path / "model.safetensors")
  save_file({k: v.contiguous() for k, v in ref_model.state_dict().items()}, path)
  kwargs, params = convert_state_dict(core.read_state_dict(path), **ARCHS[name][4])
  model = models.get_model("two_towers", **kwargs)
  images, tokens = _inputs(name)
  ref_img, ref_txt = _reference(ref_model, images, tokens)
  zimg, ztxt = _ours(model, params, images, tokens)
  np.testing.assert_allclose(zimg, ref_img, atol=ATOL, rtol=0)
  np.testing.assert_allclose(ztxt, ref_txt, atol=ATOL, rtol=0)
  # Not vacuous: the embeddings differ across inputs and are not all ~0.
  assert np.abs(ref_img[0] - ref_img[1]).max() > 1e-2
  assert np.abs(ref_txt[0] - ref_txt[1]).max() > 1e-2
  np.testing.assert_allclose(params["logit_scale"], 2.5, rtol=1e-6)
  bias = ARCHS[name][5].get("init_logit_bias", 0.0)
  assert float(params["logit_bias"]) == bias
  assert kwargs["pre_norm"] == (not ARCHS[name][2].get("no_ln_pre", False))


def test_cli_torch_file_to_load_pretrained(tmp_path):
  """torch.save({'state_dict': {'module.' + k: v}}) -> the CLI (a subprocess) -> export dir
  -> jax_transfer.load_pretrained -> same embeddings as open_clip."""
  name = "mu4_px16_shapes_clip"
  ref_model = _open_clip_model(name, seed=1)
  ckpt, out = tmp_path / "ddp.pt", tmp_path / "export"
  torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in
                                         ref_model.state_dict().items()}}, ckpt)
  proc = subprocess.run(
      [sys.executable, "-m", "jax_transfer.tools.import_checkpoint", "--checkpoint", str(ckpt),
       "--out", str(out), "--activation", "gelu", "--vision_heads", "4"],
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  model, params, _, _, config = load_pretrained(str(out))
  assert config.method == "contrastive" and config.model_name == "two_towers"
  assert config.import_source.format == "open_clip"  # auto-detected
  assert (config.model.image_width, config.model.image_depth, config.model.image_heads,
          config.input.image_size) == (64, 4, 4, 16)
  assert (config.model.text_heads, config.model.context_length) == (1, 16)
  images, tokens = _inputs(name, seed=2)
  ref_img, ref_txt = _reference(ref_model, images, tokens)
  zimg, ztxt = _ours(model, params, images, tokens)
  np.testing.assert_allclose(zimg, ref_img, atol=ATOL, rtol=0)
  np.testing.assert_allclose(ztxt, ref_txt, atol=ATOL, rtol=0)


def test_openai_layout_quick_gelu_matches_open_clip():
  """A QuickGELU model saved with OpenAI's scalar entries (input_resolution, context_length,
  vocab_size) converts with activation='quick_gelu' and matches open_clip; converting the same
  weights as erf GELU does not (so the option is what makes it match)."""
  name = "quickgelu_nano8_px32"
  ref_model = _open_clip_model(name)
  sd = dict(_state_dict(ref_model), input_resolution=np.array(32),
            context_length=np.array(12), vocab_size=np.array(50))
  kwargs, params = convert_state_dict(sd, **ARCHS[name][4])
  assert kwargs["quick_gelu"] is True
  images, tokens = _inputs(name)
  ref_img, ref_txt = _reference(ref_model, images, tokens)
  zimg, ztxt = _ours(models.get_model("two_towers", **kwargs), params, images, tokens)
  np.testing.assert_allclose(zimg, ref_img, atol=ATOL, rtol=0)
  np.testing.assert_allclose(ztxt, ref_txt, atol=ATOL, rtol=0)
  gelu = dict(kwargs, quick_gelu=False)
  zimg, _ = _ours(models.get_model("two_towers", **gelu), params, images, tokens)
  assert np.abs(zimg - ref_img).max() > 4 * ATOL


def test_missing_unexpected_and_wrong_shapes_are_listed():
  sd = _state_dict(_open_clip_model("nano8_px32"))
  for k in ("visual.transformer.resblocks.1.attn.in_proj_bias", "ln_final.bias",
            "visual.ln_pre.weight"):
    del sd[k]
  sd["visual.extra_head.weight"] = np.zeros((3, 3), np.float32)
  sd["transformer.resblocks.0.mlp.c_proj.bias"] = np.zeros((7,), np.float32)
  with pytest.raises(CheckpointError) as e:
    convert_state_dict(sd, **ARCHS["nano8_px32"][4])
  msg = str(e.value)
  assert "\n" not in msg
  assert ("missing keys ['ln_final.bias', 'visual.ln_pre.weight', "
          "'visual.transformer.resblocks.1.attn.in_proj_bias']") in msg
  assert "unexpected keys ['visual.extra_head.weight']" in msg
  assert "wrong shapes ['transformer.resblocks.0.mlp.c_proj.bias: (7,), expected (48,)']" in msg


def test_other_architectures_are_refused(capsys, tmp_path):
  rn = oc.model.CLIP(32, dict(layers=(1, 1, 1, 1), width=16, head_width=16, image_size=64),
                     dict(context_length=8, vocab_size=40, width=32, heads=2, layers=1))
  with pytest.raises(CheckpointError, match=r"ResNet image tower .*visual\.attnpool"):
    convert_state_dict(_state_dict(rn))
  sd = _state_dict(_open_clip_model("nano8_px32"))
  # OpenAI's own extra keys mark QuickGELU weights: converting them as GELU is refused.
  with pytest.raises(CheckpointError, match="OpenAI.*--activation quick_gelu"):
    convert_state_dict(dict(sd, input_resolution=np.array(32)), **ARCHS["nano8_px32"][4])
  # Heads are not in the weights: width 32 cannot be OpenAI's 64-wide heads.
  with pytest.raises(CheckpointError, match="--vision_heads"):
    convert_state_dict(sd, text_heads=3)
  # The CLI turns any of these into one line on stderr and exit status 2.
  from safetensors.numpy import save_file
  path = str(tmp_path / "rn.safetensors")
  save_file(_state_dict(rn), path)
  assert import_checkpoint.main(["--checkpoint", path, "--out", str(tmp_path / "x"),
                                 "--activation", "gelu"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("import_checkpoint: ") and err.count("\n") == 1 and "ResNet" in err
  assert not (tmp_path / "x").exists()


def test_params_tree_is_the_models_and_parity_options_matter():
  """The imported tree equals model.init's, and the parity options are what make it match:
  the same params with tanh GELU or ln_eps 1e-6 (big_vision's defaults) fail the tolerance."""
  name = "nano8_px32"
  ref_model = _open_clip_model(name)
  kwargs, params = convert_state_dict(_state_dict(ref_model), **ARCHS[name][4])
  model = models.get_model("two_towers", **kwargs)
  images, tokens = _inputs(name)
  init = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                        jnp.zeros((1, 12), jnp.int32))
  assert (jax.tree.map(lambda x: x.shape, nn.unbox(init["params"])) ==
          jax.tree.map(lambda x: x.shape, params))
  ref_img, _ = _reference(ref_model, images, tokens)
  for change in (dict(gelu_approximate=True), dict(ln_eps=1e-6)):
    zimg, _ = _ours(models.get_model("two_towers", **dict(kwargs, **change)), params, images,
                    tokens)
    assert np.abs(zimg - ref_img).max() > 4 * ATOL, change  # ATOL tells these apart
    assert math.isclose(float(np.linalg.norm(zimg[0])), 1.0, rel_tol=1e-5)


def test_imported_export_loads_into_a_scan_model(tmp_path):
  """The importer's per-block export, loaded by a config with model.scan_layers=True, gives a
  scan model with stacked blocks and open_clip's embeddings (scan only reorders float sums)."""
  from jax_transfer import checkpoint
  name = "mu4_px16_shapes_clip"  # 4 image and 2 text blocks: both towers scanned
  ref_model = _open_clip_model(name, seed=3)
  c = open_clip.convert(_state_dict(ref_model), "gelu", **{
      k: v for k, v in ARCHS[name][4].items() if k != "activation"})
  c.model_kwargs["scan_layers"] = True
  checkpoint.export(c.params, import_checkpoint.export_config(c, "open_clip", "test"),
                    str(tmp_path / "export"))
  model, loaded, _, _, _ = load_pretrained(str(tmp_path / "export"))
  assert model.scan_layers and loaded["img"]["encoderblocks"]["ln_1"]["scale"].shape == (4, 64)
  images, tokens = _inputs(name, seed=1)
  ref_img, ref_txt = _reference(ref_model, images, tokens)
  zimg, ztxt = _ours(model, loaded, images, tokens)
  np.testing.assert_allclose(zimg, ref_img, atol=ATOL, rtol=0)
  np.testing.assert_allclose(ztxt, ref_txt, atol=ATOL, rtol=0)

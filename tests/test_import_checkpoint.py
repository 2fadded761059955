"""Every published format through `python -m jax_transfer.tools.import_checkpoint` against
its reference library, on randomly initialised models (tests/reference_checkpoints.py).

The big_vision SigLIP and AugReg .npz references are loaded by THIRD-PARTY loaders (open_clip's
load_big_vision_weights, timm's _load_weights), not by our mapping, so the comparison cannot
agree with itself. Geometries include widths that are no named variant (96, 80, 48), head
widths of 32 / 16 / 8, MLPs of 1.5-4x, patches 4 / 8 / 14, a scan-stacked big_vision file and
an AugReg file imported at another image size (timm resamples its position embeddings too).

Tolerance: 2e-5 absolute on unit-norm embeddings, 2e-5 relative to the largest |logit| for
classifiers. Both sides compute in float32; a mapping error (a transpose, a head split, a
missing LayerNorm or bias) moves the outputs by ~1e-2 or more.
"""
import argparse

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import reference_checkpoints as refs

from jax_transfer import config as config_lib, load_pretrained, models  # noqa: E402
from jax_transfer.tools import import_checkpoint  # noqa: E402

ATOL = 2e-5
CASES = [(f, n) for f in refs.FORMATS for n in refs.GEOMETRIES[f]]


def _args(ref, **extra) -> argparse.Namespace:
  """The command line a user would give for this checkpoint (format auto-detected)."""
  g, fmt = ref.geometry, ref.format
  argv = ["--checkpoint", ref.path, "--out", "unused"]
  if fmt == "open_clip":
    argv += ["--activation", "quick_gelu" if g["quick_gelu"] else "gelu",
             "--vision_heads", str(g["heads"]), "--text_heads", str(g["text_heads"])]
  elif fmt == "augreg":
    argv += ["--activation", "gelu_tanh" if g["gelu"] == "tanh" else "gelu",
             "--image_size", str(g["image_size"])]
  elif fmt == "timm_vit":
    argv += ["--vision_heads", str(g["heads"])]
    if g["global_pool"] == "avg" and not g["fc_norm"] and g["class_token"]:
      argv += ["--pool", "gap"]
  for k, v in extra.items():
    argv += [f"--{k}", str(v)]
  return import_checkpoint.build_parser().parse_args(argv)


def _model(c):
  return models.get_model(c.model_name, **config_lib.model_kwargs(
      ml_collections.ConfigDict(c.model_kwargs)))


def _compare(ref, model, params, seed=0):
  images, tokens = refs.random_inputs(ref.geometry, 4, seed)
  if ref.format in refs.CLASSIFIER_FORMATS:
    logits, aux = model.apply({"params": params}, jnp.asarray(images))
    want = ref.logits(images)
    np.testing.assert_allclose(np.asarray(logits), want, rtol=0,
                               atol=ATOL * max(1.0, np.abs(want).max()))
    pre = ref.pre_logits(images)
    np.testing.assert_allclose(np.asarray(aux["pre_logits"]), pre, rtol=0,
                               atol=ATOL * max(1.0, np.abs(pre).max()))
    assert np.abs(want[0] - want[1]).max() > 1e-2  # not vacuous
    return
  zimg = model.apply({"params": params}, jnp.asarray(images), method=model.encode_image)
  ztxt = model.apply({"params": params}, jnp.asarray(tokens), method=model.encode_text)
  want_img, want_txt = ref.image_embeds(images), ref.text_embeds(tokens)
  np.testing.assert_allclose(np.asarray(zimg), want_img, atol=ATOL, rtol=0)
  np.testing.assert_allclose(np.asarray(ztxt), want_txt, atol=ATOL, rtol=0)
  assert np.abs(want_img[0] - want_img[1]).max() > 1e-2
  assert np.abs(want_txt[0] - want_txt[1]).max() > 1e-2
  np.testing.assert_allclose(float(params["logit_scale"]), ref.raw_logit_scale, rtol=1e-6)
  np.testing.assert_allclose(float(params["logit_bias"]), ref.logit_bias or 0.0, rtol=1e-6,
                             atol=1e-7)


@pytest.mark.parametrize("fmt,name", CASES)
def test_import_matches_reference(fmt, name, tmp_path):
  reason = refs.missing(fmt)
  if reason:
    pytest.skip(reason)
  ref = refs.build(fmt, name, tmp_path)
  detected, c = import_checkpoint.convert(_args(ref))
  assert detected == {"hf_clip": "hf", "hf_siglip": "hf"}.get(fmt, fmt)
  _compare(ref, _model(c), c.params)


@pytest.mark.parametrize("fmt", refs.FORMATS)
def test_cli_export_and_load_pretrained(fmt, tmp_path, capsys):
  """The command writes an export that load_pretrained rebuilds: same outputs, the recipe
  carries the family's normalisation; nothing but the export is left beside --out."""
  reason = refs.missing(fmt)
  if reason:
    pytest.skip(reason)
  name = next(iter(refs.GEOMETRIES[fmt]))
  ref = refs.build(fmt, name, tmp_path / "src")
  out = tmp_path / "exports" / "model"
  args = _args(ref)
  argv = [a if a != "unused" else str(out) for a in sum(
      ([f"--{k}", str(v)] for k, v in vars(args).items()
       if v not in (None, False) and k != "format"), [])]
  assert import_checkpoint.main(argv) == 0, capsys.readouterr().err
  assert "wrote" in capsys.readouterr().out
  model, params, _, preprocess, config = load_pretrained(str(out))
  assert config.import_source.format in (fmt, "hf")
  assert sorted(p.name for p in (tmp_path / "exports").iterdir()) == ["model"]
  _compare(ref, model, params, seed=1)
  mean = (0.5,) * 3 if fmt not in ("hf_clip", "open_clip") else (0.48145466, 0.4578275,
                                                                  0.40821073)
  np.testing.assert_allclose(preprocess.mean, mean, rtol=1e-6)
  assert preprocess.image_size == (ref.geometry["image_size"],) * 2


def test_readme_zero_shot_example(tmp_path, monkeypatch):
  """The README's zero-shot block runs as written on an imported open_clip model with OpenAI's
  BPE tokenizer (49408 ids), on JPEG files, and agrees with open_clip's own logits."""
  import os
  import re
  import simplejpeg
  if refs.missing("open_clip"):
    pytest.skip(refs.missing("open_clip"))
  import open_clip_shim
  oc = open_clip_shim.load_open_clip()
  bpe = os.path.join(os.path.dirname(oc.model.__file__), "bpe_simple_vocab_16e6.txt.gz")
  g = dict(refs.GEOMETRIES["open_clip"]["w96h3_p8_px32"], vocab_size=49408, context_length=77)
  (tmp_path / "src").mkdir()
  ref = refs.BUILDERS["open_clip"](str(tmp_path / "src"), dict(g, format="open_clip"), 0)
  export = str(tmp_path / "clip_b16")
  assert import_checkpoint.main(
      ["--checkpoint", ref.path, "--out", export, "--activation", "gelu", "--vision_heads",
       "3", "--text_heads", "2", "--tokenizer", bpe]) == 0
  rng = np.random.default_rng(0)
  for name in ("cat.jpg", "dog.jpg"):
    pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    (tmp_path / name).write_bytes(simplejpeg.encode_jpeg(pixels, quality=95))
  readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
  block = re.search(r"<!-- zero-shot-example -->\n```python\n(.*?)```", readme, re.S).group(1)
  monkeypatch.chdir(tmp_path)
  scope = {}
  exec(block.replace("/tmp/clip_b16", export), scope)  # noqa: S102
  pre, tok = scope["preprocess"], scope["tokenizer"]
  images = pre([open(tmp_path / f, "rb").read() for f in ("cat.jpg", "dog.jpg")])
  assert images.shape == (2, 32, 32, 3)
  texts = [f"a photo of a {c}" for c in scope["labels"]]
  ids = tok.encode(texts)  # equal to open_clip's tokenize: tests/test_tokenizers.py
  assert ids.shape == (3, 77) and ids[0, 0] == 49406
  want = ref.logits_per_image(images, ids)
  np.testing.assert_allclose(np.asarray(scope["logits"]), want, rtol=1e-4, atol=1e-4)

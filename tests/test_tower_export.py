"""A two-tower export's image tower as a classifier backbone (export.export_tower): the plain
ViT export computes exactly the contrastive model's pooled image features, a digits fine-tune
from it (config.init_from_export) reads the 8x8 greyscale digits as 3-channel images at the
tower's size (pp op to_rgb) and starts from the tower's weights, and
transferability.export_features scores the contrastive export through its zero-shot head.
Bad input (not a two-tower export, another tower) is a ValueError naming it."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from jax_transfer import checkpoint, config as config_lib, data, export, methods
from jax_transfer.data import pipeline


def _tiny_clip(data_dir):
  from ml_collections_configs.contrastive import shapes_clip
  c = shapes_clip.get_config("clip,runlocal")
  c.input.data_dir = data_dir
  c.model.update(image_variant="nano/8", text_depth=1, embed_dim=16)
  c.model.text_width = 32
  c.input.image_size = 16  # a resize in the export's recipe, which the fine-tune inherits
  return c


@pytest.fixture(scope="module")
def clip_export(tmp_path_factory, data_dir):
  root = tmp_path_factory.mktemp("tower")
  c = _tiny_clip(data_dir)
  mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
  method = methods.get_method(c.method)(c, mesh, workdir=str(root / "run"))
  params = jax.device_get(nn.unbox(method.init_params(jax.random.key(0))))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda v: v + 0.05 * rng.standard_normal(np.shape(v)).astype(v.dtype),
                        params)  # no zero leaf: every parameter's place is tested
  src = str(root / "clip")
  checkpoint.export(params, c, src, assets_from=str(root / "run"))
  tower = str(root / "tower")
  written = export.export_tower(src, tower)
  return {"src": src, "tower": tower, "method": method, "params": params, "config": written}


def _target(data_dir, export_dir):
  from conftest import tiny_vit_config
  c = tiny_vit_config(data_dir, "transfer,runlocal")
  c.model_name = ""
  return config_lib.init_from_export(c, export_dir, keep_head=False)


def test_tower_export_is_the_image_tower(clip_export, data_dir):
  model, params, cfg = checkpoint.load_pretrained(clip_export["tower"])
  assert cfg.model_name == "vit" and cfg.model.num_classes == 0 and "head" not in params
  assert cfg.tower_of.tower == "img" and cfg.input.image_size == 16
  src = checkpoint.flatten(clip_export["params"])
  assert checkpoint.flatten(params).keys() == {k[4:] for k in src if k.startswith("img/")}
  images = np.random.default_rng(1).uniform(-1, 1, (3, 16, 16, 3)).astype(np.float32)
  features, _ = model.apply({"params": params}, images)
  m = clip_export["method"]
  (_, _), aux = m.model.apply({"params": clip_export["params"]}, images, None)
  np.testing.assert_allclose(features, aux["img_features"], rtol=1e-5, atol=1e-5)


def test_digits_fine_tune_from_the_tower_reads_rgb_at_its_size(clip_export, data_dir):
  c = _target(data_dir, clip_export["tower"])
  assert c.model_name == "vit" and c.model.num_classes == 5
  assert c.input.pp == 'decode|resize(16, "pil_bilinear")|to_rgb|value_range(-1, 1)'
  config_lib.validate(c, 1)
  assert pipeline.image_shape(c.input) == (16, 16, 3)
  mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
  method = methods.get_method(c.method)(c, mesh)
  init = nn.unbox(method.init_params(jax.random.key(1)))
  loaded = checkpoint.flatten(jax.device_get(nn.unbox(method.load_pretrained(init))))
  tower = checkpoint.flatten(checkpoint.load_export_params(clip_export["tower"]))
  assert set(loaded) - set(tower) == {"head/kernel", "head/bias"}
  for k, v in tower.items():
    np.testing.assert_array_equal(loaded[k], v)
  # A greyscale export keeps the dataset's channels: no to_rgb.
  from conftest import tiny_vit_config
  grey = str(clip_export["tower"]) + "_grey"
  g = tiny_vit_config(data_dir)
  gm = methods.get_method(g.method)(g, mesh)
  checkpoint.export(jax.device_get(nn.unbox(gm.init_params(jax.random.key(0)))), g, grey)
  assert "to_rgb" not in (_target(data_dir, grey).input.pp or "")
  assert checkpoint.input_channels(grey) == 1
  assert checkpoint.input_channels(clip_export["src"]) == 3


def test_export_features_of_a_contrastive_export(clip_export, data_dir):
  from jax_transfer.evaluators import transferability as T
  from jax_transfer.evaluators.zero_shot import class_embeddings
  target = _target(data_dir, clip_export["tower"]).input
  dev = jax.devices()[:1]
  f = T.export_features(clip_export["src"], target, "train", devices=dev, zero_shot="shape")
  m, params = clip_export["method"], clip_export["params"]
  names = m.attributes["shape"]
  assert f["logits"].shape == (len(f["label"]), len(names))
  images = next(iter(pipeline.make_eval_iterator(target, "train", batch_size=8)))["image"]
  images = data.normaliser(target, train=False)({"image": images})["image"]
  (zimg, _), aux = m.model.apply({"params": params}, images, None)
  zc = class_embeddings(jax.jit(m.encode_text), params, m.tokenizer, names,
                        list(m.config.contrastive.zero_shot["shape"]))
  want = np.exp(params["logit_scale"]) * np.asarray(zimg, np.float64) @ zc.T
  np.testing.assert_allclose(f["logits"][:8], want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(f["features"][:8], aux["img_features"], rtol=1e-5, atol=1e-5)
  # The same features as the tower export's ViT (what its fine-tune's head reads).
  model, tparams, _ = checkpoint.load_pretrained(clip_export["tower"])
  np.testing.assert_allclose(f["features"][:8], model.apply({"params": tparams}, images)[0],
                             rtol=1e-5, atol=1e-5)
  colour = T.export_features(clip_export["src"], target, "train", devices=dev,
                             zero_shot="color")
  assert colour["logits"].shape[1] == len(m.attributes["color"])
  for bad in ("colour", None):
    with pytest.raises(ValueError, match=rf"zero_shot={bad!r} is not one of its"):
      T.export_features(clip_export["src"], target, "train", devices=dev, zero_shot=bad)


def test_bad_tower_exports_are_refused(clip_export, exports, tmp_path):
  with pytest.raises(ValueError, match=r"--tower='txt': only the image tower"):
    export.export_tower(clip_export["src"], str(tmp_path / "t"), tower="txt")
  with pytest.raises(ValueError, match=r"model_name 'vit' is not a two-tower model"):
    export.export_tower(exports["base"], str(tmp_path / "t"))
  with pytest.raises(FileNotFoundError, match="lacks"):
    export.export_tower(str(tmp_path / "nothing"), str(tmp_path / "t"))
  assert not (tmp_path / "t").exists()


def test_unreadable_params_name_the_file(tmp_path):
  (tmp_path / "config.json").write_text("{}")
  (tmp_path / "params.safetensors").write_bytes(b"")
  (tmp_path / "params.msgpack").write_bytes(b"")
  with pytest.raises(ValueError, match=r"params.safetensors: not a readable safetensors file"):
    checkpoint.input_channels(str(tmp_path))

"""Preprocessing ops (jax_transfer/data/pp/): each op's defining behaviour, recipe parsing,
decoding at reduced DCT scale, device-side value_range, and recipes inside the pipeline
(resume, workers and processes draw the same augmentations)."""
import io

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from jax_transfer.data import pipeline, preprocess
from jax_transfer.data.pp import ops_image, registry


def _smooth_image(h, w, seed=0):
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:h, 0:w]
  img = np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (h + w)], -1)
  img = img + rng.integers(-8, 8, img.shape)
  return np.clip(img, 0, 255).astype(np.uint8)


def _jpeg(h=300, w=400, seed=0, quality=95):
  return simplejpeg.encode_jpeg(_smooth_image(h, w, seed), quality=quality)


def _run(recipe, example, seed=0):
  return registry.Preprocess(recipe)(dict(example), np.random.default_rng(seed))


# ------------------------------------------------------------------------------ parsing


def test_pipe_string_and_list_are_the_same_recipe():
  a = registry.Preprocess('decode|resize_small(64)|central_crop(48)|value_range(-1, 1)')
  b = registry.Preprocess(['decode', 'resize_small(64)', 'central_crop(48)', 'value_range(-1,1)'])
  ex = {'image': _jpeg()}
  np.testing.assert_array_equal(a(dict(ex), None)['image'], b(dict(ex), None)['image'])
  assert a.out_size == b.out_size == (48, 48) and a.value_range == (-1.0, 1.0)
  assert registry.parse_call('resize_small(256, method="area")') == (
      'resize_small', (256,), {'method': 'area'})


def test_recipe_errors_name_the_op():
  with pytest.raises(registry.PPError, match=r"unknown pp op 'rezise'.*registered: \[.*'resize'"):
    registry.Preprocess('decode|rezise(3)')
  with pytest.raises(registry.PPError, match='must be the last op'):
    registry.Preprocess('decode|value_range(-1, 1)|flip_lr')
  with pytest.raises(registry.PPError, match="resize method 'cubic' is unknown"):
    registry.Preprocess('resize(4, method="cubic")')
  with pytest.raises(registry.PPError, match='does not parse'):
    registry.Preprocess('resize(4')
  with pytest.raises(registry.PPError, match='literals'):
    registry.Preprocess('resize(size)')


def test_head_tail_split_at_first_random_op():
  r = registry.Preprocess('decode|resize(40)|flip_lr|central_crop(32)')
  assert r.random and r.head_out_size == (40, 40) and r.out_size == (32, 32)
  assert not registry.Preprocess('decode|resize(8)').random


# ------------------------------------------------------------------------------ decoding


def test_decode_jpeg_png_array_and_grey():
  data = _jpeg(60, 80)
  np.testing.assert_array_equal(_run('decode', {'image': data})['image'],
                                simplejpeg.decode_jpeg(data))
  img = _smooth_image(20, 30)
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format='PNG')
  np.testing.assert_array_equal(_run('decode', {'image': buf.getvalue()})['image'], img)
  np.testing.assert_array_equal(_run('decode', {'image': img})['image'], img)  # Passthrough.
  grey = _run('decode(channels=1)', {'image': data})['image']
  assert grey.shape == (60, 80, 1) and grey.dtype == np.uint8
  # tfds SkipDecoding returns bytes in a 0-d object array.
  wrapped = np.array(data, dtype=object)
  assert _run('decode', {'image': wrapped})['image'].shape == (60, 80, 3)


def test_corrupt_bytes_raise_a_clear_error():
  with pytest.raises(ops_image.CorruptImageError, match='cannot decode'):
    _run('decode', {'image': b'\xff\xd8\xff' + b'garbage' * 10})
  with pytest.raises(ops_image.CorruptImageError):
    _run('decode_jpeg_and_inception_crop(32)', {'image': b'not an image'})


def test_decode_then_resize_small_uses_dct_downscaling(monkeypatch):
  """decode|resize_small(s) decodes at the smallest M/8 scale >= s (fewer pixels than the
  full image) and stays close to a full decode + the same resize."""
  data = _jpeg(480, 640)
  seen = []
  real = ops_image.decode_bytes
  monkeypatch.setattr(ops_image, 'decode_bytes',
                      lambda *a, **k: seen.append(real(*a, **k).shape) or real(*a, **k))
  fused = _run('decode|resize_small(120)', {'image': data})['image']
  assert fused.shape == (120, 160, 3)
  assert seen and seen[0][0] < 480 and seen[0][0] >= 120  # Decoded at 1/4: 120 x 160.
  full = ops_image.resize_array(simplejpeg.decode_jpeg(data), (120, 160), 'area')
  assert np.abs(fused.astype(int) - full).mean() < 2.0


def test_decode_jpeg_and_inception_crop_matches_full_decode_crop_resize(monkeypatch):
  """Same crop box as a full decode would take (the rng draws from the header's size);
  pixels within JPEG-scaling error of full decode -> crop -> resize."""
  data = _jpeg(400, 600)
  for seed in range(5):
    got = _run('decode_jpeg_and_inception_crop(64)', {'image': data}, seed)['image']
    top, left, h, w = ops_image.sample_inception_crop(np.random.default_rng(seed), 400, 600)
    full = simplejpeg.decode_jpeg(data)[top:top + h, left:left + w]
    want = ops_image.resize_array(full, (64, 64), 'area')
    assert got.shape == (64, 64, 3) and got.dtype == np.uint8
    assert np.abs(got.astype(int) - want).mean() < 4.0, seed
  a = _run('decode_jpeg_and_inception_crop(64)', {'image': data}, 7)['image']
  b = _run('decode_jpeg_and_inception_crop(64)', {'image': data}, 7)['image']
  np.testing.assert_array_equal(a, b)


def test_inception_crop_boxes_cover_the_area_and_ratio_ranges():
  rng = np.random.default_rng(0)
  areas, ratios = [], []
  for _ in range(2000):
    top, left, h, w = ops_image.sample_inception_crop(rng, 300, 400)
    assert 0 <= top and top + h <= 300 and 0 <= left and left + w <= 400
    areas.append(h * w / (300 * 400))
    ratios.append(w / h)
  assert 0.04 < min(areas) < 0.1 and max(areas) > 0.9
  assert min(ratios) > 0.7 and max(ratios) < 1.4
  # A 1 x 100 strip cannot fit a ratio in [3/4, 4/3]: the clamped central crop.
  assert ops_image.sample_inception_crop(np.random.default_rng(0), 1, 100) == (0, 49, 1, 1)


# --------------------------------------------------------------------------- crops, resizes


def test_central_and_random_crop():
  img = _smooth_image(10, 12)
  np.testing.assert_array_equal(_run('central_crop(4)', {'image': img})['image'], img[3:7, 4:8])
  crops = {_run('random_crop((4, 5))', {'image': img}, s)['image'].tobytes() for s in range(20)}
  assert len(crops) > 5
  with pytest.raises(ValueError, match='smaller than the crop'):
    _run('central_crop(20)', {'image': img})


def test_resize_methods():
  img = _smooth_image(37, 50)
  legacy = np.stack([np.asarray(Image.fromarray(img[..., c]).resize((16, 16), Image.BILINEAR))
                     for c in range(3)], -1)  # The pipeline's resize before recipes existed.
  np.testing.assert_array_equal(_run('resize(16, "pil_bilinear")', {'image': img})['image'],
                                legacy)
  import cv2
  np.testing.assert_array_equal(_run('resize((40, 60))', {'image': img})['image'],
                                cv2.resize(img, (60, 40), interpolation=cv2.INTER_LINEAR))
  small = _run('resize_small(20)', {'image': img})['image']
  assert small.shape == (20, 27, 3)  # round(50 * 20 / 37) = 27.


def test_to_rgb_repeats_grey_and_sets_the_model_channels(data_dir):
  grey = _smooth_image(6, 5)[..., :1]
  rgb = _run('decode|to_rgb', {'image': grey})['image']
  assert rgb.shape == (6, 5, 3) and rgb.dtype == np.uint8
  np.testing.assert_array_equal(rgb, np.asarray(Image.fromarray(grey[..., 0]).convert('RGB')))
  colour = _smooth_image(6, 5)
  np.testing.assert_array_equal(_run('to_rgb', {'image': colour})['image'], colour)
  with pytest.raises(ValueError, match='to_rgb: an image of 2 channels'):
    _run('to_rgb', {'image': colour[..., :2]})
  r = registry.Preprocess('decode|resize(16)|to_rgb|value_range(-1, 1)')
  assert (r.out_channels, r.head_out_channels) == (3, 3)
  assert registry.Preprocess('decode|resize(16)').out_channels is None
  # In the pipeline: the embedded 8x8 greyscale digits become 3-channel model inputs.
  from conftest import tiny_vit_config
  from jax_transfer import config as config_lib
  c = tiny_vit_config(data_dir)
  c.input.pp = 'decode|to_rgb|value_range(-1, 1)'
  with pytest.raises(config_lib.ConfigError, match=r"input.pp makes 3 channels but "
                     r"input.pp_eval the dataset's"):
    config_lib.validate(c, 8)
  c.input.pp_eval = c.input.pp
  config_lib.validate(c, 8)
  assert pipeline.image_shape(c.input) == (8, 8, 3)
  batch = next(iter(pipeline.make_eval_iterator(c.input, 'test', batch_size=4)))
  assert batch['image'].shape == (4, 8, 8, 3)
  np.testing.assert_array_equal(batch['image'][..., 0], batch['image'][..., 2])


def test_flip_lr():
  img = _smooth_image(5, 7)
  np.testing.assert_array_equal(_run('flip_lr(1.0)', {'image': img})['image'], img[:, ::-1])
  np.testing.assert_array_equal(_run('flip_lr(0.0)', {'image': img})['image'], img)
  flips = [_run('flip_lr', {'image': img}, s)['image'][0, 0, 0] != img[0, 0, 0]
           for s in range(200)]
  assert 60 < sum(flips) < 140


def test_value_range_on_device_equals_the_host_formula():
  import jax
  x = np.arange(256, dtype=np.uint8)
  want = x.astype(np.float32) / 127.5 - 1.0  # What the pipeline computed on the host before.
  np.testing.assert_array_equal(registry.normalise(x, (-1, 1)), want)
  from jax_transfer import parallel
  mesh = parallel.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1}, jax.devices())
  cfg = pipeline.ml_collections.ConfigDict(dict(pp='decode|value_range(-1, 1)'))
  batch = parallel.global_batch({'image': np.tile(x, (8, 1))}, mesh)
  for row in np.asarray(preprocess.normaliser(cfg)(batch)['image']):
    np.testing.assert_array_equal(row, want)  # Bitwise: the device divides as numpy does.
  np.testing.assert_allclose(registry.normalise(x, (0, 1)), x / 255.0, rtol=1e-6)


def test_normaliser_keeps_the_batch_sharding():
  import jax
  from jax_transfer import parallel
  mesh = parallel.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1}, jax.devices())
  cfg = pipeline.ml_collections.ConfigDict(dict(pp='decode|value_range(0, 1)'))
  images = np.random.default_rng(0).integers(0, 256, (8, 4, 4, 3), dtype=np.uint8)
  batch = parallel.global_batch({'image': images, 'label': np.arange(8)}, mesh)
  out = preprocess.normaliser(cfg)(batch)
  assert out['image'].dtype == np.float32 and out['label'] is batch['label']
  assert out['image'].sharding.is_equivalent_to(batch['image'].sharding, 4)
  np.testing.assert_allclose(np.asarray(out['image']), images / 255.0, rtol=1e-6)


# ----------------------------------------------------------------- recipes in the pipeline


def _aug_cfg(data_dir, **kw):
  cfg = pipeline.ml_collections.ConfigDict(dict(
      dataset='shapes_captions', data_dir=data_dir, train_split='train', global_batch_size=8,
      label_key='shape', caption_key='caption', classes=None, examples_per_class=None,
      subset_seed=0, image_size=None, num_workers=0, prefetch=2,
      pp='decode|inception_crop(24)|flip_lr|value_range(-1, 1)',
      pp_eval='decode|central_crop(24)|value_range(-1, 1)'))
  cfg.update(kw)
  return cfg


def _take(it, n):
  return [{k: np.array(v) for k, v in next(it).items()} for _ in range(n)]


def test_random_recipe_resumes_and_matches_across_workers_and_processes(data_dir):
  cfg = _aug_cfg(data_dir)
  assert pipeline.image_shape(cfg) == (24, 24, 3)
  it = pipeline.make_train_iterator(cfg, seed=0)
  first = _take(it, 2)
  state = it.get_state()
  want = _take(it, 3)
  resumed = pipeline.make_train_iterator(cfg, seed=0)
  resumed.set_state(state)
  for a, b in zip(_take(resumed, 3), want):
    np.testing.assert_array_equal(a['image'], b['image'])
  # Worker processes draw the same crops and flips.
  workers = pipeline.make_train_iterator(_aug_cfg(data_dir, num_workers=2), seed=0)
  for a, b in zip(_take(workers, 2), first):
    np.testing.assert_array_equal(a['image'], b['image'])
  # ... and resume exactly from a state saved with workers.
  worker_state = workers.get_state()
  resumed = pipeline.make_train_iterator(_aug_cfg(data_dir, num_workers=2), seed=0)
  resumed.set_state(worker_state)
  for a, b in zip(_take(resumed, 3), want):
    np.testing.assert_array_equal(a['image'], b['image'])
  # Two processes' halves concatenate to the 1-process batch, augmentations included.
  halves = [_take(pipeline.make_train_iterator(cfg, seed=0, process_index=p,
                                               process_count=2), 2) for p in range(2)]
  for s in range(2):
    np.testing.assert_array_equal(
        np.concatenate([halves[0][s]['image'], halves[1][s]['image']]), first[s]['image'])
  # The augmentation is random: two epochs' views of one record differ, the eval recipe not.
  prep = preprocess.Preprocess(pipeline.get_source('shapes_captions', 'train', data_dir), cfg)
  assert not np.array_equal(prep(0, position=0)['image'], prep(0, position=1)['image'])
  ev = preprocess.Preprocess(prep.source, cfg, train=False)
  np.testing.assert_array_equal(ev(0, position=0)['image'], ev(0, position=1)['image'])


def test_cached_split_with_random_ops_caches_only_the_deterministic_head(data_dir):
  """shapes_captions fits the cache: the head (decode) is computed once, the random tail
  per batch; both batch paths agree."""
  cfg = _aug_cfg(data_dir)
  source = pipeline.get_source('shapes_captions', 'train', data_dir)
  cached = preprocess.PreprocessBatch(source, cfg, record_bytes=1)
  streamed = preprocess.PreprocessBatch(source, cfg, record_bytes=None)
  assert cached.cached and not streamed.cached
  pos, idx = np.arange(10, 16), np.array([5, 3, 99, 0, 7, 5])
  a, b = cached(pos, idx), streamed(pos, idx)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(a['image'][0], a['image'][5])  # Same record, other position.


def test_config_validation_names_the_recipe_key(data_dir):
  from conftest import tiny_vit_config
  from jax_transfer import config as config_lib
  c = tiny_vit_config(data_dir)
  c.input.pp = 'decode|flip_lr|rezise(8)|value_range(-1, 1)'
  with pytest.raises(config_lib.ConfigError, match=r"^input.pp: unknown pp op 'rezise'"):
    config_lib.validate(c, 8)
  c = tiny_vit_config(data_dir)
  c.input.pp = 'decode|random_crop(6)|value_range(-1, 1)'
  c.input.pp_eval = 'decode|central_crop(4)|value_range(-1, 1)'
  with pytest.raises(config_lib.ConfigError, match=r"input.pp makes \(6, 6\) images but "
                     r"input.pp_eval makes \(4, 4\)"):
    config_lib.validate(c, 8)
  c.input.pp_eval = 'decode|central_crop(6)|value_range(-1, 1)'
  c.model.variant = 'nano/3'
  config_lib.validate(c, 8)  # Fine: 6x6 crops of the 8x8 digits, patch 3.
  assert pipeline.image_shape(c.input) == (6, 6, 1)


def test_every_random_op_is_marked_random():
  """Ops that draw from the rng must say so, or PreprocessBatch would cache one draw."""
  img = _smooth_image(40, 40)
  for name in registry.registered():
    if name in ('value_range',):
      continue
    args = {'resize': '(8)', 'resize_small': '(8)', 'central_crop': '(8)',
            'random_crop': '(8)', 'inception_crop': '(8)',
            'decode_jpeg_and_inception_crop': '(8)'}.get(name, '')
    fn = registry.Preprocess(f'{name}{args}')
    ex = {'image': simplejpeg.encode_jpeg(img) if name.startswith('decode') else img}
    outs = {fn(dict(ex), np.random.default_rng(s))['image'].tobytes() for s in range(12)}
    assert (len(outs) > 1) == fn.random, name

"""Tests of the offline builders and the grain pipelines (jax_transfer/data)."""

import collections
import json

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from jax_transfer.data import builders
from jax_transfer.data import pipeline
from jax_transfer.data import preprocess


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp('tfds'))
  for name in builders.EMBEDDED:
    builders.ensure_embedded(name, d)
  return d


def _cfg(data_dir, dataset='digits', **overrides):
  cfg = dict(dataset=dataset, data_dir=data_dir, train_split='train',
             global_batch_size=12, classes=None, examples_per_class=None,
             subset_seed=0, image_size=None, num_workers=0, prefetch=2,
             label_key='label')
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ----------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------


def test_builders_are_deterministic(data_dir, tmp_path):
  # shapes_jpeg: tests/test_builders_jpeg.py (byte-identical JPEGs).
  for name in ('digits', 'shapes_captions'):
    builders.build_embedded(name, str(tmp_path))
    for split in ('train', 'test'):
      a = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
      b = tfds.data_source(name, split=split, data_dir=str(tmp_path),
                           download=False)
      assert len(a) == len(b)
      idx = list(range(0, len(a), 7))  # A spread sample keeps this fast.
      for ea, eb in zip(a.__getitems__(idx), b.__getitems__(idx)):
        for k in ea:
          np.testing.assert_array_equal(ea[k], eb[k], err_msg=f'{name}/{k}')


def test_split_sizes_and_info(data_dir):
  digits = pipeline.dataset_info('digits', data_dir)
  assert digits['num_examples'] == {'train': 1347, 'test': 450}
  assert digits['num_classes'] == 10 and digits['image_shape'] == (8, 8, 1)
  shapes = pipeline.dataset_info('shapes_captions', data_dir, label_key='shape')
  assert shapes['num_examples'] == {'train': 10000, 'test': 2000}
  assert shapes['image_shape'] == (32, 32, 3)
  assert shapes['class_names'] == list(builders.SHAPES)
  assert shapes['attributes']['color'] == list(builders.COLORS)
  # Stratified: every digit class is 10% +- 1.5% of the test split.
  labels = [int(e['label']) for e in pipeline.get_source('digits', 'test', data_dir)]
  counts = np.bincount(labels, minlength=10)
  assert counts.min() >= 43 and counts.max() <= 47, counts
  # Train and test of shapes_captions come from different seeds.
  tr = pipeline.get_source('shapes_captions', 'train', data_dir)
  te = pipeline.get_source('shapes_captions', 'test', data_dir)
  assert not np.array_equal(tr[0]['image'], te[0]['image'])


def test_digits_pixel_range(data_dir):
  images = np.stack([e['image'] for e in pipeline.get_source('digits', 'train', data_dir)])
  assert images.dtype == np.uint8 and images.max() == 255 and images.min() == 0
  # v * 255 // 16 only produces 17 distinct grey levels.
  assert len(np.unique(images)) <= 17


def test_captions_and_pixels_match_attributes(data_dir):
  info = pipeline.dataset_info('shapes_captions', data_dir)['attributes']
  source = pipeline.get_source('shapes_captions', 'test', data_dir)
  colors = np.array(list(builders.COLORS.values()), np.float32)
  for ex in source.__getitems__(list(range(300))):
    names = {k: info[k][int(ex[k])] for k in ('shape', 'color', 'size', 'position')}
    captions = {builders.caption_for(**names, template=t)
                for t in range(len(builders.CAPTION_TEMPLATES))}
    assert ex['caption'].decode() in captions
    # The shape's pixels (background is < 40) carry the named colour ...
    image = ex['image'].astype(np.float32)
    fg = image.max(-1) > 100
    assert fg.sum() >= 10
    mean = image[fg].mean(0)
    assert np.argmin(((colors - mean)**2).sum(-1)) == int(ex['color'])
    # ... and their centroid lies in the named cell of the 3x3 grid.
    ys, xs = np.nonzero(fg)
    row, col = int(ys.mean() * 3 // 32), int(xs.mean() * 3 // 32)
    assert row * 3 + col == int(ex['position']), names


# ----------------------------------------------------------------------------
# Index selection
# ----------------------------------------------------------------------------


def test_class_filter_remaps_labels(data_dir):
  cfg = _cfg(data_dir, classes=[7, 3], global_batch_size=16)
  source = pipeline.get_source('digits', 'test', data_dir)
  orig = np.array([int(e['label']) for e in source])
  images, labels = [], []
  for batch in pipeline.make_eval_iterator(cfg, 'test', batch_size=16):
    images.append(batch['image'][batch['mask']])
    labels.append(batch['label'][batch['mask']])
  images, labels = np.concatenate(images), np.concatenate(labels)
  assert len(labels) == np.isin(orig, [7, 3]).sum()
  # Eval order is the kept record order: check each image and its new label.
  kept = np.flatnonzero(np.isin(orig, [7, 3]))
  for i, r in enumerate(kept):
    np.testing.assert_array_equal(images[i], source[int(r)]['image'])
    assert labels[i] == (0 if orig[r] == 7 else 1)
  assert pipeline.num_classes(cfg) == 2


def test_few_shot_subset(data_dir):
  cfg = _cfg(data_dir, examples_per_class=5, global_batch_size=10)
  idx = pipeline.select_indices(cfg, 'train', few_shot=True)
  labels = np.array([int(e['label']) for e in
                     pipeline.get_source('digits', 'train', data_dir).__getitems__(
                         idx.tolist())])
  np.testing.assert_array_equal(np.bincount(labels), [5] * 10)
  np.testing.assert_array_equal(
      idx, pipeline.select_indices(cfg, 'train', few_shot=True))
  cfg.subset_seed = 1
  assert set(idx) != set(pipeline.select_indices(cfg, 'train', few_shot=True))
  # Training reads only the subset: one epoch (5 batches) sees each class 5x,
  # and the next epoch is a different permutation of the same examples.
  cfg.subset_seed = 0
  batches = _take(pipeline.make_train_iterator(cfg, seed=0), 10)
  epoch1 = np.concatenate([b['label'] for b in batches[:5]])
  epoch2 = np.concatenate([b['label'] for b in batches[5:]])
  np.testing.assert_array_equal(np.bincount(epoch1), [5] * 10)
  np.testing.assert_array_equal(np.bincount(epoch2), [5] * 10)
  assert not np.array_equal(epoch1, epoch2)


def test_few_shot_too_few_examples_raises(data_dir):
  with pytest.raises(ValueError, match='examples_per_class=1000'):
    pipeline.select_indices(_cfg(data_dir, examples_per_class=1000), 'train',
                            few_shot=True)


# ----------------------------------------------------------------------------
# Train iterator
# ----------------------------------------------------------------------------


def test_train_batch_format(data_dir):
  cfg = _cfg(data_dir, 'shapes_captions', label_key='color', image_size=16)
  batch = next(pipeline.make_train_iterator(cfg, seed=0))
  assert batch['image'].shape == (12, 16, 16, 3)
  assert batch['image'].dtype == np.uint8  # Scaled to [-1, 1] on the devices (normaliser).
  assert batch['label'].dtype == np.int32
  np.testing.assert_array_equal(batch['label'], batch['color'])
  colors = list(builders.COLORS)
  for caption, c in zip(batch['caption'], batch['color']):
    assert colors[c] in str(caption)


def test_process_slices_concatenate_to_global_batch(data_dir):
  cfg = _cfg(data_dir, 'shapes_captions', global_batch_size=12, label_key='shape')
  steps = 4
  want = _take(pipeline.make_train_iterator(cfg, seed=3), steps)
  per_process = [_take(pipeline.make_train_iterator(
      cfg, seed=3, process_index=p, process_count=3), steps) for p in range(3)]
  for s in range(steps):
    assert per_process[0][s]['image'].shape[0] == 4
    got = {k: np.concatenate([per_process[p][s][k] for p in range(3)])
           for k in want[s]}
    _assert_batches_equal([got], [want[s]])


def test_resume_from_state_gives_same_batches(data_dir):
  cfg = _cfg(data_dir)
  it = pipeline.make_train_iterator(cfg, seed=0)
  _take(it, 150)  # Past the first epoch boundary (1347 / 12 = 112 steps).
  state = json.loads(json.dumps(it.get_state()))  # Must survive JSON.
  want = _take(it, 3)
  resumed = pipeline.make_train_iterator(cfg, seed=0)
  resumed.set_state(state)
  _assert_batches_equal(_take(resumed, 3), want)
  # A different seed changes the order (the test above could pass vacuously).
  other = pipeline.make_train_iterator(cfg, seed=1)
  assert not np.array_equal(next(other)['image'], next(
      pipeline.make_train_iterator(cfg, seed=0))['image'])


def test_worker_processes_match_in_process(data_dir):
  cfg = _cfg(data_dir)
  want = _take(pipeline.make_train_iterator(cfg, seed=0), 3)
  cfg.num_workers = 2
  got = [{k: np.array(v) for k, v in b.items()}
         for b in _take(pipeline.make_train_iterator(cfg, seed=0), 3)]
  _assert_batches_equal(got, want)


def test_every_epoch_visits_each_index_once_in_a_new_order():
  """Batches of 20 over 50 indices straddle epoch boundaries; the stream is still whole
  epochs, each a permutation, and the orders differ."""
  idx = np.arange(100, 150)
  ds = pipeline._ShuffledBatches(idx, seed=5, process_index=0, process_count=1,
                                 per_process_batch=20)
  epochs = np.concatenate([ds[s] for s in range(10)]).reshape(4, 50)
  for e in epochs:
    np.testing.assert_array_equal(np.sort(e), idx)
  assert len({e.tobytes() for e in epochs}) == 4


@pytest.mark.parametrize('dataset,overrides', [
    ('digits', dict(classes=(7, 2))),
    ('shapes_captions', dict(image_size=16, label_key='shape'))])
def test_batched_preprocessing_equals_per_example(data_dir, monkeypatch, dataset,
                                                  overrides):
  """Both batch paths, the in-memory table of a small split and record-by-record reading,
  give exactly the per-example Preprocess values, stacked (same dtypes too)."""
  cfg = _cfg(data_dir, dataset, **overrides)
  source = pipeline.get_source(dataset, 'train', data_dir)
  idx = pipeline.select_indices(cfg, 'train', few_shot=False)[::7][:40][::-1]
  examples = [pipeline.Preprocess(source, cfg)(i) for i in idx]
  want = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
  cached = pipeline.PreprocessBatch(source, cfg, record_bytes=1)
  monkeypatch.setattr(preprocess, "CACHE_MAX_BYTES", 0)
  streamed = pipeline.PreprocessBatch(source, cfg, record_bytes=1)
  assert cached.cached and not streamed.cached
  for make in (cached, streamed):
    got = make(np.arange(len(idx)), idx)
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
      if want[k].dtype.kind == 'U':  # Width: the longest caption of the batch or split.
        assert got[k].dtype.kind == 'U', k
      else:
        assert got[k].dtype == want[k].dtype, k


# ----------------------------------------------------------------------------
# Eval iterator
# ----------------------------------------------------------------------------


def test_eval_covers_every_example_once(data_dir):
  cfg = _cfg(data_dir)
  source = pipeline.get_source('digits', 'test', data_dir)
  want = collections.Counter(
      (e['image'].tobytes(), int(e['label'])) for e in source)
  got, num_batches = collections.Counter(), []
  for p in range(2):  # Global eval batch 64 -> 32 per process.
    batches = list(pipeline.make_eval_iterator(
        cfg, 'test', batch_size=64, process_index=p, process_count=2))
    num_batches.append(len(batches))
    for b in batches:
      assert b['image'].shape[0] == 32 and b['mask'].dtype == bool
      for img, lab in zip(b['image'][b['mask']], b['label'][b['mask']]):
        got[(img.tobytes(), int(lab))] += 1  # uint8 as stored.
  assert num_batches[0] == num_batches[1] == 8  # ceil(450 / 64)
  assert got == want


# ----------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------


def test_not_prepared_error_names_dataset_dir_and_command(tmp_path):
  with pytest.raises(pipeline.DatasetNotPreparedError) as e:
    pipeline.get_source('mnist', 'train', str(tmp_path))
  msg = str(e.value)
  assert 'mnist' in msg and str(tmp_path) in msg
  assert f'tfds build mnist --data_dir={tmp_path}' in msg


def test_unknown_split_lists_available(data_dir):
  with pytest.raises(ValueError, match=r"\['test', 'train'\]"):
    pipeline.get_source('digits', 'validation', data_dir)

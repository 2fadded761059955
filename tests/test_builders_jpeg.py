"""shapes_jpeg (JPEG records in imagenet2012's layout), the shapes_wds shards, and
jax_transfer.data.labels (label columns read without decoding images, cached on disk)."""

import errno
import json
import os
import shutil
import tarfile

import numpy as np
import pytest
import simplejpeg
import tensorflow_datasets as tfds

from jax_transfer.data import builders
from jax_transfer.data import labels as labels_lib

_TFDS_FILES = ('dataset_info.json', 'features.json', 'label.labels.txt',
               'shapes_jpeg-train.array_record-00000-of-00001',
               'shapes_jpeg-validation.array_record-00000-of-00001')


def _raw_source(data_dir, split):
  return tfds.data_source('shapes_jpeg', split=split, data_dir=data_dir, download=False,
                          decoders={'image': tfds.decode.SkipDecoding()})


def _records(data_dir, split):
  src = _raw_source(data_dir, split)
  return src.__getitems__(list(range(len(src))))


def _expected(split):
  """file_name -> the generator's example (with its attributes and geometry)."""
  num, seed = builders.ShapesJpeg.SPLITS[split]
  gen = builders.generate_shapes_jpeg(num, seed, builders.ShapesJpeg.MIN_SIZE,
                                      builders.ShapesJpeg.MAX_SIZE)
  return {builders.shapes_jpeg_file_name(split, i, ex['shape']): ex
          for i, ex in enumerate(gen)}


# ----------------------------------------------------------------------------
# shapes_jpeg
# ----------------------------------------------------------------------------


def test_shapes_jpeg_layout_and_sizes(data_dir):
  from jax_transfer.data import pipeline
  builder = tfds.builder('shapes_jpeg', data_dir=data_dir)
  features = builder.info.features
  assert isinstance(features['image'], tfds.features.Image)
  assert features['image'].encoding_format == 'jpeg'
  assert features['image'].shape == (None, None, 3)
  assert features['label'].names == list(builders.SHAPES)
  assert isinstance(features['file_name'], tfds.features.Text)
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {
      'train': 4000, 'validation': 500}
  # At 224x224x3 uint8 the train split takes the pipeline's streaming (ImageNet) path.
  assert 4000 * (224 * 224 * 3 + 256) > pipeline.CACHE_MAX_BYTES
  for split in ('train', 'validation'):
    hw = np.array([simplejpeg.decode_jpeg_header(r['image'])[:2]
                   for r in _records(data_dir, split)])
    assert hw.min() >= 96 and hw.max() <= 500
    assert hw.min() < 110 and hw.max() > 485  # The whole range is used.
    assert len(np.unique(hw[:, 0])) > 100  # Varying, not a few fixed sizes.


def test_shapes_jpeg_stores_the_written_jpeg_bytes(data_dir):
  expected = _expected('validation')
  records = _records(data_dir, 'validation')
  assert sorted(r['file_name'].decode() for r in records) == sorted(expected)
  decoded = tfds.data_source('shapes_jpeg', split='validation', data_dir=data_dir,
                             download=False)
  for i, r in enumerate(records):
    ex = expected[r['file_name'].decode()]
    assert isinstance(r['image'], bytes) and r['image'] == ex['jpeg']
    assert r['label'] == ex['shape']
    if i < 20:  # simplejpeg decodes it, to what tfds (cv2) decodes.
      image = simplejpeg.decode_jpeg(r['image'], colorspace='RGB')
      assert image.shape == (ex['height'], ex['width'], 3)
      np.testing.assert_array_equal(image, decoded[i]['image'])


def test_shapes_jpeg_labels_match_the_rendered_shape(data_dir):
  """In the decoded JPEG, the label's mask (at the generator's centre and radius) is the
  one of the 6 shapes that best matches the coloured pixels, and has the colour."""
  expected = _expected('validation')
  colors = list(builders.COLORS.values())
  for r in _records(data_dir, 'validation')[:80]:
    ex = expected[r['file_name'].decode()]
    image = simplejpeg.decode_jpeg(r['image'], colorspace='RGB').astype(np.float32)
    h, w = image.shape[:2]
    grid = (np.arange(h, dtype=np.float32)[:, None] + 0.5,
            np.arange(w, dtype=np.float32)[None, :] + 0.5)
    (cy, cx), rad = ex['center'], ex['radius']
    lit = image.max(-1) > 110  # Background <= 46; every colour has a channel >= 185.
    ys, xs = slice(max(0, int(cy - rad) - 2), int(cy + rad) + 3), slice(
        max(0, int(cx - rad) - 2), int(cx + rad) + 3)
    scores = [np.mean(builders._shape_mask(s, cy, cx, rad, grid)[ys, xs] == lit[ys, xs])
              for s in builders.SHAPES]
    assert int(np.argmax(scores)) == r['label'], (r['file_name'], scores)
    assert scores[r['label']] > 0.9
    mask = builders._shape_mask(builders.SHAPES[r['label']], cy, cx, rad, grid)
    mean = image[mask].mean(0)
    assert np.abs(mean - colors[ex['color']]).max() < 40, (mean, ex['color'])
    assert image[~mask].mean() < 50


def test_shapes_jpeg_build_is_deterministic_and_needs_no_tensorflow(data_dir, tmp_path):
  # A second build, in a process where TensorFlow cannot be imported: the same bytes.
  import subprocess
  import sys
  code = (
      'import importlib.machinery, sys\n'
      'class Skip(importlib.machinery.PathFinder):\n'
      '  @classmethod\n'
      '  def find_spec(cls, name, path=None, target=None):\n'
      '    if name.split(".")[0] == "tensorflow": return None\n'
      '    return super().find_spec(name, path, target)\n'
      'sys.meta_path[sys.meta_path.index(importlib.machinery.PathFinder)] = Skip\n'
      'from jax_transfer.data import builders\n'
      f'builders.build_embedded("shapes_jpeg", {str(tmp_path)!r})\n'
      'assert not [m for m in sys.modules if m.split(".")[0] == "tensorflow"]\n')
  subprocess.run([sys.executable, '-c', code], check=True, capture_output=True,
                 cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  a = os.path.join(data_dir, 'shapes_jpeg', '1.0.0')
  b = os.path.join(str(tmp_path), 'shapes_jpeg', '1.0.0')
  for name in _TFDS_FILES:
    with open(os.path.join(a, name), 'rb') as fa, open(os.path.join(b, name), 'rb') as fb:
      assert fa.read() == fb.read(), name


def test_ensure_embedded_is_idempotent(data_dir):
  path = os.path.join(data_dir, 'shapes_jpeg', '1.0.0', _TFDS_FILES[3])
  before = os.stat(path).st_mtime_ns
  assert builders.ensure_embedded('shapes_jpeg', data_dir) == os.path.dirname(path)
  assert os.stat(path).st_mtime_ns == before


def test_shapes_captions_renders_as_before():
  """The generalised _shape_mask keeps shapes_captions' 32x32 images (a fixed checksum of
  its first examples, computed before the generalisation)."""
  import hashlib
  h = hashlib.sha256()
  for _, ex in builders.generate_shapes(50, 1):
    h.update(ex['image'].tobytes())
    h.update(ex['caption'].encode())
  assert h.hexdigest() == _SHAPES_CAPTIONS_50


# sha256 of images + captions of generate_shapes(50, seed=1) at commit 81fbe1e.
_SHAPES_CAPTIONS_50 = '9940f2bdf8b89ecb1a27d1d05ee86269be0df9e2dd7db4997a815209769115f3'


# ----------------------------------------------------------------------------
# shapes_wds
# ----------------------------------------------------------------------------


def test_shapes_wds_layout(data_dir):
  root = builders.ensure_shapes_wds(data_dir)
  assert root == os.path.join(data_dir, 'shapes_wds')
  shards = sorted(f for f in os.listdir(root) if f.endswith('.tar'))
  assert shards == [f'shapes-{i:05d}.tar' for i in range(8)]
  with open(os.path.join(root, 'stats.json')) as f:
    assert json.load(f)['count'] == 4000
  keys = []
  for shard, name in enumerate(shards):
    with tarfile.open(os.path.join(root, name)) as tar:
      members = tar.getmembers()
      assert len(members) == 3 * 500
      for j in range(0, len(members), 3):
        group = members[j:j + 3]
        key = group[0].name.split('.')[0]
        assert [m.name for m in group] == [f'{key}.jpg', f'{key}.txt', f'{key}.json']
        assert key == f'{shard:05d}{j // 3:04d}' and len(key) == 9
        keys.append(key)
        jpg, txt, meta = (tar.extractfile(m).read() for m in group)
        meta = json.loads(meta)
        assert meta['key'] == key
        assert {'shape', 'color', 'size', 'position'} <= meta.keys()
        names = dict(shape=builders.SHAPES[meta['shape']],
                     color=list(builders.COLORS)[meta['color']],
                     size=builders.SIZES[meta['size']],
                     position=builders.POSITIONS[meta['position']])
        captions = {builders.caption_for(**names, template=t)
                    for t in range(len(builders.CAPTION_TEMPLATES))}
        assert txt.decode() in captions and meta['caption'] == txt.decode()
        if j % 60 == 0:
          h, w = simplejpeg.decode_jpeg(jpg).shape[:2]
          assert 48 <= h <= 160 and 48 <= w <= 160
          assert (h, w) == (meta['height'], meta['width'])
  assert len(set(keys)) == 4000


def test_shapes_wds_is_deterministic_and_idempotent(data_dir, tmp_path):
  root = builders.ensure_shapes_wds(data_dir)
  mtimes = {f: os.stat(os.path.join(root, f)).st_mtime_ns for f in os.listdir(root)}
  assert builders.ensure_shapes_wds(data_dir) == root
  assert {f: os.stat(os.path.join(root, f)).st_mtime_ns for f in os.listdir(root)} == mtimes
  other = builders.ensure_shapes_wds(str(tmp_path))
  assert sorted(os.listdir(other)) == sorted(mtimes)
  for f in mtimes:
    with open(os.path.join(root, f), 'rb') as fa, open(os.path.join(other, f), 'rb') as fb:
      assert fa.read() == fb.read(), f
  assert not [f for f in os.listdir(tmp_path) if 'incomplete' in f]  # Renamed into place.


def test_shapes_wds_reads_with_webdataset(data_dir):
  wds = pytest.importorskip('webdataset')
  root = builders.ensure_shapes_wds(data_dir)
  samples = list(wds.WebDataset(os.path.join(root, 'shapes-00000.tar'),
                                shardshuffle=False))
  assert len(samples) == 500
  assert {'jpg', 'txt', 'json'} <= samples[0].keys()
  assert samples[0]['__key__'] == '000000000'


# ----------------------------------------------------------------------------
# labels.read_labels
# ----------------------------------------------------------------------------


@pytest.fixture
def digits_dir(data_dir, tmp_path):
  """A private copy of the prepared digits (its label cache starts absent)."""
  src = os.path.join(data_dir, 'digits')
  shutil.copytree(src, tmp_path / 'digits', ignore=shutil.ignore_patterns('labels'))
  labels_lib.clear_memo()
  yield str(tmp_path)
  labels_lib.clear_memo()


def _decoded_labels(name, split, data_dir, key='label'):
  src = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  return np.array([int(ex[key]) for ex in src], np.int64)


def _cache(data_dir, split, name='digits', key='label'):
  return labels_lib.cache_path(tfds.builder(name, data_dir=data_dir), split, key)


def test_read_labels_equals_decoded_and_writes_the_cache(digits_dir):
  for split in ('train', 'test', 'train[:10%]+test[5:-5]', 'test[100:200]'):
    got = labels_lib.read_labels('digits', split, digits_dir, 'label')
    assert got.dtype == np.int64 and not got.flags.writeable
    np.testing.assert_array_equal(got, _decoded_labels('digits', split, digits_dir))
  # Cached per base split only, beside the prepared data.
  cache_dir = os.path.dirname(_cache(digits_dir, 'train'))
  assert cache_dir == os.path.join(digits_dir, 'digits', '1.0.0', 'labels')
  assert sorted(os.listdir(cache_dir)) == ['test.label.npy', 'train.label.npy']
  np.testing.assert_array_equal(np.load(_cache(digits_dir, 'test')),
                                _decoded_labels('digits', 'test', digits_dir))
  # Memoised in-process: the same array.
  assert (labels_lib.read_labels('digits', 'train', digits_dir, 'label')
          is labels_lib.read_labels('digits', 'train', digits_dir, 'label'))


def test_read_labels_shapes_jpeg_and_other_keys(data_dir):
  labels_lib.clear_memo()
  got = labels_lib.read_labels('shapes_jpeg', 'validation', data_dir, 'label')
  np.testing.assert_array_equal(got, _decoded_labels('shapes_jpeg', 'validation', data_dir))
  # Any scalar int feature: shapes_captions' colour.
  got = labels_lib.read_labels('shapes_captions', 'test[:300]', data_dir, 'color')
  np.testing.assert_array_equal(
      got, _decoded_labels('shapes_captions', 'test[:300]', data_dir, 'color'))
  with pytest.raises(KeyError):
    labels_lib.read_labels('digits', 'test', data_dir, 'nope')


def test_read_labels_reuses_the_cache_file(digits_dir, monkeypatch):
  want = labels_lib.read_labels('digits', 'train', digits_dir, 'label')
  labels_lib.clear_memo()  # As a fresh process: only the file is left.

  def fail(*args):
    raise AssertionError('records read although the cache is present')

  monkeypatch.setattr(labels_lib, '_read_column', fail)
  np.testing.assert_array_equal(labels_lib.read_labels('digits', 'train', digits_dir), want)


def test_read_labels_invalidates_on_count_mismatch(digits_dir):
  path = _cache(digits_dir, 'train')
  os.makedirs(os.path.dirname(path))
  np.save(path, np.zeros(1000, np.int64))  # Wrong length: a stale or foreign file.
  got = labels_lib.read_labels('digits', 'train', digits_dir)
  np.testing.assert_array_equal(got, _decoded_labels('digits', 'train', digits_dir))
  np.testing.assert_array_equal(np.load(path), got)  # Rewritten.
  # Older than dataset_info.json (the dataset prepared again): also rebuilt.
  np.save(path, np.zeros(len(got), np.int64))
  info = os.path.join(digits_dir, 'digits', '1.0.0', 'dataset_info.json')
  os.utime(path, ns=(0, 0))
  assert os.stat(path).st_mtime < os.stat(info).st_mtime
  labels_lib.clear_memo()
  np.testing.assert_array_equal(labels_lib.read_labels('digits', 'train', digits_dir), got)
  np.testing.assert_array_equal(np.load(path), got)


def test_read_labels_falls_back_to_memory_when_not_writable(digits_dir, monkeypatch):
  def read_only(*args, **kwargs):
    raise OSError(errno.EROFS, 'Read-only file system')

  monkeypatch.setattr(labels_lib.tempfile, 'mkstemp', read_only)
  got = labels_lib.read_labels('digits', 'test', digits_dir)
  np.testing.assert_array_equal(got, _decoded_labels('digits', 'test', digits_dir))
  assert not os.path.exists(_cache(digits_dir, 'test'))
  assert labels_lib.read_labels('digits', 'test', digits_dir) is got  # Memoised.
  # Also when the cache directory cannot be made (a file in its place).
  monkeypatch.undo()
  labels_lib.clear_memo()
  cache_dir = os.path.dirname(_cache(digits_dir, 'test'))
  if os.path.isdir(cache_dir):  # Made (empty) by the first read.
    os.rmdir(cache_dir)
  with open(cache_dir, 'w'):
    pass
  np.testing.assert_array_equal(labels_lib.read_labels('digits', 'test', digits_dir), got)


@pytest.mark.slow
def test_startup_benchmark_smoke(tmp_path):
  """benchmarks/startup.py end to end on a small dataset: its section, same labels."""
  import subprocess
  import sys
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  results = tmp_path / 'RESULTS.md'
  out = subprocess.run(
      [sys.executable, os.path.join(repo, 'benchmarks', 'startup.py'), '--data_dir',
       str(tmp_path / 'd'), '--num_train', '2000', '--rounds', '1', '--results', str(results)],
      capture_output=True, text=True, cwd=repo, timeout=600,
      env=dict(os.environ, XLA_FLAGS='', PYTHONPATH=repo))
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
  text = results.read_text()
  assert '## Start-up on a 100k-record dataset' in text
  assert 'All four give the same labels: yes.' in text

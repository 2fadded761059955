"""Shifted domains of the embedded datasets (jax_transfer/data/domains.py, builders.SHIFTED):
paired with the source record for record, shifted by the intended transform, deterministic,
and selectable as input.dataset through the pipeline."""

import glob
import itertools
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from jax_transfer.data import build, builders, domains, pipeline

DIGITS_DOMAINS = tuple(domains.DOMAINS['digits'])
SHAPES_DOMAINS = tuple(domains.DOMAINS['shapes_captions'])
SPLITS = ('train', 'test')


class _TinyShapes(builders.ShapesCaptions, skip_registration=True):
  """shapes_captions with 160 examples: the shapes domains' TFDS path, built in a second."""
  name = 'tiny_shapes'
  # TFDS reads a builder's metadata from its module's package; 'test_domains' is not one.
  __module__ = builders.__name__
  SPLITS = {'train': (120, 1), 'test': (40, 2)}


_TINY_SHIFTED = {d: builders.shifted_builder(_TinyShapes, 'shapes_captions', d,
                                             name=f'tiny_shapes_{d}', register=False)
                 for d in SHAPES_DOMAINS}


def _prepare(cls, data_dir):
  b = cls(data_dir=data_dir, file_format='array_record')
  b.download_and_prepare(download_config=tfds.download.DownloadConfig(
      compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return b


def _records(builder, split) -> dict:
  """Every record of `split`, in record order: {feature: stacked array}."""
  src = builder.as_data_source(split=split)
  recs = [src[i] for i in range(len(src))]
  return {k: np.stack([np.asarray(r[k]) for r in recs]) for k in recs[0]}


@pytest.fixture(scope='module')
def dd(tmp_path_factory):
  """digits and its domains (the real builders), tiny shapes and its domains."""
  d = str(tmp_path_factory.mktemp('domains'))
  builders.ensure_embedded('digits', d)
  for dom in DIGITS_DOMAINS:
    builders.ensure_embedded(f'digits_{dom}', d)
  _prepare(_TinyShapes, d)
  for cls in _TINY_SHIFTED.values():
    _prepare(cls, d)
  return d


def _digits(name, data_dir):
  return builders._builder(name, data_dir)  # pylint: disable=protected-access


def test_registry(tmp_path):
  d = str(tmp_path)  # Nothing is written there.
  assert set(builders.SHIFTED) == set(domains.names())
  assert set(builders.EMBEDDED) == {'digits', 'shapes_captions', 'shapes_jpeg'}  # Unchanged.
  for dataset in ('digits', 'shapes_captions'):
    assert len(domains.DOMAINS[dataset]) >= 2
  for name, (source, dom) in domains.names().items():
    assert domains.dataset_name(source, dom) == name and domains.parse(name) == (source, dom)
    assert builders.is_embedded(name)
    b, s = tfds.builder(name, data_dir=d), tfds.builder(source, data_dir=d)
    assert b.info.features.to_json_content() == s.info.features.to_json_content()
    assert os.fspath(b.data_dir).endswith(f'/{name}/1.0.0')
  # The source datasets keep their directories (nothing prepared before moves).
  assert os.fspath(tfds.builder('digits', data_dir=d).data_dir) == f'{d}/digits/1.0.0'
  assert domains.parse('digits') == ('digits', None)
  with pytest.raises(ValueError, match='Unknown domain'):
    domains.dataset_name('digits', 'palette')


@pytest.mark.parametrize('dom', DIGITS_DOMAINS)
def test_digits_domain_is_paired_and_shifted(dd, dom):
  src_b, dom_b = _digits('digits', dd), _digits(f'digits_{dom}', dd)
  for split in SPLITS:
    assert (dom_b.info.splits[split].num_examples == src_b.info.splits[split].num_examples)
    src, out = _records(src_b, split), _records(dom_b, split)
    np.testing.assert_array_equal(out['label'], src['label'])
    x, y = src['image'].astype(np.int64), out['image'].astype(np.int64)
    assert y.shape == x.shape and out['image'].dtype == np.uint8
    if dom == 'inverted':
      np.testing.assert_array_equal(y, 255 - x)
    elif dom == 'noisy':
      r = (y - x).ravel()
      assert 40 < r.std() < 96  # sigma 96, clipped at 0 and 255.
      assert np.corrcoef(x.ravel(), y.ravel())[0, 1] > 0.3
    else:  # rotated: every image changed; the best-matching counter-clockwise angle is 15-45.
      assert (np.abs(y - x).reshape(len(x), -1).sum(1) > 0).all()
      if split == 'test':
        angles = np.arange(0, 91)
        for xi, yi in zip(x[:30], y[:30]):
          err = [np.abs(domains.rotate(xi.astype(np.uint8), a) - yi).sum() for a in angles]
          assert 13 <= angles[int(np.argmin(err))] <= 47


def _laplacian_energy(x):
  x = x.astype(np.float64)
  lap = 4 * x[:, 1:-1, 1:-1] - x[:, :-2, 1:-1] - x[:, 2:, 1:-1] - x[:, 1:-1, :-2] - x[:, 1:-1, 2:]
  return (lap ** 2).reshape(len(x), -1).mean(1)


@pytest.mark.parametrize('dom', SHAPES_DOMAINS)
def test_shapes_domain_is_paired_and_shifted(dd, dom):
  src_b = _TinyShapes(data_dir=dd, file_format='array_record')
  dom_b = _TINY_SHIFTED[dom](data_dir=dd, file_format='array_record')
  for split in SPLITS:
    src, out = _records(src_b, split), _records(dom_b, split)
    assert len(out['image']) == len(src['image']) == _TinyShapes.SPLITS[split][0]
    for k in ('caption', 'shape', 'color', 'size', 'position'):
      np.testing.assert_array_equal(out[k], src[k])
    x, y = src['image'], out['image']
    masks = np.stack([domains.foreground_mask(im) for im in x])
    assert masks.any(axis=(1, 2)).all()
    if dom == 'textured':
      np.testing.assert_array_equal(y[masks], x[masks])  # The shape is untouched...
      bg = ~masks
      assert (y[bg] != x[bg]).any(-1).mean() > 0.9  # ...the background replaced,
      assert y[bg].max() < domains.TEXTURE_MAX  # darker than any shape colour,
      np.testing.assert_array_equal(  # so the shape's pixels are still exactly the mask.
          np.stack([domains.foreground_mask(im) for im in y]), masks)
    elif dom == 'blur':
      assert (_laplacian_energy(y) < 0.5 * _laplacian_energy(x)).all()
      assert np.abs(y.mean((1, 2, 3)) - x.mean((1, 2, 3))).max() < 3
    else:  # lowcontrast
      ratio = y.reshape(len(y), -1).std(1) / x.reshape(len(x), -1).std(1)
      assert ((ratio > 0.3) & (ratio < 0.55)).all()
    # The colour label stays honest: channels of the shape's mean colour that differ clearly
    # (by > 20 levels) keep their order, so the hue is kept (white stays achromatic).
    cs = np.stack([im[m].mean(0) for im, m in zip(x, masks)])
    cd = np.stack([im[m].mean(0) for im, m in zip(y, masks)])
    for i, j in ((0, 1), (0, 2), (1, 2)):
      clear = np.abs(cs[:, i] - cs[:, j]) > 20
      assert (np.sign(cs[clear, i] - cs[clear, j]) == np.sign(cd[clear, i] - cd[clear, j])).all()


@pytest.mark.parametrize('name', sorted(builders.SHIFTED))
def test_builders_generate_the_seeded_transform_of_the_source(name, tmp_path):
  """Each real builder's examples = its source's, with image = transform(source image,
  default_rng([split_seed, key])): what `apply` computes, so experiments can reproduce it."""
  source, dom = domains.parse(name)
  d = str(tmp_path)  # Nothing is written: only the generators run.
  src_gen = builders.EMBEDDED[source](data_dir=d)._split_generators(None)  # pylint: disable=protected-access
  dom_gen = builders.SHIFTED[name](data_dir=d)._split_generators(None)  # pylint: disable=protected-access
  assert set(dom_gen) == set(src_gen) == set(SPLITS)
  for split in SPLITS:
    pairs = list(zip(itertools.islice(src_gen[split], 20), itertools.islice(dom_gen[split], 20)))
    keys = [k for (k, _), _ in pairs]
    assert keys == [k for _, (k, _) in pairs]
    src_images = np.stack([ex['image'] for (_, ex), _ in pairs])
    expected = domains.apply(source, dom, src_images,
                             seed=domains.split_seed(source, dom, split), keys=keys)
    for ((_, s), (_, d)), e in zip(pairs, expected):
      assert {k: v for k, v in s.items() if k != 'image'} == {
          k: v for k, v in d.items() if k != 'image'}
      np.testing.assert_array_equal(d['image'], e)
      assert d['image'].dtype == np.uint8 and d['image'].shape == s['image'].shape


def test_records_are_the_generated_examples(dd):
  """The prepared records are the generator's examples (as a multiset: TFDS orders records
  by a hash of the key, the same for source and domain)."""
  b = _TINY_SHIFTED['blur'](data_dir=dd, file_format='array_record')
  recs = _records(b, 'test')
  gen = [ex for _, ex in b._split_generators(None)['test']]  # pylint: disable=protected-access
  assert sorted(r.tobytes() for r in recs['image']) == sorted(
      ex['image'].tobytes() for ex in gen)


def test_apply_is_deterministic_and_per_example():
  x = np.stack([ex['image'] for _, ex in itertools.islice(builders.generate_shapes(6, 3), 6)])
  for dom in SHAPES_DOMAINS:
    a = domains.apply('shapes_captions', dom, x, seed=5)
    np.testing.assert_array_equal(a, domains.apply('shapes_captions', dom, x, seed=5))
    # Image i depends on (seed, key i) only, not on its batch.
    np.testing.assert_array_equal(
        a[2:4], domains.apply('shapes_captions', dom, x[2:4], seed=5, keys=[2, 3]))
  assert not np.array_equal(domains.apply('shapes_captions', 'blur', x, seed=5),
                            domains.apply('shapes_captions', 'blur', x, seed=6))


def test_rebuild_is_identical_byte_for_byte(dd, tmp_path):
  """Another process builds the same files (deterministic serialization)."""
  other = str(tmp_path / 'again')
  code = ('from jax_transfer.data import builders; '
          f'builders.ensure_embedded("digits_rotated", {other!r})')
  subprocess.run([sys.executable, '-c', code], check=True, capture_output=True,
                 env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  a = sorted(glob.glob(os.path.join(dd, 'digits_rotated', '1.0.0', '*array_record*')))
  b = sorted(glob.glob(os.path.join(other, 'digits_rotated', '1.0.0', '*array_record*')))
  assert [os.path.basename(p) for p in a] == [os.path.basename(p) for p in b] and len(a) == 2
  for pa, pb in zip(a, b):
    with open(pa, 'rb') as fa, open(pb, 'rb') as fb:
      assert fa.read() == fb.read(), pa


def _cfg(data_dir, dataset):
  return ml_collections.ConfigDict(dict(
      dataset=dataset, data_dir=data_dir, train_split='train', global_batch_size=16,
      classes=None, examples_per_class=None, subset_seed=0, image_size=None, num_workers=0,
      prefetch=2, label_key='label'))


def _eval_all(cfg):
  batches = list(pipeline.make_eval_iterator(cfg, 'test', batch_size=64))
  mask = np.concatenate([b['mask'] for b in batches])
  return {k: np.concatenate([b[k] for b in batches])[mask] for k in ('image', 'label')}


def test_config_selects_a_domain_built_on_demand(dd, tmp_path):
  """input.dataset='digits_inverted' at a data_dir without it: the pipeline builds it, and
  its eval batches pair with the source's."""
  fresh = str(tmp_path / 'fresh')
  name = 'digits_inverted'
  target = _eval_all(_cfg(fresh, name))
  assert os.path.isdir(os.path.join(fresh, name, '1.0.0'))
  assert not os.path.exists(os.path.join(fresh, 'digits'))  # Only the domain was built.
  source = _eval_all(_cfg(dd, 'digits'))
  assert len(target['label']) == 450
  np.testing.assert_array_equal(target['label'], source['label'])
  np.testing.assert_array_equal(target['image'].astype(np.int64),
                                255 - source['image'].astype(np.int64))
  info, src_info = pipeline.dataset_info(name, fresh), pipeline.dataset_info('digits', dd)
  assert info == src_info
  assert pipeline.num_classes(_cfg(fresh, name)) == 10
  assert pipeline.image_shape(_cfg(fresh, name)) == pipeline.image_shape(_cfg(dd, 'digits'))
  train = next(pipeline.make_train_iterator(_cfg(fresh, name), seed=0))
  assert train['image'].shape[0] == 16


def test_build_cli_builds_the_domains(tmp_path, monkeypatch, capsys):
  d = str(tmp_path / 'cli')
  monkeypatch.setattr(builders, 'EMBEDDED', {'digits': builders.Digits})
  monkeypatch.setattr(builders, 'SHIFTED', {'digits_inverted': builders.SHIFTED['digits_inverted']})
  monkeypatch.setattr(builders, 'ensure_shapes_wds', lambda data_dir: 'skipped')
  build.main(['--data_dir', d, '--no_domains'])
  assert not os.path.exists(os.path.join(d, 'digits_inverted'))
  build.main(['--data_dir', d])
  out = capsys.readouterr().out
  assert 'digits_inverted: ' in out
  assert _digits('digits_inverted', d).is_prepared()


def test_eval_datasets_train_on_source_evaluate_on_targets(dd, tmp_path):
  """eval.datasets: one run on digits reports eval_<domain>/accuracy per shifted domain, equal
  to evaluating the final params with input.dataset set to that domain."""
  import jax
  from conftest import tiny_vit_config
  from jax_transfer import config as config_lib, methods, parallel, train
  c = tiny_vit_config(dd)
  c.total_steps, c.eval_every_steps, c.checkpoint_every_steps = 3, 3, 3
  c.eval.datasets = ('digits_inverted', 'digits_noisy')
  state, final = train.train_and_evaluate(c, str(tmp_path / 'w'), devices=jax.devices()[:1])
  assert {'eval/accuracy', 'eval_digits_inverted/accuracy',
          'eval_digits_noisy/accuracy'} <= set(final)
  mesh = parallel.make_mesh(c.mesh, jax.devices()[:1])
  for name in c.eval.datasets:
    target = config_lib.with_overrides(c, **{'input.dataset': name, 'eval.datasets': None})
    (evaluator,) = methods.get_method(c.method)(target, mesh).evaluators()
    with jax.set_mesh(mesh):
      want = evaluator.run(state.params)
    assert final[f'eval_{name}/accuracy'] == want['accuracy']
    assert final[f'eval_{name}/loss'] == pytest.approx(want['loss'], rel=1e-6)

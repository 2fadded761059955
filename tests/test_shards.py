"""jax_transfer/data/shards.py: brace expansion, checks, per-host coverage, window shuffle,
exact resume, skipping of bad data, source weights, thread-independence."""
import io
import json
import logging
import os
import tarfile

import numpy as np
import pytest
import simplejpeg

from jax_transfer.data import shards
from jax_transfer.data.shards import ShardError, ShardIterator, check_shards, expand_shards


def _add(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size, info.mtime = len(data), 0
  tar.addfile(info, io.BytesIO(data))


def write_shards(root, n_shards=4, per_shard=10, *, first_label=0, prefix='s', corrupt=(),
                 no_image=(), long_keys=False):
  """Shards prefix-{00000..}.tar; sample label = first_label + its global index."""
  rng = np.random.default_rng(0)
  os.makedirs(root, exist_ok=True)
  for s in range(n_shards):
    fmt = [tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT, tarfile.GNU_FORMAT][s % 3 * long_keys]
    with tarfile.open(os.path.join(root, f'{prefix}-{s:05d}.tar'), 'w', format=fmt) as tar:
      for i in range(per_shard):
        label = first_label + s * per_shard + i
        key = f'{s:05d}{i:04d}' + ('x' * 120 if fmt != tarfile.USTAR_FORMAT else '')
        img = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        jpg = b'not a jpeg' if label in corrupt else simplejpeg.encode_jpeg(img, quality=90)
        if label not in no_image:
          _add(tar, f'{key}.jpg', jpg)
        _add(tar, f'{key}.txt', f'caption {label}'.encode())
        _add(tar, f'{key}.json', json.dumps({'label': label, 'key': key}).encode())
  return os.path.join(root, f'{prefix}-{{{0:05d}..{n_shards - 1:05d}}}.tar')


def example_fn(sample, rng):
  meta = json.loads(sample['json'])
  return {'image': simplejpeg.decode_jpeg(sample['jpg']), 'caption': sample['txt'].decode(),
          'label': np.int32(meta['label']), 'r': rng.integers(1 << 30)}


def make(spec, **kw):
  kw = {'seed': 3, 'process_index': 0, 'process_count': 1, 'batch_size': 4,
        'example_fn': example_fn, 'shuffle_buffer': 7, 'num_threads': 2, **kw}
  return ShardIterator(spec, **kw)


def labels(it, n_batches):
  return np.concatenate([next(it)['label'] for _ in range(n_batches)]).tolist()


def assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


def test_expand_shards(tmp_path):
  assert expand_shards('d/{00000..00002}.tar') == [['d/00000.tar', 'd/00001.tar', 'd/00002.tar']]
  assert expand_shards('{8..11}') == [['10', '11', '8', '9']]
  assert expand_shards('{098..100}') == [['098', '099', '100']]
  assert expand_shards('x{a,b}{0..1}.tar') == [['xa0.tar', 'xa1.tar', 'xb0.tar', 'xb1.tar']]
  assert expand_shards('{b,a/{1,2}}') == [['a/1', 'a/2', 'b']]
  assert expand_shards('a/{0..1}.tar :: b/x.tar') == [['a/0.tar', 'a/1.tar'], ['b/x.tar']]
  assert expand_shards('plain.tar') == [['plain.tar']]
  for bad in ('', 'a.tar::'):
    with pytest.raises(ShardError):
      expand_shards(bad)


def test_check_shards(tmp_path):
  spec = write_shards(tmp_path, n_shards=2, per_shard=1)
  check_shards(spec)
  check_shards(f'{spec}::{spec}', (1, 2.5))
  missing = str(tmp_path / 's-00007.tar')
  with pytest.raises(ShardError, match=r'1 of 3 shards do not exist: .*s-00007\.tar') as e:
    check_shards(str(tmp_path / 's-{{00000..00001},00007}.tar'))
  assert missing in str(e.value) and '\n' not in str(e.value)
  with pytest.raises(ShardError, match=r'\+2 more'):
    check_shards(str(tmp_path / 'nope-{0..4}.tar'))
  with pytest.raises(ShardError, match='2 shard weights'):
    check_shards(spec, (1, 2))
  with pytest.raises(ShardError, match='> 0'):
    check_shards(f'{spec}::{spec}', (1, 0))
  with pytest.raises(ShardError, match='fewer than the 3 processes'):
    make(spec, process_index=0, process_count=3)


def test_hosts_cover_each_sample_once_per_epoch(tmp_path):
  spec = write_shards(tmp_path)  # 40 samples: 20 per host and epoch
  its = [make(spec, process_index=p, process_count=2, batch_size=5) for p in range(2)]
  streams = [labels(it, 8) for it in its]  # 2 epochs each
  for e in range(2):
    epoch = [s[20 * e:20 * (e + 1)] for s in streams]
    assert sorted(epoch[0] + epoch[1]) == list(range(40))
  assert streams[0][:20] != streams[0][20:]
  assert its[0].epoch_fraction is None
  it = make(spec, process_index=1, process_count=2, batch_size=5, num_samples=40)
  next(it), next(it)
  assert it.epoch_fraction == pytest.approx(10 * 2 / 40)


def test_window_shuffle_is_a_permutation_of_each_window(tmp_path):
  spec = write_shards(tmp_path)
  plain = make(spec, shuffle_buffer=0, batch_size=5)
  shuffled = make(spec, shuffle_buffer=7, batch_size=5)
  a, b = labels(plain, 16), labels(shuffled, 16)  # 2 epochs of 40
  assert a != b
  for e in range(2):
    for w in range(0, 40, 7):  # windows of 7 slots; the epoch's last has 5
      lo, hi = 40 * e + w, 40 * e + min(w + 7, 40)
      assert sorted(a[lo:hi]) == sorted(b[lo:hi])
  assert b[:40] != b[40:] and sorted(b[:40]) == sorted(b[40:]) == list(range(40))
  assert labels(make(spec, shuffle_buffer=1, batch_size=5), 8) == a[:40]


@pytest.mark.parametrize('num_threads', [0, 3])
def test_resume_yields_identical_batches(tmp_path, num_threads):
  # Two sources (long names in PAX and GNU headers); windows span shards; 3 epochs of source 0.
  spec = (write_shards(tmp_path / 'a', n_shards=3, per_shard=6, long_keys=True) + '::' +
          write_shards(tmp_path / 'b', n_shards=2, per_shard=5, first_label=100))
  kw = dict(weights=(2, 1), batch_size=3, shuffle_buffer=4, num_threads=num_threads)
  ref = make(spec, **kw)
  states, batches = [], []
  for _ in range(24):
    states.append(ref.get_state())
    batches.append(next(ref))
  src0 = [s['sources'][0] for s in states]
  assert any(s['emitted'] > 0 for s in src0)  # mid-window
  assert len({(s['epoch'], s['shard']) for s in src0}) > 3  # shard boundaries
  assert max(s['epoch'] for s in src0) >= 2  # epoch boundaries
  assert len(json.dumps(states[-1])) < 1000
  for k in range(0, 20):
    it = make(spec, **kw)
    it.set_state(json.loads(json.dumps(states[k])))
    for j in range(k, min(k + 4, 24)):
      assert it.get_state() == states[j]
      assert_batches_equal(next(it), batches[j])
    it.close()
  with pytest.raises(ValueError, match='process_count'):
    make(spec, **kw).set_state({**states[3], 'process_count': 2})


def test_threads_do_not_change_batches(tmp_path):
  spec = write_shards(tmp_path, corrupt=(5,))
  a, b = make(spec, num_threads=0), make(spec, num_threads=4)
  for _ in range(25):
    assert_batches_equal(next(a), next(b))
  assert a.skipped == b.skipped >= 2 and a.get_state() == b.get_state()


def test_corrupt_image_is_skipped_without_shifting_the_order(tmp_path, caplog):
  clean = make(write_shards(tmp_path / 'clean'), batch_size=5)
  bad = make(write_shards(tmp_path / 'bad', corrupt=(13,)), batch_size=5)
  ref = [next(clean) for _ in range(18)]
  with caplog.at_level(logging.WARNING, logger=shards.__name__):
    got = [next(bad) for _ in range(16)]  # 80 samples: 2 epochs of 40, less the skipped
  cat = lambda bs, k: np.concatenate([b[k] for b in bs])
  keep = cat(ref, 'label') != 13
  assert bad.skipped == bad.get_state()['position'] - 80 >= 2
  # The batches were filled with the following samples; the rng counts skipped positions.
  for k in ('label', 'r', 'image'):
    assert np.array_equal(cat(got, k), cat(ref, k)[keep][:80]), k
  warnings = [r.getMessage() for r in caplog.records if '00010003' in r.getMessage()]
  assert len(warnings) == bad.skipped and 's-00001.tar' in warnings[0]


def test_truncated_tar_and_missing_image_are_skipped(tmp_path, caplog):
  spec = write_shards(tmp_path, no_image=(2,))
  path = tmp_path / 's-00001.tar'
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2 + 100])  # Cut mid-member.
  it = make(spec, batch_size=5)
  with caplog.at_level(logging.WARNING, logger=shards.__name__):
    got = labels(it, 14)
  assert it.skipped >= 2
  assert any('s-00001.tar' in r.getMessage() and 'truncated' in r.getMessage()
             for r in caplog.records)
  assert any('no image' in r.getMessage() for r in caplog.records)
  first = set(got[:30])  # at most 25 good samples per epoch here
  expected = set(range(40)) - {2} - set(range(10, 20))
  assert expected <= set(got) and 2 not in got
  assert first - expected <= set(range(10, 15))  # only the intact start of the cut shard
  # A resumed run across the cut shard matches too.
  ref = make(spec, batch_size=5)
  states = []
  for _ in range(10):
    states.append(ref.get_state())
    next(ref)
  ref2 = make(spec, batch_size=5)
  for s in states:
    ref2.set_state(s)
    a = next(ref2)
    b = make(spec, batch_size=5)
    b.set_state(s)
    assert_batches_equal(a, next(b))


def test_weighted_sources(tmp_path):
  spec = (write_shards(tmp_path / 'a', n_shards=2, per_shard=5) + '::' +
          write_shards(tmp_path / 'b', n_shards=2, per_shard=5, first_label=100))
  it = make(spec, weights=(1, 3), batch_size=100, num_threads=4)
  got = np.array(labels(it, 20))
  assert abs(np.mean(got >= 100) - 0.75) < 0.04
  with pytest.raises(ShardError):
    make(spec, weights=(1,))


def test_rng_depends_on_position_only(tmp_path):
  spec = write_shards(tmp_path)
  a = [next(make(spec, num_threads=t))['r'] for t in (0, 1, 4)]
  assert all(np.array_equal(a[0], x) for x in a)
  assert len(set(a[0].tolist())) == 4
  assert not np.array_equal(a[0], next(make(spec, seed=4))['r'])


def test_tar_parser_matches_tarfile(tmp_path):
  path = tmp_path / 'mixed.tar'
  # ustar prefix/name split, non-ASCII and >100-char names (pax / GNU long names), empty file.
  names = ['a.jpg', 'd/' * 60 + 'b.txt', 'é' * 70 + '.json', 'c' * 150 + '.jpg', 'empty.txt']
  for fmt in (tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
    names_fmt = names if fmt != tarfile.USTAR_FORMAT else names[:2] + names[4:]
    with tarfile.open(path, 'w', format=fmt) as tar:
      info = tarfile.TarInfo('somedir')
      info.type = tarfile.DIRTYPE
      tar.addfile(info)
      for i, n in enumerate(names_fmt):
        _add(tar, n, bytes([i]) * (i * 300))
    with tarfile.open(path) as tar:
      want = [(m.offset, m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
    with open(path, 'rb') as f:
      assert list(shards._members(f)) == want
      f.seek(want[2][0])  # from a member's header
      assert list(shards._members(f)) == want[2:]

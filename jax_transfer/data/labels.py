"""Label columns of TFDS splits: read without decoding images, cached beside the data.

`read_labels(name, split, data_dir, key)` -> int64 [N], the `key` feature of every record of
`split` in record order (what `tfds.data_source(name, split=split)[i][key]` gives). Class
filters and few-shot subsets need the whole column before the first batch; decoding whole
records for it decodes every image (an ImageNet train split: 1.28M JPEGs). Instead:

* Each record's serialized tf.train.Example is parsed and only the label's int64 is read;
  no feature is decoded (array_record datasets; others fall back to a data source that skips
  decoding every feature but `key`).
* The column of each base split is cached as `<builder.data_dir>/labels/{split}.{key}.npy`
  (written atomically: a temporary file then os.replace), so later runs and the other
  processes of a pod read one small file. It is used only while its length equals the split's
  record count (dataset_info.json) and it is not older than dataset_info.json (a dataset
  prepared again); otherwise it is rebuilt. When the directory is not writable (a read-only
  mount) the column is kept in memory only.
* Results are memoised per process (read-only arrays, shared by every caller).

Split slices and sums ('train[:10%]', 'train+validation[5:]') are cut from the base splits'
columns with tfds's own split arithmetic, so they match the data source record for record.
"""

from __future__ import annotations

import os
import tempfile
import threading

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from jax_transfer.data import builders

CACHE_DIR = 'labels'  # Under the builder's data_dir (<data_dir>/<name>/<version>/labels/).
_CHUNK = 4096  # Records read per array_record call.

_memo: dict[tuple, np.ndarray] = {}
_memo_lock = threading.Lock()


def read_labels(name: str, split: str, data_dir: str | None = None,
                key: str = 'label', *, builder: tfds.core.DatasetBuilder | None = None
                ) -> np.ndarray:
  """All `key` values of `name[split]`, int64 [N] (read-only), in record order.

  Args:
    name: TFDS dataset name (embedded datasets are built first if absent).
    split: a split name or tfds split spec ('train[:90%]', 'train+test').
    data_dir: the TFDS data dir (default: builders.default_data_dir()).
    key: a scalar integer feature (ClassLabel or int Tensor) of the records.
    builder: the prepared builder, when the caller has it (saves reading its metadata).
  """
  data_dir = os.fspath(data_dir or builders.default_data_dir())
  memo_key = (name, split, data_dir, key)
  labels = _memo.get(memo_key)
  if labels is None:
    builder = builder or _prepared_builder(name, data_dir)
    splits = builder.info.splits
    parts = []
    for instr in tfds.core.ReadInstruction.from_spec(split).to_absolute(
        {k: v for k, v in splits.items()}):
      column = _split_labels(name, instr.splitname, data_dir, key, builder)
      parts.append(column[instr.from_ or 0:len(column) if instr.to is None else instr.to])
    labels = np.concatenate(parts) if len(parts) > 1 else np.array(parts[0])
    labels.setflags(write=False)
    with _memo_lock:
      labels = _memo.setdefault(memo_key, labels)
  return labels


def cache_path(builder: tfds.core.DatasetBuilder, split: str, key: str) -> str | None:
  """Where the column of base split `split` is cached; None for non-local data dirs."""
  root = os.fspath(builder.data_dir)
  if '://' in root:  # gs:// etc.: not written through os (pods mount buckets with gcsfuse).
    return None
  return os.path.join(root, CACHE_DIR, f'{split}.{key.replace("/", ".")}.npy')


def clear_memo() -> None:
  """Forgets the in-process results (tests; a dataset re-prepared in this process)."""
  with _memo_lock:
    _memo.clear()
  from jax_transfer.data import pipeline  # pylint: disable=g-import-not-at-top  (cycle)
  pipeline._prepared_builder.cache_clear()  # pylint: disable=protected-access


# ----------------------------------------------------------------------------


def _prepared_builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
  from jax_transfer.data import pipeline  # pylint: disable=g-import-not-at-top  (cycle)
  return pipeline._builder(name, data_dir)  # pylint: disable=protected-access


def _split_labels(name, split, data_dir, key, builder) -> np.ndarray:
  """The column of one whole base split: memoised, else the cache file, else read."""
  memo_key = (name, split, data_dir, key)
  labels = _memo.get(memo_key)
  if labels is not None:
    return labels
  num = builder.info.splits[split].num_examples
  path = cache_path(builder, split, key)
  labels = _load_cache(path, num, builder) if path else None
  if labels is None:
    labels = _read_column(builder, split, key)
    if len(labels) != num:
      raise ValueError(f'{name}[{split}] has {len(labels)} records, its dataset_info.json '
                       f'says {num}.')
    if path:
      _write_cache(path, labels)
  labels.setflags(write=False)
  with _memo_lock:
    return _memo.setdefault(memo_key, labels)


def _load_cache(path: str, num: int, builder) -> np.ndarray | None:
  try:
    info_mtime = os.stat(os.path.join(os.fspath(builder.data_dir),
                                      'dataset_info.json')).st_mtime
    if os.stat(path).st_mtime < info_mtime:  # Prepared again since: stale.
      return None
    labels = np.load(path, allow_pickle=False)
  except (OSError, ValueError):  # Absent, unreadable or truncated: read the records.
    return None
  if labels.dtype != np.int64 or labels.shape != (num,):
    logging.info('Label cache %s has %s %s, the split %d records: rebuilding it.', path,
                 labels.dtype, labels.shape, num)
    return None
  return labels


def _write_cache(path: str, labels: np.ndarray) -> None:
  """Atomic: readers see the old file, no file, or the whole new one."""
  directory = os.path.dirname(path)
  tmp = None
  try:
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + '.', suffix='.tmp',
                               dir=directory)
    with os.fdopen(fd, 'wb') as f:
      np.save(f, labels, allow_pickle=False)
    os.chmod(tmp, 0o644)  # mkstemp makes it 0600; other users read the dataset too.
    os.replace(tmp, path)
  except OSError as e:  # Read-only mount, permissions, quota: memory only.
    logging.warning('Not caching labels at %s (%s); keeping them in memory.', path, e)
    if tmp is not None:
      try:
        os.remove(tmp)
      except OSError:
        pass


def _read_column(builder, split: str, key: str) -> np.ndarray:
  """Reads `key` of every record of `split`, decoding no feature."""
  feature = builder.info.features[key] if key in builder.info.features else None
  if feature is None:
    raise KeyError(f'{builder.name} has no feature {key!r}; features: '
                   f'{sorted(builder.info.features)}.')
  try:
    raw = builder.as_data_source(
        split=split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
  except (NotImplementedError, ValueError):
    raw = None
  fmt = builder.info.file_format
  if raw is not None and fmt is not None and fmt.value == 'array_record':
    return _column_from_examples(raw, key)
  # Other formats with random access: skip the decoding of every other feature.
  skip = {k: tfds.decode.SkipDecoding() for k in builder.info.features if k != key}
  source = builder.as_data_source(split=split, decoders=skip)
  return _chunked(source, lambda ex: int(ex[key]))


def _column_from_examples(raw, key: str) -> np.ndarray:
  from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=g-import-not-at-top
  parse = tf_example_pb2.Example.FromString

  def value(record):
    values = parse(record).features.feature[key].int64_list.value
    if len(values) != 1:
      raise ValueError(f'Feature {key!r} is not a scalar integer ({len(values)} int64 '
                       'values in a record).')
    return values[0]

  return _chunked(raw, value)


def _chunked(source, value) -> np.ndarray:
  n = len(source)
  labels = np.empty(n, np.int64)
  for start in range(0, n, _CHUNK):
    stop = min(start + _CHUNK, n)
    labels[start:stop] = [value(r) for r in source.__getitems__(range(start, stop))]
  return labels

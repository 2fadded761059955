"""TFDS data sources + grain pipelines for training and evaluation.

Reading is random access (`tfds.data_source`, array_record), so the whole
pipeline is a grain `MapDataset` over record indices: shuffling, per-process
slicing and label filtering are index arithmetic, and the iterator state is
just a position (JSON-serialisable; it goes into the checkpoint). Training
batches are built whole (index arithmetic and preprocessing vectorised per
batch; see _ShuffledBatches and PreprocessBatch), because per-element work in
Python costs more than a small model's step.

Model inputs (one example; batches add a leading [B] axis):
  image: float32 [H, W, C] in [-1, 1]
  label: int32 [] (from `input_cfg.label_key`, remapped if `classes`)
  shapes_captions also: caption str, shape/color/size/position int32 [].
  eval batches also: mask bool [] (False for padding).
"""

from __future__ import annotations

import functools
import sys
import threading

from absl import flags
import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from jax_transfer.data import builders

_PASSTHROUGH_INT = ('shape', 'color', 'size', 'position')  # shapes_captions.


class DatasetNotPreparedError(ValueError):
  """The TFDS dataset has no prepared files at the requested data_dir."""


# ----------------------------------------------------------------------------
# Sources and metadata
# ----------------------------------------------------------------------------


def _builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  """Prepared builder for `name`; embedded datasets are built on first use."""
  data_dir = data_dir or builders.default_data_dir()
  if name in builders.EMBEDDED:
    builders.ensure_embedded(name, data_dir)
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise DatasetNotPreparedError(
        f'Dataset {name!r} is neither embedded ({sorted(builders.EMBEDDED)}) nor a TFDS '
        f'catalogue dataset nor prepared at data_dir={data_dir!r}') from None
  if not builder.is_prepared():
    # One line: main.py prints it as the whole error.
    raise DatasetNotPreparedError(
        f'Dataset {name!r} is not prepared at data_dir={data_dir!r} (looked in '
        f'{builder.data_dir}); prepare it with `tfds build {name} --data_dir={data_dir} '
        "--file_format=array_record` (catalogue builders may need the [tf] extra: "
        "pip install 'jax_transfer[tf]')")
  return builder


def get_source(name: str, split: str, data_dir: str | None = None):
  """Random-access source for `name[split]`: `len()` and `[i]` -> dict of numpy.

  Raises:
    DatasetNotPreparedError: not prepared at data_dir (embedded datasets are
      built automatically instead).
    ValueError: unknown split (the message lists the available ones).
  """
  data_dir = data_dir or builders.default_data_dir()
  builder = _builder(name, data_dir)
  available = sorted(builder.info.splits.keys())
  # Accept tfds split syntax ('train[:90%]', 'train+test') but check the names.
  for part in split.split('+'):
    if part.split('[')[0].strip() not in available:
      raise ValueError(f'Unknown split {split!r} for dataset {name!r}; '
                       f'available splits: {available}.')
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir,
                            download=False)
  except (ImportError, NotImplementedError) as e:
    # tfrecord-only datasets have no random access; decoding some features
    # (e.g. tfds Video, Sequence) also imports TensorFlow.
    raise RuntimeError(
        f'Reading {name!r} from {builder.data_dir} needs TensorFlow or a '
        "different file format: install the [tf] extra (pip install "
        "'jax_transfer[tf]') and re-prepare it with `tfds build "
        f'{name} --data_dir={data_dir} '
        f'--file_format=array_record`. Original error: {e}') from e


def dataset_info(name: str, data_dir: str | None = None,
                 label_key: str | None = None) -> dict:
  """Metadata used by config validation and evaluators.

  Returns dict with: num_classes and class_names (list[str]) of `label_key`
  (None if label_key is None and there is no 'label' feature, e.g. for
  shapes_captions), image_shape (H, W, C), num_examples ({split: int}),
  label_key, and attributes ({feature: class names}) for every ClassLabel.
  Raises ValueError if an explicit `label_key` is not a ClassLabel feature.
  """
  builder = _builder(name, data_dir)
  features = builder.info.features
  attributes = {k: list(f.names) for k, f in features.items()
                if isinstance(f, tfds.features.ClassLabel)}
  if label_key is not None and label_key not in attributes:
    raise ValueError(f'{name!r} has no ClassLabel feature {label_key!r}; '
                     f'choose from {sorted(attributes)}.')
  label_key = label_key or 'label'
  names = attributes.get(label_key)
  return {
      'num_classes': None if names is None else len(names),
      'class_names': names,
      'image_shape': tuple(features['image'].shape),
      'num_examples': {k: v.num_examples for k, v in builder.info.splits.items()},
      'label_key': label_key,
      'attributes': attributes,
  }


# ----------------------------------------------------------------------------
# Index selection: class filter and few-shot subset
# ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _read_labels(name: str, split: str, data_dir: str, key: str) -> np.ndarray:
  """All labels of a split, int64 [N]. Read once; decodes whole records."""
  source = get_source(name, split, data_dir)
  labels = np.empty(len(source), np.int64)
  chunk = 1024
  for start in range(0, len(source), chunk):
    idx = list(range(start, min(start + chunk, len(source))))
    labels[idx] = [int(ex[key]) for ex in source.__getitems__(idx)]
  return labels


def select_indices(input_cfg: ml_collections.ConfigDict, split: str, *,
                   few_shot: bool) -> np.ndarray:
  """Record indices of `split` to read, int64 [M], sorted.

  Keeps only `input_cfg.classes` (if set) and, if `few_shot`, a subset of
  `examples_per_class` per class chosen with `subset_seed`.
  """
  classes = input_cfg.get('classes')
  k = input_cfg.get('examples_per_class') if few_shot else None
  data_dir = input_cfg.get('data_dir') or builders.default_data_dir()
  if classes is None and k is None:
    return np.arange(len(get_source(input_cfg.dataset, split, data_dir)))
  labels = _read_labels(input_cfg.dataset, split, data_dir, _label_key(input_cfg))
  keep = list(classes) if classes is not None else sorted(set(labels.tolist()))
  if k is None:
    return np.flatnonzero(np.isin(labels, keep))
  rng = np.random.default_rng(input_cfg.get('subset_seed', 0))
  chosen = []
  for c in keep:  # Fixed class order, so the draw is deterministic.
    members = np.flatnonzero(labels == c)
    if len(members) < k:
      raise ValueError(f'Class {c} of {input_cfg.dataset}[{split}] has only '
                       f'{len(members)} examples, examples_per_class={k}.')
    chosen.append(rng.choice(members, size=k, replace=False))
  return np.sort(np.concatenate(chosen))


def _label_key(input_cfg) -> str:
  return input_cfg.get('label_key') or 'label'


# ----------------------------------------------------------------------------
# Preprocessing (module-level classes: picklable for grain worker processes)
# ----------------------------------------------------------------------------


def nested_get(example: dict, path: str):
  """example['a']['b'] for path 'a/b'; None when absent."""
  for part in path.split('/'):
    if not isinstance(example, dict) or part not in example:
      return None
    example = example[part]
  return example


def _resize(image: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize of uint8 [H, W, C] to [size, size, C] (PIL, per channel)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  channels = [np.asarray(Image.fromarray(image[..., c]).resize(
      (size, size), Image.BILINEAR)) for c in range(image.shape[-1])]
  return np.stack(channels, axis=-1)


class Preprocess:
  """Record index -> model-input dict (see module docstring).

  Two stages, so that batches can run the second one vectorised (PreprocessBatch):
  `record(i)` reads and decodes record i (image as stored, resized to image_size; label
  remapped), `normalise(columns)` maps pixels to [-1, 1], elementwise, for one example or a
  batch alike.
  """

  def __init__(self, source, input_cfg):
    self.source = source
    self.label_key = _label_key(input_cfg)
    classes = input_cfg.get('classes')
    # Lookup table old label -> new label; -1 marks dropped classes.
    self.remap = None
    if classes is not None:
      self.remap = np.full(max(classes) + 1, -1, np.int64)
      self.remap[list(classes)] = np.arange(len(classes))
    self.image_size = input_cfg.get('image_size')
    # 'caption' (shapes_captions) or a nested path such as 'captions/text' (coco_captions).
    self.caption_key = input_cfg.get('caption_key') or 'caption'

  def __call__(self, index) -> dict:
    return self.normalise(self.record(index))

  def record(self, index) -> dict:
    """Record `index`, decoded: image [H, W, C] as stored (uint8), label int32 (-1 for a
    class outside input.classes), caption str, shapes_captions' attributes int32."""
    ex = self.source[int(index)]
    image = np.asarray(ex['image'])
    if image.ndim == 2:
      image = image[..., None]
    if self.image_size and image.shape[:2] != (self.image_size,) * 2:
      image = _resize(image, self.image_size)
    out = {'image': image}
    if self.label_key in ex:  # Image-text data (shapes_captions) may have no 'label'.
      label = int(ex[self.label_key])
      if self.remap is not None:  # Classes outside input.classes (beyond the table too): -1.
        label = int(self.remap[label]) if label < len(self.remap) else -1
      out['label'] = np.int32(label)
    caption = nested_get(ex, self.caption_key)
    if caption is not None:
      if isinstance(caption, (list, tuple, np.ndarray)) and np.ndim(caption):
        caption = caption[0]  # Several captions per image (coco_captions): the first.
      out['caption'] = caption.decode() if isinstance(caption, bytes) else str(caption)
    for key in _PASSTHROUGH_INT:
      if key in ex:
        out[key] = np.int32(ex[key])
    return out

  @staticmethod
  def normalise(columns: dict) -> dict:
    """Pixels -> float32 in [-1, 1]; the other columns as they are. Elementwise, so one
    example and a stacked batch give the same values."""
    out = dict(columns, image=columns['image'].astype(np.float32) / 127.5 - 1.0)
    if 'label' in out:
      assert np.all(out['label'] >= 0), 'index selection must have dropped other classes'
    return out


# Splits whose decoded records take at most this many bytes are decoded once and kept in
# memory (PreprocessBatch): the embedded digits (86 KB) and shapes_captions (31 MB) are;
# ImageNet-size splits are not.
CACHE_MAX_BYTES = 512 * 2**20


class PreprocessBatch:
  """Record indices int [b] -> model-input batch (each column with a leading [b] axis):
  the values of stacking Preprocess(i) for every i, computed per batch.

  Reading and decoding one record is tens of microseconds of Python (tfds deserialisation),
  far more than a small model's step spends per example: digits_gpicl's step consumes 1024
  records in ~18 ms, and the per-record pipeline took ~130 ms for them
  (benchmarks/RESULTS.md, "Input pipeline vs step"). So a split of at most CACHE_MAX_BYTES
  (`record_bytes` per record, estimated by the caller) is decoded once, on first use, into
  one array per column, and a batch is a gather plus one vectorised normalisation. Larger
  splits are read record by record, as before. Picklable for grain worker processes, each of
  which then decodes its own copy.
  """

  def __init__(self, source, input_cfg, record_bytes: int):
    self.preprocess = Preprocess(source, input_cfg)
    self.cached = len(source) * record_bytes <= CACHE_MAX_BYTES
    self._table = None
    self._lock = threading.Lock()  # Reader threads may ask for the table at once.

  def __getstate__(self):
    return dict(self.__dict__, _table=None, _lock=None)

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def _columns(self, indices) -> dict:
    records = [self.preprocess.record(i) for i in indices]
    return {k: np.stack([r[k] for r in records]) for k in records[0]}

  def _table_columns(self) -> dict:
    with self._lock:
      if self._table is None:
        self._table = self._columns(range(len(self.preprocess.source)))
    return self._table

  def __call__(self, indices) -> dict:
    indices = np.asarray(indices)
    if self.cached:
      columns = {k: v[indices] for k, v in self._table_columns().items()}
    else:
      columns = self._columns(indices)
    return Preprocess.normalise(columns)


def _record_bytes(input_cfg) -> int:
  """Memory of one decoded record: its image as uint8 (after image_size) plus 256 bytes
  for the label, caption and attributes."""
  h, w, c = image_shape(input_cfg)
  return h * w * c + 256


class _ShuffledBatches(grain.MapDataset):
  """Element `step` = this process's record indices int64 [b] of global batch `step`, from
  an endless stream that visits every index in `indices` once per epoch, in a fresh order
  each epoch.

  Global element k is indices[perm_e[k % N]], e = k // N, where perm_e is a permutation of
  range(N) drawn from (seed, e) (numpy PCG64), identical on every process. Process p of P
  takes elements step * B + p * b + j, j < b, b = B / P: concatenating the process batches
  in process order reproduces the 1-process global batch exactly (as _ProcessSlice). One
  permutation per epoch and a gather per batch: grain's per-element shuffle + slicing cost
  ~60 us per element, more than digits_gpicl's step takes for a batch of 1024.
  """

  _MUTATES_ELEMENT_SPEC = False

  def __init__(self, indices: np.ndarray, seed: int, process_index: int,
               process_count: int, per_process_batch: int):
    super().__init__()
    self._indices = np.asarray(indices, np.int64)
    self._seed = seed
    self._p, self._n, self._b = process_index, process_count, per_process_batch
    self._perms = {}  # epoch -> permutation; the last few only.

  def __len__(self) -> int:
    return sys.maxsize

  def _perm(self, epoch: int) -> np.ndarray:
    perm = self._perms.get(epoch)
    if perm is None:  # Reader threads may both compute it: the same array, harmless.
      perm = np.random.default_rng([self._seed, epoch]).permutation(len(self._indices))
      self._perms = {e: v for e, v in self._perms.items() if e >= epoch - 1}
      self._perms[epoch] = perm
    return perm

  def __getitem__(self, step):
    if isinstance(step, slice):
      return self.slice(step)
    k = step * self._b * self._n + self._p * self._b + np.arange(self._b, dtype=np.int64)
    n = len(self._indices)
    epochs, within = np.divmod(k, n)
    out = np.empty(self._b, np.int64)
    for e in np.unique(epochs):  # A batch spans at most a few epochs.
      sel = epochs == e
      out[sel] = self._indices[self._perm(int(e))[within[sel]]]
    return out

  def __str__(self) -> str:
    return f'ShuffledBatches(p={self._p}/{self._n}, b={self._b})'


class _ProcessSlice(grain.MapDataset):
  """This process's view of a global stream cut into global batches.

  Element k of process p is global element
  (k // b) * B + p * b + k % b, with b = B / P: each global batch of size B
  is split into P contiguous slices, so concatenating the process batches in
  process order reproduces the 1-process global batch exactly.
  """

  _MUTATES_ELEMENT_SPEC = False

  def __init__(self, parent, process_index: int, process_count: int,
               per_process_batch: int):
    super().__init__(parent)
    self._p, self._n, self._b = process_index, process_count, per_process_batch

  def __len__(self) -> int:
    return len(self._parent) // self._n

  def _global_index(self, k: int) -> int:
    step, j = divmod(k, self._b)
    return step * self._b * self._n + self._p * self._b + j

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self._global_index(index)]

  def __str__(self) -> str:
    return f'ProcessSlice(p={self._p}/{self._n}, b={self._b})'


def _per_process_batch(global_batch_size: int, process_count: int) -> int:
  if global_batch_size % process_count:
    raise ValueError(f'Batch size {global_batch_size} is not divisible by '
                     f'process_count={process_count}.')
  return global_batch_size // process_count


def _finish(ds: grain.MapDataset, input_cfg, make_batch) -> grain.IterDataset:
  """Batches of record indices `ds` -> model-input batches (`make_batch`, vectorised:
  PreprocessBatch), read with threads, and optionally with worker processes."""
  ds = ds.map(make_batch)
  # Batches before to_iter_dataset: each reader thread builds a whole batch
  # and `prefetch` counts batches; more threads than buffer slots would idle.
  prefetch = max(1, input_cfg.get('prefetch', 2))
  ds = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=min(16, prefetch), prefetch_buffer_size=prefetch))
  if input_cfg.get('num_workers', 0) > 0:
    # grain's worker processes read absl flags; outside an absl app (tests,
    # notebooks) they are unparsed and grain raises, so use the defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=input_cfg.num_workers))
  return ds


# ----------------------------------------------------------------------------
# Public iterators
# ----------------------------------------------------------------------------


def make_train_iterator(input_cfg: ml_collections.ConfigDict, *, seed: int,
                        process_index: int = 0, process_count: int = 1):
  """Infinite, shuffled, checkpointable iterator over `input_cfg.train_split`.

  Yields dicts of numpy arrays with leading dim
  b = global_batch_size // process_count (e.g. image float32 [b, H, W, C]).
  Each epoch is reshuffled (the epoch is folded into the shuffle seed).
  `it.get_state()` is a JSON-serialisable dict; `it.set_state(s)` resumes
  with exactly the batches that followed the saved state.
  """
  b = _per_process_batch(input_cfg.global_batch_size, process_count)
  data_dir = input_cfg.get('data_dir') or builders.default_data_dir()
  source = get_source(input_cfg.dataset, input_cfg.train_split, data_dir)
  indices = select_indices(input_cfg, input_cfg.train_split, few_shot=True)
  if len(indices) == 0:
    raise ValueError(f'No training examples left for {input_cfg.dataset}.')
  # Global stream of record indices, identical on every process.
  shuffle_seed = int(np.random.SeedSequence(seed).generate_state(1)[0])
  ds = _ShuffledBatches(indices, shuffle_seed, process_index, process_count, b)
  return iter(_finish(ds, input_cfg,
                      PreprocessBatch(source, input_cfg, _record_bytes(input_cfg))))


class _EvalBatch:
  """Padded positions int [b] -> batch with `mask` bool [b]; padding repeats the first
  selected record."""

  def __init__(self, preprocess_batch: PreprocessBatch, indices: np.ndarray):
    self.preprocess_batch, self.indices = preprocess_batch, indices

  def __call__(self, positions) -> dict:
    positions = np.asarray(positions)
    valid = positions < len(self.indices)
    batch = self.preprocess_batch(self.indices[np.where(valid, positions, 0)])
    batch['mask'] = valid
    return batch


def make_eval_iterator(input_cfg: ml_collections.ConfigDict, split: str, *,
                       batch_size: int, process_index: int = 0,
                       process_count: int = 1):
  """Finite iterable over every example of `split` (after the class filter).

  `batch_size` is GLOBAL: each process yields batches of
  b = batch_size // process_count, and every process yields the same number
  of batches (needed for collectives). Examples are laid out like training
  batches (global batch i = process 0 slice, process 1 slice, ...), padded
  at the end; `mask` bool [b] is False for padding, so over all processes
  each example appears with mask True exactly once. Iterating again
  restarts from the beginning.
  """
  b = _per_process_batch(batch_size, process_count)
  data_dir = input_cfg.get('data_dir') or builders.default_data_dir()
  source = get_source(input_cfg.dataset, split, data_dir)
  indices = select_indices(input_cfg, split, few_shot=False)
  num_batches = -(-len(indices) // batch_size)  # ceil
  ds = grain.MapDataset.range(num_batches * batch_size)
  ds = _ProcessSlice(ds, process_index, process_count, b).batch(b, drop_remainder=True)
  make_batch = PreprocessBatch(source, input_cfg, _record_bytes(input_cfg))
  return _finish(ds, input_cfg, _EvalBatch(make_batch, indices))


def num_classes(input_cfg: ml_collections.ConfigDict) -> int:
  """Number of classes the pipeline's `label` takes (after `classes`)."""
  if input_cfg.get('classes') is not None:
    return len(input_cfg.classes)
  return dataset_info(input_cfg.dataset, input_cfg.get('data_dir'),
                      _label_key(input_cfg))['num_classes']


def image_shape(input_cfg: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """(H, W, C) of the `image` the pipeline yields: the dataset's, or resized to
  input_cfg.image_size. What models are initialised with."""
  h, w, c = dataset_info(input_cfg.dataset, input_cfg.get('data_dir'))['image_shape']
  size = input_cfg.get('image_size')
  return (size, size, c) if size else (h, w, c)

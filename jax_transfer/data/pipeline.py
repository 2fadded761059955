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

from absl import flags
import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from jax_transfer.data import builders, preprocess
from jax_transfer.data.preprocess import (  # noqa: F401  (the pipeline's public names)
    CACHE_MAX_BYTES, Preprocess, PreprocessBatch, nested_get)


class DatasetNotPreparedError(ValueError):
  """The TFDS dataset has no prepared files at the requested data_dir."""


# ----------------------------------------------------------------------------
# Sources and metadata
# ----------------------------------------------------------------------------


def _builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  """Prepared builder for `name`; embedded datasets are built on first use. Read once per
  process (dataset_info.json and the split metadata): a run asks for it many times."""
  return _prepared_builder(name, data_dir or builders.default_data_dir())


@functools.lru_cache(maxsize=32)
def _prepared_builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
  # Only prepared builders are returned, so a failure is never cached.
  if builders.is_embedded(name):  # A source dataset or a shifted domain (digits_rotated).
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
  # Encoded images (tfds Image features: imagenet2012, shapes_jpeg) stay bytes: the recipe's
  # decode op decodes them, cheaply (ops_image.decode_bytes), and only where it runs.
  decoders = {k: tfds.decode.SkipDecoding() for k, f in builder.info.features.items()
              if isinstance(f, tfds.features.Image)}
  try:
    # From the memoised builder: its metadata is not read again for every source.
    return builder.as_data_source(split=split, decoders=decoders or None)
  except (ImportError, NotImplementedError) as e:
    # tfrecord-only datasets have no random access; decoding some features
    # (e.g. tfds Video, Sequence) also imports TensorFlow.
    raise RuntimeError(
        f'Reading {name!r} from {builder.data_dir} needs TensorFlow or a '
        "different file format: install the [tf] extra (pip install "
        "'jax_transfer[tf]') and re-prepare it with `tfds build "
        f'{name} --data_dir={data_dir} '
        f'--file_format=array_record`. Original error: {e}') from e


@functools.lru_cache(maxsize=64)
def _dataset_info(name: str, data_dir: str | None, label_key: str | None) -> dict:
  return _read_dataset_info(name, data_dir, label_key)


def dataset_info(name: str, data_dir: str | None = None, label_key: str | None = None) -> dict:
  """Metadata used by config validation and evaluators (read once per process): see
  _read_dataset_info."""
  info = _dataset_info(name, data_dir or builders.default_data_dir(), label_key)
  return {k: (list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v)
          for k, v in info.items()}


def _read_dataset_info(name: str, data_dir: str | None = None,
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
  """All labels of a split, int64 [N]: the label column only, no image decoded, cached
  beside the prepared data (labels.read_labels)."""
  from jax_transfer.data import labels  # pylint: disable=g-import-not-at-top
  return labels.read_labels(name, split, data_dir, key, builder=_builder(name, data_dir))


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
# Preprocessing: jax_transfer/data/preprocess.py (records, recipes, batches)
# ----------------------------------------------------------------------------


def _record_bytes(input_cfg, train: bool = True) -> int | None:
  """Memory of one record after the recipe's deterministic leading ops (what
  PreprocessBatch caches): its image as uint8 plus 256 bytes for the label, caption and
  attributes. None when that size is not fixed (encoded images before a random crop)."""
  recipe = preprocess.get_recipe(input_cfg, train)
  h, w, c = dataset_info(input_cfg.dataset, input_cfg.get('data_dir'))['image_shape']
  if recipe.head_out_size is not None:
    h, w = recipe.head_out_size
  c = recipe.head_out_channels or c
  if h is None or w is None or c is None:
    return None
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
  """Batches of record indices `ds` -> model-input batches (`make_batch(k, element)` of the
  k-th batch: PreprocessBatch), read with threads, and optionally with worker processes."""
  ds = ds.map_with_index(make_batch)
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
  b = global_batch_size // process_count (e.g. image uint8 [b, H, W, C]: `normaliser` maps it
  to the recipe's value range on the devices). Each epoch is reshuffled (the epoch is folded
  into the shuffle seed). `it.get_state()` is a JSON-serialisable dict; `it.set_state(s)`
  resumes with exactly the batches that followed the saved state. With `input.shards` the
  examples come from webdataset tars instead (jax_transfer/data/shards.py).
  """
  if input_cfg.get('shards'):
    return make_shard_iterator(input_cfg, seed=seed, process_index=process_index,
                               process_count=process_count)
  b = _per_process_batch(input_cfg.global_batch_size, process_count)
  data_dir = input_cfg.get('data_dir') or builders.default_data_dir()
  source = get_source(input_cfg.dataset, input_cfg.train_split, data_dir)
  indices = select_indices(input_cfg, input_cfg.train_split, few_shot=True)
  if len(indices) == 0:
    raise ValueError(f'No training examples left for {input_cfg.dataset}.')
  # Global stream of record indices, identical on every process.
  shuffle_seed = int(np.random.SeedSequence(seed).generate_state(1)[0])
  ds = _ShuffledBatches(indices, shuffle_seed, process_index, process_count, b)
  make_batch = PreprocessBatch(source, input_cfg, _record_bytes(input_cfg), seed=seed)
  return iter(_finish(ds, input_cfg, _TrainBatch(make_batch, b, process_index, process_count)))


class _TrainBatch:
  """(step, record indices [b]) -> batch; each example's stream position (its augmentation
  rng) is step * B + p * b + j, the same for any number of processes and workers."""

  def __init__(self, preprocess_batch: PreprocessBatch, b: int, p: int, n: int):
    self.preprocess_batch, self.b, self.p, self.n = preprocess_batch, b, p, n

  def __call__(self, step, indices) -> dict:
    positions = step * self.b * self.n + self.p * self.b + np.arange(self.b)
    return self.preprocess_batch(positions, indices)


def make_shard_iterator(input_cfg, *, seed: int, process_index: int = 0,
                        process_count: int = 1):
  """The training iterator over webdataset / img2dataset tars (`input.shards`): the
  training recipe on each sample's image, its caption (`txt`) and the integer fields of its
  `json`. Checkpointable like make_train_iterator (shards.ShardIterator)."""
  from jax_transfer.data import shards  # pylint: disable=g-import-not-at-top
  return shards.ShardIterator(
      input_cfg.shards, seed=seed, process_index=process_index, process_count=process_count,
      batch_size=_per_process_batch(input_cfg.global_batch_size, process_count),
      example_fn=preprocess.ShardExample(input_cfg), weights=input_cfg.get('shard_weights'),
      shuffle_buffer=input_cfg.get('shuffle_buffer', 1000),
      num_threads=input_cfg.get('num_threads', 8), num_samples=input_cfg.get('num_samples'))


class _EvalBatch:
  """Padded positions int [b] -> batch with `mask` bool [b]; padding repeats the first
  selected record."""

  def __init__(self, preprocess_batch: PreprocessBatch, indices: np.ndarray):
    self.preprocess_batch, self.indices = preprocess_batch, indices

  def __call__(self, step, positions) -> dict:
    del step
    positions = np.asarray(positions)
    valid = positions < len(self.indices)
    batch = self.preprocess_batch(positions, self.indices[np.where(valid, positions, 0)])
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
  make_batch = PreprocessBatch(source, input_cfg, _record_bytes(input_cfg, train=False),
                               train=False)
  return _finish(ds, input_cfg, _EvalBatch(make_batch, indices))


def num_classes(input_cfg: ml_collections.ConfigDict) -> int:
  """Number of classes the pipeline's `label` takes (after `classes`)."""
  if input_cfg.get('classes') is not None:
    return len(input_cfg.classes)
  return dataset_info(input_cfg.dataset, input_cfg.get('data_dir'),
                      _label_key(input_cfg))['num_classes']


def image_shape(input_cfg: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """(H, W, C) of the `image` the pipeline yields: the training recipe's output size (its last
  sizing op, e.g. inception_crop(224)), else the dataset's, resized to input.image_size if
  set; C the recipe's (to_rgb: 3), else the dataset's. What models are initialised with."""
  h, w, c = dataset_info(input_cfg.dataset, input_cfg.get('data_dir'))['image_shape']
  recipe = preprocess.get_recipe(input_cfg, train=True)
  if recipe.out_size is not None:
    h, w = recipe.out_size
  elif input_cfg.get('image_size'):
    h = w = input_cfg.image_size
  return (h, w, recipe.out_channels or c or 3)

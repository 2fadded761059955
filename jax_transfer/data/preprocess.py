"""Records -> examples: reading a record, the config's preprocessing recipe, whole batches.

The recipe is a pp pipe string (jax_transfer/data/pp/): `input.pp` for training batches,
`input.pp_eval` for evaluation. Empty means the pipeline's original behaviour, which the
embedded configs rely on: `decode|resize(image_size, "pil_bilinear")|value_range(-1, 1)` (the
resize only with `input.image_size`). Recipes produce uint8 images; the recipe's closing
`value_range` runs on the device (`normaliser`), so the host builds, moves and copies a
quarter of the bytes a float32 batch would take.

Random ops draw from `numpy.random.default_rng([seed, position])`, `position` being the
example's place in the global stream (train: step * global_batch + its slot), so a resumed
run, any number of worker processes and any number of hosts draw the same augmentations.
"""
from __future__ import annotations

import functools
import json
import threading

import numpy as np

from jax_transfer.data.pp import registry

_PASSTHROUGH_INT = ('shape', 'color', 'size', 'position')  # shapes_captions.

# Splits whose records, after the recipe's deterministic leading ops, take at most this many
# bytes are computed once and kept in memory (PreprocessBatch): the embedded digits (86 KB) and
# shapes_captions (31 MB) are; ImageNet-size splits (and shapes_jpeg at 224 px) are not.
CACHE_MAX_BYTES = 512 * 2**20


def nested_get(example: dict, path: str):
  """example['a']['b'] for path 'a/b'; None when absent."""
  for part in path.split('/'):
    if not isinstance(example, dict) or part not in example:
      return None
    example = example[part]
  return example


def recipe_string(input_cfg, train: bool) -> str:
  """The recipe of `input.pp` (train) / `input.pp_eval`, or the default one."""
  recipe = input_cfg.get('pp' if train else 'pp_eval') or ''
  if not isinstance(recipe, str):
    recipe = '|'.join(recipe)
  if recipe.strip():
    return recipe
  size = input_cfg.get('image_size')
  resize = f'|resize({size}, "pil_bilinear")' if size else ''
  return f'decode{resize}|value_range(-1, 1)'


@functools.lru_cache(maxsize=64)
def _parse(recipe: str) -> registry.Preprocess:
  return registry.Preprocess(recipe)


def get_recipe(input_cfg, train: bool) -> registry.Preprocess:
  """The parsed recipe; raises registry.PPError naming the op."""
  return _parse(recipe_string(input_cfg, train))


def example_seed(seed: int) -> int:
  """The seed of per-example augmentation rngs, distinct from the shuffle's."""
  return int(np.random.SeedSequence([seed, 0x9E3779B9]).generate_state(1)[0])


class Preprocess:
  """Record index (and stream position) -> example: `image` uint8 [H, W, C] after the recipe,
  `label` int32 (remapped if `input.classes`; -1 for a class outside them), `caption` str,
  shapes_captions' attributes int32.

  Two stages, so that PreprocessBatch can cache the first: `record(i)` reads record i and runs
  the recipe's deterministic leading ops, `augment(example, position)` the rest (the first
  random op on).
  """

  def __init__(self, source, input_cfg, *, train: bool = True, seed: int = 0):
    self.source = source
    self.label_key = input_cfg.get('label_key') or 'label'
    classes = input_cfg.get('classes')
    # Lookup table old label -> new label; -1 marks dropped classes.
    self.remap = None
    if classes is not None:
      self.remap = np.full(max(classes) + 1, -1, np.int64)
      self.remap[list(classes)] = np.arange(len(classes))
    # 'caption' (shapes_captions) or a nested path such as 'captions/text' (coco_captions).
    self.caption_key = input_cfg.get('caption_key') or 'caption'
    self.recipe = get_recipe(input_cfg, train)
    self.seed = example_seed(seed)

  def __call__(self, index, position: int = 0) -> dict:
    return self.augment(self.record(index), position)

  def raw(self, index) -> dict:
    """Record `index` as stored (image encoded or an array), label remapped."""
    ex = self.source[int(index)]
    out = {'image': ex['image']}
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

  def record(self, index) -> dict:
    return self.recipe.head(self.raw(index))

  def augment(self, example: dict, position: int) -> dict:
    if not self.recipe.random:
      return example
    return self.recipe.tail(example, np.random.default_rng([self.seed, int(position)]))


class PreprocessBatch:
  """(positions, record indices) -> model-input batch (each column with a leading [b] axis):
  the values of stacking Preprocess(i, position) for every example.

  Reading and decoding one record is tens of microseconds of Python (tfds deserialisation),
  far more than a small model's step spends per example: digits_gpicl's step consumes 1024
  records in ~18 ms, and the per-record pipeline took ~130 ms for them
  (benchmarks/RESULTS.md, "Input pipeline vs step"). So a split whose records, after the
  recipe's deterministic ops, take at most CACHE_MAX_BYTES (`record_bytes` each; None: unknown,
  not cached) is computed once, on first use, into one array per column, and a batch is a
  gather plus the random ops. Larger splits are read record by record. Picklable for grain
  worker processes, each of which then builds its own copy.
  """

  def __init__(self, source, input_cfg, record_bytes: int | None, *, train: bool = True,
               seed: int = 0):
    self.preprocess = Preprocess(source, input_cfg, train=train, seed=seed)
    self.cached = record_bytes is not None and len(source) * record_bytes <= CACHE_MAX_BYTES
    self._table = None
    self._lock = threading.Lock()  # Reader threads may ask for the table at once.

  def __getstate__(self):
    return dict(self.__dict__, _table=None, _lock=None)

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def _table_columns(self) -> dict:
    with self._lock:
      if self._table is None:
        self._table = stack([self.preprocess.record(i)
                             for i in range(len(self.preprocess.source))])
    return self._table

  def __call__(self, positions, indices) -> dict:
    indices = np.asarray(indices)
    prep = self.preprocess
    if self.cached:
      table = self._table_columns()
      columns = {k: v[indices] for k, v in table.items()}
      if not prep.recipe.random:
        return columns
      examples = [prep.augment({k: v[j] for k, v in columns.items()}, p)
                  for j, p in enumerate(positions)]
    else:
      examples = [prep.augment(prep.record(i), p) for i, p in zip(indices, positions)]
    return stack(examples)


class ShardExample:
  """A webdataset sample ({'jpg': bytes, 'txt': bytes, 'json': bytes, ...}) -> example: the
  training recipe on its image (the first of jpg, jpeg, png, webp), `caption` from txt, and
  the integer fields of its json (label-like columns: `input.label_key` among them is
  `label`). Raises on a corrupt image; the shard reader skips and counts the sample."""

  IMAGE_EXTS = ('jpg', 'jpeg', 'png', 'webp')

  def __init__(self, input_cfg):
    self.recipe = get_recipe(input_cfg, train=True)
    self.label_key = input_cfg.get('label_key') or 'label'

  def __call__(self, sample: dict, rng: np.random.Generator) -> dict:
    image = next((sample[e] for e in self.IMAGE_EXTS if e in sample), None)
    if image is None:
      raise ValueError(f"sample {sample.get('__key__')!r} has no image "
                       f"({'/'.join(self.IMAGE_EXTS)}); it has {sorted(sample)}")
    example = {'image': image}
    if 'txt' in sample:
      text = sample['txt']
      example['caption'] = text.decode('utf-8') if isinstance(text, bytes) else str(text)
    if 'json' in sample:
      meta = json.loads(sample['json'])
      for k, v in meta.items():
        if isinstance(v, int) and not isinstance(v, bool):
          example['label' if k == self.label_key else k] = np.int32(v)
    out = self.recipe(example, rng)
    image = out['image']
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3):
      raise ValueError('the recipe must decode the image (start input.pp with a decode op)')
    return out


def stack(examples: list[dict]) -> dict:
  """Examples with the same keys -> columns with a leading batch axis (images must agree in
  shape: the recipe fixes it)."""
  out = {}
  for k in examples[0]:
    values = [e[k] for e in examples]
    if k == 'image' and len({v.shape for v in values}) > 1:
      raise ValueError(f"images of one batch differ in shape {sorted({v.shape for v in values})}"
                       "; end input.pp / input.pp_eval at a fixed size (e.g. central_crop, "
                       "resize) or set input.image_size")
    out[k] = np.stack(values)
  return out


# ------------------------------------------------------------------- normalising, on device


def value_range(input_cfg, train: bool = True):
  return get_recipe(input_cfg, train).value_range


def host_normalise(images: np.ndarray, input_cfg, train: bool = True) -> np.ndarray:
  """The recipe's value_range on the host (for code that consumes pixels there)."""
  vr = value_range(input_cfg, train)
  return registry.normalise(images, vr) if vr else images.astype(np.float32)


IMAGE_KEYS = ('image', 'images')


def normaliser(input_cfg, train: bool = True):
  """Global batch -> the same with its uint8 image columns (IMAGE_KEYS) as float32, scaled to
  the recipe's value_range, computed on the devices (one jitted elementwise op; the output
  keeps the input's sharding)."""
  return _normaliser(value_range(input_cfg, train))


@functools.lru_cache(maxsize=16)
def _normaliser(vr):
  """One jitted function per value range: evaluators ask for it at every evaluation."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  # A 256-entry table of the host formula, gathered on the devices: bitwise what the host
  # computes (XLA's float division is not numpy's to the last ulp, not even by a traced
  # divisor, and embedded runs should not change by a recipe moving to the device).
  # Per-channel normalisations (MeanStd) gather from a [256, C] table.
  per_channel = isinstance(vr, registry.MeanStd)
  pixels = np.arange(256, dtype=np.uint8)
  table = (registry.normalise(np.repeat(pixels[:, None], len(vr.mean), 1), vr) if per_channel
           else registry.normalise(pixels, vr) if vr else pixels.astype(np.float32))

  def lookup(x, t):
    if per_channel:
      return t[x.astype(jnp.int32), jnp.arange(t.shape[1])]
    return jnp.take(t, x.astype(jnp.int32), mode='clip')
  fn = jax.jit(lookup)

  def normalise(batch: dict) -> dict:
    return {k: fn(v, table) if k in IMAGE_KEYS and getattr(v, 'dtype', None) == np.uint8 else v
            for k, v in batch.items()}
  return normalise


class ImagePreprocess:
  """The image preprocessing of a model (what `load_pretrained` returns, like open_clip's
  preprocess transform): the eval recipe of its config (input.pp_eval), applied to encoded
  images (JPEG / PNG bytes) or decoded uint8 arrays [H, W, C], normalised on the host.

    pre = ImagePreprocess.from_config(config.input)
    images = pre([jpeg_bytes, uint8_array])      # float32 [B, size, size, C]

  Attributes: recipe (the op string), image_size ((h, w) or None), mean / std (the
  normalisation as mean and std of [0, 1] pixels, as published checkpoints state it).
  """

  def __init__(self, recipe: str):
    self.recipe = recipe
    self._pp = _parse(recipe)
    self.image_size = self._pp.out_size
    vr = self._pp.value_range
    if isinstance(vr, registry.MeanStd):
      self.mean, self.std = vr.mean, vr.std
    elif vr:  # value_range(lo, hi): x / 255 * (hi - lo) + lo = (x / 255 - mean) / std
      lo, hi = vr
      self.std = (1.0 / (hi - lo),) * 3
      self.mean = (-lo / (hi - lo),) * 3
    else:
      self.mean, self.std = (0.0,) * 3, (1.0 / 255,) * 3

  @classmethod
  def from_config(cls, input_cfg) -> 'ImagePreprocess':
    return cls(recipe_string(input_cfg, train=False))

  def __call__(self, images) -> np.ndarray:
    out = []
    for image in images:
      key = 'image'
      example = self._pp({key: image if isinstance(image, (bytes, np.ndarray)) else
                          np.asarray(image)}, np.random.default_rng(0))
      out.append(example[key])
    batch = np.stack(out)
    vr = self._pp.value_range
    return registry.normalise(batch, vr) if vr else batch.astype(np.float32)

  def __repr__(self):
    return f'ImagePreprocess({self.recipe!r})'

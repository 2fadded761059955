"""Offline TFDS builders: datasets that need no network and no TensorFlow.

* `digits`: scikit-learn's 1797 8x8 handwritten digits (shipped inside the
  sklearn wheel), image (8, 8, 1) uint8 in 0..255, label ClassLabel(10).
* `shapes_captions`: procedurally rendered 32x32 RGB images of one coloured
  shape with a compositional caption, e.g. "a large red circle at the top left".
* `shapes_jpeg`: the same shapes as JPEG files of varying size (96-500 px a
  side), in the record layout of TFDS `imagenet2012` (image: encoded JPEG,
  label: ClassLabel of the 6 shapes, file_name); train 4,000, validation 500.
  Decoded at 224x224x3 the train split exceeds pipeline.CACHE_MAX_BYTES, so it
  takes the pipeline's record-by-record (ImageNet) path.
* Shifted domains of digits and shapes_captions (SHIFTED; transforms in
  domains.py): `digits_rotated`, `digits_inverted`, `digits_noisy`,
  `shapes_captions_textured`, `shapes_captions_blur`,
  `shapes_captions_lowcontrast`: the source's examples (same splits, labels,
  captions, record order) with each image shifted, seeded per example. Select
  one as any dataset, e.g. input.dataset='digits_rotated'.

All are written as array_record so `tfds.data_source` gives random access
(grain needs it), and use only features whose encoding needs no TensorFlow
(Tensor, ClassLabel, Text; Image from already-encoded JPEG bytes, which tfds
stores as given), so building works without TensorFlow.

`ensure_shapes_wds` writes `shapes_wds`, captioned shapes as webdataset tar
shards in img2dataset's layout (KEY.jpg, KEY.txt, KEY.json; stats.json).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import shutil
import tarfile
import tempfile
import types

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from jax_transfer.data import domains

_FILE_FORMAT = 'array_record'

# ----------------------------------------------------------------------------
# digits
# ----------------------------------------------------------------------------


class Digits(tfds.core.GeneratorBasedBuilder):
  """sklearn `load_digits`, stratified 75/25 train/test split (seed 0)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  DESCRIPTION = 'scikit-learn handwritten digits (UCI optdigits test set).'

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
            'label': tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=('image', 'label'),
        description=self.DESCRIPTION,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The data ships inside scikit-learn.
    from sklearn import datasets, model_selection  # pylint: disable=g-import-not-at-top
    digits = datasets.load_digits()
    # 0..16 grey levels -> 0..255 so it looks like any other uint8 image.
    images = (digits.images.astype(np.int64) * 255 // 16).astype(np.uint8)
    images = images[..., None]  # [N, 8, 8, 1]
    labels = digits.target.astype(np.int64)
    idx = np.arange(len(labels))
    train_idx, test_idx = model_selection.train_test_split(
        idx, test_size=0.25, random_state=0, stratify=labels)
    # Sorted so the on-disk order does not depend on sklearn's shuffle details.
    return {
        'train': self._generate_examples(images, labels, np.sort(train_idx)),
        'test': self._generate_examples(images, labels, np.sort(test_idx)),
    }

  def _generate_examples(self, images, labels, indices):
    for i in indices:
      yield int(i), {'image': images[i], 'label': int(labels[i])}


# ----------------------------------------------------------------------------
# shapes_captions
# ----------------------------------------------------------------------------

SHAPES = ('circle', 'square', 'triangle', 'cross', 'diamond', 'ring')
COLORS = {  # Saturated RGB so every colour is distinct from the dark background.
    'red': (230, 40, 40),
    'green': (40, 200, 60),
    'blue': (50, 80, 240),
    'yellow': (240, 230, 40),
    'magenta': (230, 50, 220),
    'cyan': (40, 220, 230),
    'white': (245, 245, 245),
    'orange': (250, 140, 20),
}
SIZES = ('small', 'large')
POSITIONS = ('top left', 'top center', 'top right',
             'center left', 'center', 'center right',
             'bottom left', 'bottom center', 'bottom right')  # 3x3, row major.
CAPTION_TEMPLATES = (
    'a {size} {color} {shape} at the {position}',
    'a {color} {shape}, {size}, at the {position}',
    'there is a {size} {color} {shape} at the {position} of the image',
)
IMAGE_SIZE = 32
_SPLIT_SEEDS = {'train': (10_000, 1), 'test': (2_000, 2)}  # (num examples, seed)
_RADIUS = {'small': 4.0, 'large': 7.5}  # Half-extent in pixels.
# Pixel-centre coordinates, [32, 32] each; built once, shared by every render.
_GRID_Y, _GRID_X = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) + 0.5


def _shape_mask(shape: str, cy: float, cx: float, r: float,
                grid: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
  """Boolean mask of `shape` centred at (cy, cx), half-extent r.

  `grid` = (y, x): pixel-centre coordinates (float32, broadcastable, e.g.
  [h, 1] and [1, w]); the mask has their broadcast shape. Default: the
  [IMAGE_SIZE, IMAGE_SIZE] grid of shapes_captions.
  """
  grid_y, grid_x = (_GRID_Y, _GRID_X) if grid is None else grid
  dy, dx = grid_y - cy, grid_x - cx
  if shape == 'circle':
    return dy**2 + dx**2 <= r**2
  if shape == 'square':
    return (np.abs(dy) <= 0.8 * r) & (np.abs(dx) <= 0.8 * r)
  if shape == 'triangle':  # Apex up: width grows linearly from top to bottom.
    t = (dy + r) / (2 * r)
    return (t >= 0) & (t <= 1) & (np.abs(dx) <= t * r)
  if shape == 'cross':
    arm = 0.3 * r
    return (((np.abs(dy) <= arm) & (np.abs(dx) <= r))
            | ((np.abs(dx) <= arm) & (np.abs(dy) <= r)))
  if shape == 'diamond':
    return np.abs(dy) + np.abs(dx) <= r
  if shape == 'ring':
    d2 = dy**2 + dx**2
    return (d2 <= r**2) & (d2 >= (0.55 * r)**2)
  raise ValueError(f'Unknown shape {shape!r}.')


def render_shape(shape: str, color: str, size: str, position: str,
                 rng: np.random.Generator) -> np.ndarray:
  """Renders one example: uint8 [32, 32, 3].

  The shape's centre sits in the `position` cell of a 3x3 grid with a small
  random jitter; the background is dark grey with uniform noise so a model
  cannot solve the task from exact pixel values alone.
  """
  r = _RADIUS[size]
  row, col = divmod(POSITIONS.index(position), 3)
  cell = IMAGE_SIZE / 3
  # Jitter kept small enough that large shapes still stay mostly in frame.
  cy = (row + 0.5) * cell + rng.uniform(-1.5, 1.5)
  cx = (col + 0.5) * cell + rng.uniform(-1.5, 1.5)
  image = rng.integers(0, 40, size=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.int16)
  mask = _shape_mask(shape, cy, cx, r)
  fg = np.asarray(COLORS[color], np.int16) + rng.integers(-15, 16, size=3)
  image[mask] = fg
  return np.clip(image, 0, 255).astype(np.uint8)


def caption_for(shape: str, color: str, size: str, position: str,
                template: int = 0) -> str:
  return CAPTION_TEMPLATES[template].format(
      shape=shape, color=color, size=size, position=position)


def generate_shapes(num: int, seed: int):
  """Yields `num` examples (dict of numpy / str) deterministically from `seed`."""
  rng = np.random.default_rng(seed)
  color_names = tuple(COLORS)
  for i in range(num):
    s = int(rng.integers(len(SHAPES)))
    c = int(rng.integers(len(color_names)))
    z = int(rng.integers(len(SIZES)))
    p = int(rng.integers(len(POSITIONS)))
    t = int(rng.integers(len(CAPTION_TEMPLATES)))
    names = (SHAPES[s], color_names[c], SIZES[z], POSITIONS[p])
    yield i, {
        'image': render_shape(*names, rng=rng),
        'caption': caption_for(*names, template=t),
        'shape': s, 'color': c, 'size': z, 'position': p,
    }


class ShapesCaptions(tfds.core.GeneratorBasedBuilder):
  """Procedural coloured-shape images with compositional captions."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  SPLITS = _SPLIT_SEEDS  # {split: (num examples, seed)}; subclasses may change it.
  DESCRIPTION = ('One coloured shape on a dark noisy background, with a '
                 'caption naming its size, colour, shape and position.')

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(
                shape=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8),
            # Text is a scalar np.object_ Tensor: encodes to bytes in numpy.
            'caption': tfds.features.Text(),
            'shape': tfds.features.ClassLabel(names=list(SHAPES)),
            'color': tfds.features.ClassLabel(names=list(COLORS)),
            'size': tfds.features.ClassLabel(names=list(SIZES)),
            'position': tfds.features.ClassLabel(names=list(POSITIONS)),
        }),
        description=self.DESCRIPTION,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Procedural, nothing to download.
    return {split: generate_shapes(num, seed)
            for split, (num, seed) in self.SPLITS.items()}

  def _generate_examples(self):  # Unused: generators returned directly above.
    raise NotImplementedError


# ----------------------------------------------------------------------------
# shapes_jpeg: the shapes as JPEG files of varying size (imagenet2012 layout)
# ----------------------------------------------------------------------------

JPEG_QUALITY = 90
_BACKGROUND_BLOCK = 8  # Background noise varies per 8x8 block (+ fine grain).


def render_shape_image(shape: str, color: str, size: str, position: str,
                       height: int, width: int,
                       rng: np.random.Generator
                       ) -> tuple[np.ndarray, tuple[float, float, float]]:
  """`render_shape` at any size: (uint8 [height, width, 3], (cy, cx, r)), the
  shape's centre and half-extent in pixels (its `_shape_mask` arguments).

  Radius and jitter scale with min(height, width) / 32; the centre sits in
  the `position` cell of a 3x3 grid over the whole frame. The background is
  dark blocky noise plus a fine grain (so JPEG files stay small), and the
  mask is computed on the shape's bounding box only, so a 500x500 image costs
  about as much to render as to encode.
  """
  scale = min(height, width) / IMAGE_SIZE
  r = _RADIUS[size] * scale
  row, col = divmod(POSITIONS.index(position), 3)
  cy = (row + 0.5) * height / 3 + rng.uniform(-1.5, 1.5) * scale
  cx = (col + 0.5) * width / 3 + rng.uniform(-1.5, 1.5) * scale
  b = _BACKGROUND_BLOCK
  # uint8 throughout: base (<28) + block noise (<13) + grain (<8) cannot overflow.
  base = rng.integers(0, 28, size=3, dtype=np.uint8)
  coarse = rng.integers(0, 13, size=(-(-height // b), -(-width // b), 3),
                        dtype=np.uint8) + base
  image = np.repeat(np.repeat(coarse, b, axis=1)[:, :width], b, axis=0)[:height]
  # Random bytes are the cheapest uniform draw; & 7 keeps 3 bits: grain in 0..7.
  image += np.frombuffer(rng.bytes(height * width * 3), np.uint8).reshape(
      height, width, 3) & 7
  y0, y1 = max(0, int(cy - r) - 1), min(height, int(cy + r) + 2)
  x0, x1 = max(0, int(cx - r) - 1), min(width, int(cx + r) + 2)
  grid = (np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5,
          np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5)
  mask = _shape_mask(shape, cy, cx, r, grid)
  fg = np.asarray(COLORS[color], np.int16) + rng.integers(-15, 16, size=3)
  image[y0:y1, x0:x1][mask] = np.clip(fg, 0, 255).astype(np.uint8)
  return image, (cy, cx, r)


def encode_jpeg(image: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
  """uint8 [H, W, 3] RGB -> JPEG bytes (libjpeg-turbo via simplejpeg, 4:2:0,
  accurate integer DCT: deterministic for a given libjpeg-turbo)."""
  import simplejpeg  # pylint: disable=g-import-not-at-top
  return simplejpeg.encode_jpeg(np.ascontiguousarray(image), quality=quality,
                                colorspace='RGB', colorsubsampling='420',
                                fastdct=False)


def generate_shapes_jpeg(num: int, seed: int, min_size: int, max_size: int,
                         quality: int = JPEG_QUALITY):
  """Yields `num` dicts deterministically from `seed`: jpeg (bytes), height,
  width, shape/color/size/position/template (int indices into SHAPES, COLORS,
  SIZES, POSITIONS, CAPTION_TEMPLATES), caption (str), center (cy, cx) and
  radius (px, as render_shape_image). Height and width are each drawn
  uniformly in [min_size, max_size]."""
  rng = np.random.default_rng(seed)
  color_names = tuple(COLORS)
  for _ in range(num):
    s = int(rng.integers(len(SHAPES)))
    c = int(rng.integers(len(color_names)))
    z = int(rng.integers(len(SIZES)))
    p = int(rng.integers(len(POSITIONS)))
    t = int(rng.integers(len(CAPTION_TEMPLATES)))
    h, w = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
    names = (SHAPES[s], color_names[c], SIZES[z], POSITIONS[p])
    image, (cy, cx, r) = render_shape_image(*names, height=h, width=w, rng=rng)
    yield {'jpeg': encode_jpeg(image, quality), 'height': h, 'width': w,
           'shape': s, 'color': c, 'size': z, 'position': p, 'template': t,
           'caption': caption_for(*names, template=t), 'center': (cy, cx),
           'radius': r}


def shapes_jpeg_file_name(split: str, i: int, shape: int) -> str:
  """imagenet2012-style names: train 'circle_00000123.JPEG' (class prefix, as
  the synset prefix there), other splits 'shapes_val_00000123.JPEG'."""
  if split == 'train':
    return f'{SHAPES[shape]}_{i:08d}.JPEG'
  return f'shapes_val_{i:08d}.JPEG'


@contextlib.contextmanager
def _deterministic_serialization():
  """tfds serialises each record as a tf.train.Example, whose features are a
  protobuf map; upb writes map entries in hash order, which differs between
  processes, so two builds hold the same records in different bytes. Within
  this context records are written with deterministic=True (map entries
  sorted by key), and the prepared files are identical byte for byte."""
  from tensorflow_datasets.core import example_serializer  # pylint: disable=g-import-not-at-top
  cls = example_serializer.ExampleSerializer
  original = cls.serialize_example

  def serialize_example(self, example):
    return self.get_tf_example(example).SerializeToString(deterministic=True)

  cls.serialize_example = serialize_example
  try:
    yield
  finally:
    cls.serialize_example = original


class ShapesJpeg(tfds.core.GeneratorBasedBuilder):
  """The shapes of shapes_captions as JPEG files, imagenet2012's layout.

  Subclasses may change SPLITS ({split: (num examples, seed)}), MIN_SIZE /
  MAX_SIZE (px, each side) and QUALITY (benchmarks/startup.py does).
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  SPLITS = {'train': (4_000, 11), 'validation': (500, 12)}
  MIN_SIZE, MAX_SIZE = 96, 500
  QUALITY = JPEG_QUALITY

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            # Encoded from JPEG bytes: tfds stores them as given (no TF).
            'image': tfds.features.Image(encoding_format='jpeg'),
            'label': tfds.features.ClassLabel(names=list(SHAPES)),
            'file_name': tfds.features.Text(),
        }),
        supervised_keys=('image', 'label'),
        description=('One coloured shape on a dark background as a JPEG of '
                     f'{self.MIN_SIZE}-{self.MAX_SIZE} px a side (quality '
                     f'{self.QUALITY}); label = the shape. Record layout of '
                     'imagenet2012.'),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Procedural, nothing to download.
    return {split: self._generate_examples(split, num, seed)
            for split, (num, seed) in self.SPLITS.items()}

  def _download_and_prepare(self, dl_manager, download_config=None):
    with _deterministic_serialization():
      return super()._download_and_prepare(dl_manager, download_config)

  def _generate_examples(self, split, num, seed):
    examples = generate_shapes_jpeg(num, seed, self.MIN_SIZE, self.MAX_SIZE,
                                    self.QUALITY)
    for i, ex in enumerate(examples):
      name = shapes_jpeg_file_name(split, i, ex['shape'])
      yield name, {'image': ex['jpeg'], 'label': ex['shape'],
                   'file_name': name}


# ----------------------------------------------------------------------------
# Shifted domains: <dataset>_<domain>, e.g. digits_rotated (jax_transfer/data/domains.py)
# ----------------------------------------------------------------------------


class _Shifted:
  """Mixin over an embedded builder: the same examples (keys, so record order, labels,
  captions) with each image shifted by domains.DOMAINS[SOURCE][DOMAIN], seeded per example.
  Written with deterministic serialization, so a rebuild is identical byte for byte."""

  SOURCE: str
  DOMAIN: str

  def _split_generators(self, dl_manager):
    return {split: domains.shift_examples(self.SOURCE, self.DOMAIN, split, examples)
            for split, examples in super()._split_generators(dl_manager).items()}

  def _download_and_prepare(self, dl_manager, download_config=None):
    with _deterministic_serialization():
      return super()._download_and_prepare(dl_manager, download_config)


def shifted_builder(base: type, source: str, domain: str, name: str | None = None,
                    register: bool = True) -> type:
  """The builder class of `source`'s `domain` over builder class `base` (TFDS name `name`,
  default f'{source}_{domain}'); register=False keeps it out of the TFDS registry (tests
  that shift a smaller subclass of `base`)."""
  name = name or domains.dataset_name(source, domain)
  cls_name = ''.join(part.capitalize() for part in name.split('_'))
  doc = (domains.__doc__ or '').split('\n\n')[0]
  attrs = {'name': name, 'SOURCE': source, 'DOMAIN': domain, '__module__': __name__,
           '__doc__': f'{source} shifted to domain {domain!r}. {doc}',
           'DESCRIPTION': f'{base.DESCRIPTION} Shifted domain {domain!r}: see '
                          'jax_transfer/data/domains.py.'}
  return types.new_class(cls_name, (_Shifted, base), {'skip_registration': not register},
                         lambda ns: ns.update(attrs))


# {TFDS name: builder class} of every shifted domain: digits_rotated, digits_inverted,
# digits_noisy, shapes_captions_textured, shapes_captions_blur, shapes_captions_lowcontrast.
SHIFTED = {name: shifted_builder({'digits': Digits, 'shapes_captions': ShapesCaptions}[src],
                                 src, dom)
           for name, (src, dom) in domains.names().items()}


# ----------------------------------------------------------------------------
# build / ensure
# ----------------------------------------------------------------------------

# The source datasets (what the data_dir fixtures and build.py build first); the shifted
# domains are SHIFTED, built on demand (or by build.py).
EMBEDDED = {'digits': Digits, 'shapes_captions': ShapesCaptions,
            'shapes_jpeg': ShapesJpeg}


def is_embedded(name: str) -> bool:
  """Whether `name` is built here (a source dataset or a shifted domain)."""
  return name in EMBEDDED or name in SHIFTED


def default_data_dir() -> str:
  """`$JAX_TRANSFER_DATA_DIR` if set, else `~/tensorflow_datasets`."""
  return os.environ.get('JAX_TRANSFER_DATA_DIR') or os.path.expanduser(
      '~/tensorflow_datasets')


def _builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  cls = EMBEDDED.get(name) or SHIFTED.get(name)
  if cls is None:
    raise ValueError(f'{name!r} is not embedded; choose from {sorted(EMBEDDED)} or the '
                     f'shifted domains {sorted(SHIFTED)}.')
  return cls(data_dir=data_dir or default_data_dir(), file_format=_FILE_FORMAT)


def build_embedded(name: str, data_dir: str | None = None) -> str:
  """Builds (or rebuilds if absent) embedded dataset `name`; returns its dir."""
  builder = _builder(name, data_dir)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          # Statistics are not used by the pipeline and cost a pass over data.
          compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return os.fspath(builder.data_dir)


@contextlib.contextmanager
def _file_lock(path: epath.Path):
  """Exclusive lock so concurrent processes build a dataset only once."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, 'w') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def ensure_embedded(name: str, data_dir: str | None = None) -> str:
  """Builds `name` at `data_dir` unless already prepared; returns its dir.

  Idempotent, and safe when several processes (e.g. all hosts of a pod
  sharing a filesystem, or pytest workers) call it at once: the first takes
  a file lock and builds, the rest find it prepared.
  """
  builder = _builder(name, data_dir)
  if builder.is_prepared():
    return os.fspath(builder.data_dir)
  root = epath.Path(data_dir or default_data_dir())
  with _file_lock(root / f'.{name}.build.lock'):
    return build_embedded(name, os.fspath(root))


# ----------------------------------------------------------------------------
# shapes_wds: webdataset shards of captioned shapes (img2dataset layout)
# ----------------------------------------------------------------------------

WDS_NAME = 'shapes_wds'
WDS_SHARDS, WDS_PER_SHARD = 8, 500
WDS_SIZE = (48, 160)  # Min, max px of each side.
WDS_SEED = 21
WDS_PATTERN = 'shapes-{00000..00007}.tar'


def wds_key(shard: int, i: int) -> str:
  """img2dataset's key: 5-digit shard then 4-digit index in it, '000010123'."""
  return f'{shard:05d}{i:04d}'


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size, info.mode, info.mtime = len(data), 0o644, 0  # Fixed: deterministic.
  tar.addfile(info, io.BytesIO(data))


def write_shapes_wds(out_dir: str) -> None:
  """Writes the shards and stats.json into (existing, empty) `out_dir`."""
  examples = generate_shapes_jpeg(WDS_SHARDS * WDS_PER_SHARD, WDS_SEED, *WDS_SIZE)
  for shard in range(WDS_SHARDS):
    path = os.path.join(out_dir, f'shapes-{shard:05d}.tar')
    with tarfile.open(path, 'w', format=tarfile.USTAR_FORMAT) as tar:
      for i in range(WDS_PER_SHARD):
        ex = next(examples)
        key = wds_key(shard, i)
        meta = {'key': key, 'shape': ex['shape'], 'color': ex['color'],
                'size': ex['size'], 'position': ex['position'],
                'caption': ex['caption'], 'width': ex['width'],
                'height': ex['height'], 'status': 'success'}
        _tar_add(tar, f'{key}.jpg', ex['jpeg'])
        _tar_add(tar, f'{key}.txt', ex['caption'].encode())
        _tar_add(tar, f'{key}.json', json.dumps(meta, sort_keys=True).encode())
  count = WDS_SHARDS * WDS_PER_SHARD
  stats = {'count': count, 'successes': count, 'failed_to_download': 0,
           'failed_to_resize': 0, 'shards': WDS_SHARDS,
           'samples_per_shard': WDS_PER_SHARD, 'pattern': WDS_PATTERN}
  with open(os.path.join(out_dir, 'stats.json'), 'w') as f:
    json.dump(stats, f, indent=2, sort_keys=True)


def ensure_shapes_wds(data_dir: str | None = None) -> str:
  """`DATA_DIR/shapes_wds/`, written unless present; returns it.

  8 tar shards `shapes-{00000..00007}.tar` of 500 samples each, in
  img2dataset's layout: per sample KEY.jpg (JPEG, 48-160 px a side), KEY.txt
  (its caption, as shapes_captions'), KEY.json (key, shape, color, size,
  position: int indices as shapes_captions'; caption, width, height, status),
  keys '000000123' (shard, index); and stats.json (count, ...). Deterministic.
  Idempotent and safe for concurrent callers: built under a file lock into a
  temporary directory, then renamed into place, so the directory, when
  present, is complete.
  """
  root = epath.Path(data_dir or default_data_dir())
  out = os.fspath(root / WDS_NAME)
  if os.path.isdir(out):
    return out
  with _file_lock(root / f'.{WDS_NAME}.build.lock'):
    if os.path.isdir(out):  # Another process built it meanwhile.
      return out
    tmp = tempfile.mkdtemp(prefix=f'.{WDS_NAME}.incomplete.', dir=os.fspath(root))
    try:
      write_shapes_wds(tmp)
      os.chmod(tmp, 0o755)  # mkdtemp makes it 0700.
      os.rename(tmp, out)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
  return out

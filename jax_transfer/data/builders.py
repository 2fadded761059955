"""Offline TFDS builders: datasets that need no network and no TensorFlow.

* `digits`: scikit-learn's 1797 8x8 handwritten digits (shipped inside the
  sklearn wheel), image (8, 8, 1) uint8 in 0..255, label ClassLabel(10).
* `shapes_captions`: procedurally rendered 32x32 RGB images of one coloured
  shape with a compositional caption, e.g. "a large red circle at the top left".

Both are written as array_record so `tfds.data_source` gives random access
(grain needs it), and use only features whose encoding is pure numpy
(Tensor, ClassLabel, Text), so building works without TensorFlow.
"""

from __future__ import annotations

import contextlib
import fcntl
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

_FILE_FORMAT = 'array_record'

# ----------------------------------------------------------------------------
# digits
# ----------------------------------------------------------------------------


class Digits(tfds.core.GeneratorBasedBuilder):
  """sklearn `load_digits`, stratified 75/25 train/test split (seed 0)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
            'label': tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=('image', 'label'),
        description='scikit-learn handwritten digits (UCI optdigits test set).',
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


def _shape_mask(shape: str, cy: float, cx: float, r: float) -> np.ndarray:
  """Boolean [IMAGE_SIZE, IMAGE_SIZE] mask of `shape` centred at (cy, cx)."""
  dy, dx = _GRID_Y - cy, _GRID_X - cx
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
        description=('One coloured shape on a dark noisy background, with a '
                     'caption naming its size, colour, shape and position.'),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Procedural, nothing to download.
    return {split: generate_shapes(num, seed)
            for split, (num, seed) in _SPLIT_SEEDS.items()}

  def _generate_examples(self):  # Unused: generators returned directly above.
    raise NotImplementedError


# ----------------------------------------------------------------------------
# build / ensure
# ----------------------------------------------------------------------------

EMBEDDED = {'digits': Digits, 'shapes_captions': ShapesCaptions}


def default_data_dir() -> str:
  """`$JAX_TRANSFER_DATA_DIR` if set, else `~/tensorflow_datasets`."""
  return os.environ.get('JAX_TRANSFER_DATA_DIR') or os.path.expanduser(
      '~/tensorflow_datasets')


def _builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  if name not in EMBEDDED:
    raise ValueError(f'{name!r} is not embedded; choose from {sorted(EMBEDDED)}.')
  return EMBEDDED[name](data_dir=data_dir or default_data_dir(),
                        file_format=_FILE_FORMAT)


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

"""A checkpointable reader of webdataset / img2dataset tar shards (no `webdataset` needed).

Shards. A spec is 'DIR/{00000..00099}.tar' (bash-style braces: numeric ranges keep their zero
padding, comma lists {a,b}, several braces multiply); several sources are joined by '::' as in
open_clip's --train-data. Each shard is an uncompressed tar (seekable: local or fuse-mounted
path) whose consecutive members with the same key (the name up to the first dot of its
basename; directory kept) form one sample {'__key__': key, '__url__': shard path,
EXT: raw bytes} with EXT the lower-cased rest of the name ('jpg', 'txt', 'json', ...).

Order, per host p of P, for each source s (independently):
  * epoch e permutes the source's shards with an rng from (seed, s, e); host p reads
    shards[p::P] of that order, one after the other: the host's stream of sample *slots*.
  * That stream is cut into consecutive windows of `shuffle_buffer` slots (windows span shard
    boundaries, not epochs: an epoch's last window is shorter). Window w of epoch e is emitted
    in the order of a permutation of range(shuffle_buffer) drawn from (seed, s, e, w)
    (restricted to the slots present). shuffle_buffer 0 or 1: stream order.
  * Output draw t (t = 0, 1, ... counts every sample this host takes, skipped ones too) picks
    its source with probability proportional to `weights` (equal if None) from an rng of
    (seed, t // 1024), and takes that source's next slot. Its example_fn rng is
    np.random.default_rng([seed, 4, process_index, t]): resumed runs draw the same
    augmentations whatever the thread timing.
Epochs repeat forever; `num_samples` (open_clip's --train-num-samples) only sets
`epoch_fraction` = t * process_count / num_samples.

Bad data never crashes nor shifts the order: a slot whose example_fn raises (corrupt image),
that has no image (jpg/jpeg/png/webp), or that a truncated / corrupt tar cut off (the sample
being read when tarfile failed; the rest of that shard is lost) is skipped: counted in
`skipped`, logged once with logging.warning (shard and key), and the batch is filled with the
following samples. Since permutations are over slots, every other sample keeps its place.
(More than MAX_CONSECUTIVE_SKIPS skips in a row raise ShardError: the data is unusable.)

State (get_state, JSON, small): {'version', 'position': t, 'skipped', 'process_index',
'process_count', 'shuffle_buffer', 'num_shards': [per source], 'sources': [per source
{'epoch', 'window', 'shard': index in this host's order of that epoch, 'offset': tar byte
offset of the window's first member header, 'emitted': slots of the window already taken}]}.
set_state re-reads from each current window's start and continues with exactly the batches
the saved iterator would have yielded next.

Decoding runs in `num_threads` threads (0: inline), in order, at most 2 batches ahead;
windows are read one ahead in a reader thread. Batches stack each column: np.stack, or an
object array for str / bytes.
"""

from __future__ import annotations

import collections
from concurrent import futures
import logging
import math
import os
import re
import tarfile
import threading

import numpy as np

IMAGE_EXTS = ('jpg', 'jpeg', 'png', 'webp')
MAX_CONSECUTIVE_SKIPS = 10_000
STATE_VERSION = 1
_MIX_BLOCK = 1024
_TAG_SHARDS, _TAG_WINDOW, _TAG_MIX, _TAG_EXAMPLE = 1, 2, 3, 4
_SOURCE_FIELDS = ('epoch', 'window', 'shard', 'offset', 'emitted')

log = logging.getLogger(__name__)


class ShardError(ValueError):
  """Bad shard spec, missing shards, bad weights, or unusable shard data."""


# ----------------------------------------------------------------------------- specs

_RANGE = re.compile(r'(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?')


def _split_top(body: str, sep: str = ',') -> list[str]:
  parts, depth, start = [], 0, 0
  for i, c in enumerate(body):
    depth += (c == '{') - (c == '}')
    if c == sep and depth == 0:
      parts.append(body[start:i])
      start = i + 1
  return parts + [body[start:]]


def _alternatives(body: str) -> list[str] | None:
  m = _RANGE.fullmatch(body)
  if m:
    a, b = int(m[1]), int(m[2])
    step = abs(int(m[3] or 1)) or 1
    padded = any(len(x.lstrip('-')) > 1 and x.lstrip('-')[0] == '0' for x in m.group(1, 2))
    width = max(len(m[1]), len(m[2])) if padded else 0
    values = range(a, b + 1, step) if a <= b else range(a, b - 1, -step)
    return [f'{v:0{width}d}' for v in values]
  parts = _split_top(body)
  if len(parts) == 1:
    return None
  return [x for part in parts for x in _braces(part)]


def _braces(s: str) -> list[str]:
  """Bash-style brace expansion of one pattern (in bash's order)."""
  depth, start = 0, 0
  for i, c in enumerate(s):
    if c == '{':
      start = i if depth == 0 else start
      depth += 1
    elif c == '}' and depth:
      depth -= 1
      if depth == 0:
        pre, body, rest = s[:start], s[start + 1:i], _braces(s[i + 1:])
        alts = _alternatives(body)
        if alts is None:  # '{x}': literal braces.
          alts = ['{' + b + '}' for b in _braces(body)]
        return [pre + a + r for a in alts for r in rest]
  return [s]


def expand_shards(spec: str) -> list[list[str]]:
  """'A/{000..009}.tar::B/{a,b}.tar' -> [sorted paths of A, sorted paths of B]."""
  sources = [src.strip() for src in str(spec or '').split('::')]
  if not any(sources):
    raise ShardError(f'shard spec {spec!r} is empty')
  if not all(sources):
    raise ShardError(f"shard spec {spec!r} has an empty source (around '::')")
  return [sorted(_braces(src)) for src in sources]


def _weights(weights, num_sources: int) -> np.ndarray:
  if weights is None:
    return np.full(num_sources, 1.0 / num_sources)
  if isinstance(weights, str):
    weights = weights.split('::')
  try:
    w = np.array([float(x) for x in weights], np.float64)
  except (TypeError, ValueError):
    raise ShardError(f'shard weights {weights!r} are not numbers') from None
  if len(w) != num_sources:
    raise ShardError(f'{len(w)} shard weights {tuple(weights)} for {num_sources} sources')
  if not np.all(np.isfinite(w) & (w > 0)):
    raise ShardError(f'shard weights {tuple(weights)} must all be > 0')
  return w / w.sum()


def check_shards(spec: str, weights=None) -> None:
  """Raises ShardError (one line) unless every shard of `spec` exists and `weights` fit."""
  sources = expand_shards(spec)
  paths = [p for src in sources for p in src]
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    more = f' (+{len(missing) - 3} more)' if len(missing) > 3 else ''
    raise ShardError(f'{len(missing)} of {len(paths)} shards do not exist: '
                     f'{", ".join(missing[:3])}{more}')
  _weights(weights, len(sources))


# ----------------------------------------------------------------------------- reading


def _seq(seed: int, *ints: int) -> np.random.Generator:
  return np.random.default_rng([int(seed) % (1 << 64), *map(int, ints)])


class _Slot:
  """One sample slot: a sample dict, or `error` (why it will be skipped)."""
  __slots__ = ('url', 'key', 'sample', 'error')

  def __init__(self, url, key, sample=None, error=None):
    self.url, self.key, self.sample, self.error = url, key, sample, error


def _group_slot(url: str, key: str, members: dict) -> _Slot:
  if not any(e in members for e in IMAGE_EXTS):
    return _Slot(url, key, error=f'no image ({"/".join(IMAGE_EXTS)}) among {sorted(members)}')
  return _Slot(url, key, {'__key__': key, '__url__': url, **members})


def _split_name(name: str):
  head, _, base = name.rpartition('/')
  stem, dot, ext = base.partition('.')
  if not dot or not stem:
    return None
  return (f'{head}/{stem}' if head else stem), ext.lower()


_BLOCK = 512
_ZEROS = bytes(_BLOCK)


def _number(field: bytes) -> int:
  if field[0] & 0x80:  # GNU base-256
    return int.from_bytes(field[1:], 'big')
  return int(field.split(b'\0', 1)[0].strip() or b'0', 8)


def _exact(f, n: int) -> bytes:
  data = f.read(n)
  if len(data) != n:
    raise tarfile.ReadError(f'unexpected end of data ({len(data)} of {n} bytes)')
  return data


def _members(f):
  """(header offset, name, data) of each regular file from f's position (a header) on, as
  tarfile reads them (ustar, GNU long names, pax path/size) but ~10x cheaper in Python.
  Stops at a zero block or at the end of the file; raises tarfile.ReadError on a cut or
  corrupt archive."""
  start = name = size = None
  while True:
    pos = f.tell()
    buf = f.read(_BLOCK)
    if not buf or buf == _ZEROS:
      return
    if len(buf) < _BLOCK:
      raise tarfile.ReadError(f'truncated header at byte {pos}')
    if _number(buf[148:156]) != sum(buf) - sum(buf[148:156]) + 256:
      raise tarfile.ReadError(f'bad header checksum at byte {pos}')
    start = pos if start is None else start
    typ, n = buf[156:157], (size if size is not None else _number(buf[124:136]))
    pad = -n % _BLOCK
    if typ in (b'L', b'x', b'g'):  # Extended headers: they describe the next member.
      data = _exact(f, n)
      _exact(f, pad)
      if typ == b'L':
        name = data.split(b'\0', 1)[0].decode('utf-8', 'surrogateescape')
      elif typ == b'x':
        while data:
          length = int(data.split(b' ', 1)[0])
          key, _, value = data[:length].split(b' ', 1)[1][:-1].partition(b'=')
          if key == b'path':
            name = value.decode('utf-8', 'surrogateescape')
          elif key == b'size':
            size = int(value)
          data = data[length:]
      else:
        start = None
      continue
    if name is None:
      name = buf[:100].split(b'\0', 1)[0].decode('utf-8', 'surrogateescape')
      prefix = buf[345:500].split(b'\0', 1)[0] if buf[257:262] == b'ustar' else b''
      if prefix:
        name = prefix.decode('utf-8', 'surrogateescape') + '/' + name
    if typ in (b'0', b'\0', b'7'):
      data = _exact(f, n)
      _exact(f, pad)
      yield start, name, data
    else:  # Directories, links, ...: skipped.
      f.seek(n + pad, 1)
    start = name = size = None


def _read_window(paths: list[str], shard: int, offset: int, size: int):
  """Up to `size` slots from paths[shard] at byte `offset` (a member header) onwards ->
  (slots, shard, offset) where the next window starts (shard == len(paths): epoch over)."""
  slots = []
  while shard < len(paths) and len(slots) < size:
    url, key, members = paths[shard], None, {}
    try:
      with open(url, 'rb') as f:
        f.seek(offset)
        for start, name, data in _members(f):
          parsed = _split_name(name)
          if parsed is None:
            continue
          if key is not None and parsed[0] != key:
            slots.append(_group_slot(url, key, members))
            key, members = None, {}
            if len(slots) == size:
              return slots, shard, start
          key = parsed[0]
          members[parsed[1]] = data
    except Exception as e:  # pylint: disable=broad-except  (truncated / corrupt / unreadable)
      slots.append(_Slot(url, key if key is not None else f'@{offset}',
                         error=f'truncated or corrupt tar ({type(e).__name__}: {e}); '
                               'rest of the shard lost'))
      key = None
    if key is not None:
      slots.append(_group_slot(url, key, members))
    shard, offset = shard + 1, 0
  return slots, shard, offset


class _Window:
  __slots__ = ('start', 'slots', 'order', 'next')

  def __init__(self, start, slots, order, nxt):
    self.start, self.slots, self.order, self.next = start, slots, order, nxt


class _Source:
  """One source's slots in window-shuffled order, on this host (see the module docstring)."""

  def __init__(self, it: ShardIterator, index: int, paths: list[str]):
    self.it, self.index, self.paths = it, index, paths
    self._host = {}  # epoch -> this host's shard paths of that epoch
    self._lock = threading.Lock()
    self.reset((0, 0, 0, 0), 0)

  def host_shards(self, epoch: int) -> list[str]:
    with self._lock:
      if epoch not in self._host:
        order = _seq(self.it.seed, _TAG_SHARDS, self.index, epoch).permutation(len(self.paths))
        self._host = {e: v for e, v in self._host.items() if e >= epoch - 1}
        self._host[epoch] = [self.paths[i] for i in
                             order[self.it.process_index::self.it.process_count]]
      return self._host[epoch]

  def read(self, epoch: int, window: int, shard: int, offset: int) -> _Window:
    size = max(1, self.it.shuffle_buffer)
    slots, nshard, noffset = _read_window(self.host_shards(epoch), shard, offset, size)
    if not slots:
      if shard == 0 and offset == 0:
        raise ShardError(f'source {self.index} has no samples in epoch {epoch} on process '
                         f'{self.it.process_index} (empty tars?)')
      return self.read(epoch + 1, 0, 0, 0)  # Only empty shards were left in this epoch.
    if size == 1:
      order = list(range(len(slots)))
    else:
      perm = _seq(self.it.seed, _TAG_WINDOW, self.index, epoch, window).permutation(size)
      order = perm[perm < len(slots)].tolist()
    ended = nshard >= len(self.host_shards(epoch))
    nxt = (epoch + 1, 0, 0, 0) if ended else (epoch, window + 1, nshard, noffset)
    return _Window((epoch, window, shard, offset), slots, order, nxt)

  def reset(self, start: tuple, emitted: int) -> None:
    self.win, self.emitted, self._start, self._future = None, emitted, tuple(start), None

  def _load(self, start: tuple) -> None:
    if self._future is not None and self._future_start == start:
      self.win = self._future.result()
    else:
      self.win = self.read(*start)
    self._future = None
    if self.it._reader is not None:  # pylint: disable=protected-access
      self._future_start = self.win.next
      self._future = self.it._reader.submit(self.read, *self.win.next)  # pylint: disable=protected-access

  def take(self) -> tuple[_Slot, dict]:
    """The next slot, and this source's state after it."""
    if self.win is None:
      self._load(self._start)
      if self.emitted > len(self.win.order):
        raise ValueError(f'shard state does not match the data: window {self.win.start} of '
                         f'source {self.index} has {len(self.win.order)} samples, '
                         f'state says {self.emitted} emitted')
    if self.emitted == len(self.win.order):
      self._load(self.win.next)
      self.emitted = 0
    slot = self.win.slots[self.win.order[self.emitted]]
    self.emitted += 1
    if self.emitted == len(self.win.order):
      after = self.win.next + (0,)
    else:
      after = self.win.start + (self.emitted,)
    return slot, dict(zip(_SOURCE_FIELDS, after))


# ----------------------------------------------------------------------------- iterator


def _stack(examples: list[dict]) -> dict:
  keys = list(examples[0])
  if any(set(e) != set(keys) for e in examples):
    raise ValueError(f'example_fn returned different keys: {sorted({tuple(e) for e in examples})}')
  out = {}
  for k in keys:
    values = [e[k] for e in examples]
    if isinstance(values[0], (str, bytes)):
      out[k] = np.array(values, dtype=object)
    else:
      out[k] = np.stack([np.asarray(v) for v in values])
  return out


class ShardIterator:
  """Infinite iterator of batches (dicts of numpy arrays [batch_size, ...]) of
  `example_fn(sample, rng)` over the shards of `spec`; see the module docstring."""

  def __init__(self, spec, *, seed, process_index, process_count, batch_size, example_fn,
               weights=None, shuffle_buffer=1000, num_threads=8, num_samples=None):
    check_shards(spec, weights)
    self.spec, self.seed = spec, int(seed)
    self.process_index, self.process_count = int(process_index), int(process_count)
    self.batch_size, self.example_fn = int(batch_size), example_fn
    self.shuffle_buffer, self.num_threads = int(shuffle_buffer), int(num_threads)
    self.num_samples = num_samples
    if not 0 <= self.process_index < self.process_count:
      raise ValueError(f'process_index={process_index} not in [0, {process_count})')
    if self.batch_size <= 0 or self.shuffle_buffer < 0 or self.num_threads < 0:
      raise ValueError(f'batch_size={batch_size} must be > 0, shuffle_buffer={shuffle_buffer} '
                       f'and num_threads={num_threads} >= 0')
    if num_samples is not None and num_samples <= 0:
      raise ValueError(f'num_samples={num_samples} must be > 0')
    paths = expand_shards(spec)
    for s, p in enumerate(paths):
      if len(p) < self.process_count:
        raise ShardError(f'source {s} ({spec.split("::")[s].strip()}) has {len(p)} shards, '
                         f'fewer than the {self.process_count} processes')
    self._cum = np.cumsum(_weights(weights, len(paths)))
    self._cum[-1] = 1.0
    self._u = (None, None)
    if self.num_threads:
      self._pool = futures.ThreadPoolExecutor(self.num_threads, 'shards-decode')
      self._reader = futures.ThreadPoolExecutor(1, 'shards-read')
    else:
      self._pool = self._reader = None
    self._sources = [_Source(self, s, p) for s, p in enumerate(paths)]
    self._pending = collections.deque()
    self.set_state({'position': 0, 'skipped': 0,
                    'sources': [dict.fromkeys(_SOURCE_FIELDS, 0) for _ in paths]},
                   _check=False)

  # -- state

  def get_state(self) -> dict:
    return {'version': STATE_VERSION, 'position': self._position, 'skipped': self.skipped,
            'process_index': self.process_index, 'process_count': self.process_count,
            'shuffle_buffer': self.shuffle_buffer,
            'num_shards': [len(s.paths) for s in self._sources],
            'sources': [dict(s) for s in self._states]}

  def set_state(self, state: dict, *, _check: bool = True) -> None:
    if _check:
      mine = self.get_state()
      for k in ('version', 'process_index', 'process_count', 'shuffle_buffer', 'num_shards'):
        if state.get(k) != mine[k]:
          raise ValueError(f'shard iterator state has {k}={state.get(k)!r}, this iterator '
                           f'{mine[k]!r}: it was saved for other shards / settings')
    for fut in self._pending:
      fut[-1].cancel()
    self._pending.clear()
    self._states = [{k: int(s[k]) for k in _SOURCE_FIELDS} for s in state['sources']]
    for src, s in zip(self._sources, self._states):
      src.reset(tuple(s[k] for k in _SOURCE_FIELDS[:4]), s['emitted'])
    self._position = self._draw_t = int(state['position'])
    self.skipped = int(state['skipped'])
    self._run = 0  # consecutive skips

  @property
  def epoch_fraction(self) -> float | None:
    if not self.num_samples:
      return None
    return self._position * self.process_count / self.num_samples

  # -- stream

  def _pick(self, t: int) -> int:
    if len(self._sources) == 1:
      return 0
    block = t // _MIX_BLOCK
    if self._u[0] != block:
      self._u = (block, _seq(self.seed, _TAG_MIX, block).random(_MIX_BLOCK))
    return min(int(np.searchsorted(self._cum, self._u[1][t % _MIX_BLOCK], side='right')),
               len(self._sources) - 1)

  def _decode(self, t: int, slot: _Slot):
    if slot.error is not None:
      return None, slot.error
    try:
      example = self.example_fn(slot.sample, _seq(self.seed, _TAG_EXAMPLE, self.process_index, t))
    except Exception as e:  # pylint: disable=broad-except  (corrupt image)
      return None, f'{type(e).__name__}: {e}'
    return example, None

  def _draw(self):
    t = self._draw_t
    s = self._pick(t)
    slot, after = self._sources[s].take()
    self._draw_t += 1
    return t, s, slot, after

  def _next_decoded(self):
    if self._pool is None:
      t, s, slot, after = self._draw()
      return t, s, slot, after, self._decode(t, slot)
    while len(self._pending) < 2 * self.batch_size:
      t, s, slot, after = self._draw()
      self._pending.append((t, s, slot, after, self._pool.submit(self._decode, t, slot)))
    t, s, slot, after, fut = self._pending.popleft()
    return t, s, slot, after, fut.result()

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = []
    while len(batch) < self.batch_size:
      t, s, slot, after, (example, error) = self._next_decoded()
      self._states[s], self._position = after, t + 1
      if error is None:
        batch.append(example)
        self._run = 0
        continue
      self.skipped += 1
      self._run += 1
      log.warning('shards: skipped sample %r of %s: %s', slot.key, slot.url, error)
      if self._run > MAX_CONSECUTIVE_SKIPS:
        raise ShardError(f'{self._run} samples in a row skipped (last: {slot.key!r} of '
                         f'{slot.url}: {error}); the shards are unusable')
    return _stack(batch)

  def close(self) -> None:
    """Stops the threads (the iterator is unusable afterwards)."""
    for pool in (self._pool, self._reader):
      if pool is not None:
        pool.shutdown(wait=False, cancel_futures=True)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

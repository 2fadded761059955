"""Offline caption tokenizer: a word-level (or character-level) vocabulary trained from captions.

For the embedded image-caption data and the tests, where open_clip's BPE vocabulary (a
download) is neither available nor needed. Text is lowercased and split on anything that is
not [a-z0-9]. Ids:
  0 = pad, 1 = unk, 2 = sot (start of text), 3 .. V-2 = words, V-1 = eot (end of text).
EOT is the LARGEST id, as in OpenAI CLIP / open_clip, so the text tower finds it with
argmax(tokens, axis=-1). Words are ordered by frequency (descending), then alphabetically:
training on the same captions always gives the same ids, whatever their order.

  tok = Tokenizer.train(captions, context_length=16)
  tokens = tok.encode(['a red square'])   # np.int32 [1, 16]: sot a red square eot 0 ...
  tok.save(path); Tokenizer.load(path)    # JSON, never pickle
"""
import collections
import json
import re
from typing import Iterable, Optional, Sequence

import numpy as np

PAD, UNK, SOT = 0, 1, 2
_SPECIALS = ('<pad>', '<unk>', '<sot>')  # eot is appended after the words
_FORMAT = 'jax_transfer.tokenizer/v1'
_LEVELS = ('word', 'char')


def _split(text: str, level: str) -> list[str]:
  words = re.findall(r'[a-z0-9]+', text.lower())
  return words if level == 'word' else list(' '.join(words))


class Tokenizer:
  """Fixed vocabulary `words` (ids 3 .. 2 + len(words)); see the module docstring."""

  def __init__(self, words: Sequence[str], context_length: int, level: str = 'word'):
    if level not in _LEVELS:
      raise ValueError(f'Unknown level {level!r}; allowed: {", ".join(_LEVELS)}')
    if context_length < 2:
      raise ValueError(f'context_length must be >= 2 (sot and eot), got {context_length}')
    if len(set(words)) != len(words):
      raise ValueError('duplicate words in the vocabulary')
    self.words = list(words)
    self.context_length = int(context_length)
    self.level = level
    self._ids = {w: i + len(_SPECIALS) for i, w in enumerate(self.words)}

  @classmethod
  def train(cls, captions: Iterable[str], vocab_size: Optional[int] = None,
            context_length: int = 32, level: str = 'word') -> 'Tokenizer':
    """Vocabulary of the most frequent words; vocab_size counts the 4 special ids too
    (None: every word seen)."""
    if level not in _LEVELS:
      raise ValueError(f'Unknown level {level!r}; allowed: {", ".join(_LEVELS)}')
    counts = collections.Counter(w for c in captions for w in _split(c, level))
    words = sorted(counts, key=lambda w: (-counts[w], w))
    if vocab_size is not None:
      if vocab_size < len(_SPECIALS) + 1:
        raise ValueError(f'vocab_size must be >= {len(_SPECIALS) + 1}, got {vocab_size}')
      words = words[:vocab_size - len(_SPECIALS) - 1]
    return cls(words, context_length, level)

  @property
  def vocab_size(self) -> int:
    return len(_SPECIALS) + len(self.words) + 1

  @property
  def eot(self) -> int:
    return self.vocab_size - 1

  def encode(self, texts: Sequence[str]) -> np.ndarray:
    """texts -> np.int32 [N, context_length]: sot, ids..., eot, 0-padding. Long texts are cut
    so that eot stays, at the last position."""
    if isinstance(texts, str):
      raise TypeError('encode takes a list of strings')
    out = np.zeros((len(texts), self.context_length), np.int32)
    for row, text in zip(out, texts):
      ids = [self._ids.get(w, UNK) for w in _split(text, self.level)]
      ids = [SOT] + ids[:self.context_length - 2] + [self.eot]
      row[:len(ids)] = ids
    return out

  def decode(self, tokens) -> list[str]:
    """[N, L] ids -> texts (words joined by spaces; unknown words as '<unk>'); stops at eot."""
    vocab = list(_SPECIALS) + self.words
    texts = []
    for row in np.asarray(tokens):
      pieces = []
      for i in row.tolist():
        if i == self.eot:
          break
        if i not in (PAD, SOT):
          pieces.append(vocab[i])
      texts.append((' ' if self.level == 'word' else '').join(pieces))
    return texts

  def to_dict(self) -> dict:
    return {'format': _FORMAT, 'level': self.level, 'context_length': self.context_length,
            'words': self.words}

  def save(self, path: str) -> None:
    with open(path, 'w') as f:
      json.dump(self.to_dict(), f, indent=0)

  @classmethod
  def load(cls, path: str) -> 'Tokenizer':
    with open(path) as f:
      d = json.load(f)
    if d.get('format') != _FORMAT:
      raise ValueError(f'{path}: not a {_FORMAT} file (format={d.get("format")!r})')
    return cls(d['words'], d['context_length'], d['level'])

  def __eq__(self, other) -> bool:
    return isinstance(other, Tokenizer) and self.to_dict() == other.to_dict()

  def __repr__(self) -> str:
    return (f'Tokenizer(level={self.level!r}, vocab_size={self.vocab_size}, '
            f'context_length={self.context_length})')

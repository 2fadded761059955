"""Text tokenizers: an offline word-level vocabulary trained from captions (`Tokenizer`), and the
published tokenizers of CLIP / SigLIP / SigLIP 2 checkpoints read from their own files
(`PretrainedTokenizer`).

Every tokenizer offers the same interface:
  encode(texts) -> np.int32 [N, context_length]   (a str is a TypeError: pass a list)
  vocab_size, context_length, eot (id or None), pad_id, save(path)
and `load_tokenizer(path)` reads back either kind (it dispatches on the JSON's 'format').
Files are JSON, a SentencePiece protobuf or gzip text: nothing is ever read with pickle.

## Tokenizer (format 'jax_transfer.tokenizer/v1', one JSON file)

For the embedded image-caption data and the tests, where a published vocabulary is neither
available nor needed. Text is lowercased and split on anything that is not [a-z0-9]. Ids:
  0 = pad, 1 = unk, 2 = sot (start of text), 3 .. V-2 = words, V-1 = eot (end of text).
EOT is the LARGEST id, as in OpenAI CLIP / open_clip, so the text tower finds it with
argmax(tokens, axis=-1). Words are ordered by frequency (descending), then alphabetically:
training on the same captions always gives the same ids, whatever their order.

  tok = Tokenizer.train(captions, context_length=16)
  tokens = tok.encode(['a red square'])   # np.int32 [1, 16]: sot a red square eot 0 ...
  tok.save(path); Tokenizer.load(path)    # JSON, never pickle

## PretrainedTokenizer (format 'jax_transfer.tokenizer/pretrained-v1', a spec + one asset)

A checkpoint's own tokenizer file run by the library made for it, plus the rules of its model
family (see PretrainedTokenizer and FAMILIES):

  tok = PretrainedTokenizer.from_file('bpe_simple_vocab_16e6.txt.gz')   # family 'clip'
  tok = PretrainedTokenizer.from_hf_dir('siglip-base-patch16-224/')     # family from its config
  tok.save(workdir + '/tokenizer.json')   # the spec, plus tokenizer_asset.* beside it
  load_tokenizer(workdir + '/tokenizer.json')
"""
import collections
import dataclasses
import functools
import gzip
import hashlib
import html
import json
import logging
import os
import re
import string
import unicodedata
from typing import Iterable, Optional, Sequence, Union

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

  @property
  def pad_id(self) -> int:
    return PAD

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
    """A file `save` wrote (for a PretrainedTokenizer's spec too, use load_tokenizer)."""
    d = _read_spec(path, _FORMAT)
    return cls(d['words'], d['context_length'], d['level'])

  def __eq__(self, other) -> bool:
    return isinstance(other, Tokenizer) and self.to_dict() == other.to_dict()

  def __repr__(self) -> str:
    return (f'Tokenizer(level={self.level!r}, vocab_size={self.vocab_size}, '
            f'context_length={self.context_length})')


# ---------------------------------------------------------------------------------------------
# Published tokenizers: a checkpoint's own file, run by the library made for it.

_PRETRAINED_FORMAT = 'jax_transfer.tokenizer/pretrained-v1'
# The asset file `save` writes beside the spec, by backend (checkpoint.ASSET_FILES lists them,
# so an export carries them).
ASSET_NAMES = {'hf': 'tokenizer_asset.json', 'sentencepiece': 'tokenizer_asset.model',
               'openai_bpe': 'tokenizer_asset.txt.gz'}
BACKENDS = tuple(ASSET_NAMES)
CLEANINGS = ('whitespace', 'canonicalize', 'none')
TRUNCATIONS = ('keep_eot', 'cut')
SpecialToken = Union[int, str, None]  # an id, or a token string looked up in the vocabulary


@dataclasses.dataclass(frozen=True)
class Family:
  """The rules of one model family and the backend its file needs (see PretrainedTokenizer)."""
  backend: str
  context_length: int
  lowercase: bool
  clean: str
  sot_id: SpecialToken
  eot_id: SpecialToken
  pad_id: SpecialToken
  truncation: str = 'keep_eot'


FAMILIES = {
    # OpenAI CLIP / open_clip `tokenize`.
    'clip': Family('openai_bpe', 77, True, 'whitespace', '<|startoftext|>', '<|endoftext|>', 0),
    # HF CLIPTokenizer(Fast): its tokenizer.json normalises (NFC, whitespace, lowercase) itself.
    'hf_clip': Family('hf', 77, False, 'none', '<|startoftext|>', '<|endoftext|>',
                      '<|endoftext|>'),
    # HF SiglipTokenizer (big_vision SigLIP, T5 SentencePiece vocabulary).
    'siglip': Family('sentencepiece', 64, True, 'canonicalize', None, '</s>', '</s>'),
    # HF Siglip2Tokenizer / Siglip2Processor (Gemma vocabulary).
    'siglip2': Family('hf', 64, True, 'none', None, '<eos>', '<pad>'),
}
# A Hugging Face tokenizer_config.json's tokenizer_class (without 'Fast') -> family; without
# one, config.json's model_type.
HF_TOKENIZER_CLASSES = {'CLIPTokenizer': 'hf_clip', 'SiglipTokenizer': 'siglip',
                        'GemmaTokenizer': 'siglip2', 'Siglip2Tokenizer': 'siglip2'}
HF_MODEL_TYPES = {'clip': 'hf_clip', 'siglip': 'siglip', 'siglip2': 'siglip2'}
_RULES = tuple(f.name for f in dataclasses.fields(Family) if f.name != 'backend')


def _choice(name: str, value, allowed) -> None:
  if value not in allowed:
    raise ValueError(f'Unknown {name} {value!r}; allowed: {", ".join(map(str, allowed))}')


def _read_bytes(path: str, what: str) -> bytes:
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such {what} file')
  with open(path, 'rb') as f:
    return f.read()


def _read_json(path: str, what: str = 'tokenizer') -> dict:
  """A JSON object from `path`, with an error naming the file when it is anything else."""
  data = _read_bytes(path, what)
  try:
    d = json.loads(data.decode('utf-8'))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f'{path}: not a JSON {what} file ({e})') from None
  if not isinstance(d, dict):
    raise ValueError(f'{path}: not a JSON {what} file (a {type(d).__name__}, not an object)')
  return d


def _read_spec(path: str, fmt: str) -> dict:
  """The JSON at `path`, which must be of format `fmt` (the other one's error says so)."""
  d = _read_json(path)
  if d.get('format') != fmt:
    kind = {_FORMAT: 'Tokenizer', _PRETRAINED_FORMAT: 'PretrainedTokenizer'}.get(d.get('format'))
    hint = f'; it is a {kind} file: read it with tokenizer.load_tokenizer' if kind else ''
    raise ValueError(f'{path}: not a {fmt} file (format={d.get("format")!r}){hint}')
  return d


# Text cleaning, before the backend (lowercasing is the backend's: see PretrainedTokenizer).

@functools.lru_cache(maxsize=None)
def _ftfy():
  try:
    import ftfy
  except ImportError:
    logging.warning('ftfy is not installed: OpenAI CLIP text cleaning falls back to NFC '
                    'normalisation (no mojibake / curly-quote / ligature / full-width fixes)')
    return None
  return ftfy


def _clean_whitespace(text: str) -> str:
  """OpenAI CLIP's basic_clean + whitespace_clean: ftfy.fix_text, HTML entities decoded twice,
  whitespace runs collapsed to one space, stripped."""
  ftfy = _ftfy()
  text = ftfy.fix_text(text) if ftfy else unicodedata.normalize('NFC', text)
  return ' '.join(html.unescape(html.unescape(text)).split())


_PUNCTUATION = str.maketrans('', '', string.punctuation)


def _clean_canonicalize(text: str) -> str:
  """HF SiglipTokenizer.canonicalize_text (after big_vision): ASCII punctuation removed,
  whitespace runs collapsed to one space, stripped. (big_vision and open_clip also turn '_'
  into a space first; HF, the reference here, removes it.)"""
  return re.sub(r'\s+', ' ', text.translate(_PUNCTUATION)).strip()


_CLEAN_FNS = {'whitespace': _clean_whitespace, 'canonicalize': _clean_canonicalize,
              'none': lambda text: text}


# Backends: cleaned texts -> content ids (no special tokens), and the vocabulary.

class _TokenizersBackend:
  """A `tokenizers.Tokenizer` (a HF tokenizer.json, or OpenAI's merges built into one)."""

  def __init__(self, tok, python_lowercase: bool):
    tok.no_padding()
    tok.no_truncation()
    self._tok, self._lower = tok, python_lowercase

  def encode(self, texts: list[str]) -> list[list[int]]:
    if self._lower:
      texts = [t.lower() for t in texts]
    return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

  def token_to_id(self, token: str) -> Optional[int]:
    return self._tok.token_to_id(token)

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)


def _hf_backend(data: bytes, path: str, lowercase: bool) -> _TokenizersBackend:
  """A Hugging Face tokenizer.json, as HF's tokenizers run it. Lowercasing is prepended to
  its normalizer (as HF's Siglip2Tokenizer does), not done in Python."""
  import tokenizers
  try:
    tok = tokenizers.Tokenizer.from_str(data.decode('utf-8'))
  except Exception as e:  # tokenizers raises a bare Exception for a malformed file
    raise ValueError(f'{path}: not a Hugging Face tokenizer.json ({e})') from None
  if lowercase:
    norm = tok.normalizer
    lower = tokenizers.normalizers.Lowercase()
    tok.normalizer = lower if norm is None else tokenizers.normalizers.Sequence([lower, norm])
  return _TokenizersBackend(tok, python_lowercase=False)


# OpenAI CLIP's BPE (CLIP/simple_tokenizer.py, open_clip/tokenizer.py), as HF's CLIPTokenizer
# builds it in `tokenizers`: the bpe merges, byte-level characters with '</w>' ending a word.
_CLIP_PATTERN = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|"""
                 r"""[\p{N}]|[^\s\p{L}\p{N}]+""")
_CLIP_SPECIALS = ('<|startoftext|>', '<|endoftext|>')
_CLIP_MERGES = 49152 - 256 - 2  # the merges OpenAI keeps (after the '#version' line): 48894


def _bytes_to_unicode() -> dict[int, str]:
  """OpenAI's byte -> printable character table (GPT-2's): printable latin-1 bytes map to
  themselves, the others to chr(256 + n)."""
  bs = (list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) +
        list(range(ord('®'), ord('ÿ') + 1)))
  cs, n = bs[:], 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


def _openai_bpe_backend(data: bytes, path: str, lowercase: bool) -> _TokenizersBackend:
  """OpenAI's bpe_simple_vocab_16e6.txt.gz as a `tokenizers` BPE model: 49408 ids = 256 byte
  characters, the same with '</w>', 48894 merges, <|startoftext|>, <|endoftext|>. Texts are
  split with OpenAI's regex, then byte-level mapped; merging is the tokenizers library's."""
  from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers
  try:
    lines = gzip.decompress(data).decode('utf-8').split('\n')
  except (OSError, EOFError, UnicodeDecodeError) as e:
    raise ValueError(f'{path}: not a gzipped BPE merges file ({e})') from None
  merges = [tuple(line.split()) for line in lines[1:_CLIP_MERGES + 1]]
  if len(merges) != _CLIP_MERGES or any(len(m) != 2 for m in merges):
    raise ValueError(f"{path}: not OpenAI CLIP's bpe_simple_vocab_16e6.txt.gz (expected a "
                     f"version line and {_CLIP_MERGES} 'a b' merges)")
  chars = list(_bytes_to_unicode().values())
  vocab = chars + [c + '</w>' for c in chars] + [a + b for a, b in merges] + list(_CLIP_SPECIALS)
  ids = {t: i for i, t in enumerate(vocab)}
  if len(ids) != len(vocab):
    raise ValueError(f'{path}: the merges make duplicate tokens')
  tok = Tokenizer(models.BPE(ids, merges, continuing_subword_prefix='', end_of_word_suffix='</w>',
                             unk_token=_CLIP_SPECIALS[1], fuse_unk=False))
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(_CLIP_PATTERN), behavior='removed', invert=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False)])
  tok.add_special_tokens([AddedToken(t, special=True) for t in _CLIP_SPECIALS])
  return _TokenizersBackend(tok, python_lowercase=lowercase)


class _SentencePieceBackend:
  """A SentencePiece model, run as HF's SiglipTokenizer runs it: the text is marked with a
  leading '▁' (its own '▁' become spaces) and encoded behind the unk piece, which is then
  dropped, so the first word always gets its word-start piece whatever the model's
  add_dummy_prefix. Lowercasing is Python's, as SiglipTokenizer's."""

  def __init__(self, data: bytes, path: str, lowercase: bool):
    import sentencepiece
    self._sp = sentencepiece.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(data)
    except (RuntimeError, OSError) as e:
      raise ValueError(f'{path}: not a SentencePiece model ({e})') from None
    self._prefix = self._sp.id_to_piece(self._sp.unk_id())
    self._skip = len(self._sp.encode(self._prefix))
    self._lower = lowercase

  def encode(self, texts: list[str]) -> list[list[int]]:
    if self._lower:
      texts = [t.lower() for t in texts]
    batch = self._sp.encode([self._prefix + '▁' + t.replace('▁', ' ') for t in texts])
    return [ids[self._skip:] if len(ids) >= self._skip else ids for ids in batch]

  def token_to_id(self, token: str) -> Optional[int]:
    i = self._sp.piece_to_id(token)
    return i if self._sp.id_to_piece(i) == token else None

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()


_BACKEND_FNS = {'hf': _hf_backend, 'sentencepiece': _SentencePieceBackend,
                'openai_bpe': _openai_bpe_backend}
def _hf_json_rules(path: str) -> tuple[set, dict]:
  """A HF tokenizer.json's special tokens (its added_tokens), and the rules it fixes itself:
  sot_id / eot_id from its post-processor ([bos] $A [eos]: transformers 5 follows it, and
  drops tokenizer_config's add_bos_token / add_eos_token, when a tokenizer.json exists) and
  pad_id from its padding section; {} for what it leaves out."""
  d = _read_json(path, 'Hugging Face tokenizer.json')
  specials = {t.get('content') for t in d.get('added_tokens') or () if isinstance(t, dict)}
  rules = {}
  pp = d.get('post_processor') or {}
  for proc in pp.get('processors') or () if pp.get('type') == 'Sequence' else (pp,):
    try:
      if proc.get('type') in ('RobertaProcessing', 'BertProcessing'):
        rules = {'sot_id': int(proc['cls'][1]), 'eot_id': int(proc['sep'][1])}
      elif proc.get('type') == 'TemplateProcessing':
        single = proc['single']
        names = [item['SpecialToken']['id'] if 'SpecialToken' in item else None for item in single]
        seq = names.index(None) if names.count(None) == 1 else -1  # where $A stands
        if not (0 <= seq <= 1 and len(names) - seq <= 2):
          raise ValueError(f'{path}: post_processor template {names} is not [bos] $A [eos]')
        ids = {n: proc['special_tokens'][n]['ids'] for n in names if n is not None}
        if any(len(i) != 1 for i in ids.values()):
          raise ValueError(f'{path}: a post_processor special token is not one id: {ids}')
        rules = {'sot_id': ids[names[0]][0] if seq == 1 else None,
                 'eot_id': ids[names[-1]][0] if len(names) - seq == 2 else None}
    except (KeyError, IndexError, TypeError, AttributeError) as e:
      raise ValueError(f'{path}: unreadable post_processor ({e!r})') from None
  pad = (d.get('padding') or {}).get('pad_id')
  if isinstance(pad, int):
    rules['pad_id'] = pad
  return specials, rules


class PretrainedTokenizer:
  """A published checkpoint's tokenizer: its own file, read by the library made for it
  (`backend`), and its family's rules around it. Ids equal the reference library's.

  Backends (the asset file):
    'hf'             a Hugging Face tokenizer.json (`tokenizers.Tokenizer`).
    'sentencepiece'  a SentencePiece .model (`sentencepiece.SentencePieceProcessor`).
    'openai_bpe'     OpenAI CLIP's bpe_simple_vocab_16e6.txt.gz (open_clip ships it), built
                     into a `tokenizers` BPE model as HF's CLIPTokenizer does: 49408 ids.
  Rules (fields; FAMILIES holds the presets):
    context_length   every row is exactly this long.
    lowercase        'openai_bpe' / 'sentencepiece': Python's str.lower after cleaning (as
                     open_clip and SiglipTokenizer); 'hf': a tokenizers Lowercase normaliser
                     before the file's own (as Siglip2Tokenizer; the two differ only on a
                     few letters, e.g. the Greek final sigma).
    clean            'whitespace' (OpenAI: ftfy.fix_text, HTML unescape, whitespace
                     collapsed), 'canonicalize' (HF SiglipTokenizer / big_vision: ASCII
                     punctuation removed, whitespace collapsed), 'none'.
    sot_id, eot_id   start / end token ids, or None for none; the constructor also takes
                     token strings and looks them up in the file's vocabulary.
    pad_id           what fills the row after the text.
    truncation       'keep_eot': a long text's content is cut to make room, so sot and eot
                     always stand (open_clip; HF with truncation=True; big_vision's
                     eos='sticky'); 'cut': sot + content + eot is cut at context_length.
  A row is [sot] + content ids + [eot] + pad..., left-aligned.

  Families:
    'clip'     OpenAI CLIP / open_clip `tokenize` (openai_bpe): 'whitespace' cleaning,
               lowercase, sot 49406 first, eot 49407 last, pad 0, L=77. ftfy is used when
               installed; without it text is only NFC-normalised, so mojibake, curly quotes,
               ligatures and full-width forms are not fixed and may tokenise differently.
    'hf_clip'  HF CLIPTokenizer(Fast) tokenizer.json: the same ids as 'clip' (its own
               normaliser: NFC, whitespace, lowercase; no ftfy or HTML unescape, as HF) and
               HF's pad token (<|endoftext|> = 49407 for openai/clip-*, a repo's
               tokenizer_config may name another), so rows equal HF's padding='max_length'.
               The pad value does not change the features: the causal text tower pools at
               the first EOT (argmax; EOT is the largest id), which only sees what precedes.
    'siglip'   HF SiglipTokenizer (big_vision SigLIP, T5 SentencePiece): lowercase,
               'canonicalize', eos '</s>' appended, no sot, padded with '</s>' (id 1 in the
               English vocabulary) to L=64.
    'siglip2'  HF Siglip2Tokenizer / Siglip2Processor (Gemma tokenizer.json, byte fallback):
               lowercase (SigLIP 2 was trained on lowercased text; HF's plain GemmaTokenizer,
               which some siglip2 repos name, does not lowercase: pass lowercase=False to
               match it), no bos, eos '<eos>' (1) appended, padded with '<pad>' (0) to L=64.
  SigLIP's text tower is bidirectional, has no padding mask and pools the LAST position, so
  texts must be padded to the full 64 with the training pad id, on the right, exactly as here:
  a shorter or otherwise padded row gives other features. (In jax_transfer.models.text terms:
  'clip' / 'hf_clip' rows suit pool='argmax' (EOT is the largest id), SigLIP's pool='last'.)

  The 'hf' backend runs the tokenizer.json as written. transformers 5 rebuilds the normaliser
  and pre-tokeniser from its tokenizer class and keeps the file's vocabulary, merges and
  post-processor; for the files those classes write (CLIP, Gemma) the ids are the same.

  Special tokens written as text (e.g. '<|endoftext|>' in a caption) map to their ids in the
  'hf' and 'openai_bpe' backends, as in HF and OpenAI's code.

  The asset is read once and kept in memory. save(path) writes a small JSON spec at `path`
  (format, family, backend, the rules, the asset's name and sha256) and the asset, byte for
  byte, beside it as ASSET_NAMES[backend]; PretrainedTokenizer.load / load_tokenizer read them
  back, checking the sha256.
  """

  def __init__(self, asset_path: str, backend: str, *, context_length: int,
               lowercase: bool = False, clean: str = 'none', sot_id: SpecialToken = None,
               eot_id: SpecialToken = None, pad_id: SpecialToken = 0,
               truncation: str = 'keep_eot', family: Optional[str] = None):
    _choice('backend', backend, BACKENDS)
    _choice('clean', clean, CLEANINGS)
    _choice('truncation', truncation, TRUNCATIONS)
    if family is not None:
      _choice('family', family, FAMILIES)
    self.asset_path, self.backend, self.family = asset_path, backend, family
    self._asset = _read_bytes(asset_path, f'{backend} tokenizer asset')
    self._sha256 = hashlib.sha256(self._asset).hexdigest()
    self._backend = _BACKEND_FNS[backend](self._asset, asset_path, bool(lowercase))
    self.context_length, self.lowercase = int(context_length), bool(lowercase)
    self.clean, self.truncation = clean, truncation
    self.sot_id = self._special('sot_id', sot_id)
    self.eot_id = self._special('eot_id', eot_id)
    self.pad_id = self._special('pad_id', pad_id)
    if self.pad_id is None:
      raise ValueError('pad_id is required')
    n_special = (self.sot_id is not None) + (self.eot_id is not None)
    if self.context_length <= n_special:
      raise ValueError(f'context_length must be > {n_special} (the special tokens), got '
                       f'{self.context_length}')

  def _special(self, name: str, token: SpecialToken) -> Optional[int]:
    if token is None:
      return None
    if isinstance(token, str):
      i = self._backend.token_to_id(token)
      if i is None:
        raise ValueError(f'{self.asset_path}: {name} token {token!r} is not in the vocabulary')
      return int(i)
    i = int(token)
    if not 0 <= i < self.vocab_size:
      raise ValueError(f'{name}={i} is outside the vocabulary of {self.asset_path} '
                       f'({self.vocab_size} ids)')
    return i

  @classmethod
  def from_family(cls, family: str, asset_path: str, **rules) -> 'PretrainedTokenizer':
    """FAMILIES[family]'s rules, any of them replaced by `rules`, on `asset_path`."""
    _choice('family', family, FAMILIES)
    unknown = sorted(set(rules) - set(_RULES))
    if unknown:
      raise TypeError(f'Unknown rules {unknown}; allowed: {", ".join(_RULES)}')
    preset = FAMILIES[family]
    return cls(asset_path, preset.backend, family=family,
               **{**{r: getattr(preset, r) for r in _RULES}, **rules})

  @classmethod
  def from_file(cls, path: str, family: Optional[str] = None,
                **rules) -> 'PretrainedTokenizer':
    """A checkpoint's tokenizer file; the backend follows the name: *.json (a HF
    tokenizer.json), *.model (SentencePiece), *.gz (OpenAI's BPE merges). `family` defaults to
    'clip' for *.gz, 'siglip' for *.model and, for a tokenizer.json, 'hf_clip' or 'siglip2'
    by its special tokens; a tokenizer.json's post-processor and padding give sot / eot / pad
    (as in transformers 5). `rules` replace the family's (e.g. context_length=64)."""
    name = os.path.basename(path).lower()
    backend = ('hf' if name.endswith('.json') else 'sentencepiece' if name.endswith('.model')
               else 'openai_bpe' if name.endswith('.gz') else None)
    if backend is None:
      raise ValueError(f'{path}: cannot tell the tokenizer format from the name: expected a '
                       'tokenizer.json (Hugging Face), *.model (SentencePiece) or *.txt.gz '
                       '(OpenAI CLIP BPE)')
    specials, derived = _hf_json_rules(path) if backend == 'hf' else (set(), {})
    if family is None:
      family = {'openai_bpe': 'clip', 'sentencepiece': 'siglip'}.get(backend)
    if family is None:
      found = [f for f, t in (('hf_clip', '<|endoftext|>'), ('siglip2', '<eos>')) if t in specials]
      if len(found) != 1:
        raise ValueError(f'{path}: cannot tell the family of this tokenizer.json by its '
                         "special tokens; pass family='hf_clip' or 'siglip2'")
      family = found[0]
    _choice('family', family, FAMILIES)
    if FAMILIES[family].backend != backend:
      raise ValueError(f'{path}: family {family!r} reads a {FAMILIES[family].backend} file, '
                       f'not a {backend} one')
    return cls.from_family(family, path, **{**derived, **rules})

  @classmethod
  def from_hf_dir(cls, path: str, family: Optional[str] = None,
                  **rules) -> 'PretrainedTokenizer':
    """A Hugging Face model directory: tokenizer.json, or spiece.model / tokenizer.model for
    SentencePiece, with tokenizer_config.json / special_tokens_map.json (both optional).
      family          from tokenizer_class: CLIPTokenizer(Fast) -> 'hf_clip', SiglipTokenizer
                      -> 'siglip', GemmaTokenizer(Fast) / Siglip2Tokenizer -> 'siglip2'.
      sot_id, eot_id  a tokenizer.json's post-processor, as transformers 5 (which then
                      ignores add_bos_token / add_eos_token); without one, the family's, with
                      the config's bos_token / eos_token (and, for 'siglip2', its
                      add_bos_token / add_eos_token, as transformers 4 did).
      pad_id          the config's pad_token, else the tokenizer.json's padding, else the
                      family's.
      context_length  model_max_length when set (HF writes ~1e30 for unset), else the family's.
      lowercase       do_lower_case for SentencePiece (SiglipTokenizer), else the family's.
    Padding is always on the right (padding_side='left' is warned about and ignored). `rules`
    override everything."""
    if not os.path.isdir(path):
      raise FileNotFoundError(f'{path}: not a directory (expected a Hugging Face model dir)')
    config, special = ({} if not os.path.exists(p) else _read_json(p, os.path.basename(p))
                       for p in (os.path.join(path, 'tokenizer_config.json'),
                                 os.path.join(path, 'special_tokens_map.json')))
    if family is None:
      cls_name = str(config.get('tokenizer_class') or '')
      family = HF_TOKENIZER_CLASSES.get(cls_name.removesuffix('Fast'))
      if cls_name and family is None:
        raise ValueError(f'{path}: tokenizer_config.json names tokenizer_class {cls_name!r}, '
                         f'none of {", ".join(HF_TOKENIZER_CLASSES)}; pass family=')
      model_config = os.path.join(path, 'config.json')
      if family is None and os.path.exists(model_config):
        family = HF_MODEL_TYPES.get(_read_json(model_config, 'config.json').get('model_type'))
      if family is None:
        raise ValueError(f'{path}: neither a tokenizer_class in tokenizer_config.json nor a '
                         f'model_type ({", ".join(HF_MODEL_TYPES)}) in config.json; pass '
                         'family=')
    _choice('family', family, FAMILIES)
    preset = FAMILIES[family]
    names = ['tokenizer.json'] if preset.backend == 'hf' else ['spiece.model', 'tokenizer.model']
    asset = next((os.path.join(path, n) for n in names if os.path.isfile(os.path.join(path, n))),
                 None)
    if asset is None:
      raise FileNotFoundError(f'{path}: a {family!r} tokenizer needs {" or ".join(names)}; the '
                              f'directory has {sorted(os.listdir(path))}')
    derived = _hf_json_rules(asset)[1] if preset.backend == 'hf' else {}

    def token(key: str) -> Optional[str]:
      value = config.get(key, special.get(key))
      value = value.get('content') if isinstance(value, dict) else value
      return value if isinstance(value, str) else None

    if 'eot_id' not in derived:  # no post-processor template
      for rule, key, flag in (('sot_id', 'bos_token', 'add_bos_token'),
                              ('eot_id', 'eos_token', 'add_eos_token')):
        wanted = getattr(preset, rule) is not None
        if family == 'siglip2':
          wanted = bool(config.get(flag, wanted))
        derived[rule] = (token(key) or getattr(preset, rule)) if wanted else None
        if wanted and derived[rule] is None:
          raise ValueError(f'{path}: {flag} is set but no {key} is named')
    if token('pad_token'):
      derived['pad_id'] = token('pad_token')
    max_len = config.get('model_max_length')
    if isinstance(max_len, int) and 0 < max_len <= 100_000:
      derived['context_length'] = max_len
    if preset.backend == 'sentencepiece' and 'do_lower_case' in config:
      derived['lowercase'] = bool(config['do_lower_case'])
    if config.get('padding_side') == 'left':
      logging.warning('%s: padding_side=left is ignored: rows are padded on the right (as '
                      'big_vision and open_clip)', path)
    return cls.from_family(family, asset, **{**derived, **rules})

  @property
  def vocab_size(self) -> int:
    return self._backend.vocab_size

  @property
  def eot(self) -> Optional[int]:
    return self.eot_id

  def encode(self, texts: Sequence[str]) -> np.ndarray:
    """texts -> np.int32 [N, context_length]: [sot] + ids + [eot], then pad_id (see the class
    docstring for cleaning and truncation)."""
    if isinstance(texts, str):
      raise TypeError('encode takes a list of strings')
    clean = _CLEAN_FNS[self.clean]
    contents = self._backend.encode([clean(t) for t in texts])
    out = np.full((len(contents), self.context_length), self.pad_id, np.int32)
    head = [] if self.sot_id is None else [self.sot_id]
    tail = [] if self.eot_id is None else [self.eot_id]
    room = self.context_length - len(head) - len(tail)
    for row, ids in zip(out, contents):
      if self.truncation == 'keep_eot':
        ids = head + ids[:room] + tail
      else:
        ids = (head + ids + tail)[:self.context_length]
      row[:len(ids)] = ids
    return out

  def to_dict(self) -> dict:
    return {'format': _PRETRAINED_FORMAT, 'family': self.family, 'backend': self.backend,
            'asset': ASSET_NAMES[self.backend], 'asset_sha256': self._sha256,
            **{r: getattr(self, r) for r in _RULES}}

  def save(self, path: str) -> None:
    """The spec at `path`, the asset beside it as ASSET_NAMES[backend] (overwritten)."""
    asset = os.path.join(os.path.dirname(os.path.abspath(path)), ASSET_NAMES[self.backend])
    if os.path.abspath(path) == asset:
      raise ValueError(f'{path}: that name is the asset file; save the spec under another')
    with open(asset, 'wb') as f:
      f.write(self._asset)
    with open(path, 'w') as f:
      json.dump(self.to_dict(), f, indent=1)

  @classmethod
  def load(cls, path: str) -> 'PretrainedTokenizer':
    """A spec `save` wrote, with its asset beside it."""
    d = _read_spec(path, _PRETRAINED_FORMAT)
    missing = [k for k in ('backend', 'asset_sha256') + _RULES if k not in d]
    if missing:
      raise ValueError(f'{path}: the tokenizer spec lacks {missing}')
    _choice('backend', d['backend'], BACKENDS)
    # The asset's name is fixed by the backend: never a path taken from the file.
    asset = os.path.join(os.path.dirname(os.path.abspath(path)), ASSET_NAMES[d['backend']])
    if not os.path.isfile(asset):
      raise FileNotFoundError(f'{asset}: missing; the tokenizer spec {path} needs its '
                              f'{d["backend"]} asset beside it')
    tok = cls(asset, d['backend'], family=d.get('family'), **{r: d[r] for r in _RULES})
    if tok._sha256 != d['asset_sha256']:
      raise ValueError(f'{asset}: not the asset {path} was saved with (sha256 differs: '
                       'another tokenizer saved into this directory?)')
    return tok

  def __getstate__(self) -> dict:  # for data-loader processes: the backend is rebuilt
    return {k: v for k, v in self.__dict__.items() if k != '_backend'}

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state)
    self._backend = _BACKEND_FNS[self.backend](self._asset, self.asset_path, self.lowercase)

  def __eq__(self, other) -> bool:
    return isinstance(other, PretrainedTokenizer) and self.to_dict() == other.to_dict()

  def __repr__(self) -> str:
    return (f'PretrainedTokenizer(family={self.family!r}, backend={self.backend!r}, '
            f'vocab_size={self.vocab_size}, context_length={self.context_length})')


def load_tokenizer(path: str) -> Union[Tokenizer, PretrainedTokenizer]:
  """Whatever Tokenizer.save or PretrainedTokenizer.save wrote at `path` (by its 'format')."""
  try:
    d = _read_json(path)
  except ValueError as e:
    raise ValueError(f'{e}; a published .model / .txt.gz / tokenizer.json is read with '
                     'PretrainedTokenizer.from_file') from None
  fmt = d.get('format')
  if fmt == _FORMAT:
    return Tokenizer.load(path)
  if fmt == _PRETRAINED_FORMAT:
    return PretrainedTokenizer.load(path)
  hint = ('; it looks like a Hugging Face tokenizer.json: read it with '
          'PretrainedTokenizer.from_file(path, family=...)' if 'model' in d else '')
  raise ValueError(f'{path}: unknown tokenizer format {fmt!r}; expected {_FORMAT!r} or '
                   f'{_PRETRAINED_FORMAT!r}{hint}')

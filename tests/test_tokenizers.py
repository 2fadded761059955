"""jax_transfer.tokenizer.PretrainedTokenizer against the reference libraries, offline.

Token ids must EQUAL the reference's, row for row, on CAPTIONS (case, punctuation,
apostrophes, numbers, accents, other scripts, emoji, HTML entities, odd whitespace, empty
strings and one caption longer than every context, so truncation happens):
  'clip'     open_clip's tokenizer module (OpenAI's SimpleTokenizer, `tokenize`) on the BPE
             file open_clip ships; its module is loaded from its file, open_clip's __init__
             is not run.
  'hf_clip'  transformers.CLIPTokenizer built from a vocab.json + merges.txt written from
             open_clip's vocabulary, padding='max_length', max_length=77, truncation.
  'siglip'   transformers.SiglipTokenizer on a SentencePiece model trained here (T5 layout:
             pad 0, eos 1, unk 2, no bos), padding='max_length', max_length=64, truncation.
  'siglip2'  transformers.Siglip2Tokenizer (what AutoTokenizer gives for siglip2) and
             GemmaTokenizer on a Gemma-style tokenizer.json (BPE, byte fallback) made here
             with `tokenizers`, with Siglip2Processor's padding='max_length', max_length=64.
Every reference is skipped (importorskip) when its library is absent; nothing is downloaded.
"""
import gzip
import importlib.util
import io
import json
import os
import pickle
import random
import sys

import numpy as np
import pytest

from jax_transfer import tokenizer as tk
from jax_transfer.tokenizer import PretrainedTokenizer, Tokenizer, load_tokenizer

LONG = " ".join(["A long caption, about many different things and places"] * 12)
CAPTIONS = [
    "a photo of a cat",
    "A Photo Of A CAT.",
    "Two dogs playing in the snow!",
    "it's a dog's life, isn't it?",
    "They're sure we'll win; I'd say you've WON, I'm told.",
    "rock 'n' roll",
    "room 101 has 3 beds and 24 chairs",
    "pi is about 3.14159, e is 2.718",
    "mixed123numbers456",
    "café, naïve, Über, señor",
    "Crème brûlée à la française",
    "ΟΔΟΣ στην Αθήνα",
    "İstanbul straße",
    "Москва — столица России",
    "東京タワーの写真",
    "🐶🐱 emoji party 🎉!!",
    "  extra   spaces\tand\ttabs\n newline  ",
    "",
    "   ",
    "under_score and hyphen-ated words",
    "“curly quotes” and ‘single’ ones",
    "fish &amp; chips &lt;3",
    "#hashtag @mention http://example.com/x?y=1",
    "ALL CAPS SHOUTING!!!",
    "...",
    "ﬁne ligature and ｆｕｌｌ ｗｉｄｔｈ",
    "e.g. i.e. etc.",
    "a ▁ lower one eighth block",
    LONG,
]
# Captions that OpenAI's cleaning (ftfy, HTML unescape, Python's str.lower with its Greek final
# sigma) and HF CLIPTokenizer's normaliser (NFC, per-character Lowercase) turn into different
# texts: 'clip' and 'hf_clip' ids differ on these only.
CLEANED_APART = {"“curly quotes” and ‘single’ ones", "fish &amp; chips &lt;3",
                 "ﬁne ligature and ｆｕｌｌ ｗｉｄｔｈ", "ΟΔΟΣ στην Αθήνα"}
_RNG = random.Random(0)
_SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "ta", "pho", "to", "cat", "dog", "re", "d", "blu",
              "ar", "e", "ci", "le", "bi", "g", "ll", "ing", "s", "é", "ï", "ü", "1", "2"]
_WORDS = sorted({w for c in CAPTIONS[:12] for w in c.lower().split()}) + [
    "".join(_RNG.choices(_SYLLABLES, k=_RNG.randint(1, 4))) for _ in range(400)]
TRAIN_TEXT = [" ".join(_RNG.choices(_WORDS, k=_RNG.randint(3, 12))) for _ in range(2000)]


def _check(tok, ref):
  """tok's ids on CAPTIONS equal `ref`, caption by caption; LONG was cut with its eot kept,
  last."""
  ours = tok.encode(CAPTIONS)
  assert ours.dtype == np.int32 and ours.shape == (len(CAPTIONS), tok.context_length)
  for text, a, b in zip(CAPTIONS, ours, np.asarray(ref)):
    assert a.tolist() == b.tolist(), text
  long_row = ours[CAPTIONS.index(LONG)].tolist()
  assert long_row[-1] == tok.eot and long_row.count(tok.eot) == 1


# ---------------------------------------------------------------------------------------------
# Assets and references (module fixtures: each is built once).

@pytest.fixture(scope="module")
def open_clip_tokenizer():
  """open_clip/tokenizer.py, loaded from its file (no open_clip __init__, no torchvision)."""
  for name in ("torch", "ftfy", "regex"):
    pytest.importorskip(name)
  spec = importlib.util.find_spec("open_clip")
  if spec is None or not spec.submodule_search_locations:
    pytest.skip("open_clip_torch is not installed")
  path = os.path.join(list(spec.submodule_search_locations)[0], "tokenizer.py")
  module_spec = importlib.util.spec_from_file_location("open_clip_tokenizer_ref", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def bpe_path(open_clip_tokenizer):
  return open_clip_tokenizer.default_bpe()


@pytest.fixture(scope="module")
def hf_clip_dir(open_clip_tokenizer, tmp_path_factory):
  """transformers.CLIPTokenizer from a vocab.json + merges.txt written from open_clip's
  vocabulary, saved (tokenizer.json + tokenizer_config.json) -> (tokenizer, dir)."""
  transformers = pytest.importorskip("transformers")
  simple = open_clip_tokenizer._tokenizer
  names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
  vocab = {names.get(k, k): v for k, v in simple.encoder.items()}
  merges = [" ".join(m) for m, _ in sorted(simple.bpe_ranks.items(), key=lambda kv: kv[1])]
  src, out = tmp_path_factory.mktemp("clip_vocab"), tmp_path_factory.mktemp("hf_clip")
  (src / "vocab.json").write_text(json.dumps(vocab))
  (src / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
  tok = transformers.CLIPTokenizer(vocab=str(src / "vocab.json"), merges=str(src / "merges.txt"),
                                   model_max_length=77)
  tok.save_pretrained(str(out))
  return tok, str(out)


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
  """A T5-layout SentencePiece model (pad 0, eos 1, unk 2, no bos) as spiece.model, with the
  tokenizer_config.json of google/siglip-* repos."""
  import sentencepiece
  model = io.BytesIO()
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(TRAIN_TEXT), model_writer=model, vocab_size=300,
      model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>",
      eos_piece="</s>", unk_piece="<unk>", hard_vocab_limit=False, minloglevel=2)
  path = tmp_path_factory.mktemp("siglip")
  (path / "spiece.model").write_bytes(model.getvalue())
  (path / "tokenizer_config.json").write_text(json.dumps({
      "tokenizer_class": "SiglipTokenizer", "eos_token": "</s>", "pad_token": "</s>",
      "unk_token": "<unk>", "model_max_length": 64, "do_lower_case": True}))
  return str(path)


def _gemma_dir(tmp_path_factory, template):
  """A Gemma-style tokenizer.json (BPE with byte fallback over <0x00>..<0xFF>, ' ' -> '▁';
  <pad> 0, <eos> 1, <bos> 2, <unk> 3, <mask> 4) whose post-processor is `template`, with the
  tokenizer_config.json of google/siglip2-* repos."""
  from tokenizers import Tokenizer as HFTokenizer, models, normalizers, pre_tokenizers
  from tokenizers import processors, trainers
  specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
  byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
  tok = HFTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
  tok.normalizer = normalizers.Replace(" ", "▁")
  tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
  tok.train_from_iterator([t.lower() for t in TRAIN_TEXT], trainers.BpeTrainer(
      vocab_size=600, special_tokens=specials + byte_tokens, show_progress=False))
  tok.post_processor = processors.TemplateProcessing(
      single=template, special_tokens=[("<eos>", 1), ("<bos>", 2)])
  d = json.loads(tok.to_str())
  d["added_tokens"] = [t for t in d["added_tokens"] if t["content"] in specials]  # bytes: vocab
  path = tmp_path_factory.mktemp("siglip2")
  (path / "tokenizer.json").write_text(json.dumps(d))
  (path / "tokenizer_config.json").write_text(json.dumps({
      "tokenizer_class": "GemmaTokenizer", "add_bos_token": False, "add_eos_token": True,
      "padding_side": "right", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
      "unk_token": "<unk>", "mask_token": "<mask>"}))
  return str(path)


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
  return _gemma_dir(tmp_path_factory, "$A <eos>")  # as GemmaTokenizerFast(add_eos=True) saves


def _hf_ids(tok, max_length):
  return tok(CAPTIONS, padding="max_length", max_length=max_length, truncation=True).input_ids


# ---------------------------------------------------------------------------------------------
# Parity with the reference libraries.

def test_clip_matches_open_clip(open_clip_tokenizer, bpe_path):
  ours = PretrainedTokenizer.from_file(bpe_path)
  assert (ours.family, ours.vocab_size, ours.context_length) == ("clip", 49408, 77)
  assert (ours.sot_id, ours.eot, ours.pad_id) == (49406, 49407, 0)
  assert ours.vocab_size == open_clip_tokenizer._tokenizer.vocab_size
  _check(ours, open_clip_tokenizer.tokenize(CAPTIONS).numpy())


def test_hf_clip_matches_transformers(hf_clip_dir, bpe_path):
  hf, path = hf_clip_dir
  ref = np.asarray(_hf_ids(hf, 77))
  assert hf.pad_token_id == 49407  # HF pads CLIP with <|endoftext|>; 'hf_clip' does too
  for ours in (PretrainedTokenizer.from_hf_dir(path),
               PretrainedTokenizer.from_file(os.path.join(path, "tokenizer.json"))):
    assert (ours.family, ours.vocab_size, ours.context_length) == ("hf_clip", 49408, 77)
    assert (ours.sot_id, ours.eot, ours.pad_id) == (49406, 49407, 49407)
    _check(ours, ref)
  # The same ids as 'clip' under open_clip's pad convention (0 after the first eot), except
  # where the two cleanings differ.
  clip = PretrainedTokenizer.from_file(bpe_path).encode(CAPTIONS)
  after_eot = np.cumsum(ref == 49407, axis=1) - (ref == 49407) > 0
  differ = {c for c, a, b in zip(CAPTIONS, np.where(after_eot, 0, ref), clip) if (a != b).any()}
  assert differ == CLEANED_APART


def test_siglip_matches_transformers(spm_dir):
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("google.protobuf")  # SiglipTokenizer requires it
  hf = transformers.SiglipTokenizer.from_pretrained(spm_dir)
  ref = _hf_ids(hf, 64)
  assert hf.pad_token_id == hf.eos_token_id == 1  # pad is '</s>', as in google/siglip-*
  for ours in (PretrainedTokenizer.from_hf_dir(spm_dir),
               PretrainedTokenizer.from_file(os.path.join(spm_dir, "spiece.model"))):
    assert (ours.family, ours.context_length, ours.sot_id, ours.eot, ours.pad_id) == (
        "siglip", 64, None, 1, 1)
    _check(ours, ref)


def test_siglip2_matches_transformers(gemma_dir):
  transformers = pytest.importorskip("transformers")
  siglip2 = transformers.Siglip2Tokenizer.from_pretrained(gemma_dir)  # lowercases
  gemma = transformers.GemmaTokenizer.from_pretrained(gemma_dir)  # does not
  ours = PretrainedTokenizer.from_hf_dir(gemma_dir)
  assert (ours.family, ours.context_length, ours.sot_id, ours.eot, ours.pad_id) == (
      "siglip2", 64, None, 1, 0)
  _check(ours, _hf_ids(siglip2, 64))
  path = os.path.join(gemma_dir, "tokenizer.json")
  _check(PretrainedTokenizer.from_file(path), _hf_ids(siglip2, 64))
  _check(PretrainedTokenizer.from_file(path, lowercase=False), _hf_ids(gemma, 64))


def test_siglip2_follows_the_tokenizer_json_template(tmp_path_factory):
  """transformers 5 takes bos / eos from tokenizer.json's post-processor, not from
  tokenizer_config's add_bos_token / add_eos_token: so does from_hf_dir."""
  transformers = pytest.importorskip("transformers")
  path = _gemma_dir(tmp_path_factory, "<bos> $A <eos>")
  ours = PretrainedTokenizer.from_hf_dir(path)
  assert (ours.sot_id, ours.eot) == (2, 1)
  ref = _hf_ids(transformers.Siglip2Tokenizer.from_pretrained(path), 64)
  _check(ours, ref)


# ---------------------------------------------------------------------------------------------
# Rules, saving and loading.

def test_rules_and_truncation(spm_dir):
  path = os.path.join(spm_dir, "spiece.model")
  keep = PretrainedTokenizer.from_file(path, context_length=8).encode([LONG, ""])
  cut = PretrainedTokenizer.from_file(path, context_length=8, truncation="cut").encode([LONG])
  assert keep[0, -1] == 1 and (keep[0, :-1] != 1).all() and keep[1].tolist() == [1] * 8
  assert (cut[0] == keep[0]).sum() == 7 and cut[0, -1] != 1  # the eos is cut off
  sot = PretrainedTokenizer.from_file(path, context_length=8, sot_id="<pad>", pad_id=0)
  assert sot.encode([""]).tolist() == [[0, 1, 0, 0, 0, 0, 0, 0]]
  with pytest.raises(TypeError, match="list of strings"):
    sot.encode("a photo")
  with pytest.raises(TypeError, match="Unknown rules"):
    PretrainedTokenizer.from_file(path, max_length=8)
  with pytest.raises(ValueError, match="not in the vocabulary"):
    PretrainedTokenizer.from_file(path, eot_id="<eos>")
  with pytest.raises(ValueError, match="context_length must be > 1"):
    PretrainedTokenizer.from_file(path, context_length=1)


def _round_trip(tok, path):
  tok.save(path)
  back = load_tokenizer(path)
  assert type(back) is type(tok) and back == tok
  np.testing.assert_array_equal(back.encode(CAPTIONS), tok.encode(CAPTIONS))
  return back


@pytest.mark.parametrize("kind", ["clip", "siglip", "siglip2"])
def test_save_load_round_trip(kind, request, tmp_path):
  if kind == "clip":
    tok = PretrainedTokenizer.from_file(request.getfixturevalue("bpe_path"))
  elif kind == "siglip":
    tok = PretrainedTokenizer.from_hf_dir(request.getfixturevalue("spm_dir"), context_length=16)
  else:
    tok = PretrainedTokenizer.from_hf_dir(request.getfixturevalue("gemma_dir"), lowercase=False)
  back = _round_trip(tok, str(tmp_path / "tokenizer.json"))
  asset = tmp_path / tk.ASSET_NAMES[tok.backend]
  assert sorted(os.listdir(tmp_path)) == sorted(["tokenizer.json", asset.name])
  assert asset.read_bytes() == open(tok.asset_path, "rb").read()  # copied byte for byte
  spec = json.loads((tmp_path / "tokenizer.json").read_text())
  assert spec["format"] == "jax_transfer.tokenizer/pretrained-v1" and spec["asset"] == asset.name
  assert (back.context_length, back.lowercase) == (tok.context_length, tok.lowercase)
  _round_trip(back, str(tmp_path / "tokenizer.json"))  # saved over its own asset
  unpickled = pickle.loads(pickle.dumps(back))  # as data-loader processes receive it
  np.testing.assert_array_equal(unpickled.encode(CAPTIONS), tok.encode(CAPTIONS))


def test_clip_cleaning_without_ftfy(bpe_path, monkeypatch):
  """Without ftfy, OpenAI cleaning is NFC + HTML unescape + whitespace: plain text is as
  before, ftfy's fixes (curly quotes here) are lost."""
  tok = PretrainedTokenizer.from_file(bpe_path)
  texts = ["Crème   brûlée &amp; cafe\u0301", "“curly”"]
  with_ftfy = tok.encode(texts)
  monkeypatch.setitem(sys.modules, "ftfy", None)  # import ftfy fails
  tk._ftfy.cache_clear()
  try:
    without = tok.encode(texts)
  finally:
    tk._ftfy.cache_clear()
  plain = tok.encode(["crème brûlée & café"])[0].tolist()
  assert without[0].tolist() == with_ftfy[0].tolist() == plain
  assert without[1].tolist() != with_ftfy[1].tolist()


def test_hf_dir_family_from_model_type(spm_dir, tmp_path):
  (tmp_path / "spiece.model").write_bytes(open(os.path.join(spm_dir, "spiece.model"), "rb").read())
  (tmp_path / "config.json").write_text('{"model_type": "siglip"}')
  tok = PretrainedTokenizer.from_hf_dir(str(tmp_path))
  assert (tok.family, tok.context_length, tok.eot, tok.pad_id) == ("siglip", 64, 1, 1)


def test_asset_files_are_exported():
  from jax_transfer import checkpoint
  assert {"tokenizer.json", *tk.ASSET_NAMES.values()} <= set(checkpoint.ASSET_FILES)


def test_word_tokenizer_loads_as_before(tmp_path):
  tok = Tokenizer.train(["a red square", "a blue circle"], context_length=8)
  path = str(tmp_path / "tokenizer.json")
  tok.save(path)
  for back in (Tokenizer.load(path), load_tokenizer(path)):
    assert type(back) is Tokenizer and back == tok
    assert back.encode(["a red circle"]).tolist() == tok.encode(["a red circle"]).tolist()
  assert (tok.pad_id, tok.eot, tok.context_length) == (0, tok.vocab_size - 1, 8)
  with pytest.raises(TypeError, match="list of strings"):
    tok.encode("a red square")


def test_clear_errors(spm_dir, gemma_dir, tmp_path):
  spm = os.path.join(spm_dir, "spiece.model")
  gemma_json = os.path.join(gemma_dir, "tokenizer.json")
  spec = str(tmp_path / "tokenizer.json")
  PretrainedTokenizer.from_file(spm).save(spec)
  with pytest.raises(ValueError, match="load_tokenizer"):
    Tokenizer.load(spec)
  asset = tmp_path / "tokenizer_asset.model"
  asset.write_bytes(b"not a model")  # wrong kind
  with pytest.raises(ValueError, match=r"tokenizer_asset\.model: not a SentencePiece model"):
    load_tokenizer(spec)
  asset.unlink()  # missing
  with pytest.raises(FileNotFoundError, match=r"tokenizer_asset\.model: missing"):
    load_tokenizer(spec)
  PretrainedTokenizer.from_file(gemma_json).save(spec)
  asset = tmp_path / "tokenizer_asset.json"
  asset.write_bytes(asset.read_bytes() + b"\n")  # still a tokenizer.json, not the saved one
  with pytest.raises(ValueError, match=r"tokenizer_asset\.json: not the asset"):
    load_tokenizer(spec)
  with pytest.raises(FileNotFoundError, match="nothing.json"):
    load_tokenizer(str(tmp_path / "nothing.json"))
  with pytest.raises(ValueError, match=r"spiece\.model: not a JSON tokenizer file.*from_file"):
    load_tokenizer(spm)
  with pytest.raises(ValueError, match="Hugging Face tokenizer.json.*from_file"):
    load_tokenizer(gemma_json)
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "tokenizer.json").write_text('{"model": 1}')
  (bad / "vocab.gz").write_bytes(b"plain text")
  (bad / "vocab.txt").write_text("a\nb\n")
  with pytest.raises(ValueError, match=r"bad/tokenizer\.json: not a Hugging Face tokenizer"):
    PretrainedTokenizer.from_file(str(bad / "tokenizer.json"), family="siglip2")
  with pytest.raises(ValueError, match=r"vocab\.gz: not a gzipped BPE merges file"):
    PretrainedTokenizer.from_file(str(bad / "vocab.gz"))
  with pytest.raises(ValueError, match="not OpenAI CLIP's"):
    (bad / "vocab.gz").write_bytes(gzip.compress(b"#version: 0.2\ni n\n"))
    PretrainedTokenizer.from_file(str(bad / "vocab.gz"))
  with pytest.raises(ValueError, match=r"vocab\.txt: cannot tell the tokenizer format"):
    PretrainedTokenizer.from_file(str(bad / "vocab.txt"))
  with pytest.raises(ValueError, match="family 'clip' reads a openai_bpe file"):
    PretrainedTokenizer.from_file(spm, family="clip")
  with pytest.raises(FileNotFoundError, match="needs tokenizer.json"):
    PretrainedTokenizer.from_hf_dir(spm_dir, family="siglip2")
  (bad / "tokenizer_config.json").write_text('{"tokenizer_class": "BertTokenizer"}')
  with pytest.raises(ValueError, match="'BertTokenizer', none of"):
    PretrainedTokenizer.from_hf_dir(str(bad))


# ---------------------------------------------------------------------------------------------
# An imported Hugging Face directory carries its tokenizer into the export.

def _hf_model_into(kind, directory, vocab, context):
  """A tiny random CLIPModel / SiglipModel saved into `directory` beside its tokenizer files."""
  import shutil
  import tempfile
  import torch
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  text = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
              vocab_size=vocab, max_position_embeddings=context)
  vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                num_attention_heads=2, image_size=16, patch_size=8)
  if kind == "clip":
    model = transformers.CLIPModel(transformers.CLIPConfig(
        text_config=dict(text, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
        vision_config=vision, projection_dim=16))
  else:
    model = transformers.SiglipModel(transformers.SiglipConfig(
        text_config=text, vision_config=vision))
  model.eval()
  out = tempfile.mkdtemp(dir=os.path.dirname(directory))
  for name in os.listdir(directory):
    shutil.copy(os.path.join(directory, name), out)
  model.save_pretrained(out)
  return model, out


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_imported_hf_directory_carries_its_tokenizer(kind, request, tmp_path):
  """import_checkpoint on a HF directory with tokenizer files -> load_pretrained's tokenizer
  gives the HF tokenizer's ids (padding to the full length for SigLIP, which pools the last
  token), and the text embeddings of real captions equal HF's get_text_features."""
  import torch
  from jax_transfer import load_pretrained
  from jax_transfer.tools import import_checkpoint
  transformers = pytest.importorskip("transformers")
  if kind == "clip":
    hf_tok, directory = request.getfixturevalue("hf_clip_dir")
    model, path = _hf_model_into("clip", directory, 49408, 77)
    ids_hf = hf_tok(CAPTIONS, padding="max_length", max_length=77, truncation=True)["input_ids"]
  else:
    directory = request.getfixturevalue("spm_dir")
    model, path = _hf_model_into("siglip", directory, 300, 64)
    hf_tok = transformers.SiglipTokenizer.from_pretrained(directory)
    ids_hf = hf_tok(CAPTIONS, padding="max_length", max_length=64, truncation=True)["input_ids"]
  out = str(tmp_path / "export")
  assert import_checkpoint.main(["--checkpoint", path, "--out", out]) == 0
  pretrained = load_pretrained(out)
  assert pretrained.tokenizer is not None
  ids = pretrained.tokenizer.encode(CAPTIONS)
  np.testing.assert_array_equal(ids, np.asarray(ids_hf))
  m, params = pretrained.model, pretrained.params
  ztxt = np.asarray(m.apply({"params": params}, ids, method=m.encode_text))
  with torch.no_grad():
    ref = model.get_text_features(input_ids=torch.from_numpy(ids.astype(np.int64)))
    ref = torch.nn.functional.normalize(getattr(ref, "pooler_output", ref), dim=-1).numpy()
  np.testing.assert_allclose(ztxt, ref, atol=2e-5, rtol=0)

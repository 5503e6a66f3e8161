"""Tokenizers: a `tokenizer.json` (any Hugging Face `tokenizers` file) or a word-level one built from captions.

From-scratch training builds a WordLevel tokenizer (lowercased, words and punctuation split) over the training
texts with our special tokens, and saves it as `tokenizer.json` in the workdir, where eval.py finds it.

Special tokens used by the data pipeline (looked up by name, with the Qwen2 / InternLM2 spellings as fallbacks so
that released tokenizers work too): pad, bos, eos, the image context token and the image start / end markers.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
USER, ASSISTANT = "<user>", "<assistant>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS, IMG_START, IMG_END, IMG_CONTEXT, USER, ASSISTANT)

# name -> candidate spellings, first found wins (ours, then Qwen2 / InternLM2 chat tokenizers).
_ALIASES = {
    "pad": (PAD, "<|endoftext|>", "<unk>"),
    "bos": (BOS, "<|im_start|>"),
    "eos": (EOS, "<|im_end|>", "<|endoftext|>"),
    "img_start": (IMG_START,),
    "img_end": (IMG_END,),
    "img_context": (IMG_CONTEXT,),
}


class Tokenizer:
  """A thin wrapper over `tokenizers.Tokenizer`: encode without automatic specials, and the special ids."""

  def __init__(self, tok: tokenizers.Tokenizer, source: str = "<memory>"):
    self.tok = tok
    self.source = source
    self.ids = {}
    for name, spellings in _ALIASES.items():
      found = [tok.token_to_id(s) for s in spellings if tok.token_to_id(s) is not None]
      self.ids[name] = found[0] if found else None
    missing = [n for n in ("pad", "eos", "img_context") if self.ids[n] is None]
    if missing:
      raise ValueError(f"tokenizer {source} lacks the special tokens {missing}; add "
                       f"{[_ALIASES[n][0] for n in missing]} to it or let train.py build one (unset config.tokenizer)")

  @property
  def vocab_size(self) -> int:
    return self.tok.get_vocab_size(with_added_tokens=True)

  @property
  def pad_id(self) -> int:
    return self.ids["pad"]

  @property
  def eos_id(self) -> int:
    return self.ids["eos"]

  @property
  def bos_id(self) -> int | None:
    return self.ids["bos"]

  @property
  def image_token_id(self) -> int:
    return self.ids["img_context"]

  def encode(self, text: str) -> list[int]:
    """Text -> ids, no automatic special tokens (the pipeline places bos / eos itself)."""
    return self.tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    return self.tok.decode(list(ids), skip_special_tokens=True)

  def token_id(self, token: str) -> int | None:
    return self.tok.token_to_id(token)

  def save(self, path: str) -> None:
    self.tok.save(path)


def load(path: str) -> Tokenizer:
  """A tokenizer.json file (or a folder holding one)."""
  if os.path.isdir(path):
    path = os.path.join(path, "tokenizer.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"tokenizer file {path} does not exist; set config.tokenizer to a tokenizer.json or "
                            "leave it empty to build one from the training captions")
  return Tokenizer(tokenizers.Tokenizer.from_file(path), path)


def build_word_level(texts: Iterable[str], *, min_frequency: int = 1, max_vocab: int = 32000) -> Tokenizer:
  """A lowercased word-level tokenizer over `texts`, with SPECIAL_TOKENS at ids 0..8 (pad = 0)."""
  tok = tokenizers.Tokenizer(models.WordLevel(unk_token=UNK))
  tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
  tok.pre_tokenizer = pre_tokenizers.Whitespace()  # words and runs of punctuation
  tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
  trainer = trainers.WordLevelTrainer(vocab_size=max_vocab, min_frequency=min_frequency,
                                      special_tokens=list(SPECIAL_TOKENS))
  tok.train_from_iterator(texts, trainer=trainer)
  return Tokenizer(tok, "<built>")


def load_or_build(path: str | None, workdir: str, texts_fn) -> Tokenizer:
  """config.tokenizer if set; else the workdir's tokenizer.json (a resumed run); else build from texts_fn()
  (an iterable of training texts) and save it in the workdir."""
  if path:
    return load(path)
  saved = os.path.join(workdir, "tokenizer.json")
  if os.path.exists(saved):
    return load(saved)
  tok = build_word_level(texts_fn())
  os.makedirs(workdir, exist_ok=True)
  # write-then-rename: several processes of one run build the same tokenizer into a shared workdir, and one must
  # never read another's half-written file
  tmp = f"{saved}.{os.getpid()}.tmp"
  tok.save(tmp)
  os.replace(tmp, saved)
  tok.source = saved
  return tok

"""Tokenizers: the ones released folders ship (read as transformers reads them), or a word-level one built from
captions for from-scratch runs.

`load(path)` reads a model folder (or a tokenizer file in one): `tokenizer.json`, else a sentencepiece
`tokenizer.model` (LLaMA / InternLM2), else `vocab.json` + `merges.txt` (Qwen2), with the special tokens, bos / eos
settings, added tokens and chat template of its `tokenizer_config.json` (see tokenizer_files.py for what each kind
does). `encode(text, add_special_tokens=True)` gives the ids transformers' `AutoTokenizer.from_pretrained(folder)
(text)["input_ids"]` gives (tests/test_tokenizer_folders.py checks it on every kind).

From-scratch training builds a WordLevel tokenizer (lowercased, words and punctuation split) over the training
texts with SPECIAL_TOKENS and saves it in the workdir (tokenizer.json + tokenizer_config.json), where eval.py finds
it. Special tokens are those the files name; nothing is guessed from spellings.

`contrastive_text_ids` is the InternVL-C/G text input of the official evaluation.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from internvl_jax.data import tokenizer_files as files_lib
from internvl_jax.data.tokenizer_files import TokenizerFileError  # noqa: F401  (re-exported)

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
USER, ASSISTANT = "<user>", "<assistant>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS, IMG_START, IMG_END, IMG_CONTEXT, USER, ASSISTANT)
# what our word-level tokenizers define: [bos] text, eos placed by the features (caption_tokens)
OWN_SPECIALS = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK}
KINDS = ("tokenizer.json", "tokenizer.model", "vocab.json + merges.txt")


class Tokenizer:
  """Text <-> ids with the special tokens of the tokenizer's files.

  `tok`: a `tokenizers.Tokenizer` (any file kind but remote-code sentencepiece ones) or a
  `tokenizer_files.SentencePieceText`. Special tokens are given explicitly (contents, None = not defined).
  add_bos_token / add_eos_token: None keeps a tokenizers backend's post-processor (and reads them from it); a bool
  sets the post-processor to [bos] $A [eos] accordingly (it changes `tok`).
  """

  def __init__(self, tok, source: str = "<memory>", *, bos_token: str | None = None, eos_token: str | None = None,
               pad_token: str | None = None, unk_token: str | None = None, add_bos_token: bool | None = None,
               add_eos_token: bool | None = None, chat_template: str | None = None, where: str | None = None,
               config: dict | None = None):
    self.tok = tok
    self.source = source
    self.where = where or f"tokenizer {source}"  # names the settings in messages
    self._fix = "set it there" if where else "pass it to Tokenizer(...)"
    self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
    self.chat_template = chat_template
    self._config = dict(config or {})
    self._sp = not isinstance(tok, tokenizers.Tokenizer)
    if self._sp:
      self.add_bos_token, self.add_eos_token = bool(add_bos_token), bool(add_eos_token)
      for add, name in ((self.add_bos_token, "bos"), (self.add_eos_token, "eos")):
        if add:
          self._required(name)
    elif add_bos_token is not None or add_eos_token is not None:
      self.add_bos_token, self.add_eos_token = bool(add_bos_token), bool(add_eos_token)
      tok.post_processor = files_lib.template_processor(tok, bos_token, eos_token, self.add_bos_token,
                                                        self.add_eos_token, self.where)
    else:  # read them off the post-processor: what it puts around the text
      bare = tok.encode("a", add_special_tokens=False).ids
      full = tok.encode("a", add_special_tokens=True).ids
      at = next((i for i in range(len(full) - len(bare) + 1) if full[i:i + len(bare)] == bare), 0)
      bos, eos = self._id(bos_token), self._id(eos_token)
      self.add_bos_token = bos is not None and full[:at] == [bos]
      self.add_eos_token = eos is not None and full[at + len(bare):] == [eos]

  # ids of the special tokens
  def _id(self, token: str | None) -> int | None:
    return None if token is None else self.token_id(token)

  def _required(self, name: str) -> int:
    token = getattr(self, f"{name}_token")
    if token is None:
      raise ValueError(f"{self.where} defines no {name}_token; {self._fix}")
    idx = self.token_id(token)
    if idx is None:
      raise ValueError(f"{self.where} names {name}_token {token!r}, which the vocabulary does not hold")
    return idx

  @property
  def bos_id(self) -> int | None:
    return self._id(self.bos_token)

  @property
  def eos_id(self) -> int:
    return self._required("eos")

  @property
  def pad_id(self) -> int | None:
    return self._id(self.pad_token)

  @property
  def unk_id(self) -> int | None:
    return self._id(self.unk_token)

  @property
  def image_token_id(self) -> int:
    """The id of <IMG_CONTEXT>; it must be one token of the tokenizer (an InternVL chat tokenizer)."""
    idx = self.token_id(IMG_CONTEXT)
    if idx is None or self.encode(IMG_CONTEXT) != [idx]:
      raise ValueError(f"tokenizer {self.source} does not hold {IMG_CONTEXT} as one token; use the tokenizer of an "
                       "InternVL chat checkpoint (or let train.py build one: unset config.tokenizer)")
    return idx

  @property
  def vocab_size(self) -> int:
    """Number of ids, added tokens included."""
    return self.tok.vocab_size if self._sp else self.tok.get_vocab_size(with_added_tokens=True)

  def token_id(self, token: str) -> int | None:
    """The id of one token (vocabulary entry or added token), None if the tokenizer lacks it."""
    return self.tok.token_to_id(token)

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    """Text -> ids. add_special_tokens=False (the default: the pipelines place bos / eos themselves) gives the
    text's ids alone; True adds what the tokenizer's config adds (transformers' `tokenizer(text)`)."""
    if not self._sp:
      return self.tok.encode(text, add_special_tokens=add_special_tokens).ids
    ids = self.tok.encode(text)
    if add_special_tokens:
      ids = [self.bos_id] * self.add_bos_token + ids + [self.eos_id] * self.add_eos_token
    return ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def save(self, path: str) -> None:
    """Writes what `load` needs to get this tokenizer back into the folder `path` (a path ending in .json means
    its folder, as older callers passed `.../tokenizer.json`): tokenizer_config.json first, then tokenizer.json
    (or tokenizer.model for a sentencepiece-text tokenizer), each written then renamed, so that a reader that sees
    the tokenizer file also sees its config (several processes of a run save into one workdir)."""
    folder = os.path.dirname(path) if path.endswith(".json") else path
    os.makedirs(folder or ".", exist_ok=True)
    config = {k: v for k, v in self._config.items() if k not in ("added_tokens_decoder", "chat_template")}
    config.update(bos_token=self.bos_token, eos_token=self.eos_token,
                  pad_token=self.pad_token, unk_token=self.unk_token, add_bos_token=self.add_bos_token,
                  add_eos_token=self.add_eos_token)
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    if self.chat_template is not None:
      config["chat_template"] = self.chat_template
    if self._sp:
      config["added_tokens_decoder"] = {str(i): {"content": t.content, "lstrip": t.lstrip, "rstrip": t.rstrip,
                                                 "normalized": t.normalized, "single_word": t.single_word,
                                                 "special": t.special} for i, t in sorted(self.tok.added.items())}
    _write(os.path.join(folder, files_lib.CONFIG), json.dumps(config, ensure_ascii=False, indent=2).encode())
    if self._sp:
      _write(os.path.join(folder, files_lib.SPM_MODEL), self.tok.model)
    else:
      _write(os.path.join(folder, files_lib.TOKENIZER_JSON), self.tok.to_str().encode())


def _write(path: str, data: bytes) -> None:
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def _found(folder: str) -> dict[str, str]:
  """The tokenizer files of `folder` (names -> paths)."""
  names = (files_lib.TOKENIZER_JSON, files_lib.SPM_MODEL, files_lib.VOCAB_JSON, files_lib.MERGES_TXT)
  found = {n: os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))}
  if files_lib.VOCAB_JSON in found and files_lib.MERGES_TXT not in found:
    del found[files_lib.VOCAB_JSON]
  return found


def saved_in(folder: str) -> bool:
  """Whether `folder` holds a tokenizer `load` reads (a workdir after `save`, or a model folder)."""
  found = _found(folder) if folder and os.path.isdir(folder) else {}
  return bool({files_lib.TOKENIZER_JSON, files_lib.SPM_MODEL, files_lib.VOCAB_JSON} & set(found))


def load(path: str) -> Tokenizer:
  """The tokenizer of a model folder (or of a tokenizer.json / tokenizer.model file, with the settings files beside
  it): tokenizer.json, else tokenizer.model, else vocab.json + merges.txt, as the module docstring says."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"tokenizer path {path} does not exist; set config.tokenizer to a model folder (or leave "
                            "it empty to build one from the training captions)")
  if os.path.basename(path) in (files_lib.VOCAB_JSON, files_lib.MERGES_TXT, files_lib.CONFIG):
    path = os.path.dirname(path) or "."  # one file of a folder's set: the folder
  folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
  found = _found(folder)
  if not os.path.isdir(path):  # a tokenizer file: that one, with the folder's settings
    name = os.path.basename(path)
    kind = files_lib.TOKENIZER_JSON if name.endswith(".json") else files_lib.SPM_MODEL
    found = {kind: path}
  elif not saved_in(folder):
    extra = " (vocab.json has no merges.txt beside it)" if os.path.isfile(os.path.join(folder, "vocab.json")) else ""
    raise FileNotFoundError(f"{folder} holds no tokenizer: looked for {', '.join(KINDS)}{extra}")
  parts = files_lib.read(folder, found)
  tokens = parts.tokens
  if not parts.config and _is_old_word_level(parts.backend):
    tokens = OWN_SPECIALS
    parts.add_bos_token, parts.add_eos_token = True, False
  return Tokenizer(parts.backend, parts.source, add_bos_token=parts.add_bos_token, add_eos_token=parts.add_eos_token,
                   chat_template=parts.chat_template, where=parts.where, config=parts.config, **tokens)


def _is_old_word_level(tok) -> bool:
  """A bare tokenizer.json that build_word_level wrote before tokenizers carried a tokenizer_config.json: workdirs
  of earlier runs hold only that file, and its specials were known by position (SPECIAL_TOKENS at ids 0..8)."""
  return isinstance(tok, tokenizers.Tokenizer) and isinstance(tok.model, models.WordLevel) and all(
      tok.token_to_id(t) == i for i, t in enumerate(SPECIAL_TOKENS))


def build_word_level(texts: Iterable[str], *, min_frequency: int = 1, max_vocab: int = 32000) -> Tokenizer:
  """A lowercased word-level tokenizer over `texts`, with SPECIAL_TOKENS at ids 0..8 (pad = 0); bos <s> is added
  by encode(add_special_tokens=True), eos </s> is placed by the features."""
  tok = tokenizers.Tokenizer(models.WordLevel(unk_token=UNK))
  tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
  tok.pre_tokenizer = pre_tokenizers.Whitespace()  # words and runs of punctuation
  tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
  trainer = trainers.WordLevelTrainer(vocab_size=max_vocab, min_frequency=min_frequency,
                                      special_tokens=list(SPECIAL_TOKENS))
  tok.train_from_iterator(texts, trainer=trainer)
  return Tokenizer(tok, "<built>", add_bos_token=True, add_eos_token=False, **OWN_SPECIALS)


def load_or_build(path: str | None, workdir: str, texts_fn) -> Tokenizer:
  """config.tokenizer if set; else the workdir's tokenizer (a resumed run); else build from texts_fn() (an iterable
  of training texts) and save it in the workdir."""
  if path:
    return load(path)
  if saved_in(workdir):
    return load(workdir)
  tok = build_word_level(texts_fn())
  tok.save(workdir)
  tok.source = workdir
  return tok


def contrastive_text_ids(tok: Tokenizer, texts: Sequence[str], max_len: int = 80) -> tuple[np.ndarray, np.ndarray]:
  """InternVL-C/G text input as the official evaluation makes it -> (ids, mask), int32 [B, max_len].

  The official code loads the LLaMA tokenizer (add_bos_token true), forces add_eos_token = True, sets the pad token
  to ' ' (a piece the vocabulary lacks, so id 0, <unk>) and calls it with max_length=80, truncation=True,
  padding='max_length': [bos] text [eos], the text cut so that bos and eos stay, right-padded with 0; the model
  masks `ids > 0`, the same as the attention mask since text never encodes to <unk> (byte fallback). The
  'summarize:' prefix is the caller's."""
  head = [tok.bos_id] if tok.add_bos_token else []
  tail = [tok.eos_id]
  ids = np.zeros((len(texts), max_len), np.int32)
  for row, text in enumerate(texts):
    body = tok.encode(text)[:max(max_len - len(head) - len(tail), 0)]
    seq = (head + body + tail)[:max_len]
    ids[row, :len(seq)] = seq
  return ids, (ids > 0).astype(np.int32)

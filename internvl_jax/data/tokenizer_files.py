"""Readers of the tokenizer files a released (Hugging Face layout) folder ships; `tokenizer.load` is the entry.

`read(path) -> Parts`: the backend that turns text into ids plus the special tokens and settings of the folder's
`tokenizer_config.json` (and, as transformers reads them, `special_tokens_map.json` / `added_tokens.json`). Files,
in order of preference:

1. `tokenizer.json`: a `tokenizers` pipeline, used as written (as transformers 4.x, which the official InternVL
   code ran on, does; transformers 5 rebuilds LLaMA / Qwen2 pipelines from their class, with the same result for
   files transformers wrote). Its post-processor places bos / eos: transformers 5 drops the config's
   add_bos_token / add_eos_token when a tokenizer.json is present.
2. `tokenizer.model` (sentencepiece):
   - LLaMA (`LlamaTokenizer`, or no class, BPE model): converted to a `tokenizers` BPE exactly as transformers 5.24
     converts it (vocabulary and merges from the pieces, byte fallback, no normalizer, a Metaspace pre-tokenizer
     that prefixes '▁' to the first chunk only, `legacy: false` being the default there), bos / eos placed by
     add_bos_token (default true) / add_eos_token (default false).
   - any other class (InternLM2's remote-code `InternLM2Tokenizer`, or a unigram model): `SentencePieceText`, the
     slow remote-code semantics: added tokens are never split, the text between them goes through sentencepiece
     itself, chunk by chunk.
3. `vocab.json` + `merges.txt`: Qwen2's byte-level BPE, built as transformers' `Qwen2Tokenizer` builds it (NFC,
   Qwen2's split regex, byte-level, no bos).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Sequence

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

CONFIG, SPECIAL_MAP, ADDED_JSON = "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"
TOKENIZER_JSON, SPM_MODEL, VOCAB_JSON, MERGES_TXT = "tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt"
NAMED = ("bos_token", "eos_token", "unk_token", "pad_token")

# Special tokens a class assumes when the config does not name them (its __init__ defaults in transformers 5.24 /
# in the remote code); an explicit null in the config overrides them.
CLASS_DEFAULTS = {
    "LlamaTokenizer": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    "InternLM2Tokenizer": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"},
    "Qwen2Tokenizer": {"eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
}
# Qwen2's pre-tokenizer split (transformers' Qwen2Tokenizer; the same regex as Qwen2's tokenizer.json files)
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")


@dataclasses.dataclass
class Parts:
  """What `read` found: a backend (tokenizers.Tokenizer or SentencePieceText) and the folder's settings.
  add_bos_token / add_eos_token None: a tokenizers backend's post-processor decides."""
  backend: Any
  source: str
  where: str  # names the settings file in messages, e.g. "tokenizer_config.json of /x"
  tokens: dict  # NAMED -> content or None
  add_bos_token: bool | None = None
  add_eos_token: bool | None = None
  chat_template: str | None = None
  config: dict = dataclasses.field(default_factory=dict)


class TokenizerFileError(ValueError):
  """A tokenizer file that cannot be read as a tokenizer (the message names the file and the field)."""


def _read_json(path: str):
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise TokenizerFileError(f"{path} is not valid JSON ({e}); restore it from the released folder") from None


def _content(value) -> str | None:
  """A special token as configs write it: a string, an AddedToken dict (possibly with '__type'), or null."""
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, dict) and isinstance(value.get("content"), str):
    return value["content"]
  raise TokenizerFileError(f"cannot read the special token {value!r}")


def _added(content: str, entry: dict | None = None, *, special: bool = True) -> AddedToken:
  entry = entry or {}
  return AddedToken(content, single_word=bool(entry.get("single_word", False)), lstrip=bool(entry.get("lstrip", False)),
                    rstrip=bool(entry.get("rstrip", False)), normalized=bool(entry.get("normalized", not special)),
                    special=bool(entry.get("special", special)))


@dataclasses.dataclass
class FolderConfig:
  """tokenizer_config.json merged with special_tokens_map.json / added_tokens.json the way transformers merges
  them: those two legacy files count only when the config has no added_tokens_decoder."""
  folder: str
  raw: dict
  tokens: dict  # NAMED -> content or None (after class defaults)
  added: dict  # id -> AddedToken, from added_tokens_decoder or added_tokens.json
  extra_special: list  # additional_special_tokens / extra_special_tokens contents
  klass: str  # tokenizer_class without a "Fast" suffix; "" when absent
  explicit: set  # the NAMED fields the files set (a class default fills the others)

  @property
  def where(self) -> str:
    return f"{CONFIG} of {self.folder}"

  def flag(self, name: str) -> bool | None:
    value = self.raw.get(name)
    return None if value is None else bool(value)

  def apply_defaults(self, klass: str) -> None:
    for name, value in CLASS_DEFAULTS.get(klass, {}).items():
      if name not in self.explicit:
        self.tokens[name] = value


def read_config(folder: str) -> FolderConfig:
  raw = _read_json(os.path.join(folder, CONFIG)) if os.path.isfile(os.path.join(folder, CONFIG)) else {}
  klass = str(raw.get("tokenizer_class") or "")
  klass = klass[:-4] if klass.endswith("Fast") else klass
  tokens = {n: _content(raw.get(n)) for n in NAMED}
  explicit = {n for n in NAMED if n in raw}
  extra = raw.get("additional_special_tokens") or raw.get("extra_special_tokens") or []
  extra = [_content(t) for t in (extra.values() if isinstance(extra, dict) else extra)]
  added = {}
  if "added_tokens_decoder" in raw:
    for idx, entry in raw["added_tokens_decoder"].items():
      if not isinstance(entry, dict) or "content" not in entry:
        raise TokenizerFileError(f"added_tokens_decoder[{idx}] in {CONFIG} of {folder} is not a token entry")
      added[int(idx)] = _added(entry["content"], entry, special=entry.get("special", False))
  else:
    path = os.path.join(folder, SPECIAL_MAP)
    if os.path.isfile(path):
      for key, value in _read_json(path).items():
        if key in NAMED:
          tokens[key] = _content(value)
          explicit.add(key)
        elif key in ("additional_special_tokens", "extra_special_tokens") and isinstance(value, list):
          extra += [c for c in map(_content, value) if c not in extra]
    path = os.path.join(folder, ADDED_JSON)
    if os.path.isfile(path):
      specials = {t for t in tokens.values() if t} | set(extra)
      for content, idx in _read_json(path).items():
        added[int(idx)] = _added(content, special=content in specials)
  cfg = FolderConfig(folder, raw, tokens, added, extra, klass, explicit)
  cfg.apply_defaults(klass)
  return cfg


def chat_template(folder: str, config: dict) -> str | None:
  """chat_template.jinja, else chat_template.json's (a processor's: the multimodal template of -hf folders), else
  tokenizer_config.json's; a list of {name, template} gives its 'default'."""
  path = os.path.join(folder, "chat_template.jinja")
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      return f.read()
  path = os.path.join(folder, "chat_template.json")
  template = _read_json(path).get("chat_template") if os.path.isfile(path) else None
  if template is None:
    template = config.get("chat_template")
  if isinstance(template, list):
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    if "default" not in named:
      raise TokenizerFileError(f"the chat_template list of {folder} has no 'default' entry (has {sorted(named)})")
    template = named["default"]
  return template


def add_tokens(tok: tokenizers.Tokenizer, cfg: FolderConfig, path: str) -> None:
  """Adds what transformers adds on loading: the config's added tokens (by id), then the named and extra special
  tokens. A token the backend already holds as an added token keeps its entry; a new one gets the next free id,
  which must be the id the config gives it."""
  have = {t.content for t in tok.get_added_tokens_decoder().values()}
  for idx, token in sorted(cfg.added.items()):
    if token.content in have:
      continue
    if token.special:
      tok.add_special_tokens([token])
    else:
      tok.add_tokens([token])
    got = tok.token_to_id(token.content)
    if got != idx:
      raise TokenizerFileError(f"added_tokens_decoder of {cfg.where} puts {token.content!r} at id {idx} but {path} "
                               f"leaves it at id {got}; use the tokenizer files released together")
    have.add(token.content)
  for content in [t for t in cfg.tokens.values() if t] + cfg.extra_special:
    if content not in have:
      tok.add_special_tokens([AddedToken(content, special=True, normalized=False)])
      have.add(content)


def template_processor(tok: tokenizers.Tokenizer, bos: str | None, eos: str | None, add_bos: bool, add_eos: bool,
                       where: str):
  """The post-processor transformers builds from add_bos_token / add_eos_token: [bos] $A [eos]."""
  head, tail = [], []
  for add, token, name, side in ((add_bos, bos, "bos", head), (add_eos, eos, "eos", tail)):
    if not add:
      continue
    if token is None:
      raise TokenizerFileError(f"{where} sets add_{name}_token but defines no {name}_token")
    if tok.token_to_id(token) is None:
      raise TokenizerFileError(f"{where} sets add_{name}_token but its {name}_token {token!r} is not in the vocabulary")
    side.append(token)
  return processors.TemplateProcessing(single=" ".join([f"{t}:0" for t in head] + ["$A:0"] + [f"{t}:0" for t in tail]),
                                       special_tokens=[(t, tok.token_to_id(t)) for t in head + tail])


def _spm_proto(path: str):
  from sentencepiece import sentencepiece_model_pb2 as pb  # protobuf; only needed for sentencepiece folders

  proto = pb.ModelProto()
  with open(path, "rb") as f:
    try:
      proto.ParseFromString(f.read())
    except Exception as e:  # noqa: BLE001  (protobuf raises its own DecodeError)
      raise TokenizerFileError(f"{path} is not a sentencepiece model ({e})") from None
  return proto


def llama_from_spm(path: str, cfg: FolderConfig) -> tokenizers.Tokenizer:
  """The `tokenizers` BPE transformers 5.24's LlamaTokenizer builds from a sentencepiece model."""
  proto = _spm_proto(path)
  vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
  # merges: every split of a piece into two pieces, ordered by the merged piece's id, then by the left part's length
  merges = sorted((i, k, piece[:k], piece[k:]) for piece, i in vocab.items() for k in range(1, len(piece))
                  if piece[:k] in vocab and piece[k:] in vocab)
  merges = [(left, right) for _, _, left, right in merges]
  unk = proto.pieces[proto.trainer_spec.unk_id].piece if 0 <= proto.trainer_spec.unk_id < len(proto.pieces) else None
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
  prefix = cfg.raw.get("add_prefix_space")
  prefix = True if prefix is None else bool(prefix)
  scheme = ("always" if cfg.raw.get("legacy", False) else "first") if prefix else "never"
  tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
  steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
  tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
  # control pieces (<s>, </s>) are special added tokens, user-defined pieces plain added tokens, in id order
  for piece in proto.pieces:
    if piece.type == 3:
      tok.add_special_tokens([AddedToken(piece.piece, special=True, normalized=False)])
    elif piece.type == 4:
      tok.add_tokens([AddedToken(piece.piece, special=False, normalized=False)])
  return tok


def qwen2_from_bpe(vocab_path: str, merges_path: str, cfg: FolderConfig) -> tokenizers.Tokenizer:
  """The byte-level BPE transformers' Qwen2Tokenizer builds from vocab.json + merges.txt."""
  vocab, merges = models.BPE.read_file(vocab_path, merges_path)
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, continuing_subword_prefix="",
                                        end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=bool(cfg.raw.get("add_prefix_space", False)), use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  return tok


class SentencePieceText:
  """Text -> ids as the slow remote-code tokenizers (InternLM2Tokenizer) do it: the text is cut at every added
  token (longest match first; lstrip / rstrip flags eat the whitespace beside the token), each remaining chunk is
  encoded by sentencepiece itself (a dummy prefix per chunk, as the model's normalizer says), and each piece maps to
  its added-token id if one has its text, else to the sentencepiece id."""

  def __init__(self, model: bytes, added: dict[int, AddedToken]):
    import sentencepiece

    self.model = model
    self.sp = sentencepiece.SentencePieceProcessor(model_proto=model)
    self.added = dict(added)  # id -> AddedToken
    self.by_content = {t.content: i for i, t in sorted(self.added.items(), reverse=True)}  # lowest id wins
    order = sorted(self.by_content, key=len, reverse=True)
    self._split = re.compile("(" + "|".join(map(re.escape, order)) + ")") if order else None

  @property
  def vocab_size(self) -> int:
    return max([self.sp.get_piece_size() - 1, *self.added]) + 1

  def token_to_id(self, token: str) -> int | None:
    if token in self.by_content:
      return self.by_content[token]
    idx = self.sp.piece_to_id(token)
    return idx if self.sp.id_to_piece(idx) == token else None

  def special_ids(self) -> set[int]:
    return {i for i, t in self.added.items() if t.special}

  def encode(self, text: str) -> list[int]:
    chunks = self._split.split(text) if self._split else [text]
    ids: list[int] = []
    for k, chunk in enumerate(chunks):
      if k % 2:  # an added token (re.split puts the captured separators at odd positions)
        ids.append(self.by_content[chunk])
        continue
      before = self.added[self.by_content[chunks[k - 1]]] if k else None
      after = self.added[self.by_content[chunks[k + 1]]] if k + 1 < len(chunks) else None
      if before is not None and before.rstrip:
        chunk = chunk.lstrip()
      if after is not None and after.lstrip:
        chunk = chunk.rstrip()
      if chunk:
        ids += [self.by_content.get(p, self.sp.piece_to_id(p)) for p in self.sp.encode(chunk, out_type=str)]
    return ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    """Runs of sentencepiece ids through sentencepiece; added tokens as their text (special ones skipped)."""
    out, run = [], []
    for i in map(int, ids):
      if i in self.added:
        out.append(self.sp.decode(run))
        run = []
        if not (skip_special_tokens and self.added[i].special):
          out.append(self.added[i].content)
      else:
        run.append(i)
    out.append(self.sp.decode(run))
    return "".join(out)


def spm_text(path: str, cfg: FolderConfig) -> SentencePieceText:
  """SentencePieceText over the folder's tokenizer.model with its added tokens; named and extra special tokens are
  added tokens too (never split); one the vocabulary lacks gets the next id, as the slow tokenizers add it."""
  with open(path, "rb") as f:
    model = f.read()
  try:
    text = SentencePieceText(model, cfg.added)
  except RuntimeError as e:
    raise TokenizerFileError(f"{path} is not a sentencepiece model ({e})") from None
  added = dict(cfg.added)
  for content in [t for t in cfg.tokens.values() if t] + cfg.extra_special:
    if content not in {t.content for t in added.values()}:
      idx = text.token_to_id(content)
      added[max([text.vocab_size - 1, *added]) + 1 if idx is None else idx] = AddedToken(content, special=True,
                                                                                       normalized=False)
  return SentencePieceText(model, added) if added != cfg.added else text


def _is_llama_spm(path: str, cfg: FolderConfig) -> bool:
  if cfg.klass not in ("", "LlamaTokenizer"):
    return False
  return _spm_proto(path).trainer_spec.model_type == 2  # BPE; a unigram model stays with sentencepiece


def read(folder: str, files: dict[str, str]) -> Parts:
  """Parts of the tokenizer in `folder`; `files` maps the names above to the paths found (tokenizer.load)."""
  cfg = read_config(folder)
  template = chat_template(folder, cfg.raw)
  common = dict(source=folder, where=cfg.where, tokens=dict(cfg.tokens), chat_template=template, config=cfg.raw)
  if TOKENIZER_JSON in files:
    try:
      tok = tokenizers.Tokenizer.from_file(files[TOKENIZER_JSON])
    except Exception as e:  # noqa: BLE001  (tokenizers raises a bare Exception)
      raise TokenizerFileError(f"{files[TOKENIZER_JSON]} is not a tokenizers file ({e})") from None
    add_tokens(tok, cfg, files[TOKENIZER_JSON])
    return Parts(tok, **common)
  if SPM_MODEL in files and _is_llama_spm(files[SPM_MODEL], cfg):
    cfg.apply_defaults("LlamaTokenizer")
    common["tokens"] = dict(cfg.tokens)
    tok = llama_from_spm(files[SPM_MODEL], cfg)
    add_tokens(tok, cfg, files[SPM_MODEL])
    add_bos, add_eos = cfg.flag("add_bos_token"), cfg.flag("add_eos_token")
    add_bos = True if add_bos is None else add_bos  # transformers' LlamaTokenizer adds bos unless told not to
    tok.post_processor = template_processor(tok, cfg.tokens["bos_token"], cfg.tokens["eos_token"], add_bos,
                                            bool(add_eos), cfg.where)
    return Parts(tok, add_bos_token=add_bos, add_eos_token=bool(add_eos), **common)
  if SPM_MODEL in files:
    text = spm_text(files[SPM_MODEL], cfg)
    add_bos, add_eos = cfg.flag("add_bos_token"), cfg.flag("add_eos_token")
    # InternLM2Tokenizer's defaults: bos added, eos not
    return Parts(text, add_bos_token=True if add_bos is None else add_bos, add_eos_token=bool(add_eos), **common)
  if cfg.klass not in ("", "Qwen2Tokenizer"):
    raise TokenizerFileError(f"{cfg.where} names tokenizer_class {cfg.raw.get('tokenizer_class')!r}; of the "
                             "vocab.json + merges.txt kinds only Qwen2Tokenizer is read: save a tokenizer.json")
  tok = qwen2_from_bpe(files[VOCAB_JSON], files[MERGES_TXT], cfg)
  add_tokens(tok, cfg, files[VOCAB_JSON])
  add_bos, add_eos = bool(cfg.flag("add_bos_token")), bool(cfg.flag("add_eos_token"))
  tok.post_processor = template_processor(tok, cfg.tokens["bos_token"], cfg.tokens["eos_token"], add_bos, add_eos,
                                          cfg.where)
  return Parts(tok, add_bos_token=add_bos, add_eos_token=add_eos, **common)

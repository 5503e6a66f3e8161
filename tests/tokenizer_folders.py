"""Tiny tokenizer folders laid out like the released InternVL checkpoints ship them (a helper for tests).

Each builder writes into `folder` (created if needed) and returns it:
  llama_sentencepiece     tokenizer.model (sentencepiece BPE with byte fallback) + LlamaTokenizer config, as the
                          InternVL-14B / QLLaMA folders (no tokenizer.json)
  internlm2_sentencepiece tokenizer.model + InternLM2Tokenizer (remote code) config with the chat / image tokens in
                          added_tokens_decoder, as InternVL-Chat-V1-5 and InternVL2-2B/8B/26B
  qwen2_bpe               vocab.json + merges.txt (byte-level BPE) + Qwen2Tokenizer config with InternVL's image
                          tokens, as InternVL2-1B / InternVL2.5 / InternVL3; optionally a tokenizer.json too
  add_tokenizer_json      adds to a folder the tokenizer.json transformers writes for it (as -hf folders)

The models are trained here, deterministically, on a small built-in English + Chinese corpus (a second or two).
The configs follow the released files' fields; ids are those of the tiny vocabularies (e.g. <IMG_CONTEXT> is not
92546 / 151667 here).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile

_CORPUS = [
    "a red circle above a blue square", "the cat sat on the mat.", "Two dogs play in the snow near a fence.",
    "A man riding a bicycle down a busy street at night!", "What colour is the car? Answer the question.",
    "Provide a one-sentence caption for the provided image.", "summarize: a photo of a small bird on a branch",
    "There are 12 apples and 345 oranges in 6 baskets; 7,890 in total.", "Hello, world - it's a test: (yes) [no].",
    "The quick brown fox jumps over the lazy dog.", "def f(x):\n    return x * 2\n", "line one\nline two\n\nline four",
    "tabs\tand\tspaces   between   words", "An image of a kitchen with a stove, a sink and a window.",
    "一只猫坐在垫子上。", "两只狗在雪地里玩耍。", "这是一张图片，图片里有一个红色的圆和一个蓝色的正方形。",
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。",
    "请用一句话描述这张图片。", "天空是蓝色的，草地是绿色的。", "我们今天去公园散步，看到了很多花。",
    "Mixed 中文 and English 文本 together.", "emoji are rare here 🙂 but 🚀 happens", "numbers 2024 3.14159 1e-5",
]

LLAMA_VOCAB, INTERNLM2_VOCAB = 600, 640


def _corpus(repeat: int = 8) -> list[str]:
  return [line for _ in range(repeat) for line in _CORPUS]


@functools.lru_cache(maxsize=None)
def _spm_model(vocab_size: int, extra_user_pieces: tuple = ()) -> bytes:
  """A serialized sentencepiece BPE model with LLaMA's trainer / normalizer settings (byte fallback, digits split,
  identity normalization, dummy prefix, whitespace kept); `extra_user_pieces` are appended as user-defined pieces
  at the end of the vocabulary (InternLM2 keeps placeholder pieces there that its config renames)."""
  import sentencepiece as spm
  from sentencepiece import sentencepiece_model_pb2 as pb

  with tempfile.TemporaryDirectory() as tmp:
    prefix = os.path.join(tmp, "m")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_prefix=prefix, model_type="bpe", vocab_size=vocab_size,
        character_coverage=1.0, byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", add_dummy_prefix=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2, hard_vocab_limit=False)
    proto = pb.ModelProto()
    with open(prefix + ".model", "rb") as f:
      proto.ParseFromString(f.read())
  for piece in extra_user_pieces:
    proto.pieces.add(piece=piece, score=0.0, type=pb.ModelProto.SentencePiece.USER_DEFINED)
  return proto.SerializeToString()


def _added(content: str, *, special: bool = True, normalized: bool = False) -> dict:
  return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False, "single_word": False,
          "special": special}


def update_json(folder: str, name: str, **changes) -> None:
  """Sets fields of the JSON file `name` in `folder` (a config edited as a user would)."""
  path = os.path.join(folder, name)
  with open(path) as f:
    obj = json.load(f)
  obj.update(changes)
  with open(path, "w") as f:
    json.dump(obj, f)


def _write_json(folder: str, name: str, obj) -> None:
  with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
    json.dump(obj, f, ensure_ascii=False, indent=2)


def _legacy_added(content: str) -> dict:
  """An AddedToken as transformers 4.28-era configs serialise it (the InternVL-14B-era LLaMA folders)."""
  return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False,
          "single_word": False}


def llama_sentencepiece(folder: str, *, add_eos_token: bool = False) -> str:
  """tokenizer.model + tokenizer_config.json + special_tokens_map.json of a LLaMA tokenizer, as the
  InternVL-14B-224px / QLLaMA folders ship it (their LLaMA tokenizer files, transformers 4.28 era): LlamaTokenizer,
  add_bos_token true, add_eos_token false, bos <s> / eos </s> / unk <unk> as AddedToken dicts, no pad token in
  the config (the official C/G evaluation sets its own). No tokenizer.json."""
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "tokenizer.model"), "wb") as f:
    f.write(_spm_model(LLAMA_VOCAB))
  _write_json(folder, "tokenizer_config.json", {
      "add_bos_token": True, "add_eos_token": add_eos_token, "bos_token": _legacy_added("<s>"),
      "clean_up_tokenization_spaces": False, "eos_token": _legacy_added("</s>"),
      "model_max_length": 1000000000000000019884624838656, "pad_token": None, "sp_model_kwargs": {},
      "tokenizer_class": "LlamaTokenizer", "unk_token": _legacy_added("<unk>")})
  _write_json(folder, "special_tokens_map.json", {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
  return folder


# InternLM2's chat tokens sit in its sentencepiece model as placeholder pieces (ids 92538..92543 there) that the
# released tokenizer_config.json renames through added_tokens_decoder; InternVL appends its own tokens after them.
INTERNLM2_RENAMED = ("<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>", "<|im_end|>",
                     "<|im_start|>")
INTERNVL_TOKENS = ("<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")
INTERNLM2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def internlm2_sentencepiece(folder: str) -> str:
  """tokenizer.model + tokenizer_config.json + special_tokens_map.json as InternVL-Chat-V1-5 / InternVL2-8B ship
  them: tokenizer_class InternLM2Tokenizer (auto_map to the remote tokenization_internlm2.py, not written here),
  add_bos_token true, bos <s>, eos </s>, pad </s>, unk <unk>; added_tokens_decoder holds <unk> <s> </s> (0..2), the
  renamed chat placeholders and InternVL's <img> </img> <IMG_CONTEXT> <quad> </quad> <ref> </ref> <box> </box>."""
  os.makedirs(folder, exist_ok=True)
  placeholders = tuple(f"[UNUSED_TOKEN_{141 + i}]" for i in range(len(INTERNLM2_RENAMED)))
  model = _spm_model(INTERNLM2_VOCAB, placeholders)
  with open(os.path.join(folder, "tokenizer.model"), "wb") as f:
    f.write(model)
  from sentencepiece import sentencepiece_model_pb2 as pb
  proto = pb.ModelProto()
  proto.ParseFromString(model)
  n = len(proto.pieces)
  added = {"0": _added("<unk>"), "1": _added("<s>"), "2": _added("</s>")}
  first = n - len(INTERNLM2_RENAMED)
  for i, token in enumerate(INTERNLM2_RENAMED):
    added[str(first + i)] = _added(token)
  for i, token in enumerate(INTERNVL_TOKENS):
    added[str(n + i)] = _added(token)
  _write_json(folder, "tokenizer_config.json", {
      "add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": added,
      "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|action_start|>", "<|action_end|>",
                                    "<|interpreter|>", "<|plugin|>", *INTERNVL_TOKENS],
      "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
      "bos_token": "<s>", "chat_template": INTERNLM2_CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
      "decode_with_prefix_space": False, "eos_token": "</s>", "model_max_length": 1000000000000000019884624838656,
      "pad_token": "</s>", "sp_model_kwargs": None, "tokenizer_class": "InternLM2Tokenizer", "unk_token": "<unk>"})
  _write_json(folder, "special_tokens_map.json", {
      "additional_special_tokens": list(INTERNVL_TOKENS), "bos_token": _added("<s>"), "eos_token": _added("</s>"),
      "pad_token": _added("</s>"), "unk_token": _added("<unk>")})
  return folder


# Qwen2's pre-tokenizer split (the regex of Qwen2's tokenizer files)
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n'"
    " }}{% endif %}")


@functools.lru_cache(maxsize=None)
def _byte_level_bpe() -> tuple[str, str]:
  """(vocab.json text, merges.txt text) of a tiny byte-level BPE with Qwen2's pre-tokenizer."""
  import tokenizers
  from tokenizers import Regex, models, normalizers, pre_tokenizers, trainers

  tok = tokenizers.Tokenizer(models.BPE())
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  trainer = trainers.BpeTrainer(vocab_size=700, min_frequency=2, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(_corpus(), trainer=trainer)
  with tempfile.TemporaryDirectory() as tmp:
    tok.model.save(tmp)
    with open(os.path.join(tmp, "vocab.json"), encoding="utf-8") as f:
      vocab = f.read()
    with open(os.path.join(tmp, "merges.txt"), encoding="utf-8") as f:
      merges = f.read()
  return vocab, merges


def qwen2_bpe(folder: str, *, tokenizer_json: bool = False) -> str:
  """vocab.json + merges.txt + tokenizer_config.json (+ added_tokens.json, special_tokens_map.json) of a Qwen2
  tokenizer with InternVL's tokens, as InternVL2-1B / InternVL2.5 / InternVL3 ship them: Qwen2Tokenizer, no bos,
  eos <|im_end|>, pad <|endoftext|>, added tokens <|endoftext|> <|im_start|> <|im_end|> then InternVL's, right
  after the BPE vocabulary. With tokenizer_json, also the tokenizer.json transformers writes from those files."""
  os.makedirs(folder, exist_ok=True)
  vocab, merges = _byte_level_bpe()
  with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
    f.write(vocab)
  with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
    f.write(merges)
  n = len(json.loads(vocab))
  tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *INTERNVL_TOKENS]
  _write_json(folder, "tokenizer_config.json", {
      "add_prefix_space": False, "added_tokens_decoder": {str(n + i): _added(t) for i, t in enumerate(tokens)},
      "additional_special_tokens": ["<|im_start|>", "<|im_end|>", *INTERNVL_TOKENS], "bos_token": None,
      "chat_template": QWEN2_CHAT_TEMPLATE, "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>",
      "errors": "replace", "model_max_length": 32768, "pad_token": "<|endoftext|>", "split_special_tokens": False,
      "tokenizer_class": "Qwen2Tokenizer", "unk_token": None})
  _write_json(folder, "added_tokens.json", {t: n + i for i, t in enumerate(tokens)})
  _write_json(folder, "special_tokens_map.json", {
      "additional_special_tokens": ["<|im_start|>", "<|im_end|>", *INTERNVL_TOKENS],
      "eos_token": _added("<|im_end|>"), "pad_token": _added("<|endoftext|>")})
  if tokenizer_json:
    add_tokenizer_json(folder)
  return folder


def add_tokenizer_json(folder: str) -> None:
  """Adds the tokenizer.json that transformers writes for the folder's slow files (as releases that ship both)."""
  from transformers import AutoTokenizer

  with tempfile.TemporaryDirectory() as tmp:
    AutoTokenizer.from_pretrained(folder).save_pretrained(tmp)
    shutil.copy(os.path.join(tmp, "tokenizer.json"), os.path.join(folder, "tokenizer.json"))

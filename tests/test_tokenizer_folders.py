"""Released tokenizer folders (tiny ones laid out like the releases, tests/tokenizer_folders.py) read by
data.tokenizer give transformers' ids; the InternLM2 folder (remote code) gives sentencepiece's ids plus the facts
of the official InternLM2Tokenizer; InternVL-C/G text ids; errors; our word-level tokenizer saved and reloaded."""

from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import pytest

from internvl_jax.data import tokenizer as tokenizer_lib
import tokenizer_folders

transformers = pytest.importorskip("transformers")

_PIECES = [
    "Hello", "world", "a red circle above a blue square", "The quick brown fox.", "it's", "don't", "I'm", "we'll",
    "一只猫坐在垫子上。", "你好", "天空是蓝色的", "中文English混合", "🙂", "🚀🚀", "👩‍👩‍👧", "café", "naïve", "Ω≈ç√",
    "12", "345", "3.14159", "2024-06-01", "1,000,000", "x^2", "!!", "?", "...", "--", "(a)", "[b]", "{c}", "\"q\"",
    "#", "@user", "a_b", "<s>", "</s>", "<unk>", "<img>", "</img>", "<IMG_CONTEXT>", "<|im_start|>", "<|im_end|>",
    "<|endoftext|>", "<quad>", "<box>", "</box>", "<ref>", "▁", "summarize:", "user\n", "assistant\n", "<", ">", "|",
]
_SEPS = ["", " ", "  ", "   ", "\n", "\n\n", "\t", " \n", "\r\n", "  \t "]
_FIXED = [
    "", " ", "  ", "\n", "\t", " leading", "trailing ", "  both  ", "double  space", "tabs\tin\ttext", "a\n\nb",
    "line one\nline two\n", "<img><IMG_CONTEXT><IMG_CONTEXT></img>", " <img><IMG_CONTEXT></img> ",
    "<img>" + "<IMG_CONTEXT>" * 5 + "</img>\nWhat is in the image?",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|><|im_start|>user\n<image>\nhi<|im_end|>"
    "<|im_start|>assistant\n", "<|im_start|>user\nDescribe.<|im_end|>\n<|im_start|>assistant\nA cat.<|im_end|>\n",
    "<s>hello</s>", "hello<s>", " <s> ", "<s><s>", "<unk>x", "x <unk> y", "summarize:a photo of a dog",
    "Provide a one-sentence caption for the provided image.", "请用一句话描述这张图片。", "数字123和456", "🙂🙂 🙂",
    "ＦＵＬＬＷＩＤＴＨ", "e\u0301", "\u00e9", "x" * 60, "word " * 30, "▁x ▁", "<IMG_CONTEXT >", "<IMG_CONTEXT",
]


def _strings(n: int = 240) -> list[str]:
  rng = random.Random(0)
  out = list(_FIXED)
  while len(out) < n:
    parts = [rng.choice(_PIECES) for _ in range(rng.randint(1, 5))]
    text = rng.choice(["", " ", "\n"])
    for p in parts:
      text += p + rng.choice(_SEPS)
    out.append(text)
  return out


STRINGS = _strings()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp("tok")
  out = {
      "llama": tokenizer_folders.llama_sentencepiece(str(root / "llama")),
      "qwen2": tokenizer_folders.qwen2_bpe(str(root / "qwen2")),
      "qwen2_json": tokenizer_folders.qwen2_bpe(str(root / "qwen2_json"), tokenizer_json=True),
      "internlm2": tokenizer_folders.internlm2_sentencepiece(str(root / "internlm2")),
  }
  # a LLaMA folder with the tokenizer.json transformers writes for it (as -hf folders ship)
  out["llama_json"] = tokenizer_folders.llama_sentencepiece(str(root / "llama_json"))
  tokenizer_folders.add_tokenizer_json(out["llama_json"])
  # config variants: legacy prefixing, eos added, a pad token the vocabulary lacks (added after it, as the
  # chinese-alpaca LLaMA folder of the official C/G code names "[PAD]" in special_tokens_map.json)
  out["llama_variants"] = tokenizer_folders.llama_sentencepiece(str(root / "llama_variants"), add_eos_token=True)
  _edit_config(out["llama_variants"], legacy=True)
  with open(os.path.join(out["llama_variants"], "special_tokens_map.json"), "w") as f:
    json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "[PAD]"}, f)
  out["llama_no_prefix"] = tokenizer_folders.llama_sentencepiece(str(root / "llama_no_prefix"))
  _edit_config(out["llama_no_prefix"], add_prefix_space=False)
  out["qwen2_variants"] = tokenizer_folders.qwen2_bpe(str(root / "qwen2_variants"))
  _edit_config(out["qwen2_variants"], add_prefix_space=True, add_bos_token=True, bos_token="<|endoftext|>")
  return out


@pytest.mark.parametrize("kind", ["llama", "llama_json", "llama_variants", "llama_no_prefix", "qwen2", "qwen2_json",
                                  "qwen2_variants"])
def test_ids_match_transformers(folders, kind):
  ref = transformers.AutoTokenizer.from_pretrained(folders[kind])
  ours = tokenizer_lib.load(folders[kind])
  assert os.path.exists(os.path.join(folders[kind], "tokenizer.json")) == kind.endswith("_json")
  assert (ours.add_bos_token, ours.add_eos_token) == (ref.add_bos_token, ref.add_eos_token) or kind.endswith("_json")
  assert len(STRINGS) >= 200
  assert ours.vocab_size == len(ref)
  assert (ours.bos_token, ours.eos_token, ours.pad_token, ours.unk_token) == (
      ref.bos_token, ref.eos_token, ref.pad_token, ref.unk_token)
  assert (ours.bos_id, ours.pad_id, ours.unk_id) == (ref.bos_token_id, ref.pad_token_id, ref.unk_token_id)
  assert ours.eos_id == ref.eos_token_id
  round_trips = 0
  for text in STRINGS:
    for special in (True, False):
      assert ours.encode(text, add_special_tokens=special) == ref(text, add_special_tokens=special)["input_ids"], (
          kind, text, special)
    ids = ref(text)["input_ids"]
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), (kind, text)
    round_trips += ours.decode(ours.encode(text)) == text
  # plain text comes back (special tokens are skipped on decode; add_prefix_space adds a space to every text)
  assert round_trips > len(STRINGS) // 2 or kind == "qwen2_variants"


def test_llama_ids_are_sentencepiece_ids_where_transformers_5_agrees(folders):
  """The official InternVL-C/G code ran transformers 4.x's slow LlamaTokenizer (legacy: sentencepiece's encode
  per chunk). transformers 5 (matched above) gives the same ids except for text that starts with a space or '▁'
  (its Metaspace adds no dummy prefix there) and text after a special token; the C/G captions ('summarize:...')
  are never such text."""
  import sentencepiece

  sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(folders["llama"], "tokenizer.model"))
  tok = tokenizer_lib.load(folders["llama"])
  same = [s for s in STRINGS if not s.startswith((" ", "▁")) and not any(t in s for t in ("<s>", "</s>", "<unk>"))]
  assert len(same) >= 100
  for text in same:
    assert tok.encode(text) == sp.encode(text), text
  assert tok.encode(" x") != sp.encode(" x")  # the documented difference


def test_release_settings(folders):
  llama = tokenizer_lib.load(folders["llama"])
  assert (llama.add_bos_token, llama.add_eos_token) == (True, False)
  assert llama.encode("a b", add_special_tokens=True)[0] == llama.bos_id == 1
  with pytest.raises(ValueError, match="does not hold <IMG_CONTEXT> as one token"):
    llama.image_token_id
  qwen = tokenizer_lib.load(folders["qwen2"])
  assert (qwen.bos_id, qwen.add_bos_token, qwen.add_eos_token) == (None, False, False)
  assert qwen.eos_token == "<|im_end|>" and qwen.pad_token == "<|endoftext|>"
  assert qwen.token_id("<|im_start|>") != qwen.bos_id  # no guessing from spellings
  with open(os.path.join(folders["qwen2"], "added_tokens.json")) as f:
    assert qwen.image_token_id == json.load(f)["<IMG_CONTEXT>"]
  assert qwen.token_id("<img>") == qwen.image_token_id - 2
  assert qwen.chat_template == tokenizer_folders.QWEN2_CHAT_TEMPLATE
  assert llama.chat_template is None


def _internlm2_reference(folder: str):
  """sentencepiece itself plus the facts of the official InternLM2Tokenizer (remote code, transformers 4.x slow
  tokenizer): the added tokens of tokenizer_config.json are never split and map to their ids; the text between
  them is encoded by sentencepiece chunk by chunk; bos (sentencepiece's bos id) is prepended, no eos."""
  import sentencepiece

  sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(folder, "tokenizer.model"))
  with open(os.path.join(folder, "tokenizer_config.json")) as f:
    added = {entry["content"]: int(i) for i, entry in json.load(f)["added_tokens_decoder"].items()}

  def encode(parts):  # parts alternate: text chunk, added token, text chunk, ...
    ids = [sp.bos_id()]
    for k, part in enumerate(parts):
      ids += [added[part]] if k % 2 else (sp.encode(part) if part else [])
    return ids
  return sp, added, encode


def test_internlm2_against_sentencepiece(folders):
  folder = folders["internlm2"]
  sp, added, reference = _internlm2_reference(folder)
  tok = tokenizer_lib.load(folder)
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (sp.bos_id(), sp.eos_id(), sp.eos_id(), sp.unk_id())
  assert (tok.add_bos_token, tok.add_eos_token) == (True, False)
  assert tok.image_token_id == added["<IMG_CONTEXT>"] == sp.get_piece_size() + 2
  assert tok.token_id("<|im_start|>") == added["<|im_start|>"] < sp.get_piece_size()  # a renamed placeholder
  assert tok.vocab_size == max(added.values()) + 1
  assert tok.chat_template == tokenizer_folders.INTERNLM2_CHAT_TEMPLATE
  rng = random.Random(1)
  specials = [t for t in added if t not in ("<unk>",)]
  plain = [s for s in STRINGS if not any(t in s for t in added)]
  assert len(plain) >= 100
  for text in plain:
    assert tok.encode(text, add_special_tokens=True) == reference([text])
    assert tok.encode(text) == sp.encode(text)
    assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text))
  for _ in range(150):
    parts = []
    for _ in range(rng.randint(1, 4)):
      parts += [rng.choice(plain[:60]) if rng.random() < 0.7 else "", rng.choice(specials)]
    parts.append(rng.choice(plain[:60]))
    text = "".join(parts)
    assert tok.encode(text, add_special_tokens=True) == reference(parts), text
  ids = tok.encode("<img><IMG_CONTEXT><IMG_CONTEXT></img>")
  assert ids == [added["<img>"], added["<IMG_CONTEXT>"], added["<IMG_CONTEXT>"], added["</img>"]]


def test_contrastive_text_ids_match_official_call(folders):
  """The official InternVL-C/G tokenisation: LlamaTokenizer of the folder (add_eos_token false there) with
  add_eos_token forced True, pad token ' ' (id 0), max_length=80, truncation, padding='max_length'. The 4.x slow
  LlamaTokenizer of the official code pads on the right (transformers 5 defaults LLaMA to the left)."""
  ref = transformers.LlamaTokenizer.from_pretrained(folders["llama"], padding_side="right")
  ref.pad_token = " "
  ref.add_eos_token = True
  assert ref.pad_token_id == 0
  tok = tokenizer_lib.load(folders["llama"])
  texts = ["summarize:" + t for t in ["a cat", "", "一只猫坐在垫子上。", "word " * 100, "a photo of " * 30,
                                      "x" * 78, "two  spaces\tand tabs"]] + STRINGS[40:80]
  want = ref(texts, max_length=80, truncation=True, padding="max_length")
  ids, mask = tokenizer_lib.contrastive_text_ids(tok, texts, max_len=80)
  assert ids.dtype == mask.dtype == np.int32 and ids.shape == mask.shape == (len(texts), 80)
  np.testing.assert_array_equal(ids, np.asarray(want["input_ids"]))
  # the official mask is ids > 0: the attention mask, except where the text itself holds "<unk>" (id 0)
  np.testing.assert_array_equal(mask, ids > 0)
  plain = ["<unk>" not in t for t in texts]
  assert 0 < sum(plain) < len(texts)
  np.testing.assert_array_equal(mask[plain], np.asarray(want["attention_mask"])[plain])
  long = ids[3]
  assert long[0] == tok.bos_id and long[-1] == tok.eos_id and mask[3].all()
  last = mask[plain].sum(1) - 1  # where the C/G text feature is read: the eos
  assert (ids[plain][np.arange(sum(plain)), last] == tok.eos_id).all()


def _edit_config(folder: str, **changes) -> None:
  tokenizer_folders.update_json(folder, "tokenizer_config.json", **changes)


def test_errors_name_file_and_field(tmp_path):
  qwen = tokenizer_folders.qwen2_bpe(str(tmp_path / "qwen"))
  _edit_config(qwen, eos_token=None)
  tok = tokenizer_lib.load(qwen)
  with pytest.raises(ValueError) as e:
    tok.eos_id
  assert str(e.value).startswith(f"tokenizer_config.json of {qwen} defines no eos_token") and "\n" not in str(e.value)

  llama = tokenizer_folders.llama_sentencepiece(str(tmp_path / "llama"))
  os.remove(os.path.join(llama, "special_tokens_map.json"))
  _edit_config(llama, bos_token=None)
  with pytest.raises(ValueError, match=f"tokenizer_config.json of {llama} sets add_bos_token but defines no bos_"):
    tokenizer_lib.load(llama)

  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "config.json").write_text("{}")
  with pytest.raises(FileNotFoundError) as e:
    tokenizer_lib.load(str(empty))
  assert "holds no tokenizer: looked for tokenizer.json, tokenizer.model, vocab.json + merges.txt" in str(e.value)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    tokenizer_lib.load(str(tmp_path / "nowhere"))
  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / "tokenizer.json").write_text("{not json")
  with pytest.raises(ValueError, match="tokenizer.json is not a tokenizers file"):
    tokenizer_lib.load(str(broken))
  with pytest.raises(ValueError, match=r"^tokenizer raw defines no eos_token; pass it to Tokenizer"):
    tokenizer_lib.Tokenizer(tok.tok, "raw").eos_id


def test_chat_template_sources(tmp_path):
  folder = tokenizer_folders.qwen2_bpe(str(tmp_path / "q"))
  _edit_config(folder, chat_template=[{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}])
  assert tokenizer_lib.load(folder).chat_template == "D"
  with open(os.path.join(folder, "chat_template.json"), "w") as f:
    json.dump({"chat_template": "from processor"}, f)
  assert tokenizer_lib.load(folder).chat_template == "from processor"
  with open(os.path.join(folder, "chat_template.jinja"), "w") as f:
    f.write("from jinja")
  assert tokenizer_lib.load(folder).chat_template == "from jinja"


def _captions():
  return ["a red circle above a blue square", "two dogs play in the snow", "a cat, a mat."]


def test_word_level_save_load_keeps_specials(tmp_path):
  tok = tokenizer_lib.build_word_level(_captions())
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (2, 3, 0, 1)
  assert (tok.add_bos_token, tok.add_eos_token) == (True, False)
  assert tok.encode("a cat", add_special_tokens=True) == [2] + tok.encode("a cat")
  tok.save(str(tmp_path / "wd"))
  again = tokenizer_lib.load(str(tmp_path / "wd"))
  assert (again.bos_token, again.eos_token, again.pad_token, again.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
  assert (again.add_bos_token, again.add_eos_token) == (True, False)
  assert again.encode("A Cat, a dog", add_special_tokens=True) == tok.encode("a cat, a dog", add_special_tokens=True)
  assert again.image_token_id == tok.image_token_id == 6
  # transformers reads what we save the same way
  ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "wd"))
  assert ref("a cat sat")["input_ids"] == again.encode("a cat sat", add_special_tokens=True)
  assert (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id) == (2, 3, 0)
  # the older call: a path to tokenizer.json means its folder
  tok.save(str(tmp_path / "old_call" / "tokenizer.json"))
  assert sorted(os.listdir(tmp_path / "old_call")) == ["tokenizer.json", "tokenizer_config.json"]


def test_old_bare_word_level_tokenizer_json_still_loads(tmp_path):
  tok = tokenizer_lib.build_word_level(_captions())
  (tmp_path / "wd").mkdir()
  tok.tok.post_processor = None  # as build_word_level wrote it before: no post-processor, no config
  tok.tok.save(str(tmp_path / "wd" / "tokenizer.json"))
  for path in (str(tmp_path / "wd"), str(tmp_path / "wd" / "tokenizer.json")):
    old = tokenizer_lib.load(path)
    assert (old.bos_id, old.eos_id, old.pad_id, old.add_bos_token) == (2, 3, 0, True)
    assert old.encode("a cat") == tok.encode("a cat")
  assert tokenizer_lib.load_or_build("", str(tmp_path / "wd"), lambda: ["never built"]).eos_id == 3


@pytest.mark.parametrize("kind", ["llama", "internlm2", "qwen2"])
def test_released_tokenizer_saved_into_workdir_keeps_everything(folders, tmp_path, kind):
  tok = tokenizer_lib.load(folders[kind])
  tok.save(str(tmp_path / "wd"))
  assert tokenizer_lib.saved_in(str(tmp_path / "wd"))
  again = tokenizer_lib.load_or_build("", str(tmp_path / "wd"), lambda: ["never built"])
  for name in ("bos_token", "eos_token", "pad_token", "unk_token", "add_bos_token", "add_eos_token",
               "chat_template", "vocab_size"):
    assert getattr(again, name) == getattr(tok, name), name
  for text in STRINGS[:80]:
    assert again.encode(text, add_special_tokens=True) == tok.encode(text, add_special_tokens=True), text
  shutil.rmtree(tmp_path / "wd")


def test_a_tokenizer_json_post_processor_places_bos_eos_over_the_config_flags(tmp_path):
  """transformers 5 drops tokenizer_config.json's add_bos_token / add_eos_token when a tokenizer.json is present:
  the file's post-processor decides; the flags are read off it."""
  from tokenizers import Tokenizer, models, pre_tokenizers, processors
  raw = Tokenizer(models.WordLevel({"a": 0, "b": 1, "<s>": 2, "</s>": 3, "<unk>": 4}, unk_token="<unk>"))
  raw.pre_tokenizer = pre_tokenizers.Whitespace()
  raw.add_special_tokens(["<s>", "</s>", "<unk>"])
  raw.post_processor = processors.TemplateProcessing(single="<s>:0 $A:0 </s>:0", special_tokens=[("<s>", 2),
                                                                                                  ("</s>", 3)])
  raw.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({
      "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
      "add_bos_token": False, "add_eos_token": False}))
  ours = tokenizer_lib.load(str(tmp_path))
  ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  assert ours.encode("a b", add_special_tokens=True) == ref("a b")["input_ids"] == [2, 0, 1, 3]
  assert (ours.add_bos_token, ours.add_eos_token) == (True, True)

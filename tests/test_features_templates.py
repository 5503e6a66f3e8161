"""Stage-3 features with the released conversation templates and tokenizers, against transformers' tokenizers on
literal expected strings (the layout and label rule of OpenGVLab's training preprocess, docs/templates.md), and
the property that inference prompts (data/chat_format.py) are exactly the trained prompts."""

import numpy as np
import pytest
from transformers import AutoTokenizer

import tokenizer_folders
from internvl_jax.data import chat_format, features, tokenizer

N = 2  # vision tokens per tile
BLOCK = "<img>" + "<IMG_CONTEXT>" * N + "</img>"
SYS_V25 = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
RECORD = {"image": np.full((28, 28, 3), 90, np.uint8), "conversations": [
    {"from": "human", "value": "What colour is the car?"}, {"from": "gpt", "value": "Red."},
    {"from": "human", "value": "And the sky?"}, {"from": "gpt", "value": "Blue, with clouds."}]}


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
  folder = tokenizer_folders.qwen2_bpe(str(tmp_path_factory.mktemp("qwen2")))
  return tokenizer.load(folder), AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def internlm2(tmp_path_factory):
  return tokenizer.load(tokenizer_folders.internlm2_sentencepiece(str(tmp_path_factory.mktemp("internlm2"))))


HARMONY = ["<|start|>", "<|message|>", "<|end|>", "<|return|>", "<|channel|>"]


@pytest.fixture(scope="module")
def gpt_oss_like(tmp_path_factory):
  """A BPE tokenizer folder with gpt-oss's harmony special tokens (and InternVL's image tokens) added."""
  ref = AutoTokenizer.from_pretrained(tokenizer_folders.qwen2_bpe(str(tmp_path_factory.mktemp("base"))))
  ref.add_special_tokens({"additional_special_tokens": HARMONY})
  folder = str(tmp_path_factory.mktemp("gpt_oss_like"))
  ref.save_pretrained(folder)
  return tokenizer.load(folder), AutoTokenizer.from_pretrained(folder)


def _features(tok, template, record, max_len=200, system=None):
  spec = features.FeatureSpec("instruct", 28, max_len, tokens_per_tile=N, max_tiles=1, template=template,
                              system=system)
  f = features.make_feature_fn(spec, tok)(record, None)
  n = int(f["attention_mask"].sum())
  return f["input_ids"][:n].tolist(), f["loss_mask"][:n].tolist(), f


def test_internvl2_5_units_and_labels_as_the_official_preprocess(qwen2):
  tok, ref = qwen2
  ids, loss, _ = _features(tok, "internvl2_5", RECORD)
  # preprocess_internvl2_5: the system block, each user block and each assistant block tokenised on their own
  units = [f"<|im_start|>system\n{SYS_V25}<|im_end|>\n",
           f"<|im_start|>user\n{BLOCK}\nWhat colour is the car?<|im_end|>\n", "<|im_start|>assistant\nRed.<|im_end|>\n",
           "<|im_start|>user\nAnd the sky?<|im_end|>\n", "<|im_start|>assistant\nBlue, with clouds.<|im_end|>\n"]
  want = [i for u in units for i in ref(u, add_special_tokens=False)["input_ids"]]
  assert ids == want
  # trained: each answer and its <|im_end|>, not the role, not the newline after <|im_end|>
  trained = [i for i, m in zip(ids, loss) if m]
  assert trained == ref("Red.<|im_end|>Blue, with clouds.<|im_end|>", add_special_tokens=False)["input_ids"]


def test_system_turn_of_a_record_and_of_the_config(qwen2):
  tok, ref = qwen2
  rec = dict(RECORD, conversations=[{"from": "system", "value": "Be brief."}] + RECORD["conversations"][:2])
  ids, _, _ = _features(tok, "internvl2_5", rec, system="ignored: the record's own system turn wins")
  assert ref.decode(ids).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<img>")
  ids, _, _ = _features(tok, "Hermes-2", dict(RECORD, conversations=RECORD["conversations"][:2]), system="")
  # Hermes-2: '<|im_end|>' with no newline, and the system block is written even when empty
  want = f"<|im_start|>system\n<|im_end|><|im_start|>user\n{BLOCK}\nWhat colour is the car?<|im_end|>" \
         "<|im_start|>assistant\nRed.<|im_end|>"
  assert ids == ref(want, add_special_tokens=False)["input_ids"]


def test_internlm2_gets_its_bos_and_whole_string_tokens(internlm2):
  tok = internlm2
  ids, loss, _ = _features(tok, "internlm2-chat", RECORD)
  assert ids[0] == tok.bos_id and tok.add_bos_token  # InternLM2's tokenizer config adds <s>
  sys_v1 = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
  whole = (f"<|im_start|>system\n{sys_v1}<|im_end|><|im_start|>user\n{BLOCK}\nWhat colour is the car?<|im_end|>"
           "<|im_start|>assistant\nRed.<|im_end|><|im_start|>user\nAnd the sky?<|im_end|><|im_start|>assistant\n"
           "Blue, with clouds.<|im_end|>")
  # preprocess_internlm tokenises the whole conversation at once: the per-piece ids must equal it
  assert ids == tok.encode(whole, add_special_tokens=True)
  assert tok.decode([i for i, m in zip(ids, loss) if m], skip_special_tokens=False) == \
      "Red.<|im_end|>Blue, with clouds.<|im_end|>"


def test_gpt_oss_units_and_labels_as_the_official_preprocess(gpt_oss_like):
  tok, ref = gpt_oss_like
  ids, loss, _ = _features(tok, "internvl3_5_gpt_oss", RECORD, system="S")
  # preprocess_internvl3_5_gpt_oss: one tokenizer call per message; an answer is '<|start|>assistant<|channel|>
  # final<|message|>' + value + '<|end|>' ('<|return|>' for the last), its '<|start|>assistant' tokens unlabelled
  units = ["<|start|>system<|message|>S<|end|>", f"<|start|>user<|message|>{BLOCK}\nWhat colour is the car?<|end|>",
           "<|start|>assistant<|channel|>final<|message|>Red.<|end|>", "<|start|>user<|message|>And the sky?<|end|>",
           "<|start|>assistant<|channel|>final<|message|>Blue, with clouds.<|return|>"]
  unit_ids = [ref(u, add_special_tokens=False)["input_ids"] for u in units]
  assert ids == [i for u in unit_ids for i in u]
  skip = len(ref("<|start|>assistant", add_special_tokens=False)["input_ids"])
  answers = (2, 4)  # the assistant units
  want = [m for k, u in enumerate(unit_ids) for m in ([0] * skip + [1] * (len(u) - skip) if k in answers else
                                                       [0] * len(u))]
  assert loss == want


@pytest.mark.parametrize("template", ["internvl2_5", "Hermes-2", "internlm2-chat", "internvl3_5_gpt_oss", "plain"])
def test_inference_prompt_is_the_trained_prompt(qwen2, internlm2, gpt_oss_like, template):
  if template == "plain":
    tok = tokenizer.build_word_level(["what colour is the car ? red ."])
  elif template == "internvl3_5_gpt_oss":
    tok = gpt_oss_like[0]
  else:
    tok = internlm2 if template == "internlm2-chat" else qwen2[0]
  rec = dict(RECORD, conversations=RECORD["conversations"][:2])
  ids, loss, _ = _features(tok, template, rec, max_len=800)  # room for gpt-oss's long default system message
  assert len(ids) < 800  # not truncated
  fmt = chat_format.ChatFormat(tok, 28, N, template=template)
  prompt = fmt.input_ids("What colour is the car?", [1])
  assert ids[:loss.index(1)] == prompt
  last_trained = max(i for i, m in enumerate(loss) if m)
  assert ids[last_trained] in fmt.stop_ids  # the trained end of the answer is where generation stops


def test_text_only_records_keep_their_image_slots_unattended(qwen2):
  tok, _ = qwen2
  rec = {"conversations": RECORD["conversations"][:2]}
  spec = features.FeatureSpec("instruct", 28, 120, tokens_per_tile=N, max_tiles=2, template="internvl2_5")
  f = features.make_feature_fn(spec, tok)(rec, None)
  img = f["input_ids"] == tok.image_token_id
  assert img.sum() == 2 * N and not f["attention_mask"][img].any()
  assert not f["pixel_values"].any()
  with pytest.raises(ValueError, match="cuts into"):
    features.make_feature_fn(features.FeatureSpec("instruct", 28, 20, tokens_per_tile=N, max_tiles=1,
                                                  template="internvl2_5"), tok)(RECORD, None)


def test_captions_of_a_released_c_g_tokenizer_are_the_published_text_layout(tmp_path):
  tok = tokenizer.load(tokenizer_folders.llama_sentencepiece(str(tmp_path)))
  texts = ["summarize:a dog on a sofa", "summarize:" + "two dogs play in the snow " * 12]
  want, want_mask = tokenizer.contrastive_text_ids(tok, texts, 80)
  for i, text in enumerate(texts):
    ids, mask = features.caption_tokens(tok, text, 80)
    np.testing.assert_array_equal(ids, want[i])
    np.testing.assert_array_equal(mask, want_mask[i])

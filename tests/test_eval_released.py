"""Released folders end to end (tiny folders laid out like InternVL-14B, InternVL-Chat-V1-5, InternVL2-1B and
InternVL3-1B-hf, tests/release_folders.py): eval.py's model tokenises, prompts, stops and answers as the official
code does. References: transformers' tokenizers and models on the same files, and the official prompt strings
written out literally (docs/templates.md)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import skimage.data
import torch
from transformers import AutoTokenizer, LlamaTokenizer

import release_folders
from internvl_jax.data import chat_format
from internvl_jax.evaluate import models, report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYS_V1 = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
BLOCK = "<img>" + "<IMG_CONTEXT>" * 4 + "</img>"  # one 56 px tile = 4 vision tokens
QUESTION = "What is in the picture? Answer the question using a single word or phrase."
# the prompt chat() builds: template, default system message, '<image>\n' in front, the open assistant turn
PROMPTS = {
    "internvl2_1b": f"<|im_start|>system\n{SYS_V1}<|im_end|><|im_start|>user\n{BLOCK}\n{QUESTION}<|im_end|>"
                    "<|im_start|>assistant\n",
    "internvl_chat_v1_5": f"<|im_start|>system\n{SYS_V1}<|im_end|><|im_start|>user\n{BLOCK}\n{QUESTION}<|im_end|>"
                          "<|im_start|>assistant\n",
    # the -hf release's Jinja template: no default system turn, '<|im_end|>\n' separators
    "internvl3_hf": f"<|im_start|>user\n{BLOCK}\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n",
}


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
  out = {}
  for name in ("internvl_14b", "internvl_chat_v1_5", "internvl2_1b", "internvl3_hf"):
    out[name] = getattr(release_folders, name)(str(tmp_path_factory.mktemp(name)))
  return out


@pytest.mark.parametrize("name", ["internvl2_1b", "internvl_chat_v1_5", "internvl3_hf"])
def test_chat_prompt_and_stop_ids_as_the_official_code(releases, name):
  folder, _ = releases[name]
  model = models.load_hf(folder)
  tok = model.tokenizer
  ids = model.prompt_ids(QUESTION)
  if name == "internvl_chat_v1_5":
    # InternLM2's remote-code tokenizer (no transformers class): its <s> first, then the prompt; the tokenizer
    # itself is checked against sentencepiece in test_tokenizer_folders
    assert ids[0] == tok.bos_id == tok.token_id("<s>")
    assert ids == tok.encode(PROMPTS[name], add_special_tokens=True)
    want_stops = [tok.token_id("<|im_end|>"), tok.token_id("</s>")]  # the separator's token, then its eos
  else:
    assert ids == AutoTokenizer.from_pretrained(folder)(PROMPTS[name])["input_ids"]
    want_stops = [tok.token_id("<|im_end|>")]
    if name == "internvl3_hf":  # generation_config.json's eos_token_id list
      want_stops.append(tok.token_id("<|endoftext|>"))
  assert list(model.chat.stop_ids) == want_stops
  assert model.chat.answer(tok.encode(" Red.<|im_end|>junk")) == "Red."


@pytest.mark.parametrize("name", ["internvl2_1b", "internvl3_hf"])
def test_greedy_answers_equal_transformers(releases, name):
  folder, ref = releases[name]
  model = models.load_hf(folder)
  hf_tok = AutoTokenizer.from_pretrained(folder)
  questions = ["What is this?", "Describe the image in detail please.", "Count."]
  photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()]
  pixels = np.concatenate([chat_format.preprocess_image(p, 56, dynamic=False) for p in photos])
  prompts = [model.prompt_ids(q) for q in questions]
  ours = model.generate(pixels, prompts, max_new_tokens=6, min_new_tokens=1)
  stops = list(model.chat.stop_ids)
  for i, prompt in enumerate(prompts):
    with torch.no_grad():
      out = ref.generate(input_ids=torch.tensor([prompt]), pixel_values=torch.from_numpy(pixels[i:i + 1]).permute(
          0, 3, 1, 2), max_new_tokens=6, min_new_tokens=1, eos_token_id=stops, do_sample=False, pad_token_id=stops[0])
    new = out[0, len(prompt):].tolist()
    cut = next((k for k, t in enumerate(new) if t in stops), len(new))
    want = hf_tok.decode(new[:cut], skip_special_tokens=True).split("<|im_end|>")[0].strip()
    assert ours[i] == want


def test_internvl_c_g_texts_as_the_published_evaluation(releases):
  folder, _ = releases["internvl_14b"]
  model = models.load_hf(folder)
  texts = ["a dog on a red sofa", "两只狗在雪地里玩耍 " * 20]  # the second is cut at 80 tokens
  ours = model.tokenize(texts)
  # clip_benchmark's InternVLTokenizer: LlamaTokenizer, pad_token ' ', add_eos_token True, 'summarize:' + text,
  # max_length 80, truncation, padding to max_length (right, as transformers 4.x pads LLaMA)
  official = LlamaTokenizer.from_pretrained(folder, padding_side="right")
  official.pad_token = " "
  official.add_eos_token = True
  want = official(["summarize:" + t for t in texts], max_length=80, truncation=True, padding="max_length")
  np.testing.assert_array_equal(ours["input_ids"], np.asarray(want["input_ids"]))
  np.testing.assert_array_equal(ours["attention_mask"], np.asarray(want["input_ids"]) > 0)
  assert ours["input_ids"][1, -1] == official.eos_token_id  # the EOS survives truncation: it is the pooled token


def _eval(args):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--progress=false"] + args, cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=300)


def _vqa_set(tmp_path) -> str:
  from PIL import Image
  path = tmp_path / "vqa.jsonl"
  with open(path, "w") as f:
    for i, (name, answer) in enumerate((("astronaut", "person"), ("coffee", "cup"))):
      Image.fromarray(getattr(skimage.data, name)()).save(tmp_path / f"{i}.png")
      f.write(json.dumps({"image": f"{i}.png", "question": "What is this?", "answers": [answer]}) + "\n")
  return str(path)


@pytest.mark.parametrize("name", ["internvl2_1b", "internvl_chat_v1_5", "internvl3_hf"])
def test_eval_py_vqa_on_released_chat_folders(releases, tmp_path, name):
  folder, _ = releases[name]
  out = str(tmp_path / "vqa.json")
  extra = ["--dynamic", "--max_num", "4"] if name == "internvl_chat_v1_5" else []
  res = _eval(["--task", "vqa", "--hf", folder, "--data", "jsonl:" + _vqa_set(tmp_path), "--out", out,
               "--batch_size", "2", "--max_new_tokens", "3"] + extra)
  assert res.returncode == 0, res.stderr[-3000:]
  result = json.load(open(out))
  report.validate_result(result)
  assert result["min_new_tokens"] == 1 and result["max_new_tokens"] == 3
  assert result["template"] == {"internvl2_1b": "Hermes-2", "internvl_chat_v1_5": "internlm2-chat",
                                "internvl3_hf": "chat_template (Jinja)"}[name]
  assert result["dynamic"] == bool(extra) and result["max_num"] == (4 if extra else 1)
  assert result["samples"][0]["question"] == "What is this? Answer the question using a single word or phrase."


def test_eval_py_retrieval_on_internvl_14b(releases, tmp_path):
  folder, _ = releases["internvl_14b"]
  out = str(tmp_path / "retrieval.json")
  res = _eval(["--task", "retrieval", "--hf", folder, "--data", "demo:4", "--out", out, "--batch_size", "4",
               "--cache_dir", str(tmp_path / "cache")])
  assert res.returncode == 0, res.stderr[-3000:]
  result = json.load(open(out))
  report.validate_result(result)
  assert result["text_prefix"] == "summarize:" and result["num_texts"] == 8


@pytest.mark.parametrize("name", ["internvl2_1b", "internvl3_hf"])
def test_readme_chat_example_runs_on_a_release(releases, tmp_path, name):
  # the README's example, verbatim but for the folder, the photo and the length
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    readme = f.read()
  code = readme.split("```python\n", 1)[1].split("```", 1)[0]
  from PIL import Image
  photo = str(tmp_path / "photo.png")
  Image.fromarray(skimage.data.coffee()).save(photo)
  code = (code.replace('"/models/InternVL3-1B"', repr(releases[name][0])).replace('"photo.jpg"', repr(photo))
          .replace("max_new_tokens=64", "max_new_tokens=4"))
  printed = []
  exec(compile(code, "README.md", "exec"), {"print": printed.append})
  assert len(printed) == 1 and isinstance(printed[0], str)

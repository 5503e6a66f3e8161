"""`python -m internvl_jax.convert export`: complete folders out (convert/release.py). References: transformers'
InternVL model, tokenizer (apply_chat_template), GenerationConfig and GotOcr2 image processor loading the exported
files; the official prompt strings (docs/templates.md); the OpenGVLab layout of tests/opengvlab_layout.py (written
from the official names, not from our key maps)."""

import json
import os

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from safetensors.numpy import load_file
from transformers import AutoTokenizer, GenerationConfig, InternVLForConditionalGeneration
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

import release_folders
from internvl_jax import convert
from internvl_jax.convert import __main__ as cli
from internvl_jax.data import chat_format, templates

SYS_V1 = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
QUESTION = "What is in the picture?"


@pytest.mark.parametrize("name", templates.NAMES)
def test_jinja_of_each_template_renders_as_the_template(name):
  jinja = templates.to_jinja(name)
  for turns, system in (([("Hi", "Hello!"), ("Name?", None)], None), ([("<image>\nWhat?", None)], "S"),
                        ([("q", "a")], ""), ([("", "x"), ("q", None)], None)):
    if name == "plain" and system:
      continue
    messages = templates.messages_from_turns(turns, system=system, image_count=int("<image>" in turns[0][0]))
    got = templates.render_jinja(jinja, messages, add_generation_prompt=turns[-1][1] is None)
    # the -hf form writes each image as <IMG_CONTEXT>, which the processor expands (chat() writes <image>)
    assert got == templates.render(name, [(q.replace("<image>", "<IMG_CONTEXT>"), a) for q, a in turns],
                                   system=system)
  assert "Be brief." in templates.render_jinja(templates.to_jinja("internvl2_5", "Be brief."),
                                               [{"role": "user", "content": "q"}])


@pytest.fixture(scope="module")
def release(tmp_path_factory):
  folder, ref = release_folders.internvl2_1b(str(tmp_path_factory.mktemp("internvl2_1b")))
  return folder, ref


def test_native_export_is_a_complete_transformers_folder(release, tmp_path):
  src, ref = release
  out = str(tmp_path / "native")
  assert cli.main(["export", src, out]) == 0
  for name in ("config.json", "model.safetensors", "tokenizer_config.json", "chat_template.jinja",
               "generation_config.json", "preprocessor_config.json", "processor_config.json"):
    assert os.path.exists(os.path.join(out, name)), name
  # weights: transformers' model on the exported folder computes what the release computes
  back = InternVLForConditionalGeneration.from_pretrained(out)
  ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
  with torch.no_grad():
    np.testing.assert_array_equal(back(input_ids=ids).logits.numpy(), ref(input_ids=ids).logits.numpy())
  # prompt: transformers' tokenizer renders the official chat() prompt (Hermes-2, default system message)
  hf_tok = AutoTokenizer.from_pretrained(out)
  messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
  text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  assert text == (f"<|im_start|>system\n{SYS_V1}<|im_end|><|im_start|>user\n<IMG_CONTEXT>\n{QUESTION}<|im_end|>"
                  "<|im_start|>assistant\n")
  # our reader of the exported folder prompts and stops exactly as on the release
  model = convert.load_pretrained(out)
  exported, original = (chat_format.ChatFormat.from_folder(f, model.config) for f in (out, src))
  assert exported.input_ids(QUESTION, [2]) == original.input_ids(QUESTION, [2])
  stops = [hf_tok.convert_tokens_to_ids("<|im_end|>"), hf_tok.eos_token_id]
  assert GenerationConfig.from_pretrained(out).eos_token_id == list(dict.fromkeys(stops)) == list(exported.stop_ids)
  # images: transformers' processor configured by the exported files tiles as we do
  with open(os.path.join(out, "processor_config.json")) as f:
    assert json.load(f)["image_seq_length"] == original.tokens_per_tile == 4
  photo = skimage.data.coffee()
  processor = GotOcr2ImageProcessorPil.from_pretrained(out)
  want = processor(images=[Image.fromarray(photo)], return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
  ours = chat_format.preprocess_image(photo, 56, max_num=original.max_num, use_thumbnail=True)
  assert ours.shape == want.shape and ours.shape[0] > 1  # dynamic tiles + thumbnail
  np.testing.assert_allclose(ours, want, atol=1e-5)


def test_opengvlab_export_writes_the_release_layout(release, tmp_path):
  src, _ = release
  out = str(tmp_path / "opengvlab")
  assert cli.main(["export", src, out, "--layout", "opengvlab"]) == 0
  with open(os.path.join(src, "config.json")) as f:
    want_cfg = json.load(f)
  with open(os.path.join(out, "config.json")) as f:
    got_cfg = json.load(f)
  for key in ("model_type", "architectures", "template", "select_layer", "downsample_ratio", "ps_version",
              "force_image_size", "use_thumbnail", "max_dynamic_patch"):
    assert got_cfg[key] == want_cfg[key], key
  assert got_cfg["llm_config"]["architectures"] == want_cfg["llm_config"]["architectures"]
  assert got_cfg["llm_config"]["rope_theta"] == want_cfg["llm_config"]["rope_theta"]
  for key in ("hidden_size", "num_hidden_layers", "qk_normalization", "qkv_bias", "norm_type", "image_size"):
    assert got_cfg["vision_config"][key] == want_cfg["vision_config"][key], key
  # the same tensors under the same names as the release
  want, got = load_file(os.path.join(src, "model.safetensors")), load_file(os.path.join(out, "model.safetensors"))
  assert sorted(got) == sorted(want)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  assert AutoTokenizer.from_pretrained(out)("<|im_end|>")["input_ids"] == \
      AutoTokenizer.from_pretrained(src)("<|im_end|>")["input_ids"]


def test_export_errors_are_one_line(tmp_path, capsys):
  assert cli.main(["export", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
  assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow  # trains a tiny stage 3 for 2 steps (~30-60 s on 2 cores)
def test_a_train_py_workdir_exports_both_layouts(tmp_path):
  from conftest import tiny_config
  from internvl_jax.train import loop
  from internvl_jax.evaluate import models
  workdir = str(tmp_path / "run")
  loop.run(tiny_config("instruct", total_steps=2, **{"data.eval.size": 8}), workdir)
  trained = models.load_workdir(workdir, "caption")
  native, og = str(tmp_path / "native"), str(tmp_path / "og")
  assert cli.main(["export", workdir, native]) == 0
  assert cli.main(["export", workdir, og, "--layout", "opengvlab"]) == 0
  # the trained prompt, through transformers' tokenizer and our reader of each exported folder
  question = "what colour is the car ?"
  want_ids = trained.chat.input_ids(question, [1])
  hf_tok = AutoTokenizer.from_pretrained(native)
  messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
  text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  assert chat_format.expand_placeholders(text, "<IMG_CONTEXT>", [1], trained.chat.tokens_per_tile) == \
      trained.chat.prompt(question, [1])
  for folder in (native, og):
    model = convert.load_pretrained(folder)
    fmt = chat_format.ChatFormat.from_folder(folder, model.config)
    assert fmt.input_ids(question, [1]) == want_ids and fmt.stop_ids == trained.chat.stop_ids
  # transformers' model on the native folder computes our trained model's logits
  rng = np.random.default_rng(0)
  size = trained.chat.image_size
  pixels = rng.standard_normal((1, size, size, 3)).astype(np.float32)
  ids = np.asarray([want_ids])
  ours = np.asarray(trained.model(ids, pixel_values=pixels).logits)
  back = InternVLForConditionalGeneration.from_pretrained(native)
  with torch.no_grad():
    theirs = back(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2)).logits
  np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-4, atol=1e-4)

"""Fine-tuning from a transformers-native (-hf) folder: its Jinja chat template is recognised as one of our named
templates (data/template_match.py), and the trained token ids of a conversation are the ones transformers'
InternVL processor / tokenizer make of the same conversation with the folder's own template (the text of
transformers' InternVL conversion script, tests/fixtures/internvl_hf_chat_template.json)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import release_folders
from conftest import load_config_file
import tokenizer_folders
from internvl_jax.data import features, template_match, templates
from internvl_jax.data import tokenizer as tokenizer_lib
from internvl_jax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSTEM = "Answer briefly."


def _finetune_config(arg):
  return load_config_file("finetune", arg)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """{'qwen2': an InternVL3-1B-hf-like folder, 'llama': an InternVL2_5-8B-hf-like one (BOS-adding tokenizer)}."""
  return {"qwen2": release_folders.internvl3_hf(str(tmp_path_factory.mktemp("qwen2_hf")))[0],
          "llama": release_folders.internvl2_5_llama_hf(str(tmp_path_factory.mktemp("llama_hf")))[0]}


def _processor(folder):
  """transformers' InternVLProcessor over the folder's tokenizer and chat template: 56 px tiles, one per image
  (max_dynamic_patch=1), 4 image tokens per tile."""
  from transformers import AutoTokenizer, InternVLProcessor
  from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

  class Processor(InternVLProcessor):
    # torchvision is not installed here, so transformers cannot name a video-processor class to check a None
    # video processor against; skip only that check
    def check_argument_for_proper_class(self, argument_name, argument):
      if argument is not None:
        return super().check_argument_for_proper_class(argument_name, argument)

  images = GotOcr2ImageProcessorPil(size={"height": 56, "width": 56}, crop_to_patches=False)
  tok = AutoTokenizer.from_pretrained(folder, extra_special_tokens={  # as the -hf releases' tokenizer_config.json
      "start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
      "video_token": "<video>"})
  return Processor(image_processor=images, tokenizer=tok, video_processor=None,
                   image_seq_length=4, chat_template=templates.read_chat_template(folder))


def test_the_hf_templates_are_internvl2_5_without_a_default_system_block(folders):
  with open(release_folders.HF_TEMPLATE, encoding="utf-8") as f:
    fixture = json.load(f)
  expected = template_match.Recognised("internvl2_5", None, False)
  for key in ("chat_template", "chat_template_first_release"):  # <IMG_CONTEXT>\n and the first release's <image>\n
    assert template_match.recognise(fixture[key], "F") == expected
  for kind, folder in folders.items():
    c = _finetune_config(f"path={folder},lora=4")
    assert (c.data.template, c.data.system_message, c.data.default_system_block) == ("internvl2_5", None, False)
    assert (c.init.path, c.tokenizer) == (folder, folder)
  # the layout, written out (DESIGN §5): internvl2_5's blocks, the system block only when a message is given
  turns = [("<image>\nWhat is it?", "A cat."), ("Sure?", None)]
  body = ("<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n<|im_start|>assistant\nA cat.<|im_end|>\n"
          "<|im_start|>user\nSure?<|im_end|>\n<|im_start|>assistant\n")
  assert templates.render("internvl2_5", turns, default_system_block=False) == body
  assert templates.render("internvl2_5", turns, system="S", default_system_block=False) == \
      "<|im_start|>system\nS<|im_end|>\n" + body
  assert templates.train_units("internvl2_5", turns[:1], default_system_block=False) == [
      "<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n", "<|im_start|>assistant\nA cat.<|im_end|>\n"]


def test_recognition_keeps_the_system_behaviour_of_exported_templates():
  # what `convert export` writes (to_jinja) is recognised back with its system behaviour; Hermes-2 and
  # internlm2-chat write the same text, so an internlm2-chat export reads as Hermes-2
  for name in templates.NAMES:
    for system, block in ((None, True), (None, False), ("Be kind.", True)):
      if name == "plain" and system:
        continue
      got = template_match.recognise(templates.to_jinja(name, system, default_system_block=block), "F")
      want_block = block or name == "plain"  # plain has no system block either way
      assert got == template_match.Recognised("Hermes-2" if name == "internlm2-chat" else name, system, want_block)


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
@pytest.mark.parametrize("system", [None, SYSTEM])
def test_trained_ids_are_transformers_chat_ids(folders, kind, system):
  folder = folders[kind]
  c = _finetune_config(f"path={folder},lora=4")
  c.data.max_dynamic_patch, c.data.max_tiles, c.data.max_text_len = 1, 1, 512
  spec = loop.feature_spec(c, train=True)
  spec.packed = True  # exactly the record's tokens (no spare tile slots, no padding)
  tok = tokenizer_lib.load(folder)
  proc = _processor(folder)
  image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (56, 56, 3), np.uint8))
  conversations = [{"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "A grey cat."},
                   {"from": "human", "value": "Is it big?"}, {"from": "gpt", "value": "No, small."}]
  if system is not None:
    conversations.insert(0, {"from": "system", "value": system})
  ours = features.instruct({"image": np.asarray(image), "conversations": conversations}, tok, spec, None)

  messages = [] if system is None else [{"role": "system", "content": [{"type": "text", "text": system}]}]
  messages += [
      {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is shown?"}]},
      {"role": "assistant", "content": [{"type": "text", "text": "A grey cat."}]},
      {"role": "user", "content": [{"type": "text", "text": "Is it big?"}]},
      {"role": "assistant", "content": [{"type": "text", "text": "No, small."}]}]
  ref = proc.apply_chat_template(messages, tokenize=True, return_dict=True, add_generation_prompt=False)
  ref_ids = np.asarray(ref["input_ids"]).reshape(-1).tolist()
  assert ours["input_ids"].tolist() == ref_ids
  assert ref_ids.count(tok.image_token_id) == 4
  assert (ref_ids[0] == tok.bos_id) == (kind == "llama")  # the processor adds the LLaMA tokenizer's BOS
  # text only: the tokenizer's apply_chat_template (which adds no special tokens) after our BOS
  text_only = [{"role": m["role"], "content": m["content"][-1]["text"]} for m in messages]
  text_conversations = [dict(m, value=m["value"].replace("<image>\n", "")) for m in conversations]
  ours = features.instruct({"conversations": text_conversations}, tok, spec, None)
  ref_ids = proc.tokenizer.apply_chat_template(text_only, tokenize=True, return_dict=True,
                                               add_generation_prompt=False)["input_ids"]
  bos = [tok.bos_id] if kind == "llama" else []
  assert ours["input_ids"].tolist() == bos + ref_ids
  # trained: each answer and its <|im_end|>, not the newline after it (the official internvl2_5 training)
  trained = [i for i, m in zip(ours["input_ids"].tolist(), ours["loss_mask"].tolist()) if m]
  assert proc.tokenizer.decode(trained) == "A grey cat.<|im_end|>No, small.<|im_end|>"
  # the prompt at inference, from the run's format, is the processor's generation prompt
  from internvl_jax.data import chat_format
  fmt = chat_format.ChatFormat.from_run(c, tok)
  prompt = [m for m in text_only[:-1] if m["role"] != "system"]  # the run's own system message: none
  ref_ids = proc.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
  assert fmt.prompt("Is it big?", history=[("What is shown?", "A grey cat.")]) == ref_ids


def test_an_unknown_chat_template_is_a_one_line_error(folders, tmp_path):
  folder = str(tmp_path / "other_template")
  os.makedirs(folder)
  for name in os.listdir(folders["qwen2"]):
    if name != "chat_template.jinja":
      os.symlink(os.path.join(folders["qwen2"], name), os.path.join(folder, name))
  with open(os.path.join(folder, "chat_template.jinja"), "w") as f:
    f.write(tokenizer_folders.QWEN2_CHAT_TEMPLATE)  # Qwen2's own (default 'You are a helpful assistant.', no images)
  with pytest.raises(ValueError, match=f"the chat template of {folder} is not one of the InternVL conversation"):
    _finetune_config(f"path={folder}")
  try:
    _finetune_config(f"path={folder}")
  except ValueError as e:
    assert "\n" not in str(e)


def test_a_format_without_a_default_system_block_is_not_exported_to_the_opengvlab_layout(folders):
  from types import SimpleNamespace

  from internvl_jax.convert import release
  from internvl_jax.convert.configs import ConversionError
  from internvl_jax.data import chat_format
  fmt = chat_format.ChatFormat(tokenizer_lib.load(folders["qwen2"]), 56, 4, template="internvl2_5",
                               default_system_block=False)
  with pytest.raises(ConversionError, match="conversation.py always writes one: export --layout native"):
    release.opengvlab_plan(SimpleNamespace(config=None), fmt)


@pytest.mark.slow  # a train.py and a convert subprocess: ~2 min on 2 cores
def test_finetune_from_an_hf_folder_trains_and_exports_its_template(folders, tmp_path):
  from transformers import AutoTokenizer
  from internvl_jax.evaluate import models
  folder = folders["qwen2"]
  rng = np.random.default_rng(0)
  records = []
  for i in range(8):
    Image.fromarray(rng.integers(0, 255, (56, 56, 3), np.uint8)).save(tmp_path / f"{i}.png")
    records.append({"image": f"{i}.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "Noise."}]})
  with open(tmp_path / "train.jsonl", "w") as f:
    f.write("\n".join(json.dumps(r) for r in records))
  meta = str(tmp_path / "meta.json")
  with open(meta, "w") as f:
    json.dump({"noise": {"root": str(tmp_path), "annotation": str(tmp_path / "train.jsonl"), "repeat_time": 1,
                         "length": 8}}, f)
  workdir, out = str(tmp_path / "run"), str(tmp_path / "export")
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  args = ["--config", f"configs/finetune.py:path={folder},lora=4", "--workdir", workdir,
          "--config.total_steps=2", "--config.batch_size=2", "--config.grad_accum_steps=1", "--config.lr=1e-2",
          "--config.eval_every=0", "--config.data.max_text_len=200", "--config.data.max_dynamic_patch=1",
          "--config.data.max_tiles=1", "--config.progress=False", "--config.data.num_threads=1",
          "--config.model.vision.dtype=float32", "--config.model.language.dtype=float32",
          "--config.data.train.source=internvl", f"--config.data.train.path={meta}"]
  res = subprocess.run([sys.executable, os.path.join(ROOT, "train.py")] + args, cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
  assert res.returncode == 0, res.stderr[-3000:]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    logged = [json.loads(line) for line in f]
  assert any(m.get("tokens", 0) > 0 for m in logged)  # answers were trained
  run = models.load_workdir(workdir, "caption")
  assert (run.chat.template, run.chat.system, run.chat.default_system_block) == ("internvl2_5", None, False)
  res = subprocess.run([sys.executable, "-m", "internvl_jax.convert", "export", workdir, out], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  # the exported template renders every conversation as the source folder's does (no system block added)
  source, exported = AutoTokenizer.from_pretrained(folder), AutoTokenizer.from_pretrained(out)
  source_template = templates.read_chat_template(folder)
  for turns, system, images in template_match.PROBES:
    messages = templates.messages_from_turns(turns, system=system, image_count=images)
    kw = dict(tokenize=False, add_generation_prompt=turns[-1][1] is None)
    assert exported.apply_chat_template(messages, **kw) == \
        source.apply_chat_template(messages, chat_template=source_template, **kw)


def test_an_instruct_run_from_an_hf_folder_takes_its_template(folders):
  from internvl_jax.train import defaults, loop
  cfg = defaults.base_config("instruct", "tiny")
  cfg.init.path = folders["qwen2"]
  loop._template_of_release(cfg)  # what loop.run does first
  assert cfg.data.template == "internvl2_5" and cfg.data.default_system_block is False
  chosen = defaults.base_config("instruct", "tiny")
  chosen.init.path, chosen.data.template = folders["qwen2"], "Hermes-2"
  loop._template_of_release(chosen)  # a template the user set is kept
  assert chosen.data.template == "Hermes-2" and chosen.data.default_system_block is True

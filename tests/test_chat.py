"""python -m internvl_jax.chat on a tiny InternVL2-1B-style folder (tests/release_folders.py): --prompt prints what
generate() + the chat format's answer extraction give; the stdin conversation keeps the history as the Hermes-2
template writes it (the official prompt string written out here); a multi-byte character split over two tokens
prints whole."""

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import release_folders
from internvl_jax import chat
from internvl_jax.evaluate import models
from internvl_jax.generate import generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYS_V1 = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
NEW = 12


@pytest.fixture(scope="module")
def release(tmp_path_factory):
  root = tmp_path_factory.mktemp("chat_cli")
  folder = release_folders.internvl2_1b(str(root / "model"))[0]
  image = str(root / "image.png")
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (56, 56, 3), np.uint8)).save(image)  # one tile
  return folder, image, models.load_hf(folder)


def _answer(m, question, images, history=()):
  inputs = m.chat.inputs(question, images, history=history)
  out = generate(m.model, inputs["input_ids"], inputs["pixel_values"], max_new_tokens=NEW,
                 eos_token_id=list(m.chat.stop_ids))
  return m.chat.answer(np.asarray(out)[0, inputs["input_ids"].shape[1]:]), inputs["input_ids"]


def test_prompt_prints_the_answer(release):
  folder, image, m = release
  want, _ = _answer(m, "Describe the image.", [image])
  assert want
  proc = subprocess.run([sys.executable, "-m", "internvl_jax.chat", "--hf", folder, "--image", image, "--prompt",
                         "Describe the image.", "--max_new_tokens", str(NEW)], cwd=ROOT, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout == want + "\n"


def test_conversation_over_stdin_keeps_history(release):
  folder, image, m = release
  args = chat.parser().parse_args(["--hf", folder, "--max_new_tokens", str(NEW)])
  out, err = io.StringIO(), io.StringIO()
  stdin = io.StringIO(f"/image {image}\nWhat is it?\n/image missing.png\nAnd then?\n/quit\nnever read\n")
  conv = chat.run(args, stdin=stdin, stdout=out, stderr=err)
  a1, ids1 = _answer(m, "What is it?", [image])
  a2, ids2 = _answer(m, "And then?", [image], history=[("<image>\nWhat is it?", a1)])
  assert a1 and out.getvalue() == f"{a1}\n{a2}\n"
  assert "image missing.png does not exist" in err.getvalue()
  block = "<img>" + "<IMG_CONTEXT>" * 4 + "</img>"
  second = (f"<|im_start|>system\n{SYS_V1}<|im_end|><|im_start|>user\n{block}\nWhat is it?<|im_end|>"
            f"<|im_start|>assistant\n{a1}<|im_end|><|im_start|>user\nAnd then?<|im_end|><|im_start|>assistant\n")
  assert conv.last_input_ids.tolist() == ids2.tolist() == [m.chat.tokenizer.encode(second)]
  assert conv.history == [("<image>\nWhat is it?", a1), ("And then?", a2)]
  conv.reset()
  assert conv.history == [] and conv.tiles == []


def test_multibyte_character_prints_whole(release, monkeypatch):
  _, _, m = release
  tok = m.chat.tokenizer
  ids = tok.encode("é!")
  assert len(ids) >= 3 and tok.decode(ids[:1]).endswith("\ufffd")  # "é" is two byte tokens here
  monkeypatch.setattr(chat.stream_lib, "stream", lambda *a, **k: iter(ids + [m.chat.stop_ids[0], 5]))
  conv = chat.Conversation(m.model, m.chat)
  pieces = list(conv.ask("hi"))
  assert "".join(pieces) == "é!" and not any("\ufffd" in p for p in pieces)
  assert pieces[0] == "é"


def test_errors_are_one_line(release, tmp_path):
  folder, _, _ = release
  proc = subprocess.run([sys.executable, "-m", "internvl_jax.chat", "--hf", str(tmp_path / "nope"), "--prompt",
                         "hi"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith("error: --hf folder")


def test_video_frames_as_the_official_example(release, tmp_path):
  """A folder of 4 frames, 2 sampled: the middles of two equal segments (frames 0 and 2 by the official reader's
  'middle' rule, (start + end - 1) // 2 of [0, 2) and [2, 4); the chat example's get_index picks the same), one
  tile each, written `Frame-1: <image>\\nFrame-2: <image>\\n` in front of the question."""
  _, _, m = release
  rng = np.random.default_rng(1)
  for i in range(4):
    Image.fromarray(rng.integers(0, 255, (56, 70, 3), np.uint8)).save(tmp_path / f"frame_{i}.jpg")
  conv = chat.Conversation(m.model, m.chat, max_new_tokens=NEW)
  conv.attach_video(str(tmp_path), num_frames=2)
  got = "".join(conv.ask("What happens?"))
  question = "Frame-1: <image>\nFrame-2: <image>\nWhat happens?"
  inputs = m.chat.inputs(question, [str(tmp_path / "frame_0.jpg"), str(tmp_path / "frame_2.jpg")], max_num=1)
  assert inputs["pixel_values"].shape[0] == 2
  out = generate(m.model, inputs["input_ids"], inputs["pixel_values"], max_new_tokens=NEW,
                 eos_token_id=list(m.chat.stop_ids))
  assert got == m.chat.answer(np.asarray(out)[0, inputs["input_ids"].shape[1]:])
  assert conv.last_input_ids.tolist() == inputs["input_ids"].tolist() and conv.history[0][0] == question
  np.testing.assert_array_equal(np.concatenate(conv.tiles), inputs["pixel_values"])  # frames 0 and 2, in order


@pytest.mark.slow
def test_hf_folder_conversation(tmp_path):
  """A transformers-native (-hf) folder: its Jinja template, no default system turn, '<|im_end|>\\n' separators;
  images go in the first message only (a later one is refused in one line, the conversation goes on)."""
  folder = release_folders.internvl3_hf(str(tmp_path / "model"))[0]
  image = str(tmp_path / "image.png")
  Image.fromarray(np.random.default_rng(2).integers(0, 255, (56, 56, 3), np.uint8)).save(image)
  m = models.load_hf(folder)
  args = chat.parser().parse_args(["--hf", folder, "--image", image, "--max_new_tokens", str(NEW)])
  out, err = io.StringIO(), io.StringIO()
  conv = chat.run(args, stdin=io.StringIO(f"What is it?\n/image {image}\nAnd then?\n"), stdout=out, stderr=err)
  a1, _ = _answer(m, "What is it?", [image])
  a2, ids2 = _answer(m, "And then?", [image], history=[("<image>\nWhat is it?", a1)])
  assert a1 and out.getvalue() == f"{a1}\n{a2}\n"
  assert "images in the first message only" in err.getvalue()
  block = "<img>" + "<IMG_CONTEXT>" * 4 + "</img>"
  second = (f"<|im_start|>user\n{block}\nWhat is it?<|im_end|>\n<|im_start|>assistant\n{a1}<|im_end|>\n"
            "<|im_start|>user\nAnd then?<|im_end|>\n<|im_start|>assistant\n")
  assert conv.last_input_ids.tolist() == ids2.tolist() == [m.chat.tokenizer.encode(second)]


@pytest.mark.slow  # trains a tiny stage-3 run for two steps
def test_prompt_from_a_train_workdir(tmp_path):
  from conftest import tiny_config
  from internvl_jax.train import loop
  workdir = str(tmp_path / "run")
  loop.run(tiny_config("instruct", total_steps=2), workdir)
  image = str(tmp_path / "image.png")
  Image.fromarray(np.random.default_rng(3).integers(0, 255, (64, 48, 3), np.uint8)).save(image)
  m = models.load_workdir(workdir, "vqa")
  want, _ = _answer(m, "What colour is the circle?", [image])
  out = io.StringIO()
  args = chat.parser().parse_args(["--workdir", workdir, "--image", image, "--prompt", "What colour is the circle?",
                                   "--max_new_tokens", str(NEW)])
  conv = chat.run(args, stdout=out)
  assert out.getvalue() == want + "\n" and conv.history[0][0].startswith("<image>\n")


def test_quantize_option(release):
  """--quantize int8: the conversation runs the qwix-quantized model (smaller weights) and answers what generate()
  gives with quantize.quantize(model, 'int8')."""
  from internvl_jax import quantize
  folder, image, m = release
  args = chat.parser().parse_args(["--hf", folder, "--image", image, "--prompt", "Describe the image.",
                                   "--max_new_tokens", str(NEW), "--quantize", "int8"])
  out = io.StringIO()
  conv = chat.run(args, stdout=out)
  assert quantize.param_bytes(conv.model) < 0.8 * quantize.param_bytes(m.model)  # the vision tower stays float
  q8 = quantize.quantize(m.model, "int8")
  inputs = m.chat.inputs("Describe the image.", [image])
  new = generate(q8, inputs["input_ids"], inputs["pixel_values"], max_new_tokens=NEW,
                 eos_token_id=list(m.chat.stop_ids))
  assert out.getvalue() == m.chat.answer(np.asarray(new)[0, inputs["input_ids"].shape[1]:]) + "\n"

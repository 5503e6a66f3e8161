"""Conversation templates: every name against the facts of OpenGVLab's conversation.py / chat() / training
preprocess (docs/templates.md), written here as literal strings; -hf Jinja templates against transformers."""

import json
import os

import jinja2
import numpy as np
import pytest

from internvl_jax.data import chat_format, templates

V1 = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
V25 = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "internvl_hf_chat_template.json")

ONE = [("<image>\nWhat is it?", None)]
TWO = [("Hi", "Hello!"), ("Name?", None)]
DONE = [("Hi", "Hello!"), ("Name?", "Bot.")]

# name -> (default system message, open one turn, two turns with system 'S', empty system one turn)
EXPECTED = {
    "Hermes-2": (
        V1,
        f"<|im_start|>system\n{V1}<|im_end|><|im_start|>user\n<image>\nWhat is it?<|im_end|><|im_start|>assistant\n",
        "<|im_start|>system\nS<|im_end|><|im_start|>user\nHi<|im_end|><|im_start|>assistant\nHello!<|im_end|>"
        "<|im_start|>user\nName?<|im_end|><|im_start|>assistant\n",
        "<|im_start|>system\n<|im_end|><|im_start|>user\n<image>\nWhat is it?<|im_end|><|im_start|>assistant\n",
    ),
    "internlm2-chat": (
        V1,
        f"<|im_start|>system\n{V1}<|im_end|><|im_start|>user\n<image>\nWhat is it?<|im_end|><|im_start|>assistant\n",
        "<|im_start|>system\nS<|im_end|><|im_start|>user\nHi<|im_end|><|im_start|>assistant\nHello!<|im_end|>"
        "<|im_start|>user\nName?<|im_end|><|im_start|>assistant\n",
        "<|im_start|>system\n<|im_end|><|im_start|>user\n<image>\nWhat is it?<|im_end|><|im_start|>assistant\n",
    ),
    "phi3-chat": (
        V1,
        f"<|system|>\n{V1}<|end|><|user|>\n<image>\nWhat is it?<|end|><|assistant|>\n",
        "<|system|>\nS<|end|><|user|>\nHi<|end|><|assistant|>\nHello!<|end|><|user|>\nName?<|end|><|assistant|>\n",
        "<|system|>\n<|end|><|user|>\n<image>\nWhat is it?<|end|><|assistant|>\n",
    ),
    "internvl2_5": (
        V25,
        f"<|im_start|>system\n{V25}<|im_end|>\n<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n"
        "<|im_start|>assistant\n",
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nName?<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>system\n<|im_end|>\n<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n<|im_start|>assistant\n",
    ),
}

# segments of DONE with system 'S': the trained pieces are the answers with the trained part of the separator
SEGMENTS = {
    "Hermes-2": [
        ("<|im_start|>system\nS<|im_end|><|im_start|>user\nHi<|im_end|><|im_start|>assistant\n", False),
        ("Hello!<|im_end|>", True), ("<|im_start|>user\nName?<|im_end|><|im_start|>assistant\n", False),
        ("Bot.<|im_end|>", True)],
    "phi3-chat": [
        ("<|system|>\nS<|end|><|user|>\nHi<|end|><|assistant|>\n", False), ("Hello!<|end|>", True),
        ("<|user|>\nName?<|end|><|assistant|>\n", False), ("Bot.<|end|>", True)],
    "internvl2_5": [
        ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False),
        ("Hello!<|im_end|>", True), ("\n<|im_start|>user\nName?<|im_end|>\n<|im_start|>assistant\n", False),
        ("Bot.<|im_end|>", True), ("\n", False)],
}
SEGMENTS["internlm2-chat"] = SEGMENTS["Hermes-2"]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_released_templates_render_as_official(name):
  default, one, two, empty = EXPECTED[name]
  assert templates.default_system(name) == default
  assert templates.render(name, ONE) == one
  assert templates.render(name, ONE, system=None) == one
  assert templates.render(name, TWO, system="S") == two
  assert templates.render(name, ONE, system="") == empty  # the system block stays, empty
  # a finished conversation ends with the separator after the last answer
  assert templates.render(name, DONE, system="S") == two + "Bot." + (
      "<|end|>" if name == "phi3-chat" else "<|im_end|>\n" if name == "internvl2_5" else "<|im_end|>")


def test_stop_strings():
  assert {n: templates.stop_string(n) for n in templates.NAMES} == {
      "Hermes-2": "<|im_end|>", "internlm2-chat": "<|im_end|>", "phi3-chat": "<|end|>",
      "internvl2_5": "<|im_end|>", "internvl3_5_gpt_oss": "<|return|>", "plain": "</s>"}


GPT_OSS_SYSTEM = ("You are InternVL, a large language model trained by Shanghai AI Laboratory.\nKnowledge cutoff: "
                  "2024-06\nCurrent date: 2025-08-06\n\nReasoning: low\n\n# Valid channels: final. Channel must "
                  "be included for every message.")


def test_gpt_oss_template_is_the_official_mpt_two_layout():
  # internvl_chat_gpt_oss/.../conversation.py 'internvl3_5_gpt_oss' (MPT_TWO): system + sep, role + message +
  # sep, sep2 '<|return|>' only after a last message that is an answer, a bare role for the open turn
  name = "internvl3_5_gpt_oss"
  assert templates.default_system(name) == GPT_OSS_SYSTEM
  assert templates.render(name, ONE) == (
      f"<|start|>system<|message|>{GPT_OSS_SYSTEM}<|end|><|start|>user<|message|><image>\nWhat is it?<|end|>"
      "<|start|>assistant")
  assert templates.render(name, TWO, system="S") == (
      "<|start|>system<|message|>S<|end|><|start|>user<|message|>Hi<|end|><|start|>assistant"
      "Hello!<|end|><|start|>user<|message|>Name?<|end|><|start|>assistant")
  assert templates.render(name, DONE, system="S").endswith("<|start|>assistantBot.<|return|>")


def test_gpt_oss_training_text_is_preprocess_internvl3_5_gpt_oss():
  # dataset.py preprocess_internvl3_5_gpt_oss: one unit per message; answers written as
  # '<|start|>assistant<|channel|>final<|message|>' + value + ('<|return|>' last, '<|end|>' before); loss on all of
  # an assistant unit but its '<|start|>assistant' tokens
  name = "internvl3_5_gpt_oss"
  assert templates.train_units(name, DONE, system="S") == [
      "<|start|>system<|message|>S<|end|>", "<|start|>user<|message|>Hi<|end|>",
      "<|start|>assistant<|channel|>final<|message|>Hello!<|end|>", "<|start|>user<|message|>Name?<|end|>",
      "<|start|>assistant<|channel|>final<|message|>Bot.<|return|>"]
  assert templates.segments(name, DONE, system="S") == [
      ("<|start|>system<|message|>S<|end|><|start|>user<|message|>Hi<|end|><|start|>assistant", False),
      ("<|channel|>final<|message|>Hello!<|end|>", True),
      ("<|start|>user<|message|>Name?<|end|><|start|>assistant", False),
      ("<|channel|>final<|message|>Bot.<|return|>", True)]


def test_plain_keeps_the_demo_layout():
  assert templates.render("plain", [("what is it?", "a cat")]) == "<user>what is it?<assistant>a cat</s>"
  assert templates.render("plain", [("a?", "b"), ("c?", None)]) == "<user>a?<assistant>b</s><user>c?<assistant>"
  assert templates.render("plain", [("a?", None)], system="") == "<user>a?<assistant>"
  assert templates.default_system("plain") == ""
  assert templates.segments("plain", [("a?", "b"), ("c?", "d")]) == [
      ("<user>a?<assistant>", False), ("b</s>", True), ("<user>c?<assistant>", False), ("d</s>", True)]
  with pytest.raises(ValueError, match="no system message"):
    templates.render("plain", ONE, system="be brief")


def test_empty_messages_are_bare_roles():
  # get_prompt() writes a falsy message as its bare role, without separator
  assert templates.render("internvl2_5", [("", "x"), ("q", "")], system="S") == (
      "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n<|im_start|>assistant\nx<|im_end|>\n"
      "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("name", sorted(SEGMENTS))
def test_segments_flag_exactly_the_answers(name):
  assert templates.segments(name, DONE, system="S") == SEGMENTS[name]
  for turns, system in ((DONE, None), (TWO, "S"), (ONE, ""), ([("q", "a")], None)):
    pieces = templates.segments(name, turns, system=system)
    assert "".join(s for s, _ in pieces) == templates.render(name, turns, system=system)
    assert all(a != b for (_, a), (_, b) in zip(pieces, pieces[1:]))  # neighbours differ: merged runs
  assert [s for s, t in templates.segments(name, TWO, system="S") if t] == ["Hello!" + (
      "<|end|>" if name == "phi3-chat" else "<|im_end|>")]


def test_train_units_are_the_official_tokenisation_units():
  assert templates.train_units("internvl2_5", DONE, system="S") == [
      "<|im_start|>system\nS<|im_end|>\n", "<|im_start|>user\nHi<|im_end|>\n",
      "<|im_start|>assistant\nHello!<|im_end|>\n", "<|im_start|>user\nName?<|im_end|>\n",
      "<|im_start|>assistant\nBot.<|im_end|>\n"]
  for name in ("Hermes-2", "internlm2-chat", "phi3-chat", "plain"):
    system = None if name == "plain" else "S"
    assert templates.train_units(name, DONE, system=system) == [templates.render(name, DONE, system=system)]
  assert templates.get("internlm2-chat").train_strips and not templates.get("Hermes-2").train_strips


def test_user_mistakes_are_one_line_errors():
  with pytest.raises(ValueError, match="unknown conversation template 'chatml'; known: Hermes-2, internlm2-chat"):
    templates.render("chatml", ONE)
  with pytest.raises(ValueError, match="only the last turn"):
    templates.render("internvl2_5", [("a", None), ("b", None)])
  with pytest.raises(ValueError, match="non-empty list"):
    templates.segments("internvl2_5", [])


# ---- -hf folders: Jinja templates against transformers ----

@pytest.fixture(scope="module")
def hf():
  """A tiny byte-level Qwen2 tokenizer with the InternVL tokens, transformers' InternVL processor on it, and the
  -hf chat template."""
  from transformers import InternVLProcessor, Qwen2Tokenizer
  from transformers.convert_slow_tokenizer import bytes_to_unicode
  from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

  class Processor(InternVLProcessor):
    # torchvision is not installed here, so transformers cannot name a video-processor class to check a None
    # video processor against; skip only that check (images and text run transformers' own code)
    def check_argument_for_proper_class(self, argument_name, argument):
      if argument is not None:
        return super().check_argument_for_proper_class(argument_name, argument)

  with open(FIXTURE, encoding="utf-8") as f:
    fixture = json.load(f)
  vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
  tok = Qwen2Tokenizer(vocab=vocab, merges=[], extra_special_tokens={
      "start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
      "video_token": "<video>"})
  tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
  images = GotOcr2ImageProcessorPil(size={"height": 28, "width": 28}, crop_to_patches=True, min_patches=1,
                                    max_patches=4)
  proc = Processor(image_processor=images, tokenizer=tok, video_processor=None, image_seq_length=3,
                   chat_template=fixture["chat_template"])
  return proc, fixture


CONVERSATIONS = {
    "text": ([("What is 2+2?", None)], None, 0),
    "one_image": ([("Describe it.", None)], None, 1),
    "two_images": ([("Image-1: <image>\nImage-2: <image>\nWhat differs?", None)], None, 2),
    "multi_turn_system": ([("<image>\nWhat is it?", "A cat."), ("Its colour?", "Grey."), ("Sure?", None)],
                          "Be brief.", 1),
}
HF_TEXT = {
    "text": "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "one_image": "<|im_start|>user\n<IMG_CONTEXT>\nDescribe it.<|im_end|>\n<|im_start|>assistant\n",
    "two_images": "<|im_start|>user\nImage-1: <IMG_CONTEXT>\nImage-2: <IMG_CONTEXT>\nWhat differs?<|im_end|>\n"
                  "<|im_start|>assistant\n",
    "multi_turn_system": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<IMG_CONTEXT>\nWhat is it?"
                         "<|im_end|>\n<|im_start|>assistant\nA cat.<|im_end|>\n<|im_start|>user\nIts colour?"
                         "<|im_end|>\n<|im_start|>assistant\nGrey.<|im_end|>\n<|im_start|>user\nSure?<|im_end|>\n"
                         "<|im_start|>assistant\n",
}


@pytest.mark.parametrize("case", sorted(CONVERSATIONS))
def test_hf_template_renders_as_transformers(hf, case):
  proc, fixture = hf
  turns, system, n_images = CONVERSATIONS[case]
  messages = templates.messages_from_turns(turns, system=system, image_count=n_images)
  ours = templates.render_jinja(fixture["chat_template"], messages, add_generation_prompt=True,
                                **proc.tokenizer.special_tokens_map)
  ref = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
  assert ours == ref == HF_TEXT[case]
  # the -hf text is the internvl2_5 layout, without the default system block
  native = templates.render("internvl2_5", turns, system=system or "")
  if system is None:
    native = native.replace("<|im_start|>system\n<|im_end|>\n", "", 1)
  if n_images and "<image>" not in turns[0][0]:
    native = native.replace("user\n", "user\n<image>\n" * n_images, 1)
  assert ours.replace("<IMG_CONTEXT>", "<image>") == native


@pytest.mark.parametrize("case", ["one_image", "two_images", "multi_turn_system"])
def test_processor_image_expansion_matches_ours(hf, case):
  proc, fixture = hf
  turns, system, n_images = CONVERSATIONS[case]
  messages = templates.messages_from_turns(turns, system=system, image_count=n_images)
  sizes = [(28, 56), (28, 28)][:n_images]  # 2 tiles + thumbnail, then 1 tile: the order matters
  images = [np.full((h, w, 3), 40 * (i + 1), np.uint8) for i, (h, w) in enumerate(sizes)]
  patches = [int(proc.image_processor(images=[im], return_tensors="np")["num_patches"][0]) for im in images]
  text = templates.render_jinja(fixture["chat_template"], messages)
  ref_ids = proc(text=text, images=images, return_tensors="np")["input_ids"][0].tolist()
  # the processor expands each <IMG_CONTEXT> of the rendered text; so does ours, and from the first -hf release's
  # template, which wrote '<image>\n', it expands <image> to the same text
  renamed = chat_format.expand_placeholders(text, "<IMG_CONTEXT>", patches, 3)
  first = chat_format.expand_placeholders(
      templates.render_jinja(fixture["chat_template_first_release"], messages), "<image>", patches, 3)
  assert renamed == first
  assert proc.tokenizer(renamed, add_special_tokens=False)["input_ids"] == ref_ids
  assert ref_ids.count(proc.image_token_id) == 3 * sum(patches)


ENV_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(n=0) %}"
    "{% for m in messages %}\n"
    "  {% if m['role'] == 'tool' %}{% continue %}{% endif %}\n"
    "  {% if loop.index > 4 %}{% break %}{% endif %}\n"
    "  {% set ns.n = ns.n + 1 %}\n"
    "[{{ m['role'] }}] {{ m['content'] | tojson }}{% generation %}|{{ m.get('name', '-') }}{% endgeneration %}\n"
    "{% endfor %}\n"
    "{{ ns.n }} {{ tools is none }} {{ strftime_now('%Y')[:2] }}{{ eos_token }}"
    "{% if add_generation_prompt %}<go>{% endif %}")


def test_jinja_environment_matches_transformers(hf):
  proc, _ = hf
  tok = proc.tokenizer
  messages = [{"role": "system", "content": "Be <b>kind</b> & brief: 'ok'", "name": None},
              {"role": "tool", "content": "skipped"},
              {"role": "user", "content": "Grüße 你好", "name": "ann"},
              {"role": "assistant", "content": [{"type": "text", "text": "x"}]},
              {"role": "user", "content": "a"}, {"role": "user", "content": "after the break"}]
  for generation_prompt in (True, False):
    ref = tok.apply_chat_template(messages, chat_template=ENV_TEMPLATE, tokenize=False,
                                  add_generation_prompt=generation_prompt, bos_token="<s>")
    ours = templates.render_jinja(ENV_TEMPLATE, messages, add_generation_prompt=generation_prompt,
                                  bos_token="<s>", eos_token=tok.eos_token)
    assert ours == ref
  assert '"Be <b>kind</b> & brief: \'ok\'"' in ours and '"Grüße 你好"' in ours and "|ann" in ours
  raising = "{% if messages | length > 1 %}{{ raise_exception('one message only') }}{% endif %}"
  with pytest.raises(jinja2.TemplateError, match="one message only"):
    templates.render_jinja(raising, messages)
  with pytest.raises(jinja2.exceptions.SecurityError):  # the sandbox, as transformers has it
    templates.render_jinja("{{ messages.__class__.__mro__ }}", messages)


def _folder(tmp_path, name, **files):
  path = tmp_path / name
  path.mkdir()
  for filename, content in files.items():
    filename = filename.replace("__", ".")
    (path / filename).write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
  return str(path)


def test_read_chat_template_precedence(tmp_path, hf):
  from transformers import AutoTokenizer, InternVLProcessor

  proc, _ = hf
  named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
  cases = {  # files -> the template transformers uses (processor's where it has one, else the tokenizer's)
      "all": ({"processor_config__json": {"chat_template": "P"}, "chat_template__json": {"chat_template": "J"},
               "chat_template__jinja": "K", "tokenizer_config__json": {"chat_template": "C"}}, "P"),
      "legacy_json_over_jinja": ({"chat_template__json": {"chat_template": "J"}, "chat_template__jinja": "K"}, "J"),
      "jinja_over_tokenizer_config": ({"chat_template__jinja": "K", "tokenizer_config__json": {"chat_template": "C"}},
                                      "K"),
      "tokenizer_config_list": ({"tokenizer_config__json": {"chat_template": named}}, "D"),
      "none": ({"tokenizer_config__json": {}}, None),
  }
  for case, (files, expected) in cases.items():
    folder = _folder(tmp_path, case, **files)
    assert templates.read_chat_template(folder) == expected, case
    processor_template = InternVLProcessor.get_processor_dict(folder)[0].get("chat_template")
    if processor_template is not None:
      assert processor_template == expected, case
  # a saved tokenizer folder, read back by transformers: the list form and the .jinja file
  tok = proc.tokenizer
  for case, template, jinja in (("list", named, None), ("jinja", "C", "K")):
    folder = str(tmp_path / f"tok_{case}")
    tok.chat_template = template
    tok.save_pretrained(folder)
    if jinja is not None:
      with open(os.path.join(folder, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(jinja)
    assert templates.read_chat_template(folder) == AutoTokenizer.from_pretrained(folder).get_chat_template()
  tok.chat_template = None
  with pytest.raises(ValueError, match="none named 'default'"):
    templates.read_chat_template(_folder(tmp_path, "nameless", tokenizer_config__json={"chat_template": named[:1]}))


def test_messages_from_turns():
  assert templates.messages_from_turns([("q", "a"), ("r", None)], system="S") == [
      {"role": "system", "content": "S"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
      {"role": "user", "content": "r"}]
  assert templates.messages_from_turns([("q", None)], image_count=2)[0]["content"] == [
      {"type": "image"}, {"type": "image"}, {"type": "text", "text": "q"}]
  assert templates.messages_from_turns([("A <image> and <image>\nq", None)], image_count=2)[0]["content"] == [
      {"type": "text", "text": "A "}, {"type": "image"}, {"type": "text", "text": " and "}, {"type": "image"},
      {"type": "text", "text": "q"}]
  with pytest.raises(ValueError, match="1 <image> placeholders but image_count is 2"):
    templates.messages_from_turns([("<image>\nq", None)], image_count=2)

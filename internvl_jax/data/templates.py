"""Conversation templates of the released InternVL chat models, held as data, and Jinja chat templates of
transformers-native (`-hf`) folders.

Remote-code checkpoints name their template in the config (`template`); `render` writes a conversation the way
OpenGVLab's `Conversation.get_prompt()` does for those names (the "MPT" layout, see docs/templates.md):

  system_template.format(msg) + sep, then for every message: role + message + sep, or the bare role when the
  message is empty / None (an open assistant turn for generation).

`segments` splits the same text into pieces flagged where the official training computes loss, and
`train_units` into the strings the official training tokenises one at a time. `-hf` folders carry a Jinja
template instead: `read_chat_template` finds it, `render_jinja` renders it as transformers'
`apply_chat_template(tokenize=False)` does, and `messages_from_turns` builds the messages it expects.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from datetime import datetime
from typing import Sequence

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

IMAGE_PLACEHOLDER = "<image>"

# the default system message of Hermes-2 / internlm2-chat / phi3-chat and the one of internvl2_5, as the 2025 head of
# OpenGVLab's conversation.py has them
_MSG_V1 = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
_MSG_GPT_OSS = ("You are InternVL, a large language model trained by Shanghai AI Laboratory.\nKnowledge cutoff: "
                "2024-06\nCurrent date: 2025-08-06\n\nReasoning: low\n\n# Valid channels: final. Channel must be "
                "included for every message.")
_MSG_V25 = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"


@dataclasses.dataclass(frozen=True)
class Template:
  """One conversation template.

  system_template: the system block before its separator, `{system_message}` standing for the message; None when
    the template has no system block (then only an empty system message is accepted).
  roles: (user prefix, assistant prefix), written before each message.
  user_sep / sep: written after a non-empty user message / after the system block and each non-empty answer.
  trained_sep: the start of `sep` the official training computes loss on together with the answer; the rest of
    `sep` (internvl2_5's newline) is not trained.
  per_turn_units: the official training tokenises the system block and every message block on its own
    (preprocess_internvl2_5) instead of the whole conversation at once.
  train_strips: the official training strips every message before writing it (preprocess_internlm).
  last_sep: the "MPT_TWO" style's sep2: written instead of `sep` after the conversation's last message when that
    is an answer (internvl3_5_gpt_oss: `<|return|>`); also the stop string. None: the MPT style.
  train_answer_prefix: written (and trained) between the assistant role and each answer in training text only;
    prompts (`render`, chat()) write answers without it (internvl3_5_gpt_oss: `<|channel|>final<|message|>`).
  """
  name: str
  system_template: str | None
  system_message: str
  roles: tuple[str, str]
  user_sep: str
  sep: str
  trained_sep: str
  per_turn_units: bool = False
  train_strips: bool = False
  last_sep: str | None = None
  train_answer_prefix: str = ""

  @property
  def stop(self) -> str:
    """The string generation stops at: sep2 if the template has one, else the separator, stripped (official
    chat() uses its token as eos)."""
    return (self.last_sep or self.sep).strip()


def _chatml(name: str, message: str, sep: str, **kw) -> Template:
  return Template(name, "<|im_start|>system\n{system_message}", message,
                  ("<|im_start|>user\n", "<|im_start|>assistant\n"), sep, sep, "<|im_end|>", **kw)


_TEMPLATES = {t.name: t for t in (
    _chatml("Hermes-2", _MSG_V1, "<|im_end|>"),
    _chatml("internlm2-chat", _MSG_V1, "<|im_end|>", train_strips=True),
    Template("phi3-chat", "<|system|>\n{system_message}", _MSG_V1, ("<|user|>\n", "<|assistant|>\n"),
             "<|end|>", "<|end|>", "<|end|>"),
    _chatml("internvl2_5", _MSG_V25, "<|im_end|>\n", per_turn_units=True),
    # InternVL3.5-GPT-OSS (internvl_chat_gpt_oss/): OpenAI's harmony layout, "MPT_TWO" style
    Template("internvl3_5_gpt_oss", "<|start|>system<|message|>{system_message}", _MSG_GPT_OSS,
             ("<|start|>user<|message|>", "<|start|>assistant"), "<|end|>", "<|end|>", "<|end|>",
             per_turn_units=True, last_sep="<|return|>", train_answer_prefix="<|channel|>final<|message|>"),
    # ours, for from-scratch runs with the word-level tokenizer: <user> question <assistant> answer </s>
    Template("plain", None, "", ("<user>", "<assistant>"), "", "</s>", "</s>"),
)}
NAMES = tuple(_TEMPLATES)


def get(name: str) -> Template:
  """The template called `name` (a checkpoint config's `template`, or 'plain')."""
  if name not in _TEMPLATES:
    raise ValueError(f"unknown conversation template {name!r}; known: {', '.join(NAMES)}")
  return _TEMPLATES[name]


def default_system(name: str) -> str:
  """The template's default system message ('' for 'plain')."""
  return get(name).system_message


def stop_string(name: str) -> str:
  """The separator, stripped: `<|im_end|>`, `<|end|>` or `</s>`; answers are cut at its first occurrence."""
  return get(name).stop


def _pieces(name: str, turns, system: str | None, training: bool = False,
            default_system_block: bool = True) -> list[tuple[str, bool]]:
  """Unmerged (text, trained) pieces of the conversation, with a unit break marked by (None, False).
  training: the text the official training writes (adds the template's train_answer_prefix)."""
  t = get(name)
  turns = [tuple(turn) for turn in turns]
  if not turns or any(len(turn) != 2 for turn in turns):
    raise ValueError("turns must be a non-empty list of (question, answer) pairs")
  if any(a is None for _, a in turns[:-1]):
    raise ValueError("only the last turn's answer may be None (the open turn for generation)")
  message = t.system_message if system is None else system
  out: list[tuple[str | None, bool]] = []
  if t.system_template is None:
    if message:
      raise ValueError(f"template {name!r} has no system message; pass system=None")
  elif system is None and not default_system_block:
    pass  # no system block at all: the -hf templates write one only for a given system message
  else:
    # the system block is written even for an empty message, as get_prompt() does
    out += [(t.system_template.format(system_message=message) + t.sep, False), (None, False)]
  user, assistant = t.roles
  prefix = t.train_answer_prefix if training else ""
  for i, (question, answer) in enumerate(turns):
    # a falsy message is written as the bare role, without separator (get_prompt's `if message:`)
    out += [(user + question + t.user_sep, False) if question else (user, False), (None, False)]
    if answer and t.last_sep and i == len(turns) - 1:  # MPT_TWO: the last message, an answer, ends with sep2
      out += [(assistant, False), (prefix + answer + t.last_sep, True)]
    elif answer:
      out += [(assistant, False), (prefix + answer + t.trained_sep, True), (t.sep[len(t.trained_sep):], False)]
    else:
      out.append((assistant, False))
    out.append((None, False))
  return out


def render(name: str, turns: Sequence[tuple[str, str | None]], *, system: str | None = None,
           default_system_block: bool = True) -> str:
  """The conversation as the official code writes it.

  turns: (question, answer) pairs, oldest first; the last answer None leaves the assistant turn open (bare
  assistant role) for generation. system: None = the template's default message; any string, also '', replaces it
  (the system block is still written). default_system_block=False: with system None no system block is written
  at all (what the transformers-native -hf chat templates do; the official conversation.py always writes one)."""
  return "".join(s for s, _ in _pieces(name, turns, system, default_system_block=default_system_block) if s)


def segments(name: str, turns: Sequence[tuple[str, str | None]], *, system: str | None = None,
             default_system_block: bool = True) -> list[tuple[str, bool]]:
  """The training text as consecutive pieces, True where the official training computes loss: each answer with the
  trained part of its separator (`<|im_end|>`, `<|end|>`, `</s>`, gpt-oss's `<|return|>` after the last one) and
  gpt-oss's `<|channel|>final<|message|>` before it. Roles, questions, the system block and internvl2_5's newline
  after `<|im_end|>` are False. ''.join(pieces) == render(...) except for the gpt-oss answer prefix."""
  merged: list[tuple[str, bool]] = []
  for text, trained in _pieces(name, turns, system, training=True, default_system_block=default_system_block):
    if not text:
      continue
    if merged and merged[-1][1] == trained:
      merged[-1] = (merged[-1][0] + text, trained)
    else:
      merged.append((text, trained))
  return merged


def train_units(name: str, turns: Sequence[tuple[str, str | None]], *, system: str | None = None,
                default_system_block: bool = True) -> list[str]:
  """The strings the official training tokenises separately, whose concatenation is the training text (`segments`):
  internvl2_5 and internvl3_5_gpt_oss: the system block, then each user block and each assistant block (role +
  message + sep); the other templates: the whole conversation as one string."""
  pieces = _pieces(name, turns, system, training=True, default_system_block=default_system_block)
  if not get(name).per_turn_units:
    return ["".join(s for s, _ in pieces if s)]
  units, current = [], ""
  for text, _ in pieces:
    if text is None:
      units.append(current)
      current = ""
    else:
      current += text
  return [u for u in units if u]


# ---- transformers-native (-hf) folders: Jinja chat templates ----

def _default_of(value, source: str) -> str | None:
  """A chat_template entry: a string, or named templates ({name: template} / [{name, template}]) -> 'default'."""
  if value is None or isinstance(value, str):
    return value
  named = ({t["name"]: t["template"] for t in value} if isinstance(value, (list, tuple)) else dict(value))
  if "default" not in named:
    raise ValueError(f"{source} holds chat templates {sorted(named)} but none named 'default'")
  return named["default"]


def _json(path: str) -> dict:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def read_chat_template(folder: str) -> str | None:
  """The Jinja chat template of a transformers folder, or None.

  Looked up in the order transformers 5.24 gives them precedence: processor_config.json's `chat_template` key,
  chat_template.json (legacy processor file), chat_template.jinja (processors and tokenizers), then
  tokenizer_config.json's `chat_template` (a string, or a list of {name, template} of which 'default' is taken)."""
  path = os.path.join(folder, "processor_config.json")
  if os.path.exists(path) and _json(path).get("chat_template") is not None:
    return _default_of(_json(path)["chat_template"], path)
  path = os.path.join(folder, "chat_template.json")
  if os.path.exists(path):
    return _default_of(_json(path)["chat_template"], path)
  path = os.path.join(folder, "chat_template.jinja")
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      return f.read()
  path = os.path.join(folder, "tokenizer_config.json")
  if os.path.exists(path):
    return _default_of(_json(path).get("chat_template"), path)
  return None


class _GenerationTag(Extension):
  """`{% generation %}...{% endgeneration %}` (marks assistant text in some templates): renders its body."""
  tags = {"generation"}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

  def _body(self, caller):
    return caller()


def _raise_exception(message):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  # plain json.dumps: Jinja's own filter would HTML-escape <, >, & and ' inside chat templates
  return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[_GenerationTag, "jinja2.ext.loopcontrols"])
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
  return env.from_string(template)


def render_jinja(template: str, messages: Sequence[dict], *, add_generation_prompt: bool = True, **extra) -> str:
  """A chat template rendered like transformers' `apply_chat_template(..., tokenize=False)`: sandboxed Jinja with
  trim_blocks / lstrip_blocks and loop controls, `raise_exception` / `strftime_now`, a non-escaping `tojson`.

  messages: {"role", "content"} dicts, content a string or a list of {"type": "text", "text"} / {"type": "image"} /
  {"type": "video"} parts; keys whose value is None are dropped, as transformers does. extra: further template
  variables; transformers passes the tokenizer's special tokens (bos_token, eos_token, pad_token, ...), so pass
  those the template reads."""
  chat = [{k: v for k, v in dict(m).items() if v is not None} for m in messages]
  variables = {"tools": None, "documents": None, **extra}
  return _compile(template).render(messages=chat, add_generation_prompt=add_generation_prompt, **variables)


def _image_parts(question: str, image_count: int) -> list[dict]:
  if IMAGE_PLACEHOLDER not in question:
    # official chat() puts the image first ('<image>\n' + question); the -hf templates write each image part as
    # its placeholder followed by a newline
    return [{"type": "image"}] * image_count + ([{"type": "text", "text": question}] if question else [])
  pieces = question.split(IMAGE_PLACEHOLDER)
  if len(pieces) - 1 != image_count:
    raise ValueError(f"the question has {len(pieces) - 1} {IMAGE_PLACEHOLDER} placeholders but image_count is "
                     f"{image_count}; use one placeholder per image")
  parts = [{"type": "text", "text": pieces[0]}] if pieces[0] else []
  for text in pieces[1:]:
    parts.append({"type": "image"})
    text = text[1:] if text.startswith("\n") else text  # the template writes that newline after the image
    if text:
      parts.append({"type": "text", "text": text})
  return parts


def messages_from_turns(turns: Sequence[tuple[str, str | None]], *, system: str | None = None,
                        image_count: int = 0) -> list[dict]:
  """(question, answer) turns -> the messages list of an -hf chat template.

  system: a system message, or None for none (the -hf InternVL templates add no default one). image_count images
  belong to the first question: written at its `<image>` placeholders (one per image, a newline after each
  placeholder absorbed), or in front of it when it has none. A None last answer is left out: render with
  add_generation_prompt=True to open the assistant turn."""
  messages = [] if system is None else [{"role": "system", "content": system}]
  for i, (question, answer) in enumerate(turns):
    content = _image_parts(question, image_count) if i == 0 and image_count else question
    messages.append({"role": "user", "content": content})
    if answer is not None:
      messages.append({"role": "assistant", "content": answer})
  return messages


# ---- a Jinja chat template for a conversation template (written into exported -hf folders) ----

def _literal(text: str) -> str:
  return json.dumps(text, ensure_ascii=False)  # a Jinja string literal: same escapes as JSON for these strings


def to_jinja(name: str, system: str | None = None, *, default_system_block: bool = True) -> str:
  """A Jinja chat template that writes what `render(name, ...)` writes, for transformers' apply_chat_template and
  for ChatFormat.from_folder on an exported -hf folder.

  Messages: a leading `system` message sets the system message (its content, also ''), none = the template's
  default; content a string or parts ({"type": "image"} -> `<IMG_CONTEXT>\\n`, which InternVLProcessor expands
  into the image block, {"type": "text"} -> its text); an empty message is its bare role; add_generation_prompt
  opens the assistant turn. `last_sep` (gpt-oss's `<|return|>`) ends a conversation whose last message is an
  answer. system: the default system message written when the messages have none (None: the template's);
  default_system_block=False with system None: no system block unless the messages start with one (as the -hf
  InternVL templates)."""
  t = get(name)
  user, assistant = t.roles
  default = t.system_message if system is None else system
  if t.system_template is None and default:
    raise ValueError(f"template {name!r} has no system message; pass system=None")
  # ns.system none: no system block (default_system_block=False and no system message)
  no_block = system is None and not default_system_block
  out = ["{%- set ns = namespace(system=" + ("none" if no_block else _literal(default)) + ", start=0) -%}",
         "{%- if messages and messages[0]['role'] == 'system' -%}",
         "{%- set ns.system = messages[0]['content'] -%}{%- set ns.start = 1 -%}",
         "{%- endif -%}"]
  if t.system_template is None:
    out.append("{%- if ns.system -%}{{ raise_exception(" + _literal(f"template {name} has no system message") +
               ") }}{%- endif -%}")
  else:
    head, tail = t.system_template.split("{system_message}")
    out.append("{%- if ns.system is not none -%}{{- " + _literal(head) + " + ns.system + " + _literal(tail + t.sep) +
               " -}}{%- endif -%}")
  last_sep = _literal(t.last_sep) if t.last_sep else _literal(t.sep)
  out += [
      "{%- for message in messages[ns.start:] -%}",
      "{%- if message['content'] is string -%}{%- set text = message['content'] -%}",
      "{%- else -%}{%- set text = namespace(v='') -%}{%- for part in message['content'] -%}",
      "{%- if part['type'] == 'image' -%}{%- set text.v = text.v + '<IMG_CONTEXT>\\n' -%}",
      "{%- elif part['type'] == 'text' -%}{%- set text.v = text.v + part['text'] -%}{%- endif -%}",
      "{%- endfor -%}{%- set text = text.v -%}{%- endif -%}",
      "{%- if message['role'] == 'user' -%}",
      "{{- " + _literal(user) + " -}}{%- if text -%}{{- text + " + _literal(t.user_sep) + " -}}{%- endif -%}",
      "{%- elif message['role'] == 'assistant' -%}",
      "{{- " + _literal(assistant) + " -}}{%- if text -%}{{- text -}}{%- if loop.last -%}{{- " + last_sep +
      " -}}{%- else -%}{{- " + _literal(t.sep) + " -}}{%- endif -%}{%- endif -%}",
      "{%- else -%}{{ raise_exception('roles must be user / assistant after an optional first system') }}",
      "{%- endif -%}",
      "{%- endfor -%}",
      "{%- if add_generation_prompt -%}{{- " + _literal(assistant) + " -}}{%- endif -%}"]
  return "\n".join(out)

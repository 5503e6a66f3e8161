"""Which of our conversation templates (data/templates.py) a Jinja chat template is: how a transformers-native
(`-hf`) folder, which ships only Jinja, gets the named template that training needs (its `train_units`, the pieces
the official training tokenises and which of them are trained).

  match = recognise(templates.read_chat_template(folder), folder, bos_token=..., eos_token=...)
  templates.render(match.template, turns, system=..., default_system_block=match.default_system_block)

A template is recognised when the Jinja template and `templates.render` write the same string for every probe
conversation: one and several turns, with and without a system message (also an empty one), with one and two
images, open for generation (add_generation_prompt) and finished (the training text). Image parts are compared
as placeholders: the -hf templates write `<IMG_CONTEXT>\\n` (the first conversion `<image>\\n`) where ours writes
`<image>\\n`; both are expanded into the same image block later (chat_format.expand_placeholders).

The system behaviour is recognised too: the -hf InternVL templates write a system block only when the messages
start with a system message (`default_system_block=False`), OpenGVLab's conversation.py always writes one, with
the template's default message (or another default, as in the folders `convert export` writes).
"""

from __future__ import annotations

import dataclasses

from internvl_jax.data import templates

# (turns, system message or None, images of the first question); finished conversations are rendered without the
# generation prompt, open ones (last answer None) with it
_ONE = [("<image>\nWhat is in the picture?", None)]
PROBES = (
    ([("What is 2+2?", None)], None, 0),
    ([("What is 2+2?", "4.")], None, 0),
    ([("Hi.", "Hello!"), ("What is 2+2?", "It is 4."), ("And 3+3?", None)], None, 0),
    ([("Hi.", "Hello!"), ("What is 2+2?", "It is 4.")], None, 0),
    ([("What is 2+2?", None)], "Answer briefly.", 0),
    ([("Hi.", "Hello!"), ("What is 2+2?", "4.")], "Answer briefly.", 0),
    ([("What is 2+2?", "4.")], "", 0),
    (_ONE, None, 1),
    ([(_ONE[0][0], "A cat."), ("Its colour?", "Grey.")], None, 1),
    ([(_ONE[0][0], "A cat."), ("Its colour?", None)], "Answer briefly.", 1),
    ([("Image-1: <image>\nImage-2: <image>\nWhat differs?", None)], None, 2),
)


@dataclasses.dataclass(frozen=True)
class Recognised:
  """A named template and its system behaviour: system = the default system message (None: the template's own);
  default_system_block False = no system block when a conversation has no system message."""
  template: str
  system: str | None
  default_system_block: bool


def _jinja(jinja: str, turns, system, images: int, tokens: dict) -> str | None:
  """The Jinja rendering with image placeholders as ours (`<image>`), or None if the template raises."""
  messages = templates.messages_from_turns(turns, system=system, image_count=images)
  try:
    text = templates.render_jinja(jinja, messages, add_generation_prompt=turns[-1][1] is None, **tokens)
  except Exception:  # noqa: BLE001 (a template that rejects a probe, e.g. a system message, matches a template
    return None      # that rejects it too)
  return text.replace("<IMG_CONTEXT>", templates.IMAGE_PLACEHOLDER)


def _ours(name: str, turns, system, candidate: Recognised) -> str | None:
  try:
    return templates.render(name, turns, system=candidate.system if system is None else system,
                            default_system_block=candidate.default_system_block)
  except ValueError:  # a template without a system block given a system message
    return None


def _candidates(name: str, jinja_plain: str | None) -> list[Recognised]:
  """The system behaviours worth probing for `name`: no default block, and the default message the Jinja template
  writes for a conversation without one (read off the first probe's rendering)."""
  t = templates.get(name)
  if t.system_template is None:
    return [Recognised(name, None, True)]
  out = [Recognised(name, None, False)]
  turns = PROBES[0][0]
  empty = templates.render(name, turns, system="")
  head = t.system_template.split("{system_message}")[0]
  rest = empty[len(head):]
  if jinja_plain is not None and len(jinja_plain) >= len(empty) and jinja_plain.startswith(head) and \
      jinja_plain.endswith(rest):
    message = jinja_plain[len(head):len(jinja_plain) - len(rest)]
    out.append(Recognised(name, None if message == t.system_message else message, True))
  return out


def recognise(jinja: str, folder: str, **special_tokens) -> Recognised:
  """The named template (and system behaviour) that renders every probe conversation exactly as the Jinja chat
  template `jinja` of `folder` does; special_tokens (bos_token, eos_token, ...): the variables transformers
  passes to the template. Templates that render alike (Hermes-2 and internlm2-chat, which differ only in
  internlm2-chat's stripping of messages in training) resolve to the first in templates.NAMES. Raises a one-line
  ValueError naming the folder when none matches."""
  rendered = [_jinja(jinja, turns, system, images, special_tokens) for turns, system, images in PROBES]
  for name in templates.NAMES:
    for candidate in _candidates(name, rendered[0]):
      if all(text == _ours(name, turns, system, candidate) for text, (turns, system, _) in zip(rendered, PROBES)):
        return candidate
  raise ValueError(f"the chat template of {folder} is not one of the InternVL conversation templates "
                   f"({', '.join(templates.NAMES)}): it renders the probe conversations differently; fine-tune from "
                   "the OpenGVLab-layout release of the model")


def folder_template(folder: str) -> dict:
  """config.data's template fields of a released chat folder: {template, system_message, default_system_block}
  from the OpenGVLab config.json's `template` / `system_message`, or recognised from an -hf folder's Jinja chat
  template; a one-line ValueError otherwise."""
  import json
  import os

  from internvl_jax.data import tokenizer  # local: the tokenizer module pulls in the tokenizer file readers

  with open(os.path.join(folder, "config.json")) as f:
    hf = json.load(f)
  if hf.get("template"):
    return dict(template=hf["template"], system_message=hf.get("system_message"), default_system_block=True)
  jinja = templates.read_chat_template(folder)
  if jinja is None:
    raise ValueError(f"{folder} names no conversation template: no 'template' in config.json (OpenGVLab layout) and "
                     "no chat_template (-hf layout); give a released InternVL chat folder")
  tok = tokenizer.load(folder)
  match = recognise(jinja, folder, bos_token=tok.bos_token, eos_token=tok.eos_token)
  return dict(template=match.template, system_message=match.system, default_system_block=match.default_system_block)

"""How one chat model is prompted, fed and stopped: the one place that turns a question (and images, and history)
into token ids and generated ids back into an answer, for every way a model arrives here.

  fmt = ChatFormat.from_folder(FOLDER, model.config)   # an OpenGVLab-layout or transformers-native (-hf) release
  fmt = ChatFormat.from_run(cfg, tokenizer)            # a train.py stage-3 workdir (config.json + its tokenizer)
  inputs = fmt.inputs("Describe the image.", ["photo.jpg"])           # input_ids [1, T], pixel_values [N, S, S, 3]
  out = generate(model, inputs["input_ids"], inputs["pixel_values"], eos_token_id=fmt.stop_ids, max_new_tokens=64)
  print(fmt.answer(out[0, inputs["input_ids"].shape[1]:]))

The layout follows the official `InternVLChatModel.chat()` (DESIGN §5, docs/templates.md): the released template
(`config.template`, system message `config.system_message` or the template's default), `<image>\\n` put in front
of a question that has no `<image>` when images are given, each `<image>` (history included, in order) replaced by
`<img>` + `<IMG_CONTEXT>` x (tokens per tile x tiles) + `</img>`, the whole query tokenised with the tokenizer's own
special tokens (BOS only where its config adds one), generation stopped at the template separator's token (and the
tokenizer's eos), the answer cut at the separator. transformers-native folders render their shipped Jinja
`chat_template` instead, where each image is one `<IMG_CONTEXT>` that the processor expands the same way.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np

from internvl_jax.data import templates
from internvl_jax.data import tokenizer as tokenizer_lib
from internvl_jax.data import transforms

IMAGE_PLACEHOLDER = templates.IMAGE_PLACEHOLDER
IMG_START, IMG_END, IMG_CONTEXT = tokenizer_lib.IMG_START, tokenizer_lib.IMG_END, tokenizer_lib.IMG_CONTEXT


def tokens_per_tile(image_size: int, patch_size: int, downsample_ratio: float) -> int:
  """Vision tokens one tile becomes after pixel shuffle (256 for 448 px, patch 14, ratio 0.5)."""
  return int((image_size // patch_size) ** 2 * downsample_ratio**2)


def image_block(num_tiles: int, num_tokens_per_tile: int) -> str:
  """<img> + <IMG_CONTEXT> x (tiles x tokens per tile) + </img>: what one image becomes in the prompt."""
  return IMG_START + IMG_CONTEXT * (num_tiles * num_tokens_per_tile) + IMG_END


def preprocess_image(image, image_size: int = 448, *, dynamic: bool = True, max_num: int = 12,
                     use_thumbnail: bool = True) -> np.ndarray:
  """A PIL image / uint8 [H, W, 3] array / file path -> normalised tiles float32 [N, S, S, 3].

  dynamic: InternVL's dynamic tiling, N = cols * rows of the grid closest to the image's aspect ratio
  (1 <= N <= max_num) plus one thumbnail when N > 1 and use_thumbnail; otherwise one tile, the whole image
  squashed to S x S (the official evaluation scripts without --dynamic)."""
  pil = transforms.load_image(image) if isinstance(image, str) else transforms.to_pil(image)
  if not dynamic:
    return transforms.normalize(transforms.resize(pil, image_size))[None]
  tiles = transforms.dynamic_tiles(pil, image_size, max_num=max_num, use_thumbnail=use_thumbnail)
  return np.stack([transforms.normalize(t) for t in tiles])


def num_dynamic_tiles(width: int, height: int, image_size: int, max_num: int, use_thumbnail: bool) -> int:
  """How many tiles preprocess_image(dynamic=True) makes of a width x height image, without decoding it."""
  cols, rows = transforms.closest_grid(width, height, image_size, 1, max_num)
  return cols * rows + int(use_thumbnail and cols * rows > 1)


@dataclasses.dataclass
class ChatFormat:
  """A chat model's prompt layout, image geometry and stop rule.

  template: an OpenGVLab template name (data/templates.py) — or None with `jinja`, a transformers-native
  chat_template; system: the system message (None = the template's default); default_system_block: False = no
  system block when system is None (a run fine-tuned from an -hf folder, whose Jinja template writes none);
  stop_ids: generation stops at any of them; max_num / use_thumbnail: dynamic tiling at inference (the release's
  max_dynamic_patch / use_thumbnail).
  """
  tokenizer: tokenizer_lib.Tokenizer
  image_size: int
  tokens_per_tile: int
  template: str | None = None
  jinja: str | None = None
  system: str | None = None
  stop_ids: tuple[int, ...] = ()
  max_num: int = 12
  use_thumbnail: bool = True
  default_system_block: bool = True

  def __post_init__(self):
    if (self.template is None) == (self.jinja is None):
      raise ValueError("a chat format needs exactly one of an OpenGVLab template name or a Jinja chat_template")
    if self.template is not None:
      templates.get(self.template)  # unknown names fail here, listing the known ones
    self.tokenizer.image_token_id  # noqa: B018  (one-line error now if the tokenizer lacks <IMG_CONTEXT>)
    if not self.stop_ids:
      self.stop_ids = default_stop_ids(self.tokenizer, self.template)

  # ------------------------------------------------------------------------------------------------- prompts

  def prompt(self, question: str, num_tiles: Sequence[int] = (), history: Sequence[tuple[str, str]] = ()) -> str:
    """The full prompt text, image blocks expanded: `num_tiles[i]` tiles for the i-th image of the conversation
    (history first), the assistant turn left open."""
    if self.jinja is not None:
      return self._jinja_prompt(question, num_tiles, history)
    # chat() puts one <image>\n in front of a first question that has none (not with history: then the caller
    # wrote the placeholders)
    if num_tiles and not history and IMAGE_PLACEHOLDER not in question:
      question = IMAGE_PLACEHOLDER + "\n" + question
    text = templates.render(self.template, [*history, (question, None)], system=self.system,
                            default_system_block=self.default_system_block)
    return expand_placeholders(text, IMAGE_PLACEHOLDER, num_tiles, self.tokens_per_tile)

  def _jinja_prompt(self, question, num_tiles, history) -> str:
    messages = templates.messages_from_turns([*history, (question, None)], system=self.system,
                                             image_count=len(num_tiles))
    text = templates.render_jinja(self.jinja, messages, add_generation_prompt=True,
                                  bos_token=self.tokenizer.bos_token, eos_token=self.tokenizer.eos_token)
    # The released -hf template writes each image as <IMG_CONTEXT> (older conversions: <image>), which
    # InternVLProcessor expands into the image block.
    placeholder = IMG_CONTEXT if text.count(IMG_CONTEXT) == len(num_tiles) else IMAGE_PLACEHOLDER
    return expand_placeholders(text, placeholder, num_tiles, self.tokens_per_tile)

  def input_ids(self, question: str, num_tiles: Sequence[int] = (),
                history: Sequence[tuple[str, str]] = ()) -> list[int]:
    """prompt() tokenised as the official code does (the tokenizer's own special tokens, e.g. InternLM2's BOS);
    checks that each vision token has exactly one <IMG_CONTEXT> id."""
    ids = self.tokenizer.encode(self.prompt(question, num_tiles, history), add_special_tokens=True)
    expected = sum(num_tiles) * self.tokens_per_tile
    found = sum(1 for i in ids if i == self.tokenizer.image_token_id)
    if found != expected:
      raise ValueError(f"tokenizer {self.tokenizer.source} gives {found} {IMG_CONTEXT} ids where {expected} are "
                       f"needed; it must hold {IMG_CONTEXT} as one added token")
    return ids

  def inputs(self, question: str, images: Sequence = (), *, history: Sequence[tuple[str, str]] = (),
             dynamic: bool = True, max_num: int | None = None) -> dict:
    """Tokenised prompt and tiles for `generate(model, ...)`: {"input_ids": int32 [1, T], "pixel_values":
    float32 [N_total, S, S, 3] or None}, the tiles in the order of the images."""
    tiles = [preprocess_image(im, self.image_size, dynamic=dynamic, max_num=max_num or self.max_num,
                              use_thumbnail=self.use_thumbnail) for im in images]
    ids = self.input_ids(question, [len(t) for t in tiles], history)
    return {"input_ids": np.asarray([ids], np.int32), "pixel_values": np.concatenate(tiles) if tiles else None}

  # -------------------------------------------------------------------------------------------------- answers

  def answer(self, new_ids: Sequence[int]) -> str:
    """Generated ids (after the prompt) -> the answer: cut at the first stop id, special tokens dropped, cut at
    the template's stop string (as chat() splits the decoded text), stripped."""
    ids = [int(i) for i in np.asarray(new_ids).reshape(-1)]
    for k, i in enumerate(ids):
      if i in self.stop_ids:
        ids = ids[:k]
        break
    text = self.tokenizer.decode(ids)
    if self.template is not None:
      text = text.split(templates.stop_string(self.template))[0]
    return text.strip()

  # ------------------------------------------------------------------------------------------------- loading

  @classmethod
  def from_folder(cls, folder: str, model_config, tokenizer: tokenizer_lib.Tokenizer | None = None) -> ChatFormat:
    """The format of a released folder: an OpenGVLab layout (config.json `template`, `system_message`,
    `force_image_size`, `use_thumbnail`, `max_dynamic_patch`) or a transformers-native one (its shipped Jinja
    chat_template; stop ids from generation_config.json). model_config: the loaded model's config."""
    tok = tokenizer or tokenizer_lib.load(folder)
    hf = _read_json(os.path.join(folder, "config.json"))
    size = int(model_config.get("image_size", 0) or model_config.vision.image_size)
    per_tile = tokens_per_tile(size, model_config.vision.patch_size, model_config.downsample_ratio)
    if hf.get("template"):  # OpenGVLab remote-code layout
      template = hf["template"]
      if template not in templates.NAMES:
        raise ValueError(f"{folder}/config.json names template {template!r}, which is not one of "
                         f"{', '.join(templates.NAMES)}")
      return cls(tok, size, per_tile, template=template, system=hf.get("system_message"),
                 max_num=int(hf.get("max_dynamic_patch", 12)), use_thumbnail=bool(hf.get("use_thumbnail", True)))
    jinja = templates.read_chat_template(folder)
    if jinja is None:
      raise ValueError(f"{folder} names no conversation template: its config.json has no 'template' (OpenGVLab "
                       "layout) and it ships no chat_template (chat_template.jinja / chat_template.json / "
                       "tokenizer_config.json)")
    gen = _read_json(os.path.join(folder, "generation_config.json"))
    stops = gen.get("eos_token_id")
    stops = [stops] if isinstance(stops, int) else list(stops or [])
    proc = _read_json(os.path.join(folder, "preprocessor_config.json"))
    return cls(tok, size, per_tile, jinja=jinja, stop_ids=_unique([*stops, tok.eos_id]),
               max_num=int(proc.get("max_patches", 12)), use_thumbnail=True)

  @classmethod
  def from_run(cls, cfg, tokenizer: tokenizer_lib.Tokenizer) -> ChatFormat:
    """The format a train.py stage-3 run trained with: config.data.template / system_message /
    default_system_block, the model's input size and the tile cap (data.max_dynamic_patch, by default
    max_tiles - 1)."""
    from internvl_jax.train import config_checks  # local: a training-side import
    max_num = int(cfg.data.get("max_dynamic_patch", 0) or 0) or max(int(cfg.data.get("max_tiles", 1)) - 1, 1)
    return cls(tokenizer, config_checks.input_size(cfg), config_checks.tokens_per_tile(cfg),
               template=cfg.data.get("template", "plain"), system=cfg.data.get("system_message", None),
               max_num=max_num, default_system_block=bool(cfg.data.get("default_system_block", True)))


def default_stop_ids(tok: tokenizer_lib.Tokenizer, template: str | None) -> tuple[int, ...]:
  """The template separator's token (what chat() passes as eos_token_id) and the tokenizer's eos."""
  ids = []
  if template is not None:
    stop = tok.token_id(templates.stop_string(template))
    if stop is None:
      raise ValueError(f"tokenizer {tok.source} has no token {templates.stop_string(template)!r}, the stop token of "
                       f"template {template!r}; use the tokenizer saved with the checkpoint")
    ids.append(stop)
  eos = tok.eos_id if tok.eos_token is not None else None
  return _unique([*ids, *([eos] if eos is not None else [])])


def expand_placeholders(text: str, placeholder: str, num_tiles: Sequence[int], num_tokens_per_tile: int) -> str:
  """Replaces the i-th `placeholder` of text by image_block(num_tiles[i]); the counts must agree."""
  pieces = text.split(placeholder)
  if len(pieces) - 1 != len(num_tiles):
    raise ValueError(f"the prompt has {len(pieces) - 1} {placeholder} placeholders but {len(num_tiles)} images "
                     "were given; use one placeholder per image")
  out = [pieces[0]]
  for tiles, piece in zip(num_tiles, pieces[1:]):
    out += [image_block(tiles, num_tokens_per_tile), piece]
  return "".join(out)


def _unique(ids) -> tuple[int, ...]:
  return tuple(dict.fromkeys(int(i) for i in ids))


def _read_json(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e}); restore it from the release") from None

"""Record -> fixed-shape numpy features for each stage (what one example of a batch holds).

Image-text stages (contrastive, alignment):
  pixel_values    float32 [S, S, 3]    normalised image
  input_ids       int32 [T]            [bos] caption [eos], right-padded with pad
  attention_mask  int32 [T]            1 = real token (the caption loss uses it as its mask too)
Instruct stage:
  pixel_values    float32 [K, S, S, 3] K = max_tiles slots (dynamic tiles, then zero tiles)
  input_ids       int32 [T]            template with K * tokens_per_tile image tokens, right-padded
  attention_mask  int32 [T]            0 for padding and for the image tokens of empty tile slots
  loss_mask       int32 [T]            1 on answer tokens and the end-of-turn token after each answer

Every K tile slots carry image tokens so the chat model's 'replace' mode always finds as many image tokens as
vision tokens (fixed shapes for jit); the tokens of unused slots are masked out of attention.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from internvl_jax.data import tokenizer as tokenizer_lib
from internvl_jax.data import transforms
from internvl_jax.data.transforms import BadRecord

# role markers per template: (user prefix, end of user turn + assistant prefix, end of assistant turn)
TEMPLATES = {
    "plain": ("<user>", "<assistant>", "</s>"),
    "chatml": ("<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>\n"),
}


@dataclasses.dataclass
class FeatureSpec:
  task: str  # 'contrastive' | 'alignment' | 'instruct'
  image_size: int
  max_text_len: int
  tokens_per_tile: int = 0  # instruct: vision tokens per tile after pixel shuffle
  max_tiles: int = 1  # instruct: tile slots per example (1 = no tiling)
  template: str = "plain"
  augment: bool = False  # random-resized-crop for training images
  crop_scale: tuple = (0.8, 1.0)
  # image-text: prepended to every caption, as evaluation does (InternVL-C/G: 'summarize:'), so that a model is
  # trained on the texts it will be scored with
  text_prefix: str = ""


def image_of(record: dict, size: int, rng: np.random.Generator | None, spec: FeatureSpec):
  """The record's image as a PIL image (decoded from image_path, or from an array)."""
  if "error" in record:
    raise BadRecord(record["error"])
  if "image" in record:
    image = transforms.to_pil(record["image"])
  elif "image_path" in record:
    image = transforms.load_image(record["image_path"])
  else:
    raise BadRecord("record has no image")
  if spec.augment and rng is not None:
    return transforms.random_resized_crop(image, size, rng, scale=spec.crop_scale)
  return transforms.resize(image, size)


def caption_tokens(tok: tokenizer_lib.Tokenizer, text: str, max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """[bos] text [eos] truncated to max_len (eos kept last), right-padded. -> ids, mask int32 [max_len]."""
  body = tok.encode(text)
  if not body:
    raise BadRecord("caption is empty")
  head = [tok.bos_id] if tok.bos_id is not None else []
  ids = (head + body)[:max_len - 1] + [tok.eos_id]
  return _pad(ids, max_len, tok.pad_id), _pad([1] * len(ids), max_len, 0)


def _pad(values: list[int], n: int, fill: int) -> np.ndarray:
  out = np.full((n,), fill, np.int32)
  out[:len(values)] = values
  return out


def image_text(record: dict, tok, spec: FeatureSpec, rng: np.random.Generator | None) -> dict:
  """Features of an image-text (or classification) record; training picks a random caption, eval the first."""
  captions = [c for c in record.get("captions", []) if str(c).strip()]
  if not captions and record.get("label"):
    captions = [record["label"]]
  if not captions:
    raise BadRecord("record has no (non-empty) caption")
  caption = captions[int(rng.integers(len(captions)))] if rng is not None else captions[0]
  pixels = transforms.normalize(image_of(record, spec.image_size, rng, spec))
  ids, mask = caption_tokens(tok, spec.text_prefix + caption, spec.max_text_len)
  return {"pixel_values": pixels, "input_ids": ids, "attention_mask": mask}


def instruct(record: dict, tok, spec: FeatureSpec, rng: np.random.Generator | None) -> dict:
  """Features of an instruction record (InternVL / LLaVA conversations)."""
  if "error" in record:
    raise BadRecord(record["error"])
  turns = record.get("conversations") or []
  if len(turns) < 2:
    raise BadRecord("record has no conversation (needs a human turn and a gpt turn)")
  if spec.template not in TEMPLATES:
    raise ValueError(f"template {spec.template!r} is not one of {sorted(TEMPLATES)}; set config.data.template")
  user, assistant, end = TEMPLATES[spec.template]
  k = spec.max_tiles
  pixels = np.zeros((k, spec.image_size, spec.image_size, 3), np.float32)
  n_tiles = 0
  if "image" in record or "image_path" in record:
    image = image_of(record, spec.image_size, rng, spec) if k == 1 else None
    tiles = [image] if k == 1 else transforms.dynamic_tiles(
        _full_image(record), spec.image_size, max_num=max(k - 1, 1), use_thumbnail=True)
    for i, t in enumerate(tiles[:k]):
      pixels[i] = transforms.normalize(t)
    n_tiles = min(len(tiles), k)

  ids: list[int] = [tok.bos_id] if tok.bos_id is not None else []
  attn: list[int] = [1] * len(ids)
  loss: list[int] = [0] * len(ids)

  def add(tokens, *, train=False, visible=1):
    ids.extend(tokens)
    attn.extend([visible] * len(tokens) if isinstance(visible, int) else visible)
    loss.extend([int(train)] * len(tokens))

  placed = False
  for i, turn in enumerate(turns):
    role, value = turn.get("from"), str(turn.get("value", ""))
    if role in ("human", "user"):
      add(tok.encode(user))
      if not placed:  # the image block goes where <image> is, or first in the first user turn
        before, _, after = value.partition("<image>") if "<image>" in value else ("", "", value)
        add(tok.encode(before.strip()))
        _add_image_block(add, tok, spec, n_tiles)
        value, placed = after, True
      add(tok.encode(value.replace("<image>", " ").strip()))
      add(tok.encode(assistant))
    elif role in ("gpt", "assistant"):
      answer = tok.encode(value.strip())
      if not answer:
        raise BadRecord(f"empty answer in turn {i}")
      add(answer + tok.encode(end), train=True)
    else:
      raise BadRecord(f"turn {i} has role {role!r}, expected 'human' or 'gpt'")
  if len(ids) > spec.max_text_len and sum(loss[:spec.max_text_len]) == 0:  # truncation left nothing to learn
    raise ValueError(f"max_text_len {spec.max_text_len} leaves no answer token after the prompt and "
                     f"{k * spec.tokens_per_tile} image tokens; raise --config.data.max_text_len")
  t = spec.max_text_len
  return {"pixel_values": pixels, "input_ids": _pad(ids[:t], t, tok.pad_id), "attention_mask": _pad(attn[:t], t, 0),
          "loss_mask": _pad(loss[:t], t, 0)}


def _full_image(record: dict):
  if "image" in record:
    return transforms.to_pil(record["image"])
  return transforms.load_image(record["image_path"])


def _add_image_block(add, tok, spec: FeatureSpec, n_tiles: int) -> None:
  """<img> IMG_CONTEXT x (K * tokens_per_tile) </img>; tokens of empty tile slots are not attended."""
  n = spec.tokens_per_tile
  start = [tok.token_id(tokenizer_lib.IMG_START)] if tok.token_id(tokenizer_lib.IMG_START) is not None else []
  end = [tok.token_id(tokenizer_lib.IMG_END)] if tok.token_id(tokenizer_lib.IMG_END) is not None else []
  add(start, visible=1 if n_tiles else 0)
  add([tok.image_token_id] * (spec.max_tiles * n), visible=[1] * (n_tiles * n) + [0] * ((spec.max_tiles - n_tiles) * n))
  add(end, visible=1 if n_tiles else 0)


def make_feature_fn(spec: FeatureSpec, tok):
  """(record, rng | None) -> features dict for spec.task."""
  if spec.task in ("contrastive", "alignment"):
    return lambda record, rng: image_text(record, tok, spec, rng)
  if spec.task == "instruct":
    if spec.tokens_per_tile <= 0:
      raise ValueError("instruct features need tokens_per_tile > 0")
    return lambda record, rng: instruct(record, tok, spec, rng)
  raise ValueError(f"unknown task {spec.task!r}; use contrastive, alignment or instruct")

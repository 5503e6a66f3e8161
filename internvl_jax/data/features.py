"""Record -> fixed-shape numpy features for each stage (what one example of a batch holds).

Image-text stages (contrastive, alignment):
  pixel_values    float32 [S, S, 3]    normalised image
  input_ids       int32 [T]            [bos] caption [eos], right-padded with pad
  attention_mask  int32 [T]            1 = real token (the caption loss uses it as its mask too)
Instruct stage:
  pixel_values    float32 [K, S, S, 3] K = max_tiles slots (each image's tiles in prompt order, then zero tiles)
  input_ids       int32 [T]            template with K * tokens_per_tile image tokens, right-padded
  attention_mask  int32 [T]            0 for padding and for the image tokens of empty tile slots
  loss_mask       int32 [T]            1 on answer tokens and the end-of-turn token after each answer

Every K tile slots carry image tokens so the chat model's 'replace' mode always finds as many image tokens as
vision tokens (fixed shapes for jit); the tokens of unused slots are masked out of attention.

Instruct stage with packing (FeatureSpec.packed; data/packing.py packs several examples per row):
  pixel_values    float32 [N, S, S, 3] this example's N real tiles only (N <= K)
  input_ids       int32 [L]            the official prompt, N * tokens_per_tile image tokens, L <= T, unpadded
  loss_mask       int32 [L]
"""

from __future__ import annotations

import dataclasses

import numpy as np

from internvl_jax.data import chat_format, templates
from internvl_jax.data import tokenizer as tokenizer_lib
from internvl_jax.data import transforms, visual
from internvl_jax.data.transforms import BadRecord

IMAGE_PLACEHOLDER, IMG_CONTEXT = templates.IMAGE_PLACEHOLDER, tokenizer_lib.IMG_CONTEXT
VIDEO_PLACEHOLDER = "<video>"


@dataclasses.dataclass
class FeatureSpec:
  task: str  # 'contrastive' | 'alignment' | 'instruct'
  image_size: int
  max_text_len: int
  tokens_per_tile: int = 0  # instruct: vision tokens per tile after pixel shuffle
  max_tiles: int = 1  # instruct: tile slots per example (1 = no tiling)
  template: str = "plain"  # instruct: a conversation template of data/templates.py
  system: str | None = None  # instruct: the system message (None: the template's default; a record's wins)
  default_system_block: bool = True  # instruct, system None, no system turn: False = no system block (-hf folders)
  # instruct: the tile cap of dynamic tiling (None: max_tiles - 1, room for the thumbnail; a dataset's own
  # max_dynamic_patch in an internvl meta file wins), and the frames a video record is sampled to
  max_dynamic_patch: int | None = None
  min_num_frame: int = 8
  max_num_frame: int = 32
  augment: bool = False  # random-resized-crop for training images
  crop_scale: tuple = (0.8, 1.0)
  # image-text: prepended to every caption, as evaluation does (InternVL-C/G: 'summarize:'), so that a model is
  # trained on the texts it will be scored with
  text_prefix: str = ""
  # instruct: variable-length features of real tiles and tokens only, for data/packing.py (training)
  packed: bool = False


def image_of(record: dict, size: int, rng: np.random.Generator | None, spec: FeatureSpec):
  """The record's image as a PIL image (decoded from image_path, or from an array)."""
  if "error" in record:
    raise BadRecord(record["error"])
  if "image" in record:
    image = transforms.to_pil(record["image"])
  elif "image_path" in record:
    image = transforms.load_image(record["image_path"])
  elif "image_bytes" in record:  # a webdataset sample (data/wds.py)
    image = transforms.decode_image(record["image_bytes"], record.get("id", "?"))
  else:
    raise BadRecord("record has no image")
  if spec.augment and rng is not None:
    return transforms.random_resized_crop(image, size, rng, scale=spec.crop_scale)
  return transforms.resize(image, size)


def caption_tokens(tok: tokenizer_lib.Tokenizer, text: str, max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """[bos] text [eos], the text cut so that both stay, right-padded (pad id, else 0) -> ids, mask int32 [max_len].

  BOS where the tokenizer's config adds one, EOS always: for a released InternVL-C/G (LLaMA) tokenizer this is
  the published evaluation's text layout (tokenizer.contrastive_text_ids), so a model fine-tuned from a release
  trains on the texts it is scored with."""
  body = tok.encode(text)
  if not body:
    raise BadRecord("caption is empty")
  head = [tok.bos_id] if tok.add_bos_token and tok.bos_id is not None else []
  ids = head + body[:max(max_len - len(head) - 1, 0)] + [tok.eos_id]
  return _pad(ids, max_len, tok.pad_id if tok.pad_id is not None else 0), _pad([1] * len(ids), max_len, 0)


def _pad(values: list[int], n: int, fill: int) -> np.ndarray:
  out = np.full((n,), fill, np.int32)
  out[:len(values)] = values
  return out


def image_text(record: dict, tok, spec: FeatureSpec, rng: np.random.Generator | None) -> dict:
  """Features of an image-text (or classification) record; training picks a random caption, eval the first."""
  if "error" in record:  # the source's own reason (not JSON, not UTF-8, ...) before any field is looked at
    raise BadRecord(record["error"])
  captions = [c for c in record.get("captions", []) if str(c).strip()]
  if not captions and record.get("label"):
    captions = [record["label"]]
  if not captions:
    raise BadRecord("record has no (non-empty) caption")
  caption = captions[int(rng.integers(len(captions)))] if rng is not None else captions[0]
  pixels = transforms.normalize(image_of(record, spec.image_size, rng, spec))
  ids, mask = caption_tokens(tok, spec.text_prefix + caption, spec.max_text_len)
  return {"pixel_values": pixels, "input_ids": ids, "attention_mask": mask}


def conversation_turns(record: dict) -> tuple[list[tuple[str, str]], str | None]:
  """An InternVL / LLaVA record's `conversations` -> ([(question, answer), ...], system message or None).

  Roles: 'human' / 'user', 'gpt' / 'assistant', and an optional leading 'system' turn (its text replaces the
  template's default system message, as the official training's `system` role does)."""
  turns = list(record.get("conversations") or [])
  system = None
  if turns and turns[0].get("from") == "system":
    system = str(turns.pop(0).get("value", ""))
  if len(turns) < 2:
    raise BadRecord("record has no conversation (needs a human turn and a gpt turn)")
  pairs = []
  for i in range(0, len(turns) - 1, 2):
    (q_role, q), (a_role, a) = (turns[i].get("from"), turns[i].get("value")), \
        (turns[i + 1].get("from"), turns[i + 1].get("value"))
    if q_role not in ("human", "user") or a_role not in ("gpt", "assistant"):
      raise BadRecord(f"turns {i} and {i + 1} have roles {q_role!r}, {a_role!r}; expected a human turn, then a "
                      "gpt turn")
    if not isinstance(q, str) or not isinstance(a, str) or not a.strip():
      raise BadRecord(f"turn {i + 1} has an empty or non-text answer")
    pairs.append((q, a))
  if len(turns) % 2:
    raise BadRecord(f"turn {len(turns) - 1} is a question without an answer")
  return pairs, system


def instruct_layout(record: dict, spec: FeatureSpec, rng: np.random.Generator | None):
  """An instruction record -> (turns, system message, tiles): turns [(question, answer)] with one `<image>` per
  image (video frames written as `Frame-1: <image>\\nFrame-2: <image>\\n...`), tiles one list of PIL tiles per
  image in prompt order (data/visual.py: the official per-image tile rule within the K slots).

  As the official fine-tuning: a single image (`image` a path) gets `<image>\\n` in front of the first question
  when the conversation has none; several images (`image` a list) need their placeholders written (one each); a
  video's first question gets `<video>\\n` in front when it has no `<video>`, and `<video>\\n` becomes the frame
  lines. A count of placeholders other than the images' is a bad record (the official code fails on it too,
  or leaves the extra `<image>` as literal text)."""
  if "error" in record:
    raise BadRecord(record["error"])
  turns, system = conversation_turns(record)
  k = spec.max_tiles
  cap = record.get("max_dynamic_patch") or spec.max_dynamic_patch or max(k - 1, 1)
  if "video_path" in record:
    n = visual.num_frames_to_sample(spec.min_num_frame, spec.max_num_frame, k, rng)
    frames, _ = visual.video_frames(record["video_path"], n, rng, record.get("video_clip"))
    if len(frames) > k:  # a padded short video cannot exceed n <= k; kept as a guard
      raise BadRecord(f"{len(frames)} video frames do not fit config.data.max_tiles={k}")
    tiles = [[transforms.resize(f, spec.image_size)] for f in frames]  # one squashed tile per frame
    q = turns[0][0] if VIDEO_PLACEHOLDER in turns[0][0] else VIDEO_PLACEHOLDER + "\n" + turns[0][0]
    lines = "".join(f"Frame-{i + 1}: {IMAGE_PLACEHOLDER}\n" for i in range(len(frames)))
    turns[0] = (q.replace(VIDEO_PLACEHOLDER + "\n", lines), turns[0][1])
  elif "image_paths" in record:
    images = [transforms.load_image(p) for p in record["image_paths"]]
    tiles = visual.image_tiles(images, spec.image_size, cap, k)
  elif "image" in record or "image_path" in record:
    if k == 1:  # one slot: the whole image squashed (random-resized-crop with data.augment)
      tiles = [[image_of(record, spec.image_size, rng, spec)]]
    else:
      image = transforms.to_pil(record["image"]) if "image" in record else transforms.load_image(record["image_path"])
      tiles = visual.image_tiles([image], spec.image_size, cap, k)
    if not any(IMAGE_PLACEHOLDER in q for q, _ in turns):  # as the official chat() and training do
      turns[0] = (IMAGE_PLACEHOLDER + "\n" + turns[0][0], turns[0][1])
  else:
    return [(q.replace(IMAGE_PLACEHOLDER, ""), a) for q, a in turns], system, []
  placeholders = sum(q.count(IMAGE_PLACEHOLDER) for q, _ in turns)
  if placeholders != len(tiles) or any(IMAGE_PLACEHOLDER in a for _, a in turns) or \
      IMAGE_PLACEHOLDER in (system or ""):
    raise BadRecord(f"the questions hold {placeholders} {IMAGE_PLACEHOLDER} placeholders for {len(tiles)} images "
                    f"(video frames); write one {IMAGE_PLACEHOLDER} per image, in questions only")
  if record.get("data_augment") and rng is not None:  # the dataset's official JPEG-quality augmentation
    tiles = [[visual.jpeg_degrade(t, rng) for t in image] for image in tiles]
  return turns, system, tiles


def instruct_prompt(record: dict, spec: FeatureSpec, rng: np.random.Generator | None = None) -> str:
  """The record's conversation as the official training writes it, each image's block with its own tile count
  (no spare slots): the text `instruct` tokenises."""
  turns, system, tiles = instruct_layout(record, spec, rng)
  system = spec.system if system is None else system
  text = templates.render(spec.template, turns, system=system, default_system_block=spec.default_system_block)
  return _expand([text], [len(t) for t in tiles], spec.tokens_per_tile)[0]


def _expand(strings: list[str], num_tiles: list[int], per_tile: int) -> list[str]:
  """The i-th `<image>` over the strings, in order, -> image_block(num_tiles[i])."""
  out, i = [], 0
  for s in strings:
    pieces = s.split(IMAGE_PLACEHOLDER)
    text = [pieces[0]]
    for piece in pieces[1:]:
      text += [chat_format.image_block(num_tiles[i], per_tile), piece]
      i += 1
    out.append("".join(text))
  return out


def instruct(record: dict, tok, spec: FeatureSpec, rng: np.random.Generator | None) -> dict:
  """Features of an instruction record (InternVL / LLaVA conversations), laid out by the conversation template
  (data/templates.py) exactly as a prompt is at inference (data/chat_format.py): the system block (its default
  message unless the record has a system turn), the images placed and tiled by instruct_layout, each `<image>`
  replaced by <img> IMG_CONTEXT x (its tiles * tokens_per_tile) </img>, BOS only where the tokenizer's config
  adds one. Loss on each answer and the separator token after it (templates.segments).

  The K tile slots are filled with the images' tiles in prompt order; the image tokens of the unused slots are
  appended inside the last image's block (or, text only, right after BOS) and not attended, so every row holds
  K * tokens_per_tile image tokens (fixed shapes) while the attended prompt is the official one."""
  turns, system, tiles = instruct_layout(record, spec, rng)
  if spec.packed:
    return _instruct_packed(turns, system, tiles, tok, spec)
  k, n = spec.max_tiles, spec.tokens_per_tile
  flat = [t for image in tiles for t in image]
  n_tiles = len(flat)
  if n_tiles > k:
    raise BadRecord(f"{n_tiles} tiles do not fit config.data.max_tiles={k}")
  pixels = np.zeros((k, spec.image_size, spec.image_size, 3), np.float32)
  for i, t in enumerate(flat):
    pixels[i] = transforms.normalize(t)
  counts = [len(t) for t in tiles]
  if counts:
    counts[-1] += k - n_tiles  # the spare slots' tokens, unattended
  pieces, units = _pieces_and_units(spec, turns, system)

  ids = _bos(tok)
  hidden_start, hidden = len(ids), 0
  if not tiles:
    # A text-only record still carries its K tile slots' image tokens (all unattended) right after BOS: the
    # batch's vision tokens fill image tokens in row-major order, so every row must hold exactly K * n of them.
    block_ids = tok.encode(chat_format.image_block(k, n), add_special_tokens=False)
    hidden = len(block_ids)
    ids += block_ids
  loss: list[int] = [0] * len(ids)
  unit_ids, unit_loss = _conversation_ids(pieces, units, counts, n, tok)
  ids += unit_ids
  loss += unit_loss
  ids_arr = np.asarray(ids, np.int64)
  attn = np.ones(len(ids), np.int32)
  where = np.flatnonzero(ids_arr == tok.image_token_id)
  if len(where) != k * n:
    raise ValueError(f"tokenizer {tok.source} gives {len(where)} {IMG_CONTEXT} ids for {k * n} vision tokens; it "
                     f"must hold {IMG_CONTEXT} as one added token")
  attn[where[n_tiles * n:]] = 0
  attn[hidden_start:hidden_start + hidden] = 0
  if len(where) and where[-1] >= spec.max_text_len:  # every row must keep all K * n image tokens (see above)
    if len(tiles) > 1:  # its length varies with its images: skipped, as the official code skips truncated ones
      raise BadRecord(f"its {len(tiles)} images end past max_text_len {spec.max_text_len}")
    raise ValueError(f"max_text_len {spec.max_text_len} cuts into the {k * n} image tokens of a prompt; raise "
                     "--config.data.max_text_len")
  if len(ids) > spec.max_text_len and sum(loss[:spec.max_text_len]) == 0:  # truncation left nothing to learn
    raise ValueError(f"max_text_len {spec.max_text_len} leaves no answer token after the prompt and "
                     f"{k * n} image tokens; raise --config.data.max_text_len")
  t = spec.max_text_len
  return {"pixel_values": pixels, "input_ids": _pad(ids[:t], t, tok.pad_id if tok.pad_id is not None else 0),
          "attention_mask": _pad(attn[:t].tolist(), t, 0), "loss_mask": _pad(loss[:t], t, 0)}


def _pieces_and_units(spec, turns, system):
  """templates.segments and train_units of a record's turns (its system turn, else the config's message)."""
  system = spec.system if system is None else system
  try:
    block = spec.default_system_block
    return (templates.segments(spec.template, turns, system=system, default_system_block=block),
            templates.train_units(spec.template, turns, system=system, default_system_block=block))
  except ValueError as e:
    raise ValueError(f"{e}; set config.data.template") from None


def _bos(tok) -> list[int]:
  return [tok.bos_id] if tok.add_bos_token and tok.bos_id is not None else []


def _conversation_ids(pieces, units, counts: list[int], per_tile: int, tok) -> tuple[list[int], list[int]]:
  """The rendered conversation (templates.segments / train_units) with each `<image>` expanded to counts[i]
  tiles' image tokens, tokenised as the official training does -> (ids, loss flags)."""
  texts = _expand([t for t, _ in pieces], counts, per_tile)
  return _tokenize_units(_expand(units, counts, per_tile), [(t, m) for t, (_, m) in zip(texts, pieces)], tok)


def _instruct_packed(turns, system, tiles, tok, spec: FeatureSpec) -> dict:
  """The packed form of `instruct`: each image's block holds exactly its own tiles' image tokens (no spare
  slots, no hidden block, no padding), so a packed row's image tokens are exactly its examples' real tiles'.
  Truncated to max_text_len like the unpacked form; a record whose image tokens end past it, or that keeps no
  answer token, is a bad record (its length depends on its own images, so other records may fit)."""
  n = spec.tokens_per_tile
  flat = [t for image in tiles for t in image]
  if len(flat) > spec.max_tiles:
    raise BadRecord(f"{len(flat)} tiles do not fit config.data.max_tiles={spec.max_tiles}")
  pieces, units = _pieces_and_units(spec, turns, system)
  ids = _bos(tok)
  loss = [0] * len(ids)
  unit_ids, unit_loss = _conversation_ids(pieces, units, [len(t) for t in tiles], n, tok)
  ids, loss = ids + unit_ids, loss + unit_loss
  where = np.flatnonzero(np.asarray(ids, np.int64) == tok.image_token_id)
  if len(where) != len(flat) * n:
    raise ValueError(f"tokenizer {tok.source} gives {len(where)} {IMG_CONTEXT} ids for {len(flat) * n} vision "
                     f"tokens; it must hold {IMG_CONTEXT} as one added token")
  t = spec.max_text_len
  if len(where) and where[-1] >= t:
    raise BadRecord(f"its {len(flat)} tiles' image tokens end past max_text_len {t}")
  if sum(loss[:t]) == 0:
    raise BadRecord(f"no answer token within max_text_len {t}")
  pixels = np.zeros((len(flat), spec.image_size, spec.image_size, 3), np.float32)
  for i, tile in enumerate(flat):
    pixels[i] = transforms.normalize(tile)
  return {"pixel_values": pixels, "input_ids": np.asarray(ids[:t], np.int32),
          "loss_mask": np.asarray(loss[:t], np.int32)}


def _tokenize_units(units: list[str], pieces: list[tuple[str, bool]], tok) -> tuple[list[int], list[int]]:
  """The official training's tokenisation: each unit string (templates.train_units: the whole conversation, or
  internvl2_5's blocks) tokenised on its own, without special tokens; a token is trained when it lies in a trained
  piece (templates.segments), the boundary found by tokenising the unit up to it, as the official preprocess
  functions count tokens of sub-strings. -> (ids, loss flags)."""
  edges, pos = [], 0  # character ranges [start, end) of trained text over the whole conversation
  for text, trained in pieces:
    if trained:
      edges.append((pos, pos + len(text)))
    pos += len(text)
  ids: list[int] = []
  loss: list[int] = []
  start = 0
  for unit in units:
    unit_ids = tok.encode(unit, add_special_tokens=False)
    flags = [0] * len(unit_ids)
    for a, b in edges:
      a, b = max(a - start, 0), min(b - start, len(unit))
      if a >= b:
        continue
      lo = len(tok.encode(unit[:a], add_special_tokens=False)) if a else 0
      hi = len(unit_ids) if b == len(unit) else len(tok.encode(unit[:b], add_special_tokens=False))
      flags[lo:hi] = [1] * (hi - lo)
    ids += unit_ids
    loss += flags
    start += len(unit)
  return ids, loss


def make_feature_fn(spec: FeatureSpec, tok):
  """(record, rng | None) -> features dict for spec.task."""
  if spec.task in ("contrastive", "alignment"):
    return lambda record, rng: image_text(record, tok, spec, rng)
  if spec.task == "instruct":
    if spec.tokens_per_tile <= 0:
      raise ValueError("instruct features need tokens_per_tile > 0")
    return lambda record, rng: instruct(record, tok, spec, rng)
  raise ValueError(f"unknown task {spec.task!r}; use contrastive, alignment or instruct")

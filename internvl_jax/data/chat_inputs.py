"""Inputs of an InternVL-Chat model for inference: image preprocessing (dynamic tiling with thumbnail, bicubic
resize, ImageNet normalisation; DESIGN §5) and the prompt builder that expands each `<image>` placeholder into
`<img>` + `<IMG_CONTEXT>` x (tokens per tile x tiles) + `</img>`."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from internvl_jax.data import tokenizer as tokenizer_lib
from internvl_jax.data import transforms

IMAGE_PLACEHOLDER = "<image>"
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"


def preprocess_image(image, image_size: int = 448, *, max_num: int = 12, min_num: int = 1,
                     use_thumbnail: bool = True) -> np.ndarray:
  """A PIL image / uint8 [H, W, 3] array / file path -> normalised tiles float32 [N, image_size, image_size, 3].

  N = cols * rows of the grid closest to the image's aspect ratio (1 <= N <= max_num), plus one thumbnail of
  the whole image when N > 1."""
  pil = transforms.load_image(image) if isinstance(image, str) else transforms.to_pil(image)
  tiles = transforms.dynamic_tiles(pil, image_size, min_num=min_num, max_num=max_num, use_thumbnail=use_thumbnail)
  return np.stack([transforms.normalize(t) for t in tiles])


def tokens_per_tile(image_size: int, patch_size: int, downsample_ratio: float) -> int:
  """Vision tokens one tile becomes after pixel shuffle (256 for 448 px, patch 14, ratio 0.5)."""
  return int((image_size // patch_size) ** 2 * downsample_ratio**2)


def expand_image_placeholders(prompt: str, tiles_per_image: Sequence[int], num_tokens_per_tile: int) -> str:
  """Replaces the i-th `<image>` of prompt by <img><IMG_CONTEXT>*(tiles_i * tokens)</img>. A prompt without
  placeholders gets one `<image>\\n` per image in front (as InternVL's chat() does)."""
  count = prompt.count(IMAGE_PLACEHOLDER)
  if count == 0 and tiles_per_image:
    prompt = (IMAGE_PLACEHOLDER + "\n") * len(tiles_per_image) + prompt
    count = len(tiles_per_image)
  if count != len(tiles_per_image):
    raise ValueError(f"the prompt has {count} {IMAGE_PLACEHOLDER} placeholders but {len(tiles_per_image)} images "
                     "were given; use one placeholder per image")
  for tiles in tiles_per_image:
    block = IMG_START + IMG_CONTEXT * (tiles * num_tokens_per_tile) + IMG_END
    prompt = prompt.replace(IMAGE_PLACEHOLDER, block, 1)
  return prompt


def chat_inputs(tok: tokenizer_lib.Tokenizer, prompt: str, images: Sequence = (), *, image_size: int = 448,
                patch_size: int = 14, downsample_ratio: float = 0.5, max_num: int = 12) -> dict:
  """Tokenised prompt and tiles for `model(input_ids, pixel_values)` / `generate(...)`.

  Returns {"input_ids": int32 [1, T], "pixel_values": float32 [N_total, S, S, 3] or None}, where T holds exactly
  N_total * tokens_per_tile image-context ids, in the order of the tiles."""
  tiles = [preprocess_image(im, image_size, max_num=max_num) for im in images]
  text = expand_image_placeholders(prompt, [len(t) for t in tiles],
                                   tokens_per_tile(image_size, patch_size, downsample_ratio))
  ids = np.asarray([tok.encode(text)], np.int32)
  expected = sum(len(t) for t in tiles) * tokens_per_tile(image_size, patch_size, downsample_ratio)
  found = int((ids == tok.image_token_id).sum())
  if found != expected:
    raise ValueError(f"tokenizer {tok.source} splits {IMG_CONTEXT} ({found} ids found, {expected} expected); "
                     f"it must hold {IMG_CONTEXT} as one added special token")
  return {"input_ids": ids, "pixel_values": np.concatenate(tiles) if tiles else None}


def chatml_prompt(question: str, system: str | None = None) -> str:
  """The ChatML turn layout of InternVL 2 / 2.5 / 3 chat templates (Qwen2 and InternLM2 tokenizers): an optional
  system turn, the user turn, and an open assistant turn for generation to continue."""
  head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
  return f"{head}<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"

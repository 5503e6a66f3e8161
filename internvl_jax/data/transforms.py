"""Image transforms: decode, RGB, bicubic resize (squash), random-resized-crop, ImageNet normalisation (NHWC),
and InternVL's dynamic tiling (DESIGN §5)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

IMAGENET_MEAN = np.asarray((0.485, 0.456, 0.406), np.float32)
IMAGENET_STD = np.asarray((0.229, 0.224, 0.225), np.float32)


class BadRecord(Exception):
  """A record that cannot be used (missing / undecodable image, empty text). The pipeline skips and counts it."""


# PIL modes of one channel wider than 8 bits: 16-bit PNG / TIFF grey ("I;16*"), 32-bit integer ("I", also what
# older Pillow gives for 16-bit PNG). PIL's own convert("RGB") clips these at 255 instead of scaling.
_WIDE_INT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(im: Image.Image, name: str) -> Image.Image:
  """An opened image as 8-bit RGB; high-bit-depth grey scaled to 0..255 (16-bit: / 257, i.e. 65535 -> 255)."""
  if im.mode in _WIDE_INT_MODES:
    values = np.asarray(im)
    if values.min() < 0 or values.max() > 65535:  # a 32-bit integer image: no known full-scale value
      raise BadRecord(f"image {name} holds 32-bit integer pixels (range {values.min()}..{values.max()}); "
                      "convert it to 8- or 16-bit")
    grey = np.round(values.astype(np.float64) / 257.0).astype(np.uint8)
    return Image.fromarray(np.repeat(grey[..., None], 3, axis=-1), "RGB")
  if im.mode == "F":
    raise BadRecord(f"image {name} holds floating-point pixels (mode F) with no defined range; convert it to 8- or "
                    "16-bit")
  return im.convert("RGB")


def load_image(path: str) -> Image.Image:
  """Decodes an image file to RGB (16-bit grey scaled, not clipped). Raises BadRecord naming the file when it is
  missing, undecodable or of a pixel format with no defined range."""
  try:
    with Image.open(path) as im:
      return to_rgb(im, f"file {path}")
  except FileNotFoundError:
    raise BadRecord(f"image file {path} does not exist") from None
  except BadRecord:
    raise
  except Exception as e:  # PIL raises several types for corrupt data
    raise BadRecord(f"image file {path} cannot be decoded ({type(e).__name__})") from None


def decode_image(data: bytes, record_id: str = "?") -> Image.Image:
  """Encoded image bytes (JPEG, PNG, WebP, ...) -> RGB PIL image (16-bit grey scaled). Raises BadRecord when they
  cannot be decoded."""
  try:
    with Image.open(io.BytesIO(data)) as im:
      return to_rgb(im, f"of {record_id}")
  except BadRecord:
    raise
  except Exception as e:  # PIL raises several types for corrupt data
    raise BadRecord(f"image of {record_id} cannot be decoded ({type(e).__name__})") from None


def to_pil(image) -> Image.Image:
  """uint8 [H, W, 3] array or PIL image -> RGB PIL image."""
  if isinstance(image, Image.Image):
    return image.convert("RGB")
  return Image.fromarray(np.asarray(image, np.uint8)).convert("RGB")


def resize(image: Image.Image, size: int | tuple[int, int]) -> Image.Image:
  """Bicubic resize to size (squash, no aspect preservation: the published retrieval protocol). size: S or (H, W)."""
  h, w = (size, size) if isinstance(size, int) else size
  if image.size == (w, h):
    return image
  return image.resize((w, h), Image.Resampling.BICUBIC)


def resize_short_center_crop(image: Image.Image, size: int) -> Image.Image:
  """Bicubic resize of the shorter side to `size` (the longer one to int(size * long / short), truncated), then
  the centred size x size crop, its offsets int(round((dim - size) / 2)): torchvision's Resize(size) +
  CenterCrop(size) on a PIL image, the classification transform of InternVL-C/G's evaluation."""
  w, h = image.size
  if w <= h:
    new_w, new_h = size, int(size * h / w)
  else:
    new_w, new_h = int(size * w / h), size
  if (new_w, new_h) != (w, h):
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
  left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
  return image.crop((left, top, left + size, top + size))


def random_resized_crop(image: Image.Image, size: int, rng: np.random.Generator, scale=(0.5, 1.0),
                        ratio=(3 / 4, 4 / 3)) -> Image.Image:
  """Inception-style crop: a random area share in `scale` and aspect in `ratio`, resized to size x size.
  Falls back to the whole image after 10 tries."""
  w, h = image.size
  for _ in range(10):
    area = w * h * rng.uniform(*scale)
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
    cw, ch = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
      return resize(image.crop((x0, y0, x0 + cw, y0 + ch)), size)
  return resize(image, size)


def normalize(image) -> np.ndarray:
  """uint8 image [H, W, 3] (array or PIL) -> float32 [H, W, 3], ImageNet mean/std."""
  x = np.asarray(image, np.float32) / 255.0
  return (x - IMAGENET_MEAN) / IMAGENET_STD


def closest_grid(width: int, height: int, tile: int, min_num: int, max_num: int) -> tuple[int, int]:
  """InternVL's grid choice: among (cols, rows) with min_num <= cols*rows <= max_num, the aspect ratio closest
  to the image's; on a tie the larger grid wins only if the image area > 0.5 * tile^2 * cols * rows."""
  aspect = width / height
  grids = sorted({(i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                  if min_num <= i * j <= max_num}, key=lambda g: g[0] * g[1])
  best, best_diff = (1, 1), float("inf")
  for cols, rows in grids:
    diff = abs(aspect - cols / rows)
    if diff < best_diff:
      best, best_diff = (cols, rows), diff
    elif diff == best_diff and width * height > 0.5 * tile * tile * cols * rows:
      best = (cols, rows)
  return best


def dynamic_tiles(image: Image.Image, tile: int, *, min_num: int = 1, max_num: int = 6,
                  use_thumbnail: bool = True) -> list[Image.Image]:
  """Resize to (tile*cols, tile*rows) for the closest grid, crop row-major into tile x tile tiles, and append a
  whole-image thumbnail when there is more than one tile."""
  w, h = image.size
  cols, rows = closest_grid(w, h, tile, min_num, max_num)
  big = image.resize((tile * cols, tile * rows), Image.Resampling.BICUBIC)
  tiles = [big.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile)) for r in range(rows) for c in range(cols)]
  if use_thumbnail and len(tiles) > 1:
    tiles.append(resize(image, tile))
  return tiles

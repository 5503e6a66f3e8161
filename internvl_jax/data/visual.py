"""What the images of one instruction record become: a list of tiles per image (images, or video frames), within
the example's K tile slots, as OpenGVLab's fine-tuning (internvl_chat_finetune.py) builds them.

  single image     dynamic tiles, max_num = max_dynamic_patch, + a thumbnail when more than one tile
  several images   each image its own dynamic tiles, max_num = max(1, max_dynamic_patch // num_images)
  video            frames sampled by get_frame_indices ('rand' in training, 'middle' for evaluation), one tile each
                   (the frame squashed to S x S), between min_num_frame and max_num_frame of them

The K slots (config.data.max_tiles) are a hard budget the official code does not have: where its rule would give
more tiles than K, the per-image cap is lowered (as if max_dynamic_patch were smaller for that record) until the
tiles fit; a record with more images (or frames sampled) than K cannot fit and is a bad record.
"""

from __future__ import annotations

import io
import os
import re

import numpy as np
from PIL import Image

from internvl_jax.data import transforms
from internvl_jax.data.transforms import BadRecord

VIDEO_DIR_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def image_tiles(images: list[Image.Image], tile: int, max_dynamic_patch: int, slots: int,
                use_thumbnail: bool = True) -> list[list[Image.Image]]:
  """Dynamic tiles of each image (the official rule; one image: max_num = max_dynamic_patch, n images:
  max(1, max_dynamic_patch // n) each), the cap lowered until all tiles fit in `slots`. -> one tile list per image.
  Raises BadRecord when even one tile per image does not fit."""
  n = len(images)
  if n > slots:
    raise BadRecord(f"{n} images need at least {n} tile slots but config.data.max_tiles is {slots}; raise it")
  cap = max(1, max_dynamic_patch // n) if n > 1 else max(1, max_dynamic_patch)
  while True:
    counts = [_num_tiles(im, tile, cap, use_thumbnail) for im in images]
    if sum(counts) <= slots or cap == 1:
      break
    cap -= 1
  return [transforms.dynamic_tiles(im, tile, max_num=cap, use_thumbnail=use_thumbnail) for im in images]


def _num_tiles(image: Image.Image, tile: int, max_num: int, use_thumbnail: bool) -> int:
  cols, rows = transforms.closest_grid(image.width, image.height, tile, 1, max_num)
  return cols * rows + int(use_thumbnail and cols * rows > 1)


def jpeg_degrade(image: Image.Image, rng: np.random.Generator) -> Image.Image:
  """The official fine-tuning augmentation (a dataset's `data_augment`): a JPEG round trip at a quality drawn
  uniformly from 75..100, chosen anew for every tile."""
  buf = io.BytesIO()
  image.convert("RGB").save(buf, format="JPEG", quality=int(rng.integers(75, 101)))
  buf.seek(0)
  with Image.open(buf) as out:
    return out.convert("RGB")


# ---- video ----

def get_frame_indices(num_frames: int, vlen: int, sample: str = "rand", rng: np.random.Generator | None = None,
                      fix_start: int | None = None) -> list[int]:
  """The official frame choice: [0, vlen) split into min(num_frames, vlen) intervals by
  linspace(0, vlen, n + 1).astype(int); 'rand' takes a random index in [start, end - 1) of each interval (a
  random sorted subset of all frames when some interval is too short), 'middle' (start + end - 1) // 2,
  fix_start start + fix_start; padded with the last index to num_frames. rng: numpy Generator for 'rand'."""
  if sample not in ("rand", "middle"):
    raise ValueError(f"frame sampling {sample!r} is not one of rand, middle")
  acc = min(num_frames, vlen)
  edges = np.linspace(0, vlen, acc + 1).astype(int)
  ranges = [(int(a), int(b) - 1) for a, b in zip(edges[:-1], edges[1:])]
  if sample == "rand":
    rng = rng if rng is not None else np.random.default_rng(0)
    if all(b > a for a, b in ranges):
      idx = [int(rng.integers(a, b)) for a, b in ranges]
    else:  # an interval with no index in [start, end - 1): the official fallback
      idx = sorted(int(i) for i in rng.permutation(vlen)[:acc])
  elif fix_start is not None:
    idx = [a + fix_start for a, _ in ranges]
  else:
    idx = [(a + b) // 2 for a, b in ranges]
  if idx and len(idx) < num_frames:
    idx = idx + [idx[-1]] * (num_frames - len(idx))
  return idx


def num_frames_to_sample(min_frames: int, max_frames: int, slots: int, rng: np.random.Generator | None) -> int:
  """How many frames a video record gets: uniform in [min_frames, max_frames] in training (the official
  np.random.randint(min, max + 1)), max_frames for evaluation (rng None); at most `slots`, one tile each."""
  hi = max(1, min(max_frames, slots))
  lo = max(1, min(min_frames, hi))
  return int(rng.integers(lo, hi + 1)) if rng is not None else hi


def video_frames(path: str, num_frames: int, rng: np.random.Generator | None,
                 clip: tuple[float, float] | None = None) -> tuple[list[Image.Image], list[int]]:
  """Frames of a video file (decoded with PyAV) or of a folder of frame images -> (RGB frames, their indices).

  A file: get_frame_indices over its frames ('rand' with rng, 'middle' without), padded with the last frame to
  num_frames; clip (start, end) seconds restricts it to that span. A folder: its images sorted by the number in
  `name_<n>.jpg` (then by name), sampled only when it holds more than num_frames of them (not padded), as the
  official reader does. Raises BadRecord for a missing or undecodable video."""
  sample = "rand" if rng is not None else "middle"
  if os.path.isdir(path):
    names = sorted((n for n in os.listdir(path) if n.lower().endswith(VIDEO_DIR_EXTENSIONS)),
                   key=lambda n: (_frame_number(n), n))
    if not names:
      raise BadRecord(f"video folder {path} holds no frame images")
    idx = (get_frame_indices(num_frames, len(names), sample, rng) if len(names) > num_frames
           else list(range(len(names))))
    return [transforms.load_image(os.path.join(path, names[i])) for i in idx], idx
  if not os.path.exists(path):
    raise BadRecord(f"video file {path} does not exist")
  try:
    return _decode_video(path, num_frames, sample, rng, clip)
  except BadRecord:
    raise
  except Exception as e:  # PyAV raises several types for corrupt containers
    raise BadRecord(f"video file {path} cannot be decoded ({type(e).__name__}: {str(e)[:120]})") from None


def _frame_number(name: str) -> int:
  m = re.search(r"_(\d+)\.jpg$", name)
  return int(m.group(1)) if m else -1


def _decode_video(path, num_frames, sample, rng, clip):
  import av  # the video decoder is needed only by video records

  with av.open(path) as container:
    stream = container.streams.video[0]
    fps = float(stream.average_rate or stream.guessed_rate or 1)
    vlen = stream.frames or sum(1 for _ in container.demux(stream) if _.size)  # some containers do not store it
  start = 0
  if clip:
    start, vlen = int(clip[0] * fps), int((clip[1] - clip[0]) * fps)
  if vlen <= 0:
    raise BadRecord(f"video file {path} holds no frames")
  idx = [start + i for i in get_frame_indices(num_frames, vlen, sample, rng)]
  wanted, frames = set(idx), {}
  with av.open(path) as container:
    container.streams.video[0].thread_type = "AUTO"  # frame-threaded decoding
    for i, frame in enumerate(container.decode(video=0)):  # decoded in order; only the chosen frames are kept
      if i in wanted:
        frames[i] = frame.to_image().convert("RGB")
      if i >= max(idx):
        break
  missing = [i for i in idx if i not in frames]
  if missing:
    raise BadRecord(f"video file {path} ends before frame {missing[0]} (it names {vlen} frames)")
  return [frames[i] for i in idx], idx

"""The embedded `demo` world: procedurally drawn images of two coloured shapes, with captions, labels and QA.

Every image is a 2x2 grid of cells; two different objects (colour x shape) sit in two neighbouring cells, one
above the other or side by side, with a random size and offset. Example i of a split is generated from the
seed (split seed, i), so the splits are fixed, need no files, and any index can be drawn in any order (a
random-access source for grain).

Per example:
  image          uint8 [S, S, 3]
  captions       e.g. ["a red circle above a blue square", "a blue square below a red circle"]
  key            the scene ("red circle|above|blue square"): two images with the same key match the same
                 captions, so retrieval counts a hit when the keys agree
  label          the scene key as a class name (classification form)
  conversations  one question about the image, InternVL/LLaVA form, e.g. "<image>\\nwhat colour is the circle?"
                 -> "red"; every answer is one word

The train split can also be written as webdataset shards (img2dataset layout), to run stage 1 from files:
  python -m internvl_jax.data.demo --write_wds DIR [--size 8000 --shard_size 1000 --image_size 56]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile

import numpy as np
from PIL import Image

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")
# neighbouring cell pairs (row, col) of the 2x2 grid: first object is the top / left one
PLACEMENTS = (((0, 0), (1, 0), "above"), ((0, 1), (1, 1), "above"),
              ((0, 0), (0, 1), "left of"), ((1, 0), (1, 1), "left of"))
SPLIT_SEEDS = {"train": 1, "eval": 2}
OBJECTS = tuple((c, s) for c in COLOURS for s in SHAPES)


def _scene(rng: np.random.Generator) -> tuple[tuple[str, str], tuple[str, str], int]:
  a, b = rng.choice(len(OBJECTS), size=2, replace=False)
  return OBJECTS[a], OBJECTS[b], int(rng.integers(len(PLACEMENTS)))


def _draw(img: np.ndarray, cell: tuple[int, int], colour: str, shape: str, rng: np.random.Generator) -> None:
  s = img.shape[0]
  half = s / 2
  r = half * rng.uniform(0.26, 0.38)  # half-size of the object
  cy = half * (cell[0] + 0.5) + rng.uniform(-0.08, 0.08) * half
  cx = half * (cell[1] + 0.5) + rng.uniform(-0.08, 0.08) * half
  yy, xx = np.mgrid[0:s, 0:s] + 0.5
  dy, dx = yy - cy, xx - cx
  if shape == "circle":
    inside = dy * dy + dx * dx <= r * r
  elif shape == "square":
    inside = (np.abs(dy) <= 0.85 * r) & (np.abs(dx) <= 0.85 * r)
  else:  # upward triangle: apex at the top, base at the bottom
    t = (dy + r) / (2 * r)  # 0 at the apex, 1 at the base
    inside = (t >= 0) & (t <= 1) & (np.abs(dx) <= t * r)
  img[inside] = COLOURS[colour]


def describe(a: tuple[str, str], b: tuple[str, str], relation: str) -> list[str]:
  """Both phrasings of a scene: first object relative to the second, and the converse."""
  name = lambda o: f"{o[0]} {o[1]}"
  converse = {"above": "below", "left of": "right of"}[relation]
  return [f"a {name(a)} {relation} a {name(b)}", f"a {name(b)} {converse} a {name(a)}"]


def questions(a: tuple[str, str], b: tuple[str, str], relation: str) -> list[tuple[str, str]]:
  """Every unambiguous (question, one-word answer) pair about the scene."""
  where = {"above": ("top", "bottom"), "left of": ("left", "right")}[relation]
  qa = []
  for obj, other, pos in ((a, b, where[0]), (b, a, where[1])):
    if obj[1] != other[1]:
      qa.append((f"what colour is the {obj[1]}?", obj[0]))
    if obj[0] != other[0]:
      qa.append((f"what shape is the {obj[0]} one?", obj[1]))
    qa.append((f"where is the {obj[0]} {obj[1]}?", pos))
  return qa


class DemoWorld:
  """Random-access source of demo examples. split: 'train' | 'eval'; size: number of examples."""

  def __init__(self, split: str = "train", size: int = 20000, image_size: int = 56, cache: bool = True):
    if split not in SPLIT_SEEDS:
      raise ValueError(f"demo split {split!r} is not one of {sorted(SPLIT_SEEDS)}; set data.<train|eval>.split")
    if image_size < 16:
      raise ValueError(f"demo image_size {image_size} is too small to draw shapes; use >= 16")
    self.split, self.size, self.image_size = split, size, image_size
    # drawing costs ~2 ms; epochs revisit examples, so keep the drawn images (size * S * S * 3 bytes)
    self._cache: dict[int, dict] | None = {} if cache else None

  def __len__(self) -> int:
    return self.size

  def _rng(self, index: int) -> np.random.Generator:
    return np.random.default_rng([SPLIT_SEEDS[self.split], int(index)])

  def texts(self):
    """Every caption, question and answer of the split (for building a tokenizer), without drawing images."""
    for i in range(self.size):
      a, b, p = _scene(self._rng(i))
      yield from describe(a, b, PLACEMENTS[p][2])
      for q, ans in questions(a, b, PLACEMENTS[p][2]):
        yield q
        yield ans

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < self.size:
      raise IndexError(index)
    if self._cache is not None and index in self._cache:
      return self._cache[index]
    rng = self._rng(index)
    a, b, p = _scene(rng)
    cell_a, cell_b, relation = PLACEMENTS[p]
    s = self.image_size
    background = rng.uniform(200, 250)
    img = np.full((s, s, 3), background, np.float32) + rng.normal(0, 6, (s, s, 3))
    img = np.clip(img, 0, 255).astype(np.uint8)
    _draw(img, cell_a, *a, rng)
    _draw(img, cell_b, *b, rng)
    captions = describe(a, b, relation)
    qa = questions(a, b, relation)
    q, ans = qa[int(rng.integers(len(qa)))]
    key = f"{a[0]} {a[1]}|{relation}|{b[0]} {b[1]}"
    record = {"image": img, "captions": captions, "key": key, "label": key, "id": f"demo/{self.split}/{index}",
              "conversations": [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": ans}]}
    if self._cache is not None:
      self._cache[index] = record
    return record


def write_wds(out_dir: str, size: int = 8000, shard_size: int = 1000, image_size: int = 56,
              split: str = "train") -> list[str]:
  """Writes examples 0..size-1 of a split as shards out_dir/<split>-00000.tar, ... of shard_size samples each, in
  the img2dataset layout: <key>.jpg (quality 95), <key>.txt (one caption: the two phrasings alternate over the
  examples) and <key>.json ({"caption", "captions", "scene"}). Returns the shard paths."""
  os.makedirs(out_dir, exist_ok=True)
  world = DemoWorld(split, size, image_size, cache=False)
  paths = []
  for first in range(0, size, shard_size):
    path = os.path.join(out_dir, f"{split}-{first // shard_size:05d}.tar")
    with tarfile.open(path, "w") as tar:
      for i in range(first, min(first + shard_size, size)):
        rec = world[i]
        jpg = io.BytesIO()
        Image.fromarray(rec["image"]).save(jpg, format="JPEG", quality=95)
        caption = rec["captions"][i % 2]
        meta = {"caption": caption, "captions": rec["captions"], "scene": rec["key"]}
        for ext, data in (("jpg", jpg.getvalue()), ("txt", caption.encode()), ("json", json.dumps(meta).encode())):
          info = tarfile.TarInfo(f"{i:08d}.{ext}")
          info.size = len(data)
          tar.addfile(info, io.BytesIO(data))
    paths.append(path)
  return paths


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description="Write the demo world's train split as webdataset shards.")
  ap.add_argument("--write_wds", required=True, metavar="DIR", help="folder for the .tar shards")
  ap.add_argument("--size", type=int, default=8000, help="examples (configs/demo.py stage 1 trains on 8000)")
  ap.add_argument("--shard_size", type=int, default=1000)
  ap.add_argument("--image_size", type=int, default=56)
  args = ap.parse_args(argv)
  paths = write_wds(args.write_wds, args.size, args.shard_size, args.image_size)
  last = len(paths) - 1
  print(f"wrote {len(paths)} shards; train with --config.data.train.source=wds "
        f"--config.data.train.path='{os.path.join(args.write_wds, 'train-{00000..%05d}.tar' % last)}'")


if __name__ == "__main__":
  main()

"""OpenGVLab's fine-tuning data format as a record source (`data.train.source=internvl`, `data.train.path=META.json`).

The meta JSON names the datasets (docs/finetune.md has an example):

  {"NAME": {"root": "images/", "annotation": "NAME.jsonl", "repeat_time": 1, "data_augment": false,
            "max_dynamic_patch": 6, "length": 1000}, ...}

each annotation a JSON-lines file of records {"image": "a.jpg" | ["a.jpg", "b.jpg"], "video": "v.mp4" | "frames/",
"conversations": [{"from": "system" | "human" | "gpt", "value": ...}, ...]} (no image and no video: text only), paths
relative to `root`. As the official build_datasets / LazySupervisedDataset read it:
  repeat_time < 1   only the first int(n * repeat_time) records of the file (no randomness)
  repeat_time > 1   the file n * repeat_time times (an integer)
  data_augment      JPEG-quality augmentation of that dataset's tiles (training only)
  max_dynamic_patch that dataset's tile cap (else config.data.max_dynamic_patch)
  length            informative (the record count); a mismatch is logged
The datasets are concatenated in the meta's order; the training pipeline shuffles the whole with the run's seed,
anew each epoch, so the record order is a function of seed and epoch and a resumed run continues it.
Relative `root` / `annotation` paths are taken from the working directory as the official scripts do, or else
from the meta file's folder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import numpy as np


@dataclasses.dataclass
class _Dataset:
  name: str
  root: str
  annotation: str
  offsets: np.ndarray  # int64 [n] byte offset of every non-empty line
  linenos: np.ndarray  # int64 [n] its 1-based line number
  used: int  # records taken from the file (repeat_time < 1: a prefix)
  count: int  # records it contributes: used x repeats
  data_augment: bool
  max_dynamic_patch: int | None


class InternVLMetaSource:
  """Random access over the concatenated datasets of a meta JSON; records in the shape of data/sources.py plus
  image_paths (several images), video_path / video_clip, max_dynamic_patch and data_augment (per dataset)."""

  def __init__(self, path: str):
    if not path:
      raise ValueError("data source 'internvl' needs a meta JSON: set --config.data.train.path=META.json")
    if not os.path.exists(path):
      raise FileNotFoundError(f"meta file {path} does not exist; check --config.data.<train|eval>.path")
    try:
      with open(path, encoding="utf-8") as f:
        meta = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"meta file {path} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or not meta:
      raise ValueError(f"meta file {path} must be a JSON object of dataset name -> "
                       "{root, annotation, repeat_time, ...}")
    self.path, here = path, os.path.dirname(os.path.abspath(path))
    self.datasets = [self._dataset(name, entry, here) for name, entry in meta.items()]
    self.datasets = [d for d in self.datasets if d.count]
    if not self.datasets:
      raise ValueError(f"meta file {path} gives no records (empty annotations or repeat_time 0)")
    self.starts = np.cumsum([0] + [d.count for d in self.datasets])

  def _dataset(self, name: str, entry, here: str) -> _Dataset:
    where = f"meta file {self.path}, dataset {name!r}"
    if not isinstance(entry, dict) or "annotation" not in entry:
      raise ValueError(f"{where}: needs at least 'annotation' (a .jsonl file) and 'root'")
    annotation = _resolve(str(entry["annotation"]), here)
    if not os.path.isfile(annotation):
      raise FileNotFoundError(f"{where}: annotation {entry['annotation']} does not exist")
    root = _resolve(str(entry.get("root", "")), here)
    repeat = entry.get("repeat_time", 1)
    if not isinstance(repeat, (int, float)) or repeat < 0 or (repeat > 1 and int(repeat) != repeat):
      raise ValueError(f"{where}: repeat_time={repeat!r} must be a number in [0, 1] or a whole number > 1")
    mdp = entry.get("max_dynamic_patch")
    if mdp is not None and (not isinstance(mdp, int) or mdp < 1):
      raise ValueError(f"{where}: max_dynamic_patch={mdp!r} must be a whole number >= 1")
    offsets, linenos = _line_offsets(annotation)
    n = len(offsets)
    if "length" in entry and entry["length"] != n:
      logging.warning("%s: 'length' says %s records, the annotation holds %d", where, entry["length"], n)
    used = int(n * repeat) if repeat < 1 else n
    count = used * (int(repeat) if repeat > 1 else 1)
    return _Dataset(name, root, annotation, offsets, linenos, used, count, bool(entry.get("data_augment", False)),
                    mdp)

  def __len__(self) -> int:
    return int(self.starts[-1])

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    d_i = int(np.searchsorted(self.starts, index, side="right")) - 1
    d = self.datasets[d_i]
    j = (index - int(self.starts[d_i])) % d.used
    with open(d.annotation, "rb") as f:
      f.seek(int(d.offsets[j]))
      line = f.readline()
    rec = {"id": f"{d.name}:{d.annotation}:{int(d.linenos[j])}", "data_augment": d.data_augment,
           "max_dynamic_patch": d.max_dynamic_patch}
    try:
      raw = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      return dict(rec, error=f"line is not JSON ({type(e).__name__})")
    if not isinstance(raw, dict):
      return dict(rec, error="line is not a JSON object")
    return _record(rec, raw, d.root)

  def texts(self):
    """Conversation turns of every record once (repeats not repeated), for building a tokenizer; with the
    `Frame-<i>:` labels that video prompts get, when there are videos."""
    videos = False
    for d in self.datasets:
      with open(d.annotation, "rb") as f:
        for off in d.offsets[:d.used]:
          f.seek(int(off))
          try:
            raw = json.loads(f.readline())
          except (json.JSONDecodeError, UnicodeDecodeError):
            continue
          if not isinstance(raw, dict):
            continue
          videos = videos or bool(raw.get("video"))
          for turn in raw.get("conversations") or []:
            if isinstance(turn, dict):
              yield str(turn.get("value", "")).replace("<image>", " ").replace("<video>", " ")
    if videos:
      yield " ".join(f"Frame-{i}:" for i in range(1, 65))


def _record(rec: dict, raw: dict, root: str) -> dict:
  """An annotation line -> a record: the official precedence (a non-empty `image`, else a non-empty `video`, else
  text only); a string image is the single-image case, a list several images (even of one)."""
  image, video = raw.get("image"), raw.get("video")
  if isinstance(image, str) and image:
    rec["image_path"], rec["key"] = os.path.join(root, image), image
  elif isinstance(image, list) and image:
    if not all(isinstance(p, str) and p for p in image):
      return dict(rec, error="'image' must be a path or a list of paths")
    rec["image_paths"], rec["key"] = [os.path.join(root, p) for p in image], image[0]
  elif image not in (None, "", []):
    return dict(rec, error="'image' must be a path or a list of paths")
  elif video:
    if not isinstance(video, str):
      return dict(rec, error="'video' must be a path (a video file or a folder of frames)")
    rec["video_path"], rec["key"] = os.path.join(root, video), video
    clip = raw.get("clip")
    if clip:
      if not (isinstance(clip, list) and len(clip) == 2 and all(isinstance(t, (int, float)) for t in clip)):
        return dict(rec, error="'clip' must be [start, end] in seconds")
      rec["video_clip"] = (float(clip[0]), float(clip[1]))
  conv = raw.get("conversations")
  if not isinstance(conv, list) or not all(isinstance(t, dict) for t in conv):
    return dict(rec, error="'conversations' must be a list of {from, value} turns")
  rec["conversations"] = conv
  return rec


def _resolve(p: str, here: str) -> str:
  if os.path.isabs(p) or os.path.exists(p):
    return p
  return os.path.join(here, p)


def _line_offsets(path: str) -> tuple[np.ndarray, np.ndarray]:
  """Byte offsets and 1-based numbers of the non-empty lines of a file (read once; records are read lazily)."""
  offsets, linenos, pos = [], [], 0
  with open(path, "rb") as f:
    for k, line in enumerate(f):
      if line.strip():
        offsets.append(pos)
        linenos.append(k + 1)
      pos += len(line)
  return np.asarray(offsets, np.int64), np.asarray(linenos, np.int64)

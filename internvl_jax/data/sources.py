"""Random-access record sources: the demo world, JSON-lines files and tensorflow-datasets.

Every source yields plain dicts in one shape, so the feature code does not care where a record came from:
  image          uint8 [H, W, 3] array, or image_path (str) decoded later
  captions       list[str] (image-text records; a single "caption" becomes a one-element list)
  label          str (classification records)
  conversations  [{"from": "human" | "gpt", "value": str}, ...] (instruction records)
  key            what identifies the image for retrieval (the path, or the demo scene)
  id             where the record came from (file:line), named in bad-record messages
"""

from __future__ import annotations

import json
import os

import ml_collections

from internvl_jax.data import demo


class JsonlSource:
  """One record per line: {"image": path, "caption": str | "captions": [...]} or {"image", "label"} or
  {"image", "conversations": [...]}. Image paths are relative to the file's folder. Lines that are not JSON
  objects are kept as records that fail (and are counted) when read, so the bad-record share stays honest."""

  def __init__(self, path: str):
    if not path:
      raise ValueError("data source 'jsonl' needs a file: set --config.data.train.path=FILE (and data.eval.path)")
    if not os.path.exists(path):
      raise FileNotFoundError(f"jsonl file {path} does not exist; check --config.data.<train|eval>.path")
    self.path = path
    self.root = os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8") as f:
      self.lines = [(i + 1, line) for i, line in enumerate(f) if line.strip()]
    if not self.lines:
      raise ValueError(f"jsonl file {path} holds no records")

  def __len__(self) -> int:
    return len(self.lines)

  def __getitem__(self, index: int) -> dict:
    lineno, line = self.lines[index]
    rid = f"{self.path}:{lineno}"
    try:
      raw = json.loads(line)
    except json.JSONDecodeError as e:
      return {"id": rid, "error": f"line is not JSON ({e.msg})"}
    if not isinstance(raw, dict):
      return {"id": rid, "error": "line is not a JSON object"}
    rec = {"id": rid}
    if "image" in raw:
      rec["image_path"] = os.path.join(self.root, str(raw["image"]))
      rec["key"] = str(raw["image"])
    if "captions" in raw or "caption" in raw:
      caps = raw.get("captions", raw.get("caption"))
      rec["captions"] = [caps] if isinstance(caps, str) else list(caps or [])
    if "label" in raw:
      rec["label"] = str(raw["label"])
    if "conversations" in raw:
      rec["conversations"] = list(raw["conversations"])
    return rec

  def texts(self):
    """Captions, labels and conversation turns, for building a tokenizer (no image is read)."""
    for i in range(len(self)):
      rec = self[i]
      yield from rec.get("captions", [])
      if "label" in rec:
        yield rec["label"]
      for turn in rec.get("conversations", []):
        yield str(turn.get("value", "")).replace("<image>", " ")


class TfdsSource:
  """An image-text tensorflow-datasets dataset (e.g. coco_captions) through tfds.data_source (random access).
  Field names come from the config: image_key, caption_key (a text or a list of texts; dotted paths allowed)."""

  def __init__(self, name: str, split: str, image_key: str = "image", caption_key: str = "captions.text",
               data_dir: str | None = None):
    try:
      import tensorflow_datasets as tfds  # optional: only this source needs it
    except ImportError:
      raise ImportError("data source 'tfds' needs tensorflow-datasets: pip install tensorflow-datasets "
                        "(or use source=jsonl)") from None
    if not name:
      raise ValueError("data source 'tfds' needs a dataset: set --config.data.<train|eval>.name=NAME")
    self.ds = tfds.data_source(name, split=split, data_dir=data_dir)
    self.name, self.split, self.image_key, self.caption_key = name, split, image_key, caption_key

  def __len__(self) -> int:
    return len(self.ds)

  def _field(self, ex, dotted: str):
    for part in dotted.split("."):
      ex = ex[part]
    return ex

  def __getitem__(self, index: int) -> dict:
    ex = self.ds[index]
    caps = self._field(ex, self.caption_key)
    caps = [caps] if isinstance(caps, (str, bytes)) else list(caps)
    caps = [c.decode() if isinstance(c, bytes) else str(c) for c in caps]
    return {"id": f"{self.name}/{self.split}/{index}", "key": f"{self.split}/{index}",
            "image": self._field(ex, self.image_key), "captions": caps}

  def texts(self):
    for i in range(len(self)):
      yield from self[i]["captions"]


def make_source(split_cfg: ml_collections.ConfigDict, image_size: int):
  """A source from one `data.train` / `data.eval` block: source=demo|jsonl|tfds and its fields."""
  kind = split_cfg.source
  if kind == "demo":
    return demo.DemoWorld(split_cfg.get("split", "train"), split_cfg.get("size", 20000), image_size)
  if kind == "jsonl":
    return JsonlSource(split_cfg.get("path", ""))
  if kind == "tfds":
    return TfdsSource(split_cfg.get("name", ""), split_cfg.get("split", "train"),
                      split_cfg.get("image_key", "image"), split_cfg.get("caption_key", "captions.text"),
                      split_cfg.get("data_dir", None))
  raise ValueError(f"data source {kind!r} is not one of demo, jsonl, tfds; set --config.data.<train|eval>.source")

"""Record sources: the demo world, JSON-lines files, tensorflow-datasets (random access), and webdataset shards
and mixtures of them (iterable: data/wds.py).

Every source yields plain dicts in one shape, so the feature code does not care where a record came from:
  image          uint8 [H, W, 3] array, or image_path (str) / image_bytes (encoded, wds) decoded later
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

from internvl_jax.data import demo, internvl_meta, wds


def _kind(value) -> str:
  return "null" if value is None else type(value).__name__


def _field_problem(raw: dict) -> str | None:
  """Why a JSONL record's fields cannot be used (a caption that is a number or null, ...), or None."""
  if "image" in raw and not isinstance(raw["image"], str):
    return f"'image' is {_kind(raw['image'])}, not a path"
  for key in ("captions", "caption"):
    if key in raw:
      caps = raw[key]
      if isinstance(caps, list):
        bad = [c for c in caps if not isinstance(c, str)]
        if bad:
          return f"'{key}' holds {_kind(bad[0])}, not text"
      elif not isinstance(caps, str):
        return f"'{key}' is {_kind(caps)}, not text"
      break
  if "label" in raw and not isinstance(raw["label"], (str, int)):  # integer class ids are fine labels
    return f"'label' is {_kind(raw['label'])}, not text"
  if "conversations" in raw:
    turns = raw["conversations"]
    if not isinstance(turns, list) or not all(isinstance(t, dict) and isinstance(t.get("value"), str)
                                              for t in turns):
      return "'conversations' is not a list of {\"from\", \"value\": text} turns"
  return None


class JsonlSource:
  """One record per line: {"image": path, "caption": str | "captions": [...]} or {"image", "label"} or
  {"image", "conversations": [...]}. Image paths are relative to the file's folder. Lines that are not UTF-8, not
  JSON objects, or whose captions / label / conversations are not text are kept as records that fail (and are
  counted, with file and line) when read, so the bad-record share stays honest and one bad line stops nothing."""

  def __init__(self, path: str):
    if not path:
      raise ValueError("data source 'jsonl' needs a file: set --config.data.train.path=FILE (and data.eval.path)")
    if not os.path.exists(path):
      raise FileNotFoundError(f"jsonl file {path} does not exist; check --config.data.<train|eval>.path")
    self.path = path
    self.root = os.path.dirname(os.path.abspath(path))
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 becomes one bad record, not a failed run
      self.lines = [(i + 1, line) for i, line in enumerate(f) if line.strip()]
    if not self.lines:
      raise ValueError(f"jsonl file {path} holds no records")

  def __len__(self) -> int:
    return len(self.lines)

  def __getitem__(self, index: int) -> dict:
    lineno, data = self.lines[index]
    rid = f"{self.path}:{lineno}"
    try:
      line = data.decode("utf-8")
    except UnicodeDecodeError as e:
      return {"id": rid, "error": f"line is not UTF-8 (byte 0x{data[e.start]:02x} at column {e.start + 1})"}
    try:
      raw = json.loads(line)
    except json.JSONDecodeError as e:
      return {"id": rid, "error": f"line is not JSON ({e.msg})"}
    if not isinstance(raw, dict):
      return {"id": rid, "error": "line is not a JSON object"}
    problem = _field_problem(raw)
    if problem:
      return {"id": rid, "error": problem}
    rec = {"id": rid}
    if "image" in raw:
      rec["image_path"] = os.path.join(self.root, raw["image"])
      rec["key"] = raw["image"]
    if "captions" in raw or "caption" in raw:
      caps = raw.get("captions", raw.get("caption"))
      rec["captions"] = [caps] if isinstance(caps, str) else list(caps)
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
  """An image-text tensorflow-datasets dataset (e.g. coco_captions) through its random-access data source (an
  array_record or parquet preparation; TensorFlow is not needed). Field names come from the config: image_key,
  caption_key (a text or a list of texts; dotted paths reach into nested and sequence features). The dataset must
  be prepared in data_dir (default $TFDS_DATA_DIR or ~/tensorflow_datasets): training never downloads it, since
  every host of a run would prepare it at once. A record whose image cannot be decoded becomes a bad record."""

  def __init__(self, name: str, split: str, image_key: str = "image", caption_key: str = "captions.text",
               data_dir: str | None = None):
    try:
      import tensorflow_datasets as tfds  # optional: only this source needs it
    except ImportError:
      raise ImportError("data source 'tfds' needs tensorflow-datasets: pip install tensorflow-datasets "
                        "(or use source=jsonl)") from None
    if not name:
      raise ValueError("data source 'tfds' needs a dataset: set --config.data.<train|eval>.name=NAME")
    data_dir = data_dir or None
    prepare = (f"prepare it first (tfds build {name} --file_format=array_record --data_dir=DIR) and set "
               "--config.data.<train|eval>.data_dir=DIR")
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:  # its message lists every registered dataset
      raise FileNotFoundError(f"tfds dataset {name!r} is neither registered nor prepared in "
                              f"{data_dir or 'the default data_dir'}; {prepare}") from None
    if not builder.is_prepared():
      raise FileNotFoundError(f"tfds dataset {name!r} is not prepared in {builder.data_dir}; {prepare}")
    features = builder.info.features
    for field, path in (("image_key", image_key), ("caption_key", caption_key)):
      if _feature_at(features, path) is None:
        raise ValueError(f"config.data.<train|eval>.{field}={path!r} is not a field of tfds dataset {name!r}; "
                         f"its fields: {', '.join(_feature_paths(features))}")
    try:
      self.ds = builder.as_data_source(split=split)
    except NotImplementedError as e:  # prepared as tfrecord: no random access
      raise ValueError(f"tfds dataset {name!r}: {' '.join(str(e).split())}") from None
    self.name, self.split, self.image_key, self.caption_key = name, split, image_key, caption_key
    self._builder, self._skip_image = builder, _nested(image_key, tfds.decode.SkipDecoding())

  def __len__(self) -> int:
    return len(self.ds)

  def _captions(self, ex) -> list[str]:
    caps = _field(ex, self.caption_key)
    caps = [caps] if isinstance(caps, (str, bytes)) else list(caps)
    return [c.decode() if isinstance(c, bytes) else str(c) for c in caps]

  def __getitem__(self, index: int) -> dict:
    rec = {"id": f"{self.name}/{self.split}/{index}", "key": f"{self.split}/{index}"}
    try:
      ex = self.ds[index]
    except Exception as e:  # PIL raises several types for a corrupt image
      return dict(rec, error=f"record cannot be decoded ({type(e).__name__}: {str(e)[:200]})")
    image = _field(ex, self.image_key)
    if getattr(image, "ndim", 0) == 3 and image.shape[-1] == 1:  # a one-channel Image feature
      image = image[..., 0]
    return dict(rec, image=image, captions=self._captions(ex))

  def texts(self):
    """Every caption of the split, for building a tokenizer (the images are left encoded: not decoded in vain)."""
    ds = self._builder.as_data_source(split=self.split, decoders=self._skip_image)
    for i in range(len(ds)):
      try:
        ex = ds[i]
      except Exception:  # an unreadable record is counted when training reads it
        continue
      yield from self._captions(ex)


def _field(ex, dotted: str):
  for part in dotted.split("."):
    ex = ex[part]
  return ex


def _nested(dotted: str, leaf):
  """'a.b' -> {'a': {'b': leaf}} (tfds decoders follow the feature nesting)."""
  out = leaf
  for part in reversed(dotted.split(".")):
    out = {part: out}
  return out


def _children(feature) -> dict:
  """A tfds feature's named sub-features (a Sequence's are those of its element), or {} for a leaf."""
  inner = getattr(feature, "feature", feature)  # Sequence -> its element feature
  return {k: inner[k] for k in inner.keys()} if hasattr(inner, "keys") else {}


def _feature_at(features, dotted: str):
  for part in dotted.split("."):
    features = _children(features).get(part)
    if features is None:
      return None
  return features


def _feature_paths(features, prefix: str = "") -> list[str]:
  paths = []
  for k, f in _children(features).items():
    paths += _feature_paths(f, f"{prefix}{k}.") if _children(f) else [f"{prefix}{k}"]
  return paths


def make_source(split_cfg: ml_collections.ConfigDict, image_size: int):
  """A source from one `data.train` / `data.eval` block: source=demo|jsonl|internvl|tfds and its fields."""
  kind = split_cfg.source
  if kind == "demo":
    return demo.DemoWorld(split_cfg.get("split", "train"), split_cfg.get("size", 20000), image_size)
  if kind == "jsonl":
    return JsonlSource(split_cfg.get("path", ""))
  if kind == "internvl":  # OpenGVLab's fine-tuning meta JSON (data/internvl_meta.py)
    return internvl_meta.InternVLMetaSource(split_cfg.get("path", ""))
  if kind == "tfds":
    return TfdsSource(split_cfg.get("name", ""), split_cfg.get("split", "train"),
                      split_cfg.get("image_key", "image"), split_cfg.get("caption_key", "captions.text"),
                      split_cfg.get("data_dir", ""))
  if kind == "wds":  # webdataset shards, iterable (data/wds.py): training only
    return wds.WdsSource(split_cfg.get("path", ""), caption_field=split_cfg.get("caption_field", "caption"),
                         shuffle_buffer=split_cfg.get("shuffle_buffer", 1000),
                         resampled=split_cfg.get("resampled", False),
                         shuffle_shards=split_cfg.get("shuffle_shards", True))
  raise ValueError(f"data source {kind!r} is not one of demo, jsonl, internvl, tfds, wds; "
                   "set --config.data.<train|eval>.source")


def make_train_source(data_cfg: ml_collections.ConfigDict, image_size: int):
  """The training source of a `data` block: data.train, or, when data.train.mixture is set ('laion:0.7,coyo:0.3',
  a {name: weight} dict or a list of (name, weight)), a wds.Mixture of the named data.sources.<name> blocks."""
  mixture = data_cfg.train.get("mixture", "")
  if not mixture:
    return make_source(data_cfg.train, image_size)
  weights = wds.parse_mixture(mixture)
  defined = data_cfg.get("sources", None) or {}
  members = {}
  for name in weights:
    if name not in defined:
      raise ValueError(f"data.train.mixture names {name!r}, which is not defined: add config.data.sources.{name} = "
                       f"{{source: 'wds', path: ...}} in a config file (defined: {sorted(defined) or 'none'})")
    member = make_source(defined[name], image_size)
    if not hasattr(member, "iter_dataset"):
      raise ValueError(f"mixture member {name!r} has source {defined[name].get('source')!r}; mixtures take "
                       "source='wds' members only")
    members[name] = member
  return wds.Mixture(members, weights)

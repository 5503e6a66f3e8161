"""eval.py's --data SOURCE strings -> the evaluation sets of evaluate/sources.py.

  demo[:N]              the demo world's eval split (N examples, default 500, drawn at the model's image size):
                        captions (retrieval, caption), scene labels (zeroshot, probes), one question each (vqa);
                        as --train_data of a probe, its train split
  jsonl:PATH            caption / label / vqa records (sources.read_jsonl_*)
  tfds:NAME[:SPLIT]     a tensorflow-datasets set (needs tensorflow-datasets installed), prepared in array_record
                        format under $TFDS_DATA_DIR (default ~/tensorflow_datasets): image-caption sets
                        (retrieval, caption; SPLIT default test) or image + ClassLabel `label` sets (zeroshot, the
                        probes; SPLIT default test, and train for a probe's --train_data)
  flickr30k:ROOT        Flickr30K Karpathy test (ROOT/flickr30k_test_karpathy.txt, ROOT/Images)
  coco:ROOT             COCO Karpathy test (ROOT/coco_test_karpathy.json)
  folder:ROOT or ROOT   a folder of class sub-folders (zeroshot, probes)

Sets whose images are arrays (demo, tfds) are written once as PNG files under `cache_dir`, so every set is
image paths and the evaluators, loaders and galleries see one form.
"""

from __future__ import annotations

import hashlib
import os
import tempfile

import numpy as np
from PIL import Image

from internvl_jax.evaluate import sources

DEMO_EVAL_SIZE = 500  # configs/demo.py's eval split
KINDS = ("demo", "jsonl", "tfds", "flickr30k", "coco", "folder")
LABEL_TASKS = ("zeroshot", "linear_probe", "attention_probe")  # read LabelSets
TFDS_DATA_DIR = None  # None: tensorflow-datasets' default ($TFDS_DATA_DIR or ~/tensorflow_datasets)


def parse(spec: str) -> tuple[str, str]:
  """'kind:arg' -> (kind, arg); a bare existing folder is ('folder', path)."""
  kind, _, arg = spec.partition(":")
  if kind in KINDS:
    return kind, arg
  if os.path.isdir(spec):
    return "folder", spec
  raise ValueError(f"--data {spec!r} is not one of demo[:N], jsonl:PATH, tfds:NAME[:SPLIT], flickr30k:ROOT, "
                   "coco:ROOT or a folder of class sub-folders")


def _write_images(images, folder: str) -> list[str]:
  """uint8 [H, W, 3] arrays -> PNG paths under folder (lossless, so the pixels are the drawn ones); files that
  already exist are reused (the folder name carries the source, size and count)."""
  os.makedirs(folder, exist_ok=True)
  paths = []
  for i, img in enumerate(images):
    path = os.path.join(folder, f"{i:06d}.png")
    if not os.path.exists(path):
      Image.fromarray(np.asarray(img, np.uint8)).save(path)
    paths.append(path)
  return paths


def _cache(cache_dir: str | None, key: str) -> str:
  root = cache_dir or os.path.join(tempfile.gettempdir(), "internvl_jax_eval")
  return os.path.join(root, hashlib.sha1(key.encode()).hexdigest()[:12])


def demo_classnames() -> tuple[list[str], dict[str, int]]:
  """Every demo scene as a class: names like "a red circle above a blue square" (the first caption form), and
  the scene key -> class index map (264 classes: 12 x 11 object pairs x 2 relations)."""
  from internvl_jax.data import demo
  names, index = [], {}
  for a in demo.OBJECTS:
    for b in demo.OBJECTS:
      if a == b:
        continue
      for relation in ("above", "left of"):
        index[f"{a[0]} {a[1]}|{relation}|{b[0]} {b[1]}"] = len(names)
        names.append(demo.describe(a, b, relation)[0])
  return names, index


def _demo(task: str, arg: str, image_size: int, cache_dir: str | None, split: str = "eval"):
  from internvl_jax.data import demo
  try:
    size = int(arg) if arg else DEMO_EVAL_SIZE
  except ValueError:
    raise ValueError(f"--data demo:{arg}: the size must be an integer, e.g. demo:100") from None
  world = demo.DemoWorld(split, size, image_size, cache=False)
  records = [world[i] for i in range(size)]
  paths = _write_images((r["image"] for r in records), _cache(cache_dir, f"demo/{split}/{size}/{image_size}"))
  if task in ("retrieval", "caption"):
    texts, txt2img = [], []
    for i, r in enumerate(records):
      texts += r["captions"]
      txt2img += [i] * len(r["captions"])
    # images of one scene are interchangeable: they share their captions (retrieval.recall_from_topk)
    return sources.ImageTextSet(paths, texts, txt2img, groups=[r["key"] for r in records])
  if task in LABEL_TASKS:
    names, index = demo_classnames()
    return sources.LabelSet(paths, [index[r["key"]] for r in records], names)
  questions = [r["conversations"][0]["value"].replace("<image>", "").strip() for r in records]
  answers = [[r["conversations"][1]["value"]] for r in records]
  return sources.VqaSet(paths, questions, answers, [r["id"] for r in records])


def _tfds_labels(arg: str, cache_dir: str | None, split: str) -> sources.LabelSet:
  """An image classification tfds set: features `image` and a ClassLabel `label` (e.g. cifar10, imagenet2012,
  oxford_flowers102), its class names from the ClassLabel; images written once as PNG under cache_dir."""
  try:
    import tensorflow_datasets as tfds  # optional dependency
  except ImportError:
    raise ImportError("--data tfds:NAME needs tensorflow-datasets: pip install tensorflow-datasets "
                      "(or use a folder of class sub-folders / jsonl:PATH)") from None
  name, _, given = arg.partition(":")
  split = given or split
  if not name:
    raise ValueError("--data tfds: needs a dataset name, e.g. tfds:cifar10:test")
  prepare = f"prepare it first: tfds build {name} --file_format=array_record (into $TFDS_DATA_DIR)"
  try:
    builder = tfds.builder(name, data_dir=TFDS_DATA_DIR)
  except tfds.core.registered.DatasetNotFoundError:
    raise FileNotFoundError(f"tfds dataset {name!r} is neither registered nor prepared; {prepare}") from None
  if not builder.is_prepared():
    raise FileNotFoundError(f"tfds dataset {name!r} is not prepared in {builder.data_dir}; {prepare}")
  features = builder.info.features
  keys = set(features.keys())
  label = features["label"] if "label" in keys else None
  if "image" not in keys or not isinstance(label, tfds.features.ClassLabel):
    raise ValueError(f"tfds:{name} has no 'image' and ClassLabel 'label' features, so it is not a classification "
                     "set; use a folder of class sub-folders or jsonl:PATH")
  try:
    ds = builder.as_data_source(split=split)
  except (NotImplementedError, ValueError) as e:  # tfrecord preparations have no random access; unknown split
    raise ValueError(f"tfds:{name}:{split}: {' '.join(str(e).split())}") from None
  labels = []

  def images():
    for i in range(len(ds)):
      ex = ds[i]
      labels.append(int(ex["label"]))
      img = np.asarray(ex["image"])
      yield img[..., 0] if img.ndim == 3 and img.shape[-1] == 1 else img

  paths = _write_images(images(), _cache(cache_dir, f"tfds/{name}/{split}/{len(ds)}/labels"))
  return sources.LabelSet(paths, labels, list(label.names))


def _tfds(task: str, arg: str, cache_dir: str | None):
  if task not in ("retrieval", "caption"):
    raise ValueError(f"--data tfds: serves image-caption and classification sets, not {task}; use jsonl:PATH")
  try:
    import tensorflow_datasets  # noqa: F401  (optional dependency)
  except ImportError:
    raise ImportError("--data tfds:NAME needs tensorflow-datasets: pip install tensorflow-datasets "
                      "(or export the set as jsonl:PATH)") from None
  from internvl_jax.data.sources import TfdsSource
  name, _, split = arg.partition(":")
  if not name:
    raise ValueError("--data tfds: needs a dataset name, e.g. tfds:coco_captions:test")
  source = TfdsSource(name, split or "test")
  records = [source[i] for i in range(len(source))]
  bad = [r for r in records if "error" in r]
  if bad:  # an evaluation set is not quietly made smaller
    raise ValueError(f"{len(bad)} of {len(records)} records of tfds:{arg} cannot be read, e.g. {bad[0]['id']}: "
                     f"{bad[0]['error']}")
  paths = _write_images((r["image"] for r in records), _cache(cache_dir, f"tfds/{name}/{split}/{len(records)}"))
  texts, txt2img = [], []
  for i, r in enumerate(records):
    texts += r["captions"]
    txt2img += [i] * len(r["captions"])
  return sources.ImageTextSet(paths, texts, txt2img)


def check(spec: str, task: str) -> None:
  """Cheap checks of a --data string for `task` before any model loads: its kind serves the task and its file or
  folder exists. One-line ValueError / FileNotFoundError otherwise."""
  kind, arg = parse(spec)
  if kind in ("demo", "tfds"):
    if kind == "tfds" and task not in ("retrieval", "caption") + LABEL_TASKS:
      raise ValueError(f"--data tfds: serves image-caption and classification sets, not {task}; use jsonl:PATH")
    return
  if not arg:
    raise ValueError(f"--data {kind}: needs a path, e.g. {kind}:/data/{kind}")
  if kind == "folder" and task not in LABEL_TASKS:
    raise ValueError(f"a folder of class sub-folders is classification data, not {task} data; use jsonl:PATH")
  if kind in ("flickr30k", "coco") and task not in ("retrieval", "caption"):
    raise ValueError(f"--data {kind}: holds captions (retrieval, caption), not {task} data")
  if not os.path.exists(arg):
    raise FileNotFoundError(f"--data {spec}: {arg} does not exist")


def load(spec: str, task: str, image_size: int, cache_dir: str | None = None, split: str = "eval"):
  """The evaluation set of `task` from a --data string: ImageTextSet (retrieval, caption), LabelSet (zeroshot,
  linear_probe, attention_probe) or VqaSet (vqa). A demo ImageTextSet also carries `groups` [N] (scene keys).
  split: the demo world's split ("train" for a probe's --train_data); other sources are the files named."""
  kind, arg = parse(spec)
  if kind == "demo":
    return _demo(task, arg, image_size, cache_dir, split)
  if kind == "tfds":
    if task in LABEL_TASKS:
      return _tfds_labels(arg, cache_dir, "train" if split == "train" else "test")
    return _tfds(task, arg, cache_dir)
  if not arg:
    raise ValueError(f"--data {kind}: needs a path, e.g. {kind}:/data/{kind}")
  if kind == "jsonl":
    if task in LABEL_TASKS:
      return sources.read_jsonl_labels(arg)
    if task == "vqa":
      return sources.read_jsonl_vqa(arg)
    return sources.read_jsonl_captions(arg)
  if kind == "folder":
    if task not in LABEL_TASKS:
      raise ValueError(f"a folder of class sub-folders is classification data, not {task} data; use jsonl:PATH")
    return sources.read_class_folders(arg)
  if task not in ("retrieval", "caption"):
    raise ValueError(f"--data {kind}: holds captions (retrieval, caption), not {task} data")
  return sources.read_flickr30k(arg) if kind == "flickr30k" else sources.read_coco_karpathy(arg)

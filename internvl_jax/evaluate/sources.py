"""Evaluation data readers that need no training pipeline, and the evaluation image loader.

Readers return plain Python lists (image paths plus texts / labels / answers) in a small dataclass; nothing is
decoded until `load_images`. Missing files, malformed lines and undecodable images raise one-line errors that
name the file (and line) at fault.

Image preprocessing for evaluation (DESIGN §3, §7), the two transforms of InternVL-C/G's evaluation (clip_benchmark's
InternVL loader, `build_transform`): `resize="squash"` (retrieval, and the chat tasks without dynamic tiles) resizes
straight to size x size (no aspect preservation); `resize="center_crop"` (zero-shot classification) resizes the
short side to size and takes the centred square. Both use PIL's bicubic, as torchvision applies it to PIL images,
scale to [0, 1] and normalise with the ImageNet mean / std, float32 NHWC.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from internvl_jax.data import transforms
from internvl_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: F401  (one definition, re-exported)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
FLICKR30K_LIST = "flickr30k_test_karpathy.txt"
COCO_KARPATHY_JSON = "coco_test_karpathy.json"


@dataclass
class ImageTextSet:
  """Images with one or more captions each: image_paths [N], texts [M] (raw, unprocessed), txt2img [M] indices,
  groups: optional [N] ids of interchangeable images (retrieval.recall_from_topk's image_groups; the demo)."""
  image_paths: list[str]
  texts: list[str]
  txt2img: list[int]
  groups: list | None = None

  def references(self) -> list[list[str]]:
    """The captions of each image, [N] lists (captioning references)."""
    refs: list[list[str]] = [[] for _ in self.image_paths]
    for text, i in zip(self.texts, self.txt2img):
      refs[i].append(text)
    return refs


@dataclass
class LabelSet:
  """Classification images: image_paths [N], labels [N] (class indices when classnames is set, else raw strings
  to be mapped with zeroshot.labels_to_indices), classnames [C] (empty when the reader cannot know them)."""
  image_paths: list[str]
  labels: list
  classnames: list[str] = field(default_factory=list)


@dataclass
class VqaSet:
  """VQA questions: image_paths [Q], questions [Q], answers [Q] lists of human answers, question_ids [Q]."""
  image_paths: list[str]
  questions: list[str]
  answers: list[list[str]]
  question_ids: list[str]


def _require_file(path: str, what: str) -> None:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what} {path} does not exist")


def _check_images(paths: Sequence[str], source: str) -> None:
  missing = [p for p in dict.fromkeys(paths) if not os.path.isfile(p)]
  if missing:
    raise FileNotFoundError(f"{len(missing)} image(s) named in {source} do not exist (first: {missing[0]})")


def _group_by_image(pairs: Sequence[tuple[str, str]]) -> ImageTextSet:
  """(image path, caption) pairs -> ImageTextSet; images in order of first appearance."""
  index: dict[str, int] = {}
  texts, txt2img = [], []
  for path, caption in pairs:
    texts.append(caption)
    txt2img.append(index.setdefault(path, len(index)))
  return ImageTextSet(list(index), texts, txt2img)


def read_flickr30k(root: str, list_name: str = FLICKR30K_LIST, check_images: bool = True) -> ImageTextSet:
  """Flickr30K Karpathy test: ROOT/flickr30k_test_karpathy.txt with lines `image,caption` (an optional header line
  `image,caption`; captions may hold commas, bare or CSV-quoted), images under ROOT/Images."""
  list_path = os.path.join(root, list_name)
  _require_file(list_path, "Flickr30K caption list")
  pairs = []
  with open(list_path, encoding="utf-8", newline="") as f:
    for lineno, row in enumerate(csv.reader(f), start=1):
      if not row or not "".join(row).strip():
        continue
      if lineno == 1 and [c.strip().lower() for c in row] == ["image", "caption"]:
        continue
      if len(row) < 2 or not row[0].strip():
        raise ValueError(f"{list_path}:{lineno}: expected `image,caption`, got {','.join(row)!r}")
      pairs.append((os.path.join(root, "Images", row[0].strip()), ",".join(row[1:]).strip()))
  return _image_text_set(pairs, list_path, "lists no captions", check_images)


def read_coco_karpathy(root: str, file_name: str = COCO_KARPATHY_JSON, check_images: bool = True) -> ImageTextSet:
  """COCO Karpathy test: ROOT/coco_test_karpathy.json in one of the three common shapes, image paths relative to
  ROOT: a list of {"image": path, "caption": [..] | str}; Karpathy's {"images": [{"filepath", "filename",
  "split", "sentences": [{"raw"}]}]} (only split "test" kept); or COCO's {"images": [{"id", "file_name"}],
  "annotations": [{"image_id", "caption"}]}. All captions are kept (25,010 for the 5,000 test images)."""
  path = os.path.join(root, file_name)
  _require_file(path, "COCO Karpathy file")
  try:
    with open(path, encoding="utf-8") as f:
      raw = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}") from e
  pairs = []
  if isinstance(raw, list):
    for n, rec in enumerate(raw):
      if not isinstance(rec, dict) or "image" not in rec or "caption" not in rec:
        raise ValueError(f"{path}: record {n} needs 'image' and 'caption'")
      caps = [rec["caption"]] if isinstance(rec["caption"], str) else rec["caption"]
      pairs += [(os.path.join(root, rec["image"]), c) for c in caps]
  elif isinstance(raw, dict) and "annotations" in raw:
    files = {img["id"]: img["file_name"] for img in raw.get("images", [])}
    for ann in raw["annotations"]:
      if ann["image_id"] not in files:
        raise ValueError(f"{path}: annotation for unknown image id {ann['image_id']}")
      pairs.append((os.path.join(root, files[ann["image_id"]]), ann["caption"]))
  elif isinstance(raw, dict) and "images" in raw:
    for img in raw["images"]:
      if img.get("split", "test") != "test":
        continue
      file = os.path.join(root, img.get("filepath", ""), img["filename"])
      pairs += [(file, s["raw"]) for s in img["sentences"]]
  else:
    raise ValueError(f"{path}: unrecognised layout (expected a list of records or a dict with 'images')")
  return _image_text_set(pairs, path, "holds no test captions", check_images)


def _image_text_set(pairs: list[tuple[str, str]], source: str, empty_message: str,
                    check_images: bool) -> ImageTextSet:
  """(image path, caption) pairs read from `source` -> ImageTextSet; an empty list is an error naming the file."""
  if not pairs:
    raise ValueError(f"{source} {empty_message}")
  data = _group_by_image(pairs)
  if check_images:
    _check_images(data.image_paths, source)
  return data


_WNID = re.compile(r"n\d{8}")


def read_class_folders(root: str) -> LabelSet:
  """A folder of class sub-folders (ImageNet val layout): classes are the sub-folders in sorted order, images the
  files with an image extension inside each (sorted). Class names are the folder names with "_" as spaces, or the
  shipped ImageNet-1k names when the folders are the 1000 ImageNet wnids (sorted wnids = class-index order)."""
  if not os.path.isdir(root):
    raise FileNotFoundError(f"class folder root {root} does not exist")
  folders = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
  if not folders:
    raise ValueError(f"{root} has no class sub-folders")
  paths, labels = [], []
  for c, folder in enumerate(folders):
    files = sorted(f for f in os.listdir(os.path.join(root, folder)) if f.lower().endswith(IMAGE_EXTENSIONS))
    paths += [os.path.join(root, folder, f) for f in files]
    labels += [c] * len(files)
  if not paths:
    raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under the class folders of {root}")
  if len(folders) == 1000 and all(_WNID.fullmatch(f) for f in folders):
    from internvl_jax.evaluate import zeroshot  # local: only this layout needs the shipped names
    names = zeroshot.load_classnames()
  else:
    names = [f.replace("_", " ") for f in folders]
  return LabelSet(paths, labels, names)


def _jsonl_records(path: str) -> Iterator[tuple[int, dict]]:
  _require_file(path, "jsonl file")
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: not JSON ({e.msg})") from e
      if not isinstance(rec, dict) or "image" not in rec:
        raise ValueError(f"{path}:{lineno}: expected a JSON object with an 'image' field")
      yield lineno, rec


def _image_path(jsonl_path: str, image: str) -> str:
  # Relative image paths are relative to the JSONL file's folder (the training pipeline's rule).
  return os.path.join(os.path.dirname(os.path.abspath(jsonl_path)), str(image))


def read_jsonl_captions(path: str, check_images: bool = True) -> ImageTextSet:
  """Records {"image", "caption": str} or {"image", "captions": [...]}; records naming the same image merge."""
  pairs = []
  for lineno, rec in _jsonl_records(path):
    caps = rec.get("captions", rec.get("caption"))
    if caps is None:
      raise ValueError(f"{path}:{lineno}: caption record needs 'caption' or 'captions'")
    caps = [caps] if isinstance(caps, str) else list(caps)
    pairs += [(_image_path(path, rec["image"]), str(c)) for c in caps]
  if not pairs:
    raise ValueError(f"{path} holds no caption records")
  data = _group_by_image(pairs)
  if check_images:
    _check_images(data.image_paths, path)
  return data


def read_jsonl_labels(path: str, check_images: bool = True) -> LabelSet:
  """Records {"image", "label"}; labels stay raw strings (map them with zeroshot.labels_to_indices)."""
  paths, labels = [], []
  for lineno, rec in _jsonl_records(path):
    if "label" not in rec:
      raise ValueError(f"{path}:{lineno}: label record needs 'label'")
    paths.append(_image_path(path, rec["image"]))
    labels.append(str(rec["label"]))
  if not paths:
    raise ValueError(f"{path} holds no label records")
  if check_images:
    _check_images(paths, path)
  return LabelSet(paths, labels)


def read_jsonl_vqa(path: str, check_images: bool = True) -> VqaSet:
  """Records {"image", "question", "answers": [str | {"answer": str}, ...], optional "question_id"}."""
  data = VqaSet([], [], [], [])
  for lineno, rec in _jsonl_records(path):
    answers = rec.get("answers")
    if "question" not in rec or not isinstance(answers, list) or not answers:
      raise ValueError(f"{path}:{lineno}: vqa record needs 'question' and a non-empty 'answers' list")
    data.image_paths.append(_image_path(path, rec["image"]))
    data.questions.append(str(rec["question"]))
    data.answers.append([str(a["answer"]) if isinstance(a, dict) else str(a) for a in answers])
    data.question_ids.append(str(rec.get("question_id", f"{os.path.basename(path)}:{lineno}")))
  if not data.questions:
    raise ValueError(f"{path} holds no vqa records")
  if check_images:
    _check_images(data.image_paths, path)
  return data


RESIZE_MODES = ("squash", "center_crop")


def decode_image(path: str) -> Image.Image:
  """An image file -> RGB PIL image; one-line errors naming the file when it is missing or undecodable."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"image {path} does not exist")
  try:
    with Image.open(path) as img:
      img = transforms.to_rgb(img, path)  # decodes fully (a truncated file fails here); 16-bit grey scaled
  except transforms.BadRecord as e:
    raise ValueError(f"cannot use image {path}: {e}") from None
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise ValueError(f"cannot decode image {path}: {e}") from e
  return img


def load_image(path: str, size: int | tuple[int, int], resize: str = "squash") -> np.ndarray:
  """One image file -> float32 [H, W, 3]: RGB, PIL bicubic resize to size (S or (H, W); "squash") or short side
  to S + centred S x S crop ("center_crop"), ImageNet-normalised."""
  if resize not in RESIZE_MODES:
    raise ValueError(f"resize {resize!r} is not one of {RESIZE_MODES}")
  img = decode_image(path)
  if resize == "center_crop":
    if not isinstance(size, int):
      raise ValueError(f"center_crop needs one square size, got {size}")
    return transforms.normalize(transforms.resize_short_center_crop(img, size)).astype(np.float32)
  h, w = (size, size) if isinstance(size, int) else size
  # The training pipeline's resize and normalisation, so a model is evaluated on exactly the pixels it trained on.
  return transforms.normalize(transforms.resize(img, (h, w))).astype(np.float32)


def load_images(paths: Sequence[str], size: int | tuple[int, int], num_threads: int = 4,
                resize: str = "squash") -> np.ndarray:
  """Image files -> float32 [len(paths), H, W, 3] (see load_image); decoded on a few threads (PIL releases the
  GIL while decoding and resizing)."""
  if num_threads <= 1 or len(paths) <= 1:
    return np.stack([load_image(p, size, resize) for p in paths])
  with ThreadPoolExecutor(num_threads) as pool:
    return np.stack(list(pool.map(lambda p: load_image(p, size, resize), paths)))


def image_batches(paths: Sequence[str], size: int | tuple[int, int], batch_size: int,
                  num_threads: int = 4, resize: str = "squash") -> Iterator[np.ndarray]:
  """Consecutive batches float32 [<= batch_size, H, W, 3] of the images in `paths` (the last one may be short:
  retrieval.compute_embeddings(pad_to=batch_size) pads it)."""
  for start in range(0, len(paths), batch_size):
    yield load_images(paths[start:start + batch_size], size, num_threads, resize)

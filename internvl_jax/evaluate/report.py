"""Evaluation outputs: the JSON result schemas of eval.py, their markdown tables, and PNG galleries of retrieval
and zero-shot queries with their top-5 hits.

Schemas (values in percent unless named otherwise; CIDEr / BLEU-4 x100 as papers print them):
  retrieval  {"task", "data", "num_images", "num_texts", "image_to_text": {"R@1", "R@5", "R@10"},
              "text_to_image": {"R@1", "R@5", "R@10"}}
  zeroshot   {"task", "data", "num_images", "top1", "top5", "per_class": {class name: top-1 pct}}
  caption    {"task", "data", "num_images", "CIDEr", "BLEU-4", "tokenizer", "samples": [{"image", "prediction",
              "references"}]}
  vqa        {"task", "data", "num_questions", "accuracy", "samples": [{"image", "question", "prediction",
              "answers"}]}
  linear_probe / attention_probe
             {"task", "data", "train_data", "num_train", "num_images", "num_classes", "top1", "top5" (null for
              <= 5 classes)}; linear_probe adds "weight_decay" (the chosen one) and "sweep": [{"weight_decay",
              "holdout_top1", "holdout_loss"}]
Builders may add fields via **extra (e.g. the checkpoint evaluated); validate_result checks the required ones.
eval.py adds, for every task, how the model ran (evaluate/placement.describe; checked when present):
  {"dtype": parameter dtype(s) e.g. "bfloat16", "mesh": {"data", "fsdp", "expert", "tensor"} sizes or null (one device),
   "devices", "param_bytes_total", "param_bytes_per_device"}
"""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

RECALL_KEYS = ("R@1", "R@5", "R@10")


def retrieval_result(data: str, num_images: int, num_texts: int, metrics: Mapping[str, Mapping[str, float]],
                     **extra) -> dict:
  """metrics: retrieval.recall_from_topk's output (holding at least R@1/5/10 per direction)."""
  return {"task": "retrieval", "data": data, "num_images": int(num_images), "num_texts": int(num_texts),
          "image_to_text": {k: float(metrics["image_to_text"][k]) for k in RECALL_KEYS},
          "text_to_image": {k: float(metrics["text_to_image"][k]) for k in RECALL_KEYS}, **extra}


def zeroshot_result(data: str, num_images: int, top1: float, top5: float, per_class: Mapping[str, float],
                    **extra) -> dict:
  return {"task": "zeroshot", "data": data, "num_images": int(num_images), "top1": float(top1), "top5": float(top5),
          "per_class": {str(k): float(v) for k, v in per_class.items()}, **extra}


def caption_result(data: str, num_images: int, cider: float, bleu4: float, samples: Sequence[Mapping[str, Any]],
                   tokenizer: str = "simple", **extra) -> dict:
  return {"task": "caption", "data": data, "num_images": int(num_images), "CIDEr": float(cider),
          "BLEU-4": float(bleu4), "tokenizer": tokenizer, "samples": [dict(s) for s in samples], **extra}


def vqa_result(data: str, num_questions: int, accuracy: float, samples: Sequence[Mapping[str, Any]],
               **extra) -> dict:
  return {"task": "vqa", "data": data, "num_questions": int(num_questions), "accuracy": float(accuracy),
          "samples": [dict(s) for s in samples], **extra}


PROBE_TASKS = ("linear_probe", "attention_probe")


def probe_result(task: str, data: str, train_data: str, num_train: int, num_images: int, num_classes: int,
                 top1: float, top5: float | None, **extra) -> dict:
  """A linear / attention probe's result: top-1 (and top-5 when > 5 classes, else None) on the test split."""
  return {"task": task, "data": data, "train_data": train_data, "num_train": int(num_train),
          "num_images": int(num_images), "num_classes": int(num_classes), "top1": float(top1),
          "top5": None if top5 is None else float(top5), **extra}


def _pct(name: str, value: Any, upper: float = 100.0) -> None:
  if not isinstance(value, (int, float)) or not 0.0 <= float(value) <= upper:
    raise ValueError(f"{name} must be a number in [0, {upper:g}], got {value!r}")


def validate_result(result: Mapping[str, Any]) -> None:
  """Raises ValueError naming the first missing field or out-of-range value of an eval.py result."""
  required = {"retrieval": ("data", "num_images", "num_texts", "image_to_text", "text_to_image"),
              "zeroshot": ("data", "num_images", "top1", "top5", "per_class"),
              "caption": ("data", "num_images", "CIDEr", "BLEU-4", "samples"),
              "vqa": ("data", "num_questions", "accuracy", "samples"),
              **{t: ("data", "train_data", "num_train", "num_images", "num_classes", "top1", "top5")
                 for t in PROBE_TASKS}}
  task = result.get("task")
  if task not in required:
    raise ValueError(f"result task must be one of {sorted(required)}, got {task!r}")
  for key in required[task]:
    if key not in result:
      raise ValueError(f"{task} result lacks {key!r}")
  for key in ("num_images", "num_texts", "num_questions", "num_train", "num_classes", "devices", "param_bytes_total",
              "param_bytes_per_device"):
    if key in result and (not isinstance(result[key], int) or result[key] <= 0):
      raise ValueError(f"{key} must be a positive integer, got {result[key]!r}")
  if result.get("param_bytes_per_device", 0) > result.get("param_bytes_total", float("inf")):
    raise ValueError(f"param_bytes_per_device {result['param_bytes_per_device']} exceeds param_bytes_total "
                     f"{result['param_bytes_total']}")
  mesh = result.get("mesh")
  if mesh is not None and (not isinstance(mesh, dict) or
                           not all(isinstance(v, int) and v > 0 for v in mesh.values())):
    raise ValueError(f"mesh must be null or a map of axis sizes, got {mesh!r}")
  if task == "retrieval":
    for direction in ("image_to_text", "text_to_image"):
      values = [result[direction].get(k) for k in RECALL_KEYS]
      for k, v in zip(RECALL_KEYS, values):
        _pct(f"{direction} {k}", v)
      if not values[0] <= values[1] <= values[2]:
        raise ValueError(f"{direction} recall must not fall as k grows: {values}")
  elif task == "zeroshot":
    _pct("top1", result["top1"])
    _pct("top5", result["top5"])
    if result["top1"] > result["top5"]:
      raise ValueError(f"top1 {result['top1']} exceeds top5 {result['top5']}")
    for name, v in result["per_class"].items():
      _pct(f"per_class[{name!r}]", v)
  elif task in PROBE_TASKS:
    _pct("top1", result["top1"])
    if result["top5"] is not None:
      _pct("top5", result["top5"])
      if result["top1"] > result["top5"]:
        raise ValueError(f"top1 {result['top1']} exceeds top5 {result['top5']}")
    if task == "linear_probe" and not (isinstance(result.get("weight_decay"), (int, float))
                                       and result["weight_decay"] >= 0):
      raise ValueError(f"linear_probe result needs a weight_decay >= 0, got {result.get('weight_decay')!r}")
  elif task == "caption":
    _pct("CIDEr", result["CIDEr"], upper=1000.0)  # x100 scale; CIDEr-D is at most 10 per image (1000)
    _pct("BLEU-4", result["BLEU-4"])
  else:
    _pct("accuracy", result["accuracy"])


def write_json(path: str, result: Mapping[str, Any]) -> None:
  """Validates and writes a result as indented UTF-8 JSON, creating the folder if needed."""
  validate_result(result)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2, ensure_ascii=False)
    f.write("\n")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A GitHub markdown table; floats with 2 decimals, "|" in cells escaped."""
  def cell(v):
    return f"{v:.2f}" if isinstance(v, float) else str(v).replace("|", "\\|")
  lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
  lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)


def result_table(result: Mapping[str, Any]) -> str:
  """The short markdown table eval.py prints for a result of any task."""
  task = result["task"]
  if task == "retrieval":
    return markdown_table(["direction", *RECALL_KEYS],
                          [["image->text", *(result["image_to_text"][k] for k in RECALL_KEYS)],
                           ["text->image", *(result["text_to_image"][k] for k in RECALL_KEYS)]])
  if task == "zeroshot":
    return markdown_table(["data", "images", "top-1", "top-5"],
                          [[result["data"], result["num_images"], result["top1"], result["top5"]]])
  if task in PROBE_TASKS:
    top5 = "-" if result["top5"] is None else result["top5"]
    headers = ["data", "train images", "test images", "classes", "top-1", "top-5"]
    row = [result["data"], result["num_train"], result["num_images"], result["num_classes"], result["top1"], top5]
    if task == "linear_probe":
      headers.append("weight decay")
      row.append(f"{result['weight_decay']:.3g}")
    return markdown_table(headers, [row])
  if task == "caption":
    return markdown_table(["data", "images", "CIDEr", "BLEU-4"],
                          [[result["data"], result["num_images"], result["CIDEr"], result["BLEU-4"]]])
  if task == "vqa":
    return markdown_table(["data", "questions", "accuracy"],
                          [[result["data"], result["num_questions"], result["accuracy"]]])
  raise ValueError(f"unknown task {task!r}")


# ---------------------------------------------------------------------------------------------------- galleries

def _thumbnail(path: str, size: int = 224) -> np.ndarray:
  from PIL import Image
  with Image.open(path) as img:
    img = img.convert("RGB")
    img.thumbnail((size, size))
    return np.asarray(img)


def query_indices(num_items: int, num_queries: int) -> list[int]:
  """Evenly spaced, deterministic query picks, so galleries of two checkpoints show the same queries."""
  return sorted(set(np.linspace(0, num_items - 1, min(num_queries, num_items)).round().astype(int).tolist()))


def _image_cell(ax, image: np.ndarray, ok: bool | None = None, title: str = "") -> None:
  ax.imshow(image)
  ax.set_xticks([])
  ax.set_yticks([])
  if ok is not None:  # a green frame for a correct hit, red otherwise
    for spine in ax.spines.values():
      spine.set_edgecolor("tab:green" if ok else "tab:red")
      spine.set_linewidth(4)
  if title:
    ax.set_title(textwrap.fill(title, 28), fontsize=7)


def _text_cell(ax, lines: Sequence[tuple[str, bool]], width: int = 60) -> None:
  ax.axis("off")
  y = 0.98
  for text, ok in lines:
    wrapped = textwrap.fill(text, width)
    ax.text(0.0, y, wrapped, va="top", ha="left", fontsize=7, transform=ax.transAxes,
            color="tab:green" if ok else "black")
    y -= 0.2 * (1 + wrapped.count("\n")) / 1.5


def retrieval_gallery(path: str, image_paths: Sequence[str], texts: Sequence[str], txt2img: Sequence[int],
                      i2t_topk: np.ndarray, t2i_topk: np.ndarray, num_queries: int = 4, top: int = 5,
                      load_image: Callable[[str], np.ndarray] = _thumbnail,
                      image_groups: Sequence | None = None) -> None:
  """PNG with image->text queries (an image and its top captions; correct ones green) above text->image queries
  (a caption and its top images; green frame = the caption's image). i2t_topk int [N, >= top] caption indices,
  t2i_topk int [M, >= top] image indices, as kept by retrieval.evaluate_retrieval. image_groups [N]: images with
  equal ids count as correct for each other (retrieval.recall_from_topk's rule)."""
  from matplotlib.figure import Figure  # no pyplot: no global backend state, works headless
  groups = np.arange(len(image_paths)) if image_groups is None else np.asarray(image_groups)
  txt2img = groups[np.asarray(txt2img)]  # from here on: the group of each caption's image
  img_q, txt_q = query_indices(len(image_paths), num_queries), query_indices(len(texts), num_queries)
  rows = len(img_q) + len(txt_q)
  fig = Figure(figsize=(2.0 * (top + 1), 2.2 * rows))
  grid = fig.add_gridspec(rows, top + 1)
  for r, i in enumerate(img_q):
    _image_cell(fig.add_subplot(grid[r, 0]), load_image(image_paths[i]), title=f"image {i}")
    hits = [(f"{n + 1}. {texts[j]}", txt2img[j] == groups[i]) for n, j in enumerate(i2t_topk[i][:top])]
    _text_cell(fig.add_subplot(grid[r, 1:]), hits)
  for r, j in enumerate(txt_q, start=len(img_q)):
    _text_cell(fig.add_subplot(grid[r, 0]), [(f"caption {j}: {texts[j]}", False)], width=28)
    for c, i in enumerate(t2i_topk[j][:top]):
      _image_cell(fig.add_subplot(grid[r, c + 1]), load_image(image_paths[i]), ok=bool(groups[i] == txt2img[j]),
                  title=f"{c + 1}. image {i}")
  fig.suptitle("retrieval: image->text (top rows), text->image (bottom rows)", fontsize=9)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=80)


def zeroshot_gallery(path: str, image_paths: Sequence[str], labels: Sequence[int], classnames: Sequence[str],
                     topk: np.ndarray, topk_logits: np.ndarray, num_queries: int = 6, top: int = 5,
                     load_image: Callable[[str], np.ndarray] = _thumbnail) -> None:
  """PNG with a few images, each beside its top predicted classes and logits (the true class green).
  topk int [N, >= top] class indices and topk_logits float [N, >= top], as zeroshot.predict_topk returns."""
  from matplotlib.figure import Figure
  picks = query_indices(len(image_paths), num_queries)
  fig = Figure(figsize=(6.0, 2.0 * len(picks)))
  grid = fig.add_gridspec(len(picks), 3)
  for r, i in enumerate(picks):
    _image_cell(fig.add_subplot(grid[r, 0]), load_image(image_paths[i]), title=f"true: {classnames[labels[i]]}")
    lines = [(f"{n + 1}. {classnames[c]}  ({float(v):.1f})", c == labels[i])
             for n, (c, v) in enumerate(zip(topk[i][:top], topk_logits[i][:top]))]
    _text_cell(fig.add_subplot(grid[r, 1:]), lines, width=40)
  fig.suptitle("zero-shot: top-5 classes (logit = 100 x cosine)", fontsize=9)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=80)

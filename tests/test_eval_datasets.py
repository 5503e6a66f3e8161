"""eval.py's --data strings: parsing, the demo's sets per task, jsonl routing, and one-line errors."""

import json
import sys

import numpy as np
import pytest

from internvl_jax.evaluate import datasets


def test_parse():
  assert datasets.parse("demo") == ("demo", "")
  assert datasets.parse("demo:8") == ("demo", "8")
  assert datasets.parse("tfds:coco_captions:test") == ("tfds", "coco_captions:test")
  assert datasets.parse("coco:/data/coco") == ("coco", "/data/coco")
  with pytest.raises(ValueError, match="is not one of demo"):
    datasets.parse("imagenet:/nowhere")


def test_demo_sets_per_task(tmp_path):
  ret = datasets.load("demo:6", "retrieval", 32, str(tmp_path))
  assert len(ret.image_paths) == 6 and len(ret.texts) == 12 and ret.txt2img[:4] == [0, 0, 1, 1]
  assert len(ret.groups) == 6 and all("|" in g for g in ret.groups)
  zs = datasets.load("demo:6", "zeroshot", 32, str(tmp_path))
  assert len(zs.classnames) == 264 == len(set(zs.classnames))
  for label, key in zip(zs.labels, ret.groups):  # the class name is the scene's first caption
    a, rel, b = key.split("|")
    assert zs.classnames[label] == f"a {a} {rel} a {b}"
  qa = datasets.load("demo:6", "vqa", 32, str(tmp_path))
  assert all(q.endswith("?") and "<image>" not in q for q in qa.questions)
  assert all(len(a) == 1 for a in qa.answers)
  # the images are the drawn pixels (lossless PNG) at the requested size
  from PIL import Image
  from internvl_jax.data import demo
  np.testing.assert_array_equal(np.asarray(Image.open(ret.image_paths[2])), demo.DemoWorld("eval", 6, 32)[2]["image"])


def test_jsonl_routing_and_errors(tmp_path):
  from PIL import Image
  Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
  path = tmp_path / "vqa.jsonl"
  path.write_text(json.dumps({"image": "a.png", "question": "q?", "answers": ["yes"] * 10}) + "\n")
  assert datasets.load(f"jsonl:{path}", "vqa", 16).answers == [["yes"] * 10]
  with pytest.raises(ValueError, match="needs a path"):
    datasets.load("jsonl:", "vqa", 16)
  with pytest.raises(ValueError, match="not caption data|class sub-folders is zeroshot data"):
    datasets.load(str(tmp_path), "caption", 16)
  with pytest.raises(ValueError, match="holds captions"):
    datasets.load("coco:/nowhere", "vqa", 16)
  with pytest.raises(ValueError, match="demo:abc"):
    datasets.load("demo:abc", "retrieval", 16)


def test_tfds_missing_is_one_clear_error(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails as if it were not installed
  with pytest.raises(ImportError, match="needs tensorflow-datasets: pip install"):
    datasets.load("tfds:coco_captions", "retrieval", 16)

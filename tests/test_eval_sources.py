"""Evaluation readers (Flickr30K / COCO Karpathy lists, class folders, JSONL) and the image loader."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from internvl_jax.evaluate import sources


def _png(path, color=(255, 0, 128), size=(8, 6)):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new("RGB", size, color).save(path)
  return str(path)


def test_read_flickr30k(tmp_path):
  _png(tmp_path / "Images" / "1.jpg")
  _png(tmp_path / "Images" / "2.jpg")
  (tmp_path / sources.FLICKR30K_LIST).write_text(
    'image,caption\n1.jpg,A dog, running.\n2.jpg,"A cat, ""sitting"""\n\n1.jpg,Second dog caption\n',
    encoding="utf-8")
  data = sources.read_flickr30k(str(tmp_path))
  assert data.image_paths == [str(tmp_path / "Images" / "1.jpg"), str(tmp_path / "Images" / "2.jpg")]
  assert data.texts == ["A dog, running.", 'A cat, "sitting"', "Second dog caption"]
  assert data.txt2img == [0, 1, 0]
  assert data.references() == [["A dog, running.", "Second dog caption"], ['A cat, "sitting"']]


def test_read_flickr30k_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="caption list .* does not exist"):
    sources.read_flickr30k(str(tmp_path))
  (tmp_path / sources.FLICKR30K_LIST).write_text("1.jpg,a\n3.jpg,b\n", encoding="utf-8")
  _png(tmp_path / "Images" / "1.jpg")
  with pytest.raises(FileNotFoundError, match=r"1 image\(s\) named in .* do not exist \(first: .*3.jpg\)"):
    sources.read_flickr30k(str(tmp_path))
  assert len(sources.read_flickr30k(str(tmp_path), check_images=False).image_paths) == 2
  (tmp_path / sources.FLICKR30K_LIST).write_text("1.jpg,a\nno-caption-here\n", encoding="utf-8")
  with pytest.raises(ValueError, match=":2: expected `image,caption`"):
    sources.read_flickr30k(str(tmp_path))


@pytest.mark.parametrize("layout", ["records", "karpathy", "coco"])
def test_read_coco_karpathy_layouts(tmp_path, layout):
  a, b = _png(tmp_path / "val2014" / "a.jpg"), _png(tmp_path / "val2014" / "b.jpg")
  if layout == "records":
    raw = [{"image": "val2014/a.jpg", "caption": ["a1", "a2"]}, {"image": "val2014/b.jpg", "caption": "b1"}]
  elif layout == "karpathy":
    raw = {"images": [
      {"filepath": "val2014", "filename": "a.jpg", "split": "test", "sentences": [{"raw": "a1"}, {"raw": "a2"}]},
      {"filepath": "val2014", "filename": "x.jpg", "split": "train", "sentences": [{"raw": "x"}]},
      {"filepath": "val2014", "filename": "b.jpg", "split": "test", "sentences": [{"raw": "b1"}]}]}
  else:
    raw = {"images": [{"id": 7, "file_name": "val2014/a.jpg"}, {"id": 9, "file_name": "val2014/b.jpg"}],
           "annotations": [{"image_id": 7, "caption": "a1"}, {"image_id": 9, "caption": "b1"},
                           {"image_id": 7, "caption": "a2"}]}
  (tmp_path / sources.COCO_KARPATHY_JSON).write_text(json.dumps(raw), encoding="utf-8")
  data = sources.read_coco_karpathy(str(tmp_path))
  assert data.image_paths == [a, b]
  assert sorted(zip(data.texts, data.txt2img)) == [("a1", 0), ("a2", 0), ("b1", 1)]


def test_read_class_folders(tmp_path):
  _png(tmp_path / "b_cat" / "2.png")
  _png(tmp_path / "b_cat" / "1.jpg")
  _png(tmp_path / "a_dog" / "x.jpeg")
  (tmp_path / "a_dog" / "notes.txt").write_text("not an image")
  data = sources.read_class_folders(str(tmp_path))
  assert data.classnames == ["a dog", "b cat"]
  assert [os.path.basename(p) for p in data.image_paths] == ["x.jpeg", "1.jpg", "2.png"]
  assert data.labels == [0, 1, 1]


def test_read_class_folders_imagenet_wnids_use_shipped_names(tmp_path):
  for i in range(1000):
    os.makedirs(tmp_path / f"n{i:08d}")
  _png(tmp_path / "n00000001" / "a.jpg")
  data = sources.read_class_folders(str(tmp_path))
  assert len(data.classnames) == 1000 and data.classnames[1] == "goldfish" and data.labels == [1]


def test_read_jsonl_labels_and_vqa(tmp_path):
  img = _png(tmp_path / "imgs" / "a.png")
  (tmp_path / "labels.jsonl").write_text('{"image": "imgs/a.png", "label": "cat"}\n\n'
                                         '{"image": "imgs/a.png", "label": 3}\n', encoding="utf-8")
  labels = sources.read_jsonl_labels(str(tmp_path / "labels.jsonl"))
  assert labels.image_paths == [img, img] and labels.labels == ["cat", "3"]
  (tmp_path / "vqa.jsonl").write_text(
    '{"image": "imgs/a.png", "question": "What?", "answers": ["two", {"answer": "2"}], "question_id": 5}\n'
    '{"image": "imgs/a.png", "question": "Why?", "answers": ["because"]}\n', encoding="utf-8")
  vqa = sources.read_jsonl_vqa(str(tmp_path / "vqa.jsonl"))
  assert vqa.answers == [["two", "2"], ["because"]] and vqa.question_ids == ["5", "vqa.jsonl:2"]
  (tmp_path / "caps.jsonl").write_text('{"image": "imgs/a.png", "captions": ["x", "y"]}\n'
                                       '{"image": "imgs/a.png", "caption": "z"}\n', encoding="utf-8")
  caps = sources.read_jsonl_captions(str(tmp_path / "caps.jsonl"))
  assert caps.image_paths == [img] and caps.texts == ["x", "y", "z"] and caps.txt2img == [0, 0, 0]


def test_read_jsonl_errors(tmp_path):
  (tmp_path / "bad.jsonl").write_text('{"image": "a.png", "label": "x"}\n{"image": oops}\n', encoding="utf-8")
  with pytest.raises(ValueError, match=r"bad.jsonl:2: not JSON"):
    sources.read_jsonl_labels(str(tmp_path / "bad.jsonl"), check_images=False)
  (tmp_path / "novqa.jsonl").write_text('{"image": "a.png", "question": "q", "answers": []}\n', encoding="utf-8")
  with pytest.raises(ValueError, match=":1: vqa record needs"):
    sources.read_jsonl_vqa(str(tmp_path / "novqa.jsonl"), check_images=False)
  with pytest.raises(FileNotFoundError, match="jsonl file .* does not exist"):
    sources.read_jsonl_vqa(str(tmp_path / "missing.jsonl"))


def test_load_image_normalises_and_squashes(tmp_path):
  path = _png(tmp_path / "c.png", color=(255, 0, 128), size=(8, 6))
  x = sources.load_image(path, (4, 10))
  assert x.shape == (4, 10, 3) and x.dtype == np.float32
  want = (np.array([255, 0, 128]) / 255.0 - sources.IMAGENET_MEAN) / sources.IMAGENET_STD
  np.testing.assert_allclose(x, np.broadcast_to(want, x.shape), rtol=1e-5, atol=1e-5)
  # Squash, not crop: the left half stays dark and the right half bright after a 20x10 -> 10x10 resize.
  two = np.zeros((10, 20, 3), np.uint8)
  two[:, 10:] = 255
  Image.fromarray(two).convert("L").save(tmp_path / "g.png")  # grayscale: converted to RGB
  y = sources.load_image(str(tmp_path / "g.png"), 10)
  assert y.shape == (10, 10, 3)
  assert (y[:, :4] < 0).all() and (y[:, 6:] > 0).all()
  batch = sources.load_images([path, str(tmp_path / "g.png"), path], 5, num_threads=2)
  assert batch.shape == (3, 5, 5, 3)
  assert [b.shape for b in sources.image_batches([path] * 5, 3, batch_size=2)] == [(2, 3, 3, 3)] * 2 + [(1, 3, 3, 3)]


def test_load_image_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    sources.load_image(str(tmp_path / "none.png"), 4)
  (tmp_path / "junk.jpg").write_bytes(b"definitely not an image")
  with pytest.raises(ValueError, match="cannot decode image .*junk.jpg"):
    sources.load_image(str(tmp_path / "junk.jpg"), 4)
  Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "full.jpg")
  data = (tmp_path / "full.jpg").read_bytes()
  (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
  with pytest.raises(ValueError, match="cannot decode image .*cut.jpg"):
    sources.load_image(str(tmp_path / "cut.jpg"), 4)


@pytest.mark.parametrize("w,h,resized,box", [
    # torchvision Resize(224) on a PIL image: short side -> 224, long side int(224 * long / short) (truncated);
    # CenterCrop(224): offsets int(round((dim - 224) / 2)), Python's round (half to even). Worked out by hand.
    (300, 200, (336, 224), (56, 0)),
    (200, 301, (224, 337), (0, 56)),     # 337 - 224 = 113 -> round(56.5) = 56
    (203, 200, (227, 224), (2, 0)),      # 227.36 -> 227; 3 / 2 = 1.5 -> 2
    (201, 200, (225, 224), (0, 0)),      # 225.12 -> 225; 0.5 -> 0
    (224, 224, (224, 224), (0, 0)),
])
def test_center_crop_follows_torchvision_resize_and_center_crop(tmp_path, w, h, resized, box):
  rng = np.random.default_rng(0)
  img = Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8))
  path = str(tmp_path / "x.png")
  img.save(path)
  big = img.resize(resized, Image.Resampling.BICUBIC) if resized != (w, h) else img
  ref = np.asarray(big.crop((box[0], box[1], box[0] + 224, box[1] + 224)), np.float32) / 255.0
  ref = (ref - np.asarray((0.485, 0.456, 0.406))) / np.asarray((0.229, 0.224, 0.225))
  ours = sources.load_image(path, 224, resize="center_crop")
  np.testing.assert_allclose(ours, ref, atol=1e-5)
  with pytest.raises(ValueError, match="resize"):
    sources.load_image(path, 224, resize="crop")

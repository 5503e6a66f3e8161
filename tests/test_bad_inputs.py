"""Inputs a user can get wrong become bad records that name the file, the line and the reason (and never stop the
run), and high-bit-depth images keep their range (issue 16: 16-bit PNGs were clipped at 255)."""

import json

import numpy as np
import pytest
from PIL import Image

from internvl_jax.data import features, pipeline, sources, tokenizer, transforms
from internvl_jax.evaluate import sources as eval_sources


@pytest.fixture(scope="module")
def tok():
  return tokenizer.build_word_level(["a red circle", "a blue square"])


def test_16_bit_grey_png_keeps_its_range(tmp_path):
  ramp = np.linspace(0, 65535, 256).round().astype(np.uint16)
  Image.fromarray(np.tile(ramp, (4, 1))).save(tmp_path / "g16.png")
  assert Image.open(tmp_path / "g16.png").mode.startswith("I;16")  # what the test is about
  rgb = np.asarray(transforms.load_image(str(tmp_path / "g16.png")))
  assert rgb.dtype == np.uint8 and rgb.shape == (4, 256, 3)
  want = np.round(ramp / 257.0).astype(np.uint8)  # 65535 -> 255: full scale maps to full scale
  np.testing.assert_array_equal(rgb[0, :, 0], want)
  np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])
  assert (rgb[0, :, 0] == 255).mean() < 0.01  # PIL's convert("RGB") left ~99% of this ramp at 255
  with open(tmp_path / "g16.png", "rb") as f:
    np.testing.assert_array_equal(np.asarray(transforms.decode_image(f.read())), rgb)
  ev = eval_sources.decode_image(str(tmp_path / "g16.png"))
  np.testing.assert_array_equal(np.asarray(ev), rgb)


def test_images_without_a_defined_range_are_bad_records(tmp_path):
  Image.fromarray(np.full((4, 4), 0.5, np.float32)).save(tmp_path / "f.tiff")
  Image.fromarray(np.full((4, 4), 1 << 20, np.int32)).save(tmp_path / "i32.tiff")
  with pytest.raises(transforms.BadRecord, match="floating-point pixels"):
    transforms.load_image(str(tmp_path / "f.tiff"))
  with pytest.raises(transforms.BadRecord, match="32-bit integer pixels"):
    transforms.load_image(str(tmp_path / "i32.tiff"))


def test_bad_jsonl_lines_are_counted_with_file_line_and_reason(tmp_path, tok):
  Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(tmp_path / "im.png")
  good = json.dumps({"image": "im.png", "caption": "a red circle"}).encode()
  lines = [good] * 30 + [
      b'{"image": "im.png", "caption": "caf\xe9 \xff"}',          # line 31: latin-1 bytes, not UTF-8
      json.dumps({"image": "im.png", "caption": 7}).encode(),      # 32: a number
      json.dumps({"image": "im.png", "caption": None}).encode(),   # 33: null
      b'{"image": "im.png", "caption": "unterminated',             # 34: not JSON
      json.dumps({"image": "im.png", "captions": ["ok", 3]}).encode(),  # 35: a list with a number
      json.dumps({"image": 5, "caption": "x"}).encode(),           # 36
      json.dumps({"image": "im.png", "conversations": "hi"}).encode(),  # 37
  ]
  path = tmp_path / "d.jsonl"
  path.write_bytes(b"\n".join(lines) + b"\n")
  src = sources.JsonlSource(str(path))  # no longer raises UnicodeDecodeError for the whole file
  assert len(src) == 37
  texts = list(src.texts())  # building a tokenizer no longer meets a number or None
  assert all(isinstance(t, str) for t in texts) and len(texts) == 30
  fn = features.make_feature_fn(features.FeatureSpec("contrastive", 28, 8), tok)
  reasons = {}
  for i in range(30, 37):
    with pytest.raises(features.BadRecord) as e:
      fn(src[i], None)
    reasons[src[i]["id"]] = str(e.value)
  want = {31: "not UTF-8 (byte 0xe9 at column 36)", 32: "'caption' is int, not text", 33: "'caption' is null",
          34: "not JSON", 35: "'captions' holds int", 36: "'image' is int", 37: "'conversations' is not a list"}
  for line, text in want.items():
    assert text in reasons[f"{path}:{line}"], (line, reasons[f"{path}:{line}"])
  tracker = pipeline.BadRecordTracker(max_fraction=0.5, min_seen=10)
  it = iter(pipeline.train_dataset(src, fn, global_batch=4, seed=0, tracker=tracker, num_threads=1))
  for _ in range(12):
    assert next(it)["pixel_values"].shape == (4, 28, 28, 3)
  assert tracker.bad >= 7  # every bad line is met within an epoch of 37
  assert all(e.split(": ", 1)[0].startswith(f"{path}:3") for e in tracker.examples)  # file and line named

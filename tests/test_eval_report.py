"""Result schemas, markdown tables and PNG galleries."""

import json

import numpy as np
import pytest
from PIL import Image

from internvl_jax.evaluate import report

METRICS = {"image_to_text": {"R@1": 50.0, "R@5": 75.0, "R@10": 100.0, "R@2": 60.0},
           "text_to_image": {"R@1": 25.0, "R@5": 50.0, "R@10": 50.0}}


def test_retrieval_result_schema_is_exactly_the_issue_one(tmp_path):
  res = report.retrieval_result("flickr30k:/d", 4, 20, METRICS)
  assert res == {"task": "retrieval", "data": "flickr30k:/d", "num_images": 4, "num_texts": 20,
                 "image_to_text": {"R@1": 50.0, "R@5": 75.0, "R@10": 100.0},
                 "text_to_image": {"R@1": 25.0, "R@5": 50.0, "R@10": 50.0}}
  report.write_json(str(tmp_path / "out" / "r.json"), res)
  assert json.loads((tmp_path / "out" / "r.json").read_text()) == res


def test_other_schemas_validate():
  z = report.zeroshot_result("demo", 10, 40.0, 90.0, {"cat": 50.0, "dog": 30.0})
  assert list(z) == ["task", "data", "num_images", "top1", "top5", "per_class"]
  c = report.caption_result("coco:/c", 2, 123.4, 35.0, [{"image": "a.jpg", "prediction": "x", "references": ["y"]}])
  v = report.vqa_result("jsonl:q.jsonl", 3, 66.7, [], checkpoint="step_10")
  assert v["checkpoint"] == "step_10" and c["tokenizer"] == "simple"
  for r in (z, c, v):
    report.validate_result(r)


@pytest.mark.parametrize("mutate, message", [
  (lambda r: r.pop("num_texts"), "lacks 'num_texts'"),
  (lambda r: r["image_to_text"].update({"R@5": 101.0}), r"R@5 must be a number in \[0, 100\]"),
  (lambda r: r["text_to_image"].update({"R@10": 10.0}), "must not fall"),
  (lambda r: r.update({"num_images": 0}), "positive integer"),
  (lambda r: r.update({"task": "nope"}), "task must be one of"),
])
def test_validate_result_rejects(mutate, message):
  res = report.retrieval_result("d", 4, 20, METRICS)
  mutate(res)
  with pytest.raises(ValueError, match=message):
    report.validate_result(res)


def test_validate_zeroshot_top1_above_top5():
  with pytest.raises(ValueError, match="exceeds top5"):
    report.validate_result(report.zeroshot_result("d", 1, 60.0, 50.0, {}))


def test_markdown_tables():
  assert report.markdown_table(["a", "b|c"], [[1, 2.345], ["x|y", 0.5]]) == (
    "| a | b\\|c |\n|---|---|\n| 1 | 2.35 |\n| x\\|y | 0.50 |")
  table = report.result_table(report.retrieval_result("d", 4, 20, METRICS))
  assert table.splitlines()[2] == "| image->text | 50.00 | 75.00 | 100.00 |"
  assert "| demo | 10 | 40.00 | 90.00 |" in report.result_table(report.zeroshot_result("demo", 10, 40.0, 90.0, {}))


def test_query_indices_are_spread_and_deterministic():
  assert report.query_indices(10, 4) == [0, 3, 6, 9]
  assert report.query_indices(2, 4) == [0, 1]


GREEN = np.array([44, 160, 44])  # matplotlib "tab:green", used only to mark correct hits


def _green_pixels(path):
  img = np.asarray(Image.open(path).convert("RGB")).astype(int)
  return int((np.abs(img - GREEN).sum(-1) < 30).sum())


def _fake_image(path):
  return np.full((16, 16, 3), 128, np.uint8)


def test_retrieval_gallery_marks_correct_hits(tmp_path):
  paths, texts, txt2img = [f"img{i}" for i in range(3)], [f"caption {j}" for j in range(6)], [0, 0, 1, 1, 2, 2]
  right_i2t = np.array([[0, 1, 2, 3, 4], [2, 3, 0, 1, 4], [4, 5, 0, 1, 2]])
  right_t2i = np.array([[0, 1, 2], [0, 1, 2], [1, 0, 2], [1, 0, 2], [2, 0, 1], [2, 0, 1]])
  wrong_i2t = np.array([[2, 3, 4, 5, 4], [0, 1, 4, 5, 0], [0, 1, 2, 3, 0]])
  wrong_t2i = np.array([[1, 2, 1], [1, 2, 1], [0, 2, 0], [0, 2, 0], [0, 1, 0], [0, 1, 0]])
  good, bad = str(tmp_path / "g" / "good.png"), str(tmp_path / "bad.png")
  report.retrieval_gallery(good, paths, texts, txt2img, right_i2t, right_t2i, num_queries=2, top=3,
                           load_image=_fake_image)
  report.retrieval_gallery(bad, paths, texts, txt2img, wrong_i2t, wrong_t2i, num_queries=2, top=3,
                           load_image=_fake_image)
  assert Image.open(good).format == "PNG"
  assert _green_pixels(good) > 100 and _green_pixels(bad) == 0


def test_zeroshot_gallery(tmp_path):
  topk = np.array([[1, 0, 2], [2, 1, 0]])
  logits = np.array([[30.0, 20.0, 10.0], [25.0, 24.0, 1.0]])
  out = str(tmp_path / "z.png")
  report.zeroshot_gallery(out, ["a", "b"], [1, 0], ["cat", "dog", "cow"], topk, logits, top=3,
                          load_image=_fake_image)
  assert Image.open(out).format == "PNG" and _green_pixels(out) > 0

"""Zero-shot classification: shipped lists, overrides, the template-ensemble classifier and accuracies."""

import numpy as np
import pytest

from internvl_jax.evaluate import zeroshot


def test_shipped_lists_have_published_sizes_and_order():
  names, templates = zeroshot.load_classnames(), zeroshot.load_templates()
  assert len(names) == 1000 and len(templates) == 80
  assert len(set(templates)) == 80
  # Spot checks of the class-index order (wnid-sorted ImageNet folders).
  assert (names[0], names[1], names[207], names[281], names[409], names[999]) == (
    "tench", "goldfish", "Golden Retriever", "tabby cat", "analog clock", "toilet paper")
  assert "a photo of a {}." in templates and "itap of my {}." in templates


def test_overrides_and_template_validation(tmp_path):
  (tmp_path / "c.txt").write_text("cat\n\n  dog \n", encoding="utf-8")
  (tmp_path / "t.txt").write_text("a {}.\nart of {}\n", encoding="utf-8")
  assert zeroshot.load_classnames(tmp_path / "c.txt") == ["cat", "dog"]
  assert zeroshot.load_templates(tmp_path / "t.txt") == ["a {}.", "art of {}"]
  (tmp_path / "bad.txt").write_text("a photo\n", encoding="utf-8")
  with pytest.raises(ValueError, match="exactly one"):
    zeroshot.load_templates(tmp_path / "bad.txt")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    zeroshot.load_classnames(tmp_path / "missing.txt")


def test_build_prompts_is_class_major():
  assert zeroshot.build_prompts(["cat", "{x}"], ["a {}.", "the {}!"]) == ["a cat.", "the cat!", "a {x}.", "the {x}!"]


def test_classifier_normalises_before_and_after_the_mean():
  # Class 0: two prompt embeddings of very different norms; a plain mean would be dominated by the long one.
  prompt_emb = np.array([[10.0, 0.0], [0.0, 1.0],   # class 0
                         [3.0, 4.0], [3.0, 4.0]])   # class 1
  cls = zeroshot.classifier_from_prompt_embeddings(prompt_emb, 2)
  np.testing.assert_allclose(cls[0], [np.sqrt(0.5), np.sqrt(0.5)], rtol=1e-6)
  np.testing.assert_allclose(cls[1], [0.6, 0.8], rtol=1e-6)
  with pytest.raises(ValueError, match="do not split"):
    zeroshot.classifier_from_prompt_embeddings(prompt_emb[:3], 2)


def test_class_embeddings_calls_text_fn_in_batches():
  calls = []

  def text_fn(texts):
    calls.append(list(texts))
    return np.array([[len(t), 1.0] for t in texts])

  cls = zeroshot.class_embeddings(text_fn, ["ox", "horse"], ["a {}", "{}!"], batch_size=3, progress=False)
  assert [len(c) for c in calls] == [3, 1] and calls[0] == ["a ox", "ox!", "a horse"]
  assert cls.shape == (2, 2)
  np.testing.assert_allclose(np.linalg.norm(cls, axis=1), 1.0, rtol=1e-6)


def test_logits_and_topk_agree(rng):
  img, cls = rng.normal(size=(13, 6)) * 3.0, rng.normal(size=(9, 6))
  cls /= np.linalg.norm(cls, axis=1, keepdims=True)
  logits = zeroshot.zeroshot_logits(img, cls)
  want = 100.0 * (img / np.linalg.norm(img, axis=1, keepdims=True)) @ cls.T
  np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)
  vals, idx = zeroshot.predict_topk(img, cls, k=5, block_size=4)
  np.testing.assert_array_equal(idx, np.argsort(-want, axis=1, kind="stable")[:, :5])
  np.testing.assert_allclose(vals, np.sort(want, axis=1)[:, ::-1][:, :5], rtol=1e-4, atol=1e-4)


def test_topk_and_per_class_accuracy():
  pred = np.array([[0, 1, 2], [2, 0, 1], [1, 2, 0], [2, 1, 0]])
  labels = np.array([0, 0, 2, 1])
  # top1: only row 0; top2: rows 0, 1 (0 in [2, 0]), 2 (2 in [1, 2]) and 3 (1 in [2, 1]).
  assert zeroshot.topk_accuracy(pred, labels, ks=(1, 2)) == pytest.approx({"top1": 25.0, "top2": 100.0})
  per = zeroshot.per_class_accuracy(pred[:, 0], labels, ["a", "b", "c", "d"])
  assert per == pytest.approx({"a": 50.0, "b": 0.0, "c": 0.0})  # "d" has no image: left out
  per_dup = zeroshot.per_class_accuracy([0, 1], [0, 2], ["x", "y", "x"])
  assert per_dup == {"x [0]": 100.0, "x [2]": 0.0}


def test_labels_to_indices():
  names = ["cat", "dog", "7"]
  assert zeroshot.labels_to_indices(["dog", "cat", 2, "1", "7"], names).tolist() == [1, 0, 2, 1, 2]
  with pytest.raises(ValueError, match="not one of"):
    zeroshot.labels_to_indices(["cow"], names)
  with pytest.raises(ValueError, match="outside"):
    zeroshot.labels_to_indices([5], names)

"""Captioning scores: CIDEr-D and BLEU-4 on a corpus small enough to score by hand; the Java-free tokeniser."""

import math
import shutil

import pytest

pytest.importorskip("pycocoevalcap")

from internvl_jax.evaluate import captioning  # noqa: E402

# Two images, one reference each, disjoint vocabularies: every n-gram has document frequency 1 of 2, so every
# tf-idf weight is tf * log 2 and the weights cancel in the cosines.
REFS = {"a": ["A b c d."], "b": ["e f g h"]}
PREDS = {"a": "a b c d", "b": "e f g h h"}


def test_cider_d_hand_computed():
  # Image a: identical -> each n-gram cosine 1 -> 10 (x100: 1000).
  # Image b: 5 words vs 4. Clipped dot products / norms per n:
  #   1-grams e f g h(tf 2, clipped to 1): 4 / (sqrt(7) * 2);   2-grams: 3 / (2 * sqrt(3))
  #   3-grams: 2 / (sqrt(3) * sqrt(2));                           4-grams: 1 / (sqrt(2) * 1)
  # times the length penalty exp(-1 / (2 * 6^2)), times 10. Without clipping the 1-gram term would be 5/(2 sqrt 7).
  b = (4 / (2 * math.sqrt(7)) + 3 / (2 * math.sqrt(3)) + 2 / math.sqrt(6) + 1 / math.sqrt(2)) / 4
  b *= math.exp(-1 / 72) * 10
  got = captioning.caption_scores(REFS, PREDS)
  assert got["per_image_CIDEr"]["a"] == pytest.approx(1000.0, rel=1e-9)
  assert got["per_image_CIDEr"]["b"] == pytest.approx(100 * b, rel=1e-9)
  assert got["CIDEr"] == pytest.approx(100 * (10 + b) / 2, rel=1e-9)


def test_bleu4_hand_computed():
  # Corpus-level clipped precisions: 1-grams 8/9, 2-grams 6/7, 3-grams 4/5, 4-grams 2/3; candidate length 9 >
  # reference length 8, so no brevity penalty.
  want = 100 * (8 / 9 * 6 / 7 * 4 / 5 * 2 / 3) ** 0.25
  assert captioning.caption_scores(REFS, PREDS)["BLEU-4"] == pytest.approx(want, rel=1e-6)


def test_bleu4_brevity_penalty():
  got = captioning.caption_scores({"x": ["a b c d e f"]}, {"x": "a b c d"})["BLEU-4"]
  assert got == pytest.approx(100 * math.exp(1 - 6 / 4), rel=1e-6)


def test_caption_scores_validates_keys():
  with pytest.raises(ValueError, match="same images"):
    captioning.caption_scores({"a": ["x"]}, {"b": "x"})
  with pytest.raises(ValueError, match="no reference"):
    captioning.caption_scores({"a": []}, {"a": "x"})


TOKENIZER_CASES = [
  ("A man riding a horse.", "a man riding a horse"),
  ("Two dogs, playing  in the park!", "two dogs playing in the park"),
  ("The man's hat isn't red.", "the man 's hat is n't red"),
  ("A \"large\" (very) dog; 'nice' -- really?", "a large -lrb- very -rrb- dog nice really"),
  ("It costs $3.50, about 1,000 yen at 12:30.", "it costs $ 3.50 about 1,000 yen at 12:30"),
  ("A black-and-white cat - sitting", "a black-and-white cat sitting"),
  ("They're here, we'll see; I'm sure you've won", "they 're here we 'll see i 'm sure you 've won"),
  ("Mr. Smith and the U.S. flag at 10 a.m. etc.", "mr. smith and the u.s. flag at 10 a.m. etc."),
  ("a dog.cat x.y and it's. 'hello.' wait... 5.", "a dog.cat x.y and it 's hello wait 5"),
  ("I cannot see the dogs' bowl [left] {x} #1 -hi-", "i can not see the dogs bowl -lsb- left -rsb- -lcb- x -rcb- # 1 hi"),
]


@pytest.mark.parametrize("raw, want", TOKENIZER_CASES)
def test_simple_tokenize(raw, want):
  assert captioning.simple_tokenize(raw) == want


@pytest.mark.skipif(shutil.which("java") is None, reason="the PTB cross-check needs Java")
def test_simple_tokenize_agrees_with_ptb():
  caps = {str(i): [raw] for i, (raw, _) in enumerate(TOKENIZER_CASES)}
  ptb = captioning.tokenize_corpus(caps, "ptb")
  for i, (raw, want) in enumerate(TOKENIZER_CASES):
    assert ptb[str(i)] == [want], raw


def test_published_tokenizer_whenever_java_runs(monkeypatch):
  monkeypatch.setattr(captioning.shutil, "which", lambda name: "/usr/bin/java" if name == "java" else None)
  assert captioning.default_tokenizer() == "ptb"
  monkeypatch.setattr(captioning.shutil, "which", lambda name: None)
  assert captioning.default_tokenizer() == "simple"
  with pytest.raises(ValueError, match="Java"):
    captioning.tokenize_corpus({"1": ["a dog"]}, "ptb")

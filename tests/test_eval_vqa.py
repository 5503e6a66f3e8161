"""VQAv2 answer normalisation (the official script's tricky cases) and the annotator-subset accuracy."""

import pytest

from internvl_jax.evaluate import vqa


@pytest.mark.parametrize("raw, want", [
  ("Two", "2"), ("none", "0"), ("The Ten", "10"),              # number words, case
  ("an apple", "apple"), ("the dog", "dog"), ("a", ""),        # articles
  ("a t-shirt", "t shirt"),                                   # punctuation not beside a space -> space
  ("red, white", "red white"),                                # beside a space -> deleted
  ("a-b - c", "ab c"),                                        # one spaced "-" deletes every "-" in the answer
  ("hello!world", "hello world"), ("NO!", "no"),
  ("what?! no", "what no"),
  ("1,000", "1000"), ("1,000 dollars, (maybe)", "1000 dollars maybe"),  # digit,digit: all punctuation deleted
  ("3.5", "3.5"), ("yes.", "yes"), ("5.", "5"), ("mr. smith", "mr smith"), (".5", ".5"),  # periods
  ("3:00", "3:00"), ("don't", "don't"), ("50%", "50%"),       # : ' % are not VQA punctuation
  ("dont", "don't"), ("isnt it", "isn't it"), ("whats that", "what's that"),   # contractions restored
  ("couldnt've", "couldn't've"), ("couldn'tve", "couldn't've"), ("oclock", "o'clock"), ("twas", "'twas"),
  ("its", "its"), ("shed", "shed"), ("were", "were"), ("lets", "lets"),       # real words left alone
  ("  left\tside\n", "left side"),
])
def test_normalize_answer(raw, want):
  assert vqa.normalize_answer(raw) == want


@pytest.mark.parametrize("matches, want", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_score_is_mean_over_leave_one_out_subsets(matches, want):
  answers = ["cat"] * matches + [f"dog{i}" for i in range(10 - matches)]
  assert vqa.vqa_score("cat", answers) == pytest.approx(want)


def test_score_normalises_both_sides():
  answers = ["2", "2", "2", "yes", "yes", "yes", "yes", "no", "no", "no"]
  assert vqa.vqa_score("Two.", answers) == pytest.approx(0.9)
  assert vqa.vqa_score("the yes", answers) == pytest.approx(1.0)


def test_unanimous_answers_are_compared_raw_like_the_official_script():
  answers = ["2"] * 10
  assert vqa.vqa_score("two", answers) == 0.0
  assert vqa.vqa_score(" 2\n", answers) == 1.0  # whitespace is still cleaned
  assert vqa.vqa_score("two", answers, official_unanimous_rule=False) == 1.0
  assert vqa.vqa_score("two", ["2"] * 9 + ["3"]) == 1.0  # not unanimous: normalised


def test_single_answer_is_exact_match_and_accuracy_is_percent():
  assert vqa.vqa_score("The cat", ["cat"]) == 1.0
  assert vqa.vqa_score("dog", ["cat"]) == 0.0
  assert vqa.vqa_accuracy(["cat", "dog"], [["cat"] * 10, ["cat"] * 9 + ["dog"]]) == pytest.approx(65.0)
  with pytest.raises(ValueError, match="predictions"):
    vqa.vqa_accuracy(["a"], [])

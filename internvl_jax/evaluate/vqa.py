"""VQAv2 accuracy: the answer normalisation and the annotator-subset accuracy of the official VQA evaluation.

Normalisation (applied to the prediction and to every human answer):
  1. newlines / tabs -> spaces, ends stripped;
  2. punctuation: each of ; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? ! is deleted when the ORIGINAL answer has it next
     to a space or the answer contains a digit-comma-digit group ("1,000" -> "1000"), and otherwise becomes a space
     ("t-shirt" -> "t shirt"); a period is deleted unless a digit follows ("3.5" stays; the official pattern meant
     to also keep "5." but its look-behind is malformed, so a digit before a period does not protect it);
     apostrophes, colons and other characters are untouched;
  3. lowercase, split on whitespace; number words zero..ten and "none" -> digits; the articles a / an / the are
     dropped; a contraction written without its apostrophe is restored ("dont" -> "don't"); joined by one space.
The official script normalises only when the ten human answers are not all identical (a unanimous "2" does not
match a prediction "two"); `official_unanimous_rule=True` (the default) keeps that behaviour so numbers match
the evaluation server; False normalises always.

Accuracy of a prediction against n human answers: the mean, over the n subsets that leave one human out, of
min(#matches in the subset / 3, 1). With 10 answers, 1 match scores 0.3, 2 -> 0.6, 3 -> 0.9, 4 or more -> 1.
With a single human answer (not VQAv2, e.g. a JSONL set) there is no subset to score and the official formula would
give 0 to everything; such a question scores exact match (1 or 0) of the normalised answers instead (always
normalised: one answer is not an annotator consensus).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
                "!")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset(("a", "an", "the"))

# Contractions as they should be written. A word equal to one of them with its apostrophe(s) left out is restored.
# Forms whose apostrophe-less spelling is an ordinary word (we'd/wed, she'll/shell, it's/its, we're/were, I'll/ill,
# let's/lets, ...) are not listed, as in the official table, so those words are left alone; "she's", "let's" and
# the capitalised I-forms of that table never fire after lowercasing and are left out for the same effect.
_CONTRACTIONS = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd he'd've
he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't must've needn't not've
o'clock oughtn't shan't she'd've should've shouldn't shouldn't've somebody'd somebody'd've somebody'll somebody's
someone'd someone'd've someone'll someone's something'd something'd've something'll that's there'd there'd've
there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's
what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't would've
wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've
""".split()


def _contraction_table() -> dict[str, str]:
  """Misspelling -> contraction. One apostrophe: the word without it ("dont"). Several: each spelling that misses
  exactly one of them ("couldnt've", "couldn'tve"), which is how such answers are typed."""
  table = {}
  for word in _CONTRACTIONS:
    positions = [i for i, ch in enumerate(word) if ch == "'"]
    if len(positions) == 1:
      table[word.replace("'", "")] = word
    else:
      for p in positions:
        table[word[:p] + word[p + 1:]] = word
  return table


CONTRACTION_FIXES = _contraction_table()


def _process_punctuation(text: str) -> str:
  out = text
  # Decisions read the original text, not the partly processed one (as the official loop does).
  delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
  for p in _PUNCTUATION:
    if delete_all or (p + " ") in text or (" " + p) in text:
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def _process_words(text: str) -> str:
  words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
  words = [w for w in words if w not in _ARTICLES]
  return " ".join(CONTRACTION_FIXES.get(w, w) for w in words)


def clean_whitespace(answer: str) -> str:
  """Step 1 only: newlines and tabs to spaces, ends stripped (what the official script does to every answer)."""
  return answer.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(answer: str) -> str:
  """The full VQA normalisation of one answer (steps 1-3 of the module docstring)."""
  return _process_words(_process_punctuation(clean_whitespace(answer)))


def vqa_score(prediction: str, answers: Sequence[str], official_unanimous_rule: bool = True) -> float:
  """Accuracy in [0, 1] of one predicted answer against the human answers (usually 10)."""
  if not answers:
    raise ValueError("a VQA question needs at least one human answer")
  gts = [clean_whitespace(a) for a in answers]
  pred = clean_whitespace(prediction)
  if not official_unanimous_rule or len(set(gts)) > 1 or len(gts) == 1:
    gts = [normalize_answer(a) for a in gts]
    pred = normalize_answer(pred)
  matches = sum(g == pred for g in gts)
  if len(gts) == 1:  # no annotator subset to score: exact match (see the module docstring)
    return float(matches)
  # Leaving out a matching answer leaves matches - 1 in the subset; leaving out another leaves all of them.
  total = matches * min((matches - 1) / 3.0, 1.0) + (len(gts) - matches) * min(matches / 3.0, 1.0)
  return total / len(gts)


def vqa_accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str]],
                 official_unanimous_rule: bool = True) -> float:
  """Mean accuracy in percent over questions. predictions [Q] strings, answers [Q] lists of human answers."""
  if len(predictions) != len(answers):
    raise ValueError(f"{len(predictions)} predictions for {len(answers)} questions")
  if not predictions:
    raise ValueError("no VQA questions to score")
  return 100.0 * sum(vqa_score(p, a, official_unanimous_rule) for p, a in zip(predictions, answers)) / len(answers)

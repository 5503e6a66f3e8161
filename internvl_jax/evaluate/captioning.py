"""Captioning scores: CIDEr-D and BLEU-4 as computed by the coco-caption toolkit (the `pycocoevalcap` package's
Cider and Bleu scorers), on captions tokenised without Java.

coco-caption tokenises every caption with Stanford's PTBTokenizer (a Java program, lowercasing) and then drops
the tokens '' ' `` ` . ? ! , : ; - -- ... (and -LRB- style tokens, but as the text was lowercased first these
never match: brackets survive as "-lrb-", "-rrb-", "-lsb-", "-rsb-", "-lcb-", "-rcb-"). `simple_tokenize`
reproduces that in plain Python for the shapes captions take: clitics split off ("don't" -> "do n't", "man's" ->
"man 's", "cannot" -> "can not"); quotes and the punctuation above removed, except "," and ":" between digits
("1,000", "12:30"); a period is kept inside a token ("3.5", "dog.cat"), in acronyms ("u.s.", "a.m.") and in common
abbreviations ("mr.", "st.", "etc."), and removed at the end of any other word; "$", "%", "#", "+", "=" become
tokens. Known differences (rare in captions): "!!"-style runs, which PTB keeps as tokens, are dropped; PTB's
fuller abbreviation list and its "rock 'n' roll" / "y' all" / "at & t" splits are not reproduced. eval.py uses
the Java tokenizer itself whenever Java is installed (`default_tokenizer`), the simple one only without it; the
result JSON records which one was used.

CIDEr-D details that matter and that the package implements: document frequencies are taken over the reference
sets of the evaluated corpus, candidate n-gram counts are clipped by the reference counts, a Gaussian length
penalty (sigma 6) applies, and the mean over n = 1..4 is scaled by 10. Scores here are reported x100, as papers
do (COCO CIDEr "140.0" is the package's 1.400).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping, Sequence

_CLITICS = ("n't", "'s", "'re", "'ve", "'ll", "'d", "'m")
_CLITIC_RE = re.compile(r"(?<=\w)(n't|'s|'re|'ve|'ll|'d|'m)(?![\w'])")
_SPLIT_WORDS = {"cannot": "can not", "gonna": "gon na", "gotta": "got ta", "wanna": "wan na"}
_BRACKETS = {"(": " -lrb- ", ")": " -rrb- ", "[": " -lsb- ", "]": " -rsb- ", "{": " -lcb- ", "}": " -rcb- "}
_BRACKET_TOKENS = frozenset(name.strip() for name in _BRACKETS.values())
_NUMERIC_SEP_RE = re.compile(r"(?<!\d)[,:]|[,:](?!\d)")  # , and : unless between digits
_DROP_RE = re.compile(r"[?!;\"`]")
_SPLIT_SYMBOLS_RE = re.compile(r"([$%#+=])")
# Abbreviations whose final period PTB keeps (a common subset of its list).
_ABBREVIATIONS = frozenset(
  "mr mrs ms dr prof st sr jr mt ft rev gen gov sen rep lt col capt sgt inc co corp ltd bros vs etc no ave blvd "
  "jan feb mar apr jun jul aug sep sept oct nov dec".split())


def _strip_period(tok: str) -> str:
  if not tok.endswith("."):
    return tok
  base = tok.rstrip(".")
  if tok.endswith("..") or not base:  # an ellipsis is a punctuation token
    return base
  if "." in base or base in _ABBREVIATIONS:  # acronym (u.s.) or abbreviation (mr.): the period is part of it
    return tok
  return base  # sentence-final or word-final period: a separate token, removed


def simple_tokenize(text: str) -> str:
  """One caption -> its space-joined lowercase tokens without punctuation (see the module docstring)."""
  s = text.replace("\n", " ").lower()
  for bracket, name in _BRACKETS.items():
    s = s.replace(bracket, name)
  s = _CLITIC_RE.sub(r" \1", s)
  s = _NUMERIC_SEP_RE.sub(" ", s)
  s = _DROP_RE.sub(" ", s)
  s = _SPLIT_SYMBOLS_RE.sub(r" \1 ", s)
  tokens = []
  for tok in s.split():
    if tok not in _BRACKET_TOKENS:
      # Peel trailing periods, quotes and dashes until stable ("'hello.'" -> "hello"), but keep a clitic's quote.
      while True:
        new = _strip_period(tok)
        new = new if new in _CLITICS else new.strip("'-")
        if new == tok:
          break
        tok = new
    if tok:
      tokens.append(_SPLIT_WORDS.get(tok, tok))
  return " ".join(tokens)


def _import_scorers():
  try:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("captioning scores need pycocoevalcap: pip install pycocoevalcap==1.2") from e
  return Bleu, Cider


def default_tokenizer() -> str:
  """"ptb" (coco-caption's own Java tokenizer, what published CIDEr uses) whenever a `java` is on PATH, else
  "simple"."""
  return "ptb" if shutil.which("java") else "simple"


def tokenize_corpus(captions: Mapping[str, Sequence[str]], tokenizer: str = "simple") -> dict[str, list[str]]:
  """{key: [caption, ...]} -> {key: [tokenised caption, ...]} with "simple" (Python) or "ptb" (needs Java)."""
  if tokenizer == "ptb" and not shutil.which("java"):
    raise ValueError("tokenizer 'ptb' needs Java (apt-get install default-jre-headless); or use 'simple'")
  if tokenizer == "simple":
    return {k: [simple_tokenize(c) for c in caps] for k, caps in captions.items()}
  if tokenizer == "ptb":
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    return PTBTokenizer().tokenize({k: [{"caption": c} for c in caps] for k, caps in captions.items()})
  raise ValueError(f"tokenizer must be 'simple' or 'ptb', got {tokenizer!r}")


def caption_scores(references: Mapping[str, Sequence[str]], predictions: Mapping[str, str],
                   tokenizer: str = "simple") -> dict[str, float]:
  """Corpus CIDEr-D and BLEU-4, both x100.

  references: {image key: [reference caption, ...]} (at least one each); predictions: {image key: caption}, the
  same keys. Returns {"CIDEr": x, "BLEU-4": y, "per_image_CIDEr": {key: x}} with raw (untokenised) inputs.
  """
  if set(references) != set(predictions):
    missing, extra = set(references) - set(predictions), set(predictions) - set(references)
    raise ValueError(f"predictions and references must cover the same images: {len(missing)} without a "
                     f"prediction, {len(extra)} without references")
  if not references:
    raise ValueError("no captions to score")
  empty = [k for k, refs in references.items() if not refs]
  if empty:
    raise ValueError(f"{len(empty)} image(s) have no reference caption (first: {empty[0]!r})")
  Bleu, Cider = _import_scorers()
  keys = list(references)
  gts = tokenize_corpus({k: list(references[k]) for k in keys}, tokenizer)
  res = tokenize_corpus({k: [predictions[k]] for k in keys}, tokenizer)
  cider, per_image = Cider().compute_score(gts, res)
  bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
  return {"CIDEr": 100.0 * float(cider), "BLEU-4": 100.0 * float(bleu[3]),
          "per_image_CIDEr": {k: 100.0 * float(s) for k, s in zip(keys, per_image)}}

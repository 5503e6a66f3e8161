"""Zero-shot classification with a template ensemble (DESIGN §7): class embedding = renormalised mean of the
L2-normalised embeddings of every prompt template filled with the class name; logits = 100 x cosine; top-1 / top-5
and per-class accuracy.

The shipped lists (package data, one entry per line) are OpenAI CLIP's 80 ImageNet prompt templates and its
cleaned ImageNet-1k class names in class-index order (wnid-sorted folders). That class list names two pairs of
classes alike ("missile" at 657 and 744, "sunglasses" at 836 and 837); it is kept as published so that scores are
comparable, and per-class results name such classes by "name [index]".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from internvl_jax.evaluate import retrieval

DATA_DIR = Path(__file__).parent / "data"
IMAGENET_CLASSNAMES = DATA_DIR / "imagenet_classnames.txt"
IMAGENET_TEMPLATES = DATA_DIR / "imagenet_templates.txt"
LOGIT_SCALE = 100.0


def read_lines(path: str | Path) -> list[str]:
  """Non-empty lines of a UTF-8 text file, without their line ends or surrounding spaces."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"list file {path} does not exist")
  lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
  lines = [line for line in lines if line]
  if not lines:
    raise ValueError(f"list file {path} has no entries")
  return lines


def load_classnames(path: str | Path | None = None) -> list[str]:
  """Class names, one per line, in label-index order; the shipped ImageNet-1k list when path is None."""
  return read_lines(IMAGENET_CLASSNAMES if path is None else path)


def load_templates(path: str | Path | None = None) -> list[str]:
  """Prompt templates, one per line, each with exactly one "{}" for the class name; the CLIP 80 when path is None."""
  templates = read_lines(IMAGENET_TEMPLATES if path is None else path)
  for i, t in enumerate(templates):
    if t.count("{}") != 1:
      raise ValueError(f"template {i + 1} of {path or IMAGENET_TEMPLATES} needs exactly one '{{}}': {t!r}")
  return templates


def build_prompts(classnames: Sequence[str], templates: Sequence[str]) -> list[str]:
  """All prompts, class-major: prompt c * T + t is templates[t] filled with classnames[c]. str.replace rather than
  str.format, so a class name or template with other braces is taken literally."""
  return [t.replace("{}", c) for c in classnames for t in templates]


def classifier_from_prompt_embeddings(prompt_emb: np.ndarray, num_classes: int) -> np.ndarray:
  """prompt_emb [C * T, E] in build_prompts order -> float32 [C, E] unit-norm class embeddings: each prompt
  embedding normalised, averaged over the T templates of its class, and the mean renormalised."""
  prompt_emb = np.asarray(prompt_emb, np.float32)
  if prompt_emb.ndim != 2 or prompt_emb.shape[0] % num_classes:
    raise ValueError(f"{prompt_emb.shape[0]} prompt embeddings do not split into {num_classes} classes")
  per_class = retrieval.l2_normalize(prompt_emb).reshape(num_classes, -1, prompt_emb.shape[1])  # [C, T, E]
  return np.asarray(retrieval.l2_normalize(per_class.mean(axis=1)))


def class_embeddings(text_embed_fn: Callable[[list[str]], np.ndarray], classnames: Sequence[str],
                     templates: Sequence[str], batch_size: int = 256, progress: bool = True) -> np.ndarray:
  """Embeds every (class, template) prompt with text_embed_fn(list of b strings) -> [b, E] and returns the
  float32 [C, E] classifier. The last batch is passed as is (shorter): pad inside text_embed_fn if it is jitted."""
  prompts = build_prompts(classnames, templates)
  batches = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
  # compute_embeddings reads the batch size from array leaves, so each text batch travels as a NumPy string array.
  emb = retrieval.compute_embeddings(lambda b: text_embed_fn(list(b)), [np.asarray(b) for b in batches],
                                     desc="class prompts", progress=progress)
  return classifier_from_prompt_embeddings(emb, len(classnames))


def zeroshot_logits(image_emb: np.ndarray, class_emb: np.ndarray, scale: float = LOGIT_SCALE) -> np.ndarray:
  """image_emb [N, E] (normalised here), class_emb [C, E] (unit-norm) -> float32 logits [N, C] = scale x cosine.
  Holds the whole [N, C] matrix: for large N use predict_topk."""
  img = retrieval.l2_normalize(image_emb)
  return np.asarray(scale * jnp.matmul(img, jnp.asarray(class_emb, jnp.float32).T))


def predict_topk(image_emb: np.ndarray, class_emb: np.ndarray, k: int = 5,
                 block_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
  """The k best classes per image, best first: (logits float32 [N, k] = 100 x cosine, class indices int32 [N, k]).
  Blocked like retrieval, so 50k images x 1k classes never materialise at once; ties go to the lower class index."""
  values, indices = retrieval.blocked_topk(retrieval.l2_normalize(image_emb), class_emb, k, block_size)
  return LOGIT_SCALE * values, indices


def topk_accuracy(pred_topk: np.ndarray, labels: Sequence[int] | np.ndarray,
                  ks: Sequence[int] = (1, 5)) -> dict[str, float]:
  """pred_topk int [N, >= max(ks)] ranked class indices, labels int [N] -> {"top1": pct, "top5": pct}."""
  pred_topk, labels = np.asarray(pred_topk), np.asarray(labels)
  if pred_topk.shape[0] != labels.shape[0]:
    raise ValueError(f"{pred_topk.shape[0]} predictions for {labels.shape[0]} labels")
  hits = pred_topk == labels[:, None]
  return {f"top{k}": 100.0 * float(hits[:, :k].any(axis=1).mean()) for k in ks}


def per_class_accuracy(pred_top1: Sequence[int] | np.ndarray, labels: Sequence[int] | np.ndarray,
                       classnames: Sequence[str]) -> dict[str, float]:
  """Top-1 accuracy in percent for each class that has at least one image, keyed by class name ("name [index]"
  when the name is shared by several classes), in class-index order."""
  pred_top1, labels = np.asarray(pred_top1).reshape(-1), np.asarray(labels)
  seen: dict[str, int] = {}
  for name in classnames:
    seen[name] = seen.get(name, 0) + 1
  out = {}
  for c, name in enumerate(classnames):
    mask = labels == c
    if mask.any():
      key = name if seen[name] == 1 else f"{name} [{c}]"
      out[key] = 100.0 * float((pred_top1[mask] == c).mean())
  return out


def labels_to_indices(labels: Sequence[str | int], classnames: Sequence[str]) -> np.ndarray:
  """Maps labels (class names, or integer indices / digit strings) to int64 [N] indices into classnames; an unknown
  name raises with the name, so a typo in a JSONL file is not silently scored as wrong."""
  index = {}
  for i, name in enumerate(classnames):
    index.setdefault(name, i)
  out = np.empty(len(labels), np.int64)
  for n, lab in enumerate(labels):
    if isinstance(lab, (int, np.integer)) or (isinstance(lab, str) and lab.isdigit() and lab not in index):
      i = int(lab)
      if not 0 <= i < len(classnames):
        raise ValueError(f"label index {i} is outside the {len(classnames)} classes")
    elif lab in index:
      i = index[lab]
    else:
      raise ValueError(f"label {lab!r} is not one of the {len(classnames)} class names (pass --classnames FILE)")
    out[n] = i
  return out

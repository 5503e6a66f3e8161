"""Zero-shot image-text retrieval: caption preprocessing, batched embedding, blocked top-k search and recall@k,
following the published Flickr30K / COCO protocol (DESIGN §7).

Conventions: embeddings are [count, E] arrays (any float dtype; compared in float32). `txt2img[j]` is the index of
the image that caption j describes. Recall values are percentages in [0, 100]. Ties between equal similarities are
broken towards the lower index (the rule of `jax.lax.top_k`), so results are deterministic.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

# The characters that the published protocol (ALBEF / BLIP / InternVL retrieval) turns into spaces.
CAPTION_PUNCTUATION = '.!"()*#:;~'
_PUNCT_TO_SPACE = str.maketrans(CAPTION_PUNCTUATION, " " * len(CAPTION_PUNCTUATION))
DEFAULT_KS = (1, 5, 10)


def preprocess_caption(caption: str, max_words: int = 50) -> str:
  """Lowercase, turn each of .!"()*#:;~ into a space, collapse whitespace (also strips the ends), keep the first
  `max_words` words. Other punctuation (commas, apostrophes, hyphens) is kept, as in the published rule."""
  words = caption.lower().translate(_PUNCT_TO_SPACE).split()
  return " ".join(words[:max_words])


def img2txt_from_txt2img(txt2img: Sequence[int] | np.ndarray, num_images: int) -> list[list[int]]:
  """Inverts txt2img [M] (int) into, for each image, the sorted list of its caption indices. Raises if an index is
  out of range or an image has no caption (its image->text recall would be silently 0)."""
  txt2img = np.asarray(txt2img, dtype=np.int64)
  if txt2img.ndim != 1:
    raise ValueError(f"txt2img must be 1-D [num_texts], got shape {txt2img.shape}")
  if txt2img.size and (txt2img.min() < 0 or txt2img.max() >= num_images):
    raise ValueError(f"txt2img holds indices outside [0, {num_images}): min {txt2img.min()}, max {txt2img.max()}")
  lists: list[list[int]] = [[] for _ in range(num_images)]
  for j, i in enumerate(txt2img.tolist()):
    lists[i].append(j)
  empty = [i for i, caps in enumerate(lists) if not caps]
  if empty:
    raise ValueError(f"{len(empty)} image(s) have no caption (first: index {empty[0]}); drop them before retrieval")
  return lists


def l2_normalize(x: jax.Array | np.ndarray, eps: float = 1e-12) -> jax.Array:
  """[..., E] -> float32 [..., E] with unit L2 norm on the last axis (zero rows stay zero)."""
  x = jnp.asarray(x, jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


@functools.partial(jax.jit, static_argnames=("k",))
def _block_topk(queries: jax.Array, keys: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  # HIGHEST: on TPU the default matmul precision is bf16 passes, which would reorder near-ties in the rankings.
  sims = jnp.matmul(queries, keys.T, precision=jax.lax.Precision.HIGHEST)  # [b, K] float32
  return jax.lax.top_k(sims, k)


def blocked_topk(queries: jax.Array | np.ndarray, keys: jax.Array | np.ndarray, k: int,
                 block_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
  """For each query row, the k keys with the largest dot product, without ever holding the full [Q, K] matrix.

  queries: [Q, E], keys: [K, E] (cast to float32; normalise first for cosine). Memory is one [block_size, K] block
  at a time; the last block is zero-padded so the jitted block function compiles once.
  Returns (values float32 [Q, k'], indices int32 [Q, k']) as NumPy arrays, best first, k' = min(k, K).
  """
  queries = np.asarray(queries, np.float32)
  keys = jnp.asarray(keys, jnp.float32)  # placed on the device once, reused by every block
  if queries.ndim != 2 or keys.ndim != 2 or queries.shape[1] != keys.shape[1]:
    raise ValueError(f"need queries [Q, E] and keys [K, E] with the same E; got {queries.shape} and {keys.shape}")
  k = min(k, keys.shape[0])
  q = queries.shape[0]
  block_size = max(1, min(block_size, q))
  values, indices = [], []
  for start in range(0, q, block_size):
    block = queries[start:start + block_size]
    n = block.shape[0]
    if n < block_size:
      block = np.pad(block, ((0, block_size - n), (0, 0)))
    v, i = _block_topk(jnp.asarray(block), keys, k)
    values.append(np.asarray(v)[:n])
    indices.append(np.asarray(i)[:n])
  if not values:
    return np.zeros((0, k), np.float32), np.zeros((0, k), np.int32)
  return np.concatenate(values), np.concatenate(indices).astype(np.int32)


def _check_groups(image_groups, num_images: int) -> np.ndarray:
  if image_groups is None:
    return np.arange(num_images)
  groups = np.asarray(image_groups)
  if groups.shape != (num_images,):
    raise ValueError(f"image_groups must hold one id per image ({num_images}), got shape {groups.shape}")
  return groups


def recall_from_topk(i2t_topk: np.ndarray, t2i_topk: np.ndarray, txt2img: Sequence[int] | np.ndarray,
                     ks: Sequence[int] = DEFAULT_KS,
                     image_groups: Sequence | np.ndarray | None = None) -> dict[str, dict[str, float]]:
  """Recall@k in percent from ranked index lists.

  i2t_topk: int [N, >= max(ks)] caption indices per image, best first; t2i_topk: int [M, >= max(ks)] image indices
  per caption; txt2img: int [M]. Image->text: a hit if ANY of the image's captions is in its top k, averaged over
  images. Text->image: a hit if the caption's image is in its top k, averaged over captions.
  image_groups: optional [N] ids (ints or strings); images with equal ids are interchangeable, so a retrieved
  image (or a caption of it) of the query's group counts as a hit. None = every image its own group (the
  published protocol). The demo world needs it: different images of one scene share the same captions.
  """
  txt2img = np.asarray(txt2img, np.int64)
  i2t_topk, t2i_topk = np.asarray(i2t_topk), np.asarray(t2i_topk)
  num_images = i2t_topk.shape[0]
  img2txt_from_txt2img(txt2img, num_images)  # validates: indices in range, every image has a caption
  if t2i_topk.shape[0] != txt2img.shape[0]:
    raise ValueError(f"t2i_topk has {t2i_topk.shape[0]} rows but txt2img has {txt2img.shape[0]} captions")
  groups = _check_groups(image_groups, num_images)
  text_groups = groups[txt2img]  # [M]: the group of each caption's image
  i2t_hits = text_groups[i2t_topk] == groups[:, None]  # [N, k]: retrieved caption describes the image's group
  t2i_hits = groups[t2i_topk] == text_groups[:, None]  # [M, k]: retrieved image is of the caption's group
  out = {"image_to_text": {}, "text_to_image": {}}
  for k in ks:
    # A top-k list shorter than k (fewer candidates than k) holds every candidate, so recall@k is its recall.
    out["image_to_text"][f"R@{k}"] = 100.0 * float(i2t_hits[:, :k].any(axis=1).mean())
    out["text_to_image"][f"R@{k}"] = 100.0 * float(t2i_hits[:, :k].any(axis=1).mean())
  return out


def recall_from_similarity(sims: np.ndarray | jax.Array, txt2img: Sequence[int] | np.ndarray,
                           ks: Sequence[int] = DEFAULT_KS,
                           image_groups: Sequence | np.ndarray | None = None) -> dict[str, dict[str, float]]:
  """Recall@k from a full similarity matrix sims [N images, M captions] (small data and tests)."""
  sims = jnp.asarray(sims, jnp.float32)
  k = max(ks)
  _, i2t = jax.lax.top_k(sims, min(k, sims.shape[1]))
  _, t2i = jax.lax.top_k(sims.T, min(k, sims.shape[0]))
  return recall_from_topk(np.asarray(i2t), np.asarray(t2i), txt2img, ks, image_groups)


class RetrievalResult(NamedTuple):
  """metrics: {"image_to_text": {"R@k": pct}, "text_to_image": {...}}; i2t_topk: int32 [N, k] caption indices;
  i2t_scores: float32 [N, k] cosines; t2i_topk: int32 [M, k] image indices; t2i_scores: float32 [M, k]."""
  metrics: dict[str, dict[str, float]]
  i2t_topk: np.ndarray
  i2t_scores: np.ndarray
  t2i_topk: np.ndarray
  t2i_scores: np.ndarray


def evaluate_retrieval(image_emb: np.ndarray | jax.Array, text_emb: np.ndarray | jax.Array,
                       txt2img: Sequence[int] | np.ndarray, ks: Sequence[int] = DEFAULT_KS,
                       block_size: int = 512, image_groups: Sequence | np.ndarray | None = None) -> RetrievalResult:
  """Cosine-similarity retrieval in both directions. image_emb [N, E], text_emb [M, E] (any float dtype; they are
  L2-normalised here), txt2img int [M], image_groups optional [N] (see recall_from_topk). Keeps the top max(ks)
  per query for recall and for galleries."""
  image_emb, text_emb = l2_normalize(image_emb), l2_normalize(text_emb)
  k = max(ks)
  i2t_scores, i2t_topk = blocked_topk(image_emb, text_emb, k, block_size)
  t2i_scores, t2i_topk = blocked_topk(text_emb, image_emb, k, block_size)
  metrics = recall_from_topk(i2t_topk, t2i_topk, txt2img, ks, image_groups)
  return RetrievalResult(metrics, i2t_topk, i2t_scores, t2i_topk, t2i_scores)


def _leading_dim(batch: Any) -> int:
  leaves = jax.tree.leaves(batch)
  if not leaves:
    raise ValueError("a batch has no array leaves")
  return int(np.shape(leaves[0])[0])


def compute_embeddings(embed_fn: Callable[[Any], Any], batches: Iterable[Any], *, total: int | None = None,
                       pad_to: int | None = None, desc: str = "embedding", progress: bool = True) -> np.ndarray:
  """Runs embed_fn(batch) -> [b, E] over batches and stacks the results into float32 [sum b, E] (host memory).

  batches: an iterable of arrays or pytrees of arrays with a shared leading batch axis (e.g. {"pixels": [b, H, W, 3]}
  or token ids [b, T]). pad_to: if set, a short last batch is padded (repeating its last row) to that size before
  embed_fn and the padding rows are dropped after, so a jitted / sharded embed_fn sees one shape only.
  total: number of batches, for the progress bar when `batches` has no len().
  """
  outputs = []
  for batch in tqdm(batches, total=total, desc=desc, disable=not progress, leave=False):
    n = _leading_dim(batch)
    if pad_to is not None and n < pad_to:
      batch = jax.tree.map(lambda x: np.concatenate([np.asarray(x), np.repeat(np.asarray(x)[-1:], pad_to - n, 0)]),
                           batch)
    out = np.asarray(embed_fn(batch), np.float32)
    if out.ndim != 2 or out.shape[0] < n:
      raise ValueError(f"embed_fn must return [batch, E]; got shape {out.shape} for a batch of {n}")
    outputs.append(out[:n])
  if not outputs:
    raise ValueError("no batches to embed: the data source is empty")
  return np.concatenate(outputs)

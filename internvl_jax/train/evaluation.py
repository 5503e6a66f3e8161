"""In-loop evaluation on the eval split: retrieval R@1 for contrastive stages (scored by evaluate.retrieval, the
evaluator eval.py uses; the embeddings come from the sharded train-state step), loss and exact match for the
instruct stage. (The full protocols — R@5/10, several captions per image, zero-shot classification, generated
captions and answers — run in eval.py; this is the quick signal printed while training.)"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils

from internvl_jax.data import pipeline
from internvl_jax.evaluate import retrieval
from internvl_jax.train import steps


def to_global(batch: dict, mesh) -> dict:
  """A batch that every host holds whole -> global arrays sharded over the batch axes (drops 'valid')."""
  sh = steps.batch_sharding(mesh)
  return {k: jax.make_array_from_callback(v.shape, sh, lambda idx, v=v: v[idx]) for k, v in batch.items()
          if k != "valid"}


def _host(x) -> np.ndarray:
  if jax.process_count() > 1:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def retrieval_r1(image_emb: np.ndarray, text_emb: np.ndarray, keys: list[str]) -> dict:
  """R@1 both ways, as fractions, with one caption per image, through eval.py's evaluator
  (evaluate.retrieval): a retrieved item is a hit when its key equals the query's (the demo has several images
  of the same scene, which all match the same caption). emb: [N, E] float, keys: [N]."""
  res = retrieval.evaluate_retrieval(image_emb, text_emb, np.arange(len(keys)), ks=(1,), image_groups=list(keys))
  return {"i2t_r1": res.metrics["image_to_text"]["R@1"] / 100.0, "t2i_r1": res.metrics["text_to_image"]["R@1"] / 100.0}


def evaluate_retrieval(embed_step, state: dict, source, feature_fn, *, batch_size: int, mesh,
                       limit: int | None = None) -> dict:
  images, texts, keys = [], [], []
  for batch, records in pipeline.eval_batches(source, feature_fn, batch_size=batch_size, limit=limit):
    img, txt = embed_step(state["params"], state["frozen"], to_global(batch, mesh))
    valid = batch["valid"]
    images.append(_host(img)[valid])
    texts.append(_host(txt)[valid])
    keys += [r.get("key", r.get("id")) for r in records]
  if not keys:
    return {}
  return retrieval_r1(np.concatenate(images), np.concatenate(texts), keys)


def evaluate_lm(eval_step, state: dict, source, feature_fn, *, batch_size: int, mesh, limit: int | None = None):
  """eval_loss (token mean) and exact_match (the share of exact examples; steps.lm_eval_outputs counts examples
  per row, so a packed row's examples count one by one)."""
  loss_sum, tokens, matches, n = 0.0, 0, 0, 0
  for batch, _ in pipeline.eval_batches(source, feature_fn, batch_size=batch_size, limit=limit):
    ls, nt, em, ne = (_host(x) for x in eval_step(state["params"], state["frozen"], to_global(batch, mesh)))
    v = batch["valid"]
    loss_sum, tokens, matches, n = loss_sum + ls[v].sum(), tokens + nt[v].sum(), matches + em[v].sum(), n + ne[v].sum()
  if not n:
    return {}
  return {"eval_loss": float(loss_sum / max(tokens, 1)), "exact_match": float(matches / n)}

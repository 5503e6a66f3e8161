"""Linear probe of a frozen vision tower: multinomial logistic regression on standardised features, its L2 penalty
chosen on a held-out part of the train split, refit on the whole train split, scored on the test split.

  feats = cls_patch_concat(last_hidden_state)                 # [B, 2D]: the official linear-probing feature
  res = linear_probe(train_x, train_y, test_x, test_y, num_classes)   # -> ProbeResult (top-1 / top-5, chosen wd)

Which feature (the fact, from OpenGVLab/InternVL at 2410d1d, `classification/`): every linear-probing config
(`configs/linear_probing/linear_probing_intern_vit_6b_*.yaml`) sets `CLS_TARGET: 'cls_patch_concat'`, which
`models/intern_vit_6b.py` (`InternViT6B.forward`) turns into `cat(x[:, 0], x[:, 1:].mean(1))` of the last block's
output (the tower has no final norm): the class token next to the mean of the patch tokens, width 2D. That head is
`SyncBatchNorm(2D, eps=1e-6)` then `Linear(2D, classes)`; at test time the batch norm is a fixed per-feature
standardisation, which is what `standardize` does here with the train split's mean and std.

How it is fitted (here, not the official recipe): the official probe trains that head for 10 epochs of SGD on
augmented images (RandomResizedCrop + flip, mixup / cutmix, label smoothing 0.1, EMA), which needs the tower in the
loop. Here the features are computed once (no augmentation; test images resized on the short side and
centre-cropped, the official test transform) and the head is fitted by L-BFGS (optax.lbfgs, zoom line search) on
the full-batch objective

  mean_i CE(W x_i + b, y_i) + wd / 2 * ||W||^2          (the bias is not penalised)

which is scikit-learn's LogisticRegression(C) with wd = 1 / (C * N) (N training rows), as CLIP's linear probes.
The features live on one device in float32: for ImageNet-scale sets use the official image-level recipe.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

# wd grid of the sweep: 1e-6 .. 1 in half decades (on standardised features a wd near 1 leaves an almost flat head)
DEFAULT_WEIGHT_DECAYS = tuple(float(10.0 ** e) for e in np.arange(-6.0, 0.01, 0.5))
HOLDOUT_FRACTION = 0.2  # of the train split, for choosing wd
MAX_ITERS = 1000
TOL = 1e-6  # L-BFGS stops when the gradient's L2 norm falls below this


def cls_patch_concat(tokens: jax.Array) -> jax.Array:
  """The official linear-probing feature (module docstring): tokens [B, 1 + N, D] (class token first) ->
  float32 [B, 2D] = [class token ; mean of the N patch tokens]."""
  tokens = tokens.astype(jnp.float32)
  return jnp.concatenate([tokens[:, 0], tokens[:, 1:].mean(axis=1)], axis=-1)


def standardize(train: np.ndarray, *others: np.ndarray, eps: float = 1e-6) -> list[np.ndarray]:
  """Per-feature (x - mean) / std with the statistics of `train` [N, F], applied to it and to `others` [M, F];
  float32. A constant feature keeps scale 1 (eps guards the division)."""
  train = np.asarray(train, np.float32)
  mean, std = train.mean(0), train.std(0)
  std = np.where(std < eps, 1.0, std)
  return [((np.asarray(x, np.float32) - mean) / std).astype(np.float32) for x in (train, *others)]


def _loss(params, x, y, weights, wd):
  ce = optax.softmax_cross_entropy_with_integer_labels(x @ params["w"] + params["b"], y)
  return jnp.sum(weights * ce) / jnp.sum(weights) + 0.5 * wd * jnp.sum(params["w"] ** 2)


@jax.jit
def _fit(x: jax.Array, y: jax.Array, weights: jax.Array, wd: jax.Array, params: dict, max_iters: jax.Array,
         tol: jax.Array):
  """L-BFGS from `params` on the penalised objective over the rows with weight 1 (0 = left out: the sweep's fits
  and the refit share one shape, so one compiled program); returns (params, iterations run, final gradient norm)."""
  fun = lambda p: _loss(p, x, y, weights, wd)
  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(fun)

  def step(carry):
    p, state = carry
    value, grad = value_and_grad(p, state=state)
    updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=fun)
    return optax.apply_updates(p, updates), state

  def cond(carry):
    _, state = carry
    k = optax.tree_utils.tree_get(state, "count")
    g = optax.tree_utils.tree_norm(optax.tree_utils.tree_get(state, "grad"))
    return (k == 0) | ((k < max_iters) & (g >= tol))

  params, state = jax.lax.while_loop(cond, step, (params, opt.init(params)))
  grad_norm = optax.tree_utils.tree_norm(jax.grad(fun)(params))
  return params, optax.tree_utils.tree_get(state, "count"), grad_norm


def fit_logistic(x: np.ndarray, y: np.ndarray, num_classes: int, weight_decay: float, *, init: dict | None = None,
                 rows: np.ndarray | None = None, max_iters: int = MAX_ITERS, tol: float = TOL) -> dict:
  """Multinomial logistic regression: x float32 [N, F] (standardised), y int [N] in [0, num_classes) ->
  {"w": float32 [F, C], "b": float32 [C]} minimising mean CE + wd / 2 ||w||^2 (from `init`, default zeros).
  rows: bool [N], fit on those rows only (default all)."""
  x = jnp.asarray(x, jnp.float32)
  if init is None:
    init = {"w": jnp.zeros((x.shape[1], num_classes), jnp.float32), "b": jnp.zeros((num_classes,), jnp.float32)}
  weights = jnp.ones(x.shape[0], jnp.float32) if rows is None else jnp.asarray(rows, jnp.float32)
  params, _, _ = _fit(x, jnp.asarray(y, jnp.int32), weights, jnp.float32(weight_decay), init, jnp.int32(max_iters),
                      jnp.float32(tol))
  return jax.tree.map(np.asarray, params)


def predict_logits(params: dict, x: np.ndarray) -> np.ndarray:
  """float32 [N, C] logits of a fitted head on standardised features x [N, F]."""
  return np.asarray(jnp.asarray(x, jnp.float32) @ params["w"] + params["b"])


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
  """Percent of rows whose label is among the k largest logits (ties to the lower class index)."""
  top = np.argsort(-np.asarray(logits), axis=1, kind="stable")[:, :k]
  return 100.0 * float((top == np.asarray(labels)[:, None]).any(axis=1).mean())


def _mean_ce(logits: np.ndarray, labels: np.ndarray) -> float:
  return float(optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(logits), jnp.asarray(labels)).mean())


def holdout_split(n: int, fraction: float = HOLDOUT_FRACTION, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """A fixed random (fit indices, held-out indices) split of range(n); at least one row on each side."""
  if n < 2:
    raise ValueError(f"the train split has {n} image(s); a linear probe needs at least 2 to hold one out")
  perm = np.random.default_rng(seed).permutation(n)
  m = min(max(1, round(n * fraction)), n - 1)
  return np.sort(perm[m:]), np.sort(perm[:m])


def sweep_weight_decay(x: np.ndarray, y: np.ndarray, num_classes: int,
                       weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS, *, holdout: float = HOLDOUT_FRACTION,
                       seed: int = 0, progress: bool = False) -> tuple[float, list[dict]]:
  """Fits one head per wd on (1 - holdout) of (x, y) and scores it on the rest. Returns (the wd with the best
  held-out top-1, ties broken by the lower held-out cross-entropy; the per-wd scores [{"weight_decay",
  "holdout_top1", "holdout_loss"}]). The fits run from the strongest penalty down, each warm-started."""
  fit_idx, held_idx = holdout_split(len(y), holdout, seed)
  rows = np.zeros(len(y), bool)
  rows[fit_idx] = True
  # all rows standardised with the fitted rows' statistics, in the refit's shape (one compiled program)
  x = np.asarray(x, np.float32)
  mean, std = x[fit_idx].mean(0), x[fit_idx].std(0)
  xs = (x - mean) / np.where(std < 1e-6, 1.0, std)
  y = np.asarray(y)
  scores, params = [], None
  for wd in tqdm(sorted(weight_decays, reverse=True), desc="weight decay sweep", disable=not progress, leave=False):
    params = fit_logistic(xs, y, num_classes, wd, init=params, rows=rows)
    logits = predict_logits(params, xs[held_idx])
    scores.append({"weight_decay": float(wd), "holdout_top1": topk_accuracy(logits, y[held_idx], 1),
                   "holdout_loss": _mean_ce(logits, y[held_idx])})
  best = max(scores, key=lambda s: (s["holdout_top1"], -s["holdout_loss"]))
  return best["weight_decay"], sorted(scores, key=lambda s: s["weight_decay"])


@dataclasses.dataclass
class ProbeResult:
  """top1 / top5 in percent on the test split (top5 None for <= 5 classes), the chosen weight decay, the sweep's
  scores and the test logits float32 [M, C]."""
  top1: float
  top5: float | None
  weight_decay: float
  sweep: list[dict]
  logits: np.ndarray


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 num_classes: int, weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS, *,
                 holdout: float = HOLDOUT_FRACTION, seed: int = 0, progress: bool = False) -> ProbeResult:
  """The whole probe: wd by the held-out sweep on the train split, then a refit on all of it (standardised with its
  statistics) and the test split scored. train_x [N, F], train_y int [N], test_x [M, F], test_y int [M]."""
  if len(weight_decays) == 1:
    wd, sweep = float(weight_decays[0]), []
  else:
    wd, sweep = sweep_weight_decay(train_x, train_y, num_classes, weight_decays, holdout=holdout, seed=seed,
                                   progress=progress)
  xtr, xte = standardize(train_x, test_x)
  params = fit_logistic(xtr, train_y, num_classes, wd)
  logits = predict_logits(params, xte)
  top5 = topk_accuracy(logits, test_y, 5) if num_classes > 5 else None
  return ProbeResult(topk_accuracy(logits, test_y, 1), top5, wd, sweep, logits)

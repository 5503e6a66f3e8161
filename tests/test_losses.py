"""Losses against direct NumPy statements of their formulas."""

import jax.numpy as jnp
import numpy as np

from internvl_jax import losses


def _unit(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _numpy_infonce(img, txt, scale):
  """-1/2B * sum_i [log softmax_j(s <img_i, txt_j>)_i + log softmax_j(s <img_j, txt_i>)_i]."""
  logits = scale * img @ txt.T
  def ce(lg):
    lg = lg - lg.max(axis=1, keepdims=True)
    logp = lg - np.log(np.exp(lg).sum(axis=1, keepdims=True))
    return -np.mean(np.diag(logp))
  return 0.5 * (ce(logits) + ce(logits.T))


def test_contrastive_loss_matches_numpy():
  rng = np.random.default_rng(0)
  img, txt = _unit(rng.normal(size=(6, 5))), _unit(rng.normal(size=(6, 5)))
  scale = np.exp(np.log(1 / 0.07))
  loss, m = losses.contrastive_loss(jnp.asarray(img), jnp.asarray(txt), jnp.asarray(scale))
  np.testing.assert_allclose(float(loss), _numpy_infonce(img, txt, scale), rtol=1e-5)
  np.testing.assert_allclose(float(m["logit_scale"]), scale, rtol=1e-6)


def test_contrastive_loss_perfect_alignment_is_small():
  e = np.eye(4, dtype=np.float32)
  loss, m = losses.contrastive_loss(jnp.asarray(e), jnp.asarray(e), jnp.asarray(100.0))
  assert float(loss) < 1e-6 and float(m["acc_i2t"]) == 1.0


def test_lm_loss_and_shift():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
  ids = rng.integers(0, 7, size=(2, 5))
  loss_mask = np.array([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]])
  targets, mask = losses.shift_for_next_token(jnp.asarray(ids), jnp.asarray(loss_mask))
  np.testing.assert_array_equal(np.asarray(targets)[:, :-1], ids[:, 1:])
  np.testing.assert_array_equal(np.asarray(mask), [[0, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
  loss, m = losses.lm_loss(jnp.asarray(logits), targets, mask)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  picked = np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]
  expected = -(picked * np.asarray(mask)).sum() / np.asarray(mask).sum()
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  assert float(m["tokens"]) == 6

"""train.py's in-loop retrieval R@1 is eval.py's evaluator (evaluate.retrieval with image groups): check it
against the brute-force same-key rule it replaced."""

import numpy as np

from internvl_jax.train import evaluation


def test_in_loop_r1_matches_same_key_argmax(rng):
  keys = ["a", "a", "b", "c", "b", "d", "e", "c"]
  img = rng.normal(size=(8, 6))
  txt = img + 0.9 * rng.normal(size=(8, 6))  # related but noisy: some hits, some misses
  img /= np.linalg.norm(img, axis=1, keepdims=True)
  txt /= np.linalg.norm(txt, axis=1, keepdims=True)
  sim, k = img @ txt.T, np.asarray(keys)
  want = {"i2t_r1": float(np.mean(k[np.argmax(sim, 1)] == k)), "t2i_r1": float(np.mean(k[np.argmax(sim, 0)] == k))}
  got = evaluation.retrieval_r1(img, txt, keys)
  assert 0 < want["i2t_r1"] < 1 or 0 < want["t2i_r1"] < 1  # the case is not trivial
  assert got == want

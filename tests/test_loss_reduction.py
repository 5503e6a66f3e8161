"""config.loss_reduction = token | sample | square (InternVL internvl_chat_finetune.len2weight: token weights 1,
1/n_i, 1/sqrt(n_i); loss = sum(w * ce) / sum(w)), against those formulas in numpy."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from internvl_jax import losses
from internvl_jax.data import demo, features, pipeline, tokenizer
from internvl_jax.train import config_checks, state as state_lib, steps

from conftest import tiny_config

HERE = os.path.dirname(os.path.abspath(__file__))


def _numpy_loss(logits, targets, mask, reduction):
  """The official formula: per-token CE, weight len2weight(n_i) on the counted tokens of example i."""
  logits = np.asarray(logits, np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  ce = -np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]
  mask = np.asarray(mask, bool)
  n = mask.sum(1)
  per = {"token": np.ones_like(n, float), "sample": 1.0 / np.maximum(n, 1),
         "square": 1.0 / np.sqrt(np.maximum(n, 1))}[reduction]
  w = np.where(mask, per[:, None], 0.0)
  return (ce * w).sum() / w.sum()


def _inputs():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(4, 7, 13)).astype(np.float32) * 3
  targets = rng.integers(0, 13, size=(4, 7))
  mask = np.zeros((4, 7), bool)
  mask[0, 2:3] = mask[1, 1:7] = mask[3, 0:3] = True  # 1, 6, 0 and 3 counted tokens
  return logits, targets, mask


@pytest.mark.parametrize("reduction", losses.LM_REDUCTIONS)
def test_lm_loss_reduction_matches_the_official_formula(reduction):
  logits, targets, mask = _inputs()
  loss, m = losses.lm_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask), reduction)
  np.testing.assert_allclose(float(loss), _numpy_loss(logits, targets, mask, reduction), rtol=1e-6)
  assert float(m["tokens"]) == 10


def test_the_reductions_differ_and_sample_is_the_mean_of_example_means():
  logits, targets, mask = _inputs()
  vals = {r: float(losses.lm_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask), r)[0])
          for r in losses.LM_REDUCTIONS}
  assert len({round(v, 5) for v in vals.values()}) == 3
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  ce = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  means = [ce[i][mask[i]].mean() for i in range(4) if mask[i].any()]  # the empty example does not count
  np.testing.assert_allclose(vals["sample"], np.mean(means), rtol=1e-6)


def test_instruct_loss_uses_config_loss_reduction():
  cfg = tiny_config("instruct", loss_reduction="square")
  tok = tokenizer.build_word_level(demo.DemoWorld("train", 64, 56).texts())
  config_checks.adapt_model_to_tokenizer(cfg, tok, built=True)
  spec = features.FeatureSpec("instruct", 56, cfg.data.max_text_len, tokens_per_tile=config_checks.tokens_per_tile(cfg))
  fn = features.make_feature_fn(spec, tok)
  world = demo.DemoWorld("train", 64, 56)
  batch = pipeline._stack([fn(world[i], None) for i in range(4)], 4)
  batch.pop("valid")
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  # answers of different lengths, so the reductions differ: count one more token in the first example
  lm = np.asarray(batch["loss_mask"]).copy()
  first = np.flatnonzero(lm[0])[0]
  lm[0, first - 1] = 1
  batch["loss_mask"] = jnp.asarray(lm)
  model = state_lib.model_factory("instruct", cfg.model, 0)()

  @nnx.jit
  def run(model, batch):  # one compiled program: the stage-3 loss and the logits it was computed from
    px = batch["pixel_values"]
    logits = model(batch["input_ids"], px.reshape((-1,) + px.shape[2:]), batch["attention_mask"]).logits
    return steps.instruct_loss_fn(model, batch, None, cfg)[0], logits

  loss, logits = run(model, batch)
  targets, mask = np.asarray(batch["input_ids"])[:, 1:], lm[:, 1:].astype(bool)
  expected = _numpy_loss(np.asarray(logits)[:, :-1], targets, mask, "square")
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  assert abs(expected - _numpy_loss(np.asarray(logits)[:, :-1], targets, mask, "token")) > 1e-4


def test_lm_loss_over_a_split_batch_is_normalised_over_the_global_batch():
  # under jit with the batch split over 4 devices the weights' sum is global: the official
  # loss_reduction_all_gather=True, not a per-device normalisation
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, os.path.join(HERE, "lm_loss_on_mesh.py")], capture_output=True, text=True,
                        env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  for r in losses.LM_REDUCTIONS:
    np.testing.assert_allclose(out[r], _numpy_loss(out["logits"], out["targets"], out["mask"], r), rtol=1e-6)
  # a per-device normalisation (each shard's weighted mean, averaged) would differ for 'token'
  logits, targets, mask = (np.asarray(out[k]) for k in ("logits", "targets", "mask"))
  per_shard = np.mean([_numpy_loss(logits[i:i + 2], targets[i:i + 2], mask[i:i + 2], "token")
                       for i in (0, 2, 4, 6)])
  assert abs(per_shard - out["token"]) > 1e-3

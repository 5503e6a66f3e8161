"""The sigmoid (SigLIP) loss against its formula written here in numpy and in jnp (value, metrics, gradients);
the model's logit bias exists only for config.loss='sigmoid' (SigLIP's initialisation t = 10, b = -10) so that
softmax models keep their parameter tree; the loss dispatch and the config checks of the new keys."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from internvl_jax import losses
from internvl_jax.train import config_checks, state as state_lib, steps


def _embeddings(b=6, e=5, seed=0):
  rng = np.random.default_rng(seed)
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  img, txt = unit(rng.normal(size=(b, e))), unit(rng.normal(size=(b, e)))
  txt[2] = img[2]  # one sure positive: the accuracies are compared on a non-zero value
  return img.astype(np.float32), txt.astype(np.float32)


def numpy_siglip(img, txt, t, b):
  """Zhai et al. 2023, float64: -sum_ij log sigmoid(z_ij (t <x_i, y_j> + b)) / B, z = 2 I - 1."""
  logits = t * img.astype(np.float64) @ txt.astype(np.float64).T + b
  z = 2 * np.eye(len(img)) - 1
  terms = np.logaddexp(0.0, -z * logits)  # -log sigmoid(x) = log(1 + exp(-x))
  return np.sum(terms) / len(img), logits, terms


@pytest.mark.parametrize("t,b", [(10.0, -10.0), (3.0, -1.0), (25.0, 2.0)])
def test_loss_and_metrics_equal_the_numpy_formula(t, b):
  img, txt = _embeddings()
  loss, m = losses.sigmoid_loss(jnp.asarray(img), jnp.asarray(txt), jnp.float32(t), jnp.float32(b))
  want, logits, terms = numpy_siglip(img, txt, t, b)
  np.testing.assert_allclose(float(loss), want, rtol=1e-6)
  n = len(img)
  np.testing.assert_allclose(float(m["loss_pos"]), np.trace(terms) / n, rtol=1e-6)
  np.testing.assert_allclose(float(m["loss_neg"]), (terms.sum() - np.trace(terms)) / n, rtol=1e-6)
  acc_i2t, acc_t2i = np.mean(np.argmax(logits, 1) == np.arange(n)), np.mean(np.argmax(logits, 0) == np.arange(n))
  np.testing.assert_allclose([float(m["acc_i2t"]), float(m["acc_t2i"])], [acc_i2t, acc_t2i], rtol=1e-6)
  assert acc_i2t > 0
  assert (float(m["logit_scale"]), float(m["logit_bias"])) == (t, b)


def test_gradients_equal_those_of_the_formula_in_jnp():
  img, txt = _embeddings(b=8, e=4, seed=3)

  def formula(x, y, t, b):  # the paper's formula, written independently of losses.py
    logits = t * x @ y.T + b
    z = 2 * jnp.eye(x.shape[0]) - 1
    return -jnp.sum(jax.nn.log_sigmoid(z * logits)) / x.shape[0]

  args = (jnp.asarray(img), jnp.asarray(txt), jnp.float32(7.0), jnp.float32(-4.0))
  got = jax.grad(lambda *a: losses.sigmoid_loss(*a)[0], argnums=(0, 1, 2, 3))(*args)
  want = jax.grad(formula, argnums=(0, 1, 2, 3))(*args)
  for g, w in zip(got, want):
    assert float(jnp.max(jnp.abs(w))) > 1e-3
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-7)
  # and one finite difference on the bias, in float64 numpy: d loss / d b
  eps = 1e-4
  fd = (numpy_siglip(img, txt, 7.0, -4.0 + eps)[0] - numpy_siglip(img, txt, 7.0, -4.0 - eps)[0]) / (2 * eps)
  np.testing.assert_allclose(float(got[3]), fd, rtol=1e-4)


def _model_params(make_config, **overrides):
  cfg = make_config("contrastive", **overrides)
  model_cfg = state_lib.run_model_config(cfg, cfg.model)
  model = nnx.eval_shape(state_lib.model_factory(cfg.task, model_cfg, 0))
  return {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}, model_cfg


def test_the_bias_parameter_exists_only_for_the_sigmoid_loss(make_config):
  softmax, _ = _model_params(make_config)
  sigmoid, model_cfg = _model_params(make_config, loss="sigmoid")
  assert sigmoid - softmax == {"logit_bias"}  # softmax models keep their tree: old checkpoints still fit
  np.testing.assert_allclose([model_cfg.logit_scale_init, model_cfg.logit_bias_init], [np.log(10.0), -10.0])
  # built under jit: the towers' initialisers are dead code there, only the loss parameters are computed
  scale, bias = jax.jit(lambda: state_lib.model_factory("contrastive", model_cfg, 0)().loss_params())()
  np.testing.assert_allclose([float(scale), float(bias)], [10.0, -10.0], rtol=1e-6)  # SigLIP: t = 10, b = -10
  # run_model_config is idempotent and keeps a bias init the model config already sets
  again = state_lib.run_model_config(make_config("contrastive", loss="sigmoid"), model_cfg)
  assert again.logit_bias_init == -10.0
  model_cfg.logit_bias_init, model_cfg.logit_scale_init = -5.0, 1.0
  custom = state_lib.run_model_config(make_config("contrastive", loss="sigmoid"), model_cfg)
  assert (custom.logit_bias_init, custom.logit_scale_init) == (-5.0, 1.0)


def test_dispatch_needs_the_bias_for_the_sigmoid_loss(make_config):
  img, txt = (jnp.asarray(a) for a in _embeddings())
  cfg = make_config("contrastive", loss="sigmoid")
  with pytest.raises(ValueError, match="logit bias"):
    steps._contrastive(img, txt, jnp.float32(10.0), cfg, None)
  loss, m = steps._contrastive(img, txt, jnp.float32(10.0), cfg, None, bias=jnp.float32(-10.0))
  np.testing.assert_allclose(float(loss), numpy_siglip(*_embeddings(), 10.0, -10.0)[0], rtol=1e-6)
  assert "logit_bias" in m
  soft, _ = steps._contrastive(img, txt, jnp.float32(10.0), make_config("contrastive"), None)
  np.testing.assert_allclose(float(soft), float(losses.contrastive_loss(img, txt, jnp.float32(10.0))[0]))


@pytest.mark.parametrize("overrides,match", [
    (dict(loss="hinge"), "config.loss"),
    (dict(unlock_last_n=1), "unlock_last_n"),
    (dict(lock_vision=True, unlock_last_n=-1), "unlock_last_n"),
    (dict(lock_text=True, unlock_last_n=3), "text tower's 2 layers"),
])
def test_config_errors_name_the_field(make_config, overrides, match):
  from internvl_jax import sharding
  cfg = make_config("contrastive", **overrides)
  with pytest.raises(config_checks.ConfigError, match=match):
    config_checks.validate(cfg, sharding.make_mesh(dict(cfg.mesh)))


def test_alignment_stage_uses_the_sigmoid_loss_with_the_model_bias(make_config):
  from conftest import demo_batch, demo_state_setup
  cfg = make_config("alignment", loss="sigmoid")
  setup, tok = demo_state_setup(cfg)
  state = setup.create()
  batch = demo_batch(cfg, tok, 0, cfg.batch_size)

  @jax.jit
  def run(state, batch):
    model = state_lib.merge_model(setup.graphdef, state)
    loss, m = steps.alignment_loss_fn(model, batch, None, cfg)
    img = model.encode_image(batch["pixel_values"])
    txt = model.encode_text(batch["input_ids"], batch["attention_mask"])
    return loss, m, img, txt

  loss, m, img, txt = run(state, batch)
  want = numpy_siglip(np.asarray(img), np.asarray(txt), 10.0, -10.0)[0]  # SigLIP's init t = 10, b = -10
  np.testing.assert_allclose(float(m["loss_contrastive"]), want, rtol=1e-5)
  np.testing.assert_allclose(float(loss), want + cfg.caption_weight * float(m["loss_caption"]), rtol=1e-5)
  assert float(m["logit_bias"]) == -10.0

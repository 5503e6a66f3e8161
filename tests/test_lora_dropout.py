"""LoRA dropout (models/lora.py), as peft's LoraConfig(lora_dropout=p): inverted dropout on the input of the
adapter branch only, in training only. References are numpy formulas written here with the mask drawn as the
module documents (bernoulli(fold_in(layer key, call index), 1 - p, x.shape))."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from internvl_jax.models import internvl, layers, lora, stack
from internvl_jax.train import config_checks, freezing

from conftest import tiny_config

P, RANK, ALPHA = 0.3, 3, 12.0


def _layer(rate=P):
  layer = layers.dense(6, 5, ("embed", "mlp"), lora=(RANK, ALPHA, rate), rngs=nnx.Rngs(0))
  layer.lora.lora_b[...] = jnp.asarray(np.random.default_rng(1).normal(size=(RANK, 5)).astype(np.float32))
  w, bias = np.asarray(layer.kernel[...], np.float64), np.asarray(layer.bias[...], np.float64)
  a, b = np.asarray(layer.lora.lora_a[...], np.float64), np.asarray(layer.lora.lora_b[...], np.float64)
  return layer, w, bias, a, b


X = np.random.default_rng(0).normal(size=(2, 4, 6)).astype(np.float32)


def test_train_mode_drops_the_adapter_input_only_and_rescales_by_one_over_keep():
  layer, w, bias, a, b = _layer()
  key = jax.random.key(7)
  with lora.dropout_scope(key):
    ours = np.asarray(layer(jnp.asarray(X)), np.float64)
  m = np.asarray(jax.random.bernoulli(jax.random.fold_in(key, 0), 1 - P, X.shape))
  assert 0 < m.mean() < 1
  x = X.astype(np.float64)
  ref = x @ w + bias + (ALPHA / RANK) * ((x * m / (1 - P)) @ a) @ b  # peft: lora_B(lora_A(dropout(x))) * scaling
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
  # the reference tells the wrong variants apart: dropout on the base path too, or no 1 / (1 - p)
  wrong_base = (x * m / (1 - P)) @ w + bias + (ALPHA / RANK) * ((x * m / (1 - P)) @ a) @ b
  wrong_scale = x @ w + bias + (ALPHA / RANK) * ((x * m) @ a) @ b
  assert np.abs(ours - wrong_base).max() > 1e-2 and np.abs(ours - wrong_scale).max() > 1e-2


def test_expected_branch_over_masks_is_the_undropped_branch():
  layer, w, bias, a, b = _layer(rate=0.5)
  graphdef, state = nnx.split(layer)

  def run(key):
    with lora.dropout_scope(key):
      return nnx.merge(graphdef, state)(jnp.asarray(X))

  outs = jax.vmap(run)(jax.random.split(jax.random.key(3), 4000))
  x = X.astype(np.float64)
  full = x @ w + bias + (ALPHA / RANK) * (x @ a) @ b
  branch = (ALPHA / RANK) * (x @ a) @ b
  err = np.abs(np.asarray(outs, np.float64).mean(0) - full).max()
  assert err < 0.05 * np.abs(branch).max(), err  # Monte Carlo, 4000 masks: unbiased only with the 1 / (1 - p)


def test_eval_mode_and_rate_zero_have_no_dropout():
  layer, w, bias, a, b = _layer()
  x = X.astype(np.float64)
  full = x @ w + bias + (ALPHA / RANK) * (x @ a) @ b
  np.testing.assert_allclose(np.asarray(layer(jnp.asarray(X))), full, rtol=1e-5, atol=1e-5)  # no scope: eval
  with lora.dropout_scope(None):
    np.testing.assert_array_equal(np.asarray(layer(jnp.asarray(X))), np.asarray(layer(jnp.asarray(X))))
  plain, *_ = _layer(rate=0.0)
  with lora.dropout_scope(jax.random.key(1)):
    trained = np.asarray(plain(jnp.asarray(X)))
  np.testing.assert_array_equal(trained, np.asarray(plain(jnp.asarray(X))))  # rate 0: bit-identical


def _chat(rate, scan=True, drop_path=0.0, llm_rank=4):
  cfg = tiny_config("instruct", use_llm_lora=llm_rank, use_backbone_lora=2, lora_dropout=rate,
                    **{"model.vision.drop_path_rate": drop_path, "model.vision.dropout": drop_path})
  model_cfg = freezing.model_config(cfg, cfg.model)
  model_cfg.language.scan_layers = model_cfg.vision.scan_layers = scan
  model = internvl.InternVLChat(model_cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(2)
  state = jax.tree_util.tree_map_with_path(  # random B: the adapters change the outputs
      lambda p, x: rng.normal(size=x.shape).astype(np.float32) * 0.3 if str(p[-1].key) == "lora_b" else np.asarray(x),
      nnx.to_pure_dict(nnx.state(model)))
  nnx.update(model, state)
  n = (56 // cfg.model.vision.patch_size // 2) ** 2
  ids = np.random.default_rng(0).integers(0, 40, (2, 12))
  ids[:, 2:2 + n] = cfg.model.image_token_id
  px = np.random.default_rng(1).normal(size=(2, 56, 56, 3)).astype(np.float32)
  return model, jnp.asarray(ids), jnp.asarray(px)


@nnx.jit
def _logits(model, ids, px, key):
  return model(ids, px, lora_key=key).logits


def test_chat_model_dropout_in_training_only():
  model, ids, px = _chat(0.5)
  key = jax.random.key(11)
  train, evaluate = np.asarray(_logits(model, ids, px, key)), np.asarray(_logits(model, ids, px, None))
  assert np.abs(train - evaluate).max() > 1e-3
  np.testing.assert_array_equal(train, np.asarray(_logits(model, ids, px, key)))  # same key, same masks
  assert np.abs(train - np.asarray(_logits(model, ids, px, jax.random.key(12)))).max() > 1e-3


@pytest.mark.slow
def test_scanned_and_looped_stacks_draw_the_same_masks():
  key = jax.random.key(11)
  model, ids, px = _chat(0.5)
  loop, *_ = _chat(0.5, scan=False)  # same weights: each layer's key is split(key, L)[i] either way
  np.testing.assert_allclose(np.asarray(_logits(loop, ids, px, key)), np.asarray(_logits(model, ids, px, key)),
                             rtol=1e-5, atol=1e-5)


def test_rate_zero_is_unchanged_and_the_lora_key_does_not_switch_on_the_vision_towers_drop_path():
  model, ids, px = _chat(0.0, drop_path=0.5)
  np.testing.assert_array_equal(np.asarray(_logits(model, ids, px, jax.random.key(1))),
                                np.asarray(_logits(model, ids, px, None)))
  with_drop_path, *_ = _chat(0.5, drop_path=0.5)
  without, *_ = _chat(0.5, drop_path=0.0)  # same weights; only the tower's (unused) drop-path / dropout differ
  np.testing.assert_array_equal(np.asarray(_logits(with_drop_path, ids, px, jax.random.key(1))),
                                np.asarray(_logits(without, ids, px, jax.random.key(1))))


def test_two_train_steps_with_the_official_rate():
  from test_freezing import _train

  cfg = tiny_config("instruct", use_llm_lora=4, freeze_llm=True, freeze_mlp=True, freeze_backbone=True,
                    lora_dropout=0.05, warmup_steps=0, lr=1e-2)
  _, state, before, after = _train(cfg, n_steps=2)
  assert int(state["step"]) == 2 and int(state["skipped"]) == 0
  assert any(not np.array_equal(before[p], after[p]) for p in before if "/lora/" in p)


def test_config_check_accepts_the_official_rate_and_refuses_one():
  with pytest.raises(config_checks.ConfigError, match="lora_dropout"):
    config_checks._finetune_fields(tiny_config("instruct", use_llm_lora=4, lora_dropout=1.0))
  config_checks._finetune_fields(tiny_config("instruct", use_llm_lora=4, lora_dropout=0.05))


def test_vision_adapters_get_their_own_per_layer_keys():
  model, ids, px = _chat(0.5, llm_rank=0)  # adapters on the vision tower only
  key = jax.random.key(5)
  assert np.abs(np.asarray(_logits(model, ids, px, key)) - np.asarray(_logits(model, ids, px, None))).max() > 1e-4

  @nnx.jit
  def first_layer(model, px, key):  # the tower's first block, and the same block by hand under split(key, L)[0]
    ours = model.vision(px, lora_key=key, num_layers=1).last_hidden_state
    with lora.dropout_scope(jax.random.split(key, model.config.vision.num_layers)[0]):
      by_hand = stack.layer_at(model.vision.blocks, 0)(model.vision.embeddings(px), jnp.float32(0.0), None)
    return ours, by_hand, model.vision(px, num_layers=1).last_hidden_state

  ours, by_hand, undropped = first_layer(model, px, key)
  np.testing.assert_allclose(np.asarray(ours), np.asarray(by_hand), rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(ours) - np.asarray(undropped)).max() > 1e-4


def test_mixed_dense_and_moe_stacks_drop_in_every_run_of_layers():
  from internvl_jax.models import llm, presets

  def decoder(scan, only_layer=None):  # only_layer: B non-zero in that layer only (layers count across stacks)
    cfg = presets.language_config(vocab_size=50, hidden_size=16, num_layers=3, num_heads=2, num_kv_heads=2,
                                  mlp_dim=32, num_experts=4, num_experts_per_tok=2, moe_mlp_dim=8,
                                  decoder_sparse_step=2, scan_layers=scan)  # dense, MoE, dense: three runs
    cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout = 2, 4.0, 0.5
    model = llm.Decoder(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(3)

    def fill(p, x):
      if str(p[-1].key) != "lora_b":
        return np.asarray(x)
      b = rng.normal(size=x.shape).astype(np.float32)
      if only_layer is not None:  # 'layers' holds the MoE layer (1), 'dense_layers' layers 0 and 2
        keep = {0: ("dense_layers", 0), 1: ("layers", 0), 2: ("dense_layers", 1)}[only_layer]
        b = b * np.asarray([(str(p[0].key), i) == keep for i in range(x.shape[0])], np.float32)[:, None, None]
      return b

    nnx.update(model, jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(nnx.state(model))))
    return model

  @nnx.jit
  def logits(model, ids, key):
    return model(ids, lora_key=key).logits

  ids = jnp.asarray(np.random.default_rng(0).integers(0, 50, (2, 7)))
  key = jax.random.key(4)
  train = np.asarray(logits(decoder(True), ids, key))
  np.testing.assert_allclose(np.asarray(logits(decoder(False), ids, key)), train, rtol=1e-5, atol=1e-5)
  for layer in range(3):  # adapters in that layer only: its run's dropout shows in the output
    model = decoder(True, layer)
    assert np.abs(np.asarray(logits(model, ids, key)) - np.asarray(logits(model, ids, None))).max() > 1e-4, layer


def test_gradients_in_train_mode_follow_the_same_mask():
  layer, w, bias, a, b = _layer()
  key = jax.random.key(9)
  g = np.random.default_rng(4).normal(size=(2, 4, 5))  # dL/dy of L = sum(y * g)
  graphdef, state = nnx.split(layer)

  def loss(x, st):
    with lora.dropout_scope(key):
      return jnp.sum(nnx.merge(graphdef, st)(x) * jnp.asarray(g, jnp.float32))

  dx, dstate = jax.grad(loss, argnums=(0, 1))(jnp.asarray(X), state)
  da = dstate["lora"]["lora_a"][...]
  m = np.asarray(jax.random.bernoulli(jax.random.fold_in(key, 0), 1 - P, X.shape)) / (1 - P)
  x, s = X.astype(np.float64), ALPHA / RANK
  np.testing.assert_allclose(np.asarray(dx), g @ w.T + s * ((g @ b.T) @ a.T) * m, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(da), s * np.einsum("bti,btr->ir", x * m, g @ b.T), rtol=1e-4, atol=1e-5)

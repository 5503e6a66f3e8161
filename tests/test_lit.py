"""LiT (locked-image tuning, Zhai et al. 2022) on the image-text stages: a locked tower gets no gradient and no
optimizer state and is bit-identical after training; with unlock_last_n its last N layers train and the rest stays
bit-identical; the parameter table counts the locked parameters; the sigmoid loss's t and b train and are logged."""

import jax
import numpy as np
import pytest
from conftest import demo_batch, demo_state_setup

from internvl_jax.train import defaults, freezing, state as state_lib, steps


def _flat(tree) -> dict:
  return {"/".join(freezing._keys(p)): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def _train(cfg, n_steps=3):
  """(state before, state after, metrics of each step) of n_steps on demo batches (the first step has lr 0)."""
  setup, tok = demo_state_setup(cfg)
  state = setup.create()
  before = {k: _flat(state[k]) for k in ("params", "frozen")}
  step = steps.make_train_step(setup, cfg)
  history = []
  for i in range(n_steps):
    state, m = step(state, demo_batch(cfg, tok, i * cfg.batch_size, cfg.batch_size))
    history.append({k: float(v) for k, v in m.items()})
  after = {k: _flat(state[k]) for k in ("params", "frozen")}
  return setup, before, after, state, history


@pytest.fixture(scope="module")
def locked_vision_sigmoid():
  from conftest import tiny_config
  return _train(tiny_config("contrastive", loss="sigmoid", lock_vision=True))


@pytest.fixture(scope="module")
def unlocked_last_layer():
  from conftest import tiny_config
  return _train(tiny_config("contrastive", lock_vision=True, lock_text=True, unlock_last_n=1))


def test_locked_tower_has_no_gradient_or_optimizer_state(locked_vision_sigmoid):
  setup, before, after, state, _ = locked_vision_sigmoid
  assert not any(k.startswith("vision/") for k in before["params"])
  assert any(k.startswith("vision/blocks/") for k in before["frozen"])
  assert not any("vision" in k for k in _flat(state["opt_state"]))  # Adam moments only for the trainable leaves
  table = freezing.parameter_table(setup.abstract["params"], setup.abstract["frozen"], setup.layer_masks)
  vision_row = next(line.split() for line in table.splitlines() if line.startswith("vision"))
  n_vision = sum(v.size for k, v in before["frozen"].items() if k.startswith("vision/"))
  assert vision_row[1] == "0" and vision_row[3] == f"{n_vision:,}"


def test_locked_tower_is_bit_identical_and_the_rest_trains(locked_vision_sigmoid):
  _, before, after, _, _ = locked_vision_sigmoid
  for k, v in before["frozen"].items():
    assert np.array_equal(after["frozen"][k], v), k
  moved = [k for k, v in before["params"].items() if not np.array_equal(after["params"][k], v)]
  assert "text_projection/kernel" in moved and "image_projection/linears/0/kernel" in moved
  assert any(k.startswith("text/layers/") for k in moved)


def test_sigmoid_scale_and_bias_train_and_are_logged(locked_vision_sigmoid):
  _, before, after, _, history = locked_vision_sigmoid
  assert set(after["params"]) >= {"logit_scale", "logit_bias"}
  np.testing.assert_allclose([history[0]["logit_scale"], history[0]["logit_bias"]], [10.0, -10.0], rtol=1e-6)
  assert after["params"]["logit_bias"] != before["params"]["logit_bias"]
  assert after["params"]["logit_scale"] != before["params"]["logit_scale"]
  # a step logs the t = exp(t') and b it used; the bias update of the last step changed them for the next
  assert history[-1]["logit_bias"] != history[0]["logit_bias"]
  assert all(np.isfinite(h["loss"]) and "loss_i2t" not in h for h in history)


def test_unlock_last_n_trains_only_the_last_layers(unlocked_last_layer):
  setup, before, after, _, _ = unlocked_last_layer
  stacks = {k for k in before["params"] if k.startswith(("vision/blocks/", "text/layers/"))}
  assert stacks and set(setup.layer_masks) == stacks
  for k in stacks:  # leading axis = layers: layer 0 of 2 locked, layer 1 trained
    assert np.array_equal(after["params"][k][0], before["params"][k][0]), k
  for k in ("vision/blocks/attn/qkv/kernel", "vision/blocks/mlp/fc1/kernel", "text/layers/attn/q/kernel",
            "text/layers/mlp/up/kernel"):
    assert not np.array_equal(after["params"][k][1], before["params"][k][1]), k
  # everything outside the layer stacks of a locked tower (embeddings, final norms) is frozen and unchanged
  assert {"vision/embeddings/position", "text/embed/embedding", "text/norm/scale"} <= set(before["frozen"])
  for k, v in before["frozen"].items():
    assert np.array_equal(after["frozen"][k], v), k
  assert not np.array_equal(after["params"]["text_projection/kernel"], before["params"]["text_projection/kernel"])
  table = freezing.parameter_table(setup.abstract["params"], setup.abstract["frozen"], setup.layer_masks)
  text_row = next(line.split() for line in table.splitlines() if line.startswith("text"))
  n_layer1 = sum(v[1].size for k, v in before["params"].items() if k.startswith("text/layers/"))
  assert text_row[1] == f"{n_layer1:,}"


def test_qllama_cross_attention_layers_follow_their_decoder_layer():
  cfg = defaults.base_config("contrastive", "tiny_internvl_c")
  cfg.model.text.num_layers, cfg.model.text.cross_attention_frequency = 4, 2  # cross-attention in layers 0 and 2
  cfg.lock_text, cfg.unlock_last_n = True, 2
  from internvl_jax import sharding
  setup = state_lib.setup_state(cfg, cfg.model, sharding.make_mesh(dict(cfg.mesh)))
  masks = setup.layer_masks
  assert masks["text/decoder/layers/attn/q/kernel"].tolist() == [False, False, True, True]
  assert masks["text/cross_attention/q/kernel"].tolist() == [False, True]
  assert "text/decoder/embed/embedding" in _flat(setup.abstract["frozen"])
  assert "text/query_tokens" in _flat(setup.abstract["frozen"])
  assert not any(k.startswith("vision/") for k in masks)

"""Sharded state, frozen vision, gradient accumulation, non-finite skipping, partial init."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from internvl_jax import sharding
from internvl_jax.train import checkpoint, config_checks, init_from, steps

from conftest import demo_batch, demo_state_setup, tiny_config


def _paths(tree):
  return ["/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in p)
          for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def test_frozen_vision_has_no_grads_or_optimizer_state():
  cfg = tiny_config("instruct")
  setup, tok = demo_state_setup(cfg)
  state = setup.create()
  assert "vision" not in state["params"] and "vision" in state["frozen"]
  assert not any("vision" in p for p in _paths(state["opt_state"]))
  before = jax.tree.map(np.asarray, state["frozen"])
  step = steps.make_train_step(setup, cfg)
  params0 = jax.tree.map(np.asarray, state["params"])
  for i in range(3):
    state, m = step(state, demo_batch(cfg, tok, 8 * i, 8))
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state["frozen"])):
    np.testing.assert_array_equal(a, np.asarray(b))  # bit-identical
  assert any(not np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(params0),
                                                                     jax.tree.leaves(state["params"])))


def test_grad_accumulation_equals_larger_batch_for_lm_loss():
  # every demo answer is one word + end-of-turn, so each micro-batch counts the same number of tokens and the
  # mean of the two micro-batch losses equals the loss of the joint batch
  big_cfg = tiny_config("instruct", batch_size=8, total_steps=4, warmup_steps=0, grad_clip=0.0)
  acc_cfg = tiny_config("instruct", batch_size=4, total_steps=8, warmup_steps=0, grad_clip=0.0,
                        grad_accum_steps=2)
  big, tok = demo_state_setup(big_cfg)
  acc, _ = demo_state_setup(acc_cfg)
  s_big, s_acc = big.create(), acc.create()
  batch = demo_batch(big_cfg, tok, 0, 8)
  half = lambda sl: {k: v[sl] for k, v in batch.items()}
  s_big, _ = steps.make_train_step(big, big_cfg)(s_big, batch)
  acc_step = steps.make_train_step(acc, acc_cfg)
  s_acc, _ = acc_step(s_acc, half(slice(0, 4)))
  s_acc, _ = acc_step(s_acc, half(slice(4, 8)))
  for a, b in zip(jax.tree.leaves(s_big["params"]), jax.tree.leaves(s_acc["params"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def test_non_finite_loss_skips_the_update():
  cfg = tiny_config("contrastive")
  setup, tok = demo_state_setup(cfg)
  state = setup.create()
  params0 = jax.tree.map(np.asarray, state["params"])
  batch = demo_batch(cfg, tok, 0, 8)
  batch["pixel_values"] = batch["pixel_values"].at[0, 0, 0, 0].set(jnp.nan)
  state, m = steps.make_train_step(setup, cfg)(state, batch)
  assert float(m["finite"]) == 0.0 and int(state["bad_steps"]) == 1 and int(state["skipped"]) == 1
  for a, b in zip(jax.tree.leaves(params0), jax.tree.leaves(state["params"])):
    np.testing.assert_array_equal(a, np.asarray(b))


def test_partial_init_from_a_smaller_model(tmp_path):
  small_cfg = tiny_config("contrastive")
  small, _ = demo_state_setup(small_cfg)
  src_state = small.create()
  ck = checkpoint.Checkpointer(str(tmp_path / "small"), async_save=False)
  ck.save(1, src_state, {})
  ck.close()
  big_cfg = tiny_config("contrastive")
  big_cfg.model.vision.num_layers = 3  # deeper: stacked [3, ...] vs [2, ...]
  big_cfg.model.vision.mlp_dim = 96  # wider MLP
  big_cfg.init.path, big_cfg.init.partial = str(tmp_path / "small"), True
  big, _ = demo_state_setup(big_cfg)
  state, rows = init_from.initialize(big.create(), big, big_cfg.init)
  status = {p: s for p, s, _ in rows}
  assert status["vision/blocks/mlp/fc1/kernel"] == "partial"  # [2, 32, 64] -> [3, 32, 96]
  assert status["vision/embeddings/patch/kernel"] == "copied"
  assert status["logit_scale"] == "copied"
  assert "fresh" not in status.values()
  fc1_new = np.asarray(state["params"]["vision"]["blocks"]["mlp"]["fc1"]["kernel"])
  fc1_old = np.asarray(src_state["params"]["vision"]["blocks"]["mlp"]["fc1"]["kernel"])
  np.testing.assert_array_equal(fc1_new[:2, :, :64], fc1_old)
  np.testing.assert_array_equal(np.asarray(state["params"]["text"]["embed"]["embedding"]),
                                np.asarray(src_state["params"]["text"]["embed"]["embedding"]))
  table = init_from.format_table(rows)
  assert "partial" in table and table.splitlines()[-1].startswith("init: ")
  big_cfg.init.partial = False
  with pytest.raises(ValueError, match=r"vision/blocks/.*init.partial=True"):
    init_from.initialize(big.create(), big, big_cfg.init)


def test_config_errors_name_the_field():
  cfg = tiny_config("contrastive")
  cfg.model.vision.num_heads = 3
  with pytest.raises(config_checks.ConfigError, match="model.vision.num_heads"):
    config_checks.validate(cfg, sharding.make_mesh())
  cfg = tiny_config("contrastive", batch_size=0)
  with pytest.raises(config_checks.ConfigError, match="config.batch_size"):
    config_checks.validate(cfg, sharding.make_mesh())
  cfg = tiny_config("contrastive")
  cfg.model.image_size = 50
  with pytest.raises(config_checks.ConfigError, match="model.image_size=50"):
    config_checks.validate(cfg, sharding.make_mesh())
  cfg = tiny_config("contrastive")
  cfg.mesh.data = 3
  with pytest.raises(config_checks.ConfigError, match="config.mesh"):
    config_checks.make_checked_mesh(cfg)
  # the batch splits over 'expert' too: 12 rows on fsdp 2 x expert 4 = 8 shards cannot
  cfg = tiny_config("contrastive", batch_size=12)
  abstract = jax.sharding.AbstractMesh((1, 2, 4, 1), sharding.MESH_AXES)
  with pytest.raises(config_checks.ConfigError, match=r"config.batch_size=12 .* 8 batch shards .*expert"):
    config_checks.validate(cfg, abstract)


def test_train_batches_split_over_data_fsdp_and_expert():
  assert steps.batch_sharding(sharding.make_mesh()).spec == P(("data", "fsdp", "expert"))

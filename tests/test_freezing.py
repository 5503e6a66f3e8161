"""Stage 3's official freezing switches: freeze_backbone / freeze_mlp / freeze_llm / unfreeze_lm_head /
unfreeze_vit_layers (InternVL internvl_chat_finetune.py), the partly trained vision stack and the table."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from internvl_jax import sharding
from internvl_jax.train import config_checks, freezing, steps

from conftest import demo_batch, demo_state_setup, tiny_config


def _flat(tree):
  return {"/".join(str(getattr(k, "key", k)) for k in p): np.asarray(v)
          for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def _train(cfg, n_steps=2):
  setup, tok = demo_state_setup(cfg)
  state = setup.create()
  before = {**_flat(state["params"]), **_flat(state["frozen"])}
  step = steps.make_train_step(setup, cfg)
  for i in range(n_steps):
    state, _ = step(state, demo_batch(cfg, tok, 8 * i, 8))
  after = {**_flat(state["params"]), **_flat(state["frozen"])}
  return setup, state, before, after


def test_frozen_groups_stay_bit_identical_and_unfreeze_vit_layers_trains_exactly_its_slice():
  # one run with every switch: vision frozen but its last layer (blocks[-1:]), projector and language frozen, head on
  cfg = tiny_config("instruct", freeze_backbone=True, unfreeze_vit_layers=-1, freeze_mlp=True, freeze_llm=True,
                    unfreeze_lm_head=True, warmup_steps=0)
  assert cfg.model.vision.num_layers == 2 and cfg.model.select_layer == -1 and not cfg.model.language.tie_embeddings
  setup, state, before, after = _train(cfg)
  blocks = [p for p in before if p.startswith("vision/blocks/")]
  assert set(_flat(state["params"])) == set(blocks) | {"language/lm_head/kernel"}
  for path in before:
    if path.startswith(("projector/", "language/")) and path != "language/lm_head/kernel":
      np.testing.assert_array_equal(before[path], after[path], err_msg=path)  # frozen: bit-identical
    if path.startswith("vision/") and path not in blocks:
      np.testing.assert_array_equal(before[path], after[path], err_msg=path)  # embeddings stay frozen
  assert not np.array_equal(before["language/lm_head/kernel"], after["language/lm_head/kernel"])
  moved_last = 0
  for path in blocks:
    np.testing.assert_array_equal(before[path][0], after[path][0], err_msg=path)  # layer 0: bit-identical
    moved_last += not np.array_equal(before[path][1], after[path][1])
  assert moved_last >= len(blocks) // 2  # the last layer trains (some scales may get a zero gradient)
  opt = _flat(state["opt_state"])
  assert not any(p.startswith(("projector", "language/layers")) or "/projector/" in p for p in opt)
  for path, v in opt.items():  # the frozen layer's Adam moments stay zero (no gradient reaches it)
    if "vision/blocks/" in path and v.ndim:
      assert not np.any(v[0]), path
  table = freezing.parameter_table(state["params"], state["frozen"], setup.layer_masks)
  vision = next(line for line in table.splitlines() if line.startswith("vision")).split()
  block_sizes = sum(before[p].size for p in blocks)
  embeddings = sum(v.size for p, v in before.items() if p.startswith("vision/") and p not in blocks)
  assert int(vision[1].replace(",", "")) == block_sizes // 2
  assert int(vision[3].replace(",", "")) == block_sizes // 2 + embeddings


@pytest.mark.parametrize("n, trained", [(-1, [3]), (-3, [1, 2, 3]), (1, [1, 2, 3]), (3, [3])])
def test_unfreeze_vit_layers_is_the_official_python_slice(n, trained):
  # official: vision_model.encoder.layers[unfreeze_vit_layers:] get requires_grad=True
  cfg = tiny_config("instruct", freeze_backbone=True, unfreeze_vit_layers=n)
  params = {"vision": {"blocks": {"attn": {"qkv": {"kernel": jax.ShapeDtypeStruct((4, 3, 9), jnp.float32),
                                                    "lora_a": jax.ShapeDtypeStruct((4, 3, 2), jnp.float32)}}}}}
  masks = freezing.layer_masks(cfg, params)
  assert list(masks) == ["vision/blocks/attn/qkv/kernel"]  # adapters train in every layer
  assert list(np.flatnonzero(masks["vision/blocks/attn/qkv/kernel"])) == trained == list(range(4))[n:]


def test_default_stage_config_still_freezes_the_vision_tower_through_model_freeze_vision():
  cfg = tiny_config("instruct")
  assert cfg.freeze_backbone is None and cfg.model.freeze_vision
  f = freezing.resolve(cfg)
  assert f.vision_base and not f.language_base and not f.projector
  freezing.prepare(cfg)
  assert cfg.freeze_backbone is True and cfg.model.freeze_vision and freezing.resolve(cfg) == f
  cfg = tiny_config("instruct", freeze_backbone=True, unfreeze_vit_layers=-1)
  freezing.prepare(cfg)  # vision partly trains: no stop_gradient on the tower, and prepare stays idempotent
  assert not cfg.model.freeze_vision and freezing.resolve(cfg).vision_base
  freezing.prepare(cfg)
  assert freezing.resolve(cfg).vision_base and freezing.resolve(cfg).vit_layers == -1


def test_bad_unfreeze_vit_layers_is_a_config_error():
  cfg = tiny_config("instruct", unfreeze_vit_layers=5)
  with pytest.raises(config_checks.ConfigError, match="unfreeze_vit_layers"):
    config_checks.validate(cfg, sharding.make_mesh(dict(cfg.mesh)))


def _trainable_paths(cfg):
  from flax import nnx

  from internvl_jax.models import internvl

  model = nnx.eval_shape(lambda: internvl.InternVLChat(freezing.model_config(cfg, cfg.model), rngs=nnx.Rngs(0)))
  params = nnx.to_pure_dict(nnx.state(model, freezing.trainable_filter(cfg)))
  return {"/".join(str(getattr(k, "key", k)) for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(params)}


def test_unfreeze_lm_head_under_llm_lora_and_with_tied_embeddings():
  # peft's get_peft_model freezes the whole language model, lm_head included; unfreeze_lm_head trains it again
  lora_paths = _trainable_paths(tiny_config("instruct", use_llm_lora=2))
  assert "language/lm_head/kernel" not in lora_paths and "language/embed/embedding" not in lora_paths
  assert "language/lm_head/kernel" in _trainable_paths(tiny_config("instruct", use_llm_lora=2, unfreeze_lm_head=True))
  # tied embeddings: the head is the embedding table
  cfg = tiny_config("instruct", freeze_llm=True, unfreeze_lm_head=True, **{"model.language.tie_embeddings": True})
  paths = _trainable_paths(cfg)
  assert "language/embed/embedding" in paths and not any(p.startswith("language/layers") for p in paths)
  cfg = tiny_config("instruct", freeze_llm=True, **{"model.language.tie_embeddings": True})
  assert not any(p.startswith("language/") for p in _trainable_paths(cfg))

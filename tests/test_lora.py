"""LoRA (models/lora.py on flax.nnx.LoRA) on the language model and the vision tower of stage 3: the adapter
formula, peft's initialisation, the stacked / sharded adapter parameters, merging, training only the adapters,
and parity with peft on a transformers Qwen2 model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from internvl_jax.models import internvl, layers, lora
from internvl_jax.train import freezing

import hf_refs
from conftest import tiny_config


def test_lora_linear_is_w_x_plus_scaled_b_a_x_and_starts_as_the_base():
  layer = layers.dense(6, 5, ("embed", "mlp"), lora=(3, 12.0), rngs=nnx.Rngs(0))
  assert isinstance(layer, lora.LoRALinear)
  a, b = np.asarray(layer.lora.lora_a[...]), np.asarray(layer.lora.lora_b[...])
  assert a.shape == (6, 3) and b.shape == (3, 5) and not b.any()  # peft: B = 0
  assert np.abs(a).max() <= 1 / np.sqrt(6) and np.abs(a).max() > 0.5 / np.sqrt(6)  # peft: U(+-1/sqrt(in))
  x = np.random.default_rng(0).normal(size=(2, 4, 6)).astype(np.float32)
  w, bias = np.asarray(layer.kernel[...]), np.asarray(layer.bias[...])
  np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x))), x @ w + bias, atol=1e-6)
  b = np.random.default_rng(1).normal(size=(3, 5)).astype(np.float32)
  layer.lora.lora_b[...] = jnp.asarray(b)
  np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x))), x @ w + bias + (12.0 / 3) * (x @ a) @ b,
                             rtol=1e-5, atol=1e-5)


def _lora_chat(rank=4, vision_rank=2, seed=0, abstract=False):
  cfg = tiny_config("instruct", use_llm_lora=rank, use_backbone_lora=vision_rank)
  make = lambda: internvl.InternVLChat(freezing.model_config(cfg, cfg.model), rngs=nnx.Rngs(seed))
  return (nnx.eval_shape(make) if abstract else make()), cfg


def test_adapters_are_stacked_with_logical_names_and_are_the_only_trainable_weights_of_the_towers():
  model, cfg = _lora_chat(abstract=True)
  specs = nnx.get_partition_spec(nnx.state(model))
  q = model.language.layers.attn.q.lora
  assert q.lora_a.shape == (cfg.model.language.num_layers, cfg.model.language.hidden_size, 4)
  assert tuple(specs["language"]["layers"]["attn"]["q"]["lora"]["lora_a"].get_value()) == ("layers", "embed", None)
  assert tuple(specs["language"]["layers"]["attn"]["q"]["lora"]["lora_b"].get_value()) == ("layers", None, "heads")
  assert tuple(specs["vision"]["blocks"]["attn"]["qkv"]["lora"]["lora_b"].get_value()) == ("layers", None, "qkv")
  params = nnx.to_pure_dict(nnx.state(model, freezing.trainable_filter(cfg)))
  flat = jax.tree_util.tree_leaves_with_path(params)
  paths = ["/".join(str(getattr(k, "key", k)) for k in p) for p, _ in flat]
  targets = {p.rsplit("/lora/", 1)[0] for p in paths if "/lora/" in p}
  assert targets == {f"language/layers/{m}" for m in ("attn/q", "attn/k", "attn/v", "attn/o", "mlp/gate", "mlp/up",
                                                      "mlp/down")} | {
      f"vision/blocks/{m}" for m in ("attn/qkv", "attn/proj", "mlp/fc1", "mlp/fc2")}
  assert all(p.startswith("projector/") or "/lora/" in p for p in paths)  # base weights frozen, as peft does


def _chat_inputs(cfg):
  n = (56 // cfg.model.vision.patch_size // 2) ** 2
  ids = np.random.default_rng(0).integers(0, 40, (2, 12))
  ids[:, 2:2 + n] = cfg.model.image_token_id
  px = np.random.default_rng(1).normal(size=(2, 56, 56, 3)).astype(np.float32)
  return jnp.asarray(ids), jnp.asarray(px)


@nnx.jit
def _logits(model, ids, px):
  return model(ids, px).logits


def test_merging_the_adapters_gives_the_same_logits_and_zero_b_gives_the_base_model():
  model, cfg = _lora_chat()
  ids, px = _chat_inputs(cfg)
  state = nnx.to_pure_dict(nnx.state(model))
  merged_zero, plain_cfg = lora.merge_chat_params(jax.tree.map(np.asarray, state), model.config)
  plain = internvl.InternVLChat(plain_cfg, rngs=nnx.Rngs(5))
  nnx.update(plain, merged_zero)
  np.testing.assert_allclose(np.asarray(_logits(model, ids, px)), np.asarray(_logits(plain, ids, px)), atol=1e-6)
  rng = np.random.default_rng(2)
  state = jax.tree_util.tree_map_with_path(  # random B everywhere: the adapters now change the outputs
      lambda p, x: rng.normal(size=x.shape).astype(np.float32) * 0.3 if str(p[-1].key) == "lora_b" else np.asarray(x),
      state)
  nnx.update(model, state)
  merged, _ = lora.merge_chat_params(state, model.config)
  nnx.update(plain, merged)
  ours, ref = np.asarray(_logits(model, ids, px)), np.asarray(_logits(plain, ids, px))
  base = np.asarray(_logits(internvl.InternVLChat(plain_cfg, rngs=nnx.Rngs(0)), ids, px))
  assert np.abs(ours - base).max() > 1e-2
  np.testing.assert_allclose(ours, ref, atol=2e-5 * np.abs(ref).max())


def test_training_with_lora_changes_only_the_adapters():
  from test_freezing import _train

  cfg = tiny_config("instruct", use_llm_lora=4, use_backbone_lora=2, freeze_mlp=True, warmup_steps=0, lr=1e-2)
  _, state, before, after = _train(cfg, n_steps=2)
  assert not freezing.model_config(cfg, cfg.model).freeze_vision  # the tower's adapters need its backward pass
  adapters = [p for p in before if "/lora/" in p]
  trained = ["/".join(str(k.key) for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(state["params"])]
  assert sorted(adapters) == sorted(trained)
  for path in before:
    if path not in adapters:
      np.testing.assert_array_equal(before[path], after[path], err_msg=path)  # base: bit-identical
  for path in adapters:
    assert not np.array_equal(before[path], after[path]), path  # B moves at step 1, A once B is non-zero


PEFT_TARGETS = {"q_proj": "attn/q", "k_proj": "attn/k", "v_proj": "attn/v", "o_proj": "attn/o",
                "gate_proj": "mlp/gate", "up_proj": "mlp/up", "down_proj": "mlp/down"}


def test_lora_language_model_matches_peft_on_a_transformers_qwen2(tmp_path):
  peft = pytest.importorskip("peft")
  from internvl_jax import convert
  from internvl_jax.models import llm

  rank, alpha = 4, 8.0  # the official lora_alpha = 2 * r
  ref = hf_refs.causal_lm(hf_refs.QWEN2, str(tmp_path))
  base = convert.load_pretrained(str(tmp_path))
  ref = peft.get_peft_model(ref, peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                                 target_modules=list(PEFT_TARGETS)))
  g = torch.Generator().manual_seed(3)
  adapters = {}
  with torch.no_grad():
    for name, module in ref.named_modules():
      if hasattr(module, "lora_B") and "default" in module.lora_B:
        a = module.lora_A["default"].weight
        assert float(a.abs().max()) <= 1 / np.sqrt(a.shape[1])  # peft's A: U(+-1/sqrt(in)), as ours
        module.lora_B["default"].weight.copy_(torch.randn(module.lora_B["default"].weight.shape, generator=g) * 0.2)
        layer, target = int(name.split(".layers.")[1].split(".")[0]), PEFT_TARGETS[name.rsplit(".", 1)[1]]
        adapters[(target, layer)] = (a.numpy().T.copy(), module.lora_B["default"].weight.numpy().T.copy())
  cfg = base.config.copy_and_resolve_references()
  cfg.lora_rank, cfg.lora_alpha = rank, alpha
  ours = llm.Decoder(cfg, rngs=nnx.Rngs(0))
  state = nnx.to_pure_dict(nnx.state(ours))
  base_state = nnx.to_pure_dict(nnx.state(base))
  n_layers = cfg.num_layers
  assert len(adapters) == 7 * n_layers

  def fill(path, x):
    keys = [str(k.key) for k in path]
    if keys[-1] in ("lora_a", "lora_b"):
      target = "/".join(keys[1:3])
      return np.stack([adapters[(target, i)][keys[-1] == "lora_b"] for i in range(n_layers)])
    node = base_state
    for k in keys:
      node = node[k]
    return np.asarray(node)

  nnx.update(ours, jax.tree_util.tree_map_with_path(fill, state))
  ids, mask = hf_refs.prompts(pad=True)
  want = hf_refs.torch_logits(ref, ids, mask)
  got = np.asarray(ours(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits)
  real = mask.astype(bool)
  err, rel = hf_refs.errors(got[real], want[real])
  with ref.disable_adapter():
    without = hf_refs.torch_logits(ref, ids, mask)
  assert np.abs(want - without)[real].max() > 0.05  # the adapters matter
  print(f"LoRA vs peft logits: max abs err {err:.2e}, relative {rel:.2e}")
  assert rel < 1e-5, (err, rel)


def test_adapters_map_to_the_mesh_like_their_base_kernel():
  # A [L, in, r] splits over the base kernel's input axis, B [L, r, out] over its output axis; 'layers' and the
  # rank stay whole (mesh axes of the logical-axis table, before dropping axes of size 1)
  from internvl_jax import sharding

  model, _ = _lora_chat(abstract=True)
  specs = nnx.to_pure_dict(sharding.param_specs(nnx.state(model)))
  attn, mlp = specs["language"]["layers"]["attn"], specs["language"]["layers"]["mlp"]
  assert tuple(attn["q"]["kernel"]) == (None, "fsdp", "tensor")
  assert tuple(attn["q"]["lora"]["lora_a"]) == (None, "fsdp", None)
  assert tuple(attn["q"]["lora"]["lora_b"]) == (None, None, "tensor")
  assert tuple(mlp["down"]["lora"]["lora_a"]) == (None, "tensor", None)
  assert tuple(mlp["down"]["lora"]["lora_b"]) == (None, None, "fsdp")

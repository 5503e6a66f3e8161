"""LoRA runs out (convert/peft_export.py): merged weights that transformers loads, and a peft adapter folder that
`PeftModel.from_pretrained` puts on transformers' InternVL with the same logits as ours (peft is the reference)."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from peft import PeftModel
from transformers import InternVLForConditionalGeneration

from conftest import tiny_config
from internvl_jax import convert
from internvl_jax.convert import __main__ as cli
from internvl_jax.convert import peft_export
from internvl_jax.models import internvl
from internvl_jax.train import freezing

IMG = 127  # the tiny chat preset's image token


def _inputs(cfg):
  rng = np.random.default_rng(0)
  per_tile = (cfg.model.vision.image_size // cfg.model.vision.patch_size // 2) ** 2
  ids = rng.integers(1, 100, (2, 10))
  ids[:, 1:1 + per_tile] = IMG
  pixels = rng.standard_normal((2, cfg.model.vision.image_size, cfg.model.vision.image_size, 3)).astype(np.float32)
  return ids, pixels


def _torch_logits(model, ids, pixels):
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2)).logits


@pytest.fixture(scope="module")
def lora_chat():
  """A tiny chat model with LoRA on both towers (ranks 4 / 2, alphas 8 / 4, so peft needs a rank pattern), its
  adapters' B random (a trained run's), and a projector that differs from the base (trained in full)."""
  cfg = tiny_config("instruct", use_llm_lora=4, use_backbone_lora=2)
  model = internvl.InternVLChat(freezing.model_config(cfg, cfg.model), rngs=nnx.Rngs(0))
  base = peft_export.without_adapters(model)
  rng = np.random.default_rng(1)
  state = nnx.state(model, nnx.Param)
  for path, var in nnx.to_flat_state(state):
    if str(path[-1]) == "lora_b" or str(path[0]) == "projector":
      var.set_value(jnp.asarray(rng.normal(0, 0.05, var.get_value().shape), jnp.float32))
  nnx.update(model, state)
  return model, base, cfg


def test_merged_model_computes_the_lora_model(lora_chat, tmp_path):
  model, _, cfg = lora_chat
  ids, pixels = _inputs(cfg)
  ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(pixels)).logits)
  plain = peft_export.merged(model)
  assert not peft_export.has_lora(plain) and peft_export.has_lora(model)
  np.testing.assert_allclose(np.asarray(plain(jnp.asarray(ids), jnp.asarray(pixels)).logits), ours, rtol=1e-5,
                             atol=1e-5)
  convert.save_pretrained(plain, str(tmp_path / "merged"))
  theirs = _torch_logits(InternVLForConditionalGeneration.from_pretrained(str(tmp_path / "merged")), ids, pixels)
  np.testing.assert_allclose(theirs.numpy(), ours, rtol=1e-4, atol=1e-5)


def test_peft_loads_the_adapter_onto_the_base_with_our_logits(lora_chat, tmp_path):
  model, base, cfg = lora_chat
  base_dir, adapter_dir = str(tmp_path / "base"), str(tmp_path / "adapter")
  convert.save_pretrained(base, base_dir)
  written = peft_export.write_adapter(model, adapter_dir, full_groups=("model.multi_modal_projector",),
                                      base_model=base_dir)
  assert sorted(written) == sorted(os.listdir(adapter_dir))
  ids, pixels = _inputs(cfg)
  ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(pixels)).logits)
  torch_base = InternVLForConditionalGeneration.from_pretrained(base_dir)
  before = _torch_logits(torch_base, ids, pixels).numpy()
  assert np.abs(before - ours).max() > 1e-3  # the adapters and the projector matter
  peft_model = PeftModel.from_pretrained(torch_base, adapter_dir).eval()
  got = _torch_logits(peft_model, ids, pixels).numpy()
  err = np.abs(got - ours).max() / np.abs(ours).max()
  print(f"peft adapter vs ours: max rel {err:.2e}")
  assert err < 1e-5
  # peft adapted exactly our modules: 7 per language layer, q / k / v / projection_layer / fc1 / fc2 per vision one
  lm, vit = cfg.model.language.num_layers, cfg.model.vision.num_layers
  adapted = [n for n, _ in peft_model.named_modules() if n.endswith(".lora_A")]
  assert len(adapted) == 7 * lm + 6 * vit


def test_adapter_export_refuses_what_it_cannot_express(lora_chat, tmp_path):
  cfg = tiny_config("instruct", use_llm_lora=4)
  full = freezing.resolve(tiny_config("instruct"))  # no LoRA: the language model trained in full
  with pytest.raises(convert.configs.ConversionError, match="whole language model"):
    peft_export.full_groups_of(full)
  assert peft_export.full_groups_of(freezing.resolve(cfg)) == ("model.multi_modal_projector",)
  with pytest.raises(convert.configs.ConversionError, match="needs a chat model trained with LoRA"):
    peft_export.write_adapter(lora_chat[1], str(tmp_path / "x"))


@pytest.mark.slow  # a tiny LoRA stage 3 for 2 steps, then two exports (~1-2 min on 2 cores)
def test_a_lora_workdir_exports_merged_and_as_a_peft_adapter(tmp_path):
  from internvl_jax.evaluate import models
  from internvl_jax.train import loop
  workdir = str(tmp_path / "run")
  cfg = tiny_config("instruct", total_steps=2, use_llm_lora=4, freeze_mlp=True, lr=1e-2,
                    **{"data.eval.size": 8})
  loop.run(cfg, workdir)  # the base: the run's seeded initialisation (no init.path)
  trained = models.load_workdir(workdir, "caption")
  assert peft_export.has_lora(trained.model)
  base_dir = str(tmp_path / "base")
  convert.save_pretrained(peft_export.without_adapters(trained.model), base_dir)
  merged_dir, adapter_dir = str(tmp_path / "merged"), str(tmp_path / "adapter")
  assert cli.main(["export", workdir, merged_dir]) == 0
  assert cli.main(["export", workdir, adapter_dir, "--adapter_only"]) == 0
  ids = np.asarray([trained.chat.input_ids("what colour is the circle ?", [1])])
  size = trained.chat.image_size
  pixels = np.random.default_rng(0).standard_normal((1, size, size, 3)).astype(np.float32)
  ours = np.asarray(trained.model(jnp.asarray(ids), jnp.asarray(pixels)).logits)
  merged = _torch_logits(InternVLForConditionalGeneration.from_pretrained(merged_dir), ids, pixels).numpy()
  np.testing.assert_allclose(merged, ours, rtol=1e-4, atol=1e-5)
  base = InternVLForConditionalGeneration.from_pretrained(base_dir)
  assert np.abs(_torch_logits(base, ids, pixels).numpy() - ours).max() > 1e-4  # the adapters were trained
  peft_model = PeftModel.from_pretrained(base, adapter_dir)
  np.testing.assert_allclose(_torch_logits(peft_model.eval(), ids, pixels).numpy(), ours, rtol=1e-4, atol=1e-5)

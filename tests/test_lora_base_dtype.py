"""config.lora_base_dtype='bfloat16': a LoRA run holds its frozen variables (the base) in bfloat16, its adapters,
trained groups and optimizer state in float32; training moves only the adapters, the planner counts the halved
base, and resuming (the base rebuilt from config.init.path) stays exact."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from internvl_jax import plan
from internvl_jax.models import lora
from internvl_jax.train import checkpoint, config_checks, freezing, loop, state as state_lib
from test_freezing import _train


def _dtypes(tree) -> set:
  return {np.dtype(x.dtype).name for x in jax.tree.leaves(tree)}


def test_the_base_is_bfloat16_and_training_moves_only_the_adapters():
  cfg = tiny_config("instruct", use_llm_lora=4, use_backbone_lora=2, freeze_mlp=True, warmup_steps=0, lr=1e-2,
                    lora_base_dtype="bfloat16")
  setup, state, before, after = _train(cfg, n_steps=2)
  assert _dtypes(state["frozen"]) == {"bfloat16"}  # every frozen variable: a base of floats only
  assert _dtypes(state["params"]) == {"float32"} and _dtypes(state["opt_state"]) <= {"float32", "int32"}
  assert _dtypes(setup.abstract["frozen"]) == {"bfloat16"}
  trained = {"/".join(str(k.key) for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(state["params"])}
  assert trained and all("/lora/" in p for p in trained)
  for path in before:
    if path in trained:
      assert not np.array_equal(before[path], after[path]), path
    else:
      assert after[path].dtype == jnp.bfloat16
      np.testing.assert_array_equal(before[path], after[path], err_msg=path)  # the base: bit-identical


def test_the_planner_counts_half_the_frozen_bytes_and_configs_are_checked():
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
  sizes = {}
  for base in ("float32", "bfloat16"):
    cfg = tiny_config("instruct", use_llm_lora=4, lora_base_dtype=base)
    setup = state_lib.setup_state(cfg, cfg.model, mesh)
    sizes[base] = {k: plan.per_device_bytes(setup.abstract[k], setup.shardings[k]) for k in ("frozen", "params",
                                                                                            "opt_state")}
  assert sizes["bfloat16"]["frozen"] * 2 == sizes["float32"]["frozen"] > 0
  for k in ("params", "opt_state"):
    assert sizes["bfloat16"][k] == sizes["float32"][k]
  with pytest.raises(config_checks.ConfigError, match="lora_base_dtype.*use_llm_lora"):
    config_checks._finetune_fields(tiny_config("instruct", lora_base_dtype="bfloat16"))
  with pytest.raises(config_checks.ConfigError, match="lora_base_dtype='float16' must be one of"):
    config_checks._finetune_fields(tiny_config("instruct", use_llm_lora=2, lora_base_dtype="float16"))
  assert freezing.frozen_dtype(tiny_config("instruct", use_llm_lora=2)) is None


def test_a_bfloat16_base_merges_into_float32_kernels():
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(6, 5)).astype(jnp.bfloat16)
  a, b = rng.normal(size=(6, 2)).astype(np.float32), rng.normal(size=(2, 5)).astype(np.float32)
  merged = lora.merge_params({"q": {"kernel": kernel, "lora": {"lora_a": a, "lora_b": b}}}, 0.5)["q"]["kernel"]
  assert merged.dtype == np.float32
  np.testing.assert_allclose(merged, kernel.astype(np.float64) + 0.5 * a.astype(np.float64) @ b, rtol=1e-6)


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f)}


@pytest.mark.slow  # three tiny runs (base, LoRA, resumed LoRA) and two exports: ~2-3 min on 2 cores
def test_a_bfloat16_base_run_resumes_exactly_and_exports_float32(tmp_path):
  base = str(tmp_path / "base")
  cfg = tiny_config("instruct", total_steps=1)
  cfg.data.eval.source = ""
  loop.run(cfg, base)
  cfg = tiny_config("instruct", total_steps=4, checkpoint_every=2, use_llm_lora=4, warmup_steps=0, lr=1e-2,
                    lora_base_dtype="bfloat16", **{"init.path": base})
  cfg.data.eval.source = ""
  straight = str(tmp_path / "straight")
  loop.run(cfg, straight)
  resumed = str(tmp_path / "resumed")
  shutil.copytree(straight, resumed)
  shutil.rmtree(os.path.join(checkpoint.checkpoint_dir(resumed), "4"))
  for name in ("final_metrics.json", "metrics.jsonl"):
    os.remove(os.path.join(resumed, name))
  assert loop.run(cfg, resumed)["step"] == 4
  a, b = _losses(straight), _losses(resumed)
  assert sorted(b) == [3, 4] and all(a[s] == b[s] for s in b), (a, b)  # bit-identical
  params, _ = checkpoint.read_params(straight)  # the base rebuilt: the init.path weights rounded to bfloat16
  pbase, _ = checkpoint.read_params(base)
  emb = params["language"]["embed"]["embedding"]
  assert emb.dtype == jnp.bfloat16
  np.testing.assert_array_equal(emb, pbase["language"]["embed"]["embedding"].astype(jnp.bfloat16))

  # exported merged or as a peft adapter: float32 folders (the bfloat16 base upcast exactly), our logits in torch
  import torch
  from peft import PeftModel
  from transformers import InternVLForConditionalGeneration

  from internvl_jax import convert
  from internvl_jax.convert import __main__ as cli, peft_export
  from internvl_jax.evaluate import models
  trained = models.load_workdir(straight, "instruct")
  base_dir, merged_dir, adapter_dir = (str(tmp_path / n) for n in ("base_hf", "merged", "adapter"))
  convert.save_pretrained(peft_export.without_adapters(trained.model), base_dir)
  assert cli.main(["export", straight, merged_dir]) == 0
  assert cli.main(["export", straight, adapter_dir, "--adapter_only"]) == 0
  ids = np.asarray([trained.chat.input_ids("what colour is the circle ?", [1])])
  size = trained.chat.image_size
  pixels = np.random.default_rng(0).standard_normal((1, size, size, 3)).astype(np.float32)
  ours = np.asarray(trained.model(jnp.asarray(ids), jnp.asarray(pixels)).logits)
  torch_in = dict(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2))
  for folder, adapter in ((merged_dir, None), (base_dir, adapter_dir)):
    with open(os.path.join(folder, "config.json")) as f:
      assert json.load(f)["dtype"] == "float32"
    ref = InternVLForConditionalGeneration.from_pretrained(folder)
    ref = PeftModel.from_pretrained(ref, adapter) if adapter else ref
    with torch.no_grad():
      got = ref.eval()(**torch_in).logits.numpy()
    np.testing.assert_allclose(got, ours, rtol=1e-4, atol=1e-5)

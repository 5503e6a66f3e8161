"""configs/finetune.py: the official 2nd-finetune recipes on a released folder (tests/release_folders.py), and the
whole loop once: a release in (OpenGVLab layout), LoRA on official-format data, a peft adapter out that peft puts
on the transformers-native export of the same release with our fine-tuned logits."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import release_folders
from conftest import load_config_file
from internvl_jax import convert

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _finetune_config(arg):
  return load_config_file("finetune", arg)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
  return release_folders.internvl2_1b(str(tmp_path_factory.mktemp("internvl2_1b")))[0]


def test_lora_and_full_recipes_on_a_preset():
  c = _finetune_config("model=internvl3_5_8b")
  assert (c.use_llm_lora, c.freeze_llm, c.freeze_mlp, c.freeze_backbone, c.lr) == (16, True, True, True, 4e-5)
  assert c.lora_dropout == 0.05
  assert (c.data.max_dynamic_patch, c.data.max_tiles, c.data.max_text_len) == (6, 7, 8192)
  assert c.model.language.dtype == "bfloat16" and c.model.language.remat == "full"
  assert c.batch_size * c.grad_accum_steps == 128
  c.total_steps = 8000
  assert c.warmup_steps == 8000 * 3 // (100 * 8)  # 3% of the optimizer updates, following total_steps
  full = _finetune_config("model=internvl3_5_8b,lora=0")
  assert (full.use_llm_lora, full.freeze_llm, full.freeze_mlp, full.lr, full.data.max_dynamic_patch) == (
      0, False, False, 2e-5, 12)
  with pytest.raises(ValueError, match="exactly one of path="):
    _finetune_config("lora=8")


def test_a_released_folder_brings_model_tokenizer_and_template(release):
  c = _finetune_config(f"path={release},lora=4")
  loaded = convert.load_pretrained(release).config
  for tower in ("vision", "language"):
    for key in ("hidden_size", "num_layers", "num_heads"):
      assert c.model[tower][key] == loaded[tower][key]
  assert c.model.image_token_id == loaded.image_token_id and c.model.image_size == loaded.get("image_size", 0)
  assert (c.init.path, c.tokenizer, c.data.template) == (release, release, "Hermes-2")
  with open(os.path.join(release, "config.json")) as f:
    hf = json.load(f)
  hf.pop("template")
  folder = os.path.dirname(release) + "/no_template"
  os.makedirs(folder, exist_ok=True)
  for name in os.listdir(release):
    if name != "config.json":
      os.symlink(os.path.join(release, name), os.path.join(folder, name))
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(hf, f)
  # no 'template' in config.json: the chat template of its tokenizer files is tried, Qwen2's own here (a default
  # 'You are a helpful assistant.' system block, no image parts), which is none of the InternVL templates
  with pytest.raises(ValueError, match="chat template of .* is not one of the InternVL conversation templates"):
    _finetune_config(f"path={folder}")


@pytest.mark.slow  # two train.py / convert subprocesses and a peft load: ~2-3 min on 2 cores
def test_release_in_lora_on_official_data_adapter_out(release, tmp_path):
  import jax.numpy as jnp
  import torch
  from peft import PeftModel
  from transformers import InternVLForConditionalGeneration
  from internvl_jax.evaluate import models
  # official-format data: a meta JSON, JSONL conversations with an image each
  rng = np.random.default_rng(0)
  records = []
  for i in range(12):
    Image.fromarray(rng.integers(0, 255, (56, 56, 3), np.uint8)).save(tmp_path / f"{i}.png")
    records.append({"image": f"{i}.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "Noise."}]})
  with open(tmp_path / "train.jsonl", "w") as f:
    f.write("\n".join(json.dumps(r) for r in records))
  with open(tmp_path / "meta.json", "w") as f:
    json.dump({"noise": {"root": str(tmp_path), "annotation": str(tmp_path / "train.jsonl"), "repeat_time": 1,
                         "length": 12}}, f)
  workdir = str(tmp_path / "run")
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  meta = str(tmp_path / "meta.json")
  args = ["--config", f"configs/finetune.py:path={release},lora=4", "--workdir", workdir,
          "--config.total_steps=3", "--config.batch_size=2", "--config.grad_accum_steps=1", "--config.lr=1e-2",
          "--config.eval_batch_size=2", "--config.data.max_text_len=400", "--config.data.max_dynamic_patch=1",
          "--config.data.max_tiles=1", "--config.progress=False", "--config.data.num_threads=1",
          "--config.model.vision.dtype=float32", "--config.model.language.dtype=float32",
          "--config.data.train.source=internvl", f"--config.data.train.path={meta}",
          "--config.data.eval.source=internvl", f"--config.data.eval.path={meta}"]
  out = subprocess.run([sys.executable, os.path.join(ROOT, "train.py")] + args, cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  with open(os.path.join(workdir, "init_table.txt")) as f:
    assert "init: " in f.read()
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    logged = [json.loads(line) for line in f]
  assert all(m["tokens"] > 0 for m in logged if "tokens" in m)  # the answers were trained (not cut off)
  run = models.load_workdir(workdir, "caption")
  assert run.chat.template == "Hermes-2"
  base_native, adapter = str(tmp_path / "base_native"), str(tmp_path / "adapter")
  for cmd in (["export", release, base_native], ["export", workdir, adapter, "--adapter_only"]):
    res = subprocess.run([sys.executable, "-m", "internvl_jax.convert"] + cmd, cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
  ids = np.asarray([run.chat.input_ids("What is shown?", [1])])
  pixels = rng.standard_normal((1, 56, 56, 3)).astype(np.float32)
  ours = np.asarray(run.model(jnp.asarray(ids), jnp.asarray(pixels)).logits)
  base = InternVLForConditionalGeneration.from_pretrained(base_native)
  inputs = dict(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2))
  with torch.no_grad():
    untuned = base(**inputs).logits.numpy()  # before peft wraps the base's modules in place
  assert np.abs(untuned - ours).max() > 1e-3  # the adapters moved the model
  peft_model = PeftModel.from_pretrained(base, adapter).eval()
  with torch.no_grad():
    theirs = peft_model(**inputs).logits.numpy()
  np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-5)

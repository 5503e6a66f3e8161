"""End to end, the way a user fine-tunes a release: a tiny chat model trained by the demo (stage 1 + a short
stage 3) is exported in OpenGVLab's layout, then fine-tuned with LoRA (configs/finetune.py) on demo questions
written in the official data format, and must learn them.

The fine-tuning task is one the base cannot answer: colour questions whose answers follow a permutation of the
colours (red -> blue -> green -> yellow -> red). The base answers the true colour (held-out exact match near 0 on
the permuted answers); LoRA on the frozen language model has to learn the mapping (measured: 0.05 -> 0.80 after 150
steps). A LoRA that is not trained, not applied or not saved stays near the base."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PERMUTED = {"red": "blue", "blue": "green", "green": "yellow", "yellow": "red"}


def _run(args, timeout=900):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable] + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
  assert out.returncode == 0, out.stderr[-3000:]


def _write_official_format(folder, split, n):
  """n demo colour questions of `split` with permuted answers: images as PNG files, a JSONL annotation, a meta."""
  from internvl_jax.data import demo
  world = demo.DemoWorld(split, 8 * n, 56)
  lines = []
  for i in range(len(world)):
    r = world[i]
    question, answer = (t["value"] for t in r["conversations"])
    if "colour" not in question:
      continue
    Image.fromarray(r["image"]).save(os.path.join(folder, f"{split}{i}.png"))
    lines.append(json.dumps({"image": f"{split}{i}.png", "conversations": [
        {"from": "human", "value": question}, {"from": "gpt", "value": PERMUTED[answer]}]}))
    if len(lines) == n:
      break
  with open(os.path.join(folder, f"{split}.jsonl"), "w") as f:
    f.write("\n".join(lines) + "\n")
  meta = os.path.join(folder, f"{split}.json")
  with open(meta, "w") as f:
    json.dump({f"demo_{split}": {"root": folder, "annotation": os.path.join(folder, f"{split}.jsonl"),
                                 "repeat_time": 1, "length": n}}, f)
  return meta


@pytest.mark.slow  # the demo's two stages (shortened), an export and two fine-tuning runs: ~2-4 min on 2 cores
def test_lora_fine_tuning_of_an_exported_demo_model_learns_new_answers(tmp_path):
  demo_dir, base = str(tmp_path / "demo"), str(tmp_path / "base")
  _run(["train.py", "--config", "configs/demo.py", "--workdir", demo_dir] + [
      f"--config.stages.{s}.{k}" for s in ("stage1", "stage3") for k in (
          "data.eval.size=100", "progress=False", "checkpoint_every=0")] + [
      "--config.stages.stage1.total_steps=600", "--config.stages.stage3.total_steps=60"])
  _run(["-m", "internvl_jax.convert", "export", os.path.join(demo_dir, "stage3"), base, "--layout", "opengvlab"])
  with open(os.path.join(base, "config.json")) as f:
    assert json.load(f)["architectures"] == ["InternVLChatModel"]
  data = tmp_path / "data"
  data.mkdir()
  train_meta, eval_meta = _write_official_format(str(data), "train", 1000), _write_official_format(
      str(data), "eval", 100)
  common = ["--config.batch_size=32", "--config.grad_accum_steps=1", "--config.data.max_text_len=20",
            "--config.data.max_dynamic_patch=1", "--config.data.max_tiles=1", "--config.progress=False",
            "--config.model.vision.dtype=float32", "--config.model.language.dtype=float32",
            "--config.model.vision.remat=none", "--config.model.language.remat=none", "--config.checkpoint_every=0",
            "--config.data.train.source=internvl", f"--config.data.train.path={train_meta}",
            "--config.data.eval.source=internvl", f"--config.data.eval.path={eval_meta}", "--config.eval_batch_size=50"]
  exact = {}
  # lr 0 for one step: the adapters stay zero, so this evaluates the base itself
  for name, steps, lr in (("before", 1, 0.0), ("after", 150, 2e-3)):
    workdir = str(tmp_path / name)
    _run(["train.py", "--config", f"configs/finetune.py:path={base},lora=8", "--workdir", workdir,
          f"--config.total_steps={steps}", f"--config.lr={lr}"] + common)
    with open(os.path.join(workdir, "final_metrics.json")) as f:
      exact[name] = json.load(f)["exact_match"]
  print(f"held-out exact match on the permuted colours: base {exact['before']:.3f}, LoRA {exact['after']:.3f}")
  assert exact["before"] <= 0.25 and exact["after"] >= 0.5, exact

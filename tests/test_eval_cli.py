"""eval.py end to end: a tiny demo model trained for two steps per stage (in process), then every task through
eval.py in a subprocess, checking each JSON's schema and ranges and the galleries; and a transformers-written
chat checkpoint (random weights) captioning through --hf."""

import json
import os
import subprocess
import sys

import pytest

from conftest import tiny_config
from internvl_jax.evaluate import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _eval(args, timeout=240):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--progress=false"] + args, cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A two-stage workdir like the demo's: DIR/stage1 (contrastive) and DIR/stage3 (instruct), 2 steps each."""
  from internvl_jax.train import loop
  root = tmp_path_factory.mktemp("demo_run")
  for stage, task in (("stage1", "contrastive"), ("stage3", "instruct")):
    loop.run(tiny_config(task, total_steps=2, **{"data.eval.size": 8}), str(root / stage))
  return str(root)


@pytest.mark.slow  # the fixture trains two stages: ~1-3 min on a busy 2-core machine
@pytest.mark.parametrize("task", ["retrieval", "zeroshot", "caption", "vqa"])
def test_every_task_from_a_workdir(workdir, tmp_path, task):
  out = str(tmp_path / f"{task}.json")
  res = _eval(["--task", task, "--workdir", workdir, "--data", "demo:8", "--out", out, "--batch_size", "4",
               "--max_new_tokens", "3", "--cache_dir", str(tmp_path / "cache")])
  assert res.returncode == 0, res.stderr[-3000:]
  assert "|---|" in res.stdout  # the markdown table
  result = json.load(open(out))
  report.validate_result(result)  # schema and ranges
  assert result["task"] == task and result["data"] == "demo:8"
  assert ("stage1" if task in ("retrieval", "zeroshot") else "stage3") in result["model"]
  if task == "retrieval":
    assert result["num_images"] == 8 and result["num_texts"] == 16  # two captions per demo image
  if task == "zeroshot":
    assert result["num_classes"] == 264 and result["num_images"] == 8
  if task in ("caption", "vqa"):
    assert len(result["samples"]) == 8 and all("prediction" in s for s in result["samples"])
  assert os.path.exists(out[:-5] + ".png") == (task in ("retrieval", "zeroshot"))


@pytest.mark.slow
def test_wrong_model_for_the_task_is_one_line(workdir):
  res = _eval(["--task", "retrieval", "--workdir", os.path.join(workdir, "stage3"), "--data", "demo:4"])
  assert res.returncode == 1
  assert res.stderr.strip().splitlines()[-1].startswith("error: task retrieval needs a contrastive model")


def _tiny_tokenizer(path: str, image_token_id: int) -> None:
  """A word-level tokenizer.json (and tokenizer_config.json) whose <IMG_CONTEXT> sits at the model's image token
  id."""
  from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, decoders
  specials = ["<pad>", "<unk>", "<s>", "</s>", "<img>", "</img>", "<user>", "<assistant>"]
  words = "a an the provide one sentence caption for provided image red blue green yellow circle square".split()
  vocab = {t: i for i, t in enumerate(specials + words)}
  vocab["<IMG_CONTEXT>"] = image_token_id
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.normalizer = normalizers.Lowercase()
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.decoder = decoders.WordPiece(prefix="##")
  tok.add_special_tokens(specials + ["<IMG_CONTEXT>"])
  tok.save(path)
  # its special tokens, as a released folder's tokenizer_config.json names them
  with open(os.path.join(os.path.dirname(path), "tokenizer_config.json"), "w") as f:
    json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}, f)


def test_hf_chat_checkpoint_captions(tmp_path):
  import hf_refs
  folder = str(tmp_path / "hf")
  hf_refs.chat_model(hf_refs.QWEN2, folder, image_token_id=95)
  out = str(tmp_path / "caption.json")
  res = _eval(["--task", "caption", "--hf", folder, "--data", "demo:4", "--out", out, "--batch_size", "4"])
  assert res.returncode == 1 and "has no tokenizer.json" in res.stderr  # the one-line error first
  _tiny_tokenizer(os.path.join(folder, "tokenizer.json"), 95)
  res = _eval(["--task", "caption", "--hf", folder, "--data", "demo:4", "--out", out, "--batch_size", "4",
               "--max_new_tokens", "4", "--cache_dir", str(tmp_path / "cache")])
  assert res.returncode == 0, res.stderr[-3000:]
  result = json.load(open(out))
  report.validate_result(result)
  assert result["model"].startswith("hf:") and result["num_images"] == 4


def test_hf_internvl_g_checkpoint_retrieves_with_the_summarize_prefix(tmp_path):
  # InternVL-14B has no transformers class: the tiny OpenGVLab-layout checkpoint of the converter's tests.
  import numpy as np
  from safetensors.numpy import save_file
  from test_convert_internvl14b import CONFIG, official_shapes
  folder = tmp_path / "internvl_g"
  folder.mkdir()
  rng = np.random.default_rng(0)
  save_file({k: np.asarray(rng.standard_normal(v) * 0.3, np.float32) for k, v in official_shapes().items()},
            str(folder / "model.safetensors"))
  (folder / "config.json").write_text(json.dumps(CONFIG))
  _tiny_tokenizer(str(folder / "tokenizer.json"), 95)
  out = str(tmp_path / "retrieval.json")
  res = _eval(["--task", "retrieval", "--hf", str(folder), "--data", "demo:4", "--out", out, "--batch_size", "4",
               "--cache_dir", str(tmp_path / "cache")])
  assert res.returncode == 0, res.stderr[-3000:]
  result = json.load(open(out))
  report.validate_result(result)
  assert result["text_prefix"] == "summarize:" and result["num_texts"] == 8

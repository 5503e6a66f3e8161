"""eval.py end to end on a train.py workdir: a tiny demo model trained for two steps per stage (in process), then
every task through eval.py in a subprocess, checking each JSON's schema and ranges and the galleries. Released
folders (--hf) are tested in test_eval_released.py."""

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
  # no Orbax noise about reading the workdir read-only (issue 16)
  assert "Metadata file does not exist" not in res.stderr and "read only" not in res.stderr, res.stderr[-2000:]
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
def test_vqa_with_int8_weights(workdir, tmp_path):
  out = str(tmp_path / "vqa_int8.json")
  res = _eval(["--task", "vqa", "--workdir", workdir, "--data", "demo:4", "--out", out, "--batch_size", "4",
               "--max_new_tokens", "3", "--cache_dir", str(tmp_path / "cache"), "--quantize", "int8"])
  assert res.returncode == 0, res.stderr[-3000:]
  assert "int8" in res.stdout.split("loaded", 1)[1].splitlines()[0]  # the parameter dtypes printed after loading
  result = json.load(open(out))
  report.validate_result(result)
  assert result["model"].endswith("[int8]") and len(result["samples"]) == 4


def test_quantize_only_for_generating_tasks():
  res = _eval(["--task", "retrieval", "--workdir", "nowhere", "--data", "demo:4", "--quantize", "int8"], timeout=60)
  assert res.returncode != 0 and "--quantize is for the generating tasks" in res.stderr


@pytest.mark.slow
def test_wrong_model_for_the_task_is_one_line(workdir):
  res = _eval(["--task", "retrieval", "--workdir", os.path.join(workdir, "stage3"), "--data", "demo:4"])
  assert res.returncode == 1
  assert res.stderr.strip().splitlines()[-1].startswith("error: task retrieval needs a contrastive model")


@pytest.mark.slow
@pytest.mark.parametrize("task", ["linear_probe", "attention_probe"])
def test_probes_from_a_workdir(workdir, tmp_path, task):
  """The probes read the contrastive stage's vision tower; --train_data demo is the demo's train split."""
  out = str(tmp_path / f"{task}.json")
  res = _eval(["--task", task, "--workdir", workdir, "--train_data", "demo:16", "--data", "demo:8", "--out", out,
               "--batch_size", "8", "--weight_decays", "1e-2", "--cache_dir", str(tmp_path / "cache")])
  assert res.returncode == 0, res.stderr[-3000:]
  result = json.load(open(out))
  report.validate_result(result)
  assert "stage1" in result["model"] and result["num_train"] == 16 and result["num_images"] == 8
  assert result["num_classes"] == 264 and result["top5"] is not None

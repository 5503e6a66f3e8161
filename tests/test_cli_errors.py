"""Command-line mistakes get one line naming the thing and the fix, exit non-zero, and no traceback (issue 16):
config-file arguments with a typo, unknown presets, unknown --config fields (with the near miss), bad mesh sizes,
the planner's --set fields and a batch that the mesh cannot split."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, tmp_path, module=None):
  cmd = [sys.executable] + (["-m", module] if module else ["train.py", "--workdir", str(tmp_path / "wd")]) + args
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def _one_error_line(out) -> str:
  assert out.returncode != 0, out.stdout[-1000:]
  assert "Traceback" not in out.stderr and "FATAL" not in out.stderr, out.stderr[-3000:]
  lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1, out.stderr[-3000:]
  return lines[0]


@pytest.mark.parametrize("args, expected", [
    (["--config", "configs/contrastive.py:modle=seed_300m"],
     "config argument 'modle' is not one this config file reads; did you mean 'model'?"),
    (["--config", "configs/contrastive.py:model=nope"], "unknown contrastive preset 'nope'; choose from"),
    (["--config", "configs/contrastive.py", "--config.nonexistent=1"],
     "--config.nonexistent: the config has no field 'nonexistent'"),
    (["--config", "configs/contrastive.py", "--config.data.trian.path=x"],
     "config.data has no field 'trian'; did you mean --config.data.train?"),
    (["--config", "configs/contrastive.py", "--config.mesh.data=0", "--config.total_steps=1"],
     "config.mesh.data=0 must be a positive number of devices or -1"),
])
def test_train_mistakes_are_one_line(tmp_path, args, expected):
  line = _one_error_line(_run(args, tmp_path))
  assert expected in line, line
  assert not os.path.exists(tmp_path / "wd" / "config.json")


def test_verbose_keeps_the_traceback(tmp_path):
  out = _run(["--config", "configs/contrastive.py", "--config.nonexistent=1", "--verbose"], tmp_path)
  assert out.returncode != 0 and "Traceback" in out.stderr


def test_config_file_arguments_are_checked_in_process():
  from internvl_jax.train import defaults
  assert defaults.parse_arg("model=tiny") == {"model": "tiny"}
  with pytest.raises(ValueError, match="did you mean 'lora'"):
    defaults.parse_arg("lroa=4", allowed=("path", "model", "lora"))
  with pytest.raises(ValueError, match="it takes no arguments"):
    defaults.parse_arg("model=tiny", allowed=())


@pytest.mark.parametrize("args, expected", [
    (["--set", "nonexistent=3"], "--set nonexistent: the config has no field 'nonexistent'"),
    (["--set", "model.vision.num_layer=3"], "did you mean --set model.vision.num_layers=...?"),
    (["--mesh", "fsdp=4", "--batch_size", "6"], "config.batch_size=6 is not a positive multiple of the 4 batch"),
])
def test_plan_mistakes_are_one_line(tmp_path, args, expected):
  out = _run(["--config", "configs/contrastive.py:model=tiny"] + args, tmp_path, module="internvl_jax.plan")
  line = _one_error_line(out)
  assert expected in line, line

"""Defaults that work where they run (issue 16 item 12): compute dtype 'auto' (bfloat16 on accelerators, float32 on
CPU), full remat for the large presets, the planner resolving 'auto' for its --platform, and a memory check of the
compiled step against the device's memory before the first step."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import pytest

from internvl_jax.models import layers
from internvl_jax.train import config_checks, defaults, loop, memory_check

from conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_auto_dtype_resolves_per_platform():
  assert layers.to_dtype("auto") == jnp.float32  # this CPU
  assert layers.auto_dtype("gpu") == layers.auto_dtype("tpu") == "bfloat16"
  assert layers.auto_dtype("cpu") == "float32"
  with pytest.raises(ValueError, match="'auto'"):
    layers.to_dtype("float8")


def test_large_presets_default_to_auto_dtype_and_full_remat():
  big = defaults.base_config("contrastive", "internvit_6b").model
  assert big.vision.dtype == "auto" and big.vision.remat == "full"
  small = defaults.base_config("contrastive", "tiny").model
  assert small.vision.dtype == "auto" and small.vision.remat == "none"
  chat = defaults.base_config("instruct", "internvl3_5_8b").model
  assert chat.language.remat == "full" and chat.vision.remat == "none"  # a 300M ViT needs none


def test_memory_check_stops_before_the_first_step(tmp_path, monkeypatch):
  cfg = tiny_config("contrastive", total_steps=3)
  cfg.data.eval.source = ""
  monkeypatch.setattr(memory_check, "device_bytes_limit", lambda: 1 << 20)  # a 1 MiB "accelerator"
  wd = tmp_path / "small"
  with pytest.raises(config_checks.ConfigError, match=r"needs \d+\.\d GiB per device but .* has 0\.0 GiB; try "
                                                      r"--config.model.vision.remat=full"):
    loop.run(cfg, str(wd))
  assert not os.path.exists(wd / "metrics.jsonl") or os.path.getsize(wd / "metrics.jsonl") == 0
  assert not [d for d in os.listdir(wd / "checkpoints")] if os.path.exists(wd / "checkpoints") else True

  # a device that fits: the pre-compiled executable runs the steps, with the losses of an unchecked run
  plain = tmp_path / "plain"
  monkeypatch.setattr(memory_check, "device_bytes_limit", lambda: None)
  loop.run(cfg, str(plain))
  monkeypatch.setattr(memory_check, "device_bytes_limit", lambda: 64 << 30)
  checked = tmp_path / "checked"
  loop.run(cfg, str(checked))
  rows = lambda d: [json.loads(line)["loss"] for line in open(d / "metrics.jsonl")]
  assert rows(plain) == rows(checked) and len(rows(plain)) == 3


def test_plan_resolves_auto_for_its_platform():
  out = subprocess.run([sys.executable, "-m", "internvl_jax.plan", "--config", "configs/contrastive.py:model=tiny",
                        "--platform", "gpu"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "dtype bfloat16" in out.stdout

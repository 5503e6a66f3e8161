"""The planner end to end on the tiny preset over 2 fake devices: the JSON schema of the issue, exact parameter /
optimizer / gradient bytes per device, the analytic FLOPs, and the contrastive-loss scaling table."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("plan") / "plan.json")
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # the planner sets the device count itself
  proc = subprocess.run([sys.executable, "-m", "internvl_jax.plan", "--config", "configs/contrastive.py:model=tiny",
                         "--mesh", "data=1,fsdp=2,tensor=1", "--batch_size", "8", "--step_time", "0.5",
                         "--contrastive_scaling", "64,256", "--out", out], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=400)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.load(open(out)), proc.stdout


def test_json_schema_is_the_issues(planned):
  plan, _ = planned
  assert set(plan) == {"params", "bytes_per_device", "flops_per_step", "compile_seconds"}
  assert set(plan["bytes_per_device"]) == {"params", "optimizer", "gradients", "temporaries", "total"}
  assert isinstance(plan["params"], int) and plan["compile_seconds"] > 0


def test_bytes_per_device_follow_the_shardings(planned):
  plan, _ = planned
  b = plan["bytes_per_device"]
  full = 4 * plan["params"]  # float32, all trainable in stage 1
  assert 0.5 * full <= b["params"] < 0.6 * full  # fsdp=2 halves every large weight; small vectors replicated
  assert b["gradients"] == b["params"]
  assert abs(b["optimizer"] - 2 * b["params"]) <= 64  # two Adam moments (+ scalar counts)
  assert b["total"] >= b["params"] + b["optimizer"]


def test_flops_and_printed_sections(planned):
  plan, stdout = planned
  from internvl_jax.bench import flops
  from internvl_jax.train import defaults

  m = defaults.base_config("contrastive", "tiny").model
  per_pair = flops.contrastive_forward_flops(m.vision, m.vision.image_size, m.text, 32, m.embed_dim)
  assert plan["flops_per_step"] == pytest.approx(3 * 8 * per_pair)
  for text in ("parameters", "bytes per device", "XLA cost analysis", "TPU v5p", "global batch    256: plain"):
    assert text in stdout, text

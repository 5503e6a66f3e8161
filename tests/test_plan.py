"""The planner end to end on the tiny preset over 2 fake devices: the JSON schema of the issue, exact parameter /
optimizer / gradient bytes per device, the analytic FLOPs, and the contrastive-loss scaling table; and on the tiny
chat model under the fine-tuning switches (LoRA vs full fine-tuning): optimizer state and gradients for the
trainable parameters only, no weight-gradient FLOPs for frozen parts."""

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
  # the issue's schema, plus the trainable count and the frozen part of the parameters (fine-tuning)
  assert set(plan) == {"params", "trainable_params", "bytes_per_device", "flops_per_step", "compile_seconds"}
  assert set(plan["bytes_per_device"]) == {"params", "frozen_params", "optimizer", "gradients", "temporaries",
                                           "total"}
  assert plan["trainable_params"] == plan["params"] and plan["bytes_per_device"]["frozen_params"] == 0
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


def _plan(tmp_path_factory, name, *switches):
  out = str(tmp_path_factory.mktemp(name) / "plan.json")
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  sets = [a for s in switches for a in ("--set", s)]
  proc = subprocess.run([sys.executable, "-m", "internvl_jax.plan", "--config", "configs/instruct.py:model=tiny",
                         "--mesh", "data=1,fsdp=1", "--batch_size", "2", *sets, "--out", out], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=400)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.load(open(out)), proc.stdout


@pytest.fixture(scope="module")
def finetune_plans(tmp_path_factory):
  lora = _plan(tmp_path_factory, "lora", "freeze_llm=true", "freeze_mlp=true", "freeze_backbone=true",
               "use_llm_lora=4")
  full = _plan(tmp_path_factory, "full", "freeze_backbone=true")
  return lora, full


def _tiny_chat():
  from internvl_jax.train import defaults

  return defaults.base_config("instruct", "tiny")


def _adapter_count(lm, r):
  """peft's LoRA on q, k, v, o, gate, up, down: r (in + out) per adapted matrix and layer."""
  d, m = lm.hidden_size, lm.mlp_dim
  hd = lm.get("head_dim") or d // lm.num_heads
  q, kv = lm.num_heads * hd, lm.num_kv_heads * hd
  return lm.num_layers * r * ((d + q) + 2 * (d + kv) + (q + d) + 2 * (d + m) + (m + d))


def test_lora_plan_has_optimizer_state_and_gradients_for_the_adapters_only(finetune_plans):
  (lora, stdout), (full, _) = finetune_plans
  n = _adapter_count(_tiny_chat().model.language, 4)
  assert lora["trainable_params"] == n
  b = lora["bytes_per_device"]
  assert 0 <= b["optimizer"] - 2 * 4 * n <= 64  # two float32 Adam moments (+ scalar counts)
  assert b["gradients"] == 4 * n
  assert b["frozen_params"] == 4 * (lora["params"] - n) and b["params"] == 4 * lora["params"]
  assert full["params"] == lora["params"] - n and full["bytes_per_device"]["frozen_params"] > 0  # the vision tower
  assert full["bytes_per_device"]["optimizer"] > 5 * b["optimizer"]  # tiny: adapters are a large share here
  assert full["trainable_params"] * 8 <= full["bytes_per_device"]["optimizer"] <= full["trainable_params"] * 8 + 64
  for text in ("fine-tuning switches", "adapters", "language_adapters  3 x forward", "language_body      2 x"):
    assert text in stdout, text


def test_finetune_flops_count_no_weight_gradients_for_frozen_parts(finetune_plans):
  (lora, _), (full, _) = finetune_plans
  from internvl_jax.bench import flops

  c = _tiny_chat()
  m, t, s, b, r = c.model, c.data.max_text_len, c.model.vision.image_size, 2, 4
  vision = flops.vit_forward_flops(m.vision, s, flops.chat_vision_layers(m))
  proj = flops.chat_projector_flops(m, s)
  lm = flops.decoder_sequence_flops(m.language, t, causal=True)
  adapters = 2.0 * t * _adapter_count(m.language, r)  # 2 FLOPs per adapter weight and token
  # LoRA: frozen tower and projector forward only; language model and head forward + activation gradients (2x);
  # adapters forward + both gradients (3x). Full (freeze_backbone only): the tower forward, the rest 3x.
  assert lora["flops_per_step"] == pytest.approx(b * (vision + proj + 2 * lm + 3 * adapters))
  assert full["flops_per_step"] == pytest.approx(b * (vision + 3 * (proj + lm)))

"""The sharded contrastive loss equals the plain one (value, metrics, gradients) on 8 fake CPU devices, and the
train step uses it when the batch is split. The 8-device run is a subprocess because the device count is fixed
when JAX starts."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def result():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, os.path.join(HERE, "sharded_loss_check.py")], capture_output=True,
                        text=True, env=env, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_loss_and_metrics_equal_the_plain_loss(result):
  np.testing.assert_allclose(result["loss_sharded"], result["loss_plain"], rtol=1e-6, atol=1e-6)
  for k, v in result["metrics_plain"].items():
    np.testing.assert_allclose(result["metrics_sharded"][k], v, rtol=1e-6, atol=1e-6, err_msg=k)
  assert result["metrics_plain"]["acc_i2t"] > 0  # the planted positive is found: accuracies are compared


def test_gradients_equal_the_plain_loss(result):
  # image, text and scale gradients; each is O(0.1 .. 10), so 1e-6 absolute is a tight check
  assert all(m > 1e-3 for m in result["grad_max_abs"])
  for d in result["grad_max_abs_diff"]:
    assert d <= 1e-6


def test_the_sharded_loss_gathers_rather_than_forming_the_full_matrix(result):
  assert result["sharded_hlo_has_all_gather"]


def test_train_step_switch(result):
  on, off = result["train_step"]["True"], result["train_step"]["False"]
  assert on["uses_shard_map"] and not off["uses_shard_map"]
  np.testing.assert_allclose(on["losses"], off["losses"], rtol=1e-5)  # loss and gradient norm of one step


def test_train_step_pins_the_residual_stream_to_the_batch_sharding(result):
  assert result["train_step"]["residual_constrained"]

"""The ring form of the sigmoid loss (losses.sharded_sigmoid_loss) equals SigLIP's formula in numpy and the plain
jnp form (value, metrics, gradients) on 8 fake CPU devices; every ring step is taken once; no device forms the
global [B, B] logits; the train step with config.loss='sigmoid' uses the ring on a split batch (slow). The 8-device
runs are subprocesses because the device count is fixed when JAX starts (see sigmoid_ring_check.py)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _run(part: str) -> dict:
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, os.path.join(HERE, "sigmoid_ring_check.py"), part], capture_output=True,
                        text=True, env=env, timeout=1500)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def result():
  return _run("loss")


@pytest.mark.parametrize("case", ["siglip_init", "large_negatives"])
def test_ring_loss_equals_the_numpy_formula_and_the_plain_loss(result, case):
  r = result["random"] if case == "siglip_init" else result["random"]["init_t_b"]
  np.testing.assert_allclose(r["ring"], r["numpy"], rtol=1e-6)
  np.testing.assert_allclose(r["plain"], r["numpy"], rtol=1e-6)
  for k, v in r["metrics_plain"].items():
    np.testing.assert_allclose(r["metrics_ring"][k], v, rtol=1e-6, atol=1e-7, err_msg=k)
  assert r["metrics_plain"]["acc_i2t"] > 0 and r["metrics_plain"]["loss_neg"] > 0.1


@pytest.mark.parametrize("case", ["siglip_init", "large_negatives"])
def test_ring_gradients_equal_the_plain_gradients(result, case):
  r = result["random"] if case == "siglip_init" else result["random"]["init_t_b"]
  # image, text, scale and bias gradients, each O(0.01 .. 10): the ring's sums differ only by rounding
  assert all(m > 1e-3 for m in r["grad_max_abs"])
  for diff, size in zip(r["grad_max_abs_diff"], r["grad_max_abs"]):
    assert diff <= 1e-6 * max(size, 1.0), (diff, size)


def test_every_ring_step_counts_once(result):
  # at distance k the only large terms (B of about 20) sit k shards around the ring: a skipped step reads ~0,
  # a repeated one ~40
  assert sorted(result["ring"], key=int) == [str(k) for k in range(1, 8)]
  for k, r in result["ring"].items():
    np.testing.assert_allclose(r["ring"], r["numpy"], rtol=1e-6, err_msg=f"ring distance {k}")
    np.testing.assert_allclose(r["numpy"], 20.0, rtol=1e-6)
    assert max(r["grad_max_abs_diff"]) <= 1e-5, k


def test_no_device_forms_the_global_logits(result):
  for direction, h in result["random"]["hlo"].items():
    assert h["collective_permute"] and not h["all_gather"], direction  # shards travel; nothing is gathered
    assert h["local_block"] and not h["global_block"], direction  # [B/8, B/8] blocks, never [B, B]


@pytest.mark.slow  # two compilations of the tiny model's train step on 8 devices: 1-2 minutes on 2 quiet cores
def test_train_step_uses_the_ring_with_the_same_result():
  result = _run("train_step")
  on, off = result["train_step"]["True"], result["train_step"]["False"]
  assert on["uses_ppermute"] and not off["uses_ppermute"]
  for k in ("loss", "grad_norm", "loss_pos", "loss_neg", "acc_i2t", "acc_t2i"):
    np.testing.assert_allclose(on["metrics"][k], off["metrics"][k], rtol=1e-5, err_msg=k)
  # the sigmoid loss's parameters are logged, at SigLIP's initialisation t = 10, b = -10
  np.testing.assert_allclose([on["metrics"]["logit_scale"], on["metrics"]["logit_bias"]], [10.0, -10.0], rtol=1e-6)

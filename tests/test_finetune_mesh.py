"""Stage 3 with LoRA on both towers, a partly unfrozen vision stack and loss_reduction='square' gives the same
losses and parameters on 4 devices (fsdp 2 x tensor 2: adapters and base split as their logical names say) as on
one. Each run is a subprocess because the device count is fixed when JAX starts."""

import os
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _run(tmp_path, devices):
  out = str(tmp_path / f"d{devices}.npz")
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, os.path.join(HERE, "finetune_on_mesh.py"), out], capture_output=True,
                        text=True, env=env, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return dict(np.load(out))


@pytest.mark.slow
def test_finetune_on_four_devices_matches_one(tmp_path):
  one, four = _run(tmp_path, 1), _run(tmp_path, 4)
  assert int(four["devices"]) == 4 and str(four["lora_b_spec"]) == "P(None, None, 'tensor')"
  np.testing.assert_allclose(four["losses"], one["losses"], rtol=1e-5)
  keys = [k for k in one if k.startswith(("params/", "frozen/"))]
  assert set(keys) == {k for k in four if k.startswith(("params/", "frozen/"))}
  for k in keys:
    np.testing.assert_allclose(four[k], one[k], rtol=1e-4, atol=1e-6, err_msg=k)
  # the partly frozen vision stack: same values on both meshes, frozen layer included
  np.testing.assert_array_equal(four["params/vision/blocks/mlp/fc1/kernel"][0],
                                one["params/vision/blocks/mlp/fc1/kernel"][0])

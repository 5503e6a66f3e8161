"""train.py end to end in a subprocess: tiny configs for a few steps on 1 CPU device and on 8 fake devices,
the 1-vs-8-device equality of a contrastive step, and config errors as one line."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.total_steps=3", "--config.batch_size=8", "--config.eval_batch_size=8", "--config.log_every=1",
        "--config.data.train.size=64", "--config.data.eval.size=16", "--config.data.max_text_len=12",
        "--config.warmup_steps=1", "--config.progress=False", "--config.data.num_threads=1"]


def _run(args, devices=1, timeout=240):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return subprocess.run([sys.executable, os.path.join(ROOT, "train.py")] + args, cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("devices", [1, 8])
def test_contrastive_tiny_runs(tmp_path, devices):
  wd = str(tmp_path / "run")
  # on 8 devices also: bfloat16 compute (float32 parameters) on an fsdp x tensor mesh
  extra = ([] if devices == 1 else ["--config.mesh.tensor=2", "--config.model.vision.dtype=bfloat16",
                                    "--config.model.text.dtype=bfloat16"])
  out = _run(["--config", "configs/contrastive.py:model=tiny", "--workdir", wd] + TINY + extra, devices)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"{devices} device(s)" in out.stdout
  records = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  assert [r["step"] for r in records] == [1, 2, 3]
  assert all({"loss", "lr"} <= set(r) for r in records) and "i2t_r1" in records[-1]
  for name in ("config.json", "tokenizer.json", "curves.png", "final_metrics.json"):
    assert os.path.exists(os.path.join(wd, name)), name
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(wd, "tensorboard")))


@pytest.mark.slow
@pytest.mark.parametrize("config", ["alignment", "instruct"])
def test_other_stages_run(tmp_path, config):
  wd = str(tmp_path / "run")
  extra = ["--config.data.max_text_len=20"] if config == "instruct" else []
  out = _run(["--config", f"configs/{config}.py:model=tiny", "--workdir", wd] + TINY + extra, 8)
  assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.slow  # two subprocesses, each compiling the model: minutes on a busy 2-core machine
def test_one_and_eight_devices_give_the_same_step(tmp_path):
  res = {}
  for n in (1, 8):
    path = str(tmp_path / f"out{n}.npz")
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "steps_on_mesh.py"), path], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    res[n] = dict(np.load(path))
  assert res[8]["devices"] == 8
  np.testing.assert_allclose(res[1]["losses"], res[8]["losses"], atol=1e-5, rtol=1e-5)
  for k in res[1]:
    if k.startswith("p/"):
      np.testing.assert_allclose(res[1][k], res[8][k], atol=1e-5, rtol=1e-5, err_msg=k)


def test_config_error_is_one_line(tmp_path):
  out = _run(["--config", "configs/contrastive.py:model=tiny", "--workdir", str(tmp_path / "x"),
              "--config.model.vision.num_heads=3"] + TINY)
  assert out.returncode == 1
  assert out.stderr.strip().splitlines()[-1].startswith("error: model.vision.num_heads=3")


@pytest.mark.slow
def test_checkpoint_restores_onto_a_different_mesh(tmp_path):
  wd = str(tmp_path / "run")
  out = _run(["--config", "configs/contrastive.py:model=tiny", "--workdir", wd] + TINY, 1)
  assert out.returncode == 0, out.stderr[-3000:]
  more = [a for a in TINY if not a.startswith("--config.total_steps")] + ["--config.total_steps=5"]
  out = _run(["--config", "configs/contrastive.py:model=tiny", "--workdir", wd, "--config.mesh.tensor=2"] + more, 8)
  assert out.returncode == 0, out.stderr[-3000:]
  steps = [json.loads(l)["step"] for l in open(os.path.join(wd, "metrics.jsonl"))]
  assert steps == [1, 2, 3, 4, 5]  # resumed at 3 on the 4 x 2 mesh, not restarted

"""Multi-process training on one machine: 2 processes x 2 fake CPU devices (gloo collectives, coordinator on a
free 127.0.0.1 port) against 1 process x 4 devices. Same global batches (the pipeline gives each host every
other example: the same set per step, and the loss is invariant to the order within a batch), so the losses must
agree; the checkpoint the two processes write collectively must restore in this single process and equal the
1-process run's."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--config", "configs/contrastive.py:model=tiny", "--config.total_steps=3", "--config.batch_size=8",
        "--config.log_every=1", "--config.data.train.size=64", "--config.data.eval.source=",
        "--config.data.max_text_len=12", "--config.warmup_steps=1", "--config.progress=False",
        "--config.data.num_threads=1", "--config.async_checkpoints=False", "--config.lr=0.01"]


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  return dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def _losses(workdir: str) -> list[float]:
  return [json.loads(line)["loss"] for line in open(os.path.join(workdir, "metrics.jsonl"))]


def _restore(workdir: str):
  """The latest checkpoint of a workdir, restored whole (state + data iterator) onto this process's devices."""
  sys.path.insert(0, os.path.dirname(__file__))
  from conftest import tiny_config
  from internvl_jax import sharding
  from internvl_jax.data import tokenizer
  from internvl_jax.train import checkpoint, config_checks, state as state_lib

  cfg = tiny_config("contrastive", batch_size=8)
  config_checks.adapt_model_to_tokenizer(cfg, tokenizer.load(os.path.join(workdir, "tokenizer.json")), built=True)
  setup = state_lib.setup_state(cfg, cfg.model, sharding.make_mesh({"fsdp": -1}))
  ckpt = checkpoint.Checkpointer(workdir, async_save=False)
  step = ckpt.latest_step()
  state, data_state = ckpt.restore(step, setup.abstract_with_shardings())
  ckpt.close()
  return step, jax.device_get(state), data_state


@pytest.mark.slow  # three compiling trainer processes: minutes on a shared 2-core machine
def test_two_processes_match_one_process_and_their_checkpoint_restores(tmp_path):
  single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
  out = subprocess.run([sys.executable, "train.py", "--workdir", single] + ARGS, cwd=ROOT, env=_env(4),
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]

  port = _free_port()
  procs = [subprocess.Popen([sys.executable, "train.py", "--workdir", multi, f"--coordinator_address=127.0.0.1:{port}",
                             "--num_processes=2", f"--process_id={i}"] + ARGS, cwd=ROOT, env=_env(2),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (stdout, stderr) in zip(procs, outs):
    assert p.returncode == 0, stderr[-3000:]
  assert "4 device(s), process 0/2" in outs[0][0] and "4 device(s), process 1/2" in outs[1][0]

  one, two = _losses(single), _losses(multi)
  print("1 process x 4 devices:", one, "\n2 processes x 2 devices:", two)
  assert len(one) == len(two) == 3 and one[0] != one[-1]  # the parameters moved: later losses compare updates
  np.testing.assert_allclose(two, one, rtol=1e-5, atol=1e-5)

  step_m, state_m, data_m = _restore(multi)
  step_s, state_s, _ = _restore(single)
  assert step_m == step_s == 3 and int(state_m["step"]) == 3
  assert data_m  # each host's iterator position was saved with the arrays
  for a, b in zip(jax.tree.leaves(state_m["params"]), jax.tree.leaves(state_s["params"])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

"""Shared test helpers. Tests run on CPU with tiny shapes, float32 unless a test says otherwise; tiny run
configs on the demo world for the trainer's tests."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

# One persistent XLA compilation cache per test session, shared with the CLI subprocesses the tests start (they
# inherit the environment): the same tiny train and eval programs are compiled by many tests and processes, and
# compiling dominates the suite's time on 2 cores (test_resume: 83 s -> 44 s). A fresh directory each session,
# so no stale entry can outlive a code change; a cache the user set is left alone.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache_dir = tempfile.mkdtemp(prefix="internvl_jax_tests_xla_cache_")
  atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")

import jax  # noqa: E402  (after the cache settings above, which jax reads at import)
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

import internvl_jax  # noqa: F401  (sets the package's Flax defaults)

jax.config.update("jax_default_matmul_precision", "highest")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def tiny_config(task: str = "contrastive", **overrides):
  """The stage's default config on the tiny preset, with small data, batch and step counts."""
  from internvl_jax.train import defaults

  c = defaults.base_config(task, "tiny")
  c.data.train.size, c.data.eval.size = 64, 16
  c.data.max_text_len = 20 if task == "instruct" else 12
  c.data.num_threads = 1
  c.batch_size, c.eval_batch_size = 8, 8
  c.total_steps, c.warmup_steps = 4, 1
  c.log_every, c.checkpoint_every, c.eval_every = 1, 0, 0
  c.progress = False
  c.async_checkpoints = False
  for k, v in overrides.items():
    target = c
    *path, last = k.split(".")
    for p in path:
      target = target[p]
    target[last] = v
  return c


@pytest.fixture
def make_config():
  return tiny_config


def param_count(module: nnx.Module) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


@pytest.fixture
def rng():
  return np.random.default_rng(0)

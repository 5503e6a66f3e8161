"""Shared test helpers. Tests run on CPU with tiny shapes, float32 unless a test says otherwise; tiny run
configs on the demo world for the trainer's tests."""

from __future__ import annotations

import os
import sys

import jax
import numpy as np
import pytest
from flax import nnx

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

"""Shared test helpers. Tests run on CPU with tiny shapes; float32 unless a test says otherwise."""

import jax
import numpy as np
import pytest
from flax import nnx

import internvl_jax  # noqa: F401  (sets the package's Flax defaults)

jax.config.update("jax_default_matmul_precision", "highest")


def param_count(module: nnx.Module) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


@pytest.fixture
def rng():
  return np.random.default_rng(0)

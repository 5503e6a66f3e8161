"""models/cpu_layout.py: the CPU arrangements (dense layers on [N, D] rows, short stacks unrolled) change how XLA
runs a layer, never what it computes. References are numpy formulas."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from internvl_jax.models import layers, lora, stack


def _dot_ranks(fn, x):
  jaxpr = jax.make_jaxpr(fn)(x)
  return [e.invars[0].aval.ndim for e in jaxpr.eqns if e.primitive.name == "dot_general"]


def test_dense_on_rows_matches_numpy_and_runs_as_a_matrix(monkeypatch):
  layer = layers.dense(8, 5, ("embed", "mlp"), rngs=nnx.Rngs(0))
  x = np.random.default_rng(0).normal(size=(2, 3, 8)).astype(np.float32)
  want = x @ np.asarray(layer.kernel[...]) + np.asarray(layer.bias[...])
  np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x))), want, rtol=1e-5, atol=1e-5)
  assert _dot_ranks(lambda v: layer(v), jnp.asarray(x)) == [2]  # one [6, 8] @ [8, 5] on CPU
  monkeypatch.setenv("INTERNVL_JAX_NO_CPU_LAYOUT", "1")
  assert _dot_ranks(lambda v: layer(v), jnp.asarray(x)) == [3]  # switched off: the [2, 3, 8] activations as they come
  np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x))), want, rtol=1e-5, atol=1e-5)


def test_lora_linear_on_rows_matches_numpy():
  layer = layers.dense(8, 5, ("embed", "mlp"), rngs=nnx.Rngs(0), lora=(2, 4.0, 0.0))
  assert isinstance(layer, lora.LoRALinear)
  layer.lora.lora_b[...] = jax.random.normal(jax.random.key(1), layer.lora.lora_b[...].shape)  # non-zero branch
  x = np.random.default_rng(0).normal(size=(2, 3, 8)).astype(np.float32)
  a, b = np.asarray(layer.lora.lora_a[...]), np.asarray(layer.lora.lora_b[...])
  want = x @ np.asarray(layer.kernel[...]) + np.asarray(layer.bias[...]) + 2.0 * (x @ a) @ b
  np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x))), want, rtol=1e-5, atol=1e-5)


def test_short_stack_unrolled_matches_numpy_loop():
  mods = stack.stacked(lambda r: layers.dense(4, 4, ("embed", "mlp"), rngs=r), 3, nnx.Rngs(0))
  x = np.random.default_rng(0).normal(size=(2, 4)).astype(np.float32)
  out, _ = stack.run_stacked(mods, lambda layer, h, _: (jnp.tanh(layer(h)), None), jnp.asarray(x))
  jaxpr = jax.make_jaxpr(lambda h: stack.run_stacked(mods, lambda l, c, _: (jnp.tanh(l(c)), None), h)[0])(x)
  assert "scan" not in {e.primitive.name for e in jaxpr.eqns} or all(
      e.params.get("unroll") in (True, 3) for e in jaxpr.eqns if e.primitive.name == "scan")
  k, bias = np.asarray(mods.kernel[...]), np.asarray(mods.bias[...])
  want = x
  for i in range(3):
    want = np.tanh(want @ k[i] + bias[i])
  np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)

"""How the models arrange work for XLA's CPU backend; nothing here changes the maths or applies elsewhere.

Measured on the small contrastive model of BENCHMARKS.md ("Trainer overhead on small models"):
- a dense layer applied to [B, T, D] activations makes XLA CPU transpose the activations into copies for the
  kernel gradient (contraction over both B and T); the same layer on the [B*T, D] matrix does not, and its
  forward + backward runs 1.3-2x faster;
- a scan over a short stack of small layers runs its backward through dynamic slices of the stacked residuals
  and transposing copies; unrolled, the same layers ran 1.3-2x faster. Large models keep the scan (compile
  time, and its cost is negligible next to their matmuls), and accelerators are left alone.
"""

from __future__ import annotations

import os
from typing import Callable

import jax

# Stacks of at most this many layers and parameters are unrolled on CPU: their program stays small, and the scan
# costs something only next to small matmuls (8 InternViT-300M layers unrolled ran 0.95x, BENCHMARKS.md).
CPU_UNROLL_MAX_LAYERS = 4
CPU_UNROLL_MAX_PARAMS = 2**22


def _on_cpu() -> bool:
  return jax.default_backend() == "cpu" and not os.environ.get("INTERNVL_JAX_NO_CPU_LAYOUT")


def as_rows(fn: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
  """fn ([N, D] -> [N, E], row-wise) applied to x [..., D] -> [..., E]: on CPU through one [N, D] matrix,
  elsewhere as is."""
  if x.ndim <= 2 or not _on_cpu():
    return fn(x)
  y = fn(x.reshape(-1, x.shape[-1]))
  return y.reshape(*x.shape[:-1], y.shape[-1])


def scan_unroll(num_layers: int, num_params: int) -> int | bool:
  """The `unroll` of a jax.lax.scan over `num_layers` layers holding `num_params` parameters in all: every layer
  for a short stack of small layers on CPU, else 1 (a rolled scan)."""
  small = num_layers <= CPU_UNROLL_MAX_LAYERS and num_params <= CPU_UNROLL_MAX_PARAMS
  return True if small and _on_cpu() else 1

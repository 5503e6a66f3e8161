"""Stacked layers: build L copies of a layer with a leading 'layers' axis, and run them with scan (or a Python
loop, for debugging and the scan == loop test), each step optionally rematerialised with a named policy.

The layer modules hold parameters only; anything that changes per call (KV cache, rng keys, drop-path rates)
flows through the scan as carry or as per-layer inputs, which keeps the step a pure function that jit, grad and
remat handle without graph bookkeeping.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
from flax import nnx

from internvl_jax import sharding
from internvl_jax.models import cpu_layout, lora as lora_lib

# Logical names of the residual stream [B, T, D] carried between layers: split over the batch, replicated over
# width. Without it XLA's sharding propagation may follow the FSDP-sharded weights (whose 'embed' axis uses the
# same mesh axis as the batch) and keep whole-batch activations on every device.
RESIDUAL_NAMES = ("batch", "seq", None)

REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_everything": jax.checkpoint_policies.everything_saveable,
}


def stacked(make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs) -> nnx.Module:
  """Builds `num_layers` independent layers as one module whose parameters have a leading 'layers' axis."""

  @nnx.split_rngs(splits=num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=num_layers, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def make(r):
    return make_layer(r)

  return make(rngs)


def layer_at(layers: nnx.Module, index) -> nnx.Module:
  """The `index`-th layer of a stacked module, as a plain module (a view on sliced parameters)."""
  graphdef, state = nnx.split(layers)
  return nnx.merge(graphdef, jax.tree.map(lambda a: a[index], state))


def layer_range(layers: nnx.Module, start: int, stop: int) -> nnx.Module:
  """Layers [start, stop) of a stacked module, as a stacked module (a view on sliced parameters)."""
  graphdef, state = nnx.split(layers)
  return nnx.merge(graphdef, jax.tree.map(lambda a: a[start:stop], state))


def run_stacked(layers: nnx.Module | tuple, body: Callable, carry: Any, xs: Any = None, *, scan: bool = True,
                remat: str = "none", length: int | None = None, lora_key: jax.Array | None = None) -> tuple[Any, Any]:
  """Runs body(layer, carry, x) -> (carry, y) over the leading axis of `layers` (and of `xs`).

  `layers` may be a tuple of stacked modules that share the leading axis; body then gets a tuple of layers.
  Returns (final carry, stacked ys) like jax.lax.scan. `length` runs only the first `length` layers.
  lora_key: LoRA dropout (training): layer i runs inside lora.dropout_scope(split(lora_key, L)[i]).
  """
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat policy {remat!r} is not one of {sorted(REMAT_POLICIES)}")
  is_tuple = isinstance(layers, tuple)
  mods = layers if is_tuple else (layers,)
  splits = [nnx.split(m) for m in mods]
  graphdefs = [g for g, _ in splits]
  states = [s for _, s in splits]
  total = jax.tree.leaves(states[0])[0].shape[0]
  n = total if length is None else length
  if not 0 < n <= total:
    raise ValueError(f"asked to run {n} layers of a stack of {total}")
  if n != total:
    states = jax.tree.map(lambda a: a[:n], states)
    xs = jax.tree.map(lambda a: a[:n], xs)
  layer_keys = None if lora_key is None else jax.random.split(lora_key, total)[:n]

  def pin(c):  # no-op without a mesh in context (sharding.constrain)
    return sharding.constrain(c, RESIDUAL_NAMES) if isinstance(c, jax.Array) and c.ndim == 3 else c

  def step(c, inputs):
    layer_states, x, key = inputs
    built = tuple(nnx.merge(g, s) for g, s in zip(graphdefs, layer_states))
    with lora_lib.dropout_scope(key):  # entered inside the traced step: the scope holds this layer's key only
      c, y = body(built if is_tuple else built[0], pin(c), x)
    return pin(c), y

  if remat != "none":
    step = jax.checkpoint(step, policy=REMAT_POLICIES[remat], prevent_cse=not scan)
  if scan:
    # unrolled (small stacks on CPU) only without remat: a rolled scan is what keeps XLA's CSE from merging the
    # recomputation back into the forward (prevent_cse=False above)
    size = sum(math.prod(a.shape) for a in jax.tree.leaves(states))
    unroll = cpu_layout.scan_unroll(n, size) if remat == "none" else 1
    return jax.lax.scan(step, carry, (states, xs, layer_keys), unroll=unroll)
  ys = []
  for i in range(n):
    carry, y = step(carry, jax.tree.map(lambda a: a[i], (states, xs, layer_keys)))
    ys.append(y)
  stacked_ys = None if all(y is None for y in ys) else jax.tree.map(lambda *a: jax.numpy.stack(a), *ys)
  return carry, stacked_ys


def regroup(layers: nnx.Module, group: int) -> nnx.Module:
  """Views a stack of L layers as L/group steps of `group` layers each (leading axes [L/group, group]), so that a
  scan step can hold layers that differ (e.g. QLLaMA's cross-attention every `group`-th layer)."""
  graphdef, state = nnx.split(layers)
  total = jax.tree.leaves(state)[0].shape[0]
  if total % group:
    raise ValueError(f"{total} layers cannot be grouped by {group}")
  return nnx.merge(graphdef, jax.tree.map(lambda a: a.reshape((total // group, group) + a.shape[1:]), state))

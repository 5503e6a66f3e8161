"""Evaluating big models: eval.py's --mesh / --dtype, batches placed on the mesh, and parameter bytes per device
(measured on a loaded model, or counted abstractly for a preset, e.g. the README's InternVL-14B figures).

  mesh = make_mesh("fsdp=4,tensor=2")         # a Mesh over all devices; None for None / "" / "none"
  x, n = pad_batch(x, mesh); place_batch(x, mesh)   # rows padded to a multiple of data x fsdp x expert, then split
  param_bytes(model) -> {"total": int, "per_device": int}
  python -m internvl_jax.evaluate.placement [--model internvl_14b] [--mesh fsdp=8 ...]   # a markdown table
"""

from __future__ import annotations

import argparse
import contextlib
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from internvl_jax import sharding

DTYPES = ("float32", "bfloat16")


def parse_mesh(text: str | None) -> dict[str, int] | None:
  """'fsdp=4,tensor=2' -> {'data': 1, 'fsdp': 4, 'tensor': 2}; None, '' or 'none' -> None (one device). One axis
  may be -1 (the remaining devices). Raises a one-line ValueError for anything else."""
  if text is None or text.strip().lower() in ("", "none"):
    return None
  sizes = {a: 1 for a in sharding.MESH_AXES}
  seen = set()
  for part in text.split(","):
    axis, eq, value = (s.strip() for s in part.partition("="))
    if not eq or axis not in sizes or axis in seen or not (value == "-1" or value.isdigit() and int(value) >= 1):
      raise ValueError(f"--mesh {text!r}: {part.strip()!r} is not axis=size with a distinct axis in "
                       f"{', '.join(sharding.MESH_AXES)} and size >= 1 (or -1 once); e.g. --mesh fsdp=4,tensor=2")
    seen.add(axis)
    sizes[axis] = int(value)
  if list(sizes.values()).count(-1) > 1:
    raise ValueError(f"--mesh {text!r}: only one axis may be -1")
  return sizes


def make_mesh(text: str | None) -> Mesh | None:
  """The ('data', 'fsdp', 'expert', 'tensor') mesh of a --mesh string over all of jax.devices(), or None (see
  parse_mesh).
  The mesh must use every device: a one-line ValueError says how many there are."""
  sizes = parse_mesh(text)
  if sizes is None:
    return None
  n = jax.device_count()
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if (-1 in sizes.values() and n % fixed) or (-1 not in sizes.values() and fixed != n):
    raise ValueError(f"--mesh {text!r} needs {fixed} devices{' (or a multiple)' if -1 in sizes.values() else ''} "
                     f"but JAX sees {n}; make the sizes multiply to {n} (e.g. --mesh fsdp={n})")
  return sharding.make_mesh(sizes)


def mesh_context(mesh: Mesh | None):
  """Context in which the models' activation constraints (sharding.constrain) follow `mesh` while tracing."""
  return contextlib.nullcontext() if mesh is None else jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def batch_multiple(mesh: Mesh | None) -> int:
  """How many ways a batch is split: data x fsdp x expert (1 without a mesh; sharding.batch_ways)."""
  return sharding.batch_ways(mesh)


def pad_batch(x: Any, mesh: Mesh | None) -> tuple[Any, int]:
  """Pads the leading axis of an array (or of every leaf of a pytree) to a multiple of batch_multiple(mesh) by
  repeating the last row, so that the batch splits evenly over the devices. Returns (padded, original rows)."""
  leaves = jax.tree.leaves(x)
  n = int(np.shape(leaves[0])[0])
  extra = -n % batch_multiple(mesh)
  if extra:
    x = jax.tree.map(lambda a: np.concatenate([np.asarray(a), np.repeat(np.asarray(a)[-1:], extra, 0)]), x)
  return x, n


def place_batch(x: Any, mesh: Mesh | None) -> Any:
  """Arrays (or a pytree of them) -> device arrays: the leading axis split over ('data', 'fsdp', 'expert') where it
  divides (sharding.leading_axis_sharding), replicated otherwise; on the default device without a mesh."""
  if mesh is None:
    return jax.tree.map(jnp.asarray, x)
  return jax.tree.map(lambda a: jax.device_put(a, sharding.leading_axis_sharding(mesh, np.shape(a))), x)


def _shard_bytes(shape, dtype, sharding_) -> int:
  shard = shape if sharding_ is None else sharding_.shard_shape(tuple(shape))
  return math.prod(shard) * jnp.dtype(dtype).itemsize


def param_bytes(model: nnx.Module) -> dict[str, int]:
  """Bytes of the model's variables: {"total": all of them, "per_device": what one device holds (the largest
  shard of each; numpy / single-device arrays count whole)}."""
  total = per_device = 0
  for leaf in jax.tree.leaves(nnx.state(model)):
    total += math.prod(np.shape(leaf)) * leaf.dtype.itemsize
    per_device += _shard_bytes(np.shape(leaf), leaf.dtype, getattr(leaf, "sharding", None))
  return {"total": total, "per_device": per_device}


def abstract_param_bytes(build, mesh_shape: dict[str, int] | None, dtype: str = "float32") -> dict[str, int]:
  """param_bytes of the model `build()` returns, without allocating or needing devices: shapes from
  nnx.eval_shape, every variable cast to `dtype` (as convert.load_pretrained does), layout by the sharding rules
  on an abstract mesh of `mesh_shape` (None = one device)."""
  if mesh_shape is not None and min(mesh_shape.values()) < 1:
    raise ValueError(f"mesh {mesh_shape}: an abstract count needs every axis size (no -1)")
  state = nnx.state(nnx.eval_shape(build))
  size = jnp.dtype(dtype).itemsize
  if mesh_shape is None:
    shardings = jax.tree.map(lambda _: None, state)
  else:
    mesh = jax.sharding.AbstractMesh(tuple(mesh_shape.get(a, 1) for a in sharding.MESH_AXES), sharding.MESH_AXES)
    sharding.check_divisible(state, mesh)
    shardings = sharding.param_shardings(state, mesh)
  total = per_device = 0
  for leaf, sh in zip(jax.tree.leaves(state), jax.tree.leaves(shardings, is_leaf=lambda s: s is None)):
    total += math.prod(leaf.shape) * size
    per_device += _shard_bytes(leaf.shape, dtype, sh)
  return {"total": total, "per_device": per_device}


def describe(model: nnx.Module, mesh: Mesh | None) -> dict[str, Any]:
  """What eval.py records in the result JSON: parameter dtype(s), mesh shape (None = one device), device count
  and parameter bytes (total and per device)."""
  dtypes = sorted({jnp.dtype(leaf.dtype).name for leaf in jax.tree.leaves(nnx.state(model))})
  sizes = param_bytes(model)
  return {"dtype": "+".join(dtypes), "mesh": None if mesh is None else {k: int(v) for k, v in mesh.shape.items()},
          "devices": 1 if mesh is None else int(mesh.size), "param_bytes_total": sizes["total"],
          "param_bytes_per_device": sizes["per_device"]}


def gib(n: int) -> str:
  """Bytes as GiB and GB (GB = 1e9 bytes)."""
  return f"{n / 2**30:.2f} GiB ({n / 1e9:.1f} GB)"


# The released InternVL-14B-224px (InternVL-C and -G in one checkpoint) as its config.json describes it: the
# InternViT-6B of DESIGN §4 and a LLaMA-7B-shaped QLLaMA whose vocabulary (49954, Chinese-LLaMA) is larger than
# LLaMA's, with its own LM head. Used for the README's per-device figures.
INTERNVL_14B = dict(
    model_type="internvl", clip_embed_dim=768, attn_pool_num_heads=16, num_query_token=96,
    cross_attention_frequency=2, force_image_size=224,
    vision_config=dict(model_type="intern_vit_6b", hidden_size=3200, num_hidden_layers=48, num_attention_heads=25,
                       intermediate_size=12800, qkv_bias=False, qk_normalization=True, norm_type="rms_norm",
                       layer_norm_eps=1e-6, image_size=224, patch_size=14, hidden_act="gelu"),
    qllama_config=dict(model_type="llama", vocab_size=49954, hidden_size=4096, num_hidden_layers=32,
                       num_attention_heads=32, intermediate_size=11008, rms_norm_eps=1e-6,
                       tie_word_embeddings=False))


def _builder(name: str):
  from internvl_jax.convert import configs
  from internvl_jax.models import internvl, presets
  if name == "internvl_14b":
    cfg = configs.contrastive_from_14b(INTERNVL_14B, "g")
  elif name.startswith("chat:"):
    cfg = presets.chat(name[5:])
    return lambda: internvl.InternVLChat(cfg, rngs=nnx.Rngs(0))
  else:
    cfg = presets.contrastive(name)
  return lambda: internvl.InternVLContrastive(cfg, rngs=nnx.Rngs(0))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description="parameter bytes per device of a model, counted abstractly")
  parser.add_argument("--model", default="internvl_14b", help="internvl_14b (the released InternVL-G/C "
                      "checkpoint), a contrastive preset (internvl_c, tiny, ...) or chat:PRESET")
  parser.add_argument("--mesh", action="append", help="mesh shapes to list, e.g. fsdp=8 (repeatable; default: "
                      "none, fsdp=4, fsdp=8, fsdp=4,tensor=2)")
  args = parser.parse_args(argv)
  build = _builder(args.model)
  print("| model | dtype | mesh | parameters in all | per device |\n|---|---|---|---|---|")
  for text in args.mesh or ["none", "fsdp=4", "fsdp=8", "fsdp=4,tensor=2"]:
    for dtype in DTYPES:
      try:
        b = abstract_param_bytes(build, parse_mesh(text), dtype)
      except ValueError as e:
        raise SystemExit(f"error: {e}") from None
      print(f"| {args.model} | {dtype} | {text} | {gib(b['total'])} | {gib(b['per_device'])} |")


if __name__ == "__main__":
  main()

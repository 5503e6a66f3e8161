"""load_pretrained: a local Hugging Face-format folder -> one of our nnx models with its weights.

The model is built abstractly (nnx.eval_shape: no memory), every source tensor's shape is checked against the
key map from the safetensors headers before anything is read, then tensors stream one at a time: read (mmap),
convert in numpy, cast, place. A stacked parameter [L, ...] is preallocated on its devices and filled layer by
layer with a donated in-place update, so host memory peaks near one tensor plus the model itself.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from internvl_jax import sharding as shd
from internvl_jax.convert import families, files, keymaps
from internvl_jax.convert.configs import ConversionError
from internvl_jax.models import layers

_FEW = 5  # how many names an error message lists


def _few(names) -> str:
  names = sorted(names)
  more = f" (and {len(names) - _FEW} more)" if len(names) > _FEW else ""
  return ", ".join(names[:_FEW]) + more


def set_dtype(cfg, dtype) -> None:
  """Sets the compute dtype of every tower of a model config (vision / language / text / itself)."""
  name = jnp.dtype(dtype).name
  for key in ("vision", "language", "text"):
    if key in cfg:
      cfg[key].dtype = name
  if "dtype" in cfg:
    cfg.dtype = name


@functools.lru_cache(maxsize=256)
def _piece_setter(sharding, depth: int):
  """buf[L, ...] (or [L, E, ...]), x, index int32 [depth] -> buf with slot index (layer, or layer and expert)
  replaced, updated in place (donated) and kept in `sharding`."""
  def put(buf, x, index):
    x = x.astype(buf.dtype).reshape((1,) * depth + x.shape)
    return jax.lax.dynamic_update_slice(buf, x, tuple(index) + (0,) * (buf.ndim - depth))
  return jax.jit(put, donate_argnums=0, out_shardings=sharding)


def check(spec: families.Spec, targets: dict, ckpt: files.Checkpoint) -> None:
  """Every target covered once; no missing, unexpected or mis-shaped tensor (one message naming them)."""
  by_target = {r.target: r for r in spec.rules}
  uncovered = set(targets) - set(by_target)
  unknown = set(by_target) - set(targets)
  if uncovered or unknown:  # a bug in a key map, not in the user's files
    raise AssertionError(f"key map for {spec.family} does not match the model: no rule for {_few(uncovered)}; "
                         f"rules for absent parameters {_few(unknown)}")
  needed = {}
  for target, var in targets.items():
    for _, names, shape in by_target[target].pieces(var.shape):
      for name, exp in zip(names, by_target[target].transform.source_shapes(shape)):
        needed[name] = tuple(exp)
  present = ckpt.names()
  missing = set(needed) - present
  if missing:
    raise ConversionError(f"checkpoint {ckpt.folder!r} ({spec.family}) is missing {len(missing)} tensor(s) the "
                          f"model needs: {_few(missing)}")
  unexpected = {n for n in present - set(needed) - spec.ignored if not keymaps.is_ignored(n)}
  if unexpected:
    raise ConversionError(f"checkpoint {ckpt.folder!r} ({spec.family}) has {len(unexpected)} unexpected tensor(s) "
                          f"that this model does not use: {_few(ckpt.disk_name(n) for n in unexpected)}")
  for name, exp in needed.items():
    found = ckpt.shape(name)
    if found != exp:
      raise ConversionError(f"tensor {ckpt.disk_name(name)!r} has shape {found}, expected {exp} "
                            f"(from config.json of {ckpt.folder!r})")


def _shardings(state: nnx.State, mesh: Mesh | None) -> dict:
  if mesh is None:
    single = SingleDeviceSharding(jax.devices()[0])
    return {path: single for path, _ in nnx.to_flat_state(state)}
  shd.check_divisible(state, mesh)  # a one-line error naming the parameter, not jax's IndivisibleError
  flat = nnx.to_flat_state(shd.param_shardings(state, mesh))
  return {path: var.get_value() for path, var in flat}


def model_config(path: str, *, image_token_id: int | None = None, variant: str = "g") -> ml_collections.ConfigDict:
  """The model config load_pretrained(path) would build (ours, as a ConfigDict), from config.json and the tensors'
  names and shapes only: no weight is read."""
  hf = files.read_config(path)
  family = families.detect(hf)
  with files.Checkpoint(path, families.canonical(family)) as ckpt:
    return families.build(family, hf, ckpt, image_token_id=image_token_id, variant=variant).config


def _check_finite(x, names, found: list[str]) -> None:
  """Appends the source tensor names of x to found when x holds NaN or Inf (float tensors only)."""
  x = np.asarray(x)
  if x.dtype.kind not in "biu" and not np.isfinite(x).all():
    found.extend(n for n in names if n not in found)


def load_pretrained(path: str, dtype=jnp.float32, mesh: Mesh | None = None, *, image_token_id: int | None = None,
                    variant: str = "g", strict: bool = False):
  """Loads a local checkpoint folder (config.json + *.safetensors, optionally sharded with an index).

  Returns an nnx model (InternViT, Decoder, InternVLChat or InternVLContrastive) whose parameters are `dtype`
  (default float32) and whose config (model.config) computes in `dtype`; with `mesh`, parameters are placed with
  the shardings of internvl_jax.sharding. image_token_id overrides the <IMG_CONTEXT> id of OpenGVLab chat
  checkpoints (read from the tokenizer files otherwise); variant picks InternVL-C ('c') or InternVL-G ('g', the
  default) from an InternVL-14B checkpoint. Tensors holding NaN / Inf are named in a warning (a damaged or
  badly converted checkpoint), or refused with strict=True.
  """
  hf = files.read_config(path)
  family = families.detect(hf)
  dtype = layers.to_dtype(dtype)
  with files.Checkpoint(path, families.canonical(family)) as ckpt:
    spec = families.build(family, hf, ckpt, image_token_id=image_token_id, variant=variant)
    cfg = spec.config
    set_dtype(cfg, dtype)
    abstract = nnx.eval_shape(lambda: spec.model_class(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = list(nnx.to_flat_state(state))
    targets = {".".join(map(str, p)): v for p, v in flat}
    check(spec, targets, ckpt)
    shardings = _shardings(state, mesh)
    by_target = {r.target: r for r in spec.rules}
    loaded, nonfinite = [], []
    for p, var in flat:
      rule = by_target[".".join(map(str, p))]
      sharding = shardings[p]
      if rule.stacked:  # one layer (or one expert of one layer) at a time, written in place
        value = jnp.zeros(var.shape, dtype, device=sharding)
        for index, names, _ in rule.pieces(var.shape):
          x = rule.transform.load(*(ckpt.read(n) for n in names))
          _check_finite(x, names, nonfinite)
          value = _piece_setter(sharding, len(index))(value, np.asarray(x).astype(dtype), np.asarray(index, np.int32))
      else:
        x = rule.transform.load(*(ckpt.read(n) for n in rule.sources))
        _check_finite(x, rule.sources, nonfinite)
        value = jax.device_put(np.asarray(x).astype(dtype), sharding)
      loaded.append((p, var.replace(value=value)))
  if nonfinite:
    shown = ", ".join(nonfinite[:8]) + (f" and {len(nonfinite) - 8} more" if len(nonfinite) > 8 else "")
    message = f"{path}: {len(nonfinite)} tensors hold NaN or Inf values ({shown})"
    if strict:
      raise ConversionError(message + "; the checkpoint is damaged or was saved from a diverged run")
    logging.warning("%s; the model will compute NaN where they are used (--strict refuses such checkpoints)",
                    message)
  model = nnx.merge(graphdef, nnx.from_flat_state(loaded))
  logging.info("loaded %s checkpoint %s (%d parameters)", family, path, len(loaded))
  return model

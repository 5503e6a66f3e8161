"""Our own checkpoint of a converted model: an Orbax checkpoint in train.py's workdir layout plus the model config.

Layout written by `save_checkpoint(model, out_dir)` (and `python -m internvl_jax.convert import`):
  out_dir/model_config.json          {"kind": "vision" | "language" | "chat", "config": <ConfigDict as JSON>}
  out_dir/checkpoints/0/state/       Orbax StandardSave of {"params": nnx.state(model, nnx.Param).to_pure_dict()}
  out_dir/checkpoints/0/data/        Orbax JsonSave of {} (train.py's data-iterator slot)
so `config.init.path=out_dir` in train.py reads the parameters by their nnx paths (e.g. vision/blocks/attn/qkv/
kernel), and `load_checkpoint(out_dir)` rebuilds the model.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from internvl_jax import sharding as shd
from internvl_jax.convert import families
from internvl_jax.convert.configs import ConversionError

MODEL_CONFIG = "model_config.json"
ITEMS = ("state", "data")
KINDS, model_kind = families.KINDS, families.model_kind


def is_checkpoint(folder: str) -> bool:
  return os.path.isfile(os.path.join(folder, MODEL_CONFIG))


def _manager(folder: str, read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(create=not read_only, read_only=read_only, enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(folder), "checkpoints"), options=options,
                               item_names=ITEMS)


def save_checkpoint(model: nnx.Module, out_dir: str, step: int = 0) -> str:
  """Writes the layout above; returns the step folder."""
  os.makedirs(out_dir, exist_ok=True)
  manager = _manager(out_dir)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params}),
                                             data=ocp.args.JsonSave({})))
  manager.wait_until_finished()
  manager.close()
  with open(os.path.join(out_dir, MODEL_CONFIG), "w") as f:
    json.dump({"kind": model_kind(model), "config": json.loads(model.config.to_json())}, f, indent=2)
  return os.path.join(out_dir, "checkpoints", str(step))


def load_checkpoint(folder: str, mesh: Mesh | None = None, step: int | None = None) -> nnx.Module:
  """Rebuilds the model of a folder written by save_checkpoint (or a train.py workdir holding model_config.json):
  the latest step unless `step`, parameters placed with the sharding rules when `mesh` is given."""
  if not is_checkpoint(folder):
    raise ConversionError(f"{folder!r} has no {MODEL_CONFIG}; it is not a checkpoint written by "
                          "`python -m internvl_jax.convert import`")
  with open(os.path.join(folder, MODEL_CONFIG)) as f:
    meta = json.load(f)
  if meta.get("kind") not in KINDS:
    raise ConversionError(f"{MODEL_CONFIG} names an unknown model kind {meta.get('kind')!r}")
  cfg = ml_collections.ConfigDict(meta["config"])
  abstract = nnx.eval_shape(lambda: KINDS[meta["kind"]](cfg, rngs=nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  if mesh is None:
    single = SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: single, params)
  else:
    shardings = shd.param_shardings(params, mesh)
  target = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), params, shardings)
  manager = _manager(folder, read_only=True)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise ConversionError(f"{folder!r} holds no finished checkpoint")
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore({"params": nnx.to_pure_dict(target)}), data=ocp.args.JsonRestore()))
  manager.close()
  nnx.replace_by_pure_dict(params, restored["state"]["params"])
  return nnx.merge(graphdef, params, rest)


__all__ = ["save_checkpoint", "load_checkpoint", "is_checkpoint", "model_kind"]

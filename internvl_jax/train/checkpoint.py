"""Checkpoints with Orbax CheckpointManager: the train state plus the data iterator's state, saved together.

Layout: WORKDIR/checkpoints/<step>/{state, data}. Saves are asynchronous (training continues while arrays are
written); the last `keep` are kept. Restoring takes the target's shardings, so a checkpoint written on one mesh
restores onto another. Reading only the parameters of a checkpoint (to initialise another run) goes through
numpy on the host.

A LoRA run (config.use_llm_lora / use_backbone_lora) saves its state without `frozen` (the base model): only the
trained parameters (adapters, projector, ...) and the optimizer state. The base is rebuilt at restart, as the
run began: the seeded initialisation, then config.init.path (init_from.rebuild_frozen), so resuming is exact as
long as init.path still holds the same weights; read_params rebuilds it the same way from the workdir's
config.json.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

ITEMS = ("state", "data")
DAMAGED_DIR = "checkpoints_damaged"  # where checkpoints that do not restore are moved (never deleted)


class CheckpointError(RuntimeError):
  """No checkpoint of a workdir restores."""


def _reason(e: BaseException) -> str:
  """The first line of an Orbax / TensorStore error (they run to dozens of lines)."""
  text = " ".join(str(e).split("\n")[0].split())
  return f"{type(e).__name__}: {text[:300]}"


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


class Checkpointer:
  """save / restore / latest_step over WORKDIR/checkpoints."""

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True, save_frozen: bool = True):
    self.save_frozen = save_frozen  # False: a LoRA run, whose frozen base is rebuilt from config.init at restart
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
    self.root = checkpoint_dir(workdir)
    self.manager = ocp.CheckpointManager(self.root, options=options, item_names=ITEMS)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict, *, force: bool = False) -> bool:
    """Starts an (async) save of state + data_state at `step`; returns whether a save started."""
    state = state if self.save_frozen else {k: v for k, v in state.items() if k != "frozen"}
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state))
    return self.manager.save(step, args=args, force=force)

  def restore(self, step: int, target) -> tuple[dict, dict]:
    """target: the state's ShapeDtypeStructs with shardings. Returns (state, data_state); without `frozen` when
    save_frozen is False (the caller rebuilds it)."""
    target = target if self.save_frozen else {k: v for k, v in target.items() if k != "frozen"}
    args = ocp.args.Composite(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore())
    out = self.manager.restore(step, args=args)
    return out["state"], out["data"]

  def restore_latest_good(self, target) -> tuple[int, dict, dict, list[str]] | None:
    """Restores the newest checkpoint that restores: (step, state, data_state, skipped) where skipped says which
    newer ones did not and why; None when there is none. Those are moved to WORKDIR/checkpoints_damaged/ (kept for
    inspection; a later save of the same step needs the name free). If no checkpoint restores, nothing is moved
    and CheckpointError names the newest one's reason."""
    steps = sorted(self.manager.all_steps(), reverse=True)
    failed = []
    for step in steps:
      try:
        state, data = self.restore(step, target)
      except Exception as e:  # Orbax / TensorStore raise many types for damaged files
        failed.append((step, _reason(e)))
        logging.warning("checkpoint %d of %s does not restore: %s", step, self.root, failed[-1][1])
        continue
      skipped = [f"step {s} ({why}) moved to {self._set_aside(s)}" for s, why in failed]
      if failed:
        self.manager.reload()
      return step, state, data, skipped
    if failed:
      step, why = failed[0]
      raise CheckpointError(f"no checkpoint in {self.root} restores (newest, step {step}: {why}); if the model or "
                            "optimizer config changed, resume with the config of the run, else move the damaged "
                            "step folders away")
    return None

  def _set_aside(self, step: int) -> str:
    dest_root = os.path.join(os.path.dirname(self.root), DAMAGED_DIR)
    os.makedirs(dest_root, exist_ok=True)
    dest = os.path.join(dest_root, str(step))
    if os.path.exists(dest):
      dest = f"{dest}.{time.strftime('%Y%m%d-%H%M%S')}"
    os.rename(os.path.join(self.root, str(step)), dest)
    return dest

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


@contextlib.contextmanager
def _quiet_orbax():
  """Hides Orbax's warnings about a read-only manager and the per-item metadata file (a workdir read by eval.py or
  config.init is read-only on purpose; the warnings are noise to a user); errors still show."""
  # the "absl" logger's own level, not absl's get/set_verbosity: under absl.app that reads the --verbosity flag
  # (INFO by default), so restoring it would undo train.py's WARNING level and let Orbax's INFO lines through
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def read_params(workdir: str, step: int | None = None, shardings: dict | None = None,
                dtype=None) -> tuple[dict, int]:
  """See _read_params; Orbax's read-only warnings hidden."""
  with _quiet_orbax():
    return _read_params(workdir, step, shardings, dtype)


def _read_params(workdir: str, step: int | None = None, shardings: dict | None = None,
                 dtype=None) -> tuple[dict, int]:
  """The model variables (params and frozen, merged into one nested dict of numpy arrays) of a workdir's
  checkpoint (the latest unless `step`), with the step read. For initialising another run from it, or evaluating.

  shardings: a nested dict of jax Shardings shaped like that merged dict (e.g. nnx.to_pure_dict of
  sharding.param_shardings): each array is then read straight into its sharding as a jax.Array, with no full
  copy on the host. dtype: cast while reading (e.g. bfloat16)."""
  root = checkpoint_dir(workdir)
  if not os.path.isdir(root):
    raise FileNotFoundError(f"{workdir} holds no checkpoints/ folder; config.init.path must be a workdir of "
                            "train.py (or a Hugging Face folder)")
  manager = ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(read_only=True), item_names=ITEMS)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"{root} holds no finished checkpoint; train longer or pick another config.init.path")
  path = os.path.join(root, str(step), "state")
  checkpointer = ocp.PyTreeCheckpointer()
  meta = checkpointer.metadata(path)
  tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree
  wanted = {k: tree[k] for k in ("params", "frozen") if k in tree}
  rebuilt = {}
  if "frozen" not in wanted:  # a LoRA run's checkpoint: the base comes from its config (seed, init.path)
    from internvl_jax.train import init_from  # local: init_from reads checkpoints through this module
    rebuilt = init_from.frozen_of_workdir(workdir)
  if shardings is None:
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype), wanted)
  else:
    key = lambda path: tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    by_path = {key(p): s for p, s in jax.tree_util.tree_leaves_with_path(shardings)}
    # the checkpoint splits variables into params / frozen; shardings are keyed by the model's own paths
    restore_args = jax.tree_util.tree_map_with_path(
        lambda p, _: ocp.ArrayRestoreArgs(sharding=by_path[key(p)[1:]], dtype=dtype), wanted)
  out = checkpointer.restore(path, args=ocp.args.PyTreeRestore(item=wanted, restore_args=restore_args,
                                                               partial_restore=True))
  manager.close()
  frozen = out.get("frozen", {})
  if rebuilt:
    frozen = jax.tree.map(lambda x: np.asarray(x, dtype) if dtype is not None else x, rebuilt)
    if shardings is not None:
      frozen = jax.tree_util.tree_map_with_path(lambda p, x: jax.device_put(x, by_path[key(p)]), frozen)
  return _deep_merge(out.get("params", {}), frozen), step


def _deep_merge(a: dict, b: dict) -> dict:
  out = dict(a)
  for k, v in b.items():
    out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
  return out

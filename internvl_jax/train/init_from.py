"""Initialising a run from another one (config.init): a workdir of train.py or a Hugging Face folder.

Every parameter of the new model is looked up by its path (e.g. vision/blocks/attn/qkv/kernel):
  copied   same path, same shape: the value is copied
  partial  same path and rank, different shape, and init.partial=True: the overlapping leading block
           [:min(a, b) per axis] is copied, the rest keeps its fresh initialisation (progressive scaling: a wider
           or deeper model starts from a smaller one; with scanned layers the 'layers' axis is the first, so extra
           layers stay fresh)
  fresh    no such path in the source: freshly initialised
With init.partial=False a shape mismatch is an error naming the parameter. Counts are reported per group (the
first path component: vision, language, mlp1, ...). A source that matches no parameter at all is an error (a wrong
path or model, which would otherwise train from scratch), and so, with init.partial=False, is a group that is
loaded only in part (names that drifted): a group the source does not hold at all stays fresh (stage 3 takes the
vision tower of stage 1 and starts its language model fresh); LoRA adapters are always fresh.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
from flax import nnx

from internvl_jax.train import checkpoint as checkpoint_lib


def _flatten(tree: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    path = f"{prefix}/{k}" if prefix else str(k)
    if isinstance(v, dict):
      out.update(_flatten(v, path))
    else:
      out[path] = v
  return out


def is_workdir(path: str) -> bool:
  """A train.py workdir (it has checkpoints/), whatever else it holds (its config.json too)."""
  return bool(path) and os.path.isdir(os.path.join(path, "checkpoints"))


def is_release_folder(path: str) -> bool:
  """A released model folder (config.json + weights), as opposed to a train.py workdir."""
  return bool(path) and not is_workdir(path) and os.path.isfile(os.path.join(path, "config.json"))


def load_source(path: str) -> dict:
  """Nested dict of numpy arrays from a train.py workdir or a Hugging Face folder."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"config.init.path={path} does not exist; give a train.py workdir or a HF folder")
  if is_workdir(path):
    params, step = checkpoint_lib.read_params(path)
    logging.info("init: read step %d of %s", step, path)
    return _merge_lora(path, params)
  if is_release_folder(path):
    from internvl_jax.convert import load_pretrained  # imported here: it pulls in every checkpoint family

    # load_pretrained returns a model; its variables' paths (vision/blocks/...) are the train state's paths.
    model = load_pretrained(path)
    logging.info("init: read the Hugging Face folder %s", path)
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
  raise FileNotFoundError(f"config.init.path={path} has neither checkpoints/ (a train.py workdir) nor "
                          "config.json (a Hugging Face folder)")


def _merge_lora(workdir: str, params: dict) -> dict:
  """A LoRA run's variables with its adapters merged into the base kernels (so a later run starts from the tuned
  model, with fresh adapters if it uses LoRA again); other runs' unchanged."""
  import json

  import ml_collections

  from internvl_jax.models import lora  # local: the models are imported lazily here

  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return params
  with open(path) as f:
    cfg = ml_collections.ConfigDict(json.load(f))
  if cfg.get("task") != "instruct" or not any(lora.lora_args(cfg.model[t]) for t in ("language", "vision")):
    return params
  logging.info("init: merged the LoRA adapters of %s into its base weights", workdir)
  return lora.merge_chat_params(params, cfg.model)[0]


def merge_into(target: dict, source: dict, *, partial: bool) -> tuple[dict, list[tuple[str, str, str]]]:
  """target: nested dict of arrays (the fresh model variables); source: nested dict of numpy arrays.
  Returns (new nested dict of numpy arrays, table rows (path, status, detail))."""
  flat_t, flat_s = _flatten(target), _flatten(source)
  rows, out = [], {}
  for path, fresh in flat_t.items():
    src = flat_s.get(path)
    if src is None:
      rows.append((path, "fresh", str(tuple(fresh.shape))))
      out[path] = fresh
      continue
    src = np.asarray(src)
    if tuple(src.shape) == tuple(fresh.shape):
      rows.append((path, "copied", str(tuple(fresh.shape))))
      out[path] = src.astype(fresh.dtype)
    elif partial and src.ndim == len(fresh.shape):
      block = tuple(slice(0, min(a, b)) for a, b in zip(src.shape, fresh.shape))
      value = np.array(fresh, copy=True)
      value[block] = src[block].astype(value.dtype)
      rows.append((path, "partial", f"{tuple(src.shape)} -> {tuple(fresh.shape)}"))
      out[path] = value
    else:
      raise ValueError(f"init: parameter {path} has shape {tuple(src.shape)} in config.init.path but "
                       f"{tuple(fresh.shape)} here; set config.init.partial=True to copy the overlap")
  return _unflatten(out, target), rows


def _unflatten(flat: dict, like: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in like.items():
    path = f"{prefix}/{k}" if prefix else str(k)
    out[k] = _unflatten(flat, v, path) if isinstance(v, dict) else flat[path]
  return out


def _is_adapter(path: str) -> bool:
  return "lora" in path.split("/")


def group_counts(rows: list[tuple[str, str, str]]) -> dict[str, dict[str, int]]:
  """{group: {copied, partial, fresh}} with group the first path component."""
  out: dict[str, dict[str, int]] = {}
  for path, status, _ in rows:
    counts = out.setdefault(path.split("/")[0], {"copied": 0, "partial": 0, "fresh": 0})
    counts[status] += 1
  return out


def format_table(rows: list[tuple[str, str, str]]) -> str:
  """The copied / partial / fresh table, then per-group counts and a total line."""
  width = max((len(r[0]) for r in rows), default=10)
  lines = [f"{'parameter':<{width}}  {'status':<8}  shape"]
  lines += [f"{p:<{width}}  {s:<8}  {d}" for p, s, d in rows]
  for group, c in group_counts(rows).items():
    lines.append(f"init group {group}: {c['copied']} copied, {c['partial']} partial, {c['fresh']} fresh")
  counts = {s: sum(1 for r in rows if r[1] == s) for s in ("copied", "partial", "fresh")}
  lines.append(f"init: {counts['copied']} copied, {counts['partial']} partial, {counts['fresh']} fresh")
  return "\n".join(lines)


def check_rows(rows: list[tuple[str, str, str]], path: str, partial: bool, source_names: list[str]) -> None:
  """Raises ValueError when the source matched nothing, or (partial=False) left part of a loaded group fresh."""
  if not any(status != "fresh" for _, status, _ in rows):
    ours = ", ".join(r[0] for r in rows[:3])
    theirs = ", ".join(source_names[:3]) or "none"
    raise ValueError(f"config.init.path={path} matches none of this model's {len(rows)} parameters (its names: "
                     f"{theirs}, ...; ours: {ours}, ...); check the path and the model preset")
  if partial:
    return
  for group in group_counts(rows):
    members = [r for r in rows if r[0].split("/")[0] == group and not _is_adapter(r[0])]
    missing = [p for p, status, _ in members if status == "fresh"]
    if missing and len(missing) < len(members):
      shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
      raise ValueError(f"config.init.path={path} holds only part of group {group!r}: {shown} not found there; "
                       "check that the source is the same architecture, or set config.init.partial=True to "
                       "start those fresh")


def initialize(state: dict, setup, init_cfg) -> tuple[dict, list]:
  """Replaces the state's params / frozen by values from init_cfg.path; returns (state, table rows)."""
  source = load_source(init_cfg.path)
  model_vars = {"params": state["params"], "frozen": state["frozen"]}
  host = {k: jax.tree.map(np.asarray, v) for k, v in model_vars.items()}
  new, rows = {}, []
  for k in ("params", "frozen"):
    new[k], r = merge_into(host[k], source, partial=init_cfg.get("partial", False))
    rows += r
  check_rows(rows, init_cfg.path, init_cfg.get("partial", False), sorted(_flatten(source)))
  placed = jax.device_put(new, {"params": setup.shardings["params"], "frozen": setup.shardings["frozen"]})
  return dict(state, **placed), rows


def rebuild_frozen(setup, init_cfg) -> dict:
  """The frozen variables of a run as they were at its start (seeded init, then init_cfg.path): how a LoRA run,
  whose checkpoints omit them, gets its base back. Returns them in the setup's shardings."""
  state = setup.create()
  if init_cfg.get("path"):
    state, _ = initialize(state, setup, init_cfg)
  return state["frozen"]


def frozen_of_workdir(workdir: str) -> dict:
  """rebuild_frozen for a finished or running train.py workdir, from its config.json: nested dict of numpy."""
  import json

  import ml_collections

  from internvl_jax import sharding
  from internvl_jax.train import state as state_lib  # local: state imports the models

  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{workdir} holds a LoRA checkpoint (no frozen base) but no config.json to rebuild the "
                            "base from")
  with open(path) as f:
    cfg = ml_collections.ConfigDict(json.load(f))
  if cfg.init.get("path") and not os.path.exists(cfg.init.path):
    raise FileNotFoundError(f"{workdir} is a LoRA run whose base model comes from config.init.path={cfg.init.path}, "
                            "which no longer exists; restore that folder")
  # built split over every local device (fsdp), then gathered to the host: one process only
  setup = state_lib.setup_state(cfg, cfg.model, sharding.make_mesh(devices=jax.local_devices()))
  return jax.tree.map(np.asarray, rebuild_frozen(setup, cfg.init))

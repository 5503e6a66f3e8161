"""Guards of a train.py workdir: one trainer at a time, and a resume only with the model its checkpoints hold.

  RunLock(workdir)            WORKDIR/run.lock held (fcntl.flock) for the whole run by process 0; the file names
                              the holder (host, pid, start time). The kernel drops the lock when the holder dies
                              (kill -9 included), so a stale file never blocks a restart.
  check_same_model(workdir, cfg)
                              before config.json is rewritten: a workdir with checkpoints refuses a config whose
                              model differs, naming the differing keys (config.json, which eval.py reads, stays).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time

LOCK_FILE = "run.lock"
# model keys that change how the same parameters are computed, not which parameters exist: a resume may change them
COMPUTE_KEYS = frozenset({"dtype", "remat", "attention_impl", "window_cache", "progress"})


class WorkdirError(ValueError):
  """The workdir cannot be used by this run (held by another trainer, or holding another model)."""


class RunLock:
  """An exclusive lock on WORKDIR/run.lock; raises WorkdirError naming the holder when another process has it."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.path = os.path.join(workdir, LOCK_FILE)
    self.enabled = enabled
    self._fd = None

  def __enter__(self):
    if not self.enabled:
      return self
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read_holder(fd)
      os.close(fd)
      raise WorkdirError(f"{os.path.dirname(self.path)} is in use by another trainer ({holder}); wait for it to "
                         "finish or stop it, or give another --workdir") from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                             "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
    os.fsync(fd)
    self._fd = fd
    return self

  def __exit__(self, *exc):
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None


def _read_holder(fd: int) -> str:
  try:
    info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    return f"host {info.get('host', '?')}, pid {info.get('pid', '?')}, since {info.get('started', '?')}"
  except (OSError, ValueError):
    return "holder unknown"


def _flatten(tree, prefix: str = "") -> dict:
  if not isinstance(tree, dict):
    return {prefix: tree}
  out = {}
  for k, v in tree.items():
    out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
  return out


def model_differences(saved: dict, new: dict) -> list[str]:
  """'key: saved -> new' for every model key whose value differs (compute-only keys, COMPUTE_KEYS, ignored)."""
  a, b = _flatten(saved), _flatten(new)
  out = []
  for key in sorted(set(a) | set(b)):
    if key.rsplit(".", 1)[-1] in COMPUTE_KEYS:
      continue
    va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
    if isinstance(va, (list, tuple)) and isinstance(vb, (list, tuple)):
      va, vb = list(va), list(vb)
    if va != vb:
      out.append(f"model.{key}: {va} -> {vb}")
  return out


def check_same_model(workdir: str, cfg, has_checkpoint: bool) -> None:
  """Raises WorkdirError when workdir holds checkpoints of a model other than cfg.model (see the module doc)."""
  path = os.path.join(workdir, "config.json")
  if not has_checkpoint or not os.path.exists(path):
    return
  with open(path) as f:
    saved = json.load(f)
  diffs = model_differences(saved.get("model", {}), cfg.model.to_dict())
  if saved.get("task", cfg.task) != cfg.task:
    diffs.insert(0, f"task: {saved.get('task')} -> {cfg.task}")
  if diffs:
    shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
    raise WorkdirError(f"{workdir} holds checkpoints of another model ({shown}); drop those overrides to resume "
                       "it, or give a new --workdir (with --config.init.path to start from it)")

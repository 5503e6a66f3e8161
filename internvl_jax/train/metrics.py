"""Run records: WORKDIR/metrics.jsonl (one JSON object per logged step), TensorBoard scalars (tensorboardX: event
files without TensorFlow), and at the end a PNG of the training curves (matplotlib)."""

from __future__ import annotations

import json
import math
import os

import jax
from tensorboardX import SummaryWriter


class MetricsLog:
  """write(step, metrics) -> metrics.jsonl + TensorBoard (process 0 only); keeps the history for the plot."""

  def __init__(self, workdir: str, resume_step: int = 0):
    """resume_step: the step the run (re)starts from; rows of metrics.jsonl past it (written after the checkpoint
    that was restored, and about to be replayed) are dropped, so each step appears once. The kept rows become the
    history, so the final curves cover the whole run."""
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.history: list[dict] = []
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      self.history = _keep_until(self.path, resume_step)
      self._f = open(self.path, "a", encoding="utf-8")
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=30)

  def write(self, step: int, metrics: dict) -> None:
    record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    self.history.append(record)
    if self.enabled:
      self._f.write(json.dumps(record) + "\n")
      self._f.flush()
      for tag, value in record.items():
        if tag != "step" and math.isfinite(value):
          self._tb.add_scalar(tag, value, step)
      self._tb.flush()  # a killed run keeps every logged step, as in metrics.jsonl

  def close(self) -> None:
    if self.enabled:
      self._f.close()
      self._tb.close()


def _keep_until(path: str, step: int) -> list[dict]:
  """Rewrites metrics.jsonl (atomically) without rows past `step` (and without a torn last line); returns the rows
  kept."""
  if not os.path.exists(path):
    return []
  kept, dropped = [], 0
  with open(path, encoding="utf-8", errors="replace") as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:  # a line cut by kill -9
        dropped += 1
        continue
      if isinstance(row, dict) and int(row.get("step", 0)) <= step:
        kept.append(row)
      else:
        dropped += 1
  if dropped:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(tmp, path)
  return kept


def plot_curves(history: list[dict], path: str, keys=("loss", "lr", "i2t_r1", "t2i_r1", "exact_match", "eval_loss"),
                size=(9.0, 2.6)) -> str | None:
  """One panel per metric present in `history` (rows {"step", metric: float}), side by side, against the step;
  saved as a PNG at `path`. Returns the path, or None if no metric has a finite value."""
  series = {k: [(h["step"], h[k]) for h in history if k in h and math.isfinite(h[k])] for k in keys}
  series = {k: v for k, v in series.items() if v}
  if not series:
    return None
  import matplotlib
  matplotlib.use("Agg")  # files only: no display is needed or wanted
  from matplotlib import pyplot as plt
  fig, axes = plt.subplots(1, len(series), figsize=size, squeeze=False)
  for ax, (name, pts) in zip(axes[0], series.items()):
    steps, values = zip(*pts)
    ax.plot(steps, values, marker="o" if len(pts) == 1 else None, markersize=3, linewidth=1.5)
    ax.set_title(name, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path

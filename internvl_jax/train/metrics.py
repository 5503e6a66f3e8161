"""Run records: WORKDIR/metrics.jsonl (one JSON object per logged step), TensorBoard scalars, and at the end a
PNG of the training curves (drawn with Pillow, so no plotting library is needed)."""

from __future__ import annotations

import json
import math
import os

import jax
from PIL import Image, ImageDraw

from internvl_jax.train import tensorboard


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
      self._tb = tensorboard.ScalarWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict) -> None:
    record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    self.history.append(record)
    if self.enabled:
      self._f.write(json.dumps(record) + "\n")
      self._f.flush()
      self._tb.add(step, {k: v for k, v in record.items() if k != "step" and math.isfinite(v)})

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
                size=(900, 260)) -> str | None:
  """One panel per metric present in `history`, side by side; returns the path or None if nothing to plot."""
  series = {k: [(h["step"], h[k]) for h in history if k in h and math.isfinite(h[k])] for k in keys}
  series = {k: v for k, v in series.items() if len(v) >= 1}
  if not series:
    return None
  w, h = size
  pw = w // len(series)
  img = Image.new("RGB", (pw * len(series), h), "white")
  draw = ImageDraw.Draw(img)
  for i, (name, pts) in enumerate(series.items()):
    x0, y0, x1, y1 = i * pw + 40, 20, (i + 1) * pw - 10, h - 30
    draw.rectangle((x0, y0, x1, y1), outline="black")
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    lo, hi = min(ys), max(ys)
    hi = hi if hi > lo else lo + 1e-9
    sx = lambda s: x0 + (x1 - x0) * (s - xs[0]) / max(xs[-1] - xs[0], 1)
    sy = lambda v: y1 - (y1 - y0) * (v - lo) / (hi - lo)
    line = [(sx(s), sy(v)) for s, v in pts]
    if len(line) > 1:
      draw.line(line, fill=(30, 90, 200), width=2)
    else:
      draw.ellipse((line[0][0] - 2, line[0][1] - 2, line[0][0] + 2, line[0][1] + 2), fill=(30, 90, 200))
    draw.text((x0 + 4, 4), name, fill="black")
    draw.text((x0 - 38, y0), f"{hi:.3g}", fill="black")
    draw.text((x0 - 38, y1 - 10), f"{lo:.3g}", fill="black")
    draw.text((x0, y1 + 6), f"step {xs[0]}", fill="black")
    draw.text((x1 - 60, y1 + 6), f"{xs[-1]}", fill="black")
  img.save(path)
  return path

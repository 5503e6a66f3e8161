"""Run records: TensorBoard scalars (read back with TensorBoard's reader), metrics.jsonl lines and the PNG plot."""

import json

import numpy as np

from internvl_jax.train import metrics


def test_tensorboard_reads_the_logged_scalars(tmp_path):
  """TensorBoard's own event reader (the `tensorboard` package, as the dashboard reads a run) finds every logged
  finite scalar at its step; non-finite values are left out rather than written."""
  from tensorboard.backend.event_processing import event_accumulator

  log = metrics.MetricsLog(str(tmp_path))
  log.write(10, {"loss": 2.5, "lr": 0.001, "grad_norm": float("nan")})
  log.write(20, {"loss": 1.25, "lr": 0.002})
  log.close()
  acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
  acc.Reload()
  assert set(acc.Tags()["scalars"]) == {"loss", "lr"}
  assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(10, 2.5), (20, 1.25)]
  assert [(e.step, round(e.value, 6)) for e in acc.Scalars("lr")] == [(10, 0.001), (20, 0.002)]


def test_metrics_log_and_plot(tmp_path):
  log = metrics.MetricsLog(str(tmp_path))
  for s in range(1, 4):
    log.write(s, {"loss": 1.0 / s, "lr": 0.1})
  log.close()
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert lines[0] == {"step": 1, "loss": 1.0, "lr": 0.1}
  assert metrics.plot_curves(log.history, str(tmp_path / "c.png"))
  from PIL import Image
  with Image.open(tmp_path / "c.png") as im:
    assert im.format == "PNG" and im.size == (900, 260)  # figsize 9 x 2.6 in at 100 dpi
    assert len(np.unique(np.asarray(im.convert("L")))) > 2  # something was drawn on the white
  assert metrics.plot_curves([{"step": 1, "other": 1.0}], str(tmp_path / "none.png")) is None

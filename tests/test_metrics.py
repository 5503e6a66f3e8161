"""Run records: TensorBoard framing (CRC-32C), metrics.jsonl lines and the PNG plot."""

import json
import struct

from internvl_jax.train import metrics, tensorboard


def test_crc32c_known_value():
  assert tensorboard.crc32c(b"123456789") == 0xE3069283  # the standard CRC-32C check value


def test_event_file_records_are_framed(tmp_path):
  w = tensorboard.ScalarWriter(str(tmp_path))
  w.add(3, {"loss": 1.5})
  w.close()
  data = next(tmp_path.iterdir()).read_bytes()
  n, offset, records = len(data), 0, []
  while offset < n:
    (length,) = struct.unpack("<Q", data[offset:offset + 8])
    (crc,) = struct.unpack("<I", data[offset + 8:offset + 12])
    assert crc == tensorboard._masked_crc(data[offset:offset + 8])
    records.append(data[offset + 12:offset + 12 + length])
    offset += 12 + length + 4
  assert len(records) == 2 and b"brain.Event:2" in records[0] and b"loss" in records[1]
  assert struct.pack("<f", 1.5) in records[1]


def test_metrics_log_and_plot(tmp_path):
  log = metrics.MetricsLog(str(tmp_path))
  for s in range(1, 4):
    log.write(s, {"loss": 1.0 / s, "lr": 0.1})
  log.close()
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert lines[0] == {"step": 1, "loss": 1.0, "lr": 0.1}
  assert metrics.plot_curves(log.history, str(tmp_path / "c.png"))
  assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"

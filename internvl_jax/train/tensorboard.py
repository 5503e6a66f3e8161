"""A minimal TensorBoard scalar writer with no TensorFlow dependency.

TensorBoard reads `events.out.tfevents.*` files: TFRecord framing (length, masked CRC-32C, payload, masked
CRC-32C) around serialized `Event` protos. Scalars need only a few fields, which we encode by hand:
  Event   {1: wall_time double, 2: step int64, 3: file_version string, 5: summary Summary}
  Summary {1: repeated Value}; Value {1: tag string, 2: simple_value float}
"""

from __future__ import annotations

import os
import socket
import struct
import time


def _crc32c_table() -> list[int]:
  table = []
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    table.append(c)
  return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  c = 0xFFFFFFFF
  for b in data:
    c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
  return c ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  c = crc32c(data)
  return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  out = bytearray()
  n &= (1 << 64) - 1
  while True:
    b = n & 0x7F
    n >>= 7
    out.append(b | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _field(num: int, wire: int, payload: bytes) -> bytes:
  return _varint((num << 3) | wire) + payload


def _bytes_field(num: int, data: bytes) -> bytes:
  return _field(num, 2, _varint(len(data)) + data)


def _event(step: int, *, summary: bytes | None = None, file_version: str | None = None) -> bytes:
  msg = _field(1, 1, struct.pack("<d", time.time())) + _field(2, 0, _varint(step))
  if file_version is not None:
    msg += _bytes_field(3, file_version.encode())
  if summary is not None:
    msg += _bytes_field(5, summary)
  return msg


class ScalarWriter:
  """add(step, {tag: float}) appends scalars to an event file in `logdir`."""

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
    self._f = open(os.path.join(logdir, name), "ab")
    self._write(_event(0, file_version="brain.Event:2"))

  def _write(self, record: bytes) -> None:
    header = struct.pack("<Q", len(record))
    self._f.write(header + struct.pack("<I", _masked_crc(header)) + record + struct.pack("<I", _masked_crc(record)))

  def add(self, step: int, scalars: dict) -> None:
    values = b"".join(_bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5, struct.pack("<f", float(v))))
                      for tag, v in scalars.items())
    self._write(_event(step, summary=values))
    self._f.flush()

  def close(self) -> None:
    self._f.close()

"""Packing of variable-length instruct examples into fixed-shape batches (config `data.packing`).

Without packing every example of stage 3 owns a row of max_text_len tokens and max_tiles tile slots that the
vision tower runs on even when unused. With packing a batch has a fixed budget of rows (batch_size rows of
max_text_len tokens) and of tiles (data.tiles_per_batch), both global; examples (features.instruct with
FeatureSpec.packed: real tiles and tokens only) are placed greedily in arrival order, each into the first row
with room for its tokens, while the batch's tile budget has room for its tiles. The first example that does not
fit closes the batch and starts the next one (arrival order is kept, so packing is a function of the example
stream: deterministic, and resumable from the parent iterator's state). An example that could not fit even an
empty batch is a bad record.

A packed batch (this host's share: rows R = batch_size / hosts, tiles N = tiles_per_batch / hosts):
  input_ids       int32 [R, T]        examples back to back in each row, then pad
  loss_mask       int32 [R, T]        0 on each example's first token (so that the shifted next-token targets
                                      never cross from one example into the next)
  attention_mask  int32 [R, T]        1 on every example token (segment_ids > 0)
  segment_ids     int32 [R, T]        0 = padding, 1, 2, ... the examples of the row in order (one example = one
                                      segment: a per-example loss reduction groups tokens by (row, segment))
  vision_index    int32 [R, T]        at each image token, the index of its vision token in the global batch's
                                      flat [tiles_per_batch * tokens_per_tile] vision tokens (0 elsewhere)
  pixel_values    float32 [N, S, S, 3] the examples' real tiles in row-major order of their image tokens, then
                                      zero tiles (never referenced by any image token)
Host h's tiles are rows [h * N, (h + 1) * N) of the global pixel_values, as its rows are of the global rows
(jax.make_array_from_process_local_data with the batch sharding), hence the offset in vision_index.
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np


@dataclasses.dataclass(frozen=True)
class PackSpec:
  rows: int  # rows of a batch (global: config.batch_size)
  max_len: int  # tokens per row (config.data.max_text_len)
  tiles: int  # tile budget of a batch (global: config.data.tiles_per_batch)
  image_size: int
  tokens_per_tile: int
  image_token_id: int
  pad_id: int = 0
  tile_offset: int = 0  # this host's first tile in the global batch (set by for_host)

  def for_host(self, hosts: int, host: int) -> PackSpec:
    """This host's share of the budgets (rows and tiles divided by the number of hosts)."""
    if self.rows % hosts or self.tiles % hosts:
      raise ValueError(f"batch_size {self.rows} and data.tiles_per_batch {self.tiles} must divide by the "
                       f"{hosts} hosts")
    tiles = self.tiles // hosts
    return dataclasses.replace(self, rows=self.rows // hosts, tiles=tiles, tile_offset=host * tiles)


def default_tiles_per_batch(batch_size: int, max_len: int, max_tiles: int, tokens_per_tile: int,
                            sample: list[dict] = (), hosts: int = 1) -> int:
  """data.tiles_per_batch = 0: derived from a sample of packed examples (train/loop.pack_spec: 32 records spread
  over the source): the tiles a row of max_len tokens holds at the sample's tiles-per-token rate, rounded up, so
  that tokens rather than tiles usually close a batch; two per row without a sample. Capped at the tiles whose
  image tokens fill a row (max_len // tokens_per_tile), and never below one example's max_tiles per host. A
  multiple of batch_size, so it splits like the batch."""
  tiles = sum(len(e["pixel_values"]) for e in sample)
  tokens = sum(len(e["input_ids"]) for e in sample)
  per_row = -(-max_len * tiles // tokens) if tokens else 2
  per_row = min(max(per_row, 1), max(1, max_len // tokens_per_tile))
  per_row = max(per_row, -(-max_tiles * hosts // batch_size))
  return batch_size * per_row


class BatchBuilder:
  """Collects examples (dicts of pixel_values [n, S, S, 3], input_ids [L], loss_mask [L]) into one batch."""

  def __init__(self, spec: PackSpec):
    self.spec = spec
    self.row_used = [0] * spec.rows
    self.tiles_used = 0
    self.items: list[tuple[int, int, dict]] = []  # (row, start, example)

  def never_fits(self, ex: dict) -> str | None:
    """Why the example cannot fit even an empty batch, or None."""
    n, length = len(ex["pixel_values"]), len(ex["input_ids"])
    if n > self.spec.tiles:
      return f"its {n} tiles exceed the batch's tile budget {self.spec.tiles} (data.tiles_per_batch per host)"
    if length > self.spec.max_len:
      return f"its {length} tokens exceed max_text_len {self.spec.max_len}"
    return None

  def add(self, ex: dict) -> bool:
    """Places the example in the first row with room (first fit); False when the tiles or the tokens do not fit
    (the batch is then full: the example starts the next one)."""
    n, length = len(ex["pixel_values"]), len(ex["input_ids"])
    if self.tiles_used + n > self.spec.tiles:
      return False
    for row, used in enumerate(self.row_used):
      if used + length <= self.spec.max_len:
        self.items.append((row, used, ex))
        self.row_used[row] += length
        self.tiles_used += n
        return True
    return False

  def __len__(self) -> int:
    return len(self.items)

  def build(self) -> dict:
    """-> the batch dict of the module docstring."""
    s = self.spec
    shape = (s.rows, s.max_len)
    ids = np.full(shape, s.pad_id, np.int32)
    loss, seg, vidx = (np.zeros(shape, np.int32) for _ in range(3))
    pixels = np.zeros((s.tiles, s.image_size, s.image_size, 3), np.float32)
    segments = [0] * s.rows
    tile = 0
    for row, start, ex in sorted(self.items, key=lambda x: x[:2]):  # tiles in row-major order of their tokens
      length, n = len(ex["input_ids"]), len(ex["pixel_values"])
      segments[row] += 1
      span = slice(start, start + length)
      ids[row, span], loss[row, span], seg[row, span] = ex["input_ids"], ex["loss_mask"], segments[row]
      loss[row, start] = 0  # an example's first token is never a target: the previous example does not predict it
      pixels[tile:tile + n] = ex["pixel_values"]
      image = np.flatnonzero(np.asarray(ex["input_ids"]) == s.image_token_id)
      if len(image) != n * s.tokens_per_tile:
        raise ValueError(f"an example holds {len(image)} image tokens for {n} tiles of {s.tokens_per_tile}")
      vidx[row, start + image] = (s.tile_offset + tile) * s.tokens_per_tile + np.arange(len(image))
      tile += n
    return {"pixel_values": pixels, "input_ids": ids, "attention_mask": (seg > 0).astype(np.int32),
            "loss_mask": loss, "segment_ids": seg, "vision_index": vidx}


def pack(examples, spec: PackSpec) -> list[dict]:
  """All examples (an iterable of packed features) -> batches, as the pipeline packs them; the last partial batch
  is kept. Raises ValueError for an example that can never fit (the pipeline counts it as a bad record)."""
  out, builder = [], BatchBuilder(spec)
  for ex in examples:
    reason = builder.never_fits(ex)
    if reason:
      raise ValueError(reason)
    if not builder.add(ex):
      out.append(builder.build())
      builder = BatchBuilder(spec)
      builder.add(ex)
  if len(builder):
    out.append(builder.build())
  return out


class _PackIterator(grain.DatasetIterator):
  """Packs the parent's examples into batches. State: the parent's state before the example that is held back
  for the next batch (it is read again after a restore: features are a function of the record's position)."""

  def __init__(self, parent, spec: PackSpec, tracker):
    super().__init__(parent)
    self._spec, self._tracker = spec, tracker
    self._held, self._held_state = None, None

  def __next__(self) -> dict:
    builder = BatchBuilder(self._spec)
    while True:
      if self._held is not None:
        ex, self._held = self._held, None
      else:
        state = self._parent.get_state()
        ex = next(self._parent)
        if ex is None:
          continue
        reason = builder.never_fits(ex)
        if reason:
          self._tracker.reject(reason)
          continue
      if not builder.add(ex):
        self._held, self._held_state = ex, state
        return builder.build()

  def get_state(self) -> dict:
    return {"parent": self._held_state if self._held is not None else self._parent.get_state()}

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state["parent"])
    self._held, self._held_state = None, None


class PackIterDataset(grain.IterDataset):
  """An IterDataset of packed batches over an IterDataset of packed instruct features (see module doc)."""

  def __init__(self, parent: grain.IterDataset, spec: PackSpec, tracker):
    super().__init__(parent)
    self._spec, self._tracker = spec, tracker

  def __iter__(self) -> _PackIterator:
    return _PackIterator(self._parent.__iter__(), self._spec, self._tracker)

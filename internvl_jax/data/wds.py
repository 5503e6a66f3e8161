"""WebDataset shards (the img2dataset layout) as a resumable grain IterDataset, and weighted mixtures of them.

A shard is a tar file whose members are grouped by sample key: `<key>.jpg|jpeg|png|webp` (the image), `<key>.txt`
(the caption) and/or `<key>.json` (its `caption_field`, default "caption", when there is no .txt). The key is the
member's path up to the first dot of its file name, as webdataset counts it.

Reading order (deterministic for a seed):
  epoch e: the shard list in an order drawn from (seed, e) (shuffle_shards), dealt to the hosts
  (jax process_index::process_count), and each host's share dealt to the pipeline's readers (grain's set_slice:
  the threads of grain.experimental.multithread_prefetch or the processes of mp_prefetch), so that every shard,
  hence every sample, is read by exactly one reader once per epoch.
  resampled=True: reader r of host h draws its c-th shard from all shards with replacement, from (seed, h, r, c);
  there are no epochs and the stream never ends.
  A window shuffle of shuffle_buffer samples (WindowShuffle) then shuffles within and across shards.

Exact resume: a reader's state is {epoch, cursor (its shard's position in its list for the epoch), offset (the byte
offset in that shard of the next sample's first tar header)}, so restoring is a seek; the window shuffle adds where
its window began and how far into it the run got, and re-reads that window's bytes (nothing is decoded) to rebuild
it. A few ints per reader, saved in the checkpoint with the rest of the pipeline state.

Bad data: a sample without an image or caption, and a shard that cannot be opened or ends mid-member (truncated)
or in a broken header, become one record with an `error` each, which the feature function turns into a counted
bad record (pipeline.BadRecordTracker); reading goes on with the next sample or shard. An undecodable image is
found (and counted) when the feature function decodes it.

The tars are read with Python's tarfile rather than the webdataset package: tarfile gives each member's byte
offset (TarInfo.offset), which is what makes the resume state a seek position; webdataset's iterators do not.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
import zlib

import braceexpand
import grain
import numpy as np

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_GLOB = re.compile(r"[*?\[]")


def split_top_level(text: str) -> list[str]:
  """'a{0,1}.tar,b.tar' -> ['a{0,1}.tar', 'b.tar']: commas inside braces belong to the brace pattern."""
  parts, depth, cur = [], 0, ""
  for ch in text:
    depth += (ch == "{") - (ch == "}")
    if ch == "," and depth == 0:
      parts.append(cur)
      cur = ""
    else:
      cur += ch
  return [p.strip() for p in parts + [cur] if p.strip()]


def expand_shards(spec) -> list[str]:
  """Shard paths of a pattern string ('/d/{00000..00099}.tar,/e/*.tar': brace ranges and alternatives, then glob,
  several comma-separated) or a list of patterns, in the order written (glob matches sorted)."""
  patterns = split_top_level(spec) if isinstance(spec, str) else [str(p) for p in spec]
  if not patterns:
    raise ValueError("data source 'wds' needs shards: set --config.data.train.path='/data/{00000..00099}.tar'")
  out = []
  for pattern in patterns:
    for path in braceexpand.braceexpand(pattern):
      if _GLOB.search(path):
        found = sorted(glob.glob(path))
        if not found:
          raise FileNotFoundError(f"wds pattern {path!r} matches no file; check config.data.<train|sources.X>.path")
        out += found
      else:
        out.append(path)
  if not os.path.exists(out[0]):
    raise FileNotFoundError(f"wds shard {out[0]} does not exist; check config.data.<train|sources.X>.path")
  return out


def _split_name(name: str) -> tuple[str, str]:
  folder, base = os.path.split(name)
  stem, _, ext = base.partition(".")
  return os.path.join(folder, stem), ext.lower()


class _ShardReader:
  """Reads one shard's samples from a byte offset: groups of consecutive members with the same key."""

  def __init__(self, path: str, offset: int):
    self.path = path
    self.file = open(path, "rb")
    try:
      self.file.seek(offset)
      self.tar = tarfile.open(fileobj=self.file, mode="r:")  # reads from the file's position: offsets stay absolute
    except BaseException:
      self.file.close()
      raise
    self.pending = None  # the next sample's first member, already read past when the previous sample ended

  def next_sample(self, skip: tuple[str, ...] = ()) -> tuple[str, dict, int] | None:
    """(key, {ext: bytes}, byte offset of the sample after it), or None at the end of the shard. Members whose
    extension is in `skip` are not read. Raises tarfile.ReadError / EOFError / OSError on a truncated shard."""
    key, parts = None, {}
    while True:
      member = self.pending or self.tar.next()
      self.pending = None
      self.tar.members = []  # tarfile keeps every header it read otherwise
      if member is None:
        self._check_clean_end()
        if key is None:
          return None
        return key, parts, self.tar.offset
      if not member.isfile():
        continue
      mkey, ext = _split_name(member.name)
      if key is None:
        key = mkey
      elif mkey != key:
        self.pending = member
        return key, parts, member.offset
      if ext not in skip:
        data = self.tar.extractfile(member).read()
        if len(data) != member.size:
          raise EOFError(f"member {member.name} is cut short")
        parts[ext] = data

  def _check_clean_end(self) -> None:
    # tarfile treats a cut-off header after the first as the end of the archive: look at what is left
    self.file.seek(self.tar.offset)
    if self.file.read(512).strip(b"\0"):
      raise tarfile.ReadError(f"broken or truncated tar header at byte {self.tar.offset}")

  def close(self) -> None:
    self.file.close()


def make_record(path: str, key: str, parts: dict, caption_field: str) -> dict:
  """A sample's members -> a source record (sources.py shape) with image_bytes, or one with an `error`."""
  rec = {"id": f"{path}:{key}", "key": key}
  ext = next((e for e in IMAGE_EXTS if e in parts), None)
  if ext is None:
    return dict(rec, error=f"sample has no image (.{'/.'.join(IMAGE_EXTS)}); members: {sorted(parts)}")
  captions = caption_of(parts, caption_field)
  if not captions:
    return dict(rec, error=f"sample has no caption (.txt, or field {caption_field!r} of .json)")
  return dict(rec, image_bytes=parts[ext], captions=captions)


def caption_of(parts: dict, caption_field: str) -> list[str]:
  if parts.get("txt", b"").strip():
    return [parts["txt"].decode("utf-8", "replace").strip()]
  if "json" in parts:
    try:
      value = json.loads(parts["json"]).get(caption_field)
    except (ValueError, AttributeError):
      return []
    values = [value] if isinstance(value, str) else list(value or []) if isinstance(value, list) else []
    return [str(v).strip() for v in values if str(v).strip()]
  return []


class WdsIterDataset(grain.IterDataset):
  """Endless (or `epochs` long) stream of source records from shards; see the module doc for order and state."""

  def __init__(self, shards: list[str], *, seed: int = 0, shuffle_shards: bool = True, resampled: bool = False,
               epochs: int | None = None, caption_field: str = "caption", host: int = 0, hosts: int = 1):
    super().__init__()
    self.shards, self.seed, self.shuffle_shards, self.resampled = list(shards), seed, shuffle_shards, resampled
    self.epochs, self.caption_field, self.host, self.hosts = epochs, caption_field, host, hosts
    self.slice = slice(0, None, 1)  # this reader's part of the host's shards (grain sets it per reader)
    if not self.resampled and len(self.shards) < hosts:
      raise ValueError(f"{len(self.shards)} wds shards cannot feed {hosts} hosts: each host needs a shard of its "
                       "own per epoch; write more (smaller) shards or use data.train.resampled=True")

  def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
    del sequential_slice  # shards are dealt round-robin either way
    self.slice = sl

  def epoch_shards(self, epoch: int) -> list[str]:
    """This reader's shards for an epoch (not resampled)."""
    order = np.arange(len(self.shards))
    if self.shuffle_shards:
      order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
    return [self.shards[i] for i in order[self.host::self.hosts][self.slice]]

  def resampled_shard(self, cursor: int) -> str:
    reader = self.slice.start or 0
    return self.shards[int(np.random.default_rng([self.seed, self.host, reader, cursor]).integers(len(self.shards)))]

  def __iter__(self) -> "WdsIterator":
    return WdsIterator(self)

  def __str__(self) -> str:
    return f"WdsIterDataset({len(self.shards)} shards, slice={self.slice})"


class WdsIterator(grain.DatasetIterator):
  """State {epoch, cursor, offset}: see the module doc."""

  def __init__(self, ds: WdsIterDataset):
    super().__init__()
    self.ds = ds
    self.epoch = self.cursor = self.offset = 0
    self._reader: _ShardReader | None = None
    self._listed: tuple[int, list[str]] | None = None
    self._empty = 0  # shards in a row that held no sample: a set of only empty shards must not spin forever
    if not ds.resampled and not ds.epoch_shards(0):
      raise ValueError(f"{len(ds.shards)} wds shards over {ds.hosts} hosts leave reader {ds.slice} without a "
                       "shard; write more (smaller) shards, lower data.num_threads, or set data.train.resampled")

  def _shard(self) -> str | None:
    if self.ds.resampled:
      return self.ds.resampled_shard(self.cursor)
    if self._listed is None or self._listed[0] != self.epoch:
      self._listed = (self.epoch, self.ds.epoch_shards(self.epoch))
    shards = self._listed[1]
    return shards[self.cursor] if self.cursor < len(shards) else None

  def _next_shard(self) -> None:
    self._close()
    self.cursor, self.offset = self.cursor + 1, 0

  def __next__(self) -> dict:
    while True:
      if self.ds.epochs is not None and self.epoch >= self.ds.epochs:
        raise StopIteration
      path = self._shard()
      if path is None:  # end of this reader's epoch
        self.epoch, self.cursor, self.offset = self.epoch + 1, 0, 0
        continue
      try:
        if self._reader is None:
          self._reader = _ShardReader(path, self.offset)
        sample = self._reader.next_sample()
      except (tarfile.TarError, EOFError, OSError) as e:
        at = self.offset
        self._next_shard()
        return {"id": f"{path}@{at}", "error": f"shard cannot be read past byte {at} ({type(e).__name__}: {e})"}
      if sample is None:
        self._next_shard()
        self._empty += 1
        if self._empty > 2 * len(self.ds.shards) + 10:
          raise ValueError(f"wds shards hold no samples ({self._empty} read in a row without one, e.g. {path}); "
                           "check config.data.<train|sources.X>.path")
        continue
      self._empty = 0
      key, parts, self.offset = sample
      return make_record(path, key, parts, self.ds.caption_field)

  def _close(self) -> None:
    if self._reader is not None:
      self._reader.close()
      self._reader = None

  def get_state(self) -> dict:
    return {"epoch": self.epoch, "cursor": self.cursor, "offset": self.offset}

  def set_state(self, state: dict) -> None:
    self._close()
    self.epoch, self.cursor, self.offset = int(state["epoch"]), int(state["cursor"]), int(state["offset"])

  def close(self) -> None:
    self._close()
    super().close()


class WindowShuffle(grain.IterDataset):
  """Reads `window` elements, yields them in a random order drawn from (seed, reader, window number), and so on: the
  state of grain's WindowShuffleIterDataset (where the window began in the parent, the window number, how many of
  it were yielded), whose restore re-reads the window. Ours because grain 0.2.18's draws each position with
  index_shuffle at about 90 ms per window whatever its size (20 ms per element for a window of 4)."""

  def __init__(self, parent: grain.IterDataset, *, window: int, seed: int):
    super().__init__(parent)
    self.window, self.seed, self.reader = window, seed, 0

  def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
    """grain's reader split: passed on to the shard reader; each reader also draws its own window orders."""
    self._parent.set_slice(sl, sequential_slice)
    self.reader = sl.start or 0

  def __iter__(self) -> "_WindowShuffleIterator":
    return _WindowShuffleIterator(self._parent.__iter__(), self.window, [self.seed, self.reader])


class _WindowShuffleIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, window: int, seed: list[int]):
    super().__init__(parent)
    self.window, self.seed = window, seed
    self.index, self.taken, self.items = 0, 0, []
    self.start = parent.get_state()

  def _fill(self) -> None:
    self.start, self.items = self._parent.get_state(), []
    for _ in range(self.window):
      try:
        self.items.append(next(self._parent))
      except StopIteration:
        break
    order = np.random.default_rng(self.seed + [self.index]).permutation(len(self.items))
    self.items = [self.items[i] for i in order[::-1]]  # popped from the end

  def __next__(self):
    if not self.items:
      self._fill()
      if not self.items:
        raise StopIteration
    item = self.items.pop()
    self.taken += 1
    if not self.items:
      self.index, self.taken = self.index + 1, 0
    return item

  def get_state(self) -> dict:
    return {"parent": self.start if self.taken else self._parent.get_state(), "window": self.index,
            "taken": self.taken}

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state["parent"])
    self.index, self.taken, self.items = int(state["window"]), 0, []
    if state["taken"]:
      self._fill()
      self.items = self.items[:len(self.items) - int(state["taken"])]
      self.taken = int(state["taken"])


class WdsSource:
  """A `wds` data source: its shards and reading settings; iter_dataset() builds the stream for one host."""

  def __init__(self, path, *, caption_field: str = "caption", shuffle_buffer: int = 1000, resampled: bool = False,
               shuffle_shards: bool = True, name: str = "wds"):
    self.shards = expand_shards(path)
    self.caption_field, self.shuffle_buffer, self.resampled = caption_field, int(shuffle_buffer), bool(resampled)
    self.shuffle_shards, self.name = bool(shuffle_shards), name

  def iter_dataset(self, seed: int, host: int = 0, hosts: int = 1, epochs: int | None = None) -> grain.IterDataset:
    """Records of this host's shards, window-shuffled (shuffle_buffer samples); endless unless `epochs`."""
    ds = WdsIterDataset(self.shards, seed=seed, shuffle_shards=self.shuffle_shards, resampled=self.resampled,
                        epochs=epochs, caption_field=self.caption_field, host=host, hosts=hosts)
    return WindowShuffle(ds, window=self.shuffle_buffer, seed=seed) if self.shuffle_buffer > 1 else ds

  def texts(self):
    """Every caption of every shard (for building a tokenizer; images are skipped, not read)."""
    for path in self.shards:
      try:
        reader = _ShardReader(path, 0)
      except (tarfile.TarError, OSError):
        continue
      try:
        while (sample := reader.next_sample(skip=IMAGE_EXTS)) is not None:
          yield from caption_of(sample[1], self.caption_field)
      except (tarfile.TarError, EOFError, OSError):
        pass  # counted when training reads it
      finally:
        reader.close()


def parse_mixture(spec) -> dict[str, float]:
  """'laion:0.7,coyo:0.3', {'laion': 0.7, ...} or [('laion', 0.7), ...] -> {name: weight} (weights > 0)."""
  if isinstance(spec, str):
    items = []
    for part in split_top_level(spec):
      name, sep, weight = part.partition(":")
      if not sep:
        raise ValueError(f"mixture entry {part!r} is not name:weight (e.g. data.train.mixture='laion:0.7,coyo:0.3')")
      items.append((name.strip(), weight))
  elif hasattr(spec, "items"):
    items = list(spec.items())
  else:
    items = [tuple(x) for x in spec]
  out = {}
  for name, weight in items:
    try:
      w = float(weight)
    except (TypeError, ValueError):
      raise ValueError(f"mixture weight of {name!r} is {weight!r}, not a number") from None
    if not w > 0:
      raise ValueError(f"mixture weight of {name!r} is {w}; weights must be > 0 (drop the source instead)")
    out[str(name)] = w
  if not out:
    raise ValueError("data.train.mixture is empty; give name:weight pairs, e.g. 'laion:0.7,coyo:0.3'")
  return out


class Mixture:
  """Named iterable sources drawn in proportion to their weights (grain's IterDataset.mix: a fixed interleaving
  pattern, deterministic; its state keeps each member's state by name)."""

  def __init__(self, members: dict, weights: dict[str, float]):
    self.members, self.weights = members, weights

  def iter_dataset(self, seed: int, host: int = 0, hosts: int = 1, epochs: int | None = None) -> grain.IterDataset:
    # each member gets its own seed, a function of its name (not of its place in the list)
    streams = {name: src.iter_dataset((seed + zlib.crc32(name.encode())) % 2**31, host, hosts, epochs)
               for name, src in self.members.items()}
    return grain.IterDataset.mix(streams, {name: self.weights[name] for name in streams})

  def texts(self):
    for src in self.members.values():
      yield from src.texts()

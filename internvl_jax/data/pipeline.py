"""grain pipelines: sharded per host, deterministic for a seed, resumable, with bad-record accounting.

Training: source -> global shuffle (seed, reshuffled each epoch) -> repeat forever -> this host's slice
(process_index::process_count) -> features (a per-example rng from grain's random_map, so augmentation is
deterministic) -> drop bad records -> batch of batch_size / process_count. The iterator's state (a small dict)
goes into every checkpoint, so a resumed run sees exactly the batches an uninterrupted run would.

An iterable source (data/wds.py: webdataset shards, mixtures) goes: its records for this host (shards dealt to
hosts, then to the num_threads readers of grain's multithread_prefetch; window-shuffled) -> features (random_map,
a per-reader rng) -> drop bad records -> batch. Its state is each reader's shard position, saved the same way.

Evaluation: the whole eval split in order, in fixed-size batches (the last one padded, with a `valid` mask).
"""

from __future__ import annotations

import atexit
import logging
import threading
import weakref

import grain
import jax
import numpy as np

from internvl_jax.data import packing as packing_lib
from internvl_jax.data.transforms import BadRecord


class DataError(RuntimeError):
  """Too many bad records: training stops with this message."""


class BadRecordTracker:
  """Counts records seen and skipped; raises DataError once the skipped share exceeds max_fraction (after
  min_seen records, so one early bad file does not stop a run). Thread-safe (grain reads with threads)."""

  def __init__(self, max_fraction: float = 0.05, min_seen: int = 50, name: str = "train"):
    self.max_fraction, self.min_seen, self.name = max_fraction, min_seen, name
    self.seen = self.bad = 0  # as featurised (a prefetching reader runs ahead of the batches handed out)
    self.handed_out: tuple[int, int] | None = None  # (seen, bad) as of the last batch handed out, when known
    self.examples: list[str] = []
    self._lock = threading.Lock()

  def ok(self) -> None:
    with self._lock:
      self.seen += 1

  def skip(self, record_id: str, reason: str) -> None:
    with self._lock:
      self.seen += 1
      self.bad += 1
      if len(self.examples) < 5:
        self.examples.append(f"{record_id}: {reason}")
      if self.bad <= 3:
        logging.warning("skipping bad %s record %s: %s", self.name, record_id, reason)
      if self.seen >= self.min_seen and self.bad > self.max_fraction * self.seen:
        raise DataError(f"{self.bad} of {self.seen} {self.name} records are bad (more than "
                        f"{self.max_fraction:.0%}; config.data.max_bad_fraction), e.g. {'; '.join(self.examples)}")

  def reject(self, reason: str, record_id: str = "?") -> None:
    """A record already counted as good turns out unusable (e.g. it can never fit a packed batch)."""
    with self._lock:
      self.seen -= 1
    self.skip(record_id, reason)

  def counts(self) -> tuple[int, int]:
    """(seen, bad) as of the batches handed out so far (what a checkpoint of the consumer's position must hold),
    or as featurised when no batch prefetcher reports them."""
    with self._lock:
      return self.handed_out if self.handed_out is not None else (self.seen, self.bad)

  def hand_out(self, batch_and_counts: tuple[dict, tuple[int, int]]) -> dict:
    """A prefetched batch, with the counts as of its making, is handed to the consumer: those become counts()."""
    batch, counts = batch_and_counts
    with self._lock:
      self.handed_out = counts
    return batch

  def restore(self, seen: int, bad: int) -> None:
    """Continue counting from a checkpoint's counts."""
    with self._lock:
      self.seen, self.bad, self.handed_out = seen, bad, (seen, bad)

  def summary(self) -> dict:
    seen, bad = self.counts()
    return {"records_seen": seen, "records_bad": bad}


def _guarded(feature_fn, tracker: BadRecordTracker):
  def fn(record, rng):
    try:
      out = feature_fn(record, rng)
    except BadRecord as e:
      tracker.skip(record.get("id", "?"), str(e))
      return None
    tracker.ok()
    return out
  return fn


def train_dataset(source, feature_fn, *, global_batch: int, seed: int, tracker: BadRecordTracker,
                  num_threads: int = 2, packing: packing_lib.PackSpec | None = None,
                  prefetch_batches: int = 2) -> grain.IterDataset:
  """An endless, host-sharded IterDataset of batches (dicts of numpy arrays, leading dim global_batch / hosts).
  packing (global budgets; feature_fn gives packed instruct features): batches of packed rows
  (data/packing.py), this host's share of the rows and of the tiles. num_threads: threads featurising examples
  (0: the batch thread featurises them itself). prefetch_batches: whole batches made ahead by one background
  thread (0: made by the caller's next()), so that the train loop's thread only takes a finished batch while the
  accelerator (or XLA's CPU threads) runs the step."""
  batches = _batches(source, feature_fn, global_batch=global_batch, seed=seed, tracker=tracker,
                     num_threads=num_threads, packing=packing)
  if prefetch_batches <= 0:
    return batches
  # one hand-off per batch, not per example (a per-example thread-pool future costs ~0.1 ms of CPU under the GIL,
  # as much as decoding a small PNG); the iterator state it reports is that of the last batch handed out, and each
  # batch carries the record counts as of its making, so the counters checkpointed with that state match it
  made = batches.map(lambda batch: (batch, (tracker.seen, tracker.bad)))
  return _BatchPrefetch(made, prefetch_buffer_size=prefetch_batches).map(tracker.hand_out)


class _BatchPrefetch(grain.experimental.ThreadPrefetchIterDataset):
  """grain's thread prefetch, its iterators closed at interpreter exit: one still open then (a script that never
  closed it) otherwise prints a traceback from grain's __del__ once the modules it uses are torn down."""

  def __iter__(self):
    it = super().__iter__()
    _LIVE_ITERATORS.add(it)
    return it


_LIVE_ITERATORS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_live_iterators() -> None:
  for it in list(_LIVE_ITERATORS):
    it.close()
    it.close = lambda: None  # grain's __del__ closes again during teardown, when its module globals are gone


def _batches(source, feature_fn, *, global_batch: int, seed: int, tracker: BadRecordTracker, num_threads: int,
             packing: packing_lib.PackSpec | None) -> grain.IterDataset:
  hosts, host = jax.process_count(), jax.process_index()
  if global_batch % hosts:
    raise ValueError(f"batch_size {global_batch} is not divisible by the {hosts} hosts; change --config.batch_size")
  guarded = _guarded(feature_fn, tracker)
  if hasattr(source, "iter_dataset"):
    it = _iterable_records(source, guarded, seed=seed, host=host, hosts=hosts, num_threads=num_threads)
    if packing is not None:
      return packing_lib.PackIterDataset(it, packing.for_host(hosts, host), tracker)
    return it.batch(global_batch // hosts, drop_remainder=True)
  ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
  # random_map before the host slice: each example's rng (caption choice, augmentation) is then a function of its
  # global position, so a global batch is the same whatever the number of hosts (MapDataset is lazy: a host
  # still featurises only its own slice)
  ds = ds.random_map(lambda rec, rng: guarded(rec, rng), seed=seed + 1)
  ds = ds[host::hosts]
  threads = max(int(num_threads), 0)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(2 * threads, 1)))
  if packing is not None:
    return packing_lib.PackIterDataset(it, packing.for_host(hosts, host), tracker)
  return it.batch(global_batch // hosts, drop_remainder=True)


def _iterable_records(source, guarded, *, seed: int, host: int, hosts: int, num_threads: int,
                      epochs: int | None = None) -> grain.IterDataset:
  """Featurised good records of an iterable source, read and featurised by num_threads reader threads (each
  reads its own shards: grain sets its slice), interleaved in a fixed order, so the stream is deterministic for a
  given num_threads (another num_threads deals the shards differently)."""
  ds = source.iter_dataset(seed, host, hosts, epochs)
  ds = ds.random_map(lambda rec, rng: guarded(rec, rng), seed=seed + 1).filter(lambda x: x is not None)
  threads = max(int(num_threads), 1)
  if threads == 1:
    return ds
  return grain.experimental.multithread_prefetch(ds, num_threads=threads, buffer_size=2)


def eval_batches(source, feature_fn, *, batch_size: int, limit: int | None = None,
                 tracker: BadRecordTracker | None = None):
  """Yields (batch, records) over the split in order: batch of exactly batch_size (zero-padded, with a bool
  `valid` [batch_size]), records the source records used (for keys). Every host yields the whole split."""
  n = len(source) if limit is None else min(limit, len(source))
  tracker = tracker or BadRecordTracker(1.0, name="eval")
  guarded = _guarded(feature_fn, tracker)
  feats, recs = [], []
  for i in range(n):
    rec = source[i]
    out = guarded(rec, None)
    if out is None:
      continue
    feats.append(out)
    recs.append(rec)
    if len(feats) == batch_size:
      yield _stack(feats, batch_size), recs
      feats, recs = [], []
  if feats:
    yield _stack(feats, batch_size), recs


def _stack(feats: list[dict], batch_size: int) -> dict:
  out = {}
  for k in feats[0]:
    arr = np.stack([f[k] for f in feats])
    pad = np.zeros((batch_size - len(feats),) + arr.shape[1:], arr.dtype)
    out[k] = np.concatenate([arr, pad]) if len(pad) else arr
  valid = np.zeros((batch_size,), bool)
  valid[:len(feats)] = True
  out["valid"] = valid
  return out

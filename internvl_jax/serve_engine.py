"""Continuous batching for the server: one background thread decodes a fixed batch of rows ("slots") one token per
step, and a new request joins a free slot between two steps while the others go on decoding.

  engine = Engine(model, stop_ids=fmt.stop_ids, max_batch=8, context=4096, max_new_tokens=512)
  engine.submit(Job(ids, pixels, max_tokens=64, emit=callback))   # callback(("token", id)) ... (("done", reason))
  engine.cancel(job)                                               # frees the slot at the next step

Cache layout. The model's KV cache (models/llm.py) has one write index shared by the batch, a per-row mask of the
slots that hold real tokens and per-row RoPE positions that count real tokens only. The engine keeps one such cache
of B = max_batch rows and S = context + max_new_tokens slots. A joining request is prefilled alone (its prompt
left-padded to a bucket: stream.py's powers of two up to 1024, then multiples of 512; into an S-slot cache) and
its keys / values are written RIGHT-ALIGNED into its row: the prompt ends just before the shared index, so its
next token lands at the index like every other row's. Slots to the left of a row's prompt are masked out for it,
so what the other rows did there is invisible; positions count real tokens, so a row decodes as it would alone
(generate(): the same tokens, greedy, up to float rounding of batched matmuls). When the index has no room left on
the right (or too little on the left for the joiner's prompt), the whole cache is rolled along its slot axis (no
live row loses a slot: the shift is bounded by the oldest live row's first slot). A live row spans at most
`context` slots (padded prompt + its max_tokens) and needs at most max_new_tokens more on the right, a joiner at
most `context` in all, so S = context + max_new_tokens always leaves room: a join never waits for it.
Sliding-window ring caches (window_cache.py) roll with it (ring entry = slot mod window).

Host and device overlap: one decode step is always in flight; the engine hands out the previous step's tokens
(emit, stop and length checks, freeing rows) while the next one runs, so a row's tokens reach its request one step
late and a finished row rides one extra step (its token is dropped). In-process on 2 CPU cores this halved the
time of 8 concurrent requests (tests/test_serve.py: 0.23 s -> 0.09-0.11 s; 8 sequential: 0.85 s -> 0.50-0.56 s).

Compiled programs: a prefill per (prompt bucket, tile-count bucket: tiles padded with zeros to a power of two;
extra tiles are never read), one insert, one roll, one decode step: a small fixed set, none per request.
Sampling settings are per-row traced values (greedy / temperature / top-p / repetition penalty and a key per row:
generate.pick vmapped over rows); the stop ids are the model's (the same for every request).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging
import queue
import threading
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from internvl_jax import generate as gen
from internvl_jax import sharding
from internvl_jax import stream as stream_lib
from internvl_jax.models import internvl

SLOT_AXIS = {"k": 2, "v": 2, "k_ring": 2, "v_ring": 2, "mask": 1}  # cache entries with a slot axis (after batch)


@dataclasses.dataclass(eq=False)
class Job:
  """One request for the engine. ids [T] int: the prompt; pixels [N, S, S, 3] float32 or None; emit: called from
  the engine thread with ("token", id), then ("done", 'stop' | 'length' | 'cancelled') or ("error", message)."""
  ids: np.ndarray
  pixels: np.ndarray | None
  max_tokens: int
  emit: Callable[[tuple], None]
  temperature: float = 0.0
  top_p: float = 1.0
  repetition_penalty: float = 1.0
  seed: int = 0
  cancelled: bool = False


@dataclasses.dataclass
class _Row:
  job: Job
  start: int  # first cache slot of the row's (padded) prompt
  generated: int = 0


POW2_BUCKETS_UNTIL, BUCKET_STEP = 1024, 512


def prompt_bucket(t: int) -> int:
  """The padded length of a t-token prompt: stream.bucket_length (powers of two from 16) up to 1024, then the next
  multiple of 512 (a 13-tile image prompt of ~3.4k tokens takes 3584 slots, not 4096)."""
  return stream_lib.bucket_length(t) if t <= POW2_BUCKETS_UNTIL else -(-t // BUCKET_STEP) * BUCKET_STEP


def tile_bucket(n: int) -> int:
  """Tiles are padded to a power of two, so prompts with 1..16 tiles share 5 prefill programs per length bucket."""
  return 1 << max(n - 1, 0).bit_length()


def prompt_slots(model, num_ids: int, pixels) -> int:
  """Cache slots a prompt of num_ids tokens takes: its bucket (+ the vision prefix of a 'prefix'-mode model)."""
  return prompt_bucket(num_ids) + gen.prefix_tokens(model, pixels)


class _Programs:
  """The jitted pieces, built on generate.py's prefill / pick / step (the model's graph fixed, its state an
  argument, as stream.py does)."""

  def __init__(self, model, stop_ids, batch: int, slots: int):
    graphdef, self.state = nnx.split(model)
    mesh = sharding.model_mesh(model)
    ctx = lambda: contextlib.nullcontext() if mesh is None else jax.sharding.use_abstract_mesh(mesh.abstract_mesh)
    lm = model.language if isinstance(model, internvl.InternVLChat) else model
    stop = jnp.asarray(gen.sampling(eos_token_id=list(stop_ids)).stop_ids)
    vocab = lm.config.vocab_size

    def init(state):
      with ctx():
        m = nnx.merge(graphdef, state)
        cache = (m.language if isinstance(m, internvl.InternVLChat) else m).init_cache(batch, slots)
      ones = lambda dt: jnp.ones((batch,), dt)
      return dict(cache=cache, logits=jnp.zeros((batch, vocab), jnp.float32), seen=jnp.zeros((batch, vocab), bool),
                  i=jnp.zeros((batch,), jnp.int32), key=jnp.zeros((batch, 2), jnp.uint32), greedy=ones(bool),
                  temperature=ones(jnp.float32), top_p=ones(jnp.float32), penalty=ones(jnp.float32))

    def prefill(state, ids, mask, pixels):
      # one prompt [1, T] into a fresh cache of `slots` slots (the vision prefix included)
      with ctx():
        m = nnx.merge(graphdef, state)
        logits, cache = gen.prefill(m, ids, pixels, mask, slots - gen.prefix_tokens(m, pixels))
        return logits, cache, gen.seen_tokens(ids, mask, logits.shape[-1])

    def insert(carry, row, offset, logits, cache, seen, key, greedy, temperature, top_p, penalty):
      # the prefilled row (batch 1), its slots moved right by `offset` (its prompt then ends at the shared index),
      # into row `row`; rings roll by the same offset (entry = slot mod window)
      put = lambda big, small, axis=0: jax.lax.dynamic_update_slice_in_dim(big, small, row, axis=axis)
      new = dict(carry["cache"])
      for name, axis in SLOT_AXIS.items():
        if name in cache:
          new[name] = put(new[name], jnp.roll(cache[name], offset, axis=axis), axis=axis - 1)
      new["pos"] = put(new["pos"], cache["pos"])
      one = lambda v: jnp.asarray(v)[None]
      return dict(cache=new, logits=put(carry["logits"], logits), seen=put(carry["seen"], seen),
                  i=put(carry["i"], one(jnp.int32(0))), key=put(carry["key"], key[None]),
                  greedy=put(carry["greedy"], one(greedy)), temperature=put(carry["temperature"], one(temperature)),
                  top_p=put(carry["top_p"], one(top_p)), penalty=put(carry["penalty"], one(penalty)))

    def shift(carry, d):
      # every row's slots moved d to the left (d < 0: to the right); the index follows
      cache = dict(carry["cache"])
      for name, axis in SLOT_AXIS.items():
        if name in cache:
          cache[name] = jnp.roll(cache[name], -d, axis=axis)
      cache["index"] = cache["index"] - d
      return dict(carry, cache=cache)

    def pick_row(logits, i, key, seen, greedy, temperature, top_p, penalty):
      s = gen.Sampling(greedy, temperature, top_p, stop, jnp.int32(0), penalty)
      return gen.pick(logits[None], i, key, seen[None], s)[0]

    def step(state, carry):
      # as generate._decode's loop body, with per-row settings: pick a token per row, feed it through the cache
      with ctx():
        m = nnx.merge(graphdef, state)
        keys = jax.vmap(jax.random.split)(carry["key"])
        tok = jax.vmap(pick_row)(carry["logits"], carry["i"], keys[:, 1], carry["seen"], carry["greedy"],
                                 carry["temperature"], carry["top_p"], carry["penalty"])
        logits, cache = gen.step(m, tok, carry["cache"])
        return tok, dict(carry, cache=cache, logits=logits, seen=gen.mark_seen(carry["seen"], tok), i=carry["i"] + 1,
                         key=keys[:, 0])

    self.init = jax.jit(init)
    self.prefill = jax.jit(prefill)
    self.insert = jax.jit(insert, donate_argnums=(0,))
    self.shift = jax.jit(shift, donate_argnums=(0,))
    self.step = jax.jit(step, donate_argnums=(1,))

  def cache_size(self) -> int:
    """Compiled variants so far (all programs together)."""
    return sum(f._cache_size() for f in (self.init, self.prefill, self.insert, self.shift, self.step))


class Engine:
  """The decoding thread. submit() hands a Job in (thread-safe); its tokens come back through job.emit."""

  def __init__(self, model, stop_ids, *, max_batch: int = 8, context: int = 4096, max_new_tokens: int = 512):
    if max_batch < 1 or context < stream_lib.MIN_BUCKET + 1 or not 1 <= max_new_tokens < context:
      raise ValueError(f"need max_batch >= 1, context > {stream_lib.MIN_BUCKET} and 1 <= max_new_tokens < context, "
                       f"got {max_batch}, {context}, {max_new_tokens}")
    self.model, self.stop_ids = model, set(int(i) for i in stop_ids)
    self.max_batch, self.context, self.max_new_tokens = max_batch, context, max_new_tokens
    self.slots = context + max_new_tokens
    self.programs = _Programs(model, list(stop_ids), max_batch, self.slots)
    self.rows: list[_Row | None] = [None] * max_batch
    self.index = 0  # host copy of the cache's shared write index
    self.steps = self.shifts = 0  # decode steps, and cache rolls under live rows, so far
    self._queue: queue.Queue = queue.Queue()
    self._carry = None
    self._pending = None  # (tokens [B] on device, the rows they belong to) of the step still running
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name="internvl-serve-engine", daemon=True)
    self._thread.start()
    # a daemon thread still inside an XLA call when the interpreter exits aborts the process (exit code -6); a
    # script that never called close() gets it at exit
    atexit.register(self.close)

  # ------------------------------------------------------------------------------------------------ public

  def submit(self, job: Job) -> None:
    self._queue.put(job)

  def cancel(self, job: Job) -> None:
    """The job's slot is freed before the next step (its emit gets ("done", 'cancelled'))."""
    job.cancelled = True
    self._queue.put(None)  # wakes an idle engine

  def active(self) -> int:
    return sum(r is not None for r in self.rows)

  def queued(self) -> int:
    return self._queue.qsize()

  def close(self) -> None:
    self._stop.set()
    self._queue.put(None)
    self._thread.join(timeout=30)

  def check(self, num_ids: int, pixels, max_tokens: int) -> None:
    """A one-line ValueError when a prompt of num_ids tokens (+ pixels) and max_tokens cannot fit one slot."""
    if max_tokens > self.max_new_tokens:
      raise ValueError(f"max_tokens {max_tokens} is above the server's cap of {self.max_new_tokens}; ask for fewer "
                       "or start the server with a larger --max_new_tokens")
    need = prompt_slots(self.model, num_ids, pixels)
    if need + max_tokens > self.context:
      raise ValueError(f"the prompt ({num_ids} tokens, {need} slots padded) + max_tokens {max_tokens} exceed the "
                       f"server's context of {self.context} slots; shorten the conversation, lower max_tokens or "
                       "start the server with a larger --context")

  # ------------------------------------------------------------------------------------------------ thread

  def _run(self) -> None:
    waiting: list[Job] = []
    while not self._stop.is_set():
      try:
        self._drop_cancelled(waiting)
        if self._pending is not None and (not self.active() or self.index >= self.slots):
          self._deliver()  # the last step's tokens, before idling or before the index would pass the cache's end
        block = self.active() == 0 and not waiting and self._pending is None
        try:  # everything queued now (blocking only when idle)
          while True:
            item = self._queue.get(block=block, timeout=None)
            block = False
            if item is not None:
              waiting.append(item)
        except queue.Empty:
          pass
        self._drop_cancelled(waiting)
        while waiting and None in self.rows:
          self._join(waiting.pop(0))
        if self.active():
          self._step()
      except Exception as e:  # noqa: BLE001 - one failure ends the requests it touched, never the engine
        logging.exception("serve engine step failed")
        self._fail_all(f"{type(e).__name__}: {e}")

  def _drop_cancelled(self, waiting: list[Job]) -> None:
    for job in [j for j in waiting if j.cancelled]:
      waiting.remove(job)
      self._emit(job, ("done", "cancelled"))
    for r, row in enumerate(self.rows):
      if row is not None and row.job.cancelled:
        self._free(r, "cancelled")

  @staticmethod
  def _emit(job: Job, item: tuple) -> None:
    """job.emit(item); a receiver that is gone (its event loop closed) cancels the job, never stops the engine."""
    try:
      job.emit(item)
    except Exception:  # noqa: BLE001
      logging.warning("serve engine: a request's receiver failed; the request is dropped", exc_info=True)
      job.cancelled = True

  def _free(self, r: int, reason: str) -> None:
    job = self.rows[r].job
    self.rows[r] = None
    self._emit(job, ("done", reason))

  def _fail_all(self, message: str) -> None:
    for r, row in enumerate(self.rows):
      if row is not None:
        self.rows[r] = None
        self._emit(row.job, ("error", message))
    self._carry = self._pending = None  # rebuilt at the next join (buffers may be donated to the failed call)

  def _join(self, job: Job) -> None:
    """Prefills the job and writes it right-aligned into a free row (rolling the cache first if needed)."""
    try:
      self.check(len(job.ids), job.pixels, job.max_tokens)
      progs = self.programs
      t = prompt_bucket(len(job.ids))
      ids = np.zeros((1, t), np.int32)
      mask = np.zeros((1, t), bool)
      ids[0, t - len(job.ids):], mask[0, t - len(job.ids):] = job.ids, True
      pixels = job.pixels
      if pixels is not None and not (isinstance(self.model, internvl.InternVLChat)
                                     and self.model.config.mode == "prefix"):
        pad = tile_bucket(len(pixels)) - len(pixels)  # extra tiles: computed, never read (no image tokens)
        pixels = np.concatenate([pixels, np.zeros((pad,) + pixels.shape[1:], pixels.dtype)]) if pad else pixels
      logits, cache, seen = progs.prefill(progs.state, ids, mask, pixels)
      need = prompt_slots(self.model, len(job.ids), job.pixels)
    except Exception as e:  # noqa: BLE001 - a bad job fails alone
      logging.exception("serve engine: a request failed in prefill")
      self._emit(job, ("error", f"{type(e).__name__}: {e}"))
      return
    try:
      if self._carry is None:
        self._carry, self.index = progs.init(progs.state), 0
      self._make_room(need, job.max_tokens)
      r = self.rows.index(None)
      key = np.asarray(jax.random.key_data(jax.random.key(job.seed)), np.uint32)
      self._carry = progs.insert(self._carry, np.int32(r), np.int32(self.index - need), logits, cache, seen, key,
                                 np.bool_(job.temperature == 0), np.float32(max(job.temperature, 1e-6)),
                                 np.float32(job.top_p), np.float32(job.repetition_penalty))
    except Exception as e:
      self._emit(job, ("error", f"{type(e).__name__}: {e}"))
      raise  # the shared cache may be lost (donated): _run fails the live rows too and starts afresh
    self.rows[r] = _Row(job, start=self.index - need)

  def _make_room(self, need: int, max_tokens: int) -> None:
    """Rolls the cache so that `need` slots fit left of the index and every live row's remaining tokens (and the
    joiner's max_tokens) fit right of it; no roll when they already do."""
    live = [row for row in self.rows if row is not None]
    right = max([max_tokens] + [row.job.max_tokens - row.generated for row in live])
    lo = self.index + right - self.slots  # shift at least this far left
    hi = min([self.index - need] + [row.start for row in live])  # and at most this far (no live slot dropped)
    if lo > hi:  # cannot happen while rows span <= context slots and slots = context + max_new_tokens
      raise RuntimeError(f"no room in the cache (shift between {lo} and {hi})")
    if lo <= 0 <= hi:
      return
    d = hi  # as far left as allowed: the most room on the right for later joins
    self._carry = self.programs.shift(self._carry, np.int32(d))
    self.index -= d
    self.shifts += bool(live)
    for row in live:
      row.start -= d

  def _step(self) -> None:
    """Dispatches one decode step and, while it runs, hands out the previous step's tokens: one step is always in
    flight, so the device does not wait for the host's per-token work (emit, stop checks)."""
    if self.index >= self.slots:  # cannot happen: rows are done on the device before the index reaches the end
      raise RuntimeError(f"the cache index {self.index} reached its end ({self.slots} slots) with rows still live")
    tok, self._carry = self.programs.step(self.programs.state, self._carry)
    self.index += 1
    self.steps += 1
    previous, self._pending = self._pending, (tok, list(self.rows))
    if previous is not None:
      self._deliver(previous)

  def _deliver(self, pending=None) -> None:
    """The tokens of a finished step to the rows it decoded (a row freed or re-used since then gets none)."""
    if pending is None:
      pending, self._pending = self._pending, None
    tok, rows = pending
    tok = np.asarray(tok)
    for r, row in enumerate(rows):
      if row is None or self.rows[r] is not row:
        continue
      t = int(tok[r])
      row.generated += 1
      self._emit(row.job, ("token", t))
      if t in self.stop_ids:
        self._free(r, "stop")
      elif row.generated >= row.job.max_tokens:
        self._free(r, "length")

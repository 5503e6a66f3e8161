"""Timing and memory measurement shared by the JAX and PyTorch sides.

Both sides are timed the same way: compile (JAX: lower + compile; PyTorch: the first call, which is where
torch.compile does its work) is reported separately, then `warmup` untimed calls, then `repeats` timed calls, each
ended by a device synchronisation; the median is reported (robust to a neighbour's burst on a shared machine).
"""

from __future__ import annotations

import dataclasses
import os
import resource
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp


@dataclasses.dataclass
class Timing:
  """Per-call wall times of one side of one case."""
  compile_s: float
  times_s: list[float]
  # One more timed call (seconds), for interleaved pairing with the other framework (cli.py).
  once: Callable[[], float] | None = dataclasses.field(default=None, repr=False, compare=False)

  @property
  def median_s(self) -> float:
    return statistics.median(self.times_s)


def time_jax(fn: Callable, args: tuple, *, carry: bool, warmup: int, repeats: int) -> tuple[Timing, Any]:
  """Times a jitted `fn(*args)`. carry=True means fn returns (new_first_arg, aux) and the first argument is a
  state threaded through the calls (a train step with a donated state); otherwise args are reused.
  Returns the timing and the last output (so a caller can sanity-check it)."""
  t0 = time.perf_counter()
  compiled = fn.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  args = tuple(args)

  def call():
    nonlocal args
    out = compiled(*args)
    if carry:
      args = (out[0],) + args[1:]
    return jax.block_until_ready(out)

  out = None
  for _ in range(warmup):
    out = call()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = call()
    times.append(time.perf_counter() - t0)

  def once() -> float:
    t0 = time.perf_counter()
    call()
    return time.perf_counter() - t0

  return Timing(compile_s, times, once), out


def time_callable(call: Callable[[], Any], sync: Callable[[], None], *, warmup: int, repeats: int,
                  before_each: Callable[[], None] | None = None) -> Timing:
  """Times an eager callable (the PyTorch side). The first call is reported as `compile_s` (first-call time:
  torch.compile's tracing and code generation, or plain eager warm-up), then warmup and timed repeats.
  before_each runs untimed before every call (e.g. rewinding a KV cache)."""

  def once() -> float:
    if before_each is not None:
      before_each()
    sync()
    t0 = time.perf_counter()
    call()
    sync()
    return time.perf_counter() - t0

  first = once()
  for _ in range(warmup):
    once()
  return Timing(first, [once() for _ in range(repeats)], once)


def interleaved(once_a: Callable[[], float], once_b: Callable[[], float], rounds: int,
                probe: Callable[[], float] | None = None) -> dict:
  """Alternates one call of a and one of b, `rounds` times. On a shared machine a neighbour's burst slows both
  calls of a round alike, so the median of the per-round ratios t_b / t_a (a's speed over b's) is far steadier
  than a ratio of two medians taken minutes apart. probe (e.g. matmul_probe) runs once per round after the pair;
  its values come back as "probe", one per round."""
  ta, tb, probed = [], [], []
  for _ in range(rounds):
    ta.append(once_a())
    tb.append(once_b())
    if probe is not None:
      probed.append(probe())
  ratios = sorted(b / a for a, b in zip(ta, tb))
  out = {"rounds": rounds, "ratio": statistics.median(ratios), "ratio_min": ratios[0], "ratio_max": ratios[-1],
         "a_s": ta, "b_s": tb}
  if probe is not None:
    out["probe"] = probed
  return out


def _matmul_shape(platform: str, size: int | None) -> tuple[int, Any]:
  """(n, dtype) of the rate-defining matmul: float32 2048^2 on CPU, bfloat16 8192^2 on accelerators."""
  return (size or 2048, jnp.float32) if platform == "cpu" else (size or 8192, jnp.bfloat16)


def matmul_probe(platform: str, *, calls: int = 3, size: int | None = None,
                 warmup: int = 1) -> Callable[[], float]:
  """Compiles the rate-defining jnp.dot and returns a callable that measures its rate now (TFLOP/s, the median of
  `calls` dots). Run inside interleaved rounds, it gives each round its own machine rate, so that 'fraction of
  the matmul rate' compares a case with what the machine could do in the same seconds (this VM's rate drifts by
  +-15% from minute to minute)."""
  n, dtype = _matmul_shape(platform, size)
  ka, kb = jax.random.split(jax.random.key(0))
  a, b = jax.random.normal(ka, (n, n), dtype), jax.random.normal(kb, (n, n), dtype)
  dot = jax.jit(jnp.dot).lower(a, b).compile()
  for _ in range(warmup):
    jax.block_until_ready(dot(a, b))

  def probe() -> float:
    times = []
    for _ in range(calls):
      t0 = time.perf_counter()
      jax.block_until_ready(dot(a, b))
      times.append(time.perf_counter() - t0)
    return 2.0 * n**3 / statistics.median(times) / 1e12

  return probe


def matmul_tflops(platform: str, *, repeats: int = 5, size: int | None = None) -> tuple[float, str]:
  """Measures this machine's large-matmul rate with jnp.dot (what 'fraction of what this machine can do' is
  measured against on CPU): the median of `repeats` calls after 2 warm-up calls. Returns (TFLOP/s, description)."""
  n, dtype = _matmul_shape(platform, size)
  rate = matmul_probe(platform, calls=repeats, size=size, warmup=2)()
  return rate, f"jnp.dot {n}x{n} {jnp.dtype(dtype).name}, median of {repeats}"


def cpu_threads() -> int:
  """Cores this process may run on (what XLA's CPU thread pool uses; PyTorch is set to the same)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # macOS
    return os.cpu_count() or 1


def rss_peak_bytes() -> int:
  """Peak resident set size of this process so far (getrusage; kilobytes on Linux, bytes on macOS). It only
  grows, which is why the CLI runs each case in its own process for the final table."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(peak if sys.platform == "darwin" else peak * 1024)


def jax_peak_memory() -> tuple[int | None, str]:
  """(bytes, label): device peak_bytes_in_use on accelerators, process RSS peak on CPU."""
  device = jax.devices()[0]
  stats = None
  try:
    stats = device.memory_stats()
  except Exception:  # noqa: BLE001 - some backends raise instead of returning None
    stats = None
  if stats and "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use (process lifetime)"
  return rss_peak_bytes(), "process RSS peak (getrusage, process lifetime)"

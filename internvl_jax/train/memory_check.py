"""Before the first step: does the compiled train step fit the accelerator's memory? An out-of-memory error deep
inside XLA, after a long compile, is the worst way to learn that a 6B run needs remat or bfloat16; this compares
XLA's own memory analysis of the step with the device's memory and stops with one line naming the fixes.

CPU devices report no memory limit, so there the check is skipped (host RAM is the operating system's business).
"""

from __future__ import annotations

import jax
import ml_collections

from internvl_jax.train.config_checks import ConfigError

HEADROOM = 0.95  # XLA's analysis leaves out allocator fragmentation and the runtime's own buffers


def device_bytes_limit() -> int | None:
  """Bytes one local accelerator can allocate (its memory_stats' bytes_limit), or None (CPU, or not reported)."""
  stats = jax.local_devices()[0].memory_stats()
  limit = (stats or {}).get("bytes_limit")
  return int(limit) if limit else None


def step_bytes(compiled) -> int:
  """Peak bytes per device of a compiled step: arguments + outputs not aliased to (donated) arguments +
  temporaries + generated code."""
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
             + getattr(m, "generated_code_size_in_bytes", 0))


def _fixes(cfg: ml_collections.ConfigDict) -> str:
  towers = [k for k in ("vision", "text", "language") if k in cfg.model]
  fixes = []
  for t in towers:
    if cfg.model[t].get("remat", "none") in ("none", "", None):
      fixes.append(f"--config.model.{t}.remat=full")
    if cfg.model[t].get("dtype", "float32") == "float32":
      fixes.append(f"--config.model.{t}.dtype=bfloat16")
  fixes.append(f"a smaller --config.batch_size (now {cfg.batch_size}) with --config.grad_accum_steps")
  fixes.append("a larger fsdp axis (--config.mesh.fsdp)")
  return ", ".join(fixes)


def check_fits(compiled, cfg: ml_collections.ConfigDict, limit: int | None = None) -> int | None:
  """Raises ConfigError when the compiled step needs more than HEADROOM of the device's memory; returns the bytes
  needed (None when the device reports no limit)."""
  limit = device_bytes_limit() if limit is None else limit
  if not limit:
    return None
  need = step_bytes(compiled)
  if need > HEADROOM * limit:
    gib = 2 ** 30
    raise ConfigError(f"the train step needs {need / gib:.1f} GiB per device but {jax.local_devices()[0].device_kind} "
                      f"has {limit / gib:.1f} GiB; try {_fixes(cfg)} (python -m internvl_jax.plan sizes a run "
                      "before it starts)")
  return need

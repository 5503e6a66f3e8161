"""Train InternVL stages: python train.py --config configs/<file>.py[:arg] --workdir DIR [--config.field=value ...]

A config with `stages` (configs/demo.py) runs each stage in DIR/<stage name>, in order; any other config is one
stage in DIR. Rerunning the same command resumes; a finished stage is not retrained.

Several hosts (one process per host, the same command on each; docs/scaling.md):
  --coordinator_address=HOST:PORT --num_processes=N --process_id=I   explicit (any cluster, or CPU processes)
  --distributed                                                       let JAX detect it (TPU pods, Slurm, ...)
Multi-host TPU VMs and Slurm jobs with more than one task are detected without a flag.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "configs/<file>.py[:arg]", lock_config=True)
flags.DEFINE_string("workdir", None, "run folder: checkpoints, metrics.jsonl, config.json, tokenizer.json")
flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() first (one process per host); the "
                  "cluster is auto-detected (TPU, Slurm, Open MPI, ...)")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0's coordinator (multi-process runs)")
flags.DEFINE_integer("num_processes", None, "number of processes (with --coordinator_address)")
flags.DEFINE_integer("process_id", None, "this process's index in [0, num_processes) (with --coordinator_address)")
flags.DEFINE_bool("verbose", False, "full Python tracebacks for errors (default: one line naming the fix)")
flags.DEFINE_string("cpu_collectives", "gloo", "collectives of the CPU backend in multi-process runs (gloo|mpi)")


def _auto_detected_cluster() -> bool:
  """True on a multi-host TPU slice or in a Slurm job with several tasks: there jax.distributed.initialize()
  needs no arguments, and skipping it would silently train N independent copies."""
  tpu_hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return "," in tpu_hosts or int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1


def init_distributed() -> None:
  """jax.distributed.initialize before any other JAX call (it must precede backend creation)."""
  import jax

  explicit = FLAGS.coordinator_address is not None
  if not (explicit or FLAGS.distributed or _auto_detected_cluster()):
    return
  # the CPU backend has no cross-process collectives unless one is named (GPU / TPU ignore this setting)
  jax.config.update("jax_cpu_collectives_implementation", FLAGS.cpu_collectives)
  if explicit:
    if FLAGS.num_processes is None or FLAGS.process_id is None:
      raise app.UsageError("--coordinator_address needs --num_processes and --process_id")
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  else:
    jax.distributed.initialize()


def _stages(config, workdir: str):
  """[(name, stage config, stage workdir)]; '<workdir>' in init.path / tokenizer is the top-level workdir."""
  if "stages" not in config:
    return [(os.path.basename(os.path.normpath(workdir)), config, workdir)]
  order = list(config.get("stage_order", None) or config.stages.keys())
  out = []
  for name in order:
    if name not in config.stages:
      raise ValueError(f"config.stage_order names {name!r}, which is not in config.stages")
    stage = config.stages[name]
    with stage.unlocked():
      stage.init.path = stage.init.path.replace("<workdir>", workdir)
      stage.tokenizer = stage.tokenizer.replace("<workdir>", workdir)
    out.append((name, stage, os.path.join(workdir, name)))
  return out


def main(argv):
  del argv
  if FLAGS.config is None or FLAGS.workdir is None:
    raise app.UsageError("give --config configs/<file>.py[:arg] and --workdir DIR")
  init_distributed()
  import jax

  from internvl_jax.data.pipeline import DataError
  from internvl_jax.train import loop
  from internvl_jax.train.checkpoint import CheckpointError
  from internvl_jax.train.config_checks import ConfigError

  logging.getLogger("absl").setLevel(logging.WARNING)
  workdir = os.path.abspath(FLAGS.workdir)
  summary = []
  try:
    for name, stage_cfg, stage_dir in _stages(FLAGS.config, workdir):
      start = time.time()
      print(f"== {name}: task {stage_cfg.task}, model {stage_cfg.get('model_name', '?')}, "
            f"{jax.device_count()} device(s), process {jax.process_index()}/{jax.process_count()}, "
            f"workdir {stage_dir}", flush=True)
      result = loop.run(stage_cfg, stage_dir)
      summary.append(loop.summarize(name, result, time.time() - start))
      if result.get("preempted"):
        break
  except (ConfigError, DataError, CheckpointError, loop.TrainingStopped, FileNotFoundError, ImportError,
          ValueError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  if jax.process_index() == 0:
    print("\n".join(["", "== results (held-out eval split)"] + summary), flush=True)


if __name__ == "__main__":
  from internvl_jax.train import flag_errors
  app.run(main, flags_parser=flag_errors.parser(FLAGS))

"""Train InternVL stages: python train.py --config configs/<file>.py[:arg] --workdir DIR [--config.field=value ...]

A config with `stages` (configs/demo.py) runs each stage in DIR/<stage name>, in order; any other config is one
stage in DIR. Rerunning the same command resumes; a finished stage is not retrained.
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
flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() first (one process per host)")


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
  import jax

  if FLAGS.distributed:
    jax.distributed.initialize()
  from internvl_jax.data.pipeline import DataError
  from internvl_jax.train import loop
  from internvl_jax.train.config_checks import ConfigError

  logging.getLogger("absl").setLevel(logging.WARNING)
  workdir = os.path.abspath(FLAGS.workdir)
  summary = []
  try:
    for name, stage_cfg, stage_dir in _stages(FLAGS.config, workdir):
      start = time.time()
      print(f"== {name}: task {stage_cfg.task}, model {stage_cfg.get('model_name', '?')}, "
            f"{jax.device_count()} device(s), workdir {stage_dir}", flush=True)
      result = loop.run(stage_cfg, stage_dir)
      summary.append(loop.summarize(name, result, time.time() - start))
      if result.get("preempted"):
        break
  except (ConfigError, DataError, loop.TrainingStopped, FileNotFoundError, ImportError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  if jax.process_index() == 0:
    print("\n".join(["", "== results (held-out eval split)"] + summary), flush=True)


if __name__ == "__main__":
  app.run(main)

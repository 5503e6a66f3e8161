"""A user's mistakes never damage a run (issue 16): a resume with another model leaves config.json alone, two
trainers cannot share a workdir, a damaged newest checkpoint falls back to the previous one (exactly), replayed
steps appear once in metrics.jsonl, bad-record counters survive a resume, and an init.path that matches nothing
stops the run."""

import glob
import json
import os
import subprocess
import sys

import pytest

from internvl_jax.train import checkpoint, loop, workdir as workdir_lib

from conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _config(**kw):
  cfg = tiny_config("contrastive", **kw)
  cfg.data.eval.source = ""  # no eval: fewer compilations; these tests are about the workdir
  return cfg


def test_resume_with_another_model_keeps_config_json(tmp_path):
  wd = str(tmp_path / "run")
  loop.run(_config(total_steps=2), wd)
  with open(os.path.join(wd, "config.json")) as f:
    before = f.read()
  changed = _config(total_steps=4)
  changed.model.vision.num_layers = 3
  with pytest.raises(workdir_lib.WorkdirError, match=r"another model \(model.vision.num_layers: 2 -> 3\)"):
    loop.run(changed, wd)
  with open(os.path.join(wd, "config.json")) as f:
    assert f.read() == before  # eval.py still reads the model the checkpoints hold
  # compute-only changes (dtype, remat) are a legitimate resume
  assert not workdir_lib.model_differences({"vision": {"dtype": "float32", "remat": "none", "num_layers": 2}},
                                           {"vision": {"dtype": "bfloat16", "remat": "full", "num_layers": 2}})
  assert loop.run(_config(total_steps=4), wd)["step"] == 4


def test_second_trainer_on_a_workdir_stops_with_the_holder_named(tmp_path):
  wd = tmp_path / "run"
  wd.mkdir()
  with workdir_lib.RunLock(str(wd)):
    with pytest.raises(workdir_lib.WorkdirError, match=rf"in use by another trainer \(host .*, pid {os.getpid()}"):
      with workdir_lib.RunLock(str(wd)):
        pass
    out = subprocess.run([sys.executable, "train.py", "--config", "configs/contrastive.py:model=tiny",
                          "--workdir", str(wd), "--config.total_steps=1", "--config.progress=False"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    assert f"pid {os.getpid()}" in out.stderr and "in use by another trainer" in out.stderr
    assert not os.path.exists(wd / "config.json") and not os.path.exists(wd / "checkpoints")
  # the holder is gone (as after kill -9: the kernel drops the flock); the stale file does not block
  with open(wd / workdir_lib.LOCK_FILE, "w") as f:
    json.dump({"host": "elsewhere", "pid": 1, "started": "long ago"}, f)
  with workdir_lib.RunLock(str(wd)):
    pass


def test_damaged_newest_checkpoint_falls_back_and_replays_exactly(tmp_path):
  straight = str(tmp_path / "straight")
  loop.run(_config(total_steps=6, checkpoint_every=2), straight)

  wd = str(tmp_path / "run")
  loop.run(_config(total_steps=4, checkpoint_every=2), wd)  # checkpoints 2 and 4
  files = [p for p in glob.glob(os.path.join(wd, "checkpoints", "4", "state", "**", "*"), recursive=True)
           if os.path.isfile(p) and os.sep + "d" + os.sep in p]  # the array data files (OCDBT d/ folders)
  assert files, sorted(glob.glob(os.path.join(wd, "checkpoints", "4", "state", "**"), recursive=True))
  for p in files:  # cut every data file of the newest checkpoint in half
    with open(p, "r+b") as f:
      f.truncate(os.path.getsize(p) // 2)
  result = loop.run(_config(total_steps=6, checkpoint_every=2), wd)
  assert result["step"] == 6
  assert os.path.isdir(os.path.join(wd, checkpoint.DAMAGED_DIR, "4"))  # kept, not deleted
  a = {r["step"]: r for r in _rows(straight)}
  rows = _rows(wd)
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # steps 3-4 were replayed and appear once
  for r in rows:
    assert r["loss"] == a[r["step"]]["loss"], r["step"]  # bit-identical to the uninterrupted run
    # the counters continue from the checkpoint instead of restarting at 0 (which would be ~16 short); they count
    # what the prefetching reader has featurised, so they match the uninterrupted run's to within its read-ahead
    assert abs(r["records_seen"] - a[r["step"]]["records_seen"]) <= 4, (r, a[r["step"]])


def test_no_checkpoint_restores_is_one_line_and_moves_nothing(tmp_path):
  wd = str(tmp_path / "run")
  loop.run(_config(total_steps=2, checkpoint_every=2), wd)
  os.remove(os.path.join(wd, "checkpoints", "2", "data", "metadata")) if os.path.exists(
      os.path.join(wd, "checkpoints", "2", "data", "metadata")) else None
  for p in glob.glob(os.path.join(wd, "checkpoints", "2", "state", "*")):
    if os.path.isfile(p):
      os.remove(p)
  with pytest.raises(checkpoint.CheckpointError, match=r"no checkpoint in .* restores \(newest, step 2: "):
    loop.run(_config(total_steps=4, checkpoint_every=2), wd)
  assert os.path.isdir(os.path.join(wd, "checkpoints", "2"))


def test_init_rows_rules():
  from internvl_jax.train import init_from
  rows = [("language/embed/embedding", "fresh", "(8, 4)"), ("language/norm/scale", "fresh", "(4,)")]
  with pytest.raises(ValueError, match="matches none of this model's 2 parameters"):
    init_from.check_rows(rows, "X", False, ["vision/cls"])
  partial_group = [("vision/cls", "copied", "(1,)"), ("vision/pos", "fresh", "(1,)"),
                   ("language/embed/embedding", "fresh", "(8, 4)")]
  with pytest.raises(ValueError, match="holds only part of group 'vision': vision/pos not found"):
    init_from.check_rows(partial_group, "X", False, ["vision/cls"])
  init_from.check_rows(partial_group, "X", True, ["vision/cls"])  # partial=True: allowed
  with_adapters = [("language/q/kernel", "copied", ""), ("language/q/lora/lora_a", "fresh", "")]
  init_from.check_rows(with_adapters, "X", False, ["language/q/kernel"])  # adapters are always fresh


def test_train_cli_init_path_matching_nothing_is_one_line(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  from internvl_jax.train import init_from
  # a workdir whose checkpoint holds names this model does not have
  import numpy as np
  import orbax.checkpoint as ocp
  manager = ocp.CheckpointManager(str(src / "checkpoints"), item_names=checkpoint.ITEMS,
                                  options=ocp.CheckpointManagerOptions(create=True))
  manager.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": {"other": {"w": np.ones(3)}},
                                                                        "frozen": {}}),
                                          data=ocp.args.JsonSave({})))
  manager.wait_until_finished()
  manager.close()
  assert init_from.load_source(str(src))  # readable: the error below is about names, not the file
  out = subprocess.run([sys.executable, "train.py", "--config", "configs/contrastive.py:model=tiny",
                        "--workdir", str(tmp_path / "run"), "--config.total_steps=1", "--config.progress=False",
                        f"--config.init.path={src}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 1
  lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1 and "matches none of this model's" in lines[0] and "other/w" in lines[0], out.stderr[-2000:]


def test_workdir_that_is_a_file_or_read_only_is_one_line(tmp_path, monkeypatch):
  as_file = tmp_path / "file"
  as_file.write_text("x")
  with pytest.raises(workdir_lib.WorkdirError, match="is a file; give a folder"):
    loop.run(_config(total_steps=1), str(as_file))
  # read-only folders, as a non-root user meets them (the tests may run as root, whom chmod does not stop)
  ro = str(tmp_path / "ro")
  os.makedirs(ro)
  real_access = os.access
  monkeypatch.setattr(os, "access", lambda p, mode: False if os.path.abspath(p) == ro else real_access(p, mode))
  with pytest.raises(workdir_lib.WorkdirError, match="is not writable; give a writable folder"):
    loop.run(_config(total_steps=1), ro)

  def refuse(path, exist_ok=False):
    raise PermissionError(13, "Permission denied", path)
  monkeypatch.setattr(os, "makedirs", refuse)
  with pytest.raises(workdir_lib.WorkdirError, match=r"cannot create --workdir .*sub \(Permission denied\)"):
    loop.run(_config(total_steps=1), os.path.join(ro, "sub"))


def test_quieting_orbax_keeps_the_callers_log_level():
  """Reading a checkpoint hides Orbax's INFO / WARNING lines and then gives the "absl" logger back the level the
  caller set (train.py sets WARNING under absl.app, whose parsed --verbosity flag says INFO): a restore that went
  through absl's get/set_verbosity turned every later Orbax INFO line back on."""
  import logging

  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS(["test"])
  logger = logging.getLogger("absl")
  before, verbosity = logger.level, flags.FLAGS.verbosity
  try:
    flags.FLAGS.verbosity = 0  # as absl.app.run leaves it: INFO
    logger.setLevel(logging.WARNING)  # then train.py's own level
    with checkpoint._quiet_orbax():
      assert not logger.isEnabledFor(logging.WARNING)
    assert logger.level == logging.WARNING
  finally:
    flags.FLAGS.verbosity = verbosity
    logger.setLevel(before)

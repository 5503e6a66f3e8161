"""Helper for test_train_cli: a few contrastive steps on whatever devices JAX sees (fsdp over all of them);
writes losses and final parameters to the .npz named on the command line."""

import sys

import jax
import numpy as np

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])
sys.path.insert(0, __file__.rsplit("/", 1)[0])

from conftest import tiny_config  # noqa: E402
from internvl_jax import sharding  # noqa: E402
from internvl_jax.data import demo, features, pipeline, tokenizer  # noqa: E402
from internvl_jax.train import config_checks, state as state_lib, steps  # noqa: E402


def main(path):
  cfg = tiny_config("contrastive", batch_size=8)
  tok = tokenizer.build_word_level(demo.DemoWorld("train", 64, 56).texts())
  config_checks.adapt_model_to_tokenizer(cfg, tok, built=True)
  mesh = sharding.make_mesh(dict(cfg.mesh))
  setup = state_lib.setup_state(cfg, cfg.model, mesh)
  state = setup.create()
  step = steps.make_train_step(setup, cfg)
  fn = features.make_feature_fn(features.FeatureSpec("contrastive", 56, cfg.data.max_text_len), tok)
  world = demo.DemoWorld("train", 64, 56)
  sh = steps.batch_sharding(mesh)
  losses = []
  for i in range(3):
    b = pipeline._stack([fn(world[j], None) for j in range(8 * i, 8 * i + 8)], 8)
    b.pop("valid")
    state, m = step(state, {k: jax.device_put(v, sh) for k, v in b.items()})
    losses.append(float(m["loss"]))
  flat = jax.tree_util.tree_flatten_with_path(state["params"])[0]
  params = {"p/" + "/".join(str(getattr(k, "key", k)) for k in p): np.asarray(v) for p, v in flat}
  np.savez(path, losses=np.asarray(losses), devices=jax.device_count(), **params)


if __name__ == "__main__":
  main(sys.argv[1])

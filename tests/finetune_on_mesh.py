"""Helper for test_finetune_mesh (a subprocess; the device count comes from XLA_FLAGS): two stage-3 steps with
LoRA on both towers, unfreeze_vit_layers=-1 and loss_reduction='square' on a (fsdp, tensor) mesh over every
device; writes the losses and the final trainable and frozen parameters to the .npz named on the command line."""

import sys

import jax
import numpy as np

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])
sys.path.insert(0, __file__.rsplit("/", 1)[0])

jax.config.update("jax_default_matmul_precision", "highest")

from conftest import tiny_config  # noqa: E402
from internvl_jax import sharding  # noqa: E402
from internvl_jax.data import demo, features, pipeline, tokenizer  # noqa: E402
from internvl_jax.train import config_checks, state as state_lib, steps  # noqa: E402


def main(path):
  tensor = 2 if jax.device_count() >= 4 else 1
  cfg = tiny_config("instruct", use_llm_lora=4, use_backbone_lora=2, freeze_backbone=True, unfreeze_vit_layers=-1,
                    loss_reduction="square", warmup_steps=0, lr=1e-2, **{"mesh.tensor": tensor})
  tok = tokenizer.build_word_level(demo.DemoWorld("train", 64, 56).texts())
  config_checks.adapt_model_to_tokenizer(cfg, tok, built=True)
  mesh = sharding.make_mesh(dict(cfg.mesh))
  config_checks.validate(cfg, mesh)
  setup = state_lib.setup_state(cfg, cfg.model, mesh)
  state = setup.create()
  step = steps.make_train_step(setup, cfg)
  spec = features.FeatureSpec("instruct", 56, cfg.data.max_text_len, tokens_per_tile=config_checks.tokens_per_tile(cfg))
  fn = features.make_feature_fn(spec, tok)
  world = demo.DemoWorld("train", 64, 56)
  sh = steps.batch_sharding(mesh)
  losses = []
  for i in range(2):
    b = pipeline._stack([fn(world[j], None) for j in range(8 * i, 8 * i + 8)], 8)
    b.pop("valid")
    state, m = step(state, {k: jax.device_put(v, sh) for k, v in b.items()})
    losses.append(float(m["loss"]))
  out = {}
  for part in ("params", "frozen"):
    for p, v in jax.tree_util.tree_flatten_with_path(state[part])[0]:
      out[part + "/" + "/".join(str(getattr(k, "key", k)) for k in p)] = np.asarray(v)
  a_spec = setup.shardings["params"]["language"]["layers"]["attn"]["q"]["lora"]["lora_b"].spec
  np.savez(path, losses=np.asarray(losses), devices=jax.device_count(), lora_b_spec=str(a_spec), **out)


if __name__ == "__main__":
  main(sys.argv[1])

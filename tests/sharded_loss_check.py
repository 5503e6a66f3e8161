"""Helper for test_sharded_loss (run in a subprocess with 8 fake CPU devices): compares the sharded contrastive
loss, its metrics and its gradients with the plain loss on a 2 x 4 (data x fsdp) mesh, and runs one train step
of the tiny contrastive model with the switch on and off. Prints one JSON line."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])
sys.path.insert(0, __file__.rsplit("/", 1)[0])

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from internvl_jax import losses, sharding  # noqa: E402


def loss_parts(mesh):
  rng = np.random.default_rng(0)
  b, e = 32, 8
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  img, txt = unit(rng.normal(size=(b, e))), unit(rng.normal(size=(b, e)))
  txt[5] = img[5]  # a few exact positives so the accuracies are not all zero
  sh = NamedSharding(mesh, P(("data", "fsdp")))
  img, txt = jax.device_put(jnp.asarray(img, jnp.float32), sh), jax.device_put(jnp.asarray(txt, jnp.float32), sh)
  scale = jnp.asarray(1 / 0.07, jnp.float32)

  def run(fn):
    f = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2), has_aux=True))
    (loss, m), g = f(img, txt, scale)
    return float(loss), {k: float(v) for k, v in m.items()}, [np.asarray(x) for x in g]

  plain = run(losses.contrastive_loss)
  sharded = run(lambda a, t, s: losses.sharded_contrastive_loss(a, t, s, mesh))
  hlo = jax.jit(lambda a, t, s: losses.sharded_contrastive_loss(a, t, s, mesh)[0]).lower(img, txt, scale).as_text()
  return {"loss_plain": plain[0], "loss_sharded": sharded[0], "metrics_plain": plain[1],
          "metrics_sharded": sharded[1],
          "grad_max_abs_diff": [float(np.max(np.abs(a - b))) for a, b in zip(plain[2], sharded[2])],
          "grad_max_abs": [float(np.max(np.abs(a))) for a in plain[2]],
          "sharded_hlo_has_all_gather": "all_gather" in hlo or "all-gather" in hlo}


def train_step_losses(mesh):
  from conftest import random_contrastive_batch, tiny_config
  from internvl_jax.train import state as state_lib, steps

  out = {}
  for switch in (True, False):
    cfg = tiny_config("contrastive", batch_size=16, sharded_contrastive_loss=switch)
    setup = state_lib.setup_state(cfg, cfg.model, mesh)
    state = setup.create()
    batch = random_contrastive_batch(cfg, mesh)
    step = steps.make_train_step(setup, cfg)
    jaxpr = str(jax.make_jaxpr(step)(state, batch))
    # the towers' residual stream is pinned to the batch sharding (models/stack.py) inside the train step
    out["residual_constrained"] = jaxpr.count("sharding_constraint") >= 2
    _, m = step(state, batch)
    out[str(switch)] = {"losses": [float(m["loss"]), float(m["grad_norm"])], "uses_shard_map": "shard_map" in jaxpr}
  return out


if __name__ == "__main__":
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
  result = loss_parts(mesh)
  result["train_step"] = train_step_losses(mesh)
  print(json.dumps(result))

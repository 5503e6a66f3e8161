"""Helper for test_sigmoid_ring (run in a subprocess with 8 fake CPU devices): the ring form of the sigmoid loss
against the same loss written in numpy and against the plain jnp form (value, metrics, gradients) on a 2 x 4
(data x fsdp) mesh; per ring distance k, inputs whose only large terms sit k steps around the ring; the compiled
program's collectives and largest logits block ('loss'); one train step of the tiny contrastive model with the
sharded switch on and off ('train_step'). Prints one JSON line."""

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

B, E = 32, 8


def numpy_sigmoid_loss(img, txt, t, b):
  """SigLIP's loss, float64: -sum log sigmoid(z * (t x.y + b)) / B, z = +1 on the diagonal, -1 elsewhere."""
  logits = t * img.astype(np.float64) @ txt.astype(np.float64).T + b
  z = 2 * np.eye(len(img)) - 1
  return float(np.sum(np.logaddexp(0.0, -z * logits)) / len(img))


def compare(mesh, img, txt, t, b):
  sh = NamedSharding(mesh, P(("data", "fsdp")))
  a, x = jax.device_put(jnp.asarray(img, jnp.float32), sh), jax.device_put(jnp.asarray(txt, jnp.float32), sh)
  args = (a, x, jnp.float32(t), jnp.float32(b))

  def run(fn):
    (loss, m), g = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3), has_aux=True))(*args)
    return float(loss), {k: float(v) for k, v in m.items()}, [np.asarray(v) for v in g]

  plain = run(losses.sigmoid_loss)
  ring = run(lambda *v: losses.sharded_sigmoid_loss(*v, mesh))
  return {"numpy": numpy_sigmoid_loss(img, txt, t, b), "plain": plain[0], "ring": ring[0],
          "metrics_plain": plain[1], "metrics_ring": ring[1],
          "grad_max_abs_diff": [float(np.max(np.abs(p - r))) for p, r in zip(plain[2], ring[2])],
          "grad_max_abs": [float(np.max(np.abs(p))) for p in plain[2]]}, args


def random_case(mesh):
  rng = np.random.default_rng(0)
  unit = lambda v: v / np.linalg.norm(v, axis=1, keepdims=True)
  img, txt = unit(rng.normal(size=(B, E))), unit(rng.normal(size=(B, E)))
  txt[5] = img[5]  # a sure positive, so the accuracies are compared on a non-zero value
  out, args = compare(mesh, img, txt, 10.0, -10.0)
  out["init_t_b"] = compare(mesh, img, txt, 3.0, -1.0)[0]  # a second point where negatives weigh more
  hlo = jax.jit(lambda *v: losses.sharded_sigmoid_loss(*v, mesh)[0]).lower(*args).compile().as_text()
  grad_hlo = jax.jit(jax.grad(lambda *v: losses.sharded_sigmoid_loss(*v, mesh)[0], argnums=(0, 1))).lower(
      *args).compile().as_text()
  out["hlo"] = {k: {"collective_permute": "collective-permute" in h, "all_gather": "all-gather" in h,
                    "global_block": f"f32[{B},{B}]" in h, "local_block": f"f32[{B // 8},{B // 8}]" in h}
                for k, h in (("forward", hlo), ("gradient", grad_hlo))}
  return out


def ring_distance_cases(mesh):
  """For each ring distance k = 1..7: logits (with img = I, txt = M.T, t = 1, b = 0) of +20 on the diagonal and on
  the pairs (row r of shard s, row r of shard s - k), -20 elsewhere. Every large term of the loss (about 20 each,
  B of them) sits k steps around the ring: a ring that skips or repeats that step is off by about 20."""
  n, m = 8, B // 8
  out = {}
  for k in range(1, n):
    logits = np.full((B, B), -20.0)
    np.fill_diagonal(logits, 20.0)
    for s in range(n):
      for r in range(m):
        logits[s * m + r, ((s - k) % n) * m + r] = 20.0
    res, _ = compare(mesh, np.eye(B), logits.T.copy(), 1.0, 0.0)
    out[str(k)] = {key: res[key] for key in ("numpy", "plain", "ring", "grad_max_abs_diff")}
  return out


def train_step_losses(mesh):
  from conftest import random_contrastive_batch, tiny_config
  from internvl_jax.train import state as state_lib, steps

  out = {}
  for switch in (True, False):
    cfg = tiny_config("contrastive", batch_size=16, sharded_contrastive_loss=switch, loss="sigmoid")
    setup = state_lib.setup_state(cfg, cfg.model, mesh)
    state = setup.create()
    batch = random_contrastive_batch(cfg, mesh)
    step = steps.make_train_step(setup, cfg)
    jaxpr = str(jax.make_jaxpr(step)(state, batch))
    _, m = step(state, batch)
    out[str(switch)] = {"metrics": {k: float(v) for k, v in m.items()}, "uses_ppermute": "ppermute" in jaxpr}
  return out


if __name__ == "__main__":  # argument: 'loss' (the loss functions) or 'train_step'
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
  if sys.argv[1:] == ["train_step"]:
    result = {"train_step": train_step_losses(mesh)}
  else:
    result = {"random": random_case(mesh), "ring": ring_distance_cases(mesh)}
  print(json.dumps(result))

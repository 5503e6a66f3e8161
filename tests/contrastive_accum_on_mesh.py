"""Helper for test_contrastive_accum (a subprocess with 8 fake CPU devices): one train step of the tiny contrastive
model on a data=2 x fsdp=4 mesh, batch 32, on the whole batch (contrastive_accum_steps=1) and in 4 chunks of 8 rows
(one per device each) with full remat of both towers; both with the sharded contrastive loss. Prints one JSON line:
the two steps' metrics, the largest gradient (from Adam's first moment) and parameter differences, and the layout
of the chunked batch."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])
sys.path.insert(0, __file__.rsplit("/", 1)[0])

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from conftest import tiny_config  # noqa: E402
from internvl_jax import sharding  # noqa: E402
from internvl_jax.train import contrastive_accum, state as state_lib, steps  # noqa: E402

B, K = 32, 4


def first_gradient(opt_state, b1: float):
  """The gradient of the first step, read back from Adam's first moment (mu = (1 - b1) g after one update)."""
  adam = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
          if isinstance(s, optax.ScaleByAdamState)]
  return jax.tree.map(lambda m: np.asarray(m) / (1 - b1), adam[0].mu)


def main():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
  out, params, grads = {}, {}, {}
  for k in (1, K):
    # eps 1e-3: Adam's first update is lr * g / (|g| + eps), which with the default 1e-6 turns rounding-level
    # gradient differences of near-zero entries into visible parameter differences
    cfg = tiny_config("contrastive", batch_size=B, contrastive_accum_steps=k, warmup_steps=0, grad_clip=0.0,
                      eps=1e-3)
    if k > 1:
      cfg.model.vision.remat = cfg.model.text.remat = "full"
    setup = state_lib.setup_state(cfg, cfg.model, mesh)
    state = setup.create()
    params0 = jax.tree.map(np.asarray, state["params"])
    rng = np.random.default_rng(1)
    t = cfg.data.max_text_len
    batch = {"pixel_values": rng.normal(size=(B, 56, 56, 3)).astype(np.float32),
             "input_ids": rng.integers(1, cfg.model.text.vocab_size, size=(B, t)).astype(np.int32),
             "attention_mask": (np.arange(t)[None] < rng.integers(3, t + 1, size=(B, 1))).astype(np.int32)}
    batch = {n: jax.device_put(v, steps.batch_sharding(mesh)) for n, v in batch.items()}
    state, m = steps.make_train_step(setup, cfg)(state, batch)
    out[str(k)] = {n: float(v) for n, v in m.items()}
    params[k] = jax.tree.map(np.asarray, state["params"])
    grads[k] = first_gradient(state["opt_state"], cfg.b1)
    if k > 1:
      with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        chunked = jax.jit(lambda x: contrastive_accum.to_chunks(x, k))(batch["input_ids"])
      out["chunk_spec"] = [None if a is None else list(a) if isinstance(a, tuple) else a
                           for a in chunked.sharding.spec]
      # device 0 holds rows 0..3 of the batch: rows 0 of the K chunks (c, c + K, ... are chunk c's rows)
      shard0 = next(s for s in chunked.addressable_shards if s.device == mesh.devices.flat[0])
      out["device0_rows"] = np.asarray(shard0.data).tolist() == np.asarray(batch["input_ids"])[:4, None].tolist()
  out["param_max_abs_diff"] = max(float(np.max(np.abs(a - b)))
                                  for a, b in zip(jax.tree.leaves(params[1]), jax.tree.leaves(params[K])))
  # per leaf: (max |difference|, max |gradient|)
  out["grad_diffs"] = [(float(np.max(np.abs(a - b))), float(np.max(np.abs(a))))
                       for a, b in zip(jax.tree.leaves(grads[1]), jax.tree.leaves(grads[K]))]
  out["param_update_max_abs"] = max(float(np.max(np.abs(a - b)))
                                    for a, b in zip(jax.tree.leaves(params[1]), jax.tree.leaves(params0)))
  print(json.dumps(out))


if __name__ == "__main__":
  main()

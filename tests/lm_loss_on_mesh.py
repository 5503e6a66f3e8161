"""Helper for test_loss_reduction (a subprocess with 4 fake CPU devices): the LM loss of every loss_reduction
jitted with the batch split over the mesh. Prints one JSON line {reduction: loss} and the inputs it used."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from internvl_jax import losses, sharding  # noqa: E402

rng = np.random.default_rng(3)
logits = rng.normal(size=(8, 6, 11)).astype(np.float32)
targets = rng.integers(0, 11, size=(8, 6))
mask = np.zeros((8, 6), bool)
for i, n in enumerate([1, 5, 2, 0, 6, 3, 1, 4]):  # every shard of 2 rows holds different counts
  mask[i, :n] = True
mesh = sharding.make_mesh({"fsdp": 4})
put = lambda x: jax.device_put(jnp.asarray(x), NamedSharding(mesh, P("fsdp")))
out = {"logits": logits.tolist(), "targets": targets.tolist(), "mask": mask.tolist()}
for r in losses.LM_REDUCTIONS:
  loss, _ = jax.jit(lambda a, b, c: losses.lm_loss(a, b, c, r))(put(logits), put(targets), put(mask))
  out[r] = float(loss)
print(json.dumps(out))

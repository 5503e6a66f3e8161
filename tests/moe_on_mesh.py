"""Helper for test_qwen3_moe: loads the Qwen3-MoE folder named on the command line on one device and on a mesh of
all devices (the test runs it with 8 fake CPU devices: fsdp=2 x expert=4), runs logits, the router loss and
their gradients under jit on both, and prints one JSON line with the differences."""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])

from internvl_jax import convert, sharding  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def run(model, ids, mask):
  @nnx.jit
  def f(model, ids, mask):
    def loss(model):
      out = model(ids, attention_mask=mask)
      return jnp.mean(out.logits ** 2) + out.aux_loss, (out.logits, out.aux_loss)
    (_, (logits, aux)), grads = nnx.value_and_grad(loss, has_aux=True)(model)
    return logits, aux, grads
  logits, aux, grads = f(model, ids, mask)
  flat = {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}
  return np.asarray(logits), float(aux), flat


def main(folder):
  ids = np.random.default_rng(2).integers(0, 95, (4, 7)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, :3] = 0
  one = convert.load_pretrained(folder)
  mesh = sharding.make_mesh({"fsdp": 2, "expert": 4})
  many = convert.load_pretrained(folder, mesh=mesh)
  spec = many.layers.mlp.gate.get_value().sharding.spec
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # as the train step: experts run in a shard_map
    l8, a8, g8 = run(many, jax.device_put(ids, sharding.leading_axis_sharding(mesh, ids.shape)),
                     jax.device_put(mask, sharding.leading_axis_sharding(mesh, mask.shape)))
    graphdef, state = nnx.split(many)
    uses_shard_map = "shard_map" in str(jax.make_jaxpr(lambda st, i: nnx.merge(graphdef, st)(i).logits)(
        state, jnp.zeros((8, 3), jnp.int32)))
  l1, a1, g1 = run(one, ids, mask)
  print(json.dumps(dict(
      devices=jax.device_count(), expert_spec=[str(s) for s in spec], uses_shard_map=uses_shard_map,
      logits_rel=float(np.max(np.abs(l8 - l1)) / np.max(np.abs(l1))), aux=[a1, a8],
      grad_rel=max(float(np.max(np.abs(g8[k] - g1[k])) / max(np.max(np.abs(g1[k])), 1e-12)) for k in g1),
      expert_grad_max=float(np.max(np.abs(g1["layers/mlp/gate"]))))))


if __name__ == "__main__":
  main(sys.argv[1])

"""Helper for test_qwen3_moe: loads the Qwen3-MoE folder named first on the command line on one device and on each
mesh named after it (e.g. fsdp=2,expert=4; the test runs 8 fake CPU devices), runs logits, the router loss and
their gradients under jit on both, for a batch of 8 rows that splits over data x fsdp x expert (tokens go to
their experts by all-gather / reduce-scatter over 'expert') and one of 2 rows that does not split over 'expert'
(tokens the same along it, outputs psum-ed), and prints one JSON line with the differences. With --generate it
also compares greedy generation (KV cache, left padding) on each mesh with one device, for 8 and 3 rows."""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])

from internvl_jax import convert, sharding  # noqa: E402
from internvl_jax.generate import generate  # noqa: E402
from internvl_jax.train import steps  # noqa: E402

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
  return np.asarray(logits), float(aux), flat, getattr(logits.sharding, "spec", None)


def main(folder, meshes, with_generate=False):
  rng = np.random.default_rng(2)
  one = convert.load_pretrained(folder)
  out = {"devices": jax.device_count()}
  for text in meshes:
    shape = {k: int(v) for k, v in (part.split("=") for part in text.split(","))}
    mesh = sharding.make_mesh(dict(shape, fsdp=shape.get("fsdp", 1)))
    many = convert.load_pretrained(folder, mesh=mesh)
    for rows in (8, 2):  # 8: split 8 ways (expert included); 2: only over data / fsdp
      ids = rng.integers(0, 95, (rows, 7)).astype(np.int32)
      mask = np.ones_like(ids)
      mask[1, :3] = 0
      l1, a1, g1, _ = run(one, ids, mask)
      with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # as the train step: experts run in a shard_map
        place = lambda x: jax.device_put(x, steps.batch_sharding(mesh) if rows == 8 else
                                         sharding.leading_axis_sharding(mesh, x.shape))
        l8, a8, g8, spec = run(many, place(ids), place(mask))
        graphdef, state = nnx.split(many)
        jaxpr = str(jax.make_jaxpr(lambda st, i: nnx.merge(graphdef, st)(i).logits)(
            state, place(jnp.zeros((rows, 7), jnp.int32))))
      out[f"{text}/rows{rows}"] = dict(
          expert_spec=[str(s) for s in many.layers.mlp.gate.get_value().sharding.spec],
          logits_spec=str(spec), shard_map="shard_map" in jaxpr, reduce_scatter="reduce_scatter" in jaxpr,
          all_gather="all_gather" in jaxpr,
          logits_rel=float(np.max(np.abs(l8 - l1)) / np.max(np.abs(l1))), aux=[a1, a8],
          grad_rel=max(float(np.max(np.abs(g8[k] - g1[k])) / max(np.max(np.abs(g1[k])), 1e-12)) for k in g1),
          expert_grad_max=float(np.max(np.abs(g1["layers/mlp/gate"]))))
      if with_generate:
        rows_g = 3 if rows == 2 else rows  # 3 rows split over nothing: replicated, psum path
        ids = rng.integers(0, 95, (rows_g, 6)).astype(np.int32)
        mask = np.ones_like(ids)
        mask[0, :2] = 0
        same = np.array_equal(np.asarray(generate(one, ids, attention_mask=mask, max_new_tokens=6)),
                              np.asarray(generate(many, ids, attention_mask=mask, max_new_tokens=6)))
        out[f"{text}/rows{rows}"]["generate_equal"] = bool(same)
  print(json.dumps(out))


if __name__ == "__main__":
  args = [a for a in sys.argv[1:] if a != "--generate"]
  main(args[0], args[1:], with_generate="--generate" in sys.argv)

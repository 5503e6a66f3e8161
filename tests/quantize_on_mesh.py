"""Helper for test_quantize (run in a subprocess with 8 fake CPU devices): a tiny InternVL3-hf-style chat folder
loaded on one device and on an fsdp=4 x tensor=2 mesh, both quantized (int8 per channel, vision tower included);
writes to the JSON named on the command line whether the greedy tokens agree and how the quantized kernels are
laid out on the mesh.

  python tests/quantize_on_mesh.py OUT.json
"""

import json
import os
import sys
import tempfile

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])
sys.path.insert(0, __file__.rsplit("/", 1)[0])

import eval_on_mesh  # noqa: E402
from internvl_jax import quantize  # noqa: E402
from internvl_jax.evaluate import models, placement  # noqa: E402
from internvl_jax.generate import generate  # noqa: E402


def main(path: str) -> None:
  assert jax.device_count() == 8, jax.device_count()
  folder = eval_on_mesh.chat_folder(tempfile.mkdtemp())
  single = quantize.quantize(models.load_hf(folder).model, "int8", vision=True)
  on_mesh = models.load_hf(folder, mesh=placement.make_mesh("fsdp=4,tensor=2"))
  q = quantize.quantize(on_mesh.model, "int8", vision=True)
  ids, mask, pixels = eval_on_mesh.chat_inputs(on_mesh, 8)
  want = np.asarray(generate(single, ids, pixels, mask, max_new_tokens=6))
  got = np.asarray(generate(q, ids, pixels, mask, max_new_tokens=6))
  dev0 = jax.devices()[0]
  kernels = {}
  for p, v in nnx.to_flat_state(nnx.state(q)):
    name = "/".join(map(str, p))
    if name.endswith("/qvalue") or name.endswith("/scale"):
      a = v.get_value()
      kernels[name] = {"dtype": str(a.dtype), "bytes": int(a.nbytes), "spec": str(a.sharding.spec),
                       "device0": int(sum(s.data.nbytes for s in a.addressable_shards if s.device == dev0))}
  with open(path, "w") as f:
    json.dump({"tokens_equal": bool(np.array_equal(got, want)), "new_tokens": got[:, ids.shape[1]:].tolist(),
               "kernels": kernels}, f, indent=1)


if __name__ == "__main__":
  main(*sys.argv[1:])

"""Memory of one stage-1 train step with config.contrastive_accum_steps = K (train/contrastive_accum.py) at a fixed
global batch: XLA's own compiled memory analysis, nothing is run.

  python -m internvl_jax.bench.contrastive_accum [--batch 64] [--chunks 1,2,4,8] [--width 384] [--layers 6]
                                                 [--image 112] [--text-len 32] [--remat none] [--time 0]

Model: the tiny contrastive preset widened to --width (vision and text towers, MLP 4x, heads of 64) with --layers
layers each, images of --image px (patch 14), captions of --text-len tokens; float32 on one device of the default
backend. Columns: K, rows per chunk, XLA's temporaries (activations, gradients, the optimizer's scratch), the
arguments (state + batch) and the estimated peak (arguments + outputs - donated aliases + temporaries), in MiB.
--time N > 0 also runs each K's step (random batch) N times after one untimed step, interleaved across the K's,
and prints the median step time.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from internvl_jax import sharding
from internvl_jax.train import defaults, state as state_lib, steps

MIB = 2 ** 20


def run_config(width: int, layers: int, image: int, text_len: int, batch: int, k: int, remat: str):
  c = defaults.base_config("contrastive", "tiny")
  for tower in (c.model.vision, c.model.text):
    tower.hidden_size, tower.num_layers, tower.mlp_dim, tower.num_heads = width, layers, 4 * width, width // 64
    tower.remat = remat
  c.model.text.num_kv_heads = width // 64
  c.model.vision.image_size, c.model.embed_dim = image, 256
  c.data.max_text_len, c.batch_size, c.contrastive_accum_steps = text_len, batch, k
  return c


def compiled_step(cfg):
  """(setup, the train step compiled for cfg's batch shapes, a random batch of them) on one device."""
  mesh = sharding.make_mesh({"fsdp": 1}, jax.devices()[:1])
  setup = state_lib.setup_state(cfg, cfg.model, mesh)
  s, t, b = cfg.model.vision.image_size, cfg.data.max_text_len, cfg.batch_size
  rng = np.random.default_rng(0)
  batch = {"pixel_values": rng.normal(size=(b, s, s, 3)).astype(np.float32),
           "input_ids": rng.integers(1, cfg.model.text.vocab_size, size=(b, t)).astype(np.int32),
           "attention_mask": np.ones((b, t), np.int32)}
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
  return setup, steps.make_train_step(setup, cfg).lower(setup.abstract, shapes).compile(), batch


def step_memory(compiled) -> dict:
  """Compiled memory analysis of a train step (bytes): temp, argument, output, alias and the peak estimate."""
  m = compiled.memory_analysis()
  out = {n: int(getattr(m, f"{n}_size_in_bytes")) for n in ("temp", "argument", "output", "alias")}
  out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--chunks", default="1,2,4,8")
  p.add_argument("--width", type=int, default=384)
  p.add_argument("--layers", type=int, default=6)
  p.add_argument("--image", type=int, default=112)
  p.add_argument("--text-len", type=int, default=32)
  p.add_argument("--remat", default="none")
  p.add_argument("--time", type=int, default=0)
  a = p.parse_args(argv)
  print(f"{jax.default_backend()}; towers {a.width} wide x {a.layers} layers, {a.image} px, {a.text_len} tokens, "
        f"batch {a.batch}, remat {a.remat}")
  print("| K | rows/chunk | temporaries MiB | arguments MiB | peak MiB |")
  print("|---|---|---|---|---|")
  runs = {}
  for k in (int(x) for x in a.chunks.split(",")):
    setup, compiled, batch = compiled_step(run_config(a.width, a.layers, a.image, a.text_len, a.batch, k, a.remat))
    m = step_memory(compiled)
    print(f"| {k} | {a.batch // k} | {m['temp'] / MIB:.1f} | {m['argument'] / MIB:.1f} | {m['peak'] / MIB:.1f} |",
          flush=True)
    if a.time:
      runs[k] = [compiled, setup.create(), batch, []]
  for _ in range(a.time + 1):
    for run in runs.values():
      t0 = time.perf_counter()
      run[1], m = run[0](run[1], run[2])
      jax.block_until_ready(m["loss"])
      run[3].append(time.perf_counter() - t0)
  for k, run in runs.items():
    print(f"K={k}: median step {1000 * float(np.median(run[3][1:])):.0f} ms over {a.time} steps")


if __name__ == "__main__":
  main()

"""Stage-3 packing: padding and training throughput with and without `data.packing`.

  python -m internvl_jax.bench.packing [--steps 8] [--batch 16] [--max-tiles 7] [--max-text-len 48]

Model: the demo's stage-3 chat model (configs/demo.py, random weights: speed does not depend on them). Data:
  demo    the demo world, 56 px square images (dynamic tiling gives 1 tile each, as the official rule does for a
          small square image), max_tiles slots per example without packing
  mixed   the same conversations with the images stretched to aspect ratios 1:1, 2:1, 1:2, 3:1, 1:3, 3:2 and every
          7th record text only: 0 to max_tiles tiles per example (official rule, thumbnail included)
For each: unpacked (one example per row, max_tiles slots), packed with the default tile budget
(data.tiles_per_batch = 0: derived from the first records) and packed with a budget of 2 tiles per row. The same rows x tokens (batch x
max_text_len) everywhere. Batches are made first and kept in memory, so the timings are the jitted train step
only (forward + backward + AdamW; vision tower frozen, as stage 3 trains); the configurations of a data set are
timed interleaved (one step of each in turn). Columns: examples per step, step time (median of --steps timed
steps after 2 untimed), examples/s, real tokens/s (tokens of examples, padding and the
unattended image tokens of empty slots excluded), padding shares of the token grid and of the tiles the vision
tower runs on.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from PIL import Image

from internvl_jax.data import demo, features, pipeline, tokenizer
from internvl_jax.train import config_checks, loop, state as state_lib, steps as steps_lib

ASPECTS = [(1, 1), (2, 1), (1, 2), (3, 1), (1, 3), (3, 2)]  # (width, height) ratios of the mixed set


class MixedSource:
  """The demo world with stretched images and some text-only records (see module doc)."""

  def __init__(self, size: int, image_size: int):
    self.world = demo.DemoWorld("train", size, image_size)
    self.s = image_size

  def __len__(self):
    return len(self.world)

  def texts(self):
    return self.world.texts()

  def __getitem__(self, i):
    rec = dict(self.world[i])
    if i % 7 == 6:
      del rec["image"]
      return rec
    w, h = ASPECTS[i % len(ASPECTS)]
    rec["image"] = np.asarray(Image.fromarray(rec["image"]).resize((self.s * w, self.s * h)))
    return rec


def _config(batch: int, max_tiles: int, max_len: int, packing: bool, tiles_per_batch: int):
  from configs import demo as demo_config  # the repository's configs package (run from the repository root)

  cfg = demo_config.stage3()
  cfg.init.path = ""
  cfg.batch_size, cfg.data.max_tiles, cfg.data.max_text_len = batch, max_tiles, max_len
  cfg.data.packing, cfg.data.tiles_per_batch = packing, tiles_per_batch
  return cfg


def _stats(batch: dict, cfg, tok, packed: bool) -> dict:
  n = config_checks.tokens_per_tile(cfg)
  ids, attn = batch["input_ids"], batch["attention_mask"].astype(bool)
  grid = ids.size
  if packed:
    examples = int(batch["segment_ids"].max(axis=1).sum())
    real_tiles, slots = int((ids == tok.image_token_id).sum()) // n, len(batch["pixel_values"])
  else:
    examples = len(ids)
    real_tiles = int(((ids == tok.image_token_id) & attn).sum()) // n
    slots = batch["pixel_values"].shape[0] * batch["pixel_values"].shape[1]
  return {"examples": examples, "tokens": int(attn.sum()), "grid": grid, "tiles": real_tiles, "slots": slots}


def prepare(source, cfg, tok, steps: int) -> dict:
  """Makes 2 + steps batches (kept in memory), the state and the jitted train step, and compiles it."""
  packed = loop.packing_on(cfg)
  mesh = config_checks.make_checked_mesh(cfg)
  config_checks.validate(cfg, mesh)
  fn = features.make_feature_fn(loop.feature_spec(cfg, train=True), tok)
  it = iter(pipeline.train_dataset(source, fn, global_batch=cfg.batch_size, seed=0,
                                   tracker=pipeline.BadRecordTracker(), num_threads=2,
                                   packing=loop.pack_spec(cfg, tok, source)))
  batches = [next(it) for _ in range(steps + 2)]
  setup = state_lib.setup_state(cfg, cfg.model, mesh)
  sh = steps_lib.batch_sharding(mesh)
  run = {"stats": [_stats(b, cfg, tok, packed) for b in batches[2:]], "state": setup.create(),
         "step": steps_lib.make_train_step(setup, cfg), "times": [],
         "batches": [{k: jax.device_put(v, sh) for k, v in b.items()} for b in batches]}
  for b in run["batches"][:2]:  # compile and warm up, untimed
    _timed_step(run, b)
  return run


def _timed_step(run: dict, batch: dict) -> float:
  t0 = time.perf_counter()
  run["state"], m = run["step"](run["state"], batch)
  jax.block_until_ready(m["loss"])
  return time.perf_counter() - t0


def measure(runs: list[dict], steps: int) -> list[dict]:
  """Interleaved timing: round i runs step i of every configuration in turn, so that a neighbour's load on a
  shared machine slows all of them alike; the median over rounds is reported."""
  for i in range(steps):
    for run in runs:
      run["times"].append(_timed_step(run, run["batches"][2 + i]))
  out = []
  for run in runs:
    t = float(np.median(run["times"]))
    total = {k: sum(s[k] for s in run["stats"]) for k in run["stats"][0]}
    out.append({"examples_per_step": total["examples"] / steps, "step_s": t,
                "examples_per_s": total["examples"] / steps / t, "tokens_per_s": total["tokens"] / steps / t,
                "token_padding": 1 - total["tokens"] / total["grid"],
                "tile_padding": 1 - total["tiles"] / total["slots"], "tiles_per_step": total["slots"] / steps,
                "real_tiles_per_example": total["tiles"] / total["examples"]})
  return out


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m internvl_jax.bench.packing", description=__doc__.split("\n\n")[0])
  p.add_argument("--steps", type=int, default=8)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--max-tiles", type=int, default=7)
  p.add_argument("--max-text-len", type=int, default=48)
  p.add_argument("--data", nargs="+", default=["demo", "mixed"], choices=["demo", "mixed"])
  a = p.parse_args(argv)
  base = _config(a.batch, a.max_tiles, a.max_text_len, False, 0)
  size = config_checks.input_size(base)
  print(f"backend {jax.default_backend()}, {jax.device_count()} device(s); batch {a.batch} rows x "
        f"{a.max_text_len} tokens, max_tiles {a.max_tiles}; median of {a.steps} train steps")
  print("| data | mode | tiles/step | examples/step | step ms | examples/s | real tokens/s | token padding | "
        "tile padding | tiles/example |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for name in a.data:
    source = demo.DemoWorld("train", 4000, size) if name == "demo" else MixedSource(4000, size)
    tok = tokenizer.build_word_level(source.texts())
    runs = [("unpacked", False, 0), ("packed, tiles_per_batch=0 (from data)", True, 0),
            ("packed, 2 tiles/row", True, 2 * a.batch)]
    prepared = []
    for _, packing, tiles in runs:
      cfg = _config(a.batch, a.max_tiles, a.max_text_len, packing, tiles)
      config_checks.adapt_model_to_tokenizer(cfg, tok, built=True)
      prepared.append(prepare(source, cfg, tok, a.steps))
    for (mode, _, _), r in zip(runs, measure(prepared, a.steps)):
      print(f"| {name} | {mode} | {r['tiles_per_step']:.0f} | {r['examples_per_step']:.1f} | {1e3 * r['step_s']:.0f} "
            f"| {r['examples_per_s']:.1f} | {r['tokens_per_s']:.0f} | {r['token_padding']:.1%} | "
            f"{r['tile_padding']:.1%} | {r['real_tiles_per_example']:.2f} |", flush=True)


if __name__ == "__main__":
  main()

"""Stage-1 input speed from webdataset shards: samples/s of the training input pipeline per CPU core, beside what
the InternViT-6B contrastive train step consumes per accelerator.

  python -m internvl_jax.bench.wds_input [--samples 600] [--width 512 --height 384] [--threads 1,2]
      [--step_time 2.0 --per_chip_batch 32 --mfu 0.4 --chip h100]

Data: synthetic JPEGs (quality 90, smooth colour gradients plus noise, width x height; img2dataset writes 256 to
512 px images for stage-1 sets) with a 12-word caption, in shards of 100 samples (fewer for short runs) in a
temporary folder.
Pipeline: exactly train.py's (pipeline.train_dataset over data/wds.py): tar read, window shuffle (1000), JPEG
decode, random-resized-crop (scale 0.8-1) to 224 px, ImageNet normalisation, caption tokenisation, batches of 32;
data.num_threads reader threads. Also timed: the decode + crop + normalise transform alone in a plain loop (the
part that costs; the rest is the pipeline's overhead: tar reading, tokenising, stacking batches). Per core is
samples per CPU second of the process (time.process_time over all its threads), which a shared machine's other
load does not lower the way it lowers wall-clock samples/s.

Demand: model FLOPs per image-text pair of configs/contrastive.py:model=internvit_6b at 224 px (plan.analytic_flops:
forward + backward), turned into images/s per chip two ways: the planned step time (docs/scaling.md: 2 s per
step at 32 pairs per chip on H100, about 17% MFU) and a target MFU on the chip's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import io
import os
import tarfile
import tempfile
import time

import numpy as np
from PIL import Image

from internvl_jax.data import features, pipeline, transforms, wds
from internvl_jax.data import tokenizer as tokenizer_lib

WORDS = "a photo of the red blue small large dog cat car tree house street beach sky over under near".split()


def synthetic_jpeg(rng: np.random.Generator, width: int, height: int) -> bytes:
  yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
  base = rng.uniform(0, 255, 3) + rng.uniform(-0.3, 0.3, 3) * xx[..., None] + rng.uniform(-0.3, 0.3, 3) * yy[..., None]
  img = np.clip(base + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)
  out = io.BytesIO()
  Image.fromarray(img).save(out, format="JPEG", quality=90)
  return out.getvalue()


def write_shards(folder: str, n: int, width: int, height: int, per_shard: int = 100) -> tuple[list[str], list[str]]:
  """n distinct-looking samples (a pool of 50 images, re-used) in shards; returns (paths, captions)."""
  rng = np.random.default_rng(0)
  pool = [synthetic_jpeg(rng, width, height) for _ in range(50)]
  paths, captions = [], []
  for first in range(0, n, per_shard):
    path = os.path.join(folder, f"bench-{first // per_shard:05d}.tar")
    with tarfile.open(path, "w") as tar:
      for i in range(first, min(first + per_shard, n)):
        caption = " ".join(rng.choice(WORDS, 12))
        captions.append(caption)
        for ext, data in (("jpg", pool[i % len(pool)]), ("txt", caption.encode())):
          info = tarfile.TarInfo(f"{i:08d}.{ext}")
          info.size = len(data)
          tar.addfile(info, io.BytesIO(data))
    paths.append(path)
  return paths, captions


def time_pipeline(paths, tok, threads: int, samples: int, batch: int = 32) -> tuple[float, float]:
  """(samples per wall second, samples per CPU second of this process) of train.py's input pipeline, after a
  one-batch warm-up."""
  spec = features.FeatureSpec(task="contrastive", image_size=224, max_text_len=32, augment=True)
  fn = features.make_feature_fn(spec, tok)
  src = wds.WdsSource(paths, shuffle_buffer=1000)
  tracker = pipeline.BadRecordTracker()
  it = iter(pipeline.train_dataset(src, fn, global_batch=batch, seed=0, tracker=tracker, num_threads=threads))
  next(it)
  steps = max(samples // batch, 1)
  t0, c0 = time.perf_counter(), time.process_time()
  for _ in range(steps):
    next(it)
  return steps * batch / (time.perf_counter() - t0), steps * batch / (time.process_time() - c0)


def time_transform(paths, samples: int) -> float:
  """Samples per CPU second of decode + random-resized-crop to 224 + normalise alone, one thread."""
  with tarfile.open(paths[0]) as tar:
    jpgs = [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]
  rng = np.random.default_rng(0)
  c0 = time.process_time()
  for i in range(samples):
    img = transforms.decode_image(jpgs[i % len(jpgs)])
    transforms.normalize(transforms.random_resized_crop(img, 224, rng, scale=(0.8, 1.0)))
  return samples / (time.process_time() - c0)


def demand(step_time: float, per_chip_batch: int, mfu: float, chip: str) -> dict:
  """Images/s per chip that the InternViT-6B stage-1 step consumes: at the planned step time, and at `mfu`."""
  from configs import contrastive  # the repository's configs package (run from the repository root)
  from internvl_jax import plan
  from internvl_jax.bench import flops

  cfg = contrastive.get_config("model=internvit_6b")
  cfg.batch_size = 1
  per_pair = plan.analytic_flops(cfg)
  peak = flops.table_peak_tflops(chip) or 989.0
  return {"tflop_per_pair": per_pair / 1e12, "planned": per_chip_batch / step_time,
          "planned_mfu": per_chip_batch / step_time * per_pair / (peak * 1e12), "at_mfu": mfu * peak * 1e12 / per_pair,
          "peak": peak}


def main(argv=None) -> list[dict]:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--samples", type=int, default=600)
  ap.add_argument("--width", type=int, default=512)
  ap.add_argument("--height", type=int, default=384)
  ap.add_argument("--threads", default="1,2")
  ap.add_argument("--step_time", type=float, default=2.0)
  ap.add_argument("--per_chip_batch", type=int, default=32)
  ap.add_argument("--mfu", type=float, default=0.4)
  ap.add_argument("--chip", default="h100")
  args = ap.parse_args(argv)

  need = demand(args.step_time, args.per_chip_batch, args.mfu, args.chip)
  rows = []
  with tempfile.TemporaryDirectory() as folder:
    n = args.samples + 64
    paths, captions = write_shards(folder, n, args.width, args.height, per_shard=min(100, max(n // 8, 1)))
    tok = tokenizer_lib.build_word_level(captions)
    alone = time_transform(paths, min(args.samples, 300))
    for threads in (int(t) for t in args.threads.split(",")):
      rate, per_cpu_s = time_pipeline(paths, tok, threads, args.samples)
      rows.append({"threads": threads, "samples_per_s": rate, "per_core": per_cpu_s})
  try:
    load = os.getloadavg()[0]
  except OSError:
    load = float("nan")
  print(f"\nwds input, {args.width}x{args.height} JPEG -> 224 px random-resized-crop ({os.cpu_count()} cores, load "
        f"average {load:.1f}; decode + crop + normalise alone: {alone:.0f} samples per CPU second)")
  print("per core = samples per CPU second of the process (what one fully used core gives, whatever else runs on "
        "the machine); wall samples/s depend on the machine's other load")
  print("| reader threads | wall samples/s | samples/s per core | cores per chip at planned step | at "
        f"{100 * args.mfu:.0f}% MFU |")
  print("|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['threads']} | {r['samples_per_s']:.0f} | {r['per_core']:.0f} | {need['planned'] / r['per_core']:.2f} "
          f"| {need['at_mfu'] / r['per_core']:.2f} |")
  print(f"\nInternViT-6B stage 1 (internvl_c preset, 224 px, 32 tokens): {need['tflop_per_pair']:.1f} TFLOP per pair "
        f"(forward + backward); planned {args.per_chip_batch} pairs per chip per {args.step_time:g} s = "
        f"{need['planned']:.1f} images/s per chip ({100 * need['planned_mfu']:.0f}% MFU on {args.chip}, "
        f"{need['peak']:.0f} TFLOP/s); at {100 * args.mfu:.0f}% MFU: {need['at_mfu']:.1f} images/s per chip")
  return rows


if __name__ == "__main__":
  main()

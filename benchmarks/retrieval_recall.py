"""Time and peak memory of retrieval recall at COCO scale with random embeddings.

  PYTHONPATH=. python benchmarks/retrieval_recall.py [--images 5000] [--texts 25000] [--dim 768] [--block 512]

Measures evaluate_retrieval (normalisation, both blocked top-k searches, recall@1/5/10) once after a warm-up on the
same shapes (so jit compilation is reported separately), and the process's peak resident memory. Captions are
assigned round-robin (5 per image at 5000 x 25000), as in COCO.
"""

import argparse
import json
import resource
import time

import jax
import numpy as np

from internvl_jax.evaluate import retrieval


def peak_rss_mib() -> float:
  # ru_maxrss is in KiB on Linux.
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--images", type=int, default=5000)
  ap.add_argument("--texts", type=int, default=25000)
  ap.add_argument("--dim", type=int, default=768)
  ap.add_argument("--block", type=int, default=512)
  args = ap.parse_args()

  rng = np.random.default_rng(0)
  img = rng.standard_normal((args.images, args.dim), dtype=np.float32)
  txt = rng.standard_normal((args.texts, args.dim), dtype=np.float32)
  txt2img = np.arange(args.texts) % args.images
  rss_inputs = peak_rss_mib()

  t0 = time.perf_counter()
  retrieval.evaluate_retrieval(img, txt, txt2img, block_size=args.block)  # compiles the block functions
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  res = retrieval.evaluate_retrieval(img, txt, txt2img, block_size=args.block)
  steady = time.perf_counter() - t0

  full_matrix_mib = args.images * args.texts * 4 / 2**20
  print(json.dumps({
    "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
    "images": args.images, "texts": args.texts, "dim": args.dim, "block": args.block,
    "first_call_s (incl. compile)": round(first, 2), "steady_s": round(steady, 2),
    "peak_rss_MiB": round(peak_rss_mib(), 1), "peak_rss_after_inputs_MiB": round(rss_inputs, 1),
    "full_similarity_matrix_would_be_MiB": round(full_matrix_mib, 1),
    "recall (random, ~chance)": res.metrics,
  }, indent=2))


if __name__ == "__main__":
  main()

"""Weight-only quantization (internvl_jax/quantize.py) on CPU: parameter bytes, greedy tokens/s, max logit error and
greedy-token agreement against the float32 model, for a chat preset with random weights (text-only prompts).

  PYTHONPATH=. python benchmarks/quantize_bench.py --preset tiny --prompts 8 --new 16
  PYTHONPATH=. python benchmarks/quantize_bench.py --preset internvl3_5_1b --prompts 3 --new 8

Prompts run one at a time (batch 1); tokens/s is the median over prompts after the first (whose time includes
compilation). Logit error: the quantized model's logits vs the float model's over prompt + float continuation
(teacher forced), max |diff| and that over max |float logit|. Agreement: fraction of new-token positions where
the free-running greedy tokens are equal (after a first difference the two continuations condition on different
text, so it drops fast), and "forced": the argmax of both models' logits at each new-token position of the float
model's continuation.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from internvl_jax import quantize
from internvl_jax.generate import generate
from internvl_jax.models import internvl, presets


def run(preset: str, prompts: int, new: int, prompt_len: int, init_std: float | None, modes: list[str],
        group_size: int | None = None) -> list[dict]:
  cfg = presets.chat(preset)
  cfg.language.dtype = cfg.vision.dtype = "float32"
  if init_std is not None:
    cfg.language.init_std = init_std
  t0 = time.perf_counter()
  model = internvl.InternVLChat(cfg, rngs=nnx.Rngs(0))
  print(f"built {preset} in {time.perf_counter() - t0:.0f} s", flush=True)
  rng = np.random.default_rng(0)
  ids = rng.integers(0, min(cfg.language.vocab_size, 30000), (prompts, prompt_len)).astype(np.int32)
  forward = nnx.jit(lambda m, x: m(x, None, jnp.ones(x.shape, bool)).logits)
  rows, ref_tokens, ref_logits, full = [], None, None, None
  for mode in ["float32"] + modes:
    t0 = time.perf_counter()
    group = group_size if mode == "int4" else None
    m = model if mode == "float32" else quantize.quantize(model, mode, group_size=group)
    qtime = time.perf_counter() - t0
    tokens, times = [], []
    for i in range(prompts):
      t0 = time.perf_counter()
      out = np.asarray(generate(m, ids[i:i + 1], max_new_tokens=new))
      times.append(time.perf_counter() - t0)
      tokens.append(out[0, prompt_len:])
    tokens = np.stack(tokens)
    if mode == "float32":
      ref_tokens = tokens
      full = jnp.asarray(np.concatenate([ids, tokens], axis=1))
    logits = np.asarray(forward(m, full))
    if mode == "float32":
      ref_logits = logits
    err = float(np.abs(logits - ref_logits).max())
    row = dict(preset=preset, mode=mode, param_bytes=quantize.param_bytes(m),
               lm_param_bytes=quantize.param_bytes(m.language), quantize_s=round(qtime, 2),
               tokens_per_s=round(new / float(np.median(times[1:] if len(times) > 1 else times)), 2),
               first_call_s=round(times[0], 1), max_logit_err=err, rel_logit_err=err / float(np.abs(ref_logits).max()),
               greedy_agreement=float(np.mean(tokens == ref_tokens)),
               forced_agreement=float(np.mean(logits[:, prompt_len - 1:-1].argmax(-1) ==
                                              ref_logits[:, prompt_len - 1:-1].argmax(-1))),
               distinct_float_tokens=int(len(np.unique(ref_tokens))))
    print(json.dumps(row), flush=True)
    rows.append(row)
    del m
  return rows


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--preset", default="tiny")
  p.add_argument("--prompts", type=int, default=8)
  p.add_argument("--new", type=int, default=16)
  p.add_argument("--prompt_len", type=int, default=16)
  p.add_argument("--init_std", type=float, default=None, help="language init std (tiny: 0.25 gives varied tokens)")
  p.add_argument("--modes", default="int8,int4")
  p.add_argument("--group_size", type=int, default=None, help="int4 group (default: quantize.py's 128)")
  p.add_argument("--out", default=None, help="JSON lines file")
  a = p.parse_args()
  rows = run(a.preset, a.prompts, a.new, a.prompt_len, a.init_std, a.modes.split(","), a.group_size)
  print("| preset | weights | param bytes (all / LM) | tokens/s (batch 1) | max logit err (rel) | "
        "greedy agreement (free / forced) |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['preset']} | {r['mode']} | {r['param_bytes'] / 2**20:.1f} / {r['lm_param_bytes'] / 2**20:.1f} MiB | "
          f"{r['tokens_per_s']} | {r['max_logit_err']:.3g} ({r['rel_logit_err']:.2%}) | "
          f"{r['greedy_agreement']:.1%} / {r['forced_agreement']:.1%} |")
  if a.out:
    with open(a.out, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
  main()
